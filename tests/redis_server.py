"""A private ``redis-server`` on 127.0.0.1 for the Redis store tests.

Each server runs in a temporary directory with persistence off (no RDB
snapshots, no AOF), on a free loopback port, and can be stopped and started
again on the same port to stand for an outage. Import the fixtures into a
test module: ``redis_server`` (one per module) and ``private_redis_server``
(one per test, for tests that stop it).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
import redis

START_TIMEOUT_S: Final = 15.0
STOP_TIMEOUT_S: Final = 10.0
_POLL_S: Final = 0.01
_PORT_ATTEMPTS: Final = 5


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not installed: the Redis store tests need a real server "
            "(Debian: apt-get install redis-server; scripts/system-deps.sh installs it)",
            pytrace=False,
        )
    return path


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process; ``start``/``stop`` may repeat, on one port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.binary = redis_server_binary()
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    @property
    def output_path(self) -> Path:
        return self.directory / "redis.out"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self, *, timeout_s: float = 5.0) -> redis.Redis:
        """A client for the test's own checks (not the stores')."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout_s,
                           socket_connect_timeout=timeout_s)

    def start(self) -> None:
        """Start on the port used before, or on a free one the first time."""
        if self.running:
            raise RuntimeError("redis-server is already running")
        if self.port:
            self._launch(self.port)
            return
        for _ in range(_PORT_ATTEMPTS):  # another process may take the port first
            port = free_port()
            try:
                self._launch(port)
            except _PortTaken:
                continue
            self.port = port
            return
        raise RuntimeError(f"redis-server found no free port in {_PORT_ATTEMPTS} attempts")

    def _launch(self, port: int) -> None:
        self.log_path.unlink(missing_ok=True)
        with self.output_path.open("wb") as output:  # early errors come before the log
            process = subprocess.Popen(
                [
                    self.binary,
                    "--bind", "127.0.0.1",
                    "--port", str(port),
                    "--dir", str(self.directory),
                    "--logfile", str(self.log_path),
                    "--save", "",
                    "--appendonly", "no",
                    "--daemonize", "no",
                    "--protected-mode", "yes",
                    "--maxmemory-policy", "noeviction",
                ],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            )
        self._process = process
        probe = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0,
                            socket_connect_timeout=1.0)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                if process.poll() is not None:
                    self._process = None
                    log = self._log_text()
                    if "Address already in use" in log:
                        raise _PortTaken(port)
                    raise RuntimeError(f"redis-server exited ({process.returncode}):\n{log}")
                try:
                    if probe.ping():
                        return
                except redis.ConnectionError:
                    pass  # not listening yet
                except redis.BusyLoadingError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server did not answer on port {port} within "
                        f"{START_TIMEOUT_S} s:\n{self._log_text()}"
                    )
                time.sleep(_POLL_S)
        finally:
            probe.close()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): it keeps its port but answers nothing."""
        if self._process is None or not self.running:
            raise RuntimeError("redis-server is not running")
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is None:
            raise RuntimeError("redis-server is not running")
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it to exit."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)

    def _log_text(self) -> str:
        parts = [
            path.read_text(encoding="utf-8", errors="replace")[-4000:]
            for path in (self.output_path, self.log_path) if path.exists()
        ]
        return "\n".join(parts) or "(no output)"


class _PortTaken(RuntimeError):
    pass


def _serve(prefix: str) -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One server for a test module; tests that need it empty flush it."""
    yield from _serve("mandate-redis-")


@pytest.fixture
def private_redis_server() -> Iterator[RedisServer]:
    """A server of the test's own, which it may stop and restart."""
    yield from _serve("mandate-redis-private-")
