"""The daemon's durable state beside the audit log: the keyring (which root
keys are in the bundle, with their windows), the links it issued (for
revocation rights and idempotent retries), and revocations.

``StateStore`` holds the SQL, the same for every backend; a ``Driver`` runs
it. The default driver is SQLite (here); the PostgreSQL one, for several
replicas sharing one state, is in ``_pg``.

SQLite in WAL mode. Writes go through one connection under a lock; reads use
a connection per thread, so they never wait for a commit. Keys, revocations
and revocation lists commit with synchronous=FULL. An issued-link record
commits with synchronous=NORMAL: it survives a crash of the process, and the
audit log (always FULL, written first) is the durable proof of issuance; an
OS crash can lose the newest of these records, after which a retry gets a
new link (audited too) and only an admin can revoke the lost one by jti.
Measured under load, the per-call fsync here cost more than the audit log's
group commit.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from ._errors import ConfigError, Unavailable
from ._sqlite import WalCheckpointer, use_backstop

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    kid TEXT PRIMARY KEY, alg TEXT NOT NULL, nbf INTEGER NOT NULL, exp INTEGER
);
CREATE TABLE IF NOT EXISTS issued (
    jti TEXT PRIMARY KEY, caller TEXT NOT NULL, sub TEXT NOT NULL, kid TEXT NOT NULL,
    exp INTEGER NOT NULL, chain TEXT NOT NULL, request_digest TEXT NOT NULL,
    idempotency_key TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS issued_idempotency ON issued (caller, idempotency_key);
CREATE TABLE IF NOT EXISTS revoked (
    jti TEXT PRIMARY KEY, exp INTEGER, revoked_at INTEGER NOT NULL, by TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revocation_list (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, token TEXT NOT NULL,
    iat INTEGER NOT NULL, exp INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A root key's place in the bundle: signs from ``nbf``, valid until ``exp``."""

    kid: str
    alg: str
    nbf: int
    exp: int | None


@dataclass(frozen=True, slots=True)
class IssuedLink:
    jti: str
    caller: str
    sub: str
    kid: str
    exp: int
    chain: str
    request_digest: str
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class StoredList:
    seq: int
    token: str
    iat: int
    exp: int


# --- drivers -------------------------------------------------------------------------


class Result(Protocol):
    """What a statement gives back (a DB-API cursor)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...


class Transaction(Protocol):
    def execute(self, sql: str, args: tuple[object, ...] = (), /) -> Result:
        """One statement, ``?`` placeholders."""
        ...


class Driver(Protocol):
    """Runs the store's SQL on one backend; every store failure is ``Unavailable``."""

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        """Rows of a read, ``?`` placeholders; sees every committed write."""
        ...

    def transaction(self, *, durable: bool) -> AbstractContextManager[Transaction]:
        """A write transaction, committed at the end of the block (rolled back if
        it raises). ``durable=False`` may skip the flush to disk: the record then
        survives a crash of the process but perhaps not of the machine."""
        ...

    def lock(self, name: str) -> AbstractContextManager[None]:
        """Mutual exclusion on ``name`` among every process sharing the store."""
        ...

    def close(self) -> None: ...


class _SqliteDriver:
    """One writer connection under a lock, a reader connection per thread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            use_backstop(self._db)
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise ConfigError(
                    f"state store {path}: schema version {row[0]}, expected {SCHEMA_VERSION}"
                )
            self._checkpointer = WalCheckpointer(path)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the state store {path}: {exc}") from None
        self._path = str(path)
        self._lock = threading.Lock()
        self._durable = True  # the connection's synchronous setting: FULL
        self._readers = threading.local()
        self._reader_list: list[sqlite3.Connection] = []
        self._closed = False
        # One process owns an SQLite state: a lock among its threads is enough.
        self._named: dict[str, list[Any]] = {}
        self._named_guard = threading.Lock()

    @contextmanager
    def transaction(self, *, durable: bool) -> Iterator[Transaction]:
        with self._lock:
            try:
                if durable is not self._durable:
                    self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                    self._durable = durable
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise Unavailable(f"state store failed: {exc}") from None

    def _reader(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._readers, "db", None)
        if db is None:
            if self._closed:
                raise sqlite3.ProgrammingError("the state store is closed")
            db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            self._readers.db = db
            with self._lock:
                self._reader_list.append(db)
        return db

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        try:
            return self._reader().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise Unavailable(f"state store failed: {exc}") from None

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        with self._named_guard:
            entry = self._named.setdefault(name, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._named_guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._named[name]

    def close(self) -> None:
        self._checkpointer.close()  # first: the last connection to close removes the log
        with self._lock:
            self._closed = True
            self._db.close()
            for db in self._reader_list:
                db.close()


# --- the store -------------------------------------------------------------------------


class StateStore:
    """The state, on SQLite (a path) or on the driver given (PostgreSQL)."""

    def __init__(self, location: str | os.PathLike[str] | Driver) -> None:
        self._driver: Driver = (
            _SqliteDriver(location) if isinstance(location, str | os.PathLike)
            else location
        )

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[Transaction]:
        with self._driver.transaction(durable=durable) as tx:
            yield tx

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        return self._driver.query(sql, args)

    def lock(self, name: str) -> AbstractContextManager[None]:
        """Hold ``name`` against every replica sharing this store (for a
        read-sign-write that must not interleave, like publishing a list)."""
        return self._driver.lock(name)

    def close(self) -> None:
        self._driver.close()

    # --- keyring -----------------------------------------------------------

    def key_records(self) -> list[KeyRecord]:
        rows = self._query("SELECT kid, alg, nbf, exp FROM keys ORDER BY nbf, kid")
        return [KeyRecord(str(k), str(a), int(n), None if e is None else int(e))
                for k, a, n, e in rows]

    def add_key(self, key: KeyRecord) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM keys WHERE kid = ?", (key.kid,)).fetchone():
                raise ConfigError(f"key {key.kid!r} is already in the keyring")
            db.execute("INSERT INTO keys VALUES (?, ?, ?, ?)",
                       (key.kid, key.alg, key.nbf, key.exp))

    def set_key_exp(self, kid: str, exp: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE keys SET exp = ? WHERE kid = ?", (exp, kid))

    # --- issued links ------------------------------------------------------

    def record_issued(self, *links: IssuedLink) -> None:
        """Store issued links, all in one transaction."""
        with self._tx(durable=False) as db:
            for link in links:
                db.execute(
                    "INSERT INTO issued VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (link.jti, link.caller, link.sub, link.kid, link.exp, link.chain,
                     link.request_digest, link.idempotency_key),
                )

    def _issued(self, where: str, args: tuple[object, ...]) -> IssuedLink | None:
        # ``where`` is one of the two constant conditions below, never input.
        sql = "SELECT jti, caller, sub, kid, exp, chain, request_digest, idempotency_key " \
              "FROM issued WHERE " + where
        rows = self._query(sql, args)
        if not rows:
            return None
        jti, caller, sub, kid, exp, chain, digest, idem = rows[0]
        return IssuedLink(str(jti), str(caller), str(sub), str(kid), int(exp),
                          str(chain), str(digest), str(idem))

    def issued(self, jti: str) -> IssuedLink | None:
        return self._issued("jti = ?", (jti,))

    def by_idempotency_key(self, caller: str, key: str) -> IssuedLink | None:
        return self._issued("caller = ? AND idempotency_key = ?", (caller, key))

    def prune(self, *, dead_before: int) -> tuple[int, int]:
        """Forget the issued links, and the revocations of links, that expired
        before ``dead_before``: no verifier accepts them any more, so neither an
        idempotent retry nor a revocation list needs them (revocations of
        unknown links, whose end is not known, stay). Returns how many of each."""
        with self._tx(durable=False) as db:
            links = db.execute("DELETE FROM issued WHERE exp < ?", (dead_before,)).rowcount
            revocations = db.execute(
                "DELETE FROM revoked WHERE exp IS NOT NULL AND exp < ?", (dead_before,)
            ).rowcount
        return int(links), int(revocations)

    # --- revocations -------------------------------------------------------

    def revoke(self, entries: list[tuple[str, int | None]], *, by: str, reason: str,
               now: int) -> int:
        """Record revocations (jti, link exp or None if unknown); returns how many are new."""
        added = 0
        with self._tx() as db:
            for jti, exp in entries:
                cur = db.execute(
                    "INSERT INTO revoked VALUES (?, ?, ?, ?, ?) ON CONFLICT (jti) DO NOTHING",
                    (jti, exp, now, by, reason),
                )
                added += cur.rowcount
        return added

    def revoked_jtis(self, *, live_after: int) -> list[str]:
        """Revoked jtis whose link may still be valid after ``live_after`` (or unknown)."""
        rows = self._query(
            "SELECT jti FROM revoked WHERE exp IS NULL OR exp > ? ORDER BY jti", (live_after,)
        )
        return [str(r[0]) for r in rows]

    def revocation_list(self) -> StoredList | None:
        rows = self._query("SELECT seq, token, iat, exp FROM revocation_list WHERE id = 1")
        if not rows:
            return None
        seq, token, iat, exp = rows[0]
        return StoredList(int(seq), str(token), int(iat), int(exp))

    def save_revocation_list(self, stored: StoredList) -> None:
        """Store the newest list; Unavailable if one with this ``seq`` or a higher
        one is there already (another replica published first), so a stored
        ``seq`` never goes back and two lists never share one."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO revocation_list VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
                "SET seq = excluded.seq, token = excluded.token, iat = excluded.iat, "
                "exp = excluded.exp WHERE revocation_list.seq < excluded.seq",
                (stored.seq, stored.token, stored.iat, stored.exp),
            )
            if cur.rowcount != 1:
                raise Unavailable(
                    f"revocation list {stored.seq} was not stored: a list with this seq or a "
                    "later one was published meanwhile; retry"
                )
