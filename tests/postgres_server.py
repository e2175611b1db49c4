"""A private PostgreSQL cluster for the test session, on 127.0.0.1.

``initdb`` in a temporary directory, the server on a free port with its
socket in that directory, password authentication over TCP for the
``mandate`` role; each test gets a database of its own. PostgreSQL refuses to
run as root, so as root the server runs as the ``postgres`` system user (on a
directory it owns). Import the ``postgres`` fixture into a test module to use
it; ``PostgresCluster.start``/``stop`` serve scripts (bench/storage.py).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

ROLE = "mandate"
START_TIMEOUT_S = 60


def _binaries() -> Path:
    """The newest installed server's bin directory; a clear failure if none."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL is not installed (no initdb): install the "
                           "'postgresql' package (scripts/system-deps.sh does)")
    return Path(initdb).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresCluster:
    """One running server; ``url(db)`` has no password: pass ``password``."""

    root: Path
    port: int
    password: str
    fsync: bool
    _as_user: list[str] = field(default_factory=list)
    _databases: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, *, fsync: bool = False) -> PostgresCluster:
        """initdb and start; ``fsync=False`` for tests (nothing here outlives a
        crash), True for measurements."""
        bindir = _binaries()
        root = Path(tempfile.mkdtemp(prefix="mandate-pg-"))
        as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        cluster = cls(root, 0, secrets.token_urlsafe(18), fsync, as_user)
        try:
            pwfile = root / "pwfile"
            pwfile.write_text(cluster.password + "\n")
            if as_user:
                os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
            pwfile.chmod(0o600)
            cluster._run(str(bindir / "initdb"), "-D", str(root / "data"), "-U", ROLE,
                         "--auth-host=scram-sha-256", "--auth-local=trust",
                         f"--pwfile={pwfile}", "--no-sync", "-E", "UTF8", "--locale=C")
            pwfile.unlink()
            for attempt in range(3):  # a free port may be taken before the server binds it
                cluster.port = _free_port()
                options = (f"-c listen_addresses=127.0.0.1 -c port={cluster.port} "
                           f"-c unix_socket_directories={root} -c max_connections=200 "
                           f"-c fsync={'on' if fsync else 'off'}")
                done = cluster._run(str(bindir / "pg_ctl"), "-D", str(root / "data"),
                                    "-l", str(root / "server.log"), "-w",
                                    "-t", str(START_TIMEOUT_S), "-o", options, "start",
                                    check=False)
                if done.returncode == 0:
                    break
                if attempt == 2:
                    log = (root / "server.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"PostgreSQL did not start: {done.stderr}\n{log}")
        except BaseException:
            cluster.stop()
            raise
        atexit.register(cluster.stop)
        return cluster

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self._as_user, *argv], capture_output=True, text=True,
                              timeout=START_TIMEOUT_S + 30, check=False, cwd=self.root)
        if check and done.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed: {done.stderr or done.stdout}")
        return done

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url(dbname), password=self.password, autocommit=True)

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._databases.append(name)
        return self.url(name)

    def stop(self) -> None:
        """Stop the server at once and remove its directory; safe to repeat."""
        if not self.root.exists():
            return
        if (self.root / "data" / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self._run(str(_binaries() / "pg_ctl"), "-D", str(self.root / "data"),
                          "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
