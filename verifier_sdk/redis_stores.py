"""Replay and use stores on Redis, shared by a fleet of verifiers (spec §5, §8
steps 11–12, §9).

Install with the ``mandate[redis]`` extra and import this module by name:
``verifier_sdk`` itself never imports ``redis``. Each check-and-record is one
atomic server-side operation: ``SET key 1 NX PX ttl`` for a PoP, one Lua
script for a set of use counters. Relative expiries (``PX``, ``PEXPIRE``) are
measured on the server's clock, so the verifiers' clocks need not agree.

When Redis cannot answer (refused, timed out, any Redis error) a store raises
``StoreError`` and the verifier refuses the request (fail closed). The
``fail_open`` option accepts instead, with a warning logged for every such
decision; it lets a PoP be replayed and a ``use`` limit be overrun while Redis
is away, so it is unsafe for single-use credentials.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
from collections.abc import Collection, Mapping
from typing import Final

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._stores import StoreError

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_TIMEOUT_S",
    "RedisReplayStore",
    "RedisUseStore",
    "connect",
]

DEFAULT_PREFIX: Final = "mandate:"
# Loopback or a LAN answers in well under a millisecond; half a second is far
# beyond a healthy reply and short enough that a dead Redis cannot hold a
# request for long.
DEFAULT_TIMEOUT_S: Final = 0.5
_MAX_PREFIX_CHARS: Final = 256

log = logging.getLogger(__name__)

# KEYS: the counters. ARGV[1]: ttl in ms; ARGV[1 + i]: the limit of KEYS[i].
# First pass reads only; if any counter is at its limit the script returns
# their 1-based indexes and writes nothing (a refused consume consumes
# nothing). Otherwise it increments every counter and makes each one live at
# least ttl ms from now: a longer ttl extends a counter, a shorter one never
# shortens it (PTTL is -1 for a counter INCR has just created). Redis does not
# undo a script's writes when a later command in it fails; only a refusal for
# lack of memory can come between two INCRs, and it leaves a counter one too
# high: a use refused later, never one let through.
_CONSUME_LUA: Final = """
local at_limit = {}
for i, key in ipairs(KEYS) do
  local count = tonumber(redis.call('GET', key) or '0')
  if count >= tonumber(ARGV[i + 1]) then
    at_limit[#at_limit + 1] = i
  end
end
if #at_limit > 0 then
  return at_limit
end
local ttl = tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
  redis.call('INCR', key)
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end
return at_limit
"""

# What "Redis cannot answer" looks like through redis-py: its own errors
# (connection, timeout, error replies such as OOM or READONLY) and raw socket
# errors that escape a connection being torn down.
_UNAVAILABLE: Final = (redis.RedisError, OSError)


def connect(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``) with short
    socket timeouts and no retries.

    A call that fails takes at most about ``timeout_s`` to connect and as much
    to read, then the store reports it. No retry: a repeated count after a
    lost reply would spend a use twice. (The client's pool still replaces a
    connection it finds closed, e.g. after a Redis restart, before using it.)
    """
    if not (isinstance(timeout_s, int | float) and 0 < timeout_s < math.inf):
        raise ValueError("timeout_s must be a positive number of seconds")
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def _failure(exc: Exception) -> str:
    return f"redis failed: {type(exc).__name__}: {exc}"


def _milliseconds(ttl: float) -> int:
    """``ttl`` seconds as whole milliseconds, rounded up (never shorter), ≥ 1."""
    if not (isinstance(ttl, int | float) and 0 < ttl < math.inf):
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


class _RedisStore:
    """What both stores share: the client, key naming, the outage policy."""

    _kind: str  # the segment after the prefix: "rp" or "u"

    def __init__(self, redis_client: redis.Redis | str, *, prefix: str, fail_open: bool) -> None:
        if isinstance(redis_client, str):
            redis_client = connect(redis_client)
        elif not isinstance(redis_client, redis.Redis):
            raise TypeError("pass a redis.Redis client or a redis:// URL")
        if not isinstance(prefix, str) or len(prefix) > _MAX_PREFIX_CHARS:
            raise ValueError(f"prefix must be a string of at most {_MAX_PREFIX_CHARS} characters")
        if type(fail_open) is not bool:
            raise TypeError("fail_open must be True or False")
        self._redis = redis_client
        self._prefix = prefix
        self._fail_open = fail_open

    @property
    def fail_open(self) -> bool:
        return self._fail_open

    def redis_key(self, key: str) -> str:
        """The Redis key for a store key: ``prefix + kind + ":" +
        base64url(SHA-256(key))``, 43 characters after the kind whatever the
        store key, and no PoP or chain material in clear."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        return f"{self._prefix}{self._kind}:{base64.urlsafe_b64encode(digest)[:43].decode()}"

    def check(self) -> None:
        """Raise ``StoreError`` unless Redis answers and never evicts keys.

        A server that may evict keys under memory pressure (any
        ``maxmemory-policy`` but ``noeviction``; every key here has an expiry,
        so ``volatile-*`` evicts them too) can forget a live replay record or
        use counter. Meant for start-up and readiness probes; ignores
        ``fail_open``.
        """
        try:
            info = self._redis.info("memory")
        except _UNAVAILABLE as exc:
            raise StoreError(_failure(exc)) from exc
        policy = info.get("maxmemory_policy") if isinstance(info, dict) else None
        if isinstance(policy, bytes):
            policy = policy.decode("ascii", "replace")
        if policy != "noeviction":
            raise StoreError(
                f"redis maxmemory-policy is {policy!r}: it may evict live replay records "
                "and use counters; set it to 'noeviction'"
            )

    def _unavailable(self, exc: Exception, accepting: str) -> None:
        """Fail closed (raise) unless ``fail_open``; then warn and return."""
        if not self._fail_open:
            raise StoreError(_failure(exc)) from exc
        log.warning("%s (%s store); fail_open is set: %s", _failure(exc), self._kind, accepting)


class RedisReplayStore(_RedisStore):
    """``ReplayStore`` on Redis: one ``SET key 1 NX PX ttl`` per PoP.

    ``redis_client`` is a ``redis.Redis`` (thread-safe; it may be shared with
    a ``RedisUseStore``) or a URL for ``connect``. With ``fail_open`` a
    Redis outage accepts PoPs unrecorded (see the module docstring).
    """

    _kind = "rp"

    def __init__(self, redis_client: redis.Redis | str, *, prefix: str = DEFAULT_PREFIX,
                 fail_open: bool = False) -> None:
        super().__init__(redis_client, prefix=prefix, fail_open=fail_open)

    def add(self, key: str, ttl: float) -> bool:
        """Record ``key`` for ``ttl`` seconds (rounded up to a millisecond); True
        if it was new. A duplicate neither extends nor shortens the record."""
        name, ms = self.redis_key(key), _milliseconds(ttl)
        try:
            reply = self._redis.set(name, b"1", nx=True, px=ms)
        except _UNAVAILABLE as exc:
            self._unavailable(exc, "accepting a PoP without a replay record")
            return True
        if reply is None:
            return False
        if reply is True:
            return True
        raise StoreError(f"unexpected reply to SET NX from redis: {reply!r}")


class RedisUseStore(_RedisStore):
    """``UseStore`` on Redis: one Lua script checks and increments every
    counter of a verification, all or nothing.

    ``redis_client`` is a ``redis.Redis`` (it may be shared with a
    ``RedisReplayStore``) or a URL for ``connect``. With ``fail_open`` a Redis
    outage accepts uses uncounted (see the module docstring).
    """

    _kind = "u"

    def __init__(self, redis_client: redis.Redis | str, *, prefix: str = DEFAULT_PREFIX,
                 fail_open: bool = False) -> None:
        super().__init__(redis_client, prefix=prefix, fail_open=fail_open)
        # EVALSHA, loading the script again if the server lost it (a restart).
        self._consume = self._redis.register_script(_CONSUME_LUA)

    def consume(self, limits: Mapping[str, int], ttl: float) -> Collection[str]:
        """All or nothing: +1 on every key if all are below their limit (and
        return nothing), else change nothing and return the keys at their
        limit. Counters live at least ``ttl`` seconds from now."""
        keys = list(limits)
        if not keys:
            return ()
        ms = _milliseconds(ttl)
        args: list[int] = [ms]
        for key in keys:
            limit = limits[key]
            if type(limit) is not int:
                raise TypeError(f"the limit of {key!r} is not an int")
            args.append(limit)
        try:
            reply = self._consume(keys=[self.redis_key(k) for k in keys], args=args)
        except _UNAVAILABLE as exc:
            self._unavailable(exc, "accepting a use without counting it")
            return ()
        if not isinstance(reply, list) or not all(
            type(i) is int and 1 <= i <= len(keys) for i in reply
        ):
            raise StoreError(f"unexpected reply to the use script from redis: {reply!r}")
        return [keys[i - 1] for i in reply]
