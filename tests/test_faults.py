"""Faults through a whole running daemon, over gRPC with mutual TLS.

What a caller and an operator see when a part fails: the call's status, the
health service (NOT_SERVING while the token is unreachable), failing fast,
recovery without a restart, and the audit log: every link a caller received
has its record, and a failed call has none.

Faults SoftHSM2 can show are real: sessions closed under the daemon, the
token's directory moved away and back (a ``mandate serve`` of its own, since
SoftHSM reads its token store once per process), a missing token, a refused
PIN. What it cannot show is injected at the one seam the fault needs: a slow
signature and workers held in the HSM at the key signer, a commit that fails
at the audit store's SQLite connection, one that returns late at the audit
log's append.

Run with ``-s`` to see the recovery figures the HSM tests measure.
"""

from __future__ import annotations

import ctypes
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Any, ClassVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import wait_for
from hsm_fixtures import SoftHsm
from test_cli import CONFIG, Server, make_site, one_line_error
from test_server import ORCH, POLICY, Env, delegate_request, start_daemon

from signer import _pkcs11
from signer._audit import read_records, verify_log
from signer._config import Config, HsmConfig, ServerConfig
from signer._devpki import DevCA
from signer._errors import ConfigError, TimedOut, Unavailable
from signer._pkcs11 import Pkcs11Token
from signer._proto.mandate.v1 import signer_pb2 as pb
from signer._proto.mandate.v1 import signer_pb2_grpc as pb_grpc
from signer._server import HEALTH_PROBE_INTERVAL_S, Daemon
from verifier_sdk import Holder, TrustBundle
from verifier_sdk._encoding import b64url_decode, sha256_b64
from verifier_sdk._keys import public_key_from_jwk

SIGNER_SERVICE = "mandate.v1.Signer"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SAFETY_S = 30.0  # bounds every wait on the daemon; none is a timing assertion
CALL_TIMEOUT_S = 10.0
FAIL_FAST_TIMEOUT_S = 5.0  # a call that hangs instead of failing fast ends DEADLINE_EXCEEDED
CYCLES = 5  # lost sessions per fault, for the recovery figures
DEADLINE_S = 2.0  # a call the slow HSM outlasts; ample for the call to reach the HSM


def figure(text: str) -> None:
    """A measured figure, shown with ``pytest -s``; never asserted."""
    print(f"\n[figure] {text}")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def link_hashes(records: Any) -> dict[str, str]:
    return {r.jti: r.link_hash for r in records}


def receipt_hashes(receipts: dict[str, str]) -> dict[str, str]:
    """jti → H(link) of the links callers received, as their audit records should say."""
    return {jti: sha256_b64(chain.encode("ascii")) for jti, chain in receipts.items()}


def health_of(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = stub.Check(health_pb2.HealthCheckRequest(service=SIGNER_SERVICE),
                        timeout=CALL_TIMEOUT_S)
    return int(answer.status)


def watch_health(channel: grpc.Channel, timeout_s: float = SAFETY_S) -> Any:
    """The health service's Watch stream, started now: the status, then each change."""
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Watch(health_pb2.HealthCheckRequest(service=SIGNER_SERVICE), timeout=timeout_s)


def await_status(stream: Any, status: int) -> float:
    """Read a Watch stream until it reports ``status``, then end it (an open
    stream would hold a graceful stop for its whole grace); returns the
    perf_counter time it did."""
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    try:
        for answer in stream:
            if answer.status == status:
                return time.perf_counter()
    except grpc.RpcError as exc:
        raise AssertionError(f"health never became {name}: {exc.code().name}") from None
    finally:
        stream.cancel()
    raise AssertionError(f"the health stream ended before it reported {name}")


def site_channel(root: Path, port: int, name: str = "orch") -> grpc.Channel:
    """A mutual-TLS channel to a ``mandate serve`` set up by test_cli.make_site."""
    tls = root / "tls"
    creds = grpc.ssl_channel_credentials(
        root_certificates=(tls / "ca.pem").read_bytes(),
        private_key=(tls / f"{name}.key").read_bytes(),
        certificate_chain=(tls / f"{name}.pem").read_bytes(),
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def watch_serving(monkeypatch: pytest.MonkeyPatch, daemon: Daemon) -> list[bool]:
    """Every health setting the daemon makes from now on, in order."""
    seen: list[bool] = []
    real = daemon._set_serving

    def record(serving: bool) -> None:
        seen.append(serving)
        real(serving)

    monkeypatch.setattr(daemon, "_set_serving", record)
    return seen


def count_opens(monkeypatch: pytest.MonkeyPatch, token: Pkcs11Token) -> list[str]:
    """Each session the backend opens (and logs in on) from now on, by token label."""
    conn = token._conn
    real = conn._open_session
    opens: list[str] = []

    def counted(pkcs11_token: Any) -> Any:
        opens.append(conn.token_label)
        return real(pkcs11_token)

    monkeypatch.setattr(conn, "_open_session", counted)
    return opens


@contextmanager
def on_link_signatures(daemon: Daemon, action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` at the start of every link signature the HSM is asked for;
    the audit log's checkpoint signatures (same key) pass untouched."""
    signer: Any = daemon.issuer.signer(daemon.issuer.keyring()[0].kid)
    original: Callable[[bytes], bytes] = signer.sign

    def sign(data: bytes) -> bytes:
        header = json.loads(b64url_decode(data.split(b".", 1)[0].decode("ascii")))
        if header.get("typ") == "mandate+jwt":
            action()
        return original(data)

    signer.sign = sign
    try:
        yield
    finally:
        signer.sign = original


class IssuerCalls:
    """Wraps the issuer's entry: each call's deadline and how it ended, server side."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, daemon: Daemon) -> None:
        self.deadlines: list[float | None] = []
        self.errors: list[Exception] = []
        self.finished = threading.Event()
        issuer = daemon.issuer
        real = issuer.delegate

        def delegate(caller: str, req: Any, *, deadline: float | None = None,
                     batch: Any = None) -> Any:
            self.deadlines.append(deadline)
            try:
                return real(caller, req, deadline=deadline, batch=batch)
            except Exception as exc:
                self.errors.append(exc)
                raise
            finally:
                self.finished.set()

        monkeypatch.setattr(issuer, "delegate", delegate)

    def wait_past_deadline(self) -> None:
        """Make the work in hand outlast the first call's own deadline (a slow HSM or disk)."""
        deadline = self.deadlines[0]
        assert deadline is not None, "every gRPC call has a deadline (the server's cap)"
        remaining = deadline - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)


class Turnstile:
    """Holds every caller until released; counts those inside."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.inside = 0
        self.released = threading.Event()

    def __call__(self) -> None:
        with self._cond:
            self.inside += 1
            self._cond.notify_all()
        self.released.wait(SAFETY_S)

    def wait_for(self, count: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.inside >= count, SAFETY_S)


@pytest.fixture
def running(hsm: SoftHsm, tmp_path: Path) -> Iterator[Env]:
    env = start_daemon(hsm, tmp_path, DevCA())
    yield env
    env.daemon.stop(grace=1)


# --- PKCS#11: a session invalidated under the daemon --------------------------------------


def close_the_session(token: Pkcs11Token) -> None:
    """C_Logout + C_CloseSession on the daemon's session: its handle is now invalid."""
    conn = token._conn
    with conn.module.lock:
        conn.session.close()


def close_all_sessions(token: Pkcs11Token) -> None:
    """C_CloseAllSessions on the token's slot, through the loaded module itself."""
    conn = token._conn
    with conn.module.lock:
        slot_id = conn.session.token.slot.slot_id
        assert ctypes.CDLL(token.module).C_CloseAllSessions(ctypes.c_ulong(slot_id)) == 0


@pytest.mark.parametrize("invalidate", [close_the_session, close_all_sessions],
                         ids=["session-closed", "all-sessions-closed"])
def test_a_session_invalidated_under_the_daemon_is_reopened_within_the_next_call(
    running: Env, monkeypatch: pytest.MonkeyPatch, invalidate: Callable[[Pkcs11Token], None]
) -> None:
    daemon = running.daemon
    token = daemon.keys.token
    stub = running.stub()
    serving = watch_serving(monkeypatch, daemon)
    opens = count_opens(monkeypatch, token)
    receipts: dict[str, str] = {}

    def delegate() -> float:
        began = time.perf_counter()
        reply = stub.Delegate(delegate_request(Holder.generate()), timeout=CALL_TIMEOUT_S)
        took = time.perf_counter() - began
        receipts[reply.jti] = reply.chain
        return took

    ordinary = [delegate() for _ in range(CYCLES)]
    after_loss = []
    for _ in range(CYCLES):
        invalidate(token)
        after_loss.append(delegate())  # the call that meets the dead session succeeds
    assert opens == [token.token_label] * CYCLES  # one reopen per loss, no loop
    assert serving == []  # never reported down: the callers saw nothing
    assert token.healthy
    assert health_of(running.channel()) == SERVING
    assert link_hashes(daemon.audit.records(event="delegate")) == receipt_hashes(receipts)
    figure(f"recovery after a lost HSM session ({invalidate.__name__}): the next call takes "
           f"{ms(median(after_loss))} (max {ms(max(after_loss))}); an ordinary call "
           f"{ms(median(ordinary))}; medians of {CYCLES}")


# --- PKCS#11: the module re-initialised under other tokens' sessions ------------------------


DEVICE_REMOVED = next(e for e in _pkcs11._LOST_SESSION if e.__name__ == "DeviceRemoved")


def bring_down_and_back(monkeypatch: pytest.MonkeyPatch, token: Pkcs11Token) -> None:
    """Lose the token's session with a reopen that fails once (the device gone),
    then probe it back up: the probe re-initialises the module."""
    conn = token._conn

    def unplugged(pkcs11_token: Any) -> Any:
        raise DEVICE_REMOVED("injected: the device is gone")

    with monkeypatch.context() as patch:
        patch.setattr(conn, "_open_session", unplugged)
        if conn.generation == conn.module.generation:
            close_the_session(token)  # else it is void already, and its handle may be reused
        with pytest.raises(Unavailable):
            token.list_keys()
        assert not token.healthy
    assert token.probe()


def test_a_module_re_initialised_for_one_token_never_lets_another_use_a_stale_handle(
    hsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After C_Initialize, session and object handles are numbered afresh: a
    handle kept from before may name another token's new session or key, and a
    signature through it would come from the wrong key. Each token reopens first."""
    # Two tokens whose suites do not count their keys.
    with hsm.open("mandate-second") as first, hsm.open("mandate-service") as second:
        signers = []
        for token in (first, second):
            label = f"reinit-{token.token_label}"
            if label not in {k.label for k in token.list_keys()}:
                token.generate_key(label)
            signers.append(token.signer(label))
        for signer in signers:
            signer.sign(b"handles cached before")
        # Each in turn goes down and comes back through a re-initialisation, so that
        # the other's handles, kept from before, may equal ones now in use.
        for token in (first, second, first):
            bring_down_and_back(monkeypatch, token)
        for signer in signers:
            data = f"signed by {signer.kid}".encode()
            assert public_key_from_jwk(signer.public_jwk).verify(data, signer.sign(data))
        assert first.healthy
        assert second.healthy


# --- PKCS#11: the device removed and returned (real SoftHSM2, a daemon of its own) ----------


@pytest.mark.parametrize("part", ["token", "store"], ids=["token-directory", "token-store"])
def test_a_token_removed_and_returned_fails_fast_then_serves_again_without_a_restart(
    tmp_path: Path, part: str
) -> None:
    site = make_site(tmp_path)
    site.bundle()  # bundle.json, for the audit check at the end
    store = site.root / "hsm" / "tokens"
    (token_dir,) = store.iterdir()
    # The token's own directory goes outside the store (inside, SoftHSM2 would
    # load any directory as a token); the whole store is renamed where it is.
    moved = token_dir if part == "token" else store
    away = site.root / "hsm" / ("gone-token" if part == "token" else "gone-store")
    receipts: dict[str, str] = {}
    fail_fast: list[float] = []
    with Server(site) as server, site_channel(site.root, server.port) as channel:
        stub = pb_grpc.SignerStub(channel)

        def delegate(timeout: float = CALL_TIMEOUT_S) -> None:
            reply = stub.Delegate(delegate_request(Holder.generate()), timeout=timeout)
            receipts[reply.jti] = reply.chain

        delegate()
        assert health_of(channel) == SERVING
        moved.rename(away)
        try:
            with pytest.raises(grpc.RpcError) as err:
                delegate()  # the call that finds the token gone
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            await_status(watch_health(channel), NOT_SERVING)
            for _ in range(3):
                began = time.perf_counter()
                with pytest.raises(grpc.RpcError) as err:
                    delegate(FAIL_FAST_TIMEOUT_S)
                fail_fast.append(time.perf_counter() - began)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
                assert "is unavailable" in (err.value.details() or "")
        finally:
            away.rename(moved)
        returned = time.perf_counter()
        serving_after = await_status(watch_health(channel), SERVING) - returned
        delegate()  # the same daemon signs again: no restart
        first_call_after = time.perf_counter() - returned
        code, _ = server.terminate()
        assert code == 0, server.log.read_text()
    log = site.root / "state" / "audit.db"
    assert link_hashes(read_records(log, event="delegate")) == receipt_hashes(receipts)
    bundle = TrustBundle.from_jwks((site.root / "bundle.json").read_text())
    report = verify_log(log, bundle)
    assert report.ok, report.message
    figure(f"token {part} removed: calls fail fast in {ms(median(fail_fast))} (UNAVAILABLE); "
           f"after it returns, health is SERVING in {ms(serving_after)} (at the next probe, "
           f"every {HEALTH_PROBE_INTERVAL_S:g} s) and the first call succeeds "
           f"{ms(first_call_after - serving_after)} after that")


# --- PKCS#11: start-up without the token, or with a wrong PIN -------------------------------


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("label", ["token 'mandate-absent': no such token in", "tokens present: 'mandate'"]),
        ("store", ["cannot load the PKCS#11 module",
                   "it failed to initialise (GeneralError)"]),
    ],
    ids=["no-token-with-the-label", "token-store-missing"],
)
def test_a_token_missing_at_start_stops_start_up_with_one_clear_line(
    tmp_path: Path, fault: str, expected: list[str]
) -> None:
    site = make_site(tmp_path, key=False)
    if fault == "label":
        assert 'token_label = "mandate"\n' in CONFIG
        (site.root / "signer.toml").write_text(
            CONFIG.replace('token_label = "mandate"\n', 'token_label = "mandate-absent"\n'))
    else:
        (site.root / "hsm" / "tokens").rename(site.root / "hsm" / "gone")
    done = site.run("serve", "-c", "signer.toml")
    line = one_line_error(done)  # exit 1, one line, no traceback
    for text in expected:
        assert text in line
    assert "listening" not in done.stdout


def test_a_wrong_pin_stops_start_up_after_exactly_one_login(
    hsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    label, wrong = "mandate-wrong-pin", "8080-not-the-pin"
    # Premise: no handle in this process holds the token, so the PIN goes to it
    # (a second handle's PIN is compared with the first's, not sent).
    assert all(key[1] != label for key in _pkcs11._connections)
    logins: list[str] = []
    real = _pkcs11._Connection._open_session

    def counted(self: Any, pkcs11_token: Any) -> Any:
        logins.append(self.token_label)
        return real(self, pkcs11_token)

    monkeypatch.setattr(_pkcs11._Connection, "_open_session", counted)
    (tmp_path / "policy.toml").write_text(POLICY)
    config = Config(
        policy_file=tmp_path / "policy.toml", state_dir=tmp_path / "state",
        server=ServerConfig(listen="127.0.0.1:0", plaintext_loopback=True, issuance="inline"),
        hsm=HsmConfig(module=hsm.module, token_label=label, pin_env="MANDATE_TEST_FAULT_PIN"),
    )
    monkeypatch.setenv("MANDATE_TEST_FAULT_PIN", wrong)
    with pytest.raises(ConfigError) as caught:
        Daemon(config)
    assert logins == [label]  # one C_Login, never repeated
    message = caught.value.message
    assert f"token {label!r}: the PIN is incorrect (CKR_PIN_INCORRECT)" in message
    assert "not retried" in message
    assert wrong not in message
    assert hsm.user_pin not in message
    # The twin: with the right PIN the same daemon starts, one login again.
    monkeypatch.setenv("MANDATE_TEST_FAULT_PIN", hsm.user_pin)
    Daemon(config).stop()
    assert logins == [label, label]


# --- PKCS#11: a slow HSM — the call's deadline wins and nothing is half-recorded -------------


def test_a_signature_slower_than_the_call_deadline_returns_and_records_nothing(
    running: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = running.daemon
    calls = IssuerCalls(monkeypatch, daemon)
    signing, client_gave_up = threading.Event(), threading.Event()

    def slow_hsm() -> None:
        signing.set()
        client_gave_up.wait(SAFETY_S)
        calls.wait_past_deadline()  # the signature also ends after the call's own deadline

    stub = running.stub()
    request = delegate_request(Holder.generate())
    with on_link_signatures(daemon, slow_hsm):
        try:
            with pytest.raises(grpc.RpcError) as err:
                stub.Delegate(request, timeout=DEADLINE_S)
            # The caller has its answer while the HSM is still signing.
            assert signing.is_set()
            assert not calls.finished.is_set()
        finally:
            client_gave_up.set()
        assert calls.finished.wait(SAFETY_S)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    (error,) = calls.errors
    assert isinstance(error, TimedOut)
    assert "before recording the link: nothing was issued" in error.message
    assert daemon.audit.records(event="delegate") == []
    assert daemon.state.by_idempotency_key(ORCH, request.idempotency_key) is None
    # Its twin in time: the same request is issued afresh, there being nothing to replay.
    reply = stub.Delegate(request, timeout=CALL_TIMEOUT_S)
    assert not reply.idempotent_replay
    assert link_hashes(daemon.audit.records(event="delegate")) == receipt_hashes(
        {reply.jti: reply.chain})


def test_a_record_committed_after_the_deadline_keeps_its_link_for_the_retry(
    running: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: the record is durable, then the deadline passes. The
    link goes to no one on that call; the retry gets exactly the recorded link."""
    daemon = running.daemon
    calls = IssuerCalls(monkeypatch, daemon)
    committed, client_gave_up = threading.Event(), threading.Event()
    append_many = daemon.audit.append_many

    def slow_to_return(events: Any) -> Any:
        records = append_many(events)
        if any(event == "delegate" for event, _ in events) and not committed.is_set():
            committed.set()
            client_gave_up.wait(SAFETY_S)
            calls.wait_past_deadline()
        return records

    monkeypatch.setattr(daemon.audit, "append_many", slow_to_return)
    stub = running.stub()
    request = delegate_request(Holder.generate())
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Delegate(request, timeout=DEADLINE_S)
        assert committed.is_set()
    finally:
        client_gave_up.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    (record,) = daemon.audit.records(event="delegate")
    retry = stub.Delegate(request, timeout=CALL_TIMEOUT_S)
    assert retry.idempotent_replay
    assert (retry.jti, sha256_b64(retry.chain.encode("ascii"))) == (record.jti, record.link_hash)
    assert len(daemon.audit.records(event="delegate")) == 1


# --- every call slot taken ------------------------------------------------------------------


def test_with_every_call_slot_taken_new_calls_are_refused_at_once_and_served_after(
    hsm: SoftHsm, tmp_path: Path
) -> None:
    """One call held in the HSM, the others queued behind it for the issuing
    thread: the server has as many calls as it may, and turns more away."""
    slots = 4
    env = start_daemon(hsm, tmp_path, DevCA(), workers=slots, max_concurrent_rpcs=slots)
    daemon = env.daemon
    stub = env.stub()
    turnstile = Turnstile()
    receipts: dict[str, str] = {}
    refused: list[grpc.RpcError] = []
    try:
        with on_link_signatures(daemon, turnstile), futures.ThreadPoolExecutor(slots) as pool:
            def send() -> futures.Future[pb.DelegateResponse]:
                return pool.submit(stub.Delegate, delegate_request(Holder.generate()),
                                   timeout=SAFETY_S)

            held = [send()]
            try:
                # The first call alone in its batch, held in the HSM; the others
                # queue behind it (sent together, they could share its batch).
                assert turnstile.wait_for(1), "no call reached the HSM"
                held += [send() for _ in range(slots - 1)]
                assert wait_for(lambda: daemon.core is not None
                                  and daemon.core.calls().queued == slots - 1), \
                    "the other calls never queued"
                for _ in range(3):
                    try:
                        stub.Delegate(delegate_request(Holder.generate()),
                                      timeout=FAIL_FAST_TIMEOUT_S)
                    except grpc.RpcError as exc:
                        refused.append(exc)
            finally:
                turnstile.released.set()
            for call in held:
                reply = call.result(timeout=SAFETY_S)
                receipts[reply.jti] = reply.chain
        assert [e.code() for e in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
        for _ in range(slots + 1):  # served again, beyond the limit in sequence
            reply = stub.Delegate(delegate_request(Holder.generate()), timeout=CALL_TIMEOUT_S)
            receipts[reply.jti] = reply.chain
        assert health_of(env.channel()) == SERVING
        assert link_hashes(daemon.audit.records(event="delegate")) == receipt_hashes(receipts)
    finally:
        turnstile.released.set()
        daemon.stop(grace=1)


# --- the audit store: full, or failing its commit --------------------------------------------


def test_a_full_audit_store_fails_issuance_closed_until_space_returns(running: Env) -> None:
    """A full store refuses every link and turns health NOT_SERVING; once space
    returns, the daemon's probe finds it and health is SERVING again before any
    call has been made, and the refused request is issued afresh."""
    daemon = running.daemon
    bundle = running.bundle()
    stub = running.stub()
    channel = running.channel(ORCH)
    assert health_of(channel) == SERVING
    store = daemon.audit._conn  # the writer's connection: SQLite's own page limit as a full disk
    pages = store.execute("PRAGMA page_count").fetchone()[0]
    store.execute(f"PRAGMA max_page_count = {pages}")
    receipts: dict[str, str] = {}
    refused: grpc.RpcError | None = None
    request = delegate_request(Holder.generate())
    for _ in range(200):  # records fill the free room in the last pages, then one does not fit
        request = delegate_request(Holder.generate())
        try:
            reply = stub.Delegate(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            refused = exc
            break
        receipts[reply.jti] = reply.chain
    assert refused is not None, "200 records fitted in a full store"
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert "full" in (refused.details() or "")
    head = daemon.audit.head
    assert link_hashes(daemon.audit.records(event="delegate")) == receipt_hashes(receipts)
    assert daemon.state.by_idempotency_key(ORCH, request.idempotency_key) is None
    with pytest.raises(grpc.RpcError) as err:  # still full: still closed
        stub.Delegate(delegate_request(Holder.generate()), timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert daemon.audit.head == head
    assert health_of(channel) == NOT_SERVING
    time.sleep(1.5)  # the daemon probes each second: still full, still NOT_SERVING
    assert health_of(channel) == NOT_SERVING
    assert daemon.audit.head == head  # a probe leaves nothing in the log
    back = watch_health(channel)
    store.execute("PRAGMA max_page_count = 1073741823")
    await_status(back, SERVING)  # found by a probe, not by a call
    reply = stub.Delegate(request, timeout=CALL_TIMEOUT_S)  # the refused request, issued now
    assert not reply.idempotent_replay
    receipts[reply.jti] = reply.chain
    assert link_hashes(daemon.audit.records(event="delegate")) == receipt_hashes(receipts)
    daemon.stop(grace=1)
    report = verify_log(daemon.config.audit_path, bundle)
    assert report.ok, report.message


class FailingCommit(sqlite3.Connection):
    """An audit store connection whose COMMIT fails as a failed fsync does."""

    fault: ClassVar[str | None] = None

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and FailingCommit.fault is not None:
            raise sqlite3.OperationalError(FailingCommit.fault)
        return super().execute(sql, *args)


def audit_commits_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit logs opened from now on write through FailingCommit (no fault yet)."""
    connect = sqlite3.connect

    def audit_store_connect(database: str | os.PathLike[str], *args: Any,
                            **kwargs: Any) -> sqlite3.Connection:
        if Path(database).name == "audit.db":  # the writer; readers open a URI
            kwargs["factory"] = FailingCommit
        opened: sqlite3.Connection = connect(database, *args, **kwargs)
        return opened

    monkeypatch.setattr(sqlite3, "connect", audit_store_connect)
    monkeypatch.setattr(FailingCommit, "fault", None)


def test_an_audit_commit_that_fails_refuses_the_link_and_issuance_resumes_after(
    hsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit_commits_can_fail(monkeypatch)
    env = start_daemon(hsm, tmp_path, DevCA())
    daemon = env.daemon
    try:
        assert isinstance(daemon.audit._conn, FailingCommit)
        stub = env.stub()
        bundle = env.bundle()
        first = stub.Delegate(delegate_request(Holder.generate()), timeout=CALL_TIMEOUT_S)
        head = daemon.audit.head
        FailingCommit.fault = "disk I/O error"
        request = delegate_request(Holder.generate())
        with pytest.raises(grpc.RpcError) as err:
            stub.Delegate(request, timeout=CALL_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "disk I/O error" in (err.value.details() or "")
        assert daemon.audit.head == head
        assert daemon.state.by_idempotency_key(ORCH, request.idempotency_key) is None
        assert link_hashes(daemon.audit.records(event="delegate")) == receipt_hashes(
            {first.jti: first.chain})
        channel = env.channel(ORCH)
        assert health_of(channel) == NOT_SERVING
        back = watch_health(channel)
        FailingCommit.fault = None
        await_status(back, SERVING)  # the daemon's probe commits again
        again = stub.Delegate(request, timeout=CALL_TIMEOUT_S)
        assert not again.idempotent_replay
        assert link_hashes(daemon.audit.records(event="delegate")) == receipt_hashes(
            {first.jti: first.chain, again.jti: again.chain})
    finally:
        FailingCommit.fault = None
        daemon.stop(grace=1)
    report = verify_log(daemon.config.audit_path, bundle)
    assert report.ok, report.message
