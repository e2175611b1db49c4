"""A one-shot signal between two threads, cheaper than threading.Event."""

from __future__ import annotations

import contextlib
import threading


class OneShot:
    """Set once by one thread, awaited by another: the audit writer's commit
    answer, the issuer process's reply. A bare lock, held from the start and
    released by ``set``, does it with one C call on each side, where an
    ``Event`` builds a Condition and takes its lock on both. Awaiting it
    more than once is not supported (each user waits once)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        with contextlib.suppress(RuntimeError):  # set already
            self._lock.release()

    def wait(self, timeout: float) -> bool:
        """True once set; False if ``timeout`` seconds pass first."""
        return self._lock.acquire(timeout=timeout)
