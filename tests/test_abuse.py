"""The daemon under abuse (docs/security.md): every abusive client runs
against a real daemon (SoftHSM2, mutual TLS on 127.0.0.1:0, issuance in its
own process as shipped) while a well-behaved client keeps calling, and every
call of that client must succeed. Afterwards the audit log must verify and
hold a record for each call that was served or denied, and none for a call
that was refused.

test_server.py checks each refusal alone; here the refusals happen under
load from the others, and the cases it lacks are added: a server certificate
presented by a client, calls that never send a deadline, and slow clients on
raw sockets (stalled TCP, a trickled TLS handshake, a silent TLS session, a
trickled HTTP/2 request).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Collection, Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from hsm_fixtures import SoftHsm
from test_server import ORCH, Env, delegate_request, start_daemon

from signer._audit import read_records, verify_log
from signer._config import ServerConfig, load_config
from signer._devpki import DevCA
from signer._proto.mandate.v1 import signer_pb2 as pb
from signer._proto.mandate.v1 import signer_pb2_grpc as pb_grpc
from signer._server import Daemon
from verifier_sdk import Holder, TrustBundle
from verifier_sdk._encoding import b64url_decode

SAFETY_S = 30.0  # nothing in this file waits longer than this for anything
CALL_TIMEOUT_S = 10.0  # the well-behaved client's deadline per call
PACE_S = 0.02  # between the well-behaved client's calls
MAX_GOOD_CALLS = 1000
TRICKLE_S = 0.1  # one byte per slow socket this often
DELEGATE = "/mandate.v1.Signer/Delegate"
Code = grpc.StatusCode


# --- daemons --------------------------------------------------------------------------

def start_shipped(hsm: SoftHsm, directory: Path, **server: Any) -> Env:
    """A daemon with issuance in its own process, the shipped default. Its root
    key is made first by the daemon's code in this process (as `mandate keys
    generate` would), which also writes the config and certificates."""
    provisioning = start_daemon(hsm, directory, DevCA(), **server)
    provisioning.daemon.stop(grace=0)
    config = load_config(provisioning.config_path)
    daemon = Daemon(replace(config, server=replace(config.server, issuance="process")))
    daemon.start()
    return Env(daemon, directory, provisioning.ca, provisioning.config_path)


Factory = Callable[..., Env]


@pytest.fixture
def daemons(hsm: SoftHsm, tmp_path: Path) -> Iterator[Factory]:
    """``daemons(inline=False, **server_settings)`` starts one; all stop at the end."""
    started: list[Env] = []

    def make(*, inline: bool = False, **server: Any) -> Env:
        directory = tmp_path / f"daemon{len(started)}"
        directory.mkdir()
        env = (start_daemon(hsm, directory, DevCA(), **server) if inline
               else start_shipped(hsm, directory, **server))
        started.append(env)
        return env

    yield make
    for env in started:
        env.daemon.stop(grace=1)


def settings(env: Env) -> ServerConfig:
    return load_config(env.config_path).server


def stop_and_check_audit(env: Env, bundle: TrustBundle, *, delegated: Collection[str],
                         denied: int = 0) -> None:
    """Stop the daemon; its audit log must verify and hold one ``delegate``
    record per link handed out, ``denied`` denials, and nothing else per call."""
    env.daemon.stop(grace=5)
    log = env.directory / "state" / "audit.db"
    report = verify_log(log, bundle)
    assert report.ok, report.message
    records = read_records(log)
    assert sorted(r.jti for r in records if r.event == "delegate") == sorted(delegated)
    assert sum(r.event == "deny" for r in records) == denied
    assert {r.event for r in records} <= {"key", "start", "stop", "delegate", "deny"}


# --- the well-behaved client ----------------------------------------------------------

class WellBehaved:
    """Delegate calls with a deadline, one after another until stopped: on one
    channel, and every other call on a fresh one (a new TLS handshake).

    With ``retry_exhausted``, a RESOURCE_EXHAUSTED answer is retried (same
    request, same idempotency key) as a client facing a busy server should;
    any other failure is recorded and ends the client.
    """

    def __init__(self, env: Env, *, retry_exhausted: bool = False,
                 deadline_s: float = CALL_TIMEOUT_S) -> None:
        self._env = env
        self._retry = retry_exhausted
        self._deadline_s = deadline_s
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self.jtis: list[str] = []
        self.failures: list[str] = []
        self.retried = 0
        self._thread = threading.Thread(target=self._run, name="well-behaved", daemon=True)

    def __enter__(self) -> WellBehaved:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._stop.set()
        self._thread.join(SAFETY_S + self._deadline_s)
        assert not self._thread.is_alive(), "the well-behaved client is stuck"
        if exc_type is None:  # its last calls count too
            assert not self.failures, f"a well-behaved call failed: {self.failures}"

    def served(self, more: int) -> None:
        """Wait until ``more`` further calls have succeeded; fail on any failure."""
        with self._progress:
            target = len(self.jtis) + more
            done = self._progress.wait_for(
                lambda: len(self.jtis) >= target or bool(self.failures), SAFETY_S)
        assert not self.failures, f"a well-behaved call failed: {self.failures}"
        assert done, f"the well-behaved client was not served {more} more time(s)"

    def refused(self) -> None:
        """Wait until a call of this client has been refused and retried."""
        with self._progress:
            done = self._progress.wait_for(lambda: self.retried > 0 or bool(self.failures),
                                           SAFETY_S)
        assert not self.failures, f"a well-behaved call failed: {self.failures}"
        assert done, "the well-behaved client was never refused"

    def _run(self) -> None:
        channel = self._env.channel(ORCH)
        try:
            for n in range(MAX_GOOD_CALLS):
                if self._stop.is_set():
                    break
                if n % 2:
                    with self._env.channel(ORCH) as fresh:
                        jti = self._call(pb_grpc.SignerStub(fresh))
                else:
                    jti = self._call(pb_grpc.SignerStub(channel))
                with self._progress:
                    if jti is not None:
                        self.jtis.append(jti)
                    self._progress.notify_all()
                if jti is None:
                    break
                self._stop.wait(PACE_S)
        except Exception as exc:  # recorded, and the test fails on it
            with self._progress:
                self.failures.append(repr(exc))
                self._progress.notify_all()
        finally:
            channel.close()

    def _call(self, stub: pb_grpc.SignerStub) -> str | None:
        request = delegate_request(Holder.generate())
        attempts = 1000 if self._retry else 1
        for attempt in range(attempts):
            try:
                return str(stub.Delegate(request, timeout=self._deadline_s).jti)
            except grpc.RpcError as error:
                exhausted = error.code() == Code.RESOURCE_EXHAUSTED
                if exhausted and attempt + 1 < attempts:
                    with self._progress:
                        self.retried += 1
                        self._progress.notify_all()
                    self._stop.wait(0.01)  # a client's back-off, not synchronisation
                    continue
                with self._progress:
                    self.failures.append(f"{error.code().name}: {error.details()}")
        return None


def in_parallel(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls at once; each one's result, or the RpcError it raised."""
    def guarded(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except grpc.RpcError as error:
            return error

    with futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(guarded, calls, timeout=SAFETY_S))


def code_of(result: Any) -> grpc.StatusCode:
    code: grpc.StatusCode = result.code() if isinstance(result, grpc.RpcError) else Code.OK
    return code


# --- oversize messages ---------------------------------------------------------------

def padded(size: int) -> pb.DelegateRequest:
    """A Delegate request of exactly ``size`` serialized bytes (its sub padded)."""
    request = delegate_request(Holder.generate())
    pad = size - request.ByteSize()
    for _ in range(10):
        request.sub = "agent:support/" + "x" * pad
        if request.ByteSize() == size:
            return request
        pad += size - request.ByteSize()
    raise AssertionError(f"cannot pad a request to {size} bytes")


def test_oversize_messages_are_refused_while_others_are_served(daemons: Factory) -> None:
    env = daemons()
    limit = settings(env).max_message_bytes
    bundle = env.bundle()
    with WellBehaved(env) as good:
        good.served(1)
        stub = env.stub()
        oversize = [padded(limit + 1), padded(1 << 20), padded(8 << 20)]
        results = in_parallel([functools.partial(stub.Delegate, r, timeout=CALL_TIMEOUT_S)
                               for r in oversize * 3])
        assert [code_of(r) for r in results] == [Code.RESOURCE_EXHAUSTED] * 9
        # The twin at exactly the limit passes the transport and reaches
        # validation, which refuses a 65 kB principal.
        at_limit = in_parallel([functools.partial(stub.Delegate, padded(limit),
                                                  timeout=CALL_TIMEOUT_S)])
        assert code_of(at_limit[0]) == Code.INVALID_ARGUMENT
        good.served(3)
    stop_and_check_audit(env, bundle, delegated=good.jtis)


# --- more concurrent calls than allowed --------------------------------------------------

class HalfOpen:
    """Calls that send their headers and then wait before sending the request
    message: each holds one of the server's call slots until released."""

    def __init__(self, env: Env, count: int) -> None:
        self._release = threading.Event()
        channel = env.channel(ORCH)
        self._channel = channel
        call = channel.stream_unary(DELEGATE,
                                    request_serializer=pb.DelegateRequest.SerializeToString,
                                    response_deserializer=pb.DelegateResponse.FromString)
        self.calls = [call.future(self._later(), timeout=SAFETY_S) for _ in range(count)]

    def _later(self) -> Iterator[pb.DelegateRequest]:
        if self._release.wait(SAFETY_S):
            yield delegate_request(Holder.generate())

    def release(self) -> list[str]:
        """Send the requests; the jtis of the links they get."""
        self._release.set()
        try:
            return [str(call.result(timeout=SAFETY_S).jti) for call in self.calls]
        finally:
            self._channel.close()


def wait_until_full(env: Env) -> None:
    """Until a call (one that leaves no audit record) is refused for want of a slot."""
    stub = env.stub()
    for _ in range(500):
        probe = in_parallel([functools.partial(stub.GetTrustBundle, pb.GetTrustBundleRequest(),
                                               timeout=CALL_TIMEOUT_S)])[0]
        if code_of(probe) == Code.RESOURCE_EXHAUSTED:
            return
        assert code_of(probe) == Code.OK, probe
        threading.Event().wait(0.01)  # polling the server: it sends no event
    raise AssertionError("the call slots never filled")


def test_calls_beyond_the_concurrency_limit_are_refused_at_once(daemons: Factory) -> None:
    """The limit is the server's, not each caller's: while slow callers hold
    every slot, each new call, the well-behaved client's included, is refused
    at once (never queued, never a hang); a client that retries is served as
    soon as a slot frees, and a flood of ordinary calls gets only answers."""
    limit = 4
    env = daemons(max_concurrent_rpcs=limit)
    stub = env.stub()
    # The first calls this server sees: no earlier call can still hold a slot.
    held = HalfOpen(env, limit)
    wait_until_full(env)
    with WellBehaved(env, retry_exhausted=True) as good:
        good.refused()
        burst = in_parallel([
            functools.partial(stub.Delegate, delegate_request(Holder.generate()),
                              timeout=CALL_TIMEOUT_S)
            for _ in range(16)
        ])
        assert [code_of(r) for r in burst] == [Code.RESOURCE_EXHAUSTED] * 16
        held_jtis = held.release()
        good.served(2)
        flooded = [r for batch in in_parallel([functools.partial(flood, stub, 10)] * 12)
                   for r in batch]
        good.served(2)
    assert {code_of(r) for r in flooded} <= {Code.OK, Code.RESOURCE_EXHAUSTED}
    flood_jtis = [r.jti for r in flooded if isinstance(r, pb.DelegateResponse)]
    stop_and_check_audit(env, env.bundle(), delegated=[*good.jtis, *held_jtis, *flood_jtis])


def flood(stub: pb_grpc.SignerStub, calls: int) -> list[Any]:
    """``calls`` Delegate calls back to back; each reply or RpcError."""
    outcomes: list[Any] = []
    for _ in range(calls):
        try:
            outcomes.append(stub.Delegate(delegate_request(Holder.generate()),
                                          timeout=CALL_TIMEOUT_S))
        except grpc.RpcError as error:
            outcomes.append(error)
    return outcomes


# --- clients without a valid certificate ------------------------------------------------

def bad_channel(env: Env, kind: str) -> grpc.Channel:
    hour = datetime.timedelta(hours=1)
    if kind == "no-certificate":
        return env.channel(None)
    if kind == "other-ca":
        return env.channel(ORCH, ca=DevCA("Someone Else's CA"))
    if kind == "same-name-other-ca":  # an impostor CA that copies the real one's name
        return env.channel(ORCH, ca=DevCA())
    if kind == "expired":
        return env.channel(ORCH, valid_from=-3 * hour, valid_for=hour)
    if kind == "not-yet-valid":
        return env.channel(ORCH, valid_from=2 * hour)
    assert kind == "server-certificate"  # right CA, right name, wrong purpose (EKU)
    issued = env.ca.issue(uri=ORCH, server=True)
    return grpc.secure_channel(env.target, grpc.ssl_channel_credentials(
        root_certificates=env.ca.pem, private_key=issued.key, certificate_chain=issued.cert))


BAD_CERTIFICATES = ("no-certificate", "other-ca", "same-name-other-ca", "expired",
                    "not-yet-valid", "server-certificate")


def test_clients_without_a_valid_certificate_fail_the_handshake_while_others_are_served(
        daemons: Factory) -> None:
    env = daemons()
    bundle = env.bundle()

    def attempt(kind: str) -> grpc.StatusCode:
        with bad_channel(env, kind) as channel:
            try:
                pb_grpc.SignerStub(channel).Delegate(delegate_request(Holder.generate()),
                                                     timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as error:
                return code_of(error)
        return Code.OK

    with WellBehaved(env) as good:
        good.served(1)
        kinds = [kind for kind in BAD_CERTIFICATES for _ in range(3)]
        codes = in_parallel([functools.partial(attempt, kind) for kind in kinds])
        good.served(3)
    assert dict(zip(kinds, codes, strict=True)) == dict.fromkeys(kinds, Code.UNAVAILABLE)
    # Not a delegation and not even a denial: the policy never heard of them.
    stop_and_check_audit(env, bundle, delegated=good.jtis, denied=0)


# --- calls without a deadline -----------------------------------------------------------

def subject_of(signing_input: bytes) -> str | None:
    """The sub of a link's signing input; None for anything else the key signs."""
    parts = signing_input.split(b".")
    if len(parts) != 2:
        return None
    try:
        payload = json.loads(b64url_decode(parts[1].decode("ascii")))
    except ValueError:  # not ASCII, not base64url, not JSON
        return None
    sub = payload.get("sub") if isinstance(payload, dict) else None
    return sub if isinstance(sub, str) else None


@contextlib.contextmanager
def slow_hsm_for(env: Env, prefix: str, delay_s: float) -> Iterator[None]:
    """The HSM takes ``delay_s`` to sign a link whose sub starts with ``prefix``
    (the fault a stalled device shows); other signatures are not delayed."""
    signer = env.daemon.issuer.signer(env.daemon.issuer.keyring()[0].kid)
    original: Callable[[bytes], bytes] = signer.sign
    stalled = threading.Event()  # never set: the device's delay

    def sign(data: bytes) -> bytes:
        sub = subject_of(data)
        if sub is not None and sub.startswith(prefix):
            stalled.wait(delay_s)
        return original(data)

    signer.sign = sign  # type: ignore[method-assign]
    try:
        yield
    finally:
        signer.sign = original  # type: ignore[method-assign,assignment]


def test_calls_without_a_deadline_end_at_the_server_cap_and_issue_nothing(
        daemons: Factory) -> None:
    """A call that sends no deadline still gets the server's time cap: when a
    slow HSM makes it overrun, it ends DEADLINE_EXCEEDED with no link recorded
    or kept, so the same request retried later is issued afresh, not replayed.
    (In this process: the fault is injected into the HSM signer. Links are
    signed one at a time, as the module's lock would have it anyway, so other
    calls wait out the stall: they are served before and after it.)"""
    env = daemons(inline=True, rpc_time_limit_s=1.0)
    bundle = env.bundle()
    stub = env.stub()
    slow = [delegate_request(Holder.generate(), sub=f"agent:support/slow-{n}")
            for n in range(3)]
    with WellBehaved(env) as good:
        good.served(1)
    with slow_hsm_for(env, "agent:support/slow-", delay_s=2.0):
        results = in_parallel([functools.partial(stub.Delegate, r) for r in slow])
    with WellBehaved(env) as after:
        after.served(2)
    assert [code_of(r) for r in results] == [Code.DEADLINE_EXCEEDED] * 3
    assert all("nothing was issued" in r.details() for r in results)
    assert not [r for r in env.daemon.audit.records(event="delegate")
                if r.sub.startswith("agent:support/slow-")]
    retried = [stub.Delegate(r, timeout=CALL_TIMEOUT_S) for r in slow]
    assert [r.idempotent_replay for r in retried] == [False] * 3
    stop_and_check_audit(env, bundle,
                         delegated=[*good.jtis, *after.jtis, *(r.jti for r in retried)])


# --- slow clients on raw sockets ------------------------------------------------------------

def tls_context(env: Env, directory: Path) -> ssl.SSLContext:
    """A gRPC client's TLS: a certificate from the daemon's CA, ALPN h2."""
    cert, key = env.ca.issue(uri=ORCH).write(directory, f"raw-{uuid.uuid4().hex[:8]}")
    context = ssl.create_default_context(cadata=env.ca.pem.decode())
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    return context


def tcp(env: Env) -> socket.socket:
    return socket.create_connection(("127.0.0.1", env.daemon.port), timeout=SAFETY_S)


def client_hello(context: ssl.SSLContext) -> bytes:
    """The first flight of a TLS handshake, to be sent by hand."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello
    return hello


# HTTP/2 (RFC 9113) frames and HPACK (RFC 7541) literals, as much as one request needs.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_DATA, H2_HEADERS, H2_RST_STREAM, H2_SETTINGS, H2_GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x7
H2_END_STREAM, H2_ACK, H2_END_HEADERS = 0x1, 0x1, 0x4


def h2_frame_header(kind: int, flags: int, stream: int, length: int) -> bytes:
    return length.to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big")


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return h2_frame_header(kind, flags, stream, len(payload)) + payload


def hpack_literal(name: str, value: str) -> bytes:
    """Literal header field without indexing, new name, no Huffman coding."""
    n, v = name.encode(), value.encode()
    assert max(len(n), len(v)) < 127
    return b"\x00" + bytes((len(n),)) + n + bytes((len(v),)) + v


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


def open_delegate_stream(env: Env, context: ssl.SSLContext, *,
                         sub: str = "agent:support/refund-7") -> tuple[socket.socket, bytes]:
    """An HTTP/2 Delegate call on a TLS session with a valid client certificate,
    sent up to the header of its DATA frame: returns the socket and the bytes
    of the request message still owed."""
    sock = context.wrap_socket(tcp(env), server_hostname="localhost")
    assert sock.selected_alpn_protocol() == "h2"
    sock.sendall(H2_PREFACE + h2_frame(H2_SETTINGS, 0, 0))
    for _ in range(16):  # the server's SETTINGS, to acknowledge
        header = recv_exactly(sock, 9)
        recv_exactly(sock, int.from_bytes(header[:3], "big"))
        if header[3] == H2_SETTINGS and not header[4] & H2_ACK:
            break
    else:
        raise AssertionError("no SETTINGS from the server")
    headers = b"".join(hpack_literal(name, value) for name, value in (
        (":method", "POST"), (":scheme", "https"), (":path", DELEGATE),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
    ))
    message = delegate_request(Holder.generate(), sub=sub).SerializeToString()
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    sock.sendall(h2_frame(H2_SETTINGS, H2_ACK, 0) + h2_frame(H2_HEADERS, H2_END_HEADERS, 1, headers)
                 + h2_frame_header(H2_DATA, H2_END_STREAM, 1, len(body)))
    return sock, body


def read_response(sock: socket.socket) -> pb.DelegateResponse:
    """Frames until stream 1 ends; the response message it carried."""
    body = b""
    for _ in range(256):
        header = recv_exactly(sock, 9)
        payload = recv_exactly(sock, int.from_bytes(header[:3], "big"))
        kind, flags = header[3], header[4]
        stream = int.from_bytes(header[5:], "big") & 0x7FFF_FFFF
        assert kind not in (H2_RST_STREAM, H2_GOAWAY), f"the server ended the call: {kind}"
        if stream == 1 and kind == H2_DATA:
            body += payload
        if stream == 1 and flags & H2_END_STREAM:
            break
    else:
        raise AssertionError("the call did not end")
    assert len(body) > 5, "no response message: the call failed"
    return pb.DelegateResponse.FromString(body[5:5 + int.from_bytes(body[1:5], "big")])


class Trickle:
    """Sends each socket its owed bytes one at a time, one byte per socket every
    TRICKLE_S, until stopped; closes every socket it was given."""

    def __init__(self) -> None:
        self._owed: list[tuple[socket.socket, bytearray]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trickle", daemon=True)

    def add(self, sock: socket.socket, owed: bytes = b"") -> None:
        with self._lock:
            self._owed.append((sock, bytearray(owed)))

    def flush(self, sock: socket.socket) -> None:
        """Send all that ``sock`` still owes, now."""
        with self._lock:
            for candidate, owed in self._owed:
                if candidate is sock:
                    sock.sendall(owed)
                    owed.clear()

    def __enter__(self) -> Trickle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(SAFETY_S)
        for sock, _ in self._owed:
            sock.close()

    def _run(self) -> None:
        while not self._stop.wait(TRICKLE_S):
            with self._lock:
                for sock, owed in self._owed:
                    if owed:
                        with contextlib.suppress(OSError):  # closed by the server: done
                            sock.send(owed[:1])
                        del owed[:1]


def test_connections_stalled_before_a_call_hold_no_worker(daemons: Factory,
                                                          tmp_path: Path) -> None:
    """TCP that never starts TLS, a handshake trickled byte by byte, and TLS
    sessions that never speak HTTP/2: more of each than the daemon has worker
    threads, and new and old clients are served throughout."""
    env = daemons(workers=2)
    bundle = env.bundle()
    context = tls_context(env, tmp_path)
    hello = client_hello(context)
    count = 3 * settings(env).workers
    with WellBehaved(env) as good, Trickle() as trickle:
        good.served(1)
        for _ in range(count):
            trickle.add(tcp(env))
            trickle.add(tcp(env), hello)
            trickle.add(context.wrap_socket(tcp(env), server_hostname="localhost"))
        good.served(6)  # three of them on new connections
    stop_and_check_audit(env, bundle, delegated=good.jtis)


def test_a_trickled_request_is_a_real_call_and_leaves_the_other_workers_free(
        daemons: Factory, tmp_path: Path) -> None:
    """The twin of the next test: trickling clients, one fewer than the
    workers, leave a worker for everyone else; and once a trickled request's
    last byte is in, it is served and audited like any other call."""
    env = daemons(workers=3)
    bundle = env.bundle()
    context = tls_context(env, tmp_path)
    with WellBehaved(env) as good, Trickle() as trickle:
        good.served(1)
        streams = [open_delegate_stream(env, context, sub=f"agent:support/trickled-{n}")
                   for n in range(settings(env).workers - 1)]
        for sock, owed in streams:
            trickle.add(sock, owed)
        good.served(4)
        trickled = []
        for sock, _ in streams:
            trickle.flush(sock)
            trickled.append(read_response(sock).jti)
    stop_and_check_audit(env, bundle, delegated=[*good.jtis, *trickled])


def test_clients_trickling_their_request_do_not_hold_the_workers(daemons: Factory,
                                                                 tmp_path: Path) -> None:
    """As many slow clients as the shipped config has workers, each with a
    valid certificate, send a Delegate call's headers and then its message a
    byte at a time. The server's time cap (1 s here) must end them, so the
    well-behaved client, with a deadline well past the cap, is served."""
    env = daemons(rpc_time_limit_s=1.0)
    context = tls_context(env, tmp_path)
    with WellBehaved(env, deadline_s=5.0) as good, Trickle() as trickle:
        good.served(1)
        for _ in range(ServerConfig().workers):
            trickle.add(*open_delegate_stream(env, context))
        good.served(3)


def test_a_call_closed_without_its_request_message_is_invalid(daemons: Factory) -> None:
    """Every method is unary: a client that ends its call before sending the
    request message gets INVALID_ARGUMENT at once, and nothing is recorded."""
    env = daemons()
    bundle = env.bundle()
    channel = env.channel(ORCH)
    empty = channel.stream_unary(DELEGATE,
                                 request_serializer=pb.DelegateRequest.SerializeToString,
                                 response_deserializer=pb.DelegateResponse.FromString)
    with WellBehaved(env) as good:
        good.served(1)
        with pytest.raises(grpc.RpcError) as caught:
            empty(iter(()), timeout=CALL_TIMEOUT_S)
        assert caught.value.code() == Code.INVALID_ARGUMENT
        assert "no request message" in (caught.value.details() or "")
        good.served(2)
    channel.close()
    stop_and_check_audit(env, bundle, delegated=good.jtis)
