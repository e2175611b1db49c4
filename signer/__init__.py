"""Mandate signer daemon: HSM-held root keys, policy-checked delegation over
mutual-TLS gRPC, and a tamper-evident audit log.

Installed with ``pip install '.[signer]'``; run with ``mandate serve``.
"""

from ._audit import AuditLog, AuditReport, verify_log
from ._config import Config, load_config
from ._errors import (
    ConfigError,
    InvalidRequest,
    NotAllowed,
    NotFound,
    PolicyDenied,
    SignerError,
    TimedOut,
    Unauthenticated,
    Unavailable,
)
from ._issuer import Issued, Issuer
from ._keys import KeySigner, KeyStore, MemoryKeySigner, MemoryKeyStore
from ._model import DelegateRequest
from ._policy import Policy, contains
from ._server import Daemon

__all__ = [
    "AuditLog",
    "AuditReport",
    "Config",
    "ConfigError",
    "Daemon",
    "DelegateRequest",
    "InvalidRequest",
    "Issued",
    "Issuer",
    "KeySigner",
    "KeyStore",
    "MemoryKeySigner",
    "MemoryKeyStore",
    "NotAllowed",
    "NotFound",
    "Policy",
    "PolicyDenied",
    "SignerError",
    "TimedOut",
    "Unauthenticated",
    "Unavailable",
    "contains",
    "load_config",
    "verify_log",
]
