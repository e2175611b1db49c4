"""The trust bundle (spec §6): the root keys a verifier accepts."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from ._encoding import parse_json_object
from ._errors import VerificationError
from ._keys import PublicKey, jwk_alg, public_key_from_jwk
from ._link import check_kid

_BUNDLE_EXTRA: Final = frozenset({"kid", "alg", "use", "nbf", "exp"})


@dataclass(frozen=True, slots=True)
class BundleKey:
    """A root key with its id and validity window (Unix seconds)."""

    kid: str
    key: PublicKey
    nbf: int | None
    exp: int | None

    @property
    def alg(self) -> str:
        return self.key.alg

    def admits(self, iat: int, exp: int) -> bool:
        """§6: a token issued at ``iat`` and expiring at ``exp`` is in this key's window."""
        return (self.nbf is None or iat >= self.nbf) and (self.exp is None or exp <= self.exp)

    def to_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = {**self.key.jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}
        if self.nbf is not None:
            jwk["nbf"] = self.nbf
        if self.exp is not None:
            jwk["exp"] = self.exp
        return jwk


def _window_bound(jwk: Mapping[str, Any], name: str, kid: str) -> int | None:
    if name not in jwk:
        return None
    value = jwk[name]
    if type(value) is not int or not -(2**53 - 1) <= value <= 2**53 - 1:
        raise ValueError(f"trust bundle key {kid!r}: {name} is not an int")
    return value


def _parse_key(jwk: object) -> BundleKey:
    if type(jwk) is not dict:
        raise ValueError("trust bundle: each key is an object")
    kid = jwk.get("kid")
    try:
        check_kid(kid)
        key = public_key_from_jwk(jwk, extra=_BUNDLE_EXTRA)
    except ValueError as exc:
        raise ValueError(f"trust bundle key {kid!r}: {exc}") from None
    assert type(kid) is str
    if jwk.get("alg") != jwk_alg(jwk):
        raise ValueError(f"trust bundle key {kid!r}: alg must be {jwk_alg(jwk)!r}")
    if "use" in jwk and jwk["use"] != "sig":
        raise ValueError(f"trust bundle key {kid!r}: use must be 'sig'")
    nbf, exp = _window_bound(jwk, "nbf", kid), _window_bound(jwk, "exp", kid)
    if nbf is not None and exp is not None and not nbf < exp:
        raise ValueError(f"trust bundle key {kid!r}: nbf must be below exp")
    return BundleKey(kid, key, nbf, exp)


class TrustBundle:
    """An immutable set of root keys, loaded from a JWKS.

    Any defect is the operator's mistake, not an attack: ``ValueError``.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, BundleKey]) -> None:
        if not keys:
            raise ValueError("trust bundle has no keys")
        self._keys = dict(keys)

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any] | str | bytes) -> TrustBundle:
        if isinstance(jwks, str | bytes):
            raw = jwks.encode("utf-8") if isinstance(jwks, str) else jwks
            obj: Mapping[str, Any] = parse_json_object(raw)
        elif isinstance(jwks, Mapping):
            obj = jwks
        else:
            raise ValueError("a JWKS is a mapping or its JSON text")
        if set(obj.keys()) != {"keys"} or type(obj["keys"]) is not list:
            raise ValueError('a trust bundle is exactly {"keys": [JWK, ...]}')
        keys: dict[str, BundleKey] = {}
        for jwk in obj["keys"]:
            key = _parse_key(jwk)
            if key.kid in keys:
                raise ValueError(f"trust bundle: kid {key.kid!r} appears twice")
            keys[key.kid] = key
        return cls(keys)

    def to_jwks(self) -> dict[str, Any]:
        return {"keys": [key.to_jwk() for key in self._keys.values()]}

    def to_json(self) -> str:
        return json.dumps(self.to_jwks(), indent=2, sort_keys=True)

    def get(self, kid: str) -> BundleKey | None:
        return self._keys.get(kid)

    def __iter__(self) -> Iterator[BundleKey]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def signing_key(self, alg: str, kid: str, iat: int, exp: int, *, what: str,
                    link: int | None) -> PublicKey:
        """§6/§7: the key named by ``kid``, of ``alg``, whose window admits the token.

        unknown kid → unknown_key; alg differs → unsupported_alg; window → unknown_key.
        """
        entry = self._keys.get(kid)
        if entry is None:
            raise VerificationError(
                "unknown_key", f"{what}: kid {kid!r} is not in the trust bundle", link=link
            )
        if entry.alg != alg:
            raise VerificationError(
                "unsupported_alg", f"{what}: alg {alg!r} but key {kid!r} is {entry.alg}",
                link=link,
            )
        if not entry.admits(iat, exp):
            raise VerificationError(
                "unknown_key",
                f"{what}: key {kid!r} is valid for [{entry.nbf}, {entry.exp}]; "
                f"the token has iat {iat}, exp {exp}",
                link=link,
            )
        return entry.key
