"""Spec §4: capability grammar, strict matching, requests, and the denial
explanation (nearest capability and the constraint that failed)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest
from helpers import REFUND_CAP, World

from verifier_sdk import Capability, Request, VerificationError

MAX_SAFE = 2**53 - 1


def cap(res: str = "a/b", act: list[Any] | None = None, **cond: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"res": res, "act": ["get"] if act is None else act}
    if cond:
        out["if"] = cond
    return out


def allows(capability: dict[str, Any], res: str, act: str = "get",
           ctx: dict[str, Any] | None = None) -> bool:
    return Capability.parse(capability).matches(Request(res, act, ctx))


# --- pattern grammar -------------------------------------------------------------


@pytest.mark.parametrize(
    "res",
    [
        "a",
        "*",
        "**",
        "a/*",
        "a/**",
        "*/b",
        "*/*/**",
        "api/payments/refunds/o-123",
        "A-Z_a.z~0:9@x+y=z,w",
        "...",
        ".a",
        "a..",
        "x" * 512,
        "/".join(["a"] * 256),
    ],
    ids=[
        "one-literal", "star", "double-star-alone", "trailing-star", "trailing-double-star",
        "leading-star", "stars-then-double-star", "typical", "every-literal-char",
        "three-dots", "dot-prefix", "dot-dot-suffix", "512-chars", "256-segments",
    ],
)
def test_pattern_accepted(res: str) -> None:
    assert Capability.parse(cap(res)).raw["res"] == res


@pytest.mark.parametrize(
    "res",
    [
        "",
        "x" * 513,
        "a/" + "x" * 511,
        "/a",
        "a/",
        "a//b",
        "/",
        ".",
        "..",
        "a/./b",
        "a/../b",
        "a/..",
        "**/a",
        "a/**/b",
        "**/**",
        "a/**/**",
        "***",
        "a*",
        "*a",
        "a/b*",
        "a b",
        "a\tb",
        "a%2Fb",
        "a?b",
        "a#b",
        "a\\b",
        "a;b",
        "a\"b",
        "caf\u00e9",
        "a\u200bb",
        "a\x00b",
        "a\nb",
        "\uff41",
        1,
        None,
        ["a"],
    ],
    ids=[
        "empty", "513-chars", "513-chars-two-segments", "leading-slash", "trailing-slash",
        "empty-segment", "only-slash", "dot", "dot-dot", "inner-dot", "inner-dot-dot",
        "trailing-dot-dot", "double-star-first", "double-star-middle", "two-double-stars",
        "double-star-not-last", "triple-star", "star-suffix", "star-prefix", "star-in-literal",
        "space", "tab", "percent", "question-mark", "hash", "backslash", "semicolon", "quote",
        "non-ascii", "zero-width-space", "nul", "newline", "fullwidth-a", "int", "null",
        "list",
    ],
)
def test_pattern_rejected(res: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the SDK's one error type for bad input
        Capability.parse(cap(res))


@pytest.mark.parametrize(
    ("pattern", "res", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/b", "a", False),
        ("a/b", "A/b", False),
        ("a/b", "a/B", False),
        ("*", "a", True),
        ("*", "a/b", False),
        ("a/*", "a/b", True),
        ("a/*", "a", False),
        ("a/*", "a/b/c", False),
        ("*/b", "x/b", True),
        ("*/b", "x/c", False),
        ("a/*/c", "a/b/c", True),
        ("a/*/c", "a/b/d", False),
        ("a/*/c", "a/c", False),
        ("**", "a", True),
        ("**", "a/b/c/d", True),
        ("a/**", "a/b", True),
        ("a/**", "a/b/c/d/e", True),
        ("a/**", "a", False),
        ("a/**", "b/a", False),
        ("a/**", "ab/c", False),
        ("a/*/**", "a/b", False),
        ("a/*/**", "a/b/c", True),
        ("a/b/**", "a/b", False),
        ("db/orders/**", "db/orders/42", True),
        ("api/o-1", "api/o-12", False),
        ("api/o-12", "api/o-1", False),
        ("a.b", "a.b", True),
        ("a.b", "a:b", False),
        ("x~1", "x~1", True),
    ],
    ids=lambda v: str(v).replace("/", "|") if not isinstance(v, bool) else str(v).lower(),
)
def test_pattern_matching(pattern: str, res: str, expected: bool) -> None:
    assert allows(cap(pattern), res) is expected


# --- actions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "act",
    [
        ["get"],
        ["*"],
        ["0"],
        ["a.b-c_d"],
        ["a" * 64],
        [f"a{i}" for i in range(32)],
        ["get", "post"],
    ],
    ids=["one", "any", "digit", "punctuation", "64-chars", "32-actions", "two"],
)
def test_actions_accepted(act: list[str]) -> None:
    Capability.parse(cap(act=act))


@pytest.mark.parametrize(
    "act",
    [
        [],
        [f"a{i}" for i in range(33)],
        ["*", "read"],
        ["read", "*"],
        ["*", "*"],
        ["**"],
        [""],
        ["Get"],
        ["GET"],
        ["-get"],
        [".get"],
        ["_get"],
        ["a" * 65],
        ["get post"],
        ["get/x"],
        ["g\u00e9t"],
        [1],
        [None],
        [True],
        [["get"]],
        "get",
        "*",
        None,
        {"get": True},
    ],
    ids=[
        "empty", "33-actions", "star-and-read", "read-and-star", "two-stars", "double-star",
        "empty-string", "capital", "upper", "leading-dash", "leading-dot", "leading-underscore",
        "65-chars", "space", "slash", "non-ascii", "int", "null", "bool", "nested-list",
        "string-not-list", "star-not-list", "null-list", "object",
    ],
)
def test_actions_rejected(act: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        Capability.parse({"res": "a", "act": act})


@pytest.mark.parametrize(
    ("act", "request_act", "expected"),
    [
        (["get"], "get", True),
        (["get"], "post", False),
        (["get", "post"], "post", True),
        (["*"], "anything.at-all", True),
        (["*"], "get", True),
        (["get"], "get2", False),
        (["get2"], "get", False),
    ],
    ids=["listed", "not-listed", "second", "any", "any-get", "longer", "shorter"],
)
def test_action_matching(act: list[str], request_act: str, expected: bool) -> None:
    assert allows(cap(act=act), "a/b", request_act) is expected


# --- capability shape, attributes and constraints --------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        {"res": "a", "act": ["get"], "extra": 1},
        {"res": "a", "act": ["get"], "If": {}},
        {"act": ["get"]},
        {"res": "a"},
        {},
        [],
        "a",
        None,
        {"res": "a", "act": ["get"], "if": {}},
        {"res": "a", "act": ["get"], "if": None},
        {"res": "a", "act": ["get"], "if": []},
        {"res": "a", "act": ["get"], "if": {f"a{i}": {"eq": 1} for i in range(33)}},
    ],
    ids=[
        "unknown-member", "if-capitalised", "no-res", "no-act", "empty-object", "list",
        "string", "null", "empty-if", "null-if", "list-if", "33-attributes",
    ],
)
def test_capability_shape_rejected(raw: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        Capability.parse(raw)


@pytest.mark.parametrize(
    "attr",
    ["a", "_", "A", "amount", "_x9", "a.b", "a.", "a..b", "x" * 64, "Z_9.z"],
    ids=["a", "underscore", "capital", "word", "underscore-digit", "dotted", "trailing-dot",
         "double-dot", "64-chars", "mixed"],
)
def test_attribute_names_accepted(attr: str) -> None:
    Capability.parse({"res": "a/b", "act": ["get"], "if": {attr: {"eq": 1}}})
    Request("a/b", "get", {attr: 1})


@pytest.mark.parametrize(
    "attr",
    ["", "1a", ".a", "-a", "a-b", "a b", "a/b", "x" * 65, "\u00e9", "a\x00", "$a"],
    ids=["empty", "leading-digit", "leading-dot", "leading-dash", "dash", "space", "slash",
         "65-chars", "non-ascii", "nul", "dollar"],
)
def test_attribute_names_rejected(attr: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        Capability.parse({"res": "a/b", "act": ["get"], "if": {attr: {"eq": 1}}})
    with pytest.raises(ValueError):  # noqa: PT011
        Request("a/b", "get", {attr: 1})


def test_thirty_two_attributes_accepted() -> None:
    Capability.parse({"res": "a", "act": ["get"], "if": {f"a{i}": {"eq": i} for i in range(32)}})


@pytest.mark.parametrize(
    "ops",
    [
        {"eq": "x"},
        {"eq": ""},
        {"eq": 0},
        {"eq": MAX_SAFE},
        {"eq": -MAX_SAFE},
        {"eq": True},
        {"eq": False},
        {"in": ["a"]},
        {"in": [1, "a", -MAX_SAFE]},
        {"in": list(range(256))},
        {"lt": 0},
        {"le": MAX_SAFE},
        {"gt": -MAX_SAFE},
        {"ge": 5},
        {"prefix": ""},
        {"prefix": "o-"},
        {"ge": 1, "le": 10, "lt": 11, "gt": 0, "in": [5], "eq": 5},
        {"prefix": "a", "eq": "ab"},
    ],
    ids=[
        "eq-string", "eq-empty-string", "eq-zero", "eq-max-safe", "eq-min-safe", "eq-true",
        "eq-false", "in-one", "in-mixed", "in-256", "lt", "le-max-safe", "gt-min-safe", "ge",
        "prefix-empty", "prefix", "six-operators", "prefix-and-eq",
    ],
)
def test_constraint_accepted(ops: dict[str, Any]) -> None:
    Capability.parse(cap(x=ops))


@pytest.mark.parametrize(
    "ops",
    [
        {},
        {"eq": 1, "in": [1], "lt": 2, "le": 1, "gt": 0, "ge": 1, "prefix": "a"},
        {"ne": 1},
        {"EQ": 1},
        {"eq": 1, "regex": ".*"},
        {"eq": None},
        {"eq": 1.5},
        {"eq": 1.0},
        {"eq": MAX_SAFE + 1},
        {"eq": -MAX_SAFE - 1},
        {"eq": [1]},
        {"eq": {"a": 1}},
        {"in": []},
        {"in": list(range(257))},
        {"in": "abc"},
        {"in": [True]},
        {"in": [1, False]},
        {"in": [None]},
        {"in": [1.5]},
        {"in": [[1]]},
        {"in": [MAX_SAFE + 1]},
        {"in": {"a": 1}},
        {"lt": True},
        {"le": False},
        {"gt": "1"},
        {"ge": 1.0},
        {"lt": None},
        {"le": MAX_SAFE + 1},
        {"ge": [1]},
        {"prefix": 1},
        {"prefix": None},
        {"prefix": True},
        {"prefix": ["a"]},
        None,
        [],
        1,
        "eq",
    ],
    ids=[
        "no-operator", "seven-operators", "unknown-ne", "upper-EQ", "unknown-regex",
        "eq-null", "eq-float", "eq-float-integral", "eq-2^53", "eq-minus-2^53", "eq-list",
        "eq-object", "in-empty", "in-257", "in-string", "in-bool", "in-int-and-bool",
        "in-null", "in-float", "in-nested-list", "in-2^53", "in-object", "lt-bool", "le-bool",
        "gt-string", "ge-float", "lt-null", "le-2^53", "ge-list", "prefix-int", "prefix-null",
        "prefix-bool", "prefix-list", "null", "list", "int", "string",
    ],
)
def test_constraint_rejected(ops: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        Capability.parse(cap(x=ops))


# --- strict matching of constraints (§4.2 item 3) ---------------------------------


@pytest.mark.parametrize(
    ("ops", "value", "expected"),
    [
        # eq compares type and value: 1, true and "1" all differ
        ({"eq": 1}, 1, True),
        ({"eq": 1}, True, False),
        ({"eq": 1}, "1", False),
        ({"eq": True}, True, True),
        ({"eq": True}, 1, False),
        ({"eq": True}, "true", False),
        ({"eq": "1"}, "1", True),
        ({"eq": "1"}, 1, False),
        ({"eq": "1"}, True, False),
        ({"eq": 0}, False, False),
        ({"eq": False}, 0, False),
        ({"eq": False}, False, True),
        ({"eq": "a"}, "A", False),
        ({"eq": "a"}, "a ", False),
        ({"eq": ""}, "", True),
        # in: the value with the same type
        ({"in": [1, "a"]}, 1, True),
        ({"in": [1, "a"]}, "a", True),
        ({"in": [1, "a"]}, True, False),
        ({"in": [1, "a"]}, "1", False),
        ({"in": [0]}, False, False),
        ({"in": ["1"]}, 1, False),
        ({"in": [1, 2, 3]}, 4, False),
        ({"in": ["a", "b"]}, "ab", False),
        # numeric operators: ints only, a bool is never numeric
        ({"le": 5000}, 5000, True),
        ({"le": 5000}, 5001, False),
        ({"le": 5000}, -MAX_SAFE, True),
        ({"lt": 5000}, 5000, False),
        ({"lt": 5000}, 4999, True),
        ({"ge": 10}, 10, True),
        ({"ge": 10}, 9, False),
        ({"gt": 10}, 10, False),
        ({"gt": 10}, 11, True),
        ({"le": 5000}, "4999", False),
        ({"le": 1}, True, False),
        ({"le": 0}, False, False),
        ({"ge": 0}, False, False),
        ({"gt": 0}, True, False),
        ({"lt": 2}, True, False),
        ({"ge": 1, "le": 10}, 0, False),
        ({"ge": 1, "le": 10}, 1, True),
        ({"ge": 1, "le": 10}, 10, True),
        ({"ge": 1, "le": 10}, 11, False),
        # prefix: strings only
        ({"prefix": "o-"}, "o-123", True),
        ({"prefix": "o-"}, "o-", True),
        ({"prefix": "o-"}, "O-123", False),
        ({"prefix": "o-"}, "xo-1", False),
        ({"prefix": "1"}, 12, False),
        ({"prefix": "t"}, True, False),
        ({"prefix": ""}, "", True),
        ({"prefix": ""}, 0, False),
        # every operator must hold
        ({"prefix": "a", "eq": "ab"}, "ab", True),
        ({"prefix": "a", "eq": "ab"}, "abc", False),
        ({"in": [1, 2, 30], "le": 10}, 30, False),
        ({"in": [1, 2, 30], "le": 10}, 2, True),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else "|".join(f"{k}={v[k]!r}" for k in v),
)
def test_constraint_matching(ops: dict[str, Any], value: Any, expected: bool) -> None:
    assert allows(cap(x=ops), "a/b", ctx={"x": value}) is expected


@pytest.mark.parametrize(
    ("ctx", "expected"),
    [
        ({"amount": 10, "currency": "EUR"}, True),
        ({"amount": 10, "currency": "EUR", "other": True}, True),
        ({"amount": 10}, False),
        ({"currency": "EUR"}, False),
        ({}, False),
        (None, False),
        ({"amount": 10, "currency": "USD"}, False),
        ({"Amount": 10, "currency": "EUR"}, False),
    ],
    ids=["both", "extra-attribute", "missing-currency", "missing-amount", "empty-ctx",
         "no-ctx", "one-fails", "case-differs"],
)
def test_every_attribute_must_be_present_and_hold(ctx: dict[str, Any] | None,
                                                  expected: bool) -> None:
    c = cap(amount={"le": 100}, currency={"eq": "EUR"})
    assert allows(c, "a/b", ctx=ctx) is expected


def test_missing_attribute_fails_even_for_permissive_looking_constraints() -> None:
    assert not allows(cap(x={"prefix": ""}), "a/b", ctx={})
    assert not allows(cap(x={"ge": -MAX_SAFE}), "a/b", ctx={"y": 0})


def test_resource_action_and_constraints_all_required() -> None:
    c = cap("api/*", ["post"], amount={"le": 10})
    assert allows(c, "api/x", "post", {"amount": 5})
    assert not allows(c, "api/x/y", "post", {"amount": 5})
    assert not allows(c, "api/x", "get", {"amount": 5})
    assert not allows(c, "api/x", "post", {"amount": 11})


# --- requests (§4.3) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("res", "act", "ctx"),
    [
        ("a", "get", None),
        ("a/b/c", "post", {}),
        ("x" * 512, "a" * 64, {"s": "y" * 1024}),
        ("a", "get", {f"a{i}": i for i in range(64)}),
        ("a", "get", {"i": MAX_SAFE, "j": -MAX_SAFE, "t": True, "f": False, "e": ""}),
        ("a", "get", {"s": "\U0001f600" * 1024}),
        ("a", "get", MappingProxyType({"a": 1})),
    ],
    ids=["minimal", "empty-ctx", "at-every-length-limit", "64-attributes", "scalar-types",
         "1024-astral-chars", "read-only-mapping"],
)
def test_request_accepted(res: str, act: str, ctx: Any) -> None:
    req = Request(res, act, ctx)
    assert (req.res, req.act) == (res, act)
    assert dict(req.ctx) == dict(ctx or {})


@pytest.mark.parametrize(
    ("res", "act", "ctx"),
    [
        ("*", "get", None),
        ("**", "get", None),
        ("a/*", "get", None),
        ("a/**", "get", None),
        ("*/b", "get", None),
        ("", "get", None),
        ("a//b", "get", None),
        ("a/", "get", None),
        ("a/../b", "get", None),
        (".", "get", None),
        ("x" * 513, "get", None),
        ("a b", "get", None),
        (1, "get", None),
        (None, "get", None),
        ("a", "", None),
        ("a", "*", None),
        ("a", "Get", None),
        ("a", "a" * 65, None),
        ("a", 1, None),
        ("a", None, None),
        ("a", ["get"], None),
        ("a", "get", {f"a{i}": i for i in range(65)}),
        ("a", "get", {"s": "y" * 1025}),
        ("a", "get", {"s": "\U0001f600" * 1025}),
        ("a", "get", {"f": 1.0}),
        ("a", "get", {"f": 0.5}),
        ("a", "get", {"f": float("nan")}),
        ("a", "get", {"n": None}),
        ("a", "get", {"i": MAX_SAFE + 1}),
        ("a", "get", {"i": -MAX_SAFE - 1}),
        ("a", "get", {"i": 10**100}),
        ("a", "get", {"l": [1]}),
        ("a", "get", {"o": {"a": 1}}),
        ("a", "get", {"b": b"x"}),
        ("a", "get", {"s": "\ud800"}),
        ("a", "get", {"s": "ok\udc00"}),
        ("a", "get", {"1a": 1}),
        ("a", "get", {1: 1}),
        ("a", "get", [("a", 1)]),
        ("a", "get", "a=1"),
    ],
    ids=[
        "res-star", "res-double-star", "res-trailing-star", "res-trailing-double-star",
        "res-leading-star", "res-empty", "res-empty-segment", "res-trailing-slash",
        "res-dot-dot", "res-dot", "res-513-chars", "res-space", "res-int", "res-null",
        "act-empty", "act-star", "act-capital", "act-65-chars", "act-int", "act-null",
        "act-list", "ctx-65-attributes", "ctx-1025-chars", "ctx-1025-astral-chars",
        "ctx-float-integral", "ctx-float", "ctx-nan", "ctx-null", "ctx-2^53", "ctx-minus-2^53",
        "ctx-huge-int", "ctx-list", "ctx-object", "ctx-bytes", "ctx-lone-high-surrogate",
        "ctx-lone-low-surrogate", "ctx-bad-name", "ctx-int-name", "ctx-list-of-pairs",
        "ctx-string",
    ],
)
def test_request_rejected(res: Any, act: Any, ctx: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - §4.3: a bad request is ValueError
        Request(res, act, ctx)


def test_request_ctx_is_a_snapshot() -> None:
    ctx: dict[str, Any] = {"amount": 1}
    req = Request("a", "get", ctx)
    ctx["amount"] = 10_000
    ctx["extra"] = True
    assert dict(req.ctx) == {"amount": 1}
    with pytest.raises(TypeError):
        req.ctx["amount"] = 2  # type: ignore[index]


def test_verifier_refuses_a_request_that_is_not_a_request(world: World) -> None:
    chain = world.issue()
    with pytest.raises(ValueError):  # noqa: PT011
        world.verifier().verify(chain, ("api/payments/refunds/o-1", "post"), pop=None)  # type: ignore[arg-type]


# --- describe() and why_not() -----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (REFUND_CAP, "api/payments/refunds/* post if amount le 5000"),
        (cap("db/**", ["*"]), "db/** *"),
        (cap("a", ["post", "get", "delete"]), "a delete,get,post"),
        (cap("a", x={"eq": "v"}), 'a get if x eq "v"'),
        (cap("a", x={"eq": True}), "a get if x eq true"),
        (cap("a", x={"in": [3, 1, 2]}), "a get if x in [1, 2, 3]"),
        (cap("a", x={"prefix": "o-"}), 'a get if x prefix "o-"'),
        (cap("a", x={"le": 10, "ge": 1}, y={"eq": 2}), "a get if x le 10 and x ge 1 and y eq 2"),
    ],
    ids=["refund", "any-action", "actions-sorted", "eq-string", "eq-bool", "in-sorted",
         "prefix", "several"],
)
def test_describe(raw: dict[str, Any], expected: str) -> None:
    assert Capability.parse(raw).describe() == expected


@pytest.mark.parametrize(
    ("raw", "req", "expected"),
    [
        (cap("a/*"), Request("b/c", "get"), "resource b/c is not under a/*"),
        (cap("a/*", ["get", "post"]), Request("a/c", "delete"),
         "action delete is not in [get,post]"),
        (REFUND_CAP, Request("api/payments/refunds/o-1", "post"),
         "the request has no amount"),
        (REFUND_CAP, Request("api/payments/refunds/o-1", "post", {"amount": 5001}),
         "amount le 5000 fails for 5001"),
        (REFUND_CAP, Request("api/payments/refunds/o-1", "post", {"amount": True}),
         "amount le 5000 fails for true"),
        (REFUND_CAP, Request("api/payments/refunds/o-1", "post", {"amount": "10"}),
         'amount le 5000 fails for "10"'),
        (cap("a", x={"eq": 1}), Request("a", "get", {"x": "1"}), 'x eq 1 fails for "1"'),
        (cap("a", x={"ge": 1, "le": 10}), Request("a", "get", {"x": 11}),
         "x le 10 fails for 11"),
        (REFUND_CAP, Request("api/payments/refunds/o-1", "post", {"amount": 1}), "it matches"),
    ],
    ids=["resource", "action", "missing-attribute", "too-large", "bool-not-int",
         "string-not-int", "eq-type", "second-operator", "matches"],
)
def test_why_not(raw: dict[str, Any], req: Request, expected: str) -> None:
    assert Capability.parse(raw).why_not(req) == expected


@pytest.mark.parametrize(
    ("req", "link", "fragments"),
    [
        (
            Request("api/payments/refunds/o-123", "post", {"amount": 6000}),
            0,
            ["api/payments/refunds/* post if amount le 5000", "amount le 5000 fails for 6000"],
        ),
        (
            Request("db/orders/7", "select", {"customer": 41}),
            0,
            ['db/orders/** select if customer eq 42', "customer eq 42 fails for 41"],
        ),
        (
            Request("db/orders/7", "delete", {"customer": 42}),
            0,
            ["db/orders/** select", "action delete is not in [select]"],
        ),
        (
            Request("api/payments/refunds/o-9", "post", {"amount": 10}),
            1,
            ["api/payments/refunds/o-123 post",
             "resource api/payments/refunds/o-9 is not under api/payments/refunds/o-123"],
        ),
    ],
    ids=["root-amount", "root-nearest-is-orders", "root-action", "child-resource"],
)
def test_denial_names_nearest_capability_and_failure(
    world: World, req: Request, link: int, fragments: list[str]
) -> None:
    chain = world.chain3()
    with pytest.raises(VerificationError) as err:
        world.verifier().verify(chain, req, pop=world.prove(world.c, chain, req))
    assert (err.value.code, err.value.link) == ("denied", link)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message
    labels = ["spiffe://acme.example/orchestrator → agent:support",
              "agent:support → agent:refund"]
    assert labels[link] in message
