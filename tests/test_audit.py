"""The audit log: records, the hash chain, group commit, checkpoints, and
``verify_log`` against every kind of tampering (DESIGN.md "Audit log").

Every test runs on a real SQLite file in ``tmp_path``; only the store faults
a real file cannot be made to show on demand use the writer's connection.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for

from signer._audit import (
    CHECKPOINT_TYP,
    GENESIS,
    AuditLog,
    AuditRecord,
    read_checkpoints,
    verify_log,
)
from signer._errors import ConfigError, Unavailable
from signer._keys import MemoryKeySigner
from verifier_sdk import TrustBundle
from verifier_sdk._encoding import b64url_decode, b64url_encode, canonical_json, sha256_b64
from verifier_sdk._link import encode_jws

NOW = 1_800_000_000.25
COLUMNS = ("seq", "time", "event", "caller", "decision", "reason", "request_digest", "jti",
           "link_hash", "kid", "sub", "detail", "prev")
BODY = ", ".join(COLUMNS)
VALUE_ROWS = ", ".join(f"{c} = ?" for c in (*COLUMNS[1:], "hash"))
SELECT_BODY = f"SELECT {BODY} FROM records WHERE seq = ?"  # noqa: S608 (constants)
SELECT_ROW = f"SELECT {BODY}, hash FROM records WHERE seq = ?"  # noqa: S608 (constants)
UPDATE_ROW = f"UPDATE records SET {VALUE_ROWS} WHERE seq = ?"  # noqa: S608 (constants)
PLACES = ", ".join("?" * (len(COLUMNS) + 1))
INSERT_ROW = f"INSERT INTO records VALUES ({PLACES})"  # noqa: S608 (constants)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FlakySigner:
    """A KeySigner whose HSM can be switched off."""

    def __init__(self, inner: MemoryKeySigner) -> None:
        self.inner = inner
        self.failing = False
        self.kid, self.alg, self.public_jwk = inner.kid, inner.alg, inner.public_jwk

    def sign(self, data: bytes) -> bytes:
        if self.failing:
            raise RuntimeError("HSM session lost")
        return self.inner.sign(data)


def jwk(signer: MemoryKeySigner, **window: int) -> dict[str, Any]:
    return {**signer.public_jwk, "kid": signer.kid, "alg": signer.alg, "use": "sig", **window}


@pytest.fixture
def signer() -> MemoryKeySigner:
    return MemoryKeySigner("audit-1")


@pytest.fixture
def bundle(signer: MemoryKeySigner) -> TrustBundle:
    return TrustBundle.from_jwks({"keys": [jwk(signer)]})


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


def add(log: AuditLog, i: int, **extra: Any) -> AuditRecord:
    """Record i of a typical run: odd ones are denials."""
    fields: dict[str, Any] = {
        "caller": f"agent-{i % 3}", "sub": f"tool-{i % 2}", "kid": "root-1",
        "decision": "deny" if i % 2 else "allow",
        "reason": "ttl_exceeds_max" if i % 2 else "",
        "jti": f"jti-{i:04d}-aaaaaaaaaaaa", "request_digest": sha256_b64(b"req%d" % i),
        "detail": {"n": i, "note": "x"},
    }
    fields.update(extra)
    return log.append("deny" if i % 2 else "delegate", **fields)


def fill(db: Path, signer: Any, n: int = 20, every: int = 10) -> list[AuditRecord]:
    """A closed log of n records with a checkpoint every ``every`` (and at close)."""
    with AuditLog(db, signer=signer, checkpoint_every=every, clock=Clock()) as log:
        return [add(log, i) for i in range(1, n + 1)]


def expected_hash(record: AuditRecord) -> str:
    body = {name: getattr(record, name) for name in COLUMNS}
    body["detail"] = dict(record.detail)
    return sha256_b64(canonical_json(body))


# --- records and the chain -----------------------------------------------------------


def test_append_returns_the_hashed_record_and_reads_it_back(db: Path) -> None:
    with AuditLog(db, signer=None, clock=Clock()) as log:
        first = log.append("start", caller="daemon", decision="ok")
        second = add(log, 1)
        assert log.head == (2, second.hash)
    assert first.seq == 1
    assert first.prev == GENESIS
    assert first.time == 1_800_000_000_250  # milliseconds
    assert second.prev == first.hash
    for record in (first, second):
        assert record.hash == expected_hash(record)
    assert log.records() == [first, second]
    assert dict(log.records()[1].detail) == {"n": 1, "note": "x"}


def test_reads_filter_by_caller_subject_jti_and_event(db: Path) -> None:
    with AuditLog(db, signer=None) as log:
        records = [add(log, i) for i in range(1, 13)]
    assert [r.seq for r in log.records(caller="agent-1")] == [1, 4, 7, 10]
    assert [r.seq for r in log.records(sub="tool-0")] == [2, 4, 6, 8, 10, 12]
    assert log.records(jti=records[4].jti) == [records[4]]
    assert [r.seq for r in log.records(event="deny", since_seq=6, limit=2)] == [7, 9]
    assert log.records(caller="nobody") == []


@pytest.mark.parametrize(
    ("event", "fields"),
    [
        ("login", {}),
        ("delegate", {"caller": ""}),
        ("delegate", {"decision": ""}),
        ("delegate", {"reason": "\ud800"}),
        ("delegate", {"reason": "x" * 4097}),
        ("delegate", {"detail": {"amount": 1.5}}),
        ("delegate", {"detail": {"flag": True}}),
        ("delegate", {"detail": {"nested": {"a": 1}}}),
        ("delegate", {"detail": {"big": 2**53}}),
    ],
    ids=["unknown-event", "no-caller", "no-decision", "lone-surrogate", "too-long",
         "float-detail", "bool-detail", "nested-detail", "unsafe-int-detail"],
)
def test_malformed_events_are_refused(db: Path, event: str, fields: dict[str, Any]) -> None:
    with AuditLog(db, signer=None) as log:
        with pytest.raises(ValueError, match="audit"):
            log.append(event, **{"caller": "agent", "decision": "allow", **fields})
        assert log.head == (0, GENESIS)


def test_the_chain_continues_after_close_and_reopen(db: Path, signer: MemoryKeySigner,
                                                     bundle: TrustBundle) -> None:
    before = fill(db, signer, n=3)
    with AuditLog(db, signer=signer) as log:
        assert log.head == (3, before[-1].hash)
        after = add(log, 4)
    assert (after.seq, after.prev) == (4, before[-1].hash)
    report = verify_log(db, bundle)
    assert report.ok, report.message
    assert report.records_checked == 4


def test_a_new_file_gets_a_versioned_schema(db: Path) -> None:
    AuditLog(db, signer=None).close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() \
            == ("1",)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


@pytest.mark.parametrize(
    "setup",
    [
        "UPDATE meta SET value = '2' WHERE key = 'schema_version'",
        "DROP TABLE meta",
    ],
    ids=["newer-schema", "not-an-audit-log"],
)
def test_a_file_of_another_schema_is_refused(db: Path, setup: str) -> None:
    AuditLog(db, signer=None).close()
    conn = sqlite3.connect(db)
    conn.execute(setup)
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError):
        AuditLog(db, signer=None)


# --- group commit ----------------------------------------------------------------------


def test_group_commit_from_16_threads(db: Path, signer: MemoryKeySigner,
                                      bundle: TrustBundle) -> None:
    threads, per_thread = 16, 50
    got: dict[int, list[AuditRecord]] = {i: [] for i in range(threads)}
    errors: list[BaseException] = []
    start = threading.Barrier(threads, timeout=10)

    def work(i: int) -> None:
        try:
            start.wait()
            for j in range(per_thread):
                got[i].append(add(log, j, caller=f"agent-{i}", detail={"thread": i, "n": j}))
        except BaseException as exc:
            errors.append(exc)

    with AuditLog(db, signer=signer, checkpoint_every=100) as log:
        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=20)
        assert not any(worker.is_alive() for worker in workers)
        assert errors == []
        assert log.head[0] == threads * per_thread

    stored = {r.seq: r for r in log.records()}
    assert sorted(stored) == list(range(1, threads * per_thread + 1))
    for i, records in got.items():
        assert [dict(r.detail) for r in records] == [{"thread": i, "n": j}
                                                      for j in range(per_thread)]
        assert all(r.caller == f"agent-{i}" and stored[r.seq] == r for r in records)
    report = verify_log(db, bundle)
    assert report.ok, report.message
    assert report.records_checked == 800
    assert report.unsigned_tail == 0


# --- checkpoints -----------------------------------------------------------------------


def test_checkpoint_is_a_jws_over_the_head(db: Path, signer: MemoryKeySigner) -> None:
    records = fill(db, signer, n=3)
    [checkpoint] = read_checkpoints(db)  # the one written at close
    header_b64, payload_b64, signature_b64 = checkpoint.token.split(".")
    assert json.loads(b64url_decode(header_b64)) == {
        "alg": "EdDSA", "typ": CHECKPOINT_TYP, "kid": "audit-1",
    }
    assert json.loads(b64url_decode(payload_b64)) == {
        "v": 1, "seq": 3, "head": records[-1].hash, "time": int(NOW),
    }
    bundle = TrustBundle.from_jwks({"keys": [jwk(signer)]})
    key = bundle.signing_key("EdDSA", "audit-1", int(NOW), int(NOW), what="t", link=None)
    assert key.verify(f"{header_b64}.{payload_b64}".encode(), b64url_decode(signature_b64))


def test_checkpoints_by_count_and_at_close(db: Path, signer: MemoryKeySigner) -> None:
    with AuditLog(db, signer=signer, checkpoint_every=10, clock=Clock()) as log:
        for i in range(1, 26):
            add(log, i)
        # Appends are committed in order, so once 25 has returned, the writer has
        # finished whatever it did after committing 20.
        assert [c.seq for c in log.checkpoints()] == [10, 20]
    assert [(c.seq, c.head) for c in log.checkpoints()] == [
        (10, log.records(since_seq=9, limit=1)[0].hash),
        (20, log.records(since_seq=19, limit=1)[0].hash),
        (25, log.head[1]),
    ]


def test_checkpoints_by_time(db: Path, signer: MemoryKeySigner) -> None:
    clock = Clock()
    with AuditLog(db, signer=signer, checkpoint_every=1000, checkpoint_interval_s=5.0,
                  clock=clock) as log:
        add(log, 1)
        clock.now += 3
        add(log, 2)
        clock.now += 3  # 6 s since the log opened
        add(log, 3)
        add(log, 4)  # 0 s since that checkpoint: none
        assert [(c.seq, c.time) for c in log.checkpoints()] == [(3, int(NOW) + 6)]


def test_an_idle_log_signs_its_unsigned_records(db: Path, signer: MemoryKeySigner) -> None:
    with AuditLog(db, signer=signer, checkpoint_interval_s=0.1) as log:
        add(log, 1)
        assert wait_for(lambda: len(log.checkpoints()) == 1)
        time.sleep(0.4)  # nothing new: no further checkpoint
        assert [c.seq for c in log.checkpoints()] == [1]


def test_checkpoint_on_demand(db: Path, signer: MemoryKeySigner) -> None:
    with AuditLog(db, signer=signer, clock=Clock()) as log:
        assert log.checkpoint() is None  # empty log
        add(log, 1)
        checkpoint = log.checkpoint()
        assert checkpoint is not None
        assert (checkpoint.seq, checkpoint.head) == log.head
        assert log.checkpoint() is None  # the head is already signed
    assert len(log.checkpoints()) == 1  # and close adds none


def test_a_failing_checkpoint_signer_loses_no_record(db: Path, signer: MemoryKeySigner,
                                                     bundle: TrustBundle) -> None:
    flaky = FlakySigner(signer)
    flaky.failing = True
    with AuditLog(db, signer=flaky, checkpoint_every=5, clock=Clock()) as log:
        for i in range(1, 13):
            add(log, i)  # attempts after 5 and 10 fail
        assert isinstance(log.checkpoint_error, RuntimeError)
        assert log.checkpoints() == []
        with pytest.raises(Unavailable, match="HSM session lost"):
            log.checkpoint()  # an attempt at 12: the next is due 5 records later
        flaky.failing = False
        for i in range(13, 19):
            add(log, i)
        assert [c.seq for c in log.checkpoints()] == [17]
        assert log.checkpoint_error is None
    assert [r.seq for r in log.records()] == list(range(1, 19))
    report = verify_log(db, bundle)
    assert report.ok, report.message
    assert (report.signed_seq, report.unsigned_tail) == (18, 0)


def test_close_with_a_failing_signer_keeps_the_records(db: Path, signer: MemoryKeySigner,
                                                       bundle: TrustBundle) -> None:
    flaky = FlakySigner(signer)
    flaky.failing = True
    with AuditLog(db, signer=flaky) as log:
        for i in range(1, 4):
            add(log, i)
    assert log.checkpoint_error is not None
    report = verify_log(db, bundle)
    assert report.ok
    assert (report.records_checked, report.unsigned_tail) == (3, 3)


# --- store failures --------------------------------------------------------------------


def test_disk_full_is_unavailable_and_the_head_stays(db: Path, signer: MemoryKeySigner,
                                                     bundle: TrustBundle) -> None:
    with AuditLog(db, signer=signer) as log:
        add(log, 1)
        head = log.head
        conn = log._conn  # the writer's connection: SQLite's own page limit as a full disk
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(Unavailable, match="full"):
            add(log, 2, reason="r" * 4000)
        assert log.head == head
        assert [r.seq for r in log.records()] == [1]
        conn.execute("PRAGMA max_page_count = 1073741823")
        after = add(log, 2, reason="r" * 4000)
    assert (after.seq, after.prev) == (2, head[1])
    assert verify_log(db, bundle).ok


class FailingCommit(sqlite3.Connection):
    """A connection whose COMMIT fails as an fsync error would."""

    failing = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and FailingCommit.failing:
            raise sqlite3.OperationalError("disk I/O error")
        return super().execute(sql, *args)


def test_a_failed_commit_is_unavailable_and_the_head_stays(
    db: Path, bundle: TrustBundle, signer: MemoryKeySigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect",
                        lambda *a, **k: connect(*a, **k, factory=FailingCommit))
    monkeypatch.setattr(FailingCommit, "failing", False)
    with AuditLog(db, signer=signer) as log:
        first = add(log, 1)
        FailingCommit.failing = True
        with pytest.raises(Unavailable, match="disk I/O error"):
            add(log, 2)
        assert log.head == (1, first.hash)
        assert [r.seq for r in log.records()] == [1]
        FailingCommit.failing = False
        second = add(log, 2)
    assert (second.seq, second.prev) == (2, first.hash)
    assert verify_log(db, bundle).ok


def test_a_lost_connection_is_unavailable_and_the_head_stays(db: Path,
                                                             signer: MemoryKeySigner) -> None:
    log = AuditLog(db, signer=signer)
    add(log, 1)
    head = log.head
    log._conn.close()
    with pytest.raises(Unavailable, match="closed database"):
        add(log, 2)
    assert log.head == head
    log.close()  # does not raise: the final checkpoint's failure is logged
    assert log.checkpoint_error is not None
    assert [r.seq for r in log.records()] == [1]


def test_append_after_close_is_unavailable(db: Path) -> None:
    log = AuditLog(db, signer=None)
    log.close()
    log.close()
    with pytest.raises(Unavailable, match="closed"):
        add(log, 1)


def test_the_chain_continues_from_the_head_on_disk(db: Path, signer: MemoryKeySigner,
                                                   bundle: TrustBundle) -> None:
    """A commit reported failed may still have reached the disk (an fsync error):
    the next batch chains onto what is there, not onto the in-memory head."""
    with AuditLog(db, signer=signer) as log:
        first = add(log, 1)
        ghost = AuditRecord(**{**first.body(), "seq": 2, "prev": first.hash}, hash="")
        ghost_hash = expected_hash(ghost)
        other = sqlite3.connect(db)
        other.execute(INSERT_ROW, [
            *(getattr(ghost, c) for c in COLUMNS[:-2]),
            canonical_json(dict(ghost.detail)).decode(), first.hash, ghost_hash,
        ])
        other.commit()
        other.close()
        third = add(log, 3)
    assert (third.seq, third.prev) == (3, ghost_hash)
    assert verify_log(db, bundle).ok


# --- verification against tampering ------------------------------------------------------


def rehash(conn: sqlite3.Connection, seq: int) -> str:
    """Recompute one stored record's hash as an attacker would."""
    row = conn.execute(SELECT_BODY, (seq,)).fetchone()
    body = dict(zip(COLUMNS, row, strict=True))
    body["detail"] = json.loads(body["detail"])
    digest = sha256_b64(canonical_json(body))
    conn.execute("UPDATE records SET hash = ? WHERE seq = ?", (digest, seq))
    return digest


def edit_and_rehash(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE records SET decision = 'allow' WHERE seq = 5")
    rehash(conn, 5)


def rewrite_from_5(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE records SET decision = 'allow' WHERE seq = 5")
    digest = rehash(conn, 5)
    for seq in range(6, 21):
        conn.execute("UPDATE records SET prev = ? WHERE seq = ?", (digest, seq))
        digest = rehash(conn, seq)


def swap_4_and_7(conn: sqlite3.Connection) -> None:
    """Every column but seq of records 4 and 7 changes places."""
    rows = {seq: conn.execute(SELECT_ROW, (seq,)).fetchone()[1:] for seq in (4, 7)}
    for seq, source in ((4, 7), (7, 4)):
        conn.execute(UPDATE_ROW, (*rows[source], seq))


def replace_checkpoint(seq: int, sign: Callable[[bytes], bytes], kid: str = "audit-1",
                       head: str | None = None) -> Callable[[sqlite3.Connection], object]:
    def tamper(conn: sqlite3.Connection) -> None:
        token = conn.execute("SELECT token FROM checkpoints WHERE seq = ?", (seq,)).fetchone()[0]
        payload = json.loads(b64url_decode(token.split(".")[1]))
        if head is not None:
            payload["head"] = head
        forged = encode_jws({"alg": "EdDSA", "typ": CHECKPOINT_TYP, "kid": kid}, payload, sign)
        conn.execute("UPDATE checkpoints SET token = ? WHERE seq = ?", (forged, seq))
    return tamper


def flip_signature(conn: sqlite3.Connection) -> None:
    token = conn.execute("SELECT token FROM checkpoints WHERE seq = 10").fetchone()[0]
    head, payload, signature = token.split(".")
    raw = bytearray(b64url_decode(signature))
    raw[5] ^= 1
    conn.execute("UPDATE checkpoints SET token = ? WHERE seq = 10",
                 (f"{head}.{payload}.{b64url_encode(bytes(raw))}",))


STRANGER = MemoryKeySigner("audit-1")  # same kid, another key
OUTSIDER = MemoryKeySigner("audit-9")  # a kid the bundle does not hold

TAMPERING: list[tuple[str, Callable[[sqlite3.Connection], object], str, int]] = [
    ("edit-field", lambda c: c.execute("UPDATE records SET decision='allow' WHERE seq=5"),
     "edited", 5),
    ("edit-detail", lambda c: c.execute("""UPDATE records SET detail='{"n":99,"note":"x"}'
                                           WHERE seq=7"""), "edited", 7),
    ("edit-time", lambda c: c.execute("UPDATE records SET time=time+1 WHERE seq=12"),
     "edited", 12),
    ("edit-type", lambda c: c.execute("UPDATE records SET time='1' WHERE seq=3"), "edited", 3),
    ("edit-and-rehash", edit_and_rehash, "edited", 5),
    ("rewrite-chain", rewrite_from_5, "rewritten", 1),
    ("delete", lambda c: c.execute("DELETE FROM records WHERE seq=5"), "missing", 5),
    ("delete-first", lambda c: c.execute("DELETE FROM records WHERE seq=1"), "missing", 1),
    ("reorder", swap_4_and_7, "reordered", 4),
    ("truncate", lambda c: c.execute("DELETE FROM records WHERE seq>15"), "truncated", 16),
    ("forged-signature", replace_checkpoint(10, STRANGER.sign), "bad_checkpoint_signature", 10),
    ("flipped-signature", flip_signature, "bad_checkpoint_signature", 10),
    ("moved-head", replace_checkpoint(10, STRANGER.sign, head=GENESIS),
     "bad_checkpoint_signature", 10),
    ("unknown-key", replace_checkpoint(20, OUTSIDER.sign, kid="audit-9"), "unknown_key", 20),
    ("malformed-checkpoint", lambda c: c.execute("UPDATE checkpoints SET token='a.b.c' "
                                                 "WHERE seq=10"), "malformed_checkpoint", 10),
]


def test_an_untampered_log_verifies(db: Path, signer: MemoryKeySigner,
                                    bundle: TrustBundle) -> None:
    fill(db, signer)
    report = verify_log(db, bundle)
    assert report.ok, report.message
    assert (report.records_checked, report.checkpoints_checked) == (20, 2)
    assert (report.first_bad_seq, report.problem, report.unsigned_tail) == (None, None, 0)


@pytest.mark.parametrize(("tamper", "found"), [(row[1], row[2:]) for row in TAMPERING],
                         ids=[row[0] for row in TAMPERING])
def test_tampering_is_detected(db: Path, signer: MemoryKeySigner, bundle: TrustBundle,
                               tamper: Callable[[sqlite3.Connection], object],
                               found: tuple[str, int]) -> None:
    fill(db, signer)
    conn = sqlite3.connect(db)
    tamper(conn)
    conn.commit()
    conn.close()
    report = verify_log(db, bundle)
    assert not report.ok
    assert (report.problem, report.first_bad_seq) == found, report.issues


def test_a_checkpoint_by_a_key_outside_the_bundle(db: Path, bundle: TrustBundle) -> None:
    fill(db, MemoryKeySigner("audit-2"))
    report = verify_log(db, bundle)
    assert (report.ok, report.problem, report.first_bad_seq) == (False, "unknown_key", 10)
    assert (report.signed_seq, report.unsigned_tail) == (0, 20)


def test_a_checkpoint_outside_its_keys_window(db: Path, signer: MemoryKeySigner) -> None:
    fill(db, signer)
    retired = TrustBundle.from_jwks({"keys": [jwk(signer, exp=int(NOW) - 1)]})
    report = verify_log(db, retired)
    assert (report.problem, report.first_bad_seq) == ("unknown_key", 10)


def test_the_unsigned_tail_is_reported(db: Path, signer: MemoryKeySigner,
                                       bundle: TrustBundle) -> None:
    fill(db, signer, n=10)
    with AuditLog(db, signer=None) as log:  # a run without a checkpoint key
        for i in range(11, 16):
            add(log, i)
    report = verify_log(db, bundle)
    assert report.ok, report.message
    assert (report.last_seq, report.signed_seq, report.unsigned_tail) == (15, 10, 5)
    assert "5 records after the last checkpoint" in report.message


def test_an_unreadable_log_raises(tmp_path: Path, bundle: TrustBundle) -> None:
    with pytest.raises(Unavailable):
        verify_log(tmp_path / "missing.db", bundle)
    assert not (tmp_path / "missing.db").exists()
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(Unavailable):
        verify_log(tmp_path / "junk.db", bundle)
