"""Signed revocation lists (spec §7) and their place in verification (§8 step 7)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import NOW, REFUND, ROOT_KID, World, b64, forge

from verifier_sdk import (
    Holder,
    Request,
    TrustBundle,
    VerificationError,
    Verifier,
    decode_unverified,
    make_revocation_list,
    verify_revocation_list,
)

RL_ISS = "spiffe://acme.example/revoker"
RL_HEADER = {"alg": "EdDSA", "typ": "mandate-rl+jwt", "kid": ROOT_KID}
JTI_X = "revoked-jti-000000001"


def rl_payload(seq: int = 1, rev: list[str] | None = None, **changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "v": 1, "iss": RL_ISS, "seq": seq, "iat": NOW - 60, "exp": NOW + 3600,
        "rev": [] if rev is None else rev,
    }
    payload.update(changes)
    return payload


def make_rl(world: World, seq: int = 1, rev: list[str] | None = None, **changes: Any) -> str:
    """A list through the SDK's own builder, signed by the world's root key."""
    p = rl_payload(seq, rev, **changes)
    return make_revocation_list(alg=world.root.alg, kid=ROOT_KID, sign=world.root.sign,
                                iss=p["iss"], seq=p["seq"], iat=p["iat"], exp=p["exp"],
                                revoked=p["rev"])


def forge_rl(world: World, payload: Any, header: Any = None) -> str:
    return forge(RL_HEADER if header is None else header, payload, world.root.sign)


def code_of(call: Any, *args: Any, **kwargs: Any) -> tuple[str, int | None]:
    with pytest.raises(VerificationError) as info:
        call(*args, **kwargs)
    return info.value.code, info.value.link


def jtis(chain: str) -> list[str]:
    return [payload["jti"] for _, payload in decode_unverified(chain)]


def verify(world: World, verifier: Verifier, chain: str, holder: Holder | None = None) -> None:
    verifier.verify(chain, REFUND, pop=world.prove(holder or world.c, chain, REFUND))


# --- loading: seq, replacement, no-op, rollback ------------------------------------


def test_a_newer_seq_replaces_the_list(world: World) -> None:
    v = world.verifier()
    assert v.revocation_seq is None
    assert v.update_revocations(make_rl(world, 1)) is True
    assert v.revocation_seq == 1
    assert v.update_revocations(make_rl(world, 7)) is True
    assert v.revocation_seq == 7


def test_seq_zero_is_a_valid_first_list(world: World) -> None:
    v = world.verifier()
    assert v.update_revocations(make_rl(world, 0)) is True
    assert v.revocation_seq == 0


def test_a_lower_seq_is_stale(world: World) -> None:
    v = world.verifier()
    v.update_revocations(make_rl(world, 5))
    assert code_of(v.update_revocations, make_rl(world, 4)) == ("revocation_stale", None)
    assert v.revocation_seq == 5


def test_the_same_list_again_is_a_no_op(world: World) -> None:
    v = world.verifier()
    token = make_rl(world, 3, [JTI_X])
    assert v.update_revocations(token) is True
    assert v.update_revocations(token) is False
    assert v.revocation_seq == 3


def test_the_same_payload_re_encoded_is_a_no_op(world: World) -> None:
    v = world.verifier()
    v.update_revocations(make_rl(world, 3, [JTI_X]))
    payload = rl_payload(3, [JTI_X])
    reordered = dict(reversed(payload.items()))
    header = dict(reversed(RL_HEADER.items()))
    spaced = json.dumps(payload, indent=1).encode()
    for token in (forge_rl(world, reordered, header), forge_rl(world, spaced)):
        assert token != make_rl(world, 3, [JTI_X])
        assert v.update_revocations(token) is False
    assert v.revocation_seq == 3


@pytest.mark.parametrize(
    "changes",
    [{"rev": []}, {"rev": [JTI_X, "another-jti-000000002"]}, {"exp": NOW + 3601},
     {"iat": NOW - 61}, {"iss": "spiffe://acme.example/other"}],
    ids=["rev-emptied", "rev-grown", "exp", "iat", "iss"],
)
def test_the_same_seq_with_other_content_is_stale(world: World, changes: dict[str, Any]) -> None:
    v = world.verifier()
    v.update_revocations(make_rl(world, 3, [JTI_X]))
    other = forge_rl(world, {**rl_payload(3, [JTI_X]), **changes})
    assert code_of(v.update_revocations, other) == ("revocation_stale", None)


FAILED_LOADS = {
    "lower-seq": lambda w: make_rl(w, 1),
    "same-seq-other-content": lambda w: make_rl(w, 2),
    "bad-signature": lambda w: forge(RL_HEADER, rl_payload(3), w.a.sign),
    "malformed": lambda w: forge_rl(w, rl_payload(3, extra=1)),
    "unknown-kid": lambda w: forge_rl(w, rl_payload(3), {**RL_HEADER, "kid": "root-9"}),
    "unsupported-alg": lambda w: forge_rl(w, rl_payload(3), {**RL_HEADER, "alg": "ES256"}),
    "too-large": lambda w: forge_rl(w, rl_payload(3)) + "A" * 1_048_576,
}


@pytest.mark.parametrize("bad", list(FAILED_LOADS))
def test_a_failed_load_leaves_the_state_unchanged(world: World, bad: str) -> None:
    chain = world.chain3()
    v = world.verifier()
    v.update_revocations(make_rl(world, 2, [jtis(chain)[1]]))
    with pytest.raises(VerificationError):
        v.update_revocations(FAILED_LOADS[bad](world))
    assert v.revocation_seq == 2
    assert code_of(verify, world, v, chain) == ("revoked", 1)


# --- size ----------------------------------------------------------------------


def exact_size_list(world: World, size: int) -> str:
    """A validly signed list of exactly ``size`` bytes, padded with JSON whitespace
    (in the header too: unpadded base64 never has a length of 4k + 1)."""
    compact = json.dumps(rl_payload(4, [JTI_X]), separators=(",", ":")).encode()
    for header_pad in range(3):
        header = json.dumps(RL_HEADER, separators=(",", ":")).encode() + b" " * header_pad
        fixed = len(b64(header)) + 1 + 1 + 86  # two dots, a 64-byte signature
        for n in range(len(compact), size):
            if fixed + (4 * n + 2) // 3 == size:  # unpadded base64 of n bytes
                token = forge_rl(world, compact + b" " * (n - len(compact)), header)
                assert len(token) == size
                return token
    raise AssertionError(f"no padding gives a {size}-byte list")


def test_a_list_of_exactly_one_mib_is_accepted(world: World) -> None:
    limit = 1_048_576
    token = exact_size_list(world, limit)
    assert len(token) == limit
    v = world.verifier()
    assert v.update_revocations(token) is True


def test_a_list_over_one_mib_is_too_large(world: World) -> None:
    limit = 1_048_576
    token = exact_size_list(world, limit + 1)
    assert len(token) == limit + 1
    v = world.verifier()
    assert code_of(v.update_revocations, token) == ("too_large", None)
    assert v.revocation_seq is None


def test_a_real_list_of_many_jtis_over_one_mib_is_too_large(world: World) -> None:
    revoked = [f"{i:022d}" for i in range(33_000)]
    token = make_rl(world, 1, revoked)
    assert len(token) > 1_048_576
    assert code_of(verify_revocation_list, token, world.bundle) == ("too_large", None)


def test_the_size_limit_counts_bytes_not_characters(world: World) -> None:
    token = "é" * 600_000  # 600,000 characters, 1,200,000 UTF-8 bytes
    assert code_of(verify_revocation_list, token, world.bundle) == ("too_large", None)


# --- shape ---------------------------------------------------------------------

MALFORMED: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
    ("missing-rev", {"rev": None}, None),
    ("missing-seq", {"seq": None}, None),
    ("missing-iss", {"iss": None}, None),
    ("extra-member", {"nbf": NOW - 60}, None),
    ("v-2", {"v": 2}, None),
    ("v-true", {"v": True}, None),
    ("v-string", {"v": "1"}, None),
    ("seq-negative", {"seq": -1}, None),
    ("seq-bool", {"seq": True}, None),
    ("seq-string", {"seq": "3"}, None),
    ("iat-string", {"iat": str(NOW)}, None),
    ("exp-bool", {"exp": True}, None),
    ("iss-empty", {"iss": ""}, None),
    ("iss-control-char", {"iss": "revoker\n"}, None),
    ("rev-not-a-list", {"rev": JTI_X}, None),
    ("rev-null", {"rev": "null"}, None),
    ("rev-jti-too-short", {"rev": ["short-jti-1234"]}, None),
    ("rev-jti-too-long", {"rev": ["a" * 65]}, None),
    ("rev-jti-bad-char", {"rev": ["has space 0123456789"]}, None),
    ("rev-jti-padding", {"rev": ["abcdefghijklmnop=="]}, None),
    ("rev-int", {"rev": [12345678901234567]}, None),
    ("typ-link", {}, {"typ": "mandate+jwt"}),
    ("typ-case", {}, {"typ": "Mandate-rl+jwt"}),
    ("typ-prefixed", {}, {"typ": "application/mandate-rl+jwt"}),
    ("header-extra-jku", {}, {"jku": "https://evil.example/keys"}),
    ("header-missing-typ", {}, {"typ": None}),
]


@pytest.mark.parametrize(
    ("payload_changes", "header_changes"),
    [(p, h) for _, p, h in MALFORMED], ids=[name for name, _, _ in MALFORMED],
)
def test_a_malformed_list_is_refused(
    world: World, payload_changes: dict[str, Any], header_changes: dict[str, Any] | None
) -> None:
    merged = {**rl_payload(3, [JTI_X]), **payload_changes}
    payload = {k: v for k, v in merged.items() if v is not None}
    if payload_changes.get("rev") == "null":
        payload["rev"] = None
    header = {**RL_HEADER, **(header_changes or {})}
    header = {k: v for k, v in header.items() if v is not None}
    v = world.verifier()
    assert code_of(v.update_revocations, forge_rl(world, payload, header)) == ("malformed", None)
    assert v.revocation_seq is None


def test_the_malformed_table_has_a_valid_twin(world: World) -> None:
    v = world.verifier()
    assert v.update_revocations(forge_rl(world, rl_payload(3, [JTI_X]))) is True


@pytest.mark.parametrize("token", [b"", "", "a.b", "not a token", None, 42],
                         ids=["bytes", "empty", "two-segments", "text", "none", "int"])
def test_not_a_token_is_malformed(world: World, token: Any) -> None:
    assert code_of(verify_revocation_list, token, world.bundle) == ("malformed", None)


# --- key, algorithm, signature --------------------------------------------------


def test_an_unknown_kid_is_refused(world: World) -> None:
    token = forge_rl(world, rl_payload(3), {**RL_HEADER, "kid": "root-2"})
    assert code_of(world.verifier().update_revocations, token) == ("unknown_key", None)


def windowed(world: World, **window: int) -> Verifier:
    return Verifier(TrustBundle.from_jwks(world.jwks(**window)), audience="payments-api",
                    clock=world.clock)


def test_a_list_issued_before_the_key_nbf_is_refused(world: World) -> None:
    v = windowed(world, nbf=NOW - 100)
    early = make_rl(world, 1, iat=NOW - 101)
    assert code_of(v.update_revocations, early) == ("unknown_key", None)
    assert v.update_revocations(make_rl(world, 1, iat=NOW - 100)) is True


def test_a_list_outliving_the_key_exp_is_refused(world: World) -> None:
    v = windowed(world, exp=NOW + 1000)
    late = make_rl(world, 1, exp=NOW + 1001)
    assert code_of(v.update_revocations, late) == ("unknown_key", None)
    assert v.update_revocations(make_rl(world, 1, exp=NOW + 1000)) is True


@pytest.mark.parametrize("alg", ["ES256", "none", "HS256", "eddsa"])
def test_an_alg_other_than_the_keys_is_refused(world: World, alg: str) -> None:
    token = forge_rl(world, rl_payload(3), {**RL_HEADER, "alg": alg})
    assert code_of(world.verifier().update_revocations, token) == ("unsupported_alg", None)


def test_an_es256_bundle_key_signs_lists_too() -> None:
    root = Holder.generate("ES256")
    bundle = TrustBundle.from_jwks(
        {"keys": [{**root.public_jwk, "kid": "root-ec", "alg": "ES256"}]}
    )
    header = {"alg": "ES256", "typ": "mandate-rl+jwt", "kid": "root-ec"}
    assert verify_revocation_list(forge(header, rl_payload(9), root.sign), bundle).seq == 9
    eddsa = {**header, "alg": "EdDSA"}
    assert code_of(verify_revocation_list, forge(eddsa, rl_payload(9), root.sign), bundle) == (
        "unsupported_alg", None)


def test_a_bad_signature_is_refused(world: World) -> None:
    v = world.verifier()
    by_other_key = forge(RL_HEADER, rl_payload(3), world.a.sign)
    good = make_rl(world, 3)
    head, body, sig = good.split(".")
    zeroed = f"{head}.{body}.{b64(bytes(64))}"
    unsigned = f"{head}.{body}."
    other_body = forge_rl(world, rl_payload(4)).split(".")[1]
    spliced = f"{head}.{other_body}.{sig}"
    for token in (by_other_key, zeroed, unsigned, spliced):
        assert code_of(v.update_revocations, token) == ("bad_signature", None)
    assert v.revocation_seq is None


def test_verify_revocation_list_returns_the_signed_content(world: World) -> None:
    rl = verify_revocation_list(make_rl(world, 4, [JTI_X]), world.bundle)
    assert (rl.iss, rl.seq, rl.iat, rl.exp) == (RL_ISS, 4, NOW - 60, NOW + 3600)
    assert rl.revoked == frozenset({JTI_X})


# --- in verification ----------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2])
def test_revoking_any_link_revokes_the_chain_at_that_link(world: World, index: int) -> None:
    chain = world.chain3()
    v = world.verifier()
    v.update_revocations(make_rl(world, 1, [jtis(chain)[index]]))
    assert code_of(verify, world, v, chain) == ("revoked", index)


def test_an_unrelated_revocation_leaves_the_chain_valid(world: World) -> None:
    chain = world.chain3()
    v = world.verifier()
    v.update_revocations(make_rl(world, 1, [JTI_X]))
    verify(world, v, chain)


def test_revoking_a_link_revokes_links_made_offline_below_it(world: World) -> None:
    base = world.chain3()
    two = "~".join(base.split("~")[:2])  # root → a → b; b may add one more link
    v = world.verifier()
    v.update_revocations(make_rl(world, 1, [jtis(two)[1]]))
    offline = world.b.attenuate(
        two, sub="agent:offline", holder_jwk=world.c.public_jwk,
        cap=[{"res": "api/payments/refunds/o-123", "act": ["post"]}], ttl=60, now=world.now,
    )
    assert jtis(offline)[2] not in jtis(base)
    assert code_of(verify, world, v, offline) == ("revoked", 1)


def test_a_link_made_offline_can_be_revoked_by_its_jti(world: World) -> None:
    two = "~".join(world.chain3().split("~")[:2])
    offline = world.b.attenuate(
        two, sub="agent:offline", holder_jwk=world.c.public_jwk,
        cap=[{"res": "api/payments/refunds/o-123", "act": ["post"]}], ttl=60, now=world.now,
    )
    v = world.verifier()
    v.update_revocations(make_rl(world, 1, [jtis(offline)[2]]))
    assert code_of(verify, world, v, offline) == ("revoked", 2)
    verify(world, v, two, world.b)  # the parent chain is untouched


def test_revocation_takes_effect_on_a_cached_chain(world: World) -> None:
    chain = world.chain3()
    v = world.verifier()
    verify(world, v, chain)
    v.update_revocations(make_rl(world, 1, [jtis(chain)[2]]))
    assert code_of(verify, world, v, chain) == ("revoked", 2)


def test_a_loaded_list_fails_closed_after_its_exp(world: World) -> None:
    chain = world.chain3()
    v = world.verifier(leeway=30)
    v.update_revocations(make_rl(world, 1, exp=NOW + 50))
    world.now = NOW + 79  # exp + leeway - 1
    verify(world, v, chain)
    world.now = NOW + 80  # exp + leeway
    assert code_of(verify, world, v, chain) == ("revocation_stale", None)
    world.now = NOW + 85
    assert code_of(verify, world, v, chain) == ("revocation_stale", None)
    v.update_revocations(make_rl(world, 2, exp=NOW + 1000))
    verify(world, v, chain)


def test_an_expired_list_cannot_be_refreshed_by_itself(world: World) -> None:
    chain = world.chain3()
    v = world.verifier()
    stale = make_rl(world, 1, exp=NOW + 10)
    v.update_revocations(stale)
    world.now = NOW + 40
    assert v.update_revocations(stale) is False
    assert code_of(verify, world, v, chain) == ("revocation_stale", None)


def test_required_revocations_fail_closed_before_the_first_list(world: World) -> None:
    chain = world.chain3()
    v = world.verifier(require_revocations=True)
    assert code_of(verify, world, v, chain) == ("revocation_stale", None)
    v.update_revocations(make_rl(world, 1))
    verify(world, v, chain)


def test_without_requirement_no_list_is_fine(world: World) -> None:
    chain = world.chain3()
    verify(world, world.verifier(), chain)


def test_revocation_is_checked_before_the_capabilities(world: World) -> None:
    """Step 7 precedes step 9: a revoked chain reports revoked, not denied."""
    chain = world.chain3()
    v = world.verifier()
    v.update_revocations(make_rl(world, 1, [jtis(chain)[0]]))
    outside = Request("api/payments/refunds/o-999", "post", {"amount": 1})
    pop = world.prove(world.c, chain, outside)
    assert code_of(v.verify, chain, outside, pop=pop) == ("revoked", 0)
