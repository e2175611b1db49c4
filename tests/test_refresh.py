"""RevocationRefresher: installs newer lists, keeps the last good one through
failures, and leaves failing closed to the verifier once the list goes stale."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import pytest
from helpers import NOW, REFUND, ROOT_KID, World

from verifier_sdk import (
    Holder,
    RevocationRefresher,
    VerificationError,
    Verifier,
    decode_unverified,
    make_revocation_list,
)

LEEWAY = 30
WAIT_S = 5


def rl(world: World, seq: int, revoked: Iterable[str] = (), *, exp: int = NOW + 3600,
       signer: Holder | None = None) -> str:
    signer = signer or world.root
    return make_revocation_list(alg=signer.alg, kid=ROOT_KID, sign=signer.sign,
                                iss="spiffe://acme.example/revoker", seq=seq, iat=NOW - 60,
                                exp=exp, revoked=revoked)


def source(*outcomes: str | Exception) -> Callable[[], str]:
    """A fetch that returns (or raises) each outcome in turn, then repeats the last."""
    pending = list(outcomes)

    def fetch() -> str:
        outcome = pending.pop(0) if len(pending) > 1 else pending[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    return fetch


def verify(world: World, verifier: Verifier, chain: str) -> None:
    verifier.verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))


def code_of(world: World, verifier: Verifier, chain: str) -> str:
    with pytest.raises(VerificationError) as info:
        verify(world, verifier, chain)
    return info.value.code


def test_installs_newer_lists_and_keeps_the_last_good_one(world: World) -> None:
    verifier = world.verifier()
    chain = world.chain3()
    revoked = decode_unverified(chain)[2][1]["jti"]
    stranger = Holder.generate()
    errors: list[Exception] = []
    refresher = RevocationRefresher(verifier, source(
        rl(world, 1),
        rl(world, 1),  # the same list again: a no-op, not an error
        rl(world, 2, [revoked]),
        OSError("list server unreachable"),
        rl(world, 3, signer=stranger),  # not signed by the bundle's key
        rl(world, 1),  # a rollback
        "not a list",
    ), interval_s=60, on_error=errors.append, clock=lambda: 123.0)

    assert refresher.refresh_now() is True
    assert (refresher.seq, refresher.last_success, refresher.last_error) == (1, 123.0, None)
    verify(world, verifier, chain)
    assert refresher.refresh_now() is False
    assert refresher.last_error is None
    assert refresher.refresh_now() is True
    assert refresher.seq == 2
    assert code_of(world, verifier, chain) == "revoked"

    for expected in ("OSError", "bad_signature", "revocation_stale", "malformed"):
        assert refresher.refresh_now() is False
        assert refresher.seq == 2, "a failure never replaces the last good list"
        error = refresher.last_error
        assert error is errors[-1]
        assert (error.code if isinstance(error, VerificationError)
                else type(error).__name__) == expected
    assert len(errors) == 4
    assert code_of(world, verifier, chain) == "revoked"
    assert refresher.expires_at == NOW + 3600


def test_fails_closed_once_the_list_is_stale_and_recovers_with_a_newer_one(
        world: World) -> None:
    verifier = world.verifier(leeway=LEEWAY)
    chain = world.chain3()  # valid until NOW + 119 (+ leeway)
    fetch = source(rl(world, 1, exp=NOW + 60), RuntimeError("down"),
                   rl(world, 2, exp=NOW + 600))
    refresher = RevocationRefresher(verifier, fetch, interval_s=60, clock=world.clock)
    refresher.refresh_now()

    world.now = NOW + 60 + LEEWAY - 1
    verify(world, verifier, chain)
    world.now = NOW + 60 + LEEWAY
    assert code_of(world, verifier, chain) == "revocation_stale"
    assert refresher.refresh_now() is False  # the list server is down: still stale
    assert code_of(world, verifier, chain) == "revocation_stale"
    assert refresher.refresh_now() is True
    verify(world, verifier, chain)
    assert (refresher.seq, refresher.expires_at) == (2, NOW + 600)


def test_start_fetches_before_returning_then_refreshes_in_the_background(
        world: World) -> None:
    verifier = world.verifier(require_revocations=True)
    chain = world.chain3()
    assert code_of(world, verifier, chain) == "revocation_stale"
    lists = iter([rl(world, seq) for seq in range(1, 6)])
    lock = threading.Lock()

    def fetch() -> str:
        with lock:
            return next(lists, rl(world, 5))

    with RevocationRefresher(verifier, fetch, interval_s=0.02) as refresher:
        assert refresher.seq is not None  # the first list is in before start returns
        verify(world, verifier, chain)
        deadline = time.monotonic() + WAIT_S
        while refresher.seq != 5:
            assert time.monotonic() < deadline, f"stuck at seq {refresher.seq}"
            time.sleep(0.01)
        thread = refresher._thread
    assert thread is not None
    assert not thread.is_alive()


def test_background_thread_survives_failures_and_a_failing_on_error(world: World) -> None:
    verifier = world.verifier()
    calls = 0

    def fetch() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise ConnectionError(f"attempt {calls}")
        return rl(world, 7)

    def on_error(exc: Exception) -> None:
        raise RuntimeError("the alerting hook is broken too")

    refresher = RevocationRefresher(verifier, fetch, interval_s=0.02, on_error=on_error)
    refresher.start()
    try:
        assert isinstance(refresher.last_error, ConnectionError)
        deadline = time.monotonic() + WAIT_S
        while refresher.seq != 7:
            assert time.monotonic() < deadline, "the refresher thread stopped refreshing"
            time.sleep(0.01)
        assert refresher.last_error is None
    finally:
        refresher.stop()
    with pytest.raises(RuntimeError, match="already started"):
        refresher.start()


@pytest.mark.parametrize("interval_s", [0, -1, True, "60"], ids=repr)
def test_interval_must_be_positive_seconds(world: World, interval_s: object) -> None:
    with pytest.raises(ValueError, match="interval_s"):
        RevocationRefresher(world.verifier(), lambda: "", interval_s=interval_s)  # type: ignore[arg-type]
