#!/usr/bin/env python3
"""The signer daemon under load, side by side with a bare signing RPC
(docs/performance.md, "Signer").

Two servers, each in its own process with its own SoftHSM2 token (made here
in a temporary directory), both built from the same config: the same
ThreadPoolExecutor size, maximum_concurrent_rpcs, message limits and mutual
TLS on 127.0.0.1.

* daemon: the real ``signer._server.Daemon`` (policy, HSM signing, durable
  audit with group commit, issued-link state), logging as ``mandate serve``
  does. Called: ``mandate.v1.Signer/Delegate``.
* bare: the daemon's own gRPC handlers (``signer._server._handlers``: the
  request read under the server's time cap) around a call that only signs
  the request bytes with the same backend (``open_hsm`` → ``Pkcs11KeyStore``
  → ``Pkcs11KeySigner.sign``) and returns the signature. The request is as
  long as a link's signing input.

Load comes from a separate client process (its own GIL): a closed loop that
keeps 1, 8 or 32 calls in flight on one mTLS channel, for a warm-up and then
for a measured window. Each (server, concurrency) pair runs in ``--rounds``
rounds, the two servers alternating, so that drift hits both alike. Figures
pool the rounds: throughput = calls completed in the windows / window time;
p50/p99 over those calls' latencies (client-side, issue to completion).
Server CPU per call is read from /proc for each run.

After the load: one Delegate link is checked with verifier_sdk, and the
daemon's audit log must hold one ``delegate`` record per successful call.

Run: ``python bench/delegate.py [--seconds N] [--rounds N] [--json FILE] [--issuance inline]``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import os
import platform
import resource
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import grpc
from _report import write_json  # bench/, first on sys.path when run

from signer._devpki import DevCA

CALLER = "spiffe://bench.example/svc/orchestrator"
AUD = "payments-api"
SUB = "agent:bench/refunds-1"
DAEMON_KID = "bench-root-1"
BARE_KID = "bench-bare-1"
PIN_ENV = "MANDATE_BENCH_PIN"
DELEGATE_METHOD = "/mandate.v1.Signer/Delegate"
BARE_SERVICE = "mandate.bench.Bare"
BARE_METHOD = f"/{BARE_SERVICE}/Sign"
CONCURRENCY = (1, 8, 32)
KINDS = ("bare", "daemon")
CALL_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0
REFUND_CAP: dict[str, Any] = {"res": "api/payments/refunds/o-123", "act": ["post"],
              "if": {"amount": {"le": 4999}}}

# DESIGN.md, "Performance targets": Delegate at 8 in flight.
TARGET_RATIO = 0.75
TARGET_P99_MS = 10.0
TARGET_CONCURRENCY = 8

POLICY = f"""
admins = []

[[grant]]
caller = "{CALLER}"
subjects = ["agent:bench/*"]
caps = [
  {{ res = "api/payments/refunds/*", act = ["post"], if = {{ amount = {{ le = 5000 }} }} }},
]
max_ttl = 600
max_dpt = 2
audiences = ["{AUD}"]
"""


# --- PKI: a development CA, the servers' and the client's certificates ---------------


def make_pki(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client
    certificate naming CALLER; returns the PEM files by role."""
    ca = DevCA("Mandate bench CA", valid_for=datetime.timedelta(hours=2))
    files = {"ca": directory / "ca.pem"}
    files["ca"].write_bytes(ca.pem)
    for role, issued in (("server", ca.issue(cn="mandate-bench-server", server=True)),
                         ("client", ca.issue(uri=CALLER))):
        files[f"{role}_cert"], files[f"{role}_key"] = issued.write(directory, role)
        files[f"{role}_key"].chmod(0o600)
    return files


def make_server_dir(base: Path, name: str, pki: dict[str, Path], pin: str) -> Path:
    """A directory with its own SoftHSM2 token, a policy and a signer config."""
    import softhsm

    directory = base / name
    directory.mkdir()
    softhsm.init_token(directory / "hsm", f"bench-{name}", so_pin=secrets.token_hex(8),
                       user_pin=pin)
    (directory / "policy.toml").write_text(POLICY, encoding="utf-8")
    # The [server] section is left at the shipped defaults (workers, limits).
    (directory / "signer.toml").write_text(f"""
[server]
listen = "127.0.0.1:0"
tls_cert = "{pki['server_cert']}"
tls_key = "{pki['server_key']}"
client_ca = "{pki['ca']}"

[hsm]
module = "{softhsm.find_module()}"
token_label = "bench-{name}"
pin_env = "{PIN_ENV}"

[policy]
file = "policy.toml"

[state]
dir = "state"

[revocation]
issuer = "mandate-signer-bench"
""", encoding="utf-8")
    return directory


# --- server process -------------------------------------------------------------------


def start_bare(config: Any) -> tuple[int, Callable[[], None]]:
    """The bare signing RPC on the daemon's server stack; returns (port, stop)."""
    from signer._server import RequestTimer, _handlers, grpc_server, open_hsm
    from signer._service import CallValues, Outcome

    keys = open_hsm(config)
    signer = keys.generate(BARE_KID, "EdDSA")
    cfg = config.server
    server = grpc_server(cfg)
    timer = RequestTimer(cfg.rpc_time_limit_s)

    def sign(method: str, request: bytes, values: CallValues) -> Outcome:
        return signer.sign(request), None

    # The daemon's own handler wrapper: the request read under the server's
    # time cap, the caller's values taken from the call.
    server.add_generic_rpc_handlers(_handlers([f"/{BARE_SERVICE}/Sign"], sign, timer))
    creds = grpc.ssl_server_credentials(
        [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
        root_certificates=Path(cfg.client_ca).read_bytes(), require_client_auth=True,
    )
    port = int(server.add_secure_port(cfg.listen, creds))
    server.start()

    def stop() -> None:
        server.stop(1).wait()
        timer.close()
        keys.token.close()

    return port, stop


def serve_main(args: argparse.Namespace) -> int:
    """A server process: prints {"port": N}, serves until stdin closes or SIGTERM."""
    from signer._config import load_config
    from signer._server import Core, Daemon

    # As `mandate serve` logs (one INFO line per Delegate); stderr goes to a file.
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    config = load_config(Path(args.dir) / "signer.toml")
    if args.kind == "bare":
        port, stop = start_bare(config)
    else:
        config = replace(config, server=replace(config.server, issuance=args.issuance))
        core = Core(config)
        if not core.issuer.keyring():
            core.issuer.add_key(DAEMON_KID, "EdDSA")
        core.close(served=False)
        daemon = Daemon(config)
        port, stop = daemon.start(), functools.partial(daemon.stop, 2.0)
    print(json.dumps({"port": port}), flush=True)

    def wait_for_eof() -> None:
        sys.stdin.read()
        stopping.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    stopping.wait()
    stop()
    return 0


# --- load process -----------------------------------------------------------------------


def delegate_template(holder_jwk: dict[str, str]) -> bytes:
    """A serialized DelegateRequest without its idempotency key (field 8)."""
    from signer._proto.mandate.v1 import signer_pb2 as pb

    cap = pb.Capability(res=REFUND_CAP["res"], act=["post"],
                        when={"amount": pb.Constraint(le=4999)})
    request = pb.DelegateRequest(
        sub=SUB, holder_jwk=pb.Jwk(kty=holder_jwk["kty"], crv=holder_jwk["crv"],
                                   x=holder_jwk["x"]),
        caps=[cap], ttl_seconds=300, aud=[AUD], dpt=1,
    )
    return bytes(request.SerializeToString())


def delegate_maker(holder_jwk: dict[str, str]) -> Callable[[], bytes]:
    """Request bytes with a fresh idempotency key each time: appending field 8
    to the serialized template (protobuf merges concatenated messages)."""
    template = delegate_template(holder_jwk) + b"\x42"
    prefix = secrets.token_hex(6)
    counter = iter(range(1 << 62))

    def make() -> bytes:
        key = f"{prefix}-{next(counter)}".encode()
        return template + bytes((len(key),)) + key

    return make


@dataclass
class LoadResult:
    kind: str
    concurrency: int
    window_s: float
    completed: int = 0  # ok calls that completed inside the window
    ok_total: int = 0  # every ok call, warm-up and drain included
    errors: Counter[str] = field(default_factory=Counter)
    latencies_us: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    wall_s: float = 0.0


def run_load(call: Any, make: Callable[[], bytes], *, concurrency: int, warmup_s: float,
             window_s: float, result: LoadResult) -> None:
    """Keep ``concurrency`` calls in flight until the window ends, then drain."""
    lock = threading.Lock()
    drained = threading.Event()
    begin = time.perf_counter()
    window_start, window_end = begin + warmup_s, begin + warmup_s + window_s
    live = concurrency
    max_errors = 200

    def launch() -> None:
        started = time.perf_counter()
        future = call.future(make(), timeout=CALL_TIMEOUT_S)
        future.add_done_callback(functools.partial(finished, started))

    def finished(started: float, future: Any) -> None:
        nonlocal live
        ended = time.perf_counter()
        error = future.exception()
        with lock:
            if error is None:
                result.ok_total += 1
                if window_start <= ended <= window_end:
                    result.completed += 1
                    result.latencies_us.append((ended - started) * 1e6)
            else:
                code = error.code() if hasattr(error, "code") else None
                result.errors[code.name if code is not None else type(error).__name__] += 1
            again = ended < window_end and sum(result.errors.values()) < max_errors
            if not again:
                live -= 1
                if live == 0:
                    drained.set()
        if again:
            launch()

    for _ in range(concurrency):
        launch()
    if not drained.wait(warmup_s + window_s + CALL_TIMEOUT_S + 5):
        result.errors["client_stuck"] += 1


def load_main(args: argparse.Namespace) -> int:
    """A client process: one mTLS channel, closed-loop load, JSON result on stdout."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(args.ca).read_bytes(),
        private_key=Path(args.key).read_bytes(),
        certificate_chain=Path(args.cert).read_bytes(),
    )
    channel = grpc.secure_channel(args.target, creds)
    grpc.channel_ready_future(channel).result(timeout=20)
    if args.kind == "daemon":
        call = channel.unary_unary(DELEGATE_METHOD)  # bytes in, bytes out
        make = delegate_maker(json.loads(args.holder_jwk))
    else:
        call = channel.unary_unary(BARE_METHOD)
        payload = secrets.token_bytes(args.payload)
        make = functools.partial(bytes, payload)
    result = LoadResult(args.kind, args.concurrency, args.seconds)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    run_load(call, make, concurrency=args.concurrency, warmup_s=args.warmup,
             window_s=args.seconds, result=result)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    result.client_cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    channel.close()
    print(json.dumps({
        "completed": result.completed, "ok_total": result.ok_total,
        "errors": dict(result.errors), "latencies_us": [round(x, 1) for x in
                                                        result.latencies_us],
        "client_cpu_s": result.client_cpu_s,
    }))
    return 0


# --- the run ------------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process and its live descendants (the daemon's
    issuer process), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += process_cpu_s(int(child))
    return total


@dataclass
class Server:
    kind: str
    directory: Path
    process: subprocess.Popen[str]
    port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def _read_line(stream: IO[str], timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


@contextmanager
def server_process(kind: str, directory: Path, env: dict[str, str],
                   extra: Sequence[str] = ()) -> Iterator[Server]:
    """Start a server subprocess; it is stopped (stdin closed, then SIGTERM,
    then SIGKILL) whatever happens."""
    log = directory / f"{kind}.log"
    with log.open("w", encoding="utf-8") as log_file:
        process = subprocess.Popen(  # noqa: S603 - this script, fixed arguments
            [sys.executable, __file__, "_serve", "--kind", kind, "--dir", str(directory),
             *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
            env={**env, "SOFTHSM2_CONF": str(directory / "hsm" / "softhsm2.conf")},
        )
    try:
        assert process.stdout is not None
        line = _read_line(process.stdout, START_TIMEOUT_S)
        if not line:
            raise RuntimeError(f"the {kind} server did not start; its log:\n"
                               + log.read_text(encoding="utf-8")[-3000:])
        yield Server(kind, directory, process, int(json.loads(line)["port"]), log)
    finally:
        try:
            if process.stdin is not None:
                process.stdin.close()
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def load(server: Server, concurrency: int, *, seconds: float, warmup: float,
         pki: dict[str, Path], holder_jwk: dict[str, str], payload: int) -> LoadResult:
    """One client process against ``server``; server CPU read around it."""
    command = [
        sys.executable, __file__, "_load", "--kind", server.kind, "--target", server.target,
        "--concurrency", str(concurrency), "--seconds", str(seconds), "--warmup", str(warmup),
        "--ca", str(pki["ca"]), "--cert", str(pki["client_cert"]),
        "--key", str(pki["client_key"]), "--holder-jwk", json.dumps(holder_jwk),
        "--payload", str(payload),
    ]
    cpu0, wall0 = process_cpu_s(server.process.pid), time.perf_counter()
    done = subprocess.run(  # noqa: S603 - this script, fixed arguments
        command, capture_output=True, text=True, check=False,
        timeout=warmup + seconds + CALL_TIMEOUT_S + 60,
    )
    cpu1, wall1 = process_cpu_s(server.process.pid), time.perf_counter()
    if done.returncode != 0:
        raise RuntimeError(f"the load client failed:\n{done.stderr[-3000:]}")
    data = json.loads(done.stdout)
    return LoadResult(
        server.kind, concurrency, seconds, completed=data["completed"],
        ok_total=data["ok_total"], errors=Counter(data["errors"]),
        latencies_us=data["latencies_us"], client_cpu_s=data["client_cpu_s"],
        server_cpu_s=cpu1 - cpu0, wall_s=wall1 - wall0,
    )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of sorted values; nan if empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


@dataclass
class Row:
    """The pooled rounds of one (server, concurrency) pair."""

    kind: str
    concurrency: int
    runs: list[LoadResult] = field(default_factory=list)

    @property
    def window_s(self) -> float:
        return sum(r.window_s for r in self.runs)

    @property
    def throughput(self) -> float:
        return sum(r.completed for r in self.runs) / self.window_s

    @property
    def round_throughputs(self) -> list[float]:
        return [r.completed / r.window_s for r in self.runs]

    @functools.cached_property
    def latencies_ms(self) -> list[float]:
        return sorted(x / 1000 for r in self.runs for x in r.latencies_us)

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def errors(self) -> int:
        return sum(sum(r.errors.values()) for r in self.runs)

    @property
    def server_cpu_us(self) -> float:
        calls = sum(r.ok_total for r in self.runs)
        return 1e6 * sum(r.server_cpu_s for r in self.runs) / max(calls, 1)

    @property
    def server_cores(self) -> float:
        return sum(r.server_cpu_s for r in self.runs) / sum(r.wall_s for r in self.runs)

    @property
    def client_cpu_us(self) -> float:
        calls = sum(r.ok_total for r in self.runs)
        return 1e6 * sum(r.client_cpu_s for r in self.runs) / max(calls, 1)


def add_round_options(parser: argparse.ArgumentParser, per: str) -> None:
    """--seconds, --rounds and --warmup: how long each (``per``, concurrency) cell
    is loaded (this script's and bench/storage.py's)."""
    parser.add_argument("--seconds", type=float, default=8.0,
                        help=f"measured seconds per {per} and concurrency, split over the "
                             "rounds (default 8)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating rounds per concurrency (default 2)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="unmeasured seconds at the start of each round (default 1)")


def round_plan(args: argparse.Namespace) -> tuple[int, float, float]:
    """(rounds, measured seconds per round, warm-up seconds per round) from the
    options of ``add_round_options``."""
    rounds = max(args.rounds, 1)
    return rounds, max(args.seconds, 0.5) / rounds, max(args.warmup, 0.2)


RunWrapper = Callable[[str, int], AbstractContextManager[object]]


def run_rounds(servers: dict[str, Server], concurrencies: Sequence[int], *, rounds: int,
               window: float, warmup: float, pki: dict[str, Path], holder_jwk: dict[str, str],
               payload: int, around: RunWrapper | None = None) -> dict[tuple[str, int], Row]:
    """Every (server, concurrency) cell loaded in ``rounds`` rounds, the servers'
    order reversed every other round so that drift hits all alike; the pooled
    rows, by (server name, concurrency). ``around(name, concurrency)``, if
    given, is entered around each run."""
    rows = {(name, c): Row(name, c) for c in concurrencies for name in servers}
    names = list(servers)
    for concurrency in concurrencies:
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                with around(name, concurrency) if around else nullcontext():
                    rows[(name, concurrency)].runs.append(load(
                        servers[name], concurrency, seconds=window, warmup=warmup, pki=pki,
                        holder_jwk=holder_jwk, payload=payload))
    return rows


def signing_input_size(holder_jwk: dict[str, str]) -> int:
    """How many bytes the daemon signs for the benchmark's Delegate request."""
    from verifier_sdk import Holder, issue_root

    key = Holder.generate()
    link = issue_root(alg="EdDSA", kid=DAEMON_KID, sign=key.sign, iss=CALLER, sub=SUB,
                      holder_jwk=holder_jwk, cap=[REFUND_CAP], ttl=300, dpt=1, aud=[AUD],
                      jti="x" * 22)
    return len(link.rsplit(".", 1)[0])


def load_holder() -> tuple[Any, dict[str, str], int]:
    """A fresh holder key for the load's Delegate requests: the key (a verifier_sdk
    Holder), its public JWK, and how many bytes the daemon signs for it."""
    from verifier_sdk import Holder

    holder = Holder.generate()
    holder_jwk = dict(holder.public_jwk)
    return holder, holder_jwk, signing_input_size(holder_jwk)


def check_daemon(server: Server, pki: dict[str, Path], holder: Any) -> str:
    """One more Delegate, parsed, its link verified with verifier_sdk."""
    from signer._proto.mandate.v1 import signer_pb2 as pb
    from signer._proto.mandate.v1 import signer_pb2_grpc as pb_grpc
    from verifier_sdk import Request, TrustBundle, Verifier

    creds = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(), private_key=pki["client_key"].read_bytes(),
        certificate_chain=pki["client_cert"].read_bytes())
    with grpc.secure_channel(server.target, creds) as channel:
        stub = pb_grpc.SignerStub(channel)
        request = pb.DelegateRequest.FromString(delegate_maker(holder.public_jwk)())
        reply = stub.Delegate(request, timeout=CALL_TIMEOUT_S)
        bundle = TrustBundle.from_jwks(json.loads(
            stub.GetTrustBundle(pb.GetTrustBundleRequest(), timeout=CALL_TIMEOUT_S).jwks))
    use = Request(REFUND_CAP["res"], "post", {"amount": 4999})
    Verifier(bundle, audience=AUD).verify(reply.chain, use,
                                          pop=holder.prove(reply.chain, use, aud=AUD))
    return str(reply.kid)


def audit_delegates(directory: Path) -> int:
    from signer._audit import read_records

    return len(read_records(directory / "state" / "audit.db", event="delegate"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_round_options(parser, "server")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results as JSON to FILE ('-': stdout)")
    parser.add_argument("--issuance", choices=("process", "inline"), default="process",
                        help="the daemon's [server] issuance (default: process, as shipped)")
    args = parser.parse_args(argv)
    rounds, window, warmup = round_plan(args)
    started = time.perf_counter()

    holder, holder_jwk, payload = load_holder()
    pin = secrets.token_hex(8)
    env = {**os.environ, PIN_ENV: pin}

    with tempfile.TemporaryDirectory(prefix="mandate-bench-") as tmp, ExitStack() as stack:
        base = Path(tmp)
        pki = make_pki(base)
        servers = {
            kind: stack.enter_context(
                server_process(kind, make_server_dir(base, kind, pki, pin), env,
                               ["--issuance", args.issuance]))
            for kind in KINDS
        }
        rows = run_rounds(servers, CONCURRENCY, rounds=rounds, window=window, warmup=warmup,
                          pki=pki, holder_jwk=holder_jwk, payload=payload)
        kid = check_daemon(servers["daemon"], pki, holder)
        ok_delegates = sum(r.ok_total for (k, _), row in rows.items() if k == "daemon"
                           for r in row.runs) + 1
        daemon_dir = servers["daemon"].directory
        stack.close()  # stop both servers: the audit log is flushed
        recorded = audit_delegates(daemon_dir)
    elapsed = time.perf_counter() - started

    print(f"Signer benchmark — {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
          f"grpcio {version('grpcio')}; loopback mTLS, one client process; "
          f"{rounds} round(s) × {window:.1f} s per cell after {warmup:.1f} s warm-up")
    print(f"bare = an RPC that only signs {payload} bytes in SoftHSM2 (Ed25519); "
          "daemon = Delegate (policy + HSM sign + durable audit)\n")
    header = (f"{'server':<7} {'in flight':>9} {'calls/s':>8} {'rounds calls/s':>16} "
              f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'srv CPU µs/call':>15} "
              f"{'srv cores':>9} {'cli CPU µs/call':>15}")
    print(header)
    for concurrency in CONCURRENCY:
        for kind in KINDS:
            row = rows[(kind, concurrency)]
            spread = "/".join(f"{x:.0f}" for x in row.round_throughputs)
            print(f"{kind:<7} {concurrency:>9} {row.throughput:>8.0f} {spread:>16} "
                  f"{row.p50_ms:>7.2f} {row.p99_ms:>7.2f} {row.errors:>6} "
                  f"{row.server_cpu_us:>15.0f} {row.server_cores:>9.2f} "
                  f"{row.client_cpu_us:>15.0f}")

    print(f"\n{'in flight':>9} {'daemon / bare':>13} {'rounds':>11} {'target':>7}  verdict")
    ratios: dict[int, dict[str, Any]] = {}
    for concurrency in CONCURRENCY:
        bare, daemon = rows[("bare", concurrency)], rows[("daemon", concurrency)]
        value = daemon.throughput / bare.throughput
        per_round = [d / b for d, b in zip(daemon.round_throughputs, bare.round_throughputs,
                                           strict=True)]
        target = TARGET_RATIO if concurrency == TARGET_CONCURRENCY else None
        met = None if target is None else value >= target
        ratios[concurrency] = {"value": round(value, 3),
                               "rounds": [round(x, 3) for x in per_round],
                               "target": target, "met": met}
        verdict = "" if met is None else ("ok" if met else "MISSED")
        shown = "" if target is None else f"≥ {target:.2f}"
        rounds_text = "/".join(f"{x:.2f}" for x in per_round)
        print(f"{concurrency:>9} {value:>13.2f} {rounds_text:>11} {shown:>7}  {verdict}")
    p99 = rows[("daemon", TARGET_CONCURRENCY)].p99_ms
    p99_met = p99 <= TARGET_P99_MS
    print(f"Delegate p99 at {TARGET_CONCURRENCY} in flight: {p99:.2f} ms "
          f"(target ≤ {TARGET_P99_MS:.0f} ms) {'ok' if p99_met else 'MISSED'}")
    audit_ok = recorded == ok_delegates
    print(f"checks: a Delegate link (kid {kid}) verifies with verifier_sdk; audit log holds "
          f"{recorded} delegate records for {ok_delegates} successful Delegate calls "
          f"({'equal' if audit_ok else 'DIFFERENT'})")
    print(f"run time {elapsed:.0f} s")

    if args.json:
        report: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "versions": {p: version(p) for p in ("grpcio", "python-pkcs11", "protobuf")},
            "method": {"rounds": rounds, "window_s": window, "warmup_s": warmup,
                       "bare_payload_bytes": payload, "client": "one process, one channel, "
                       "closed loop", "latency": "client-side, nearest-rank percentiles"},
            "cells": {
                f"{kind} {concurrency}": {
                    "calls_per_s": round(row.throughput, 1),
                    "rounds_calls_per_s": [round(x, 1) for x in row.round_throughputs],
                    "p50_ms": round(row.p50_ms, 3), "p99_ms": round(row.p99_ms, 3),
                    "errors": row.errors,
                    "error_codes": dict(sum((r.errors for r in row.runs), Counter())),
                    "server_cpu_us_per_call": round(row.server_cpu_us, 1),
                    "server_cores": round(row.server_cores, 3),
                    "client_cpu_us_per_call": round(row.client_cpu_us, 1),
                }
                for (kind, concurrency), row in rows.items()
            },
            "ratios": {str(c): v for c, v in ratios.items()},
            "p99_at_8": {"value_ms": round(p99, 3), "target_ms": TARGET_P99_MS, "met": p99_met},
            "checks": {"link_verifies": True, "audit_records": recorded,
                       "ok_delegate_calls": ok_delegates, "equal": audit_ok},
            "run_seconds": round(elapsed, 1),
        }
        write_json(report, args.json)
    return 0 if audit_ok else 1


def role_main(argv: Sequence[str]) -> int:
    """The subprocess roles: ``_serve`` (a server) and ``_load`` (a client)."""
    parser = argparse.ArgumentParser(prog=f"delegate.py {argv[0]}")
    if argv[0] == "_serve":
        parser.add_argument("--kind", choices=KINDS, required=True)
        parser.add_argument("--dir", required=True)
        parser.add_argument("--issuance", choices=("process", "inline"), default="process")
        return serve_main(parser.parse_args(argv[1:]))
    parser.add_argument("--kind", choices=KINDS, required=True)
    for name in ("--target", "--ca", "--cert", "--key", "--holder-jwk"):
        parser.add_argument(name, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--warmup", type=float, required=True)
    parser.add_argument("--payload", type=int, required=True)
    return load_main(parser.parse_args(argv[1:]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_serve", "_load"):
        sys.exit(role_main(sys.argv[1:]))
    sys.exit(main())
