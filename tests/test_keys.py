"""Spec §3.1 keys and signatures: JWK validation, Ed25519/P-256 strictness,
RFC 7638 thumbprints and the software private key.

The curve checks below recompute everything with a few lines of textbook
Edwards and Weierstrass arithmetic, so the SDK's rules are checked against
the mathematics, not against themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import nacl.bindings
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from verifier_sdk._encoding import b64url_decode, b64url_encode
from verifier_sdk._keys import (
    PrivateKey,
    PublicKey,
    ed25519_signature_is_strict,
    public_key_from_jwk,
)

# --- Ed25519 arithmetic (RFC 8032 §5.1) -------------------------------------------

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
Point = tuple[int, int]
IDENTITY: Point = (0, 1)


def _inv(v: int) -> int:
    return pow(v, P - 2, P)


def ed_add(a: Point, b: Point) -> Point:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    return (x1 * y2 + y1 * x2) * _inv(1 + t) % P, (y1 * y2 + x1 * x2) * _inv(1 - t) % P


Extended = tuple[int, int, int, int]


def _ext_add(a: Extended, b: Extended) -> Extended:
    """RFC 8032 §5.1.4 addition in extended coordinates (X:Y:Z:T), x = X/Z, y = Y/Z."""
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa = (y1 - x1) * (y2 - x2) % P
    bb = (y1 + x1) * (y2 + x2) % P
    cc = 2 * D * t1 * t2 % P
    dd = 2 * z1 * z2 % P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return e * f % P, g * h % P, f * g % P, e * h % P


def ed_mul(k: int, point: Point) -> Point:
    x, y = point
    acc: Extended = (0, 1, 1, 0)
    addend: Extended = (x, y, 1, x * y % P)
    while k:
        if k & 1:
            acc = _ext_add(acc, addend)
        addend = _ext_add(addend, addend)
        k >>= 1
    z_inv = _inv(acc[2])
    return acc[0] * z_inv % P, acc[1] * z_inv % P


def ed_decode(encoded: bytes) -> Point | None:
    """RFC 8032 §5.1.3 decoding: None for a non-canonical or off-curve encoding."""
    raw = int.from_bytes(encoded, "little")
    y, sign = raw & ((1 << 255) - 1), raw >> 255
    if y >= P:
        return None
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    if v * x * x % P == (-u) % P:
        x = x * SQRT_M1 % P
    elif v * x * x % P != u:
        return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = P - x
    return x, y


def ed_encode(point: Point) -> bytes:
    x, y = point
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _base_point() -> Point:
    point = ed_decode(bytes.fromhex("58" + "66" * 31))  # y = 4/5, x even
    assert point is not None
    return point


BASE = _base_point()

# The eight points of small order, by their canonical encodings (identity,
# order 2, the two of order 4, the four of order 8).
SMALL_ORDER = {
    "identity": "0100000000000000000000000000000000000000000000000000000000000000",
    "order-2": "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "order-4": "0000000000000000000000000000000000000000000000000000000000000000",
    "order-4-neg": "0000000000000000000000000000000000000000000000000000000000000080",
    "order-8-a": "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "order-8-a-neg": "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "order-8-b": "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "order-8-b-neg": "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
}
# Other spellings of small-order points: sign bit set on x = 0, or y written as y + p.
SMALL_ORDER_TWINS = {
    "identity-sign-bit": "0100000000000000000000000000000000000000000000000000000000000080",
    "order-2-sign-bit": "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "identity-as-p+1": "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "identity-as-p+1-sign": "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "order-4-as-p": "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "order-4-as-p-sign": "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
}


def _first_off_curve_y() -> int:
    y = 2
    while ed_decode(y.to_bytes(32, "little")) is not None:
        y += 1
    return y


# --- P-256 arithmetic ------------------------------------------------------------

P256 = 2**256 - 2**224 + 2**192 + 2**96 - 1
N256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B256 = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B


def p256_on_curve(x: int, y: int) -> bool:
    return (y * y - (x**3 - 3 * x + B256)) % P256 == 0


def _p256_point_with_small_x() -> tuple[int, int]:
    """A real P-256 point whose x is tiny, so x + p still fits in 32 bytes."""
    x = 1
    while True:
        rhs = (x**3 - 3 * x + B256) % P256
        y = pow(rhs, (P256 + 1) // 4, P256)  # p ≡ 3 (mod 4)
        if y * y % P256 == rhs:
            return x, y
        x += 1


# --- JWK helpers -----------------------------------------------------------------


def okp(raw: bytes) -> dict[str, Any]:
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}


def ec_jwk(x: int, y: int, size: int = 32) -> dict[str, Any]:
    return {
        "kty": "EC", "crv": "P-256",
        "x": b64url_encode(x.to_bytes(size, "big")), "y": b64url_encode(y.to_bytes(size, "big")),
    }


ED = PrivateKey.generate("EdDSA")
EC = PrivateKey.generate("ES256")
EC_X = int.from_bytes(b64url_decode(EC.public_key.jwk["x"]), "big")
EC_Y = int.from_bytes(b64url_decode(EC.public_key.jwk["y"]), "big")


def _reject(jwk: Any, **kw: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the SDK's one error type for bad keys
        public_key_from_jwk(jwk, **kw)


# --- JWK shape -------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate",
    [
        lambda j: {**j, "kid": "k1"},
        lambda j: {**j, "alg": "EdDSA"},
        lambda j: {**j, "use": "sig"},
        lambda j: {**j, "d": j["x"]},
        lambda j: {**j, "y": j["x"]},
        lambda j: {k: v for k, v in j.items() if k != "x"},
        lambda j: {k: v for k, v in j.items() if k != "crv"},
        lambda j: {k: v for k, v in j.items() if k != "kty"},
        lambda j: {**j, "kty": "EC"},
        lambda j: {**j, "kty": "okp"},
        lambda j: {**j, "kty": "RSA"},
        lambda j: {**j, "kty": "oct"},
        lambda j: {**j, "crv": "Ed448"},
        lambda j: {**j, "crv": "X25519"},
        lambda j: {**j, "crv": "ed25519"},
        lambda j: {**j, "crv": "P-256"},
        lambda j: {**j, "x": 12},
        lambda j: {**j, "x": None},
        lambda j: {**j, "x": [j["x"]]},
        lambda j: {**j, "crv": None},
        lambda j: {**j, "kty": None},
        lambda j: {**j, "x": j["x"] + "="},
        lambda j: {**j, "x": j["x"][:-1] + chr(ord(j["x"][-1]) + 1)},
        lambda j: {**j, "x": b64url_encode(b64url_decode(j["x"])[:31])},
        lambda j: {**j, "x": b64url_encode(b64url_decode(j["x"]) + b"\x00")},
        lambda j: {**j, "x": b64url_encode(b"\x00" + b64url_decode(j["x"]))},
        lambda j: {**j, "x": ""},
        lambda j: [j],
        lambda j: j["x"],
        lambda j: None,
    ],
    ids=[
        "extra-kid", "extra-alg", "extra-use", "private-d", "extra-y", "missing-x",
        "missing-crv", "missing-kty", "kty-EC", "kty-lowercase", "kty-RSA", "kty-oct",
        "crv-Ed448", "crv-X25519", "crv-lowercase", "crv-P-256", "x-int", "x-null", "x-list",
        "crv-null", "kty-null", "x-padded", "x-trailing-bits-twin", "x-31-bytes",
        "x-33-bytes", "x-33-bytes-leading-zero", "x-empty", "jwk-is-list", "jwk-is-string",
        "jwk-is-none",
    ],
)
def test_okp_jwk_shape_rejected(mutate: Callable[[dict[str, Any]], Any]) -> None:
    _reject(mutate(ED.public_key.jwk))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda j: {**j, "kid": "k1"},
        lambda j: {**j, "d": j["x"]},
        lambda j: {k: v for k, v in j.items() if k != "y"},
        lambda j: {k: v for k, v in j.items() if k != "x"},
        lambda j: {**j, "kty": "OKP"},
        lambda j: {**j, "crv": "P-384"},
        lambda j: {**j, "crv": "secp256k1"},
        lambda j: {**j, "crv": "p-256"},
        lambda j: {**j, "y": 1},
        lambda j: {**j, "y": None},
        lambda j: {**j, "y": b64url_encode(b64url_decode(j["y"])[1:])},
        lambda j: {**j, "y": b64url_encode(b"\x00" + b64url_decode(j["y"]))},
        lambda j: {**j, "x": b64url_encode(b"\x00" + b64url_decode(j["x"]))},
        lambda j: {**j, "y": j["y"][:-1] + chr(ord(j["y"][-1]) + 1)},
    ],
    ids=[
        "extra-kid", "private-d", "missing-y", "missing-x", "kty-OKP", "crv-P-384",
        "crv-secp256k1", "crv-lowercase", "y-int", "y-null", "y-31-bytes",
        "y-33-bytes-leading-zero", "x-33-bytes-leading-zero", "y-trailing-bits-twin",
    ],
)
def test_ec_jwk_shape_rejected(mutate: Callable[[dict[str, Any]], Any]) -> None:
    _reject(mutate(EC.public_key.jwk))


@pytest.mark.parametrize("key", [ED, EC], ids=["EdDSA", "ES256"])
def test_extra_member_rejected_even_after_the_key_is_cached(key: PrivateKey) -> None:
    jwk = key.public_key.jwk
    assert public_key_from_jwk(dict(jwk)) == key.public_key
    _reject({**jwk, "kid": "k"})
    _reject({**jwk, "d": "AAAA"})


@pytest.mark.parametrize("key", [ED, EC], ids=["EdDSA", "ES256"])
def test_allowed_extra_members_do_not_enter_the_key(key: PrivateKey) -> None:
    jwk = {**key.public_key.jwk, "kid": "root-1", "alg": key.alg}
    loaded = public_key_from_jwk(jwk, extra=frozenset({"kid", "alg"}))
    assert loaded.jwk == key.public_key.jwk
    assert loaded.thumbprint == key.public_key.thumbprint
    _reject({**jwk, "use": "sig"}, extra=frozenset({"kid", "alg"}))


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_honest_keys_accepted(alg: str) -> None:
    for _ in range(20):
        key = PrivateKey.generate(alg)
        loaded = public_key_from_jwk(dict(key.public_key.jwk))
        assert loaded.alg == alg
        assert loaded == key.public_key
        if alg == "EdDSA":
            raw = b64url_decode(key.public_key.jwk["x"])
            assert nacl.bindings.crypto_core_ed25519_is_valid_point(raw)


# --- Ed25519 point validation ----------------------------------------------------


def test_small_order_list_is_exactly_the_eight_torsion_points() -> None:
    points = {name: ed_decode(bytes.fromhex(h)) for name, h in SMALL_ORDER.items()}
    assert all(p is not None for p in points.values())
    decoded = {p for p in points.values() if p is not None}
    assert len(decoded) == 8
    for point in decoded:
        assert ed_mul(8, point) == IDENTITY
        assert ed_encode(point).hex() in SMALL_ORDER.values()
    # One point of order 8 generates the whole torsion group: the list is complete.
    gen = points["order-8-a"]
    assert gen is not None
    assert ed_mul(4, gen) != IDENTITY
    assert {ed_mul(i, gen) for i in range(8)} == decoded
    # libsodium agrees that none of them (nor their twins) is a usable point.
    for h in (*SMALL_ORDER.values(), *SMALL_ORDER_TWINS.values()):
        assert not nacl.bindings.crypto_core_ed25519_is_valid_point(bytes.fromhex(h))


def test_small_order_twins_denote_small_order_points() -> None:
    for h in SMALL_ORDER_TWINS.values():
        raw = int.from_bytes(bytes.fromhex(h), "little")
        y = (raw & ((1 << 255) - 1)) % P
        assert y in {0, 1, P - 1}


@pytest.mark.parametrize("encoded", list(SMALL_ORDER.values()), ids=list(SMALL_ORDER))
def test_small_order_public_key_rejected(encoded: str) -> None:
    _reject(okp(bytes.fromhex(encoded)))


@pytest.mark.parametrize("encoded", list(SMALL_ORDER_TWINS.values()), ids=list(SMALL_ORDER_TWINS))
def test_small_order_twin_public_key_rejected(encoded: str) -> None:
    _reject(okp(bytes.fromhex(encoded)))


@pytest.mark.parametrize(
    "y",
    [P, P + 1, P + 2, P + 3, P + 18, 2**255 - 1],
    ids=["p", "p+1", "p+2", "p+3", "p+18", "2^255-1"],
)
@pytest.mark.parametrize("sign", [0, 1], ids=["sign-0", "sign-1"])
def test_non_canonical_ed25519_y_rejected(y: int, sign: int) -> None:
    _reject(okp((y | (sign << 255)).to_bytes(32, "little")))


def test_non_canonical_twin_of_a_real_point_rejected() -> None:
    """y + p for a y that decodes to a real point: same point, second spelling."""
    y = 2
    while ed_decode(y.to_bytes(32, "little")) is None:
        y += 1
    assert y + P < 2**255
    assert public_key_from_jwk(okp(y.to_bytes(32, "little"))).alg == "EdDSA"
    _reject(okp((y + P).to_bytes(32, "little")))


@pytest.mark.parametrize("sign", [0, 1], ids=["sign-0", "sign-1"])
def test_off_curve_ed25519_y_rejected(sign: int) -> None:
    y = _first_off_curve_y()
    encoded = (y | (sign << 255)).to_bytes(32, "little")
    assert ed_decode(encoded) is None
    assert not nacl.bindings.crypto_core_ed25519_is_valid_point(encoded)
    _reject(okp(encoded))


def test_many_off_curve_encodings_rejected() -> None:
    checked = 0
    for y in range(2, 400):
        encoded = y.to_bytes(32, "little")
        if ed_decode(encoded) is None:
            checked += 1
            _reject(okp(encoded))
    assert checked > 100


# --- P-256 point validation ------------------------------------------------------


def test_p256_helpers_agree_with_honest_key() -> None:
    assert p256_on_curve(EC_X, EC_Y)


@pytest.mark.parametrize(
    ("x", "y"),
    [
        (EC_X, (EC_Y + 1) % P256),
        ((EC_X + 1) % P256, EC_Y),
        (0, 0),
        (EC_X, 0),
        (P256, EC_Y),
        (EC_X, P256),
        (EC_X, EC_Y + P256) if EC_Y + P256 < 2**256 else (EC_X, 2**256 - 1),
        (2**256 - 1, 2**256 - 1),
    ],
    ids=[
        "y-plus-1", "x-plus-1", "zero-zero", "y-zero", "x-equals-p", "y-equals-p",
        "y-plus-p-or-max", "all-ones",
    ],
)
def test_p256_bad_points_rejected(x: int, y: int) -> None:
    _reject(ec_jwk(x, y))


def test_p256_non_canonical_twin_of_a_real_point_rejected() -> None:
    x, y = _p256_point_with_small_x()
    assert p256_on_curve(x, y)
    assert public_key_from_jwk(ec_jwk(x, y)).alg == "ES256"
    assert x + P256 < 2**256
    _reject(ec_jwk(x + P256, y))


def test_p256_negated_point_accepted() -> None:
    assert public_key_from_jwk(ec_jwk(EC_X, P256 - EC_Y)).alg == "ES256"


# --- Ed25519 signatures ----------------------------------------------------------

# RFC 8032 §7.1, TEST 1.
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUB = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8032_SIG = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def _ed_scalar(seed: bytes) -> int:
    h = hashlib.sha512(seed).digest()
    a = bytearray(h[:32])
    a[0] &= 248
    a[31] &= 127
    a[31] |= 64
    return int.from_bytes(a, "little")


def _challenge(r_enc: bytes, a_enc: bytes, msg: bytes) -> int:
    return int.from_bytes(hashlib.sha512(r_enc + a_enc + msg).digest(), "little") % L


def test_rfc8032_known_answer() -> None:
    key = PrivateKey(ed25519.Ed25519PrivateKey.from_private_bytes(RFC8032_SEED))
    assert key.public_key.jwk["x"] == RFC8032_PUB
    # The test's own arithmetic reproduces the public key: A = [a]B.
    assert ed_encode(ed_mul(_ed_scalar(RFC8032_SEED), BASE)) == b64url_decode(RFC8032_PUB)
    assert key.sign(b"") == RFC8032_SIG
    assert key.public_key.verify(b"", RFC8032_SIG)
    assert not key.public_key.verify(b"x", RFC8032_SIG)


def test_ed25519_s_plus_l_rejected() -> None:
    pub = public_key_from_jwk(okp(b64url_decode(RFC8032_PUB)))
    s = int.from_bytes(RFC8032_SIG[32:], "little")
    for k in (1, 2, 8):
        twin = RFC8032_SIG[:32] + (s + k * L).to_bytes(32, "little")
        # Same scalar modulo L: a verifier that skips the range check accepts it.
        assert ed_mul(s + k * L, BASE) == ed_mul(s, BASE)
        assert not pub.verify(b"", twin)
    assert not pub.verify(b"", RFC8032_SIG[:32] + L.to_bytes(32, "little"))
    assert not pub.verify(b"", RFC8032_SIG[:32] + (2**256 - 1).to_bytes(32, "little"))


def _forged_small_r(r_encoded: bytes, msg: bytes) -> tuple[PublicKey, bytes, int, Point]:
    """A signature with a small-order R, made with the private scalar (nonce r = 0)."""
    a = _ed_scalar(RFC8032_SEED)
    a_enc = b64url_decode(RFC8032_PUB)
    k = _challenge(r_encoded, a_enc, msg)
    s = k * a % L
    pub = public_key_from_jwk(okp(a_enc))
    point_a = ed_decode(a_enc)
    assert point_a is not None
    return pub, r_encoded + s.to_bytes(32, "little"), k, point_a


@pytest.mark.parametrize(
    "r_hex",
    [*SMALL_ORDER.values(), *SMALL_ORDER_TWINS.values()],
    ids=[*SMALL_ORDER, *SMALL_ORDER_TWINS],
)
def test_ed25519_small_order_r_rejected(r_hex: str) -> None:
    msg = b"small order R"
    pub, sig, k, point_a = _forged_small_r(bytes.fromhex(r_hex), msg)
    s = int.from_bytes(sig[32:], "little")
    r_point = ed_decode(bytes.fromhex(r_hex))
    assert r_point is None or ed_mul(8, r_point) == IDENTITY
    # [8]R is the identity, so the forgery satisfies the cofactored equation
    # [8][S]B = [8]R + [8][k]A: only the small-order-R rule refuses it.
    assert ed_mul(8, ed_mul(s, BASE)) == ed_mul(8, ed_mul(k, point_a))
    assert not pub.verify(msg, sig)


def test_ed25519_identity_r_forgery_satisfies_cofactorless_equation() -> None:
    msg = b"nonce zero"
    pub, sig, k, point_a = _forged_small_r(bytes.fromhex(SMALL_ORDER["identity"]), msg)
    s = int.from_bytes(sig[32:], "little")
    assert ed_mul(s, BASE) == ed_add(IDENTITY, ed_mul(k, point_a))
    assert not pub.verify(msg, sig)


_S = int.from_bytes(RFC8032_SIG[32:], "little")


@pytest.mark.parametrize(
    ("sig", "strict"),
    [
        (RFC8032_SIG, True),
        (RFC8032_SIG[:32] + (L - 1).to_bytes(32, "little"), True),
        (RFC8032_SIG[:32] + (_S + L).to_bytes(32, "little"), False),
        (RFC8032_SIG[:32] + L.to_bytes(32, "little"), False),
        (RFC8032_SIG[:32] + (2**256 - 1).to_bytes(32, "little"), False),
        *[(bytes.fromhex(h) + RFC8032_SIG[32:], False) for h in SMALL_ORDER.values()],
        *[(bytes.fromhex(h) + RFC8032_SIG[32:], False) for h in SMALL_ORDER_TWINS.values()],
        (RFC8032_SIG[:63], False),
        (RFC8032_SIG + b"\x00", False),
    ],
    ids=[
        "rfc8032", "s-is-l-minus-1", "s-plus-l", "s-is-l", "s-max",
        *(f"r-{name}" for name in SMALL_ORDER), *(f"r-{name}" for name in SMALL_ORDER_TWINS),
        "63-bytes", "65-bytes",
    ],
)
def test_ed25519_strictness_rule_itself(sig: bytes, strict: bool) -> None:
    """The SDK's own §3.1 check, independent of what libsodium also refuses."""
    assert ed25519_signature_is_strict(sig) is strict


@pytest.mark.parametrize("length", [0, 32, 63, 65, 128], ids=lambda n: f"{n}-bytes")
def test_ed25519_wrong_signature_length_rejected(length: int) -> None:
    sig = ED.sign(b"m")
    candidate = (sig * 3)[:length]
    assert not ED.public_key.verify(b"m", candidate)


@pytest.mark.parametrize("bit", [0, 7, 100, 255, 256, 300, 511], ids=lambda b: f"bit-{b}")
def test_ed25519_flipped_bit_rejected(bit: int) -> None:
    sig = bytearray(ED.sign(b"m"))
    sig[bit // 8] ^= 1 << (bit % 8)
    assert not ED.public_key.verify(b"m", bytes(sig))


# --- ES256 signatures ------------------------------------------------------------

# RFC 6979 §A.2.5, P-256 with SHA-256.
RFC6979_D = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC6979 = {
    b"sample": "EFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716"
    "F7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8",
    b"test": "F1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367"
    "019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083",
}


@pytest.mark.parametrize("msg", list(RFC6979), ids=[m.decode() for m in RFC6979])
def test_es256_rfc6979_known_answer(msg: bytes) -> None:
    key = PrivateKey(ec.derive_private_key(RFC6979_D, ec.SECP256R1()))
    sig = key.sign(msg)
    assert sig.hex().upper() == RFC6979[msg]
    assert key.sign(msg) == sig
    assert key.public_key.verify(msg, sig)


def test_es256_signatures_deterministic_and_64_bytes() -> None:
    for i in range(10):
        msg = b"message %d" % i
        sig = EC.sign(msg)
        assert len(sig) == 64
        assert EC.sign(msg) == sig
        assert EC.public_key.verify(msg, sig)
    assert EC.sign(b"a") != EC.sign(b"b")


def _rs(sig: bytes) -> tuple[int, int]:
    return int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")


def _raw(r: int, s: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@pytest.mark.parametrize(
    "make",
    [
        lambda r, s: _raw(0, 0),
        lambda r, s: _raw(0, s),
        lambda r, s: _raw(r, 0),
        lambda r, s: _raw(N256, s),
        lambda r, s: _raw(r, N256),
        lambda r, s: _raw(N256 + 1, s),
        lambda r, s: _raw(r, N256 + 1),
        lambda r, s: _raw(2**256 - 1, s),
        lambda r, s: _raw(r, 2**256 - 1),
        lambda r, s: _raw(N256, N256),
        lambda r, s: _raw(r + N256, s) if r + N256 < 2**256 else _raw(N256 + r % 7, s),
        encode_dss_signature,
        lambda r, s: _raw(r, s)[:63],
        lambda r, s: _raw(r, s) + b"\x00",
        lambda r, s: b"\x00" + _raw(r, s),
        lambda r, s: b"",
        lambda r, s: _raw(r, s)[:32],
        lambda r, s: _raw(s, r),
        lambda r, s: _raw(r, (s + 1) % N256),
    ],
    ids=[
        "r0-s0", "r-zero", "s-zero", "r-equals-n", "s-equals-n", "r-n-plus-1", "s-n-plus-1",
        "r-max", "s-max", "r-n-s-n", "r-plus-n", "der-form", "63-bytes", "65-bytes",
        "leading-zero-byte", "empty", "r-only", "swapped", "s-plus-1",
    ],
)
def test_es256_bad_signatures_rejected(make: Callable[[int, int], bytes]) -> None:
    msg = b"es256 message"
    r, s = _rs(EC.sign(msg))
    assert EC.public_key.verify(msg, _raw(r, s))
    assert not EC.public_key.verify(msg, make(r, s))


def test_es256_high_s_twin_verifies() -> None:
    """Spec §3.1 bounds r and s by [1, n-1] only, so (r, n-s) is valid too; that
    malleability is why identifiers never come from signature bytes (§2)."""
    msg = b"twin"
    r, s = _rs(EC.sign(msg))
    assert EC.public_key.verify(msg, _raw(r, N256 - s))


def test_signatures_bound_to_their_algorithm() -> None:
    msg = b"cross"
    assert not EC.public_key.verify(msg, ED.sign(msg))
    assert not ED.public_key.verify(msg, EC.sign(msg))
    assert ED.public_key.alg == "EdDSA"
    assert EC.public_key.alg == "ES256"


# --- thumbprints (RFC 7638) ------------------------------------------------------


def test_rfc8037_thumbprint_example() -> None:
    key = public_key_from_jwk({"kty": "OKP", "crv": "Ed25519", "x": RFC8032_PUB})
    assert key.thumbprint == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


@pytest.mark.parametrize("key", [ED, EC], ids=["EdDSA", "ES256"])
def test_thumbprint_is_rfc7638(key: PrivateKey) -> None:
    jwk = key.public_key.jwk
    if jwk["kty"] == "OKP":
        text = '{"crv":"Ed25519","kty":"OKP","x":"%s"}' % jwk["x"]  # noqa: UP031
    else:
        text = '{"crv":"P-256","kty":"EC","x":"%s","y":"%s"}' % (jwk["x"], jwk["y"])  # noqa: UP031
    expected = b64url_encode(hashlib.sha256(text.encode()).digest())
    assert key.public_key.thumbprint == expected
    reordered = dict(reversed(list(jwk.items())))
    assert public_key_from_jwk(reordered).thumbprint == expected


def test_distinct_keys_have_distinct_thumbprints() -> None:
    keys = [PrivateKey.generate(alg) for alg in ("EdDSA", "ES256") for _ in range(5)]
    assert len({k.public_key.thumbprint for k in keys}) == 10
    assert keys[0].public_key != keys[1].public_key


# --- private keys ----------------------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_private_jwk_round_trip(alg: str) -> None:
    key = PrivateKey.generate(alg)
    jwk = key.to_jwk()
    assert set(jwk) == set(key.public_key.jwk) | {"d"}
    assert len(b64url_decode(jwk["d"])) == 32
    loaded = PrivateKey.from_jwk(jwk)
    assert loaded.public_key == key.public_key
    assert loaded.to_jwk() == jwk
    msg = b"round trip"
    assert key.public_key.verify(msg, loaded.sign(msg))
    if alg == "ES256":
        assert loaded.sign(msg) == key.sign(msg)


@pytest.mark.parametrize(
    "make",
    [
        lambda a, b: {**a.to_jwk(), "d": b.to_jwk()["d"]},
        lambda a, b: {**b.public_key.jwk, "d": a.to_jwk()["d"]},
        lambda a, b: dict(a.public_key.jwk),
        lambda a, b: {**a.to_jwk(), "d": 7},
        lambda a, b: {**a.to_jwk(), "d": a.to_jwk()["d"] + "="},
        lambda a, b: {**a.to_jwk(), "d": b64url_encode(b64url_decode(a.to_jwk()["d"])[:31])},
        lambda a, b: {**a.to_jwk(), "d": b64url_encode(b64url_decode(a.to_jwk()["d"]) + b"\0")},
        lambda a, b: {**a.to_jwk(), "kty": "RSA"},
        lambda a, b: {**a.to_jwk(), "crv": "P-384"},
        lambda a, b: {k: v for k, v in a.to_jwk().items() if k != "x"},
        lambda a, b: [a.to_jwk()],
    ],
    ids=[
        "d-of-another-key", "public-of-another-key", "no-d", "d-int", "d-padded", "d-31-bytes",
        "d-33-bytes", "kty-RSA", "crv-P-384", "missing-x", "not-a-mapping",
    ],
)
@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_private_jwk_rejected(alg: str, make: Callable[[PrivateKey, PrivateKey], Any]) -> None:
    a, b = PrivateKey.generate(alg), PrivateKey.generate(alg)
    with pytest.raises(ValueError):  # noqa: PT011
        PrivateKey.from_jwk(make(a, b))


def test_private_jwk_cross_algorithm_mismatch_rejected() -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        PrivateKey.from_jwk({**EC.public_key.jwk, "d": ED.to_jwk()["d"], "kty": "OKP"})
    with pytest.raises(ValueError):  # noqa: PT011
        PrivateKey.from_jwk({**ED.public_key.jwk, "d": EC.to_jwk()["d"]})


@pytest.mark.parametrize("alg", ["RS256", "ES384", "eddsa", "none", ""])
def test_unsupported_algorithm_generation_rejected(alg: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        PrivateKey.generate(alg)


def test_unsupported_curve_private_key_rejected() -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        PrivateKey(ec.generate_private_key(ec.SECP384R1()))
