"""The issuer, the daemon's pure core (DESIGN.md "The signer daemon"):
request → policy → claims → sign → audit, idempotency, deadlines, key choice
and rotation, revocation rights and the signed revocation list.

Real parts: a policy parsed from TOML, SQLite state and audit files in
``tmp_path``, in-memory keys; a fake clock. Every link and list is checked
with ``verifier_sdk`` against the issuer's own trust bundle.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signer._audit import AuditLog, AuditRecord
from signer._errors import (
    InvalidRequest,
    LimitReached,
    NotAllowed,
    NotFound,
    PolicyDenied,
    TimedOut,
    Unauthenticated,
    Unavailable,
)
from signer._issuer import MAX_TIME, REVOCATION_MARGIN_S, Issued, Issuer, request_digest
from signer._keys import KeySigner, MemoryKeyStore
from signer._model import DelegateRequest
from signer._policy import Policy
from signer._state import IssuedLink, StateStore
from verifier_sdk import (
    Decision,
    Holder,
    Request,
    TrustBundle,
    VerificationError,
    Verifier,
    decode_unverified,
    new_jti,
    verify_revocation_list,
)
from verifier_sdk._encoding import b64url_decode, sha256_b64
from verifier_sdk._revocation import MAX_REVOCATION_LIST_BYTES

T0 = 1_800_000_000  # the daemon's clock at the start of every test
AUD = "orders-api"
LIST_ISSUER = "mandate-signer"

ORCH = "spiffe://acme.example/svc/orchestrator"
REFUNDER = "spiffe://acme.example/svc/refunds"
PINNED = "spiffe://acme.example/svc/pinned"  # its grant signs with k1 only
NEXT = "spiffe://acme.example/svc/next"  # its grant signs with k2 only
ADMIN = "spiffe://acme.example/ops/oncall"
STRANGER = "spiffe://acme.example/svc/stranger"

POLICY = f"""
admins = ["{ADMIN}"]

[[grant]]
caller = "{ORCH}"
subjects = ["agent:support/*"]
caps = [
  {{ res = "api/orders/**", act = ["read", "write"] }},
  {{ res = "api/refunds/*", act = ["post"], if = {{ amount = {{ le = 5000 }} }} }},
]
max_ttl = 600
max_dpt = 15
audiences = ["{AUD}", "payments-api"]

[[grant]]
caller = "{REFUNDER}"
subjects = ["agent:refund/*"]
caps = [{{ res = "api/refunds/*", act = ["post"], if = {{ amount = {{ le = 5000 }} }} }}]
max_ttl = 300
max_dpt = 0
max_use = 3

[[grant]]
caller = "{PINNED}"
subjects = ["agent:pinned/*"]
caps = [{{ res = "reports/**", act = ["read"] }}]
max_ttl = 600
max_dpt = 0
key = "k1"

[[grant]]
caller = "{NEXT}"
subjects = ["agent:next/*"]
caps = [{{ res = "reports/**", act = ["read"] }}]
max_ttl = 600
max_dpt = 0
key = "k2"
"""
MAX_TTL = 600  # the longest max_ttl above: how long a retiring key must stay

ORDERS_READ = {"res": "api/orders/*", "act": ["read"]}
REFUND = {"res": "api/refunds/o-1", "act": ["post"], "if": {"amount": {"le": 100}}}
REPORTS = {"res": "reports/2027/**", "act": ["read"]}
READ_ORDER = Request("api/orders/o-1", "read")

HOLDER = Holder.generate()

BASE: dict[str, dict[str, Any]] = {
    ORCH: {"sub": "agent:support/a1", "caps": (ORDERS_READ,), "ttl": 300, "aud": (AUD,),
           "dpt": 1},
    REFUNDER: {"sub": "agent:refund/r1", "caps": (REFUND,), "ttl": 120, "use": 1},
    PINNED: {"sub": "agent:pinned/p1", "caps": (REPORTS,), "ttl": 120},
    NEXT: {"sub": "agent:next/n1", "caps": (REPORTS,), "ttl": 120},
}


def request(caller: str = ORCH, **changes: Any) -> DelegateRequest:
    """The standard request of ``caller``'s grant (ORCH's for others), changed."""
    fields: dict[str, Any] = {"holder_jwk": HOLDER.public_jwk,
                              "idempotency_key": uuid.uuid4().hex,
                              **BASE.get(caller, BASE[ORCH])}
    fields.update(changes)
    return DelegateRequest(**fields)


# --- test parts --------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingSigner:
    """A memory key that counts its signatures and can be made slow."""

    def __init__(self, inner: KeySigner, store: CountingKeyStore) -> None:
        self._inner = inner
        self._store = store

    @property
    def kid(self) -> str:
        return self._inner.kid

    @property
    def alg(self) -> str:
        return self._inner.alg

    @property
    def public_jwk(self) -> dict[str, Any]:
        return self._inner.public_jwk

    def sign(self, data: bytes) -> bytes:
        time.sleep(self._store.delay_s)
        with self._store.lock:
            self._store.signatures += 1
        return self._inner.sign(data)


class CountingKeyStore:
    """MemoryKeyStore whose signers count (and optionally delay) signatures."""

    def __init__(self) -> None:
        self._inner = MemoryKeyStore()
        self.signatures = 0
        self.delay_s = 0.0
        self.lock = threading.Lock()

    def generate(self, kid: str, alg: str) -> KeySigner:
        return self._inner.generate(kid, alg)

    def signer(self, kid: str) -> KeySigner:
        return CountingSigner(self._inner.signer(kid), self)


class BrokenAudit:
    """An audit store that can go down: then every append fails as AuditLog's would."""

    def __init__(self) -> None:
        self.down = False
        self.failed = 0

    def append_many(self, events: Sequence[tuple[str, Mapping[str, Any]]]) -> list[object]:
        if self.down:
            self.failed += 1
            raise Unavailable("audit store failed: disk I/O error")
        return [None] * len(events)


class RecordFailsState(StateStore):
    """A state store whose write of an issued link fails (disk full)."""

    def record_issued(self, *links: IssuedLink) -> None:
        raise Unavailable("state store failed: database or disk is full")


@dataclass
class Env:
    issuer: Issuer
    clock: Clock
    keys: CountingKeyStore
    state: StateStore
    audit: AuditLog

    def records(self, event: str) -> list[AuditRecord]:
        return self.audit.records(event=event)

    def bundle(self) -> TrustBundle:
        return TrustBundle.from_jwks(self.issuer.trust_bundle())

    def verifier(self, *, at: float | None = None) -> Verifier:
        now = self.clock.now if at is None else at
        return Verifier(self.bundle(), audience=AUD, clock=lambda: now)

    def verify(self, chain: str, *, at: float | None = None,
               verifier: Verifier | None = None) -> Decision:
        now = self.clock.now if at is None else at
        verifier = verifier or self.verifier(at=now)
        pop = HOLDER.prove(chain, READ_ORDER, aud=AUD, now=now)
        return verifier.verify(chain, READ_ORDER, pop=pop)

    def nothing_issued(self, caller: str, req: DelegateRequest) -> bool:
        return (self.state.by_idempotency_key(caller, req.idempotency_key) is None
                and not self.records("delegate"))


Build = Callable[..., Env]


@pytest.fixture
def build(tmp_path: Path) -> Iterator[Build]:
    """Make an issuer over fresh files; key k1 is added at T0 - 1000."""
    opened: list[tuple[StateStore, AuditLog]] = []

    def make(*, list_ttl_s: int = 3600, audit: Any = None,
             state_cls: type[StateStore] = StateStore) -> Env:
        n = len(opened)
        clock = Clock(T0 - 1000)
        keys = CountingKeyStore()
        state = state_cls(tmp_path / f"state{n}.db")
        log = AuditLog(tmp_path / f"audit{n}.db", signer=None)
        opened.append((state, log))
        issuer = Issuer(policy=Policy.from_toml(POLICY), keys=keys, state=state,
                        audit=log if audit is None else audit, list_issuer=LIST_ISSUER,
                        list_ttl_s=list_ttl_s, clock=clock)
        issuer.add_key("k1", "EdDSA")
        clock.now = T0
        return Env(issuer, clock, keys, state, log)

    yield make
    for state, log in opened:
        log.close()
        state.close()


@pytest.fixture
def env(build: Build) -> Env:
    return build()


# --- a delegation ------------------------------------------------------------------


def test_a_delegated_link_verifies_against_the_trust_bundle(env: Env) -> None:
    issued = env.issuer.delegate(ORCH, request())

    decision = env.verify(issued.chain)
    assert decision.principals == (ORCH, "agent:support/a1")
    assert decision.kid == issued.kid == "k1"
    assert decision.jtis == (issued.jti,)


def test_the_same_link_fails_against_another_daemons_bundle(env: Env, build: Build) -> None:
    """Tampered twin: another issuer's bundle has a key k1 too, but not this one."""
    issued = env.issuer.delegate(ORCH, request())
    other = build()

    with pytest.raises(VerificationError) as caught:
        env.verify(issued.chain, verifier=other.verifier())
    assert caught.value.code == "bad_signature"


def test_the_daemon_sets_iss_times_and_a_fresh_jti(env: Env) -> None:
    env.clock.now = T0 + 0.75
    req = request(ttl=300, dpt=1)
    first = env.issuer.delegate(ORCH, req)
    second = env.issuer.delegate(ORCH, request())

    [(header, claims)] = decode_unverified(first.chain)
    assert header == {"alg": "EdDSA", "typ": "mandate+jwt", "kid": "k1"}
    assert claims["iss"] == ORCH  # the caller, never a value the request chose
    assert claims["sub"] == "agent:support/a1"
    assert claims["iat"] == claims["nbf"] == T0
    assert claims["exp"] == first.expires_at == T0 + 300
    assert claims["cnf"] == {"jwk": HOLDER.public_jwk}
    assert claims["cap"] == [ORDERS_READ]
    assert claims["aud"] == [AUD]
    assert claims["dpt"] == 1
    assert "use" not in claims
    assert claims["jti"] == first.jti
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", first.jti)
    assert second.jti != first.jti
    assert first.idempotent_replay is second.idempotent_replay is False


def test_the_audit_record_commits_the_link_before_it_leaves(env: Env) -> None:
    req = request()
    issued = env.issuer.delegate(ORCH, req)

    [record] = env.records("delegate")
    assert (record.caller, record.decision, record.sub) == (ORCH, "allow", req.sub)
    assert record.jti == issued.jti
    assert record.kid == "k1"
    assert record.link_hash == sha256_b64(issued.chain.encode("ascii"))
    assert record.request_digest == request_digest(ORCH, req)
    assert dict(record.detail) == {"exp": issued.expires_at}
    stored = env.state.issued(issued.jti)
    assert stored is not None
    assert (stored.caller, stored.chain, stored.exp) == (ORCH, issued.chain, issued.expires_at)


# --- denials -------------------------------------------------------------------------

DENIALS = [
    pytest.param(STRANGER, {}, "caller_unknown", id="caller-without-grant"),
    pytest.param(ORCH, {"sub": "agent:billing/b1"}, "subject_not_allowed", id="wrong-subject"),
    pytest.param(ORCH, {"caps": ({"res": "api/orders/o-1", "act": ["delete"]},)},
                 "capability_not_contained", id="action-beyond-ceiling"),
    pytest.param(ORCH, {"caps": ({"res": "api/**", "act": ["read"]},)},
                 "capability_not_contained", id="resource-wider-than-ceiling"),
    pytest.param(ORCH, {"ttl": 601}, "ttl_exceeds_max", id="ttl-one-over"),
    pytest.param(REFUNDER, {"dpt": 1}, "depth_exceeds_max", id="dpt-one-over"),
    pytest.param(ORCH, {"aud": None}, "audience_required", id="no-aud"),
    pytest.param(ORCH, {"aud": (AUD, "ledger")}, "audience_not_allowed", id="extra-aud"),
    pytest.param(REFUNDER, {"use": None}, "use_required", id="no-use"),
    pytest.param(REFUNDER, {"use": 4}, "use_exceeds_max", id="use-one-over"),
    pytest.param(PINNED, {"key": "k2"}, "key_not_allowed", id="other-key-than-grants"),
    pytest.param(NEXT, {}, "key_unavailable", id="grant-key-not-in-keyring"),
]


@pytest.mark.parametrize(("caller", "changes", "reason"), DENIALS)
def test_each_denial_is_audited_once_and_leaves_no_state(
    env: Env, caller: str, changes: dict[str, Any], reason: str
) -> None:
    req = request(caller, **changes)

    with pytest.raises(PolicyDenied) as caught:
        env.issuer.delegate(caller, req)

    assert caught.value.reason == reason
    [record] = env.records("deny")
    assert (record.caller, record.decision, record.reason) == (caller, "deny", reason)
    assert record.sub == req.sub
    assert record.request_digest == request_digest(caller, req)
    assert record.jti == record.link_hash == ""
    assert env.nothing_issued(caller, req)
    assert env.keys.signatures == 0


def test_a_denied_requests_idempotency_key_stays_free(env: Env) -> None:
    denied = request(ttl=601)
    with pytest.raises(PolicyDenied):
        env.issuer.delegate(ORCH, denied)

    issued = env.issuer.delegate(ORCH, dataclasses.replace(denied, ttl=600))

    assert issued.idempotent_replay is False
    env.verify(issued.chain)


# --- failures: fail closed -----------------------------------------------------------


def test_a_closed_audit_log_means_no_link(env: Env) -> None:
    env.audit.close()
    req = request()

    with pytest.raises(Unavailable):
        env.issuer.delegate(ORCH, req)

    assert env.state.by_idempotency_key(ORCH, req.idempotency_key) is None


@pytest.mark.parametrize(("caller", "changes"), [
    pytest.param(ORCH, {}, id="allowed"),
    pytest.param(ORCH, {"ttl": 601}, id="denied"),
])
def test_an_audit_store_that_is_down_fails_closed(
    build: Build, caller: str, changes: dict[str, Any]
) -> None:
    """Neither a link nor a denial is answered without its record: Unavailable."""
    audit = BrokenAudit()
    env = build(audit=audit)
    audit.down = True
    req = request(caller, **changes)

    with pytest.raises(Unavailable):
        env.issuer.delegate(caller, req)

    assert audit.failed == 1
    assert env.state.by_idempotency_key(caller, req.idempotency_key) is None


def test_a_closed_state_store_means_no_link(env: Env) -> None:
    env.state.close()

    with pytest.raises(Unavailable):
        env.issuer.delegate(ORCH, request())

    assert env.records("delegate") == []


def test_a_state_write_that_fails_returns_no_link(build: Build) -> None:
    env = build(state_cls=RecordFailsState)
    req = request()

    with pytest.raises(Unavailable):
        env.issuer.delegate(ORCH, req)

    assert env.state.by_idempotency_key(ORCH, req.idempotency_key) is None


# --- idempotency ---------------------------------------------------------------------


def test_a_retry_with_the_same_key_returns_the_same_link(env: Env) -> None:
    req = request()
    first = env.issuer.delegate(ORCH, req)
    env.clock.now += 30  # a late retry: the link is not re-made with new times

    again = env.issuer.delegate(ORCH, req)

    assert again == dataclasses.replace(first, idempotent_replay=True)
    assert first.idempotent_replay is False
    assert env.keys.signatures == 1
    assert len(env.records("delegate")) == 1


def test_the_same_key_for_another_request_is_refused(env: Env) -> None:
    req = request()
    first = env.issuer.delegate(ORCH, req)

    with pytest.raises(InvalidRequest, match="idempotency_key"):
        env.issuer.delegate(ORCH, dataclasses.replace(req, ttl=req.ttl - 1))

    assert env.keys.signatures == 1
    assert len(env.records("delegate")) == 1
    stored = env.state.by_idempotency_key(ORCH, req.idempotency_key)
    assert stored is not None
    assert stored.jti == first.jti


def test_idempotency_keys_belong_to_their_caller(env: Env) -> None:
    key = "retry-0001"
    mine = env.issuer.delegate(ORCH, request(idempotency_key=key))
    theirs = env.issuer.delegate(REFUNDER, request(REFUNDER, idempotency_key=key))

    assert not mine.idempotent_replay
    assert not theirs.idempotent_replay
    assert mine.jti != theirs.jti


def test_racing_retries_sign_exactly_one_link(env: Env) -> None:
    env.keys.delay_s = 0.05  # the first caller is still signing when the others arrive
    req = request()
    start = threading.Barrier(8)

    def call() -> Issued:
        start.wait(timeout=5)
        return env.issuer.delegate(ORCH, req)

    with futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = [f.result(timeout=10) for f in [pool.submit(call) for _ in range(8)]]

    assert len({r.chain for r in results}) == 1
    assert sorted(r.idempotent_replay for r in results) == [False] + [True] * 7
    assert env.keys.signatures == 1
    assert len(env.records("delegate")) == 1


# --- the deadline --------------------------------------------------------------------


def test_a_past_deadline_issues_nothing(env: Env) -> None:
    req = request()

    with pytest.raises(TimedOut):
        env.issuer.delegate(ORCH, req, deadline=time.monotonic() - 0.001)

    assert env.keys.signatures == 0
    assert env.nothing_issued(ORCH, req)


def test_a_signer_slower_than_the_deadline_issues_nothing(env: Env) -> None:
    env.keys.delay_s = 0.3
    req = request()

    with pytest.raises(TimedOut):
        env.issuer.delegate(ORCH, req, deadline=time.monotonic() + 0.1)

    assert env.keys.signatures == 1  # signed, then dropped: never recorded nor returned
    assert env.nothing_issued(ORCH, req)


def test_the_same_slow_signer_within_its_deadline_issues(env: Env) -> None:
    """Twin of the above: time enough, the link is issued."""
    env.keys.delay_s = 0.3

    issued = env.issuer.delegate(ORCH, request(), deadline=time.monotonic() + 10)

    env.verify(issued.chain)
    assert len(env.records("delegate")) == 1


# --- validation (the credential format's rules) ------------------------------------

OKP_X = HOLDER.public_jwk["x"]
INVALID = [
    pytest.param({"sub": ""}, id="empty-sub"),
    pytest.param({"sub": "agent:support/a\x00"}, id="sub-with-control-character"),
    pytest.param({"sub": "agent:support/" + "a" * 243}, id="sub-of-257-characters"),
    pytest.param({"holder_jwk": {"kty": "OKP", "crv": "Ed25519"}}, id="jwk-without-x"),
    pytest.param({"holder_jwk": {"kty": "OKP", "crv": "X25519", "x": OKP_X}},
                 id="jwk-wrong-curve"),
    pytest.param({"holder_jwk": {"kty": "OKP", "crv": "Ed25519", "x": OKP_X[:-2]}},
                 id="jwk-short-x"),
    pytest.param({"holder_jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}, id="jwk-rsa"),
    pytest.param({"caps": ()}, id="zero-caps"),
    pytest.param({"caps": tuple({"res": f"api/orders/o-{i}", "act": ["read"]}
                                for i in range(65))}, id="65-caps"),
    pytest.param({"caps": ({"res": "api//orders", "act": ["read"]},)}, id="malformed-cap"),
    pytest.param({"ttl": 0}, id="ttl-0"),
    pytest.param({"ttl": -60}, id="ttl-negative"),
    pytest.param({"ttl": True}, id="ttl-bool"),
    pytest.param({"dpt": 16}, id="dpt-16"),
    pytest.param({"dpt": -1}, id="dpt-negative"),
    pytest.param({"use": 0}, id="use-0"),
    pytest.param({"use": 2**31}, id="use-over-max"),
    pytest.param({"aud": ()}, id="aud-empty-list"),
    pytest.param({"aud": ("",)}, id="aud-empty-string"),
    pytest.param({"aud": ("a" * 257,)}, id="aud-257-characters"),
    pytest.param({"aud": tuple(f"svc-{i}" for i in range(17))}, id="aud-17-entries"),
    pytest.param({"idempotency_key": ""}, id="empty-idempotency-key"),
    pytest.param({"idempotency_key": "k" * 129}, id="idempotency-key-129-characters"),
]


@pytest.mark.parametrize("changes", INVALID)
def test_a_request_breaking_the_format_is_invalid(env: Env, changes: dict[str, Any]) -> None:
    req = request(**changes)

    with pytest.raises(InvalidRequest):
        env.issuer.delegate(ORCH, req)

    assert env.keys.signatures == 0
    assert env.nothing_issued(ORCH, req)


@pytest.mark.parametrize("changes", [
    pytest.param({"caps": tuple({"res": f"api/orders/o-{i}", "act": ["read"]}
                                for i in range(64))}, id="64-caps"),
    pytest.param({"ttl": 1}, id="ttl-1"),
    pytest.param({"dpt": 15}, id="dpt-15"),
    pytest.param({"dpt": 0}, id="dpt-0"),
    pytest.param({"use": 1}, id="use-1"),
    pytest.param({"idempotency_key": "k" * 128}, id="idempotency-key-128-characters"),
    pytest.param({"idempotency_key": "k"}, id="idempotency-key-1-character"),
])
def test_the_bounds_themselves_are_allowed(env: Env, changes: dict[str, Any]) -> None:
    """Twins of the rows above: one step inside each bound is signed."""
    issued = env.issuer.delegate(ORCH, request(**changes))

    env.verify(issued.chain)



def test_a_link_over_the_size_limit_is_refused_before_the_hsm_signs(env: Env) -> None:
    """Each capability is valid and within the grant, but 64 of them make a link
    over the 8 KiB every verifier accepts (spec §2): refused, nothing signed,
    nothing recorded; the twin with fewer capabilities is issued."""
    caps = (ORDERS_READ, *({"res": f"api/orders/{n:03d}-{'x' * 90}", "act": ["read"]}
                           for n in range(63)))

    with pytest.raises(InvalidRequest, match="over 8192 bytes"):
        env.issuer.delegate(ORCH, request(caps=caps))

    assert env.keys.signatures == 0
    assert env.records("delegate") == []
    issued = env.issuer.delegate(ORCH, request(caps=caps[:8]))
    assert len(issued.chain) <= 8192
    env.verify(issued.chain)

@pytest.mark.parametrize("caller", ["", "spiffe://acme.example/\x07bell", "x" * 257])
def test_a_caller_that_is_no_principal_is_unauthenticated(env: Env, caller: str) -> None:
    with pytest.raises(Unauthenticated):
        env.issuer.delegate(caller, request())
    assert env.records("delegate") == env.records("deny") == []


# --- key choice and rotation --------------------------------------------------------


def list_header(token: str) -> dict[str, Any]:
    header: dict[str, Any] = json.loads(b64url_decode(token.split(".", maxsplit=1)[0]))
    return header


def bundle_windows(env: Env) -> dict[str, tuple[Any, Any]]:
    return {k["kid"]: (k.get("nbf"), k.get("exp")) for k in env.issuer.trust_bundle()["keys"]}


def test_the_newest_active_key_signs(env: Env) -> None:
    env.clock.now = T0 + 10
    env.issuer.add_key("k2", "ES256")

    issued = env.issuer.delegate(ORCH, request())

    assert issued.kid == "k2"
    assert decode_unverified(issued.chain)[0][0]["alg"] == "ES256"
    env.verify(issued.chain)


def test_rotation_with_a_future_start(env: Env) -> None:
    start = T0 + 100
    new, old = env.issuer.rotate("k2", "EdDSA", not_before=start, max_link_ttl_s=MAX_TTL)

    assert (new.kid, new.nbf, new.exp) == ("k2", start, None)
    assert (old.kid, old.nbf, old.exp) == ("k1", T0 - 1000, start + MAX_TTL)
    assert bundle_windows(env) == {"k1": (T0 - 1000, start + MAX_TTL), "k2": (start, None)}
    keyed = [(r.kid, r.reason) for r in env.records("key")]
    assert keyed == [("k1", "generated"), ("k2", "generated"), ("k1", "retiring")]

    env.clock.now = start - 1  # the old key signs until the new one starts
    before = env.issuer.delegate(ORCH, request(ttl=MAX_TTL))
    env.clock.now = start
    after = env.issuer.delegate(ORCH, request(ttl=MAX_TTL))

    assert (before.kid, after.kid) == ("k1", "k2")
    assert env.issuer.active_key(start - 1).kid == "k1"
    assert env.issuer.active_key(start).kid == "k2"
    # Both verify against the one bundle, the old link until its very end.
    env.verify(before.chain, at=start + 10)
    env.verify(after.chain, at=start + 10)
    env.verify(before.chain, at=before.expires_at - 1)


@pytest.mark.parametrize("not_before", [
    pytest.param(MAX_TIME - 100, id="old-key-end-past-the-safe-range"),
    pytest.param(MAX_TIME + 1, id="start-past-the-safe-range"),
])
def test_a_rotation_past_the_safe_range_changes_nothing(env: Env, not_before: int) -> None:
    """Spec §2 bounds every time by 2**53 - 1: a start whose key windows would
    leave that range is refused before the HSM makes a key, and the bundle stays
    one every verifier loads."""
    before = bundle_windows(env)

    with pytest.raises(InvalidRequest, match="within 0"):
        env.issuer.rotate("k2", "EdDSA", not_before=not_before, max_link_ttl_s=MAX_TTL)

    assert bundle_windows(env) == before
    assert [r.reason for r in env.records("key")] == ["generated"]
    env.verify(env.issuer.delegate(ORCH, request()).chain)
    with pytest.raises(InvalidRequest):  # adding a key checks its start the same way
        env.issuer.add_key("k3", "EdDSA", not_before=MAX_TIME + 1)


def test_after_a_rotation_the_list_is_signed_again_by_the_new_key(env: Env) -> None:
    first = env.issuer.revocation_list()
    assert list_header(first.token)["kid"] == "k1"

    env.issuer.rotate("k2", "EdDSA", not_before=None, max_link_ttl_s=MAX_TTL)
    served = env.issuer.revocation_list()  # well before half the first list's life

    assert served.seq == first.seq + 1
    assert list_header(served.token)["kid"] == "k2"
    assert env.verifier().update_revocations(served.token) is True
    assert env.issuer.revocation_list() == served  # and kept while fresh


def test_a_list_ends_within_a_retiring_keys_window(env: Env) -> None:
    """A rotation that starts later leaves the old key active but gives it an end:
    the list it signed before may outlive that end, so it is signed again."""
    first = env.issuer.revocation_list()
    start = T0 + 100
    env.issuer.rotate("k2", "EdDSA", not_before=start, max_link_ttl_s=MAX_TTL)

    served = env.issuer.revocation_list()

    assert first.expires_at > start + MAX_TTL
    assert (served.seq, served.expires_at) == (first.seq + 1, start + MAX_TTL)
    assert list_header(served.token)["kid"] == "k1"
    assert env.verifier().update_revocations(served.token) is True


def test_a_link_that_would_outlive_a_retiring_key_is_denied(env: Env) -> None:
    start = T0 + 100
    env.issuer.rotate("k2", "EdDSA", not_before=start, max_link_ttl_s=MAX_TTL)
    env.clock.now = start + 200  # k1 ends at start + 600: 400 s are left
    too_long = request(PINNED, ttl=401)

    with pytest.raises(PolicyDenied) as caught:
        env.issuer.delegate(PINNED, too_long)

    assert caught.value.reason == "key_expiring"
    [record] = env.records("deny")
    assert (record.caller, record.reason) == (PINNED, "key_expiring")
    assert env.nothing_issued(PINNED, too_long)
    # Twin: a link ending exactly with the key is signed, and the bundle admits it.
    fits = env.issuer.delegate(PINNED, request(PINNED, ttl=400))
    assert fits.kid == "k1"
    assert fits.expires_at == start + MAX_TTL
    holder_request = Request("reports/2027/q1", "read")
    pop = HOLDER.prove(fits.chain, holder_request, aud=AUD, now=env.clock.now)
    env.verifier().verify(fits.chain, holder_request, pop=pop)


def test_a_grant_key_is_unavailable_until_it_starts(env: Env) -> None:
    with pytest.raises(PolicyDenied) as missing:
        env.issuer.delegate(NEXT, request(NEXT))
    start = T0 + 100
    env.issuer.rotate("k2", "EdDSA", not_before=start, max_link_ttl_s=MAX_TTL)
    with pytest.raises(PolicyDenied) as early:
        env.issuer.delegate(NEXT, request(NEXT))
    env.clock.now = start

    issued = env.issuer.delegate(NEXT, request(NEXT))

    assert missing.value.reason == early.value.reason == "key_unavailable"
    assert len(env.records("deny")) == 2
    assert issued.kid == "k2"


def test_the_key_a_request_names_is_the_key_that_signs(env: Env) -> None:
    """DelegateRequest.kid: "the kid to sign with"; ORCH's grant names no key."""
    start = T0 + 100
    env.issuer.rotate("k2", "EdDSA", not_before=start, max_link_ttl_s=MAX_TTL)
    env.clock.now = start + 10  # k2 is active; k1 is retiring but can still sign this

    issued = env.issuer.delegate(ORCH, request(key="k1", ttl=60))

    assert issued.kid == "k1"
    assert decode_unverified(issued.chain)[0][0]["kid"] == "k1"


def test_a_request_naming_a_key_not_in_the_keyring_is_denied(env: Env) -> None:
    req = request(key="k9")

    with pytest.raises(PolicyDenied) as caught:
        env.issuer.delegate(ORCH, req)

    assert caught.value.reason == "key_unavailable"
    assert env.nothing_issued(ORCH, req)


# --- revocation rights --------------------------------------------------------------


def test_a_caller_revokes_its_own_link(env: Env) -> None:
    issued = env.issuer.delegate(ORCH, request())
    verifier = env.verifier()
    env.verify(issued.chain, verifier=verifier)  # twin: valid before the revocation

    published = env.issuer.revoke(ORCH, [issued.jti], reason="agent compromised")

    assert verifier.update_revocations(published.token) is True
    with pytest.raises(VerificationError) as caught:
        env.verify(issued.chain, verifier=verifier)
    assert caught.value.code == "revoked"
    [record] = env.records("revoke")
    assert (record.caller, record.decision, record.reason) == (ORCH, "ok", "agent compromised")
    assert record.jti == issued.jti


def test_another_callers_link_is_not_allowed(env: Env) -> None:
    issued = env.issuer.delegate(ORCH, request())

    with pytest.raises(NotAllowed):
        env.issuer.revoke(REFUNDER, [issued.jti])

    assert env.state.revocation_list() is None
    assert env.records("revoke") == []
    env.verify(issued.chain)


def test_an_unknown_jti_is_not_found_for_a_caller(env: Env) -> None:
    with pytest.raises(NotFound):
        env.issuer.revoke(ORCH, [new_jti()])
    assert env.state.revocation_list() is None


def test_an_admin_revokes_any_jti_even_unknown_ones(env: Env) -> None:
    issued = env.issuer.delegate(ORCH, request())
    offline = new_jti()  # e.g. of a link attenuated offline: never seen here

    published = env.issuer.revoke(ADMIN, [issued.jti, offline])

    listed = verify_revocation_list(published.token, env.bundle())
    assert listed.revoked == {issued.jti, offline}
    assert listed.iss == LIST_ISSUER


@pytest.mark.parametrize("jtis", [
    pytest.param([], id="none"),
    pytest.param(["too-short"], id="short"),
    pytest.param(["a" * 65], id="65-characters"),
    pytest.param(["with/slash-0123456789"], id="not-base64url"),
])
def test_a_malformed_revocation_is_invalid(env: Env, jtis: list[str]) -> None:
    with pytest.raises(InvalidRequest):
        env.issuer.revoke(ADMIN, jtis)
    assert env.state.revocation_list() is None


def test_an_admin_revokes_many_links_at_once(env: Env) -> None:
    """Incident response: revoking 200 links in one call must work."""
    jtis = [new_jti() for _ in range(200)]

    published = env.issuer.revoke(ADMIN, jtis)

    assert verify_revocation_list(published.token, env.bundle()).revoked == set(jtis)


def test_a_revocation_that_would_overflow_the_list_is_refused(env: Env) -> None:
    """Every verifier refuses a list over 1 MiB (spec §7), so one that would grow
    past it is refused whole: nothing recorded, the list as it was."""
    bulk = [new_jti() + "A" * 42 for _ in range(11_000)]  # 64 characters each
    published = env.issuer.revoke(ADMIN, bulk)
    assert len(published.token) > 950_000
    records = len(env.records("revoke"))
    more = [new_jti() + "B" * 42 for _ in range(1_000)]

    with pytest.raises(LimitReached, match="1048576"):
        env.issuer.revoke(ADMIN, more)

    assert env.issuer.revocation_list() == published
    assert len(env.records("revoke")) == records
    # Twin: what still fits is revoked, and the list stays one verifiers accept.
    fits = env.issuer.revoke(ADMIN, more[:100])
    assert len(fits.token) <= MAX_REVOCATION_LIST_BYTES
    assert more[99] in verify_revocation_list(fits.token, env.bundle()).revoked


# --- revocation lists ---------------------------------------------------------------


def test_seq_grows_with_each_revoke(env: Env) -> None:
    links = [env.issuer.delegate(ORCH, request()) for _ in range(3)]
    verifier = env.verifier()
    tokens = []

    seqs = []
    for link in links:
        published = env.issuer.revoke(ORCH, [link.jti])
        seqs.append(published.seq)
        tokens.append(published.token)
        assert verifier.update_revocations(published.token) is True

    assert len(seqs) == 3
    assert seqs == sorted(set(seqs))  # strictly increasing
    assert env.issuer.revocation_list().seq == seqs[-1]
    assert verify_revocation_list(tokens[-1], env.bundle()).revoked == {x.jti for x in links}
    with pytest.raises(VerificationError) as caught:  # twin: the older list is refused
        verifier.update_revocations(tokens[0])
    assert caught.value.code == "revocation_stale"


def test_the_list_verifies_only_against_its_own_bundle(env: Env, build: Build) -> None:
    published = env.issuer.revocation_list()
    other = build()

    assert env.verifier().update_revocations(published.token) is True
    with pytest.raises(VerificationError):
        other.verifier().update_revocations(published.token)


def test_the_list_is_resigned_once_half_its_ttl_has_passed(env: Env) -> None:
    first = env.issuer.revocation_list()  # none stored yet: signed now
    assert (first.seq, first.expires_at) == (0, T0 + 3600)
    assert verify_revocation_list(first.token, env.bundle()).revoked == frozenset()

    env.clock.now = T0 + 1799
    assert env.issuer.revocation_list() == first  # not before half its life

    env.clock.now = T0 + 1800
    second = env.issuer.revocation_list()
    assert second.seq > first.seq
    assert second.expires_at == T0 + 1800 + 3600
    verifier = env.verifier(at=T0)
    verifier.update_revocations(first.token)
    assert verifier.update_revocations(second.token) is True
    assert env.issuer.revocation_list() == second


def test_revoked_jtis_are_pruned_after_their_link_expires_plus_margin(build: Build) -> None:
    env = build(list_ttl_s=120)  # re-signed every 60 s of fetching
    link = env.issuer.delegate(ORCH, request(ttl=60))
    offline = new_jti()
    env.issuer.revoke(ORCH, [link.jti])
    env.issuer.revoke(ADMIN, [offline])

    def listed_at(now: int) -> frozenset[str]:
        env.clock.now = now
        published = env.issuer.revocation_list()
        return verify_revocation_list(published.token, env.bundle()).revoked

    last_needed = link.expires_at + REVOCATION_MARGIN_S - 1
    assert listed_at(last_needed) == {link.jti, offline}
    assert listed_at(last_needed + 61) == {offline}  # an unknown link's jti stays


def test_the_state_forgets_links_once_they_are_dead_everywhere(env: Env) -> None:
    """StateStore.prune, as the daemon runs it: an issued link and its revocation
    are kept until the link's exp plus the margin, then forgotten; a revocation of
    an unknown link stays, and lists and retries behave as before."""
    retry = request(ttl=60)
    link = env.issuer.delegate(ORCH, retry)
    offline = new_jti()
    env.issuer.revoke(ORCH, [link.jti])
    env.issuer.revoke(ADMIN, [offline])
    live = env.issuer.delegate(ORCH, request(ttl=600))

    env.clock.now = link.expires_at + REVOCATION_MARGIN_S - 1
    assert env.issuer.prune() == (0, 0)  # twin: not yet
    assert env.issuer.delegate(ORCH, retry).jti == link.jti  # still an idempotent replay

    env.clock.now = link.expires_at + REVOCATION_MARGIN_S + 1
    assert env.issuer.prune() == (1, 1)

    assert env.state.issued(link.jti) is None
    assert env.state.issued(live.jti) is not None
    assert env.state.revoked_jtis(live_after=0) == [offline]
    another = new_jti()
    published = env.issuer.revoke(ADMIN, [another])  # the next list, as it would be anyway
    assert verify_revocation_list(published.token, env.bundle()).revoked == {offline, another}
    assert env.issuer.delegate(ORCH, retry).jti != link.jti  # the dead link is not replayed
    assert env.issuer.prune() == (0, 0)


def test_a_list_never_outlives_its_signing_key(env: Env) -> None:
    start = T0 + 100
    _, old = env.issuer.rotate("k2", "EdDSA", not_before=start, max_link_ttl_s=MAX_TTL)
    env.clock.now = T0 + 10

    published = env.issuer.revocation_list()

    assert old.exp is not None
    assert published.expires_at == old.exp  # not T0 + 10 + 3600
    assert list_header(published.token)["kid"] == "k1"
    assert env.verifier().update_revocations(published.token) is True


def test_a_list_cut_short_by_its_key_is_not_resigned_on_every_fetch(env: Env) -> None:
    """Its life is 690 s (to k1's end): half of that has not passed 1 s later."""
    env.issuer.rotate("k2", "EdDSA", not_before=T0 + 100, max_link_ttl_s=MAX_TTL)
    env.clock.now = T0 + 10
    first = env.issuer.revocation_list()
    env.clock.now = T0 + 11

    assert env.issuer.revocation_list().seq == first.seq

