"""The attack list: one table row per attack, each with its exact code and link.

Every row also runs untampered (its twin) and must then verify, so a row can
only pass because of the defect it describes. Any exception other than
VerificationError fails the row.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from helpers import (
    AUD,
    NOW,
    REFUND,
    ROOT_KID,
    World,
    b64,
    claims,
    forge,
    header_of,
    jbytes,
    pop_for,
    reforge,
    relink,
    signers,
    unb64,
    use,
)

from verifier_sdk import (
    Decision,
    Holder,
    Request,
    VerificationError,
    decode_unverified,
    make_revocation_list,
)

# Group orders: Ed25519 (L) and P-256 (n).
ED25519_L = 2**252 + 27742317777372353535851937790883648493
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1
ED25519_P = 2**255 - 19

Attempt = Callable[[World, bool], Decision]
Edit = Callable[[World, str], str]


# --- building blocks ---------------------------------------------------------


def all_ed25519(world: World) -> World:
    """The same world with b on Ed25519, so misplaced links fail on kid, not alg."""
    world.b = Holder.generate()
    return world


def raw(index: int, payload: Callable[[bytes], bytes] | None = None,
        header: Callable[[bytes], bytes] | None = None) -> Edit:
    """Re-sign link ``index`` (by its legitimate signer) over edited JSON bytes."""
    def edit(world: World, chain: str) -> str:
        h, p = jbytes(header_of(chain, index)), jbytes(claims(chain, index))
        token = forge(header(h) if header else h, payload(p) if payload else p,
                      signers(world)[index].sign)
        return relink(world, chain, index, token)
    return edit


def replace(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        assert data.count(old) == 1, (old, data)
        return data.replace(old, new)
    return edit


_SCALAR = rb'(?:"[^"]*"|-?\d+|true|false|null)'


def member(name: str, value: bytes) -> Callable[[bytes], bytes]:
    """Set member ``name`` to the raw JSON ``value`` (appended when absent)."""
    def edit(data: bytes) -> bytes:
        key = b'"' + name.encode() + b'":'
        if key not in data:
            assert data.endswith(b"}")
            return data[:-1] + b"," + key + value + b"}"
        out, count = re.subn(re.escape(key) + _SCALAR, lambda _: key + value, data)
        assert count == 1, (name, data)
        return out
    return edit


def tokens_edit(make: Callable[[World, list[str]], list[str]]) -> Edit:
    def edit(world: World, chain: str) -> str:
        return "~".join(make(world, chain.split("~")))
    return edit


def signature_of(token: str) -> bytes:
    return unb64(token.rsplit(".", 1)[1])


def with_signature(token: str, signature: bytes) -> str:
    return token.rsplit(".", 1)[0] + "." + b64(signature)


def es256_twin(signature: bytes) -> bytes:
    """(r, n - s): a second valid ECDSA signature over the same bytes."""
    r, s = signature[:32], int.from_bytes(signature[32:], "big")
    return r + (P256_N - s).to_bytes(32, "big")


def revocations(world: World, revoked: str) -> str:
    return make_revocation_list(
        alg=world.root.alg, kid=ROOT_KID, sign=world.root.sign,
        iss="spiffe://acme.example/revocations", seq=1, iat=NOW - 60, exp=NOW + 3600,
        revoked=[revoked],
    )


# --- attempt factories -------------------------------------------------------


def on_chain3(edit: Edit, *, prepare: Callable[[World], World] | None = None) -> Attempt:
    """chain3 used once with c's PoP; when bad, first tampered by ``edit``."""
    def attempt(world: World, bad: bool) -> Decision:
        if prepare:
            world = prepare(world)
        chain = world.chain3()
        return use(world, edit(world, chain) if bad else chain, holder=world.c)
    return attempt


@dataclass(frozen=True)
class Row:
    id: str
    code: str
    link: int | None
    edit: Edit | None = None  # a chain3 tampering; or else:
    attempt: Attempt | None = None  # a whole scenario

    def run(self, world: World, bad: bool) -> Decision:
        if self.attempt is not None:
            return self.attempt(world, bad)
        assert self.edit is not None
        return on_chain3(self.edit)(world, bad)


# --- header and algorithm attacks --------------------------------------------


def alg_none(index: int) -> Edit:
    def edit(world: World, chain: str) -> str:
        head = {**header_of(chain, index), "alg": "none"}
        return relink(world, chain, index, forge(head, claims(chain, index), None))
    return edit


def hs256(index: int, key: Callable[[World], bytes]) -> Edit:
    """HS256 with an HMAC keyed by public material of the verifying key."""
    def edit(world: World, chain: str) -> str:
        head = b64(jbytes({**header_of(chain, index), "alg": "HS256"}))
        body = chain.split("~")[index].split(".")[1]
        mac = hmac.new(key(world), f"{head}.{body}".encode(), hashlib.sha256).digest()
        return relink(world, chain, index, f"{head}.{body}.{b64(mac)}")
    return edit


def embedded_key(index: int, name: str) -> Edit:
    """Header carries the attacker's own key (or a URL to it) and she signs."""
    def edit(world: World, chain: str) -> str:
        thief = Holder.generate()
        value: Any = {
            "jwk": thief.public_jwk, "jku": "https://evil.example/jwks.json",
            "x5u": "https://evil.example/cert.pem", "x5c": ["MIIB"], "crit": ["exp"],
        }[name]
        head = {**header_of(chain, index), name: value}
        return relink(world, chain, index, forge(head, claims(chain, index), thief.sign))
    return edit


def es256_world_eddsa_header(world: World, bad: bool) -> Decision:
    """A P-256 root key; the attacker labels a link EdDSA."""
    es = World(root=Holder.generate("ES256"), a=world.a, b=world.b, c=world.c)
    chain = es.issue()
    if bad:
        tokens = chain.split("~")
        tokens[0] = forge({"alg": "EdDSA", "typ": "mandate+jwt", "kid": ROOT_KID},
                          claims(chain, 0), es.root.sign)
        chain = "~".join(tokens)
    return use(es, chain, holder=es.a)


HEADER_ROWS = [
    Row("alg-none-root-empty-signature", "unsupported_alg", 0, alg_none(0)),
    Row("alg-none-link1-empty-signature", "unsupported_alg", 1, alg_none(1)),
    Row("HS256-root-hmac-keyed-with-raw-public-key", "unsupported_alg", 0,
        hs256(0, lambda w: unb64(w.root.public_jwk["x"]))),
    Row("HS256-root-hmac-keyed-with-public-jwk-json", "unsupported_alg", 0,
        hs256(0, lambda w: jbytes(w.root.public_jwk))),
    Row("HS256-link1-hmac-keyed-with-parent-cnf-key", "unsupported_alg", 1,
        hs256(1, lambda w: unb64(w.a.public_jwk["x"]))),
    Row("header-jwk-attacker-key-root", "malformed", 0, embedded_key(0, "jwk")),
    Row("header-jwk-attacker-key-link1", "malformed", 1, embedded_key(1, "jwk")),
    Row("header-jku", "malformed", 0, embedded_key(0, "jku")),
    Row("header-x5u", "malformed", 0, embedded_key(0, "x5u")),
    Row("header-x5c", "malformed", 2, embedded_key(2, "x5c")),
    Row("header-crit", "malformed", 1, embedded_key(1, "crit")),
    Row("header-kid-case-folded", "unknown_key", 0,
        lambda w, c: reforge(w, c, 0, header={"kid": "ROOT-1"})),
    Row("header-typ-case-folded", "malformed", 0,
        lambda w, c: reforge(w, c, 0, header={"typ": "Mandate+JWT"})),
    Row("header-typ-application-prefix", "malformed", 0,
        lambda w, c: reforge(w, c, 0, header={"typ": "application/mandate+jwt"})),
    Row("ES256-header-on-Ed25519-root-key", "unsupported_alg", 0,
        lambda w, c: reforge(w, c, 0, header={"alg": "ES256"})),
    Row("EdDSA-header-on-P256-root-key", "unsupported_alg", 0,
        attempt=es256_world_eddsa_header),
    Row("ES256-header-on-Ed25519-cnf-key", "unsupported_alg", 1,
        lambda w, c: reforge(w, c, 1, header={"alg": "ES256"}, sign=w.b.sign)),
    Row("EdDSA-header-on-P256-cnf-key", "unsupported_alg", 2,
        lambda w, c: reforge(w, c, 2, header={"alg": "EdDSA"}, sign=w.c.sign)),
]


# --- base64url: every alternative spelling of link 1's segments ---------------

# A payload that encodes to both "-" and "_": '~' and '?' at every byte offset.
NOISY_AUD = [AUD, "~" * 9 + "?" * 9]


def _padded(data: bytes) -> bytes:
    """JSON plus spaces so its base64url length is 2 mod 4: it has unused bits and a pad."""
    return data + b" " * ((1 - len(data)) % 3)


def _segment_defect(defect: str, seg: str) -> str:
    assert len(seg) % 4 == 2
    if defect == "padding":
        return seg + "=="
    if defect == "std-plus":
        assert "-" in seg
        return seg.replace("-", "+")
    if defect == "std-slash":
        assert "_" in seg
        return seg.replace("_", "/")
    if defect == "trailing-bits":
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        return seg[:-1] + alphabet[alphabet.index(seg[-1]) ^ 1]
    if defect == "inner-space":
        return seg[:8] + " " + seg[8:]
    assert defect == "trailing-newline"
    return seg + "\n"


def spelled(segment: int, defect: str) -> Attempt:
    """Link 1 with one segment spelled otherwise, re-signed over exactly what is sent."""
    def attempt(world: World, bad: bool) -> Decision:
        chain = world.chain3()
        head = b64(_padded(jbytes(header_of(chain, 1))))
        payload = jbytes({**claims(chain, 1), "aud": NOISY_AUD})
        needed = {"std-plus": "-", "std-slash": "_"}.get(defect, "") if segment == 2 else ""
        for spaces in range(0, 300, 3):  # other bytes, until the signature has the char
            body = b64(_padded(payload) + b" " * spaces)
            sig = b64(world.a.sign(f"{head}.{body}".encode()))
            if needed in sig:
                break
        else:
            raise AssertionError("no signature with the needed character")
        if bad:
            parts = [head, body, sig]
            parts[segment] = _segment_defect(defect, parts[segment])
            head, body, sig = parts
            if segment < 2:  # signed over exactly the text sent
                sig = b64(world.a.sign(f"{head}.{body}".encode()))
        chain = relink(world, chain, 1, f"{head}.{body}.{sig}")
        return use(world, chain)
    return attempt


SEGMENTS = {0: "header", 1: "payload", 2: "signature"}
DEFECTS = ["padding", "std-plus", "std-slash", "trailing-bits", "inner-space",
           "trailing-newline"]
BASE64_ROWS = [
    Row(f"base64-{SEGMENTS[seg]}-{defect}", "malformed", 1, attempt=spelled(seg, defect))
    for seg in SEGMENTS for defect in DEFECTS
    # An ASCII header never encodes to "-" or "_": it has no standard-alphabet twin.
    if not (seg == 0 and defect.startswith("std-"))
] + [
    Row("base64-chain-trailing-newline", "malformed", 2, lambda w, c: c + "\n"),
    Row("base64-four-segments", "malformed", 1,
        tokens_edit(lambda w, t: [t[0], t[1] + ".AAAA", t[2]])),
]


# --- JSON --------------------------------------------------------------------

LINK1_IAT, LINK1_EXP = NOW - 5, NOW + 295


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nesting_that_fits(world: World, chain: str) -> str:
    """2,500 levels: enough to overflow a recursive parser, small enough for 8 KiB."""
    out = raw(1, member("aud", deep(2_500)))(world, chain)
    assert len(out.split("~")[1]) <= 8_192
    return out


def deep_pop(depth: int) -> Attempt:
    def attempt(world: World, bad: bool) -> Decision:
        chain = world.chain3()
        if not bad:
            return use(world, chain)
        pop = forge({"alg": "EdDSA", "typ": "mandate-pop+jwt"}, deep(depth), world.c.sign)
        return world.verifier().verify(chain, REFUND, pop=pop)
    return attempt


JSON_ROWS = [
    Row("json-duplicate-top-level-sub", "malformed", 1,
        raw(1, replace(b'"sub":"agent:refund"', b'"sub":"agent:refund","sub":"agent:evil"'))),
    Row("json-duplicate-nested-act", "malformed", 1,
        raw(1, replace(b'"act":["post"]', b'"act":["post"],"act":["*"]'))),
    Row("json-duplicate-nested-cnf-kty", "malformed", 1,
        raw(1, replace(b'"kty":"EC"', b'"kty":"EC","kty":"OKP"'))),
    Row("json-duplicate-header-alg", "malformed", 0,
        raw(0, header=replace(b'"alg":"EdDSA"', b'"alg":"EdDSA","alg":"none"'))),
    Row("json-float-v-1.0", "malformed", 1, raw(1, member("v", b"1.0"))),
    Row("json-exponent-dpt-1e0", "malformed", 1, raw(1, member("dpt", b"1e0"))),
    Row("json-exponent-exp-1e1", "malformed", 1, raw(1, member("exp", b"1e1"))),
    Row("json-float-exp-x.0", "malformed", 1,
        raw(1, member("exp", str(LINK1_EXP).encode() + b".0"))),
    Row("json-leading-zero", "malformed", 1, raw(1, member("dpt", b"01"))),
    Row("json-NaN", "malformed", 1, raw(1, member("iat", b"NaN"))),
    Row("json-Infinity", "malformed", 1, raw(1, member("exp", b"Infinity"))),
    Row("json-minus-Infinity", "malformed", 1, raw(1, member("nbf", b"-Infinity"))),
    Row("json-int-2^53", "malformed", 1, raw(1, member("iat", str(2**53).encode()))),
    Row("json-int-minus-2^53", "malformed", 1, raw(1, member("iat", str(-(2**53)).encode()))),
    Row("json-int-10^400", "malformed", 1, raw(1, member("iat", b"1" + b"0" * 400))),
    Row("json-lone-high-surrogate", "malformed", 1,
        raw(1, member("sub", b'"agent:\\ud800"'))),
    Row("json-lone-low-surrogate", "malformed", 1,
        raw(1, member("sub", b'"agent:\\udc00x"'))),
    Row("json-surrogates-reversed", "malformed", 1,
        raw(1, member("sub", b'"agent:\\udc00\\ud800"'))),
    Row("json-lone-surrogate-in-member-name", "malformed", 1,
        raw(1, member("\\ud800", b"1"))),
    Row("json-surrogate-encoded-as-utf8", "malformed", 1,
        raw(1, member("sub", b'"agent:\xed\xa0\x80"'))),
    Row("json-non-utf8-byte", "malformed", 1, raw(1, member("sub", b'"agent:\xff"'))),
    Row("json-overlong-utf8", "malformed", 1, raw(1, member("sub", b'"agent:\xc0\xaf"'))),
    Row("json-bom-payload", "malformed", 1, raw(1, lambda d: b"\xef\xbb\xbf" + d)),
    Row("json-bom-header", "malformed", 0, raw(0, header=lambda d: b"\xef\xbb\xbf" + d)),
    Row("json-top-level-array", "malformed", 1, raw(1, lambda d: b"[" + d + b"]")),
    Row("json-top-level-string-header", "malformed", 0,
        raw(0, header=lambda d: b'"mandate+jwt"')),
    Row("json-null-optional-aud", "malformed", 1, raw(1, member("aud", b"null"))),
    Row("json-null-optional-use", "malformed", 2, raw(2, member("use", b"null"))),
    Row("json-null-prv", "malformed", 1, raw(1, member("prv", b"null"))),
    Row("json-null-header-kid", "malformed", 0, raw(0, header=member("kid", b"null"))),
    Row("json-bool-v", "malformed", 1, raw(1, member("v", b"true"))),
    Row("json-bool-dpt", "malformed", 1, raw(1, member("dpt", b"true"))),
    Row("json-bool-use", "malformed", 2, raw(2, member("use", b"true"))),
    Row("json-bool-iat", "malformed", 0, raw(0, member("iat", b"false"))),
    Row("json-nesting-9-small-link", "malformed", 1,
        raw(1, member("aud", b'[[[[[[[["x"]]]]]]]]'))),  # the payload object is depth 1
    Row("json-nesting-2500-fits-in-link", "malformed", 1, nesting_that_fits),
    Row("json-nesting-10000-link-is-too-large", "too_large", 1,
        raw(1, member("aud", deep(10_000)))),
    Row("json-nesting-10000-pop-is-too-large", "too_large", None, attempt=deep_pop(10_000)),
    Row("json-nesting-1300-pop-fits", "pop_invalid", None, attempt=deep_pop(1_300)),
]


# --- sizes: limits count bytes, before any parsing -----------------------------


def multibyte_chain(world: World, chain: str) -> str:
    """Under 65,536 characters but over 65,536 UTF-8 bytes; every link under 8 KiB."""
    out = chain + ("~" + "é" * 4_000) * 8
    assert len(out) < 65_536 < len(out.encode())
    return out


def oversize_pop(world: World, bad: bool) -> Decision:
    chain = world.chain3()
    pop = pop_for(world, chain)
    return world.verifier().verify(chain, REFUND, pop=pop + "é" * 2_100 if bad else pop)


SIZE_ROWS = [
    Row("size-17-links", "too_large", None,
        tokens_edit(lambda w, t: t + [t[2]] * 14)),
    Row("size-chain-over-65536-bytes-of-multibyte", "too_large", None, multibyte_chain),
    Row("size-link-over-8192-bytes-of-multibyte", "too_large", 1,
        tokens_edit(lambda w, t: [t[0], "é" * 4_100, t[2]])),
    Row("size-pop-over-4096-bytes-of-multibyte", "too_large", None, attempt=oversize_pop),
]


# --- chain structure ---------------------------------------------------------


def spliced(parts: str) -> Edit:
    """Links from chain3 ("x") and a chain of the same holders under another root ("y")."""
    def edit(world: World, chain: str) -> str:
        other = World(a=world.a, b=world.b, c=world.c)
        y = other.chain3().split("~")
        x = chain.split("~")
        return "~".join((x if p == "x" else y)[i] for i, p in enumerate(parts))
    return edit


def truncated_last(world: World, bad: bool) -> Decision:
    """c drops her own link and proves for b's chain with her key (b's link is the leaf)."""
    chain = world.chain3()
    if bad:
        chain = chain.rsplit("~", 1)[0]
    return use(world, chain, holder=world.c)


STRUCTURE_ROWS = [
    Row("reorder-links-0-2-1", "unsupported_alg", 1,
        tokens_edit(lambda w, t: [t[0], t[2], t[1]])),
    Row("reorder-links-0-2-1-all-ed25519", "broken_chain", 1,
        attempt=on_chain3(tokens_edit(lambda w, t: [t[0], t[2], t[1]]), prepare=all_ed25519)),
    Row("reorder-links-1-0-2", "malformed", 0, tokens_edit(lambda w, t: [t[1], t[0], t[2]])),
    Row("splice-links-1-2-from-another-root", "broken_chain", 1, spliced("xyy")),
    Row("splice-leaf-from-another-chain", "broken_chain", 2, spliced("xxy")),
    Row("splice-root-signed-by-an-untrusted-key", "bad_signature", 0, spliced("yxx")),
    Row("truncate-drop-last-link", "pop_invalid", None, attempt=truncated_last),
    Row("truncate-drop-first-link", "malformed", 0, tokens_edit(lambda w, t: [t[1], t[2]])),
    Row("truncate-drop-middle-link", "unsupported_alg", 1,
        tokens_edit(lambda w, t: [t[0], t[2]])),
    Row("truncate-drop-middle-link-all-ed25519", "broken_chain", 1,
        attempt=on_chain3(tokens_edit(lambda w, t: [t[0], t[2]]), prepare=all_ed25519)),
    Row("widen-exp-resigned-by-holder", "broken_chain", 1,
        lambda w, c: reforge(w, c, 1, exp=NOW + 591)),
    Row("widen-nbf-resigned-by-holder", "broken_chain", 2,
        lambda w, c: reforge(w, c, 2, nbf=NOW - 6)),
    Row("increase-dpt-resigned-by-holder", "depth_exceeded", 1,
        lambda w, c: reforge(w, c, 1, dpt=2)),
    Row("child-signed-by-wrong-key", "bad_signature", 1,
        lambda w, c: reforge(w, c, 1, sign=w.c.sign)),
    Row("child-names-its-own-signer", "broken_chain", 1,
        lambda w, c: reforge(w, c, 1, header={"kid": w.c.thumbprint}, sign=w.c.sign)),
    Row("child-claims-other-issuer", "broken_chain", 1,
        lambda w, c: reforge(w, c, 1, iss="spiffe://acme.example/orchestrator")),
]


# --- cnf keys that must be refused when their link is decoded ----------------


def _ed25519_x(y: int, sign: int = 0) -> str:
    return b64((y | sign << 255).to_bytes(32, "little"))


ORDER8_Y = int.from_bytes(
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"), "little"
)


def _has_x(y: int) -> bool:
    """Whether x² = (y² − 1) / (d·y² + 1) has a root mod p (RFC 8032 §5.1.3)."""
    d = -121665 * pow(121666, -1, ED25519_P) % ED25519_P
    x2 = (y * y - 1) * pow(d * y * y + 1, -1, ED25519_P) % ED25519_P
    return x2 == 0 or pow(x2, (ED25519_P - 1) // 2, ED25519_P) == 1


OFF_CURVE_Y = next(y for y in range(2, 100) if not _has_x(y))
BAD_OKP = {
    "identity": _ed25519_x(1),
    "order-2": _ed25519_x(ED25519_P - 1),
    "order-4": _ed25519_x(0),
    "order-4-sign-bit": _ed25519_x(0, 1),
    "order-8": _ed25519_x(ORDER8_Y),
    "order-8-negated": _ed25519_x(ED25519_P - ORDER8_Y),
    "non-canonical-y-p": _ed25519_x(ED25519_P),
    "non-canonical-identity-y-p+1": _ed25519_x(ED25519_P + 1),
    "identity-with-sign-bit": _ed25519_x(1, 1),
    "off-curve": _ed25519_x(OFF_CURVE_Y),
}


def bad_cnf(index: int, jwk: Callable[[World], dict[str, Any]]) -> Edit:
    def edit(world: World, chain: str) -> str:
        return reforge(world, chain, index, cnf={"jwk": jwk(world)})
    return edit


def _okp(x: str) -> Callable[[World], dict[str, Any]]:
    return lambda w: {"kty": "OKP", "crv": "Ed25519", "x": x}


def _p256(x: int, y: int) -> Callable[[World], dict[str, Any]]:
    return lambda w: {"kty": "EC", "crv": "P-256", "x": b64(x.to_bytes(32, "big")),
                      "y": b64(y.to_bytes(32, "big"))}


CNF_ROWS = [
    Row(f"cnf-ed25519-{name}-link{index}", "malformed", index, bad_cnf(index, _okp(x)))
    for name, x in BAD_OKP.items() for index in (0, 2)
] + [
    Row("cnf-p256-off-curve", "malformed", 0, bad_cnf(0, _p256(1, 1))),
    Row("cnf-p256-coordinate-p", "malformed", 0,
        bad_cnf(0, lambda w: {**w.b.public_jwk, "x": b64(P256_P.to_bytes(32, "big"))})),
    Row("cnf-p256-point-at-infinity", "malformed", 0, bad_cnf(0, _p256(0, 0))),
    Row("cnf-extra-member-alg", "malformed", 1,
        bad_cnf(1, lambda w: {**w.b.public_jwk, "alg": "ES256"})),
    Row("cnf-ed25519-curve-on-ec-key", "malformed", 1,
        bad_cnf(1, lambda w: {**w.b.public_jwk, "crv": "Ed25519"})),
    Row("cnf-x25519-key", "malformed", 2,
        bad_cnf(2, lambda w: {**w.c.public_jwk, "crv": "X25519"})),
]


# --- signature malleability: identifiers come from signed members ------------


def ed25519_s_plus_l(token: str) -> str:
    sig = signature_of(token)
    s = int.from_bytes(sig[32:], "little") + ED25519_L
    return with_signature(token, sig[:32] + s.to_bytes(32, "little"))


def es256_set(r: int | None = None, s: int | None = None) -> Callable[[str], str]:
    def make(token: str) -> str:
        sig = signature_of(token)
        new_r = sig[:32] if r is None else r.to_bytes(32, "big")
        new_s = sig[32:] if s is None else s.to_bytes(32, "big")
        return with_signature(token, new_r + new_s)
    return make


def es256_der(token: str) -> str:
    sig = signature_of(token)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    return with_signature(token, der)


def on_token(index: int, make: Callable[[str], str]) -> Edit:
    return tokens_edit(lambda w, t: [make(x) if i == index else x for i, x in enumerate(t)])


def malleated_leaf_use(world: World, bad: bool) -> Decision:
    """Link 2 (signed by b, P-256) re-sent with (r, n-s): a valid twin, the same use."""
    chain = world.chain3(use=1)
    tokens = chain.split("~")
    tokens[2] = with_signature(tokens[2], es256_twin(signature_of(tokens[2])))
    twin = "~".join(tokens)
    verifier = world.verifier()
    if bad:
        use(world, chain, verifier=verifier)
    return use(world, twin, verifier=verifier)


def malleated_leaf_revoked(world: World, bad: bool) -> Decision:
    chain = world.chain3()
    tokens = chain.split("~")
    tokens[2] = with_signature(tokens[2], es256_twin(signature_of(tokens[2])))
    verifier = world.verifier()
    jti = claims(chain, 2)["jti"] if bad else "unrelated-jti-0000001"
    verifier.update_revocations(revocations(world, jti))
    return use(world, "~".join(tokens), verifier=verifier)


def malleated_pop_replay(world: World, bad: bool) -> Decision:
    """b is the leaf (P-256): the (r, n-s) twin of a PoP is valid, and is the same PoP.

    Good: a fresh verifier accepts the twin. Bad: one that took the original refuses it.
    """
    chain = world.chain3().rsplit("~", 1)[0]
    verifier = world.verifier()
    pop = pop_for(world, chain, world.b)
    if bad:
        use(world, chain, verifier=verifier, pop=pop)
    return use(world, chain, verifier=verifier,
               pop=with_signature(pop, es256_twin(signature_of(pop))))


MALLEABILITY_ROWS = [
    Row("ed25519-root-signature-s-plus-L", "bad_signature", 0, on_token(0, ed25519_s_plus_l)),
    Row("es256-link2-s-zero", "bad_signature", 2, on_token(2, es256_set(s=0))),
    Row("es256-link2-r-zero", "bad_signature", 2, on_token(2, es256_set(r=0))),
    Row("es256-link2-s-equals-n", "bad_signature", 2, on_token(2, es256_set(s=P256_N))),
    Row("es256-link2-der-signature", "bad_signature", 2, on_token(2, es256_der)),
    Row("es256-twin-of-leaf-counts-as-the-same-use", "uses_exhausted", 2,
        attempt=malleated_leaf_use),
    Row("es256-twin-of-leaf-is-still-revoked", "revoked", 2, attempt=malleated_leaf_revoked),
    Row("es256-twin-of-pop-is-a-replay", "replayed", None, attempt=malleated_pop_replay),
]


# --- proof of possession -----------------------------------------------------


def pop_attack(make: Callable[[World, str], str], *, audience: str = AUD,
               req: Request = REFUND, first: bool = False) -> Attempt:
    """chain3 with ``make``'s PoP (bad) or an honest one (good).

    ``first``: the honest PoP is used once before, at its own request and service.
    """
    def attempt(world: World, bad: bool) -> Decision:
        chain = world.chain3()
        if not bad:
            return use(world, chain, req, verifier=world.verifier(audience=audience),
                       pop=pop_for(world, chain, req=req, aud=audience))
        pop = make(world, chain)
        if first:
            world.verifier().verify(chain, REFUND, pop=pop)
        return world.verifier(audience=audience).verify(chain, req, pop=pop)
    return attempt


def replay_same_verifier(world: World, bad: bool) -> Decision:
    chain = world.chain3()
    verifier = world.verifier()
    pop = pop_for(world, chain)
    verifier.verify(chain, REFUND, pop=pop)
    return verifier.verify(chain, REFUND, pop=pop if bad else pop_for(world, chain))


def thief_pop_with_jwk(world: World, chain: str) -> str:
    """The thief's PoP names her own key in the header."""
    thief = Holder.generate()
    payload = json.loads(unb64(pop_for(world, chain, thief).split(".")[1]))
    return forge({"alg": "EdDSA", "typ": "mandate-pop+jwt", "jwk": thief.public_jwk},
                 payload, thief.sign)


BIGGER = Request("api/payments/refunds/o-123", "post", {"amount": 4_000})

POP_ROWS = [
    Row("pop-reused-for-another-request", "pop_invalid", None,
        attempt=pop_attack(pop_for, req=BIGGER, first=True)),
    Row("pop-reused-at-another-audience", "pop_invalid", None,
        attempt=pop_attack(pop_for, audience="ledger-api", first=True)),
    Row("pop-replayed", "replayed", None, attempt=replay_same_verifier),
    Row("stolen-chain-pop-by-thief-key", "pop_invalid", None,
        attempt=pop_attack(lambda w, c: pop_for(w, c, Holder.generate()))),
    Row("stolen-chain-pop-by-non-leaf-holder", "pop_invalid", None,
        attempt=pop_attack(lambda w, c: pop_for(w, c, w.a))),
    Row("pop-alg-none", "pop_invalid", None,
        attempt=pop_attack(lambda w, c: forge(
            {"alg": "none", "typ": "mandate-pop+jwt"},
            json.loads(unb64(pop_for(w, c).split(".")[1])), None))),
    Row("pop-header-jwk-of-thief", "pop_invalid", None,
        attempt=pop_attack(thief_pop_with_jwk)),
]

ROWS = (HEADER_ROWS + BASE64_ROWS + JSON_ROWS + SIZE_ROWS + STRUCTURE_ROWS + CNF_ROWS
        + MALLEABILITY_ROWS + POP_ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_attack_is_refused(world: World, row: Row) -> None:
    with pytest.raises(VerificationError) as info:
        row.run(world, True)
    assert (info.value.code, info.value.link) == (row.code, row.link), repr(info.value)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_honest_twin_verifies(world: World, row: Row) -> None:
    assert isinstance(row.run(world, False), Decision)


DECODE_ROWS = [r for r in ROWS if r.edit and r.code in ("malformed", "too_large")]


@pytest.mark.parametrize("row", DECODE_ROWS, ids=[row.id for row in DECODE_ROWS])
def test_decode_unverified_refuses_alike(world: World, row: Row) -> None:
    """Spec §9: decode_unverified reports steps 1–2 failures as verify does."""
    assert row.edit is not None
    chain = row.edit(world, world.chain3())
    with pytest.raises(VerificationError) as info:
        decode_unverified(chain)
    assert (info.value.code, info.value.link) == (row.code, row.link)


def test_revocation_list_nested_10000_deep_is_malformed(world: World) -> None:
    """Within the 1 MiB list limit, so it reaches the parser: refused, not a RecursionError."""
    token = forge({"alg": "EdDSA", "typ": "mandate-rl+jwt", "kid": ROOT_KID}, deep(10_000),
                  world.root.sign)
    verifier = world.verifier()
    with pytest.raises(VerificationError) as info:
        verifier.update_revocations(token)
    assert (info.value.code, info.value.link) == ("malformed", None)
    assert verifier.revocation_seq is None


def test_deep_revocation_list_does_not_depend_on_the_recursion_limit() -> None:
    """Spec §2: deep nesting is refused cleanly, whatever the host's recursion limit.

    An application may raise sys.setrecursionlimit; a 1 MiB list nested
    200,000 deep must still be `malformed`, not a crash of the process.
    """
    script = textwrap.dedent("""
        import base64, sys
        sys.setrecursionlimit(1_000_000)
        from verifier_sdk import Holder, TrustBundle, VerificationError, Verifier
        def b64(data):
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        root = Holder.generate()
        bundle = TrustBundle.from_jwks(
            {"keys": [{**root.public_jwk, "kid": "root-1", "alg": "EdDSA"}]})
        head = b64(b'{"alg":"EdDSA","typ":"mandate-rl+jwt","kid":"root-1"}')
        body = b64(b"[" * 200_000 + b"]" * 200_000)
        token = head + "." + body + "." + b64(root.sign((head + "." + body).encode()))
        try:
            Verifier(bundle, audience="payments-api").update_revocations(token)
        except VerificationError as exc:
            print(exc.code, exc.link)
    """)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                          text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "malformed None"), done.stderr[-500:]
