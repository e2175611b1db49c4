"""One Verifier, many threads: the replay check-and-record and the use count
are atomic (spec §5, §8 steps 11–12), and the link cache is thread-safe."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from helpers import REFUND, World

from verifier_sdk import MemoryUseStore, Request, VerificationError

THREADS = 8
JOIN_TIMEOUT_S = 30.0


def run_at_once(tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run each task in its own thread, released together; results or exceptions."""
    barrier = threading.Barrier(len(tasks), timeout=JOIN_TIMEOUT_S)
    results: list[Any] = [None] * len(tasks)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = tasks[i]()
        except Exception as exc:  # collected and checked by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(tasks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a worker thread did not finish"
    return results


def outcome(result: Any) -> str:
    if isinstance(result, VerificationError):
        return result.code
    if isinstance(result, Exception):
        return f"unexpected {result!r}"
    return "ok"


def test_one_pop_from_eight_threads_is_accepted_once(world: World) -> None:
    chain = world.chain3()
    for _ in range(5):  # several rounds: a lost race should not hide by luck
        verifier = world.verifier()
        pop = world.prove(world.c, chain, REFUND)
        results = run_at_once([partial(verifier.verify, chain, REFUND, pop=pop)] * THREADS)
        assert Counter(map(outcome, results)) == {"ok": 1, "replayed": THREADS - 1}


def test_use_once_link_with_eight_pops_from_eight_threads_succeeds_once(world: World) -> None:
    for _ in range(5):
        chain = world.chain3(use=1)
        verifier = world.verifier()
        pops = [world.prove(world.c, chain, REFUND) for _ in range(THREADS)]
        assert len(set(pops)) == THREADS
        results = run_at_once([partial(verifier.verify, chain, REFUND, pop=p) for p in pops])
        assert Counter(map(outcome, results)) == {"ok": 1, "uses_exhausted": THREADS - 1}
        assert all(r.link == 2 for r in results if isinstance(r, VerificationError))


def test_distinct_requests_from_many_threads_all_succeed(world: World) -> None:
    """Several chains through a cache smaller than their links: eviction races too."""
    chains = [world.chain3() for _ in range(4)]
    verifier = world.verifier(cache_size=5)
    per_thread = 12
    jobs: list[list[tuple[str, Request, str]]] = []
    for t in range(THREADS):
        batch = []
        for i in range(per_thread):
            chain = chains[(t + i) % len(chains)]
            req = Request("api/payments/refunds/o-123", "post", {"amount": t * 100 + i})
            batch.append((chain, req, world.prove(world.c, chain, req)))
        jobs.append(batch)

    def work(batch: list[tuple[str, Request, str]]) -> list[str]:
        return [verifier.verify(c, r, pop=p).subject for c, r, p in batch]

    results = run_at_once([partial(work, b) for b in jobs])
    for result in results:
        assert not isinstance(result, Exception), result
        assert result == ["agent:helper"] * per_thread


def test_consume_is_all_or_nothing_under_races() -> None:
    store = MemoryUseStore()
    limits_by_kind: dict[str, dict[str, int]] = {
        "ab": {"a": 3, "b": 5},
        "bc": {"b": 5, "c": 2},
        "a": {"a": 3},
    }
    kinds = list(limits_by_kind)
    attempts = 20

    def work(t: int) -> Counter[str]:
        done: Counter[str] = Counter()
        for i in range(attempts):
            kind = kinds[(t + i) % len(kinds)]
            if not store.consume(limits_by_kind[kind], 60):
                done[kind] += 1
        return done

    results = run_at_once([partial(work, t) for t in range(THREADS)])
    total: Counter[str] = Counter()
    for result in results:
        assert isinstance(result, Counter), result
        total += result

    counts = {
        "a": total["ab"] + total["a"],
        "b": total["ab"] + total["bc"],
        "c": total["bc"],
    }
    # "a" alone is tried often enough to reach its limit; no key goes past it.
    assert counts["a"] == 3
    assert counts["b"] <= 5
    assert counts["c"] <= 2
    # Each counter holds exactly the successes that named it: a refused call
    # changed nothing (probe: at `n` it is at its limit, at `n + 1` it is not).
    for key, n in counts.items():
        if n:
            assert list(store.consume({key: n}, 60)) == [key]
        assert not store.consume({key: n + 1}, 60)
