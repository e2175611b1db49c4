"""The HTTP integration against a real uvicorn server on 127.0.0.1:0: the ASGI
middleware verifies, answers 401/403/503/400/413 with a JSON reason, and puts
the Decision in the scope; the httpx Auth sends chain and PoP."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from helpers import AUD, NOW, ROOT_KID, World, pop_for
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from verifier_sdk import CODES, Holder, Request, Verifier, decode_unverified, make_revocation_list
from verifier_sdk.integrations import KIND_OF, HttpCall
from verifier_sdk.integrations.asgi import DECISION_KEY, MandateMiddleware, decision_of
from verifier_sdk.integrations.httpx import MandateAuth, http_call

TIMEOUT_S = 5
MAX_BODY = 1024


def to_request(call: HttpCall) -> Request:
    """The service's (and the agent's) mapping: path and method, amount from the body."""
    ctx: dict[str, str | int | bool] = {}
    if call.body:
        ctx["amount"] = call.json()["amount"]
    note = call.param("note")
    if note is not None:
        ctx["note"] = note
    return Request("api/payments" + call.path, call.method.lower(), ctx)


async def _refund(request: HttpRequest) -> JSONResponse:
    decision = decision_of(request.scope)
    body = await request.json()  # the middleware read it first: it must be replayed
    return JSONResponse({"subject": decision.subject, "principals": list(decision.principals),
                         "res": decision.request.res, "amount": body["amount"]})


async def _lookup(request: HttpRequest) -> JSONResponse:
    return JSONResponse({"subject": decision_of(request.scope).subject})


async def _health(request: HttpRequest) -> JSONResponse:
    return JSONResponse({"ok": True, "decision": DECISION_KEY in request.scope})


def make_app(verifier: Verifier) -> Starlette:
    app = Starlette(routes=[
        Route("/refunds/{order}", _refund, methods=["POST"]),
        Route("/refunds/{order}", _lookup, methods=["GET"]),
        Route("/healthz", _health),
    ])
    app.add_middleware(MandateMiddleware, verifier=verifier, to_request=to_request,
                       read_body=True, max_body_bytes=MAX_BODY, exempt_paths=["/healthz"])
    return app


@contextmanager
def serving(verifier: Verifier) -> Iterator[str]:
    """uvicorn on a loopback socket bound here (so the port is known), in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(verifier), log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT_S)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def world() -> World:
    """One world (root key, holders) for the module, so that one server serves
    most tests; each test makes its own chains (fresh jtis) and PoPs, so none
    sees another's uses or replays. (Stopping uvicorn takes ~0.15 s.)"""
    return World()


@pytest.fixture(scope="module")
def base_url(world: World) -> Iterator[str]:
    with serving(world.verifier()) as url:
        yield url


def agent(world: World, chain: str, url: str) -> httpx.Client:
    auth = MandateAuth(world.c, chain, to_request, aud=AUD, read_body=True, clock=world.clock)
    return httpx.Client(base_url=url, auth=auth, timeout=TIMEOUT_S)


REFUND_BODY = {"amount": 4999}


def test_allowed_request_reaches_the_endpoint_with_its_decision(
        world: World, base_url: str) -> None:
    with agent(world, world.chain3(), base_url) as client:
        response = client.post("/refunds/o-123", json=REFUND_BODY)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "subject": "agent:helper",
        "principals": ["spiffe://acme.example/orchestrator", "agent:support",
                       "agent:refund", "agent:helper"],
        "res": "api/payments/refunds/o-123", "amount": 4999,
    }


def test_async_client_too(world: World, base_url: str) -> None:
    async def go() -> httpx.Response:
        auth = MandateAuth(world.c, world.chain3(), to_request, aud=AUD, read_body=True,
                           clock=world.clock)
        async with httpx.AsyncClient(base_url=base_url, auth=auth, timeout=TIMEOUT_S) as client:
            return await client.post("/refunds/o-123", json=REFUND_BODY)
    response = asyncio.run(go())
    assert response.status_code == 200, response.text


def test_exempt_path_needs_no_credentials_and_gets_no_decision(base_url: str) -> None:
    response = httpx.get(base_url + "/healthz", timeout=TIMEOUT_S)
    assert response.json() == {"ok": True, "decision": False}


# --- refusals ------------------------------------------------------------------
# Rows: what the caller sends → status and JSON reason. "auth" rows use the
# agent's MandateAuth (a valid PoP for what is sent): only policy can refuse.

Send = Callable[[World, str, str], httpx.Response]


def _raw(world: World, chain: str, url: str, *, path: str = "/refunds/o-123",
         headers: dict[str, str] | None = None, holder: Holder | None = None,
         proved: Any = REFUND_BODY, body: Any = REFUND_BODY) -> httpx.Response:
    """A POST whose PoP ``holder`` made for ``proved`` (None: no PoP header)."""
    sent = httpx.Request("POST", url + path, json=body, headers=headers)
    if headers is None:
        sent.headers["Authorization"] = "Mandate " + chain
        if proved is not None:
            req = to_request(HttpCall.build("POST", path, b"", [], json.dumps(proved).encode()))
            sent.headers["Mandate-PoP"] = pop_for(world, chain, holder, req)
    with httpx.Client(timeout=TIMEOUT_S) as client:
        return client.send(sent)


def _auth(method: str, path: str, body: Any = REFUND_BODY) -> Send:
    def send(world: World, chain: str, url: str) -> httpx.Response:
        with agent(world, chain, url) as client:
            return client.request(method, path, json=body)
    return send


REFUSALS: list[tuple[str, Send, int, str, int | None]] = [
    ("no Authorization", lambda w, c, u: _raw(w, c, u, headers={}),
     401, "missing_credentials", None),
    ("Bearer, not Mandate", lambda w, c, u: _raw(w, c, u, headers={"Authorization": "Bearer x"}),
     401, "missing_credentials", None),
    ("no PoP", lambda w, c, u: _raw(w, c, u, proved=None), 401, "pop_invalid", None),
    ("garbage chain", lambda w, c, u: _raw(w, "a.b.c", u), 401, "malformed", 0),
    ("stolen chain, thief's key", lambda w, c, u: _raw(w, c, u, holder=Holder.generate()),
     401, "pop_invalid", None),
    ("PoP made for a smaller amount", lambda w, c, u: _raw(w, c, u, proved={"amount": 1}),
     401, "pop_invalid", None),
    ("wrong method", _auth("GET", "/refunds/o-123", None), 403, "denied", 0),
    ("other order", _auth("POST", "/refunds/o-999"), 403, "denied", 1),
    ("wider amount", _auth("POST", "/refunds/o-123", {"amount": 5001}), 403, "denied", 0),
    ("another service's chain", lambda w, c, u: _raw(w, w.issue(aud=["orders-api"]), u),
     403, "audience", 0),
    ("repeated query parameter",
     lambda w, c, u: _raw(w, c, u, path="/refunds/o-123?note=a&note=b", proved=None),
     400, "bad_request", None),
    ("path the mapper cannot express",
     lambda w, c, u: _raw(w, c, u, path="/refunds/o-123/", proved=None), 400, "bad_request", None),
    ("body without the amount", lambda w, c, u: _raw(w, c, u, body={"x": 1}, proved=None),
     400, "bad_request", None),
    ("body over the limit", lambda w, c, u: _raw(w, c, u, body={"amount": 1, "x": "y" * MAX_BODY}),
     413, "body_too_large", None),
]


@pytest.mark.parametrize(("send", "expected"), [(row[1], row[2:]) for row in REFUSALS],
                         ids=[row[0] for row in REFUSALS])
def test_refusals(world: World, base_url: str, send: Send,
                  expected: tuple[int, str, int | None]) -> None:
    response = send(world, world.chain3(), base_url)
    body = response.json()
    assert (response.status_code, body["error"], body["link"]) == expected, body
    assert response.headers["content-type"] == "application/json"
    assert set(body) == {"error", "link", "message"}
    assert body["message"]
    if response.status_code == 401:
        assert response.headers["www-authenticate"] == f'Mandate error="{body["error"]}"'


def test_denial_names_the_nearest_capability(world: World, base_url: str) -> None:
    response = _auth("POST", "/refunds/o-999")(world, world.chain3(), base_url)
    assert "nearest: api/payments/refunds/o-123 post" in response.json()["message"]


def test_replayed_pop_is_unauthorized(world: World, base_url: str) -> None:
    chain = world.chain3()
    req = to_request(HttpCall.build("POST", "/refunds/o-123", b"", [],
                                    json.dumps(REFUND_BODY).encode()))
    headers = {"Authorization": "Mandate " + chain,
               "Mandate-PoP": world.c.prove(chain, req, aud=AUD, now=world.now)}
    with httpx.Client(base_url=base_url, timeout=TIMEOUT_S) as client:
        first = client.post("/refunds/o-123", json=REFUND_BODY, headers=headers)
        second = client.post("/refunds/o-123", json=REFUND_BODY, headers=headers)
    assert first.status_code == 200, first.text
    assert (second.status_code, second.json()["error"]) == (401, "replayed")


def test_single_use_chain_is_exhausted_on_the_second_request(
        world: World, base_url: str) -> None:
    with agent(world, world.chain3(use=1), base_url) as client:
        assert client.post("/refunds/o-123", json=REFUND_BODY).status_code == 200
        second = client.post("/refunds/o-123", json=REFUND_BODY)
    assert (second.status_code, second.json()["error"], second.json()["link"]) == (
        403, "uses_exhausted", 2)


def test_revoked_and_stale(world: World) -> None:
    verifier = world.verifier(require_revocations=True)
    chain = world.chain3()
    with serving(verifier) as url, agent(world, chain, url) as client:
        stale = client.post("/refunds/o-123", json=REFUND_BODY)
        assert (stale.status_code, stale.json()["error"]) == (503, "revocation_stale")
        verifier.update_revocations(make_revocation_list(
            alg=world.root.alg, kid=ROOT_KID, sign=world.root.sign, iss="svc:revoker", seq=1,
            iat=NOW - 60, exp=NOW + 3600, revoked=[decode_unverified(chain)[1][1]["jti"]]))
        revoked = client.post("/refunds/o-123", json=REFUND_BODY)
    assert (revoked.status_code, revoked.json()["error"], revoked.json()["link"]) == (
        403, "revoked", 1)


# --- the pieces on their own -----------------------------------------------------


def test_every_code_has_a_kind() -> None:
    assert KIND_OF.keys() >= CODES
    forbidden = {code for code, kind in KIND_OF.items() if kind == "forbidden"}
    assert forbidden == {"revoked", "audience", "denied", "uses_exhausted"}


def test_agent_and_service_see_the_same_call() -> None:
    sent = httpx.Request("POST", "http://svc/refunds/o%2D123?note=caf%C3%A9&x=", json={"a": 1},
                         headers={"X-Trace": "t1", "Authorization": "Mandate old"})
    call = http_call(sent, with_body=True)
    assert call == HttpCall.build("POST", "/refunds/o-123", b"note=caf%C3%A9&x=",
                                  [(k.decode(), v.decode()) for k, v in sent.headers.raw],
                                  b'{"a":1}')
    assert (call.param("note"), call.param("x"), call.param("absent")) == ("café", "", None)
    assert call.header("x-trace") == "t1"
    assert call.header("authorization") is None
    assert call.json() == {"a": 1}


def test_websocket_is_closed_unless_exempt(world: World) -> None:
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(message)

    middleware = MandateMiddleware(app, verifier=world.verifier(), to_request=to_request,
                                   exempt_paths=["/ws-open"])
    asyncio.run(middleware({"type": "websocket", "path": "/ws", "headers": []}, receive, send))
    asyncio.run(middleware({"type": "websocket", "path": "/ws-open", "headers": []},
                           receive, send))
    assert [(m["type"], m["code"]) for m in sent] == [("websocket.close", 1008)]
    assert reached == ["/ws-open"]


def test_client_gone_before_its_body_ends_reaches_nothing(world: World) -> None:
    """A partial body must not reach the application (nor be answered)."""
    reached: list[Any] = []
    sent: list[Any] = []
    messages = iter([{"type": "http.request", "body": b'{"amount": 49', "more_body": True},
                     {"type": "http.disconnect"}])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope)

    async def receive() -> Any:
        return next(messages)

    async def send(message: Any) -> None:
        sent.append(message)

    middleware = MandateMiddleware(app, verifier=world.verifier(), to_request=to_request,
                                   read_body=True)
    scope = {"type": "http", "method": "POST", "path": "/refunds/o-123", "query_string": b"",
             "headers": [(b"authorization", b"Mandate " + world.chain3().encode())]}
    asyncio.run(middleware(scope, receive, send))
    assert (reached, sent) == ([], [])


def test_integrations_import_without_optional_dependencies() -> None:
    """A user without grpc, starlette and httpx can still import the SDK and the
    dependency-free parts of the integrations."""
    code = (
        "import sys\n"
        "for name in ('grpc', 'grpc_status', 'google.rpc', 'httpx', 'starlette'):\n"
        "    sys.modules[name] = None\n"
        "import verifier_sdk, verifier_sdk.integrations, verifier_sdk.integrations.asgi\n"
        "try:\n"
        "    import verifier_sdk.integrations.grpc\n"
        "except ImportError:\n"
        "    print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                            text=True, timeout=60, check=False,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.stdout.strip() == "ok", result.stderr


def test_a_json_body_that_repeats_a_member_is_a_bad_request() -> None:
    twins = HttpCall.build("POST", "/refunds/o-123", b"", [],
                           b'{"amount": 100, "amount": 999999}')
    with pytest.raises(ValueError, match="repeats a member"):
        twins.json()
    single = HttpCall.build("POST", "/refunds/o-123", b"", [], b'{"amount": 100}')
    assert single.json() == {"amount": 100}
