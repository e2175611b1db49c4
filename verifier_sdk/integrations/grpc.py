"""Mandate over gRPC: a server interceptor that verifies every call, and a
client interceptor that sends a chain and a fresh PoP with every call.

Credentials travel in metadata ``mandate-chain`` and ``mandate-pop``. A
refusal aborts the call with the status ``KIND_OF`` gives its code, a message
``"<code>: <reason>"`` and a ``google.rpc.ErrorInfo`` detail (domain
``mandate.verifier``, reason = the code, metadata ``link``) that
``refusal_of`` reads back on the client.

For the synchronous ``grpc.server`` (not ``grpc.aio``). gRPC's default
metadata limit (8 KiB) is below the spec's 64 KiB chain limit: pass
``METADATA_OPTIONS`` to the server and channel when chains may be long.
Needs ``grpcio`` and ``grpcio-status``.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, Final, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from .._capability import Request
from .._errors import VerificationError
from .._holder import Holder
from .._verifier import Decision, Verifier
from ._common import BAD_REQUEST, KIND_OF, MISSING_CREDENTIALS, Kind, Refusal

__all__ = [
    "CHAIN_KEY",
    "ERROR_DOMAIN",
    "METADATA_OPTIONS",
    "POP_KEY",
    "GrpcRequestMapper",
    "MandateClientInterceptor",
    "MandateServerInterceptor",
    "current_decision",
    "mandate_metadata",
    "refusal_of",
]

CHAIN_KEY: Final = "mandate-chain"
POP_KEY: Final = "mandate-pop"
ERROR_DOMAIN: Final = "mandate.verifier"

#: Server and channel options that admit the largest chain the spec allows
#: (64 KiB) plus a PoP and ordinary metadata.
METADATA_OPTIONS: Final = (("grpc.max_metadata_size", 96 * 1024),)

#: (full method name, e.g. "/payments.v1.Payments/Refund", request message) → Request.
#: For a client-streaming method the message is None: one verification covers
#: the whole stream. A ValueError or LookupError means "this call is not
#: expressible" (INVALID_ARGUMENT, ``bad_request``).
GrpcRequestMapper = Callable[[str, Any], Request]

_STATUS: Final[dict[Kind, grpc.StatusCode]] = {
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
}

_DECISION: contextvars.ContextVar[Decision] = contextvars.ContextVar("mandate_decision")


def current_decision() -> Decision:
    """The Decision for the call this handler serves; RuntimeError outside a
    verified call (no interceptor, or an exempt method)."""
    try:
        return _DECISION.get()
    except LookupError:
        raise RuntimeError("no verified Mandate call in this context") from None


def _abort(context: Any, refusal: Refusal) -> NoReturn:
    status = status_pb2.Status(
        code=_STATUS[refusal.kind].value[0], message=f"{refusal.code}: {refusal.message}",
    )
    info = error_details_pb2.ErrorInfo(reason=refusal.code, domain=ERROR_DOMAIN)
    if refusal.link is not None:
        info.metadata["link"] = str(refusal.link)
    detail = any_pb2.Any()
    detail.Pack(info)
    status.details.append(detail)
    context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def _credentials(metadata: Any) -> tuple[str, str | None] | Refusal:
    """(chain, PoP or None) from invocation metadata, or why not."""
    chains: list[str] = []
    pops: list[str] = []
    for key, value in metadata or ():
        if key == CHAIN_KEY:
            chains.append(value)
        elif key == POP_KEY:
            pops.append(value)
    if not chains:
        return Refusal(MISSING_CREDENTIALS, None, f"no Mandate chain in metadata {CHAIN_KEY!r}")
    if len(chains) > 1:
        return Refusal("malformed", None, f"metadata {CHAIN_KEY!r} is repeated")
    if len(pops) > 1:
        return Refusal("pop_invalid", None, f"metadata {POP_KEY!r} is repeated")
    return chains[0], (pops[0] if pops else None)


class MandateServerInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Verifies every call before its handler runs; the handler reads the
    result with ``current_decision()``.

    Methods in ``exempt_methods`` (full names, e.g. the health check) pass
    unverified. Missing metadata is refused before the mapper runs; the mapper
    runs where the request message is known, inside the wrapped handler.
    """

    def __init__(self, verifier: Verifier, to_request: GrpcRequestMapper, *,
                 exempt_methods: Collection[str] = ()) -> None:
        if not isinstance(verifier, Verifier):
            raise TypeError("verifier must be a verifier_sdk.Verifier")
        self._verifier = verifier
        self._to_request = to_request
        self._exempt = frozenset(exempt_methods)

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method in self._exempt:
            return handler
        credentials = _credentials(handler_call_details.invocation_metadata)

        def check(message: Any, context: Any) -> contextvars.Context:
            """Verify, or abort; a context in which the handler sees the Decision."""
            if isinstance(credentials, Refusal):
                _abort(context, credentials)
            chain, pop = credentials
            try:
                request = self._to_request(method, message)
            except (ValueError, LookupError) as exc:  # e.g. a field the mapper needs is missing
                _abort(context, Refusal(BAD_REQUEST, None, f"{type(exc).__name__}: {exc}"))
            if not isinstance(request, Request):
                raise TypeError("the request mapper must return a verifier_sdk.Request")
            try:
                decision = self._verifier.verify(chain, request, pop=pop)
            except VerificationError as exc:
                _abort(context, Refusal(exc.code, exc.link, exc.message))
            run_in = contextvars.copy_context()
            run_in.run(_DECISION.set, decision)
            return run_in

        def streamed(run_in: contextvars.Context, responses: Iterator[Any]) -> Iterator[Any]:
            # Each step of the handler's generator runs in the verified context.
            while True:
                try:
                    yield run_in.run(next, responses)
                except StopIteration:
                    return

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            def unary_unary(request: Any, context: Any) -> Any:
                return check(request, context).run(inner_uu, request, context)
            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: Any) -> Iterator[Any]:
                run_in = check(request, context)
                yield from streamed(run_in, iter(run_in.run(inner_us, request, context)))
            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_unary:
            inner_su = handler.stream_unary

            def stream_unary(requests: Iterator[Any], context: Any) -> Any:
                return check(None, context).run(inner_su, requests, context)
            return grpc.stream_unary_rpc_method_handler(
                stream_unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        inner_ss = handler.stream_stream

        def stream_stream(requests: Iterator[Any], context: Any) -> Iterator[Any]:
            run_in = check(None, context)
            yield from streamed(run_in, iter(run_in.run(inner_ss, requests, context)))
        return grpc.stream_stream_rpc_method_handler(
            stream_stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


# --- the agent's side ----------------------------------------------------------


def mandate_metadata(holder: Holder, chain: str, request: Request, *, aud: str,
                     now: float | None = None) -> tuple[tuple[str, str], tuple[str, str]]:
    """Metadata for one call: the chain and a fresh PoP for ``request`` at ``aud``."""
    return (CHAIN_KEY, chain), (POP_KEY, holder.prove(chain, request, aud=aud, now=now))


class _CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class MandateClientInterceptor(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
):
    """Attaches ``chain`` and a fresh PoP to every unary-request call.

    ``to_request`` must map (method, message) exactly as the service's mapper
    does, or the PoP's ``req`` will not match. Use with
    ``grpc.intercept_channel(channel, MandateClientInterceptor(...))``.
    """

    def __init__(self, holder: Holder, chain: str, to_request: GrpcRequestMapper, *,
                 aud: str, clock: Callable[[], float] = time.time) -> None:
        self._holder = holder
        self._chain = chain
        self._to_request = to_request
        self._aud = aud
        self._clock = clock

    def _details(self, details: Any, message: Any) -> _CallDetails:
        method = details.method
        if isinstance(method, bytes):
            method = method.decode()
        request = self._to_request(method, message)
        kept = [(k, v) for k, v in (details.metadata or ()) if k not in (CHAIN_KEY, POP_KEY)]
        added = mandate_metadata(self._holder, self._chain, request, aud=self._aud,
                                 now=self._clock())
        return _CallDetails(details, [*kept, *added])

    def intercept_unary_unary(self, continuation: Callable[[Any, Any], Any],
                              client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details, request), request)

    def intercept_unary_stream(self, continuation: Callable[[Any, Any], Any],
                               client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details, request), request)


def refusal_of(error: grpc.RpcError) -> Refusal | None:
    """The Refusal a MandateServerInterceptor sent, or None for any other error."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN and info.reason in KIND_OF:
            link = info.metadata.get("link")
            message = str(status.message).removeprefix(f"{info.reason}: ")
            return Refusal(str(info.reason), None if link is None else int(link), message)
    return None
