"""The ``mandate`` command as an operator uses it: real subprocesses, each run
against its own SoftHSM2 token store made here with ``mandate hsm init``, a
real daemon on 127.0.0.1:0 with mutual TLS, chains checked with verifier_sdk.

SoftHSM reads its token store once per process, so no subprocess here ever
touches the test session's store (``hsm_fixtures``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any, Self

import pytest

from signer._config import AuditConfig, HsmConfig, RevocationConfig, ServerConfig, load_config
from signer._devpki import DevCA
from signer._policy import Policy
from signer.cli import build_parser
from verifier_sdk import (
    Holder,
    Request,
    TrustBundle,
    VerificationError,
    Verifier,
    decode_unverified,
)

REPO = Path(__file__).resolve().parent.parent
MANDATE = (sys.executable, "-m", "signer.cli")
RUN_TIMEOUT_S = 60.0  # any one command; most take well under a second
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0  # "exits within a few seconds" of SIGTERM

SO_PIN = "cli-so-pin-8642"
USER_PIN = "cli-user-pin-1357"
WRONG_PIN = "not-the-pin-9753"

ORCH = "spiffe://acme.example/svc/orchestrator"
ADMIN = "spiffe://acme.example/ops/oncall"
SUB = "agent:support/refund-7"
AUD = "payments-api"
REFUND_CAP = {"res": "api/payments/refunds/o-123", "act": ["post"],
              "if": {"amount": {"le": 4999}}}
REFUND = Request("api/payments/refunds/o-123", "post", {"amount": 4999})


def policy(max_ttl: int, caller: str = ORCH) -> str:
    return f"""
admins = ["{ADMIN}"]

[[grant]]
caller = "{caller}"
subjects = ["agent:support/*"]
caps = [
  {{ res = "api/payments/refunds/*", act = ["post"], if = {{ amount = {{ le = 5000 }} }} }},
]
max_ttl = {max_ttl}
max_dpt = 2
audiences = ["{AUD}"]
"""


CONFIG = """
[server]
listen = "127.0.0.1:0"
tls_cert = "tls/server.pem"
tls_key = "tls/server.key"
client_ca = "tls/ca.pem"
shutdown_grace_s = 2.0

[hsm]
token_label = "mandate"
pin_env = "MANDATE_HSM_PIN"

[policy]
file = "policy.toml"

[state]
dir = "state"
"""

PLAINTEXT_CONFIG = """
[server]
listen = "127.0.0.1:0"
plaintext_loopback = true

[policy]
file = "policy.toml"

[state]
dir = "state"
"""


@dataclass
class Site:
    """A directory set up as an operator would: token, TLS files, config, policy, a key."""

    root: Path
    env: dict[str, str]
    init: subprocess.CompletedProcess[str]
    generate: subprocess.CompletedProcess[str] | None = None

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MANDATE, *args], cwd=self.root, env={**self.env, **env},
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              check=False)

    def ok(self, *args: str, **env: str) -> str:
        done = self.run(*args, **env)
        assert done.returncode == 0, f"mandate {' '.join(args)}: {done.stderr}"
        return done.stdout

    def bundle(self, name: str = "bundle.json") -> dict[str, Any]:
        self.ok("keys", "export-bundle", "-c", "signer.toml", "-o", name)
        text = (self.root / name).read_text()
        TrustBundle.from_jwks(text)
        jwks: dict[str, Any] = json.loads(text)
        return jwks

    def audit(self, *filters: str) -> list[dict[str, Any]]:
        out = self.ok("audit", "show", "--log", "state/audit.db", *filters)
        return [json.loads(line) for line in out.splitlines()]


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SOFTHSM2_CONF", "MANDATE_HSM_PIN", "MANDATE_HSM_SO_PIN")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def make_site(root: Path, *, key: bool = True) -> Site:
    env = {**base_env(), "MANDATE_HSM_SO_PIN": SO_PIN, "MANDATE_HSM_PIN": USER_PIN}
    site = Site(root, env, subprocess.CompletedProcess([], 0))
    site.init = site.run("hsm", "init", "--dir", "hsm")
    assert site.init.returncode == 0, site.init.stderr
    found = re.search(r"export SOFTHSM2_CONF=(\S+)$", site.init.stdout.strip())
    assert found, site.init.stdout
    env["SOFTHSM2_CONF"] = found.group(1)
    ca = DevCA()
    tls = root / "tls"
    tls.mkdir()
    (tls / "ca.pem").write_bytes(ca.pem)
    ca.issue(cn="mandate-signer", server=True).write(tls, "server")
    ca.issue(uri=ORCH).write(tls, "orch")
    ca.issue(uri=ADMIN).write(tls, "admin")
    (root / "policy.toml").write_text(policy(max_ttl=600))
    (root / "signer.toml").write_text(CONFIG)
    if key:
        site.generate = site.run("keys", "generate", "-c", "signer.toml", "--kid", "root-1")
        assert site.generate.returncode == 0, site.generate.stderr
    return site


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)


class ServeProcess:
    """``mandate serve`` on ``config`` in ``site`` (its env, plus ``env``), stderr
    to ``log``; entering waits for the port it announces, leaving stops it
    (SIGTERM, then kill)."""

    def __init__(self, site: Site, log: Path, config: str = "signer.toml", *,
                 env: dict[str, str] | None = None, **popen: Any) -> None:
        self.site = site
        self.log = log
        self._log_file: IO[str] = log.open("w")
        self.proc = subprocess.Popen(
            [*MANDATE, "serve", "-c", config], cwd=site.root, env={**site.env, **(env or {})},
            text=True, stdout=subprocess.PIPE, stderr=self._log_file, **popen,
        )
        self.port = 0

    def __enter__(self) -> Self:
        try:
            self.port = self._read_port()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_port(self) -> int:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        found = re.fullmatch(r"mandate signer listening on port (\d+)\n", line)
        assert found, f"no port announced (got {line!r}); log: {self.log.read_text()}"
        return int(found.group(1))

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)

    def close(self) -> None:
        try:
            self._stop()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._log_file.close()


class Server(ServeProcess):
    """``mandate serve`` in a subprocess; stopped (SIGTERM, then kill) on exit."""

    def __init__(self, site: Site, config: str = "signer.toml") -> None:
        super().__init__(site, site.root / "serve.log", config)

    def client(self, name: str = "orch") -> list[str]:
        return ["--server", f"127.0.0.1:{self.port}", "--ca", "tls/ca.pem",
                "--cert", f"tls/{name}.pem", "--key", f"tls/{name}.key", "--timeout", "10"]

    def signal_and_wait_for(self, signum: int, text: str) -> None:
        """Send ``signum`` and wait until the log shows ``text`` once more."""
        before = self.log.read_text().count(text)
        self.proc.send_signal(signum)
        deadline = time.monotonic() + 10
        while self.log.read_text().count(text) == before:
            assert time.monotonic() < deadline, f"no {text!r} in the log: {self.log.read_text()}"
            time.sleep(0.05)

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        return code, time.monotonic() - start


def delegate(site: Site, server: Server, holder: Holder, *, ttl: int = 120,
             cap: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    return site.run("delegate", *server.client(), "--sub", SUB,
                    "--holder-jwk", json.dumps(holder.public_jwk),
                    "--cap", json.dumps(cap or REFUND_CAP), "--aud", AUD,
                    "--ttl", str(ttl), "--dpt", "1")


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The error line of a failed command; fails unless it is exactly one line."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("mandate: ")
    return lines[0]


def use_chain(verifier: Verifier, chain: str, holder: Holder, request: Request) -> None:
    verifier.verify(chain, request, pop=holder.prove(chain, request, aud=AUD))


# --- provisioning ---------------------------------------------------------------------

def test_provisioning_from_an_empty_directory(site: Site) -> None:
    assert f"SOFTHSM2_CONF={site.root / 'hsm' / 'softhsm2.conf'}" in site.init.stdout
    assert site.generate is not None
    assert "generated EdDSA key 'root-1'" in site.generate.stdout
    listed = site.ok("keys", "list", "-c", "signer.toml").splitlines()
    assert len(listed) == 1
    assert re.fullmatch(r"\* root-1 +EdDSA +nbf=\d+ exp=-", listed[0])
    jwks = site.bundle()
    assert [(k["kid"], k["alg"], k["kty"]) for k in jwks["keys"]] == [("root-1", "EdDSA", "OKP")]
    assert "d" not in jwks["keys"][0]  # public halves only
    # A second token under the same label would make "mandate" ambiguous: refused,
    # and the first token still serves its key.
    again = site.run("hsm", "init", "--dir", "hsm")
    assert "already holds a token labelled 'mandate'" in one_line_error(again)
    assert site.ok("keys", "list", "-c", "signer.toml").startswith("* root-1")


def test_rotation_keeps_the_old_key_with_an_end_and_exports_both(site: Site) -> None:
    before = int(time.time())
    out = site.ok("keys", "rotate", "-c", "signer.toml", "--new-kid", "root-2")
    assert "'root-2'" in out
    assert "'root-1'" in out
    rows = {line[2:].split()[0]: line for line in
            site.ok("keys", "list", "-c", "signer.toml").splitlines()}
    assert set(rows) == {"root-1", "root-2"}
    assert rows["root-2"].startswith("* ")
    assert rows["root-2"].endswith("exp=-")
    assert rows["root-1"].startswith("  ")
    found = re.search(r"exp=(\d+)$", rows["root-1"])
    assert found, rows["root-1"]
    assert int(found.group(1)) >= before + 600  # outlives every link it may have signed
    jwks = site.bundle()
    by_kid = {k["kid"]: k for k in jwks["keys"]}
    assert set(by_kid) == {"root-1", "root-2"}
    assert by_kid["root-1"]["exp"] == int(found.group(1))
    assert "exp" not in by_kid["root-2"]


# --- the daemon, end to end ----------------------------------------------------------------

def test_serve_delegate_revoke_stop_and_audit(site: Site) -> None:
    bundle = TrustBundle.from_jwks(json.dumps(site.bundle()))
    holder = Holder.generate()
    with Server(site) as server:
        done = delegate(site, server, holder)
        assert done.returncode == 0, done.stderr
        chain = done.stdout.strip()
        use_chain(Verifier(bundle, audience=AUD), chain, holder, REFUND)
        with pytest.raises(VerificationError) as err:  # beyond what was delegated
            use_chain(Verifier(bundle, audience=AUD), chain, holder,
                      Request("api/payments/refunds/o-123", "post", {"amount": 5000}))
        assert err.value.code == "denied"
        (header, claims), = decode_unverified(chain)
        assert (header["kid"], claims["iss"], claims["sub"]) == ("root-1", ORCH, SUB)
        jti = claims["jti"]

        denied = one_line_error(delegate(site, server, Holder.generate(), ttl=3600))
        assert denied.startswith("mandate: PERMISSION_DENIED (ttl_exceeds_max): ")
        assert "ttl 3600 s exceeds max_ttl 600 s" in denied

        assert site.ok("revoke", *server.client(), jti, "--reason", "test").startswith(
            "revoked; revocation list seq ")
        site.ok("revocations", "fetch", *server.client(), "-o", "rl.jwt")
        verifier = Verifier(bundle, audience=AUD, require_revocations=True)
        assert verifier.update_revocations((site.root / "rl.jwt").read_text().strip())
        with pytest.raises(VerificationError) as err:
            use_chain(verifier, chain, holder, REFUND)
        assert err.value.code == "revoked"

        code, took = server.terminate()
        assert code == 0, server.log.read_text()
        assert took < STOP_TIMEOUT_S

    events = [r["event"] for r in site.audit()]
    assert events[-5:] == ["start", "delegate", "deny", "revoke", "stop"]
    verified = site.ok("audit", "verify", "--log", "state/audit.db", "--bundle", "bundle.json")
    assert verified.startswith("ok: ")
    mine = site.audit("--caller", ORCH)
    assert [(r["event"], r["caller"]) for r in mine] == [
        ("delegate", ORCH), ("deny", ORCH), ("revoke", ORCH)]
    assert mine[0]["jti"] == jti
    assert mine[1]["reason"] == "ttl_exceeds_max"
    assert site.audit("--caller", ADMIN) == []


def test_sighup_reloads_the_policy_and_a_broken_file_keeps_the_last_good(site: Site) -> None:
    with Server(site) as server:
        assert delegate(site, server, Holder.generate(), ttl=300).returncode == 0

        (site.root / "policy.toml").write_text(policy(max_ttl=60))
        server.signal_and_wait_for(signal.SIGHUP, "policy reloaded")
        denied = one_line_error(delegate(site, server, Holder.generate(), ttl=300))
        assert denied.startswith("mandate: PERMISSION_DENIED (ttl_exceeds_max): ")
        assert "exceeds max_ttl 60 s" in denied
        assert delegate(site, server, Holder.generate(), ttl=30).returncode == 0

        (site.root / "policy.toml").write_text("[[grant]\ncaller = ")
        server.signal_and_wait_for(signal.SIGHUP, "policy reload failed")
        assert "not valid TOML" in server.log.read_text()
        denied = one_line_error(delegate(site, server, Holder.generate(), ttl=300))
        assert "exceeds max_ttl 60 s" in denied
        assert delegate(site, server, Holder.generate(), ttl=30).returncode == 0
        assert server.terminate()[0] == 0


def test_a_plaintext_loopback_server_serves_local_callers(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    (site.root / "plain.toml").write_text(PLAINTEXT_CONFIG)
    (site.root / "policy.toml").write_text(policy(max_ttl=600, caller="local:insecure"))
    with Server(site, "plain.toml") as server:
        assert "PLAINTEXT listener" in server.log.read_text()
        done = site.run("delegate", "--server", f"127.0.0.1:{server.port}", "--plaintext",
                        "--sub", SUB, "--holder-jwk", json.dumps(Holder.generate().public_jwk),
                        "--cap", json.dumps(REFUND_CAP), "--aud", AUD, "--ttl", "60")
        assert "UNAUTHENTICATED" not in done.stderr
        assert done.returncode == 0, done.stderr


# --- errors: one line, no traceback; --debug shows it ---------------------------------------

def _down_port() -> tuple[socket.socket, int]:
    """A port bound but not listening: connections to it are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, int(sock.getsockname()[1])


ERROR_CASES = [
    pytest.param(["serve", "-c", "signer.toml"], {"MANDATE_HSM_PIN": WRONG_PIN},
                 "the PIN is incorrect", id="wrong-pin"),
    pytest.param(["keys", "list", "-c", "absent.toml"], {}, "cannot read config absent.toml",
                 id="missing-config"),
    pytest.param(["serve", "-c", "typo.toml"], {}, "unknown key(s) in [server]: listn",
                 id="unknown-config-key"),
    pytest.param(["delegate", "--server", "127.0.0.1:{down}", "--ca", "tls/ca.pem",
                  "--cert", "tls/orch.pem", "--key", "tls/orch.key", "--timeout", "5",
                  "--sub", SUB, "--holder-jwk", "{jwk}", "--cap", json.dumps(REFUND_CAP),
                  "--ttl", "60"], {}, "UNAVAILABLE", id="server-down"),
    pytest.param(["delegate", "--server", "127.0.0.1:{down}", "--sub", SUB,
                  "--holder-jwk", "{jwk}", "--cap", json.dumps(REFUND_CAP), "--ttl", "60"],
                 {}, "mutual TLS needs --ca, --cert and --key", id="no-client-certificate"),
    pytest.param(["hsm", "init", "--dir", "more", "--label", "x" * 33], {},
                 "a token label is 1 to 32 bytes", id="token-label-too-long"),
    pytest.param(["audit", "verify", "--log", "absent.db", "--bundle", "bundle.json"], {},
                 "cannot read audit log", id="missing-audit-log"),
]


@pytest.mark.parametrize(("args", "env", "expected"), ERROR_CASES)
def test_errors_are_one_line_and_debug_shows_the_traceback(
    site: Site, args: list[str], env: dict[str, str], expected: str
) -> None:
    (site.root / "typo.toml").write_text(CONFIG.replace("listen =", "listn ="))
    site.bundle()
    sock, down = _down_port()
    jwk = json.dumps(Holder.generate().public_jwk)
    try:
        argv = [a.replace("{down}", str(down)).replace("{jwk}", jwk) for a in args]
        plain = site.run(*argv, **env)
        debug = site.run("--debug", *argv, **env)
    finally:
        sock.close()
    assert expected in one_line_error(plain)
    assert "listening" not in plain.stdout
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert expected in debug.stderr
    for done in (plain, debug):
        for secret in (WRONG_PIN, USER_PIN, SO_PIN):
            assert secret not in done.stdout + done.stderr


def test_audit_verify_names_the_first_bad_record(site: Site) -> None:
    for kid in ("root-2", "root-3"):  # more key records, each run closing with a checkpoint
        site.ok("keys", "generate", "-c", "signer.toml", "--kid", kid)
    site.bundle()
    args = ("audit", "verify", "--log", "state/audit.db", "--bundle", "bundle.json")
    assert site.ok(*args).startswith("ok: ")  # the untouched twin
    records = site.audit()
    assert len(records) >= 3
    with sqlite3.connect(site.root / "state" / "audit.db") as db:
        db.execute("UPDATE records SET caller = 'mallory' WHERE seq = 2")
    db.close()
    done = site.run(*args)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stdout.splitlines() == [
        "FAILED at seq 2 (edited): record 2 does not match its hash"]


# --- help -----------------------------------------------------------------------------------

COMMANDS = [
    (), ("serve",), ("hsm",), ("hsm", "init"), ("keys",), ("keys", "generate"),
    ("keys", "list"), ("keys", "rotate"), ("keys", "export-bundle"), ("delegate",),
    ("keygen",), ("inspect",), ("verify",), ("attenuate",), ("prove",),
    ("revoke",), ("revocations",), ("revocations", "fetch"), ("audit",), ("audit", "verify"),
    ("audit", "show"), ("db",), ("db", "migrate"),
]


def _parser_commands(parser: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parser_commands(child, (*prefix, name))


def test_the_help_table_lists_every_command() -> None:
    assert sorted(_parser_commands(build_parser())) == sorted(COMMANDS)


def test_help_works_for_every_command_and_subcommand() -> None:
    def run(command: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MANDATE, *command, "--help"], cwd=REPO, env=base_env(),
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              check=False)

    with futures.ThreadPoolExecutor(4) as pool:
        results = dict(zip(COMMANDS, pool.map(run, COMMANDS), strict=True))
    failed = {" ".join(c) or "(top)": r.stderr for c, r in results.items()
              if r.returncode != 0 or not r.stdout.startswith(f"usage: mandate {' '.join(c)}")}
    assert failed == {}
    assert "--holder-jwk" in results[("delegate",)].stdout
    assert "--new-kid" in results[("keys", "rotate")].stdout


# --- the example configuration -----------------------------------------------------------

def test_the_example_config_loads_and_documents_every_key() -> None:
    path = REPO / "examples" / "signer.toml"
    config = load_config(path)
    examples = path.parent.resolve()
    assert config.policy_file == examples / "policy.toml"
    assert config.state_dir == examples / "state"
    assert config.server.tls_cert == examples / "tls" / "server.pem"
    assert config.server.client_ca == examples / "tls" / "ca.pem"
    assert not config.server.plaintext_loopback
    Policy.load(config.policy_file)
    text = path.read_text()
    for section, cls in (("server", ServerConfig), ("hsm", HsmConfig), ("audit", AuditConfig),
                         ("revocation", RevocationConfig)):
        assert f"\n[{section}]\n" in text
        for f in fields(cls):
            assert re.search(rf"^#? ?{f.name} = ", text, re.MULTILINE), f"{section}.{f.name}"
    assert "PIN" in text
    assert not re.search(r"^\s*pin\s*=", text, re.MULTILINE)  # no PIN value in the file


# --- the provisioning script -----------------------------------------------------------------

def test_the_provisioning_script_sets_up_a_daemon_that_delegates(tmp_path: Path) -> None:
    root = tmp_path / "dev"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "provision.py"), str(root), "--port", "0"],
        env=base_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
    )
    assert done.returncode == 0, done.stderr
    found = re.search(r"SOFTHSM2_CONF=(\S+)", done.stdout)
    assert found, done.stdout
    pin = (root / "secrets" / "hsm-pin").read_text().strip()
    assert (root / "secrets" / "hsm-pin").stat().st_mode & 0o077 == 0
    assert pin not in (root / "signer.toml").read_text()
    bundle = TrustBundle.from_jwks((root / "bundle.json").read_text())
    site = Site(root, {**base_env(), "SOFTHSM2_CONF": found.group(1)}, done)
    holder = Holder.generate()
    request = Request("db/orders/o-1", "select", {"customer": 42})
    with Server(site) as server:
        chain = site.ok(
            "delegate", "--server", f"127.0.0.1:{server.port}", "--ca", "pki/ca.pem",
            "--cert", "pki/orchestrator.pem", "--key", "pki/orchestrator.key",
            "--sub", "agent:support/7", "--holder-jwk", json.dumps(holder.public_jwk),
            "--cap", json.dumps({"res": "db/orders/o-1", "act": ["select"],
                                 "if": {"customer": {"eq": 42}}}),
            "--aud", "orders-db", "--ttl", "60",
        ).strip()
    verifier = Verifier(bundle, audience="orders-db")
    verifier.verify(chain, request, pop=holder.prove(chain, request, aud="orders-db"))
    # Its twin: another customer is outside what was delegated.
    other = Request("db/orders/o-1", "select", {"customer": 43})
    with pytest.raises(VerificationError) as err:
        verifier.verify(chain, other, pop=holder.prove(chain, other, aud="orders-db"))
    assert err.value.code == "denied"
