"""Replay and use stores (spec §5, §8 step 12, §9).

The protocols are what a fleet backend (e.g. Redis ``SET NX PX``) implements;
the in-memory defaults are thread-safe, expire entries, and hold at most
``max_entries`` keys. A full store refuses to record rather than forget an
entry that is still live, so verification fails closed instead of letting
a replay through.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Final, Generic, Protocol, TypeVar, runtime_checkable

DEFAULT_MAX_ENTRIES: Final = 1_000_000
_PURGE_PER_CALL: Final = 32
E = TypeVar("E")


class StoreError(RuntimeError):
    """A store cannot record (full, unreachable); verification fails closed."""


@runtime_checkable
class ReplayStore(Protocol):
    def add(self, key: str, ttl: float) -> bool:
        """Atomically record ``key`` for ``ttl`` seconds; True if it was new."""
        ...


@runtime_checkable
class UseStore(Protocol):
    def consume(self, limits: Mapping[str, int], ttl: float) -> Collection[str]:
        """All or nothing: if every key is below its limit, add one to each and
        return an empty collection; else change nothing and return the keys at
        their limit. Counters live ``ttl`` seconds from now (or longer)."""
        ...


def _digest(key: str) -> bytes:
    # 16-byte digests instead of ~70-character keys: about half the memory
    # per entry, and 128 bits leaves collisions out of reach.
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class _ExpiringMap(Generic[E]):
    """digest → entry with an expiry time; insertion order ≈ expiry order."""

    def __init__(self, max_entries: int, clock: Callable[[], float],
                 expires: Callable[[E], float]) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.clock = clock
        self.expires = expires
        self.entries: dict[bytes, E] = {}
        self.lock = threading.Lock()
        # No entry expires before this (a lower bound): while it is in the future,
        # a full store needs no sweep to know it is still full.
        self.earliest = math.inf

    def put(self, key: bytes, entry: E) -> None:
        self.entries[key] = entry
        self.earliest = min(self.earliest, self.expires(entry))

    def purge(self, now: float) -> None:
        """Drop a few expired entries from the front (amortised, bounded work)."""
        stale: list[bytes] = []
        for key, entry in self.entries.items():
            if self.expires(entry) > now or len(stale) >= _PURGE_PER_CALL:
                break
            stale.append(key)
        for key in stale:
            del self.entries[key]

    def make_room(self, now: float, needed: int) -> None:
        if len(self.entries) + needed <= self.max_entries:
            return
        if now >= self.earliest:  # something may have expired: sweep (O(n), then rare)
            self.entries = {k: e for k, e in self.entries.items() if self.expires(e) > now}
            self.earliest = min(map(self.expires, self.entries.values()), default=math.inf)
        if len(self.entries) + needed > self.max_entries:
            raise StoreError(
                f"store is full: {len(self.entries)} live entries (max {self.max_entries})"
            )

    def live(self, key: bytes, now: float) -> E | None:
        entry = self.entries.get(key)
        if entry is not None and self.expires(entry) <= now:
            del self.entries[key]
            return None
        return entry

    def __len__(self) -> int:
        return len(self.entries)


def _identity(expiry: float) -> float:
    return expiry


def _second(entry: tuple[int, float]) -> float:
    return entry[1]


class MemoryReplayStore:
    """In-process replay store: one verifier process, or tests."""

    def __init__(self, *, max_entries: int = DEFAULT_MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._map: _ExpiringMap[float] = _ExpiringMap(max_entries, clock, _identity)

    def add(self, key: str, ttl: float) -> bool:
        digest = _digest(key)
        m = self._map
        with m.lock:
            now = m.clock()
            m.purge(now)
            if m.live(digest, now) is not None:
                return False
            m.make_room(now, 1)
            m.put(digest, now + ttl)
            return True

    def __len__(self) -> int:
        return len(self._map)


class MemoryUseStore:
    """In-process use counters: one verifier process, or tests."""

    def __init__(self, *, max_entries: int = DEFAULT_MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._map: _ExpiringMap[tuple[int, float]] = _ExpiringMap(max_entries, clock, _second)

    def consume(self, limits: Mapping[str, int], ttl: float) -> Collection[str]:
        digests = {key: _digest(key) for key in limits}
        m = self._map
        with m.lock:
            now = m.clock()
            m.purge(now)
            counts = {key: m.live(d, now) for key, d in digests.items()}
            at_limit = [
                key for key, entry in counts.items()
                if (0 if entry is None else entry[0]) >= limits[key]
            ]
            if at_limit:
                return at_limit
            m.make_room(now, sum(entry is None for entry in counts.values()))
            expires = now + ttl
            for key, entry in counts.items():
                count, old_expires = entry if entry is not None else (0, expires)
                m.put(digests[key], (count + 1, max(old_expires, expires)))
            return ()

    def __len__(self) -> int:
        return len(self._map)
