"""The gRPC shell without a network (signer._service, signer._server): the one
table from domain errors to status codes, protobuf ⇄ domain conversions,
the caller's identity from its verified certificate, and policy reload."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from signer._config import load_config
from signer._devpki import DevCA
from signer._errors import (
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
from signer._keys import MemoryKeyStore
from signer._model import DelegateRequest
from signer._proto.mandate.v1 import signer_pb2 as pb
from signer._server import Daemon
from signer._service import (
    ERROR_DOMAIN,
    STATUS_OF,
    caller_identity,
    cap_from_proto,
    delegate_from_proto,
    jwk_from_proto,
    jwk_to_proto,
    status_for,
)
from signer.cli import cap_to_proto
from verifier_sdk import Capability, Holder

# --- the error table ---------------------------------------------------------------

#: DESIGN.md "Errors" and each class's docstring: one code per domain error.
DOCUMENTED = {
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


def subclasses(cls: type[SignerError]) -> set[type[SignerError]]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *subclasses(sub)}
    return found


def make(cls: type[SignerError], message: str) -> SignerError:
    return cls("ttl_exceeds_max", message) if cls is PolicyDenied else cls(message)


def test_every_domain_error_has_a_row() -> None:
    """A new SignerError subclass without a row would become INTERNAL."""
    assert set(STATUS_OF) == subclasses(SignerError) == set(DOCUMENTED)


@pytest.mark.parametrize(("cls", "code"), [pytest.param(c, s, id=c.__name__)
                                           for c, s in DOCUMENTED.items()])
def test_each_error_maps_to_its_documented_status(
    cls: type[SignerError], code: grpc.StatusCode
) -> None:
    status = status_for(make(cls, "what went wrong, in words"))

    assert status.code == code.value[0]
    assert status.message == "what went wrong, in words"
    if cls is not PolicyDenied:
        assert list(status.details) == []  # only a policy denial carries a reason


def test_a_policy_denial_carries_its_reason_as_error_info() -> None:
    status = status_for(PolicyDenied("ttl_exceeds_max", "grant 1: ttl 900 s exceeds 600 s"))

    [detail] = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert (info.reason, info.domain) == ("ttl_exceeds_max", ERROR_DOMAIN)
    assert status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]


def test_a_refusal_that_is_not_a_policy_denial_carries_no_reason() -> None:
    """Twin: NotAllowed shares PERMISSION_DENIED but is not a policy decision."""
    status = status_for(NotAllowed("spiffe://x is not an admin"))

    assert status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert list(status.details) == []


def test_an_error_outside_the_table_is_internal() -> None:
    class Unlisted(SignerError):
        pass

    assert status_for(Unlisted("?")).code == grpc.StatusCode.INTERNAL.value[0]
    assert status_for(SignerError("?")).code == grpc.StatusCode.INTERNAL.value[0]


# --- protobuf ⇄ domain ---------------------------------------------------------------

CAPS = [
    pytest.param({"res": "api/orders/*", "act": ["read"]}, id="no-constraints"),
    pytest.param({"res": "**", "act": ["*"]}, id="any-action"),
    pytest.param({"res": "a", "act": ["x"], "if": {"s": {"eq": "EUR"}}}, id="eq-string"),
    pytest.param({"res": "a", "act": ["x"], "if": {"s": {"eq": ""}}}, id="eq-empty-string"),
    pytest.param({"res": "a", "act": ["x"], "if": {"i": {"eq": 42}}}, id="eq-int"),
    pytest.param({"res": "a", "act": ["x"], "if": {"i": {"eq": 0}}}, id="eq-zero"),
    pytest.param({"res": "a", "act": ["x"], "if": {"i": {"eq": -(2**53 - 1)}}},
                 id="eq-min-safe-int"),
    pytest.param({"res": "a", "act": ["x"], "if": {"b": {"eq": True}}}, id="eq-true"),
    pytest.param({"res": "a", "act": ["x"], "if": {"b": {"eq": False}}}, id="eq-false"),
    pytest.param({"res": "a", "act": ["x"], "if": {"v": {"in": [1, "1", 0, "", -5]}}},
                 id="in-ints-and-strings"),
    pytest.param({"res": "a", "act": ["x"], "if": {"n": {"lt": 0}}}, id="lt-zero"),
    pytest.param({"res": "a", "act": ["x"], "if": {"n": {"le": 5000}}}, id="le"),
    pytest.param({"res": "a", "act": ["x"], "if": {"n": {"gt": -7}}}, id="gt-negative"),
    pytest.param({"res": "a", "act": ["x"], "if": {"n": {"ge": 2**53 - 1}}},
                 id="ge-max-safe-int"),
    pytest.param({"res": "a", "act": ["x"], "if": {"p": {"prefix": "eu-"}}}, id="prefix"),
    pytest.param({"res": "a", "act": ["x"], "if": {"p": {"prefix": ""}}}, id="prefix-empty"),
    pytest.param({"res": "db/orders/**", "act": ["select", "count"],
                  "if": {"amount": {"gt": 0, "le": 5000}, "currency": {"in": ["EUR", "USD"]},
                         "ok": {"eq": True}, "region": {"prefix": "eu"}}},
                 id="several-attributes-and-operators"),
]


def typed(value: Any) -> Any:
    """A value with every scalar's type spelled out: True and 1 stay apart."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return (type(value).__name__, value)


@pytest.mark.parametrize("cap", CAPS)
def test_a_capability_round_trips_through_protobuf(cap: dict[str, Any]) -> None:
    back = cap_from_proto(pb.Capability.FromString(cap_to_proto(cap).SerializeToString()))

    assert typed(back) == typed(cap)
    assert Capability.parse(back).raw == Capability.parse(cap).raw


@pytest.mark.parametrize("constraint", [
    pytest.param(pb.Constraint(eq=pb.Scalar()), id="empty-eq"),
    pytest.param(pb.Constraint(any_of=[pb.Scalar(s="EUR"), pb.Scalar()]), id="empty-in-entry"),
])
def test_an_empty_scalar_is_an_invalid_request(constraint: pb.Constraint) -> None:
    cap = pb.Capability(res="a", act=["x"], when={"v": constraint})

    with pytest.raises(InvalidRequest, match="empty"):
        cap_from_proto(cap)


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_a_holder_jwk_round_trips(alg: str) -> None:
    jwk = Holder.generate(alg).public_jwk

    assert jwk_from_proto(jwk_to_proto(jwk)) == jwk


def test_a_delegate_request_becomes_the_domain_request() -> None:
    jwk = Holder.generate().public_jwk
    cap = {"res": "api/refunds/o-1", "act": ["post"], "if": {"amount": {"le": 100}}}
    message = pb.DelegateRequest(
        sub="agent:a", holder_jwk=jwk_to_proto(jwk), caps=[cap_to_proto(cap)],
        ttl_seconds=120, aud=["payments-api", "ledger"], dpt=2, use=1,
        idempotency_key="retry-1", kid="root-2025",
    )

    assert delegate_from_proto(message) == DelegateRequest(
        sub="agent:a", holder_jwk=jwk, caps=(cap,), ttl=120, aud=("payments-api", "ledger"),
        dpt=2, use=1, idempotency_key="retry-1", key="root-2025",
    )


def test_unset_optional_fields_become_none() -> None:
    req = delegate_from_proto(pb.DelegateRequest(sub="agent:a", ttl_seconds=60))

    assert (req.aud, req.use, req.key) == (None, None, None)
    assert req.caps == ()


def test_use_zero_is_kept_apart_from_no_use() -> None:
    """Twin: ``use`` has presence, so 0 reaches validation instead of meaning 'unlimited'."""
    assert delegate_from_proto(pb.DelegateRequest(use=0)).use == 0


# --- the caller's identity -----------------------------------------------------------

CA = DevCA()
URI = "spiffe://acme.example/svc/orchestrator"
REMOTE = "ipv4:10.20.30.40:50123"
LOOPBACK4 = "ipv4:127.0.0.1:50123"
LOOPBACK6 = "ipv6:%5B::1%5D:50123"  # how grpcio 1.85 reports an IPv6 loopback peer
# Auth contexts as grpcio reports them (measured): TLS, and a plaintext listener.
TLS = {"transport_security_type": [b"ssl"], "security_level": [b"TSI_PRIVACY_AND_INTEGRITY"]}
PLAINTEXT = {"transport_security_type": [b"insecure"], "security_level": [b"TSI_SECURITY_NONE"]}


class FakeContext:
    """The two things caller_identity reads from a grpc.ServicerContext."""

    def __init__(self, auth: dict[str, list[bytes]], peer: str) -> None:
        self._auth = auth
        self._peer = peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def peer(self) -> str:
        return self._peer


def with_cert(pem: bytes) -> dict[str, list[bytes]]:
    return {**TLS, "x509_pem_cert": [pem]}


@pytest.mark.parametrize(("cert", "expected"), [
    pytest.param(CA.issue(uri=URI, cn="orchestrator"), URI, id="uri-san-over-cn"),
    pytest.param(CA.issue(uri=URI), URI, id="uri-san-only"),
    pytest.param(CA.issue(cn="orchestrator"), "orchestrator", id="cn-without-san"),
    pytest.param(CA.issue(cn="orchestrator", server=True), "orchestrator",
                 id="cn-when-san-has-no-uri"),
])
def test_the_identity_is_the_uri_san_else_the_cn(cert: Any, expected: str) -> None:
    assert caller_identity(FakeContext(with_cert(cert.cert), REMOTE)) == expected


def test_a_certificate_naming_nobody_is_unauthenticated() -> None:
    nameless = CA.issue()

    with pytest.raises(Unauthenticated, match="no URI SAN and no CN"):
        caller_identity(FakeContext(with_cert(nameless.cert), REMOTE))


@pytest.mark.parametrize(("auth", "peer"), [
    pytest.param(TLS, REMOTE, id="tls-remote-without-certificate"),
    pytest.param(TLS, LOOPBACK4, id="tls-loopback-without-certificate"),
    pytest.param(PLAINTEXT, REMOTE, id="plaintext-remote"),
    pytest.param({}, "ipv4:192.0.2.7:443", id="empty-auth-remote"),
])
def test_no_certificate_is_unauthenticated(auth: dict[str, list[bytes]], peer: str) -> None:
    with pytest.raises(Unauthenticated):
        caller_identity(FakeContext(auth, peer))


@pytest.mark.parametrize(("auth", "peer"), [
    pytest.param({}, LOOPBACK4, id="empty-auth-ipv4"),
    pytest.param(PLAINTEXT, LOOPBACK4, id="grpc-plaintext-ipv4"),
    pytest.param({}, LOOPBACK6, id="empty-auth-ipv6"),
    pytest.param(PLAINTEXT, LOOPBACK6, id="grpc-plaintext-ipv6"),
])
def test_a_plaintext_loopback_caller_is_local_insecure(
    auth: dict[str, list[bytes]], peer: str
) -> None:
    assert caller_identity(FakeContext(auth, peer)) == "local:insecure"


# --- policy reload --------------------------------------------------------------------

ORCH = "spiffe://acme.example/svc/orchestrator"


def policy_text(max_ttl: int) -> str:
    return f"""
[[grant]]
caller = "{ORCH}"
subjects = ["agent:*"]
caps = [{{ res = "api/orders/**", act = ["read"] }}]
max_ttl = {max_ttl}
max_dpt = 0
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    (tmp_path / "policy.toml").write_text(policy_text(60))
    (tmp_path / "signer.toml").write_text(
        '[policy]\nfile = "policy.toml"\n[state]\ndir = "state"\n'
    )
    built = Daemon(load_config(tmp_path / "signer.toml"), key_store=MemoryKeyStore())
    built.issuer.add_key("root-1", "EdDSA")
    yield built
    built.stop(grace=0)


def ask(daemon: Daemon, ttl: int) -> str:
    """Delegate a link of ``ttl`` seconds: "issued" or the denial reason."""
    req = DelegateRequest(sub="agent:a", holder_jwk=Holder.generate().public_jwk,
                          caps=({"res": "api/orders/o-1", "act": ["read"]},), ttl=ttl,
                          idempotency_key=uuid.uuid4().hex)
    try:
        daemon.issuer.delegate(ORCH, req)
    except PolicyDenied as denial:
        return denial.reason
    return "issued"


@pytest.mark.parametrize("broken", [
    pytest.param("[[grant]\ncaller = 1\n", id="not-toml"),
    pytest.param(policy_text(60) + "colour = 'red'\n", id="unknown-field"),
    pytest.param(policy_text(0), id="max-ttl-zero"),
    pytest.param(None, id="file-removed"),
])
def test_a_broken_policy_file_keeps_the_old_policy(
    daemon: Daemon, broken: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    old = daemon.policy
    if broken is None:
        daemon.config.policy_file.unlink()
    else:
        daemon.config.policy_file.write_text(broken)

    with caplog.at_level(logging.ERROR, logger="mandate.signer"):
        assert daemon.reload_policy() is False

    assert daemon.policy is old
    assert daemon.issuer.policy is old
    assert (ask(daemon, 60), ask(daemon, 120)) == ("issued", "ttl_exceeds_max")
    assert any("keeping the old policy" in r.getMessage() for r in caplog.records)


def test_a_good_policy_file_is_swapped_in(daemon: Daemon) -> None:
    old = daemon.policy
    assert ask(daemon, 120) == "ttl_exceeds_max"
    daemon.config.policy_file.write_text(policy_text(600))

    assert daemon.reload_policy() is True

    assert daemon.policy is not old
    assert daemon.issuer.policy is daemon.policy
    assert daemon.max_link_ttl() == 600
    assert ask(daemon, 120) == "issued"
