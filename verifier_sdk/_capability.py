"""Capabilities and requests (spec §4): parsing, strict matching, and the
"nearest capability" explanation of a denial."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from ._encoding import MAX_SAFE_INT

_LITERAL = re.compile(r"[A-Za-z0-9._~:@+=,-]+")
_ACTION = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_ATTR = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")
_OPERATORS: Final = ("eq", "in", "lt", "le", "gt", "ge", "prefix")
_CAP_MEMBERS: Final = frozenset({"res", "act", "if"})

Scalar = str | int | bool


def _is_int(value: object) -> bool:
    return type(value) is int and -MAX_SAFE_INT <= value <= MAX_SAFE_INT


def parse_pattern(pattern: object, *, concrete: bool = False) -> tuple[tuple[str, ...], bool]:
    """Split a PATTERN into its segments; return (segments, ends_with_double_star).

    ``concrete`` (a request's resource) refuses ``*`` and ``**``.
    """
    if type(pattern) is not str or not 1 <= len(pattern) <= 512:
        raise ValueError("a resource pattern is a string of 1..512 characters")
    segments = tuple(pattern.split("/"))
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg in ("*", "**"):
            if concrete:
                raise ValueError(f"request resource {pattern!r} has a wildcard segment")
            if seg == "**" and i != last:
                raise ValueError(f"'**' only as the last segment: {pattern!r}")
        elif not _LITERAL.fullmatch(seg) or seg in (".", ".."):
            raise ValueError(f"bad segment {seg!r} in resource pattern {pattern!r}")
    tail = segments[-1] == "**"
    return (segments[:-1] if tail else segments), tail


def _check_action(action: object) -> str:
    if type(action) is not str or not _ACTION.fullmatch(action):
        raise ValueError(f"bad action {action!r}")
    return action


def _check_attr(attr: object) -> str:
    if type(attr) is not str or not _ATTR.fullmatch(attr):
        raise ValueError(f"bad attribute name {attr!r}")
    return attr


def _parse_constraint(attr: str, ops: object) -> tuple[tuple[str, Any], ...]:
    if type(ops) is not dict or not 1 <= len(ops) <= 6:
        raise ValueError(f"constraint on {attr!r} must be an object of 1..6 operators")
    parsed: list[tuple[str, Any]] = []
    for op in _OPERATORS:  # a fixed order: messages and checks are stable
        if op not in ops:
            continue
        value = ops[op]
        if op == "eq":
            if type(value) is not str and type(value) is not bool and not _is_int(value):
                raise ValueError(f"{attr} eq: a string, int or bool")
        elif op == "in":
            if type(value) is not list or not 1 <= len(value) <= 256:
                raise ValueError(f"{attr} in: a list of 1..256 items")
            if not all(type(item) is str or _is_int(item) for item in value):
                raise ValueError(f"{attr} in: items are strings or ints")
            value = frozenset((type(item), item) for item in value)
        elif op == "prefix":
            if type(value) is not str:
                raise ValueError(f"{attr} prefix: a string")
        elif not _is_int(value):
            raise ValueError(f"{attr} {op}: an int")
        parsed.append((op, value))
    unknown = ops.keys() - set(_OPERATORS)
    if unknown:
        raise ValueError(f"unknown constraint operator(s) {sorted(unknown)} on {attr!r}")
    return tuple(parsed)


def _holds(op: str, bound: Any, value: object) -> bool:
    if op == "eq":
        return type(value) is type(bound) and bool(value == bound)
    if op == "in":
        return (type(value), value) in bound
    if op == "prefix":
        return type(value) is str and value.startswith(bound)
    if type(value) is not int:  # numeric operators: a bool is not an int
        return False
    limit: int = bound
    if op == "lt":
        return value < limit
    if op == "le":
        return value <= limit
    if op == "gt":
        return value > limit
    return value >= limit  # "ge"


def _show_bound(op: str, bound: Any) -> str:
    if op == "in":
        return json.dumps(sorted((v for _, v in bound), key=repr), ensure_ascii=False)
    return json.dumps(bound, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Capability:
    """A parsed capability: what one entry of a link's ``cap`` allows."""

    raw: Mapping[str, Any] = field(repr=False)
    segments: tuple[str, ...]
    tail: bool  # the pattern ends with "**"
    actions: frozenset[str] | None  # None: ["*"], any action
    constraints: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]

    @classmethod
    def parse(cls, cap: object) -> Capability:
        if type(cap) is not dict:
            raise ValueError("a capability is an object")
        if not {"res", "act"} <= cap.keys() or not cap.keys() <= _CAP_MEMBERS:
            raise ValueError("a capability has 'res', 'act' and optionally 'if'")
        segments, tail = parse_pattern(cap["res"])
        act = cap["act"]
        if type(act) is not list or not 1 <= len(act) <= 32:
            raise ValueError("'act' is a list of 1..32 actions")
        actions = None if act == ["*"] else frozenset(_check_action(a) for a in act)
        constraints: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
        if "if" in cap:
            cond = cap["if"]
            if type(cond) is not dict or not 1 <= len(cond) <= 32:
                raise ValueError("'if' is an object of 1..32 attributes")
            constraints = tuple(
                (_check_attr(attr), _parse_constraint(attr, ops)) for attr, ops in cond.items()
            )
        return cls(cap, segments, tail, actions, constraints)

    def resource_matches(self, res: tuple[str, ...]) -> bool:
        segments = self.segments
        n = len(segments)
        if self.tail:
            if len(res) <= n:  # "**" needs one segment or more
                return False
            res = res[:n]
        elif len(res) != n:
            return False
        if "*" not in segments:
            return res == segments
        return all(p in ("*", r) for p, r in zip(segments, res, strict=True))

    def failed_constraint(self, ctx: Mapping[str, object]) -> tuple[str, str, Any] | None:
        """The first (attr, op, bound) that ``ctx`` fails, or None if all hold."""
        for attr, ops in self.constraints:
            if attr not in ctx:
                return attr, "", None
            value = ctx[attr]
            for op, bound in ops:
                if not _holds(op, bound, value):
                    return attr, op, bound
        return None

    def matches(self, req: Request) -> bool:
        """Spec §4.2: resource, action and every constraint."""
        return (
            self.resource_matches(req.segments)
            and (self.actions is None or req.act in self.actions)
            and self.failed_constraint(req.ctx) is None
        )

    def describe(self) -> str:
        """E.g. ``api/payments/refunds/o-123 post if amount le 5000``."""
        acts = "*" if self.actions is None else ",".join(sorted(self.actions))
        text = f"{self.raw['res']} {acts}"
        conds = [
            f"{attr} {op} {_show_bound(op, bound)}" for attr, ops in self.constraints
            for op, bound in ops
        ]
        return text + (" if " + " and ".join(conds) if conds else "")

    def why_not(self, req: Request) -> str:
        """What keeps this capability from allowing ``req`` (it must not match)."""
        if not self.resource_matches(req.segments):
            return f"resource {req.res} is not under {self.raw['res']}"
        if self.actions is not None and req.act not in self.actions:
            return f"action {req.act} is not in [{','.join(sorted(self.actions))}]"
        failed = self.failed_constraint(req.ctx)
        if failed is None:
            return "it matches"
        attr, op, bound = failed
        if not op:
            return f"the request has no {attr}"
        got = json.dumps(req.ctx[attr], ensure_ascii=False)
        return f"{attr} {op} {_show_bound(op, bound)} fails for {got}"

    def closeness(self, req: Request) -> tuple[int, int, int, int]:
        """Orders capabilities by how nearly they allow ``req``."""
        common = 0
        for p, r in zip(self.segments, req.segments, strict=False):
            if p not in ("*", r):
                break
            common += 1
        satisfied = 0
        for attr, ops in self.constraints:
            if attr in req.ctx and all(_holds(op, b, req.ctx[attr]) for op, b in ops):
                satisfied += 1
        return (
            int(self.resource_matches(req.segments)),
            int(self.actions is None or req.act in self.actions),
            common,
            satisfied - len(self.constraints),
        )


@dataclass(frozen=True, slots=True, init=False)
class Request:
    """What a service is asked to do (spec §4.3). Invalid input: ValueError."""

    res: str
    act: str
    ctx: Mapping[str, Scalar]
    segments: tuple[str, ...] = field(repr=False, compare=False)

    def __init__(self, res: str, act: str, ctx: Mapping[str, Scalar] | None = None) -> None:
        segments, _ = parse_pattern(res, concrete=True)
        _check_action(act)
        ctx = {} if ctx is None else ctx
        if not isinstance(ctx, Mapping) or len(ctx) > 64:
            raise ValueError("request ctx is a mapping of at most 64 attributes")
        for attr, value in ctx.items():
            _check_attr(attr)
            if type(value) is str:
                if len(value) > 1024:
                    raise ValueError(f"ctx {attr}: strings are at most 1,024 characters")
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ValueError(f"ctx {attr}: not valid Unicode") from exc
            elif type(value) is not bool and not _is_int(value):
                raise ValueError(f"ctx {attr}: a string, a safe-range int or a bool")
        object.__setattr__(self, "res", res)
        object.__setattr__(self, "act", act)
        object.__setattr__(self, "ctx", MappingProxyType(dict(ctx)))
        object.__setattr__(self, "segments", segments)

    def canonical(self, aud: str) -> dict[str, Any]:
        """The object whose canonical JSON a PoP's ``req`` hashes (spec §5)."""
        return {"act": self.act, "aud": aud, "ctx": dict(self.ctx), "res": self.res}
