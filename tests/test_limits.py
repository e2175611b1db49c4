"""Resource exhaustion: oversize and deeply nested inputs get the
spec's codes and links; the worst-case valid chain (16 links × 64
capabilities, filled to the size limits) verifies; full stores fail closed
without growing. Behaviour only; bench/limits.py measures the times."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import AUD, NOW, ROOT_KID, World, forge, load_bench

from verifier_sdk import (
    Holder,
    MemoryReplayStore,
    MemoryUseStore,
    StoreError,
    VerificationError,
    Verifier,
    decode_unverified,
    issue_root,
)

limits: Any = load_bench("limits")  # bench/limits.py builds the inputs; the tests reuse it
REQUEST = limits.REQUEST


@pytest.fixture(scope="module")
def worst() -> tuple[World, str, list[Holder]]:
    world = World()
    chain, holders = limits.worst_chain(world.root, NOW - 5)
    return world, chain, holders


def refuse(verifier: Verifier, chain: str, pop: str | None) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verifier.verify(chain, REQUEST, pop=pop)
    return info.value


def test_worst_case_chain_is_at_the_limits_and_verifies(
        worst: tuple[World, str, list[Holder]]) -> None:
    world, chain, holders = worst
    links = chain.split("~")
    assert len(links) == 16
    assert len(chain) <= 65_536
    assert all(len(link) <= 8_192 for link in links)
    assert len(links[-1]) > 8_192 - 40  # the leaf is filled to its limit
    assert all(len(payload["cap"]) == 64 for _, payload in decode_unverified(chain))
    verifier = world.verifier()
    for _ in range(2):  # cold, then warm from the link cache
        pop = holders[-1].prove(chain, REQUEST, aud=AUD, now=NOW)
        decision = verifier.verify(chain, REQUEST, pop=pop)
        assert len(decision.principals) == 17


def test_one_more_capability_on_the_leaf_is_too_large(
        worst: tuple[World, str, list[Holder]]) -> None:
    world, chain, holders = worst
    twin = limits.with_one_more_cap(chain, holders[-2])
    assert len(twin) <= 65_536 < len(twin) + 8_192
    assert len(twin.split("~")[-1]) > 8_192
    pop = holders[-1].prove(chain, REQUEST, aud=AUD, now=NOW)
    error = refuse(world.verifier(), twin, pop)
    assert (error.code, error.link) == ("too_large", 15)


def hostile(world: World, chain: str, holders: list[Holder]) -> dict[str, tuple[str, str | None]]:
    pop = holders[-1].prove(chain, REQUEST, aud=AUD, now=NOW)
    cases = limits.hostile_cases(world.root, chain, pop, holders[-2])
    return {name: (bad_chain, bad_pop) for name, bad_chain, bad_pop in cases}


@pytest.mark.parametrize(("name", "code", "link"), [
    ("chain over 65,536 bytes", "too_large", None),
    ("17-link chain", "too_large", None),
    ("link over 8,192 bytes (65 caps)", "too_large", 15),
    ("PoP over 4,096 bytes", "too_large", None),
    ("link nested 9 deep", "malformed", 0),
    ("link nested 4,000 deep (left open)", "malformed", 0),
])
def test_oversize_and_nested_inputs_are_refused(
        worst: tuple[World, str, list[Holder]], name: str, code: str, link: int | None) -> None:
    world, chain, holders = worst
    bad_chain, bad_pop = hostile(world, chain, holders)[name]
    error = refuse(world.verifier(), bad_chain, bad_pop)
    assert (error.code, error.link) == (code, link)


def test_the_deepest_balanced_nesting_that_fits_is_malformed(
        worst: tuple[World, str, list[Holder]]) -> None:
    world, chain, holders = worst
    deep = {n: c for n, c in hostile(world, chain, holders).items() if "(balanced)" in n}
    assert len(deep) == 1
    (name, (bad_chain, bad_pop)), = deep.items()
    assert len(bad_chain) <= 8_192
    assert int(name.split()[2].replace(",", "")) > 2_000
    error = refuse(world.verifier(), bad_chain, bad_pop)
    assert (error.code, error.link) == ("malformed", 0)


def test_nesting_in_a_header_is_malformed(world: World) -> None:
    header = b'{"alg":"EdDSA","typ":"mandate+jwt","kid":"' + ROOT_KID.encode() + b'","x":' \
        + b"[" * 2_500 + b"]" * 2_500 + b"}"
    token = forge(header, world.root_payload(), world.root.sign)
    assert len(token) <= 8_192
    error = refuse(world.verifier(), token, None)
    assert (error.code, error.link) == ("malformed", 0)


def put(store: MemoryReplayStore | MemoryUseStore, key: str) -> object:
    if isinstance(store, MemoryReplayStore):
        return store.add(key, 3600)
    return store.consume({key: 1}, 3600)


@pytest.mark.parametrize("cls", [MemoryReplayStore, MemoryUseStore])
def test_a_store_at_its_bound_raises_and_does_not_grow(
        cls: type[MemoryReplayStore | MemoryUseStore]) -> None:
    store = cls(max_entries=500)
    for key in limits.nonces(0, 500):
        if isinstance(store, MemoryReplayStore):
            assert store.add(key, 3600)
        else:
            assert store.consume({key: 1}, 3600) == ()
    for key in limits.nonces(500, 20):
        with pytest.raises(StoreError):
            put(store, key)
    assert len(store) == 500


@pytest.mark.parametrize(("which", "code"), [("replay", "replayed"), ("use", "uses_exhausted")])
def test_a_verifier_with_a_full_store_fails_closed(world: World, which: str, code: str) -> None:
    replay, uses = MemoryReplayStore(max_entries=100), MemoryUseStore(max_entries=100)
    for key in limits.nonces(0, 100):
        if which == "replay":
            replay.add(key, 3600)
        else:
            uses.consume({key: 1}, 3600)
    verifier = world.verifier(replay_store=replay, use_store=uses)
    for _ in range(5):  # distinct chains and PoPs: each would be new to the store
        chain = issue_root(alg="EdDSA", kid=ROOT_KID, sign=world.root.sign, iss="spiffe://a/o",
                           sub="agent:x", holder_jwk=world.a.public_jwk,
                           cap=limits.caps(0, 0, 1), ttl=600, use=3, now=NOW - 1)
        pop = world.a.prove(chain, REQUEST, aud=AUD, now=NOW)
        assert refuse(verifier, chain, pop).code == code
    assert len(replay if which == "replay" else uses) == 100
