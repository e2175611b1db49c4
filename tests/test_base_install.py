"""The SDK works with its base dependencies alone (pyproject: cryptography, PyNaCl).

A regular (non-editable) install without extras into a fresh virtualenv must
import, issue, attenuate, prove and verify, and must not have pulled in the
signer's or the test suite's dependencies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEP_TIMEOUT_S = 600

CHECK = r'''
import importlib.util
import pathlib
import sys

import verifier_sdk
from verifier_sdk import (
    Holder, Request, TrustBundle, VerificationError, Verifier, decode_unverified, issue_root,
)

NOW = 1_800_000_000
root, a, b = Holder.generate(), Holder.generate(), Holder.generate("ES256")
bundle = TrustBundle.from_jwks({"keys": [{**root.public_jwk, "kid": "root-1", "alg": "EdDSA"}]})
chain = issue_root(alg="EdDSA", kid="root-1", sign=root.sign, iss="svc:issuer", sub="agent:a",
                   holder_jwk=a.public_jwk, cap=[{"res": "api/x/**", "act": ["get"]}],
                   ttl=300, dpt=1, now=NOW)
chain = a.attenuate(chain, sub="agent:b", holder_jwk=b.public_jwk,
                    cap=[{"res": "api/x/1", "act": ["get"]}], ttl=60, now=NOW)
assert len(decode_unverified(chain)) == 2
verifier = Verifier(bundle, audience="svc", clock=lambda: NOW)
req = Request("api/x/1", "get")
decision = verifier.verify(chain, req, pop=b.prove(chain, req, aud="svc", now=NOW))
assert decision.principals == ("svc:issuer", "agent:a", "agent:b"), decision

other = Request("api/x/2", "get")
try:
    verifier.verify(chain, other, pop=b.prove(chain, other, aud="svc", now=NOW))
except VerificationError as exc:
    assert exc.code == "denied" and exc.link == 1, exc
else:
    sys.exit("a request outside the chain was allowed")

present = [m for m in ("grpc", "pkcs11", "pytest", "hypothesis")
           if importlib.util.find_spec(m) is not None]
assert not present, f"not base dependencies, yet importable: {present}"
package = pathlib.Path(verifier_sdk.__file__).parent
assert (package / "py.typed").is_file(), "py.typed is not shipped"
print("BASE-INSTALL-OK", package)
'''


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, (
        f"{args} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


@pytest.mark.slow
def test_sdk_installs_and_verifies_with_base_dependencies_only(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache",
        ".hypothesis", "build", "dist", "*.egg-info",
    ))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    run([str(python), "-m", "pip", "install", "--quiet", str(source)], cwd=tmp_path)

    # Run from an empty directory so the copied source tree cannot shadow the install.
    workdir = tmp_path / "run"
    workdir.mkdir()
    script = workdir / "check.py"
    script.write_text(CHECK)
    result = run([str(python), str(script)], cwd=workdir)
    assert "BASE-INSTALL-OK" in result.stdout
    installed_at = Path(result.stdout.split("BASE-INSTALL-OK", 1)[1].strip())
    assert installed_at.resolve().is_relative_to(venv.resolve())
