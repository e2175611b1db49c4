"""``mandate serve`` stopped under load: SIGKILL (a crash) and SIGTERM (a stop).

A real daemon in a subprocess (front end and issuer process), with its own
SoftHSM2 token and mutual TLS, driven by a few client threads on 127.0.0.1.
Every link a client receives is a receipt (jti, link). Once the daemon is
gone, its audit log must verify and hold a record for every receipt, with
the receipt's H(link); after a SIGTERM it must also end with the ``stop``
record under a checkpoint, and hold no record that no client received.

Run with ``-s`` to see how many calls each run carried.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import select
import signal
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from test_cli import ServeProcess, Site, make_site
from test_faults import (
    CALL_TIMEOUT_S,
    NOT_SERVING,
    SAFETY_S,
    SERVING,
    await_status,
    figure,
    link_hashes,
    receipt_hashes,
    site_channel,
    watch_health,
)
from test_server import delegate_request

from signer._audit import read_records, verify_log
from signer._proto.mandate.v1 import signer_pb2_grpc as pb_grpc
from verifier_sdk import Holder, TrustBundle

CONFIG = """
[server]
listen = "127.0.0.1:0"
tls_cert = "tls/server.pem"
tls_key = "tls/server.key"
client_ca = "tls/ca.pem"
issuance = "process"
# Room for the held call of the SIGTERM test on a busy machine.
shutdown_grace_s = 20.0
rpc_time_limit_s = 20.0

[hsm]
token_label = "mandate"
pin_env = "MANDATE_HSM_PIN"

[audit]
checkpoint_every = 25

[policy]
file = "policy.toml"

[state]
dir = "state"
"""

CLIENTS = 4
MAX_CALLS = 2000  # for all clients together
LOAD_LIMIT_S = 60.0
SIGNAL_AFTER = 30  # receipts before the signal
STOP_S = 5.0  # an idle daemon stops in well under a second
HELD_SUB = "agent:support/held"
# How a stopping daemon refuses a call: UNAVAILABLE once it no longer listens;
# CANCELLED (from the gRPC server's stop) for a call that reached it as the stop
# began and was never started. Either way the call left no record.
REFUSED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}

# Loaded into `mandate serve` and its issuer process (as sitecustomize) for the
# SIGTERM test only: the first Delegate for HELD_SUB waits in the front end,
# after saying so through one FIFO, until a byte arrives through the other.
HOLD_HOOK = f'''
import os

_HOLD = os.environ.get("MANDATE_TEST_HOLD")
if _HOLD:
    import threading

    from signer import _worker
    from signer._proto.mandate.v1 import signer_pb2

    _call = _worker.IssuerProcess.call
    _once = threading.Lock()

    def _held_call(self, method, payload, values):
        # In the front end: the call is in flight, not yet handed to the issuer.
        if (method.endswith("/Delegate")
                and signer_pb2.DelegateRequest.FromString(payload).sub == {HELD_SUB!r}
                and _once.acquire(blocking=False)):
            with open(os.path.join(_HOLD, "inside"), "wb") as fifo:
                fifo.write(b"inside\\n")
            with open(os.path.join(_HOLD, "release"), "rb") as fifo:
                fifo.read(1)
        return _call(self, method, payload, values)

    _worker.IssuerProcess.call = _held_call
'''


def crash_site(root: Path) -> Site:
    """A site as an operator sets it up (token, TLS, policy, key), with this module's config,
    and its trust bundle exported to bundle.json before any daemon runs."""
    site = make_site(root)
    (site.root / "signer.toml").write_text(CONFIG)
    site.bundle()
    return site


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...", where comm may hold spaces and parentheses.
        if int(text.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


_libc = ctypes.CDLL(None, use_errno=True)


def signal_thread(pid: int, tid: int, signum: int) -> None:
    """Send ``signum`` to one thread ``tid`` of process ``pid`` (tgkill)."""
    if _libc.tgkill(pid, tid, signum) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def exits_within(pid: int, timeout_s: float) -> bool:
    """Wait for a process that is not our child to exit (on its pidfd, no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(fd)


class Serve(ServeProcess):
    """``mandate serve`` in a session of its own, so that one signal reaches the
    whole daemon (front end and issuer process) and nothing of it outlives a test."""

    def __init__(self, site: Site, name: str, env: dict[str, str] | None = None) -> None:
        super().__init__(site, site.root / f"{name}.log", env=env, start_new_session=True)

    def issuer_pid(self) -> int:
        (pid,) = children(self.proc.pid)
        return pid

    def threads(self) -> list[int]:
        return sorted(int(tid) for tid in os.listdir(f"/proc/{self.proc.pid}/task"))

    def terminate(self) -> None:
        """SIGTERM to the front end's main thread. The kernel may hand a signal sent
        to the process to any of its threads; that case has a test of its own."""
        signal_thread(self.proc.pid, self.proc.pid, signal.SIGTERM)

    def _stop(self) -> None:
        """Whatever is left of the daemon is killed: a test stops it itself."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=SAFETY_S)


class Load:
    """A few client threads calling Delegate until the daemon stops answering.

    Bounded in calls and time; each thread stops at its first failure. A
    failure is expected only once ``signalled`` is set (just before the daemon is).
    """

    def __init__(self, channel: grpc.Channel) -> None:
        self.receipts: dict[str, str] = {}
        self.failures: list[tuple[bool, grpc.StatusCode]] = []  # (after the signal, code)
        self.signalled = threading.Event()
        self._channel = channel
        self._cond = threading.Condition()
        self._calls = itertools.count()
        self._threads = [threading.Thread(target=self._run, name=f"client-{n}", daemon=True)
                         for n in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for thread in self._threads:
            thread.join(SAFETY_S)
        assert not any(t.is_alive() for t in self._threads), "a client thread did not finish"

    def _run(self) -> None:
        stub = pb_grpc.SignerStub(self._channel)
        holder = Holder.generate()
        ends = time.monotonic() + LOAD_LIMIT_S
        while next(self._calls) < MAX_CALLS and time.monotonic() < ends:
            try:
                reply = stub.Delegate(delegate_request(holder), timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as exc:
                with self._cond:
                    self.failures.append((self.signalled.is_set(), exc.code()))
                return
            with self._cond:
                self.receipts[reply.jti] = reply.chain
                self._cond.notify_all()

    def wait_for_receipts(self, count: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.receipts) >= count, SAFETY_S)

    def failed_before_the_signal(self) -> list[grpc.StatusCode]:
        return [code for after, code in self.failures if not after]


@pytest.mark.parametrize("victim", ["daemon", "front-end"],
                         ids=["whole-daemon", "front-end-only"])
def test_sigkill_under_load_loses_the_record_of_no_link_a_client_received(
    tmp_path: Path, victim: str
) -> None:
    site = crash_site(tmp_path)
    log = site.root / "state" / "audit.db"
    with Serve(site, "killed") as daemon, site_channel(site.root, daemon.port) as channel:
        issuer = daemon.issuer_pid()
        with Load(channel) as load:
            assert load.wait_for_receipts(SIGNAL_AFTER), load.failures
            load.signalled.set()
            if victim == "daemon":
                os.killpg(daemon.proc.pid, signal.SIGKILL)
            else:
                daemon.proc.kill()
            assert daemon.proc.wait(timeout=SAFETY_S) == -signal.SIGKILL
            # Killed with the rest, or on its own once its front end is gone.
            assert exits_within(issuer, SAFETY_S), "the issuer process outlived its front end"
    assert load.failed_before_the_signal() == []
    assert load.receipts

    # The log as the crash left it verifies, through the operator's command.
    verified = site.ok("audit", "verify", "--log", "state/audit.db", "--bundle", "bundle.json")
    assert verified.startswith("ok: ")
    recorded = link_hashes(read_records(log, event="delegate"))
    received = receipt_hashes(load.receipts)
    assert {jti: recorded.get(jti) for jti in received} == received
    unreceived = len(recorded) - len(received)

    # Restarted on the same state, the daemon issues again and its records continue the chain.
    with Serve(site, "restarted") as again, site_channel(site.root, again.port) as channel:
        reply = pb_grpc.SignerStub(channel).Delegate(delegate_request(Holder.generate()),
                                                     timeout=CALL_TIMEOUT_S)
        again.terminate()
        assert again.proc.wait(timeout=SAFETY_S) == 0, again.log.read_text()
    records = read_records(log)
    assert link_hashes(r for r in records if r.event == "delegate") == {
        **recorded, **receipt_hashes({reply.jti: reply.chain})}
    assert records[-1].event == "stop"
    report = verify_log(log, TrustBundle.from_jwks((site.root / "bundle.json").read_text()))
    assert report.ok, report.message
    assert report.unsigned_tail == 0
    figure(f"SIGKILL of the {victim} under load: {len(received)} links received, all recorded; "
           f"{unreceived} more recorded for calls cut off in flight")


def test_sigterm_under_load_finishes_calls_in_flight_refuses_new_ones_and_loses_none(
    tmp_path: Path
) -> None:
    site = crash_site(tmp_path)
    log = site.root / "state" / "audit.db"
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "sitecustomize.py").write_text(HOLD_HOOK)
    for name in ("inside", "release"):
        os.mkfifo(hold / name)
    # Both ends open here (read-write), so neither side ever blocks opening a FIFO.
    inside = os.open(hold / "inside", os.O_RDWR)
    release = os.open(hold / "release", os.O_RDWR)
    env = {"MANDATE_TEST_HOLD": str(hold),
           "PYTHONPATH": os.pathsep.join([str(hold), site.env["PYTHONPATH"]])}
    refused: grpc.RpcError | None = None
    late: dict[str, str] = {}
    try:
        with Serve(site, "stopped", env) as daemon, \
                site_channel(site.root, daemon.port) as channel, \
                futures.ThreadPoolExecutor(1) as pool:
            stub = pb_grpc.SignerStub(channel)
            with Load(channel) as load:
                assert load.wait_for_receipts(SIGNAL_AFTER), load.failures
                held = pool.submit(stub.Delegate,
                                   delegate_request(Holder.generate(), sub=HELD_SUB),
                                   timeout=SAFETY_S)
                ready, _, _ = select.select([inside], [], [], SAFETY_S)
                assert ready, "no call was held"
                assert os.read(inside, 64) == b"inside\n"
                # The health stream is established (it has said SERVING) before the
                # signal: a stream that reaches a stopping server is never served.
                health = watch_health(channel)
                assert next(health).status == SERVING
                load.signalled.set()
                signalled = time.perf_counter()
                daemon.terminate()
                await_status(health, NOT_SERVING)
                for _ in range(50):  # the door closes right after health says so
                    try:
                        reply = stub.Delegate(delegate_request(Holder.generate()),
                                              timeout=CALL_TIMEOUT_S)
                    except grpc.RpcError as exc:
                        refused = exc
                        break
                    late[reply.jti] = reply.chain
                os.write(release, b"x")
                held_reply = held.result(timeout=SAFETY_S)  # in flight: finished
            assert daemon.proc.wait(timeout=SAFETY_S) == 0, daemon.log.read_text()
            stopped = time.perf_counter() - signalled
    finally:
        os.close(inside)
        os.close(release)
    assert refused is not None, "calls were still accepted after the signal"
    assert refused.code() in REFUSED, refused
    assert load.failed_before_the_signal() == []
    assert {code for _, code in load.failures} <= REFUSED

    # Zero calls lost: every reply has its record, and no record lacks its reply.
    received = receipt_hashes({**load.receipts, **late, held_reply.jti: held_reply.chain})
    records = read_records(log)
    assert link_hashes(r for r in records if r.event == "delegate") == received
    # The log was flushed: it ends with the stop record, under a checkpoint.
    assert records[-1].event == "stop"
    report = verify_log(log, TrustBundle.from_jwks((site.root / "bundle.json").read_text()))
    assert report.ok, report.message
    assert (report.signed_seq, report.unsigned_tail) == (records[-1].seq, 0)
    figure(f"SIGTERM under load: {len(received)} calls answered and recorded "
           f"({len(load.failures)} clients refused at the door); the daemon exited "
           f"{stopped:.2f} s after the signal, including the held call")


def test_a_sigterm_the_kernel_hands_to_another_thread_still_stops_the_daemon(
    tmp_path: Path
) -> None:
    site = make_site(tmp_path)
    (site.root / "signer.toml").write_text(CONFIG)
    with Serve(site, "serve") as daemon, site_channel(site.root, daemon.port) as channel:
        # A call served first: by then the main thread waits in Daemon.wait().
        pb_grpc.SignerStub(channel).Delegate(delegate_request(Holder.generate()),
                                             timeout=CALL_TIMEOUT_S)
        pid = daemon.proc.pid
        other = next(tid for tid in daemon.threads() if tid != pid)
        signal_thread(pid, other, signal.SIGTERM)
        try:
            code: int | None = daemon.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, "the daemon did not act on a SIGTERM taken by another thread"
    assert read_records(site.root / "state" / "audit.db")[-1].event == "stop"
