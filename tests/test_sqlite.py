"""WAL checkpoints on a thread of their own (signer/_sqlite.py): commits no
longer copy the log into the database file, the thread does, and the stores
stop it when they close."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for

from signer._audit import AuditLog
from signer._sqlite import WalCheckpointer, use_backstop
from signer._state import StateStore

ROW = "x" * 3000  # about one page per row


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A WAL-mode database with an empty table already in its main file."""
    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (v TEXT)")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    yield conn
    conn.close()


def write_rows(conn: sqlite3.Connection, n: int, per_commit: int = 50) -> None:
    for _ in range(n // per_commit):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO t VALUES (?)", [(ROW,)] * per_commit)
        conn.execute("COMMIT")


def rows_in_main_file(db: Path, scratch: Path) -> int:
    """Rows a reader finds in the database file alone, without its log; -1
    if the copy caught a checkpoint halfway."""
    copy = scratch / "copy.db"
    copy.unlink(missing_ok=True)
    shutil.copyfile(db, copy)
    conn = sqlite3.connect(copy)
    try:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])
    except sqlite3.DatabaseError:
        return -1
    finally:
        conn.close()


def test_commits_leave_checkpoints_to_the_thread(writer: sqlite3.Connection,
                                                  tmp_path: Path) -> None:
    # Without the backstop (2,000 pages), SQLite's default (1,000) would have
    # had some COMMIT copy most of these 1,500 pages into the file.
    use_backstop(writer)
    idle = WalCheckpointer(tmp_path / "t.db", interval_s=3600)
    try:
        write_rows(writer, 1500)
        assert rows_in_main_file(tmp_path / "t.db", tmp_path) == 0
    finally:
        idle.close()


def test_the_thread_copies_the_log_into_the_file(writer: sqlite3.Connection,
                                                 tmp_path: Path) -> None:
    use_backstop(writer)
    checkpointer = WalCheckpointer(tmp_path / "t.db", interval_s=0.05)
    try:
        write_rows(writer, 500)
        assert wait_for(lambda: rows_in_main_file(tmp_path / "t.db", tmp_path) == 500)
        # It does not stand in the writer's way: more commits go through meanwhile.
        write_rows(writer, 500)
        assert wait_for(lambda: rows_in_main_file(tmp_path / "t.db", tmp_path) == 1000)
    finally:
        checkpointer.close()
        checkpointer.close()  # idempotent


class FailingThenWorking:
    """Stands in for the checkpointer's connection: fails ``failures`` times
    (as a full disk would), then passes calls to the real one."""

    def __init__(self, real: sqlite3.Connection, failures: int) -> None:
        self.real = real
        self.failures = failures

    def execute(self, sql: str) -> sqlite3.Cursor:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql)

    def close(self) -> None:
        self.real.close()


def test_a_failing_checkpoint_is_logged_once_then_retried(
    writer: sqlite3.Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    use_backstop(writer)
    checkpointer = WalCheckpointer(tmp_path / "t.db", interval_s=0.02)
    try:
        with caplog.at_level(logging.INFO, logger="mandate.signer"):
            fake = FailingThenWorking(checkpointer._conn, failures=5)
            checkpointer._conn = fake  # type: ignore[assignment]
            write_rows(writer, 100)
            assert wait_for(lambda: rows_in_main_file(tmp_path / "t.db", tmp_path) == 100)
        assert fake.failures == 0
        messages = [(r.levelno, r.getMessage()) for r in caplog.records]
        assert [level for level, _ in messages] == [logging.WARNING, logging.INFO]
        assert "database or disk is full" in messages[0][1]
        assert "works again" in messages[1][1]
    finally:
        checkpointer.close()


def checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "wal-checkpoint"]


def test_stores_stop_their_checkpointer_and_leave_no_log(tmp_path: Path) -> None:
    before = len(checkpoint_threads())
    state = StateStore(tmp_path / "state.db")
    audit = AuditLog(tmp_path / "audit.db", signer=None)
    assert len(checkpoint_threads()) == before + 2
    audit.append("start", caller="-", decision="ok")
    audit.close()
    state.close()
    assert len(checkpoint_threads()) == before
    # The last connection to close folds the log into the file and removes it.
    assert not (tmp_path / "state.db-wal").exists()
    assert not (tmp_path / "audit.db-wal").exists()
