"""Wiring: config → HSM, state, audit, policy, issuer → a gRPC server with
mutual TLS, health checking, reflection and bounded resources."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from softhsm import SoftHsmError, find_module

from ._audit import AuditLog
from ._batching import Batcher
from ._config import Config, ServerConfig
from ._errors import ConfigError, NotFound, Unavailable
from ._issuer import Audit, Issuer
from ._keys import KeySigner, KeyStore
from ._metrics import Metrics, parse_listen
from ._pkcs11 import Pkcs11KeyStore, Pkcs11Token, pin_from_env, pin_from_file
from ._policy import Policy
from ._proto.mandate.v1 import signer_pb2 as pb
from ._service import (
    CallContext,
    CallValues,
    Dispatcher,
    Outcome,
    SignerAdminService,
    SignerService,
)
from ._state import StateStore
from ._storage import open_storage
from ._worker import IssuerProcess

log = logging.getLogger("mandate.signer")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Signer"].full_name,
    pb.DESCRIPTOR.services_by_name["SignerAdmin"].full_name,
)
HEALTH_PROBE_INTERVAL_S = 1.0
PRUNE_INTERVAL_S = 600.0  # and once at start


def open_hsm(config: Config,
             on_health_change: Callable[[bool], None] | None = None) -> Pkcs11KeyStore:
    """Open the configured token; wrong PIN, missing module or token: ConfigError."""
    hsm = config.hsm
    module = hsm.module
    if not module:
        try:
            module = find_module()
        except SoftHsmError as exc:
            raise ConfigError(f"no PKCS#11 module configured ([hsm] module): {exc}") from None
    pin = pin_from_file(hsm.pin_file) if hsm.pin_file else pin_from_env(hsm.pin_env)
    token = Pkcs11Token(module, token_label=hsm.token_label, pin=pin,
                        on_health_change=on_health_change)
    return Pkcs11KeyStore(token)


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def grpc_server(cfg: ServerConfig) -> grpc.Server:
    """The daemon's server stack: worker pool, concurrency limit, message limits."""
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", max(cfg.max_message_bytes, 4 * 1024 * 1024)),
    ]
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="rpc"),
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs, options=options,
    )


class _CheckpointKey:
    """The audit log's checkpoint signer: a root key of the bundle.

    It stays with one key while that key's window admits the next minute,
    then moves to the active key, so the alg, kid and signature of one
    checkpoint always come from the same key.
    """

    MARGIN_S = 60

    def __init__(self, clock: Callable[[], float]) -> None:
        self.issuer: Issuer | None = None
        self._clock = clock
        self._pinned: tuple[str, KeySigner] | None = None
        self._lock = threading.Lock()

    def _current(self) -> KeySigner:
        assert self.issuer is not None, "bound to the issuer at start-up"
        now = int(self._clock())
        with self._lock:
            if self._pinned is not None:
                # Re-read the window: a rotation may have given the key an end.
                record = next((k for k in self.issuer.keyring() if k.kid == self._pinned[0]),
                              None)
                if record is not None and (record.exp is None
                                           or now + self.MARGIN_S < record.exp):
                    return self._pinned[1]
            kid = self.issuer.active_key(now).kid
            self._pinned = (kid, self.issuer.signer(kid))
            return self._pinned[1]

    @property
    def kid(self) -> str:
        return self._current().kid

    @property
    def alg(self) -> str:
        return self._current().alg

    @property
    def public_jwk(self) -> dict[str, Any]:
        return self._current().public_jwk

    def sign(self, data: bytes) -> bytes:
        return self._current().sign(data)


class Core:
    """What issues: the policy, the HSM keys, the state store, the audit log
    and the issuer, with their metrics. It lives in the daemon's own process
    (``issuance = "inline"``) or in its issuer process (``"process"``)."""

    def __init__(self, config: Config, *, key_store: KeyStore | None = None,
                 clock: Callable[[], float] = time.time,
                 on_health_change: Callable[[bool], None] = lambda healthy: None) -> None:
        self.config = config
        self._clock = clock
        self._on_health_change = on_health_change
        self._closed = threading.Event()
        self._batcher: Batcher | None = None
        # Metrics only when configured: otherwise no wrapper sits on the hot path.
        self.metrics: Metrics | None = None
        self._metrics_at: tuple[str, int] | None = None
        if config.server.metrics_listen:
            self._metrics_at = parse_listen(config.server.metrics_listen)
            self.metrics = Metrics()
        self.metrics_port = 0
        self.policy = Policy.load(config.policy_file)
        self.keys = key_store if key_store is not None else open_hsm(
            config, on_health_change=self._hsm_health
        )
        try:
            config.state_dir.mkdir(parents=True, exist_ok=True)
            checkpoint_key = _CheckpointKey(clock)
            self.state, self.audit = open_storage(config, signer=checkpoint_key)
            for record in self.state.key_records():
                self.keys.signer(record.kid)  # a key in the bundle but not in the HSM: fail now
        except BaseException:
            self._close_token()
            raise
        keys: KeyStore = self.keys
        audit: Audit = self.audit
        if self.metrics is not None:
            # The issuer (and through it the checkpoint key) signs and audits
            # through metered wrappers; self.keys and self.audit stay the real ones.
            keys, audit = self.metrics.key_store(keys), self.metrics.audit(audit)
            token = self.token
            self.metrics.watch_hsm(lambda: token is None or bool(token.healthy))
        self.audit.on_health_change = self._audit_health
        self.issuer = Issuer(policy=self.policy, keys=keys, state=self.state,
                             audit=audit, list_issuer=config.revocation.issuer,
                             list_ttl_s=config.revocation.list_ttl_s, clock=clock)
        checkpoint_key.issuer = self.issuer

    @property
    def token(self) -> Pkcs11Token | None:
        return getattr(self.keys, "token", None)

    @property
    def healthy(self) -> bool:
        """The HSM answers and the audit store takes writes: issuance can succeed."""
        token = self.token
        return (token is None or bool(token.healthy)) and self.audit.healthy

    def _hsm_health(self, healthy: bool) -> None:
        log.warning("HSM %s", "is back" if healthy else "is unreachable: failing fast")
        self._on_health_change(self.healthy)

    def _audit_health(self, healthy: bool) -> None:
        if not healthy:
            log.warning("audit store refuses writes: issuance fails closed, health NOT_SERVING")
        self._on_health_change(self.healthy)

    def _probe_loop(self) -> None:
        token = self.token
        pruned_at = time.monotonic()
        while not self._closed.wait(HEALTH_PROBE_INTERVAL_S):
            if token is not None and not token.healthy:
                token.probe()
            if not self.audit.healthy:
                with contextlib.suppress(Unavailable):  # still failing: logged, health as it is
                    self.audit.probe()
            if time.monotonic() - pruned_at >= PRUNE_INTERVAL_S:
                pruned_at = time.monotonic()
                self.prune()

    def prune(self) -> None:
        """Keep the state store from growing with every link ever issued."""
        try:
            links, revocations = self.issuer.prune()
        except Unavailable as exc:
            log.warning("pruning the state store failed (tried again later): %s", exc.message)
            return
        if links or revocations:
            log.info("state store: forgot %d expired links and %d of their revocations",
                     links, revocations)

    def calls(self) -> Batcher:
        """What serves the calls: the dispatcher, Delegate in batches (one per Core)."""
        if self._batcher is None:
            self._batcher = Batcher(self.dispatcher(), self.issuer.commit,
                                    time_limit_s=self.config.server.rpc_time_limit_s)
        return self._batcher

    def dispatcher(self) -> Dispatcher:
        cfg = self.config.server
        return Dispatcher(
            SignerService(self.issuer, time_limit_s=cfg.rpc_time_limit_s, metrics=self.metrics),
            SignerAdminService(self.issuer, max_link_ttl_s=self.max_link_ttl(),
                               checkpoints=self._checkpoints, clock=self._clock,
                               metrics=self.metrics),
        )

    def _checkpoints(self, limit: int) -> tuple[list[pb.AuditCheckpoint], int, str]:
        checkpoints = self.audit.checkpoints()[-limit:]
        seq, head = self.audit.head
        return ([pb.AuditCheckpoint(seq=c.seq, head=c.head, token=c.token) for c in checkpoints],
                seq, head)

    def max_link_ttl(self) -> int:
        """The longest link any grant allows: how long a retiring key must stay."""
        return self.policy.max_ttl()

    def ready(self) -> int:
        """Check that there is a key to sign with and open the metrics endpoint;
        returns the metrics port (0: none)."""
        try:
            self.issuer.active_key(int(self._clock()))
        except NotFound as exc:
            raise ConfigError(exc.message) from None
        if self.metrics is not None and self._metrics_at is not None and not self.metrics_port:
            self.metrics_port = self.metrics.serve(*self._metrics_at)
            host = self._metrics_at[0]
            log.info("metrics on http://%s:%d/metrics (plain HTTP, no auth; no secrets in it)",
                     f"[{host}]" if ":" in host else host, self.metrics_port,
                     extra={"metrics_port": self.metrics_port})
        return self.metrics_port

    def started(self, port: int) -> None:
        """The front end serves on ``port``: record it, watch the HSM."""
        self.prune()
        threading.Thread(target=self._probe_loop, name="hsm-probe", daemon=True).start()
        self.audit.append("start", caller="daemon", decision="ok", detail={"port": port})

    def reload_policy(self) -> bool:
        """Re-read the policy file; a broken file keeps the old policy."""
        try:
            policy = Policy.load(self.config.policy_file)
        except ConfigError as exc:
            log.error("policy reload failed, keeping the old policy: %s", exc.message)
            return False
        self.policy = self.issuer.policy = policy
        log.info("policy reloaded from %s", self.config.policy_file)
        return True

    def close(self, *, served: bool) -> None:
        """Flush the audit log (with a ``stop`` record if the daemon served),
        close the state store and the HSM."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            if self._batcher is not None:
                self._batcher.close()  # every queued call answered
            if served:
                self.audit.append("stop", caller="daemon", decision="ok")
        finally:
            if self.metrics is not None:
                self.metrics.close()
            self.audit.close()
            self.state.close()
            self._close_token()

    def _close_token(self) -> None:
        token = self.token
        if token is not None:
            token.close()


class Daemon:
    """The signer daemon: build it, ``start()``, then ``stop()`` (or ``wait()``).

    The gRPC front end (TLS, caller identity, limits, health) always runs
    here. Issuance runs in an issuer process of its own when the config says
    ``issuance = "process"``, so that the two use two cores; else, or when a
    ``key_store`` is given (tests), in this process, reachable as ``core``.
    """

    def __init__(self, config: Config, *, key_store: KeyStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._health = health.HealthServicer()
        self._stopped = threading.Event()
        self.failed = False  # the issuer process was lost: `mandate serve` exits non-zero
        self._server: grpc.Server | None = None
        self._timer: RequestTimer | None = None
        self.port = 0
        self.core: Core | None = None
        self._process: IssuerProcess | None = None
        if config.server.issuance == "process" and key_store is None:
            self._process = IssuerProcess(config, on_health_change=self._hsm_health,
                                          on_lost=self._issuer_lost)
            self.metrics_port = self._process.metrics_port
        else:
            self.core = Core(config, key_store=key_store, clock=clock,
                             on_health_change=self._hsm_health)
            self.metrics_port = 0

    def _inline(self) -> Core:
        if self.core is None:
            raise AttributeError("issuance runs in the issuer process; use the gRPC API")
        return self.core

    # The issuance side, when it runs in this process (tests, offline commands).
    @property
    def issuer(self) -> Issuer:
        return self._inline().issuer

    @property
    def audit(self) -> AuditLog:
        return self._inline().audit

    @property
    def keys(self) -> Any:  # KeyStore; the PKCS#11 one has ``token``
        return self._inline().keys

    @property
    def state(self) -> StateStore:
        return self._inline().state

    @property
    def policy(self) -> Policy:
        return self._inline().policy

    @property
    def metrics(self) -> Metrics | None:
        return self._inline().metrics

    def max_link_ttl(self) -> int:
        return self._inline().max_link_ttl()

    # --- health --------------------------------------------------------------

    def _set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *SERVICE_NAMES):
            self._health.set(name, status)

    def _hsm_health(self, healthy: bool) -> None:
        self._set_serving(healthy and not self._stopped.is_set())

    def _issuer_lost(self) -> None:
        log.error("the issuer process exited: stopping")
        self.failed = True
        threading.Thread(target=self.stop, args=(0,), name="stop", daemon=True).start()

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> int:
        """Bind and serve; returns the port (useful with port 0)."""
        cfg = self.config.server
        if self.core is not None:
            self.metrics_port = self.core.ready()
            calls = self.core.calls()
            call, methods = calls.call, calls.methods
        else:
            assert self._process is not None
            call, methods = self._process.call, self._process.methods
        try:
            self._server, self.port = self._serve(cfg, call, methods)
        except BaseException:
            self.stop(0)
            raise
        if self.core is not None:
            self._set_serving(self.core.healthy)
            self.core.started(self.port)
        else:
            assert self._process is not None
            self._set_serving(self._process.started(self.port))
        log.info("serving on port %d", self.port, extra={"port": self.port})
        return self.port

    def _serve(self, cfg: ServerConfig, call: Callable[[str, bytes, CallValues], Outcome],
               methods: list[str]) -> tuple[grpc.Server, int]:
        server = grpc_server(cfg)
        self._timer = RequestTimer(cfg.rpc_time_limit_s)
        server.add_generic_rpc_handlers(_handlers(methods, call, self._timer))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if cfg.plaintext_loopback:
            if not is_loopback(cfg.listen):
                raise ConfigError("plaintext_loopback listens on loopback addresses only")
            log.warning("PLAINTEXT listener on %s: no TLS and no caller identity — "
                        "for local development only", cfg.listen)
            port = int(server.add_insecure_port(cfg.listen))
        else:
            port = int(server.add_secure_port(cfg.listen, self._credentials()))
        if port == 0:
            raise ConfigError(f"cannot listen on {cfg.listen}")
        server.start()
        return server, port

    def _credentials(self) -> grpc.ServerCredentials:
        cfg = self.config.server
        paths = {"tls_cert": cfg.tls_cert, "tls_key": cfg.tls_key, "client_ca": cfg.client_ca}
        missing = [name for name, path in paths.items() if path is None]
        if missing:
            raise ConfigError(f"[server] needs {', '.join(missing)} (mutual TLS), or "
                              "plaintext_loopback = true for local development")
        data = {}
        for name, path in paths.items():
            assert path is not None
            try:
                data[name] = Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"[server] {name}: cannot read {path}: {exc.strerror}") from None
        return grpc.ssl_server_credentials(
            [(data["tls_key"], data["tls_cert"])], root_certificates=data["client_ca"],
            require_client_auth=True,
        )

    def reload_policy(self) -> bool:
        """Re-read the policy file; a broken file keeps the old policy."""
        if self.core is not None:
            return self.core.reload_policy()
        assert self._process is not None
        return self._process.reload_policy()

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, finish those in flight, flush the audit log, close the HSM."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        served = self._server is not None
        try:
            if self._server is not None:
                self._set_serving(False)
                self._server.stop(self.config.server.shutdown_grace_s if grace is None
                                  else grace).wait()
        finally:
            if self._timer is not None:
                self._timer.close()
            if self.core is not None:
                self.core.close(served=served)
            elif self._process is not None:
                self._process.close(served=served)
        log.info("stopped")

    def wait(self) -> None:
        # Wake now and then: a signal handler runs only in the main thread,
        # and only once it runs Python again.
        while not self._stopped.wait(0.5):
            pass


class RequestTimer:
    """Ends calls whose request message has not arrived within the call time cap.

    gRPC reads a call's request on the worker thread the call was given, with
    no time limit of its own: clients that send a request's first bytes and
    then trickle the rest could hold every worker. Each call is watched from
    its start until its request is in; past the cap it is cancelled, which
    wakes its worker. All calls share one cap, so arrival order is deadline
    order and a deque does: entries done early are dropped as the head moves.
    """

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._waiting: deque[list[Any]] = deque()  # [deadline, context or None once in]
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="request-timer", daemon=True)
        self._thread.start()

    def watch(self, context: grpc.ServicerContext) -> list[Any]:
        """Start the clock for a call; set the entry's [1] to None once its request is in."""
        entry = [time.monotonic() + self.limit_s, context]
        with self._cond:
            self._waiting.append(entry)
            if len(self._waiting) == 1:
                self._cond.notify()
        return entry

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                while self._waiting and self._waiting[0][1] is None:
                    self._waiting.popleft()
                if not self._waiting:
                    self._cond.wait()
                    continue
                late = self._waiting[0][0] - time.monotonic()
                if late > 0:
                    self._cond.wait(late)
                    continue
                context = self._waiting.popleft()[1]
                if context is not None:
                    log.warning("a request did not arrive within %.1f s: call ended",
                                self.limit_s, extra={"peer": context.peer()})
                    context.cancel()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()


def _handlers(methods: list[str], call: Callable[[str, bytes, CallValues], Outcome],
              timer: RequestTimer) -> list[grpc.GenericRpcHandler]:
    """One generic handler per service: requests and responses stay bytes here,
    and are decoded where the servicer runs.

    Every method is unary on the wire, but is served as client-streaming so
    that the request is read here, under ``timer``, and the call's time cap
    counts from the call's start, not from its request's last byte.
    """

    def handler(method: str) -> grpc.RpcMethodHandler:
        def handle(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            entry = timer.watch(context)
            try:
                request = next(requests, None)  # grpc.RpcError once cancelled
            finally:
                entry[1] = None
            if request is None:
                outcome: Outcome = (None, ("INVALID_ARGUMENT", "no request message", ()))
            else:
                pem, transport, peer, remaining = CallContext.values_of(context)
                left = entry[0] - time.monotonic()  # of the server's cap
                if remaining is None or remaining > left:
                    remaining = max(left, 0.0)
                outcome = call(method, request, (pem, transport, peer, remaining))
            payload, status = outcome
            if status is not None:
                code, details, trailing = status
                context.abort_with_status(_Status(grpc.StatusCode[code], details, trailing))
            assert payload is not None
            return payload
        return grpc.stream_unary_rpc_method_handler(handle)

    services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for method in methods:
        service, name = method.lstrip("/").split("/")
        services.setdefault(service, {})[name] = handler(method)
    return [grpc.method_handlers_generic_handler(service, handlers)
            for service, handlers in services.items()]


class _Status(grpc.Status):  # type: ignore[misc]  # grpc ships no types
    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata
