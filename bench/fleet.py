#!/usr/bin/env python3
"""Verification throughput with the Redis stores against the in-memory ones,
in one run (docs/performance.md, "Verifier fleet: Redis stores").

Measured, per operation, each case once with ``MemoryReplayStore`` +
``MemoryUseStore`` and once with ``RedisReplayStore`` + ``RedisUseStore`` on
a private ``redis-server`` started here on 127.0.0.1 (temporary directory, no
persistence), through ``verifier_sdk.redis_stores.connect`` with its default
timeouts:

* warm, no use limit: a 3-link chain already verified, a fresh PoP each time,
  so every verification records its PoP in the replay store (one ``SET NX
  PX`` on Redis).
* warm, use-limited: the same with a leaf link that has ``use``, so every
  verification also counts a use (one script call on Redis).
* the same use-limited case with ``--threads`` threads sharing one verifier
  (aggregate throughput: Redis round trips release the GIL).
* the stores alone: ``add`` of a new key, ``consume`` of one counter; and a
  Redis ``PING`` round trip for scale.

Every case runs in ``--rounds`` rounds; each round times one batch of every
case in turn (interleaved, so drift in the machine hits all cases alike), and
a case's figure is the median over rounds of (batch time / batch size).
Inputs (chains, PoPs, keys) are made before any timing; the garbage
collector is disabled while a batch is timed and runs between batches. After
the run the Redis counters are checked against the verifications done. The
chains, the request and the batch timer are bench/verify.py's.

Run: ``python bench/fleet.py [--rounds N] [--threads N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import redis
from _report import write_json  # bench/, first on sys.path when run
from verify import AUD, REQUEST, Prepare, World, time_batch, warm_batch

from verifier_sdk import (
    Holder,
    MemoryReplayStore,
    MemoryUseStore,
    ReplayStore,
    UseStore,
    Verifier,
    new_jti,
)
from verifier_sdk._encoding import sha256_b64
from verifier_sdk.redis_stores import RedisReplayStore, RedisUseStore, connect

MAX_USE = 2**31 - 1  # the format's largest `use`: the run never reaches it
START_TIMEOUT_S = 15.0
STORES = ("memory", "redis")


# --- a private redis-server ------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A ``redis-server`` on a free loopback port, no persistence; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench/fleet.py needs redis-server (Debian: apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="mandate-fleet-") as directory:
        port = free_port()
        log = os.path.join(directory, "redis.log")
        process = subprocess.Popen(  # noqa: S603 - the installed server, fixed arguments
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", directory,
             "--logfile", log, "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--maxmemory-policy", "noeviction"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            probe = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0,
                                socket_connect_timeout=1.0)
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    sys.exit(f"redis-server exited ({process.returncode}); see its log")
                with contextlib.suppress(redis.ConnectionError):
                    if probe.ping():
                        break
                if time.monotonic() > deadline:
                    sys.exit(f"redis-server did not answer within {START_TIMEOUT_S} s")
                time.sleep(0.01)
            probe.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


# --- timing --------------------------------------------------------------------------


def time_threaded(op: Callable[[Any], object], inputs: Sequence[Any], threads: int) -> float:
    """Wall nanoseconds per call with ``threads`` threads sharing ``inputs``
    (each takes every ``threads``-th item), from their common release to the last
    one's end; collector disabled."""
    slices = [inputs[i::threads] for i in range(threads)]
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def run(items: Sequence[Any]) -> None:
        barrier.wait()
        try:
            for item in items:
                op(item)
        except BaseException as exc:  # reported after the batch
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(s,), daemon=True) for s in slices]
    for w in workers:
        w.start()
    gc.collect()
    gc.disable()
    try:
        barrier.wait()
        start = time.perf_counter_ns()
        for w in workers:
            w.join()
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    if errors:
        raise errors[0]
    return elapsed / len(inputs)


@dataclass
class Case:
    """One measured operation on one kind of store; ``prepare(round)`` returns
    (op, inputs) for that round's batch."""

    name: str
    store: str  # "memory", "redis", or "" for a case without a peer
    prepare: Prepare
    threads: int = 1
    samples: list[float] = field(default_factory=list)  # ns per op, one per round
    batch_size: int = 0

    @property
    def label(self) -> str:
        return f"{self.name} [{self.store}]" if self.store else self.name

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples) / 1000

    @property
    def min_us(self) -> float:
        return min(self.samples) / 1000

    @property
    def per_second(self) -> float:
        return 1e6 / self.median_us


# --- chains (bench/verify.py's World) and verifiers ----------------------------------


def stored_verifier(world: World, replay: ReplayStore, uses: UseStore) -> Verifier:
    """A verifier of ``world``'s chains that records into the given stores."""
    # pop_window is widened so that PoPs made before the timing stay valid
    # for the whole run; it changes no cost.
    return Verifier(world.bundle, audience=AUD, pop_window=300,
                    replay_store=replay, use_store=uses)


def chain3(world: World, *, use: int | None) -> tuple[str, Holder]:
    """A fresh all-Ed25519 3-link chain; ``use`` on the leaf link."""
    chain, holders = world.chain(3, root_ttl_s=1800, child_ttl_s=1200, leaf_use=use)
    return chain, holders[-1]


def warm_cases(world: World, stores: dict[str, tuple[ReplayStore, UseStore]], *,
               rounds: int, n: int, threads: int) -> list[Case]:
    """Warm verification, a fresh PoP per call: without and with a use limit,
    one thread and ``threads`` threads, on each kind of store."""
    cases = []
    kinds: list[tuple[str, int | None, int]] = [
        ("warm 3 links + PoP", None, 1),
        ("warm 3 links, leaf use-limited + PoP", MAX_USE, 1),
        (f"warm 3 links, leaf use-limited + PoP, {threads} threads", MAX_USE, threads),
    ]
    for name, use, nthreads in kinds:
        for store in STORES:
            chain, leaf = chain3(world, use=use)
            verifier = stored_verifier(world, *stores[store])
            verifier.verify(chain, REQUEST, pop=leaf.prove(chain, REQUEST, aud=AUD))
            pops = [[leaf.prove(chain, REQUEST, aud=AUD) for _ in range(n)]
                    for _ in range(rounds + 1)]
            cases.append(Case(name, store, warm_batch(verifier, chain, pops), nthreads))
    return cases


def store_cases(stores: dict[str, tuple[ReplayStore, UseStore]], client: redis.Redis, *,
                rounds: int, n: int) -> list[Case]:
    """The stores alone, with the keys and ttls a verifier gives them."""
    leaf_hash = sha256_b64(b"leaf")
    cases = []
    for store in STORES:
        replay, uses = stores[store]
        keys = [["rp|" + leaf_hash + "|" + new_jti() for _ in range(n)]
                for _ in range(rounds + 1)]
        counter = {"u|jkt|" + leaf_hash + "|" + new_jti(): MAX_USE}

        cases.append(Case("replay store add", store, replay_batch(replay, keys)))
        cases.append(Case("use store consume, 1 counter", store, consume_batch(uses, counter, n)))

    def ping(_: int) -> object:
        return client.ping()

    cases.append(Case("redis PING round trip", "", lambda r: (ping, range(n))))
    return cases


def replay_batch(replay: ReplayStore, keys: list[list[str]]) -> Prepare:
    """Per round: never-seen keys, the ttl a verifier with pop_window 300 gives."""
    def op(key: str) -> object:
        return replay.add(key, 630)

    return lambda r: (op, keys[r])


def consume_batch(uses: UseStore, counter: dict[str, int], n: int) -> Prepare:
    """Every round: one more use on the same counter, far below its limit."""
    def op(_: int) -> object:
        return uses.consume(counter, 1200)

    return lambda r: (op, range(n))


# --- report --------------------------------------------------------------------------


def ratio_rows(cases: list[Case]) -> list[tuple[str, float, float]]:
    """(case, redis time / memory time, redis throughput / memory throughput)."""
    by = {(c.name, c.store): c for c in cases}
    rows = []
    for c in cases:
        if c.store == "redis":
            memory = by[(c.name, "memory")]
            rows.append((c.name, c.median_us / memory.median_us,
                         c.per_second / memory.per_second))
    return rows


def check_counts(client: redis.Redis, cases: list[Case], rounds: int) -> int:
    """The Redis use counters hold every use-limited verification done on Redis
    (warm-up call included): the figures measured real work."""
    expected = sum(c.batch_size * (rounds + 1) + 1 for c in cases
                   if c.store == "redis" and "use-limited" in c.name)
    counted = 0
    for name in client.scan_iter(match="mandate:u:*"):
        value = client.get(name)
        counted += int(value) if isinstance(value, bytes | str) else 0
    consumes = sum(c.batch_size * (rounds + 1) for c in cases
                   if c.store == "redis" and c.name.startswith("use store"))
    if counted != expected + consumes:
        raise SystemExit(f"Redis counted {counted} uses, expected {expected + consumes}")
    return counted


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results as JSON to FILE ('-': stdout)")
    parser.add_argument("--rounds", type=int, default=30, help="batches per case (default 30)")
    parser.add_argument("--threads", type=int, default=4,
                        help="threads of the threaded case (default 4)")
    args = parser.parse_args(argv)
    rounds, threads = max(args.rounds, 3), max(args.threads, 2)
    started = time.perf_counter()

    with private_redis() as url:
        client = connect(url)
        stores: dict[str, tuple[ReplayStore, UseStore]] = {
            "memory": (MemoryReplayStore(), MemoryUseStore()),
            "redis": (RedisReplayStore(client), RedisUseStore(client)),
        }
        world = World.make()
        # Batch sizes: about 20-40 ms of work per batch.
        cases = [
            *warm_cases(world, stores, rounds=rounds, n=200, threads=threads),
            *store_cases(stores, client, rounds=rounds, n=400),
        ]
        # One unrecorded warm-up round, then the interleaved rounds.
        for r in range(rounds + 1):
            for case in cases:
                op, inputs = case.prepare(r)
                per_op = (time_batch(op, inputs) if case.threads == 1
                          else time_threaded(op, inputs, case.threads))
                case.batch_size = len(inputs)
                if r:
                    case.samples.append(per_op)
        counted = check_counts(client, cases, rounds)
        info = client.info("server")
        redis_version = str(info.get("redis_version", "?")) if isinstance(info, dict) else "?"
        client.close()
    elapsed = time.perf_counter() - started
    ratios = ratio_rows(cases)

    print(f"Verifier fleet benchmark — {os.cpu_count()} CPU(s), Python "
          f"{platform.python_version()}, redis-server {redis_version} and redis-py "
          f"{version('redis')} on 127.0.0.1, {rounds} rounds, gc disabled while timing")
    print("median over rounds of per-op time in a batch (threaded cases: wall time / ops)\n")
    width = max(len(c.label) for c in cases)
    print(f"{'case':<{width}}  {'median µs':>10}  {'min µs':>8}  {'ops/s':>8}")
    for c in cases:
        print(f"{c.label:<{width}}  {c.median_us:>10.1f}  {c.min_us:>8.1f}  "
              f"{c.per_second:>8,.0f}")
    print()
    rwidth = max(len(r[0]) for r in ratios)
    print(f"{'redis / memory (medians)':<{rwidth}}  {'time':>6}  {'throughput':>10}")
    for name, time_ratio, rate_ratio in ratios:
        print(f"{name:<{rwidth}}  {time_ratio:>6.2f}  {rate_ratio:>10.2f}")
    print(f"\nuse counters on Redis after the run: {counted:,} (as expected)")
    print(f"run time {elapsed:.0f} s")

    if args.json:
        result = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "versions": {"redis-server": redis_version, "redis-py": version("redis"),
                         "pynacl": version("pynacl")},
            "method": {"rounds": rounds, "threads": threads,
                       "statistic": "median of per-op batch means",
                       "gc_during_timing": "disabled", "redis": "private, 127.0.0.1, "
                       "no persistence, connect() defaults"},
            "cases": {c.label: {"median_us": round(c.median_us, 2),
                                "min_us": round(c.min_us, 2),
                                "ops_per_s": round(c.per_second), "threads": c.threads,
                                "batch_size": c.batch_size} for c in cases},
            "ratios_redis_over_memory": {name: {"time": round(t, 3), "throughput": round(p, 3)}
                                         for name, t, p in ratios},
            "redis_use_counters": counted,
            "run_seconds": round(elapsed, 1),
        }
        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
