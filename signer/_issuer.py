"""Issuance, the daemon's pure core: request → policy → claims → sign → audit.

No gRPC here: the servicer translates protobuf to these calls and their
errors to status codes. Order matters and is the security argument:
a link exists outside this module only after its audit record is durable,
and a denial is answered only after its own record is. Calls issued in a
``Batch`` return their links before that, to the one caller that holds the
batch and answers nobody until ``Issuer.commit(batch)`` has succeeded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from verifier_sdk import Capability, make_revocation_list, new_jti
from verifier_sdk._encoding import b64url_decode, canonical_json, parse_json_object, sha256_b64
from verifier_sdk._holder import root_token
from verifier_sdk._keys import ALGORITHMS, public_key_from_jwk
from verifier_sdk._link import MAX_LINK_BYTES, MAX_USE, check_jti, check_kid, check_principal
from verifier_sdk._revocation import MAX_REVOCATION_LIST_BYTES, revocation_list_bytes

from ._errors import (
    InvalidRequest,
    LimitReached,
    NotAllowed,
    NotFound,
    PolicyDenied,
    TimedOut,
    Unauthenticated,
)
from ._keys import KeySigner, KeyStore
from ._model import DelegateRequest
from ._state import IssuedLink, KeyRecord, StateStore, StoredList

MAX_IDEMPOTENCY_KEY = 128
# A revoked jti is kept in published lists until its link is surely dead
# everywhere: its exp plus more than any verifier's leeway.
REVOCATION_MARGIN_S = 300
KEYRING_TTL_S = 1.0
MAX_TIME = 2**53 - 1  # spec §2: every integer within the JSON safe range
SIGNATURE_PART = 1 + 86  # "." and a 64-byte signature in base64url (EdDSA and ES256)


class Grant(Protocol):
    """What the policy says about an allowed request."""

    @property
    def key(self) -> str | None: ...


class Policy(Protocol):
    def evaluate(self, caller: str, req: DelegateRequest,
                 caps: Sequence[Capability] | None = None) -> Grant: ...

    @property
    def admins(self) -> frozenset[str]: ...


class Audit(Protocol):
    def append_many(self, events: Sequence[tuple[str, Mapping[str, Any]]]
                    ) -> Sequence[object]:
        """Record the events (name, fields) durably, in one commit, or raise."""
        ...


@dataclass(frozen=True, slots=True)
class Issued:
    chain: str
    jti: str
    kid: str
    expires_at: int
    idempotent_replay: bool


@dataclass(frozen=True, slots=True)
class PublishedList:
    token: str
    seq: int
    expires_at: int


class Batch:
    """Delegate calls issued one after another and recorded as one
    (``Issuer.commit``): their audit records in one commit, then their issued
    links in one transaction. Nothing the batch staged may be answered before
    that commit succeeded; a failed commit fails every call in it. A request
    repeating an idempotency key earlier in the batch gets that link."""

    __slots__ = ("held", "links", "records")

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.links: dict[tuple[str, str], IssuedLink] = {}  # by (caller, idempotency key)
        self.held: list[tuple[str, str]] = []  # idempotency keys locked until the commit


def request_digest(caller: str, req: DelegateRequest) -> str:
    """H(canonical request): what the audit log and idempotency compare."""
    return sha256_b64(canonical_json({
        "caller": caller, "sub": req.sub, "holder_jwk": dict(req.holder_jwk),
        "caps": [dict(c) for c in req.caps], "ttl": req.ttl,
        "aud": None if req.aud is None else list(req.aud), "dpt": req.dpt, "use": req.use,
        "kid": req.key,
    }))


def validate_request(req: DelegateRequest) -> tuple[Capability, ...]:
    """The credential format's rules on what a caller may ask for
    (InvalidRequest); returns the capabilities, parsed."""
    try:
        check_principal(req.sub, "sub")
        public_key_from_jwk(dict(req.holder_jwk))
        if not 1 <= len(req.caps) <= 64:
            raise ValueError("caps: 1..64 capabilities")
        caps = tuple(Capability.parse(dict(cap)) for cap in req.caps)
        if type(req.ttl) is not int or req.ttl < 1:
            raise ValueError("ttl must be a positive number of seconds")
        if type(req.dpt) is not int or not 0 <= req.dpt <= 15:
            raise ValueError("dpt must be in 0..15")
        if req.use is not None and (type(req.use) is not int or not 1 <= req.use <= MAX_USE):
            raise ValueError(f"use must be in 1..{MAX_USE}")
        if req.aud is not None and (
            not 1 <= len(req.aud) <= 16 or not all(1 <= len(a) <= 256 for a in req.aud)
        ):
            raise ValueError("aud: 1..16 audiences of 1..256 characters")
        if not 1 <= len(req.idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise ValueError(f"idempotency_key: 1..{MAX_IDEMPOTENCY_KEY} characters")
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return caps


class Issuer:
    """Signs root links and revocation lists; thread-safe."""

    def __init__(self, *, policy: Policy, keys: KeyStore, state: StateStore, audit: Audit,
                 list_issuer: str, list_ttl_s: int = 3600,
                 clock: Callable[[], float] = time.time) -> None:
        self.policy = policy  # replaced whole on reload
        self._keys = keys
        self._state = state
        self._audit = audit
        self._list_issuer = list_issuer
        self._list_ttl_s = list_ttl_s
        self._clock = clock
        # (caller, key) → [lock, users]: one lock per key while anyone holds or awaits it.
        self._idempotency_locks: dict[tuple[str, str], list[Any]] = {}
        self._idempotency_guard = threading.Lock()
        self._list_lock = threading.Lock()
        self._keyring: tuple[float, list[KeyRecord]] | None = None  # (read at, records)

    # --- keys ----------------------------------------------------------------

    def keyring(self) -> list[KeyRecord]:
        """The keyring, read again at most every KEYRING_TTL_S (another process, the
        CLI, may rotate) and at once after a change made here."""
        cached, now = self._keyring, time.monotonic()
        if cached is None or now - cached[0] > KEYRING_TTL_S:
            cached = self._keyring = (now, self._state.key_records())
        return cached[1]

    def active_key(self, now: int) -> KeyRecord:
        """The key that signs now: the newest live key that is not retiring."""
        live = [
            k for k in self.keyring()
            if k.nbf <= now and (k.exp is None or now < k.exp)
        ]
        if not live:
            raise NotFound("no root key is active: generate one (mandate keys generate)")
        # A retiring key (given an end by a rotation) yields to its successor as
        # soon as the successor's window has begun.
        return max(live, key=lambda k: (k.exp is None, k.nbf, k.kid))

    def signer(self, kid: str) -> KeySigner:
        return self._keys.signer(kid)

    def trust_bundle(self) -> dict[str, Any]:
        keys = []
        for record in self.keyring():
            jwk: dict[str, Any] = {**self._keys.signer(record.kid).public_jwk,
                                   "kid": record.kid, "alg": record.alg, "use": "sig",
                                   "nbf": record.nbf}
            if record.exp is not None:
                jwk["exp"] = record.exp
            keys.append(jwk)
        return {"keys": keys}

    def add_key(self, kid: str, alg: str, *, not_before: int | None = None,
                caller: str = "operator") -> KeyRecord:
        """Generate a key in the key store and put it in the bundle."""
        try:
            check_kid(kid)
        except ValueError as exc:
            raise InvalidRequest(f"new key id: {exc}") from None
        if alg not in ALGORITHMS:
            raise InvalidRequest(f"alg must be one of {ALGORITHMS}")
        now = int(self._clock())
        record = KeyRecord(kid, alg, now if not_before is None else not_before, None)
        _check_time(record.nbf, "not_before")  # before the HSM makes anything
        self._keys.generate(kid, alg)
        self._state.add_key(record)
        self._keyring = None
        self._record(None, "key", caller=caller, decision="ok", reason="generated", kid=kid,
                     detail={"alg": alg, "nbf": record.nbf})
        return record

    def rotate(self, new_kid: str, alg: str, *, not_before: int | None, max_link_ttl_s: int,
               caller: str = "operator") -> tuple[KeyRecord, KeyRecord]:
        """A new key signs from ``not_before``; the old one keeps its place in the
        bundle until every link it can still sign has expired, then ends."""
        now = int(self._clock())
        start = now if not_before is None else max(now, not_before)
        old_exp = start + max_link_ttl_s
        _check_time(old_exp, "not_before plus the longest link ttl")
        previous = self.active_key(now)
        new = self.add_key(new_kid, alg, not_before=start, caller=caller)
        self._state.set_key_exp(previous.kid, old_exp)
        self._keyring = None
        self._record(None, "key", caller=caller, decision="ok", reason="retiring",
                     kid=previous.kid, detail={"exp": old_exp, "successor": new_kid})
        return new, KeyRecord(previous.kid, previous.alg, previous.nbf, old_exp)

    # --- delegation ----------------------------------------------------------

    def delegate(self, caller: str, req: DelegateRequest, *,
                 deadline: float | None = None, batch: Batch | None = None) -> Issued:
        """Sign a root link for ``caller``, or raise.

        ``deadline`` (time.monotonic) is checked before the slow steps; once it
        has passed, nothing more is done and nothing was issued (TimedOut).
        Without ``batch`` the link's records are durable when this returns;
        with one, they are staged in it and the link may leave only after
        ``commit(batch)`` succeeded (a denial likewise).
        """
        try:
            check_principal(caller, "caller identity")
        except ValueError as exc:
            raise Unauthenticated(str(exc)) from None
        caps = validate_request(req)
        digest = request_digest(caller, req)
        name = (caller, req.idempotency_key)
        if batch is not None and name in batch.links:
            return _replay(batch.links[name], digest)
        # One request per idempotency key at a time, until its link is recorded
        # (in a batch: until the batch is committed).
        self._hold(name)
        staged = False
        try:
            earlier = self._state.by_idempotency_key(caller, req.idempotency_key)
            if earlier is not None:
                return _replay(earlier, digest)
            issued = self._issue(caller, req, caps, digest, deadline=deadline, batch=batch)
            staged = batch is not None
            return issued
        finally:
            if staged:
                assert batch is not None
                batch.held.append(name)
            else:
                self._release(name)

    def commit(self, batch: Batch) -> None:
        """Record what ``batch`` staged: its audit records (durable) first, then
        its issued links. Raises (Unavailable: a store failed) when not all of
        it is recorded; either way the batch's idempotency keys are released."""
        try:
            if batch.records:
                self._audit.append_many(batch.records)
            if batch.links:
                self._state.record_issued(*batch.links.values())
        finally:
            held, batch.held = batch.held, []
            for name in held:
                self._release(name)

    @staticmethod
    def _in_time(deadline: float | None, before: str) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            raise TimedOut(f"out of time before {before}: nothing was issued")

    def _record(self, batch: Batch | None, event: str, **fields: Any) -> None:
        """Audit an event: now (durable on return), or staged in ``batch``."""
        if batch is None:
            self._audit.append_many([(event, fields)])
        else:
            batch.records.append((event, fields))

    def _issue(self, caller: str, req: DelegateRequest, caps: Sequence[Capability],
               digest: str, *, deadline: float | None, batch: Batch | None) -> Issued:
        now = int(self._clock())
        try:
            grant = self.policy.evaluate(caller, req, caps)
            # The grant's key if it names one (the policy refused any other), else
            # the key the request names, else the active key.
            record = self._signing_key(grant.key if grant.key is not None else req.key,
                                       now, req.ttl)
        except PolicyDenied as denial:
            # The denial is answered only once its record is durable.
            self._record(batch, "deny", caller=caller, decision="deny", reason=denial.reason,
                         request_digest=digest, sub=req.sub)
            raise
        self._in_time(deadline, "signing")
        signer = self._keys.signer(record.kid)
        jti = new_jti()
        # validate_request checked every claim as a verifier's decoding would
        # (the delegate fuzz target verifies each link it gets), so the link is
        # not decoded again here; only its size is left, checked before the HSM signs.
        def sign(signing_input: bytes) -> bytes:
            if len(signing_input) + SIGNATURE_PART > MAX_LINK_BYTES:
                raise ValueError(f"the link would be over {MAX_LINK_BYTES} bytes")
            return signer.sign(signing_input)

        try:
            chain = root_token(
                alg=signer.alg, kid=record.kid, sign=sign, iss=caller, sub=req.sub,
                holder_jwk=req.holder_jwk, cap=list(req.caps), ttl=req.ttl, dpt=req.dpt,
                aud=req.aud, use=req.use, now=now, jti=jti,
            )
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        exp = now + req.ttl
        self._in_time(deadline, "recording the link")
        # (audit) Durable before the link leaves: if this raises, nobody gets it.
        self._record(batch, "delegate", caller=caller, decision="allow", request_digest=digest,
                     jti=jti, link_hash=sha256_b64(chain.encode("ascii")), kid=record.kid,
                     sub=req.sub, detail={"exp": exp})
        link = IssuedLink(jti, caller, req.sub, record.kid, exp, chain, digest,
                          req.idempotency_key)
        if batch is None:
            self._state.record_issued(link)
        else:
            batch.links[(caller, req.idempotency_key)] = link
        return Issued(chain, jti, record.kid, exp, False)

    def _signing_key(self, kid: str | None, now: int, ttl: int) -> KeyRecord:
        record = self.active_key(now) if kid is None else next(
            (k for k in self.keyring() if k.kid == kid), None
        )
        if record is None or record.nbf > now:
            raise PolicyDenied(
                "key_unavailable", f"key {kid!r} is not in the keyring or not yet active"
            )
        if record.exp is not None and now + ttl > record.exp:
            raise PolicyDenied(
                "key_expiring",
                f"a link for {ttl} s would outlive key {record.kid!r} (ends at {record.exp})",
            )
        return record

    def _hold(self, name: tuple[str, str]) -> None:
        """Lock one idempotency key; the entry lives while anyone holds or awaits it."""
        with self._idempotency_guard:
            entry = self._idempotency_locks.setdefault(name, [threading.Lock(), 0])
            entry[1] += 1
        entry[0].acquire()

    def _release(self, name: tuple[str, str]) -> None:
        with self._idempotency_guard:
            entry = self._idempotency_locks[name]
            entry[0].release()
            entry[1] -= 1
            if entry[1] == 0:
                del self._idempotency_locks[name]

    # --- revocation ----------------------------------------------------------

    def revoke(self, caller: str, jtis: Iterable[str], *, reason: str = "") -> PublishedList:
        """Revoke links ``caller`` issued (an admin: any jti, even of links made
        offline), then publish a new list."""
        admin = caller in self.policy.admins
        entries: list[tuple[str, int | None]] = []
        for jti in dict.fromkeys(jtis):
            try:
                check_jti(jti)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
            issued = self._state.issued(jti)
            if issued is None and not admin:
                raise NotFound(f"no link with jti {jti} was issued here")
            if issued is not None and issued.caller != caller and not admin:
                raise NotAllowed(f"jti {jti} was issued to another caller")
            entries.append((jti, None if issued is None else issued.exp))
        if not entries:
            raise InvalidRequest("no jti to revoke")
        now = int(self._clock())
        with self._list_lock, self._state.lock("revocation-list"):
            record = self.active_key(now)
            # The list to sign: what is listed now and these. Read once, checked
            # against the size limit, signed as checked.
            revoked = {*self._live_revocations(now), *(j for j, _ in entries)}
            size = revocation_list_bytes(alg=record.alg, kid=record.kid, iss=self._list_issuer,
                                         revoked=revoked)
            if size > MAX_REVOCATION_LIST_BYTES:
                raise LimitReached(
                    f"the revocation list would grow to {size} bytes, over the "
                    f"{MAX_REVOCATION_LIST_BYTES} every verifier accepts: nothing was revoked"
                )
            # One record per link, so `audit show --jti` finds it; all in one commit.
            self._audit.append_many([
                ("revoke", {"caller": caller, "decision": "ok", "reason": reason[:200],
                            "jti": jti})
                for jti, _ in entries
            ])
            self._state.revoke(entries, by=caller, reason=reason[:200], now=now)
            return self._sign_list(now, record, revoked)

    def revocation_list(self) -> PublishedList:
        """The current list, re-signed with a higher seq once half its life is
        gone or when the key that signed it is no longer the active key."""
        now = int(self._clock())
        stored, record = self._state.revocation_list(), self.active_key(now)
        if stored is not None and _fresh(stored, record, now):
            return PublishedList(stored.token, stored.seq, stored.exp)
        with self._list_lock, self._state.lock("revocation-list"):
            # Read again under the lock: another thread or replica may have
            # published meanwhile, and two never sign one seq.
            stored = self._state.revocation_list()
            if stored is not None and _fresh(stored, record, now):
                return PublishedList(stored.token, stored.seq, stored.exp)
            return self._sign_list(now, record, self._live_revocations(now))

    def prune(self) -> tuple[int, int]:
        """Forget issued links and revocations whose links ended more than
        REVOCATION_MARGIN_S ago (StateStore.prune): (links, revocations)."""
        return self._state.prune(dead_before=int(self._clock()) - REVOCATION_MARGIN_S)

    def _live_revocations(self, now: int) -> list[str]:
        return self._state.revoked_jtis(live_after=now - REVOCATION_MARGIN_S)

    def _sign_list(self, now: int, record: KeyRecord, revoked: Iterable[str]) -> PublishedList:
        """Sign and store the next list of ``revoked``; the caller holds the list locks."""
        stored = self._state.revocation_list()
        seq = 0 if stored is None else stored.seq + 1
        signer = self._keys.signer(record.kid)
        exp = now + self._list_ttl_s
        if record.exp is not None:
            exp = min(exp, record.exp)  # a list's exp must be within its key's window
        token = make_revocation_list(
            alg=signer.alg, kid=record.kid, sign=signer.sign, iss=self._list_issuer,
            seq=seq, iat=now, exp=exp, revoked=revoked,
        )
        self._state.save_revocation_list(StoredList(seq, token, now, exp))
        return PublishedList(token, seq, exp)


def _replay(earlier: IssuedLink, digest: str) -> Issued:
    """The link issued before for this idempotency key, if the request is the same."""
    if earlier.request_digest != digest:
        raise InvalidRequest("idempotency_key was used before for a different request")
    return Issued(earlier.chain, earlier.jti, earlier.kid, earlier.exp, True)


def _check_time(value: int, name: str) -> None:
    if not 0 <= value <= MAX_TIME:
        raise InvalidRequest(f"{name} must be a time within 0..{MAX_TIME}")


def _fresh(stored: StoredList, record: KeyRecord, now: int) -> bool:
    """Whether a stored list may still be served: less than half its life gone,
    signed by the active key and ending within that key's window."""
    return (
        now < (stored.iat + stored.exp) // 2
        and _kid_of(stored.token) == record.kid
        and (record.exp is None or stored.exp <= record.exp)
    )


def _kid_of(token: str) -> object:
    """The kid in a stored list's header (read alone: the payload may be 1 MiB)."""
    return parse_json_object(b64url_decode(token.partition(".")[0])).get("kid")
