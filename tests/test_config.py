"""The daemon's config file (signer._config): a full file and a minimal one,
the defaults, paths relative to the file, and every fault a ConfigError
whose message names the section and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from signer._config import (
    MAXIMA,
    AuditConfig,
    Config,
    HsmConfig,
    RevocationConfig,
    ServerConfig,
    load_config,
)
from signer._errors import ConfigError

MINIMAL = """
[policy]
file = "policy.toml"

[state]
dir = "state"
"""

FULL = """
[server]
listen = "0.0.0.0:9443"
tls_cert = "tls/server.pem"
tls_key = "tls/server.key"
client_ca = "/etc/mandate/clients.pem"
plaintext_loopback = false
max_message_bytes = 131072
max_concurrent_rpcs = 32
workers = 8
rpc_time_limit_s = 2.5
shutdown_grace_s = 3

[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "mandate-prod"
pin_env = "PROD_PIN"
pin_file = "../secrets/pin"

[audit]
checkpoint_every = 500
checkpoint_interval_s = 0.5

[revocation]
issuer = "spiffe://acme.example/signer"
list_ttl_s = 600

[policy]
file = "policy/issuance.toml"

[state]
dir = "/var/lib/mandate"
"""


def write(directory: Path, text: str, name: str = "signer.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_full_file(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()

    config = load_config(write(conf, FULL))

    assert config.server == ServerConfig(
        listen="0.0.0.0:9443", tls_cert=conf / "tls/server.pem",
        tls_key=conf / "tls/server.key", client_ca=Path("/etc/mandate/clients.pem"),
        plaintext_loopback=False, max_message_bytes=131072, max_concurrent_rpcs=32,
        workers=8, rpc_time_limit_s=2.5, shutdown_grace_s=3.0,
    )
    assert config.hsm == HsmConfig(module="/usr/lib/softhsm/libsofthsm2.so",
                                   token_label="mandate-prod", pin_env="PROD_PIN",
                                   pin_file=tmp_path / "secrets/pin")
    assert config.audit == AuditConfig(checkpoint_every=500, checkpoint_interval_s=0.5)
    assert config.revocation == RevocationConfig(issuer="spiffe://acme.example/signer",
                                                 list_ttl_s=600)
    assert config.policy_file == conf / "policy/issuance.toml"
    assert config.state_dir == Path("/var/lib/mandate")
    assert config.audit_path == Path("/var/lib/mandate/audit.db")
    assert config.state_path == Path("/var/lib/mandate/state.db")
    assert type(config.server.shutdown_grace_s) is float  # an int in TOML, seconds as float


def test_a_minimal_file_takes_the_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))

    assert config == Config(policy_file=tmp_path / "policy.toml", state_dir=tmp_path / "state")
    assert config.server == ServerConfig()
    assert config.hsm == HsmConfig()
    assert config.audit == AuditConfig()
    assert config.revocation == RevocationConfig()


def test_the_defaults_are_safe() -> None:
    """Loopback, TLS required (no plaintext), bounded work, the PIN from the environment."""
    server = ServerConfig()
    assert server.listen.startswith("127.0.0.1:")
    assert server.plaintext_loopback is False
    assert server.max_concurrent_rpcs > 0
    assert server.workers > 0
    assert server.rpc_time_limit_s > 0
    assert server.max_message_bytes > 0
    hsm = HsmConfig()
    assert (hsm.pin_env, hsm.pin_file) == ("MANDATE_HSM_PIN", None)
    assert AuditConfig().checkpoint_every > 0
    assert RevocationConfig().list_ttl_s > 0


def test_relative_paths_are_relative_to_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "etc" / "mandate"
    conf.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    write(conf, """
[server]
tls_cert = "server.pem"
tls_key = "./keys/../keys/server.key"
client_ca = "../ca.pem"

[hsm]
pin_file = "pin"

[policy]
file = "policy.toml"

[state]
dir = "../../var/state"
""")

    config = load_config(Path("..") / "etc" / "mandate" / "signer.toml")

    assert config.server.tls_cert == conf / "server.pem"
    assert config.server.tls_key == conf / "keys" / "server.key"
    assert config.server.client_ca == tmp_path / "etc" / "ca.pem"
    assert config.hsm.pin_file == conf / "pin"
    assert config.policy_file == conf / "policy.toml"
    assert config.state_dir == tmp_path / "var" / "state"
    for path in (config.server.tls_cert, config.policy_file, config.state_dir):
        assert path is not None
        assert path.is_absolute()


# --- faults -------------------------------------------------------------------------

FAULTS = [
    # sections
    pytest.param("[metrics]\nport = 9090\n", r"unknown section\(s\) metrics",
                 id="unknown-section"),
    pytest.param("debug = true\n", r"unknown section\(s\) debug", id="top-level-key"),
    pytest.param('server = "127.0.0.1:1"\n', r"\[server\] must be a table",
                 id="section-not-a-table"),
    # keys
    pytest.param("[server]\nport = 7443\n", r"unknown key\(s\) in \[server\]: port",
                 id="unknown-key"),
    pytest.param('[hsm]\npin = "1234"\n', r"unknown key\(s\) in \[hsm\]: pin",
                 id="pin-as-a-value"),
    # types
    pytest.param("[server]\nlisten = 7443\n", r"\[server\] listen must be a string",
                 id="string-as-int"),
    pytest.param('[server]\nplaintext_loopback = "yes"\n',
                 r"\[server\] plaintext_loopback must be true or false", id="bool-as-string"),
    pytest.param('[server]\nworkers = "16"\n',
                 r"\[server\] workers must be a positive integer", id="int-as-string"),
    pytest.param("[server]\nworkers = 1.5\n",
                 r"\[server\] workers must be a positive integer", id="int-as-float"),
    pytest.param("[server]\nworkers = true\n",
                 r"\[server\] workers must be a positive integer", id="int-as-bool"),
    pytest.param('[server]\nrpc_time_limit_s = "5"\n',
                 r"\[server\] rpc_time_limit_s must be a positive number",
                 id="float-as-string"),
    pytest.param("[server]\nrpc_time_limit_s = true\n",
                 r"\[server\] rpc_time_limit_s must be a positive number", id="float-as-bool"),
    pytest.param("[server]\ntls_cert = 5\n", r"\[server\] tls_cert must be a path",
                 id="path-as-int"),
    pytest.param('[server]\ntls_cert = ""\n', r"\[server\] tls_cert must be a path",
                 id="empty-path"),
    pytest.param("[hsm]\ntoken_label = [\"a\"]\n", r"\[hsm\] token_label must be a string",
                 id="string-as-list"),
    # ranges
    pytest.param("[server]\nworkers = -1\n",
                 r"\[server\] workers must be a positive integer", id="negative-int"),
    pytest.param("[revocation]\nlist_ttl_s = -3600\n",
                 r"\[revocation\] list_ttl_s must be a positive integer",
                 id="negative-list-ttl"),
    pytest.param("[audit]\ncheckpoint_every = -1\n",
                 r"\[audit\] checkpoint_every must be a positive integer",
                 id="negative-checkpoint-every"),
    pytest.param("[server]\nrpc_time_limit_s = 0\n",
                 r"\[server\] rpc_time_limit_s must be a positive number", id="zero-seconds"),
    pytest.param("[audit]\ncheckpoint_interval_s = -0.5\n",
                 r"\[audit\] checkpoint_interval_s must be a positive number",
                 id="negative-seconds"),
    pytest.param("[server]\nrpc_time_limit_s = nan\n",
                 r"\[server\] rpc_time_limit_s must be a positive number", id="nan-seconds"),
    pytest.param("[server]\nworkers = 0\n", r"\[server\] workers", id="zero-workers"),
    pytest.param("[revocation]\nlist_ttl_s = 0\n", r"\[revocation\] list_ttl_s",
                 id="zero-list-ttl"),
]


@pytest.mark.parametrize(("extra", "message"), FAULTS)
def test_a_faulty_section_or_key_is_refused(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, extra + MINIMAL))


@pytest.mark.parametrize("text", [
    pytest.param('[state]\ndir = "state"\n', id="no-policy"),
    pytest.param('[policy]\n[state]\ndir = "state"\n', id="policy-without-file"),
    pytest.param('[policy]\nfile = 5\n[state]\ndir = "state"\n', id="policy-file-not-a-string"),
    pytest.param('[policy]\nfile = "p.toml"\nreload = true\n[state]\ndir = "state"\n',
                 id="policy-extra-key"),
    pytest.param('policy = "p.toml"\n[state]\ndir = "state"\n', id="policy-not-a-table"),
])
def test_the_policy_section_is_required(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=r"\[policy\] needs exactly file ="):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text", [
    pytest.param('[policy]\nfile = "p.toml"\n', id="no-state"),
    pytest.param('[policy]\nfile = "p.toml"\n[state]\n', id="state-without-dir"),
    pytest.param('[policy]\nfile = "p.toml"\n[state]\ndir = ["a"]\n', id="dir-not-a-string"),
    pytest.param('[policy]\nfile = "p.toml"\n[state]\ndir = "s"\npath = "x"\n',
                 id="state-extra-key"),
])
def test_the_state_section_is_required(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=r"\[state\] needs exactly dir ="):
        load_config(write(tmp_path, text))


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config .*nope\.toml: No such file"):
        load_config(tmp_path / "nope.toml")


def test_a_directory_instead_of_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config .*: Is a directory"):
        load_config(tmp_path)


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "signer.toml"
    path.write_bytes(MINIMAL.replace("policy.toml", "policy-\xe9.toml").encode("latin-1"))

    with pytest.raises(ConfigError, match=r"signer\.toml"):
        load_config(path)


@pytest.mark.parametrize("text", [
    pytest.param("[server\nlisten = 1\n", id="unclosed-table"),
    pytest.param('[policy]\nfile = "a"\nfile = "b"\n', id="duplicate-key"),
    pytest.param('[state]\ndir = "unterminated\n', id="unterminated-string"),
])
def test_bad_toml_names_the_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=r"config .*signer\.toml: "):
        load_config(write(tmp_path, text))


# --- hostile files: each a ConfigError, never a crash or another exception ------------

# 1,000 levels exceed Python's recursion limit however deep the caller's stack is.
DEEP = 1_000

HOSTILE = [
    # int() refuses 4,300 digits or more with a ValueError that tomllib passes on.
    pytest.param("[server]\nworkers = " + "9" * 5000 + "\n",
                 r"signer\.toml: Exceeds the limit \(4300 digits\)", id="int-5000-digits"),
    pytest.param("[server]\nrpc_time_limit_s = 1e400\n",
                 r"\[server\] rpc_time_limit_s must be a positive number", id="float-overflow"),
    pytest.param("[server]\nworkers = " + "[" * DEEP + "]" * DEEP + "\n",
                 r"signer\.toml: nested too deeply$", id="arrays-nested-deep"),
    pytest.param("[server]\nlisten = " + "{ a = " * DEEP + "1" + " }" * DEEP + "\n",
                 r"signer\.toml: nested too deeply$", id="inline-tables-nested-deep"),
    pytest.param('[hsm]\ntoken_label = "mandate\x00"\n',
                 r"signer\.toml: Illegal character '\\x00'", id="nul-byte-in-a-string"),
    pytest.param("# \x00\n", r"signer\.toml: Found invalid character '\\x00'",
                 id="nul-byte-in-a-comment"),
    pytest.param('[server]\ntls_cert = "server.pem\\u0000.evil"\n',
                 r"signer\.toml: a value holds a NUL character$", id="escaped-nul-in-a-path"),
    pytest.param('[hsm]\npin_env = "MANDATE_HSM_PIN\\u0000"\n',
                 r"signer\.toml: a value holds a NUL character$", id="escaped-nul-in-a-name"),
    pytest.param('[server]\n"listen\\u0000" = "127.0.0.1:1"\n',
                 r"signer\.toml: a value holds a NUL character$", id="escaped-nul-in-a-key"),
]


@pytest.mark.parametrize(("extra", "message"), HOSTILE)
def test_a_hostile_file_is_a_config_error(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, extra + MINIMAL))
    assert type(info.value) is ConfigError


def test_nesting_that_parses_is_refused_by_the_type_check(tmp_path: Path) -> None:
    """The twin of the deep rows: 100 levels are valid TOML, and not an integer."""
    with pytest.raises(ConfigError, match=r"\[server\] workers must be a positive integer"):
        load_config(write(tmp_path, "[server]\nworkers = " + "[" * 100 + "]" * 100 + "\n"
                          + MINIMAL))


def test_the_smallest_good_values_load(tmp_path: Path) -> None:
    """Twin of the fault table: the same keys, one step inside their bounds, load."""
    config = load_config(write(tmp_path, """
[server]
workers = 1
rpc_time_limit_s = 0.001
plaintext_loopback = true
[revocation]
list_ttl_s = 1
""" + MINIMAL))

    assert (config.server.workers, config.server.rpc_time_limit_s) == (1, 0.001)
    assert config.server.plaintext_loopback is True
    assert config.revocation.list_ttl_s == 1


@pytest.mark.parametrize(("section", "key"),
                         [pytest.param(*k, id=".".join(k)) for k in MAXIMA])
def test_each_number_has_a_largest_value(tmp_path: Path, section: str, key: str) -> None:
    """Past its largest value a number is refused with the bound named (2**63
    bytes of message used to reach gRPC and fail there with an OverflowError);
    the largest value itself loads."""
    limit = MAXIMA[(section, key)]
    over = limit + 1 if isinstance(limit, int) else limit * 2

    with pytest.raises(ConfigError, match=rf"\[{section}\] {key} must be at most {limit:,}"):
        load_config(write(tmp_path, f"[{section}]\n{key} = {over}\n" + MINIMAL))

    config = load_config(write(tmp_path, f"[{section}]\n{key} = {limit}\n" + MINIMAL))
    assert getattr(getattr(config, section), key) == limit
