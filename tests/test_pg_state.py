"""The state and the audit log on PostgreSQL (a private server on loopback):
the URL in the config, the versioned schema and `mandate db migrate`, two
stores on one database behaving as two replicas, the audit chain under
concurrent writers, tamper detection and a lost connection."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import run_together
from postgres_server import PostgresCluster, postgres  # noqa: F401 - the session's server
from test_audit import TAMPERING, Clock, add

from signer import cli
from signer._audit import AuditLog, AuditRecord, read_checkpoints, read_records, verify_log
from signer._config import load_config
from signer._errors import ConfigError, Unavailable
from signer._keys import MemoryKeySigner
from signer._pg import SCHEMA_VERSION, PgAuditStore, PgDatabase, PgStateDriver, migrate
from signer._state import IssuedLink, KeyRecord, StateStore, StoredList
from signer._storage import PostgresUrl, SqliteUrl, open_storage, parse_state_url
from verifier_sdk import TrustBundle

PASSWORD_ENV = "MANDATE_TEST_PG_PASSWORD"


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> PostgresCluster:
    server: PostgresCluster = request.getfixturevalue("postgres")
    return server


@pytest.fixture
def url(cluster: PostgresCluster) -> str:
    """A fresh database, not migrated."""
    return cluster.create_database()


@pytest.fixture
def db(cluster: PostgresCluster, url: str) -> PgDatabase:
    """A fresh database at this signer's schema."""
    database = PgDatabase(url, password=cluster.password)
    migrate(database)
    return database


@pytest.fixture
def signer() -> MemoryKeySigner:
    return MemoryKeySigner("audit-1")


@pytest.fixture
def bundle(signer: MemoryKeySigner) -> TrustBundle:
    return TrustBundle.from_jwks({"keys": [
        {**signer.public_jwk, "kid": signer.kid, "alg": signer.alg, "use": "sig"}]})


def write_config(tmp_path: Path, url: str, **state: str) -> Path:
    lines = "".join(f'{key} = "{value}"\n' for key, value in {"url": url, **state}.items())
    path = tmp_path / "signer.toml"
    path.write_text(f'[policy]\nfile = "policy.toml"\n\n[state]\n{lines}')
    return path


def schema_versions(cluster: PostgresCluster, url: str) -> list[int]:
    with cluster.connect(url.rsplit("/", 1)[1]) as conn:
        return [int(str(r[0])) for r in
                conn.execute("SELECT version FROM mandate_schema ORDER BY version")]


# --- the URL and the password ----------------------------------------------------------


@pytest.mark.parametrize(("url", "kind"), [
    ("sqlite:///var/lib/mandate", SqliteUrl(Path("/var/lib/mandate"))),
    ("sqlite:state", SqliteUrl(Path("/etc/mandate/state"))),
    ("postgresql://mandate@db.internal:5432/mandate?sslmode=verify-full",
     PostgresUrl("postgresql://mandate@db.internal:5432/mandate?sslmode=verify-full")),
    ("postgres://mandate@db.internal/mandate", PostgresUrl("postgres://mandate@db.internal/mandate")),
], ids=["sqlite-absolute", "sqlite-relative", "postgresql", "postgres-alias"])
def test_the_url_names_the_backend(url: str, kind: object) -> None:
    assert parse_state_url(url, base=Path("/etc/mandate")) == kind


@pytest.mark.parametrize("url", [
    "postgresql://mandate:hunter2-secret@db.internal/mandate",
    "postgresql://mandate@db.internal/mandate?password=hunter2-secret",
    "postgresql://mandate@db.internal/mandate?sslmode=require&PASSWORD=hunter2-secret",
    "postgresql://mandate@db.internal/mandate?sslkey=k.pem&sslpassword=hunter2-secret",
], ids=["in-userinfo", "in-query", "in-query-upper-case", "client-key-password"])
def test_a_password_in_the_url_is_refused_without_repeating_it(url: str) -> None:
    with pytest.raises(ConfigError, match="must not hold a password") as err:
        parse_state_url(url, base=Path("/"))
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("url", [
    "mysql://db.internal/mandate", "sqlite://host/dir", "sqlite:", "postgresql://h:port/x",
], ids=["other-scheme", "sqlite-with-host", "sqlite-without-path", "bad-port"])
def test_a_malformed_url_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match=r"\[state\] url"):
        parse_state_url(url, base=Path("/"))


def test_the_config_reads_the_url_and_the_password_variable(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "postgresql://m@127.0.0.1/db",
                                      password_env="PGPASS_VAR"))
    assert (config.state.url, config.state.password_env) == (
        "postgresql://m@127.0.0.1/db", "PGPASS_VAR")
    sqlite = load_config(write_config(tmp_path, "sqlite:var/state"))
    assert sqlite.state_dir == tmp_path / "var" / "state"
    assert sqlite.state_path == tmp_path / "var" / "state" / "state.db"
    with pytest.raises(ConfigError, match=r"\[state\] needs exactly dir"):
        load_config(write_config(tmp_path, "sqlite:///x", password_env="V"))


def test_the_password_comes_from_the_variable_the_config_names(
        cluster: PostgresCluster, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        signer: MemoryKeySigner) -> None:
    migrate(PgDatabase(url, password=cluster.password))
    config = load_config(write_config(tmp_path, url, password_env=PASSWORD_ENV))
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(ConfigError, match=f"{PASSWORD_ENV} is not set"):
        open_storage(config, signer=signer)
    monkeypatch.setenv(PASSWORD_ENV, "wrong-password")
    with pytest.raises(Unavailable, match="password authentication failed") as err:
        open_storage(config, signer=signer)
    assert "wrong-password" not in err.value.message
    monkeypatch.setenv(PASSWORD_ENV, cluster.password)
    state, audit = open_storage(config, signer=signer)
    audit.append("start", caller="daemon", decision="ok")
    audit.close()
    state.close()
    assert [r.event for r in read_records(PgAuditStore(PgDatabase(url,
                                                                   password=cluster.password)))
            ] == ["start"]


# --- the schema ---------------------------------------------------------------------------


def test_db_migrate_creates_the_schema_once(cluster: PostgresCluster, url: str,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, url, password_env=PASSWORD_ENV)
    monkeypatch.setenv(PASSWORD_ENV, cluster.password)
    assert cli.main(["db", "migrate", "--config", str(config)]) == 0
    assert f"schema version 0 -> {SCHEMA_VERSION}" in capsys.readouterr().out
    assert cli.main(["db", "migrate", "--config", str(config)]) == 0
    assert f"already at version {SCHEMA_VERSION}" in capsys.readouterr().out
    assert schema_versions(cluster, url) == [SCHEMA_VERSION]


def test_db_migrate_on_sqlite_creates_both_files(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "signer.toml"
    config.write_text('[policy]\nfile = "policy.toml"\n[state]\ndir = "state"\n')
    for _ in range(2):
        assert cli.main(["db", "migrate", "--config", str(config)]) == 0
    assert "SQLite in" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "state").glob("*.db")} == {"state.db", "audit.db"}


def test_concurrent_migrations_take_turns(cluster: PostgresCluster, url: str) -> None:
    results: list[tuple[int, int]] = []

    def run(_: int) -> None:
        results.append(migrate(PgDatabase(url, password=cluster.password)))

    errors, _ = run_together(run, 3, join_s=60)
    assert not errors
    assert sorted(results) == [(0, SCHEMA_VERSION)] + [(SCHEMA_VERSION, SCHEMA_VERSION)] * 2
    assert schema_versions(cluster, url) == [SCHEMA_VERSION]


def test_the_daemon_refuses_a_database_it_was_not_migrated_for(
        cluster: PostgresCluster, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write_config(tmp_path, url, password_env=PASSWORD_ENV))
    monkeypatch.setenv(PASSWORD_ENV, cluster.password)
    with pytest.raises(ConfigError, match=r"no mandate schema.*run `mandate db migrate --config"):
        open_storage(config, signer=None)
    migrate(PgDatabase(url, password=cluster.password))
    with cluster.connect(url.rsplit("/", 1)[1]) as conn:
        conn.execute("INSERT INTO mandate_schema (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match=f"version {SCHEMA_VERSION + 1}, newer than this"):
        open_storage(config, signer=None)
    with pytest.raises(ConfigError, match="newer than this"):
        migrate(PgDatabase(url, password=cluster.password))


# --- the state, shared by two stores as by two replicas ---------------------------------


@pytest.fixture
def replicas(db: PgDatabase) -> Iterator[tuple[StateStore, StateStore]]:
    a, b = StateStore(PgStateDriver(db)), StateStore(PgStateDriver(db))
    yield a, b
    a.close()
    b.close()


def link(jti: str, key: str, caller: str = "orch") -> IssuedLink:
    return IssuedLink(jti, caller, "agent:1", "k1", 2_000_000_000, f"chain-{jti}", "d-" + key,
                      key)


def test_what_one_replica_writes_the_other_reads(replicas: tuple[StateStore, StateStore]
                                                 ) -> None:
    a, b = replicas
    a.add_key(KeyRecord("k1", "EdDSA", 100, None))
    b.set_key_exp("k1", 500)
    assert a.key_records() == [KeyRecord("k1", "EdDSA", 100, 500)]
    with pytest.raises(ConfigError, match="already in the keyring"):
        b.add_key(KeyRecord("k1", "ES256", 200, None))
    a.record_issued(link("j1", "idem-1"))
    assert b.by_idempotency_key("orch", "idem-1") == link("j1", "idem-1")
    assert b.issued("j1") == link("j1", "idem-1")
    assert b.by_idempotency_key("other", "idem-1") is None
    assert b.revoke([("j1", 2_000_000_000), ("offline", None)], by="orch", reason="r",
                    now=1) == 2
    assert a.revoke([("j1", 2_000_000_000)], by="admin", reason="again", now=2) == 0
    assert a.revoked_jtis(live_after=0) == ["j1", "offline"]
    assert a.revoked_jtis(live_after=2_000_000_000) == ["offline"]


def test_one_idempotency_key_records_one_link(replicas: tuple[StateStore, StateStore]) -> None:
    a, b = replicas
    a.record_issued(link("j1", "idem-1"))
    with pytest.raises(Unavailable, match="duplicate key"):
        b.record_issued(link("j2", "idem-1"))
    assert b.by_idempotency_key("orch", "idem-1") == link("j1", "idem-1")


def test_pruning_on_one_replica_forgets_for_both(replicas: tuple[StateStore, StateStore]
                                                 ) -> None:
    a, b = replicas
    dead = dataclasses.replace(link("j1", "idem-1"), exp=1_000)
    a.record_issued(dead)
    a.record_issued(link("j2", "idem-2"))
    b.revoke([("j1", 1_000), ("j2", 2_000_000_000), ("offline", None)], by="orch",
             reason="r", now=1)

    assert b.prune(dead_before=1_000) == (0, 0)  # twin: exp is not before 1,000
    assert b.prune(dead_before=1_001) == (1, 1)

    assert a.issued("j1") is None
    assert a.by_idempotency_key("orch", "idem-1") is None
    assert a.issued("j2") == link("j2", "idem-2")
    assert a.revoked_jtis(live_after=0) == ["j2", "offline"]


def test_the_list_seq_never_goes_back_or_repeats(replicas: tuple[StateStore, StateStore]
                                                 ) -> None:
    a, b = replicas
    assert a.revocation_list() is None
    a.save_revocation_list(StoredList(0, "list-0", 10, 20))
    b.save_revocation_list(StoredList(1, "list-1-b", 11, 21))
    for stale in (StoredList(1, "list-1-a", 11, 21), StoredList(0, "list-0-again", 12, 22)):
        with pytest.raises(Unavailable, match="published meanwhile"):
            a.save_revocation_list(stale)
    assert a.revocation_list() == b.revocation_list() == StoredList(1, "list-1-b", 11, 21)


def test_a_named_lock_excludes_the_other_replica(cluster: PostgresCluster, db: PgDatabase,
                                                 replicas: tuple[StateStore, StateStore]
                                                 ) -> None:
    a, b = replicas
    order: list[str] = []
    held, release = threading.Event(), threading.Event()

    def first() -> None:
        with a.lock("revocation-list"):
            held.set()
            release.wait(30)
            order.append("a releases")

    def second() -> None:
        with b.lock("revocation-list"):
            order.append("b holds")

    holder = threading.Thread(target=first)
    holder.start()
    assert held.wait(30)
    waiter = threading.Thread(target=second)
    waiter.start()
    # The waiter is blocked on the advisory lock in the server: seen there, not guessed.
    with cluster.connect(db.name.rsplit("/", 1)[1]) as admin:
        for _ in range(3000):
            row = admin.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                "AND NOT granted").fetchone()
            if row is not None and row[0] == 1:
                break
            admin.execute("SELECT pg_sleep(0.01)")
        else:
            pytest.fail("the second replica never waited for the lock")
    with b.lock("another-name"):  # other names are not held up
        pass
    release.set()
    holder.join(30)
    waiter.join(30)
    assert order == ["a releases", "b holds"]


# --- the audit log -------------------------------------------------------------------------


def fill(db: PgDatabase, signer: Any, n: int = 20, every: int = 10) -> list[AuditRecord]:
    with AuditLog(PgAuditStore(db), signer=signer, checkpoint_every=every, clock=Clock()) as log:
        return [add(log, i) for i in range(1, n + 1)]


def test_two_writers_make_one_chain(db: PgDatabase, signer: MemoryKeySigner,
                                    bundle: TrustBundle) -> None:
    """Two logs on one database, as two replicas, appending from 8 threads at once."""
    threads, per_thread = 8, 40
    logs = [AuditLog(PgAuditStore(db), signer=signer, checkpoint_every=25) for _ in range(2)]
    got: list[list[AuditRecord]] = [[] for _ in range(threads)]

    def work(i: int) -> None:
        for j in range(per_thread):
            got[i].append(logs[i % 2].append(
                "delegate", caller=f"orch-{i}", decision="allow", jti=f"j-{i}-{j}"))

    errors, _ = run_together(work, threads, join_s=120)
    for log in logs:
        log.close()
    assert not errors
    total = threads * per_thread
    stored = read_records(PgAuditStore(db))
    assert [r.seq for r in stored] == list(range(1, total + 1))  # no gap, no fork
    assert sorted(r.jti for r in stored) == sorted(r.jti for rs in got for r in rs)
    assert {r.seq: r for r in stored} == {r.seq: r for rs in got for r in rs}
    report = verify_log(PgAuditStore(db), bundle)
    assert report.ok, report.message
    assert (report.records_checked, report.unsigned_tail) == (total, 0)
    assert report.checkpoints_checked >= 2
    assert {c.seq for c in read_checkpoints(PgAuditStore(db))} >= {total}


def test_the_chain_continues_across_replicas_and_restarts(db: PgDatabase, signer: MemoryKeySigner,
                                                          bundle: TrustBundle) -> None:
    first = fill(db, signer, n=3)
    with AuditLog(PgAuditStore(db), signer=signer) as log:
        assert log.head == (3, first[-1].hash)
        after = add(log, 4)
    assert (after.seq, after.prev) == (4, first[-1].hash)
    assert verify_log(PgAuditStore(db), bundle).ok


class Adapter:
    """The SQLite tamper steps of test_audit, run on PostgreSQL."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), args)


@pytest.mark.parametrize(("tamper", "found"), [(row[1], row[2:]) for row in TAMPERING],
                         ids=[row[0] for row in TAMPERING])
def test_tampering_is_detected(cluster: PostgresCluster, db: PgDatabase, *,
                               signer: MemoryKeySigner, bundle: TrustBundle,
                               tamper: Callable[[Any], object], found: tuple[str, int]) -> None:
    fill(db, signer)
    assert verify_log(PgAuditStore(db), bundle).ok  # the untampered twin
    with cluster.connect(db.name.rsplit("/", 1)[1]) as conn:
        tamper(Adapter(conn))
    report = verify_log(PgAuditStore(db), bundle)
    assert not report.ok
    assert (report.problem, report.first_bad_seq) == found, report.issues


def test_a_lost_connection_fails_closed_then_reconnects(
        cluster: PostgresCluster, db: PgDatabase, signer: MemoryKeySigner,
        bundle: TrustBundle) -> None:
    with AuditLog(PgAuditStore(db), signer=signer) as log:
        first = add(log, 1)
        pid = log._conn.info.backend_pid
        with cluster.connect(db.name.rsplit("/", 1)[1]) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(Unavailable, match="audit store failed"):
            add(log, 2)
        assert log.head == (1, first.hash)
        assert log.healthy is False
        log.probe()  # a new connection, as the daemon's probe makes it
        assert log.healthy is True
        assert log.head == (1, first.hash)  # a probe adds no record
        second = add(log, 3)
    assert (second.seq, second.prev) == (2, first.hash)
    assert verify_log(PgAuditStore(db), bundle).ok


def test_a_state_store_whose_server_is_gone_is_unavailable(
        cluster: PostgresCluster, db: PgDatabase) -> None:
    store = StateStore(PgStateDriver(db))
    try:
        store.add_key(KeyRecord("k1", "EdDSA", 1, None))
        with cluster.connect(db.name.rsplit("/", 1)[1]) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = 'mandate-signer' AND pid <> pg_backend_pid()")
        with pytest.raises(Unavailable, match="state store failed"):
            store.key_records()
        assert [k.kid for k in store.key_records()] == ["k1"]  # reconnected
    finally:
        store.close()


def test_audit_verify_and_show_read_postgresql(
        cluster: PostgresCluster, db: PgDatabase, signer: MemoryKeySigner, *, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fill(db, signer)
    (tmp_path / "bundle.json").write_text(json.dumps({"keys": [
        {**signer.public_jwk, "kid": signer.kid, "alg": signer.alg, "use": "sig"}]}))
    config = write_config(tmp_path, db.name, password_env=PASSWORD_ENV)
    monkeypatch.setenv(PASSWORD_ENV, cluster.password)
    bundle_arg = ["--bundle", str(tmp_path / "bundle.json")]
    assert cli.main(["audit", "verify", "--config", str(config), *bundle_arg]) == 0
    assert "ok: 20 records and 2 checkpoints verified" in capsys.readouterr().out
    monkeypatch.setenv("PGPASSWORD", cluster.password)  # libpq's own variable, with --log
    assert cli.main(["audit", "show", "--log", db.name, "--caller", "agent-1"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 7
    assert all('"caller": "agent-1"' in line for line in shown)
    with cluster.connect(db.name.rsplit("/", 1)[1]) as conn:
        conn.execute("UPDATE records SET decision = 'allow' WHERE seq = 5")
    assert cli.main(["audit", "verify", "--log", db.name, *bundle_arg]) == 1
    assert "FAILED at seq 5 (edited)" in capsys.readouterr().out
