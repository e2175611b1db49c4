"""Capability containment for the issuance policy: a table of contained and
not-contained pairs (completeness for the common cases, and a reason for each
denial), and Hypothesis properties for soundness: if ``contains(inner, outer)``,
no request matched by ``inner`` is refused by ``outer``."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import Phase, event, find, given, settings
from hypothesis import strategies as st

from signer._policy import ContainmentResult, contains
from verifier_sdk import Capability, Request

MAX_SAFE = 2**53 - 1


def cap(res: str = "a/b", act: list[str] | None = None, **cond: Any) -> Capability:
    raw: dict[str, Any] = {"res": res, "act": ["get"] if act is None else act}
    if cond:
        raw["if"] = cond
    return Capability.parse(raw)


def n(**ops: Any) -> dict[str, Any]:
    """Shorthand: a constraint on the attribute ``n``."""
    return {"n": ops}


# (id, inner, outer): inner is within outer.
CONTAINED = [
    ("same-literal", cap("a/b"), cap("a/b")),
    ("literal-in-star", cap("a/b"), cap("a/*")),
    ("star-in-star", cap("a/*"), cap("a/*")),
    ("literal-under-double-star", cap("db/orders/42"), cap("db/orders/**")),
    ("deep-literal-under-double-star", cap("a/b/c/d"), cap("a/**")),
    ("star-pattern-under-double-star", cap("a/*/c"), cap("a/**")),
    ("longer-double-star-in-double-star", cap("a/b/**"), cap("a/**")),
    ("double-star-in-itself", cap("a/**"), cap("a/**")),
    ("double-star-in-star-double-star", cap("a/*/**"), cap("*/**")),
    ("anything-in-root-double-star", cap("x/*/y/**"), cap("**")),
    ("action-subset", cap(act=["get"]), cap(act=["get", "put"])),
    ("any-action-in-any", cap(act=["*"]), cap(act=["*"])),
    ("listed-actions-in-any", cap(act=["get", "put"]), cap(act=["*"])),
    ("extra-attribute-is-stricter", cap(n={"eq": 1}), cap()),
    ("extra-attribute-beside-outer-one", cap(n={"le": 3}, m={"eq": "x"}), cap(**n(le=5))),
    ("eq-in-list", cap(**n(eq=2)), cap(**n(**{"in": [1, 2, 3]}))),
    ("list-in-larger-list", cap(**n(**{"in": [1, "a"]})), cap(**n(**{"in": [1, "a", 2]}))),
    ("eq-within-bound", cap(**n(eq=5)), cap(**n(le=5000))),
    ("list-within-range", cap(**n(**{"in": [1, 2]})), cap(**n(ge=0, le=2))),
    ("eq-string-within-prefix", cap(**n(eq="abc")), cap(**n(prefix="ab"))),
    ("eq-bool-in-eq-bool", cap(**n(eq=True)), cap(**n(eq=True))),
    ("list-narrowed-by-bound", cap(**n(**{"in": [1, "a", 7]}, lt=5)), cap(**n(**{"in": [1, "b"]}))),
    ("tighter-upper-bound", cap(**n(le=100)), cap(**n(le=5000))),
    ("lt-within-le", cap(**n(lt=10)), cap(**n(le=9))),
    ("le-within-lt", cap(**n(le=9)), cap(**n(lt=10))),
    ("tighter-lower-bound", cap(**n(gt=5)), cap(**n(ge=0))),
    ("range-within-range", cap(**n(ge=1, le=5)), cap(**n(gt=0, lt=6))),
    ("small-range-in-list", cap(**n(ge=1, le=3)), cap(**n(**{"in": [1, 2, 3, 4]}))),
    ("one-int-range-in-eq", cap(**n(ge=7, le=7)), cap(**n(eq=7))),
    ("range-clipped-to-safe-ints", cap(**n(gt=MAX_SAFE - 3)),
     cap(**n(**{"in": [MAX_SAFE - 2, MAX_SAFE - 1, MAX_SAFE]}))),
    ("prefix-in-shorter-prefix", cap(**n(prefix="abc")), cap(**n(prefix="ab"))),
    ("prefix-in-empty-prefix", cap(**n(prefix="x")), cap(**n(prefix=""))),
    ("prefix-in-itself", cap(**n(prefix="ab")), cap(**n(prefix="ab"))),
    (
        "refund-within-refund-ceiling",
        cap("api/payments/refunds/o-1", ["post"], amount={"gt": 0, "le": 100},
            currency={"eq": "EUR"}),
        cap("api/payments/refunds/*", ["post"], amount={"le": 5000},
            currency={"in": ["EUR", "USD"]}),
    ),
]

# (id, inner, outer, words the reason must contain)
NOT_CONTAINED = [
    ("literal-mismatch", cap("a/b"), cap("a/c"), 'segment 2 is "b", not "c"'),
    ("star-wider-than-literal", cap("a/*"), cap("a/b"), "wider: segment 2 is *"),
    ("double-star-wider-than-deeper", cap("db/orders/**"), cap("db/orders/42/**"),
     'wider: its ** stands where the ceiling has "42/**"'),
    ("double-star-wider-than-star", cap("a/**"), cap("a/*"), 'wider: its ** stands'),
    ("double-star-vs-star-double-star", cap("a/**"), cap("a/*/**"), "wider"),
    ("double-star-vs-fixed-length", cap("a/b/**"), cap("a/*"), "any depth"),
    ("too-short-for-double-star", cap("a"), cap("a/**"), "needs more than 1"),
    ("too-long", cap("a/b/c"), cap("a/b"), "it has 3 segments, the ceiling's 2"),
    ("too-short", cap("a"), cap("a/b"), "it has 1 segment, the ceiling's 2"),
    ("any-action-vs-list", cap(act=["*"]), cap(act=["get", "put"]), "any action (*)"),
    ("extra-action", cap(act=["get", "del"]), cap(act=["get", "put"]), "action(s) del"),
    ("missing-constraint", cap(), cap(**n(eq=1)), "constrains n and the request does not"),
    ("other-attribute", cap(m={"eq": 1}), cap(**n(eq=1)), "constrains n"),
    ("int-vs-bool", cap(**n(eq=1)), cap(**n(eq=True)), "n = 1"),
    ("bool-vs-int", cap(**n(eq=True)), cap(**n(eq=1)), "n = true"),
    ("string-vs-int", cap(**n(eq="1")), cap(**n(eq=1)), 'n = "1"'),
    ("int-vs-string-in-list", cap(**n(eq=1)), cap(**n(**{"in": ["1"]})), "n = 1"),
    ("bool-vs-int-list", cap(**n(eq=True)), cap(**n(**{"in": [1]})), "n = true"),
    ("bool-is-not-an-int", cap(**n(eq=True)), cap(**n(ge=0)), "n = true"),
    ("string-vs-bound", cap(**n(eq="5")), cap(**n(le=10)), 'n = "5"'),
    ("eq-outside-list", cap(**n(eq=4)), cap(**n(**{"in": [1, 2, 3]})), "n = 4"),
    ("list-not-subset", cap(**n(**{"in": [1, 2]})), cap(**n(**{"in": [1]})), "n = 2"),
    ("looser-upper-bound", cap(**n(le=6000)), cap(**n(le=5000)), "up to 6000"),
    ("no-upper-bound", cap(**n(ge=0)), cap(**n(le=5000)), "from 0"),
    ("le-vs-lt-same-number", cap(**n(le=10)), cap(**n(lt=10)), "up to 10"),
    ("looser-lower-bound", cap(**n(gt=0)), cap(**n(gt=1)), "from 1"),
    ("range-vs-eq", cap(**n(ge=1, le=2)), cap(**n(eq=1)), "the ints 1..2"),
    ("range-vs-eq-string", cap(**n(ge=1, le=1)), cap(**n(eq="1")), "only 1"),
    ("range-vs-eq-true", cap(**n(ge=1, le=1)), cap(**n(eq=True)), "only 1"),
    ("range-larger-than-list", cap(**n(ge=0, le=1000)),
     cap(**n(**{"in": list(range(256))})), "(1001 values)"),
    ("range-with-gap-in-list", cap(**n(ge=1, le=3)), cap(**n(**{"in": [1, 3, 5]})), "n = 2"),
    ("unbounded-range-vs-list", cap(**n(le=5)), cap(**n(**{"in": [1]})), "any int up to 5"),
    ("range-vs-prefix", cap(**n(le=5)), cap(**n(prefix="a")), "(a string)"),
    ("prefix-vs-eq", cap(**n(prefix="ab")), cap(**n(eq="ab")), 'starting with "ab"'),
    ("prefix-vs-list", cap(**n(prefix="a")), cap(**n(**{"in": ["a", "ab"]})), "starting with"),
    ("prefix-vs-longer-prefix", cap(**n(prefix="a")), cap(**n(prefix="ab")), 'prefix "ab"'),
    ("prefix-vs-other-prefix", cap(**n(prefix="ab")), cap(**n(prefix="b")), 'prefix "b"'),
    ("prefix-vs-bound", cap(**n(prefix="a")), cap(**n(le=3)), "n le 3"),
    ("empty-range", cap(**n(gt=5, lt=3)), cap(**n(ge=0)), "can never hold"),
    ("empty-range-unconstrained-outer", cap(**n(gt=5, lt=3)), cap(), "can never hold"),
    ("prefix-and-bound", cap(**n(prefix="a", le=3)), cap(), "prefix needs a string"),
    ("eq-failing-own-prefix", cap(**n(eq=1, prefix="a")), cap(), "can never hold"),
    ("list-failing-own-bound", cap(**n(**{"in": [1, 2]}, gt=5)), cap(), "can never hold"),
    ("second-attribute-fails", cap(**n(eq=1), m={"eq": 9}),
     cap(**n(le=3), m={"le": 5}), "m = 9"),
]


@pytest.mark.parametrize(("inner", "outer"), [r[1:] for r in CONTAINED],
                         ids=[r[0] for r in CONTAINED])
def test_contained(inner: Capability, outer: Capability) -> None:
    result = contains(inner, outer)
    assert result, result.reason
    assert result == ContainmentResult(True)


@pytest.mark.parametrize(("inner", "outer", "words"), [r[1:] for r in NOT_CONTAINED],
                         ids=[r[0] for r in NOT_CONTAINED])
def test_not_contained(inner: Capability, outer: Capability, words: str) -> None:
    result = contains(inner, outer)
    assert not result
    assert words in result.reason


def test_progress_orders_the_stages() -> None:
    outer = cap("a/b/c", ["get"], **n(le=3))
    resource = contains(cap("a/x/c", ["get"], **n(le=3)), outer)
    action = contains(cap("a/b/c", ["put"], **n(le=3)), outer)
    constraint = contains(cap("a/b/c", ["get"], **n(le=4)), outer)
    assert resource.progress < action.progress < constraint.progress < (3, 0)
    assert resource.progress == (0, 1)  # one segment agreed


def test_long_lists_are_shortened_in_reasons() -> None:
    result = contains(cap(**n(eq=-1)), cap(**n(**{"in": list(range(256))})))
    assert "(256 items)" in result.reason
    assert len(result.reason) < 200


# --- soundness ------------------------------------------------------------------------
# Small alphabets, so that random capabilities overlap often: three literals and
# "*", three actions, two attributes, values around the bounds drawn, and the
# strict-typing traps 1 / true / "1".

LITERALS = ("a", "b", "c")
ACTIONS = ("get", "put", "del")
ATTRS = ("n", "s")
OPERATORS = ("eq", "in", "lt", "le", "gt", "ge", "prefix")
SMALL_INTS = st.integers(-2, 6)
STRINGS = st.sampled_from(("", "a", "ab", "b", "1"))


def bounds(ints: st.SearchStrategy[int], strs: st.SearchStrategy[str],
           prefixes: st.SearchStrategy[str]) -> dict[str, st.SearchStrategy[Any]]:
    return {
        "eq": st.one_of(ints, strs, st.booleans()),
        "in": st.lists(st.one_of(ints, strs), min_size=1, max_size=4),
        "prefix": prefixes,
        **dict.fromkeys(("lt", "le", "gt", "ge"), ints),
    }


BOUNDS = bounds(SMALL_INTS, STRINGS, st.sampled_from(("", "a", "ab", "b")))
# A tiny space, where near misses (ge 2 against gt 2, eq true against eq 1,
# prefix "a" against prefix "ab") come up all the time.
TINY_BOUNDS = bounds(st.integers(0, 2), st.sampled_from(("", "a", "ab", "1")),
                     st.sampled_from(("", "a", "ab")))


@st.composite
def constraints(draw: st.DrawFn, space: dict[str, st.SearchStrategy[Any]] = BOUNDS,
                most: int = 3) -> dict[str, Any]:
    ops = draw(st.lists(st.sampled_from(OPERATORS), min_size=1, max_size=most, unique=True))
    return {op: draw(space[op]) for op in ops}


@st.composite
def raw_caps(draw: st.DrawFn) -> dict[str, Any]:
    fixed = draw(st.lists(st.sampled_from((*LITERALS, "*")), max_size=3))
    tail = not fixed or draw(st.booleans())
    raw: dict[str, Any] = {
        "res": "/".join(fixed + ["**"] * tail),
        "act": draw(st.one_of(st.just(["*"]), st.lists(st.sampled_from(ACTIONS), min_size=1,
                                                          max_size=3, unique=True))),
    }
    cond = draw(st.dictionaries(st.sampled_from(ATTRS), constraints(), max_size=2))
    if cond:
        raw["if"] = cond
    return raw


def tighter(draw: st.DrawFn, op: str, value: Any) -> Any:
    """A bound for ``op`` at least as strict as ``value``."""
    if op in ("lt", "le"):
        return value - draw(st.integers(0, 2))
    if op in ("gt", "ge"):
        return value + draw(st.integers(0, 2))
    if op == "in":
        return draw(st.lists(st.sampled_from(value), min_size=1, max_size=len(value)))
    if op == "prefix":
        return value + draw(st.sampled_from(("", "a", "b")))
    return value


@st.composite
def narrowed(draw: st.DrawFn, outer: dict[str, Any]) -> dict[str, Any]:
    """``outer`` narrowed as a caller would: wildcards filled in, actions dropped,
    constraints tightened or added. Contained, unless the constraints it adds
    can never hold."""
    segments: list[str] = []
    for seg in outer["res"].split("/"):
        if seg == "*":
            segments.append(draw(st.sampled_from((*LITERALS, "*"))))
        elif seg == "**":
            segments += draw(st.lists(st.sampled_from((*LITERALS, "*")), max_size=2))
            if not segments or draw(st.booleans()):
                segments.append("**")
        else:
            segments.append(seg)
    if outer["act"] == ["*"] and draw(st.booleans()):
        act = ["*"]
    else:
        acts = ACTIONS if outer["act"] == ["*"] else outer["act"]
        act = draw(st.lists(st.sampled_from(acts), min_size=1, unique=True))
    cond: dict[str, Any] = {}
    for attr, ops in outer.get("if", {}).items():
        mine = {op: tighter(draw, op, value) for op, value in ops.items()}
        if draw(st.integers(0, 3)) == 0:  # an extra operator, which may clash
            for op, value in draw(constraints()).items():
                mine.setdefault(op, value)
        cond[attr] = mine
    for attr, ops in draw(st.dictionaries(st.sampled_from(ATTRS), constraints(),
                                          max_size=1)).items():
        cond.setdefault(attr, ops)
    raw: dict[str, Any] = {"res": "/".join(segments), "act": act}
    if cond:
        raw["if"] = cond
    return raw


def loosened(draw: st.DrawFn, op: str, value: Any) -> Any:
    """A bound for ``op`` one step looser than ``value``."""
    if op in ("lt", "le"):
        return value + 1
    if op in ("gt", "ge"):
        return value - 1
    if op == "in":
        return [*value, draw(st.one_of(SMALL_INTS, STRINGS))]
    if op == "prefix":
        return value[:-1]
    return value


@st.composite
def widened(draw: st.DrawFn, raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with one step that may widen it: the near misses a containment
    proof is most likely to get wrong."""
    out = {**raw, "if": {a: {**ops} for a, ops in raw.get("if", {}).items()}}
    segments = raw["res"].split("/")
    step = draw(st.sampled_from(("star", "tail", "shorten", "action", "drop-attr", "drop-op",
                                 "loosen", "retype")))
    if step == "star":
        k = draw(st.integers(0, len(segments) - 1))
        if segments[k] != "**":
            segments[k] = "*"
    elif step == "tail" and segments[-1] != "**":
        segments[-1] = "**"
    elif step == "shorten" and len(segments) > 1:
        segments.pop(-2 if segments[-1] == "**" else -1)
    elif step == "action" and out["act"] != ["*"]:
        out["act"] = draw(st.sampled_from((["*"], sorted({*out["act"], "del"}))))
    elif step in ("drop-attr", "drop-op", "loosen", "retype") and out["if"]:
        attr = draw(st.sampled_from(sorted(out["if"])))
        ops = out["if"][attr]
        op = draw(st.sampled_from(sorted(ops)))
        if step == "drop-attr":
            del out["if"][attr]
        elif step == "drop-op" and len(ops) > 1:
            del ops[op]
        elif step == "loosen":
            ops[op] = loosened(draw, op, ops[op])
        elif step == "retype" and op == "eq":
            ops[op] = draw(st.sampled_from((1, True, "1", 0, False, "0")))
    out["res"] = "/".join(segments)
    if not out["if"]:
        del out["if"]
    return out


@st.composite
def pairs(draw: st.DrawFn) -> tuple[Capability, Capability]:
    """(inner, outer): inner narrows outer, or narrows it and takes one widening
    step, or is unrelated."""
    outer = draw(raw_caps())
    kind = draw(st.integers(0, 4))
    if kind == 0:
        inner = draw(raw_caps())
    else:
        inner = draw(narrowed(outer))
        if kind > 2:
            inner = draw(widened(inner))
    return Capability.parse(inner), Capability.parse(outer)


def witnesses(ops: tuple[tuple[str, Any], ...]) -> list[Any]:
    """Values near a constraint's bounds: the likeliest to slip through a wrong proof."""
    out: list[Any] = [1, True, "1"]
    for op, value in ops:
        if op == "in":
            out += [v for _, v in value]
        elif op == "prefix":
            out += [value, value + "a", value + "z"]
        elif op == "eq":
            out.append(value)
        else:
            out += [value - 1, value, value + 1]
    return out


def request_for(inner: Capability, rnd: random.Random) -> Request:
    """A request shaped after ``inner`` so that it mostly matches, with strays.

    Drawn from a Hypothesis-controlled Random: many requests per example, cheaply.
    """
    pool = (*LITERALS, "z")
    segments = [rnd.choice(pool) if s == "*" else s for s in inner.segments]
    if inner.tail:
        segments += rnd.choices(pool, k=rnd.randint(1, 3))
    acts = ACTIONS if inner.actions is None or rnd.random() < 0.1 else sorted(inner.actions)
    ctx: dict[str, Any] = {}
    bounds = dict(inner.constraints)
    for attr in sorted({*ATTRS, *bounds}):
        roll = rnd.random()
        if roll < 0.1:
            continue  # absent
        if roll < 0.8:
            ctx[attr] = rnd.choice(witnesses(bounds.get(attr, ())))
        else:
            ctx[attr] = rnd.choice((-1, 0, 3, 7, "", "b", "zz", True, False))
    return Request("/".join(segments), rnd.choice(acts), ctx)


def counterexample(inner: Capability, outer: Capability, rnd: random.Random) -> Request | None:
    """A request ``inner`` matches and ``outer`` refuses, if 24 tries find one."""
    for _ in range(24):
        req = request_for(inner, rnd)
        if inner.matches(req) and not outer.matches(req):
            return req
    return None


@settings(max_examples=400)
@given(pairs(), st.randoms(use_true_random=False))
def test_containment_is_sound(pair: tuple[Capability, Capability], rnd: random.Random) -> None:
    inner, outer = pair
    if not contains(inner, outer):
        event("not contained")
        return
    event("contained")
    req = counterexample(inner, outer, rnd)
    assert req is None, f"{req} is in {inner.describe()!r} but not {outer.describe()!r}"


# An exact oracle. Whether a request matches is a conjunction over independent
# parts (resource, action, each attribute's value), so inner ⊆ outer iff inner
# matches nothing, or each part inner admits is admitted by outer. Each part is
# decided by enumerating one representative of every kind of value the two
# capabilities can tell apart, and asking the verifier's own matcher.

FRESH = "zz"  # a literal and a string character no generated bound uses
ABSENT = object()


def resource_kinds(inner: Capability, outer: Capability) -> list[tuple[str, ...]]:
    """Every resource up to one segment longer than either pattern, over their
    literals and one fresh literal: a pattern can tell no more apart."""
    literals = sorted({*inner.segments, *outer.segments, FRESH} - {"*"})
    longest = max(len(inner.segments), len(outer.segments)) + 2
    return [r for k in range(1, longest + 1) for r in itertools.product(literals, repeat=k)]


def value_kinds(bounds: list[tuple[str, Any]]) -> list[Any]:
    """Ints around every bound; every listed string, every prefix plus a fresh
    character, a fresh string; both bools; and absence."""
    ints: set[int] = {0}
    strs: set[str] = {FRESH}
    for op, bound in bounds:
        values = [v for _, v in bound] if op == "in" else [bound]
        for v in values:
            if type(v) is int:
                ints |= {v - 1, v, v + 1}
            elif type(v) is str:
                strs |= {v, v + FRESH} if op == "prefix" else {v}
    return [*sorted(ints), *sorted(strs), True, False, ABSENT]


def attribute_matcher(c: Capability, attr: str) -> Callable[[Any], bool]:
    if attr not in dict(c.constraints):
        return lambda value: True
    alone = Capability.parse({"res": "r", "act": ["*"], "if": {attr: c.raw["if"][attr]}})
    return lambda value: alone.matches(
        Request("r", "get", {} if value is ABSENT else {attr: value}))


def within_by_enumeration(inner: Capability, outer: Capability) -> bool | None:
    """inner ⊆ outer, decided exhaustively; None if inner matches nothing."""
    parts: list[tuple[list[Any], Callable[[Any], bool], Callable[[Any], bool]]] = [
        (resource_kinds(inner, outer), inner.resource_matches, outer.resource_matches),
        ([*ACTIONS, "zap"], lambda a: inner.actions is None or a in inner.actions,
         lambda a: outer.actions is None or a in outer.actions),
    ]
    for attr in sorted({a for a, _ in (*inner.constraints, *outer.constraints)}):
        bounds = [b for c in (inner, outer) for b in dict(c.constraints).get(attr, ())]
        parts.append((value_kinds(bounds), attribute_matcher(inner, attr),
                      attribute_matcher(outer, attr)))
    within = True
    for kinds, in_inner, in_outer in parts:
        admitted = [k for k in kinds if in_inner(k)]
        if not admitted:
            return None
        within = within and all(in_outer(k) for k in admitted)
    return within


@st.composite
def attribute_pairs(draw: st.DrawFn) -> tuple[Capability, Capability]:
    """(inner, outer) differing only in their constraints on one attribute."""
    def one() -> Capability:
        cond = {"n": draw(constraints(TINY_BOUNDS, most=2))}
        return Capability.parse({"res": "r", "act": ["get"], "if": cond})
    return one(), one()


def check_exact(inner: Capability, outer: Capability) -> None:
    """Sound and complete: the only pairs said not to be within though they are,
    are those whose inner matches nothing (a choice)."""
    expected = within_by_enumeration(inner, outer)
    result = contains(inner, outer)
    if expected is None:
        event("inner matches nothing")
        assert not result  # any reason: the resource or action may fail first
    else:
        event("contained" if expected else "not contained")
        assert bool(result) == expected, (inner.describe(), outer.describe(), result.reason)


@settings(max_examples=500)
@given(pairs())
def test_containment_is_exact(pair: tuple[Capability, Capability]) -> None:
    check_exact(*pair)


@settings(max_examples=1000)
@given(attribute_pairs())
def test_constraint_containment_is_exact(pair: tuple[Capability, Capability]) -> None:
    check_exact(*pair)


@given(raw_caps(), st.randoms(use_true_random=False))
def test_only_what_can_never_hold_is_not_within_itself(raw: dict[str, Any],
                                                        rnd: random.Random) -> None:
    c = Capability.parse(raw)
    result = contains(c, c)
    if result:
        return
    assert "can never hold" in result.reason
    assert not any(c.matches(request_for(c, rnd)) for _ in range(24))


@given(st.data())
def test_containment_is_transitive(data: st.DataObject) -> None:
    """Along a chain of narrowings: if a ⊆ b and b ⊆ c are proven, so is a ⊆ c."""
    c = data.draw(raw_caps())
    b = data.draw(narrowed(c))
    a = data.draw(narrowed(b))
    ca, cb, cc = (Capability.parse(x) for x in (a, b, c))
    if contains(ca, cb) and contains(cb, cc):
        event("both proven")
        assert contains(ca, cc)


# The property can fail: each mutant below skips one stage of the proof, and
# the same strategies find a request that proves it wrong.


def _ignores_resource(inner: Capability, outer: Capability) -> bool:
    return bool(contains(Capability.parse({**inner.raw, "res": outer.raw["res"]}), outer))


def _ignores_actions(inner: Capability, outer: Capability) -> bool:
    return bool(contains(Capability.parse({**inner.raw, "act": outer.raw["act"]}), outer))


def _ignores_constraints(inner: Capability, outer: Capability) -> bool:
    def bare(c: Capability) -> Capability:
        return Capability.parse({"res": c.raw["res"], "act": c.raw["act"]})
    return bool(contains(bare(inner), bare(outer)))


@pytest.mark.parametrize(
    "mutant", [_ignores_resource, _ignores_actions, _ignores_constraints],
    ids=["ignores-resource", "ignores-actions", "ignores-constraints"],
)
def test_the_property_catches_an_unsound_containment(
    mutant: Callable[[Capability, Capability], bool],
) -> None:
    def unsound(case: tuple[tuple[Capability, Capability], random.Random]) -> bool:
        (inner, outer), rnd = case
        return mutant(inner, outer) and counterexample(inner, outer, rnd) is not None

    (inner, outer), _ = find(st.tuples(pairs(), st.randoms(use_true_random=False)), unsound,
                             settings=settings(max_examples=2000, database=None,
                                               phases=[Phase.generate]))
    assert not contains(inner, outer)
