"""Making credentials: root links (for any signer), attenuation and proofs
by a holder's key (spec §3.3 attenuation rules, §5, §9)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._capability import Request
from ._encoding import b64url_encode
from ._errors import VerificationError
from ._keys import PrivateKey, public_key_from_jwk
from ._link import LINK_TYP, Link, decode_link, encode_jws, split_chain
from ._pop import make_pop


def new_jti() -> str:
    """128 random bits, base64url (22 characters)."""
    return b64url_encode(secrets.token_bytes(16))


def _now(now: float | None) -> int:
    return int(time.time() if now is None else now)


def _check_ttl(ttl: object) -> int:
    if type(ttl) is not int or ttl < 1:
        raise ValueError("ttl is a positive int (seconds)")
    return ttl


def _claims(*, iss: str, sub: str, holder_jwk: Mapping[str, Any], cap: Sequence[Any],
            iat: int, nbf: int, exp: int, dpt: int, aud: Sequence[str] | None,
            use: int | None, jti: str | None) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "v": 1, "iss": iss, "sub": sub, "iat": iat, "nbf": nbf, "exp": exp,
        "jti": jti or new_jti(), "cnf": {"jwk": dict(holder_jwk)}, "dpt": dpt,
        "cap": [dict(c) if isinstance(c, Mapping) else c for c in cap],
    }
    if aud is not None:
        claims["aud"] = list(aud)
    if use is not None:
        claims["use"] = use
    return claims


def _checked(chain: str, index: int) -> str:
    """Refuse to hand out a chain that a verifier would reject as malformed."""
    try:
        split_chain(chain)
        decode_link(chain.rsplit("~", 1)[-1], index)
    except VerificationError as exc:
        raise ValueError(f"cannot make this link: {exc.message}") from None
    return chain


def issue_root(*, alg: str, kid: str, sign: Callable[[bytes], bytes], iss: str, sub: str,
               holder_jwk: Mapping[str, Any], cap: Sequence[Mapping[str, Any]], ttl: int,
               dpt: int = 0, aud: Sequence[str] | None = None, use: int | None = None,
               now: float | None = None, jti: str | None = None) -> str:
    """A root link (a one-link chain) signed by ``sign`` under bundle key ``kid``.

    ``sign`` returns the JWS-form signature for ``alg``; the daemon passes its
    HSM signer here, tests and demos a software key.
    """
    public_key_from_jwk(dict(holder_jwk))  # a bad holder key fails here, with its reason
    return _checked(root_token(alg=alg, kid=kid, sign=sign, iss=iss, sub=sub,
                               holder_jwk=holder_jwk, cap=cap, ttl=ttl, dpt=dpt, aud=aud,
                               use=use, now=now, jti=jti), 0)


def root_token(*, alg: str, kid: str, sign: Callable[[bytes], bytes], iss: str, sub: str,
               holder_jwk: Mapping[str, Any], cap: Sequence[Mapping[str, Any]], ttl: int,
               dpt: int = 0, aud: Sequence[str] | None = None, use: int | None = None,
               now: float | None = None, jti: str | None = None) -> str:
    """``issue_root`` without decoding the link it made: for an issuer that has
    checked every claim itself, the holder key included, and checks the link's
    size (the daemon)."""
    iat = _now(now)
    claims = _claims(iss=iss, sub=sub, holder_jwk=holder_jwk, cap=cap, iat=iat, nbf=iat,
                     exp=iat + _check_ttl(ttl), dpt=dpt, aud=aud, use=use, jti=jti)
    return encode_jws({"alg": alg, "typ": LINK_TYP, "kid": kid}, claims, sign)


class Holder:
    """An agent's key pair: receives chains, narrows them, proves possession."""

    __slots__ = ("_key",)

    def __init__(self, key: PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls, alg: str = "EdDSA") -> Holder:
        return cls(PrivateKey.generate(alg))

    @classmethod
    def from_jwk(cls, private_jwk: Mapping[str, Any]) -> Holder:
        return cls(PrivateKey.from_jwk(private_jwk))

    def private_jwk(self) -> dict[str, str]:
        """The private key as a JWK: a secret, store it as one."""
        return self._key.to_jwk()

    @property
    def alg(self) -> str:
        return self._key.alg

    @property
    def public_jwk(self) -> dict[str, str]:
        return dict(self._key.public_key.jwk)

    @property
    def thumbprint(self) -> str:
        return self._key.public_key.thumbprint

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def _leaf(self, chain: str) -> tuple[Link, int]:
        try:
            tokens = split_chain(chain)
            leaf = decode_link(tokens[-1], len(tokens) - 1)
        except VerificationError as exc:
            raise ValueError(f"not a usable chain: {exc.message}") from None
        if leaf.holder_key.thumbprint != self.thumbprint:
            raise ValueError("this holder's key is not the chain's leaf key (cnf)")
        return leaf, len(tokens)

    def attenuate(self, chain: str, *, sub: str, holder_jwk: Mapping[str, Any],
                  cap: Sequence[Mapping[str, Any]], ttl: int, dpt: int = 0,
                  aud: Sequence[str] | None = None, use: int | None = None,
                  now: float | None = None) -> str:
        """Append a narrower link for ``sub``'s key; returns the new chain.

        ``exp`` = min(now + ttl, parent exp). ValueError when this holder is not
        the leaf, the parent has expired, or it allows no further link.
        """
        parent, count = self._leaf(chain)
        t = _now(now)
        if t >= parent.exp:
            raise ValueError(f"the chain expired at {parent.exp}")
        if type(dpt) is not int or not 0 <= dpt <= parent.dpt - 1:
            raise ValueError(
                f"dpt must be in [0, {parent.dpt - 1}]: the parent allows {parent.dpt} more link(s)"
                if parent.dpt else "the parent has dpt 0: it cannot be delegated further"
            )
        nbf = max(t, parent.nbf)
        exp = min(t + _check_ttl(ttl), parent.exp)
        public_key_from_jwk(dict(holder_jwk))  # a bad holder key fails here, with its reason
        claims = _claims(iss=parent.sub, sub=sub, holder_jwk=holder_jwk, cap=cap, iat=t,
                         nbf=nbf, exp=exp, dpt=dpt, aud=aud, use=use, jti=None)
        claims["prv"] = parent.hash
        header = {"alg": self.alg, "typ": LINK_TYP, "kid": self.thumbprint}
        return _checked(chain + "~" + encode_jws(header, claims, self.sign), count)

    def prove(self, chain: str, request: Request, *, aud: str, now: float | None = None) -> str:
        """A fresh PoP for one use of ``chain`` at service ``aud``."""
        if not isinstance(request, Request):
            raise ValueError("request must be a verifier_sdk.Request")
        leaf, _ = self._leaf(chain)
        return make_pop(alg=self.alg, sign=self.sign, leaf_hash=leaf.hash, request=request,
                        aud=aud, iat=_now(now), jti=new_jti())
