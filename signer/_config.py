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
from urllib.parse import quote

from ._errors import ConfigError
from ._storage import SqliteUrl, parse_state_url

ISSUANCE_MODES = ("process", "inline")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:7443"
    tls_cert: Path | None = None  # PEM chain the daemon presents
    tls_key: Path | None = None
    client_ca: Path | None = None  # CA bundle that client certificates must chain to
    plaintext_loopback: bool = False  # development only: no TLS, loopback only
    max_message_bytes: int = 65_536
    max_concurrent_rpcs: int = 64  # calls in flight, queued ones included; beyond: refused
    workers: int = 16
    rpc_time_limit_s: float = 5.0  # server-side cap on one call
    shutdown_grace_s: float = 10.0
    metrics_listen: str = ""  # host:port of the Prometheus /metrics endpoint; empty: none
    log_format: str = "json"  # `mandate serve` logs: "json" (one object per line) or "text"
    # "process": issuance (policy, HSM, audit, state) runs in a process of its
    # own beside the gRPC front end, so the two use two cores; "inline": one process.
    issuance: str = "process"


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
class StateConfig:
    # Where the state and the audit log live: "" or "sqlite:///dir" (SQLite files
    # in state_dir, the default) or "postgresql://user@host:port/db" (shared by replicas).
    url: str = ""
    # Environment variable holding the PostgreSQL password; "": libpq's own
    # PGPASSWORD or .pgpass. Never the password itself.
    password_env: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    policy_file: Path
    state_dir: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    hsm: HsmConfig = field(default_factory=HsmConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    revocation: RevocationConfig = field(default_factory=RevocationConfig)
    state: StateConfig = field(default_factory=StateConfig)

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
            _at_most(name, key, value)
            values[key] = value
        elif isinstance(default, float):
            if type(value) not in (int, float) or not 0 < value < math.inf:
                raise ConfigError(f"config: [{name}] {key} must be a positive number")
            _at_most(name, key, value)
            values[key] = float(value)
        else:
            if not isinstance(value, str):
                raise ConfigError(f"config: [{name}] {key} must be a string")
            values[key] = value
    return cls(**values)


# The largest value each number may take: beyond them a setting is a mistake
# (or would overflow gRPC's C ints, or push times past the JSON safe range).
MAXIMA: dict[tuple[str, str], int | float] = {
    ("server", "max_message_bytes"): 16 * 2**20,
    ("server", "max_concurrent_rpcs"): 65_536,
    ("server", "workers"): 1_024,
    ("server", "rpc_time_limit_s"): 3_600.0,
    ("server", "shutdown_grace_s"): 3_600.0,
    ("audit", "checkpoint_every"): 1_000_000,
    ("audit", "checkpoint_interval_s"): 86_400.0,
    ("revocation", "list_ttl_s"): 30 * 86_400,
}


def _at_most(section: str, key: str, value: float) -> None:
    limit = MAXIMA.get((section, key))
    if limit is not None and value > limit:
        raise ConfigError(f"config: [{section}] {key} must be at most {limit:,}")


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    return isinstance(value, list) and any(_holds_nul(v) for v in value)


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
    except ValueError as exc:  # tomllib passes on int()'s refusal of 4,300+ digits
        raise ConfigError(f"config {path}: {exc}") from None
    except RecursionError:  # arrays or inline tables nested about 1,000 deep
        raise ConfigError(f"config {path}: nested too deeply") from None
    if _holds_nul(data):  # no path or name can hold one (TOML writes it \u0000)
        raise ConfigError(f"config {path}: a value holds a NUL character")
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
    state_dir, state_config = _state_section(state, base)
    server = _section(ServerConfig, data.get("server", {}), "server", base)
    if server.issuance not in ISSUANCE_MODES:
        raise ConfigError(f'config: [server] issuance must be "process" or "inline", '
                          f"not {server.issuance!r}")
    return Config(
        policy_file=(base / policy["file"]).resolve(),
        state_dir=state_dir,
        state=state_config,
        server=server,
        hsm=_section(HsmConfig, data.get("hsm", {}), "hsm", base),
        audit=_section(AuditConfig, data.get("audit", {}), "audit", base),
        revocation=_section(RevocationConfig, data.get("revocation", {}), "revocation", base),
    )


def _state_section(state: Any, base: Path) -> tuple[Path, StateConfig]:
    """``dir`` (SQLite files there), or ``url`` and perhaps ``password_env``."""
    usage = ('config: [state] needs exactly dir = "path/to/state", or url = '
             '"sqlite:///dir" or "postgresql://user@host/db" (and password_env = "VAR")')
    if not isinstance(state, dict) or not state or not set(state) <= {
        "dir", "url", "password_env"
    } or not all(isinstance(v, str) and v for v in state.values()):
        raise ConfigError(usage)
    if "url" not in state:
        if set(state) != {"dir"}:
            raise ConfigError(usage)
        return (base / state["dir"]).resolve(), StateConfig()
    location = parse_state_url(state["url"], base=base)
    if isinstance(location, SqliteUrl):
        if set(state) != {"url"}:
            raise ConfigError(usage)
        directory = location.directory
        return directory, StateConfig(url="sqlite://" + quote(directory.as_posix()))
    # A PostgreSQL state keeps no files; dir, if given, is still made at start.
    directory = (base / state["dir"]).resolve() if "dir" in state else base
    return directory, StateConfig(url=location.url,
                                  password_env=state.get("password_env", ""))
