"""Where the daemon keeps its state and its audit log, chosen by URL.

``[state] url`` in the config:

* ``sqlite:///var/lib/mandate`` (or ``sqlite:relative/dir``, relative to the
  config file; or no ``url`` and ``dir = "..."``): the default, two SQLite
  files in one directory, for one daemon.
* ``postgresql://user@host:5432/dbname?sslmode=verify-full``: one database
  shared by several replicas (``_pg``). The password is never in the URL:
  libpq's ``PGPASSWORD`` or ``.pgpass``, or the environment variable that
  ``[state] password_env`` names.

Either way the daemon sees the same two objects: a ``StateStore`` (keyring,
issued links and idempotency keys, revocations, the signed revocation list)
and an ``AuditLog`` (the hash chain with group commit and checkpoints).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl, unquote, urlsplit

from ._audit import AuditLocation, AuditLog
from ._errors import ConfigError
from ._keys import KeySigner
from ._state import StateStore

if TYPE_CHECKING:
    from ._config import Config
    from ._pg import PgDatabase

__all__ = [
    "PostgresUrl",
    "SqliteUrl",
    "audit_location",
    "audit_location_at",
    "migrate_storage",
    "open_storage",
    "parse_state_url",
]

POSTGRES_SCHEMES: Final = ("postgresql", "postgres")
MIGRATE_HINT: Final = "mandate db migrate --config <this config file>"


@dataclass(frozen=True, slots=True)
class SqliteUrl:
    directory: Path  # holds state.db and audit.db


@dataclass(frozen=True, slots=True)
class PostgresUrl:
    url: str  # as libpq reads it; never holds a password


def parse_state_url(url: str, *, base: Path) -> SqliteUrl | PostgresUrl:
    """Check a ``[state] url``; ConfigError names what is wrong (never echoing a
    password)."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if parts.netloc or parts.query or parts.fragment or not parts.path:
            raise ConfigError('config: [state] url: "sqlite:///absolute/dir" or '
                              '"sqlite:dir/relative/to/the/config"')
        return SqliteUrl((base / unquote(parts.path)).resolve())
    if parts.scheme in POSTGRES_SCHEMES:
        try:
            has_password = parts.password is not None
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError as exc:
            raise ConfigError(f"config: [state] url: {exc}") from None
        query = {key.lower() for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
        if has_password or any("password" in key for key in query):  # sslpassword too
            # Say where, not what: the text of the URL is the secret's neighbour.
            raise ConfigError("config: [state] url must not hold a password: set "
                              "password_env, or PGPASSWORD or a .pgpass file")
        return PostgresUrl(url)
    raise ConfigError('config: [state] url must start with "sqlite:" or "postgresql://"')


def _location(config: Config) -> SqliteUrl | PostgresUrl:
    if not config.state.url:
        return SqliteUrl(config.state_dir)
    return parse_state_url(config.state.url, base=config.state_dir)


def _database(config: Config, url: PostgresUrl) -> PgDatabase:
    try:
        from ._pg import PgDatabase  # noqa: PLC0415 - psycopg is an optional extra
    except ImportError as exc:
        raise ConfigError(f"[state] url is a PostgreSQL database, but {exc.name or 'psycopg'} "
                          "is not installed: pip install 'mandate[postgres]'") from None
    password = None
    if config.state.password_env:
        password = os.environ.get(config.state.password_env)
        if not password:
            raise ConfigError(f"[state] password_env: the environment variable "
                              f"{config.state.password_env} is not set")
    return PgDatabase(url.url, password=password)


def open_storage(config: Config, *, signer: KeySigner | None) -> tuple[StateStore, AuditLog]:
    """The daemon's state and audit log, on the backend ``[state]`` names.

    PostgreSQL must hold the schema this signer knows (``mandate db migrate``),
    else ConfigError; an unreachable server is Unavailable.
    """
    location = _location(config)
    if isinstance(location, SqliteUrl):
        location.directory.mkdir(parents=True, exist_ok=True)
        state = StateStore(location.directory / "state.db")
        audit_at: AuditLocation = location.directory / "audit.db"
    else:
        db = _database(config, location)
        from ._pg import PgAuditStore, PgStateDriver  # noqa: PLC0415 - optional extra

        db.open_checked()
        state = StateStore(PgStateDriver(db))
        audit_at = PgAuditStore(db)
    try:
        audit = AuditLog(audit_at, signer=signer,
                         checkpoint_every=config.audit.checkpoint_every,
                         checkpoint_interval_s=config.audit.checkpoint_interval_s,
                         commit_timeout_s=config.server.rpc_time_limit_s)
    except BaseException:
        state.close()
        raise
    return state, audit


def audit_location(config: Config) -> AuditLocation:
    """Where ``mandate audit verify|show --config`` reads the log."""
    location = _location(config)
    if isinstance(location, SqliteUrl):
        return location.directory / "audit.db"
    db = _database(config, location)
    from ._pg import PgAuditStore  # noqa: PLC0415 - optional extra

    return PgAuditStore(db)


def audit_location_at(log: str) -> AuditLocation:
    """``mandate audit --log``: a ``postgresql://`` URL (the password from
    PGPASSWORD or .pgpass), or else the name of an SQLite file."""
    if urlsplit(log).scheme not in POSTGRES_SCHEMES:
        return Path(log)
    url = parse_state_url(log, base=Path.cwd())
    assert isinstance(url, PostgresUrl)
    try:
        from ._pg import PgAuditStore, PgDatabase  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        raise ConfigError(f"{exc.name or 'psycopg'} is not installed: "
                          "pip install 'mandate[postgres]'") from None
    return PgAuditStore(PgDatabase(url.url))


def migrate_storage(config: Config) -> str:
    """Create or upgrade the schema of the configured backend; one line saying
    what was done. Idempotent."""
    location = _location(config)
    if isinstance(location, SqliteUrl):
        location.directory.mkdir(parents=True, exist_ok=True)
        StateStore(location.directory / "state.db").close()
        AuditLog(location.directory / "audit.db", signer=None).close()
        return f"SQLite in {location.directory}: state.db and audit.db at their schema versions"
    db = _database(config, location)
    from ._pg import migrate  # noqa: PLC0415 - optional extra

    before, after = migrate(db)
    if before == after:
        return f"PostgreSQL {location.url}: schema already at version {after}"
    return f"PostgreSQL {location.url}: schema version {before} -> {after}"
