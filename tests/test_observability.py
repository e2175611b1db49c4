"""Observability: Prometheus metrics on their own port and JSON log lines,
against a real daemon (SoftHSM2 token, mutual TLS on 127.0.0.1:0) and a real
``mandate serve``; secrets never appear in either."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hsm_fixtures import SO_PIN, SoftHsm
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_cli import CONFIG, Server, delegate, make_site
from test_cli import SO_PIN as CLI_SO_PIN
from test_cli import USER_PIN as CLI_USER_PIN
from test_server import ORCH, Env, delegate_request, denial_reason, start_daemon

from signer._devpki import DevCA
from signer._errors import ConfigError, Unavailable
from signer._logging import JsonFormatter, configure_logging
from signer._metrics import Metrics, parse_listen
from signer._proto.mandate.v1 import signer_pb2 as pb
from verifier_sdk import Holder

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def scrape(port: int) -> tuple[str, Samples]:
    """GET /metrics: the text and every sample by (name, labels)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        reply = conn.getresponse()
        assert reply.status == 200
        text = reply.read().decode()
    finally:
        conn.close()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Everything logged anywhere (DEBUG and up), as the daemon's JSON lines."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture
def metered(hsm: SoftHsm, tmp_path: Path, json_log: io.StringIO) -> Iterator[Env]:
    running = start_daemon(hsm, tmp_path, DevCA(), metrics_listen="127.0.0.1:0")
    try:
        yield running
    finally:
        running.daemon.stop(grace=1)


def entries(log: io.StringIO) -> list[dict[str, Any]]:
    """Each line one JSON object: the format's whole promise."""
    return [json.loads(line) for line in log.getvalue().splitlines()]


# --- metrics ---------------------------------------------------------------------------

def _allowed_denied_bad(env: Env) -> pb.DelegateResponse:
    stub = env.stub()
    reply: pb.DelegateResponse = stub.Delegate(delegate_request(Holder.generate()), timeout=10)
    with pytest.raises(grpc.RpcError) as denied:
        stub.Delegate(delegate_request(Holder.generate(), ttl_seconds=3600), timeout=10)
    assert denial_reason(denied.value) == "ttl_exceeds_max"
    with pytest.raises(grpc.RpcError) as bad:
        stub.Delegate(delegate_request(Holder.generate(), ttl_seconds=0), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return reply


def test_rpcs_denials_hsm_and_audit_are_counted_by_their_labels(metered: Env) -> None:
    daemon = metered.daemon
    assert daemon.metrics_port not in (0, daemon.port)
    reply = _allowed_denied_bad(metered)
    text, samples = scrape(daemon.metrics_port)

    for code in ("OK", "PERMISSION_DENIED", "INVALID_ARGUMENT"):
        labels = {"method": "Delegate", "code": code}
        assert value(samples, "mandate_rpc_requests_total", **labels) == 1, code
        assert value(samples, "mandate_rpc_duration_seconds_count", **labels) == 1, code
        assert value(samples, "mandate_rpc_duration_seconds_bucket", le="+Inf", **labels) == 1
        assert value(samples, "mandate_rpc_duration_seconds_sum", **labels) > 0
    assert value(samples, "mandate_rpc_requests_total", method="Delegate",
                 code="UNAVAILABLE") == 0
    assert value(samples, "mandate_rpc_in_flight", method="Delegate") == 0
    assert value(samples, "mandate_policy_denials_total", reason="ttl_exceeds_max") == 1
    # One signature for the link (checkpoints may add more), all in the HSM.
    assert value(samples, "mandate_hsm_sign_duration_seconds_count", alg="EdDSA") >= 1
    assert value(samples, "mandate_hsm_sign_errors_total", alg="EdDSA",
                 error="Unavailable") == 0
    # The allowed link and the denial were each made durable once before the answer.
    for event in ("delegate", "deny"):
        assert value(samples, "mandate_audit_commit_duration_seconds_count", event=event) == 1
    assert value(samples, "mandate_hsm_up") == 1
    # No unbounded or identifying label values: no caller, subject or jti.
    for unbounded in (ORCH, "agent:support", reply.jti):
        assert unbounded not in text


def test_a_failing_hsm_counts_a_sign_error_and_an_unavailable_rpc(metered: Env) -> None:
    daemon = metered.daemon
    inner = daemon.keys.signer(daemon.issuer.keyring()[0].kid)  # under the metered wrapper

    def token_gone(data: bytes) -> bytes:
        raise Unavailable("token not present")

    inner.sign = token_gone
    try:
        with pytest.raises(grpc.RpcError) as err:
            metered.stub().Delegate(delegate_request(Holder.generate()), timeout=10)
    finally:
        del inner.sign  # back to the class's method
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    _, samples = scrape(daemon.metrics_port)
    assert value(samples, "mandate_hsm_sign_errors_total", alg="EdDSA",
                 error="Unavailable") == 1
    assert value(samples, "mandate_rpc_requests_total", method="Delegate",
                 code="UNAVAILABLE") == 1


def test_the_hsm_gauge_is_read_at_each_scrape() -> None:
    metrics, healthy = Metrics(), [True]
    metrics.watch_hsm(lambda: healthy[0])
    assert b"mandate_hsm_up 1.0" in generate_latest(metrics.registry)
    healthy[0] = False
    assert b"mandate_hsm_up 0.0" in generate_latest(metrics.registry)


def test_the_metrics_endpoint_closes_with_the_daemon(hsm: SoftHsm, tmp_path: Path) -> None:
    running = start_daemon(hsm, tmp_path, DevCA(), metrics_listen="127.0.0.1:0")
    port = running.daemon.metrics_port
    scrape(port)
    running.daemon.stop(grace=1)
    with pytest.raises(ConnectionRefusedError):
        scrape(port)


def test_without_metrics_listen_nothing_is_served_or_wrapped(hsm: SoftHsm,
                                                              tmp_path: Path) -> None:
    running = start_daemon(hsm, tmp_path, DevCA())
    try:
        daemon = running.daemon
        assert daemon.metrics is None
        assert daemon.metrics_port == 0
        kid = daemon.issuer.keyring()[0].kid
        assert daemon.issuer.signer(kid) is daemon.keys.signer(kid)
    finally:
        running.daemon.stop(grace=1)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:0", ("::1", 0)),
     ("localhost:0", ("localhost", 0))],
    ids=["v4", "v6", "name"],
)
def test_metrics_listen_is_host_and_port(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(
    "listen", ["9464", ":9464", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:65536"],
    ids=["no-host", "empty-host", "no-port", "named-port", "port-too-big"],
)
def test_a_malformed_metrics_listen_is_a_config_error(listen: str) -> None:
    with pytest.raises(ConfigError, match="metrics_listen"):
        parse_listen(listen)


# --- structured logs ---------------------------------------------------------------------

def test_decisions_are_json_lines_with_their_fields_and_no_secret(
        metered: Env, json_log: io.StringIO) -> None:
    pin = os.environ["MANDATE_TEST_HSM_PIN"]  # what start_daemon logged in with
    reply = _allowed_denied_bad(metered)
    metered.stub(ORCH).Revoke(pb.RevokeRequest(jti=[reply.jti], reason="test"), timeout=10)
    metered.daemon.stop(grace=1)
    lines = entries(json_log)
    for entry in lines:
        assert {"time", "level", "logger", "message"} <= set(entry)
        assert TIME.fullmatch(entry["time"])

    (allowed,) = [e for e in lines if e.get("decision") == "allow"]
    assert allowed["level"] == "DEBUG"  # INFO would be a line per call: see docs/operations.md
    assert allowed["logger"] == "mandate.signer"
    assert {k: allowed[k] for k in ("caller", "sub", "jti", "kid", "method", "code")} == {
        "caller": ORCH, "sub": "agent:support/refund-7", "jti": reply.jti,
        "kid": reply.kid, "method": "Delegate", "code": "OK"}
    assert isinstance(allowed["duration_ms"], float)
    assert allowed["duration_ms"] > 0
    (denied,) = [e for e in lines if e.get("decision") == "deny"]
    assert {k: denied[k] for k in ("caller", "reason", "method", "code")} == {
        "caller": ORCH, "reason": "ttl_exceeds_max", "method": "Delegate",
        "code": "PERMISSION_DENIED"}
    (revoked,) = [e for e in lines if e.get("method") == "Revoke"]
    assert revoked["jti"] == [reply.jti]
    assert revoked["caller"] == ORCH

    text = json_log.getvalue()
    for secret in (pin, SO_PIN, reply.chain, "PRIVATE KEY"):
        assert secret not in text


def test_a_server_side_failure_is_logged_with_method_code_and_duration(
        metered: Env, json_log: io.StringIO) -> None:
    daemon = metered.daemon
    inner = daemon.keys.signer(daemon.issuer.keyring()[0].kid)

    def token_gone(data: bytes) -> bytes:
        raise Unavailable("token not present")

    inner.sign = token_gone
    try:
        with pytest.raises(grpc.RpcError):
            metered.stub().Delegate(delegate_request(Holder.generate()), timeout=10)
    finally:
        del inner.sign
    (failed,) = [e for e in entries(json_log) if e.get("code") == "UNAVAILABLE"]
    assert failed["level"] == "WARNING"
    assert failed["method"] == "Delegate"
    assert failed["duration_ms"] >= 0


def _record(msg: str, **extra: Any) -> logging.LogRecord:
    return logging.getLogger("mandate.test").makeRecord(
        "mandate.test", logging.INFO, __file__, 1, msg, (), None, extra=extra)


def test_the_json_formatter_keeps_one_line_and_redacts_secret_named_fields() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        exc_info = sys.exc_info()
    record = _record("two\nlines", caller="c", pin="1234", so_pin="5678", jti="j")
    record.exc_info = exc_info
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "two\nlines"
    assert entry["caller"] == "c"
    assert entry["jti"] == "j"
    assert entry["pin"] == entry["so_pin"] == "[redacted]"
    assert "1234" not in line
    assert "5678" not in line
    assert "ValueError: boom" in entry["exc"]


def test_a_value_json_cannot_encode_is_written_as_text() -> None:
    entry = json.loads(JsonFormatter().format(_record("x", path=Path("/tmp/a"))))  # noqa: S108
    assert entry["path"] == "/tmp/a"  # noqa: S108


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_configure_logging_replaces_the_root_handlers(log_format: str) -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    out = io.StringIO()
    try:
        configure_logging(log_format, stream=out)
        logging.getLogger("mandate.signer").info("hello", extra={"caller": "c"})
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    line = out.getvalue().strip()
    if log_format == "json":
        assert json.loads(line)["caller"] == "c"
    else:
        assert line.endswith(" INFO mandate.signer: hello")


def test_an_unknown_log_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="log_format"):
        configure_logging("yaml")


# --- `mandate serve` ---------------------------------------------------------------------

@pytest.mark.parametrize("log_format", ["json", "text"])
def test_serve_logs_in_the_configured_format_and_serves_metrics(
        tmp_path: Path, log_format: str) -> None:
    site = make_site(tmp_path)
    (site.root / "signer.toml").write_text(CONFIG.replace(
        "shutdown_grace_s = 2.0",
        f'shutdown_grace_s = 2.0\nmetrics_listen = "127.0.0.1:0"\nlog_format = "{log_format}"',
    ))
    with Server(site) as server:
        done = delegate(site, server, Holder.generate())
        assert done.returncode == 0, done.stderr
        denied = delegate(site, server, Holder.generate(), ttl=10**6)
        assert denied.returncode == 1, denied.stderr
        found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics",
                          server.log.read_text())
        assert found, server.log.read_text()
        _, samples = scrape(int(found.group(1)))
        assert value(samples, "mandate_rpc_requests_total", method="Delegate", code="OK") == 1
        assert value(samples, "mandate_hsm_up") == 1
        code, _ = server.terminate()
    text = server.log.read_text()
    assert code == 0, text
    for secret in (CLI_USER_PIN, CLI_SO_PIN):
        assert secret not in text
    # At INFO a denial has its line; an issued link has its audit record only.
    if log_format == "text":
        assert " INFO mandate.signer: deny caller=" in text
        assert "delegate caller=" not in text
        return
    lines = [json.loads(line) for line in text.splitlines()]
    (deny,) = [e for e in lines if e.get("decision") == "deny"]
    assert (deny["caller"], deny["reason"]) == (ORCH, "ttl_exceeds_max")
    assert not [e for e in lines if e.get("decision") == "allow"]
    assert any(e["message"] == "stopped" for e in lines)
