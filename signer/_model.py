"""Domain objects shared by the issuer, the policy and the gRPC shell."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class DelegateRequest:
    """What a caller asks the daemon to sign: one root link.

    ``caps`` are capability objects in the spec §4 syntax; the caller never
    chooses ``iss``, times or ``jti`` — the daemon sets them.
    """

    sub: str
    holder_jwk: Mapping[str, Any]
    caps: tuple[Mapping[str, Any], ...]
    ttl: int  # seconds
    aud: tuple[str, ...] | None = None
    dpt: int = 0
    use: int | None = None
    idempotency_key: str = ""
    key: str | None = field(default=None)  # a kid the caller asks for; None: the grant's
