"""Mandate verifier SDK: verify, narrow and use Mandate v1 delegation chains.

Pure and synchronous; depends on ``cryptography`` and PyNaCl only. The
format and the verification algorithm are normative in spec/mandate-v1.md.
"""

from ._bundle import BundleKey, TrustBundle
from ._capability import Capability, Request
from ._errors import CODES, VerificationError
from ._holder import Holder, issue_root, new_jti
from ._link import decode_unverified
from ._pop import make_pop
from ._refresh import RevocationRefresher
from ._revocation import RevocationList, make_revocation_list, verify_revocation_list
from ._stores import (
    MemoryReplayStore,
    MemoryUseStore,
    ReplayStore,
    StoreError,
    UseStore,
)
from ._verifier import Decision, Verifier

__all__ = [
    "CODES",
    "BundleKey",
    "Capability",
    "Decision",
    "Holder",
    "MemoryReplayStore",
    "MemoryUseStore",
    "ReplayStore",
    "Request",
    "RevocationList",
    "RevocationRefresher",
    "StoreError",
    "TrustBundle",
    "UseStore",
    "VerificationError",
    "Verifier",
    "decode_unverified",
    "issue_root",
    "make_pop",
    "make_revocation_list",
    "new_jti",
    "verify_revocation_list",
]
