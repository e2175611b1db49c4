"""Delegate calls issued in batches (signer/_batching.py), against a real
daemon (SoftHSM2, mutual TLS on 127.0.0.1:0): calls that queue while the
issuing thread is busy are issued together and recorded in one commit, and
nothing of a batch leaves before that commit succeeded."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import wait_for
from hsm_fixtures import SoftHsm
from test_faults import FailingCommit, Turnstile, audit_commits_can_fail, on_link_signatures
from test_server import ORCH, Env, delegate_request, start_daemon

from signer._batching import ANSWER_GRACE_S, Batcher
from signer._devpki import DevCA
from signer._issuer import Batch
from signer._proto.mandate.v1 import signer_pb2 as pb
from verifier_sdk import Holder
from verifier_sdk._encoding import sha256_b64

SAFETY_S = 30.0


@contextmanager
def queued_behind_a_held_call(env: Env, requests: Sequence[pb.DelegateRequest]
                              ) -> Iterator[list[futures.Future[Any]]]:
    """Hold one call in the HSM; send ``requests`` meanwhile, one by one, each
    once the one before is queued for the issuing thread; on leaving, release the HSM.
    Yields the futures of the held call and then of ``requests``."""
    daemon = env.daemon
    assert daemon.core is not None
    calls = daemon.core.calls()
    stub = env.stub()
    turnstile = Turnstile()
    with on_link_signatures(daemon, turnstile), futures.ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(stub.Delegate, delegate_request(Holder.generate()),
                               timeout=SAFETY_S)]
        try:
            assert turnstile.wait_for(1), "the first call never reached the HSM"
            for sent, request in enumerate(requests, 1):  # queued in this order
                pending.append(pool.submit(stub.Delegate, request, timeout=SAFETY_S))
                assert wait_for(functools.partial(queued, calls, sent), SAFETY_S), \
                    "a call never queued"
            yield pending
        finally:
            turnstile.released.set()
            futures.wait(pending, SAFETY_S)


def queued(calls: Batcher, count: int) -> bool:
    return calls.queued == count


def outcome(call: futures.Future[Any]) -> Any:
    """The reply, or the status code of the error."""
    error = call.exception()
    if error is None:
        return call.result()
    assert isinstance(error, grpc.RpcError)
    return error.code()


@pytest.fixture
def running(hsm: SoftHsm, tmp_path: Path) -> Iterator[Env]:
    env = start_daemon(hsm, tmp_path, DevCA(), metrics_listen="127.0.0.1:0")
    yield env
    env.daemon.stop(grace=1)


def test_one_idempotency_key_twice_in_a_batch_gets_one_link(running: Env) -> None:
    daemon = running.daemon
    first = delegate_request(Holder.generate())
    again = pb.DelegateRequest()
    again.CopyFrom(first)
    other = delegate_request(Holder.generate(), idempotency_key=first.idempotency_key)
    with queued_behind_a_held_call(running, [first, again, other]) as pending:
        pass
    _, issued, replayed, refused = (outcome(call) for call in pending)
    assert not issued.idempotent_replay
    assert replayed.idempotent_replay
    assert (replayed.jti, replayed.chain) == (issued.jti, issued.chain)
    assert refused == grpc.StatusCode.INVALID_ARGUMENT  # the key, for another request
    (record,) = [r for r in daemon.audit.records(event="delegate") if r.jti == issued.jti]
    assert record.link_hash == sha256_b64(issued.chain.encode("ascii"))
    stored = daemon.state.by_idempotency_key(ORCH, first.idempotency_key)
    assert stored is not None
    assert stored.jti == issued.jti


def test_a_batch_whose_audit_commit_fails_answers_every_call_unavailable_and_keeps_nothing(
    hsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit_commits_can_fail(monkeypatch)
    env = start_daemon(hsm, tmp_path, DevCA(), metrics_listen="127.0.0.1:0")
    daemon = env.daemon
    requests = [delegate_request(Holder.generate()) for _ in range(3)]
    requests.append(delegate_request(Holder.generate(), sub="bot:elsewhere/x"))  # denied
    head = daemon.audit.head
    try:
        with queued_behind_a_held_call(env, requests) as pending:
            FailingCommit.fault = "disk I/O error"  # from the held call's commit on
        FailingCommit.fault = None
        assert [outcome(call) for call in pending] == [grpc.StatusCode.UNAVAILABLE] * 5
        assert all("disk I/O error" in str(call.exception()) for call in pending)
        assert daemon.audit.head == head
        assert daemon.audit.records(event="delegate") == []
        assert daemon.audit.records(event="deny") == []
        assert all(daemon.state.by_idempotency_key(ORCH, r.idempotency_key) is None
                   for r in requests)
        metrics = daemon.metrics
        assert metrics is not None
        counted = metrics.registry.get_sample_value
        assert counted("mandate_rpc_requests_total",
                       {"method": "Delegate", "code": "UNAVAILABLE"}) == 5
        assert counted("mandate_rpc_requests_total",
                       {"method": "Delegate", "code": "OK"}) is None
    finally:
        FailingCommit.fault = None
        daemon.stop(grace=1)


def test_a_call_submitted_after_close_is_answered_unavailable(running: Env) -> None:
    daemon = running.daemon
    assert daemon.core is not None
    calls: Batcher = daemon.core.calls()
    calls.close()
    answers: list[Any] = []
    payload = delegate_request(Holder.generate()).SerializeToString()
    calls.submit("/mandate.v1.Signer/Delegate", payload, (None, None, "ipv4:127.0.0.1:1", 1.0),
                 answers.append)
    ((body, status),) = answers
    assert body is None
    assert status is not None
    assert status[0] == "UNAVAILABLE"


def test_a_call_whose_batch_outlasts_its_time_is_answered_deadline_exceeded(
    running: Env,
) -> None:
    """A caller in this process waits for its batch no longer than its time
    and the grace: a stalled HSM does not hold it for good."""
    daemon = running.daemon
    assert daemon.core is not None
    calls = daemon.core.calls()
    turnstile = Turnstile()
    values = (running.ca.issue(uri=ORCH).cert, b"ssl", "ipv4:127.0.0.1:1", 0.2)
    payload = delegate_request(Holder.generate()).SerializeToString()
    with on_link_signatures(daemon, turnstile):
        try:
            started = time.monotonic()
            body, status = calls.call("/mandate.v1.Signer/Delegate", payload, values)
            waited = time.monotonic() - started
        finally:
            turnstile.released.set()
    assert body is None
    assert status is not None
    assert status[0] == "DEADLINE_EXCEEDED"
    assert 0.2 + ANSWER_GRACE_S <= waited < 0.2 + ANSWER_GRACE_S + SAFETY_S
    # The stalled call ran out of time before its record: nothing was issued.
    # (A call after it is answered once the stalled one's batch is done.)
    values = (values[0], values[1], values[2], 5.0)
    after = delegate_request(Holder.generate()).SerializeToString()
    body, status = calls.call("/mandate.v1.Signer/Delegate", after, values)
    assert status is None
    (record,) = daemon.audit.records(event="delegate")
    assert body is not None
    assert record.jti == pb.DelegateResponse.FromString(body).jti


def test_a_bug_while_recording_a_batch_answers_internal_and_hands_out_nothing(
    running: Env,
) -> None:
    daemon = running.daemon
    assert daemon.core is not None
    core = daemon.core

    def commit_then_fail(batch: Batch) -> None:
        core.issuer.commit(batch)
        raise RuntimeError("a bug after the commit")

    calls = Batcher(core.dispatcher(), commit_then_fail, time_limit_s=5.0)
    try:
        values = (running.ca.issue(uri=ORCH).cert, b"ssl", "ipv4:127.0.0.1:1", 5.0)
        payload = delegate_request(Holder.generate()).SerializeToString()
        body, status = calls.call("/mandate.v1.Signer/Delegate", payload, values)
    finally:
        calls.close()
    assert body is None
    assert status == ("INTERNAL", "internal error", ())
    assert len(daemon.audit.records(event="delegate")) == 1  # recorded, not handed out


def test_one_callers_failing_answer_costs_no_other_caller_theirs(running: Env) -> None:
    daemon = running.daemon
    assert daemon.core is not None
    calls = daemon.core.calls()
    values = (running.ca.issue(uri=ORCH).cert, b"ssl", "ipv4:127.0.0.1:1", SAFETY_S)
    method = "/mandate.v1.Signer/Delegate"
    answers: list[Any] = []

    def gone(outcome: Any) -> None:
        raise OSError("the caller's connection is gone")

    turnstile = Turnstile()
    with on_link_signatures(daemon, turnstile), futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(calls.call, method,
                           delegate_request(Holder.generate()).SerializeToString(), values)
        try:
            assert turnstile.wait_for(1)
            calls.submit(method, delegate_request(Holder.generate()).SerializeToString(),
                         values, gone)
            calls.submit(method, delegate_request(Holder.generate()).SerializeToString(),
                         values, answers.append)
            assert wait_for(functools.partial(queued, calls, 2))
        finally:
            turnstile.released.set()
        assert held.result(SAFETY_S)[1] is None
    assert wait_for(lambda: len(answers) == 1)
    ((body, status),) = answers
    assert status is None
    assert body is not None
    assert len(daemon.audit.records(event="delegate")) == 3
