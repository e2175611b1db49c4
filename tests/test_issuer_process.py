"""The daemon as shipped: gRPC front end here, issuance in its issuer process.

Real SoftHSM2 token, real server on 127.0.0.1:0 with mutual TLS; the issuer
process is a real child process that opens the token itself. What crosses
between the two — request bytes, the caller's certificate, the deadline,
statuses with their details — is checked from the client's side, and the
audit log is read from its file.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hsm_fixtures import SoftHsm
from test_server import (
    ADMIN,
    ORCH,
    POLICY,
    REFUND,
    Env,
    delegate_request,
    denial_reason,
    start_daemon,
    use_chain,
)

from signer._audit import read_records, verify_log
from signer._config import load_config
from signer._devpki import DevCA
from signer._errors import ConfigError
from signer._proto.mandate.v1 import signer_pb2 as pb
from signer._proto.mandate.v1 import signer_pb2_grpc as pb_grpc
from signer._server import Daemon
from signer.cli import cap_to_proto
from verifier_sdk import Holder, TrustBundle

DELEGATE = "/mandate.v1.Signer/Delegate"


def start_process_daemon(hsm: SoftHsm, directory: Path) -> Env:
    """A key made in the token first (by an inline daemon that never serves),
    then the daemon with ``issuance = "process"`` on the same config."""
    made = start_daemon(hsm, directory, DevCA())
    made.daemon.stop(grace=0)
    text = made.config_path.read_text()
    made.config_path.write_text(text.replace('issuance = "inline"', 'issuance = "process"'))
    daemon = Daemon(load_config(made.config_path))
    assert daemon.core is None, "issuance must run in the issuer process here"
    daemon.start()
    return Env(daemon, directory, made.ca, made.config_path)


@pytest.fixture
def env(hsm: SoftHsm, tmp_path: Path) -> Iterator[Env]:
    running = start_process_daemon(hsm, tmp_path)
    yield running
    running.daemon.stop(grace=1)


def audit_log(env: Env) -> Path:
    return env.directory / "state" / "audit.db"


def issuer_pid(daemon: Daemon) -> int:
    assert daemon._process is not None
    return daemon._process._proc.pid


def test_a_link_from_the_issuer_process_verifies_and_is_audited(env: Env) -> None:
    holder = Holder.generate()
    reply = env.stub().Delegate(delegate_request(holder), timeout=10)
    use_chain(env, reply.chain, holder, REFUND)
    env.daemon.stop(grace=1)
    records = [r for r in read_records(audit_log(env)) if r.jti == reply.jti]
    assert [(r.event, r.caller) for r in records] == [("delegate", ORCH)]


def test_a_denial_keeps_its_reason_across_the_processes(env: Env) -> None:
    wide = [cap_to_proto({"res": "api/payments/refunds/*", "act": ["post"]})]
    with pytest.raises(grpc.RpcError) as err:
        env.stub().Delegate(delegate_request(Holder.generate(), caps=wide), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denial_reason(err.value) == "capability_not_contained"


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05ab"],
                         ids=["not-protobuf", "truncated-field"])
def test_request_bytes_that_do_not_parse_are_invalid_argument(env: Env, payload: bytes) -> None:
    call = env.channel(ORCH).unary_unary(DELEGATE)  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as err:
        call(payload, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The twin: the same channel with a well-formed request.
    assert pb.DelegateResponse.FromString(
        call(delegate_request(Holder.generate()).SerializeToString(), timeout=10)).chain


def test_admin_calls_see_the_callers_certificate(env: Env) -> None:
    keys = pb_grpc.SignerAdminStub(env.channel(ADMIN)).ListKeys(pb.ListKeysRequest(), timeout=10)
    assert any(k.active for k in keys.keys)
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.SignerAdminStub(env.channel(ORCH)).ListKeys(pb.ListKeysRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_policy_reload_reaches_the_issuer_process(env: Env) -> None:
    policy = env.directory / "policy.toml"
    policy.write_text("not = [valid")
    assert env.daemon.reload_policy() is False  # the old policy stays
    env.stub().Delegate(delegate_request(Holder.generate()), timeout=10)
    policy.write_text(POLICY.replace('"agent:support/*"', '"agent:billing/*"'))
    assert env.daemon.reload_policy() is True
    with pytest.raises(grpc.RpcError) as err:
        env.stub().Delegate(delegate_request(Holder.generate()), timeout=10)
    assert denial_reason(err.value) == "subject_not_allowed"


def test_concurrent_calls_each_get_their_own_answer_and_record(env: Env) -> None:
    stub = env.stub()
    calls = 64

    def one(i: int) -> tuple[str, str]:
        holder = Holder.generate()
        if i % 4 == 3:  # a denial among the grants
            with pytest.raises(grpc.RpcError) as err:
                stub.Delegate(delegate_request(holder, ttl_seconds=3600), timeout=30)
            return "deny", denial_reason(err.value)
        reply = stub.Delegate(delegate_request(holder), timeout=30)
        return "delegate", reply.jti

    with futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(calls), timeout=120))
    bundle = env.bundle()
    env.daemon.stop(grace=5)
    jtis = sorted(value for kind, value in answers if kind == "delegate")
    assert len(set(jtis)) == len(jtis) == calls * 3 // 4
    assert {value for kind, value in answers if kind == "deny"} == {"ttl_exceeds_max"}
    records = read_records(audit_log(env))
    assert sorted(r.jti for r in records if r.event == "delegate") == jtis
    assert sum(r.event == "deny" for r in records) == calls // 4
    assert records[-1].event == "stop"
    report = verify_log(audit_log(env), TrustBundle.from_jwks(bundle.to_jwks()))
    assert report.ok, report.message


def test_health_is_serving_and_stop_leaves_no_issuer_process(env: Env) -> None:
    health = health_pb2_grpc.HealthStub(env.channel(ORCH))
    reply = health.Check(health_pb2.HealthCheckRequest(service="mandate.v1.Signer"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    pid = issuer_pid(env.daemon)
    env.daemon.stop(grace=1)
    assert env.daemon._process is not None
    assert env.daemon._process._proc.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_losing_the_issuer_process_fails_calls_and_stops_the_daemon(env: Env) -> None:
    stub = env.stub()
    stub.Delegate(delegate_request(Holder.generate()), timeout=10)
    os.kill(issuer_pid(env.daemon), signal.SIGKILL)
    stopped = threading.Thread(target=env.daemon.wait, daemon=True)
    stopped.start()
    stopped.join(30)
    assert not stopped.is_alive(), "the daemon did not stop after losing its issuer"
    assert env.daemon.failed
    with pytest.raises(grpc.RpcError) as err:
        stub.Delegate(delegate_request(Holder.generate()), timeout=10)
    # Refused by the stopping server (CANCELLED) or by a stopped one (UNAVAILABLE).
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def test_start_up_errors_in_the_issuer_process_are_config_errors(hsm: SoftHsm,
                                                                 tmp_path: Path) -> None:
    made = start_daemon(hsm, tmp_path, DevCA())
    made.daemon.stop(grace=0)
    config = made.config_path
    config.write_text(config.read_text().replace('issuance = "inline"', 'issuance = "process"')
                      .replace('token_label = "mandate-service"',
                               'token_label = "mandate-wrong-pin"'))
    (tmp_path / "state").rename(tmp_path / f"old-{uuid.uuid4().hex}")  # no keys in the bundle
    with pytest.raises(ConfigError, match="no root key is active"):
        Daemon(load_config(config))
    os.environ["MANDATE_TEST_HSM_PIN"] = "wrong-pin-0000"
    try:
        with pytest.raises(ConfigError, match="PIN"):
            Daemon(load_config(config))
    finally:
        os.environ["MANDATE_TEST_HSM_PIN"] = hsm.user_pin
