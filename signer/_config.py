"""The daemon's configuration: a TOML file read into frozen dataclasses.

Secrets are never config values: the HSM PIN arrives through the
environment variable or the file the config names.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ._errors import ConfigError


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:7443"
    tls_cert: Path | None = None  # PEM chain the daemon presents
    tls_key: Path | None = None
    client_ca: Path | None = None  # CA bundle that client certificates must chain to
    plaintext_loopback: bool = False  # development only: no TLS, loopback only
    max_message_bytes: int = 65_536
    max_concurrent_rpcs: int = 64  # beyond it: RESOURCE_EXHAUSTED, never a queue
    workers: int = 16
    rpc_time_limit_s: float = 5.0  # server-side cap on one call
    shutdown_grace_s: float = 10.0
    metrics_listen: str = ""  # host:port of the Prometheus /metrics endpoint; empty: none
    log_format: str = "json"  # `mandate serve` logs: "json" (one object per line) or "text"


@dataclass(frozen=True, slots=True)
class HsmConfig:
    module: str = ""  # path of the PKCS#11 module; empty: SoftHSM2's, if found
    token_label: str = "mandate"  # noqa: S105 - a token label, not a secret
    pin_env: str = "MANDATE_HSM_PIN"
    pin_file: Path | None = None  # read instead of pin_env when set


@dataclass(frozen=True, slots=True)
class AuditConfig:
    checkpoint_every: int = 1000  # records
    checkpoint_interval_s: float = 5.0


@dataclass(frozen=True, slots=True)
class RevocationConfig:
    issuer: str = "mandate-signer"  # iss of the signed lists
    list_ttl_s: int = 3600


@dataclass(frozen=True, slots=True)
class Config:
    policy_file: Path
    state_dir: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    hsm: HsmConfig = field(default_factory=HsmConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    revocation: RevocationConfig = field(default_factory=RevocationConfig)

    @property
    def audit_path(self) -> Path:
        return self.state_dir / "audit.db"

    @property
    def state_path(self) -> Path:
        return self.state_dir / "state.db"


def _section(cls: type[Any], data: Any, name: str, base: Path) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config: [{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"config: unknown key(s) in [{name}]: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        default = getattr(cls(), key)
        kind = str(known[key].type)
        if "Path" in kind:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"config: [{name}] {key} must be a path")
            values[key] = (base / value).resolve()
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"config: [{name}] {key} must be true or false")
            values[key] = value
        elif isinstance(default, int):
            if type(value) is not int or value < 1:
                raise ConfigError(f"config: [{name}] {key} must be a positive integer")
            values[key] = value
        elif isinstance(default, float):
            if type(value) not in (int, float) or not 0 < value < math.inf:
                raise ConfigError(f"config: [{name}] {key} must be a positive number")
            values[key] = float(value)
        else:
            if not isinstance(value, str):
                raise ConfigError(f"config: [{name}] {key} must be a string")
            values[key] = value
    return cls(**values)


def load_config(path: str | Path) -> Config:
    """Read a config file; relative paths in it are relative to the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: {exc}") from None
    base = path.resolve().parent
    allowed = {"server", "hsm", "audit", "revocation", "policy", "state"}
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"config: unknown section(s) {', '.join(sorted(unknown))}")
    policy = data.get("policy", {})
    state = data.get("state", {})
    if not isinstance(policy, dict) or set(policy) != {"file"} or not isinstance(
        policy["file"], str
    ):
        raise ConfigError('config: [policy] needs exactly file = "path/to/policy.toml"')
    if not isinstance(state, dict) or set(state) != {"dir"} or not isinstance(state["dir"], str):
        raise ConfigError('config: [state] needs exactly dir = "path/to/state"')
    return Config(
        policy_file=(base / policy["file"]).resolve(),
        state_dir=(base / state["dir"]).resolve(),
        server=_section(ServerConfig, data.get("server", {}), "server", base),
        hsm=_section(HsmConfig, data.get("hsm", {}), "hsm", base),
        audit=_section(AuditConfig, data.get("audit", {}), "audit", base),
        revocation=_section(RevocationConfig, data.get("revocation", {}), "revocation", base),
    )
