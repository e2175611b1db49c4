"""The issuer process: issuance beside the gRPC front end, on a core of its own.

Within one CPython process every call's Python work — TLS and HTTP/2 in the
gRPC front end, then policy, link building, the HSM call and the audit
record — queues for one interpreter lock, so the daemon uses one core. With
``issuance = "process"`` the front end keeps gRPC, TLS and the caller's
certificate, and hands each call (method, request bytes, certificate, time
left) over a socket pair to this process, which owns the HSM session, the
state store, the audit log and the policy, and answers with the response
bytes or the status. The issuer process never listens on the network and
exits when the front end closes the socket (or dies).

Messages are pickled tuples, between these two processes only:

    front → issuer   ("call", id, method, payload, values)   values: see CallContext
                     ("started", id, port)  ("reload", id)  ("stop", id, served)
    issuer → front   ("ready", metrics_port, methods)  ("failed", message)
                     ("reply", id, payload, status)   status: None or (code, details, trailing)
                     ("done", id, result)  ("health", healthy)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from multiprocessing.connection import Connection
from typing import Any

from ._batching import NOT_ANSWERED, answer_wait_s
from ._config import Config
from ._errors import ConfigError, SignerError, Unavailable
from ._service import CallValues, Outcome
from ._sync import Answer

log = logging.getLogger("mandate.signer")

START_TIMEOUT_S = 120.0  # logging in to a network HSM can be slow
STOP_TIMEOUT_S = 30.0

_ENTRY = "import sys; from signer._worker import main; sys.exit(main(sys.argv))"


# Plain pickle over the connection's framing: Connection.send builds a
# ForkingPickler (for handles and sockets, which these messages never hold)
# on every message, a measurable share of each call's time in both processes.
def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    conn.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())  # noqa: S301 - our own issuer or front end


class IssuerProcess:
    """The front end's handle on its issuer process."""

    def __init__(self, config: Config, *, on_health_change: Callable[[bool], None],
                 on_lost: Callable[[], None]) -> None:
        self._config = config
        self._on_health_change = on_health_change
        self._on_lost = on_lost
        # Each call's answer: the reply's fields, or None once the issuer is gone.
        self._pending: dict[int, Answer[tuple[Any, ...] | None]] = {}
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._closing = False
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self._proc = subprocess.Popen(  # noqa: S603 - this interpreter, this module
                [sys.executable, "-c", _ENTRY, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            )
            self._conn = Connection(os.dup(ours.fileno()))
        try:
            root = logging.getLogger()
            _send(self._conn, (config, config.server.log_format, root.level, bool(root.handlers)))
            if not self._conn.poll(START_TIMEOUT_S):
                raise ConfigError(f"the issuer process did not start in {START_TIMEOUT_S:.0f} s")
            reply = _recv(self._conn)
        except (OSError, EOFError):
            self._reap()
            raise ConfigError("the issuer process failed to start (see its log)") from None
        except BaseException:
            self._reap()
            raise
        if reply[0] == "failed":
            self._reap()
            raise ConfigError(reply[1])
        _, self.metrics_port, self.methods = reply
        threading.Thread(target=self._receive, name="issuer-replies", daemon=True).start()

    # --- calls -----------------------------------------------------------------

    def call(self, method: str, payload: bytes, values: CallValues) -> Outcome:
        """Hand one call over and wait for its answer (the deadline bounds the wait)."""
        wait = answer_wait_s(values, self._config.server.rpc_time_limit_s)
        answer = self._ask("call", method, payload, values, wait=wait)
        if answer is None:
            return NOT_ANSWERED
        return answer[0], answer[1]

    def started(self, port: int) -> bool:
        """Tell the issuer the front end serves on ``port``; returns the HSM's health."""
        return bool(self._control("started", port))

    def reload_policy(self) -> bool:
        return bool(self._control("reload"))

    def close(self, *, served: bool) -> None:
        """Flush and close the issuer (a ``stop`` record if the daemon served), then reap it."""
        self._closing = True  # from here, the issuer's exit is expected
        try:
            self._control("stop", served, wait=STOP_TIMEOUT_S)
        except Unavailable:
            pass  # already gone; its log says why
        finally:
            self._conn.close()
            self._reap()

    # --- plumbing --------------------------------------------------------------

    def _control(self, kind: str, *args: object, wait: float = 30.0) -> Any:
        answer = self._ask(kind, *args, wait=wait)
        if answer is None:
            raise Unavailable(f"the issuer process did not answer {kind!r} in {wait:.0f} s")
        return answer[0]

    def _ask(self, kind: str, *args: object, wait: float) -> tuple[Any, ...] | None:
        waiter: Answer[tuple[Any, ...] | None] = Answer(None)
        try:
            with self._send_lock:
                request_id = next(self._ids)
                self._pending[request_id] = waiter
                _send(self._conn, (kind, request_id, *args))
        except (OSError, ValueError):
            self._pending.pop(request_id, None)
            raise Unavailable("the issuer process is gone") from None
        if not waiter.wait(wait):
            self._pending.pop(request_id, None)
            return None
        if waiter.value is None:
            raise Unavailable("the issuer process is gone")
        return waiter.value

    def _receive(self) -> None:
        try:
            while True:
                message = _recv(self._conn)
                kind = message[0]
                if kind == "health":
                    self._on_health_change(message[1])
                    continue
                waiter = self._pending.pop(message[1], None)
                if waiter is not None:  # else the caller gave up waiting
                    waiter(message[2:])
        except (EOFError, OSError):
            pass
        for waiter in list(self._pending.values()):  # each raises Unavailable
            waiter(None)
        self._pending.clear()
        if not self._closing:
            self._on_lost()

    def _reap(self) -> None:
        try:
            self._proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("the issuer process did not exit: killing it")
            self._proc.kill()
            self._proc.wait()


# --- the issuer process ------------------------------------------------------------

def _serve(conn: Connection) -> int:
    from ._logging import configure_logging  # noqa: PLC0415 - this process only
    from ._server import Core  # noqa: PLC0415 - _server imports this module

    config, log_format, level, configured = _recv(conn)
    if configured:
        configure_logging(log_format, level=level)
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        # If the front end is gone, the reader below sees EOF and closes down.
        with contextlib.suppress(OSError, ValueError), send_lock:
            _send(conn, message)

    try:
        core = Core(config, on_health_change=lambda healthy: send(("health", healthy)))
    except SignerError as exc:
        send(("failed", exc.message))
        return 1
    try:
        metrics_port = core.ready()
        calls = core.calls()
    except SignerError as exc:
        core.close(served=False)
        send(("failed", exc.message))
        return 1
    send(("ready", metrics_port, calls.methods))

    workers = futures.ThreadPoolExecutor(config.server.workers, thread_name_prefix="issue")

    def replier(request_id: int) -> Callable[[Outcome], None]:
        return lambda outcome: send(("reply", request_id, *outcome))

    def run(reply: Callable[[Outcome], None], method: str, payload: bytes,
            values: CallValues) -> None:
        reply(calls.call(method, payload, values))

    served = False
    try:
        while True:
            try:
                message = _recv(conn)
            except (EOFError, OSError):
                log.warning("the front end closed the issuer's socket: closing down")
                break
            kind, request_id = message[0], message[1]
            if kind == "call":
                method, payload, values = message[2:]
                if calls.batched(method):  # Delegate: straight to its batch
                    calls.submit(method, payload, values, replier(request_id))
                else:
                    workers.submit(run, replier(request_id), method, payload, values)
            elif kind == "started":
                served = True
                core.started(message[2])
                send(("done", request_id, core.healthy))
            elif kind == "reload":
                send(("done", request_id, core.reload_policy()))
            elif kind == "stop":
                workers.shutdown(wait=True)
                core.close(served=message[2])
                send(("done", request_id, None))
                return 0
    finally:
        workers.shutdown(wait=True)
        core.close(served=served)
    return 0


def main(argv: list[str]) -> int:
    # The front end decides when to stop: a Ctrl-C or a SIGTERM sent to the
    # whole process group reaches it too, and it then closes this process in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(int(argv[1]))
    try:
        return _serve(conn)
    except Exception:
        log.exception("the issuer process failed")
        with contextlib.suppress(OSError, ValueError):
            _send(conn, ("failed", "the issuer process failed (see its log)"))
        return 1
    finally:
        conn.close()


