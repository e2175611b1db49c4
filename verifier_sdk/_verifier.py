"""Chain verification: the ordered algorithm of spec §8."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ._bundle import TrustBundle
from ._capability import Request
from ._errors import VerificationError
from ._keys import ALGORITHMS
from ._link import (
    MAX_POP_BYTES,
    Link,
    byte_length,
    decode_link,
    split_chain,
)
from ._pop import parse_pop, request_hash
from ._revocation import RevocationList, verify_revocation_list
from ._stores import MemoryReplayStore, MemoryUseStore, ReplayStore, UseStore

DEFAULT_CACHE_SIZE: Final = 10_000


@dataclass(frozen=True, slots=True)
class Decision:
    """What a successful verification established."""

    principals: tuple[str, ...]  # the root's iss, then every link's sub
    subject: str  # the leaf's sub: who is acting
    jtis: tuple[str, ...]  # root first
    kid: str  # the trust-bundle key of the root link
    expires_at: int  # the earliest exp in the chain
    request: Request


def _key_id(parent: Link | None, link_kid: str) -> str:
    """What a link's signature was checked against: the root's bundle kid, or
    the thumbprint of the parent's ``cnf`` key (spec §8 cache rule)."""
    return "kid|" + link_kid if parent is None else "jkt|" + parent.holder_key.thumbprint


class Verifier:
    """Verifies chains offline against one trust bundle, for one audience.

    Settings are keyword-only and there is no switch that skips a check.
    Thread-safe: one instance can serve every request of a service.
    """

    def __init__(
        self,
        bundle: TrustBundle,
        *,
        audience: str,
        leeway: int = 30,
        pop_window: int = 60,
        max_lifetime: int = 86_400,
        clock: Callable[[], float] = time.time,
        replay_store: ReplayStore | None = None,
        use_store: UseStore | None = None,
        require_revocations: bool = False,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if not isinstance(bundle, TrustBundle):
            raise TypeError("bundle must be a TrustBundle")
        if type(audience) is not str or not 1 <= len(audience) <= 256:
            raise ValueError("audience is a string of 1..256 characters")
        for name, value, low in (("leeway", leeway, 0), ("pop_window", pop_window, 1),
                                 ("max_lifetime", max_lifetime, 1), ("cache_size", cache_size, 0)):
            if type(value) is not int or value < low:
                raise ValueError(f"{name} must be an int >= {low}")
        self._bundle = bundle
        self._audience = audience
        self._leeway = leeway
        self._pop_window = pop_window
        self._max_lifetime = max_lifetime
        self._clock = clock
        # "is None", not "or": an empty store is falsy (it has __len__).
        self._replay: ReplayStore = (
            MemoryReplayStore() if replay_store is None else replay_store
        )
        self._uses: UseStore = MemoryUseStore() if use_store is None else use_store
        self._require_revocations = require_revocations
        self._revocations: RevocationList | None = None
        self._revocation_lock = threading.Lock()
        # H(link) → (link, id of the key its signature was checked with): steps 2–4.
        self._cache: dict[str, tuple[Link, str]] = {}
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()

    @property
    def audience(self) -> str:
        return self._audience

    @property
    def bundle(self) -> TrustBundle:
        return self._bundle

    @property
    def revocation_expires_at(self) -> float | None:
        """When the held list goes stale (its exp + leeway), or None before the first."""
        current = self._revocations
        return None if current is None else float(current.exp + self._leeway)

    @property
    def revocation_seq(self) -> int | None:
        """``seq`` of the list in force, or None before the first one."""
        current = self._revocations
        return None if current is None else current.seq

    # --- revocation lists (spec §7) ------------------------------------------

    def update_revocations(self, token: str) -> bool:
        """Install a newer signed revocation list; True if it replaced the old one.

        The same list again is a no-op (False). An older ``seq``, or the same
        ``seq`` with other content, raises ``revocation_stale``. A failed load
        changes nothing.
        """
        new = verify_revocation_list(token, self._bundle)
        with self._revocation_lock:
            current = self._revocations
            if current is not None:
                if new.seq < current.seq:
                    raise VerificationError(
                        "revocation_stale",
                        f"revocation list seq {new.seq} is older than the one held ({current.seq})",
                    )
                if new.seq == current.seq:
                    if new.payload == current.payload:
                        return False
                    raise VerificationError(
                        "revocation_stale",
                        f"revocation list seq {new.seq} reuses the held seq with other content",
                    )
            self._revocations = new
        return True

    # --- verification (spec §8) ----------------------------------------------

    def verify(self, chain: str, request: Request, *, pop: str | None) -> Decision:
        """Verify ``chain`` for ``request`` with its proof of possession.

        Returns a Decision or raises VerificationError; never anything else
        for a hostile chain or PoP. A request that is not a valid Request
        raises ValueError (it is the caller's bug, not an attack).
        """
        if not isinstance(request, Request):
            raise ValueError("request must be a verifier_sdk.Request")

        # (1) Size limits: chain bytes, link count, each link, then the PoP.
        tokens = split_chain(chain)
        if type(pop) is str and byte_length(pop) > MAX_POP_BYTES:
            raise VerificationError("too_large", f"PoP is over {MAX_POP_BYTES} bytes")

        # (2)–(5), link by link, root first.
        links: list[Link] = []
        parent: Link | None = None
        for index, token in enumerate(tokens):
            link = self._signed_link(token, index, parent)
            if parent is not None:
                self._check_attenuation(parent, link)
            links.append(link)
            parent = link

        # (6)–(9), link by link, root first.
        now = self._clock()
        revocations = self._revocations
        for link in links:
            self._check_time(link, now)
            if link.index == 0:
                self._check_revocation_list(revocations, now)
            if revocations is not None and link.jti in revocations.revoked:
                raise VerificationError(
                    "revoked", f"{link.label}: jti {link.jti} is revoked", link=link.index
                )
            # (8) Audience.
            if link.aud is not None and self._audience not in link.aud:
                raise VerificationError(
                    "audience",
                    f"{link.label}: audience {self._audience!r} is not in {sorted(link.aud)}",
                    link=link.index,
                )
            # (9) Capabilities: at least one must allow the request.
            for cap in link.caps:
                if cap.matches(request):
                    break
            else:
                raise VerificationError("denied", self._denial(link, request), link=link.index)

        leaf = links[-1]
        # (10) Proof of possession.
        pop_jti = self._check_pop(pop, leaf, request, now)

        # (11) Replay: (ath, jti) at most once while the PoP could be valid.
        replay_key = "rp|" + leaf.hash + "|" + pop_jti
        try:
            fresh = self._replay.add(replay_key, 2 * self._pop_window + self._leeway)
        except Exception as exc:  # any backend failure: fail closed
            raise VerificationError(
                "replayed", f"the PoP could not be recorded ({exc}); refusing"
            ) from None
        if not fresh:
            raise VerificationError("replayed", "this PoP was already used")

        # (12) Use counting.
        self._count_uses(links, now)

        return Decision(
            principals=(links[0].iss, *[link.sub for link in links]),
            subject=leaf.sub,
            jtis=tuple([link.jti for link in links]),
            kid=links[0].kid,
            expires_at=min([link.exp for link in links]),
            request=request,
        )

    def _signed_link(self, token: str, index: int, parent: Link | None) -> Link:
        """Steps (2)–(4) for one link, remembered by H(link) and verifying key."""
        cached = self._cache.get(token)
        if cached is not None:
            link, key_id = cached
            if link.index == index and key_id == _key_id(parent, link.kid):
                return link

        # (2) Decode header, payload and cnf key; the alg must fit the key.
        link = decode_link(token, index)
        if link.alg not in ALGORITHMS:
            raise VerificationError(
                "unsupported_alg", f"{link.label}: alg {link.alg!r} is not supported", link=index
            )
        if parent is None:
            # (2) alg against the bundle key; (3) kid known, key window admits the link.
            key = self._bundle.signing_key(
                link.alg, link.kid, link.iat, link.exp, what=link.label, link=index
            )
        else:
            key = parent.holder_key
            if key.alg != link.alg:
                raise VerificationError(
                    "unsupported_alg",
                    f"{link.label}: alg {link.alg!r} but the parent's cnf key is {key.alg}",
                    link=index,
                )
            # (3) The header kid must name the parent's cnf key.
            if link.kid != key.thumbprint:
                raise VerificationError(
                    "broken_chain",
                    f"{link.label}: kid is not the thumbprint of link {index - 1}'s cnf key",
                    link=index,
                )
        # (4) Signature.
        if not key.verify(link.signing_input, link.signature):
            raise VerificationError(
                "bad_signature", f"{link.label}: signature does not verify", link=index
            )
        if self._cache_size:
            with self._cache_lock:
                if len(self._cache) >= self._cache_size:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[token] = (link, _key_id(parent, link.kid))
        return link

    @staticmethod
    def _check_attenuation(parent: Link, link: Link) -> None:
        """(5) iss = previous sub, prv = H(previous), time nesting; dpt rule."""
        problem = None
        if link.iss != parent.sub:
            problem = f"iss {link.iss!r} is not the previous link's sub {parent.sub!r}"
        elif link.prv != parent.hash:
            problem = "prv is not the hash of the previous link"
        elif link.nbf < parent.nbf:
            problem = f"nbf {link.nbf} is before the previous link's nbf {parent.nbf}"
        elif link.exp > parent.exp:
            problem = f"exp {link.exp} is after the previous link's exp {parent.exp}"
        if problem:
            raise VerificationError("broken_chain", f"{link.label}: {problem}", link=link.index)
        if link.dpt > parent.dpt - 1:
            raise VerificationError(
                "depth_exceeded",
                f"{link.label}: dpt {link.dpt} but the previous link allows "
                f"{parent.dpt} more link(s) after it",
                link=link.index,
            )

    def _check_time(self, link: Link, now: float) -> None:
        """(6) Validity window with leeway; the lifetime bound."""
        if now < link.nbf - self._leeway:
            raise VerificationError(
                "not_yet_valid", f"{link.label}: not valid before {link.nbf}", link=link.index
            )
        if now >= link.exp + self._leeway:
            raise VerificationError(
                "expired", f"{link.label}: expired at {link.exp}", link=link.index
            )
        if link.exp - link.nbf > self._max_lifetime:
            raise VerificationError(
                "malformed",
                f"{link.label}: lifetime {link.exp - link.nbf} s is over the "
                f"{self._max_lifetime} s this verifier allows",
                link=link.index,
            )

    def _check_revocation_list(self, revocations: RevocationList | None, now: float) -> None:
        """(7) The list itself: present when required, not past its exp."""
        if revocations is None:
            if self._require_revocations:
                raise VerificationError(
                    "revocation_stale", "no revocation list loaded and one is required"
                )
        elif now >= revocations.exp + self._leeway:
            raise VerificationError(
                "revocation_stale",
                f"revocation list seq {revocations.seq} expired at {revocations.exp}",
            )

    @staticmethod
    def _denial(link: Link, request: Request) -> str:
        nearest = max(link.caps, key=lambda cap: cap.closeness(request))
        return (
            f"{link.label}: no capability allows {request.act} on {request.res}; "
            f"nearest: {nearest.describe()} ({nearest.why_not(request)})"
        )

    def _check_pop(self, pop: str | None, leaf: Link, request: Request, now: float) -> str:
        """(10) The PoP: shape, leaf key, ath/aud/req, time window, signature."""
        def invalid(reason: str) -> VerificationError:
            return VerificationError("pop_invalid", f"PoP for {leaf.label}: {reason}")

        if type(pop) is not str or not pop:
            raise invalid("missing")
        try:
            header, claims, signing_input, signature = parse_pop(pop)
        except ValueError as exc:
            raise invalid(f"malformed: {exc}") from None
        key = leaf.holder_key
        if header["alg"] != key.alg:
            raise invalid(f"alg {header['alg']!r} does not match the leaf key ({key.alg})")
        if claims["ath"] != leaf.hash:
            raise invalid("ath is not the hash of the leaf link")
        if claims["aud"] != self._audience:
            raise invalid(f"aud {claims['aud']!r} is not this verifier's {self._audience!r}")
        if claims["req"] != request_hash(request, self._audience):
            raise invalid("req does not match this request")
        if abs(now - claims["iat"]) > self._pop_window:
            raise invalid(f"iat {claims['iat']} is outside ±{self._pop_window} s of now")
        if not key.verify(signing_input, signature):
            raise invalid("signature does not verify with the leaf's cnf key")
        jti: str = claims["jti"]
        return jti

    def _count_uses(self, links: list[Link], now: float) -> None:
        """(12) Count this use under (signing key, jti) of every link with ``use``."""
        limits: dict[str, int] = {}
        owner: dict[str, int] = {}
        latest_exp = None
        for link in links:
            if link.use is None:
                continue
            if link.index == 0:
                key = "u|kid|" + link.kid + "|" + link.jti
            else:
                key = "u|jkt|" + link.kid + "|" + link.jti  # kid = parent's cnf thumbprint
            if key not in limits or link.use < limits[key]:
                limits[key] = link.use
            owner.setdefault(key, link.index)
            latest_exp = link.exp if latest_exp is None else max(latest_exp, link.exp)
        if latest_exp is None:
            return
        try:
            at_limit = self._uses.consume(limits, latest_exp + self._leeway - now)
        except Exception as exc:  # any backend failure: fail closed
            raise VerificationError(
                "uses_exhausted", f"the use could not be counted ({exc}); refusing"
            ) from None
        if at_limit:
            first = min(owner[key] for key in at_limit)
            label = links[first].label
            raise VerificationError(
                "uses_exhausted", f"{label}: all {links[first].use} use(s) are spent", link=first
            )
