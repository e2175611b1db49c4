"""Hypothesis properties: attenuation never widens (spec §3.3, §4.4), and any
damage to a chain or PoP is refused with a VerificationError (spec §8, §9)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from helpers import REFUND, World, b64, link_hash
from hypothesis import event, example, given
from hypothesis import strategies as st

from verifier_sdk import Capability, Request, VerificationError, Verifier, decode_unverified

# One world for every example: a function-scoped fixture would be shared
# across examples anyway, and key generation per example buys nothing.
W = World()
CHAIN = W.chain3()
POP = W.prove(W.c, CHAIN, REFUND)

LITERALS = ("a", "b", "c")
ACTIONS = ("get", "put", "del")
STRINGS = ("a", "ab", "b")
ATTRS = ("x", "y")

# --- a reference matcher, written from spec §4.2 alone ----------------------


def ref_resource(pattern: str, res: str) -> bool:
    p, r = pattern.split("/"), res.split("/")
    if p[-1] == "**":
        head = p[:-1]
        return len(r) > len(head) and all(a in ("*", b) for a, b in zip(head, r, strict=False))
    return len(p) == len(r) and all(a in ("*", b) for a, b in zip(p, r, strict=True))


def ref_holds(op: str, bound: Any, value: Any) -> bool:
    if op == "eq":
        return type(value) is type(bound) and bool(value == bound)
    if op == "in":
        return any(type(value) is type(item) and value == item for item in bound)
    if op == "prefix":
        return type(value) is str and value.startswith(bound)
    if type(value) is not int:
        return False
    limit: int = bound
    return {
        "lt": value < limit, "le": value <= limit, "gt": value > limit, "ge": value >= limit,
    }[op]


def ref_matches(cap: dict[str, Any], req: Request) -> bool:
    if not ref_resource(cap["res"], req.res):
        return False
    if cap["act"] != ["*"] and req.act not in cap["act"]:
        return False
    for attr, ops in cap.get("if", {}).items():
        if attr not in req.ctx:
            return False
        if not all(ref_holds(op, bound, req.ctx[attr]) for op, bound in ops.items()):
            return False
    return True


# --- strategies ---------------------------------------------------------------

ints = st.integers(0, 3)
strs = st.sampled_from(STRINGS)
ctx_values = st.one_of(ints, strs, st.booleans())


@st.composite
def patterns(draw: st.DrawFn) -> str:
    fixed = draw(st.lists(st.sampled_from((*LITERALS, "*")), min_size=0, max_size=3))
    tail = not fixed or draw(st.booleans())
    return "/".join(fixed + (["**"] if tail else []))


@st.composite
def constraints(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(
        st.lists(st.sampled_from(("eq", "in", "lt", "le", "gt", "ge", "prefix")),
                 min_size=1, max_size=3, unique=True)
    )
    ops: dict[str, Any] = {}
    for op in names:
        if op == "eq":
            ops[op] = draw(ctx_values)
        elif op == "in":
            ops[op] = draw(st.lists(st.one_of(ints, strs), min_size=1, max_size=3))
        elif op == "prefix":
            ops[op] = draw(st.sampled_from(("", "a", "ab")))
        else:
            ops[op] = draw(st.integers(-1, 4))
    return ops


@st.composite
def capabilities(draw: st.DrawFn) -> dict[str, Any]:
    cap: dict[str, Any] = {
        "res": draw(patterns()),
        "act": draw(st.one_of(
            st.just(["*"]),
            st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=3, unique=True),
        )),
    }
    cond = draw(st.dictionaries(st.sampled_from(ATTRS), constraints(), max_size=2))
    if cond:
        cap["if"] = cond
    return cap


@st.composite
def requests_near(draw: st.DrawFn, caps: list[dict[str, Any]]) -> Request:
    """A request, most often shaped after one of ``caps`` so that it hits."""
    if draw(st.integers(0, 3)) == 0:
        segments = draw(st.lists(st.sampled_from(LITERALS), min_size=1, max_size=4))
        act = draw(st.sampled_from(ACTIONS))
    else:
        cap = draw(st.sampled_from(caps))
        segments = []
        for seg in cap["res"].split("/"):
            if seg == "*":
                segments.append(draw(st.sampled_from(LITERALS)))
            elif seg == "**":
                segments += draw(st.lists(st.sampled_from(LITERALS), min_size=1, max_size=2))
            else:
                segments.append(seg)
        act = draw(st.sampled_from(ACTIONS if cap["act"] == ["*"] else cap["act"]))
    ctx = draw(st.dictionaries(st.sampled_from(ATTRS), ctx_values, max_size=2))
    return Request("/".join(segments), act, ctx)


def build_chain(caps: list[list[dict[str, Any]]]) -> tuple[str, Any]:
    """root → a → b (→ c) carrying ``caps`` link by link; returns (chain, leaf holder)."""
    chain = W.issue(cap=caps[0], dpt=2)
    chain = W.a.attenuate(chain, sub="agent:one", holder_jwk=W.b.public_jwk, cap=caps[1],
                          ttl=300, dpt=1, now=W.now - 5)
    if len(caps) == 2:
        return chain, W.b
    chain = W.b.attenuate(chain, sub="agent:two", holder_jwk=W.c.public_jwk, cap=caps[2],
                          ttl=120, dpt=0, now=W.now - 1)
    return chain, W.c


# --- (a) attenuation never widens --------------------------------------------


@given(data=st.data())
def test_chain_allows_exactly_what_every_link_allows(data: st.DataObject) -> None:
    n = data.draw(st.integers(2, 3), label="links")
    caps = [data.draw(st.lists(capabilities(), min_size=1, max_size=3)) for _ in range(n)]
    req = data.draw(requests_near([c for link in caps for c in link]), label="request")

    per_link = []
    for link_caps in caps:
        sdk = [Capability.parse(c).matches(req) for c in link_caps]
        assert sdk == [ref_matches(c, req) for c in link_caps], (link_caps, req)
        per_link.append(any(sdk))
    lowest_denying = next((i for i, ok in enumerate(per_link) if not ok), None)

    event(f"allowed by the chain: {lowest_denying is None}; denied at: {lowest_denying}")
    chain, leaf = build_chain(caps)
    pop = W.prove(leaf, chain, req)
    verifier = W.verifier()
    if lowest_denying is None:
        decision = verifier.verify(chain, req, pop=pop)
        assert decision.request == req
    else:
        with pytest.raises(VerificationError) as info:
            verifier.verify(chain, req, pop=pop)
        assert info.value.code == "denied"
        assert info.value.link == lowest_denying


def test_reference_matcher_sanity() -> None:
    """The oracle itself must be able to say no, or the property above is empty."""
    cap = {"res": "a/*/**", "act": ["get"], "if": {"x": {"eq": 1}}}
    assert ref_matches(cap, Request("a/b/c", "get", {"x": 1}))
    assert not ref_matches(cap, Request("a/b", "get", {"x": 1}))
    assert not ref_matches(cap, Request("a/b/c", "put", {"x": 1}))
    assert not ref_matches(cap, Request("a/b/c", "get", {"x": True}))
    assert not ref_matches(cap, Request("a/b/c", "get", {}))


# --- (b) damage to a valid chain or PoP is refused ----------------------------


def assert_refused(chain: str, pop: str) -> None:
    verifier = W.verifier()
    try:
        verifier.verify(chain, REFUND, pop=pop)
    except VerificationError:
        return
    raise AssertionError("a damaged chain or PoP was accepted")


def flip(text: str, pos: int, mask: int, decoding: str) -> str:
    raw = bytearray(text.encode("ascii"))
    raw[pos] ^= mask
    if decoding == "surrogateescape":
        return bytes(raw).decode("utf-8", "surrogateescape")
    return bytes(raw).decode(decoding)


def test_undamaged_chain_and_pop_verify() -> None:
    """The positive twin of every damage property below."""
    assert W.verifier().verify(CHAIN, REFUND, pop=POP).subject == "agent:helper"


decodings = st.sampled_from(("latin-1", "surrogateescape"))


@given(pos=st.integers(0, len(CHAIN) - 1), mask=st.integers(1, 255), decoding=decodings)
@example(pos=CHAIN.index("~"), mask=ord("~") ^ ord("."), decoding="latin-1")
@example(pos=len(CHAIN) - 1, mask=1, decoding="latin-1")
def test_any_flipped_chain_byte_is_refused(pos: int, mask: int, decoding: str) -> None:
    assert_refused(flip(CHAIN, pos, mask, decoding), POP)


@given(pos=st.integers(0, len(POP) - 1), mask=st.integers(1, 255), decoding=decodings)
def test_any_flipped_pop_byte_is_refused(pos: int, mask: int, decoding: str) -> None:
    assert_refused(CHAIN, flip(POP, pos, mask, decoding))


@given(pos=st.integers(0, len(CHAIN) - 1), char=st.characters())
def test_any_replaced_chain_character_is_refused(pos: int, char: str) -> None:
    if CHAIN[pos] != char:
        assert_refused(CHAIN[:pos] + char + CHAIN[pos + 1:], POP)


def test_every_single_bit_flip_at_every_position_is_refused() -> None:
    """Exhaustive over positions (one bit each, cycling), not sampled."""
    for pos in range(len(CHAIN)):
        assert_refused(flip(CHAIN, pos, 1 << (pos % 8), "latin-1"), POP)
    for pos in range(len(POP)):
        assert_refused(CHAIN, flip(POP, pos, 1 << (pos % 8), "latin-1"))


def test_every_truncation_is_refused() -> None:
    """Cutting at a '~' leaves a valid shorter chain: its PoP no longer fits."""
    for end in range(len(CHAIN)):
        assert_refused(CHAIN[:end], POP)
    for end in range(len(POP)):
        assert_refused(CHAIN, POP[:end])


def test_truncation_at_a_link_boundary_fails_on_the_pop() -> None:
    shorter = CHAIN[: CHAIN.rindex("~")]
    with pytest.raises(VerificationError) as info:
        W.verifier().verify(shorter, REFUND, pop=POP)
    assert info.value.code == "pop_invalid"
    assert link_hash(shorter.rsplit("~", 1)[-1]) != link_hash(CHAIN.rsplit("~", 1)[-1])


# --- (c) decode_unverified on arbitrary input ---------------------------------


def unb64(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def check_decode(text: str) -> None:
    """Either a list of (header, payload) dicts or a malformed/too_large error."""
    try:
        decoded = decode_unverified(text)
    except VerificationError as exc:
        refused: VerificationError | None = exc
    else:
        refused = None
        assert all(isinstance(h, dict) and isinstance(p, dict) for h, p in decoded)
    assert refused is None or refused.code in ("malformed", "too_large")


@given(st.text())
def test_decode_unverified_on_text(text: str) -> None:
    check_decode(text)


@given(st.binary(), st.sampled_from(("latin-1", "surrogateescape")))
def test_decode_unverified_on_bytes(raw: bytes, decoding: str) -> None:
    text = (raw.decode("utf-8", "surrogateescape") if decoding == "surrogateescape"
            else raw.decode(decoding))
    check_decode(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=12,
)


@given(
    parts=st.lists(st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary()),
                   min_size=1, max_size=4),
    links=st.integers(1, 3),
)
def test_decode_unverified_on_jws_shaped_text(parts: list[bytes], links: int) -> None:
    token = ".".join(b64(p) for p in parts)
    check_decode("~".join([token] * links))


@given(st.sampled_from(range(3)), st.sampled_from(("cap", "cnf", "aud", "jti", "dpt", "use")),
       json_values)
def test_decode_unverified_on_a_real_chain_with_one_member_replaced(
    index: int, member: str, value: Any
) -> None:
    tokens = CHAIN.split("~")
    header, payload, _ = tokens[index].split(".")
    claims = json.loads(unb64(payload))
    claims[member] = value
    tokens[index] = ".".join((header, b64(json.dumps(claims).encode()), "AAAA"))
    check_decode("~".join(tokens))


def test_fresh_verifier_per_example_is_needed() -> None:
    """Why each damage check builds its own Verifier: a spent PoP is refused anyway."""
    verifier: Verifier = W.verifier()
    pop = W.prove(W.c, CHAIN, REFUND)
    verifier.verify(CHAIN, REFUND, pop=pop)
    with pytest.raises(VerificationError) as info:
        verifier.verify(CHAIN, REFUND, pop=pop)
    assert info.value.code == "replayed"
