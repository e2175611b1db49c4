"""Clocks that disagree: the signer, holders and verifiers each on their own
clock (spec §5 PoP ``iat``, §7 list freshness, §8 step 6 ``nbf``/``exp``).

The signer is the daemon's issuer with a SoftHSM2 key, its state store and
audit log, in this process with its clock injected: the issuer is the only
part of the daemon whose clock reaches a token (``iat``/``nbf``/``exp`` of a
link, ``iat``/``exp`` of a revocation list), so an offset given to it is the
skew a verifier sees. Verifiers, their replay stores and holders get clocks of
their own; nobody sleeps.

Time is written from the verifier's side: ``T0`` is when the verifier
receives a link, and a signer "ahead by 31" wrote ``nbf = T0 + 31``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hsm_fixtures import SoftHsm
from test_server import ORCH, POLICY, REFUND, REFUND_CAP, TOKEN

from signer._audit import AuditLog
from signer._issuer import REVOCATION_MARGIN_S, Issuer
from signer._model import DelegateRequest
from signer._pkcs11 import Pkcs11KeyStore
from signer._policy import Policy
from signer._state import StateStore
from verifier_sdk import (
    Holder,
    MemoryReplayStore,
    Request,
    TrustBundle,
    VerificationError,
    Verifier,
    decode_unverified,
)

AUD = "payments-api"
T0 = 1_800_000_000  # the verifier's clock when a link arrives
LEEWAY = 30  # the verifier's default, spelled out
POP_WINDOW = 60
TTL = 300  # of the links the signer issues here
LIST_TTL = 120  # of the revocation lists it signs: shorter than a link's life here


@dataclass
class Clock:
    """A clock that moves only when told to."""

    now: float

    def __call__(self) -> float:
        return self.now


@dataclass
class Signer:
    issuer: Issuer
    clock: Clock
    bundle: TrustBundle

    def delegate(self, *, at: float, holder: Holder, ttl: int = TTL) -> str:
        """A root link for ``holder`` signed when the signer's clock reads ``at``."""
        self.clock.now = at
        jwk = holder.public_jwk
        issued = self.issuer.delegate(ORCH, DelegateRequest(
            sub="agent:support/refund-7", holder_jwk=jwk, caps=(REFUND_CAP,), ttl=ttl,
            aud=(AUD,), dpt=1, idempotency_key=str(uuid.uuid4())))
        return issued.chain

    def revoke(self, chain: str, *, at: float) -> str:
        """Revoke the root link of ``chain`` at signer time ``at``; the list then signed."""
        self.clock.now = at
        jti = decode_unverified(chain)[0][1]["jti"]
        return self.issuer.revoke(ORCH, [jti], reason="clock test").token


@pytest.fixture(scope="module")
def signer(hsm: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signer]:
    directory = tmp_path_factory.mktemp("clock-signer")
    policy_file = directory / "policy.toml"
    policy_file.write_text(POLICY, encoding="utf-8")
    token = hsm.open(TOKEN)
    state = StateStore(directory / "state.db")
    audit = AuditLog(directory / "audit.db", signer=None)
    # The key's window opens long before any signer time used here.
    clock = Clock(T0 - 86_400)
    issuer = Issuer(policy=Policy.load(policy_file), keys=Pkcs11KeyStore(token), state=state,
                    audit=audit, list_issuer="mandate-signer-clock", list_ttl_s=LIST_TTL,
                    clock=clock)
    try:
        issuer.add_key(f"clock-{uuid.uuid4().hex[:12]}", "EdDSA")
        yield Signer(issuer, clock, TrustBundle.from_jwks(issuer.trust_bundle()))
    finally:
        audit.close()
        state.close()
        token.close()


def verifier_at(signer: Signer, clock: Clock, *, require_revocations: bool = False
                ) -> Verifier:
    """A verifier (and its replay store) on ``clock``."""
    return Verifier(signer.bundle, audience=AUD, leeway=LEEWAY, pop_window=POP_WINDOW,
                    clock=clock, replay_store=MemoryReplayStore(clock=clock),
                    require_revocations=require_revocations)


def outcome(verifier: Verifier, chain: str, pop: str, req: Request = REFUND
            ) -> tuple[str, int | None] | None:
    """None if the chain verifies, else the (code, link) it is refused with."""
    try:
        verifier.verify(chain, req, pop=pop)
    except VerificationError as exc:
        return exc.code, exc.link
    return None


# --- the signer's clock against the verifier's: nbf and exp (§8 step 6) ---------------

@pytest.mark.parametrize(
    ("skew", "at", "expected"),
    [
        # Ahead: nbf is in the verifier's future.
        (LEEWAY, 0, None),
        (LEEWAY + 1, 0, ("not_yet_valid", 0)),
        (LEEWAY + 1, 1, None),  # early, not broken: a second later it is good
        (LEEWAY, TTL + LEEWAY + LEEWAY - 1, None),  # and it lives the skew longer
        (LEEWAY, TTL + LEEWAY + LEEWAY, ("expired", 0)),
        # Behind: exp comes early.
        (-LEEWAY, TTL - 1, None),  # the whole ttl is honoured
        (-LEEWAY, TTL, ("expired", 0)),
        (-(LEEWAY + 1), TTL - 1, ("expired", 0)),  # beyond the leeway: cut short
        (-(TTL + LEEWAY - 1), 0, None),
        (-(TTL + LEEWAY), 0, ("expired", 0)),  # dead on arrival
        (0, TTL + LEEWAY - 1, None),
        (0, TTL + LEEWAY, ("expired", 0)),
    ],
    ids=[
        "ahead-by-leeway-usable-on-arrival",
        "ahead-by-leeway+1-not-yet-valid",
        "ahead-by-leeway+1-valid-a-second-later",
        "ahead-by-leeway-lives-until-exp+leeway",
        "ahead-by-leeway-expired-at-exp+leeway",
        "behind-by-leeway-serves-its-whole-ttl",
        "behind-by-leeway-expired-at-ttl",
        "behind-by-leeway+1-cut-short",
        "behind-by-ttl+leeway-1-still-usable",
        "behind-by-ttl+leeway-dead-on-arrival",
        "no-skew-last-second",
        "no-skew-expired",
    ],
)
def test_a_link_from_a_skewed_signer(signer: Signer, skew: int, at: int,
                                     expected: tuple[str, int] | None) -> None:
    holder = Holder.generate()
    chain = signer.delegate(at=T0 + skew, holder=holder)
    clock = Clock(T0 + at)
    pop = holder.prove(chain, REFUND, aud=AUD, now=clock.now)
    assert outcome(verifier_at(signer, clock), chain, pop) == expected


@pytest.mark.parametrize(
    ("holder_skew", "expected"),
    [
        (LEEWAY, None),
        (LEEWAY + 1, ("not_yet_valid", 1)),
        (-LEEWAY, None),
        (-(LEEWAY + 1), ("expired", 1)),
    ],
    ids=["ahead-by-leeway", "ahead-by-leeway+1", "behind-by-leeway", "behind-by-leeway+1"],
)
def test_a_link_made_offline_by_a_holder_with_a_skewed_clock(
        signer: Signer, holder_skew: int, expected: tuple[str, int] | None) -> None:
    """A holder attenuates on its own clock (nbf = its now, exp = its now + ttl);
    the verifier checks at the child's last second as counted from T0."""
    parent, child = Holder.generate(), Holder.generate()
    chain = signer.delegate(at=T0 - 1, holder=parent)
    child_ttl = 60
    chain = parent.attenuate(chain, sub="agent:helper", holder_jwk=child.public_jwk,
                             cap=[REFUND_CAP], ttl=child_ttl, dpt=0, now=T0 + holder_skew)
    at = T0 if holder_skew > 0 else T0 + child_ttl - 1
    clock = Clock(at)
    pop = child.prove(chain, REFUND, aud=AUD, now=at)
    assert outcome(verifier_at(signer, clock), chain, pop) == expected


# --- the holder's clock against the verifier's: PoP iat (§5) ----------------------------

@pytest.mark.parametrize(
    ("holder_skew", "expected"),
    [
        (POP_WINDOW, None),
        (POP_WINDOW + 1, ("pop_invalid", None)),
        (-POP_WINDOW, None),
        (-(POP_WINDOW + 1), ("pop_invalid", None)),
    ],
    ids=["ahead-by-window", "ahead-by-window+1", "behind-by-window", "behind-by-window+1"],
)
def test_a_pop_from_a_holder_with_a_skewed_clock(signer: Signer, holder_skew: int,
                                                 expected: tuple[str, None] | None) -> None:
    """|now − iat| ≤ pop_window, with no leeway on top."""
    holder = Holder.generate()
    chain = signer.delegate(at=T0 - 100, holder=holder)
    pop = holder.prove(chain, REFUND, aud=AUD, now=T0 + holder_skew)
    assert outcome(verifier_at(signer, Clock(T0)), chain, pop) == expected


@pytest.mark.parametrize("holder_skew", [POP_WINDOW, -POP_WINDOW], ids=["ahead", "behind"])
def test_a_skewed_pop_cannot_be_replayed_at_any_moment_it_is_valid(signer: Signer,
                                                                  holder_skew: int) -> None:
    """The replay record (ttl 2 × pop_window + leeway) outlives the PoP's whole
    window however far within it the holder's clock is: first use at the
    window's first second, the replay at its last."""
    holder = Holder.generate()
    chain = signer.delegate(at=T0 - 200, holder=holder)
    iat = T0 + holder_skew
    pop = holder.prove(chain, REFUND, aud=AUD, now=iat)
    clock = Clock(iat - POP_WINDOW)
    verifier = verifier_at(signer, clock)
    assert outcome(verifier, chain, pop) is None
    clock.now = iat + POP_WINDOW
    assert outcome(verifier, chain, pop) == ("replayed", None)
    clock.now = iat + POP_WINDOW + 1
    assert outcome(verifier, chain, pop) == ("pop_invalid", None)
    # The twin: a fresh PoP at that last moment is accepted.
    fresh = holder.prove(chain, REFUND, aud=AUD, now=iat + POP_WINDOW)
    clock.now = iat + POP_WINDOW
    assert outcome(verifier, chain, fresh) is None


# --- revocation lists under skew (§7) ------------------------------------------------------

@pytest.mark.parametrize(
    ("skew", "at", "expected"),
    [
        (-LEEWAY, LIST_TTL - 1, ("revoked", 0)),  # fresh for its whole ttl
        (-LEEWAY, LIST_TTL, ("revocation_stale", None)),
        (-(LEEWAY + 1), LIST_TTL - 1, ("revocation_stale", None)),  # cut short
        # Ahead: iat in the verifier's future; §7 checks only exp + leeway.
        (LEEWAY + 1, 0, ("revoked", 0)),
        (LEEWAY + 1, LIST_TTL + 2 * LEEWAY, ("revoked", 0)),
        (LEEWAY + 1, LIST_TTL + 2 * LEEWAY + 1, ("revocation_stale", None)),
    ],
    ids=[
        "behind-by-leeway-fresh-for-its-ttl",
        "behind-by-leeway-stale-at-ttl",
        "behind-by-leeway+1-stale-early",
        "ahead-by-leeway+1-accepted-on-arrival",
        "ahead-by-leeway+1-fresh-until-exp+leeway",
        "ahead-by-leeway+1-stale-after",
    ],
)
def test_a_revocation_list_from_a_skewed_signer(signer: Signer, skew: int, at: int,
                                                expected: tuple[str, int | None]) -> None:
    """The list is signed when the signer's clock reads T0 + skew and loaded at
    T0; the revoked chain (alive for the verifier throughout) is checked ``at``
    seconds later: ``revoked`` while the list is fresh, ``revocation_stale``
    once the verifier's clock reaches the list's exp + leeway."""
    holder = Holder.generate()
    chain = signer.delegate(at=T0 - 100, holder=holder, ttl=600)
    token = signer.revoke(chain, at=T0 + skew)
    clock = Clock(T0)
    verifier = verifier_at(signer, clock, require_revocations=True)
    assert verifier.update_revocations(token)
    clock.now = T0 + at
    pop = holder.prove(chain, REFUND, aud=AUD, now=clock.now)
    assert outcome(verifier, chain, pop) == expected


@pytest.mark.parametrize(
    ("skew", "forgotten"),
    [(REVOCATION_MARGIN_S - LEEWAY, False), (REVOCATION_MARGIN_S - LEEWAY + 1, True)],
    ids=["ahead-by-margin-leeway", "ahead-by-margin-leeway+1"],
)
def test_how_far_ahead_a_signer_may_run_before_revocations_end_too_early(
        signer: Signer, skew: int, forgotten: bool) -> None:
    """Published lists keep a revoked jti until the signer's clock passes the
    link's exp + REVOCATION_MARGIN_S; a verifier accepts the link until its own
    clock reaches exp + leeway. So a revocation holds to the link's end for
    every verifier the signer is at most REVOCATION_MARGIN_S − leeway ahead of;
    beyond that, a list signed in the link's last second no longer names it."""
    holder, other = Holder.generate(), Holder.generate()
    issued_at = T0  # on the signer's clock
    chain = signer.delegate(at=issued_at, holder=holder)
    spare = signer.delegate(at=issued_at, holder=other)
    signer.revoke(chain, at=issued_at + 1)
    # The verifier's last second with the link alive: exp + leeway − 1 on its clock ...
    last = issued_at + TTL + LEEWAY - 1
    # ... when the signer's clock reads ``skew`` more, and signs another list.
    token = signer.revoke(spare, at=last + skew)
    clock = Clock(last)
    verifier = verifier_at(signer, clock, require_revocations=True)
    assert verifier.update_revocations(token)
    pop = holder.prove(chain, REFUND, aud=AUD, now=last)
    assert outcome(verifier, chain, pop) == (None if forgotten else ("revoked", 0))
