"""Delegate calls in batches: one thread issues what has queued, records it
all in one commit, then answers every call.

Each Delegate call costs an HSM signature and two durable records (the audit
record, then the issued link). Run on a thread per call, the calls contend
for the interpreter lock, each record is handed to the audit writer and
waited for, and each issued link is a transaction of its own. Here one
thread takes the calls that have queued (up to ``MAX_CALLS``), runs each
through its servicer with a ``Batch`` that stages its records, commits the
batch (one audit commit, one state transaction: ``Issuer.commit``) and only
then answers: a link or a denial leaves only once its record is durable, and
if the commit fails every call of the batch gets the error. While the thread
signs and commits, new calls queue, and the next batch takes them together.

The other methods (Revoke, the lists, the admin calls) are not batched: they
run where they are called.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

import grpc

from ._errors import SignerError, Unavailable
from ._issuer import Batch
from ._service import (
    INTERNAL,
    CallContext,
    CallValues,
    Dispatcher,
    Outcome,
    failed,
    time_budget,
)
from ._sync import Answer

log = logging.getLogger("mandate.signer")

BATCHED = frozenset({"/mandate.v1.Signer/Delegate"})
# Calls per batch. Small, so that the front end answers one batch while the
# next is signed: with all of 8 calls in flight in one batch, the two
# processes took turns (bench/delegate.py, 8 in flight: 16 → 0.57 of the
# bare RPC, 4 → 0.77). The first call of a batch also waits for the others.
MAX_CALLS = 4
# How much longer than its deadline a caller waits for its answer: the
# servicer enforces the deadline itself; this only bounds a stuck one.
ANSWER_GRACE_S = 2.0
#: What a caller that waited that long and got no answer returns.
NOT_ANSWERED: Outcome = (None, ("DEADLINE_EXCEEDED", "the issuer did not answer in time", ()))


def answer_wait_s(values: CallValues, cap_s: float) -> float:
    """How long a caller waits for the answer to a call with ``values``."""
    return time_budget(values[3], cap_s) + ANSWER_GRACE_S

Reply = Callable[[Outcome], None]


class Batcher:
    """Runs a dispatcher's calls: Delegate in batches on a thread of its own
    (``commit`` records each batch), the others in the calling thread."""

    def __init__(self, dispatcher: Dispatcher, commit: Callable[[Batch], None], *,
                 time_limit_s: float) -> None:
        self._dispatcher = dispatcher
        self._commit = commit
        self._time_limit_s = time_limit_s
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[str, bytes, CallContext, Reply]] = (
            collections.deque())
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="issue", daemon=True)
        self._thread.start()

    @property
    def methods(self) -> list[str]:
        return self._dispatcher.methods

    @property
    def queued(self) -> int:
        """Calls waiting for a batch to take them."""
        with self._cond:
            return len(self._queue)

    @staticmethod
    def batched(method: str) -> bool:
        return method in BATCHED

    def submit(self, method: str, payload: bytes, values: CallValues, reply: Reply) -> None:
        """Queue a batched call; ``reply`` gets its outcome on the batch thread.
        Its deadline runs from now."""
        context = CallContext(*values)
        with self._cond:
            closing = self._closing
            if not closing:
                self._queue.append((method, payload, context, reply))
                self._cond.notify()
        if closing:
            reply(failed(Unavailable("the daemon is stopping")))

    def call(self, method: str, payload: bytes, values: CallValues) -> Outcome:
        """Run one call and return its outcome (a batched one waits for its batch)."""
        if method not in BATCHED:
            return self._dispatcher.call(method, payload, values)
        answer: Answer[Outcome] = Answer(INTERNAL)
        self.submit(method, payload, values, answer)
        if not answer.wait(answer_wait_s(values, self._time_limit_s)):
            return NOT_ANSWERED
        return answer.value

    def close(self) -> None:
        """Answer every queued call, then stop. Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                calls = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_CALLS))]
            self._issue(calls)

    def _issue(self, calls: list[tuple[str, bytes, CallContext, Reply]]) -> None:
        batch = Batch()
        outcomes: list[Outcome] = []
        for method, payload, context, _ in calls:
            context.batch = batch
            outcomes.append(self._dispatcher.call_with(method, payload, context))
        try:
            self._commit(batch)
        except SignerError as exc:
            log.warning("Delegate failed: %s (%d calls, none answered with a link)",
                        exc.message, len(calls),
                        extra={"method": "Delegate", "code": "UNAVAILABLE"})
            outcomes = [failed(exc)] * len(calls)
        except Exception:  # a bug: nothing of the batch may leave
            log.exception("Delegate: recording a batch of %d calls failed", len(calls))
            outcomes = [INTERNAL] * len(calls)
        for (_, _, context, reply), outcome in zip(calls, outcomes, strict=True):
            # Neither a metric nor one caller's answer may cost another caller theirs.
            if context.on_end is not None:
                status = outcome[1]
                try:
                    context.on_end(grpc.StatusCode.OK if status is None
                                   else grpc.StatusCode[status[0]])
                except Exception:
                    log.exception("counting a Delegate call failed")
            try:
                reply(outcome)
            except Exception:
                log.exception("answering a Delegate call failed")
