"""The issuance policy: which caller may delegate which capability ceilings, to
whom, for how long and how deep, with which key; and the containment test that
decides whether a requested capability lies within a ceiling.

File format (TOML; every field is checked, unknown fields are errors)::

    admins = ["spiffe://acme/ops"]        # optional: principals allowed the admin RPCs

    [[grant]]                             # one or more; a caller may have several
    caller = "spiffe://acme/orch"         # an exact principal (the mTLS identity)
    subjects = ["spiffe://acme/agents/*"] # principals or globs the caller may delegate to
    caps = [                              # ceilings, spec §4 syntax, as inline tables
      { res = "db/orders/**", act = ["select"], if = { customer = { in = [42, 43] } } },
    ]
    max_ttl = 900                         # seconds
    max_dpt = 1                           # 0..15: how many more links may follow
    audiences = ["orders-api"]            # optional: if present, the request must carry
                                          #   aud and every aud must be listed here
    max_use = 1                           # optional: if present, the request must carry
                                          #   use <= max_use
    key = "root-2025"                     # the kid this grant signs with

Subject globs: ``*`` matches any run of characters other than ``/`` (possibly
empty), ``**`` any run at all; every other character stands for itself, so a
subject that itself contains ``*`` can only be allowed through a wildcard.

Grants and capabilities are counted from 1 in every message.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from types import MappingProxyType
from typing import Any, Final

from verifier_sdk import Capability
from verifier_sdk._capability import _holds  # the verifier's own operator semantics
from verifier_sdk._encoding import MAX_SAFE_INT
from verifier_sdk._link import MAX_USE, check_kid, check_principal

from ._errors import ConfigError, PolicyDenied
from ._model import DelegateRequest

__all__ = [
    "REASONS",
    "ContainmentResult",
    "Grant",
    "Policy",
    "SubjectPattern",
    "contains",
]

# The stable denial tokens, in the order the rules are checked.
REASONS: Final = (
    "caller_unknown",
    "invalid_capability",
    "subject_not_allowed",
    "capability_not_contained",
    "ttl_exceeds_max",
    "depth_exceeds_max",
    "audience_required",
    "audience_not_allowed",
    "use_required",
    "use_exceeds_max",
    "key_not_allowed",
)

MAX_DPT: Final = 15  # spec §3.3
MAX_TTL: Final = 2**31 - 1  # seconds; only a sanity bound on the file
MAX_LINK_CAPS: Final = 64  # spec §3.3: a link carries 1..64 capabilities
_TOP_KEYS: Final = frozenset({"admins", "grant"})
_GRANT_KEYS: Final = frozenset(
    {"caller", "subjects", "caps", "max_ttl", "max_dpt", "audiences", "max_use", "key"}
)
_GRANT_REQUIRED: Final = ("caller", "subjects", "caps", "max_ttl", "max_dpt")


def _q(value: object) -> str:
    """Quote a value for a message; escapes control characters a caller may send."""
    return json.dumps(value, default=str)


# --- containment -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContainmentResult:
    """Whether one capability lies within another; truthy if so, else ``reason`` says why."""

    ok: bool
    reason: str = ""
    # How far the check got before it failed (stage, progress within the stage);
    # orders the ceilings by nearness in a denial message. Stages: 0 resource,
    # 1 action, 2 constraints, 3 contained.
    progress: tuple[int, int] = (3, 0)

    def __bool__(self) -> bool:
        return self.ok


_YES: Final = ContainmentResult(True)

# The set of values a conjunction of operators on one attribute admits. eq and
# in admit finitely many (type, value) pairs; lt/le/gt/ge only ints (a bool is
# not one); prefix only strings. So a conjunction is one of: a finite set (it
# has eq or in), an int interval, the strings with a prefix, or nothing.


@dataclass(frozen=True, slots=True)
class _Finite:
    pairs: tuple[tuple[type, Any], ...]  # (type, value): 1, True and "1" stay apart


@dataclass(frozen=True, slots=True)
class _Ints:
    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class _Prefix:
    prefix: str


@dataclass(frozen=True, slots=True)
class _Empty:
    why: str


_Domain = _Finite | _Ints | _Prefix | _Empty


def _domain(ops: tuple[tuple[str, Any], ...]) -> _Domain:
    named = dict(ops)
    if "eq" in named or "in" in named:
        seed = {(type(named["eq"]), named["eq"])} if "eq" in named else set(named["in"])
        # Filtering the seed through every operator with the verifier's own
        # predicate gives exactly the values this conjunction admits.
        kept = [pair for pair in seed if all(_holds(op, b, pair[1]) for op, b in ops)]
        if not kept:
            return _Empty("no value of its eq/in passes its other operators")
        return _Finite(tuple(sorted(kept, key=lambda p: (p[0].__name__, repr(p[1])))))
    # Sound to clip to the safe range: a Request refuses any other int (spec §4.3),
    # so no request can carry a value outside it.
    lo, hi = -MAX_SAFE_INT, MAX_SAFE_INT
    numeric = ""
    for op, bound in ops:
        if op == "prefix":
            continue
        numeric = numeric or op
        if op == "lt":
            hi = min(hi, bound - 1)
        elif op == "le":
            hi = min(hi, bound)
        elif op == "gt":
            lo = max(lo, bound + 1)
        else:  # "ge"
            lo = max(lo, bound)
    if "prefix" in named:
        if numeric:
            return _Empty(f"prefix needs a string and {numeric} an int")
        return _Prefix(named["prefix"])
    if lo > hi:
        return _Empty("no int satisfies all its bounds")
    return _Ints(lo, hi)


def _show_ints(d: _Ints) -> str:
    if d.lo == -MAX_SAFE_INT and d.hi == MAX_SAFE_INT:
        return "any int"
    if d.lo == -MAX_SAFE_INT:
        return f"any int up to {d.hi}"
    if d.hi == MAX_SAFE_INT:
        return f"any int from {d.lo}"
    if d.lo == d.hi:
        return f"only {d.lo}"
    return f"the ints {d.lo}..{d.hi}"


def _show_op(attr: str, op: str, bound: Any) -> str:
    if op == "in":
        items = sorted((v for _, v in bound), key=lambda v: (type(v).__name__, v))
        if len(items) > 8:  # keep a message readable: a list may hold 256 items
            head = ", ".join(json.dumps(v, ensure_ascii=False) for v in items[:6])
            shown = f"[{head}, ... ({len(items)} items)]"
        else:
            shown = json.dumps(items, ensure_ascii=False)
    else:
        shown = json.dumps(bound, ensure_ascii=False)
    return f"{attr} {op} {shown}"


def _within_op(attr: str, dom: _Domain, op: str, bound: Any) -> str:
    """Why ``dom`` holds a value outside ``attr op bound``; "" if it holds none."""
    # Exact, but for one corner that errs on the safe side: a prefix of 1,024
    # characters or more admits at most one ctx string, yet is denied against
    # anything but a prefix.
    need = f"the ceiling needs {_show_op(attr, op, bound)}"
    if isinstance(dom, _Finite):
        for _, value in dom.pairs:
            if not _holds(op, bound, value):
                return f"the request allows {attr} = {_q(value)}, but {need}"
        return ""
    if isinstance(dom, _Ints):
        lo, hi = dom.lo, dom.hi
        allows = f"the request allows {attr} to be {_show_ints(dom)}"
        if op == "eq":
            return "" if type(bound) is int and lo == hi == bound else f"{allows}, but {need}"
        if op == "in":
            listed = {v for t, v in bound if t is int}
            if hi - lo + 1 > len(listed):  # more values than the list has ints
                return f"{allows} ({hi - lo + 1} values), but {need}"
            missing = next((v for v in range(lo, hi + 1) if v not in listed), None)
            return "" if missing is None else f"the request allows {attr} = {missing}, but {need}"
        if op == "prefix":
            return f"{allows}, but {need} (a string)"
        ok = {"lt": hi < bound, "le": hi <= bound, "gt": lo > bound, "ge": lo >= bound}[op]
        return "" if ok else f"{allows}, but {need}"
    if isinstance(dom, _Prefix):
        allows = f"the request allows any {attr} starting with {_q(dom.prefix)}"
        if op == "prefix":
            return "" if dom.prefix.startswith(bound) else f"{allows}, but {need}"
        return f"{allows}, but {need}"
    return f"the request's {attr} can never hold ({dom.why})"  # not reached: checked first


def _count(n: int) -> str:
    return f"{n} segment" if n == 1 else f"{n} segments"


def _resource_within(inner: Capability, outer: Capability) -> tuple[str, int]:
    """Why ``inner``'s pattern matches a resource ``outer``'s does not ("" if none),
    and how many leading segments agree."""
    # Exact: a literal is never "*", and for any literal there is another, so a
    # "*" or "**" position in inner always matches something a literal in outer
    # refuses; and lengths are compared as sets (n exactly, or more than n).
    ins, outs = inner.segments, outer.segments
    wider = "the request's pattern is wider"
    outside = "the request's pattern lies outside the ceiling's"
    for k, (i, o) in enumerate(zip(ins, outs, strict=False)):
        if o not in ("*", i):  # a "*" in the ceiling takes any segment
            if i == "*":
                return f"{wider}: segment {k + 1} is * where the ceiling has {_q(o)}", k
            return f"{outside}: segment {k + 1} is {_q(i)}, not {_q(o)}", k
    n, m = len(ins), len(outs)
    if inner.tail and n < m:
        rest = "/".join(outs[n:] + (("**",) if outer.tail else ()))
        return f"{wider}: its ** stands where the ceiling has {_q(rest)}", n
    if outer.tail:
        # outer matches every resource of more than m segments agreeing on the first m.
        if n <= m and not inner.tail:
            return f"{outside}: it has {_count(n)}, the ceiling's needs more than {m}", n
        return "", m
    if inner.tail:
        return f"{wider}: it ends with ** (any depth), the ceiling's has {_count(m)}", m
    if n != m:
        return f"{outside}: it has {_count(n)}, the ceiling's {m}", min(n, m)
    return "", m


def contains(inner: Capability, outer: Capability) -> ContainmentResult:
    """Whether every request ``inner`` matches is matched by ``outer`` (spec §4.2).

    Sound: never true when some request matched by ``inner`` is refused by
    ``outer``. Where containment cannot be proven it is denied with a reason. An
    ``inner`` that can match nothing (e.g. ``gt 5`` and ``lt 3``) is denied too:
    vacuously contained, but signing it would only hide the caller's mistake.
    """
    why, agree = _resource_within(inner, outer)
    if why:
        return ContainmentResult(False, why, (0, agree))
    # A request carries one action; ["*"] (None) matches any.
    if outer.actions is not None:
        if inner.actions is None:
            acts = ",".join(sorted(outer.actions))
            return ContainmentResult(
                False, f"the request allows any action (*), the ceiling only {acts}", (1, 0)
            )
        extra = inner.actions - outer.actions
        if extra:
            return ContainmentResult(
                False,
                f"action(s) {','.join(sorted(extra))} not among the ceiling's "
                f"{','.join(sorted(outer.actions))}",
                (1, 0),
            )
    # Constraints are per attribute and independent (a ctx may hold any values),
    # so inner ⊆ outer iff, for each attribute outer constrains, inner constrains
    # it too and its admitted values all pass outer's operators — given inner
    # admits something for every attribute it constrains, checked first.
    domains = {attr: _domain(ops) for attr, ops in inner.constraints}
    for attr, dom in domains.items():
        if isinstance(dom, _Empty):
            return ContainmentResult(
                False, f"the request's constraint on {attr} can never hold ({dom.why})", (2, 0)
            )
    for passed, (attr, ops) in enumerate(outer.constraints):
        if attr not in domains:
            return ContainmentResult(
                False, f"the ceiling constrains {attr} and the request does not", (2, passed)
            )
        for op, bound in ops:
            why = _within_op(attr, domains[attr], op, bound)
            if why:
                return ContainmentResult(False, why, (2, passed))
    return _YES


# --- subjects -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubjectPattern:
    """An exact principal or a glob (``*``: any run without ``/``; ``**``: any run)."""

    text: str
    tokens: tuple[str, ...] = field(repr=False)  # literal runs, "*" and "**"

    @classmethod
    def parse(cls, text: str) -> SubjectPattern:
        tokens: list[str] = []
        i = 0
        while i < len(text):
            if text.startswith("**", i):
                tokens.append("**")
                i += 2
            elif text[i] == "*":
                tokens.append("*")
                i += 1
            else:
                j = text.find("*", i)
                j = len(text) if j < 0 else j
                tokens.append(text[i:j])
                i = j
        return cls(text, tuple(tokens))

    def matches(self, subject: str) -> bool:
        # One pass over the tokens, carrying the set of positions in ``subject``
        # reachable so far: at most tokens × length steps, and no backtracking
        # for a caller-chosen subject to blow up.
        if len(self.tokens) == 1 and self.tokens[0] not in ("*", "**"):
            return subject == self.text
        n = len(subject)
        reach = [True] + [False] * n
        for tok in self.tokens:
            nxt = [False] * (n + 1)
            if tok == "**":
                first = reach.index(True)
                nxt[first:] = [True] * (n + 1 - first)
            elif tok == "*":
                open_run = False
                for p in range(n + 1):
                    open_run = reach[p] or (open_run and subject[p - 1] != "/")
                    nxt[p] = open_run
            else:
                k = len(tok)
                for p in range(n + 1 - k):
                    if reach[p] and subject.startswith(tok, p):
                        nxt[p + k] = True
            if not any(nxt):
                return False
            reach = nxt
        return reach[n]


# --- grants and the policy ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Denial:
    progress: tuple[int, ...]  # how far the request got; for capabilities, how near
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Grant:
    """One ``[[grant]]``: what ``caller`` may delegate, and the key it signs with."""

    index: int  # position in the file, from 1
    caller: str
    subjects: tuple[SubjectPattern, ...]
    caps: tuple[Capability, ...]  # the ceilings
    max_ttl: int  # seconds
    max_dpt: int
    audiences: frozenset[str] | None  # None: any audience, or none
    max_use: int | None  # None: any use limit, or none
    key: str | None  # the kid to sign with; None: whichever root key is active

    @property
    def label(self) -> str:
        return f"grant {self.index} ({self.caller})"

    def allows_subject(self, subject: str) -> bool:
        return any(p.matches(subject) for p in self.subjects)

    def _check(self, req: DelegateRequest, caps: Sequence[Capability]) -> _Denial | None:
        """The first rule of this grant that ``req`` breaks, or None."""
        if not self.allows_subject(req.sub):
            allowed = ", ".join(_q(p.text) for p in self.subjects)
            return _Denial((0, 0), "subject_not_allowed",
                           f"subject {_q(req.sub)} does not match any of {allowed}")
        for number, cap in enumerate(caps, 1):
            nearest: tuple[ContainmentResult, Capability] | None = None
            for ceiling in self.caps:
                result = contains(cap, ceiling)
                if result:
                    break
                if nearest is None or result.progress > nearest[0].progress:  # first on ties
                    nearest = (result, ceiling)
            else:
                assert nearest is not None  # a grant has at least one ceiling
                return _Denial(
                    (1, number - 1, *nearest[0].progress), "capability_not_contained",
                    f"capability {number} {_q(cap.describe())} is not within any ceiling: "
                    f"nearest {_q(nearest[1].describe())}: {nearest[0].reason}",
                )
        if req.ttl > self.max_ttl:
            return _Denial((2, 0), "ttl_exceeds_max",
                           f"ttl {req.ttl} s exceeds max_ttl {self.max_ttl} s")
        if req.dpt > self.max_dpt:
            return _Denial((3, 0), "depth_exceeds_max",
                           f"dpt {req.dpt} exceeds max_dpt {self.max_dpt}")
        if self.audiences is not None:
            if not req.aud:
                return _Denial((4, 0), "audience_required",
                               "the request has no aud; this grant requires one of "
                               + ", ".join(_q(a) for a in sorted(self.audiences)))
            extra = [a for a in req.aud if a not in self.audiences]
            if extra:
                return _Denial((5, 0), "audience_not_allowed",
                               f"aud {', '.join(_q(a) for a in extra)} not among "
                               + ", ".join(_q(a) for a in sorted(self.audiences)))
        if self.max_use is not None:
            if req.use is None:
                return _Denial((6, 0), "use_required",
                               f"the request has no use limit; this grant requires "
                               f"use <= {self.max_use}")
            if req.use > self.max_use:
                return _Denial((7, 0), "use_exceeds_max",
                               f"use {req.use} exceeds max_use {self.max_use}")
        if req.key is not None and self.key is not None and req.key != self.key:
            return _Denial((8, 0), "key_not_allowed",
                           f"key {_q(req.key)} is not this grant's key {_q(self.key)}")
        return None


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed, checked issuance policy; immutable, so a reload swaps the whole object."""

    grants: tuple[Grant, ...]
    admins: frozenset[str] = frozenset()
    _by_caller: Mapping[str, tuple[Grant, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_caller: dict[str, list[Grant]] = {}
        for grant in self.grants:
            by_caller.setdefault(grant.caller, []).append(grant)
        frozen = {caller: tuple(grants) for caller, grants in by_caller.items()}
        object.__setattr__(self, "_by_caller", MappingProxyType(frozen))

    @classmethod
    def from_toml(cls, text: str, *, source: str = "policy") -> Policy:
        """Parse and check a policy file's text; any fault is a ConfigError naming it."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        except ValueError as exc:  # tomllib passes on int()'s refusal of 4,300+ digits
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        except RecursionError:  # arrays or inline tables nested about 1,000 deep
            raise ConfigError(f"{source}: not valid TOML: nested too deeply") from None
        unknown = doc.keys() - _TOP_KEYS
        if unknown:
            raise ConfigError(f"{source}: unknown top-level field(s) {_names(unknown)}; "
                              f"expected {_names(_TOP_KEYS)}")
        admins = frozenset(_principals(doc.get("admins", []), f"{source}: admins"))
        raw_grants = doc.get("grant", [])
        if type(raw_grants) is not list:
            raise ConfigError(f"{source}: grant: write each grant as a [[grant]] table")
        grants = tuple(_parse_grant(raw, i, source) for i, raw in enumerate(raw_grants, 1))
        return cls(grants, admins)

    @classmethod
    def load(cls, path: str | PathLike[str]) -> Policy:
        """Read and parse a policy file (UTF-8)."""
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"policy {path}: cannot read: {exc}") from None
        return cls.from_toml(text, source=f"policy {path}")

    def grants_for(self, caller: str) -> tuple[Grant, ...]:
        return self._by_caller.get(caller, ())

    def max_ttl(self) -> int:
        """The longest link any grant allows (0 without grants): how long a retiring
        root key must stay in the bundle."""
        return max((grant.max_ttl for grant in self.grants), default=0)

    def is_admin(self, principal: str) -> bool:
        return principal in self.admins

    def evaluate(self, caller: str, req: DelegateRequest,
                 caps: Sequence[Capability] | None = None) -> Grant:
        """The grant of ``caller`` that allows ``req``; else PolicyDenied.
        ``caps``: the request's capabilities, if the caller has parsed them.

        Rules in order: a grant for the caller, valid capabilities, then per
        grant subject, capabilities, ttl, dpt, aud, use, key. With several
        grants, the denial reported is that of the grant that got furthest — for a
        capability outside every ceiling, the grant with the nearest ceiling —
        the first such grant on ties.
        """
        grants = self._by_caller.get(caller)
        if not grants:
            raise PolicyDenied("caller_unknown",
                               f"caller {_q(caller)} has no grant in the issuance policy")
        caps = _requested_caps(req.caps) if caps is None else tuple(caps)
        furthest: tuple[Grant, _Denial] | None = None
        for grant in grants:
            denial = grant._check(req, caps)
            if denial is None:
                return grant
            if furthest is None or denial.progress > furthest[1].progress:
                furthest = (grant, denial)
        assert furthest is not None  # grants is not empty
        grant, denial = furthest
        raise PolicyDenied(denial.reason, f"{grant.label}: {denial.message}")


def _requested_caps(raw: Sequence[Mapping[str, Any]]) -> tuple[Capability, ...]:
    """Parse the request's capabilities; a malformed one is a denial (the daemon checks
    the request's format before the policy, so there it is an invalid request)."""
    if not 1 <= len(raw) <= MAX_LINK_CAPS:
        raise PolicyDenied("invalid_capability",
                           f"a link carries 1..{MAX_LINK_CAPS} capabilities, not {len(raw)}")
    caps = []
    for number, cap in enumerate(raw, 1):
        try:
            caps.append(Capability.parse(cap))
        except ValueError as exc:
            raise PolicyDenied("invalid_capability",
                               f"capability {number} is invalid: {exc}") from None
    return tuple(caps)


# --- parsing helpers ---------------------------------------------------------------------


def _names(keys: Iterable[str]) -> str:
    return ", ".join(sorted(keys))


def _principals(value: object, where: str) -> list[str]:
    if type(value) is not list:
        raise ConfigError(f"{where}: a list of principals")
    out: list[str] = []
    for item in value:
        try:
            check_principal(item, "an entry")
        except ValueError as exc:
            raise ConfigError(f"{where}: {_q(item)}: {exc}") from None
        if item in out:
            raise ConfigError(f"{where}: {_q(item)} is listed twice")
        out.append(item)
    return out


def _int(value: object, where: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:  # a TOML bool is not an int
        raise ConfigError(f"{where}: an int in {low}..{high}, not {_q(value)}")
    return value


def _parse_grant(raw: object, index: int, source: str) -> Grant:
    where = f"{source}: grant {index}"
    caller = ""
    if type(raw) is not dict:
        raise ConfigError(f"{where}: write each grant as a [[grant]] table")
    if "caller" in raw:
        try:
            caller = check_principal(raw["caller"], "caller")
        except ValueError as exc:
            raise ConfigError(f"{where}: caller: {exc}") from None
        where = f"{where} ({caller})"
    unknown = raw.keys() - _GRANT_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {_names(unknown)}; "
                          f"expected {_names(_GRANT_KEYS)}")
    missing = [k for k in _GRANT_REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}")

    patterns = _principals(raw["subjects"], f"{where}: subjects")
    if not patterns:
        raise ConfigError(f"{where}: subjects: at least one subject pattern")

    if type(raw["caps"]) is not list or not raw["caps"]:
        raise ConfigError(f"{where}: caps: a non-empty list of capabilities (inline tables)")
    ceilings: list[Capability] = []
    for number, cap in enumerate(raw["caps"], 1):
        try:
            parsed = Capability.parse(cap)
        except ValueError as exc:
            raise ConfigError(f"{where}: caps[{number}]: {exc}") from None
        if any(c.raw == parsed.raw for c in ceilings):
            raise ConfigError(f"{where}: caps[{number}]: {_q(parsed.describe())} is listed twice")
        ceilings.append(parsed)

    audiences: frozenset[str] | None = None
    if "audiences" in raw:
        listed = raw["audiences"]
        if type(listed) is not list or not listed:
            raise ConfigError(f"{where}: audiences: a non-empty list of strings "
                              "(leave the field out to allow any audience)")
        for aud in listed:
            if type(aud) is not str or not 1 <= len(aud) <= 256:
                raise ConfigError(f"{where}: audiences: {_q(aud)} is not a string "
                                  "of 1..256 characters")
        if len(set(listed)) != len(listed):
            raise ConfigError(f"{where}: audiences: an audience is listed twice")
        audiences = frozenset(listed)

    key = None
    if "key" in raw:
        try:
            key = check_kid(raw["key"])
        except ValueError as exc:
            raise ConfigError(f"{where}: key: {exc}") from None

    return Grant(
        index=index,
        caller=caller,
        subjects=tuple(SubjectPattern.parse(p) for p in patterns),
        caps=tuple(ceilings),
        max_ttl=_int(raw["max_ttl"], f"{where}: max_ttl", 1, MAX_TTL),
        max_dpt=_int(raw["max_dpt"], f"{where}: max_dpt", 0, MAX_DPT),
        audiences=audiences,
        max_use=(None if "max_use" not in raw
                 else _int(raw["max_use"], f"{where}: max_use", 1, MAX_USE)),
        key=key,
    )
