#!/usr/bin/env python3
"""Chain verification, side by side: Mandate against its signature floor,
biscuit-python and PyJWT, all in one run (docs/performance.md).

Measured, per operation:

* Mandate cold: a 3- and a 5-link chain + PoP, each chain seen for the first
  time (distinct chains, fresh holder keys, the process-wide key cache
  emptied before each batch), so no cache of the SDK helps.
* Mandate warm: the same chain again with a fresh PoP each time; only the PoP
  and the per-request checks run.
* The signature floor: one libsodium Ed25519 verify (what the SDK calls) on a
  message of the links' mean size, times the signatures in a chain + PoP;
  OpenSSL's Ed25519 verify (what PyJWT calls) beside it for reference.
* biscuit-python: parse + verify + authorize of tokens with 3, 4 and 5 blocks.
* PyJWT: ``jwt.decode`` (EdDSA, signature and registered claims checked) of
  the very tokens of a Mandate chain + PoP, one call per token.
* Memory: a MemoryReplayStore holding 100,000 entries (tracemalloc).

Every case runs in ``--rounds`` rounds; each round times one batch of every
case in turn (interleaved, so drift in the machine hits all cases alike), and
a case's figure is the median over rounds of (batch time / batch size).
Inputs (chains, PoPs, tokens) are made before any timing; the garbage
collector is disabled while a batch is timed and runs between batches.

Run: ``make bench`` or ``python bench/verify.py [--json FILE] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import os
import platform
import pstats
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from typing import Any

import biscuit_auth
import jwt
import nacl.bindings
from _report import write_json  # bench/, first on sys.path when run
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from verifier_sdk import (
    Holder,
    MemoryReplayStore,
    Request,
    TrustBundle,
    Verifier,
    issue_root,
    new_jti,
)
from verifier_sdk import _keys as sdk_keys
from verifier_sdk._encoding import b64url_decode, sha256_b64

AUD = "payments-api"
ROOT_KID = "root-1"
REQUEST = Request("api/payments/refunds/o-123", "post", {"amount": 4999})
ROOT_CAPS = [
    {"res": "api/payments/refunds/*", "act": ["post"], "if": {"amount": {"le": 5000}}},
    {"res": "db/orders/**", "act": ["select"], "if": {"customer": {"eq": 42}}},
]
CHILD_CAPS = [
    {"res": "api/payments/refunds/o-123", "act": ["post"], "if": {"amount": {"le": 5000}}},
]
LENGTHS = (3, 5)
REPLAY_ENTRIES = 100_000

# Targets (DESIGN.md "Performance targets" and the performance issue).
TARGET_COLD_OVER_FLOOR = 1.25
TARGET_COLD_OVER_BISCUIT4 = 1.0  # stretch
TARGET_WARM_OVER_BISCUIT4 = 0.5
TARGET_WARM_OVER_BISCUIT_SAME = 1 / 3
TARGET_REPLAY_MB = 50.0


# --- timing -------------------------------------------------------------------


def time_batch(op: Callable[[Any], object], inputs: Sequence[Any]) -> float:
    """Nanoseconds per call of ``op`` over ``inputs``, collector disabled."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for item in inputs:
            op(item)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / len(inputs)


Op = Callable[[Any], object]
Prepare = Callable[[int], tuple[Op, Sequence[Any]]]


@dataclass
class Case:
    """One measured operation: a name, how many signatures it checks, and
    ``prepare(round)``, which returns (op, inputs) for that round's batch."""

    name: str
    signatures: int
    prepare: Prepare
    samples: list[float] = field(default_factory=list)  # ns per op, one per round
    batch_size: int = 0

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples) / 1000

    @property
    def min_us(self) -> float:
        return min(self.samples) / 1000


# --- Mandate ------------------------------------------------------------------


@dataclass
class World:
    root: Holder
    bundle: TrustBundle

    @classmethod
    def make(cls) -> World:
        root = Holder.generate()
        jwks = {"keys": [{**root.public_jwk, "kid": ROOT_KID, "alg": root.alg}]}
        return cls(root, TrustBundle.from_jwks(jwks))

    def verifier(self) -> Verifier:
        # pop_window is widened so that PoPs made before the timing stay valid
        # for the whole run; it changes no cost.
        return Verifier(self.bundle, audience=AUD, pop_window=300)

    def chain(self, length: int, *, root_ttl_s: int = 900, child_ttl_s: int = 600,
              leaf_use: int | None = None) -> tuple[str, list[Holder]]:
        """A fresh all-Ed25519 chain of ``length`` links, with fresh holder keys;
        ``leaf_use`` on the last link (bench/fleet.py builds its chains here too)."""
        holders = [Holder.generate() for _ in range(length)]
        chain = issue_root(
            alg="EdDSA", kid=ROOT_KID, sign=self.root.sign,
            iss="spiffe://acme.example/orchestrator", sub="agent:support",
            holder_jwk=holders[0].public_jwk, cap=ROOT_CAPS, ttl=root_ttl_s, dpt=length - 1,
        )
        for i in range(1, length):
            chain = holders[i - 1].attenuate(
                chain, sub=f"agent:helper-{i}", holder_jwk=holders[i].public_jwk,
                cap=CHILD_CAPS, ttl=child_ttl_s, dpt=length - 1 - i,
                use=leaf_use if i == length - 1 else None,
            )
        return chain, holders

    def uses(self, length: int, count: int) -> list[tuple[str, str]]:
        """``count`` distinct chains, each with a PoP for REQUEST."""
        out = []
        for _ in range(count):
            chain, holders = self.chain(length)
            out.append((chain, holders[-1].prove(chain, REQUEST, aud=AUD)))
        return out


def forget_keys() -> None:
    """Empty the SDK's process-wide cache of validated keys, if it has one."""
    cache = getattr(sdk_keys, "_KEY_CACHE", None)
    if isinstance(cache, dict):
        cache.clear()


def cold_batch(world: World, data: list[list[tuple[str, str]]]) -> Prepare:
    """Per round: a fresh verifier, an empty key cache, never-seen chains."""
    def prepare(r: int) -> tuple[Op, Sequence[Any]]:
        verifier = world.verifier()
        forget_keys()

        def op(use: tuple[str, str]) -> object:
            return verifier.verify(use[0], REQUEST, pop=use[1])

        return op, data[r]

    return prepare


def warm_batch(verifier: Verifier, chain: str, data: list[list[str]]) -> Prepare:
    """Per round: the same (already verified) chain, a fresh PoP per use."""
    def op(pop: str) -> object:
        return verifier.verify(chain, REQUEST, pop=pop)

    return lambda r: (op, data[r])


def mandate_cases(world: World, rounds: int, cold_n: int, warm_n: int) -> list[Case]:
    cases = []
    for length in LENGTHS:
        cold_inputs = [world.uses(length, cold_n) for _ in range(rounds + 1)]
        chain, holders = world.chain(length)
        verifier = world.verifier()
        verifier.verify(chain, REQUEST, pop=holders[-1].prove(chain, REQUEST, aud=AUD))
        pops = [
            [holders[-1].prove(chain, REQUEST, aud=AUD) for _ in range(warm_n)]
            for _ in range(rounds + 1)
        ]
        cases.append(Case(f"mandate cold {length} links + PoP", length + 1,
                          cold_batch(world, cold_inputs)))
        cases.append(Case(f"mandate warm {length} links + PoP", length + 1,
                          warm_batch(verifier, chain, pops)))
    return cases


def same_batch(op: Op, inputs: Sequence[Any]) -> Prepare:
    """Every round times ``op`` over the same inputs."""
    return lambda r: (op, inputs)


# --- signature floor ----------------------------------------------------------


def floor_cases(world: World, n: int) -> tuple[Case, Case, int]:
    """One libsodium Ed25519 verify (the SDK's, the floor) on a message the
    links' mean size; and, for reference, OpenSSL's (what PyJWT uses)."""
    chain, holders = world.chain(3)
    pop = holders[-1].prove(chain, REQUEST, aud=AUD)
    tokens = [*chain.split("~"), pop]
    size = round(statistics.mean(len(t.rsplit(".", 1)[0]) for t in tokens))
    message = os.urandom(size)
    signed = world.root.sign(message) + message
    public = b64url_decode(world.root.public_jwk["x"])

    openssl_key = Ed25519PublicKey.from_public_bytes(public)

    def op(sm: bytes) -> object:
        return nacl.bindings.crypto_sign_open(sm, public)

    def openssl(sm: bytes) -> object:
        openssl_key.verify(sm[:64], sm[64:])
        return None

    return (
        Case("Ed25519 verify (libsodium), 1 signature", 1, same_batch(op, [signed] * n)),
        Case("Ed25519 verify (OpenSSL), reference", 1, same_batch(openssl, [signed] * (n // 2))),
        size,
    )


# --- biscuit-python -----------------------------------------------------------

BISCUIT_AUTHORITY = """
user("agent:support");
right("api/payments/refunds", "post");
right("db/orders", "select");
check if time($t), $t <= {exp};
"""
BISCUIT_BLOCK = """
check if resource($r), $r.starts_with("api/payments/refunds/o-123");
check if operation("post");
check if amount($a), $a <= 5000;
check if time($t), $t <= {exp};
"""
BISCUIT_AUTHORIZER = """
time({now});
resource("api/payments/refunds/o-123");
operation("post");
amount(4999);
allow if resource($r), operation($op), right($p, $op), $r.starts_with($p);
"""


def biscuit_token(blocks: int) -> tuple[bytes, biscuit_auth.PublicKey]:
    """An authority block and ``blocks - 1`` attenuation blocks with checks."""
    keys = biscuit_auth.KeyPair()
    exp = datetime.fromtimestamp(time.time() + 900, UTC)
    token = biscuit_auth.BiscuitBuilder(BISCUIT_AUTHORITY, {"exp": exp}).build(keys.private_key)
    for _ in range(blocks - 1):
        token = token.append(biscuit_auth.BlockBuilder(BISCUIT_BLOCK, {"exp": exp}))
    return bytes(token.to_bytes()), keys.public_key


def biscuit_limits() -> Any:
    """biscuit's default limits, with 50 ms instead of 1 ms of Datalog time: on a
    busy 2-core machine a descheduled authorizer otherwise fails now and then."""
    builder: Any = biscuit_auth.AuthorizerBuilder()  # the stubs lack the limits API
    limits = builder.limits()
    limits.max_time = timedelta(milliseconds=50)
    return limits


def biscuit_verify(data: bytes, root: biscuit_auth.PublicKey, limits: Any) -> int:
    """What a service does per request: parse and check every block's
    signature, then build an authorizer with the request's facts and run it."""
    token = biscuit_auth.Biscuit.from_bytes(data, root)
    builder: Any = biscuit_auth.AuthorizerBuilder(BISCUIT_AUTHORIZER, {"now": datetime.now(UTC)})
    builder.set_limits(limits)
    result: int = builder.build(token).authorize()
    return result


def biscuit_cases(n: int) -> tuple[list[Case], dict[int, int]]:
    cases, sizes = [], {}
    limits = biscuit_limits()
    for blocks in (3, 4, 5):
        data, root = biscuit_token(blocks)
        if biscuit_verify(data, root, limits) != 0:
            raise RuntimeError("biscuit token was not authorized")
        sizes[blocks] = len(data)
        op = functools.partial(biscuit_verify, root=root, limits=limits)
        cases.append(Case(f"biscuit {blocks} blocks", blocks, same_batch(op, [data] * n)))
    return cases, sizes


# --- PyJWT --------------------------------------------------------------------


def decode_all(jobs: Sequence[tuple[str, Ed25519PublicKey, str | None]]) -> None:
    for token, key, aud in jobs:
        jwt.decode(token, key, algorithms=["EdDSA"], audience=aud)


def pyjwt_cases(world: World, n: int) -> list[Case]:
    """PyJWT decoding a chain's links and its PoP, one jwt.decode each."""
    cases = []
    for length in LENGTHS:
        chain, holders = world.chain(length)
        pop = holders[-1].prove(chain, REQUEST, aud=AUD)
        signers = [world.root, *holders]
        keys = [
            Ed25519PublicKey.from_public_bytes(b64url_decode(h.public_jwk["x"]))
            for h in signers
        ]
        # (token, key, audience): link i is checked with the key of holder i-1.
        jobs: list[tuple[str, Ed25519PublicKey, str | None]] = [
            (token, keys[i], None) for i, token in enumerate(chain.split("~"))
        ]
        jobs.append((pop, keys[length], AUD))
        decode_all(jobs)
        cases.append(Case(f"pyjwt {length + 1} EdDSA tokens", length + 1,
                          same_batch(decode_all, [jobs] * n)))
    return cases


# --- memory -------------------------------------------------------------------


def replay_store_bytes(entries: int) -> int:
    """tracemalloc's current size of a MemoryReplayStore holding ``entries``."""
    leaf_hash = sha256_b64(b"leaf")
    keys = ["rp|" + leaf_hash + "|" + new_jti() for _ in range(entries)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = MemoryReplayStore()
        for key in keys:
            store.add(key, 3600)
        assert len(store) == entries
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


# --- profile ------------------------------------------------------------------


def profile_cold(world: World, count: int, top: int) -> None:
    """cProfile of ``count`` cold 3-link verifications, top functions by tottime."""
    uses = world.uses(3, count)
    verifier = world.verifier()
    forget_keys()
    profiler = cProfile.Profile()
    profiler.enable()
    for chain, pop in uses:
        verifier.verify(chain, REQUEST, pop=pop)
    profiler.disable()
    print(f"\ncProfile: {count} cold verifications of a 3-link chain + PoP")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


# --- report -------------------------------------------------------------------


def ratio_rows(by: dict[str, Case], floor: Case) -> list[tuple[str, float, float | None]]:
    """(description, value, target or None)."""
    def us(name: str) -> float:
        return by[name].median_us

    rows: list[tuple[str, float, float | None]] = []
    for n in LENGTHS:
        sigs = n + 1
        cold, warm = us(f"mandate cold {n} links + PoP"), us(f"mandate warm {n} links + PoP")
        floor_us = floor.median_us * sigs
        rows += [
            (f"cold {n}+PoP / signature floor ×{sigs}", cold / floor_us, TARGET_COLD_OVER_FLOOR),
            (f"cold {n}+PoP / biscuit {n} blocks", cold / us(f"biscuit {n} blocks"), None),
            (f"warm {n}+PoP / biscuit {n} blocks", warm / us(f"biscuit {n} blocks"),
             TARGET_WARM_OVER_BISCUIT_SAME),
            (f"cold {n}+PoP / pyjwt {sigs} tokens", cold / us(f"pyjwt {sigs} EdDSA tokens"), None),
            (f"warm {n}+PoP / pyjwt {sigs} tokens", warm / us(f"pyjwt {sigs} EdDSA tokens"), None),
        ]
        if n == 3:
            rows += [
                ("cold 3+PoP / biscuit 4 blocks (same signatures)",
                 cold / us("biscuit 4 blocks"), TARGET_COLD_OVER_BISCUIT4),
                ("warm 3+PoP / biscuit 4 blocks (same signatures)",
                 warm / us("biscuit 4 blocks"), TARGET_WARM_OVER_BISCUIT4),
            ]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results as JSON to FILE ('-': stdout)")
    parser.add_argument("--rounds", type=int, default=60, help="batches per case (default 60)")
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of cold 3-link verifications")
    args = parser.parse_args(argv)
    rounds = max(args.rounds, 3)
    started = time.perf_counter()

    world = World.make()
    # Batch sizes: about 20-30 ms of work per batch for every case.
    floor, openssl, message_size = floor_cases(world, n=400)
    biscuits, biscuit_sizes = biscuit_cases(n=60)
    cases = [
        *mandate_cases(world, rounds, cold_n=40, warm_n=200),
        floor, openssl, *biscuits, *pyjwt_cases(world, n=60),
    ]
    sample_chain = {n: world.chain(n)[0] for n in LENGTHS}

    # One unrecorded warm-up round, then the interleaved rounds.
    for r in range(rounds + 1):
        for case in cases:
            op, inputs = case.prepare(r)
            per_op = time_batch(op, inputs)
            case.batch_size = len(inputs)
            if r:
                case.samples.append(per_op)

    replay_bytes = replay_store_bytes(REPLAY_ENTRIES)
    by = {case.name: case for case in cases}
    ratios = ratio_rows(by, floor)
    elapsed = time.perf_counter() - started

    print(f"Mandate verification benchmark — {os.cpu_count()} CPU(s), "
          f"Python {platform.python_version()}, {rounds} rounds, gc disabled while timing")
    print(f"median over rounds of per-op time in a batch; µs/sig = median / signatures; "
          f"floor message {message_size} bytes\n")
    width = max(len(c.name) for c in cases)
    print(f"{'case':<{width}}  {'median µs':>10}  {'min µs':>8}  {'sigs':>4}  {'µs/sig':>7}")
    for case in cases:
        print(f"{case.name:<{width}}  {case.median_us:>10.1f}  {case.min_us:>8.1f}  "
              f"{case.signatures:>4}  {case.median_us / case.signatures:>7.1f}")
    for n in LENGTHS:
        print(f"{f'signature floor ×{n + 1}':<{width}}  {floor.median_us * (n + 1):>10.1f}")

    print()
    rwidth = max(len(r[0]) for r in ratios)
    print(f"{'ratio (medians)':<{rwidth}}  {'value':>6}  {'target':>7}  verdict")
    for label, value, target in ratios:
        verdict = "" if target is None else ("ok" if value <= target else "MISSED")
        shown = "" if target is None else f"≤ {target:.2f}"
        print(f"{label:<{rwidth}}  {value:>6.2f}  {shown:>7}  {verdict}")

    replay_mb = replay_bytes / 1e6
    verdict = "ok" if replay_mb <= TARGET_REPLAY_MB else "MISSED"
    print(f"\nMemoryReplayStore, {REPLAY_ENTRIES:,} entries: {replay_mb:.1f} MB "
          f"({replay_bytes / REPLAY_ENTRIES:.0f} B/entry; target ≤ {TARGET_REPLAY_MB:.0f} MB) "
          f"{verdict}")
    print("token bytes: " + ", ".join(
        [f"mandate {n} links {len(sample_chain[n])}" for n in LENGTHS]
        + [f"biscuit {b} blocks {s}" for b, s in biscuit_sizes.items()]
    ))
    print(f"run time {elapsed:.0f} s")

    if args.json:
        result = {
            "machine": {
                "cpus": os.cpu_count(), "python": platform.python_version(),
                "platform": platform.platform(), "processor": platform.processor(),
            },
            "versions": {p: version(p) for p in ("pynacl", "cryptography", "pyjwt",
                                                 "biscuit-python")},
            "method": {"rounds": rounds, "statistic": "median of per-op batch means",
                       "gc_during_timing": "disabled", "floor_message_bytes": message_size},
            "cases": {
                c.name: {"median_us": round(c.median_us, 2), "min_us": round(c.min_us, 2),
                         "signatures": c.signatures,
                         "batch_size": c.batch_size}
                for c in cases
            },
            "ratios": {label: {"value": round(value, 3), "target": target,
                               "met": None if target is None else value <= target}
                       for label, value, target in ratios},
            "replay_store": {"entries": REPLAY_ENTRIES, "bytes": replay_bytes,
                             "target_bytes": int(TARGET_REPLAY_MB * 1e6)},
            "token_bytes": {**{f"mandate_{n}_links": len(sample_chain[n]) for n in LENGTHS},
                            **{f"biscuit_{b}_blocks": s for b, s in biscuit_sizes.items()}},
            "run_seconds": round(elapsed, 1),
        }
        write_json(result, args.json)

    if args.profile:
        profile_cold(world, count=500, top=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
