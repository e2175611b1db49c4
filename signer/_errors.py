"""The daemon's error tree. Each class maps to one gRPC status code, in the
one table of ``signer._service``; library exceptions are wrapped here."""

from __future__ import annotations


class SignerError(Exception):
    """Base of every error the daemon reports to a caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(SignerError):
    """The request is malformed or breaks the credential format's rules."""


class Unauthenticated(SignerError):
    """No verified caller identity (no or unusable client certificate)."""


class PolicyDenied(SignerError):
    """The issuance policy does not allow the request.

    ``reason`` is a stable machine-readable token (e.g. ``ttl_exceeds_max``);
    the message says which rule failed in words.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotAllowed(SignerError):
    """An authenticated caller asked for something only others may do (admin RPCs,
    revoking another caller's link)."""


class NotFound(SignerError):
    """The named object (key, link) does not exist."""


class Unavailable(SignerError):
    """A part the daemon needs (the HSM, the audit store) is down: fail closed."""


class LimitReached(SignerError):
    """The request would take a bounded resource past its limit (e.g. the
    revocation list past the size every verifier accepts)."""


class TimedOut(SignerError):
    """The call ran out of time (its deadline or the server's cap) before the link
    was recorded: nothing was issued."""


class ConfigError(SignerError):
    """The configuration, the policy file or the key setup is wrong: refuse to start."""
