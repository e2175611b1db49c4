"""Replay and use stores on Redis (spec §5, §8 steps 11–12, §9), against a real
``redis-server`` on loopback: the store contract, expiry, key naming, a fleet
of verifiers racing on one Redis, and what happens while Redis is away."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
import redis
from helpers import REFUND, World, link_hash
from redis_server import RedisServer, private_redis_server, redis_server
from test_concurrency import outcome, run_at_once

from verifier_sdk import (
    MemoryReplayStore,
    ReplayStore,
    StoreError,
    UseStore,
    VerificationError,
    Verifier,
    decode_unverified,
)
from verifier_sdk.redis_stores import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT_S,
    RedisReplayStore,
    RedisUseStore,
    _milliseconds,
    connect,
)

__all__ = ["private_redis_server", "redis_server"]  # fixtures, used by name

# The race tests are about atomicity, not timeouts: a generous socket timeout
# keeps a descheduled thread on a busy machine from reading as an outage.
RACE_TIMEOUT_S = 5.0
WAIT_S = 10.0  # safety deadline for anything that waits on the server


@pytest.fixture
def db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """The module's server, emptied for this test; a client for direct checks."""
    client = redis_server.client()
    client.flushall()
    try:
        yield client
    finally:
        client.close()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def expected_name(prefix: str, kind: str, key: str) -> str:
    """The documented key derivation, written out independently of the store."""
    return prefix + kind + ":" + b64(hashlib.sha256(key.encode()).digest())


def wait_until_gone(client: redis.Redis, name: str) -> None:
    """Wait (bounded) for the server to expire ``name``."""
    deadline = time.monotonic() + WAIT_S
    while client.exists(name):
        assert time.monotonic() < deadline, f"{name} did not expire"
        time.sleep(0.01)


def text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def count(client: redis.Redis, store: RedisUseStore, key: str) -> int:
    value = client.get(store.redis_key(key))
    return 0 if value is None else int(value)


# --- the replay store -------------------------------------------------------------


def test_stores_satisfy_the_protocols(redis_server: RedisServer) -> None:
    assert isinstance(RedisReplayStore(redis_server.url), ReplayStore)
    assert isinstance(RedisUseStore(redis_server.url), UseStore)
    assert not isinstance(RedisReplayStore(redis_server.url), UseStore)
    assert not isinstance(RedisUseStore(redis_server.url), ReplayStore)


def test_replay_add_new_then_duplicate(db: redis.Redis, redis_server: RedisServer) -> None:
    store = RedisReplayStore(redis_server.url)
    assert store.add("rp|x|1", 10) is True
    assert store.add("rp|x|1", 10) is False
    assert store.add("rp|x|2", 10) is True
    assert store.add("rp|y|1", 10) is True
    assert db.dbsize() == 3


def test_replay_record_lives_for_its_ttl_and_a_duplicate_does_not_extend_it(
    db: redis.Redis, redis_server: RedisServer,
) -> None:
    store = RedisReplayStore(redis_server.url)
    name = store.redis_key("rp|x|1")
    assert store.add("rp|x|1", 150)
    first = db.pttl(name)
    assert 140_000 < first <= 150_000
    assert not store.add("rp|x|1", 1000)
    assert db.pttl(name) <= first  # not extended
    assert db.get(name) == b"1"


@pytest.mark.parametrize(("ttl", "ms"), [(0.0001, 1), (1.0001, 1001), (2, 2000), (2.5, 2500),
                                         (150, 150_000)],
                         ids=["sub-ms", "rounded-up", "int", "float", "replay-default"])
def test_ttl_is_rounded_up_to_whole_milliseconds(ttl: float, ms: int) -> None:
    """Never shorter than asked: a record must outlive the PoP it guards."""
    assert _milliseconds(ttl) == ms


def test_a_sub_millisecond_ttl_is_recorded(db: redis.Redis, redis_server: RedisServer) -> None:
    """PX 0 would be an error reply: the store asks for 1 ms instead."""
    assert RedisReplayStore(redis_server.url).add("k", 0.0001)
    assert not RedisUseStore(redis_server.url).consume({"k": 5}, 0.0001)


def test_replay_record_expires_on_the_server_then_can_be_added_again(
    db: redis.Redis, redis_server: RedisServer,
) -> None:
    store = RedisReplayStore(redis_server.url)
    assert store.add("rp|x|1", 0.05)
    wait_until_gone(db, store.redis_key("rp|x|1"))
    assert store.add("rp|x|1", 150) is True
    assert store.add("rp|x|1", 150) is False


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), "10"],
                         ids=["zero", "negative", "nan", "inf", "str"])
def test_a_ttl_that_is_not_a_positive_number_is_refused(
    db: redis.Redis, redis_server: RedisServer, ttl: Any,
) -> None:
    with pytest.raises(ValueError, match="ttl"):
        RedisReplayStore(redis_server.url).add("k", ttl)
    with pytest.raises(ValueError, match="ttl"):
        RedisUseStore(redis_server.url).consume({"k": 1}, ttl)
    assert db.dbsize() == 0


# --- the use store --------------------------------------------------------------------


def test_consume_counts_up_to_the_limit_then_returns_the_key(
    db: redis.Redis, redis_server: RedisServer,
) -> None:
    store = RedisUseStore(redis_server.url)
    assert not store.consume({"k": 2}, 10)
    assert not store.consume({"k": 2}, 10)
    assert list(store.consume({"k": 2}, 10)) == ["k"]
    assert list(store.consume({"k": 2}, 10)) == ["k"]  # at the limit: changes nothing
    assert count(db, store, "k") == 2


def test_consume_is_all_or_nothing(db: redis.Redis, redis_server: RedisServer) -> None:
    store = RedisUseStore(redis_server.url)
    assert not store.consume({"a": 1, "b": 3}, 10)
    assert list(store.consume({"a": 1, "b": 3}, 10)) == ["a"]
    assert (count(db, store, "a"), count(db, store, "b")) == (1, 1)  # b untouched


def test_consume_returns_every_key_at_its_limit_in_the_order_given(
    db: redis.Redis, redis_server: RedisServer,
) -> None:
    store = RedisUseStore(redis_server.url)
    assert not store.consume({"a": 1, "b": 1, "c": 5}, 10)
    assert list(store.consume({"c": 5, "b": 1, "a": 1}, 10)) == ["b", "a"]
    assert count(db, store, "c") == 1


def test_consume_limit_is_per_call(db: redis.Redis, redis_server: RedisServer) -> None:
    store = RedisUseStore(redis_server.url)
    assert not store.consume({"k": 1}, 10)
    assert list(store.consume({"k": 1}, 10)) == ["k"]
    assert not store.consume({"k": 3}, 10)  # a larger limit counts on from 1
    assert count(db, store, "k") == 2


@pytest.mark.parametrize("limit", [0, -1], ids=["zero", "negative"])
def test_consume_with_a_limit_below_one_is_refused(
    db: redis.Redis, redis_server: RedisServer, limit: int,
) -> None:
    store = RedisUseStore(redis_server.url)
    assert list(store.consume({"k": limit}, 10)) == ["k"]
    assert db.dbsize() == 0  # no counter was created


def test_consume_of_no_keys_touches_nothing(db: redis.Redis, redis_server: RedisServer) -> None:
    assert not RedisUseStore(redis_server.url).consume({}, 10)
    assert db.dbsize() == 0


def test_a_limit_that_is_not_an_int_is_refused(redis_server: RedisServer) -> None:
    with pytest.raises(TypeError, match="not an int"):
        RedisUseStore(redis_server.url).consume({"k": 1.5}, 10)  # type: ignore[dict-item]


def test_counter_ttl_is_set_on_first_use_extended_by_a_longer_one_never_shortened(
    db: redis.Redis, redis_server: RedisServer,
) -> None:
    store = RedisUseStore(redis_server.url)
    name = store.redis_key("k")
    assert not store.consume({"k": 5}, 100)
    assert 90_000 < db.pttl(name) <= 100_000
    assert not store.consume({"k": 5}, 500)  # longer: extended
    assert 490_000 < db.pttl(name) <= 500_000
    assert not store.consume({"k": 5}, 1)  # shorter: kept
    assert 490_000 < db.pttl(name) <= 500_000
    assert list(store.consume({"k": 3}, 1)) == ["k"]
    assert count(db, store, "k") == 3


def test_counter_expires_on_the_server_then_counts_afresh(
    db: redis.Redis, redis_server: RedisServer,
) -> None:
    store = RedisUseStore(redis_server.url)
    assert not store.consume({"k": 1}, 0.05)
    wait_until_gone(db, store.redis_key("k"))
    assert not store.consume({"k": 1}, 100)
    assert list(store.consume({"k": 1}, 100)) == ["k"]


def test_consume_survives_the_server_forgetting_its_script(
    db: redis.Redis, redis_server: RedisServer,
) -> None:
    """A restarted Redis has no scripts loaded: the store loads its own again."""
    store = RedisUseStore(redis_server.url)
    assert not store.consume({"k": 2}, 10)
    db.script_flush()
    assert not store.consume({"k": 2}, 10)
    assert list(store.consume({"k": 2}, 10)) == ["k"]


def test_consume_is_all_or_nothing_under_races(db: redis.Redis, redis_server: RedisServer) -> None:
    """Eight threads, each with its own client: no counter passes its limit, and
    each holds exactly the successes that named it."""
    limits_by_kind: dict[str, dict[str, int]] = {
        "ab": {"a": 3, "b": 5}, "bc": {"b": 5, "c": 2}, "a": {"a": 3},
    }
    kinds = list(limits_by_kind)
    threads, attempts = 8, 15
    stores = [RedisUseStore(connect(redis_server.url, timeout_s=RACE_TIMEOUT_S))
              for _ in range(threads)]

    def work(t: int) -> Counter[str]:
        done: Counter[str] = Counter()
        for i in range(attempts):
            kind = kinds[(t + i) % len(kinds)]
            if not stores[t].consume(limits_by_kind[kind], 60):
                done[kind] += 1
        return done

    total: Counter[str] = Counter()
    for result in run_at_once([partial(work, t) for t in range(threads)]):
        assert isinstance(result, Counter), result
        total += result
    counts = {"a": total["ab"] + total["a"], "b": total["ab"] + total["bc"], "c": total["bc"]}
    assert counts["a"] == 3
    assert counts["b"] <= 5
    assert counts["c"] <= 2
    for key, n in counts.items():
        assert count(db, stores[0], key) == n


# --- key names --------------------------------------------------------------------------


def test_redis_keys_are_prefixed_fixed_length_hashes(redis_server: RedisServer) -> None:
    replay, uses = RedisReplayStore(redis_server.url), RedisUseStore(redis_server.url)
    long_key = "rp|" + "A" * 43 + "|" + "j" * 64
    assert replay.redis_key("rp|x|1") == expected_name(DEFAULT_PREFIX, "rp", "rp|x|1")
    assert uses.redis_key("u|kid|root-1|j") == expected_name(DEFAULT_PREFIX, "u", "u|kid|root-1|j")
    assert replay.redis_key(long_key) == expected_name(DEFAULT_PREFIX, "rp", long_key)
    shape = re.compile(re.escape(DEFAULT_PREFIX) + r"(rp|u):[A-Za-z0-9_-]{43}")
    for name in (replay.redis_key("rp|x|1"), replay.redis_key(long_key), uses.redis_key("")):
        assert shape.fullmatch(name), name
    assert replay.redis_key("rp|x|1") != replay.redis_key("rp|x|2")
    tagged = RedisReplayStore(redis_server.url, prefix="{fleet-a}:")
    assert tagged.redis_key("k") == expected_name("{fleet-a}:", "rp", "k")


def test_a_verifier_writes_hashed_keys_with_no_pop_or_chain_material_in_clear(
    db: redis.Redis, redis_server: RedisServer, world: World,
) -> None:
    replay = RedisReplayStore(redis_server.url, prefix="svc:")
    uses = RedisUseStore(redis_server.url, prefix="svc:")
    verifier = world.verifier(replay_store=replay, use_store=uses)
    chain = world.chain3(use=2)
    pop = world.prove(world.c, chain, REFUND)
    verifier.verify(chain, REFUND, pop=pop)

    pop_jti = decode_unverified_pop_jti(pop)
    leaf = chain.rsplit("~", 1)[-1]
    leaf_jti = decode_unverified(chain)[2][1]["jti"]
    names = [text(k) for k in db.keys("*")]
    assert sorted(names) == sorted([
        expected_name("svc:", "rp", "rp|" + link_hash(leaf) + "|" + pop_jti),
        expected_name("svc:", "u", "u|jkt|" + world.b.thumbprint + "|" + leaf_jti),
    ])
    stored = " ".join([*names, *(text(db.get(k)) for k in names)])
    for material in (pop_jti, leaf_jti, link_hash(leaf), world.b.thumbprint):
        assert material not in stored


def decode_unverified_pop_jti(pop: str) -> str:
    payload = pop.split(".")[1]
    jti: str = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]
    return jti


def test_prefixes_separate_fleets_and_a_shared_prefix_shares_records(
    db: redis.Redis, redis_server: RedisServer,
) -> None:
    a1 = RedisReplayStore(redis_server.url, prefix="fleet-a:")
    a2 = RedisReplayStore(connect(redis_server.url), prefix="fleet-a:")
    b = RedisReplayStore(redis_server.url, prefix="fleet-b:")
    assert a1.add("rp|x|1", 10)
    assert not a2.add("rp|x|1", 10)  # another client, same fleet: a replay
    assert b.add("rp|x|1", 10)  # another fleet: its own record
    ua, ub = RedisUseStore(redis_server.url, prefix="fleet-a:"), RedisUseStore(
        redis_server.url, prefix="fleet-b:")
    assert not ua.consume({"k": 1}, 10)
    assert list(ua.consume({"k": 1}, 10)) == ["k"]
    assert not ub.consume({"k": 1}, 10)


# --- settings -----------------------------------------------------------------------


def test_settings_are_checked(redis_server: RedisServer) -> None:
    with pytest.raises(TypeError, match=r"redis\.Redis"):
        RedisReplayStore(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix"):
        RedisUseStore(redis_server.url, prefix="p" * 257)
    with pytest.raises(TypeError, match="fail_open"):
        RedisReplayStore(redis_server.url, fail_open=1)  # type: ignore[arg-type]
    for timeout in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="timeout_s"):
            connect(redis_server.url, timeout_s=timeout)
    assert RedisReplayStore(redis_server.url).fail_open is False


def test_a_client_or_a_url_and_one_client_can_serve_both_stores(
    db: redis.Redis, redis_server: RedisServer,
) -> None:
    client = connect(redis_server.url)
    replay, uses = RedisReplayStore(client), RedisUseStore(client)
    assert replay.add("k", 10)
    assert not uses.consume({"k": 1}, 10)
    assert not RedisReplayStore(redis_server.url).add("k", 10)
    assert list(RedisUseStore(redis_server.url).consume({"k": 1}, 10)) == ["k"]


def test_connect_sets_short_timeouts(redis_server: RedisServer) -> None:
    kwargs = connect(redis_server.url, timeout_s=0.25).connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.25, 0.25)
    kwargs = connect(redis_server.url).connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == DEFAULT_TIMEOUT_S


def test_a_restart_between_two_calls_costs_no_refusal(
    private_redis_server: RedisServer, world: World,
) -> None:
    """The client's pool replaces the connection the restart closed."""
    verifier = fleet(world, private_redis_server.url, timeout_s=0.5)[0]
    chain = world.chain3(use=5)
    verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    private_redis_server.stop()
    private_redis_server.start()
    verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))


def test_check_accepts_noeviction_and_refuses_an_evicting_server(
    db: redis.Redis, redis_server: RedisServer,
) -> None:
    store = RedisUseStore(redis_server.url)
    store.check()
    db.config_set("maxmemory-policy", "volatile-lru")
    try:
        with pytest.raises(StoreError, match="volatile-lru"):
            store.check()
    finally:
        db.config_set("maxmemory-policy", "noeviction")
    store.check()


def test_the_base_sdk_does_not_import_redis() -> None:
    code = ("import sys, verifier_sdk; "
            "assert 'redis' not in sys.modules, 'verifier_sdk imported redis'; "
            "import verifier_sdk.redis_stores; assert 'redis' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- a fleet of verifiers on one Redis ------------------------------------------------

VERIFIERS = 3
THREADS_PER_VERIFIER = 4
ROUNDS = 3


def fleet(world: World, url: str, *, timeout_s: float = RACE_TIMEOUT_S,
          fail_open: bool = False) -> list[Verifier]:
    """Three verifiers, each with its own client and its own store objects."""
    verifiers = []
    for _ in range(VERIFIERS):
        client = connect(url, timeout_s=timeout_s)
        verifiers.append(world.verifier(
            replay_store=RedisReplayStore(client, fail_open=fail_open),
            use_store=RedisUseStore(client, fail_open=fail_open),
        ))
    return verifiers


def test_three_verifiers_accept_one_pop_exactly_once(
    db: redis.Redis, redis_server: RedisServer, world: World,
) -> None:
    verifiers = fleet(world, redis_server.url)
    chain = world.chain3()
    for _ in range(ROUNDS):  # several rounds: a lost race should not hide by luck
        pop = world.prove(world.c, chain, REFUND)
        tasks: list[Callable[[], Any]] = [
            partial(v.verify, chain, REFUND, pop=pop)
            for v in verifiers for _ in range(THREADS_PER_VERIFIER)
        ]
        results = run_at_once(tasks)
        assert Counter(map(outcome, results)) == {"ok": 1, "replayed": len(tasks) - 1}


def test_three_verifiers_accept_a_use_once_link_exactly_once(
    db: redis.Redis, redis_server: RedisServer, world: World,
) -> None:
    verifiers = fleet(world, redis_server.url)
    for _ in range(ROUNDS):
        chain = world.chain3(use=1)
        pops = [world.prove(world.c, chain, REFUND)
                for _ in range(VERIFIERS * THREADS_PER_VERIFIER)]
        assert len(set(pops)) == len(pops)
        tasks: list[Callable[[], Any]] = [
            partial(verifiers[i % VERIFIERS].verify, chain, REFUND, pop=pop)
            for i, pop in enumerate(pops)
        ]
        results = run_at_once(tasks)
        assert Counter(map(outcome, results)) == {"ok": 1, "uses_exhausted": len(tasks) - 1}
        assert all(r.link == 2 for r in results if isinstance(r, VerificationError))


# --- Redis away -----------------------------------------------------------------------


def refusal(verifier: Verifier, chain: str, world: World) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    return info.value


def test_a_stopped_redis_fails_the_fleet_closed_and_a_restarted_one_serves_again(
    private_redis_server: RedisServer, world: World,
) -> None:
    server = private_redis_server
    verifiers = fleet(world, server.url, timeout_s=0.5)
    # The use store alone on Redis, so that its own failure code shows.
    uses_only = world.verifier(replay_store=MemoryReplayStore(),
                               use_store=RedisUseStore(connect(server.url)))
    chain, limited = world.chain3(), world.chain3(use=100)
    for v in [*verifiers, uses_only]:
        v.verify(limited, REFUND, pop=world.prove(world.c, limited, REFUND))

    server.stop()
    for v in verifiers:
        for c in (chain, limited):
            for _ in range(3):
                error = refusal(v, c, world)
                assert (error.code, error.link) == ("replayed", None)
                assert "could not be recorded" in error.message
    for _ in range(3):
        error = refusal(uses_only, limited, world)
        assert error.code == "uses_exhausted"
        assert "could not be counted" in error.message

    server.start()
    for v in [*verifiers, uses_only]:
        for c in (chain, limited):
            decision = v.verify(c, REFUND, pop=world.prove(world.c, c, REFUND))
            assert decision.subject == "agent:helper"


class Load:
    """Verifications in a loop on every verifier of a fleet, each call tagged
    with the outage phase at its start and at its end."""

    RUNNING, STOPPED, RESTARTING, RECOVERED = 0, 1, 2, 3
    MAX_CALLS = 100_000  # per worker: a bound on the load beside the waits' deadlines

    def __init__(self, world: World, verifiers: list[Verifier], chain: str) -> None:
        self.world, self.verifiers, self.chain = world, verifiers, chain
        self.phase = self.RUNNING
        self.results: list[list[tuple[int, int, str]]] = [[] for _ in verifiers]
        self.changed = threading.Condition()
        self.done = threading.Event()
        self.workers = [threading.Thread(target=self.work, args=(i,), daemon=True)
                        for i in range(len(verifiers))]

    def work(self, i: int) -> None:
        for _ in range(self.MAX_CALLS):
            if self.done.is_set():
                return
            pop = self.world.prove(self.world.c, self.chain, REFUND)
            begin = self.phase
            try:
                self.verifiers[i].verify(self.chain, REFUND, pop=pop)
                result = "ok"
            except Exception as exc:  # every outcome is checked by the test
                result = outcome(exc)
            with self.changed:
                self.results[i].append((begin, self.phase, result))
                self.changed.notify_all()

    def wait_for(self, phase: int, result: str, n: int) -> None:
        """Until every worker has ``n`` calls begun and ended in ``phase`` with ``result``."""
        def enough() -> bool:
            return all(sum(r == (phase, phase, result) for r in rs) >= n for rs in self.results)

        with self.changed:
            assert self.changed.wait_for(enough, WAIT_S), f"no {n} × {result} in phase {phase}"


def test_redis_stopped_under_load_fails_closed_and_recovers(
    private_redis_server: RedisServer, world: World,
) -> None:
    server = private_redis_server
    load = Load(world, fleet(world, server.url, timeout_s=0.5), world.chain3(use=1_000_000))
    for worker in load.workers:
        worker.start()
    try:
        load.wait_for(Load.RUNNING, "ok", 3)
        server.stop()
        load.phase = Load.STOPPED
        load.wait_for(Load.STOPPED, "replayed", 3)
        load.phase = Load.RESTARTING
        server.start()
        load.phase = Load.RECOVERED
        load.wait_for(Load.RECOVERED, "ok", 3)
    finally:
        load.done.set()
        for worker in load.workers:
            worker.join(WAIT_S)
    assert not any(w.is_alive() for w in load.workers)
    for results in load.results:
        outcomes = Counter(result for _, _, result in results)
        # A store failure refuses with the step's code; a call cut off between
        # its replay record and its use count refuses as uses_exhausted.
        assert set(outcomes) <= {"ok", "replayed", "uses_exhausted"}, outcomes
        during = [result for begin, end, result in results
                  if begin == end == Load.STOPPED]
        assert during
        assert "ok" not in during


def test_a_hung_redis_times_out_and_fails_closed(
    private_redis_server: RedisServer, world: World,
) -> None:
    """A server that accepts connections but never answers (frozen with
    SIGSTOP) cannot hold a verification past the socket timeouts."""
    server = private_redis_server
    client = connect(server.url, timeout_s=0.2)
    verifier = world.verifier(replay_store=RedisReplayStore(client),
                              use_store=RedisUseStore(client))
    chain = world.chain3(use=5)
    verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    errors: list[VerificationError] = []

    def attempt() -> None:
        errors.append(refusal(verifier, chain, world))

    server.pause()
    try:
        worker = threading.Thread(target=attempt, daemon=True)
        worker.start()
        worker.join(WAIT_S)
        assert not worker.is_alive(), "verification hung on a frozen Redis"
    finally:
        server.resume()
    assert [e.code for e in errors] == ["replayed"]
    assert "TimeoutError" in errors[0].message
    verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))


def test_a_redis_error_reply_fails_closed(db: redis.Redis, redis_server: RedisServer,
                                          world: World) -> None:
    """Not only a lost connection: a server that refuses writes (out of memory)."""
    verifier = world.verifier(replay_store=RedisReplayStore(redis_server.url),
                              use_store=RedisUseStore(redis_server.url))
    chain = world.chain3(use=5)
    db.config_set("maxmemory", 1)
    try:
        error = refusal(verifier, chain, world)
        assert error.code == "replayed"
        assert "OutOfMemoryError" in error.message
        with pytest.raises(StoreError, match="OutOfMemoryError"):
            RedisUseStore(redis_server.url).consume({"k": 1}, 10)
    finally:
        db.config_set("maxmemory", 0)
    verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))


def test_check_raises_when_redis_is_down(private_redis_server: RedisServer) -> None:
    store = RedisReplayStore(private_redis_server.url, fail_open=True)
    store.check()
    private_redis_server.stop()
    with pytest.raises(StoreError, match="ConnectionError"):
        store.check()  # fail_open does not make a readiness probe lie


def test_fail_open_accepts_while_redis_is_down_and_warns_every_time(
    private_redis_server: RedisServer, world: World, caplog: pytest.LogCaptureFixture,
) -> None:
    server = private_redis_server
    closed = fleet(world, server.url, timeout_s=0.5)[0]
    open_ = fleet(world, server.url, timeout_s=0.5, fail_open=True)[0]
    chain = world.chain3(use=1)
    server.stop()

    assert refusal(closed, chain, world).code == "replayed"  # the default
    caplog.set_level(logging.WARNING, logger="verifier_sdk.redis_stores")
    pop = world.prove(world.c, chain, REFUND)
    for _ in range(3):  # the unsafety, shown: one PoP, a use-once link, three times
        open_.verify(chain, REFUND, pop=pop)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 6  # each decision: the replay record and the use count
    messages = [r.getMessage() for r in warnings]
    assert sum("without a replay record" in m for m in messages) == 3
    assert sum("without counting it" in m for m in messages) == 3
    assert all("fail_open" in m for m in messages)

    store = RedisUseStore(server.url, fail_open=True)
    assert store.fail_open is True
    assert not store.consume({"k": 1}, 10)
    assert RedisReplayStore(server.url, fail_open=True).add("k", 10) is True
