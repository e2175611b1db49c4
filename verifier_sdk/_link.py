"""Links and chains (spec §3): size limits, strict decoding, encoding."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from ._capability import Capability
from ._encoding import (
    MAX_SAFE_INT,
    b64url_decode,
    b64url_encode,
    canonical_json,
    parse_json_object,
    sha256_b64,
)
from ._errors import VerificationError
from ._keys import PublicKey, public_key_from_jwk

MAX_CHAIN_BYTES: Final = 65_536
MAX_LINKS: Final = 16
MAX_LINK_BYTES: Final = 8_192
MAX_POP_BYTES: Final = 4_096

LINK_TYP: Final = "mandate+jwt"
_HEADER_MEMBERS: Final = frozenset({"alg", "typ", "kid"})
_REQUIRED: Final = frozenset({"v", "iss", "sub", "iat", "nbf", "exp", "jti", "cnf", "dpt", "cap"})
_OPTIONAL: Final = frozenset({"aud", "use"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_JTI = re.compile(r"[A-Za-z0-9_-]{16,64}")
_KID = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_USE: Final = 2**31 - 1


def byte_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def check_principal(value: object, name: str) -> str:
    if type(value) is not str or not 1 <= len(value) <= 256 or _CONTROL.search(value):
        raise ValueError(f"{name} is not a principal (1..256 characters, no control characters)")
    return value


def check_jti(value: object, name: str = "jti") -> str:
    if type(value) is not str or not _JTI.fullmatch(value):
        raise ValueError(f"{name} is not 16..64 base64url characters")
    return value


def check_kid(value: object) -> str:
    if type(value) is not str or not _KID.fullmatch(value):
        raise ValueError("kid is not 1..128 of [A-Za-z0-9._-]")
    return value


def check_int(value: object, name: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name} is not an int in [{low}, {high}]")
    return value


def check_time(value: object, name: str) -> int:
    """A Unix time: any int in the JSON safe range."""
    if type(value) is not int or not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        raise ValueError(f"{name} is not an int in the safe range")
    return value


def split_jws(token: str, *, small: bool = True) -> tuple[dict[str, Any], dict[str, Any],
                                                          bytes, bytes]:
    """Decode a compact JWS: (header, payload, signing input, signature).

    ``small``: the token is a link or a PoP, at most 8 KiB (checked in step 1),
    whose every member's type and int range its parser checks (check_int,
    check_time, the capability parser). So its JSON is parsed without the
    depth scan and the per-int hook: it cannot nest deeper than a few
    thousand levels, which the parser's recursion guard refuses safely. A
    revocation list (up to 1 MiB) is scanned first: nesting a hundred
    thousand deep could exhaust the C stack where an application has raised
    the recursion limit.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not three dot-separated segments")
    header = parse_json_object(b64url_decode(parts[0]), schema_checked=small)
    payload = parse_json_object(b64url_decode(parts[1]), schema_checked=small)
    signature = b64url_decode(parts[2])
    signing_input = token[: len(parts[0]) + 1 + len(parts[1])].encode("ascii")
    return header, payload, signing_input, signature


def check_header(header: Mapping[str, Any], members: frozenset[str], typ: str) -> None:
    if header.keys() != members:
        raise ValueError(f"header must hold exactly {sorted(members)}, got {sorted(header)}")
    if any(type(value) is not str for value in header.values()):
        raise ValueError("header members are strings")
    if header["typ"] != typ:
        raise ValueError(f"typ must be {typ!r}")


def encode_jws(header: Mapping[str, Any], payload: Mapping[str, Any],
               sign: Callable[[bytes], bytes]) -> str:
    signing_input = (
        b64url_encode(canonical_json(header)) + "." + b64url_encode(canonical_json(payload))
    )
    return signing_input + "." + b64url_encode(sign(signing_input.encode("ascii")))


@dataclass(frozen=True, slots=True)
class Link:
    """One decoded link: header and payload checked against §3.2/§3.3."""

    index: int
    token: str
    hash: str  # H(link): the next link's prv, the PoP's ath
    signing_input: bytes
    signature: bytes
    header: dict[str, Any]
    payload: dict[str, Any]
    alg: str
    kid: str
    iss: str
    sub: str
    aud: frozenset[str] | None
    iat: int
    nbf: int
    exp: int
    jti: str
    holder_key: PublicKey
    prv: str | None
    dpt: int
    caps: tuple[Capability, ...]
    use: int | None

    @property
    def label(self) -> str:
        return f"link {self.index} ({self.iss} → {self.sub})"


def _parse_link(token: str, index: int) -> Link:
    header, p, signing_input, signature = split_jws(token)
    check_header(header, _HEADER_MEMBERS, LINK_TYP)
    kid = check_kid(header["kid"]) if index == 0 else header["kid"]

    keys = p.keys()
    missing = _REQUIRED - keys
    if missing:
        raise ValueError(f"payload lacks {sorted(missing)}")
    allowed = _REQUIRED | _OPTIONAL | ({"prv"} if index else set())
    unknown = keys - allowed
    if unknown:
        raise ValueError(f"payload has unknown or misplaced member(s) {sorted(unknown)}")
    if index and "prv" not in keys:
        raise ValueError("a child link needs prv")
    if p["v"] != 1 or type(p["v"]) is not int:
        raise ValueError("v must be 1")
    iss = check_principal(p["iss"], "iss")
    sub = check_principal(p["sub"], "sub")
    aud = None
    if "aud" in p:
        aud_list = p["aud"]
        if (
            type(aud_list) is not list
            or not 1 <= len(aud_list) <= 16
            or not all(type(a) is str and 1 <= len(a) <= 256 for a in aud_list)
        ):
            raise ValueError("aud is a list of 1..16 strings of 1..256 characters")
        aud = frozenset(aud_list)
    iat = check_time(p["iat"], "iat")
    nbf = check_time(p["nbf"], "nbf")
    exp = check_time(p["exp"], "exp")
    if not nbf < exp:
        raise ValueError("nbf must be before exp")
    jti = check_jti(p["jti"])
    cnf = p["cnf"]
    if type(cnf) is not dict or cnf.keys() != {"jwk"}:
        raise ValueError('cnf must be {"jwk": JWK}')
    try:
        holder_key = public_key_from_jwk(cnf["jwk"])
    except ValueError as exc:
        raise ValueError(f"cnf: {exc}") from exc
    prv = p.get("prv")
    if index and type(prv) is not str:
        raise ValueError("prv is a string")
    dpt = check_int(p["dpt"], "dpt", 0, 15)
    cap = p["cap"]
    if type(cap) is not list or not 1 <= len(cap) <= 64:
        raise ValueError("cap is a list of 1..64 capabilities")
    caps = tuple(Capability.parse(c) for c in cap)
    use = check_int(p["use"], "use", 1, MAX_USE) if "use" in p else None
    return Link(
        index, token, sha256_b64(token.encode("ascii")), signing_input, signature, header, p,
        header["alg"], kid, iss, sub, aud, iat, nbf, exp, jti, holder_key, prv, dpt, caps, use,
    )


def decode_link(token: str, index: int) -> Link:
    """Spec §8 step 2's decoding of link ``index``; failures are ``malformed``."""
    try:
        return _parse_link(token, index)
    except ValueError as exc:
        raise VerificationError("malformed", f"link {index}: {exc}", link=index) from None


def split_chain(chain: object) -> list[str]:
    """Spec §8 step 1 for the chain: its size, the link count, each link's size."""
    if type(chain) is not str:
        raise VerificationError("malformed", "the chain is not a string")
    if byte_length(chain) > MAX_CHAIN_BYTES:
        raise VerificationError("too_large", f"chain is over {MAX_CHAIN_BYTES} bytes")
    tokens = chain.split("~")
    if len(tokens) > MAX_LINKS:
        raise VerificationError("too_large", f"chain has {len(tokens)} links; at most {MAX_LINKS}")
    for i, token in enumerate(tokens):
        if byte_length(token) > MAX_LINK_BYTES:
            raise VerificationError(
                "too_large", f"link {i} is over {MAX_LINK_BYTES} bytes", link=i
            )
    return tokens


def decode_unverified(chain: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each link's (header, payload), decoded and checked for shape only.

    No key, signature, chaining or time check: never trust what this returns.
    """
    return [
        (link.header, link.payload)
        for link in (decode_link(t, i) for i, t in enumerate(split_chain(chain)))
    ]
