"""Prometheus metrics of the daemon, on their own registry and HTTP port.

Label values come only from fixed sets: method names of the servicers,
status code names, denial reasons (constants of the policy), key algorithms
and audit event names. The caller is deliberately not a label: any identity
the client CA certifies can be denied, so the set is not bounded by the
policy, and the endpoint is unauthenticated — callers are in the audit log
and the structured log lines instead.

The hot path pays for a dict lookup and prometheus-client's own per-value
locks; no lock of ours is taken (a racing first use of a label set creates
the same child twice, which prometheus-client resolves).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ._errors import ConfigError, SignerError
from ._issuer import Audit
from ._keys import KeySigner, KeyStore

# Seconds. An RPC that signs in SoftHSM2 takes ~0.5-1 ms; the target p99 is 10 ms.
RPC_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
# A SoftHSM2 Ed25519 signature takes ~0.2 ms; a network HSM a few ms.
SIGN_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)
# A group commit with fsync: ~1 ms on a local disk, more under load.
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0)

_REASON = re.compile(r"[a-z][a-z0-9_]{0,47}")


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port); ConfigError otherwise."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f'config: [server] metrics_listen must be "host:port" '
                          f'(or "" for no metrics), not {listen!r}')
    return host, int(port)


class Metrics:
    """The daemon's metrics; ``serve`` exposes them at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.rpc_requests = Counter(
            "mandate_rpc_requests", "RPCs finished, by method and gRPC status code",
            ["method", "code"], registry=reg)
        self.rpc_duration = Histogram(
            "mandate_rpc_duration_seconds", "RPC handling time, by method and status code",
            ["method", "code"], buckets=RPC_BUCKETS_S, registry=reg)
        self.rpc_in_flight = Gauge(
            "mandate_rpc_in_flight", "RPCs being handled now, by method", ["method"],
            registry=reg)
        self.hsm_sign_duration = Histogram(
            "mandate_hsm_sign_duration_seconds", "Successful signatures in the HSM, by alg",
            ["alg"], buckets=SIGN_BUCKETS_S, registry=reg)
        self.hsm_sign_errors = Counter(
            "mandate_hsm_sign_errors", "Failed signatures in the HSM, by alg and error",
            ["alg", "error"], registry=reg)
        self.hsm_up = Gauge(
            "mandate_hsm_up", "1 while the HSM session is usable, else 0", registry=reg)
        self.audit_commit_duration = Histogram(
            "mandate_audit_commit_duration_seconds",
            "Time until an audit record is durable, by event", ["event"],
            buckets=COMMIT_BUCKETS_S, registry=reg)
        self.audit_commit_errors = Counter(
            "mandate_audit_commit_errors", "Audit appends that failed, by event", ["event"],
            registry=reg)
        self.policy_denials = Counter(
            "mandate_policy_denials", "Delegate requests the policy denied, by reason",
            ["reason"], registry=reg)
        self.hsm_up.set(1)
        # (method, code) → (counter child, histogram child); method → gauge child.
        self._rpc_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._in_flight_children: dict[str, Gauge] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # --- recording --------------------------------------------------------------

    def in_flight(self, method: str) -> Gauge:
        """The in-flight gauge of ``method`` (``inc()`` on entry, ``dec()`` on exit)."""
        child = self._in_flight_children.get(method)
        if child is None:
            child = self._in_flight_children[method] = self.rpc_in_flight.labels(method)
        return child

    def rpc_done(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        children = self._rpc_children.get((method, code.name))
        if children is None:
            children = self._rpc_children[(method, code.name)] = (
                self.rpc_requests.labels(method, code.name),
                self.rpc_duration.labels(method, code.name),
            )
        children[0].inc()
        children[1].observe(seconds)

    def denied(self, reason: str) -> None:
        # Reasons are the policy's constants; anything else is not a label value.
        self.policy_denials.labels(reason if _REASON.fullmatch(reason) else "other").inc()

    def watch_hsm(self, healthy: Callable[[], bool]) -> None:
        """Read the HSM's health at each scrape: nothing to keep in step."""
        self.hsm_up.set_function(lambda: 1.0 if healthy() else 0.0)

    # --- wrappers that keep the interfaces ----------------------------------------

    def key_store(self, inner: KeyStore) -> KeyStore:
        return _MeteredKeyStore(inner, self)

    def audit(self, inner: Audit) -> Audit:
        return _MeteredAudit(inner, self)

    # --- the HTTP endpoint -------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over plain HTTP; returns the bound port."""
        try:
            self._server, self._thread = start_http_server(port, addr=host,
                                                           registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"[server] metrics_listen: cannot listen on {host}:{port}: "
                              f"{exc.strerror}") from None
        return int(self._server.server_port)

    def close(self) -> None:
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()


class _MeteredSigner:
    """A KeySigner that times its inner signer's ``sign``."""

    def __init__(self, inner: KeySigner, metrics: Metrics) -> None:
        self.inner = inner
        self._metrics = metrics
        self._observe = metrics.hsm_sign_duration.labels(inner.alg).observe

    @property
    def kid(self) -> str:
        return self.inner.kid

    @property
    def alg(self) -> str:
        return self.inner.alg

    @property
    def public_jwk(self) -> dict[str, Any]:
        return self.inner.public_jwk

    def sign(self, data: bytes) -> bytes:
        start = time.perf_counter()
        try:
            signature = self.inner.sign(data)
        except Exception as exc:
            error = type(exc).__name__ if isinstance(exc, SignerError) else "other"
            self._metrics.hsm_sign_errors.labels(self.inner.alg, error).inc()
            raise
        self._observe(time.perf_counter() - start)
        return signature


class _MeteredKeyStore:
    """A KeyStore whose signers are metered; one wrapper per inner signer."""

    def __init__(self, inner: KeyStore, metrics: Metrics) -> None:
        self.inner = inner
        self._metrics = metrics
        self._signers: dict[str, _MeteredSigner] = {}

    def _wrap(self, signer: KeySigner) -> KeySigner:
        found = self._signers.get(signer.kid)
        if found is None or found.inner is not signer:
            found = self._signers[signer.kid] = _MeteredSigner(signer, self._metrics)
        return found

    def generate(self, kid: str, alg: str) -> KeySigner:
        return self._wrap(self.inner.generate(kid, alg))

    def signer(self, kid: str) -> KeySigner:
        return self._wrap(self.inner.signer(kid))


class _MeteredAudit:
    """An Audit whose appends (which return once durable) are timed."""

    def __init__(self, inner: Audit, metrics: Metrics) -> None:
        self.inner = inner
        self._metrics = metrics
        self._observers: dict[str, Callable[[float], None]] = {}

    def append_many(self, events: Sequence[tuple[str, Mapping[str, Any]]]
                    ) -> Sequence[object]:
        """Each record is observed with the time its commit took."""
        start = time.perf_counter()
        try:
            records = self.inner.append_many(events)
        except Exception:
            for event, _ in events:
                self._metrics.audit_commit_errors.labels(event).inc()
            raise
        elapsed = time.perf_counter() - start
        for event, _ in events:
            observe = self._observers.get(event)
            if observe is None:
                observe = self._observers[event] = (
                    self._metrics.audit_commit_duration.labels(event).observe)
            observe(elapsed)
        return records
