"""Replay and use stores (spec §5, §8 steps 11–12, §9): semantics under a fake
clock, the bound on their size, the exact keys and ttls a Verifier gives them."""

from __future__ import annotations

import base64
import json
import tracemalloc
from collections.abc import Collection, Mapping

import pytest
from helpers import NOW, REFUND, ROOT_KID, World, forge, link_hash
from helpers import b64 as _b64

from verifier_sdk import (
    MemoryReplayStore,
    MemoryUseStore,
    ReplayStore,
    Request,
    StoreError,
    UseStore,
    VerificationError,
    decode_unverified,
    make_revocation_list,
)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class RecordingReplayStore:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def add(self, key: str, ttl: float) -> bool:
        self.calls.append((key, ttl))
        return True


class RecordingUseStore:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, int], float]] = []

    def consume(self, limits: Mapping[str, int], ttl: float) -> Collection[str]:
        self.calls.append((dict(limits), ttl))
        return ()


class UnreachableStore:
    """A backend that is down: the one fault a real in-memory store cannot show."""

    def add(self, key: str, ttl: float) -> bool:
        raise ConnectionError("replay backend unreachable")

    def consume(self, limits: Mapping[str, int], ttl: float) -> Collection[str]:
        raise ConnectionError("use backend unreachable")


def count_is(store: MemoryUseStore, key: str, expected: int) -> bool:
    """True when ``key``'s counter is exactly ``expected`` (then it is left at
    ``expected + 1``, since the second probe increments)."""
    at_limit = store.consume({key: expected}, 1000) if expected else ()
    return (not expected or list(at_limit) == [key]) and not store.consume({key: expected + 1}, 1)


# --- MemoryReplayStore ----------------------------------------------------------


def test_replay_add_new_then_duplicate() -> None:
    store = MemoryReplayStore(clock=FakeClock())
    assert store.add("rp|x|1", 10) is True
    assert store.add("rp|x|1", 10) is False
    assert store.add("rp|x|2", 10) is True
    assert store.add("rp|y|1", 10) is True
    assert len(store) == 3


def test_replay_entry_lives_for_its_ttl_then_can_be_added_again() -> None:
    clock = FakeClock(0)
    store = MemoryReplayStore(clock=clock)
    assert store.add("k", 10)
    clock.t = 9.9
    assert not store.add("k", 10)  # a duplicate does not extend the entry
    clock.t = 10.1
    assert store.add("k", 10)
    clock.t = 19.9
    assert not store.add("k", 10)
    clock.t = 20.2
    assert store.add("k", 10)


def test_replay_store_full_of_live_entries_raises_but_still_detects_duplicates() -> None:
    clock = FakeClock(0)
    store = MemoryReplayStore(max_entries=3, clock=clock)
    for key in ("a", "b", "c"):
        assert store.add(key, 10)
    with pytest.raises(StoreError):
        store.add("d", 10)
    assert store.add("a", 10) is False
    assert len(store) == 3


def test_replay_store_reclaims_expired_entries() -> None:
    clock = FakeClock(0)
    store = MemoryReplayStore(max_entries=3, clock=clock)
    for key in ("a", "b", "c"):
        assert store.add(key, 10)
    clock.t = 10.5
    for key in ("d", "e", "f"):
        assert store.add(key, 10)
    assert len(store) == 3
    # "a" is forgotten, not a duplicate: with no room left it cannot be recorded.
    with pytest.raises(StoreError):
        store.add("a", 10)


def test_replay_store_reclaims_only_expired_entries() -> None:
    clock = FakeClock(0)
    store = MemoryReplayStore(max_entries=3, clock=clock)
    assert store.add("short-1", 1)
    assert store.add("short-2", 1)
    assert store.add("long", 100)
    clock.t = 2
    assert store.add("new-1", 10)
    assert store.add("new-2", 10)
    with pytest.raises(StoreError):
        store.add("new-3", 10)
    assert store.add("long", 100) is False
    with pytest.raises(StoreError):  # reclaimed: no longer a duplicate, and no room
        store.add("short-1", 1)


@pytest.mark.parametrize("cls", [MemoryReplayStore, MemoryUseStore], ids=["replay", "use"])
def test_max_entries_below_one_is_refused(cls: type[MemoryReplayStore | MemoryUseStore]) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        cls(max_entries=0)


# --- MemoryUseStore ---------------------------------------------------------------


def test_consume_counts_up_to_the_limit_then_returns_the_key() -> None:
    store = MemoryUseStore(clock=FakeClock())
    assert not store.consume({"k": 2}, 10)
    assert not store.consume({"k": 2}, 10)
    assert list(store.consume({"k": 2}, 10)) == ["k"]
    assert list(store.consume({"k": 2}, 10)) == ["k"]  # at the limit: changes nothing
    assert count_is(store, "k", 2)


def test_consume_is_all_or_nothing() -> None:
    store = MemoryUseStore(clock=FakeClock())
    assert not store.consume({"a": 1, "b": 3}, 10)
    assert list(store.consume({"a": 1, "b": 3}, 10)) == ["a"]
    assert count_is(store, "b", 1)  # the refused call did not touch b


def test_consume_returns_every_key_at_its_limit() -> None:
    store = MemoryUseStore(clock=FakeClock())
    assert not store.consume({"a": 1, "b": 1, "c": 5}, 10)
    assert set(store.consume({"a": 1, "b": 1, "c": 5}, 10)) == {"a", "b"}
    assert count_is(store, "c", 1)


def test_consume_limit_is_per_call() -> None:
    store = MemoryUseStore(clock=FakeClock())
    assert not store.consume({"k": 1}, 10)
    assert list(store.consume({"k": 1}, 10)) == ["k"]
    assert not store.consume({"k": 3}, 10)  # a larger limit counts on from 1
    assert count_is(store, "k", 2)


def test_consume_with_a_zero_limit_is_refused() -> None:
    """§9: only keys *below* their limit are counted; 0 is not below 0."""
    store = MemoryUseStore(clock=FakeClock())
    assert list(store.consume({"k": 0}, 10)) == ["k"]
    assert count_is(store, "k", 0)


def test_counters_expire_after_their_ttl() -> None:
    clock = FakeClock(0)
    store = MemoryUseStore(clock=clock)
    assert not store.consume({"k": 1}, 10)
    clock.t = 9.9
    assert list(store.consume({"k": 1}, 10)) == ["k"]
    clock.t = 10.1
    assert not store.consume({"k": 1}, 10)  # a fresh counter
    assert list(store.consume({"k": 1}, 10)) == ["k"]


def test_a_longer_ttl_extends_a_counter_and_a_shorter_one_never_shortens_it() -> None:
    clock = FakeClock(0)
    store = MemoryUseStore(clock=clock)
    assert not store.consume({"k": 3}, 10)  # expires 10
    clock.t = 5
    assert not store.consume({"k": 3}, 20)  # expires 25
    clock.t = 15
    assert list(store.consume({"k": 2}, 1)) == ["k"]  # still 2 after the first ttl
    assert not store.consume({"k": 3}, 1)  # 3; a shorter ttl keeps 25
    clock.t = 24.9
    assert list(store.consume({"k": 3}, 1)) == ["k"]
    clock.t = 25.1
    assert not store.consume({"k": 3}, 1)


def test_use_store_full_of_live_entries_raises_and_changes_nothing() -> None:
    clock = FakeClock(0)
    store = MemoryUseStore(max_entries=2, clock=clock)
    assert not store.consume({"a": 5, "b": 5}, 10)
    with pytest.raises(StoreError):
        store.consume({"c": 5}, 10)
    with pytest.raises(StoreError):
        store.consume({"a": 5, "c": 5}, 10)  # needs one new entry: none is free
    assert not store.consume({"a": 5}, 10)  # existing counters still count
    assert count_is(store, "a", 2)  # the refused call did not increment a
    assert len(store) == 2


def test_use_store_reclaims_expired_counters() -> None:
    clock = FakeClock(0)
    store = MemoryUseStore(max_entries=2, clock=clock)
    assert not store.consume({"a": 1, "b": 1}, 10)
    clock.t = 10.5
    assert not store.consume({"c": 1, "d": 1}, 10)
    with pytest.raises(StoreError):  # a's counter is gone, and c, d fill the store
        store.consume({"a": 1}, 10)
    clock.t = 21
    assert not store.consume({"a": 1}, 10)
    assert len(store) == 1


def test_stores_satisfy_the_protocols() -> None:
    assert isinstance(MemoryReplayStore(), ReplayStore)
    assert isinstance(MemoryUseStore(), UseStore)
    assert isinstance(RecordingReplayStore(), ReplayStore)
    assert isinstance(RecordingUseStore(), UseStore)
    assert not isinstance(MemoryReplayStore(), UseStore)
    assert not isinstance(MemoryUseStore(), ReplayStore)
    assert not isinstance(object(), ReplayStore)


# --- what a Verifier hands its stores -------------------------------------------


def chain_with_uses(world: World, root_use: int | None, uses: tuple[int | None, int | None]) -> str:
    """root (exp NOW+590) → a (exp NOW+295) → b (exp NOW+119), leaf holder c."""
    chain = world.issue(use=root_use)
    chain = world.a.attenuate(
        chain, sub="agent:refund", holder_jwk=world.b.public_jwk,
        cap=[{"res": "api/payments/refunds/o-123", "act": ["post"]}],
        ttl=300, dpt=1, use=uses[0], now=world.now - 5,
    )
    return world.b.attenuate(
        chain, sub="agent:helper", holder_jwk=world.c.public_jwk,
        cap=[{"res": "api/payments/refunds/o-123", "act": ["post"]}],
        ttl=120, dpt=0, use=uses[1], now=world.now - 1,
    )


def test_replay_key_and_ttl(world: World) -> None:
    replay = RecordingReplayStore()
    verifier = world.verifier(replay_store=replay, pop_window=45, leeway=7)
    chain = world.chain3()
    pop = world.prove(world.c, chain, REFUND)
    verifier.verify(chain, REFUND, pop=pop)
    pop_jti = decode_pop_jti(pop)
    leaf = chain.rsplit("~", 1)[-1]
    assert replay.calls == [("rp|" + link_hash(leaf) + "|" + pop_jti, 2 * 45 + 7)]


def decode_pop_jti(pop: str) -> str:
    payload = pop.split(".")[1]
    jti: str = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]
    return jti


def test_use_keys_and_ttl_for_every_counted_link(world: World) -> None:
    uses = RecordingUseStore()
    verifier = world.verifier(use_store=uses, leeway=7)
    chain = chain_with_uses(world, 4, (3, 2))
    verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    jtis = [payload["jti"] for _, payload in decode_unverified(chain)]
    assert uses.calls == [(
        {
            "u|kid|" + ROOT_KID + "|" + jtis[0]: 4,
            "u|jkt|" + world.a.thumbprint + "|" + jtis[1]: 3,
            "u|jkt|" + world.b.thumbprint + "|" + jtis[2]: 2,
        },
        (NOW + 590) + 7 - NOW,  # the latest exp among counted links (the root's)
    )]


def test_use_ttl_follows_the_latest_exp_of_the_counted_links_only(world: World) -> None:
    uses = RecordingUseStore()
    verifier = world.verifier(use_store=uses, leeway=7)
    chain = chain_with_uses(world, None, (None, 2))
    verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    jti = decode_unverified(chain)[2][1]["jti"]
    assert uses.calls == [({"u|jkt|" + world.b.thumbprint + "|" + jti: 2}, (NOW + 119) + 7 - NOW)]

    uses.calls.clear()
    chain = chain_with_uses(world, None, (3, 2))
    verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    assert len(uses.calls[0][0]) == 2
    assert uses.calls[0][1] == (NOW + 295) + 7 - NOW


def chain_with_a_repeated_pair(world: World) -> str:
    """root → a → (a again) → c where links 1 and 2 share (a's key, jti): uses 5 then 2."""
    chain = world.issue()
    chain = world.a.attenuate(
        chain, sub="agent:support", holder_jwk=world.a.public_jwk,
        cap=[{"res": "api/payments/refunds/o-123", "act": ["post"]}],
        ttl=300, dpt=1, use=5, now=world.now - 5,
    )
    first = decode_unverified(chain)[1][1]
    payload = {
        **first, "iat": world.now - 1, "nbf": world.now - 1, "exp": world.now + 60,
        "cnf": {"jwk": world.c.public_jwk}, "prv": link_hash(chain.rsplit("~", 1)[-1]),
        "dpt": 0, "use": 2, "sub": "agent:helper",
    }
    header = {"alg": "EdDSA", "typ": "mandate+jwt", "kid": world.a.thumbprint}
    return chain + "~" + forge(header, payload, world.a.sign)


def test_a_pair_twice_in_a_chain_is_counted_once_against_the_smaller_use(world: World) -> None:
    chain = chain_with_a_repeated_pair(world)
    jti = decode_unverified(chain)[1][1]["jti"]
    assert decode_unverified(chain)[2][1]["jti"] == jti

    recording = RecordingUseStore()
    world.verifier(use_store=recording).verify(
        chain, REFUND, pop=world.prove(world.c, chain, REFUND)
    )
    assert recording.calls == [({"u|jkt|" + world.a.thumbprint + "|" + jti: 2}, (NOW + 295) + 30
                                 - NOW)]

    verifier = world.verifier()
    for _ in range(2):
        verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    with pytest.raises(VerificationError) as info:
        verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    assert (info.value.code, info.value.link) == ("uses_exhausted", 1)


def test_a_failed_verification_records_nothing(world: World) -> None:
    """§5: the replay record comes only after steps 1–10 passed; counting after 11."""
    replay, uses = RecordingReplayStore(), RecordingUseStore()
    verifier = world.verifier(replay_store=replay, use_store=uses)
    chain = world.chain3(use=3)
    outside = Request("api/payments/refunds/o-124", "post", {"amount": 1})
    attempts = [
        (REFUND, world.prove(world.c, chain, REFUND, aud="other-api")),  # (10) pop_invalid
        (outside, world.prove(world.c, chain, outside)),  # (9) denied
        (REFUND, None),  # (10) missing PoP
    ]
    for req, pop in attempts:
        with pytest.raises(VerificationError):
            verifier.verify(chain, req, pop=pop)
    assert replay.calls == []
    assert uses.calls == []


def test_a_pop_refused_before_the_replay_step_can_be_used_later(world: World) -> None:
    chain = world.chain3()
    verifier = world.verifier()
    leaf_jti = decode_unverified(chain)[2][1]["jti"]
    sign = world.root.sign
    verifier.update_revocations(make_revocation_list(
        alg="EdDSA", kid=ROOT_KID, sign=sign, iss="revoker", seq=1, iat=NOW - 1,
        exp=NOW + 600, revoked=[leaf_jti]))
    pop = world.prove(world.c, chain, REFUND)
    with pytest.raises(VerificationError) as info:
        verifier.verify(chain, REFUND, pop=pop)
    assert info.value.code == "revoked"
    verifier.update_revocations(make_revocation_list(
        alg="EdDSA", kid=ROOT_KID, sign=sign, iss="revoker", seq=2, iat=NOW - 1,
        exp=NOW + 600, revoked=[]))
    verifier.verify(chain, REFUND, pop=pop)


def test_a_use_refused_as_exhausted_still_spends_its_pop(world: World) -> None:
    """§8 (12): the replay record of step 11 stands even when counting refuses."""
    replay = RecordingReplayStore()
    verifier = world.verifier(replay_store=replay)
    chain = world.chain3(use=1)
    verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    with pytest.raises(VerificationError) as info:
        verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    assert info.value.code == "uses_exhausted"
    assert len(replay.calls) == 2


def test_no_use_store_call_without_use_members(world: World) -> None:
    uses = RecordingUseStore()
    verifier = world.verifier(use_store=uses)
    chain = world.chain3()
    verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    assert uses.calls == []


def test_an_empty_store_given_to_the_verifier_is_the_one_used(world: World) -> None:
    """An empty store is falsy (it has __len__): the verifier must not swap it."""
    replay, uses = MemoryReplayStore(), MemoryUseStore()
    verifier = world.verifier(replay_store=replay, use_store=uses)
    chain = world.chain3(use=5)
    verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    assert len(replay) == 1
    assert len(uses) == 1


def test_verifier_fails_closed_when_the_replay_store_is_full(world: World) -> None:
    replay = MemoryReplayStore(max_entries=1)
    verifier = world.verifier(replay_store=replay)
    chain = world.chain3()
    verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    with pytest.raises(VerificationError) as info:
        verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    assert info.value.code == "replayed"
    assert info.value.link is None
    assert info.value.message


def test_verifier_fails_closed_when_the_use_store_is_full(world: World) -> None:
    uses = MemoryUseStore(max_entries=1)
    verifier = world.verifier(use_store=uses)
    first, second = world.chain3(use=5), world.chain3(use=5)
    verifier.verify(first, REFUND, pop=world.prove(world.c, first, REFUND))
    with pytest.raises(VerificationError) as info:
        verifier.verify(second, REFUND, pop=world.prove(world.c, second, REFUND))
    assert info.value.code == "uses_exhausted"
    assert info.value.message
    # The full store refused a new counter; the existing one still counts.
    verifier.verify(first, REFUND, pop=world.prove(world.c, first, REFUND))


@pytest.mark.parametrize("which", ["replay", "use"])
def test_verifier_fails_closed_when_a_store_backend_is_down(world: World, which: str) -> None:
    down = UnreachableStore()
    if which == "replay":
        verifier = world.verifier(replay_store=down)
    else:
        verifier = world.verifier(use_store=down)
    chain = world.chain3(use=5)
    with pytest.raises(VerificationError) as info:
        verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    assert info.value.code == ("replayed" if which == "replay" else "uses_exhausted")
    assert info.value.message


# --- memory ---------------------------------------------------------------------


def test_100k_replay_entries_fit_well_under_50_mb() -> None:
    ath = _b64(bytes(32))
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        store = MemoryReplayStore(clock=FakeClock())
        for i in range(100_000):
            assert store.add(f"rp|{ath}|{i:022d}", 150)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    used_mb = (after - before) / 1e6
    print(f"100,000 replay entries: {used_mb:.1f} MB")
    assert len(store) == 100_000
    assert used_mb < 50


def test_a_full_store_reclaims_an_expired_entry_that_is_not_at_the_front() -> None:
    clock = FakeClock(0)
    store = MemoryReplayStore(max_entries=3, clock=clock)
    assert store.add("long-1", 100)
    assert store.add("long-2", 100)
    assert store.add("short", 5)  # expires first, though added last
    with pytest.raises(StoreError):  # full, and nothing has expired yet
        store.add("new", 100)
    clock.t = 6
    assert store.add("new", 100)  # the sweep found "short"
    assert len(store) == 3
    assert not store.add("new", 100)  # recorded: a replay
    with pytest.raises(StoreError):  # full again, nothing expired
        store.add("another", 100)
