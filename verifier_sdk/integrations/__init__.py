"""Drop-in Mandate verification for services, and credentials for agents.

Each submodule imports its framework itself, so this package (like
``verifier_sdk``) needs only the SDK's base dependencies:

- ``verifier_sdk.integrations.grpc``: server interceptor and client interceptor
  (needs ``grpcio`` and ``grpcio-status``);
- ``verifier_sdk.integrations.asgi``: middleware for Starlette, FastAPI or any
  ASGI app (needs nothing more);
- ``verifier_sdk.integrations.httpx``: an ``httpx.Auth`` for agents (needs ``httpx``).

``KIND_OF`` is the one table that decides whether a refusal is "who are you"
(401 / UNAUTHENTICATED) or "not allowed" (403 / PERMISSION_DENIED).
"""

from ._common import (
    BAD_REQUEST,
    KIND_OF,
    MISSING_CREDENTIALS,
    HttpCall,
    HttpRequestMapper,
    Kind,
    Refusal,
)

__all__ = [
    "BAD_REQUEST",
    "KIND_OF",
    "MISSING_CREDENTIALS",
    "HttpCall",
    "HttpRequestMapper",
    "Kind",
    "Refusal",
]
