"""Mandate for HTTP services: a pure ASGI middleware (Starlette, FastAPI, any
ASGI app; no framework import).

The agent sends ``Authorization: Mandate <chain>`` and ``Mandate-PoP: <pop>``.
A refusal is answered before the application runs, with the status
``KIND_OF`` gives its code (401, 403, 503, 400; 413 for an oversized body)
and a JSON body ``{"error": code, "link": n, "message": ...}``. An allowed
request reaches the application with its Decision in
``scope["mandate.decision"]`` (``decision_of(request.scope)``).

Verification runs inline in the event loop: it takes well under a
millisecond with the in-memory stores; a network-backed replay or use store
blocks the loop while it answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, MutableMapping
from typing import Any, Final

from .._capability import Request
from .._errors import VerificationError
from .._verifier import Decision, Verifier
from ._common import (
    BAD_REQUEST,
    MISSING_CREDENTIALS,
    HttpCall,
    HttpRequestMapper,
    Kind,
    Refusal,
)

__all__ = ["DECISION_KEY", "MandateMiddleware", "decision_of"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DECISION_KEY: Final = "mandate.decision"

_STATUS: Final[dict[Kind, int]] = {
    "unauthenticated": 401, "forbidden": 403, "unavailable": 503, "invalid": 400,
}
_POLICY_VIOLATION: Final = 1008  # WebSocket close code


def decision_of(scope: Mapping[str, Any]) -> Decision:
    """The Decision the middleware put in ``scope``; RuntimeError if there is none
    (no middleware, or an exempt path)."""
    decision = scope.get(DECISION_KEY)
    if not isinstance(decision, Decision):
        raise RuntimeError("no verified Mandate request in this scope")
    return decision


class MandateMiddleware:
    """Verifies every HTTP request before the application sees it.

    ``to_request`` maps an ``HttpCall`` (method, path, query, headers and,
    with ``read_body=True``, the body) to the Request the chain must allow;
    the agent's ``MandateAuth`` should use the same function. A ValueError or
    LookupError from it (say, a missing field) is answered 400 ``bad_request``. With
    ``read_body`` the whole body (at most ``max_body_bytes``) is read first and
    replayed to the application. Paths in ``exempt_paths`` pass unverified;
    WebSocket connections to other paths are closed (not covered, so not let
    through).

    Starlette: ``app.add_middleware(MandateMiddleware, verifier=v, to_request=f)``.
    """

    def __init__(self, app: ASGIApp, *, verifier: Verifier, to_request: HttpRequestMapper,
                 read_body: bool = False, max_body_bytes: int = 1_048_576,
                 exempt_paths: Collection[str] = ()) -> None:
        if not isinstance(verifier, Verifier):
            raise TypeError("verifier must be a verifier_sdk.Verifier")
        if type(max_body_bytes) is not int or max_body_bytes < 0:
            raise ValueError("max_body_bytes must be an int >= 0")
        self._app = app
        self._verifier = verifier
        self._to_request = to_request
        self._read_body = read_body
        self._max_body = max_body_bytes
        self._exempt = frozenset(exempt_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope["path"] in self._exempt:
            await self._app(scope, receive, send)
            return
        if kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": _POLICY_VIOLATION,
                        "reason": "Mandate does not cover WebSocket connections"})
            return

        headers = [(k.decode("latin-1").lower(), v.decode("latin-1"))
                   for k, v in scope["headers"]]
        credentials = _credentials(headers)
        if isinstance(credentials, Refusal):
            await _refuse(send, credentials)
            return
        chain, pop = credentials

        body: bytes | None = None
        if self._read_body:
            try:
                body = await self._read(receive, headers)
            except _Disconnected:
                return  # nobody to answer, and a partial body must not reach the app
            if body is None:
                await _refuse(send, Refusal(
                    "body_too_large", None, f"the body is over {self._max_body} bytes"), 413)
                return
            receive = _replay(body, receive)

        try:
            call = HttpCall.build(scope["method"], scope["path"], scope.get("query_string", b""),
                                  headers, body)
            request = self._to_request(call)
        except (ValueError, LookupError) as exc:  # e.g. a field the mapper needs is missing
            await _refuse(send, Refusal(BAD_REQUEST, None, f"{type(exc).__name__}: {exc}"))
            return
        if not isinstance(request, Request):
            raise TypeError("the request mapper must return a verifier_sdk.Request")
        try:
            decision = self._verifier.verify(chain, request, pop=pop)
        except VerificationError as exc:
            await _refuse(send, Refusal(exc.code, exc.link, exc.message))
            return
        await self._app({**scope, DECISION_KEY: decision}, receive, send)

    async def _read(self, receive: Receive, headers: list[tuple[str, str]]) -> bytes | None:
        """The whole body, or None once it is known to be over the limit."""
        for name, value in headers:
            if name == "content-length" and value.strip().isdigit() \
                    and int(value) > self._max_body:
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


class _Disconnected(Exception):
    """The client went away before its body was complete."""


def _credentials(headers: list[tuple[str, str]]) -> tuple[str, str | None] | Refusal:
    """(chain, PoP or None) from the headers, or why not."""
    auth = [v for k, v in headers if k == "authorization"]
    pops = [v for k, v in headers if k == "mandate-pop"]
    if len(auth) > 1:
        return Refusal("malformed", None, "the Authorization header is repeated")
    scheme, _, chain = auth[0].strip().partition(" ") if auth else ("", "", "")
    if scheme.lower() != "mandate":
        return Refusal(MISSING_CREDENTIALS, None, "no 'Authorization: Mandate <chain>' header")
    if len(pops) > 1:
        return Refusal("pop_invalid", None, "the Mandate-PoP header is repeated")
    return chain.strip(), (pops[0].strip() if pops else None)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the application the body already read, then the rest."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed


async def _refuse(send: Send, refusal: Refusal, status: int | None = None) -> None:
    body = refusal.to_json()
    status = _STATUS[refusal.kind] if status is None else status
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", f'Mandate error="{refusal.code}"'.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
