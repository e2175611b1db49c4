"""One SoftHSM2 token store for the whole test session.

SoftHSM reads ``SOFTHSM2_CONF`` once, at C_Initialize, and sees only the
tokens that exist by then; python-pkcs11 loads a module once per process.
So the store is made once, before any test touches PKCS#11, with every token
the tests need. Import the ``hsm`` fixture into a test module to use it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import softhsm
from signer._pkcs11 import Pkcs11Token

USER_PIN = "user-pin-2468"
SO_PIN = "so-pin-13579"

# Each suite that changes a token's state (faults, PIN failures) gets its own.
TOKENS = (
    "mandate-main",
    "mandate-second",
    "mandate-faults",
    "mandate-pin-change",
    "mandate-wrong-pin",
    "mandate-import",
    "mandate-service",
    "mandate-cli",
    "mandate-replicas",
    "mandate-fuzz",
)


@dataclass(frozen=True)
class SoftHsm:
    """The session's token store: the module, its config and the tokens in it."""

    module: str
    conf: Path
    labels: tuple[str, ...]
    user_pin: str = USER_PIN
    so_pin: str = SO_PIN
    # Software keys imported into "mandate-import" by softhsm2-util, by label.
    imported: dict[str, Any] = field(default_factory=dict)

    def open(self, label: str, **kw: Any) -> Pkcs11Token:
        """A logged-in handle on token ``label``; close it when done."""
        if label not in self.labels:
            raise ValueError(f"no token {label!r} in the test store; add it to TOKENS")
        kw.setdefault("pin", self.user_pin)
        return Pkcs11Token(self.module, token_label=label, **kw)

    def import_key(self, token_label: str, pkcs8_pem: bytes, *, label: str, key_id: str) -> None:
        """Import a software key pair (PKCS#8 PEM) with softhsm2-util, as an operator might."""
        util = shutil.which("softhsm2-util")
        assert util is not None
        with tempfile.NamedTemporaryFile(dir=self.conf.parent, suffix=".pem") as pem:
            pem.write(pkcs8_pem)
            pem.flush()
            subprocess.run(
                [util, "--import", pem.name, "--token", token_label, "--label", label,
                 "--id", key_id, "--pin", self.user_pin],
                env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
                check=True, capture_output=True, timeout=30,
            )


@pytest.fixture(scope="session")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    directory = tmp_path_factory.mktemp("softhsm")
    conf = None
    for label in TOKENS:
        conf = softhsm.init_token(directory, label, so_pin=SO_PIN, user_pin=USER_PIN)
    assert conf is not None
    store = SoftHsm(module=softhsm.find_module(), conf=conf, labels=TOKENS)
    # Keys made outside the token are imported now, before this process first
    # initialises the module: SoftHSM2 does not show objects another process
    # adds to a token after this process has opened and closed a session on it.
    for label, key, key_id in (
        ("imported-ed", ed25519.Ed25519PrivateKey.generate(), "0a"),
        ("imported-es", ec.generate_private_key(ec.SECP256R1()), "0b"),
        ("imported-rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048), "0c"),
    ):
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        store.import_key("mandate-import", pem, label=label, key_id=key_id)
        store.imported[label] = key
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        yield store
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
