"""A one-shot signal between two threads, cheaper than threading.Event."""

from __future__ import annotations

import contextlib
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


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


class Answer(Generic[T]):
    """A value handed once from one thread to another that waits for it:
    ``set`` it (a callable, so it serves as a reply callback), ``wait``,
    read ``value`` (``default`` until set)."""

    __slots__ = ("_done", "value")

    def __init__(self, default: T) -> None:
        self._done = OneShot()
        self.value = default

    def __call__(self, value: T) -> None:
        self.value = value
        self._done.set()

    def wait(self, timeout: float) -> bool:
        """True once set; False if ``timeout`` seconds pass first."""
        return self._done.wait(timeout)
