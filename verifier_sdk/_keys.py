"""Keys and signatures: JWKs (RFC 7517/8037), thumbprints (RFC 7638), and
the two algorithms of spec §3.1 with their strictness rules.

Ed25519 verification runs through libsodium (PyNaCl), which is both about
twice as fast as OpenSSL here and rejects small-order keys and R and
non-canonical S on its own; the rules are checked here too, explicitly, so
the SDK's strictness does not depend on one library version.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, Final

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ._encoding import b64url_decode, b64url_encode, sha256_b64

ALGORITHMS: Final = ("EdDSA", "ES256")

# Curve25519 field prime, the Ed25519 base point and the group order L.
_P: Final = 2**255 - 19
_BASE_POINT: Final = bytes.fromhex("58" + "66" * 31)
_L: Final = 2**252 + 27742317777372353535851937790883648493
# y-coordinates of the eight points of small order: the identity (y=1),
# order 2 (y=-1), order 4 (y=0) and order 8 (y=±Y8).
_Y8: Final = int.from_bytes(
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"), "little"
)
_SMALL_ORDER_Y: Final = frozenset({0, 1, _P - 1, _Y8, _P - _Y8})
_Y_MASK: Final = (1 << 255) - 1

# P-256 field prime and group order.
_P256_P: Final = 2**256 - 2**224 + 2**192 + 2**96 - 1
_P256_N: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

_JWK_MEMBERS: Final = {
    "OKP": frozenset({"kty", "crv", "x"}),
    "EC": frozenset({"kty", "crv", "x", "y"}),
}
_CURVE_OF: Final = {"OKP": "Ed25519", "EC": "P-256"}
_ALG_OF: Final = {"OKP": "EdDSA", "EC": "ES256"}


def _check_ed25519_point(encoded: bytes) -> None:
    """Refuse a non-canonical, small-order or off-curve Ed25519 point."""
    raw = int.from_bytes(encoded, "little")
    y = raw & _Y_MASK
    if y >= _P:
        raise ValueError("Ed25519 key: non-canonical encoding (y >= p)")
    if y in _SMALL_ORDER_Y:
        # Also covers x = 0 with the sign bit set: only y = ±1 give x = 0.
        raise ValueError("Ed25519 key: a point of small order")
    # libsodium decompresses both operands of a point addition and fails on a
    # y with no x on the curve: 16 us, against 110 us for the square root in
    # Python (its main-subgroup check, is_valid_point, costs 36 us).
    try:
        nacl.bindings.crypto_core_ed25519_add(encoded, _BASE_POINT)
    except nacl.exceptions.RuntimeError:
        raise ValueError("Ed25519 key: not a point on the curve") from None


def ed25519_signature_is_strict(signature: bytes) -> bool:
    """S < L and R not of small order (RFC 8032 §5.1.7 plus spec §3.1)."""
    if len(signature) != 64:
        return False
    if int.from_bytes(signature[32:], "little") >= _L:
        return False
    r_y = int.from_bytes(signature[:32], "little") & _Y_MASK
    return r_y % _P not in _SMALL_ORDER_Y


class PublicKey:
    """A validated public key: verifies JWS signatures of its one algorithm."""

    __slots__ = ("_ec_key", "_raw", "_verify", "alg", "jwk", "thumbprint")

    def __init__(self, jwk: dict[str, str], alg: str, raw: bytes, ec_key: Any = None) -> None:
        self.jwk = jwk
        self.alg = alg
        self._raw = raw
        self._ec_key = ec_key
        # RFC 7638: the required members, sorted, no whitespace. The members are
        # validated base64url and constants: nothing needs escaping.
        if alg == "EdDSA":
            members = f'{{"crv":"Ed25519","kty":"OKP","x":"{jwk["x"]}"}}'
        else:
            members = f'{{"crv":"P-256","kty":"EC","x":"{jwk["x"]}","y":"{jwk["y"]}"}}'
        self.thumbprint = sha256_b64(members.encode("ascii"))
        if alg == "EdDSA":
            self._verify: Callable[[bytes, bytes], bool] = self._verify_ed25519
        else:
            self._verify = self._verify_es256

    def verify(self, data: bytes, signature: bytes) -> bool:
        """True only for a valid signature in the JWS form of this key's alg."""
        return self._verify(data, signature)

    def _verify_ed25519(self, data: bytes, signature: bytes) -> bool:
        if not ed25519_signature_is_strict(signature):
            return False
        try:
            nacl.bindings.crypto_sign_open(signature + data, self._raw)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False
        return True

    def _verify_es256(self, data: bytes, signature: bytes) -> bool:
        if len(signature) != 64:
            return False
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        if not (1 <= r < _P256_N and 1 <= s < _P256_N):
            return False
        try:
            self._ec_key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.thumbprint == self.thumbprint

    def __hash__(self) -> int:
        return hash(self.thumbprint)

    def __repr__(self) -> str:
        return f"PublicKey({self.alg}, {self.thumbprint})"


# Keys recur (a holder key is in every link it is used with); validation
# costs a modular exponentiation, so validated keys are kept, within a bound.
_KEY_CACHE: dict[tuple[Any, ...], PublicKey] = {}
_KEY_CACHE_MAX: Final = 4096
_KEY_CACHE_LOCK = threading.Lock()


def _coordinate(jwk: Mapping[str, Any], name: str) -> bytes:
    raw = b64url_decode(jwk[name])
    if len(raw) != 32:
        raise ValueError(f"JWK member {name!r} is not 32 bytes")
    return raw


def public_key_from_jwk(jwk: Any, *, extra: frozenset[str] = frozenset()) -> PublicKey:
    """Validate a public JWK holding exactly the members of spec §3.1.

    ``extra`` names members a caller allows beside them (a trust bundle's
    ``kid``, ``alg`` ...); the caller checks those itself.
    Raises ValueError with the reason.
    """
    if type(jwk) is not dict:
        raise ValueError("JWK is not an object")
    kty = jwk.get("kty")
    if type(kty) is not str or kty not in _JWK_MEMBERS:
        raise ValueError(f"unsupported JWK kty {kty!r}")
    required = _JWK_MEMBERS[kty]
    members = jwk.keys()
    if not required <= members or not members <= required | extra:
        raise ValueError(f"a {kty} JWK must hold exactly {sorted(required)}")
    if jwk["crv"] != _CURVE_OF[kty]:
        raise ValueError(f"unsupported {kty} curve {jwk['crv']!r}")
    cache_key = tuple(jwk[name] for name in sorted(required))
    if not all(type(value) is str for value in cache_key):
        raise ValueError("JWK members must be strings")
    cached = _KEY_CACHE.get(cache_key)
    if cached is not None:
        return cached
    x = _coordinate(jwk, "x")
    public = {name: jwk[name] for name in sorted(required)}
    if kty == "OKP":
        _check_ed25519_point(x)
        key = PublicKey(public, "EdDSA", x)
    else:
        y = _coordinate(jwk, "y")
        xi, yi = int.from_bytes(x, "big"), int.from_bytes(y, "big")
        if xi >= _P256_P or yi >= _P256_P:
            raise ValueError("P-256 key: coordinate not below p")
        try:
            ec_key = ec.EllipticCurvePublicNumbers(xi, yi, ec.SECP256R1()).public_key()
        except ValueError as exc:
            raise ValueError("P-256 key: not a point on the curve") from exc
        key = PublicKey(public, "ES256", b"\x04" + x + y, ec_key)
    with _KEY_CACHE_LOCK:
        if len(_KEY_CACHE) >= _KEY_CACHE_MAX:
            _KEY_CACHE.pop(next(iter(_KEY_CACHE)))
        _KEY_CACHE[cache_key] = key
    return key


def jwk_alg(jwk: Mapping[str, Any]) -> str:
    """The one algorithm a (validated) JWK's key type allows."""
    return _ALG_OF[str(jwk["kty"])]


class PrivateKey:
    """A software signing key producing JWS-form signatures (holders, tests)."""

    __slots__ = ("_key", "alg", "public_key")

    def __init__(self, key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> None:
        if isinstance(key, ed25519.Ed25519PrivateKey):
            raw = key.public_key().public_bytes_raw()
            jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}
        elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            numbers = key.public_key().public_numbers()
            jwk = {
                "kty": "EC",
                "crv": "P-256",
                "x": b64url_encode(numbers.x.to_bytes(32, "big")),
                "y": b64url_encode(numbers.y.to_bytes(32, "big")),
            }
        else:
            raise ValueError("only Ed25519 and P-256 keys are supported")
        self._key = key
        self.public_key = public_key_from_jwk(jwk)
        self.alg = self.public_key.alg

    @classmethod
    def generate(cls, alg: str = "EdDSA") -> PrivateKey:
        if alg == "EdDSA":
            return cls(ed25519.Ed25519PrivateKey.generate())
        if alg == "ES256":
            return cls(ec.generate_private_key(ec.SECP256R1()))
        raise ValueError(f"unsupported algorithm {alg!r}; use one of {ALGORITHMS}")

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> PrivateKey:
        """Load a private JWK (the public members plus ``d``)."""
        if not isinstance(jwk, Mapping) or type(jwk.get("d")) is not str:
            raise ValueError("a private JWK needs a string member 'd'")
        d = b64url_decode(jwk["d"])
        key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
        if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519" and len(d) == 32:
            key = ed25519.Ed25519PrivateKey.from_private_bytes(d)
        elif jwk.get("kty") == "EC" and jwk.get("crv") == "P-256" and len(d) == 32:
            key = ec.derive_private_key(int.from_bytes(d, "big"), ec.SECP256R1())
        else:
            raise ValueError("unsupported private JWK")
        loaded = cls(key)
        public = {k: v for k, v in jwk.items() if k != "d"}
        if public != loaded.public_key.jwk:
            raise ValueError("private JWK: public members do not match 'd'")
        return loaded

    def to_jwk(self) -> dict[str, str]:
        """The private JWK. Handle it as a secret."""
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            d = self._key.private_bytes_raw()
        else:
            d = self._key.private_numbers().private_value.to_bytes(32, "big")
        return {**self.public_key.jwk, "d": b64url_encode(d)}

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        # RFC 6979 deterministic nonces: no dependence on the RNG at signing time.
        der = self._key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
