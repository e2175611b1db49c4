"""Interoperability with an independent JOSE implementation (PyJWT).

Links and PoPs the SDK makes are ordinary JWS that PyJWT verifies with the
right key (and not with a wrong one); root links PyJWT signs, with the
header spec §3.2 asks for and JSON that is neither sorted nor canonical,
are accepted by the SDK's verifier and can be attenuated further.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from helpers import AUD, NOW, REFUND, World
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from verifier_sdk import Holder, TrustBundle, VerificationError, Verifier, decode_unverified
from verifier_sdk._encoding import canonical_json

if TYPE_CHECKING:
    from jwt.types import Options

# The clock is fixed in the past or future of the real one: PyJWT checks
# signatures here, the SDK checks times.
NO_TIME_CHECKS: Options = {"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                           "verify_aud": False}
EXT_KID = "ext-root.1"
PrivateKeyType = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def _pyjwt_decode(token: str, jwk: dict[str, Any], alg: str) -> dict[str, Any]:
    key = jwt.PyJWK(dict(jwk)).key
    claims: dict[str, Any] = jwt.decode(token, key=key, algorithms=[alg], options=NO_TIME_CHECKS)
    return claims


def _segment(token: str, index: int) -> bytes:
    part = token.split(".")[index]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@pytest.fixture(params=["EdDSA", "ES256"])
def root_world(request: pytest.FixtureRequest) -> World:
    return World(root=Holder.generate(request.param))


# --- SDK → PyJWT ----------------------------------------------------------------


def test_sdk_root_link_verifies_with_pyjwt(root_world: World) -> None:
    w = root_world
    token = w.issue()
    claims = _pyjwt_decode(token, w.root.public_jwk, w.root.alg)
    [(header, payload)] = decode_unverified(token)
    assert claims == payload
    assert jwt.get_unverified_header(token) == header == {
        "alg": w.root.alg, "typ": "mandate+jwt", "kid": "root-1",
    }


def test_sdk_root_link_fails_with_pyjwt_and_a_wrong_key(root_world: World) -> None:
    w = root_world
    token = w.issue()
    other = Holder.generate(w.root.alg)
    with pytest.raises(jwt.InvalidSignatureError):
        _pyjwt_decode(token, other.public_jwk, w.root.alg)
    # The right key, but the other algorithm: PyJWT refuses as well.
    wrong_alg = "ES256" if w.root.alg == "EdDSA" else "EdDSA"
    with pytest.raises(jwt.InvalidTokenError):
        _pyjwt_decode(token, w.root.public_jwk, wrong_alg)


def test_sdk_attenuated_links_verify_with_pyjwt(world: World) -> None:
    """Link i > 0 verifies under link i-1's cnf key: EdDSA (holder a), ES256 (holder b)."""
    tokens = world.chain3().split("~")
    decoded = decode_unverified("~".join(tokens))
    for i in (1, 2):
        parent_jwk = decoded[i - 1][1]["cnf"]["jwk"]
        alg = decoded[i][0]["alg"]
        assert alg == ("EdDSA" if i == 1 else "ES256")
        assert _pyjwt_decode(tokens[i], parent_jwk, alg) == decoded[i][1]
        # Under another key of the same type it does not verify.
        with pytest.raises(jwt.InvalidSignatureError):
            _pyjwt_decode(tokens[i], Holder.generate(alg).public_jwk, alg)


def test_sdk_pop_verifies_with_pyjwt(world: World) -> None:
    chain = world.chain3()
    pop = world.prove(world.c, chain, REFUND)
    claims = _pyjwt_decode(pop, world.c.public_jwk, world.c.alg)
    assert claims["aud"] == AUD
    assert claims["iat"] == NOW
    assert jwt.get_unverified_header(pop) == {"alg": "EdDSA", "typ": "mandate-pop+jwt"}
    with pytest.raises(jwt.InvalidSignatureError):
        _pyjwt_decode(pop, world.a.public_jwk, "EdDSA")


# --- PyJWT → SDK ----------------------------------------------------------------


def _external_root(alg: str) -> tuple[PrivateKeyType, dict[str, Any]]:
    """A root key made outside the SDK, with its JWK as PyJWT writes it."""
    if alg == "EdDSA":
        ed_key = ed25519.Ed25519PrivateKey.generate()
        return ed_key, OKPAlgorithm.to_jwk(ed_key.public_key(), as_dict=True)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    return ec_key, ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)


def _pyjwt_root(w: World, key: PrivateKeyType, alg: str, *, headers: dict[str, Any] | None = None,
                **changes: Any) -> str:
    header = {"typ": "mandate+jwt", "kid": EXT_KID} if headers is None else headers
    return jwt.encode(w.root_payload(**changes), key, algorithm=alg, headers=header,
                      sort_headers=False)


def _verifier(w: World, jwk: dict[str, Any], alg: str) -> Verifier:
    bundle = TrustBundle.from_jwks({"keys": [{**jwk, "kid": EXT_KID, "alg": alg}]})
    return Verifier(bundle, audience=AUD, clock=w.clock)


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_pyjwt_root_link_accepted_by_sdk(world: World, alg: str) -> None:
    key, jwk = _external_root(alg)
    token = _pyjwt_root(world, key, alg)
    # Neither the header nor the payload is in canonical form: not required.
    assert _segment(token, 0) != canonical_json(jwt.get_unverified_header(token))
    assert _segment(token, 1) != canonical_json(world.root_payload())
    assert set(jwt.get_unverified_header(token)) == {"alg", "typ", "kid"}

    decision = _verifier(world, jwk, alg).verify(
        token, REFUND, pop=world.prove(world.a, token, REFUND)
    )
    assert decision.kid == EXT_KID
    assert decision.principals == ("spiffe://acme.example/orchestrator", "agent:support")
    assert decision.subject == "agent:support"


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_pyjwt_root_link_can_be_attenuated_by_sdk(world: World, alg: str) -> None:
    key, jwk = _external_root(alg)
    root = _pyjwt_root(world, key, alg)
    chain = world.a.attenuate(
        root, sub="agent:refund", holder_jwk=world.b.public_jwk,
        cap=[{"res": "api/payments/refunds/o-123", "act": ["post"]}],
        ttl=60, now=NOW - 5,
    )
    decision = _verifier(world, jwk, alg).verify(
        chain, REFUND, pop=world.prove(world.b, chain, REFUND)
    )
    assert decision.principals[-1] == decision.subject == "agent:refund"
    assert len(decision.jtis) == 2


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"kid": EXT_KID}, "malformed"),
        ({"typ": "JWT", "kid": EXT_KID}, "malformed"),
        ({"typ": "mandate+jwt"}, "malformed"),
        ({"typ": "mandate+jwt", "kid": EXT_KID, "cty": "json"}, "malformed"),
        ({"typ": "mandate+jwt", "kid": "other-root"}, "unknown_key"),
    ],
    ids=["pyjwt-default-typ", "typ-JWT", "no-kid", "extra-cty", "unknown-kid"],
)
def test_pyjwt_root_link_with_wrong_header_refused(
    world: World, alg: str, headers: dict[str, Any], code: str
) -> None:
    key, jwk = _external_root(alg)
    token = _pyjwt_root(world, key, alg, headers=headers)
    # No PoP: the link fails first (and a holder cannot prove on a malformed chain).
    with pytest.raises(VerificationError) as err:
        _verifier(world, jwk, alg).verify(token, REFUND, pop=None)
    assert (err.value.code, err.value.link) == (code, 0)


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_pyjwt_root_link_signed_by_another_key_refused(world: World, alg: str) -> None:
    _, jwk = _external_root(alg)
    impostor, _ = _external_root(alg)
    token = _pyjwt_root(world, impostor, alg)
    with pytest.raises(VerificationError) as err:
        _verifier(world, jwk, alg).verify(token, REFUND, pop=world.prove(world.a, token, REFUND))
    assert (err.value.code, err.value.link) == ("bad_signature", 0)


def test_pyjwt_root_link_with_alg_of_another_key_type_refused(world: World) -> None:
    """ES256 token naming an Ed25519 bundle key: the key fixes the algorithm."""
    _, ed_jwk = _external_root("EdDSA")
    ec_key, _ = _external_root("ES256")
    token = _pyjwt_root(world, ec_key, "ES256")
    with pytest.raises(VerificationError) as err:
        _verifier(world, ed_jwk, "EdDSA").verify(
            token, REFUND, pop=world.prove(world.a, token, REFUND)
        )
    assert (err.value.code, err.value.link) == ("unsupported_alg", 0)


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_pyjwt_root_link_with_pyjwt_extra_claims_refused(world: World, alg: str) -> None:
    """Unknown members are refused whoever signs them (spec §2)."""
    key, jwk = _external_root(alg)
    token = _pyjwt_root(world, key, alg, scope="refunds")
    with pytest.raises(VerificationError) as err:
        _verifier(world, jwk, alg).verify(token, REFUND, pop=None)
    assert (err.value.code, err.value.link) == ("malformed", 0)
