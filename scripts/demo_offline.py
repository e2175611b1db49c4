#!/usr/bin/env python3
"""Mandate in one run, offline: a root credential is issued, narrowed twice by
agents with their own keys, used with proofs of possession, and checked by a
service — including the refusals that matter.

The root key here is a software key; with the signer daemon it lives in the
HSM. Exits non-zero if any step does not behave as shown.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import time

from verifier_sdk import (
    Holder,
    Request,
    TrustBundle,
    VerificationError,
    Verifier,
    decode_unverified,
    issue_root,
    make_pop,
    make_revocation_list,
    new_jti,
)

SERVICE = "payments-api"


def step(title: str) -> None:
    print(f"\n== {title}")


class Checks:
    """Runs each verification and counts the ones that did not behave as shown."""

    def __init__(self) -> None:
        self.failures = 0

    def allowed(self, verifier: Verifier, chain: str, holder: Holder, req: Request,
                what: str) -> None:
        try:
            d = verifier.verify(chain, req, pop=holder.prove(chain, req, aud=SERVICE))
        except VerificationError as exc:
            self.failures += 1
            print(f"  FAIL  {what}: expected allowed, got {exc}")
            return
        print(f"  allow {what}  [{' → '.join(d.principals)}]")

    def denied(self, verifier: Verifier, chain: str, req: Request, pop: str | None, *,
               code: str, what: str) -> None:
        try:
            verifier.verify(chain, req, pop=pop)
        except VerificationError as exc:
            ok = exc.code == code
            self.failures += not ok
            print(f"  {'deny ' if ok else 'FAIL '} {what}\n        {exc}")
            return
        self.failures += 1
        print(f"  FAIL  {what}: expected {code}, but it was allowed")


def main() -> int:
    now = int(time.time())
    checks = Checks()
    step("Provision: a root key and the trust bundle services load")
    root = Holder.generate()
    bundle = TrustBundle.from_jwks({"keys": [{**root.public_jwk, "kid": "root-1", "alg": "EdDSA"}]})
    print(f"  root key kid=root-1 thumbprint={root.thumbprint}")

    support, refund, helper, thief = (Holder.generate() for _ in range(4))

    step("Delegate: the orchestrator gives the support agent refunds ≤ 50.00, 5 minutes")
    chain = issue_root(
        alg=root.alg, kid="root-1", sign=root.sign,
        iss="spiffe://acme.example/orchestrator", sub="agent:support",
        holder_jwk=support.public_jwk,
        cap=[{"res": "api/payments/refunds/*", "act": ["post"], "if": {"amount": {"le": 5000}}}],
        ttl=300, dpt=2, aud=[SERVICE], now=now,
    )

    step("Attenuate offline: support → refund agent, order o-123 only, 2 minutes")
    chain = support.attenuate(
        chain, sub="agent:refund", holder_jwk=refund.public_jwk,
        cap=[{"res": "api/payments/refunds/o-123", "act": ["post"],
              "if": {"amount": {"le": 5000}}}],
        ttl=120, dpt=1, now=now,
    )

    step("Attenuate again: refund agent → helper, exactly 4999, one use")
    chain = refund.attenuate(
        chain, sub="agent:refund-helper", holder_jwk=helper.public_jwk,
        cap=[{"res": "api/payments/refunds/o-123", "act": ["post"],
              "if": {"amount": {"eq": 4999}}}],
        ttl=60, dpt=0, use=1, now=now,
    )
    for i, (_, payload) in enumerate(decode_unverified(chain)):
        print(f"  link {i}: {payload['iss']} → {payload['sub']}  exp in {payload['exp'] - now}s"
              f"  dpt={payload['dpt']}  caps={len(payload['cap'])}")

    service = Verifier(bundle, audience=SERVICE)
    step("Verify at the payments service")
    refund_ok = Request("api/payments/refunds/o-123", "post", {"amount": 4999})
    checks.allowed(service, chain, helper, refund_ok, "a 49.99 refund on o-123")

    step("The refusals that matter")
    checks.denied(service, chain, refund_ok, helper.prove(chain, refund_ok, aud=SERVICE),
                  code="uses_exhausted", what="a second refund with the one-use credential")
    wider = Request("api/payments/refunds/o-123", "post", {"amount": 5000})
    checks.denied(service, chain, wider, helper.prove(chain, wider, aud=SERVICE),
                  code="denied", what="a wider amount")
    other = Request("api/payments/refunds/o-9", "post", {"amount": 4999})
    checks.denied(service, chain, other, helper.prove(chain, other, aud=SERVICE),
                  code="denied", what="another order")
    # A thief with the chain but not the helper's key signs the PoP with its own key
    # (Holder.prove refuses: the thief is not the leaf holder).
    leaf = chain.rsplit("~", 1)[1]
    ath = base64.urlsafe_b64encode(hashlib.sha256(leaf.encode()).digest()).rstrip(b"=").decode()
    stolen_pop = make_pop(alg=thief.alg, sign=thief.sign, leaf_hash=ath, request=refund_ok,
                          aud=SERVICE, iat=now, jti=new_jti())
    checks.denied(service, chain, refund_ok, stolen_pop,
                  code="pop_invalid", what="a stolen chain used without the holder's key")

    late = Verifier(bundle, audience=SERVICE, clock=lambda: now + 400.0)
    late_pop = helper.prove(chain, refund_ok, aud=SERVICE, now=now + 400)
    checks.denied(late, chain, refund_ok, late_pop, code="expired",
                  what="the same credential 400 s later")

    step("Revoke the support agent's credential: everything below it dies")
    fresh = Verifier(bundle, audience=SERVICE)
    revoked_jti = decode_unverified(chain)[0][1]["jti"]
    fresh.update_revocations(make_revocation_list(
        alg=root.alg, kid="root-1", sign=root.sign, iss="spiffe://acme.example/signer",
        seq=1, iat=now, exp=now + 3600, revoked=[revoked_jti],
    ))
    checks.denied(fresh, chain, refund_ok, helper.prove(chain, refund_ok, aud=SERVICE),
                  code="revoked", what="any use after revocation")

    failures = checks.failures
    print("\nall steps behaved as shown" if not failures else f"\n{failures} step(s) misbehaved")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
