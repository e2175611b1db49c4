"""Every error code of spec §8, each produced from a real broken or malicious input.

Each row runs twice: tampered, it must fail with exactly its code, its link and
a message naming that link; untampered (its twin), the same steps must verify.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from helpers import (
    AUD,
    NOW,
    REFUND,
    REFUND_CAP,
    ROOT_KID,
    World,
    b64,
    claims,
    forge,
    jbytes,
    link_hash,
    pop_for,
    reforge,
    relink,
    unb64,
    use,
)

from verifier_sdk import (
    CODES,
    Decision,
    Holder,
    Request,
    TrustBundle,
    VerificationError,
    Verifier,
    make_revocation_list,
    new_jti,
)

# iss → sub of the three links of World.chain3().
L0 = ("spiffe://acme.example/orchestrator", "agent:support")
L1 = ("agent:support", "agent:refund")
L2 = ("agent:refund", "agent:helper")
RL_ISS = "spiffe://acme.example/revocations"

Attempt = Callable[[World, bool], Decision]


# --- building blocks ---------------------------------------------------------


def request_digest(req: Request, aud: str = AUD) -> str:
    """`req` of a PoP, computed from spec §5 rather than by the SDK."""
    canonical = {"act": req.act, "aud": aud, "ctx": dict(req.ctx), "res": req.res}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return b64(hashlib.sha256(text.encode()).digest())


def flip_signature(token: str) -> str:
    """The same link with one signature byte changed (still canonical base64url)."""
    head, payload, sig = token.split(".")
    raw = bytearray(unb64(sig))
    raw[10] ^= 0x01
    return f"{head}.{payload}.{b64(bytes(raw))}"


def revocations(world: World, *, seq: int = 1, revoked: tuple[str, ...] = (),
                iat: int = NOW - 60, exp: int = NOW + 3600) -> str:
    return make_revocation_list(
        alg=world.root.alg, kid=ROOT_KID, sign=world.root.sign, iss=RL_ISS, seq=seq,
        iat=iat, exp=exp, revoked=list(revoked),
    )


def b64_length(n: int) -> int:
    return n // 3 * 4 + (0, 2, 3)[n % 3]


def forge_sized(header: dict[str, Any], payload: dict[str, Any],
                sign: Callable[[bytes], bytes], size: int) -> str:
    """A token of exactly ``size`` bytes: JSON padded with insignificant spaces."""
    h, p = jbytes(header), jbytes(payload)
    for hpad in range(3):
        rest = size - 2 - 86 - b64_length(len(h) + hpad)  # 86: a 64-byte signature
        if rest % 4 == 1 or rest < b64_length(len(p)):
            continue
        n = rest // 4 * 3 + {0: 0, 2: 1, 3: 2}[rest % 4]
        token = forge(h + b" " * hpad, p + b" " * (n - len(p)), sign)
        assert len(token) == size
        return token
    raise AssertionError(f"cannot pad to {size} bytes")


def long_chain(world: World, n: int, sizes: list[int] | None = None) -> str:
    """A chain of n links (root → a → c → a …), each optionally padded to a size."""
    holders = [world.a if i % 2 == 0 else world.c for i in range(n)]
    tokens: list[str] = []
    for i in range(n):
        payload: dict[str, Any] = {
            "v": 1, "iss": f"agent:n{i - 1}" if i else L0[0], "sub": f"agent:n{i}",
            "iat": NOW - 10, "nbf": NOW - 10, "exp": NOW + 600,
            "jti": f"long-chain-jti-{i:04d}", "cnf": {"jwk": holders[i].public_jwk},
            "dpt": max(0, min(15, n - 1 - i)), "cap": [REFUND_CAP],
        }
        if i == 0:
            header = {"alg": world.root.alg, "typ": "mandate+jwt", "kid": ROOT_KID}
            sign = world.root.sign
        else:
            payload["prv"] = link_hash(tokens[-1])
            parent = holders[i - 1]
            header = {"alg": parent.alg, "typ": "mandate+jwt", "kid": parent.thumbprint}
            sign = parent.sign
        if sizes is None:
            tokens.append(forge(header, payload, sign))
        else:
            tokens.append(forge_sized(header, payload, sign, sizes[i]))
    return "~".join(tokens)


def long_chain_holder(world: World, n: int) -> Holder:
    return world.a if (n - 1) % 2 == 0 else world.c


# --- attempt factories -------------------------------------------------------


def on_chain3(edit: Callable[[World, str], str], req: Request = REFUND,
              **settings: Any) -> Attempt:
    """chain3 used once with c's PoP; when bad, tampered by ``edit`` under ``settings``."""
    def attempt(world: World, bad: bool) -> Decision:
        chain = world.chain3()
        if not bad:
            return use(world, chain, req)
        chain = edit(world, chain)
        return use(world, chain, req, verifier=world.verifier(**settings),
                   pop=pop_for(world, chain, world.c, req))
    return attempt


def on_root(bad: dict[str, Any], good: dict[str, Any] | None = None, **settings: Any) -> Attempt:
    """A one-link chain (leaf a) with root claims ``bad`` or ``good``."""
    def attempt(world: World, is_bad: bool) -> Decision:
        chain = world.root_link(**(bad if is_bad else good or {}))
        return use(world, chain, verifier=world.verifier(**settings))
    return attempt


def with_settings(bad: dict[str, Any], good: dict[str, Any]) -> Attempt:
    def attempt(world: World, is_bad: bool) -> Decision:
        chain = world.chain3()
        return use(world, chain, verifier=world.verifier(**(bad if is_bad else good)))
    return attempt


def with_request(bad: Request, good: Request = REFUND,
                 edit: Callable[[World, str], str] | None = None) -> Attempt:
    def attempt(world: World, is_bad: bool) -> Decision:
        chain = world.chain3()
        if edit:
            chain = edit(world, chain)
        return use(world, chain, bad if is_bad else good)
    return attempt


def with_pop(make: Callable[[World, str], str | None]) -> Attempt:
    """chain3 with the PoP ``make`` builds when bad, the leaf's honest PoP when good."""
    def attempt(world: World, bad: bool) -> Decision:
        chain = world.chain3()
        pop = make(world, chain) if bad else pop_for(world, chain)
        return world.verifier().verify(chain, REFUND, pop=pop)
    return attempt


def with_bundle(bad: dict[str, Any], good: dict[str, Any]) -> Attempt:
    """chain3 against a bundle whose root key has the window ``bad`` or ``good``."""
    def attempt(world: World, is_bad: bool) -> Decision:
        bundle = TrustBundle.from_jwks(world.jwks(**(bad if is_bad else good)))
        verifier = Verifier(bundle, audience=AUD, clock=world.clock)
        return use(world, world.chain3(), verifier=verifier)
    return attempt


# --- individual attempts -----------------------------------------------------


def chain_over_64k(world: World, bad: bool) -> Decision:
    """chain3 followed by filler links: 65,537 bytes in all, each link under 8 KiB."""
    chain = world.chain3()
    if not bad:
        return use(world, chain)
    room = 65_537 - len(chain)
    fillers = [room // 8 - 1] * 7
    fillers.append(room - sum(f + 1 for f in fillers) - 1)
    padded = chain + "".join("~" + "A" * f for f in fillers)
    assert len(padded) == 65_537
    assert max(fillers) <= 8_192
    return use(world, padded, pop=pop_for(world, chain))


def seventeen_links(world: World, bad: bool) -> Decision:
    n = 17 if bad else 16
    chain = long_chain(world, n)
    return use(world, chain, pop=pop_for(world, chain, long_chain_holder(world, n)))


def chain_at_65536(world: World, bad: bool) -> Decision:
    """Nine padded links of 65,536 bytes in all (with separators), or one byte more."""
    sizes = [7_281] * 8 + [7_280 + (1 if bad else 0)]
    chain = long_chain(world, 9, sizes)
    assert len(chain) == 65_536 + (1 if bad else 0)
    return use(world, chain, pop=pop_for(world, chain, long_chain_holder(world, 9)))


def link_at_8192(world: World, bad: bool) -> Decision:
    """Link 1 of three padded to exactly 8,192 bytes, or one byte more."""
    chain = long_chain(world, 3, [1_000, 8_192 + (1 if bad else 0), 1_000])
    return use(world, chain, pop=pop_for(world, chain, long_chain_holder(world, 3)))


def link_over_8k(world: World, bad: bool) -> Decision:
    """Link 1 legitimately signed by a, but with enough capabilities to pass 8 KiB."""
    chain = world.chain3()
    if bad:
        caps = [{"res": f"api/payments/refunds/o-123/line-item-{i:03d}", "act": ["post"],
                 "if": {"amount": {"le": 5000}}} for i in range(63)]
        chain = reforge(world, chain, 1, cap=[claims(chain, 1)["cap"][0], *caps])
        assert len(chain.split("~")[1]) > 8_192
    return use(world, chain)


def pop_over_4k(world: World, bad: bool) -> Decision:
    """A PoP signed by the leaf, padded with JSON spaces to 4,097 (or 4,096) bytes."""
    chain = world.chain3()
    payload = {"ath": link_hash(chain.split("~")[2]), "aud": AUD,
               "req": request_digest(REFUND), "iat": NOW, "jti": new_jti()}
    header = {"alg": world.c.alg, "typ": "mandate-pop+jwt"}
    pop = forge_sized(header, payload, world.c.sign, 4_097 if bad else 4_096)
    return world.verifier().verify(chain, REFUND, pop=pop)


def bad_b64_link1(world: World, chain: str) -> str:
    tokens = chain.split("~")
    head, payload, sig = tokens[1].split(".")
    tokens[1] = f"{head}.{payload[:10]}!{payload[11:]}.{sig}"
    return "~".join(tokens)


def bad_json_link0(world: World, chain: str) -> str:
    raw = jbytes(world.root_payload())[:-1]  # the closing brace is missing
    token = forge({"alg": "EdDSA", "typ": "mandate+jwt", "kid": ROOT_KID}, raw, world.root.sign)
    return relink(world, chain, 0, token)


def hs256_link0(world: World, chain: str) -> str:
    """HMAC keyed with the root's public key bytes: the classic alg-confusion forgery."""
    payload = chain.split("~", 1)[0].split(".")[1]
    tampered_head = b64(jbytes({"alg": "HS256", "typ": "mandate+jwt", "kid": ROOT_KID}))
    signing_input = f"{tampered_head}.{payload}".encode()
    key = unb64(world.root.public_jwk["x"])
    mac = hmac.new(key, signing_input, hashlib.sha256).digest()
    return relink(world, chain, 0, f"{tampered_head}.{payload}.{b64(mac)}")


def other_es256_signs_link2(world: World, chain: str) -> str:
    return reforge(world, chain, 2, sign=Holder.generate("ES256").sign)


def edit_after_signing(world: World, chain: str) -> str:
    """Link 1's cap widened without re-signing."""
    tokens = chain.split("~")
    head, _, sig = tokens[1].split(".")
    payload = copy.deepcopy(claims(chain, 1))
    payload["cap"] = [{"res": "api/payments/**", "act": ["*"]}]
    tokens[1] = f"{head}.{b64(jbytes(payload))}.{sig}"
    return "~".join(tokens)


def link2_expired(world: World, bad: bool) -> Decision:
    """Link 2 expires at NOW+119; the clock moves to exactly exp + leeway (or 1 s before)."""
    chain = world.chain3()
    world.now = NOW + 119 + 30 - (0 if bad else 1)
    return use(world, chain)


def link2_not_yet_valid(world: World, bad: bool) -> Decision:
    chain = reforge(world, world.chain3(), 2, nbf=NOW + (31 if bad else 30))
    return use(world, chain)


def revoke(pick: Callable[[str], str]) -> Attempt:
    """chain3 under a list revoking ``pick(chain)`` (or an unrelated jti for the twin)."""
    def attempt(world: World, bad: bool) -> Decision:
        chain = world.chain3()
        verifier = world.verifier()
        verifier.update_revocations(
            revocations(world, revoked=(pick(chain) if bad else "unrelated-jti-0000001",))
        )
        return use(world, chain, verifier=verifier)
    return attempt


def revoked_then_delegated(world: World, bad: bool) -> Decision:
    """Link 1 is revoked; b delegates to c offline afterwards: the new chain is dead too."""
    two = world.chain3().rsplit("~", 1)[0]
    verifier = world.verifier()
    revoked = claims(two, 1)["jti"] if bad else "unrelated-jti-0000001"
    verifier.update_revocations(revocations(world, revoked=(revoked,)))
    chain = world.b.attenuate(two, sub="agent:late", holder_jwk=world.c.public_jwk,
                              cap=[{"res": "api/payments/refunds/o-123", "act": ["post"]}],
                              ttl=60, now=NOW)
    return use(world, chain, verifier=verifier)


def revocations_required(world: World, bad: bool) -> Decision:
    verifier = world.verifier(require_revocations=True)
    if not bad:
        verifier.update_revocations(revocations(world))
    return use(world, world.chain3(), verifier=verifier)


def revocations_past_exp(world: World, bad: bool) -> Decision:
    """The list expired at NOW-30: with leeway 30 it is stale now (at NOW-29 it is not)."""
    verifier = world.verifier()
    exp = NOW - 30 if bad else NOW - 29
    verifier.update_revocations(revocations(world, iat=NOW - 3600, exp=exp))
    return use(world, world.chain3(), verifier=verifier)


def revocations_rollback(world: World, bad: bool) -> Decision:
    verifier = world.verifier()
    verifier.update_revocations(revocations(world, seq=5))
    assert verifier.update_revocations(revocations(world, seq=4 if bad else 6))
    return use(world, world.chain3(), verifier=verifier)


def revocations_same_seq(world: World, bad: bool) -> Decision:
    """Same seq: other content is stale; the same payload re-encoded is a no-op."""
    verifier = world.verifier()
    verifier.update_revocations(revocations(world, seq=5, revoked=("unrelated-jti-0000001",)))
    if bad:
        again = revocations(world, seq=5, revoked=("unrelated-jti-0000002",))
    else:
        payload = {"rev": ["unrelated-jti-0000001"], "exp": NOW + 3600, "iat": NOW - 60,
                   "seq": 5, "iss": RL_ISS, "v": 1}  # other member order, other bytes
        again = forge({"kid": ROOT_KID, "typ": "mandate-rl+jwt", "alg": world.root.alg},
                      payload, world.root.sign)
    assert verifier.update_revocations(again) is False
    return use(world, world.chain3(), verifier=verifier)


def replayed_pop(world: World, bad: bool) -> Decision:
    chain = world.chain3()
    verifier = world.verifier()
    pop = pop_for(world, chain)
    verifier.verify(chain, REFUND, pop=pop)
    return verifier.verify(chain, REFUND, pop=pop if bad else pop_for(world, chain))


def uses(root_use: int | None, leaf_use: int | None, allowed: int) -> Attempt:
    """``allowed`` uses succeed; the bad attempt is one more."""
    def attempt(world: World, bad: bool) -> Decision:
        chain = world.chain3(use=leaf_use)
        if root_use is not None:
            chain = reforge(world, chain, 0, use=root_use)
        verifier = world.verifier()
        decision = None
        for _ in range(allowed + (1 if bad else 0)):
            decision = use(world, chain, verifier=verifier)
        assert decision is not None
        return decision
    return attempt


def shared_pair(use1: int, use2: int, allowed: int) -> Attempt:
    """Links 1 and 2 both signed by a's key with one jti: one (key, jti) pair.

    Root → a; link 1 (signed by a) gives a again; link 2 (signed by a) gives c.
    The pair is counted once per use, against the smaller limit.
    """
    def attempt(world: World, bad: bool) -> Decision:
        root = world.root_link()
        a_head = {"alg": "EdDSA", "typ": "mandate+jwt", "kid": world.a.thumbprint}
        base = {"v": 1, "iat": NOW - 5, "nbf": NOW - 5, "exp": NOW + 300,
                "jti": "shared-jti-00000001", "cap": [REFUND_CAP]}
        one = forge(a_head, {**base, "iss": "agent:support", "sub": "agent:support",
                             "cnf": {"jwk": world.a.public_jwk}, "prv": link_hash(root),
                             "dpt": 1, "use": use1}, world.a.sign)
        two = forge(a_head, {**base, "iss": "agent:support", "sub": "agent:helper",
                             "cnf": {"jwk": world.c.public_jwk}, "prv": link_hash(one),
                             "dpt": 0, "use": use2}, world.a.sign)
        chain = f"{root}~{one}~{two}"
        verifier = world.verifier()
        decision = None
        for _ in range(allowed + (1 if bad else 0)):
            decision = use(world, chain, verifier=verifier, pop=pop_for(world, chain, world.c))
        assert decision is not None
        return decision
    return attempt


def with_root_cap(cap: list[dict[str, Any]]) -> Callable[[World, str], str]:
    def edit(world: World, chain: str) -> str:
        return reforge(world, chain, 0, cap=cap)
    return edit


WIDE_ROOT = with_root_cap([{"res": "api/payments/refunds/*", "act": ["post"],
                            "if": {"amount": {"le": 10_000}}}])


# --- ordering: steps 2–5 for every link before 6–9; lowest link first --------


def expired_and_bad_sig_link1(world: World, bad: bool) -> Decision:
    chain = world.chain3()
    if bad:
        tokens = chain.split("~")
        tokens[1] = flip_signature(tokens[1])
        chain = "~".join(tokens)
        world.now = NOW + 10_000  # every link has expired
    return use(world, chain)


def both(*edits: Callable[[World, str], str]) -> Callable[[World, str], str]:
    def edit(world: World, chain: str) -> str:
        for one in edits:
            chain = one(world, chain)
        return chain
    return edit


def replace_token(index: int, make: Callable[[str], str]) -> Callable[[World, str], str]:
    """Swap link ``index`` for ``make(token)`` without re-signing anything."""
    def edit(world: World, chain: str) -> str:
        tokens = chain.split("~")
        tokens[index] = make(tokens[index])
        return "~".join(tokens)
    return edit


def denied_link1_and_expired_link2(world: World, bad: bool) -> Decision:
    """Link 1 fails step 9 before link 2 reaches step 6."""
    chain = WIDE_ROOT(world, world.chain3())
    req = Request("api/payments/refunds/o-123", "post", {"amount": 6000 if bad else 5000})
    if bad:
        world.now = NOW + 149  # link 2 (exp NOW+119) has expired; links 0 and 1 have not
    return use(world, chain, req)


def revoked_and_later_not_yet_valid(world: World, bad: bool) -> Decision:
    chain = world.chain3()
    verifier = world.verifier()
    if bad:
        verifier.update_revocations(revocations(world, revoked=(claims(chain, 0)["jti"],)))
        chain = reforge(world, chain, 2, nbf=NOW + 100)
    return use(world, chain, verifier=verifier)


def expired_root_and_no_list(world: World, bad: bool) -> Decision:
    """Link 0 fails step 6 before it reaches the list check of step 7."""
    chain = world.root_link(nbf=NOW - 1000, iat=NOW - 1000, exp=(NOW - 30) if bad else NOW + 60)
    verifier = world.verifier(require_revocations=bad)
    return use(world, chain, verifier=verifier)


def no_list_and_link1_audience(world: World, bad: bool) -> Decision:
    """The list check runs when link 0 reaches step 7: before link 1's step 8."""
    chain = reforge(world, world.chain3(), 1, aud=["other-api"] if bad else [AUD])
    return use(world, chain, verifier=world.verifier(require_revocations=bad))


def denied_and_bad_pop(world: World, bad: bool) -> Decision:
    chain = world.chain3()
    req = Request("api/payments/refunds/o-123", "post", {"amount": 5001 if bad else 10})
    pop = pop_for(world, chain, world.a, req) if bad else pop_for(world, chain, req=req)
    return world.verifier().verify(chain, req, pop=pop)


def too_large_pop_and_malformed_root(world: World, bad: bool) -> Decision:
    chain = world.chain3()
    pop = pop_for(world, chain)
    if bad:
        chain = "garbage" + chain
        pop = pop + "A" * 4_096
    return world.verifier().verify(chain, REFUND, pop=pop)


@dataclass(frozen=True)
class Row:
    id: str
    attempt: Attempt
    code: str
    link: int | None
    names: tuple[str, str] | None = None  # the link's iss → sub, when the message names it
    says: tuple[str, ...] = ()  # further text the message must hold


ROWS = [
    # (1) too_large
    Row("too_large-chain-over-65536-bytes", chain_over_64k, "too_large", None),
    Row("too_large-17-links", seventeen_links, "too_large", None),
    Row("too_large-link1-over-8192-bytes", link_over_8k, "too_large", 1),
    Row("too_large-chain-65537-not-65536", chain_at_65536, "too_large", None),
    Row("too_large-link1-8193-not-8192", link_at_8192, "too_large", 1),
    Row("too_large-pop-over-4096-bytes", pop_over_4k, "too_large", None),
    # (2) malformed while decoding
    Row("malformed-bad-base64-link1", on_chain3(bad_b64_link1), "malformed", 1),
    Row("malformed-bad-json-link0", on_chain3(bad_json_link0), "malformed", 0),
    Row("malformed-unknown-member-link2",
        on_chain3(lambda w, c: reforge(w, c, 2, note="hi")), "malformed", 2),
    Row("malformed-child-without-prv",
        on_chain3(lambda w, c: reforge(w, c, 1, drop=("prv",))), "malformed", 1),
    Row("malformed-root-with-prv",
        on_chain3(lambda w, c: reforge(w, c, 0, prv=link_hash("x"))), "malformed", 0),
    Row("malformed-cnf-x-31-bytes-link1",
        on_chain3(lambda w, c: reforge(w, c, 1, cnf={"jwk": {
            "kty": "OKP", "crv": "Ed25519", "x": b64(bytes([9]) * 31)}})),
        "malformed", 1),
    Row("malformed-cnf-with-private-d-link0",
        on_chain3(lambda w, c: reforge(w, c, 0, cnf={"jwk": w.a.private_jwk()})),
        "malformed", 0),
    Row("malformed-nbf-equals-exp-link2",
        on_chain3(lambda w, c: reforge(w, c, 2, nbf=NOW + 119)), "malformed", 2),
    Row("malformed-missing-jti-link0",
        on_chain3(lambda w, c: reforge(w, c, 0, drop=("jti",))), "malformed", 0),
    Row("malformed-typ-JWT-link1",
        on_chain3(lambda w, c: reforge(w, c, 1, header={"typ": "JWT"})), "malformed", 1),
    Row("malformed-v-2-link0", on_chain3(lambda w, c: reforge(w, c, 0, v=2)), "malformed", 0),
    Row("malformed-trailing-tilde", on_chain3(lambda w, c: c + "~"), "malformed", 3),
    Row("malformed-empty-middle-link",
        on_chain3(lambda w, c: c.replace("~", "~~", 1)), "malformed", 1),
    # (6) malformed: lifetime over max_lifetime, found at step 6
    Row("malformed-root-lifetime-86401s",
        on_root({"nbf": NOW - 10, "exp": NOW - 10 + 86_401},
                {"nbf": NOW - 10, "exp": NOW - 10 + 86_400}), "malformed", 0, L0),
    Row("malformed-lifetime-over-max_lifetime-setting",
        with_settings({"max_lifetime": 599}, {"max_lifetime": 600}), "malformed", 0, L0),
    # (2) unsupported_alg
    Row("unsupported_alg-none-empty-signature",
        on_chain3(lambda w, c: relink(w, c, 0, forge(
            {"alg": "none", "typ": "mandate+jwt", "kid": ROOT_KID}, claims(c, 0), None))),
        "unsupported_alg", 0, L0),
    Row("unsupported_alg-HS256-keyed-with-root-public-key",
        on_chain3(hs256_link0), "unsupported_alg", 0, L0),
    Row("unsupported_alg-ES256-header-on-Ed25519-bundle-key",
        on_chain3(lambda w, c: reforge(w, c, 0, header={"alg": "ES256"})),
        "unsupported_alg", 0, L0),
    Row("unsupported_alg-ES256-header-on-Ed25519-parent-cnf",
        on_chain3(lambda w, c: reforge(w, c, 1, header={"alg": "ES256"})),
        "unsupported_alg", 1, L1),
    Row("unsupported_alg-EdDSA-header-on-P256-parent-cnf",
        on_chain3(lambda w, c: reforge(w, c, 2, header={"alg": "EdDSA"}, sign=w.c.sign)),
        "unsupported_alg", 2, L2),
    # (3) unknown_key
    Row("unknown_key-kid-not-in-bundle",
        on_chain3(lambda w, c: reforge(w, c, 0, header={"kid": "root-2"})),
        "unknown_key", 0, L0),
    Row("unknown_key-bundle-key-nbf-after-root-iat",
        with_bundle({"nbf": NOW - 9}, {"nbf": NOW - 10}), "unknown_key", 0, L0),
    Row("unknown_key-bundle-key-exp-before-root-exp",
        with_bundle({"exp": NOW + 589}, {"exp": NOW + 590}), "unknown_key", 0, L0),
    # (3)/(5) broken_chain
    Row("broken_chain-iss-is-not-previous-sub",
        on_chain3(lambda w, c: reforge(w, c, 1, iss="agent:intruder")),
        "broken_chain", 1, ("agent:intruder", "agent:refund")),
    Row("broken_chain-prv-names-link0-not-link1",
        on_chain3(lambda w, c: reforge(w, c, 2, prv=link_hash(c.split("~")[0]))),
        "broken_chain", 2, L2),
    Row("broken_chain-kid-is-not-parent-thumbprint",
        on_chain3(lambda w, c: reforge(w, c, 1, header={"kid": w.c.thumbprint})),
        "broken_chain", 1, L1),
    Row("broken_chain-child-nbf-before-parent",
        on_chain3(lambda w, c: reforge(w, c, 1, nbf=NOW - 11)), "broken_chain", 1, L1),
    Row("broken_chain-child-exp-after-parent",
        on_chain3(lambda w, c: reforge(w, c, 2, exp=NOW + 296)), "broken_chain", 2, L2),
    # (4) bad_signature
    Row("bad_signature-root-byte-flipped",
        on_chain3(replace_token(0, flip_signature)), "bad_signature", 0, L0),
    Row("bad_signature-link2-signed-by-another-P256-key",
        on_chain3(other_es256_signs_link2), "bad_signature", 2, L2),
    Row("bad_signature-link1-payload-edited-after-signing",
        on_chain3(edit_after_signing), "bad_signature", 1, L1),
    # (5) depth_exceeded
    Row("depth_exceeded-link2-dpt-equals-parent",
        on_chain3(lambda w, c: reforge(w, c, 2, dpt=1)), "depth_exceeded", 2, L2),
    Row("depth_exceeded-root-dpt-0-has-a-child",
        on_chain3(lambda w, c: reforge(w, c, 0, dpt=0)), "depth_exceeded", 1, L1),
    # (6) not_yet_valid / expired, leeway 30 s
    Row("not_yet_valid-root-nbf-now+31",
        on_root({"nbf": NOW + 31}, {"nbf": NOW + 30}), "not_yet_valid", 0, L0),
    Row("not_yet_valid-link2-nbf-now+31", link2_not_yet_valid, "not_yet_valid", 2, L2),
    Row("expired-root-exactly-at-exp+leeway",
        on_root({"nbf": NOW - 100, "exp": NOW - 30}, {"nbf": NOW - 100, "exp": NOW - 29}),
        "expired", 0, L0),
    Row("expired-link2-exactly-at-exp+leeway", link2_expired, "expired", 2, L2),
    # (7) revoked / revocation_stale
    Row("revoked-leaf-jti", revoke(lambda c: claims(c, 2)["jti"]), "revoked", 2, L2),
    Row("revoked-root-jti-revokes-the-children",
        revoke(lambda c: claims(c, 0)["jti"]), "revoked", 0, L0),
    Row("revoked-link1-then-delegated-offline", revoked_then_delegated, "revoked", 1, L1),
    Row("revocation_stale-required-but-none", revocations_required, "revocation_stale", None),
    Row("revocation_stale-list-at-exp+leeway", revocations_past_exp, "revocation_stale", None),
    Row("revocation_stale-lower-seq-loaded", revocations_rollback, "revocation_stale", None),
    Row("revocation_stale-same-seq-other-content",
        revocations_same_seq, "revocation_stale", None),
    # (8) audience
    Row("audience-root-aud-elsewhere",
        on_root({"aud": ["other-api"]}, {"aud": ["other-api", AUD]}), "audience", 0, L0),
    Row("audience-link2-aud-elsewhere",
        on_chain3(lambda w, c: reforge(w, c, 2, aud=["other-api"])), "audience", 2, L2),
    # (9) denied, with the nearest capability and the failing constraint
    Row("denied-root-amount-over-limit",
        with_request(Request("api/payments/refunds/o-123", "post", {"amount": 5001}),
                     Request("api/payments/refunds/o-123", "post", {"amount": 5000})),
        "denied", 0, L0,
        ("nearest: api/payments/refunds/* post if amount le 5000",
         "amount le 5000 fails for 5001")),
    Row("denied-link1-narrower-amount",
        with_request(Request("api/payments/refunds/o-123", "post", {"amount": 6000}),
                     Request("api/payments/refunds/o-123", "post", {"amount": 5000}),
                     WIDE_ROOT),
        "denied", 1, L1,
        ("nearest: api/payments/refunds/o-123 post if amount le 5000",
         "amount le 5000 fails for 6000")),
    Row("denied-link1-other-resource",
        with_request(Request("api/payments/refunds/o-124", "post", {"amount": 10})),
        "denied", 1, L1, ("nearest: api/payments/refunds/o-123 post",)),
    Row("denied-root-action-not-allowed",
        with_request(Request("api/payments/refunds/o-123", "get", {"amount": 10})),
        "denied", 0, L0, ("nearest: api/payments/refunds/* post",)),
    Row("denied-root-missing-attribute",
        with_request(Request("api/payments/refunds/o-123", "post")),
        "denied", 0, L0, ("nearest: api/payments/refunds/* post if amount le 5000", "amount")),
    Row("denied-root-bool-is-not-an-int",
        with_request(Request("api/payments/refunds/o-123", "post", {"amount": True}),
                     Request("api/payments/refunds/o-123", "post", {"amount": 1})),
        "denied", 0, L0, ("amount le 5000",)),
    # (10) pop_invalid
    Row("pop_invalid-missing", with_pop(lambda w, c: None), "pop_invalid", None, L2),
    Row("pop_invalid-empty", with_pop(lambda w, c: ""), "pop_invalid", None, L2),
    Row("pop_invalid-malformed", with_pop(lambda w, c: "not.a.pop"), "pop_invalid", None, L2),
    Row("pop_invalid-signed-by-another-key",
        with_pop(lambda w, c: pop_for(w, c, Holder.generate())), "pop_invalid", None, L2),
    Row("pop_invalid-signed-by-non-leaf-holder-a",
        with_pop(lambda w, c: pop_for(w, c, w.a)), "pop_invalid", None, L2),
    Row("pop_invalid-alg-mismatch-P256-holder-b",
        with_pop(lambda w, c: pop_for(w, c, w.b)), "pop_invalid", None, L2),
    Row("pop_invalid-ath-of-link1",
        with_pop(lambda w, c: pop_for(w, c, ath=link_hash(c.split("~")[1]))),
        "pop_invalid", None, L2),
    Row("pop_invalid-aud-other-service",
        with_pop(lambda w, c: pop_for(w, c, aud="other-api")), "pop_invalid", None, L2),
    Row("pop_invalid-req-of-another-request",
        with_pop(lambda w, c: pop_for(
            w, c, req=Request("api/payments/refunds/o-123", "post", {"amount": 1}))),
        "pop_invalid", None, L2),
    Row("pop_invalid-iat-61s-old", with_pop(lambda w, c: pop_for(w, c, iat=NOW - 61)),
        "pop_invalid", None, L2),
    Row("pop_invalid-iat-61s-ahead", with_pop(lambda w, c: pop_for(w, c, iat=NOW + 61)),
        "pop_invalid", None, L2),
    Row("pop_invalid-extra-member",
        with_pop(lambda w, c: forge(
            {"alg": "EdDSA", "typ": "mandate-pop+jwt"},
            {"ath": link_hash(c.split("~")[2]), "aud": AUD, "req": request_digest(REFUND),
             "iat": NOW, "jti": new_jti(), "nonce": "x"}, w.c.sign)),
        "pop_invalid", None, L2),
    Row("pop_invalid-typ-of-a-link",
        with_pop(lambda w, c: forge(
            {"alg": "EdDSA", "typ": "mandate+jwt"},
            {"ath": link_hash(c.split("~")[2]), "aud": AUD, "req": request_digest(REFUND),
             "iat": NOW, "jti": new_jti()}, w.c.sign)),
        "pop_invalid", None, L2),
    # (11) replayed
    Row("replayed-same-pop-twice", replayed_pop, "replayed", None),
    # (12) uses_exhausted: the lowest link whose (key, jti) pair is at its limit
    Row("uses_exhausted-leaf-use-1", uses(None, 1, 1), "uses_exhausted", 2, L2),
    Row("uses_exhausted-root-and-leaf-at-limit", uses(1, 1, 1), "uses_exhausted", 0, L0),
    Row("uses_exhausted-leaf-at-limit-root-not", uses(5, 2, 2), "uses_exhausted", 2, L2),
    Row("uses_exhausted-shared-pair-smaller-use", shared_pair(3, 1, 1), "uses_exhausted", 1,
        ("agent:support", "agent:support")),
    Row("uses_exhausted-shared-pair-counted-once", shared_pair(2, 2, 2), "uses_exhausted", 1,
        ("agent:support", "agent:support")),
    # ordering: steps 2–5 for all links before 6–9; within 6–9, link by link
    Row("order-expired-chain-bad-signature-link1", expired_and_bad_sig_link1,
        "bad_signature", 1, L1),
    Row("order-broken-link1-before-malformed-link2",
        on_chain3(both(lambda w, c: reforge(w, c, 1, iss="agent:intruder"),
                       replace_token(2, lambda t: t[:-3]))),
        "broken_chain", 1, ("agent:intruder", "agent:refund")),
    Row("order-too_large-link2-before-malformed-link0",
        on_chain3(both(replace_token(0, lambda t: "x" + t),
                       replace_token(2, lambda t: t + "A" * 8_192))),
        "too_large", 2),
    Row("order-too_large-pop-before-malformed-link0", too_large_pop_and_malformed_root,
        "too_large", None),
    Row("order-bad-signature-link2-before-lifetime-link0",
        on_chain3(replace_token(2, flip_signature), max_lifetime=599), "bad_signature", 2, L2),
    Row("order-denied-link1-before-expired-link2", denied_link1_and_expired_link2,
        "denied", 1, L1),
    Row("order-revoked-link0-before-not_yet_valid-link2", revoked_and_later_not_yet_valid,
        "revoked", 0, L0),
    Row("order-expired-link0-before-missing-list", expired_root_and_no_list, "expired", 0, L0),
    Row("order-missing-list-before-audience-link1", no_list_and_link1_audience,
        "revocation_stale", None),
    Row("order-denied-before-pop", denied_and_bad_pop, "denied", 0, L0),
    Row("order-lowest-of-two-bad-signatures",
        on_chain3(both(replace_token(2, flip_signature), replace_token(1, flip_signature))),
        "bad_signature", 1, L1),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_tampered_input_fails_with_its_code(world: World, row: Row) -> None:
    with pytest.raises(VerificationError) as info:
        row.attempt(world, True)
    err = info.value
    assert (err.code, err.link) == (row.code, row.link), repr(err)
    if row.names:
        assert f"{row.names[0]} → {row.names[1]}" in str(err)
    for text in row.says:
        assert text in str(err)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_untampered_twin_verifies(world: World, row: Row) -> None:
    assert isinstance(row.attempt(world, False), Decision)


def test_every_code_has_a_row() -> None:
    assert {row.code for row in ROWS} == CODES


def test_replay_record_stands_after_uses_exhausted(world: World) -> None:
    """Step 11 records the PoP before step 12 refuses: the same PoP cannot retry."""
    chain = world.chain3(use=1)
    verifier = world.verifier()
    use(world, chain, verifier=verifier)
    pop = pop_for(world, chain)
    with pytest.raises(VerificationError) as first:
        verifier.verify(chain, REFUND, pop=pop)
    assert (first.value.code, first.value.link) == ("uses_exhausted", 2)
    with pytest.raises(VerificationError) as again:
        verifier.verify(chain, REFUND, pop=pop)
    assert (again.value.code, again.value.link) == ("replayed", None)


def test_use_counting_is_all_or_nothing(world: World) -> None:
    """A refused use spends no counter: the root (use 2) still serves a second branch."""
    root = world.issue(use=2)
    verifier = world.verifier()

    def branch(name: str) -> str:
        return world.a.attenuate(root, sub=name, holder_jwk=world.c.public_jwk,
                                 cap=[{"res": "api/payments/refunds/o-123", "act": ["post"]}],
                                 ttl=60, use=1, now=NOW - 1)

    first = branch("agent:first")
    pop = pop_for(world, first, world.c)
    verifier.verify(first, REFUND, pop=pop)  # root 1/2, first leaf 1/1
    with pytest.raises(VerificationError) as info:
        verifier.verify(first, REFUND, pop=pop_for(world, first, world.c))
    assert (info.value.code, info.value.link) == ("uses_exhausted", 1)
    second = branch("agent:second")
    verifier.verify(second, REFUND, pop=pop_for(world, second, world.c))  # root 2/2
    third = branch("agent:third")
    with pytest.raises(VerificationError) as info:
        verifier.verify(third, REFUND, pop=pop_for(world, third, world.c))
    assert (info.value.code, info.value.link) == ("uses_exhausted", 0)


def test_refused_pop_is_not_recorded(world: World) -> None:
    """Replay records happen after steps 1–10 pass; a PoP refused there stays usable."""
    chain = world.chain3()
    other = Request("api/payments/refunds/o-123", "post", {"amount": 10})
    pop = pop_for(world, chain, req=other)
    verifier = world.verifier()
    with pytest.raises(VerificationError) as info:
        verifier.verify(chain, REFUND, pop=pop)
    assert info.value.code == "pop_invalid"
    assert verifier.verify(chain, other, pop=pop).subject == "agent:helper"


@pytest.mark.parametrize("stale", ["lower-seq", "same-seq-other-content"])
def test_failed_revocation_load_keeps_the_held_list(world: World, stale: str) -> None:
    chain = world.chain3()
    leaf_jti = claims(chain, 2)["jti"]
    verifier = world.verifier()
    verifier.update_revocations(revocations(world, seq=5, revoked=(leaf_jti,)))
    newer = revocations(world, seq=4) if stale == "lower-seq" else revocations(world, seq=5)
    with pytest.raises(VerificationError) as info:
        verifier.update_revocations(newer)
    assert (info.value.code, info.value.link) == ("revocation_stale", None)
    assert verifier.revocation_seq == 5
    with pytest.raises(VerificationError) as info:
        use(world, chain, verifier=verifier)
    assert (info.value.code, info.value.link) == ("revoked", 2)


def _list_by(world: World, *, header: dict[str, Any] | None = None,
             sign: Callable[[bytes], bytes] | None = None, **changes: Any) -> str:
    payload: dict[str, Any] = {"v": 1, "iss": RL_ISS, "seq": 1, "iat": NOW - 60,
                               "exp": NOW + 3600, "rev": []}
    payload.update(changes)
    head = {"alg": world.root.alg, "typ": "mandate-rl+jwt", "kid": ROOT_KID, **(header or {})}
    return forge(head, payload, sign or world.root.sign)


LIST_ROWS: list[tuple[str, Callable[[World], str], dict[str, Any], str]] = [
    ("bad_signature-signed-by-a-holder", lambda w: _list_by(w, sign=w.a.sign), {},
     "bad_signature"),
    ("unknown_key-kid-not-in-bundle", lambda w: _list_by(w, header={"kid": "root-2"}), {},
     "unknown_key"),
    ("unknown_key-list-exp-after-key-exp", _list_by, {"exp": NOW + 3599},
     "unknown_key"),
    ("unknown_key-list-iat-before-key-nbf", _list_by, {"nbf": NOW - 59},
     "unknown_key"),
    ("unsupported_alg-ES256-on-Ed25519-key",
     lambda w: _list_by(w, header={"alg": "ES256"}), {}, "unsupported_alg"),
    ("unsupported_alg-none", lambda w: _list_by(w, header={"alg": "none"}), {},
     "unsupported_alg"),
    ("malformed-typ-of-a-link", lambda w: _list_by(w, header={"typ": "mandate+jwt"}), {},
     "malformed"),
    ("malformed-rev-entry-not-a-jti", lambda w: _list_by(w, rev=["short"]), {}, "malformed"),
    ("too_large-over-1MiB",
     lambda w: _list_by(w, rev=[f"revoked-jti-{i:010d}" for i in range(40_000)]), {},
     "too_large"),
]


@pytest.mark.parametrize(("make", "window", "code"), [row[1:] for row in LIST_ROWS],
                         ids=[row[0] for row in LIST_ROWS])
def test_bad_revocation_list_is_refused(world: World, make: Callable[[World], str],
                                        window: dict[str, Any], code: str) -> None:
    verifier = Verifier(TrustBundle.from_jwks(world.jwks(**window)), audience=AUD,
                        clock=world.clock)
    with pytest.raises(VerificationError) as info:
        verifier.update_revocations(make(world))
    assert (info.value.code, info.value.link) == (code, None)
    assert verifier.revocation_seq is None


@pytest.mark.parametrize("window", [{}, {"exp": NOW + 3600, "nbf": NOW - 60}],
                         ids=["no-key-window", "list-exactly-inside-key-window"])
def test_good_revocation_list_loads(world: World, window: dict[str, Any]) -> None:
    verifier = Verifier(TrustBundle.from_jwks(world.jwks(**window)), audience=AUD,
                        clock=world.clock)
    assert verifier.update_revocations(_list_by(world)) is True
    assert verifier.revocation_seq == 1
