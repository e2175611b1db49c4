"""SQLite WAL checkpoints on a thread of their own, off every commit's path.
(SQLite's checkpoints, which fold the log into the database file; not the
audit log's signed checkpoints.)

In WAL mode a commit appends pages to the write-ahead log; a checkpoint later
copies them into the database file and syncs it. By default the connection
that commits when the log passes 1,000 pages runs that checkpoint itself,
inside its COMMIT: under load the state store's commits stalled for 4–6 ms
about three times a second, each stall holding up a whole batch of Delegate
calls (docs/performance.md, "Checkpoints off the commit path"). Here a
thread with a connection of its own runs a PASSIVE checkpoint every
``interval_s``: it copies what it can without waiting for, or blocking, the
writer or any reader. The writer keeps a larger automatic checkpoint as a
backstop: it bounds the log, and by the time it runs the thread has copied
nearly everything, so it is short.

Durability is unchanged: a checkpoint syncs the log before it copies and the
database file after (``synchronous=FULL`` on this connection too), and what
a commit made durable stays in the log until then.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading

log = logging.getLogger("mandate.signer")

#: The writer's own automatic checkpoint, in pages (about 8 MB of log with
#: 4 KiB pages). Under steady load the thread copies most of the log, but it
#: only resets the log when it copies all of it with no commit in between,
#: which rarely happens; the writer's checkpoint, which does, then finds
#: little left to copy.
BACKSTOP_PAGES = 2_000
INTERVAL_S = 0.05


def use_backstop(conn: sqlite3.Connection) -> None:
    """Leave checkpoints to a ``WalCheckpointer`` except as a backstop."""
    conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")


class WalCheckpointer:
    """Checkpoints the WAL-mode database at ``path`` every ``interval_s``
    until ``close``. sqlite3.Error if it cannot open the database."""

    def __init__(self, path: str | os.PathLike[str], *, interval_s: float = INTERVAL_S) -> None:
        self._path = os.fspath(path)
        self._interval_s = interval_s
        self._conn = sqlite3.connect(self._path, check_same_thread=False,
                                     isolation_level=None)
        self._conn.execute("PRAGMA synchronous=FULL")
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                # The writer's backstop still checkpoints; say so once per spell.
                if not self._failing:
                    log.warning("checkpointing %s failed: %s (the next commits will "
                                "checkpoint it instead)", self._path, exc)
                self._failing = True
                continue
            if self._failing:
                log.info("checkpointing %s works again", self._path)
            self._failing = False

    def close(self) -> None:
        """Stop the thread and close its connection. Idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._conn.close()
