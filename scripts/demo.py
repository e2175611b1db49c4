#!/usr/bin/env python3
"""Mandate end to end, on real parts: a SoftHSM2 token holds the root key, the
signer daemon delegates over mutual TLS, agents narrow and use what they got,
and two real services — orders over HTTP, payments over gRPC — check every
call with the verifier SDK. It shows what is allowed and the refusals that
matter, then the audit trail; it stops everything it started and exits
non-zero if any step does not behave as shown.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from signer._proto.mandate.v1 import signer_pb2 as pb
from signer._proto.mandate.v1 import signer_pb2_grpc as pb_grpc
from signer.cli import cap_to_proto
from verifier_sdk import (
    Holder,
    Request,
    RevocationRefresher,
    TrustBundle,
    Verifier,
    make_pop,
    new_jti,
)
from verifier_sdk._encoding import sha256_b64
from verifier_sdk.integrations import HttpCall
from verifier_sdk.integrations.asgi import MandateMiddleware, decision_of
from verifier_sdk.integrations.grpc import (
    METADATA_OPTIONS,
    MandateServerInterceptor,
    current_decision,
    mandate_metadata,
    refusal_of,
)
from verifier_sdk.integrations.httpx import MandateAuth

ROOT = Path(__file__).resolve().parent.parent
ORCHESTRATOR = "spiffe://acme.example/svc/orchestrator"
PAYMENTS = "payments-api"
ORDERS = "orders-db"
START_TIMEOUT_S = 60


class Story:
    """Prints the steps and counts those that did not behave as shown."""

    def __init__(self) -> None:
        self.failures = 0

    @staticmethod
    def step(title: str) -> None:
        print(f"\n== {title}", flush=True)

    def check(self, ok: bool, what: str, detail: str = "") -> None:
        self.failures += not ok
        mark = "ok  " if ok else "FAIL"
        print(f"  {mark} {what}" + (f"\n         {detail}" if detail else ""), flush=True)


def run_mandate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "signer.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@contextlib.contextmanager
def signer_daemon(site: Path, env: dict[str, str]) -> Iterator[int]:
    """``mandate serve`` in a subprocess; yields its port; SIGTERM on the way out."""
    log = (site / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "signer.cli", "serve", "-c",
                             str(site / "signer.toml")], env=env, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""
        found = re.search(r"listening on port (\d+)", line)
        if not found:
            raise RuntimeError(f"the daemon did not start: {(site / 'serve.log').read_text()}")
        yield int(found.group(1))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if proc.stdout is not None:
            proc.stdout.close()
        log.close()


# --- the two services ---------------------------------------------------------------

def orders_request(call: HttpCall) -> Request:
    """GET /orders/{id}?customer=N → select on db/orders/{id} for customer N."""
    order = call.path.removeprefix("/orders/")
    customer = call.param("customer")
    if not order or "/" in order or customer is None or not customer.isdigit():
        raise ValueError("GET /orders/{id}?customer={n}")
    return Request(f"db/orders/{order}", call.method.lower().replace("get", "select"),
                   {"customer": int(customer)})


async def read_order(request: HttpRequest) -> JSONResponse:
    decision = decision_of(request.scope)
    return JSONResponse({"order": request.path_params["order"], "status": "shipped",
                         "for": decision.subject})


@contextlib.contextmanager
def orders_service(verifier: Verifier) -> Iterator[str]:
    """The orders service over HTTP: a real uvicorn server on 127.0.0.1:0."""
    app = Starlette(routes=[Route("/orders/{order}", read_order)])
    app.add_middleware(MandateMiddleware, verifier=verifier, to_request=orders_request)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="orders", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the orders service did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


PAYMENTS_SERVICE = "demo.Payments"
REFUND_RPC = f"/{PAYMENTS_SERVICE}/Refund"


def payments_request(method: str, message: Any) -> Request:
    """Refund {order, amount} → post on api/payments/refunds/{order} for that amount."""
    if method != REFUND_RPC:
        raise ValueError(f"no Mandate mapping for {method}")
    return Request(f"api/payments/refunds/{message['order']}", "post",
                   {"amount": message["amount"]})


def _refund(message: Any, context: Any) -> dict[str, Any]:
    return {"refunded": message["amount"], "order": message["order"],
            "by": current_decision().subject}


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj).encode()


@contextlib.contextmanager
def payments_service(verifier: Verifier) -> Iterator[str]:
    """The payments API over gRPC: a real server on 127.0.0.1:0 (JSON messages)."""
    server = grpc.server(futures.ThreadPoolExecutor(4), options=METADATA_OPTIONS,
                         interceptors=[MandateServerInterceptor(verifier, payments_request)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        PAYMENTS_SERVICE, {"Refund": grpc.unary_unary_rpc_method_handler(
            _refund, request_deserializer=json.loads, response_serializer=_json_bytes)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=2).wait()


def refund_call(target: str, message: dict[str, Any], metadata: Any) -> dict[str, Any]:
    with grpc.insecure_channel(target, options=METADATA_OPTIONS) as channel:
        call = channel.unary_unary(REFUND_RPC, request_serializer=_json_bytes,
                                   response_deserializer=json.loads)
        result: dict[str, Any] = call(message, metadata=metadata, timeout=10)
        return result


# --- the orchestrator's side: a Delegate client with its certificate -----------------

class Orchestrator:
    def __init__(self, site: Path, port: int) -> None:
        pki = site / "pki"
        creds = grpc.ssl_channel_credentials(
            root_certificates=(pki / "ca.pem").read_bytes(),
            private_key=(pki / "orchestrator.key").read_bytes(),
            certificate_chain=(pki / "orchestrator.pem").read_bytes(),
        )
        self.target = f"127.0.0.1:{port}"
        self.channel = grpc.secure_channel(self.target, creds)
        self.stub = pb_grpc.SignerStub(self.channel)

    def delegate(self, holder: Holder, *, sub: str, cap: dict[str, Any], ttl: int, aud: str,
                 dpt: int = 0, use: int | None = None) -> pb.DelegateResponse:
        jwk = holder.public_jwk
        request = pb.DelegateRequest(
            sub=sub, caps=[cap_to_proto(cap)], ttl_seconds=ttl, aud=[aud], dpt=dpt,
            idempotency_key=str(uuid.uuid4()),
            holder_jwk=pb.Jwk(kty=jwk["kty"], crv=jwk["crv"], x=jwk["x"], y=jwk.get("y", "")),
        )
        if use is not None:
            request.use = use
        reply: pb.DelegateResponse = self.stub.Delegate(request, timeout=10)
        return reply

    def revocation_list(self) -> str:
        return str(self.stub.GetRevocationList(pb.GetRevocationListRequest(), timeout=10).token)

    def bundle(self) -> TrustBundle:
        reply = self.stub.GetTrustBundle(pb.GetTrustBundleRequest(), timeout=10)
        return TrustBundle.from_jwks(reply.jwks)


# --- the story ------------------------------------------------------------------------

def http_outcome(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "200"
    body = response.json()
    return f"{response.status_code} {body['error']}: {body['message']}"


def main() -> int:
    story = Story()
    with tempfile.TemporaryDirectory(prefix="mandate-demo-") as tmp:
        site = Path(tmp) / "signer"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.pop("SOFTHSM2_CONF", None)

        story.step("Provision: a SoftHSM2 token, a root key generated inside it, "
                   "a development CA and mTLS certificates")
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "provision.py"),
                               str(site), "--port", "0"], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        if done.returncode != 0:
            print(done.stdout + done.stderr)
            return 1
        env["SOFTHSM2_CONF"] = str(site / "hsm" / "softhsm2.conf")
        print(run_mandate("keys", "list", "-c", str(site / "signer.toml"), env=env).stdout,
              end="")

        with signer_daemon(site, env) as port:
            story.step(f"The signer daemon is up on 127.0.0.1:{port} (mutual TLS)")
            orchestrator = Orchestrator(site, port)
            bundle = orchestrator.bundle()
            orders_verifier = Verifier(bundle, audience=ORDERS, leeway=1)
            payments_verifier = Verifier(bundle, audience=PAYMENTS, leeway=1,
                                         require_revocations=True)
            refresher = RevocationRefresher(payments_verifier, orchestrator.revocation_list,
                                            interval_s=0.5)
            with orders_service(orders_verifier) as orders_url, \
                    payments_service(payments_verifier) as payments_target, refresher:
                play(story, site, env, orchestrator, orders_url=orders_url,
                     payments_target=payments_target, refresher=refresher)
            orchestrator.channel.close()

        story.step("The audit trail of this run, and its verification")
        log = str(site / "state" / "audit.db")
        for line in run_mandate("audit", "show", "--log", log, env=env).stdout.splitlines():
            record = json.loads(line)
            print(f"  #{record['seq']:<3} {record['event']:8} {record['decision']:6} "
                  f"{record['reason'] or '':26} {record['sub'] or ''}")
        verify = run_mandate("audit", "verify", "--log", log, "--bundle",
                             str(site / "bundle.json"), env=env)
        story.check(verify.returncode == 0, "mandate audit verify", verify.stdout.strip())

    print("\nall steps behaved as shown" if not story.failures
          else f"\n{story.failures} step(s) misbehaved")
    return 1 if story.failures else 0


def play(story: Story, site: Path, env: dict[str, str], orchestrator: Orchestrator, *,
         orders_url: str, payments_target: str, refresher: RevocationRefresher) -> None:
    support, reporter, refund_agent, thief = (Holder.generate() for _ in range(4))

    story.step("1. The orchestrator asks the daemon: the support agent may select "
               "customer 42's orders, 2 minutes, depth 1")
    granted = orchestrator.delegate(
        support, sub="agent:support/7", ttl=120, aud=ORDERS, dpt=1,
        cap={"res": "db/orders/**", "act": ["select"], "if": {"customer": {"eq": 42}}})
    story.check(bool(granted.chain), f"signed in the HSM by {granted.kid}, jti {granted.jti}")

    story.step("2. The support agent narrows it offline for a reporting helper: "
               "order o-123 only, 30 s")
    reporting = support.attenuate(
        granted.chain, sub="agent:support/7/reporter", holder_jwk=reporter.public_jwk,
        cap=[{"res": "db/orders/o-123", "act": ["select"], "if": {"customer": {"eq": 42}}}],
        ttl=30, dpt=0, aud=[ORDERS])
    inspect = run_mandate("inspect", reporting, env=env)
    print("\n".join("     " + line for line in inspect.stdout.splitlines()))

    story.step("3. The orders service (HTTP) checks every call")
    reporter_client = httpx.Client(base_url=orders_url, timeout=10,
                                   auth=MandateAuth(reporter, reporting, orders_request,
                                                    aud=ORDERS))
    support_client = httpx.Client(base_url=orders_url, timeout=10,
                                  auth=MandateAuth(support, granted.chain, orders_request,
                                                   aud=ORDERS))
    with reporter_client, support_client:
        answer = reporter_client.get("/orders/o-123", params={"customer": 42})
        story.check(answer.status_code == 200, "reporter reads order o-123",
                    json.dumps(answer.json()))
        answer = support_client.get("/orders/o-777", params={"customer": 42})
        story.check(answer.status_code == 200, "support agent reads another order of customer 42")
        answer = reporter_client.get("/orders/o-124", params={"customer": 42})
        story.check(answer.status_code == 403, "reporter reads order o-124: refused",
                    http_outcome(answer))
        answer = support_client.get("/orders/o-555", params={"customer": 43})
        story.check(answer.status_code == 403, "another customer: refused", http_outcome(answer))
        # The thief has the chain, not the reporter's key: its PoP is signed with its own.
        wanted = Request("db/orders/o-123", "select", {"customer": 42})
        leaf_hash = sha256_b64(reporting.rsplit("~", 1)[1].encode())
        forged = make_pop(alg=thief.alg, sign=thief.sign, leaf_hash=leaf_hash, request=wanted,
                          aud=ORDERS, iat=int(time.time()), jti=new_jti())
        answer = httpx.get(f"{orders_url}/orders/o-123", params={"customer": 42}, timeout=10,
                           headers={"Authorization": f"Mandate {reporting}",
                                    "Mandate-PoP": forged})
        story.check(answer.status_code == 401,
                    "a stolen chain without the holder's key: refused", http_outcome(answer))

    story.step("4. After analysis the orchestrator asks for a refund credential: one post "
               "to the refund API, order o-123, exactly 4999")
    refund = orchestrator.delegate(
        refund_agent, sub="agent:support/7/refunds", ttl=60, aud=PAYMENTS, use=1,
        cap={"res": "api/payments/refunds/o-123", "act": ["post"],
             "if": {"amount": {"eq": 4999}}})
    story.check(bool(refund.chain), f"signed, jti {refund.jti}, use = 1")

    def pay(amount: int, holder: Holder = refund_agent) -> str:
        message = {"order": "o-123", "amount": amount}
        request = payments_request(REFUND_RPC, message)
        try:
            reply = refund_call(payments_target, message,
                                mandate_metadata(holder, refund.chain, request, aud=PAYMENTS))
        except grpc.RpcError as error:
            refusal = refusal_of(error)
            return f"{error.code().name} {refusal.code if refusal else ''}: " \
                   f"{refusal.message if refusal else error.details()}"
        return f"OK {json.dumps(reply)}"

    story.step("5. The payments API (gRPC) checks every call")
    outcome = pay(4999)
    story.check(outcome.startswith("OK"), "refund 49.99 on o-123", outcome)
    outcome = pay(4999)
    story.check("uses_exhausted" in outcome, "a second refund: refused", outcome)
    outcome = pay(5000)
    story.check("denied" in outcome, "a wider amount: refused", outcome)

    story.step("6. The daemon refuses what its policy does not allow")
    try:
        orchestrator.delegate(thief, sub="agent:support/7", ttl=60, aud=PAYMENTS, use=1,
                              cap={"res": "api/payments/refunds/o-123", "act": ["post"],
                                   "if": {"amount": {"eq": 9999}}})
        story.check(False, "a refund of 99.99 was signed")
    except grpc.RpcError as error:
        story.check(error.code() == grpc.StatusCode.PERMISSION_DENIED,
                    "a refund of 99.99 (over the ceiling): refused", str(error.details()))

    story.step("7. Revocation: `mandate revoke` at the daemon; services pick up the list")
    fresh = orchestrator.delegate(
        refund_agent, sub="agent:support/7/refunds", ttl=60, aud=PAYMENTS, use=1,
        cap={"res": "api/payments/refunds/o-123", "act": ["post"],
             "if": {"amount": {"eq": 4999}}})
    refund = fresh
    pki = site / "pki"
    revoked = run_mandate("revoke", "--server", orchestrator.target,
                          "--ca", str(pki / "ca.pem"), "--cert", str(pki / "orchestrator.pem"),
                          "--key", str(pki / "orchestrator.key"), fresh.jti,
                          "--reason", "demo", env=env)
    story.check(revoked.returncode == 0, "mandate revoke " + fresh.jti, revoked.stdout.strip())
    deadline = time.monotonic() + 10
    while refresher.seq is None or refresher.seq < 1:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    outcome = pay(4999)
    story.check("revoked" in outcome, "the revoked credential: refused", outcome)

    story.step("8. Time passes: a 2-second credential expires")
    short = orchestrator.delegate(
        support, sub="agent:support/8", ttl=2, aud=ORDERS, dpt=0,
        cap={"res": "db/orders/**", "act": ["select"], "if": {"customer": {"eq": 42}}})
    with httpx.Client(base_url=orders_url, timeout=10,
                      auth=MandateAuth(support, short.chain, orders_request,
                                       aud=ORDERS)) as client:
        answer = client.get("/orders/o-123", params={"customer": 42})
        story.check(answer.status_code == 200, "while it is valid")
        time.sleep(3.2)  # 2 s of life + the orders service's 1 s leeway
        answer = client.get("/orders/o-123", params={"customer": 42})
        story.check(answer.status_code == 401, "3 seconds later: refused", http_outcome(answer))

    story.step("The refund chain, as `mandate inspect` draws it")
    print("\n".join("     " + line for line in
                    run_mandate("inspect", refund.chain, env=env).stdout.splitlines()))


if __name__ == "__main__":
    sys.exit(main())
