"""The gRPC integration against a real server on 127.0.0.1:0: the server
interceptor verifies, refuses with the right status and reason, and hands the
Decision to the handler; the client interceptor sends chain and PoP."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from helpers import AUD, NOW, ROOT_KID, World, pop_for

from verifier_sdk import Holder, Request, Verifier, decode_unverified, make_revocation_list
from verifier_sdk.integrations import KIND_OF, Refusal
from verifier_sdk.integrations.grpc import (
    METADATA_OPTIONS,
    MandateClientInterceptor,
    MandateServerInterceptor,
    current_decision,
    mandate_metadata,
    refusal_of,
)

SERVICE = "payments.Payments"
REFUND_RPC = f"/{SERVICE}/Refund"
LOOKUP_RPC = f"/{SERVICE}/Lookup"  # maps to act "get": no chain here allows it
WATCH_RPC = f"/{SERVICE}/Watch"  # server streaming
PING_RPC = f"/{SERVICE}/Ping"  # exempt
TIMEOUT_S = 5


def to_request(method: str, message: Any) -> Request:
    """The service's (and the agent's) mapping of a call to a Mandate request."""
    res = f"api/payments/refunds/{message['order']}"
    if method in (REFUND_RPC, WATCH_RPC):
        return Request(res, "post", {"amount": message["amount"]})
    if method == LOOKUP_RPC:
        return Request(res, "get")
    raise ValueError(f"no Mandate mapping for {method}")


def _seen(message: Any) -> dict[str, Any]:
    decision = current_decision()
    return {"order": message["order"], "subject": decision.subject,
            "principals": list(decision.principals), "res": decision.request.res}


def _watch(message: Any, context: Any) -> Iterator[dict[str, Any]]:
    for i in range(3):
        yield {**_seen(message), "i": i}


def _ping(message: Any, context: Any) -> dict[str, Any]:
    try:
        current_decision()
    except RuntimeError:
        return {"decision": None}
    return {"decision": "leaked"}


def _encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _handlers() -> grpc.GenericRpcHandler:
    codec = {"request_deserializer": json.loads, "response_serializer": _encode}
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Refund": grpc.unary_unary_rpc_method_handler(lambda m, c: _seen(m), **codec),
        "Lookup": grpc.unary_unary_rpc_method_handler(lambda m, c: _seen(m), **codec),
        "Watch": grpc.unary_stream_rpc_method_handler(_watch, **codec),
        "Ping": grpc.unary_unary_rpc_method_handler(_ping, **codec),
    })


@contextmanager
def serving(verifier: Verifier, options: Any = METADATA_OPTIONS) -> Iterator[str]:
    """A real gRPC server on loopback with the interceptor; yields its address."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=4), options=options,
        interceptors=[MandateServerInterceptor(verifier, to_request, exempt_methods=[PING_RPC])],
    )
    server.add_generic_rpc_handlers([_handlers()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(TIMEOUT_S)


@contextmanager
def channel(address: str, *interceptors: Any,
            options: Any = METADATA_OPTIONS) -> Iterator[grpc.Channel]:
    plain = grpc.insecure_channel(address, options=options)
    try:
        yield grpc.intercept_channel(plain, *interceptors) if interceptors else plain
    finally:
        plain.close()


def call(ch: grpc.Channel, method: str, message: Any,
         metadata: Any = None) -> Any:
    stub = ch.unary_unary(method, request_serializer=_encode, response_deserializer=json.loads)
    return stub(message, metadata=metadata, timeout=TIMEOUT_S)


def refused(ch: grpc.Channel, method: str, message: Any,
            metadata: Any = None) -> tuple[grpc.StatusCode, Refusal]:
    with pytest.raises(grpc.RpcError) as info:
        call(ch, method, message, metadata)
    refusal = refusal_of(info.value)
    assert refusal is not None, info.value
    assert info.value.details() == f"{refusal.code}: {refusal.message}"
    return info.value.code(), refusal


def agent(world: World, chain: str, holder: Holder | None = None) -> MandateClientInterceptor:
    return MandateClientInterceptor(holder or world.c, chain, to_request, aud=AUD,
                                    clock=world.clock)


ORDER = {"order": "o-123", "amount": 4999}


@pytest.fixture
def address(world: World) -> Iterator[str]:
    with serving(world.verifier()) as addr:
        yield addr


def test_allowed_call_reaches_the_handler_with_its_decision(world: World, address: str) -> None:
    with channel(address, agent(world, world.chain3())) as ch:
        seen = call(ch, REFUND_RPC, ORDER)
    assert seen == {
        "order": "o-123", "subject": "agent:helper",
        "principals": ["spiffe://acme.example/orchestrator", "agent:support",
                       "agent:refund", "agent:helper"],
        "res": "api/payments/refunds/o-123",
    }


def test_server_streaming_handler_sees_the_decision_on_every_message(
        world: World, address: str) -> None:
    with channel(address, agent(world, world.chain3())) as ch:
        stub = ch.unary_stream(WATCH_RPC, request_serializer=_encode,
                               response_deserializer=json.loads)
        seen = list(stub(ORDER, timeout=TIMEOUT_S))
    assert [m["i"] for m in seen] == [0, 1, 2]
    assert {m["subject"] for m in seen} == {"agent:helper"}


@pytest.mark.parametrize(("message", "status", "code"), [
    (ORDER, grpc.StatusCode.UNAUTHENTICATED, "missing_credentials"),
    ({"order": "o-999", "amount": 1}, grpc.StatusCode.PERMISSION_DENIED, "denied"),
], ids=["no credentials", "other order"])
def test_server_streaming_call_is_verified_before_its_first_message(
        world: World, address: str, message: dict[str, Any], status: grpc.StatusCode,
        code: str) -> None:
    interceptors = () if code == "missing_credentials" else (agent(world, world.chain3()),)
    with channel(address, *interceptors) as ch:
        stub = ch.unary_stream(WATCH_RPC, request_serializer=_encode,
                               response_deserializer=json.loads)
        with pytest.raises(grpc.RpcError) as info:
            list(stub(message, timeout=TIMEOUT_S))
    refusal = refusal_of(info.value)
    assert (info.value.code(), refusal and refusal.code) == (status, code)


def test_exempt_method_passes_without_credentials_and_without_a_decision(
        address: str) -> None:
    with channel(address) as ch:
        assert call(ch, PING_RPC, {}) == {"decision": None}


def test_current_decision_outside_a_call_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no verified Mandate call"):
        current_decision()


# One row per refusal a caller can provoke with a single call: what it sends,
# the status, and the reason the interceptor gives.
Build = Callable[[World, str], tuple[str, dict[str, Any], list[tuple[str, str]]]]


def _with(world: World, chain: str, *, message: dict[str, Any] = ORDER, method: str = REFUND_RPC,
          holder: Holder | None = None, proved: dict[str, Any] | None = None,
          ) -> tuple[str, dict[str, Any], list[tuple[str, str]]]:
    """A call whose PoP ``holder`` made for ``proved`` (default: what is sent)."""
    pop = pop_for(world, chain, holder, to_request(method, proved or message))
    return method, message, [("mandate-chain", chain), ("mandate-pop", pop)]


Expected = tuple[grpc.StatusCode, str, int | None]  # status, refusal code, link
REFUSALS: list[tuple[str, Build, grpc.StatusCode, str, int | None]] = [
    ("no credentials", lambda w, c: (REFUND_RPC, ORDER, []),
     grpc.StatusCode.UNAUTHENTICATED, "missing_credentials", None),
    ("no PoP", lambda w, c: (REFUND_RPC, ORDER, [("mandate-chain", c)]),
     grpc.StatusCode.UNAUTHENTICATED, "pop_invalid", None),
    ("chain sent twice", lambda w, c: (REFUND_RPC, ORDER, [*_with(w, c)[2],
                                                           ("mandate-chain", c)]),
     grpc.StatusCode.UNAUTHENTICATED, "malformed", None),
    ("garbage chain", lambda w, c: (REFUND_RPC, ORDER, [("mandate-chain", "a.b.c"),
                                                        ("mandate-pop", "x.y.z")]),
     grpc.StatusCode.UNAUTHENTICATED, "malformed", 0),
    ("stolen chain, thief's key", lambda w, c: _with(w, c, holder=Holder.generate()),
     grpc.StatusCode.UNAUTHENTICATED, "pop_invalid", None),
    ("PoP made for a smaller amount",
     lambda w, c: _with(w, c, proved={"order": "o-123", "amount": 1}),
     grpc.StatusCode.UNAUTHENTICATED, "pop_invalid", None),
    ("other order", lambda w, c: _with(w, c, message={"order": "o-999", "amount": 10}),
     grpc.StatusCode.PERMISSION_DENIED, "denied", 1),
    ("wider amount", lambda w, c: _with(w, c, message={"order": "o-123", "amount": 5001}),
     grpc.StatusCode.PERMISSION_DENIED, "denied", 0),
    ("other method", lambda w, c: _with(w, c, method=LOOKUP_RPC),
     grpc.StatusCode.PERMISSION_DENIED, "denied", 0),
    ("another service's chain",
     lambda w, c: _with(w, w.issue(aud=["orders-api"])),
     grpc.StatusCode.PERMISSION_DENIED, "audience", 0),
    ("unmappable call", lambda w, c: (REFUND_RPC, {"order": "..", "amount": 1},
                                      [("mandate-chain", c), ("mandate-pop", "x")]),
     grpc.StatusCode.INVALID_ARGUMENT, "bad_request", None),
    ("message without the amount", lambda w, c: (REFUND_RPC, {"order": "o-123"},
                                                 [("mandate-chain", c), ("mandate-pop", "x")]),
     grpc.StatusCode.INVALID_ARGUMENT, "bad_request", None),
]


@pytest.mark.parametrize(("build", "expected"), [(row[1], row[2:]) for row in REFUSALS],
                         ids=[row[0] for row in REFUSALS])
def test_refusals(world: World, address: str, build: Build, expected: Expected) -> None:
    method, message, metadata = build(world, world.chain3())
    with channel(address) as ch:
        status, refusal = refused(ch, method, message, metadata)
    assert (status, refusal.code, refusal.link) == expected
    assert refusal.kind == KIND_OF[refusal.code]


def test_denial_names_the_nearest_capability(world: World, address: str) -> None:
    with channel(address, agent(world, world.chain3())) as ch:
        _, refusal = refused(ch, REFUND_RPC, {"order": "o-999", "amount": 10})
    assert refusal.message.startswith("link 1 (agent:support → agent:refund): ")
    assert "nearest: api/payments/refunds/o-123 post" in refusal.message


def test_replayed_pop_is_unauthenticated(world: World, address: str) -> None:
    metadata = mandate_metadata(world.c, world.chain3(), to_request(REFUND_RPC, ORDER),
                                aud=AUD, now=world.now)
    with channel(address) as ch:
        assert call(ch, REFUND_RPC, ORDER, metadata)["subject"] == "agent:helper"
        status, refusal = refused(ch, REFUND_RPC, ORDER, metadata)
    assert (status, refusal.code) == (grpc.StatusCode.UNAUTHENTICATED, "replayed")


def test_client_interceptor_makes_a_fresh_pop_per_call(world: World, address: str) -> None:
    """The same call twice: no replay, since each carries its own PoP."""
    with channel(address, agent(world, world.chain3())) as ch:
        assert call(ch, REFUND_RPC, ORDER) == call(ch, REFUND_RPC, ORDER)


def test_single_use_chain_is_exhausted_on_the_second_call(world: World, address: str) -> None:
    with channel(address, agent(world, world.chain3(use=1))) as ch:
        call(ch, REFUND_RPC, ORDER)
        status, refusal = refused(ch, REFUND_RPC, ORDER)
    assert (status, refusal.code, refusal.link) == (
        grpc.StatusCode.PERMISSION_DENIED, "uses_exhausted", 2)


def _revocation_list(world: World, seq: int, revoked: list[str]) -> str:
    return make_revocation_list(alg=world.root.alg, kid=ROOT_KID, sign=world.root.sign,
                                iss="spiffe://acme.example/revoker", seq=seq, iat=NOW - 60,
                                exp=NOW + 3600, revoked=revoked)


def test_revoked_chain_is_permission_denied(world: World) -> None:
    verifier = world.verifier()
    chain = world.chain3()
    verifier.update_revocations(_revocation_list(world, 1, ["unrelated-jti-000001"]))
    with serving(verifier) as addr, channel(addr, agent(world, chain)) as ch:
        call(ch, REFUND_RPC, ORDER)
        root_jti = decode_unverified(chain)[0][1]["jti"]
        verifier.update_revocations(_revocation_list(world, 2, [root_jti]))
        status, refusal = refused(ch, REFUND_RPC, ORDER)
    assert (status, refusal.code, refusal.link) == (
        grpc.StatusCode.PERMISSION_DENIED, "revoked", 0)


def test_stale_revocations_make_the_service_unavailable(world: World) -> None:
    verifier = world.verifier(require_revocations=True)
    with serving(verifier) as addr, channel(addr, agent(world, world.chain3())) as ch:
        status, refusal = refused(ch, REFUND_RPC, ORDER)
    assert (status, refusal.code) == (grpc.StatusCode.UNAVAILABLE, "revocation_stale")


def test_refusal_of_ignores_other_errors(address: str) -> None:
    with channel(address) as ch, pytest.raises(grpc.RpcError) as info:
        call(ch, f"/{SERVICE}/NoSuchMethod", {})
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert refusal_of(info.value) is None


def _long_chain(world: World) -> str:
    """Three links of about 7 KiB each: over gRPC's default metadata limits."""
    filler = [{"res": f"db/filler/{i:03d}/" + "x" * 60, "act": ["select"]} for i in range(50)]
    cap = [{"res": "api/payments/refunds/o-123", "act": ["post"]}, *filler]
    chain = world.issue(cap=cap)
    chain = world.a.attenuate(chain, sub="agent:refund", holder_jwk=world.b.public_jwk,
                              cap=cap, ttl=300, dpt=1, now=world.now - 5)
    return world.b.attenuate(chain, sub="agent:helper", holder_jwk=world.c.public_jwk,
                             cap=cap, ttl=120, now=world.now - 1)


def test_long_chain_needs_metadata_options(world: World) -> None:
    chain = _long_chain(world)
    assert len(chain) > 20_000
    verifier = world.verifier()
    with serving(verifier) as addr, channel(addr, agent(world, chain)) as ch:
        assert call(ch, REFUND_RPC, ORDER)["subject"] == "agent:helper"
    with serving(verifier, options=()) as addr, \
            channel(addr, agent(world, chain), options=()) as ch, \
            pytest.raises(grpc.RpcError) as info:
        call(ch, REFUND_RPC, ORDER)
    # gRPC's own metadata limit, before the interceptor runs.
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refusal_of(info.value) is None
