"""What the integrations share: the one table from refusal codes to transport
answers, the refusal record, and the view of an HTTP request a mapper gets.

No framework imports here: ``verifier_sdk.integrations`` must import with the
SDK's base dependencies alone.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

from .._capability import Request

Kind = Literal["unauthenticated", "forbidden", "unavailable", "invalid"]

#: Codes the integrations add to the verifier's (spec §8).
MISSING_CREDENTIALS: Final = "missing_credentials"  # no chain was sent at all
BAD_REQUEST: Final = "bad_request"  # the mapper could not express the call as a Request

#: The one mapping from a refusal code to what kind of "no" it is; each
#: transport turns a kind into its status (HTTP 401/403/503/400, gRPC
#: UNAUTHENTICATED/PERMISSION_DENIED/UNAVAILABLE/INVALID_ARGUMENT).
KIND_OF: Final[Mapping[str, Kind]] = MappingProxyType({
    # "Who are you?": no credential, or not a valid, current chain whose leaf
    # key signed a fresh proof for this very call.
    MISSING_CREDENTIALS: "unauthenticated",
    "too_large": "unauthenticated",
    "malformed": "unauthenticated",
    "unsupported_alg": "unauthenticated",
    "unknown_key": "unauthenticated",
    "broken_chain": "unauthenticated",
    "bad_signature": "unauthenticated",
    "depth_exceeded": "unauthenticated",
    "not_yet_valid": "unauthenticated",
    "expired": "unauthenticated",
    "pop_invalid": "unauthenticated",
    "replayed": "unauthenticated",
    # "Not allowed": a genuine credential that does not cover this call here.
    "revoked": "forbidden",
    "audience": "forbidden",
    "denied": "forbidden",
    "uses_exhausted": "forbidden",
    # The verifier cannot decide (its revocation list is stale or missing, spec
    # §7): the service's fault, not the caller's, and over once a list arrives.
    "revocation_stale": "unavailable",
    BAD_REQUEST: "invalid",
    "body_too_large": "invalid",  # over the middleware's max_body_bytes (HTTP says 413)
})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a call was refused: a code of ``KIND_OF``, the failing link, a message."""

    code: str
    link: int | None
    message: str

    @property
    def kind(self) -> Kind:
        return KIND_OF[self.code]

    def to_json(self) -> bytes:
        """The HTTP body: ``{"error": code, "link": n, "message": ...}``."""
        body = {"error": self.code, "link": self.link, "message": self.message}
        return json.dumps(body, ensure_ascii=False).encode()


# Credentials travel in these headers; a mapper never sees them (they do not
# exist yet when the agent maps its request).
_CREDENTIAL_HEADERS: Final = frozenset({"authorization", "mandate-pop"})


@dataclass(frozen=True, slots=True)
class HttpCall:
    """One HTTP request as a mapper sees it, the same on the agent's side
    (``MandateAuth``) and the service's (``MandateMiddleware``), so one mapper
    function can serve both.

    ``param`` and ``header`` refuse a repeated name (ValueError, answered 400):
    were the mapper to authorize the first ``?order=`` and the application to
    act on the last, a caller could spend a credential on what it does not cover.
    """

    method: str  # upper case
    path: str  # percent-decoded, without the query
    query: tuple[tuple[str, str], ...]  # decoded pairs, in order, repeats kept
    headers: tuple[tuple[str, str], ...]  # lower-case names, without the credential headers
    body: bytes | None  # None unless the integration was asked to read bodies

    @classmethod
    def build(cls, method: str, path: str, raw_query: bytes,
              headers: Iterable[tuple[str, str]], body: bytes | None) -> HttpCall:
        """From the raw parts; ValueError when the query is not UTF-8."""
        query = urllib.parse.parse_qsl(
            raw_query.decode("latin-1"), keep_blank_values=True, errors="strict",
        )
        kept = tuple((name.lower(), value) for name, value in headers
                     if name.lower() not in _CREDENTIAL_HEADERS)
        return cls(method.upper(), path, tuple(query), kept, body)

    def param(self, name: str) -> str | None:
        """The query parameter ``name``; None if absent, ValueError if repeated."""
        return _single([v for k, v in self.query if k == name], f"query parameter {name!r}")

    def params(self, name: str) -> tuple[str, ...]:
        """Every value of the query parameter ``name``, in order."""
        return tuple(v for k, v in self.query if k == name)

    def header(self, name: str) -> str | None:
        """The header ``name`` (any case); None if absent, ValueError if repeated."""
        lower = name.lower()
        return _single([v for k, v in self.headers if k == lower], f"header {name!r}")

    def json(self) -> Any:
        """The body parsed as JSON; ValueError without a body, when it is not JSON,
        or when a member name repeats (the application's parser might keep another
        of the twins than the one authorised)."""
        if self.body is None:
            raise ValueError("the body was not read (read_body=False)")
        return json.loads(self.body, object_pairs_hook=_no_twins)


def _no_twins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("the JSON body repeats a member name")
    return obj


def _single(values: list[str], what: str) -> str | None:
    if len(values) > 1:
        raise ValueError(f"{what} is repeated")
    return values[0] if values else None


#: HttpCall → Request, the same function on both sides; a ValueError or
#: LookupError means "this call is not expressible" (400 bad_request).
HttpRequestMapper = Callable[[HttpCall], Request]
