#!/usr/bin/env python3
"""Provision a development signer in one directory: a SoftHSM2 token, a root
key generated inside it, a development CA with server and client
certificates, a config, a policy, and the exported trust bundle.

    provision.py DIR [--alg EdDSA|ES256] [--caller SPIFFE-ID] [--admin SPIFFE-ID]

Then: SOFTHSM2_CONF=DIR/hsm/softhsm2.conf mandate serve -c DIR/signer.toml
The PINs are random and kept in DIR/secrets (mode 0600); the config names the
PIN file, never the PIN. For a real HSM, skip the token step and point
[hsm] module and token_label at it: `mandate keys generate` and
`mandate keys export-bundle` work the same there.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

import softhsm
from signer._devpki import DevCA
from signer.cli import main as mandate

ORCHESTRATOR = "spiffe://acme.example/svc/orchestrator"
ADMIN = "spiffe://acme.example/ops/oncall"

POLICY = """\
# Development policy: the orchestrator may delegate reads of customer 42's
# orders and one refund of at most 5000 to support agents.
admins = ["{admin}"]

[[grant]]
caller = "{caller}"
subjects = ["agent:support/**"]
caps = [
  {{ res = "db/orders/**", act = ["select"], if = {{ customer = {{ eq = 42 }} }} }},
]
max_ttl = 300
max_dpt = 2
audiences = ["orders-db"]

[[grant]]
caller = "{caller}"
subjects = ["agent:support/**"]
caps = [
  {{ res = "api/payments/refunds/*", act = ["post"], if = {{ amount = {{ gt = 0, le = 5000 }} }} }},
]
max_ttl = 120
max_dpt = 0
audiences = ["payments-api"]
max_use = 1
"""

CONFIG = """\
# Development signer (made by scripts/provision.py).
[server]
listen = "127.0.0.1:{port}"
tls_cert = "pki/server.pem"
tls_key = "pki/server.key"
client_ca = "pki/ca.pem"

[hsm]
module = "{module}"
token_label = "mandate"
pin_file = "secrets/hsm-pin"

[state]
dir = "state"

[audit]
checkpoint_every = 100
checkpoint_interval_s = 2.0

[revocation]
issuer = "mandate-dev-signer"
list_ttl_s = 600

[policy]
file = "policy.toml"
"""


def _secret(path: Path) -> str:
    value = secrets.token_urlsafe(16)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    return value


def provision(directory: Path, *, alg: str, caller: str, admin: str, port: int) -> Path:
    """Everything a development daemon needs, in ``directory`` (which must be new)."""
    directory.mkdir(parents=True, exist_ok=False)
    pin = _secret(directory / "secrets" / "hsm-pin")
    so_pin = _secret(directory / "secrets" / "hsm-so-pin")
    conf = softhsm.init_token(directory / "hsm", "mandate", so_pin=so_pin, user_pin=pin)

    pki = directory / "pki"
    pki.mkdir()
    ca = DevCA()
    (pki / "ca.pem").write_bytes(ca.pem)
    ca.issue(cn="mandate-signer", server=True).write(pki, "server")
    ca.issue(uri=caller).write(pki, "orchestrator")
    ca.issue(uri=admin).write(pki, "admin")

    (directory / "policy.toml").write_text(POLICY.format(caller=caller, admin=admin))
    config = directory / "signer.toml"
    config.write_text(CONFIG.format(port=port, module=softhsm.find_module()))

    os.environ["SOFTHSM2_CONF"] = str(conf)
    for argv in (["keys", "generate", "-c", str(config), "--kid", "root-1", "--alg", alg],
                 ["keys", "export-bundle", "-c", str(config),
                  "-o", str(directory / "bundle.json")]):
        if mandate(argv) != 0:
            raise SystemExit(f"provisioning failed at: mandate {' '.join(argv)}")
    return conf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--alg", default="EdDSA", choices=["EdDSA", "ES256"])
    parser.add_argument("--caller", default=ORCHESTRATOR)
    parser.add_argument("--admin", default=ADMIN)
    parser.add_argument("--port", type=int, default=7443)
    args = parser.parse_args()
    try:
        conf = provision(args.directory, alg=args.alg, caller=args.caller, admin=args.admin,
                         port=args.port)
    except (OSError, softhsm.SoftHsmError) as exc:
        print(f"provision: {exc}", file=sys.stderr)
        return 1
    print(f"provisioned {args.directory}\n"
          f"  SOFTHSM2_CONF={conf} mandate serve -c {args.directory / 'signer.toml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
