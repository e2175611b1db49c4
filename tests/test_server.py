"""The signer daemon for real: SoftHSM2 token, gRPC server on 127.0.0.1:0,
mutual TLS with certificates made here, links checked with verifier_sdk."""

from __future__ import annotations

import datetime
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from helpers import AUD, HSM_PIN_ENV, write_signer_config
from hsm_fixtures import SoftHsm

from signer._audit import read_records, verify_log
from signer._config import load_config
from signer._devpki import DevCA
from signer._errors import Unavailable
from signer._proto.mandate.v1 import signer_pb2 as pb
from signer._proto.mandate.v1 import signer_pb2_grpc as pb_grpc
from signer._server import Daemon
from signer.cli import cap_to_proto
from verifier_sdk import Holder, Request, TrustBundle, VerificationError, Verifier

ORCH = "spiffe://acme.example/svc/orchestrator"
ADMIN = "spiffe://acme.example/ops/oncall"
OTHER = "spiffe://acme.example/svc/unknown"
TOKEN = "mandate-service"

POLICY = f"""
admins = ["{ADMIN}"]

[[grant]]
caller = "{ORCH}"
subjects = ["agent:support/*"]
caps = [
  {{ res = "api/payments/refunds/*", act = ["post"], if = {{ amount = {{ le = 5000 }} }} }},
  {{ res = "db/orders/**", act = ["select"], if = {{ customer = {{ eq = 42 }} }} }},
]
max_ttl = 600
max_dpt = 2
audiences = ["{AUD}", "orders-db"]
"""

REFUND_CAP = {"res": "api/payments/refunds/o-123", "act": ["post"],
              "if": {"amount": {"le": 4999}}}


@dataclass
class Env:
    """A running daemon and what a client needs to reach it."""

    daemon: Daemon
    directory: Path
    ca: DevCA
    config_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.daemon.port}"

    def channel(self, identity: str | None = ORCH, *, ca: DevCA | None = None,
                **issue: Any) -> grpc.Channel:
        root = self.ca.pem
        if identity is None:
            creds = grpc.ssl_channel_credentials(root_certificates=root)
        else:
            client = (ca or self.ca).issue(uri=identity, **issue)
            creds = grpc.ssl_channel_credentials(root_certificates=root,
                                                 private_key=client.key,
                                                 certificate_chain=client.cert)
        return grpc.secure_channel(self.target, creds)

    def stub(self, identity: str | None = ORCH) -> pb_grpc.SignerStub:
        return pb_grpc.SignerStub(self.channel(identity))

    def bundle(self) -> TrustBundle:
        reply = self.stub().GetTrustBundle(pb.GetTrustBundleRequest(), timeout=10)
        return TrustBundle.from_jwks(reply.jwks)


def delegate_request(holder: Holder, **changes: Any) -> pb.DelegateRequest:
    jwk = holder.public_jwk
    fields: dict[str, Any] = {
        "sub": "agent:support/refund-7",
        "holder_jwk": pb.Jwk(kty=jwk["kty"], crv=jwk["crv"], x=jwk["x"], y=jwk.get("y", "")),
        "caps": [cap_to_proto(REFUND_CAP)],
        "ttl_seconds": 120, "aud": [AUD], "dpt": 1,
        "idempotency_key": str(uuid.uuid4()),
    }
    fields.update(changes)
    return pb.DelegateRequest(**fields)


def start_daemon(hsm: SoftHsm, directory: Path, ca: DevCA, *, key_alg: str = "EdDSA",
                 new_key: bool = True, **server: Any) -> Env:
    ca.issue(cn="mandate-signer", server=True).write(directory, "server")
    (directory / "ca.pem").write_bytes(ca.pem)
    server.setdefault("issuance", "inline")  # the tests reach into the issuer
    config = write_signer_config(
        directory, hsm_module=hsm.module, token=TOKEN, policy=POLICY,
        server={"tls_cert": "server.pem", "tls_key": "server.key", "client_ca": "ca.pem",
                **server},
        state={"dir": "state"}, issuer="mandate-signer-test")
    os.environ[HSM_PIN_ENV] = hsm.user_pin
    daemon = Daemon(load_config(config))
    if new_key:
        daemon.issuer.add_key(f"root-{uuid.uuid4().hex[:12]}", key_alg)
    daemon.start()
    return Env(daemon, directory, ca, config)


@pytest.fixture(params=["EdDSA", "ES256"])
def env(request: pytest.FixtureRequest, hsm: SoftHsm, tmp_path: Path) -> Iterator[Env]:
    running = start_daemon(hsm, tmp_path, DevCA(), key_alg=request.param)
    yield running
    running.daemon.stop(grace=1)


def denial_reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def use_chain(env: Env, chain: str, holder: Holder, req: Request, **settings: Any) -> None:
    verifier = Verifier(env.bundle(), audience=AUD, **settings)
    verifier.verify(chain, req, pop=holder.prove(chain, req, aud=AUD))


REFUND = Request("api/payments/refunds/o-123", "post", {"amount": 4999})


# --- delegation ----------------------------------------------------------------------

def test_delegate_signs_in_the_hsm_and_the_link_verifies(env: Env) -> None:
    holder = Holder.generate()
    reply = env.stub().Delegate(delegate_request(holder), timeout=10)
    assert not reply.idempotent_replay
    use_chain(env, reply.chain, holder, REFUND)
    # The tampered twin: a request beyond what was delegated.
    with pytest.raises(VerificationError) as err:
        use_chain(env, reply.chain, holder,
                  Request("api/payments/refunds/o-123", "post", {"amount": 5000}))
    assert err.value.code == "denied"
    records = env.daemon.audit.records(jti=reply.jti)
    assert [r.event for r in records] == ["delegate"]
    assert records[0].caller == ORCH


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"caps": [cap_to_proto({"res": "api/payments/refunds/*", "act": ["post"]})]},
         "capability_not_contained"),
        ({"ttl_seconds": 3600}, "ttl_exceeds_max"),
        ({"sub": "agent:billing/x"}, "subject_not_allowed"),
        ({"dpt": 5}, "depth_exceeds_max"),
        ({"aud": ["elsewhere"]}, "audience_not_allowed"),
        ({"aud": []}, "audience_required"),
    ],
    ids=["wider-scope", "ttl-too-long", "wrong-subject", "too-deep", "other-audience",
         "no-audience"],
)
def test_policy_denials_are_refused_and_audited(env: Env, changes: dict[str, Any],
                                                reason: str) -> None:
    stub = env.stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.Delegate(delegate_request(Holder.generate(), **changes), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denial_reason(err.value) == reason
    denials = env.daemon.audit.records(event="deny")
    assert [d.reason for d in denials] == [reason]
    # Twin: the unchanged request is allowed.
    stub.Delegate(delegate_request(Holder.generate()), timeout=10)


def test_an_unknown_caller_is_denied_and_audited(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as err:
        env.stub(OTHER).Delegate(delegate_request(Holder.generate()), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denial_reason(err.value) == "caller_unknown"
    assert [d.caller for d in env.daemon.audit.records(event="deny")] == [OTHER]


@pytest.mark.parametrize(
    "client",
    ["no-certificate", "other-ca", "expired", "not-yet-valid"],
)
def test_clients_without_a_valid_certificate_are_refused(env: Env, client: str) -> None:
    if client == "no-certificate":
        channel = env.channel(None)
    elif client == "other-ca":
        channel = env.channel(ORCH, ca=DevCA("Someone Else's CA"))
    elif client == "expired":
        channel = env.channel(ORCH, valid_from=datetime.timedelta(hours=-3),
                              valid_for=datetime.timedelta(hours=1))
    else:
        channel = env.channel(ORCH, valid_from=datetime.timedelta(hours=2))
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.SignerStub(channel).Delegate(delegate_request(Holder.generate()), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert env.daemon.audit.records(event="delegate") == []


def test_invalid_requests_are_invalid_argument(env: Env) -> None:
    stub = env.stub()
    bad = delegate_request(Holder.generate())
    bad.holder_jwk.x = "not-a-key"
    with pytest.raises(grpc.RpcError) as err:
        stub.Delegate(bad, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.Delegate(delegate_request(Holder.generate(), idempotency_key=""), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("method", "payload"),
    [
        ("/mandate.v1.Signer/Delegate", b"\xff\xff\xff"),
        ("/mandate.v1.Signer/Delegate", b"\x0a\x05ab"),
        ("/mandate.v1.Signer/Revoke", b"\x0a\x02\xc3\x28"),
        ("/mandate.v1.SignerAdmin/RotateKey", b"\x07"),
    ],
    ids=["not-protobuf", "field-cut-short", "string-not-utf8", "wire-type-7"],
)
def test_request_bytes_that_do_not_decode_are_invalid_argument(
        hsm: SoftHsm, tmp_path: Path, method: str, payload: bytes) -> None:
    """The client's fault, not the server's: never INTERNAL or UNKNOWN, nothing
    audited, and the daemon serves the next call."""
    running = start_daemon(hsm, tmp_path, DevCA())
    try:
        before = running.daemon.audit.records()
        call = running.channel(ADMIN).unary_unary(method)  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as err:
            call(payload, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "malformed request message"
        assert running.daemon.audit.records() == before
        # The twin: a well-formed request on the same kind of channel is served.
        delegate = running.channel(ORCH).unary_unary("/mandate.v1.Signer/Delegate")
        reply = pb.DelegateResponse.FromString(
            delegate(delegate_request(Holder.generate()).SerializeToString(), timeout=10))
        assert [r.event for r in running.daemon.audit.records(jti=reply.jti)] == ["delegate"]
    finally:
        running.daemon.stop(grace=1)


def test_a_retry_with_the_same_idempotency_key_returns_the_same_link(env: Env) -> None:
    stub = env.stub()
    holder = Holder.generate()
    request = delegate_request(holder)
    first = stub.Delegate(request, timeout=10)
    again = stub.Delegate(request, timeout=10)
    assert again.idempotent_replay
    assert (again.chain, again.jti) == (first.chain, first.jti)
    assert len(env.daemon.audit.records(event="delegate")) == 1
    # The same key for another request is refused, not silently answered.
    with pytest.raises(grpc.RpcError) as err:
        stub.Delegate(delegate_request(holder, idempotency_key=request.idempotency_key,
                                       ttl_seconds=60), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- revocation ----------------------------------------------------------------------

def test_revoke_publishes_a_list_that_kills_the_chain_and_its_offline_children(env: Env
                                                                              ) -> None:
    holder, child = Holder.generate(), Holder.generate()
    stub = env.stub()
    reply = stub.Delegate(delegate_request(holder), timeout=10)
    offline = holder.attenuate(reply.chain, sub="agent:helper", holder_jwk=child.public_jwk,
                               cap=[REFUND_CAP], ttl=60)
    before = stub.GetRevocationList(pb.GetRevocationListRequest(), timeout=10)
    revoked = stub.Revoke(pb.RevokeRequest(jti=[reply.jti], reason="test"), timeout=10)
    assert revoked.revocation_list.seq > before.seq
    verifier = Verifier(env.bundle(), audience=AUD, require_revocations=True)
    assert verifier.update_revocations(revoked.revocation_list.token)
    for chain, who in ((reply.chain, holder), (offline, child)):
        with pytest.raises(VerificationError) as err:
            verifier.verify(chain, REFUND, pop=who.prove(chain, REFUND, aud=AUD))
        assert (err.value.code, err.value.link) == ("revoked", 0)
    assert [r.event for r in env.daemon.audit.records(event="revoke")] == ["revoke"]


def test_only_the_issuing_caller_or_an_admin_may_revoke(env: Env) -> None:
    reply = env.stub().Delegate(delegate_request(Holder.generate()), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        env.stub(OTHER).Revoke(pb.RevokeRequest(jti=[reply.jti]), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    env.stub(ADMIN).Revoke(pb.RevokeRequest(jti=[reply.jti]), timeout=10)


# --- keys, audit, restart ------------------------------------------------------------------

def test_rotation_keeps_old_links_valid_and_signs_new_ones_with_the_new_key(env: Env) -> None:
    stub = env.stub()
    old_holder = Holder.generate()
    old = stub.Delegate(delegate_request(old_holder), timeout=10)
    admin = pb_grpc.SignerAdminStub(env.channel(ADMIN))
    new_kid = f"root-{uuid.uuid4().hex[:12]}"
    rotated = admin.RotateKey(pb.RotateKeyRequest(new_kid=new_kid), timeout=10)
    assert (rotated.new_key.kid, rotated.previous_key.kid) == (new_kid, old.kid)
    assert rotated.previous_key.expires >= old.expires_at
    new_holder = Holder.generate()
    new = stub.Delegate(delegate_request(new_holder), timeout=10)
    assert new.kid == new_kid
    use_chain(env, old.chain, old_holder, REFUND)
    use_chain(env, new.chain, new_holder, REFUND)
    listed = admin.ListKeys(pb.ListKeysRequest(), timeout=10)
    assert {k.kid: k.active for k in listed.keys} == {old.kid: False, new_kid: True}
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.SignerAdminStub(env.channel(ORCH)).ListKeys(pb.ListKeysRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_concurrent_delegations_lose_and_duplicate_no_record(env: Env) -> None:
    stub = env.stub()
    holder = Holder.generate()
    calls = 8 * 12

    def one(_: int) -> str:
        return str(stub.Delegate(delegate_request(holder), timeout=30).jti)

    with futures.ThreadPoolExecutor(8) as pool:
        jtis = list(pool.map(one, range(calls), timeout=120))
    assert len(set(jtis)) == calls
    records = env.daemon.audit.records(event="delegate")
    assert sorted(r.jti for r in records) == sorted(jtis)


def test_restart_continues_the_audit_chain_and_it_verifies(hsm: SoftHsm, tmp_path: Path) -> None:
    ca = DevCA()
    first = start_daemon(hsm, tmp_path, ca)
    first.stub().Delegate(delegate_request(Holder.generate()), timeout=10)
    bundle = first.bundle()
    first.daemon.stop(grace=1)
    second = Daemon(load_config(first.config_path))
    second.start()
    try:
        env = Env(second, tmp_path, ca, first.config_path)
        env.stub().Delegate(delegate_request(Holder.generate()), timeout=10)
    finally:
        second.stop(grace=1)
    log = tmp_path / "state" / "audit.db"
    report = verify_log(log, bundle)
    assert report.ok, report.message
    events = [r.event for r in read_records(log)]
    assert events[:2] == ["key", "start"]
    assert [events.count(e) for e in ("start", "stop", "delegate")] == [2, 2, 2]


def test_health_and_reflection(env: Env) -> None:
    channel = env.channel(ORCH)
    health = health_pb2_grpc.HealthStub(channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service="mandate.v1.Signer"),
                          timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"mandate.v1.Signer", "mandate.v1.SignerAdmin", "grpc.health.v1.Health"} <= names


@contextmanager
def inside_the_hsm(daemon: Daemon, action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` at the start of every signature the daemon asks of the HSM
    (to hold calls in flight, slow them, or make the token fail)."""
    signer = daemon.issuer.signer(daemon.issuer.keyring()[0].kid)
    original = signer.sign

    def sign(data: bytes) -> bytes:
        action()
        return original(data)

    signer.sign = sign  # type: ignore[method-assign]
    try:
        yield
    finally:
        signer.sign = original  # type: ignore[method-assign]


class Gate:
    """Holds signatures until released; tells when one is waiting."""

    def __init__(self) -> None:
        self.inside, self.released = threading.Event(), threading.Event()

    def __call__(self) -> None:
        self.inside.set()
        self.released.wait(10)


def test_the_concurrency_limit_answers_resource_exhausted(hsm: SoftHsm, tmp_path: Path
                                                          ) -> None:
    running = start_daemon(hsm, tmp_path, DevCA(), max_concurrent_rpcs=1)
    gate = Gate()
    stub = running.stub()
    try:
        with inside_the_hsm(running.daemon, gate), futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(stub.Delegate, delegate_request(Holder.generate()), timeout=20)
            assert gate.inside.wait(10), "the first call never reached the HSM"
            with pytest.raises(grpc.RpcError) as err:
                stub.Delegate(delegate_request(Holder.generate()), timeout=5)
            gate.released.set()
            assert first.result(timeout=20).chain
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # With the slot free again, calls are served.
        stub.Delegate(delegate_request(Holder.generate()), timeout=10)
    finally:
        gate.released.set()
        running.daemon.stop(grace=1)


def test_a_call_over_the_server_time_cap_issues_nothing(hsm: SoftHsm, tmp_path: Path) -> None:
    running = start_daemon(hsm, tmp_path, DevCA(), rpc_time_limit_s=0.3)
    stub = running.stub()
    try:
        with inside_the_hsm(running.daemon, lambda: time.sleep(0.6)), \
                pytest.raises(grpc.RpcError) as err:
            stub.Delegate(delegate_request(Holder.generate()), timeout=10)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert running.daemon.audit.records(event="delegate") == []
        stub.Delegate(delegate_request(Holder.generate()), timeout=10)  # the twin: in time
        assert len(running.daemon.audit.records(event="delegate")) == 1
    finally:
        running.daemon.stop(grace=1)


def _health(env: Env) -> int:
    stub = health_pb2_grpc.HealthStub(env.channel(ORCH))
    return int(stub.Check(health_pb2.HealthCheckRequest(service="mandate.v1.Signer"),
                          timeout=10).status)


def _token_gone() -> None:
    raise Unavailable("token not present")


def test_while_the_hsm_is_down_health_is_not_serving_and_calls_fail_fast(env: Env) -> None:
    with inside_the_hsm(env.daemon, _token_gone):
        env.daemon._hsm_health(False)  # what the token's health callback reports
        assert _health(env) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            env.stub().Delegate(delegate_request(Holder.generate()), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert env.daemon.audit.records(event="delegate") == []
    env.daemon._hsm_health(True)
    assert _health(env) == health_pb2.HealthCheckResponse.SERVING
    env.stub().Delegate(delegate_request(Holder.generate()), timeout=10)


def test_a_message_over_the_size_limit_is_refused(env: Env) -> None:
    big = delegate_request(Holder.generate(), sub="agent:support/" + "x" * 70_000)
    with pytest.raises(grpc.RpcError) as err:
        env.stub().Delegate(big, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert env.daemon.audit.records(event="delegate") == []


def test_stop_finishes_calls_in_flight_refuses_new_ones_and_flushes_the_log(
        hsm: SoftHsm, tmp_path: Path) -> None:
    running = start_daemon(hsm, tmp_path, DevCA())
    gate = Gate()
    stub = running.stub()
    try:
        with inside_the_hsm(running.daemon, gate), futures.ThreadPoolExecutor(2) as pool:
            in_flight = pool.submit(stub.Delegate, delegate_request(Holder.generate()),
                                    timeout=20)
            assert gate.inside.wait(10)
            stopping = pool.submit(running.daemon.stop, 10)
            assert running.daemon._stopped.wait(10)  # stop() has begun ...
            time.sleep(0.2)  # ... and, right after, the server stops accepting
            with pytest.raises(grpc.RpcError) as err:
                stub.Delegate(delegate_request(Holder.generate()), timeout=5)
            gate.released.set()
            reply = in_flight.result(timeout=20)
            stopping.result(timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gate.released.set()
        running.daemon.stop(grace=1)
    events = [(r.event, r.jti) for r in read_records(tmp_path / "state" / "audit.db")]
    assert ("delegate", reply.jti) in events
    assert events[-1][0] == "stop"
