"""The issuance policy: parsing the TOML file (every fault a ConfigError naming
the grant and the field), evaluating Delegate requests (each denial reason from
a real request, the grant chosen), subject globs, and the documented example."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from signer._errors import ConfigError, PolicyDenied
from signer._model import DelegateRequest
from signer._policy import REASONS, Grant, Policy, SubjectPattern

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "policy.toml"

ORCH = "spiffe://acme/orch"
REPORTS = "spiffe://acme/reports"

GOOD = f"""
admins = ["spiffe://acme/ops", "spiffe://acme/sec"]

[[grant]]
caller = "{ORCH}"
subjects = ["spiffe://acme/agents/*", "spiffe://acme/bots/**", "spiffe://acme/exact"]
caps = [
  {{ res = "db/orders/42/**", act = ["select"], if = {{ customer = {{ eq = 42 }} }} }},
  {{ res = "api/refunds/*", act = ["post"], if = {{ amount = {{ ge = 1, le = 5000 }} }} }},
]
max_ttl = 900
max_dpt = 1
audiences = ["orders-db", "payments-api"]
max_use = 3
key = "root-a"

[[grant]]
caller = "{ORCH}"
subjects = ["spiffe://acme/agents/*"]
caps = [{{ res = "db/orders/**", act = ["select", "count"] }}]
max_ttl = 60
max_dpt = 0
key = "root-b"

[[grant]]
caller = "{REPORTS}"
subjects = ["spiffe://acme/jobs/**"]
caps = [{{ res = "**", act = ["*"] }}]
max_ttl = 3600
max_dpt = 2
key = "root-a"
"""

ORDERS_42 = {"res": "db/orders/42/items", "act": ["select"], "if": {"customer": {"eq": 42}}}
REFUND = {"res": "api/refunds/o-1", "act": ["post"], "if": {"amount": {"ge": 1, "le": 100}}}


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.from_toml(GOOD)


def request(**changes: Any) -> DelegateRequest:
    """A request grant 1 of GOOD allows; ``changes`` break it one rule at a time."""
    fields: dict[str, Any] = {
        "sub": "spiffe://acme/agents/a1",
        "holder_jwk": {"kty": "OKP", "crv": "Ed25519", "x": "A" * 43},
        "caps": (ORDERS_42,),
        "ttl": 600,
        "aud": ("orders-db",),
        "dpt": 1,
        "use": 2,
    }
    fields.update(changes)
    return DelegateRequest(**fields)


def denial(policy: Policy, req: DelegateRequest, caller: str = ORCH) -> PolicyDenied:
    with pytest.raises(PolicyDenied) as info:
        policy.evaluate(caller, req)
    assert info.value.reason in REASONS
    return info.value


# --- parsing ----------------------------------------------------------------------------


def test_good_file_parses(policy: Policy) -> None:
    assert policy.admins == {"spiffe://acme/ops", "spiffe://acme/sec"}
    assert policy.is_admin("spiffe://acme/ops")
    assert not policy.is_admin(ORCH)
    first, second = policy.grants_for(ORCH)
    assert [g.index for g in policy.grants] == [1, 2, 3]
    assert first.label == f"grant 1 ({ORCH})"
    assert (first.max_ttl, first.max_dpt, first.max_use, first.key) == (900, 1, 3, "root-a")
    assert first.audiences == frozenset({"orders-db", "payments-api"})
    assert [c.raw["res"] for c in first.caps] == ["db/orders/42/**", "api/refunds/*"]
    assert (second.audiences, second.max_use) == (None, None)
    assert policy.grants_for("spiffe://acme/nobody") == ()


def test_empty_file_has_no_grants() -> None:
    empty = Policy.from_toml("")
    assert empty.grants == ()
    assert empty.admins == frozenset()
    assert denial(empty, request()).reason == "caller_unknown"


def grant(**fields: str) -> str:
    """One [[grant]] with valid TOML values, ``fields`` replacing or adding (raw TOML)."""
    values = {
        "caller": f'"{ORCH}"',
        "subjects": '["spiffe://acme/agents/*"]',
        "caps": '[{ res = "a/**", act = ["get"] }]',
        "max_ttl": "60",
        "max_dpt": "0",
        "key": '"k1"',
    }
    values.update(fields)
    lines = [f"{k} = {v}" for k, v in values.items() if v != "OMIT"]
    return "[[grant]]\n" + "\n".join(lines) + "\n"


G1 = f"grant 1 ({ORCH})"

# (id, file text, words the ConfigError must contain)
BAD_FILES = [
    ("not-toml", "[[grant]\n", "not valid TOML"),
    ("duplicate-toml-key", grant() + "max_ttl = 5\n", "not valid TOML"),
    ("unknown-top-level", "grants = []\n", "unknown top-level field(s) grants"),
    ("grant-as-one-table", "[grant]\ncaller = 'x'\n", "[[grant]]"),
    ("admins-not-a-list", 'admins = "spiffe://acme/ops"\n', "admins: a list of principals"),
    ("admin-not-a-principal", "admins = [7]\n", "admins: 7"),
    ("admin-listed-twice", 'admins = ["a", "a"]\n', 'admins: "a" is listed twice'),
    ("caller-missing", grant(caller="OMIT"), "grant 1: missing field(s) caller"),
    ("caller-not-a-string", grant(caller="5"), "grant 1: caller"),
    ("caller-control-char", grant(caller='"spiffe://a\\u0007"'), "grant 1: caller"),
    ("unknown-grant-field", grant(max_uses="1"), f"{G1}: unknown field(s) max_uses"),
    ("missing-fields", grant(max_ttl="OMIT", max_dpt="OMIT"), "missing field(s) max_ttl, max_dpt"),
    ("subjects-not-a-list", grant(subjects='"spiffe://acme/a"'), f"{G1}: subjects"),
    ("subjects-empty", grant(subjects="[]"), f"{G1}: subjects: at least one"),
    ("subject-listed-twice", grant(subjects='["s", "s"]'), "listed twice"),
    ("caps-not-a-list", grant(caps='{ res = "a", act = ["get"] }'), f"{G1}: caps"),
    ("caps-empty", grant(caps="[]"), f"{G1}: caps: a non-empty list"),
    ("cap-bad-pattern", grant(caps='[{ res = "a//b", act = ["get"] }]'),
     f"{G1}: caps[1]: bad segment"),
    ("cap-unknown-member", grant(caps='[{ res = "a", act = ["get"], when = 1 }]'),
     f"{G1}: caps[1]"),
    ("cap-float-bound", grant(caps='[{ res = "a", act = ["get"], if = { n = { le = 1.5 } } }]'),
     "caps[1]: n le: an int"),
    ("cap-bool-in-list", grant(caps='[{ res = "a", act = ["get"], if = { n = { in = [true] } } }]'),
     "caps[1]: n in"),
    ("second-cap-bad", grant(caps='[{ res = "a", act = ["get"] }, { res = "b", act = ["GET"] }]'),
     "caps[2]: bad action"),
    ("cap-listed-twice", grant(caps='[{ res = "a", act = ["get"] }, { res = "a", act = ["get"] }]'),
     'caps[2]: "a get" is listed twice'),
    ("max-ttl-string", grant(max_ttl='"900"'),
     f'{G1}: max_ttl: an int in 1..2147483647, not "900"'),
    ("max-ttl-zero", grant(max_ttl="0"), "max_ttl: an int in 1.."),
    ("max-ttl-bool", grant(max_ttl="true"), "max_ttl: an int"),
    ("max-ttl-float", grant(max_ttl="60.0"), "max_ttl: an int"),
    ("max-ttl-date", grant(max_ttl="2026-01-01"), 'max_ttl: an int in 1..2147483647, not "2026'),
    ("max-dpt-too-deep", grant(max_dpt="16"), f"{G1}: max_dpt: an int in 0..15, not 16"),
    ("audiences-empty", grant(audiences="[]"), f"{G1}: audiences: a non-empty list"),
    ("audience-not-a-string", grant(audiences="[1]"), "audiences: 1 is not a string"),
    ("audience-listed-twice", grant(audiences='["x", "x"]'), "audiences: an audience is listed"),
    ("max-use-zero", grant(max_use="0"), f"{G1}: max_use: an int in 1..2147483647, not 0"),
    ("bad-key", grant(key='"root key"'), f"{G1}: key: kid is not"),
    ("second-grant-named", grant() + grant(caller='"spiffe://acme/b"', max_dpt="-1"),
     "grant 2 (spiffe://acme/b): max_dpt"),
]


def test_a_valid_variant_of_the_template_parses() -> None:
    """The bad-file rows differ from a file that parses by one field each."""
    assert len(Policy.from_toml(grant() + grant(audiences='["x"]', max_use="1")).grants) == 2


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(GOOD, encoding="utf-8")
    assert len(Policy.load(path).grants) == 3
    path.write_text(grant(max_dpt="99"), encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^policy {path}: grant 1 .*max_dpt"):
        Policy.load(path)


def test_load_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Policy.load(tmp_path / "missing.toml")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'admins = ["caf\xe9"]\n')
    with pytest.raises(ConfigError, match="cannot read"):
        Policy.load(latin1)


# --- hostile files: each a ConfigError, never a crash or another exception ------------

CEILING = '[{{ res = "a", act = ["get"], if = {{ n = {{ {op} = {bound} }} }} }}]'

HUGE_INTEGERS = [
    ("max-ttl-10e30", grant(max_ttl=str(10**30)),
     f"{G1}: max_ttl: an int in 1..2147483647, not {10**30}"),
    # int() refuses 4,300 digits or more with a ValueError that tomllib passes on.
    ("max-ttl-5000-digits", grant(max_ttl="9" * 5000), "policy: not valid TOML: Exceeds the limit"),
    ("bound-5000-digits", grant(caps=CEILING.format(op="le", bound="9" * 5000)),
     "policy: not valid TOML: Exceeds the limit"),
    ("bound-2^53", grant(caps=CEILING.format(op="le", bound=2**53)),
     f"{G1}: caps[1]: n le: an int"),
    ("bound-minus-2^53", grant(caps=CEILING.format(op="ge", bound=-(2**53))),
     f"{G1}: caps[1]: n ge: an int"),
    ("in-item-2^63", grant(caps=CEILING.format(op="in", bound=f"[1, {2**63}]")),
     f"{G1}: caps[1]: n in: items are strings or ints"),
]


def test_the_largest_safe_bound_parses() -> None:
    """The twin of the bound rows above: 2^53 - 1 is a bound a request can meet."""
    text = grant(caps=CEILING.format(op="le", bound=2**53 - 1))
    assert Policy.from_toml(text).grants[0].caps[0].raw["if"]["n"]["le"] == 2**53 - 1


# 1,000 levels exceed Python's recursion limit however deep the caller's stack is.
DEEP = 1_000
DEEP_NESTING = [
    ("caps-arrays", grant(caps="[" * DEEP + "]" * DEEP)),
    ("caps-inline-tables", grant(caps="{ a = " * DEEP + "1" + " }" * DEEP)),
    ("constraint-eq-tables", grant(caps='[{ res = "a", act = ["get"], if = { n = '
                                        + "{ eq = " * DEEP + "1" + " }" * DEEP + " } }]")),
    ("constraint-in-arrays",
     grant(caps=CEILING.format(op="in", bound="[" * DEEP + "1" + "]" * DEEP))),
    ("admins-arrays", "admins = " + "[" * DEEP + "]" * DEEP + "\n"),
]


@pytest.mark.parametrize("text", [r[1] for r in DEEP_NESTING], ids=[r[0] for r in DEEP_NESTING])
def test_deep_nesting_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Policy.from_toml(text)
    assert type(info.value) is ConfigError
    assert info.value.message == "policy: not valid TOML: nested too deeply"


def test_nesting_that_parses_is_refused_by_the_field_check() -> None:
    """The twin: 100 levels are valid TOML, and the constraint's check refuses them."""
    text = grant(caps=CEILING.format(op="in", bound="[" * 100 + "1" + "]" * 100))
    with pytest.raises(ConfigError, match=r"caps\[1\]: n in: items are strings or ints"):
        Policy.from_toml(text)


NUL_BYTES = [
    ("in-a-string", grant(caller='"spiffe://acme/\x00orch"'), "not valid TOML: Illegal character"),
    ("in-a-comment", "# \x00\n" + grant(), "not valid TOML: Found invalid character"),
    ("in-a-key", grant() + "max\x00_dpt = 1\n", "not valid TOML"),
    ("escaped-in-the-caller", grant(caller='"spiffe://acme/\\u0000orch"'),
     "grant 1: caller: caller is not a principal"),
    ("escaped-in-a-subject", grant(subjects='["spiffe://acme/\\u0000"]'),
     "subjects: \"spiffe://acme/\\u0000\": an entry is not a principal"),
    ("escaped-in-a-resource", grant(caps='[{ res = "a\\u0000b", act = ["get"] }]'),
     f"{G1}: caps[1]: bad segment"),
    ("escaped-in-the-key", grant(key='"k\\u0000"'), f"{G1}: key: kid is not"),
]


@pytest.mark.parametrize(("text", "words"),
                         [r[1:] for r in (*BAD_FILES, *HUGE_INTEGERS, *NUL_BYTES)],
                         ids=[r[0] for r in (*BAD_FILES, *HUGE_INTEGERS, *NUL_BYTES)])
def test_bad_file_is_a_config_error(text: str, words: str) -> None:
    """Faulty fields, integers past what the file may hold, NUL bytes: each a
    ConfigError (that class, no other) naming the file and the fault."""
    with pytest.raises(ConfigError) as info:
        Policy.from_toml(text)
    assert type(info.value) is ConfigError
    assert words in info.value.message
    assert info.value.message.startswith("policy: ")


def test_a_nul_byte_in_a_file_on_disk_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(grant().encode() + b"\x00\n")
    with pytest.raises(ConfigError, match=rf"^policy {path}: not valid TOML: "):
        Policy.load(path)


# --- subject globs -------------------------------------------------------------------

GLOBS = [
    ("spiffe://acme/exact", "spiffe://acme/exact", True),
    ("spiffe://acme/exact", "spiffe://acme/exact2", False),
    ("spiffe://acme/exact", "spiffe://acme/exac", False),
    ("spiffe://acme/agents/*", "spiffe://acme/agents/a1", True),
    ("spiffe://acme/agents/*", "spiffe://acme/agents/", True),
    ("spiffe://acme/agents/*", "spiffe://acme/agents/a1/sub", False),
    ("spiffe://acme/agents/*", "spiffe://acme/agentsX/a1", False),
    ("spiffe://acme/agents/**", "spiffe://acme/agents/a1/sub", True),
    ("spiffe://acme/agents/**", "spiffe://acme/agents", False),
    ("spiffe://acme/*/bot", "spiffe://acme/eu/bot", True),
    ("spiffe://acme/*/bot", "spiffe://acme/eu/x/bot", False),
    ("spiffe://acme/**/bot", "spiffe://acme/eu/x/bot", True),
    ("agent-*-eu", "agent-7-eu", True),
    ("agent-*-eu", "agent-7-us", False),
    ("*", "anything-without-slash", True),
    ("*", "a/b", False),
    ("**", "a/b", True),
    ("a.b", "aXb", False),  # no regex meaning: "." is a dot
    ("a+", "aa", False),
]


@pytest.mark.parametrize(("pattern", "subject", "expected"), GLOBS,
                         ids=[f"{p}~{s}" for p, s, _ in GLOBS])
def test_subject_glob(pattern: str, subject: str, expected: bool) -> None:
    assert SubjectPattern.parse(pattern).matches(subject) is expected


def test_subject_glob_does_not_backtrack() -> None:
    """A caller chooses the subject; a many-star pattern must not blow up on it."""
    pattern = SubjectPattern.parse("*a" * 20 + "*b")
    start = time.perf_counter()
    assert not pattern.matches("a" * 256)
    assert pattern.matches("a" * 255 + "b")
    assert time.perf_counter() - start < 0.5


# --- evaluation ------------------------------------------------------------------------


def test_allowed_request_gets_its_grant(policy: Policy) -> None:
    chosen = policy.evaluate(ORCH, request())
    assert isinstance(chosen, Grant)
    assert chosen.index == 1


def test_several_caps_each_within_some_ceiling(policy: Policy) -> None:
    assert policy.evaluate(ORCH, request(caps=(ORDERS_42, REFUND))).index == 1


def test_second_grant_allows_what_the_first_does_not(policy: Policy) -> None:
    wide = {"res": "db/orders/**", "act": ["count"]}
    assert policy.evaluate(ORCH, request(caps=(wide,), ttl=60, dpt=0)).index == 2


def test_caps_from_two_grants_do_not_combine(policy: Policy) -> None:
    """One grant must allow the whole request."""
    wide = {"res": "db/orders/**", "act": ["count"]}
    assert denial(policy, request(caps=(REFUND, wide), ttl=60, dpt=0)).reason == \
        "capability_not_contained"


def test_key_chooses_the_grant(policy: Policy) -> None:
    narrow = request(ttl=60, dpt=0, caps=({"res": "db/orders/1", "act": ["select"]},))
    assert policy.evaluate(ORCH, narrow).index == 2
    assert policy.evaluate(ORCH, request(key="root-a")).index == 1


BOT = "spiffe://acme/bots/b1"  # a subject only grant 1 allows

# (id, caller, request changes, reason, words in the message)
DENIALS = [
    ("unknown-caller", "spiffe://acme/nobody", {}, "caller_unknown",
     'caller "spiffe://acme/nobody" has no grant'),
    ("cap-does-not-parse", ORCH, {"caps": ({"res": "a", "act": ["GET"]},)},
     "invalid_capability", "capability 1 is invalid: bad action"),
    ("cap-not-a-dict", ORCH, {"caps": (ORDERS_42, ["a"])}, "invalid_capability",
     "capability 2 is invalid"),
    ("no-caps", ORCH, {"caps": ()}, "invalid_capability", "1..64 capabilities, not 0"),
    ("too-many-caps", ORCH, {"caps": (ORDERS_42,) * 65}, "invalid_capability", "not 65"),
    ("subject-not-allowed", ORCH, {"sub": "spiffe://acme/agents/a1/deeper"},
     "subject_not_allowed", 'subject "spiffe://acme/agents/a1/deeper" does not match'),
    # Grant 2 would allow this cap, but not this subject: grant 1 got furthest.
    ("pattern-wider", ORCH, {"sub": BOT, "caps": ({"res": "db/orders/**", "act": ["select"],
                                                   "if": {"customer": {"eq": 42}}},)},
     "capability_not_contained",
     'grant 1 (spiffe://acme/orch): capability 1 "db/orders/** select if customer eq 42" is '
     'not within any ceiling: nearest "db/orders/42/** select if customer eq 42": '
     "the request's pattern is wider"),
    ("second-cap-wider", ORCH, {"caps": (ORDERS_42, {"res": "api/refunds/o-1", "act": ["post"],
                                                      "if": {"amount": {"le": 9000}}})},
     "capability_not_contained",
     'capability 2 "api/refunds/o-1 post if amount le 9000" is not within any ceiling: '
     'nearest "api/refunds/* post if amount le 5000 and amount ge 1": the request allows '
     "amount to be any int up to 9000, but the ceiling needs amount le 5000"),
    ("constraint-dropped", ORCH, {"sub": BOT,
                                  "caps": ({"res": "db/orders/42/x", "act": ["select"]},)},
     "capability_not_contained", "the ceiling constrains customer and the request does not"),
    ("ttl-too-long", ORCH, {"ttl": 901}, "ttl_exceeds_max", "ttl 901 s exceeds max_ttl 900 s"),
    ("too-deep", ORCH, {"dpt": 2}, "depth_exceeds_max", "dpt 2 exceeds max_dpt 1"),
    ("audience-missing", ORCH, {"aud": None}, "audience_required", "the request has no aud"),
    ("audience-empty", ORCH, {"aud": ()}, "audience_required", "the request has no aud"),
    ("audience-not-listed", ORCH, {"aud": ("orders-db", "ledger")}, "audience_not_allowed",
     'aud "ledger" not among "orders-db", "payments-api"'),
    ("use-missing", ORCH, {"use": None}, "use_required", "use <= 3"),
    ("use-too-high", ORCH, {"use": 4}, "use_exceeds_max", "use 4 exceeds max_use 3"),
    ("other-key", ORCH, {"key": "root-z"}, "key_not_allowed",
     'key "root-z" is not this grant\'s key "root-a"'),
]


@pytest.mark.parametrize(("caller", "changes", "reason", "words"), [r[1:] for r in DENIALS],
                         ids=[r[0] for r in DENIALS])
def test_denial(policy: Policy, caller: str, changes: dict[str, Any], reason: str,
                words: str) -> None:
    denied = denial(policy, request(**changes), caller)
    assert denied.reason == reason
    assert words in denied.message


def test_every_reason_has_a_row() -> None:
    assert {r[3] for r in DENIALS} == set(REASONS)


def test_denial_names_the_grant_that_got_furthest(policy: Policy) -> None:
    # Grant 2 allows the caps but its ttl is 60; grant 1 fails on the caps.
    wide = {"res": "db/orders/**", "act": ["count"]}
    denied = denial(policy, request(caps=(wide,), ttl=120, dpt=0))
    assert denied.reason == "ttl_exceeds_max"
    assert denied.message.startswith(f"grant 2 ({ORCH}): ttl 120 s exceeds max_ttl 60 s")
    # Both fail on the subject: the first grant is reported.
    denied = denial(policy, request(sub="spiffe://other/x"))
    assert denied.message.startswith(f"grant 1 ({ORCH}): subject")


def test_nearest_ceiling_is_the_one_that_agrees_most(policy: Policy) -> None:
    refund = {"res": "api/refunds/o-1", "act": ["delete"]}
    denied = denial(policy, request(caps=(refund,)))
    assert 'nearest "api/refunds/* post' in denied.message
    assert "action(s) delete not among the ceiling's post" in denied.message


def test_caller_chosen_text_is_escaped_in_messages(policy: Policy) -> None:
    denied = denial(policy, request(sub="spiffe://acme/x\nFAKE LOG LINE"))
    assert "\n" not in denied.message
    assert "\\n" in denied.message


@pytest.mark.parametrize("aud", [None, ("anything",), ("a", "b")])
def test_no_audiences_allows_any_or_none(policy: Policy, aud: tuple[str, ...] | None) -> None:
    req = request(sub="spiffe://acme/jobs/eu/1", aud=aud, use=None, dpt=2, ttl=3600)
    assert policy.evaluate(REPORTS, req).index == 3


def test_audience_subset_allowed(policy: Policy) -> None:
    assert policy.evaluate(ORCH, request(aud=("payments-api", "orders-db"))).index == 1


@pytest.mark.parametrize("use", [None, 1, 1000])
def test_no_max_use_allows_any_or_none(policy: Policy, use: int | None) -> None:
    req = request(sub="spiffe://acme/jobs/x", use=use, aud=None)
    assert policy.evaluate(REPORTS, req).index == 3


def test_use_at_max_allowed(policy: Policy) -> None:
    assert policy.evaluate(ORCH, request(use=3)).index == 1


@pytest.mark.parametrize("sub", ["spiffe://acme/agents/a1", "spiffe://acme/bots/eu/b7",
                                 "spiffe://acme/exact"])
def test_each_subject_pattern_of_a_grant(policy: Policy, sub: str) -> None:
    assert policy.evaluate(ORCH, request(sub=sub)).index == 1


def test_any_action_ceiling_allows_any_action(policy: Policy) -> None:
    anything = {"res": "x/y", "act": ["*"], "if": {"k": {"prefix": "p"}}}
    req = request(sub="spiffe://acme/jobs/a", caps=(anything,), aud=None, use=None)
    assert policy.evaluate(REPORTS, req).index == 3


# --- the documented example ------------------------------------------------------------

ACME = "spiffe://acme.example"
EX_ORCH = f"{ACME}/svc/orchestrator"
EX_REPORTS = f"{ACME}/svc/reporting"
AGENT = f"{ACME}/agents/support/a1"
NIGHTLY = f"{ACME}/jobs/reporting/eu/nightly"


def orders(**cond: Any) -> dict[str, Any]:
    cap: dict[str, Any] = {"res": "db/orders/**", "act": ["select"]}
    if cond:
        cap["if"] = cond
    return cap


def refund(**amount: int) -> dict[str, Any]:
    return {"res": "api/payments/refunds/o-77", "act": ["post"],
            "if": {"amount": amount, "currency": {"eq": "EUR"}}}


def ex_request(caps: tuple[dict[str, Any], ...], **changes: Any) -> DelegateRequest:
    fields: dict[str, Any] = {"sub": AGENT, "holder_jwk": {}, "caps": caps, "ttl": 600,
                              "aud": ("orders-db",), "dpt": 0}
    fields.update(changes)
    return DelegateRequest(**fields)


@pytest.fixture(scope="module")
def example() -> Policy:
    return Policy.load(EXAMPLE)


def test_example_admins(example: Policy) -> None:
    assert example.admins == {f"{ACME}/ops/security-oncall"}
    assert [g.caller for g in example.grants] == [EX_ORCH, EX_ORCH, EX_REPORTS]


EXAMPLE_ALLOWED = [
    ("orders-one-customer", EX_ORCH, ex_request((orders(customer={"eq": 1042}),)), 1),
    ("orders-delegable-once", EX_ORCH, ex_request((orders(customer={"eq": 2077}),), dpt=1), 1),
    ("refund-exact-amount", EX_ORCH,
     ex_request((refund(eq=1250),), ttl=300, use=1, aud=("payments-api",)), 2),
    ("refund-range", EX_ORCH,
     ex_request((refund(gt=0, le=5000),), ttl=300, use=1, aud=("payments-api",)), 2),
    ("reporting-invoices", EX_REPORTS,
     ex_request(({"res": "db/invoices/2026/**", "act": ["select"]},), sub=NIGHTLY,
                ttl=3600, aud=None), 3),
]


@pytest.mark.parametrize(("caller", "req", "index"), [r[1:] for r in EXAMPLE_ALLOWED],
                         ids=[r[0] for r in EXAMPLE_ALLOWED])
def test_example_allows(example: Policy, caller: str, req: DelegateRequest,
                        index: int) -> None:
    assert example.evaluate(caller, req).index == index


REFUND_OK = {"ttl": 300, "use": 1, "aud": ("payments-api",)}
EXAMPLE_DENIED = [
    ("orders-any-customer", EX_ORCH, ex_request((orders(),)), "capability_not_contained"),
    ("orders-other-customer", EX_ORCH, ex_request((orders(customer={"eq": 9999}),)),
     "capability_not_contained"),
    ("orders-an-hour", EX_ORCH, ex_request((orders(customer={"eq": 1042}),), ttl=3600),
     "ttl_exceeds_max"),
    ("refund-without-use", EX_ORCH, ex_request((refund(eq=1250),), **{**REFUND_OK, "use": None}),
     "use_required"),
    ("refund-twice", EX_ORCH, ex_request((refund(eq=1250),), **{**REFUND_OK, "use": 2}),
     "use_exceeds_max"),
    ("refund-no-lower-bound", EX_ORCH, ex_request((refund(le=5000),), **REFUND_OK),
     "capability_not_contained"),
    ("refund-too-large", EX_ORCH, ex_request((refund(gt=0, le=10000),), **REFUND_OK),
     "capability_not_contained"),
    ("refund-other-audience", EX_ORCH,
     ex_request((refund(eq=1250),), **{**REFUND_OK, "aud": ("payments-api", "ledger")}),
     "audience_not_allowed"),
    ("reporting-update", EX_REPORTS,
     ex_request(({"res": "db/orders/**", "act": ["update"]},), sub=NIGHTLY, aud=None),
     "capability_not_contained"),
    ("reporting-to-an-agent", EX_REPORTS,
     ex_request(({"res": "db/orders/**", "act": ["select"]},), aud=None),
     "subject_not_allowed"),
    ("reporting-delegable", EX_REPORTS,
     ex_request(({"res": "db/orders/**", "act": ["select"]},), sub=NIGHTLY, aud=None, dpt=1),
     "depth_exceeds_max"),
]


@pytest.mark.parametrize(("caller", "req", "reason"), [r[1:] for r in EXAMPLE_DENIED],
                         ids=[r[0] for r in EXAMPLE_DENIED])
def test_example_denies(example: Policy, caller: str, req: DelegateRequest,
                        reason: str) -> None:
    assert denial(example, req, caller).reason == reason


def test_a_grant_without_key_signs_with_the_active_key_and_allows_any_requested_kid() -> None:
    policy = Policy.from_toml(grant(key="OMIT", caps='[{ res = "db/orders/**", act = ["*"] }]',
                                    max_ttl="900", max_dpt="1"))
    assert policy.grants[0].key is None
    assert policy.evaluate(ORCH, request(key="root-2030", use=None)) is policy.grants[0]
    # Its twin with a key named by the grant: another kid is refused.
    keyed = Policy.from_toml(grant(key='"k1"', caps='[{ res = "db/orders/**", act = ["*"] }]',
                                   max_ttl="900", max_dpt="1"))
    assert denial(keyed, request(key="root-2030", use=None)).reason == "key_not_allowed"


def test_max_ttl_is_the_longest_any_grant_allows() -> None:
    assert Policy.from_toml(grant(max_ttl="300") + grant(max_ttl="900")).max_ttl() == 900
    assert Policy.from_toml("").max_ttl() == 0


def test_a_capability_denial_names_the_grant_with_the_nearest_ceiling() -> None:
    orders = grant(caps='[{ res = "db/orders/**", act = ["select"] }]', key="OMIT")
    refunds = grant(caps='[{ res = "api/refunds/*", act = ["post"], '
                         'if = { amount = { le = 100 } } }]', key="OMIT")
    wanted = {"res": "api/refunds/o-1", "act": ["post"], "if": {"amount": {"eq": 500}}}
    for text in (orders + refunds, refunds + orders):
        policy = Policy.from_toml(text)
        refused = denial(policy, request(caps=(wanted,), ttl=30, dpt=0, use=None, aud=None))
        assert refused.reason == "capability_not_contained"
        assert '"api/refunds/* post if amount le 100"' in refused.message
