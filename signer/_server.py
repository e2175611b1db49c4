"""Wiring: config → HSM, state, audit, policy, issuer → a gRPC server with
mutual TLS, health checking, reflection and bounded resources."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from softhsm import SoftHsmError, find_module

from ._audit import AuditLog
from ._config import Config, ServerConfig
from ._errors import ConfigError, NotFound
from ._issuer import Audit, Issuer
from ._keys import KeySigner, KeyStore
from ._metrics import Metrics, parse_listen
from ._pkcs11 import Pkcs11KeyStore, Pkcs11Token, pin_from_env, pin_from_file
from ._policy import Policy
from ._proto.mandate.v1 import signer_pb2 as pb
from ._proto.mandate.v1 import signer_pb2_grpc as pb_grpc
from ._service import SignerAdminService, SignerService
from ._state import StateStore

log = logging.getLogger("mandate.signer")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Signer"].full_name,
    pb.DESCRIPTOR.services_by_name["SignerAdmin"].full_name,
)
HEALTH_PROBE_INTERVAL_S = 1.0


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


class Daemon:
    """The signer daemon: build it, ``start()``, then ``stop()`` (or ``serve()``)."""

    def __init__(self, config: Config, *, key_store: KeyStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._health = health.HealthServicer()
        self._stopped = threading.Event()
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
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.state = StateStore(config.state_path)
        for record in self.state.key_records():
            self.keys.signer(record.kid)  # a key in the bundle but not in the HSM: fail now
        checkpoint_key = _CheckpointKey(clock)
        self.audit = AuditLog(
            config.audit_path, signer=checkpoint_key,
            checkpoint_every=config.audit.checkpoint_every,
            checkpoint_interval_s=config.audit.checkpoint_interval_s,
            commit_timeout_s=config.server.rpc_time_limit_s,
        )
        keys: KeyStore = self.keys
        audit: Audit = self.audit
        if self.metrics is not None:
            # The issuer (and through it the checkpoint key) signs and audits
            # through metered wrappers; self.keys and self.audit stay the real ones.
            keys, audit = self.metrics.key_store(keys), self.metrics.audit(audit)
            token = getattr(self.keys, "token", None)
            self.metrics.watch_hsm(lambda: token is None or bool(token.healthy))
        self.issuer = Issuer(policy=self.policy, keys=keys, state=self.state,
                             audit=audit, list_issuer=config.revocation.issuer,
                             list_ttl_s=config.revocation.list_ttl_s, clock=clock)
        checkpoint_key.issuer = self.issuer
        self._server: grpc.Server | None = None
        self.port = 0

    # --- health --------------------------------------------------------------

    def _set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *SERVICE_NAMES):
            self._health.set(name, status)

    def _hsm_health(self, healthy: bool) -> None:
        log.warning("HSM %s", "is back" if healthy else "is unreachable: failing fast")
        self._set_serving(healthy)

    def _probe_loop(self) -> None:
        token = getattr(self.keys, "token", None)
        while not self._stopped.wait(HEALTH_PROBE_INTERVAL_S):
            if token is not None and not token.healthy:
                token.probe()

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> int:
        """Bind and serve; returns the port (useful with port 0)."""
        try:
            self.issuer.active_key(int(self._clock()))
        except NotFound as exc:
            raise ConfigError(exc.message) from None
        cfg = self.config.server
        server = grpc_server(cfg)
        pb_grpc.add_SignerServicer_to_server(
            SignerService(self.issuer, time_limit_s=cfg.rpc_time_limit_s,
                          metrics=self.metrics), server
        )
        pb_grpc.add_SignerAdminServicer_to_server(
            SignerAdminService(self.issuer, max_link_ttl_s=self.max_link_ttl(),
                               checkpoints=self._checkpoints, clock=self._clock,
                               metrics=self.metrics),
            server,
        )
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
        if self.metrics is not None and self._metrics_at is not None:
            try:
                self.metrics_port = self.metrics.serve(*self._metrics_at)
            except ConfigError:
                server.stop(None)  # release the bound gRPC port
                raise
            host = self._metrics_at[0]
            log.info("metrics on http://%s:%d/metrics (plain HTTP, no auth; no secrets in it)",
                     f"[{host}]" if ":" in host else host, self.metrics_port,
                     extra={"metrics_port": self.metrics_port})
        server.start()
        self._server, self.port = server, port
        self._set_serving(getattr(getattr(self.keys, "token", None), "healthy", True))
        threading.Thread(target=self._probe_loop, name="hsm-probe", daemon=True).start()
        self.audit.append("start", caller="daemon", decision="ok", detail={"port": port})
        log.info("serving on port %d", port, extra={"port": port})
        return port

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

    def _checkpoints(self, limit: int) -> tuple[list[pb.AuditCheckpoint], int, str]:
        checkpoints = self.audit.checkpoints()[-limit:]
        seq, head = self.audit.head
        return ([pb.AuditCheckpoint(seq=c.seq, head=c.head, token=c.token) for c in checkpoints],
                seq, head)

    def max_link_ttl(self) -> int:
        """The longest link any grant allows: how long a retiring key must stay."""
        return self.policy.max_ttl()

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

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, finish those in flight, flush the audit log, close the HSM."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._server is not None:
            self._set_serving(False)
            self._server.stop(self.config.server.shutdown_grace_s if grace is None else grace
                              ).wait()
        try:
            if self._server is not None:  # a daemon that served says it stopped
                self.audit.append("stop", caller="daemon", decision="ok")
        finally:
            if self.metrics is not None:
                self.metrics.close()
            self.audit.close()
            self.state.close()
            token = getattr(self.keys, "token", None)
            if token is not None:
                token.close()
        log.info("stopped")

    def wait(self) -> None:
        self._stopped.wait()
