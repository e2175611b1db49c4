"""The gRPC shell: protobuf ⇄ domain objects, caller identity, and the one
table from domain errors to status codes. No issuance logic lives here."""

from __future__ import annotations

import ipaddress
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ._errors import (
    ConfigError,
    InvalidRequest,
    LimitReached,
    NotAllowed,
    NotFound,
    PolicyDenied,
    SignerError,
    TimedOut,
    Unauthenticated,
    Unavailable,
)
from ._issuer import Batch, Issuer, PublishedList
from ._metrics import Metrics
from ._model import DelegateRequest
from ._proto.mandate.v1 import signer_pb2 as pb
from ._proto.mandate.v1 import signer_pb2_grpc as pb_grpc
from ._state import KeyRecord

log = logging.getLogger("mandate.signer")


class Peer(Protocol):
    """What identifies a call's caller: its verified certificate and address."""

    def auth_context(self) -> dict[str, list[bytes]]: ...
    def peer(self) -> str: ...


class Context(Peer, Protocol):
    """The part of a call's context the servicers use (see ``CallContext``)."""

    batch: Batch | None
    on_end: Callable[[grpc.StatusCode], None] | None

    def time_remaining(self) -> float | None: ...
    def abort(self, code: grpc.StatusCode, details: str) -> None: ...
    def abort_with_status(self, status: grpc.Status) -> None: ...

ERROR_DOMAIN = "mandate.signer"

#: The one mapping from domain errors to gRPC status codes.
STATUS_OF: dict[type[SignerError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PolicyDenied: grpc.StatusCode.PERMISSION_DENIED,
    NotAllowed: grpc.StatusCode.PERMISSION_DENIED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    LimitReached: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TimedOut: grpc.StatusCode.DEADLINE_EXCEEDED,
    ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_for(error: SignerError) -> status_pb2.Status:
    """The rich status for an error: code, message, and for a policy denial an
    ErrorInfo whose ``reason`` is the machine-readable denial reason."""
    code = STATUS_OF.get(type(error), grpc.StatusCode.INTERNAL)
    status = status_pb2.Status(code=code.value[0], message=error.message)
    if isinstance(error, PolicyDenied):
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))
        status.details.append(detail)
    return status


def _loopback_peer(peer: str) -> bool:
    """``ipv4:127.0.0.1:5000``, ``ipv6:%5B::1%5D:5000`` (or unescaped), ``unix:...``."""
    kind, _, address = peer.partition(":")
    if kind == "unix":
        return True
    host = urllib.parse.unquote(address).rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def caller_identity(context: Peer) -> str:
    """The verified client certificate's URI SAN (e.g. a SPIFFE ID), else its CN.

    Taken only from the peer certificate the TLS handshake verified; a
    plaintext (loopback development) listener has none, and the caller is
    then ``local:insecure``.
    """
    auth = context.auth_context()
    pem = auth.get("x509_pem_cert")
    if not pem:
        plaintext = auth.get("transport_security_type") in (None, [b"insecure"])
        if plaintext and _loopback_peer(context.peer()):
            return "local:insecure"
        raise Unauthenticated("no verified client certificate")
    identity = _IDENTITIES.get(pem[0])
    if identity is None:
        identity = _identity_of(pem[0])
        if len(_IDENTITIES) >= 1024:
            _IDENTITIES.clear()
        _IDENTITIES[pem[0]] = identity
    return identity


# Client certificates recur on every call; parsing one costs ~100 us.
_IDENTITIES: dict[bytes, str] = {}


def _identity_of(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris:
        return str(uris[0])
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names:
        return str(names[0].value)
    raise Unauthenticated("the client certificate names no URI SAN and no CN")


Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def _handled(method: Callable[[Any, Req, Context], Resp]
             ) -> Callable[[Any, Req, Context], Resp]:
    """Turn domain errors into statuses; anything else is logged and INTERNAL.

    Also the one place RPCs are measured: count and latency by method and
    status code, calls in flight, policy denials by reason (when the servicer
    has metrics). gRPC's own health and reflection services are not counted.
    """
    name = method.__name__

    def wrapper(self: Any, request: Req, context: Context) -> Resp:
        metrics: Metrics | None = self._metrics
        if metrics is not None:
            in_flight = metrics.in_flight(name)
            in_flight.inc()

            def end(final: grpc.StatusCode) -> None:
                metrics.rpc_done(name, final, time.perf_counter() - start)
                in_flight.dec()

        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return method(self, request, context)
        except SignerError as error:
            code = STATUS_OF.get(type(error), grpc.StatusCode.INTERNAL)
            if isinstance(error, PolicyDenied):
                if metrics is not None:
                    metrics.denied(error.reason)
            elif not isinstance(error, InvalidRequest | NotFound | NotAllowed):
                log.warning("%s failed: %s", name, error.message,
                            extra={"method": name, "code": code.name,
                                   "duration_ms": _ms(start)})
            context.abort_with_status(rpc_status.to_status(status_for(error)))
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s: unexpected error", name,
                          extra={"method": name, "code": code.name, "duration_ms": _ms(start)})
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            if metrics is not None:
                if context.batch is None:
                    end(code)
                else:  # the call's status is final once its batch is committed
                    context.on_end = end
        raise AssertionError("unreachable: abort raises")  # pragma: no cover
    wrapper.__name__ = name
    return wrapper


# --- protobuf → domain ---------------------------------------------------------

def _scalar(value: pb.Scalar) -> str | int | bool:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest("a constraint value is empty")
    result: str | int | bool = getattr(value, kind)
    return result


def cap_from_proto(cap: pb.Capability) -> dict[str, Any]:
    out: dict[str, Any] = {"res": cap.res, "act": list(cap.act)}
    if cap.when:
        when: dict[str, Any] = {}
        for attr, c in cap.when.items():
            ops: dict[str, Any] = {}
            if c.HasField("eq"):
                ops["eq"] = _scalar(c.eq)
            if c.any_of:
                ops["in"] = [_scalar(v) for v in c.any_of]
            for op in ("lt", "le", "gt", "ge", "prefix"):
                if c.HasField(op):
                    ops[op] = getattr(c, op)
            when[attr] = ops
        out["if"] = when
    return out


def jwk_from_proto(jwk: pb.Jwk) -> dict[str, str]:
    out = {"kty": jwk.kty, "crv": jwk.crv, "x": jwk.x}
    if jwk.y:
        out["y"] = jwk.y
    return out


def jwk_to_proto(jwk: dict[str, Any]) -> pb.Jwk:
    return pb.Jwk(kty=jwk["kty"], crv=jwk["crv"], x=jwk["x"], y=jwk.get("y", ""))


def delegate_from_proto(req: pb.DelegateRequest) -> DelegateRequest:
    return DelegateRequest(
        sub=req.sub,
        holder_jwk=jwk_from_proto(req.holder_jwk),
        caps=tuple(cap_from_proto(c) for c in req.caps),
        ttl=req.ttl_seconds,
        aud=tuple(req.aud) if req.aud else None,
        dpt=req.dpt,
        use=req.use if req.HasField("use") else None,
        idempotency_key=req.idempotency_key,
        key=req.kid or None,
    )


def _list_to_proto(published: PublishedList) -> pb.RevocationList:
    return pb.RevocationList(token=published.token, seq=published.seq,
                             expires_at=published.expires_at)


# --- servicers -------------------------------------------------------------------

def time_budget(remaining: float | None, cap_s: float) -> float:
    """Seconds a call may still take: the client's time left, or the server's
    cap if sooner."""
    return cap_s if remaining is None else min(cap_s, remaining)


def call_deadline(context: Context, cap_s: float) -> float:
    """time.monotonic() deadline: the client's, or the server's cap if sooner."""
    return time.monotonic() + time_budget(context.time_remaining(), cap_s)


class SignerService(pb_grpc.SignerServicer):
    def __init__(self, issuer: Issuer, *, time_limit_s: float = 5.0,
                 metrics: Metrics | None = None) -> None:
        self._issuer = issuer
        self._time_limit_s = time_limit_s
        self._metrics = metrics

    @_handled
    def Delegate(self, request: pb.DelegateRequest,
                 context: Context) -> pb.DelegateResponse:
        start = time.perf_counter()
        caller = caller_identity(context)
        try:
            issued = self._issuer.delegate(caller, delegate_from_proto(request),
                                           deadline=call_deadline(context, self._time_limit_s),
                                           batch=context.batch)
        except PolicyDenied as denial:
            # sub passed validation before the policy ran: a principal, safe to log.
            log.info("deny caller=%s sub=%s reason=%s", caller, request.sub, denial.reason,
                     extra={"method": "Delegate", "code": STATUS_OF[PolicyDenied].name,
                            "caller": caller, "sub": request.sub, "decision": "deny",
                            "reason": denial.reason, "duration_ms": _ms(start)})
            raise
        # Every link is in the audit log; at INFO this would be one line per call.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("delegate caller=%s sub=%s jti=%s replay=%s", caller, request.sub,
                      issued.jti, issued.idempotent_replay,
                      extra={"method": "Delegate", "code": "OK", "caller": caller,
                             "sub": request.sub, "jti": issued.jti, "kid": issued.kid,
                             "decision": "allow", "replay": issued.idempotent_replay,
                             "duration_ms": _ms(start)})
        return pb.DelegateResponse(chain=issued.chain, jti=issued.jti, kid=issued.kid,
                                   expires_at=issued.expires_at,
                                   idempotent_replay=issued.idempotent_replay)

    @_handled
    def Revoke(self, request: pb.RevokeRequest,
               context: Context) -> pb.RevokeResponse:
        start = time.perf_counter()
        caller = caller_identity(context)
        jtis = list(request.jti)
        published = self._issuer.revoke(caller, jtis, reason=request.reason)
        log.info("revoke caller=%s jtis=%s seq=%d", caller, jtis, published.seq,
                 extra={"method": "Revoke", "code": "OK", "caller": caller, "jti": jtis,
                        "decision": "ok", "seq": published.seq, "duration_ms": _ms(start)})
        return pb.RevokeResponse(revocation_list=_list_to_proto(published))

    @_handled
    def GetRevocationList(self, request: pb.GetRevocationListRequest,
                          context: Context) -> pb.RevocationList:
        caller_identity(context)
        return _list_to_proto(self._issuer.revocation_list())

    @_handled
    def GetTrustBundle(self, request: pb.GetTrustBundleRequest,
                       context: Context) -> pb.TrustBundle:
        caller_identity(context)
        return pb.TrustBundle(jwks=json.dumps(self._issuer.trust_bundle(), sort_keys=True))


def _key_to_proto(issuer: Issuer, record: KeyRecord, active: str | None) -> pb.KeyInfo:
    return pb.KeyInfo(kid=record.kid, alg=record.alg,
                      public_jwk=jwk_to_proto(issuer.signer(record.kid).public_jwk),
                      not_before=record.nbf, expires=record.exp or 0,
                      active=record.kid == active)


class SignerAdminService(pb_grpc.SignerAdminServicer):
    def __init__(self, issuer: Issuer, *, max_link_ttl_s: int,
                 checkpoints: Callable[[int], tuple[list[pb.AuditCheckpoint], int, str]],
                 clock: Callable[[], float], metrics: Metrics | None = None) -> None:
        self._issuer = issuer
        self._metrics = metrics
        self._max_link_ttl_s = max_link_ttl_s
        self._checkpoints = checkpoints
        self._clock = clock

    def _admin(self, context: Context) -> str:
        caller = caller_identity(context)
        if caller not in self._issuer.policy.admins:
            raise NotAllowed(f"{caller} is not an admin")
        return caller

    def _active_kid(self) -> str | None:
        try:
            return self._issuer.active_key(int(self._clock())).kid
        except NotFound:
            return None

    @_handled
    def ListKeys(self, request: pb.ListKeysRequest,
                 context: Context) -> pb.ListKeysResponse:
        self._admin(context)
        active = self._active_kid()
        return pb.ListKeysResponse(keys=[_key_to_proto(self._issuer, k, active)
                                         for k in self._issuer.keyring()])

    @_handled
    def RotateKey(self, request: pb.RotateKeyRequest,
                  context: Context) -> pb.RotateKeyResponse:
        caller = self._admin(context)
        new, previous = self._issuer.rotate(
            request.new_kid, request.alg or "EdDSA",
            not_before=request.not_before or None, max_link_ttl_s=self._max_link_ttl_s,
            caller=caller,
        )
        active = self._active_kid()
        return pb.RotateKeyResponse(new_key=_key_to_proto(self._issuer, new, active),
                                    previous_key=_key_to_proto(self._issuer, previous, active))

    @_handled
    def GetAuditCheckpoints(self, request: pb.GetAuditCheckpointsRequest,
                            context: Context) -> pb.GetAuditCheckpointsResponse:
        self._admin(context)
        checkpoints, head_seq, head_hash = self._checkpoints(request.limit or 100)
        return pb.GetAuditCheckpointsResponse(checkpoints=checkpoints, head_seq=head_seq,
                                              head_hash=head_hash)



# --- one call, wherever its servicer runs -------------------------------------------

class Aborted(Exception):
    """Raised by ``CallContext.abort``: the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing: tuple[tuple[str, str | bytes], ...] = ()) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


class CallContext:
    """What a servicer reads of a call: the peer's verified certificate, its
    address and the time left. The front end takes these from gRPC and the
    servicer may run in another process, so they travel as plain values."""

    def __init__(self, pem: bytes | None, transport: bytes | None, peer: str,
                 remaining: float | None) -> None:
        self._pem, self._transport, self._peer = pem, transport, peer
        self._deadline = None if remaining is None else time.monotonic() + remaining
        self.batch: Batch | None = None  # see Batcher
        self.on_end: Callable[[grpc.StatusCode], None] | None = None

    @staticmethod
    def values_of(context: grpc.ServicerContext) -> CallValues:
        """The plain values of a real call (the arguments of the constructor)."""
        auth = context.auth_context()
        pem = auth.get("x509_pem_cert")
        transport = auth.get("transport_security_type")
        return (pem[0] if pem else None, transport[0] if transport else None,
                context.peer(), context.time_remaining())

    def auth_context(self) -> dict[str, list[bytes]]:
        auth = {}
        if self._pem is not None:
            auth["x509_pem_cert"] = [self._pem]
        if self._transport is not None:
            auth["transport_security_type"] = [self._transport]
        return auth

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def abort_with_status(self, status: grpc.Status) -> None:
        raise Aborted(status.code, status.details, tuple(status.trailing_metadata or ()))


#: The plain values of a call: certificate, transport, peer, seconds left.
CallValues = tuple[bytes | None, bytes | None, str, float | None]
#: How a failed call ends: status code name, details, trailing metadata.
Status = tuple[str, str, tuple[tuple[str, str | bytes], ...]]
#: A finished call: (response bytes, None) or (None, its status).
Outcome = tuple[bytes | None, Status | None]
#: How a call ends that failed in a way no servicer mapped (a bug): nothing more is said.
INTERNAL: Outcome = (None, ("INTERNAL", "internal error", ()))


class Dispatcher:
    """Full method name → servicer method, with the request's decoding.

    Requests arrive as bytes: a message that does not parse is the client's
    fault (INVALID_ARGUMENT), not the server's.
    """

    def __init__(self, signer: SignerService, admin: SignerAdminService) -> None:
        self._methods: dict[str, tuple[Callable[[Any, Any], Any], Any]] = {}
        for servicer, service in ((signer, "Signer"), (admin, "SignerAdmin")):
            descriptor = pb.DESCRIPTOR.services_by_name[service]
            for method in descriptor.methods:
                self._methods[f"/{descriptor.full_name}/{method.name}"] = (
                    getattr(servicer, method.name), getattr(pb, method.input_type.name))

    @property
    def methods(self) -> list[str]:
        return list(self._methods)

    def call(self, method: str, payload: bytes, values: CallValues) -> Outcome:
        return self.call_with(method, payload, CallContext(*values))

    def call_with(self, method: str, payload: bytes, context: CallContext) -> Outcome:
        handler, request_type = self._methods[method]
        try:
            request = request_type.FromString(payload)
        except DecodeError:
            return None, ("INVALID_ARGUMENT", "malformed request message", ())
        try:
            return handler(request, context).SerializeToString(), None
        except Aborted as aborted:
            return None, (aborted.code.name, aborted.details, aborted.trailing)
        except Exception:  # the servicers map their own errors: this is a bug
            log.exception("%s: unexpected error", method)
            return INTERNAL


def failed(error: SignerError) -> Outcome:
    """The outcome of a call that ends with ``error``, as a servicer's would be."""
    status = rpc_status.to_status(status_for(error))
    return None, (status.code.name, status.details, tuple(status.trailing_metadata))
