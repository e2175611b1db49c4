#!/usr/bin/env python3
"""Resource exhaustion: what hostile sizes cost the verifier (docs/security.md).

Measured:

* Refusal time of oversize and deeply nested inputs: a chain over 65,536
  bytes, a chain of 17 links, a link over 8,192 bytes, a PoP over 4,096
  bytes (all refused by the size checks of spec §8 step 1, before any
  parsing), and a link nested 9 deep, ~3,000 deep (balanced, the deepest
  that fits in 8,192 bytes) and 4,000 deep (brackets left open) — refused
  while its JSON is parsed (step 2, ``malformed``).
* The worst-case valid chain: 16 Ed25519 links with 64 capabilities each,
  every link padded to what the limits let it hold (the leaf to just under
  8,192 bytes, the others sharing what is left of 65,536 bytes); the request
  matches only the last capability of every link, so every capability is
  tried. Verified cold (fresh verifier, empty key cache) and warm (the same
  chain again, fresh PoP).
* MemoryReplayStore and MemoryUseStore fed distinct nonces up to their bound
  (the default 1,000,000, and 100,000): time per accepted entry, tracemalloc
  size at the bound, time of a refused entry past the bound (StoreError),
  and what a Verifier using a full store answers.

Times are medians over repetitions (gc disabled while timed). Run:
``python bench/limits.py [--json FILE]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

from _report import write_json  # bench/, first on sys.path when run

from verifier_sdk import (
    Holder,
    MemoryReplayStore,
    MemoryUseStore,
    Request,
    StoreError,
    TrustBundle,
    VerificationError,
    Verifier,
    decode_unverified,
    issue_root,
)
from verifier_sdk import _keys as sdk_keys
from verifier_sdk._encoding import b64url_encode, sha256_b64
from verifier_sdk._link import (
    MAX_CHAIN_BYTES,
    MAX_LINK_BYTES,
    MAX_LINKS,
    MAX_POP_BYTES,
    encode_jws,
)

AUD = "payments-api"
ROOT_KID = "root-1"
LINK_TYP = "mandate+jwt"
REQUEST = Request("r/o", "post", {"n": 5})
CAPS_PER_LINK = 64
TARGET_REJECT_US = 1000.0
STORE_NONCES = 1_000_000
SMALL_BOUND = 100_000
CHUNK = 10_000


def forget_keys() -> None:
    cache = getattr(sdk_keys, "_KEY_CACHE", None)
    if isinstance(cache, dict):
        cache.clear()


def median_us(op: Callable[[], object], repeat: int) -> float:
    """Median of ``repeat`` single calls of ``op``, in µs (gc disabled)."""
    samples = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeat):
            start = time.perf_counter_ns()
            op()
            samples.append(time.perf_counter_ns() - start)
    finally:
        gc.enable()
    return statistics.median(samples) / 1000


def refusal(verifier: Verifier, chain: str, pop: str | None) -> tuple[str, int | None]:
    try:
        verifier.verify(chain, REQUEST, pop=pop)
    except VerificationError as exc:
        return exc.code, exc.link
    raise AssertionError("accepted")


# --- the worst-case valid chain ------------------------------------------------


def caps(pad: int, extra: int = 0, count: int = CAPS_PER_LINK) -> list[dict[str, Any]]:
    """``count - 1`` capabilities whose resource the request misses, padded to
    ``pad`` characters (``extra`` more on the first), then the one it matches.
    The chain limit leaves about 40 bytes of JSON per capability on 15 links,
    so the misses are short resource patterns."""
    out: list[dict[str, Any]] = [
        {"res": f"r/{i:02d}" + "x" * (pad + (extra if i == 0 else 0)), "act": ["post"]}
        for i in range(count - 1)
    ]
    out.append({"res": "r/*", "act": ["post"], "if": {"n": {"le": 5}}})
    return out


def largest(make: Callable[[int, int], str], limit: int) -> str:
    """The largest token ``make(pad, extra)`` gives within ``limit`` bytes."""
    def fits(pad: int, extra: int) -> str | None:
        try:
            token = make(pad, extra)
        except ValueError:  # the SDK's builder refuses a link over the limit
            return None
        return token if len(token) <= limit else None

    lo, hi = 0, 200
    while lo < hi:  # the largest pad, the same on every capability, that fits
        mid = (lo + hi + 1) // 2
        if fits(mid, 0):
            lo = mid
        else:
            hi = mid - 1
    best, extra = fits(lo, 0), 1
    if best is None:
        raise ValueError("64 capabilities do not fit in the limit")
    while (token := fits(lo, extra)) is not None:  # then more on the first one
        best, extra = token, extra + 1
    return best


def worst_chain(root: Holder, now: int) -> tuple[str, list[Holder]]:
    """16 links × 64 capabilities, each link as large as the limits allow."""
    holders = [Holder.generate() for _ in range(MAX_LINKS)]
    leaf_limit = MAX_LINK_BYTES
    # 64 bytes kept free, so that the leaf's twin with a 65th capability is
    # refused for its link size, not for the chain's.
    other_limit = (MAX_CHAIN_BYTES - (MAX_LINKS - 1) - leaf_limit - 64) // (MAX_LINKS - 1)

    def root_link(pad: int, extra: int) -> str:
        return issue_root(alg="EdDSA", kid=ROOT_KID, sign=root.sign, iss="spiffe://acme/orch",
                          sub="agent:h-00", holder_jwk=holders[0].public_jwk,
                          cap=caps(pad, extra), ttl=900, dpt=MAX_LINKS - 1, now=now)

    chain = largest(root_link, other_limit)
    for i in range(1, MAX_LINKS):
        limit = leaf_limit if i == MAX_LINKS - 1 else other_limit
        prefix = chain

        def child(pad: int, extra: int, i: int = i, prefix: str = prefix) -> str:
            return holders[i - 1].attenuate(
                prefix, sub=f"agent:h-{i:02d}", holder_jwk=holders[i].public_jwk,
                cap=caps(pad, extra), ttl=900, dpt=MAX_LINKS - 1 - i, now=now,
            ).rsplit("~", 1)[1]

        chain = prefix + "~" + largest(child, limit)
    return chain, holders


def with_one_more_cap(chain: str, signer: Holder) -> str:
    """The chain with a 65th capability on its leaf (re-signed by its parent)."""
    tokens = chain.split("~")
    header, payload = decode_unverified(chain)[-1]
    payload["cap"].append({"res": "r/o", "act": ["post"]})
    tokens[-1] = encode_jws(header, payload, signer.sign)
    return "~".join(tokens)


# --- hostile inputs --------------------------------------------------------------


def raw_link(sign: Callable[[bytes], bytes], payload_json: bytes) -> str:
    head = b64url_encode(json.dumps({"alg": "EdDSA", "typ": LINK_TYP, "kid": ROOT_KID},
                                    separators=(",", ":")).encode())
    signing_input = head + "." + b64url_encode(payload_json)
    return signing_input + "." + b64url_encode(sign(signing_input.encode()))


def nested(depth: int, closed: bool = True) -> bytes:
    """A payload whose ``cap`` member holds lists nested to total ``depth``
    (the top-level object is depth 1)."""
    inner = depth - 1
    return b'{"v":1,"cap":' + b"[" * inner + (b"]" * inner + b"}" if closed else b"")


def hostile_cases(root: Holder, chain: str, pop: str, leaf_signer: Holder
                  ) -> list[tuple[str, str, str | None]]:
    """(name, chain, pop): each must be refused at step 1 or 2."""
    link = chain.split("~", maxsplit=1)[0]
    balanced = 1
    while len(raw_link(root.sign, nested(balanced + 1))) <= MAX_LINK_BYTES:
        balanced += 1
    return [
        (f"chain over {MAX_CHAIN_BYTES:,} bytes", chain + "~" + "A" * 2_000, pop),
        (f"{MAX_LINKS + 1}-link chain", "~".join([link] * (MAX_LINKS + 1)), pop),
        (f"link over {MAX_LINK_BYTES:,} bytes (65 caps)", with_one_more_cap(chain, leaf_signer),
         pop),
        (f"PoP over {MAX_POP_BYTES:,} bytes", chain, pop + "A" * MAX_POP_BYTES),
        ("link nested 9 deep", raw_link(root.sign, nested(9)), pop),
        (f"link nested {balanced:,} deep (balanced)", raw_link(root.sign, nested(balanced)), pop),
        ("link nested 4,000 deep (left open)", raw_link(root.sign, nested(4_000, closed=False)),
         pop),
    ]


# --- stores ------------------------------------------------------------------------


def nonces(start: int, count: int) -> list[str]:
    leaf = sha256_b64(b"leaf")
    return [f"rp|{leaf}|{i:022d}" for i in range(start, start + count)]


def fill(store: MemoryReplayStore | MemoryUseStore, bound: int, traced: bool
         ) -> tuple[list[float], int]:
    """Feed ``bound`` distinct keys; per-add ns of each chunk, traced bytes."""
    add: Callable[[str], object]
    if isinstance(store, MemoryReplayStore):
        add = lambda key: store.add(key, 3600)  # noqa: E731
    else:
        add = lambda key: store.consume({key: 1}, 3600)  # noqa: E731
    per_add, before = [], 0
    if traced:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    try:
        for start in range(0, bound, CHUNK):
            keys = nonces(start, min(CHUNK, bound - start))
            gc.disable()
            t0 = time.perf_counter_ns()
            for key in keys:
                add(key)
            per_add.append((time.perf_counter_ns() - t0) / len(keys))
            gc.enable()
        del keys
        size = tracemalloc.get_traced_memory()[0] - before if traced else 0
    finally:
        gc.enable()
        if traced:
            tracemalloc.stop()
    assert len(store) == bound
    return per_add, size


def past_bound_us(store: MemoryReplayStore | MemoryUseStore, bound: int, repeat: int) -> float:
    """Median time of a refused add at the bound (each raises StoreError)."""
    keys = iter(nonces(STORE_NONCES, repeat))

    def op() -> None:
        key = next(keys)
        try:
            if isinstance(store, MemoryReplayStore):
                store.add(key, 3600)
            else:
                store.consume({key: 1}, 3600)
        except StoreError:
            return
        raise AssertionError("a full store accepted a new key")

    result = median_us(op, repeat)
    assert len(store) == bound
    return result


def store_rows(bound: int) -> list[dict[str, Any]]:
    rows = []
    for cls in (MemoryReplayStore, MemoryUseStore):
        per_add, _ = fill(cls(max_entries=bound), bound, traced=False)
        timed = cls(max_entries=bound)
        _, size = fill(timed, bound, traced=True)
        refused = past_bound_us(timed, bound, repeat=5 if bound >= 1_000_000 else 21)
        rows.append({"store": cls.__name__, "max_entries": bound,
                     "add_us": round(statistics.median(per_add) / 1000, 3),
                     "bytes_at_bound": size, "bytes_per_entry": round(size / bound, 1),
                     "refused_add_us": round(refused, 1),
                     "offered_past_bound_not_timed": STORE_NONCES - bound})
    return rows


def fail_closed(world_root: Holder, bundle: TrustBundle) -> dict[str, Any]:
    """A Verifier whose replay (or use) store is full refuses, and the store
    stays at its bound."""
    holder = Holder.generate()
    now = int(time.time())
    out: dict[str, Any] = {}
    for which in ("replay", "use"):
        bound = 1_000
        replay, uses = MemoryReplayStore(max_entries=bound), MemoryUseStore(max_entries=bound)
        for key in nonces(0, bound):
            if which == "replay":
                replay.add(key, 3600)
            else:
                uses.consume({key: 1}, 3600)
        verifier = Verifier(bundle, audience=AUD, replay_store=replay, use_store=uses)
        chain = issue_root(alg="EdDSA", kid=ROOT_KID, sign=world_root.sign, iss="spiffe://acme/o",
                           sub="agent:x", holder_jwk=holder.public_jwk, cap=caps(0, 0, 1),
                           ttl=900, use=5, now=now - 1)
        pop = holder.prove(chain, REQUEST, aud=AUD, now=now)
        code, _ = refusal(verifier, chain, pop)
        full = replay if which == "replay" else uses
        out[which] = {"code": code, "entries_after": len(full), "max_entries": bound}
    return out


# --- report ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results as JSON to FILE ('-': stdout)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    root = Holder.generate()
    bundle = TrustBundle.from_jwks({"keys": [{**root.public_jwk, "kid": ROOT_KID,
                                              "alg": root.alg}]})
    now = int(time.time()) - 5
    chain, holders = worst_chain(root, now)
    links = chain.split("~")
    leaf = holders[-1]

    def verifier() -> Verifier:
        return Verifier(bundle, audience=AUD, pop_window=600)

    # (b) worst-case valid chain, cold and warm.
    cold_inputs = [leaf.prove(chain, REQUEST, aud=AUD) for _ in range(40)]
    cold_iter = iter(cold_inputs)

    def cold() -> object:
        forget_keys()
        return verifier().verify(chain, REQUEST, pop=next(cold_iter))

    cold_ms = median_us(cold, len(cold_inputs)) / 1000
    warm_verifier = verifier()
    warm_verifier.verify(chain, REQUEST, pop=leaf.prove(chain, REQUEST, aud=AUD))
    warm_pops = iter([leaf.prove(chain, REQUEST, aud=AUD) for _ in range(200)])
    warm_ms = median_us(lambda: warm_verifier.verify(chain, REQUEST, pop=next(warm_pops)),
                        200) / 1000

    # (a) hostile inputs.
    pop = leaf.prove(chain, REQUEST, aud=AUD)
    rejections: list[dict[str, Any]] = []
    for name, bad_chain, bad_pop in hostile_cases(root, chain, pop, holders[-2]):
        v = verifier()
        code, link = refusal(v, bad_chain, bad_pop)

        def refuse(v: Verifier = v, c: str = bad_chain, p: str | None = bad_pop) -> object:
            return refusal(v, c, p)

        us = median_us(refuse, 201)
        size = len(bad_chain) if bad_pop is pop else len(bad_pop or "")
        rejections.append({"input": name, "bytes": size, "code": code, "link": link,
                           "median_us": round(us, 1), "met": us <= TARGET_REJECT_US})

    # (c) stores.
    stores = store_rows(STORE_NONCES) + store_rows(SMALL_BOUND)
    closed = fail_closed(root, bundle)
    elapsed = time.perf_counter() - started

    print(f"Mandate resource-exhaustion benchmark — {os.cpu_count()} CPU(s), "
          f"Python {platform.python_version()}, medians, gc disabled while timing\n")
    width = max(len(r["input"]) for r in rejections)
    print(f"{'hostile input':<{width}}  {'bytes':>6}  {'refused as':<18}  {'median µs':>9}  "
          f"target ≤ {TARGET_REJECT_US:.0f} µs")
    for r in rejections:
        refused = r["code"] + ("" if r["link"] is None else f" (link {r['link']})")
        print(f"{r['input']:<{width}}  {r['bytes']:>6}  {refused:<18}  {r['median_us']:>9.1f}  "
              f"{'ok' if r['met'] else 'MISSED'}")

    sizes = [len(t) for t in links]
    print(f"\nworst-case valid chain: {len(links)} links × {CAPS_PER_LINK} capabilities, "
          f"{len(chain):,} bytes (limit {MAX_CHAIN_BYTES:,}); links 0–14 "
          f"{min(sizes[:-1]):,}–{max(sizes[:-1]):,} bytes, leaf {sizes[-1]:,} bytes "
          f"(limit {MAX_LINK_BYTES:,}); request matches only capability 64 of each link")
    print(f"  verify cold (fresh verifier, empty key cache): {cold_ms:.2f} ms (median of 40)")
    print(f"  verify warm (cached links, fresh PoP):         {warm_ms:.2f} ms (median of 200)")

    print(f"\nstores fed distinct nonces (keys of {len(nonces(0, 1)[0])} characters, ttl 1 h)")
    print(f"{'store':<18}  {'max_entries':>11}  {'µs/add':>6}  {'MB at bound':>11}  "
          f"{'B/entry':>7}  {'refused add µs':>14}")
    for s in stores:
        print(f"{s['store']:<18}  {s['max_entries']:>11,}  {s['add_us']:>6.2f}  "
              f"{s['bytes_at_bound'] / 1e6:>11.1f}  {s['bytes_per_entry']:>7.0f}  "
              f"{s['refused_add_us']:>14.1f}")
    print("  past the bound every add raises StoreError and the store stays at max_entries; "
          "a Verifier using a full store refuses: "
          + ", ".join(f"{k} store → {v['code']} ({v['entries_after']}/{v['max_entries']} entries)"
                      for k, v in closed.items()))
    print(f"run time {elapsed:.0f} s")

    if args.json:
        result = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "rejections": rejections,
            "target_reject_us": TARGET_REJECT_US,
            "worst_chain": {"links": len(links), "caps_per_link": CAPS_PER_LINK,
                            "chain_bytes": len(chain), "link_bytes": sizes,
                            "cold_ms": round(cold_ms, 3), "warm_ms": round(warm_ms, 3)},
            "stores": stores,
            "fail_closed": closed,
            "run_seconds": round(elapsed, 1),
        }
        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
