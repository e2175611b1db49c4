"""The PostgreSQL backend: the state and the audit log of several signer
replicas in one database (psycopg 3; ``pip install 'mandate[postgres]'``).

The tables and the SQL are those of the SQLite backend; what differs is how
the writers of several processes are kept apart:

* the audit log is one hash chain. Each group commit takes a
  transaction-scoped advisory lock, reads the head inside it, chains its batch
  onto that head and commits: replicas take turns, the chain never forks
  (``seq`` is also the primary key) and never has a gap.
* ``StateStore.lock(name)`` is a session-level advisory lock, for work that
  reads, signs and writes (publishing a revocation list).
* the revocation list row only ever moves to a higher ``seq`` (see
  ``StateStore.save_revocation_list``).

The schema is versioned in ``mandate_schema`` and is created and upgraded
only by ``mandate db migrate``; the daemon refuses a database at another
version. The password never comes from the URL: libpq's ``PGPASSWORD`` or
``~/.pgpass``, or the environment variable ``[state] password_env`` names.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Final

import psycopg
from psycopg import IsolationLevel
from psycopg.conninfo import conninfo_to_dict

from ._audit import _INSERT, GENESIS, AuditRecord, Journal, Reader, _row
from ._errors import ConfigError, Unavailable
from ._state import Transaction

__all__ = ["SCHEMA_VERSION", "PgAuditStore", "PgDatabase", "PgStateDriver", "migrate"]

_log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
CONNECT_TIMEOUT_S: Final = 10  # unless the URL sets connect_timeout
LOCK_TIMEOUT_S: Final = 10  # the longest wait for a row or an advisory lock
# Advisory locks in the two-int4 key space: (namespace, key).
_NS: Final = 0x4D414E44  # "MAND"
_AUDIT_CHAIN: Final = (_NS, 1)
_MIGRATION: Final = (_NS, 2)
_NAMED_NS: Final = _NS + 1  # StateStore.lock(name): (_NAMED_NS, hashtext(name))

_MIGRATIONS: Final[tuple[tuple[int, tuple[str, ...]], ...]] = (
    (1, (
        # The state (signer._state).
        "CREATE TABLE keys (kid TEXT PRIMARY KEY, alg TEXT NOT NULL, nbf BIGINT NOT NULL, "
        "exp BIGINT)",
        "CREATE TABLE issued (jti TEXT PRIMARY KEY, caller TEXT NOT NULL, sub TEXT NOT NULL, "
        "kid TEXT NOT NULL, exp BIGINT NOT NULL, chain TEXT NOT NULL, "
        "request_digest TEXT NOT NULL, idempotency_key TEXT NOT NULL)",
        "CREATE UNIQUE INDEX issued_idempotency ON issued (caller, idempotency_key)",
        'CREATE TABLE revoked (jti TEXT PRIMARY KEY, exp BIGINT, revoked_at BIGINT NOT NULL, '
        '"by" TEXT NOT NULL, reason TEXT NOT NULL)',
        "CREATE TABLE revocation_list (id INTEGER PRIMARY KEY CHECK (id = 1), "
        "seq BIGINT NOT NULL, token TEXT NOT NULL, iat BIGINT NOT NULL, exp BIGINT NOT NULL)",
        # The audit log (signer._audit).
        "CREATE TABLE records (seq BIGINT PRIMARY KEY, time BIGINT NOT NULL, "
        "event TEXT NOT NULL, caller TEXT NOT NULL, decision TEXT NOT NULL, "
        "reason TEXT NOT NULL, request_digest TEXT NOT NULL, jti TEXT NOT NULL, "
        "link_hash TEXT NOT NULL, kid TEXT NOT NULL, sub TEXT NOT NULL, detail TEXT NOT NULL, "
        "prev TEXT NOT NULL, hash TEXT NOT NULL)",
        "CREATE INDEX records_caller ON records (caller)",
        "CREATE INDEX records_jti ON records (jti)",
        "CREATE INDEX records_sub ON records (sub)",
        "CREATE TABLE checkpoints (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        "seq BIGINT NOT NULL, token TEXT NOT NULL)",
    )),
)
assert _MIGRATIONS[-1][0] == SCHEMA_VERSION


@lru_cache(maxsize=256)
def _sql(statement: str) -> str:
    """The shared SQL's ``?`` placeholders as psycopg's ``%s`` (no statement
    holds a literal ``?`` or ``%``)."""
    return statement.replace("?", "%s")


class PgDatabase:
    """How to reach the database: the URL (never with a password) and the
    password from the environment, kept out of every message."""

    def __init__(self, url: str, *, password: str | None = None,
                 config_hint: str = "<this config file>") -> None:
        self._url = url
        self._password = password
        self._defaults: dict[str, Any] = {"application_name": "mandate-signer"}
        if "connect_timeout" not in conninfo_to_dict(url):
            self._defaults["connect_timeout"] = CONNECT_TIMEOUT_S
        self._config_hint = config_hint

    @property
    def name(self) -> str:
        return self._url

    def __repr__(self) -> str:
        return f"PgDatabase({self._url!r})"

    def connect(self, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        """A new connection; Unavailable if the server cannot be reached."""
        kwargs = dict(self._defaults)
        if self._password is not None:
            kwargs["password"] = self._password
        try:
            conn = psycopg.connect(self._url, autocommit=autocommit, **kwargs)
        except psycopg.Error as exc:
            raise Unavailable(f"cannot connect to PostgreSQL {self._url}: {exc}") from None
        try:
            conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'")
            if not autocommit:
                conn.commit()
        except psycopg.Error as exc:
            conn.close()
            raise Unavailable(f"PostgreSQL {self._url}: {exc}") from None
        return conn

    def check_schema(self, conn: psycopg.Connection[Any]) -> None:
        """ConfigError unless the database holds the schema this signer knows."""
        version = _schema_version(conn)
        if version == SCHEMA_VERSION:
            return
        if version is not None and version > SCHEMA_VERSION:
            raise ConfigError(
                f"PostgreSQL {self._url} has the mandate schema version {version}, newer than "
                f"this signer's {SCHEMA_VERSION}: run a signer of that version or later"
            )
        found = "no mandate schema" if version is None else f"schema version {version}"
        raise ConfigError(
            f"PostgreSQL {self._url} has {found}; this signer needs version {SCHEMA_VERSION}: "
            f"run `mandate db migrate --config {self._config_hint}`"
        )

    def open_checked(self) -> None:
        """Connect once and check the schema: what the daemon does at start."""
        conn = self.connect()
        try:
            self.check_schema(conn)
        except psycopg.Error as exc:
            raise Unavailable(f"PostgreSQL {self._url}: {exc}") from None
        finally:
            conn.close()


def _schema_version(conn: psycopg.Connection[Any]) -> int | None:
    row = conn.execute("SELECT to_regclass('mandate_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return None
    row = conn.execute("SELECT max(version) FROM mandate_schema").fetchone()
    return None if row is None or row[0] is None else int(row[0])


def migrate(db: PgDatabase) -> tuple[int, int]:
    """Create or upgrade the schema; (version before, version after). Idempotent;
    concurrent runs take turns on an advisory lock."""
    conn = db.connect(autocommit=False)
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _MIGRATION)
            conn.execute("CREATE TABLE IF NOT EXISTS mandate_schema (version INTEGER PRIMARY KEY, "
                         "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            before = _schema_version(conn) or 0
            if before > SCHEMA_VERSION:
                raise ConfigError(
                    f"PostgreSQL {db.name} has the mandate schema version {before}, newer than "
                    f"this signer's {SCHEMA_VERSION}: nothing to do here"
                )
            for version, statements in _MIGRATIONS:
                if version > before:
                    for statement in statements:
                        conn.execute(statement)
                    conn.execute("INSERT INTO mandate_schema (version) VALUES (%s)", (version,))
                    _log.info("PostgreSQL %s: schema version %d applied", db.name, version)
        return before, SCHEMA_VERSION
    except psycopg.Error as exc:
        raise Unavailable(f"migrating PostgreSQL {db.name} failed: {exc}") from None
    finally:
        conn.close()


# --- the state ---------------------------------------------------------------------------


class _Tx:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, args: tuple[object, ...] = (), /) -> psycopg.Cursor[Any]:
        return self._conn.execute(_sql(sql), args)


class PgStateDriver:
    """The state's driver on PostgreSQL: a connection per thread (in autocommit
    mode: each read sees every committed write, of every replica)."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self._local = threading.local()
        self._all: list[psycopg.Connection[Any]] = []
        self._guard = threading.Lock()
        self._closed = False

    def _conn(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if getattr(self._local, "held", 0):
            # The session that held an advisory lock is gone, and the lock with it.
            raise Unavailable("the PostgreSQL connection holding a lock was lost")
        if self._closed:
            raise Unavailable("the state store is closed")
        conn = self._db.connect()
        with self._guard:
            self._all = [c for c in self._all if not c.closed]
            self._all.append(conn)
        self._local.conn = conn
        return conn

    def _failed(self, exc: psycopg.Error) -> Unavailable:
        return Unavailable(f"state store failed: {exc}")

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        try:
            return self._conn().execute(_sql(sql), args).fetchall()
        except psycopg.Error as exc:
            raise self._failed(exc) from None

    @contextmanager
    def transaction(self, *, durable: bool) -> Iterator[Transaction]:
        conn = self._conn()
        try:
            with conn.transaction():
                if not durable:
                    conn.execute("SET LOCAL synchronous_commit = off")
                yield _Tx(conn)
        except psycopg.Error as exc:
            raise self._failed(exc) from None

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        conn = self._conn()
        key = (_NAMED_NS, name)
        try:
            conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", key)
        except psycopg.Error as exc:
            raise self._failed(exc) from None
        self._local.held = getattr(self._local, "held", 0) + 1
        try:
            yield
        finally:
            self._local.held -= 1
            if not conn.closed and not conn.broken:
                try:
                    conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", key)
                except psycopg.Error as exc:
                    # Unreleased, the lock would outlive this call: end the session.
                    _log.error("state store: releasing lock %r failed: %s", name, exc)
                    conn.close()

    def close(self) -> None:
        with self._guard:
            self._closed = True
            for conn in self._all:
                conn.close()
            self._all.clear()


# --- the audit log ---------------------------------------------------------------------


class _PgJournal:
    """The audit writer's connection; reconnects when the last one broke."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self.conn = self._connect()

    def _connect(self) -> psycopg.Connection[Any]:
        conn = self._db.connect()
        try:
            self._db.check_schema(conn)
            # Never weaker than a flush of the WAL at each commit: a record is
            # durable before its link leaves (a server default of "off" is raised).
            row = conn.execute("SHOW synchronous_commit").fetchone()
            if row is not None and row[0] in ("off", "local"):
                conn.execute("SET synchronous_commit = on")
        except (psycopg.Error, ConfigError) as exc:
            conn.close()
            if isinstance(exc, ConfigError):
                raise
            raise Unavailable(f"audit log {self._db.name}: {exc}") from None
        return conn

    def _live(self) -> psycopg.Connection[Any]:
        if self.conn.closed or self.conn.broken:
            self.conn.close()
            self.conn = self._connect()
        return self.conn

    def head(self) -> tuple[int, str]:
        try:
            row = self._live().execute(
                "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        except psycopg.Error as exc:
            raise Unavailable(str(exc)) from None
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    def signed_seq(self) -> int:
        try:
            row = self._live().execute("SELECT max(seq) FROM checkpoints").fetchone()
        except psycopg.Error as exc:
            raise Unavailable(str(exc)) from None
        return int(row[0]) if row and row[0] is not None else 0

    def commit(self, make: Callable[[int, str], list[AuditRecord]]) -> list[AuditRecord]:
        conn = self._live()
        try:
            with conn.transaction():
                # Replicas take turns: the head read here is the chain's newest record.
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _AUDIT_CHAIN)
                row = conn.execute(
                    "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
                records = make(*((int(row[0]), str(row[1])) if row else (0, GENESIS)))
                with conn.cursor() as cur:
                    cur.executemany(_sql(_INSERT), [_row(record) for record in records])
        except psycopg.Error as exc:
            raise Unavailable(str(exc)) from None
        return records

    def add_checkpoint(self, seq: int, token: str) -> None:
        try:
            self._live().execute("INSERT INTO checkpoints (seq, token) VALUES (%s, %s)",
                                 (seq, token))
        except psycopg.Error as exc:
            raise Unavailable(str(exc)) from None

    def probe(self) -> None:
        # The server answers a transaction: a lost connection or a database that
        # is down fails here (the server's own disk is its business).
        try:
            with self._live().transaction() as tx:
                tx.connection.execute("SELECT 1")
        except psycopg.Error as exc:
            raise Unavailable(str(exc)) from None

    def close(self) -> None:
        self.conn.close()


class _PgReader:
    """One read-only REPEATABLE READ transaction: every query sees one snapshot."""

    _names = itertools.count()

    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self._conn = db.connect(autocommit=False)
        try:
            self._conn.read_only = True
            self._conn.isolation_level = IsolationLevel.REPEATABLE_READ
            db.check_schema(self._conn)
        except (psycopg.Error, ConfigError) as exc:
            self._conn.close()
            if isinstance(exc, ConfigError):
                raise
            raise Unavailable(f"cannot read audit log {db.name}: {exc}") from None

    def rows(self, sql: str, params: Sequence[object] = ()) -> Iterator[tuple[Any, ...]]:
        try:
            with self._conn.cursor(name=f"audit_{next(self._names)}") as cur:
                cur.itersize = 1000
                cur.execute(_sql(sql), tuple(params))
                yield from cur
        except psycopg.Error as exc:
            raise Unavailable(f"cannot read audit log {self._db.name}: {exc}") from None

    def close(self) -> None:
        self._conn.close()


class PgAuditStore:
    """The audit log's store on PostgreSQL, shared by every replica."""

    shared = True

    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    @property
    def name(self) -> str:
        return self._db.name

    def journal(self) -> Journal:
        return _PgJournal(self._db)

    def reader(self) -> Reader:
        return _PgReader(self._db)
