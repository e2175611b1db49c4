"""The one exception every verification failure raises (spec §8, §9)."""

from __future__ import annotations

from typing import Final

#: Every code of spec §8, in the order of the steps that produce them.
CODES: Final = frozenset(
    {
        "too_large",
        "malformed",
        "unsupported_alg",
        "unknown_key",
        "broken_chain",
        "bad_signature",
        "depth_exceeded",
        "not_yet_valid",
        "expired",
        "revoked",
        "revocation_stale",
        "audience",
        "denied",
        "pop_invalid",
        "replayed",
        "uses_exhausted",
    }
)


class VerificationError(Exception):
    """A chain, PoP or revocation list was refused.

    ``code`` is one of the spec's error codes; ``link`` is the index of the
    failing link, or ``None`` where the failure belongs to no single link.
    """

    def __init__(self, code: str, message: str, *, link: int | None = None) -> None:
        if code not in CODES:
            raise ValueError(f"unknown verification error code {code!r}")
        super().__init__(message)
        self.code = code
        self.link = link
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"VerificationError({self.code!r}, {self.message!r}, link={self.link!r})"
