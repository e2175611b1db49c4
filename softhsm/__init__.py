"""SoftHSM2 for development and tests: find the module, write a config for a
token directory, initialise tokens in it.

Not for production keys: PINs are passed to ``softhsm2-util`` on its command
line, where other local users can see them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from string import Template

__all__ = [
    "MODULE_CANDIDATES",
    "SoftHsmError",
    "find_module",
    "init_token",
    "write_config",
]

# Where distributions install the SoftHSM2 PKCS#11 module, Debian's first.
MODULE_CANDIDATES: tuple[str, ...] = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)

CONFIG_NAME = "softhsm2.conf"
_OBJECT_STORE_DIR = "tokens"
_LOG_LEVELS = frozenset({"ERROR", "WARNING", "INFO", "DEBUG"})
_UTIL_TIMEOUT_S = 30.0


class SoftHsmError(Exception):
    """SoftHSM2 is not installed, or a token could not be set up."""


def find_module() -> str:
    """The SoftHSM2 module: ``$SOFTHSM2_MODULE`` if set, else the first known path."""
    configured = os.environ.get("SOFTHSM2_MODULE")
    if configured:
        if not os.path.isfile(configured):
            raise SoftHsmError(f"SOFTHSM2_MODULE names {configured!r}, which is not a file")
        return configured
    for candidate in MODULE_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    raise SoftHsmError(
        "SoftHSM2 module not found (install the softhsm2 package, or set SOFTHSM2_MODULE); "
        f"looked in {', '.join(MODULE_CANDIDATES)}"
    )


def write_config(directory: str | os.PathLike[str], *, log_level: str = "ERROR") -> Path:
    """Write ``softhsm2.conf`` for a token store in ``directory/tokens``; return its path."""
    if log_level not in _LOG_LEVELS:
        raise ValueError(f"log_level must be one of {sorted(_LOG_LEVELS)}")
    base = Path(directory).resolve()
    token_dir = base / _OBJECT_STORE_DIR
    if any(ch in str(token_dir) for ch in "\r\n#"):
        raise SoftHsmError("the token directory's path must not hold a newline or '#'")
    token_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    template = resources.files(__name__).joinpath("softhsm2.conf.in").read_text("utf-8")
    text = Template(template).substitute(tokendir=str(token_dir), log_level=log_level)
    conf = base / CONFIG_NAME
    conf.write_text(text, encoding="utf-8")
    return conf


def init_token(
    directory: str | os.PathLike[str], label: str, *, so_pin: str, user_pin: str
) -> Path:
    """Initialise a new token ``label`` in the store under ``directory``; return the config.

    Set ``SOFTHSM2_CONF`` to the returned path before the process loads the
    module: SoftHSM reads it once and only sees tokens that exist by then.
    """
    util = shutil.which("softhsm2-util")
    if util is None:
        raise SoftHsmError("softhsm2-util not found on PATH (install the softhsm2 package)")
    if not label or len(label.encode()) > 32:
        raise SoftHsmError("a token label is 1 to 32 bytes")
    conf = write_config(directory)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    command = [
        util, "--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", user_pin,
    ]
    try:
        done = subprocess.run(  # noqa: S603 - a fixed tool, arguments as a list
            command, env=env, capture_output=True, text=True, timeout=_UTIL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SoftHsmError(f"softhsm2-util did not finish in {_UTIL_TIMEOUT_S:.0f} s") from exc
    if done.returncode != 0:
        # softhsm2-util never echoes PINs; its own words say what went wrong.
        detail = (done.stderr or done.stdout).strip()
        raise SoftHsmError(f"softhsm2-util could not initialise token {label!r}: {detail}")
    return conf
