"""Proof of possession (spec §5): the per-use token signed by the leaf key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from ._capability import Request
from ._encoding import canonical_json, sha256_b64
from ._link import check_header, check_jti, check_time, encode_jws, split_jws

POP_TYP: Final = "mandate-pop+jwt"
_HEADER_MEMBERS: Final = frozenset({"alg", "typ"})
_PAYLOAD_MEMBERS: Final = frozenset({"ath", "aud", "req", "iat", "jti"})


def request_hash(request: Request, aud: str) -> str:
    """``req`` of a PoP: H(canonical JSON of {act, aud, ctx, res})."""
    return sha256_b64(canonical_json(request.canonical(aud)))


def parse_pop(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Decode a PoP and check its shape; ValueError with the reason."""
    header, payload, signing_input, signature = split_jws(token)
    check_header(header, _HEADER_MEMBERS, POP_TYP)
    if payload.keys() != _PAYLOAD_MEMBERS:
        raise ValueError(f"payload must hold exactly {sorted(_PAYLOAD_MEMBERS)}")
    if type(payload["ath"]) is not str or type(payload["req"]) is not str:
        raise ValueError("ath and req are strings")
    if type(payload["aud"]) is not str:
        raise ValueError("aud is a string")
    check_time(payload["iat"], "iat")
    check_jti(payload["jti"])
    return header, payload, signing_input, signature


def make_pop(*, alg: str, sign: Callable[[bytes], bytes], leaf_hash: str, request: Request,
             aud: str, iat: int, jti: str) -> str:
    payload = {
        "ath": leaf_hash, "aud": aud, "req": request_hash(request, aud), "iat": iat, "jti": jti,
    }
    return encode_jws({"alg": alg, "typ": POP_TYP}, payload, sign)
