"""The holder's and service's offline tools in ``mandate``: keygen, attenuate,
inspect, prove, verify. Real subprocesses of the CLI; the only parts made in
process are the root link, signed by a software key standing in for the
daemon's HSM key, its trust bundle and a revocation list. No daemon, no HSM.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from verifier_sdk import Holder, decode_unverified, issue_root, make_revocation_list

REPO = Path(__file__).resolve().parent.parent
MANDATE = (sys.executable, "-m", "signer.cli")
RUN_TIMEOUT_S = 30.0  # any one command; each takes well under a second

ORCH = "spiffe://acme.example/svc/orchestrator"
SUPPORT = "agent:support/refund-7"
HELPER = "agent:support/helper"
REPORTER = "agent:reporting/r-1"
AUD = "payments-api"
REFUND_RES = "api/payments/refunds/o-123"
ROOT_CAPS: list[dict[str, Any]] = [
    {"res": "api/payments/refunds/*", "act": ["post"], "if": {"amount": {"le": 5000}}},
    {"res": "api/orders/**", "act": ["select"]},
]


def refund_cap(limit: int) -> str:
    return json.dumps({"res": REFUND_RES, "act": ["post"], "if": {"amount": {"le": limit}}})


def refund(amount: int) -> list[str]:
    """The request options of one refund call."""
    return ["--aud", AUD, "--res", REFUND_RES, "--act", "post",
            "--ctx", json.dumps({"amount": amount})]


@dataclass
class Cli:
    """``mandate`` run in one working directory."""

    root: Path

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        return subprocess.run([*MANDATE, *args], cwd=self.root, env=env, input=stdin,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              check=False)

    def ok(self, *args: str, stdin: str | None = None) -> str:
        done = self.run(*args, stdin=stdin)
        assert done.returncode == 0, f"mandate {' '.join(args)}: {done.stderr}"
        return done.stdout

    def error(self, *args: str) -> str:
        """The one error line of a failed command, without its ``mandate: ``."""
        done = self.run(*args)
        assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("mandate: ")
        return lines[0].removeprefix("mandate: ")

    def json(self, name: str) -> Any:
        return json.loads((self.root / name).read_text())


def software_root(cli: Cli, holder_pub: str, *, now: float | None = None,
                  ttl: int = 600) -> str:
    """A root link for ``holder_pub`` and the bundle that trusts its key (bundle.json)."""
    key = Holder.generate()
    bundle = {"keys": [{**key.public_jwk, "kid": "root-1", "alg": "EdDSA", "use": "sig"}]}
    (cli.root / "bundle.json").write_text(json.dumps(bundle))
    (cli.root / "rl-key.jwk").write_text(json.dumps(key.private_jwk()))
    chain = issue_root(alg="EdDSA", kid="root-1", sign=key.sign, iss=ORCH, sub=SUPPORT,
                       holder_jwk=cli.json(holder_pub), cap=ROOT_CAPS, ttl=ttl, dpt=2,
                       aud=[AUD], now=now)
    (cli.root / "root.chain").write_text(chain + "\n")
    return chain


def revocation_list(cli: Cli, *jtis: str) -> None:
    """rl.jwt, signed by the root key of bundle.json."""
    key = Holder.from_jwk(cli.json("rl-key.jwk"))
    now = int(time.time())
    token = make_revocation_list(alg="EdDSA", kid="root-1", sign=key.sign, iss=ORCH, seq=1,
                                 iat=now, exp=now + 300, revoked=jtis)
    (cli.root / "rl.jwt").write_text(token + "\n")


def test_offline_story(tmp_path: Path) -> None:
    cli = Cli(tmp_path)

    # Three holders make their keys: the private half only they can read.
    thumbprints = {}
    for name, alg in (("support", "EdDSA"), ("helper", "ES256"), ("reporter", "EdDSA")):
        out = cli.ok("keygen", "--alg", alg, "-o", f"{name}.jwk", "--public-out", f"{name}.pub")
        key = Holder.from_jwk(cli.json(f"{name}.jwk"))
        assert key.alg == alg
        assert cli.json(f"{name}.pub") == key.public_jwk
        assert f"thumbprint: {key.thumbprint}" in out
        assert json.dumps(key.public_jwk, sort_keys=True) in out
        assert stat.S_IMODE((tmp_path / f"{name}.jwk").stat().st_mode) == 0o600
        thumbprints[name] = key.thumbprint

    # The daemon's part, done here: a root link for the support agent.
    software_root(cli, "support.pub")

    # Support narrows it for the helper, the helper for the reporter.
    cli.ok("attenuate", "@root.chain", "--key", "support.jwk", "--sub", HELPER,
           "--holder-jwk", "@helper.pub", "--cap", refund_cap(4999), "--ttl", "120",
           "--dpt", "1", "--aud", AUD, "-o", "helper.chain")
    chain = cli.ok("attenuate", "@helper.chain", "--key", "helper.jwk", "--sub", REPORTER,
                   "--holder-jwk", "@reporter.pub",
                   "--cap", refund_cap(4000), "--ttl", "60", "--use", "1").strip()
    (tmp_path / "reporter.chain").write_text(chain)
    links = decode_unverified(chain)
    assert [p["sub"] for _, p in links] == [SUPPORT, HELPER, REPORTER]
    jtis = [p["jti"] for _, p in links]

    # inspect: the tree, root first, and nothing claimed as verified.
    tree = cli.ok("inspect", "@reporter.chain")
    assert tree.startswith("UNVERIFIED")
    assert tree.index(f"link 0  {ORCH} → {SUPPORT}") < tree.index(f"link 1  {SUPPORT} → {HELPER}")
    assert f"└─ link 2  {HELPER} → {REPORTER}" in tree
    assert "caps    api/payments/refunds/* post if amount le 5000" in tree
    assert "api/orders/** select" in tree
    assert f"{REFUND_RES} post if amount le 4999" in tree
    assert f"{REFUND_RES} post if amount le 4000" in tree
    assert f"kid     {thumbprints['helper']} (ES256, link 1's holder)" in tree
    windows = re.findall(r"window  (\S+Z) \.\. (\S+Z) \((?:\d+[dhms] )+left\)", tree)
    assert len(windows) == 3, tree
    assert "dpt     0 (may delegate no further)" in tree
    assert "BROKEN" not in tree

    doc = json.loads(cli.ok("inspect", "--json", "-", stdin=chain))
    assert doc["verified"] is False
    assert [(link["header"], link["payload"]) for link in doc["links"]] == links
    leaf = doc["links"][2]["computed"]
    assert leaf["holder_thumbprint"] == thumbprints["reporter"]
    assert leaf["caps"] == [f"{REFUND_RES} post if amount le 4000"]
    assert leaf["status"] == "valid"
    assert 0 < leaf["seconds_left"] <= 60

    # The reporter proves one call; the service verifies it offline.
    verify = ("verify", "@reporter.chain", "--bundle", "bundle.json")
    (tmp_path / "100.pop").write_text(cli.ok("prove", "@reporter.chain", "--key", "reporter.jwk",
                                             *refund(100)))
    allowed = cli.run(*verify, *refund(100), "--pop", "@100.pop")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert allowed.stdout.startswith(f"allowed: post on {REFUND_RES} for {REPORTER}")
    assert f"principals  {ORCH} → {SUPPORT} → {HELPER} → {REPORTER}" in allowed.stdout
    assert f"jtis        {', '.join(jtis)}" in allowed.stdout
    assert "kid         root-1" in allowed.stdout
    assert f"expires_at  {links[2][1]['exp']} (" in allowed.stdout

    # A call outside the reporter's caps, though the parents allow it: the
    # nearest capability says why.
    (tmp_path / "4500.pop").write_text(cli.ok("prove", "@reporter.chain", "--key",
                                              "reporter.jwk", *refund(4500)))
    denied = cli.run(*verify, *refund(4500), "--pop", "@4500.pop")
    assert denied.returncode == 1, denied.stdout + denied.stderr
    assert "code     denied" in denied.stdout
    assert "link     2" in denied.stdout
    assert (f"nearest: {REFUND_RES} post if amount le 4000 (amount le 4000 fails for 4500)"
            in denied.stdout)

    # The PoP of one call does not carry another.
    swapped = cli.run(*verify, *refund(200), "--pop", "@100.pop")
    assert swapped.returncode == 1
    assert "code     pop_invalid" in swapped.stdout
    assert "req does not match this request" in swapped.stdout

    # The helper's link is revoked: the list refuses the whole chain.
    revocation_list(cli, jtis[1])
    revoked = cli.run(*verify, *refund(100), "--pop", "@100.pop", "--revocations", "rl.jwt")
    assert revoked.returncode == 1
    assert "code     revoked" in revoked.stdout
    assert "link     1" in revoked.stdout

    # Only the leaf's key can extend the chain.
    wrong = cli.error("attenuate", "@reporter.chain", "--key", "support.jwk", "--sub", "x",
                      "--holder-jwk", "@support.pub", "--cap", refund_cap(1), "--ttl", "10")
    assert "not the chain's leaf key" in wrong

    # A key is never overwritten.
    before = (tmp_path / "support.jwk").read_bytes()
    assert "support.jwk already exists" in cli.error("keygen", "-o", "support.jwk")
    assert (tmp_path / "support.jwk").read_bytes() == before
    assert "already exists" in cli.error("keygen", "-o", "new.jwk", "--public-out", "helper.pub")
    assert not (tmp_path / "new.jwk").exists()


def test_inspect_says_how_long_ago_a_chain_expired(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    cli.ok("keygen", "-o", "a.jwk", "--public-out", "a.pub")
    software_root(cli, "a.pub", now=time.time() - 600, ttl=420)
    tree = cli.ok("inspect", "@root.chain")
    assert re.search(r"window  \S+Z \.\. \S+Z \(expired 3m(?: \d+s)? ago\)", tree), tree
    assert json.loads(cli.ok("inspect", "--json", "@root.chain"))["links"][0]["computed"][
        "status"] == "expired"
    fixed = cli.ok("inspect", "--now", "2001-09-09T01:46:40Z", "@root.chain")
    assert "not valid yet: starts in" in fixed


@pytest.fixture
def site(tmp_path: Path) -> Cli:
    """Keys a.jwk (the leaf of root.chain) and b.jwk, made in process."""
    cli = Cli(tmp_path)
    for name in ("a", "b"):
        key = Holder.generate()
        (tmp_path / f"{name}.jwk").write_text(json.dumps(key.private_jwk()))
        (tmp_path / f"{name}.pub").write_text(json.dumps(key.public_jwk))
    software_root(cli, "a.pub")
    (tmp_path / "notjson").write_text("{nope")
    return cli


PROVE = ("prove", "@root.chain", "--aud", AUD, "--res", REFUND_RES, "--act", "post")
ATTENUATE = ("attenuate", "@root.chain", "--key", "a.jwk", "--sub", "x", "--ttl", "10")
NARROW = ("--cap", refund_cap(1))


@pytest.mark.parametrize(("argv", "expected"), [
    pytest.param(("inspect", "not-a-chain"), "malformed (link 0): link 0: not three",
                 id="malformed-chain"),
    pytest.param(("inspect", "@root.chain~a.b.c"), "chain: cannot read root.chain~a.b.c",
                 id="unreadable-file"),
    pytest.param(("inspect", "-"), "chain: empty", id="empty-stdin"),
    pytest.param((*PROVE, "--key", "b.jwk"), "prove: this holder's key is not the chain's leaf",
                 id="prove-with-the-wrong-key"),
    pytest.param((*PROVE, "--key", "a.pub"), "a public JWK; this needs the private key",
                 id="public-key-as-private"),
    pytest.param((*PROVE, "--key", "notjson"), "--key notjson: not JSON", id="key-not-json"),
    pytest.param((*PROVE, "--key", "a.jwk", "--ctx", "{bad"), "--ctx: not JSON",
                 id="ctx-not-json"),
    pytest.param((*PROVE, "--key", "a.jwk", "--ctx", '{"amount": 1.5}'),
                 "request: ctx amount", id="ctx-float"),
    pytest.param((*ATTENUATE, *NARROW, "--holder-jwk", "@b.jwk"), "holds a private key",
                 id="private-key-into-a-link"),
    pytest.param((*ATTENUATE, *NARROW, "--holder-jwk", "@b.pub", "--dpt", "5"),
                 "dpt must be in [0, 1]",
                 id="deeper-than-the-parent"),
    pytest.param((*ATTENUATE, "--cap", '{"res": "a/**/b", "act": ["x"]}', "--holder-jwk", "@b.pub"),
                 "--cap: '**' only as the last segment", id="bad-capability"),
    pytest.param(("verify", "@root.chain", "--bundle", "notjson", "--aud", AUD, "--res", "a",
                  "--act", "b", "--pop", "x"), "--bundle notjson:", id="bad-bundle"),
])
def test_errors_are_one_line(site: Cli, argv: tuple[str, ...], expected: str) -> None:
    assert expected in site.error(*argv)


def test_a_malformed_link_is_named_and_debug_shows_the_traceback(site: Cli) -> None:
    chain = (site.root / "root.chain").read_text().strip() + "~e30.e30.AA"
    assert site.error("inspect", chain).startswith("malformed (link 1): link 1:")
    debug = site.run("--debug", "inspect", chain)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr


@pytest.mark.parametrize("command", ["keygen", "inspect", "verify", "attenuate", "prove"])
def test_every_command_has_help(tmp_path: Path, command: str) -> None:
    out = Cli(tmp_path).ok(command, "--help")
    assert out.startswith(f"usage: mandate {command}")
