"""The holder's side (spec §3.3 attenuation, §5 PoP, §9 Holder and issue_root):
keys, narrowing a chain, proving possession, and refusing what a verifier would."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from helpers import AUD, NOW, REFUND, REFUND_CAP, ROOT_KID, World, forge, link_hash

from verifier_sdk import Holder, Request, VerificationError, decode_unverified, issue_root
from verifier_sdk._encoding import canonical_json, sha256_b64

REFUND_123 = {"res": "api/payments/refunds/o-123", "act": ["post"]}


def claims(token: str, segment: int = 1) -> dict[str, Any]:
    """The decoded JSON of a compact JWS segment: 0 header, 1 payload."""
    part = token.split(".")[segment]
    loaded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return loaded


def leaf(chain: str) -> dict[str, Any]:
    return decode_unverified(chain)[-1][1]


# --- keys ----------------------------------------------------------------------


@pytest.mark.parametrize(("alg", "kty", "members"), [
    ("EdDSA", "OKP", {"kty", "crv", "x"}),
    ("ES256", "EC", {"kty", "crv", "x", "y"}),
])
def test_generate_gives_a_key_of_the_asked_algorithm(alg: str, kty: str, members: set[str]) -> None:
    holder = Holder.generate(alg)
    assert holder.alg == alg
    assert holder.public_jwk["kty"] == kty
    assert set(holder.public_jwk) == members
    assert Holder.generate(alg).public_jwk != holder.public_jwk


def test_generate_defaults_to_ed25519() -> None:
    assert Holder.generate().alg == "EdDSA"


@pytest.mark.parametrize("alg", ["RS256", "ES384", "eddsa", "none", ""])
def test_generate_refuses_other_algorithms(alg: str) -> None:
    with pytest.raises(ValueError, match="unsupported"):
        Holder.generate(alg)


def test_public_jwk_is_a_copy() -> None:
    holder = Holder.generate()
    holder.public_jwk["x"] = "tampered"
    assert holder.public_jwk["x"] != "tampered"


def test_thumbprint_is_rfc7638_over_the_public_jwk() -> None:
    holder = Holder.generate("ES256")
    assert holder.thumbprint == sha256_b64(canonical_json(holder.public_jwk))


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_private_jwk_round_trip(alg: str) -> None:
    holder = Holder.generate(alg)
    private = holder.private_jwk()
    assert set(private) == set(holder.public_jwk) | {"d"}
    again = Holder.from_jwk(private)
    assert again.public_jwk == holder.public_jwk
    assert again.thumbprint == holder.thumbprint
    assert again.private_jwk() == private


def test_a_round_tripped_holder_can_use_its_chain(world: World) -> None:
    chain = world.chain3()
    c_again = Holder.from_jwk(world.c.private_jwk())
    pop = world.prove(c_again, chain, REFUND)
    assert world.verifier().verify(chain, REFUND, pop=pop).subject == "agent:helper"


@pytest.mark.parametrize("defect", ["other-x", "no-d", "short-d", "bad-kty", "not-a-dict"])
def test_from_jwk_refuses_a_bad_private_jwk(defect: str) -> None:
    private: Any = Holder.generate().private_jwk()
    if defect == "other-x":
        private["x"] = Holder.generate().public_jwk["x"]
    elif defect == "no-d":
        del private["d"]
    elif defect == "short-d":
        private["d"] = private["d"][:20]
    elif defect == "bad-kty":
        private["kty"] = "RSA"
    else:
        private = "not a jwk"
    with pytest.raises(ValueError, match="private JWK"):
        Holder.from_jwk(private)


# --- attenuate -------------------------------------------------------------------


def test_attenuate_appends_a_link_that_verifies(world: World) -> None:
    chain = world.issue()
    child = world.a.attenuate(chain, sub="agent:refund", holder_jwk=world.b.public_jwk,
                              cap=[REFUND_123], ttl=60, now=world.now)
    assert child.startswith(chain + "~")
    payload = leaf(child)
    assert payload["iss"] == "agent:support"
    assert payload["prv"] == link_hash(chain)
    assert payload["cnf"] == {"jwk": world.b.public_jwk}
    assert decode_unverified(child)[-1][0]["kid"] == world.a.thumbprint
    pop = world.prove(world.b, child, REFUND)
    assert world.verifier().verify(child, REFUND, pop=pop).subject == "agent:refund"


def test_attenuate_clamps_exp_to_the_parent(world: World) -> None:
    chain = world.issue()  # exp NOW + 590
    child = world.a.attenuate(chain, sub="agent:refund", holder_jwk=world.b.public_jwk,
                              cap=[REFUND_123], ttl=10_000, now=world.now)
    assert leaf(child)["exp"] == NOW + 590
    short = world.a.attenuate(chain, sub="agent:refund", holder_jwk=world.b.public_jwk,
                              cap=[REFUND_123], ttl=60, now=world.now)
    assert leaf(short)["exp"] == NOW + 60


def test_attenuate_never_starts_before_the_parent(world: World) -> None:
    chain = world.issue()  # nbf NOW - 10
    child = world.a.attenuate(chain, sub="agent:refund", holder_jwk=world.b.public_jwk,
                              cap=[REFUND_123], ttl=60, now=NOW - 30)
    assert leaf(child)["nbf"] == NOW - 10
    pop = world.prove(world.b, child, REFUND)
    world.verifier().verify(child, REFUND, pop=pop)


def test_attenuate_records_dpt_aud_and_use(world: World) -> None:
    chain = world.issue()
    child = world.a.attenuate(chain, sub="agent:refund", holder_jwk=world.b.public_jwk,
                              cap=[REFUND_123], ttl=60, dpt=1, aud=[AUD], use=3, now=world.now)
    payload = leaf(child)
    assert (payload["dpt"], payload["aud"], payload["use"]) == (1, [AUD], 3)
    assert "aud" not in leaf(world.a.attenuate(
        chain, sub="agent:refund", holder_jwk=world.b.public_jwk, cap=[REFUND_123], ttl=60,
        now=world.now))


def test_attenuate_gives_each_link_a_fresh_jti(world: World) -> None:
    chain = world.issue()
    jtis = {
        leaf(world.a.attenuate(chain, sub="agent:refund", holder_jwk=world.b.public_jwk,
                               cap=[REFUND_123], ttl=60, now=world.now))["jti"]
        for _ in range(5)
    }
    assert len(jtis) == 5


def test_attenuate_refuses_a_holder_that_is_not_the_leaf(world: World) -> None:
    chain = world.issue()  # leaf key: a
    for holder in (world.b, world.c, world.root):
        with pytest.raises(ValueError, match="leaf"):
            holder.attenuate(chain, sub="agent:x", holder_jwk=world.c.public_jwk,
                             cap=[REFUND_123], ttl=60, now=world.now)


@pytest.mark.parametrize("offset", [0, 1, 1000])
def test_attenuate_refuses_an_expired_parent(world: World, offset: int) -> None:
    chain = world.issue()  # exp NOW + 590
    with pytest.raises(ValueError, match="expired"):
        world.a.attenuate(chain, sub="agent:x", holder_jwk=world.b.public_jwk,
                          cap=[REFUND_123], ttl=60, now=NOW + 590 + offset)


def test_attenuate_just_before_the_parent_exp_works(world: World) -> None:
    chain = world.issue()
    child = world.a.attenuate(chain, sub="agent:x", holder_jwk=world.b.public_jwk,
                              cap=[REFUND_123], ttl=60, now=NOW + 589)
    assert leaf(child)["exp"] == NOW + 590


def test_attenuate_refuses_a_dpt_zero_parent(world: World) -> None:
    chain = world.chain3()  # the leaf has dpt 0
    with pytest.raises(ValueError, match="dpt"):
        world.c.attenuate(chain, sub="agent:x", holder_jwk=world.a.public_jwk,
                          cap=[REFUND_123], ttl=60, dpt=0, now=world.now)


@pytest.mark.parametrize("dpt", [2, 3, 15, -1, 16])
def test_attenuate_refuses_a_dpt_the_parent_does_not_allow(world: World, dpt: int) -> None:
    chain = world.issue(dpt=2)  # a child may have dpt 0 or 1
    with pytest.raises(ValueError, match="dpt"):
        world.a.attenuate(chain, sub="agent:x", holder_jwk=world.b.public_jwk,
                          cap=[REFUND_123], ttl=60, dpt=dpt, now=world.now)


def test_attenuate_allows_the_highest_dpt_the_parent_does(world: World) -> None:
    chain = world.issue(dpt=2)
    child = world.a.attenuate(chain, sub="agent:x", holder_jwk=world.b.public_jwk,
                              cap=[REFUND_123], ttl=60, dpt=1, now=world.now)
    assert leaf(child)["dpt"] == 1


BAD_CAPS: list[tuple[str, Any]] = [
    ("empty", []),
    ("wildcard-middle-double-star", [{"res": "api/**/x", "act": ["post"]}]),
    ("dot-dot-segment", [{"res": "api/../x", "act": ["post"]}]),
    ("empty-segment", [{"res": "api//x", "act": ["post"]}]),
    ("upper-case-action", [{"res": "api/x", "act": ["POST"]}]),
    ("no-actions", [{"res": "api/x", "act": []}]),
    ("star-with-others", [{"res": "api/x", "act": ["*", "get"]}]),
    ("unknown-member", [{"res": "api/x", "act": ["get"], "why": "because"}]),
    ("missing-res", [{"act": ["get"]}]),
    ("unknown-operator", [{"res": "api/x", "act": ["get"], "if": {"n": {"ne": 1}}}]),
    ("float-bound", [{"res": "api/x", "act": ["get"], "if": {"n": {"le": 1.5}}}]),
    ("bool-numeric-bound", [{"res": "api/x", "act": ["get"], "if": {"n": {"lt": True}}}]),
    ("empty-if", [{"res": "api/x", "act": ["get"], "if": {}}]),
    ("too-many", [REFUND_123] * 65),
    ("not-an-object", ["api/x"]),
]


@pytest.mark.parametrize("cap", [c for _, c in BAD_CAPS], ids=[n for n, _ in BAD_CAPS])
def test_attenuate_refuses_a_bad_cap_with_value_error(world: World, cap: Any) -> None:
    chain = world.issue()
    with pytest.raises(ValueError, match="cannot make this link") as info:
        world.a.attenuate(chain, sub="agent:x", holder_jwk=world.b.public_jwk,
                          cap=cap, ttl=60, now=world.now)
    assert not isinstance(info.value, VerificationError)


BAD_JWKS: list[tuple[str, Any]] = [
    ("private-member", "private"),
    ("extra-member", {"kid": "k1"}),
    ("missing-x", {"x": None}),
    ("short-x", {"x": "AAAA"}),
    ("small-order-x", {"x": base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()}),
    ("wrong-crv", {"crv": "X25519"}),
    ("rsa", {"kty": "RSA"}),
    ("padded-x", "padded"),
]


@pytest.mark.parametrize("defect", [d for _, d in BAD_JWKS], ids=[n for n, _ in BAD_JWKS])
def test_attenuate_refuses_a_bad_holder_jwk(world: World, defect: Any) -> None:
    target = Holder.generate()
    if defect == "private":
        jwk: dict[str, Any] = target.private_jwk()
    elif defect == "padded":
        jwk = {**target.public_jwk, "x": target.public_jwk["x"] + "="}
    else:
        jwk = {k: v for k, v in {**target.public_jwk, **defect}.items() if v is not None}
    chain = world.issue()
    with pytest.raises(ValueError, match=r"JWK|key|curve|base64url"):
        world.a.attenuate(chain, sub="agent:x", holder_jwk=jwk, cap=[REFUND_123], ttl=60,
                          now=world.now)


@pytest.mark.parametrize(("name", "value"), [
    ("sub", ""), ("sub", "agent:\x00x"), ("ttl", 0), ("ttl", -5), ("aud", []), ("use", 0),
])
def test_attenuate_refuses_other_bad_arguments(world: World, name: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"sub": "agent:x", "holder_jwk": world.b.public_jwk,
                              "cap": [REFUND_123], "ttl": 60, "now": world.now}
    kwargs[name] = value
    with pytest.raises(ValueError, match=name):
        world.a.attenuate(world.issue(), **kwargs)


def test_attenuate_refuses_a_chain_that_would_exceed_16_links(world: World) -> None:
    """Sixteen tokens whose last one still allows a child (a forged filler chain:
    the holder checks only its own leaf) cannot grow a seventeenth link."""
    child_payload = world.root_payload(prv=link_hash(world.root_link()), dpt=1)
    child = forge({"alg": "EdDSA", "typ": "mandate+jwt", "kid": world.root.thumbprint},
                  child_payload, world.root.sign)
    chain = "~".join([world.root_link()] + [child] * 15)
    with pytest.raises(ValueError, match="17 links"):
        world.a.attenuate(chain, sub="agent:x", holder_jwk=world.b.public_jwk,
                          cap=[REFUND_123], ttl=60, dpt=0, now=world.now)
    fifteen = "~".join([world.root_link()] + [child] * 14)
    assert world.a.attenuate(fifteen, sub="agent:x", holder_jwk=world.b.public_jwk,
                             cap=[REFUND_123], ttl=60, dpt=0, now=world.now).count("~") == 15


def test_attenuate_refuses_what_is_not_a_chain(world: World) -> None:
    for chain in ("", "not.a.chain", world.issue() + "~"):
        with pytest.raises(ValueError, match="not a usable chain"):
            world.a.attenuate(chain, sub="agent:x", holder_jwk=world.b.public_jwk,
                              cap=[REFUND_123], ttl=60, now=world.now)


def test_an_es256_holder_attenuates_and_the_chain_verifies(world: World) -> None:
    chain = world.chain3()
    assert decode_unverified(chain)[2][0]["alg"] == "ES256"  # signed by b, an ES256 key
    pop = world.prove(world.c, chain, REFUND)
    world.verifier().verify(chain, REFUND, pop=pop)


# --- prove -------------------------------------------------------------------------


def test_prove_refuses_a_holder_that_is_not_the_leaf(world: World) -> None:
    chain = world.chain3()
    for holder in (world.a, world.b, world.root):
        with pytest.raises(ValueError, match="leaf"):
            world.prove(holder, chain, REFUND)


def test_prove_refuses_a_request_that_is_not_a_request(world: World) -> None:
    chain = world.chain3()
    with pytest.raises(ValueError, match="Request"):
        world.c.prove(chain, {"res": "api/x", "act": "post"}, aud=AUD)  # type: ignore[arg-type]


@pytest.mark.parametrize("leaf_alg", ["EdDSA", "ES256"])
def test_the_pop_made_verifies_and_says_what_spec_5_says(world: World, leaf_alg: str) -> None:
    holder = world.a if leaf_alg == "EdDSA" else world.b
    chain = world.issue() if leaf_alg == "EdDSA" else "~".join(world.chain3().split("~")[:2])
    pop = holder.prove(chain, REFUND, aud=AUD, now=NOW + 0.9)
    header, payload = claims(pop, 0), claims(pop)
    assert header == {"alg": leaf_alg, "typ": "mandate-pop+jwt"}
    assert payload["ath"] == link_hash(chain.rsplit("~", 1)[-1])
    assert payload["aud"] == AUD
    assert payload["req"] == sha256_b64(canonical_json(REFUND.canonical(AUD)))
    assert payload["iat"] == NOW
    assert set(payload) == {"ath", "aud", "req", "iat", "jti"}
    world.verifier().verify(chain, REFUND, pop=pop)


def test_each_pop_has_a_fresh_jti(world: World) -> None:
    chain = world.chain3()
    assert len({claims(world.prove(world.c, chain, REFUND))["jti"] for _ in range(5)}) == 5


def test_a_pop_for_another_audience_or_request_is_refused(world: World) -> None:
    chain = world.chain3()
    other = Request("api/payments/refunds/o-123", "post", {"amount": 1})
    for pop in (world.prove(world.c, chain, REFUND, aud="other-api"),
                world.prove(world.c, chain, other)):
        with pytest.raises(VerificationError) as info:
            world.verifier().verify(chain, REFUND, pop=pop)
        assert info.value.code == "pop_invalid"


# --- issue_root ---------------------------------------------------------------------


def root_kwargs(world: World) -> dict[str, Any]:
    return {
        "alg": world.root.alg, "kid": ROOT_KID, "sign": world.root.sign,
        "iss": "spiffe://acme.example/orchestrator", "sub": "agent:support",
        "holder_jwk": world.a.public_jwk, "cap": [REFUND_CAP], "ttl": 600, "now": NOW,
    }


def test_issue_root_makes_a_verifying_root(world: World) -> None:
    chain = issue_root(**root_kwargs(world))
    header, payload = decode_unverified(chain)[0]
    assert header == {"alg": "EdDSA", "typ": "mandate+jwt", "kid": ROOT_KID}
    assert (payload["iat"], payload["nbf"], payload["exp"]) == (NOW, NOW, NOW + 600)
    assert "prv" not in payload
    world.verifier().verify(chain, REFUND, pop=world.prove(world.a, chain, REFUND))


ISSUE_ROOT_ERRORS: list[tuple[str, str, Any]] = [
    ("ttl-zero", "ttl", 0),
    ("ttl-string", "ttl", "600"),
    ("ttl-float", "ttl", 60.5),
    ("sub-empty", "sub", ""),
    ("sub-too-long", "sub", "a" * 257),
    ("iss-control", "iss", "orchestrator\x7f"),
    ("cap-empty", "cap", []),
    ("cap-bad-pattern", "cap", [{"res": "**/x", "act": ["get"]}]),
    ("holder-jwk-bad", "holder_jwk", {"kty": "OKP", "crv": "Ed25519", "x": "AA"}),
    ("kid-bad-chars", "kid", "root 1"),
    ("kid-empty", "kid", ""),
    ("dpt-16", "dpt", 16),
    ("dpt-negative", "dpt", -1),
    ("use-zero", "use", 0),
    ("use-too-big", "use", 2**31),
    ("aud-empty", "aud", []),
    ("aud-empty-string", "aud", [""]),
    ("jti-short", "jti", "short"),
    ("jti-bad-chars", "jti", "jti/with/slashes/0123"),
]


@pytest.mark.parametrize(("name", "value"), [(n, v) for _, n, v in ISSUE_ROOT_ERRORS],
                         ids=[i for i, _, _ in ISSUE_ROOT_ERRORS])
def test_issue_root_refuses_bad_input_with_value_error(world: World, name: str,
                                                       value: Any) -> None:
    kwargs = root_kwargs(world)
    kwargs[name] = value
    with pytest.raises(ValueError, match=r"ttl|cannot make this link|JWK") as info:
        issue_root(**kwargs)
    assert not isinstance(info.value, VerificationError)
