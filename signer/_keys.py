"""The one signing interface the daemon sees, and its in-memory backend.

The PKCS#11 backend lives in ``signer._pkcs11``; nothing else imports pkcs11.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from verifier_sdk._keys import PrivateKey

from ._errors import ConfigError


@runtime_checkable
class KeySigner(Protocol):
    """A root key: signs JWS signing inputs, returns JWS-form signatures."""

    @property
    def kid(self) -> str: ...

    @property
    def alg(self) -> str: ...

    @property
    def public_jwk(self) -> dict[str, Any]: ...

    def sign(self, data: bytes) -> bytes: ...


class MemoryKeySigner:
    """A software key for unit tests only: the private key lives in memory."""

    def __init__(self, kid: str, alg: str = "EdDSA") -> None:
        self._kid = kid
        self._key = PrivateKey.generate(alg)

    @property
    def kid(self) -> str:
        return self._kid

    @property
    def alg(self) -> str:
        return self._key.alg

    @property
    def public_jwk(self) -> dict[str, Any]:
        return dict(self._key.public_key.jwk)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


class KeyStore(Protocol):
    """Where root keys live: generates them and hands out their signers."""

    def generate(self, kid: str, alg: str) -> KeySigner: ...

    def signer(self, kid: str) -> KeySigner: ...


class MemoryKeyStore:
    """In-memory keys, for unit tests only."""

    def __init__(self) -> None:
        self._keys: dict[str, MemoryKeySigner] = {}

    def generate(self, kid: str, alg: str) -> KeySigner:
        if kid in self._keys:
            raise ConfigError(f"key {kid!r} already exists")
        self._keys[kid] = MemoryKeySigner(kid, alg)
        return self._keys[kid]

    def signer(self, kid: str) -> KeySigner:
        try:
            return self._keys[kid]
        except KeyError:
            raise ConfigError(f"key {kid!r} is not in the key store") from None
