"""Generate the golden test vectors in tests/vectors/ (Mandate v1).

Every key comes from a fixed seed, every time from one fixed clock and every
``jti`` is written out here, so two runs produce byte-identical files (Ed25519
is deterministic and the SDK signs ES256 with RFC 6979 nonces).

Each case states its expected outcome in this file, from the spec, without
asking the SDK. The script then runs every case through the SDK and stops
with an error if any outcome differs, so a vector file is never written with
an expectation the reference implementation does not meet.

Usage: gen_vectors.py [--out DIR]   (default: tests/vectors next to this script)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from verifier_sdk import CODES, Request, TrustBundle, VerificationError, Verifier
from verifier_sdk._keys import PrivateKey

NOW = 1_800_000_000  # the fixed clock: 2027-01-15T08:00:00Z
AUD = "payments-api"
LEEWAY = 30
POP_WINDOW = 60
MAX_LIFETIME = 86_400
ORCH = "spiffe://acme.example/orchestrator/support"
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ED25519_L = 2**252 + 27742317777372353535851937790883648493
LINK_TYP = "mandate+jwt"
POP_TYP = "mandate-pop+jwt"
RL_TYP = "mandate-rl+jwt"
DROP = object()  # in a ``changes`` mapping: remove the member

Text = Callable[[str], str]


class VectorError(Exception):
    """The generator's own expectation and the SDK disagree, or a recipe is wrong."""


# --- encoding, independent of the SDK ---------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def h(text: str) -> str:
    """``H(x)`` of the spec for a token or canonical text."""
    return b64(hashlib.sha256(text.encode("utf-8")).digest())


def swap(old: str, new: str) -> Text:
    """A text edit that must apply exactly once (a recipe that misses fails loudly)."""

    def edit(text: str) -> str:
        if text.count(old) != 1:
            raise VectorError(f"edit {old!r} -> {new!r} matches {text.count(old)} times")
        return text.replace(old, new)

    return edit


# --- keys ---------------------------------------------------------------------------


class Key:
    """A fixed key: the seed is SHA-256 of ``"mandate-v1 test vector key: " + name``."""

    def __init__(self, name: str, alg: str) -> None:
        seed = hashlib.sha256(f"mandate-v1 test vector key: {name}".encode()).digest()
        if alg == "EdDSA":
            private: Any = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        else:
            scalar = int.from_bytes(seed, "big") % (P256_N - 1) + 1
            private = ec.derive_private_key(scalar, ec.SECP256R1())
        self.name = name
        self.raw = private
        self.private = PrivateKey(private)
        self.alg = alg
        self.jwk: dict[str, str] = dict(sorted(self.private.public_key.jwk.items()))
        self.thumbprint = h(canon(self.jwk))  # RFC 7638: required members only

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


ROOT_ED = Key("root-ed", "EdDSA")
ROOT_ES = Key("root-es", "ES256")
ROOT_NEXT = Key("root-next", "EdDSA")
ROGUE = Key("rogue", "EdDSA")
ALICE = Key("alice", "EdDSA")
BOB = Key("bob", "ES256")
CAROL = Key("carol", "EdDSA")
DAVE = Key("dave", "ES256")
ERIN = Key("erin", "EdDSA")
MALLORY = Key("mallory", "EdDSA")
ALL_KEYS = (ROOT_ED, ROOT_ES, ROOT_NEXT, ROGUE, ALICE, BOB, CAROL, DAVE, ERIN, MALLORY)

KID_ED = "root-ed-2027"
KID_ES = "root-es-2027"
KID_NEXT = "root-ed-2028"
NEXT_NBF = NOW - 3_600
NEXT_EXP = NOW + 7_200


def bundle_entry(key: Key, kid: str, **extra: Any) -> dict[str, Any]:
    return {**key.jwk, "kid": kid, "alg": key.alg, "use": "sig", **extra}


BUNDLE: dict[str, Any] = {
    "keys": [
        bundle_entry(ROOT_ED, KID_ED),
        bundle_entry(ROOT_ES, KID_ES),
        bundle_entry(ROOT_NEXT, KID_NEXT, nbf=NEXT_NBF, exp=NEXT_EXP),
    ]
}


# --- tokens ---------------------------------------------------------------------------


def apply(obj: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(obj)
    for name, value in changes.items():
        if value is DROP:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def jws(header: dict[str, Any], payload: dict[str, Any], signer: Key | None, *,
        header_text: Text | None = None, payload_text: Text | None = None,
        signature: Callable[[bytes], bytes] | None = None, edit: Text | None = None) -> str:
    """A compact JWS; the ``*_text`` edits work on the JSON text before encoding."""
    htext, ptext = canon(header), canon(payload)
    if header_text:
        htext = header_text(htext)
    if payload_text:
        ptext = payload_text(ptext)
    signing_input = b64(htext.encode("utf-8")) + "." + b64(ptext.encode("utf-8"))
    if signature is not None:
        sig = signature(signing_input.encode("ascii"))
    else:
        assert signer is not None
        sig = signer.sign(signing_input.encode("ascii"))
    token = signing_input + "." + b64(sig)
    return edit(token) if edit else token


def jti(name: str) -> str:
    """A readable fixed jti: 16..64 base64url characters."""
    text = "v1-" + name
    return text + "_" * max(0, 16 - len(text))


@dataclass
class Spec:
    """One link to build; iss, prv, the signer and the header follow from the chain."""

    sub: str
    holder: Key
    cap: list[dict[str, Any]]
    jti: str
    dpt: int = 0
    nbf: int = NOW - 60
    exp: int = NOW + 3_600
    iat: int | None = None  # default: nbf
    aud: list[str] | None = None
    use: int | None = None
    changes: dict[str, Any] = field(default_factory=dict)  # payload members, DROP removes
    header: dict[str, Any] = field(default_factory=dict)  # header members, DROP removes
    signer: Key | None = None  # sign with this key instead (the header is unchanged)
    header_text: Text | None = None
    payload_text: Text | None = None
    signature: Callable[[bytes], bytes] | None = None
    edit: Text | None = None  # the token text after signing


@dataclass
class Chain:
    kid: str
    tokens: list[str]
    claims: list[dict[str, Any]]
    holders: list[Key]

    @property
    def text(self) -> str:
        return "~".join(self.tokens)

    @property
    def leaf(self) -> str:
        return self.tokens[-1]

    @property
    def holder(self) -> Key:
        return self.holders[-1]

    def decision(self) -> dict[str, Any]:
        return {"decision": {
            "principals": [self.claims[0]["iss"]] + [c["sub"] for c in self.claims],
            "subject": self.claims[-1]["sub"],
            "jtis": [c["jti"] for c in self.claims],
            "kid": self.kid,
            "expires_at": min(c["exp"] for c in self.claims),
        }}


def build(root: Key, kid: str, specs: list[Spec], *, iss: str = ORCH) -> Chain:
    tokens: list[str] = []
    claims: list[dict[str, Any]] = []
    for i, s in enumerate(specs):
        if i == 0:
            signer, issuer = root, iss
            header: dict[str, Any] = {"alg": root.alg, "typ": LINK_TYP, "kid": kid}
        else:
            signer, issuer = specs[i - 1].holder, specs[i - 1].sub
            header = {"alg": signer.alg, "typ": LINK_TYP, "kid": signer.thumbprint}
        payload: dict[str, Any] = {
            "v": 1, "iss": issuer, "sub": s.sub, "iat": s.nbf if s.iat is None else s.iat,
            "nbf": s.nbf, "exp": s.exp, "jti": s.jti, "cnf": {"jwk": s.holder.jwk},
            "dpt": s.dpt, "cap": s.cap,
        }
        if s.aud is not None:
            payload["aud"] = s.aud
        if s.use is not None:
            payload["use"] = s.use
        if i:
            payload["prv"] = h(tokens[-1])
        payload = apply(payload, s.changes)
        token = jws(apply(header, s.header), payload, s.signer or signer,
                    header_text=s.header_text, payload_text=s.payload_text,
                    signature=s.signature, edit=s.edit)
        tokens.append(token)
        claims.append(payload)
    return Chain(kid, tokens, claims, [s.holder for s in specs])


def req_hash(request: dict[str, Any], aud: str = AUD) -> str:
    return h(canon({"act": request["act"], "aud": aud, "ctx": request.get("ctx", {}),
                    "res": request["res"]}))


def pop(holder: Key, leaf: str, request: dict[str, Any], *, name: str, iat: int = NOW,
        aud: str = AUD, changes: dict[str, Any] | None = None,
        header: dict[str, Any] | None = None, signer: Key | None = None,
        payload_text: Text | None = None, signature: Callable[[bytes], bytes] | None = None,
        edit: Text | None = None) -> str:
    payload = {"ath": h(leaf), "aud": aud, "req": req_hash(request, aud), "iat": iat,
               "jti": jti("pop-" + name)}
    return jws(apply({"alg": holder.alg, "typ": POP_TYP}, header or {}),
               apply(payload, changes or {}), signer or holder,
               payload_text=payload_text, signature=signature, edit=edit)


def rl(seq: int, rev: list[str], *, key: Key = ROOT_ED, kid: str = KID_ED,
       iat: int = NOW - 120, exp: int = NOW + 3_600, iss: str = ORCH,
       header: dict[str, Any] | None = None, changes: dict[str, Any] | None = None,
       header_text: Text | None = None, payload_text: Text | None = None,
       signature: Callable[[bytes], bytes] | None = None, edit: Text | None = None) -> str:
    payload = {"v": 1, "iss": iss, "seq": seq, "iat": iat, "exp": exp, "rev": rev}
    return jws(apply({"alg": key.alg, "typ": RL_TYP, "kid": kid}, header or {}),
               apply(payload, changes or {}), key, header_text=header_text,
               payload_text=payload_text, signature=signature, edit=edit)


# --- signature and base64 tampering -----------------------------------------------------


def es256_high_s(token: str) -> str:
    """The same ES256 token with s replaced by n - s: still a valid signature."""
    head, sig = token.rsplit(".", 1)
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    s = int.from_bytes(raw[32:], "big")
    return head + "." + b64(raw[:32] + (P256_N - s).to_bytes(32, "big"))


def ed25519_s_plus_l(token: str) -> str:
    head, sig = token.rsplit(".", 1)
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    s = int.from_bytes(raw[32:], "little") + ED25519_L
    return head + "." + b64(raw[:32] + s.to_bytes(32, "little"))


def flip_signature_bit(token: str) -> str:
    head, sig = token.rsplit(".", 1)
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[10] ^= 0x01
    return head + "." + b64(bytes(raw))


def base64_twin(token: str) -> str:
    """Set an unused trailing bit in the signature segment: same bytes, other text."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    head, sig = token.rsplit(".", 1)
    if len(sig) % 4 != 2:
        raise VectorError("signature segment has no unused trailing bits")
    last = alphabet.index(sig[-1])
    return head + "." + sig[:-1] + alphabet[last | 0x01]


def standard_alphabet(token: str) -> str:
    """Write one ``-`` or ``_`` of the signature in the standard alphabet (``+``, ``/``)."""
    head, sig = token.rsplit(".", 1)
    for i, ch in enumerate(sig):
        if ch in "-_":
            return head + "." + sig[:i] + {"-": "+", "_": "/"}[ch] + sig[i + 1:]
    raise VectorError("no '-' or '_' in the signature segment")


def padded(token: str) -> str:
    return token + "=" * (-len(token.rsplit(".", 1)[1]) % 4)


def replace_payload(token: str, other: str) -> str:
    """``token``'s header and signature around ``other``'s payload segment."""
    head, _, sig = token.split(".")
    return head + "." + other.split(".")[1] + "." + sig


def reversed_members(text: str) -> str:
    """The same JSON object with its top-level members reversed and spaced out."""
    return json.dumps(dict(reversed(list(json.loads(text).items()))), indent=1)


def small_order_jwk() -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": b64(b"\x01" + bytes(31))}  # the identity


# --- requests and capabilities ------------------------------------------------------------

REFUND_CAP = {"res": "api/payments/refunds/*", "act": ["post"], "if": {"amount": {"le": 5000}}}
ORDERS_CAP = {"res": "db/orders/**", "act": ["select"], "if": {"customer": {"eq": 42}}}
O123_CAP = {"res": "api/payments/refunds/o-123", "act": ["post"],
            "if": {"amount": {"le": 5000}}}
O123_POST = {"res": "api/payments/refunds/o-123", "act": ["post"]}
REFUND: dict[str, Any] = {"res": "api/payments/refunds/o-123", "act": "post",
                          "ctx": {"amount": 4999}}
ORDERS: dict[str, Any] = {"res": "db/orders/42/lines", "act": "select",
                          "ctx": {"customer": 42}}


def one(holder: Key = ALICE, *, name: str, **kw: Any) -> list[Spec]:
    """A root link for ``agent:support`` allowing refunds and order reads."""
    kw.setdefault("cap", [REFUND_CAP, ORDERS_CAP])
    kw.setdefault("dpt", 2)
    return [Spec(sub="agent:support", holder=holder, jti=jti(name), **kw)]


def three(name: str, **over: dict[str, Any]) -> list[Spec]:
    """root → alice (EdDSA) → bob (ES256) → carol (EdDSA); ``l0=``.. ``l2=`` change a link."""
    specs = [
        Spec(sub="agent:support", holder=ALICE, cap=[REFUND_CAP, ORDERS_CAP],
             jti=jti(name + "-0"), dpt=2),
        Spec(sub="agent:refund-7", holder=BOB, cap=[O123_CAP], jti=jti(name + "-1"), dpt=1,
             nbf=NOW - 30, exp=NOW + 1_800),
        Spec(sub="agent:helper", holder=CAROL, cap=[O123_POST], jti=jti(name + "-2"),
             nbf=NOW - 10, exp=NOW + 600),
    ]
    for key, changes in over.items():
        index = int(key[1:])
        specs[index] = replace(specs[index], **changes)
    return specs


def chain3(name: str, **over: dict[str, Any]) -> Chain:
    return build(ROOT_ED, KID_ED, three(name, **over))


def chain1(name: str, **kw: Any) -> Chain:
    return build(ROOT_ED, KID_ED, one(name=name, **kw))


# --- cases ---------------------------------------------------------------------------------


def ok(chain: Chain) -> dict[str, Any]:
    return chain.decision()


def err(code: str, link: int | None = None) -> dict[str, Any]:
    if code not in CODES:
        raise VectorError(f"not a spec code: {code}")
    return {"error": {"code": code, "link": link}}


def verify(chain: str, request: dict[str, Any], pop_token: str | None,
           expected: dict[str, Any], *, now: int | None = None) -> dict[str, Any]:
    step: dict[str, Any] = {"op": "verify"}
    if now is not None:
        step["now"] = now
    step.update({"chain": chain, "request": request, "pop": pop_token, "expected": expected})
    return step


def load(token: str, expected: dict[str, Any]) -> dict[str, Any]:
    return {"op": "update_revocations", "token": token, "expected": expected}


REPLACED = {"replaced": True}
UNCHANGED = {"replaced": False}
INVALID_REQUEST = {"invalid_request": True}


class AutoPop:
    """Marks "make the correct PoP for this chain and request"."""


AUTO_POP = AutoPop()


class Group:
    def __init__(self, name: str, description: str) -> None:
        self.name = name
        self.description = description
        self.cases: list[dict[str, Any]] = []

    def add(self, case_id: str, description: str, steps: list[dict[str, Any]], *,
            bundle: dict[str, Any] | None = None, **settings: Any) -> None:
        full = {"audience": AUD, "leeway": LEEWAY, "pop_window": POP_WINDOW,
                "max_lifetime": MAX_LIFETIME, "now": NOW, "require_revocations": False}
        unknown = settings.keys() - full.keys()
        if unknown:
            raise VectorError(f"{case_id}: unknown settings {sorted(unknown)}")
        full.update(settings)
        self.cases.append({"id": case_id, "description": description,
                           "bundle": BUNDLE if bundle is None else bundle,
                           "settings": full, "steps": steps})

    def simple(self, case_id: str, description: str, chain: Chain | str,
               expected: dict[str, Any], *, request: dict[str, Any] = REFUND,
               pop_token: str | AutoPop | None = AUTO_POP, **settings: Any) -> None:
        """One verification; by default with a correct PoP by the leaf holder."""
        text = chain.text if isinstance(chain, Chain) else chain
        if isinstance(pop_token, AutoPop):
            assert isinstance(chain, Chain)
            pop_token = pop(chain.holder, chain.leaf, request, name=case_id,
                            iat=settings.get("now", NOW))
        self.add(case_id, description, [verify(text, request, pop_token, expected)], **settings)


def valid_group() -> Group:
    g = Group("valid", "Chains a conforming verifier accepts, with the exact decision.")
    c = build(ROOT_ED, KID_ED, one(name="valid-1-ed"))
    g.simple("one-link-eddsa", "A root link (EdDSA root key, EdDSA holder) used by its holder.",
             c, ok(c))
    c = build(ROOT_ES, KID_ES, one(BOB, name="valid-1-es"))
    g.simple("one-link-es256", "A root link signed by the P-256 root key for an ES256 holder.",
             c, ok(c))
    c = chain3("valid-3")
    g.simple("three-links-mixed", "root (EdDSA) → alice (EdDSA) → bob (ES256) → carol (EdDSA); "
             "each link narrows the one before.", c, ok(c))
    c = build(ROOT_ES, KID_ES, [
        Spec(sub="agent:support", holder=ALICE, cap=[REFUND_CAP, ORDERS_CAP],
             jti=jti("valid-5-0"), dpt=4),
        Spec(sub="agent:refund-7", holder=BOB, cap=[REFUND_CAP], jti=jti("valid-5-1"), dpt=3,
             nbf=NOW - 50, exp=NOW + 3_000),
        Spec(sub="agent:helper", holder=CAROL, cap=[O123_CAP], jti=jti("valid-5-2"), dpt=2,
             nbf=NOW - 40, exp=NOW + 2_000, aud=[AUD, "ledger-api"]),
        Spec(sub="agent:sub-helper", holder=DAVE, cap=[O123_POST], jti=jti("valid-5-3"), dpt=1,
             nbf=NOW - 30, exp=NOW + 1_000),
        Spec(sub="agent:tool", holder=ERIN,
             cap=[{"res": "api/payments/refunds/o-123", "act": ["post"],
                   "if": {"amount": {"ge": 1, "lt": 5000}}}],
             jti=jti("valid-5-4"), nbf=NOW - 20, exp=NOW + 500),
    ])
    g.simple("five-links-mixed", "ES256 root, then links signed alternately with EdDSA and "
             "ES256 keys; one link carries aud.", c, ok(c))
    specs = [Spec(sub="agent:hop-00", holder=ALICE, cap=[REFUND_CAP], jti=jti("valid-16-00"),
                  dpt=15)]
    cycle = (BOB, CAROL, DAVE, ERIN, ALICE)
    for i in range(1, 16):
        specs.append(Spec(sub=f"agent:hop-{i:02d}", holder=cycle[i % 5], cap=[REFUND_CAP],
                          jti=jti(f"valid-16-{i:02d}"), dpt=15 - i, nbf=NOW - 60 + i,
                          exp=NOW + 3_600 - i))
    c = build(ROOT_ED, KID_ED, specs)
    g.simple("sixteen-links", "The longest chain allowed: 16 links, root dpt 15.", c, ok(c))

    c = chain1("valid-orders")
    g.simple("double-star-several-segments", "`db/orders/**` matches two segments below it; "
             "eq compares an int.", c, ok(c), request=ORDERS)
    c = chain1("valid-any-act", cap=[{"res": "files/*/report", "act": ["*"]}])
    g.simple("any-action-and-single-star", '`["*"]` allows any action; `*` one segment.',
             c, ok(c), request={"res": "files/q3/report", "act": "delete", "ctx": {}})
    c = chain1("valid-ops", cap=[{
        "res": "api/payments/refunds/*", "act": ["post", "put"],
        "if": {"tier": {"in": ["gold", 7]}, "memo": {"prefix": "Rückzahlung"},
               "amount": {"gt": 0, "le": 5000}, "urgent": {"eq": True}},
    }])
    req = {"res": "api/payments/refunds/o-9", "act": "put",
           "ctx": {"tier": 7, "memo": "Rückzahlung für Zoë", "amount": 5000, "urgent": True}}
    g.simple("operators-and-non-ascii-context", "in (mixed types), prefix, gt/le bounds, eq "
             "on a bool; the request hash covers raw UTF-8 context strings.", c, ok(c),
             request=req)
    c = chain1("valid-no-ctx", cap=[{"res": "status", "act": ["get"]}])
    g.simple("request-without-context", "A request with an empty ctx and a one-segment "
             "resource.", c, ok(c), request={"res": "status", "act": "get", "ctx": {}})

    c = chain1("valid-nbf-edge", nbf=NOW + LEEWAY, exp=NOW + 3_600)
    g.simple("nbf-at-leeway-edge", "now = nbf - leeway: still valid (not_yet_valid needs "
             "now < nbf - leeway).", c, ok(c))
    c = chain1("valid-exp-edge", nbf=NOW - 600, exp=NOW - LEEWAY + 1)
    g.simple("exp-inside-leeway", "now = exp + leeway - 1: still valid.", c, ok(c))
    c = chain1("valid-lifetime", nbf=NOW - 60, exp=NOW - 60 + MAX_LIFETIME)
    g.simple("lifetime-at-maximum", "exp - nbf = max_lifetime exactly.", c, ok(c))
    c = chain1("valid-pop-past")
    g.simple("pop-iat-window-past-edge", "PoP iat = now - pop_window.", c, ok(c),
             pop_token=pop(ALICE, c.leaf, REFUND, name="valid-pop-past", iat=NOW - POP_WINDOW))
    c = chain1("valid-pop-future")
    g.simple("pop-iat-window-future-edge", "PoP iat = now + pop_window.", c, ok(c),
             pop_token=pop(ALICE, c.leaf, REFUND, name="valid-pop-fut", iat=NOW + POP_WINDOW))
    c = chain1("valid-aud", aud=["ledger-api", AUD])
    g.simple("audience-listed", "The root's aud names this verifier among others.", c, ok(c))
    c = chain1("valid-use-max", use=2**31 - 1)
    g.simple("use-at-maximum", "use = 2^31 - 1 is allowed.", c, ok(c))
    c = build(ROOT_NEXT, KID_NEXT, one(name="valid-window", nbf=NEXT_NBF, exp=NEXT_EXP))
    g.simple("bundle-key-window-edges", "Root link iat = key nbf and exp = key exp: inside "
             "the key's window.", c, ok(c))
    c = build(ROOT_ED, KID_ED, one(name="valid-json-form", payload_text=reversed_members))
    g.simple("payload-not-canonical-json", "Whitespace and member order in signed JSON are "
             "not an error; ath hashes the token text as received.", c, ok(c))
    c = build(ROOT_ED, KID_ED, [
        *one(name="valid-json-child-0", payload_text=reversed_members),
        Spec(sub="agent:refund-7", holder=BOB, cap=[O123_CAP], jti=jti("valid-json-child-1"),
             payload_text=lambda t: json.dumps(json.loads(t), indent=2)),
    ])
    g.simple("chain-payloads-not-canonical-json", "Both links' payloads are indented or "
             "reordered: prv hashes the parent's text as received.", c, ok(c))
    c = chain3("valid-time", l1={"nbf": NOW + 10, "exp": NOW + 900},
               l2={"nbf": NOW + 20, "exp": NOW + 600})
    g.simple("children-start-in-leeway", "Child links whose nbf lies within the leeway ahead.",
             c, ok(c))
    c = build(ROOT_ED, KID_ED, one(name="valid-req-invalid"))
    g.add("invalid-requests", "Requests that break §4.3 are the caller's error, raised "
          "before verification (ValueError in Python), not a verification code.", [
              verify(c.text, {"res": "api/payments/refunds/*", "act": "post", "ctx": {}},
                     None, INVALID_REQUEST),
              verify(c.text, {"res": "api/payments/refunds/o-123", "act": "POST", "ctx": {}},
                     None, INVALID_REQUEST),
              verify(c.text, {"res": "api/payments/../o-123", "act": "post", "ctx": {}},
                     None, INVALID_REQUEST),
              verify(c.text, {"res": "api//o-123", "act": "post", "ctx": {}},
                     None, INVALID_REQUEST),
              verify(c.text, {"res": "api/payments/refunds/o-123", "act": "post",
                              "ctx": {"amount": "x" * 1_025}}, None, INVALID_REQUEST),
          ])
    return g


def invalid_group() -> Group:
    g = Group("invalid", "Chains refused at steps 1–9 of §8, with the code and link.")
    good = chain3("base")

    # (1) too_large
    g.simple("chain-over-64k", "A chain string of 65,537 bytes is refused before parsing.",
             "A" * 65_537, err("too_large"), pop_token=None)
    g.simple("chain-over-64k-in-utf8", "Size limits count UTF-8 bytes: 32,769 'é' are "
             "65,538 bytes.", "é" * 32_769, err("too_large"), pop_token=None)
    g.simple("seventeen-links", "17 links, even well-formed ones, are too many.",
             "~".join([good.tokens[0]] * 17), err("too_large"), pop_token=None)
    g.simple("link-over-8k", "Link 1 of 8,193 bytes: too_large at that link.",
             good.tokens[0] + "~" + "A" * 8_193, err("too_large", 1), pop_token=None)
    g.simple("pop-over-4k", "A PoP of 4,097 bytes, checked in step 1 before any link is "
             "decoded.", good.tokens[0] + "~garbage", err("too_large"), pop_token="A" * 4_097)

    # (2) malformed
    def root_mal(case_id: str, description: str, **kw: Any) -> None:
        c = build(ROOT_ED, KID_ED, one(name=case_id, **kw))
        g.simple(case_id, description, c, err("malformed", 0))

    g.simple("empty-chain", "The empty string is one empty link.", "", err("malformed", 0),
             pop_token=None)
    g.simple("trailing-separator", "A chain ending in '~' has an empty last link.",
             good.tokens[0] + "~", err("malformed", 1), pop_token=None)
    g.simple("two-segments", "A link needs exactly three segments.",
             good.tokens[0].rsplit(".", 1)[0], err("malformed", 0), pop_token=None)
    g.simple("base64-padding", "'=' padding in a segment.", padded(good.tokens[0]),
             err("malformed", 0), pop_token=None)
    g.simple("base64-standard-alphabet", "'+' or '/' instead of '-' or '_'.",
             standard_alphabet(good.tokens[0]), err("malformed", 0), pop_token=None)
    twin = chain3("base", l1={"edit": base64_twin})
    g.simple("base64-non-canonical-twin", "Link 1's signature with a non-zero unused "
             "trailing bit: the same bytes, another spelling.", twin, err("malformed", 1))
    root_mal("payload-duplicate-member", "A payload naming dpt twice (2 then 9).",
             payload_text=swap('"dpt":2', '"dpt":2,"dpt":9'))
    root_mal("header-duplicate-member", "A header naming kid twice.",
             header_text=swap('"kid":"root-ed-2027"', '"kid":"root-ed-2027","kid":"root-ed-2027"'))
    root_mal("float-integer", "iat written as 1799999940.0.",
             payload_text=swap(f'"iat":{NOW - 60}', f'"iat":{NOW - 60}.0'))
    root_mal("exponent-integer", "dpt written as 2e0.", payload_text=swap('"dpt":2', '"dpt":2e0'))
    root_mal("float-in-constraint", "A constraint bound written as 5000.0.",
             payload_text=swap('"le":5000', '"le":5000.0'))
    root_mal("nan", "NaN is not JSON.", payload_text=swap('"dpt":2', '"dpt":NaN'))
    root_mal("integer-beyond-2^53", "use = 2^53 is outside the safe integer range.",
             use=2**53 - 1, payload_text=swap(f'"use":{2**53 - 1}', f'"use":{2**53}'))
    root_mal("byte-order-mark", "A payload starting with a UTF-8 BOM.",
             payload_text=lambda t: "\ufeff" + t)
    root_mal("lone-surrogate", "sub holds an escaped lone surrogate.",
             payload_text=swap('"sub":"agent:support"', '"sub":"agent:\\ud800"'))
    root_mal("control-character-principal", "sub holds U+0007.", changes={"sub": "agent:\u0007"})
    root_mal("nesting-depth-9", "JSON nested 9 deep (the limit is 8).",
             payload_text=swap('"v":1', '"v":1,"x":[[[[[[[[1]]]]]]]]'))
    root_mal("null-optional-member", "aud: null (an optional member is absent or typed).",
             changes={"aud": None})
    root_mal("unknown-payload-member", "An extension member without a new v.",
             changes={"ext": "x"})
    root_mal("unknown-header-member", "A header carrying its own jwk (never trusted).",
             header={"jwk": ROGUE.jwk})
    root_mal("header-jku", "A header pointing at a key URL.",
             header={"jku": "https://attacker.example/jwks"})
    root_mal("typ-generic-jwt", "typ must be exactly mandate+jwt.", header={"typ": "JWT"})
    root_mal("typ-with-prefix", "No 'application/' prefix, no case folding.",
             header={"typ": "application/mandate+jwt"})
    root_mal("revocation-list-as-link", "A link typed as a revocation list.",
             header={"typ": RL_TYP})
    root_mal("kid-bad-characters", "A root kid outside [A-Za-z0-9._-].",
             header={"kid": "root ed 2027"})
    root_mal("kid-not-string", "kid must be a string.", header={"kid": 7})
    root_mal("version-2", "v must be 1.", changes={"v": 2})
    root_mal("version-true", "v: true is not the int 1.", changes={"v": True})
    root_mal("missing-jti", "jti is required.", changes={"jti": DROP})
    root_mal("short-jti", "A jti of 15 characters.", changes={"jti": "v1-short-jti-15"})
    root_mal("root-with-prv", "prv on the root link.", changes={"prv": h("x")})
    root_mal("nbf-not-before-exp", "nbf = exp.", nbf=NOW, exp=NOW)
    root_mal("dpt-16", "dpt above 15.", dpt=16)
    root_mal("use-zero", "use 0.", use=0)
    root_mal("use-2^31", "use above 2^31 - 1.", use=2**31)
    root_mal("empty-aud", "aud with no entries.", aud=[])
    root_mal("empty-cap", "cap with no capabilities.", cap=[])
    root_mal("cap-dot-dot", "A '..' segment in a pattern.",
             cap=[{"res": "api/../admin", "act": ["post"]}])
    root_mal("cap-double-star-inside", "'**' before the last segment.",
             cap=[{"res": "api/**/refunds", "act": ["post"]}])
    root_mal("cap-star-with-action", "'*' mixed with named actions.",
             cap=[{"res": "api/x", "act": ["*", "post"]}])
    root_mal("cap-unknown-operator", "An operator not in §4.1.",
             cap=[{"res": "api/x", "act": ["post"], "if": {"amount": {"regex": ".*"}}}])
    root_mal("cnf-small-order-key", "A cnf key of small order (the identity point): any "
             "signature 'verifies' under it in a lax library.",
             changes={"cnf": {"jwk": small_order_jwk()}})
    p_plus_3 = (2**255 - 19 + 3).to_bytes(32, "little")
    root_mal("cnf-non-canonical-ed25519", "A cnf key encoding y >= p.",
             changes={"cnf": {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64(p_plus_3)}}})
    off = dict(BOB.jwk)
    off["y"] = b64((int.from_bytes(base64.urlsafe_b64decode(off["y"] + "="), "big") ^ 1)
                   .to_bytes(32, "big"))
    root_mal("cnf-p256-off-curve", "A cnf P-256 point not on the curve.",
             changes={"cnf": {"jwk": off}})
    root_mal("cnf-private-key", "A cnf JWK with its private 'd' (extra member).",
             changes={"cnf": {"jwk": {**ALICE.jwk, "d": ALICE.private.to_jwk()["d"]}}})
    root_mal("cnf-extra-kid", "A cnf JWK with a kid member.",
             changes={"cnf": {"jwk": {**ALICE.jwk, "kid": "alice"}}})
    c = chain3("mal-child", l1={"changes": {"prv": DROP}})
    g.simple("child-without-prv", "Link 1 lacks prv.", c, err("malformed", 1))
    c = chain1("lifetime", nbf=NOW - 60, exp=NOW - 59 + MAX_LIFETIME)
    g.simple("lifetime-over-maximum", "exp - nbf = max_lifetime + 1: malformed at step 6.",
             c, err("malformed", 0))
    c = chain3("lifetime-setting")
    g.simple("lifetime-over-setting", "max_lifetime 600: link 0 lives 3,660 s. (A child "
             "never lives longer than its parent, so the root fails first.)",
             c, err("malformed", 0), max_lifetime=600)

    # (2) unsupported_alg
    c = chain1("alg-none", header={"alg": "none"}, signature=lambda _: b"")
    g.simple("alg-none", "alg none with an empty signature.", c, err("unsupported_alg", 0))
    raw_root = base64.urlsafe_b64decode(ROOT_ED.jwk["x"] + "=")
    c = chain1("alg-hs256", header={"alg": "HS256"},
               signature=lambda data: hmac.new(raw_root, data, hashlib.sha256).digest())
    g.simple("alg-hs256-public-key-as-secret", "HS256 keyed with the root's public key bytes.",
             c, err("unsupported_alg", 0))
    c = chain1("alg-mismatch-root", header={"alg": "ES256"}, signer=ROOT_ES)
    g.simple("root-alg-not-bundle-key-alg", "alg ES256 on the EdDSA bundle key root-ed-2027.",
             c, err("unsupported_alg", 0))
    c = chain3("alg-mismatch-child", l2={"header": {"alg": "EdDSA"}, "signer": ALICE})
    g.simple("child-alg-not-parent-key-alg", "Link 2 says EdDSA but link 1's cnf key is "
             "P-256: the key, not the header, fixes the algorithm.", c,
             err("unsupported_alg", 2))

    # (3) unknown_key
    c = build(ROGUE, "root-rogue", one(name="unknown-kid"))
    g.simple("root-kid-not-in-bundle", "A root signed by a key the bundle does not hold.",
             c, err("unknown_key", 0))
    c = build(ROOT_NEXT, KID_NEXT, one(name="key-backdated", nbf=NEXT_NBF - 1,
                                       exp=NOW + 600))
    g.simple("root-iat-before-key-nbf", "The root's iat is one second before its bundle "
             "key's nbf.", c, err("unknown_key", 0))
    c = build(ROOT_NEXT, KID_NEXT, one(name="key-outlived", nbf=NOW - 60, exp=NEXT_EXP + 1))
    g.simple("root-exp-after-key-exp", "The root outlives its bundle key by one second.",
             c, err("unknown_key", 0))
    c = build(ROOT_NEXT, KID_NEXT, one(name="key-backdated-2", nbf=NOW - 60, iat=NEXT_NBF - 1,
                                       exp=NOW + 600))
    g.simple("root-iat-backdated-only", "Only iat (not nbf) falls before the key's nbf.",
             c, err("unknown_key", 0))

    # (3) and (5) broken_chain
    c = chain3("kid-mismatch", l1={"header": {"kid": MALLORY.thumbprint}})
    g.simple("child-kid-not-parent-thumbprint", "Link 1's kid is another key's thumbprint.",
             c, err("broken_chain", 1))
    c = chain3("kid-bundle", l1={"header": {"kid": KID_ED}, "signer": ROOT_ED})
    g.simple("child-kid-names-bundle-key", "Link 1 signed by the root key and naming it: "
             "a child is only ever checked against its parent's cnf key.", c,
             err("broken_chain", 1))
    c = chain3("iss", l1={"changes": {"iss": "agent:someone-else"}})
    g.simple("child-iss-not-parent-sub", "Link 1's iss differs from link 0's sub.", c,
             err("broken_chain", 1))
    c = chain3("prv", l2={"changes": {"prv": h("another link")}})
    g.simple("child-prv-wrong", "Link 2's prv is not H(link 1).", c, err("broken_chain", 2))
    c = chain3("nbf-early", l1={"nbf": NOW - 61})
    g.simple("child-nbf-before-parent", "Link 1 starts one second before link 0.", c,
             err("broken_chain", 1))
    c = chain3("exp-late", l2={"exp": NOW + 1_801})
    g.simple("child-exp-after-parent", "Link 2 outlives link 1 by one second.", c,
             err("broken_chain", 2))
    other = chain3("splice")
    spliced = "~".join([good.tokens[0], other.tokens[1], good.tokens[2]])
    g.simple("spliced-foreign-link", "Link 1 comes from another chain issued to the same "
             "holder key: its prv names another root.", spliced, err("broken_chain", 1),
             pop_token=pop(CAROL, good.tokens[2], REFUND, name="spliced"))
    c = build(ROOT_ES, KID_ES, [*one(name="malleated-root"),
                                Spec(sub="agent:refund-7", holder=BOB, cap=[O123_CAP],
                                     jti=jti("malleated-root-1"))])
    bent = "~".join([es256_high_s(c.tokens[0]), c.tokens[1]])
    g.simple("malleated-parent-breaks-prv", "Link 0's ES256 signature rewritten as (r, n-s) "
             "still verifies, but prv hashes the exact token text.", bent,
             err("broken_chain", 1), pop_token=pop(BOB, c.tokens[1], REFUND, name="malleated"))

    # (4) bad_signature
    tampered = replace_payload(good.tokens[0], chain1("tamper", dpt=2, cap=[
        {"res": "**", "act": ["*"]}]).tokens[0])
    g.simple("root-payload-swapped", "Link 0's payload replaced by a wider one under the "
             "original signature.", "~".join([tampered, *good.tokens[1:]]),
             err("bad_signature", 0), pop_token=None)
    c = build(ROGUE, KID_ED, one(name="rogue-root"))
    g.simple("root-signed-by-rogue-key", "A root naming the bundle's kid but signed by "
             "another key.", c, err("bad_signature", 0))
    c = chain3("bitflip", l1={"edit": flip_signature_bit})
    g.simple("signature-bit-flip", "One bit of link 1's ES256 signature flipped.", c,
             err("bad_signature", 1))
    c = chain3("child-rogue", l2={"signer": MALLORY, "header": {"kid": BOB.thumbprint,
                                                               "alg": "ES256"}})
    g.simple("child-signed-by-wrong-key", "Link 2 names bob's key but is signed by "
             "mallory's EdDSA key.", c, err("bad_signature", 2))
    c = chain1("s-plus-l", edit=ed25519_s_plus_l)
    g.simple("ed25519-s-not-reduced", "An Ed25519 signature with S + L in place of S.", c,
             err("bad_signature", 0))
    c = chain1("small-r", signature=lambda _: b"\x01" + bytes(63))
    g.simple("ed25519-small-order-r", "R = identity, S = 0.", c, err("bad_signature", 0))
    c = chain1("short-sig", signature=lambda data: ROOT_ED.sign(data)[:63])
    g.simple("signature-63-bytes", "A truncated Ed25519 signature.", c,
             err("bad_signature", 0))

    def es_sig(fn: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
        return lambda data: fn(BOB.sign(data))

    n_bytes = P256_N.to_bytes(32, "big")
    c = chain3("es-r0", l2={"signature": es_sig(lambda s: bytes(32) + s[32:])})
    g.simple("es256-r-zero", "r = 0.", c, err("bad_signature", 2))
    c = chain3("es-sn", l2={"signature": es_sig(lambda s: s[:32] + n_bytes)})
    g.simple("es256-s-equals-n", "s = n.", c, err("bad_signature", 2))
    c = chain3("es-der", l2={"signature": lambda data: BOB.raw.sign(
        data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))})
    g.simple("es256-der-signature", "A DER-encoded ECDSA signature instead of r‖s.", c,
             err("bad_signature", 2))

    # (5) depth_exceeded
    c = chain3("dpt-zero", l0={"dpt": 0})
    g.simple("parent-dpt-zero", "Link 0 has dpt 0 and still has a child.", c,
             err("depth_exceeded", 1))
    c = chain3("dpt-equal", l1={"dpt": 2})
    g.simple("child-dpt-not-lower", "Link 1 keeps its parent's dpt 2.", c,
             err("depth_exceeded", 1))
    c = chain3("dpt-last", l0={"dpt": 1}, l1={"dpt": 0})
    g.simple("grandchild-beyond-depth", "dpt 1 → 0 leaves no room for link 2.", c,
             err("depth_exceeded", 2))

    # (6) not_yet_valid, expired
    c = chain1("nyv", nbf=NOW + LEEWAY + 1, exp=NOW + 3_600)
    g.simple("root-not-yet-valid", "now = nbf - leeway - 1.", c, err("not_yet_valid", 0))
    c = chain3("nyv-child", l2={"nbf": NOW + 120})
    g.simple("leaf-not-yet-valid", "Only link 2 starts in the future.", c,
             err("not_yet_valid", 2))
    c = chain1("exp", nbf=NOW - 600, exp=NOW - LEEWAY)
    g.simple("root-expired-at-leeway-edge", "now = exp + leeway.", c, err("expired", 0))
    c = chain3("exp-mid", l0={"nbf": NOW - 600}, l1={"nbf": NOW - 500, "exp": NOW - 100},
               l2={"nbf": NOW - 300, "exp": NOW - 200})
    g.simple("middle-expired", "Links 1 and 2 expired: the lowest failing link is reported.",
             c, err("expired", 1))

    # (8) audience
    c = chain1("aud-other", aud=["ledger-api"])
    g.simple("root-audience-other", "The root is for ledger-api only.", c, err("audience", 0))
    c = chain3("aud-case", l1={"aud": ["Payments-API"]})
    g.simple("audience-case-sensitive", "'Payments-API' is not 'payments-api'.", c,
             err("audience", 1))

    # (9) denied
    def denied(case_id: str, description: str, request: dict[str, Any], link: int,
               chain: Chain | None = None) -> None:
        c = chain or good
        g.simple(case_id, description, c, err("denied", link), request=request,
                 pop_token=pop(c.holder, c.leaf, request, name=case_id))

    denied("resource-outside", "A charge, not a refund.",
           {"res": "api/payments/charges/o-123", "act": "post", "ctx": {"amount": 1}}, 0)
    denied("action-outside", "delete is not post.",
           {"res": "api/payments/refunds/o-123", "act": "delete", "ctx": {"amount": 1}}, 0)
    denied("constraint-fails", "amount 5001 > 5000.",
           {"res": "api/payments/refunds/o-123", "act": "post", "ctx": {"amount": 5001}}, 0)
    denied("constraint-string-not-int", 'amount "4999" is a string: le needs an int.',
           {"res": "api/payments/refunds/o-123", "act": "post", "ctx": {"amount": "4999"}}, 0)
    denied("constraint-bool-not-int", "amount true: a bool is not an int.",
           {"res": "api/payments/refunds/o-123", "act": "post", "ctx": {"amount": True}}, 0)
    denied("constraint-attribute-missing", "No amount in ctx.",
           {"res": "api/payments/refunds/o-123", "act": "post", "ctx": {}}, 0)
    denied("resource-case-sensitive", "Literals are compared byte for byte.",
           {"res": "api/payments/refunds/O-123", "act": "post", "ctx": {"amount": 1}}, 1)
    denied("star-is-one-segment", "`refunds/*` does not reach two segments down.",
           {"res": "api/payments/refunds/o-123/items", "act": "post", "ctx": {"amount": 1}}, 0)
    one_link = chain1("deny-orders")
    denied("double-star-needs-a-segment", "`db/orders/**` does not match `db/orders`.",
           {"res": "db/orders", "act": "select", "ctx": {"customer": 42}}, 0, one_link)
    denied("eq-compares-type", 'customer "42" is not 42.',
           {"res": "db/orders/42", "act": "select", "ctx": {"customer": "42"}}, 0, one_link)
    mixed = chain1("deny-in", cap=[{"res": "x/*", "act": ["get"],
                                     "if": {"tier": {"in": ["gold", 7]}}}])
    denied("in-compares-type", 'tier "7": the list holds the int 7.',
           {"res": "x/y", "act": "get", "ctx": {"tier": "7"}}, 0, mixed)
    wide = chain3("widen", l1={"cap": [{"res": "**", "act": ["*"]}]},
                  l2={"cap": [{"res": "api/**", "act": ["*"]}]})
    denied("child-cannot-widen", "Links 1 and 2 allow everything; the root does not allow "
           "this request, so the chain does not.",
           {"res": "api/admin/users", "act": "delete", "ctx": {}}, 0, wide)
    denied("leaf-narrows", "Link 0 allows refunds of any order, link 1 only of o-123.",
           {"res": "api/payments/refunds/o-124", "act": "post", "ctx": {"amount": 4000}}, 1)

    # Order: steps 2–5 for every link before 6–9; links root first.
    c = chain3("order-1", l1={"changes": {"cnf": {"jwk": small_order_jwk()}}},
               l0={"header": {"kid": "root-missing"}})
    g.simple("order-root-key-before-child-shape", "Link 0 has an unknown kid and link 1 a "
             "bad cnf: link 0 goes through steps 2–5 first.", c, err("unknown_key", 0))
    c = chain3("order-2", l2={"edit": flip_signature_bit})
    g.simple("order-signature-before-capability", "The request is denied by link 0, but link "
             "2's signature is bad: steps 2–5 run over the whole chain first.", c,
             err("bad_signature", 2),
             request={"res": "api/payments/charges/o-1", "act": "post", "ctx": {"amount": 1}})
    c = chain3("order-3", l0={"nbf": NOW - 600}, l1={"nbf": NOW - 500, "exp": NOW - 100},
               l2={"nbf": NOW - 300, "exp": NOW - 200})
    g.simple("order-denied-root-before-expired-child", "Link 0 denies the request; link 1 is "
             "expired: link 0 runs steps 6–9 first.", c, err("denied", 0),
             request={"res": "api/payments/charges/o-1", "act": "post", "ctx": {"amount": 1}})
    c = chain1("order-4", nbf=NOW - 600, exp=NOW - 100)
    g.simple("order-expired-before-revocation-required", "A required revocation list is "
             "missing, but link 0 is expired: step 6 comes first.", c, err("expired", 0),
             require_revocations=True)
    c = chain3("order-5", l2={"exp": NOW - 100, "nbf": NOW - 300}, l1={"nbf": NOW - 300},
               l0={"nbf": NOW - 600})
    g.simple("order-revocation-required-before-expired-child", "Link 2 is expired, but the "
             "missing required list is found when link 0 reaches step 7.", c,
             err("revocation_stale"), require_revocations=True)
    c = chain3("order-6", l1={"aud": ["ledger-api"]})
    g.simple("order-denied-before-pop", "Link 1 excludes this audience and the PoP is "
             "missing: audience first.", c, err("audience", 1), pop_token=None)
    return g


def pop_group() -> Group:
    g = Group("pop", "Proof of possession (§5, step 10) and replay (step 11).")
    c = chain3("pop")
    leaf = c.leaf

    def bad(case_id: str, description: str, pop_token: str | None, *,
            chain: Chain = c, request: dict[str, Any] = REFUND) -> None:
        g.simple("pop-" + case_id, description, chain, err("pop_invalid"), pop_token=pop_token,
                 request=request)

    bad("missing", "No PoP.", None)
    bad("empty", "An empty PoP string.", "")
    bad("garbage", "Not a JWS.", "not-a-jws")
    bad("signed-by-other-key", "Right claims, signed by mallory.",
        pop(CAROL, leaf, REFUND, name="other-key", signer=MALLORY))
    bad("signed-by-middle-holder", "bob (link 1's holder) signs a PoP for the leaf: only "
        "the leaf holder can use the chain.",
        pop(CAROL, leaf, REFUND, name="middle", signer=BOB, header={"alg": "ES256"}))
    bad("ath-of-root", "ath names link 0, not the leaf.",
        pop(CAROL, c.tokens[0], REFUND, name="ath-root"))
    bad("aud-other-service", "A PoP made for ledger-api.",
        pop(CAROL, leaf, REFUND, name="aud", aud="ledger-api"))
    bad("req-other-request", "A PoP for amount 10 presented with amount 4999.",
        pop(CAROL, leaf, {**REFUND, "ctx": {"amount": 10}}, name="req"))
    bad("req-without-aud", "req hashed over {act, ctx, res} only.",
        pop(CAROL, leaf, REFUND, name="req-no-aud", changes={"req": h(canon(
            {"act": "post", "ctx": {"amount": 4999}, "res": REFUND["res"]}))}))
    nonascii = chain1("pop-utf8", cap=[{"res": "notes/*", "act": ["put"]}])
    nreq = {"res": "notes/n-1", "act": "put", "ctx": {"title": "Zoë"}}
    escaped = h(json.dumps({"act": "put", "aud": AUD, "ctx": {"title": "Zoë"},
                            "res": "notes/n-1"}, sort_keys=True, separators=(",", ":")))
    bad("req-ascii-escaped", "req hashed with non-ASCII written as \\u escapes: the "
        "canonical form writes UTF-8 raw.",
        pop(ALICE, nonascii.leaf, nreq, name="req-escaped", changes={"req": escaped}),
        chain=nonascii, request=nreq)
    bad("iat-too-old", "iat = now - pop_window - 1.",
        pop(CAROL, leaf, REFUND, name="old", iat=NOW - POP_WINDOW - 1))
    bad("iat-too-new", "iat = now + pop_window + 1.",
        pop(CAROL, leaf, REFUND, name="new", iat=NOW + POP_WINDOW + 1))
    bad("alg-mismatch", "Header ES256 for an EdDSA leaf key.",
        pop(CAROL, leaf, REFUND, name="alg", header={"alg": "ES256"}))
    bad("alg-none", "alg none, empty signature.",
        pop(CAROL, leaf, REFUND, name="none", header={"alg": "none"},
            signature=lambda _: b""))
    bad("link-as-pop", "The leaf link itself presented as the PoP.", leaf)
    bad("typ-link", "A PoP typed mandate+jwt.",
        pop(CAROL, leaf, REFUND, name="typ", header={"typ": LINK_TYP}))
    bad("header-kid", "A PoP header with a kid (exactly alg and typ).",
        pop(CAROL, leaf, REFUND, name="kid", header={"kid": CAROL.thumbprint}))
    bad("extra-member", "A PoP payload with exp.",
        pop(CAROL, leaf, REFUND, name="extra", changes={"exp": NOW + 60}))
    bad("duplicate-member", "A PoP payload naming iat twice.",
        pop(CAROL, leaf, REFUND, name="dup",
            payload_text=swap(f'"iat":{NOW}', f'"iat":{NOW - 3600},"iat":{NOW}')))
    bad("float-iat", "iat written with a fraction.",
        pop(CAROL, leaf, REFUND, name="float", payload_text=swap(f'"iat":{NOW}',
                                                                 f'"iat":{NOW}.5')))
    bad("short-jti", "A PoP jti of 15 characters.",
        pop(CAROL, leaf, REFUND, name="short", changes={"jti": "v1-pop-short-15"}))
    bad("bad-signature", "A flipped signature bit.",
        pop(CAROL, leaf, REFUND, name="flip", edit=flip_signature_bit))

    p = pop(CAROL, leaf, REFUND, name="replay")
    g.add("replay-same-token", "The same PoP twice: the second use is a replay.", [
        verify(c.text, REFUND, p, ok(c)),
        verify(c.text, REFUND, p, err("replayed")),
    ])
    p1 = pop(CAROL, leaf, REFUND, name="same-jti")
    p2 = pop(CAROL, leaf, {**REFUND, "ctx": {"amount": 12}}, name="same-jti")
    g.add("replay-key-is-ath-and-jti", "A second PoP with the same jti for another request: "
          "the replay key is (ath, jti), whatever else differs.", [
              verify(c.text, REFUND, p1, ok(c)),
              verify(c.text, {**REFUND, "ctx": {"amount": 12}}, p2, err("replayed")),
          ])
    es = build(ROOT_ES, KID_ES, one(BOB, name="replay-es"))
    p = pop(BOB, es.leaf, REFUND, name="replay-es")
    g.add("replay-malleated-es256", "The ES256 PoP again with s replaced by n - s: other "
          "bytes, same signed jti, still a replay.", [
              verify(es.text, REFUND, p, ok(es)),
              verify(es.text, REFUND, es256_high_s(p), err("replayed")),
          ])
    other = chain3("pop-other")
    pa = pop(CAROL, leaf, REFUND, name="shared-jti")
    pb = pop(CAROL, other.leaf, REFUND, name="shared-jti")
    g.add("same-jti-other-chain", "One jti in PoPs for two different leaves: different "
          "(ath, jti) pairs, both accepted.", [
              verify(c.text, REFUND, pa, ok(c)),
              verify(other.text, REFUND, pb, ok(other)),
          ])
    late = chain3("pop-late", l0={"nbf": NOW + 45, "exp": NOW + 3_600},
                  l1={"nbf": NOW + 45}, l2={"nbf": NOW + 45})
    p = pop(CAROL, late.leaf, REFUND, name="late")
    g.add("failed-use-not-recorded", "A PoP refused at step 6 is not recorded: the same PoP "
          "works once the chain is valid, then is a replay.", [
              verify(late.text, REFUND, p, err("not_yet_valid", 0)),
              verify(late.text, REFUND, p, ok(late), now=NOW + 20),
              verify(late.text, REFUND, p, err("replayed"), now=NOW + 20),
          ])
    p = pop(CAROL, leaf, REFUND, name="early", iat=NOW + 70)
    g.add("pop-invalid-not-recorded", "A PoP refused for its iat is not recorded.", [
        verify(c.text, REFUND, p, err("pop_invalid")),
        verify(c.text, REFUND, p, ok(c), now=NOW + 20),
    ])
    return g


def uses_group() -> Group:
    g = Group("uses", "Use counting (§3.3 use, step 12), across verifications sharing stores.")
    c = chain3("use-leaf", l2={"use": 1})
    p1 = pop(CAROL, c.leaf, REFUND, name="use-leaf-1")
    p2 = pop(CAROL, c.leaf, REFUND, name="use-leaf-2")
    g.add("leaf-use-1-twice", "A leaf with use 1 takes part in one verification; the "
          "refused second use still records its PoP.", [
              verify(c.text, REFUND, p1, ok(c)),
              verify(c.text, REFUND, p2, err("uses_exhausted", 2)),
              verify(c.text, REFUND, p2, err("replayed")),
          ])

    root = one(BOB, name="use-root", use=2, dpt=1)

    def child(name: str, use: int | None) -> Chain:
        return build(ROOT_ED, KID_ED, [*root, Spec(sub="agent:refund-7", holder=CAROL,
                                                   cap=[O123_CAP], jti=jti(name), use=use)])

    a, b, d = child("use-child-a", 1), child("use-child-b", None), child("use-child-c", None)
    g.add("all-or-nothing", "Root use 2 and child use 1: the refused second use of child a "
          "does not spend the root's count, which two more uses then exhaust.", [
              verify(a.text, REFUND, pop(CAROL, a.leaf, REFUND, name="aon-1"), ok(a)),
              verify(a.text, REFUND, pop(CAROL, a.leaf, REFUND, name="aon-2"),
                     err("uses_exhausted", 1)),
              verify(b.text, REFUND, pop(CAROL, b.leaf, REFUND, name="aon-3"), ok(b)),
              verify(d.text, REFUND, pop(CAROL, d.leaf, REFUND, name="aon-4"),
                     err("uses_exhausted", 0)),
          ])

    shared = jti("use-shared-jti")
    mine = build(ROOT_ED, KID_ED, [
        *one(MALLORY, name="use-mallory"),
        Spec(sub="agent:refund-7", holder=CAROL, cap=[O123_CAP], jti=shared, use=1)])
    theirs = build(ROOT_ED, KID_ED, [
        *one(ALICE, name="use-alice"),
        Spec(sub="agent:refund-7", holder=CAROL, cap=[O123_CAP], jti=shared, use=1)])
    g.add("counter-per-signing-key", "mallory copies alice's child jti into her own child: "
          "counters are per (signing key, jti), so alice's link keeps its use.", [
              verify(mine.text, REFUND, pop(CAROL, mine.leaf, REFUND, name="pk-1"), ok(mine)),
              verify(theirs.text, REFUND, pop(CAROL, theirs.leaf, REFUND, name="pk-2"),
                     ok(theirs)),
              verify(theirs.text, REFUND, pop(CAROL, theirs.leaf, REFUND, name="pk-3"),
                     err("uses_exhausted", 1)),
          ])

    twice = jti("use-self")
    selfish = build(ROOT_ED, KID_ED, [
        *one(ALICE, name="use-self-root"),
        Spec(sub="agent:support-2", holder=ALICE, cap=[REFUND_CAP], jti=twice, use=3, dpt=1),
        Spec(sub="agent:support-3", holder=CAROL, cap=[REFUND_CAP], jti=twice, use=1),
    ])
    g.add("same-pair-twice-in-chain", "alice signs links 1 and 2 with one jti: one counter, "
          "limited by the smaller use (1), reported at the lower link.", [
              verify(selfish.text, REFUND, pop(CAROL, selfish.leaf, REFUND, name="self-1"),
                     ok(selfish)),
              verify(selfish.text, REFUND, pop(CAROL, selfish.leaf, REFUND, name="self-2"),
                     err("uses_exhausted", 1)),
          ])

    es = build(ROOT_ED, KID_ED, [
        *one(BOB, name="use-malleate-root"),
        Spec(sub="agent:refund-7", holder=CAROL, cap=[O123_CAP], jti=jti("use-malleate"),
             use=1)])
    bent_leaf = es256_high_s(es.leaf)
    bent = "~".join([es.tokens[0], bent_leaf])
    g.add("malleated-leaf-same-counter", "Link 1 re-signed as (r, n-s) is another token with "
          "the same signed jti: it shares the spent counter.", [
              verify(es.text, REFUND, pop(CAROL, es.leaf, REFUND, name="mal-1"), ok(es)),
              verify(bent, REFUND, pop(CAROL, bent_leaf, REFUND, name="mal-2"),
                     err("uses_exhausted", 1)),
          ])
    two = chain1("use-two", use=2)
    g.add("use-2", "use 2: two uses, then exhausted at the root.", [
        verify(two.text, REFUND, pop(ALICE, two.leaf, REFUND, name="two-1"), ok(two)),
        verify(two.text, ORDERS, pop(ALICE, two.leaf, ORDERS, name="two-2"), ok(two)),
        verify(two.text, REFUND, pop(ALICE, two.leaf, REFUND, name="two-3"),
               err("uses_exhausted", 0)),
    ])
    return g


def revocation_group() -> Group:
    g = Group("revocation", "Revocation lists (§7, step 7): loading and their effect.")
    c = chain3("rev")
    p = pop(CAROL, c.leaf, REFUND, name="rev")
    for index in range(3):
        token = rl(1, [c.claims[index]["jti"]])
        g.add(f"revoked-link-{index}", f"A list revoking link {index}'s jti.", [
            load(token, REPLACED),
            verify(c.text, REFUND, p, err("revoked", index)),
        ])
    g.add("unrelated-revocation", "A list revoking other jtis; the chain is valid.", [
        load(rl(1, [jti("someone-else"), jti("another-one")]), REPLACED),
        verify(c.text, REFUND, p, ok(c)),
    ])
    g.add("required-and-missing", "require_revocations with no list loaded.", [
        verify(c.text, REFUND, p, err("revocation_stale")),
    ], require_revocations=True)
    g.add("required-and-loaded", "require_revocations with a fresh list.", [
        load(rl(1, []), REPLACED),
        verify(c.text, REFUND, p, ok(c)),
    ], require_revocations=True)
    fresh = rl(3, [], exp=NOW + 100)
    g.add("list-expires", "A list with exp = now + 100: fine until exp + leeway, stale from "
          "then on.", [
              load(fresh, REPLACED),
              verify(c.text, REFUND, pop(CAROL, c.leaf, REFUND, name="exp-1",
                                         iat=NOW + 129), ok(c), now=NOW + 129),
              verify(c.text, REFUND, pop(CAROL, c.leaf, REFUND, name="exp-2", iat=NOW + 130),
                     err("revocation_stale"), now=NOW + 130),
          ])
    g.add("expired-list-loads-then-fails-closed", "An already expired list is accepted by "
          "the load (its signature and seq are fine) and every verification then fails.", [
              load(rl(1, [], iat=NOW - 7_200, exp=NOW - 3_600), REPLACED),
              verify(c.text, REFUND, p, err("revocation_stale")),
          ])
    revoking = rl(5, [c.claims[1]["jti"]])
    g.add("rollback-refused", "seq 4 after seq 5 is refused and changes nothing.", [
        load(revoking, REPLACED),
        load(rl(4, []), err("revocation_stale")),
        verify(c.text, REFUND, p, err("revoked", 1)),
    ])
    g.add("same-seq-other-content", "seq 5 again with another rev list.", [
        load(revoking, REPLACED),
        load(rl(5, []), err("revocation_stale")),
        verify(c.text, REFUND, p, err("revoked", 1)),
    ])
    reordered = rl(5, [c.claims[1]["jti"]], payload_text=lambda t: json.dumps(
        dict(reversed(list(json.loads(t).items()))), separators=(", ", ": ")))
    g.add("same-payload-other-encoding", "The same members and values, encoded differently: "
          "a no-op, not an error.", [
              load(revoking, REPLACED),
              load(reordered, UNCHANGED),
              load(revoking, UNCHANGED),
              verify(c.text, REFUND, p, err("revoked", 1)),
          ])
    g.add("newer-list-unrevokes", "seq 6 without the jti lifts the revocation.", [
        load(revoking, REPLACED),
        verify(c.text, REFUND, p, err("revoked", 1)),
        load(rl(6, []), REPLACED),
        verify(c.text, REFUND, pop(CAROL, c.leaf, REFUND, name="unrevoked"), ok(c)),
    ])
    g.add("failed-load-changes-nothing", "A badly signed seq 6 is refused; seq 5 stays in "
          "force.", [
              load(revoking, REPLACED),
              load(rl(6, [], key=ROGUE), err("bad_signature")),
              verify(c.text, REFUND, p, err("revoked", 1)),
          ])

    def refused(case_id: str, description: str, token: str, code: str) -> None:
        g.add(case_id, description, [load(token, err(code)), verify(c.text, REFUND, p, ok(c))])

    refused("load-malformed-duplicate", "A list payload naming seq twice.",
            rl(2, [], payload_text=swap('"seq":2', '"seq":9,"seq":2')), "malformed")
    refused("load-malformed-member", "A list with an extra member.",
            rl(2, [], changes={"nxt": 3}), "malformed")
    refused("load-malformed-typ", "A link token offered as a list.", c.tokens[0], "malformed")
    refused("load-malformed-rev-entry", "A rev entry that is not a jti.",
            rl(2, ["short"]), "malformed")
    refused("load-malformed-negative-seq", "seq below 0.", rl(-1, []), "malformed")
    refused("load-alg-none", "alg none.", rl(2, [], header={"alg": "none"},
                                              signature=lambda _: b""), "unsupported_alg")
    refused("load-alg-mismatch", "alg ES256 under an EdDSA bundle key.",
            rl(2, [], key=ROOT_ES, header={"kid": KID_ED}), "unsupported_alg")
    refused("load-unknown-kid", "A kid the bundle does not hold.",
            rl(2, [], key=ROGUE, kid="rogue"), "unknown_key")
    refused("load-before-key-nbf", "A list whose iat precedes its key's nbf.",
            rl(2, [], key=ROOT_NEXT, kid=KID_NEXT, iat=NEXT_NBF - 1), "unknown_key")
    refused("load-after-key-exp", "A list outliving its key: a retired key cannot sign a "
            "list that un-revokes.",
            rl(2, [], key=ROOT_NEXT, kid=KID_NEXT, exp=NEXT_EXP + 1), "unknown_key")
    refused("load-bad-signature", "Signed by a key not named by its kid.",
            rl(2, [], key=ROGUE), "bad_signature")
    g.add("list-by-second-root-key", "Any bundle key may sign a list.", [
        load(rl(1, [c.claims[2]["jti"]], key=ROOT_ES, kid=KID_ES), REPLACED),
        verify(c.text, REFUND, p, err("revoked", 2)),
    ])
    return g


def bundle_group() -> Group:
    g = Group("bundles", "Trust bundles (§6): which JWKS a verifier loads and which it "
              "refuses (an operator error, not a verification code).")
    entry = bundle_entry(ROOT_ED, KID_ED)

    def case(case_id: str, description: str, bundle: Any, valid: bool) -> None:
        g.cases.append({"id": "bundle-" + case_id, "description": description, "bundle": bundle,
                        "expected": {"valid": valid}})

    case("standard", "The bundle every other vector uses.", BUNDLE, True)
    case("minimal-members", "kty, crv, x, kid and alg only.",
         {"keys": [{**ROOT_ED.jwk, "kid": KID_ED, "alg": "EdDSA"}]}, True)
    case("empty", "No keys.", {"keys": []}, False)
    case("extra-top-member", "A member besides keys.", {"keys": [entry], "x": 1}, False)
    case("duplicate-kid", "Two keys with one kid.",
         {"keys": [entry, bundle_entry(ROOT_NEXT, KID_ED)]}, False)
    case("missing-kid", "A key without kid.",
         {"keys": [{**ROOT_ED.jwk, "alg": "EdDSA"}]}, False)
    case("missing-alg", "A key without alg.", {"keys": [{**ROOT_ED.jwk, "kid": KID_ED}]},
         False)
    case("alg-mismatch", "alg ES256 on an Ed25519 key.",
         {"keys": [{**entry, "alg": "ES256"}]}, False)
    case("use-enc", "use other than sig.", {"keys": [{**entry, "use": "enc"}]}, False)
    case("window-empty", "nbf equal to exp.", {"keys": [{**entry, "nbf": NOW, "exp": NOW}]},
         False)
    case("small-order-key", "The identity point as a root key.",
         {"keys": [{**small_order_jwk(), "kid": KID_ED, "alg": "EdDSA"}]}, False)
    case("private-key", "A key with its private member d.",
         {"keys": [{**entry, "d": ROOT_ED.private.to_jwk()["d"]}]}, False)
    case("unknown-member", "A key with x5c.", {"keys": [{**entry, "x5c": ["MIIB"]}]}, False)
    return g


def keys_file() -> dict[str, Any]:
    return {
        "description": "The fixed keys behind every vector. Ed25519: the private key is the "
                       "32-byte seed SHA-256(\"mandate-v1 test vector key: \" + name). P-256: "
                       "the scalar is that digest, as a big-endian integer, mod (n - 1), plus 1. "
                       "Test keys only: they are public.",
        "bundle_kids": {KID_ED: "root-ed", KID_ES: "root-es", KID_NEXT: "root-next"},
        "keys": {k.name: {"alg": k.alg, "thumbprint": k.thumbprint,
                          "private_jwk": dict(sorted(k.private.to_jwk().items()))}
                 for k in ALL_KEYS},
    }


# --- checking every case against the SDK ------------------------------------------------------


def run_step(verifier: Verifier, step: dict[str, Any]) -> dict[str, Any]:
    """One step through the SDK, its outcome in the shape of ``expected``."""
    try:
        if step["op"] == "update_revocations":
            return {"replaced": verifier.update_revocations(step["token"])}
        return run_verify(verifier, step)
    except VerificationError as exc:
        return {"error": {"code": exc.code, "link": exc.link}}


def run_verify(verifier: Verifier, step: dict[str, Any]) -> dict[str, Any]:
    r = step["request"]
    try:
        request = Request(r["res"], r["act"], r.get("ctx"))
    except ValueError:
        return INVALID_REQUEST
    d = verifier.verify(step["chain"], request, pop=step["pop"])
    return {"decision": {"principals": list(d.principals), "subject": d.subject,
                         "jtis": list(d.jtis), "kid": d.kid, "expires_at": d.expires_at}}


def check_case(case: dict[str, Any]) -> list[str]:
    """Run one case through the SDK; the differences from its expectations."""
    if "steps" not in case:
        try:
            TrustBundle.from_jwks(case["bundle"])
            actual: dict[str, Any] = {"valid": True}
        except ValueError:
            actual = {"valid": False}
        return [] if actual == case["expected"] else [f"{case['id']}: got {actual}"]
    s = case["settings"]
    clock = [float(s["now"])]
    verifier = Verifier(TrustBundle.from_jwks(case["bundle"]), audience=s["audience"],
                        leeway=s["leeway"], pop_window=s["pop_window"],
                        max_lifetime=s["max_lifetime"], clock=lambda: clock[0],
                        require_revocations=s["require_revocations"])
    problems = []
    for number, step in enumerate(case["steps"]):
        clock[0] = float(step.get("now", s["now"]))
        actual = run_step(verifier, step)
        if actual != step["expected"]:
            problems.append(f"{case['id']} step {number}: expected {step['expected']}, "
                            f"SDK gave {actual}")
    return problems


def write(out: Path, name: str, obj: Any) -> None:
    text = json.dumps(obj, indent=1, ensure_ascii=False) + "\n"
    (out / name).write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent.parent / "tests" / "vectors")
    args = parser.parse_args(argv)

    groups = [valid_group(), invalid_group(), pop_group(), uses_group(), revocation_group(),
              bundle_group()]
    problems: list[str] = []
    seen: set[str] = set()
    codes: set[str] = set()
    for group in groups:
        for case in group.cases:
            if case["id"] in seen:
                problems.append(f"duplicate case id {case['id']}")
            seen.add(case["id"])
            problems.extend(check_case(case))
            for step in case.get("steps", []):
                if "error" in step["expected"]:
                    codes.add(step["expected"]["error"]["code"])
    missing = CODES - codes
    if missing:
        problems.append(f"no vector for the codes {sorted(missing)}")
    if problems:
        print("vectors NOT written; the SDK disagrees with these expectations:", file=sys.stderr)
        for problem in problems:
            print("  " + problem, file=sys.stderr)
        return 1

    args.out.mkdir(parents=True, exist_ok=True)
    for group in groups:
        write(args.out, group.name + ".json", {
            "description": group.description, "format": "Mandate v1", "cases": group.cases})
    write(args.out, "keys.json", keys_file())
    total = sum(len(g.cases) for g in groups)
    print(f"wrote {total} cases in {len(groups)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
