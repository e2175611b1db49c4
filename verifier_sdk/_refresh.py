"""Keeping a verifier's revocation list fresh (spec §7) from any source."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

from ._errors import VerificationError
from ._revocation import verify_revocation_list
from ._verifier import Verifier

log = logging.getLogger("verifier_sdk.revocations")


class RevocationRefresher:
    """Fetches a signed revocation list every ``interval_s`` seconds, in a daemon
    thread, and installs it in ``verifier`` (``Verifier.update_revocations``).

    ``fetch`` returns the list's compact token from anywhere (the signer's
    gRPC, an HTTP endpoint, a file). A fetch that raises, or a list the
    verifier refuses (bad signature, an older ``seq``, ...), is logged and
    passed to ``on_error``; the verifier keeps the last good list.

    Failing closed is the verifier's part: once the list it holds reaches
    ``exp + leeway``, every ``verify`` raises ``revocation_stale`` until a
    newer list arrives (and before the first one, with
    ``require_revocations=True``). So keep ``interval_s`` a small fraction of
    a list's lifetime, so that several attempts fit before it goes stale.
    """

    def __init__(self, verifier: Verifier, fetch: Callable[[], str], *, interval_s: float,
                 on_error: Callable[[Exception], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not isinstance(verifier, Verifier):
            raise TypeError("verifier must be a verifier_sdk.Verifier")
        if isinstance(interval_s, bool) or not isinstance(interval_s, int | float) \
                or not interval_s > 0:
            raise ValueError("interval_s must be a number of seconds > 0")
        self._verifier = verifier
        self._fetch = fetch
        self._interval_s = float(interval_s)
        self._on_error = on_error
        self._clock = clock
        self._lock = threading.Lock()  # one refresh at a time
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_success: float | None = None  # clock time of the last good fetch
        self.last_error: Exception | None = None  # of the last attempt; None if it succeeded
        self.expires_at: int | None = None  # exp of the last good list fetched

    @property
    def seq(self) -> int | None:
        """``seq`` of the list the verifier holds, or None before the first one."""
        return self._verifier.revocation_seq

    def refresh_now(self) -> bool:
        """Fetch and install once; True if a newer list was installed.

        Never raises for a failed fetch or a refused list: that lands in
        ``last_error`` and ``on_error``.
        """
        with self._lock:
            try:
                token = self._fetch()
                # Known before install, so expires_at matches what was installed.
                expires_at = verify_revocation_list(token, self._verifier.bundle).exp
                installed = self._verifier.update_revocations(token)
            except Exception as exc:  # any source, any failure: keep the last good list
                self.last_error = exc
                self._report(exc)
                return False
            self.last_success = self._clock()
            self.last_error = None
            self.expires_at = expires_at
            if installed:
                log.info("revocation list seq %s installed (exp %s)", self.seq, expires_at)
            return installed

    def _report(self, exc: Exception) -> None:
        if isinstance(exc, VerificationError):
            log.warning("revocation list refused, keeping seq %s: %s", self.seq, exc)
        else:
            log.warning("revocation list fetch failed, keeping seq %s: %r", self.seq, exc)
        if self._on_error is not None:
            try:
                self._on_error(exc)
            except Exception:
                log.exception("revocation refresher: on_error raised")

    def start(self) -> None:
        """Refresh once in this thread (a service starts with a list if one is to
        be had), then every ``interval_s`` in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("this refresher was already started")
        self._thread = threading.Thread(target=self._run, name="mandate-revocations",
                                        daemon=True)
        self.refresh_now()
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and wait for it (at most ``timeout_s``: a fetch in
        progress is not interrupted)."""
        self._stopping.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            self.refresh_now()  # never raises for a failed fetch or list

    def __enter__(self) -> RevocationRefresher:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
