"""The daemon's durable state beside the audit log: the keyring (which root
keys are in the bundle, with their windows), the links it issued (for
revocation rights and idempotent retries), and revocations.

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

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import ConfigError, Unavailable

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


class StateStore:
    def __init__(self, path: str | Path) -> None:
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
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
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the state store {path}: {exc}") from None
        self._path = str(path)
        self._lock = threading.Lock()
        self._readers = threading.local()
        self._reader_list: list[sqlite3.Connection] = []
        self._closed = False

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
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

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        try:
            return self._reader().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise Unavailable(f"state store failed: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()
            for db in self._reader_list:
                db.close()

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

    def record_issued(self, link: IssuedLink) -> None:
        with self._tx(durable=False) as db:
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

    # --- revocations -------------------------------------------------------

    def revoke(self, entries: list[tuple[str, int | None]], *, by: str, reason: str,
               now: int) -> int:
        """Record revocations (jti, link exp or None if unknown); returns how many are new."""
        added = 0
        with self._tx() as db:
            for jti, exp in entries:
                cur = db.execute(
                    "INSERT OR IGNORE INTO revoked VALUES (?, ?, ?, ?, ?)",
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
        with self._tx() as db:
            db.execute(
                "INSERT INTO revocation_list VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
                "SET seq = excluded.seq, token = excluded.token, iat = excluded.iat, "
                "exp = excluded.exp",
                (stored.seq, stored.token, stored.iat, stored.exp),
            )
