"""Signed revocation lists (spec §7): decoding, checking, and making one."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from ._bundle import TrustBundle
from ._errors import VerificationError
from ._keys import ALGORITHMS
from ._link import (
    byte_length,
    check_header,
    check_int,
    check_jti,
    check_kid,
    check_principal,
    check_time,
    encode_jws,
    split_jws,
)

MAX_REVOCATION_LIST_BYTES: Final = 1_048_576
RL_TYP: Final = "mandate-rl+jwt"
_HEADER_MEMBERS: Final = frozenset({"alg", "typ", "kid"})
_PAYLOAD_MEMBERS: Final = frozenset({"v", "iss", "seq", "iat", "exp", "rev"})
_MAX_TIME: Final = 2**53 - 1


@dataclass(frozen=True, slots=True)
class RevocationList:
    """A verified revocation list."""

    iss: str
    seq: int
    iat: int
    exp: int
    revoked: frozenset[str]
    payload: dict[str, Any]


def _parse(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    header, payload, signing_input, signature = split_jws(token, small=False)
    check_header(header, _HEADER_MEMBERS, RL_TYP)
    check_kid(header["kid"])
    if payload.keys() != _PAYLOAD_MEMBERS:
        raise ValueError(f"payload must hold exactly {sorted(_PAYLOAD_MEMBERS)}")
    if type(payload["v"]) is not int or payload["v"] != 1:
        raise ValueError("v must be 1")
    check_principal(payload["iss"], "iss")
    check_int(payload["seq"], "seq", 0, _MAX_TIME)
    check_time(payload["iat"], "iat")
    check_time(payload["exp"], "exp")
    if not payload["iat"] < payload["exp"]:
        raise ValueError("iat must be before exp")
    rev = payload["rev"]
    if type(rev) is not list:
        raise ValueError("rev is a list of jti strings")
    for jti in rev:
        check_jti(jti, "a rev entry")
    return header, payload, signing_input, signature


def verify_revocation_list(token: object, bundle: TrustBundle) -> RevocationList:
    """Check size, shape, key and signature of a list (not its freshness)."""
    if type(token) is not str:
        raise VerificationError("malformed", "revocation list is not a string")
    if byte_length(token) > MAX_REVOCATION_LIST_BYTES:
        raise VerificationError(
            "too_large", f"revocation list is over {MAX_REVOCATION_LIST_BYTES} bytes"
        )
    try:
        header, payload, signing_input, signature = _parse(token)
    except ValueError as exc:
        raise VerificationError("malformed", f"revocation list: {exc}") from None
    alg = header["alg"]
    if alg not in ALGORITHMS:
        raise VerificationError("unsupported_alg", f"revocation list: alg {alg!r}")
    key = bundle.signing_key(
        alg, header["kid"], payload["iat"], payload["exp"], what="revocation list", link=None
    )
    if not key.verify(signing_input, signature):
        raise VerificationError("bad_signature", "revocation list: signature does not verify")
    return RevocationList(
        payload["iss"], payload["seq"], payload["iat"], payload["exp"],
        frozenset(payload["rev"]), payload,
    )


def _encode(*, alg: str, kid: str, sign: Callable[[bytes], bytes], iss: str, seq: int,
            iat: int, exp: int, revoked: Iterable[str]) -> str:
    payload = {
        "v": 1, "iss": iss, "seq": seq, "iat": iat, "exp": exp, "rev": sorted(set(revoked)),
    }
    return encode_jws({"alg": alg, "typ": RL_TYP, "kid": kid}, payload, sign)


def revocation_list_bytes(*, alg: str, kid: str, iss: str, revoked: Iterable[str]) -> int:
    """The most bytes a list of ``revoked`` can take, whatever its seq and times
    (numbers at their widest, a 64-byte signature as both algs make): what an
    issuer checks against MAX_REVOCATION_LIST_BYTES before it revokes more."""
    return len(_encode(alg=alg, kid=kid, sign=lambda _: bytes(64), iss=iss, seq=_MAX_TIME,
                       iat=_MAX_TIME - 1, exp=_MAX_TIME, revoked=revoked))


def make_revocation_list(*, alg: str, kid: str, sign: Callable[[bytes], bytes], iss: str,
                         seq: int, iat: int, exp: int, revoked: Iterable[str]) -> str:
    """Build and sign a list; the issuer's side of §7 (the daemon, tests)."""
    token = _encode(alg=alg, kid=kid, sign=sign, iss=iss, seq=seq, iat=iat, exp=exp,
                    revoked=revoked)
    try:
        _parse(token)  # never publish what a verifier would refuse as malformed
    except ValueError as exc:
        raise ValueError(f"cannot make this revocation list: {exc}") from None
    return token
