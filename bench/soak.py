#!/usr/bin/env python3
"""A bounded soak of the signer daemon (docs/security.md, "Soak").

One command sets up, in a temporary directory, a SoftHSM2 token, a
development PKI (the daemon's certificate and one client certificate) and
the signer config of bench/delegate.py; makes the root key with ``mandate
keys generate`` (ES256 unless ``--alg EdDSA``); and runs the daemon as
``mandate serve`` (shipped settings but one: ``max_concurrent_rpcs`` is
``--tasks`` + 16, see RPC_HEADROOM; the gRPC front end and its issuer
process, mutual TLS on 127.0.0.1). A separate client process then runs
``--tasks`` asyncio tasks (grpc.aio, one mTLS channel per 16 tasks) for a
warm-up and then the measured window of ``--seconds``. Each task, call after
call:

* 85 %: a well-formed Delegate (must succeed);
* 10 %: an intended denial, a capability wider than the policy grants (must
  be PERMISSION_DENIED, reason ``capability_not_contained``);
* 5 %: Revoke of a link the task was given earlier (must succeed).

Then a steady phase of ``--steady`` seconds: the same load with Delegate in
place of Revoke, so that the revocation list stops growing (see STEADY_S).

Checks, each of which fails the run (exit status 1):

* no unintended outcome: any other status, or a denial that was allowed;
* the daemon's audit log, read after it stops, verifies, and holds exactly
  one ``delegate`` record per link handed out (the same jtis), one ``deny``
  per denial and one ``revoke`` per revoked jti: records = successful calls
  + denials;
* a link from the run verifies with verifier_sdk;
* the daemon stopped cleanly on SIGTERM and logged no ERROR;
* memory flat: the resident size of the daemon's processes at the end of the
  steady phase is at most ``--rss-growth`` percent above its start, once the
  part SoftHSM2's EdDSA leak explains is taken out (with ``--alg EdDSA``:
  signatures made in the phase × SOFTHSM_EDDSA_LEAK_B; stated in the report).

Reported: calls by kind and outcome (whole run), throughput and client-side
p50/p99 latency of calls started in the measured window (nearest rank), RSS
of both daemon processes (from /proc) every 10 s with the signatures made by
then, its growth over the window and over the steady phase, their CPU in the
window, the last revocation list's size and the stores' size on disk.

Run: ``python bench/soak.py [--tasks N] [--seconds S] [--warmup S] [--steady S]
[--alg ES256|EdDSA] [--rss-growth PCT] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import grpc
from _report import write_json  # bench/, first on sys.path when run
from delegate import (
    AUD,
    CALL_TIMEOUT_S,
    PIN_ENV,
    REFUND_CAP,
    START_TIMEOUT_S,
    SUB,
    Server,
    check_daemon,
    make_pki,
    make_server_dir,
    percentile,
)

KID = "soak-root-1"
TASKS = 64
SECONDS = 120.0
WARMUP_S = 10.0
# Memory is checked over a steady phase after the window: the same load without
# Revoke calls. Each Revoke signs the whole list of live revocations, which grows
# for the links' life + 300 s (longer than a short run), and the allocator keeps
# the freed buffers of each larger list: RSS grows with the list and levels off
# once it stops growing. With the list at a constant size, as in a long-running
# daemon, the daemon's memory must stay flat. It is measured from SETTLE_S into
# the phase, once the last Revoke calls' buffers are freed.
STEADY_S = 60.0
SETTLE_S = 10.0
RSS_GROWTH_PCT = 5.0
RSS_EVERY_S = 10.0
TASKS_PER_CHANNEL = 16
MAX_CALLS_PER_TASK = 1_000_000
STOP_TIMEOUT_S = 60.0
# gRPC counts a call against max_concurrent_rpcs until its status has been
# sent and processed, so a client keeping exactly the limit in flight can be
# refused (RESOURCE_EXHAUSTED, the limit working as documented) when it sends
# its next call right after a reply. The soak's daemon gets this many slots
# more than it has tasks.
RPC_HEADROOM = 16
# SoftHSM2 leaks in its own module on every Ed25519 C_Sign (an OpenSSL object
# decoded per EdDSA operation and never freed): measured ~66 bytes per
# signature, while ES256 signing stays flat.
SOFTHSM_EDDSA_LEAK_B = 66
DENIAL_REASON = "capability_not_contained"
KINDS = ("delegate", "deny", "revoke")
# Wider than the grant's "amount <= 5000": the intended denial.
WIDE_CAP: dict[str, Any] = {**REFUND_CAP, "if": {"amount": {"le": 9999}}}


def kind_of(index: int, has_link: bool) -> str:
    """The fixed mix: call ``index`` of a task is a denial, a Revoke or a Delegate."""
    if index % 10 == 9:
        return "deny"
    if index % 20 == 4 and has_link:
        return "revoke"
    return "delegate"


# --- the client process ----------------------------------------------------------------


@dataclass
class Tally:
    """What the client saw: outcomes by kind, the links, latencies after warm-up."""

    outcomes: Counter[str] = field(default_factory=Counter)  # "kind CODE"
    unintended: list[str] = field(default_factory=list)
    delegated: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    denied: int = 0
    latencies_ms: dict[str, list[float]] = field(
        default_factory=lambda: {kind: [] for kind in KINDS})


def denial_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a rich status, or ''."""
    from google.rpc import error_details_pb2, status_pb2

    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return ""


def delegate_request(holder_jwk: dict[str, str], cap: dict[str, Any]) -> Any:
    from signer._proto.mandate.v1 import signer_pb2 as pb

    limit = cap["if"]["amount"]["le"]
    return pb.DelegateRequest(
        sub=SUB, holder_jwk=pb.Jwk(kty=holder_jwk["kty"], crv=holder_jwk["crv"],
                                   x=holder_jwk["x"]),
        caps=[pb.Capability(res=cap["res"], act=cap["act"],
                            when={"amount": pb.Constraint(le=limit)})],
        ttl_seconds=300, aud=[AUD], dpt=1, idempotency_key=secrets.token_hex(16),
    )


async def one_task(stub: Any, tally: Tally, *, warm_at: float, steady_at: float,
                   end_at: float) -> None:
    """Calls in the fixed mix, one after another, until ``steady_at``; then the
    same without Revoke until ``end_at``. Latencies of calls started in between
    ``warm_at`` and ``steady_at``."""
    from signer._proto.mandate.v1 import signer_pb2 as pb
    from verifier_sdk import Holder

    jwk = dict(Holder.generate().public_jwk)
    links: list[str] = []  # handed out to this task and not yet revoked
    for index in range(MAX_CALLS_PER_TASK):
        started = time.monotonic()
        if started >= end_at:
            break
        kind = kind_of(index, bool(links) and started < steady_at)
        code = "OK"
        try:
            if kind == "delegate":
                reply = await stub.Delegate(delegate_request(jwk, REFUND_CAP),
                                            timeout=CALL_TIMEOUT_S)
                links.append(reply.jti)
                tally.delegated.append(reply.jti)
            elif kind == "revoke":
                jti = links.pop(0)
                await stub.Revoke(pb.RevokeRequest(jti=[jti], reason="soak"),
                                  timeout=CALL_TIMEOUT_S)
                tally.revoked.append(jti)
            else:
                await stub.Delegate(delegate_request(jwk, WIDE_CAP), timeout=CALL_TIMEOUT_S)
                tally.unintended.append("deny: a capability wider than the grant was allowed")
        except grpc.aio.AioRpcError as error:
            code = error.code().name
            if (kind == "deny" and error.code() == grpc.StatusCode.PERMISSION_DENIED
                    and denial_reason(error) == DENIAL_REASON):
                tally.denied += 1
            else:
                tally.unintended.append(f"{kind}: {code}: {error.details()}")
        tally.outcomes[f"{kind} {code}"] += 1
        if warm_at <= started < steady_at:
            tally.latencies_ms[kind].append((time.monotonic() - started) * 1000)


async def run_tasks(args: argparse.Namespace) -> dict[str, Any]:
    from signer._proto.mandate.v1 import signer_pb2_grpc as pb_grpc

    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(args.ca).read_bytes(),
        private_key=Path(args.key).read_bytes(),
        certificate_chain=Path(args.cert).read_bytes(),
    )
    channels = [grpc.aio.secure_channel(args.target, creds)
                for _ in range(-(-args.tasks // TASKS_PER_CHANNEL))]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT_S)
    stubs = [pb_grpc.SignerStub(channel) for channel in channels]
    tally = Tally()
    begin = time.monotonic()
    warm_at = begin + args.warmup
    steady_at = warm_at + args.seconds
    end_at = steady_at + args.steady

    async def announce() -> None:
        await asyncio.sleep(args.warmup)
        print("warm", flush=True)
        await asyncio.sleep(max(steady_at - time.monotonic(), 0.0))
        print("steady", flush=True)

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(announce(), *(
        one_task(stubs[n % len(stubs)], tally, warm_at=warm_at, steady_at=steady_at,
                 end_at=end_at)
        for n in range(args.tasks)))
    ended = time.monotonic()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for channel in channels:
        await channel.close()
    return {
        "outcomes": dict(tally.outcomes), "unintended": tally.unintended,
        "delegated": tally.delegated, "revoked": tally.revoked, "denied": tally.denied,
        "latencies_ms": tally.latencies_ms,
        "run_s": ended - begin,
        "client_cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
    }


def load_main(argv: Sequence[str]) -> int:
    """The client process: "warm" once warmed up, "steady" when Revoke calls
    stop, then the tally as one JSON line."""
    parser = argparse.ArgumentParser(prog="soak.py _load")
    for name in ("--target", "--ca", "--cert", "--key"):
        parser.add_argument(name, required=True)
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--warmup", type=float, required=True)
    parser.add_argument("--steady", type=float, required=True)
    result = asyncio.run(run_tasks(parser.parse_args(argv)))
    print(json.dumps(result), flush=True)
    return 0


# --- the daemon's processes --------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (its issuer process), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def own_cpu_s(pid: int) -> float:
    """utime + stime of one process (not of its children), from /proc; 0 once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of one process, from /proc; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Running:
    """``mandate serve`` running: the front end's pid and its issuer process."""

    server: Server

    @functools.cached_property
    def pids(self) -> dict[str, int]:
        """By role, read once: the issuer process exists before the port is announced."""
        front = self.server.process.pid
        return {"front end": front, **{f"issuer {n}" if n else "issuer": pid
                                       for n, pid in enumerate(descendants(front))}}

    def rss(self) -> dict[str, int]:
        return {name: rss_bytes(pid) for name, pid in self.pids.items()}

    def cpu_s(self) -> dict[str, float]:
        return {name: own_cpu_s(pid) for name, pid in self.pids.items()}


def mandate(args: Sequence[str], env: dict[str, str]) -> str:
    """Run the ``mandate`` CLI; its stdout."""
    done = subprocess.run(  # noqa: S603 - this interpreter, the project's CLI
        [sys.executable, "-m", "signer.cli", *args], env=env, capture_output=True, text=True,
        timeout=START_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mandate {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def read_line(stream: IO[str], timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


@contextmanager
def serve(directory: Path, env: dict[str, str], stopped: dict[str, Any]) -> Iterator[Running]:
    """``mandate serve`` in its own process; stopped with SIGTERM whatever happens.
    ``stopped`` receives the exit status and whether it stopped in time."""
    log = directory / "daemon.log"
    with log.open("w", encoding="utf-8") as log_file:
        process = subprocess.Popen(  # noqa: S603 - this interpreter, the project's CLI
            [sys.executable, "-m", "signer.cli", "serve", "--config",
             str(directory / "signer.toml")],
            stdout=subprocess.PIPE, stderr=log_file, text=True, env=env)
    try:
        assert process.stdout is not None
        line = read_line(process.stdout, START_TIMEOUT_S)
        if "listening on port" not in line:
            raise RuntimeError("the daemon did not start; its log:\n"
                               + log.read_text(encoding="utf-8")[-3000:])
        port = int(line.rsplit(" ", 1)[1])
        yield Running(Server("daemon", directory, process, port, log))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            stopped["status"] = process.wait(timeout=STOP_TIMEOUT_S)
            stopped["in_time"] = True
        except subprocess.TimeoutExpired:
            stopped["in_time"] = False
            process.kill()
            stopped["status"] = process.wait()


class Sampler:
    """RSS of the daemon's processes every RSS_EVERY_S, in a thread, until
    stopped; ``mark`` adds a sample and remembers it (the steady phase's start)."""

    def __init__(self, daemon: Running) -> None:
        self._daemon = daemon
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.steady = 0  # index of the sample taken when Revoke calls stopped
        self._begin = time.monotonic()
        self.wall_begin = time.time()  # the daemon's audit clock, for t_s = 0
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def sample(self) -> int:
        """Take a sample; its index."""
        with self._lock:
            self.samples.append((round(time.monotonic() - self._begin, 1), self._daemon.rss()))
            return len(self.samples) - 1

    def mark(self) -> None:
        self.steady = self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(RSS_EVERY_S + 5)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(RSS_EVERY_S):
            self.sample()


def run_load(daemon: Running, pki: dict[str, Path], *, tasks: int, seconds: float,
             warmup: float, steady: float) -> tuple[dict[str, Any], Sampler, dict[str, float]]:
    """The client process against ``daemon``; RSS sampled from the end of the
    warm-up, and when Revoke calls stop; the daemon's CPU seconds over the
    measured window (not the steady phase)."""
    command = [
        sys.executable, __file__, "_load", "--target", daemon.server.target,
        "--ca", str(pki["ca"]), "--cert", str(pki["client_cert"]),
        "--key", str(pki["client_key"]), "--tasks", str(tasks), "--seconds", str(seconds),
        "--warmup", str(warmup), "--steady", str(steady),
    ]
    client = subprocess.Popen(  # noqa: S603 - this script, fixed arguments
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        if read_line(client.stdout, START_TIMEOUT_S + warmup).strip() != "warm":
            client.kill()
            raise RuntimeError(f"the load client failed:\n{client.communicate()[1][-3000:]}")
        cpu0 = daemon.cpu_s()
        with Sampler(daemon) as sampler:
            if read_line(client.stdout, seconds + 60).strip() != "steady":
                client.kill()
                raise RuntimeError("the load client failed:\n"
                                   + client.communicate()[1][-3000:])
            sampler.mark()
            cpu1 = daemon.cpu_s()
            out, err = client.communicate(timeout=steady + CALL_TIMEOUT_S + 60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    if client.returncode != 0:
        raise RuntimeError(f"the load client failed:\n{err[-3000:]}")
    return json.loads(out), sampler, {name: cpu1[name] - cpu0.get(name, 0.0) for name in cpu1}


def trust_bundle(daemon: Running, pki: dict[str, Path]) -> Any:
    from signer._proto.mandate.v1 import signer_pb2 as pb
    from signer._proto.mandate.v1 import signer_pb2_grpc as pb_grpc
    from verifier_sdk import TrustBundle

    creds = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(), private_key=pki["client_key"].read_bytes(),
        certificate_chain=pki["client_cert"].read_bytes())
    with grpc.secure_channel(daemon.server.target, creds) as channel:
        reply = pb_grpc.SignerStub(channel).GetTrustBundle(pb.GetTrustBundleRequest(),
                                                           timeout=CALL_TIMEOUT_S)
    return TrustBundle.from_jwks(reply.jwks)


def log_errors(log: Path) -> list[str]:
    """ERROR and CRITICAL lines of the daemon's JSON log."""
    found = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            level = json.loads(line).get("level")
        except (ValueError, AttributeError):
            level = "ERROR" if " ERROR " in line or " CRITICAL " in line else None
        if level in ("ERROR", "CRITICAL"):
            found.append(line[:300])
    return found


# --- the run -------------------------------------------------------------------------------


def run(*, tasks: int = TASKS, seconds: float = SECONDS, warmup: float = WARMUP_S,
        steady: float = STEADY_S, rss_growth_pct: float = RSS_GROWTH_PCT,
        alg: str = "ES256") -> dict[str, Any]:
    """Set up, soak, stop, check; the report (``report["ok"]``: every check passed)."""
    from signer._audit import read_checkpoints, read_records, verify_log
    from verifier_sdk import Holder, VerificationError

    started = time.monotonic()
    stopped: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mandate-soak-") as tmp:
        base = Path(tmp)
        pki = make_pki(base)
        pin = secrets.token_hex(8)
        directory = make_server_dir(base, "soak", pki, pin)
        rpc_limit = tasks + RPC_HEADROOM
        set_rpc_limit(directory / "signer.toml", rpc_limit)
        env = {**os.environ, PIN_ENV: pin,
               "SOFTHSM2_CONF": str(directory / "hsm" / "softhsm2.conf")}
        mandate(["keys", "generate", "--config", str(directory / "signer.toml"),
                 "--kid", KID, "--alg", alg], env)
        with serve(directory, env, stopped) as daemon:
            pids = daemon.pids
            result, sampler, cpu = run_load(daemon, pki, tasks=tasks, seconds=seconds,
                                            warmup=warmup, steady=steady)
            try:  # one more link, checked with verifier_sdk
                link_verifies = bool(check_daemon(daemon.server, pki, Holder.generate()))
            except VerificationError:
                link_verifies = False
            bundle = trust_bundle(daemon, pki)
        state = directory / "state"
        audit_report = verify_log(state / "audit.db", bundle)
        records = read_records(state / "audit.db")
        checkpoints = read_checkpoints(state / "audit.db")
        published = last_revocation_list(state / "state.db", bundle)
        disk = {name: (state / name).stat().st_size
                for name in ("state.db", "audit.db") if (state / name).exists()}
        errors_logged = log_errors(directory / "daemon.log")

    events = Counter(r.event for r in records)
    memory = rss_analysis(sampler, records, checkpoints, alg=alg)
    latencies = {kind: sorted(values) for kind, values in result["latencies_ms"].items()}
    measured = sum(len(v) for v in latencies.values())
    checks = {
        "no unintended outcome": not result["unintended"],
        "audit log verifies": audit_report.ok,
        **audit_checks(result, records, extra_links=1),
        "a link verifies with verifier_sdk": link_verifies,
        "stopped cleanly on SIGTERM": stopped.get("in_time") is True
                                      and stopped.get("status") == 0,
        "no ERROR in the daemon's log": not errors_logged,
        f"RSS flat in the steady phase: growth less the SoftHSM2 EdDSA leak <= "
        f"{rss_growth_pct:g} %": memory["steady"]["growth_unexplained_pct"] <= rss_growth_pct,
    }
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "versions": {p: version(p) for p in ("grpcio", "python-pkcs11", "protobuf")},
        "method": {"tasks": tasks, "seconds": seconds, "warmup_s": warmup, "steady_s": steady,
                   "alg": alg, "mix": "85% Delegate, 10% intended denial, 5% Revoke",
                   "steady_mix": "90% Delegate, 10% intended denial",
                   "daemon": "mandate serve, shipped [server] settings but "
                             f"max_concurrent_rpcs = {rpc_limit} (tasks + {RPC_HEADROOM}), "
                             "SoftHSM2, loopback mTLS",
                   "max_concurrent_rpcs": rpc_limit, "processes": pids,
                   "latency": "client-side, calls started in the measured window, "
                              "nearest rank"},
        "calls": dict(sorted(result["outcomes"].items())),
        "unintended": {"count": len(result["unintended"]),
                       "first": result["unintended"][:10]},
        "throughput_per_s": round(measured / seconds, 1),
        "latency_ms": {kind: {"calls": len(values),
                              "p50": round(percentile(values, 50), 2),
                              "p99": round(percentile(values, 99), 2)}
                       for kind, values in latencies.items()},
        "rss_mib": memory,
        "server_cpu_cores": {name: round(value / seconds, 2) for name, value in cpu.items()},
        "client_cpu_cores": round(result["client_cpu_s"] / result["run_s"], 2),
        "audit": {"records": dict(events), "verifies": audit_report.ok,
                  "problem": audit_report.problem, "checkpoints": len(checkpoints),
                  "links_handed_out": len(result["delegated"]) + 1,
                  "denials": result["denied"], "revoked": len(result["revoked"]),
                  "lost_records": lost_records(result, records, extra_links=1)},
        "revocation_list": published,
        "disk_mib": {name: round(size / 2**20, 1) for name, size in disk.items()},
        "daemon_log_errors": errors_logged[:10],
        "checks": checks,
        "ok": all(checks.values()),
        "run_seconds": round(time.monotonic() - started, 1),
    }


def last_revocation_list(path: Path, bundle: Any) -> dict[str, int]:
    """The list the daemon last signed: its seq, how many jtis, its size in bytes."""
    from signer._state import StateStore
    from verifier_sdk import verify_revocation_list

    store = StateStore(path)
    try:
        stored = store.revocation_list()
    finally:
        store.close()
    if stored is None:
        return {"seq": -1, "entries": 0, "bytes": 0}
    revoked = verify_revocation_list(stored.token, bundle).revoked
    return {"seq": stored.seq, "entries": len(revoked), "bytes": len(stored.token)}


def set_rpc_limit(config: Path, limit: int) -> None:
    """Write ``max_concurrent_rpcs`` into the [server] section of ``config``."""
    text = config.read_text(encoding="utf-8")
    if "[server]\n" not in text:
        raise RuntimeError(f"{config}: no [server] section to set max_concurrent_rpcs in")
    config.write_text(text.replace("[server]\n", f"[server]\nmax_concurrent_rpcs = {limit}\n",
                                   1), encoding="utf-8")


def signatures_between(records: Sequence[Any], checkpoints: Sequence[Any], start: float,
                       end: float) -> int:
    """HSM signatures the daemon made in [start, end) (Unix seconds): one per
    link issued, one revocation list per Revoke (each revokes one jti here),
    one per audit checkpoint."""
    made = sum(1 for r in records
               if r.event in ("delegate", "revoke") and start <= r.time / 1000 < end)
    return made + sum(1 for c in checkpoints if start <= c.time < end)


def rss_analysis(sampler: Sampler, records: Sequence[Any], checkpoints: Sequence[Any], *,
                 alg: str) -> dict[str, Any]:
    """RSS over the measured window (first sample after warm-up to the one when
    Revoke calls stopped) and over the steady phase (from the first sample
    SETTLE_S after that one to the last), each with the part the SoftHSM2
    EdDSA leak explains (in the issuer process, which holds the HSM session)
    taken out."""
    leak_per_sig = SOFTHSM_EDDSA_LEAK_B if alg == "EdDSA" else 0
    t0 = sampler.samples[0][0]
    signed = [signatures_between(records, checkpoints, sampler.wall_begin + t0,
                                 sampler.wall_begin + t) for t, _ in sampler.samples]

    def phase(first: int, last: int) -> dict[str, Any]:
        (t_start, start), (t_end, end) = sampler.samples[first], sampler.samples[last]
        total0, total1 = sum(start.values()), sum(end.values())
        signatures = signed[last] - signed[first]
        leak = signatures * leak_per_sig
        return {"seconds": round(t_end - t_start, 1), "start": mib(start), "end": mib(end),
                "growth_pct": round(100 * (total1 - total0) / total0, 1),
                "signatures": signatures, "leak_explained_mib": round(leak / 2**20, 1),
                "growth_unexplained_pct": round(100 * (total1 - total0 - leak) / total0, 1)}

    last = len(sampler.samples) - 1
    settled = next((n for n in range(sampler.steady, last)
                    if sampler.samples[n][0] >= sampler.samples[sampler.steady][0] + SETTLE_S),
                   sampler.steady)
    return {
        "leak_b_per_signature": leak_per_sig,
        "window": phase(0, sampler.steady),
        "steady": phase(settled, last),
        "samples": [{"t_s": t, **mib(rss), "signatures": n}
                    for (t, rss), n in zip(sampler.samples, signed, strict=True)],
        "steady_from_t_s": sampler.samples[sampler.steady][0],
    }


def lost_records(result: dict[str, Any], records: Sequence[Any], *, extra_links: int) -> int:
    """Successful calls and denials the audit log holds no record for."""
    recorded = Counter(r.jti for r in records if r.event == "delegate")
    revoked = Counter(r.jti for r in records if r.event == "revoke")
    denials = sum(1 for r in records if r.event == "deny")
    return (sum((Counter(result["delegated"]) - recorded).values())
            + sum((Counter(result["revoked"]) - revoked).values())
            + max(int(result["denied"]) - denials, 0)
            + max(extra_links - sum((recorded - Counter(result["delegated"])).values()), 0))


def audit_checks(result: dict[str, Any], records: Sequence[Any], *,
                 extra_links: int) -> dict[str, bool]:
    """The audit log against what the clients saw: the same links (by jti), one
    denial record per denial, one revoke record per revoked jti; ``extra_links``
    links were handed out outside the tally."""
    events = Counter(r.event for r in records)
    recorded = Counter(r.jti for r in records if r.event == "delegate")
    handed_out = Counter(result["delegated"])
    ok_calls = len(result["delegated"]) + extra_links + len(result["revoked"])
    return {
        "a delegate record per link handed out":
            not handed_out - recorded and sum((recorded - handed_out).values()) == extra_links,
        "a deny record per denial": events["deny"] == result["denied"],
        "a revoke record per revoked jti":
            Counter(r.jti for r in records if r.event == "revoke") == Counter(result["revoked"]),
        "records = successful calls + denials":
            events["delegate"] + events["revoke"] + events["deny"] == ok_calls + result["denied"],
    }


def mib(rss: dict[str, int]) -> dict[str, float]:
    return {name: round(value / 2**20, 1) for name, value in rss.items()}


def print_report(report: dict[str, Any]) -> None:
    m = report["method"]
    print(f"Signer soak — {report['machine']['cpus']} CPU(s), Python "
          f"{report['machine']['python']}, grpcio {report['versions']['grpcio']}; "
          f"{m['tasks']} client tasks for {m['seconds']:g} s after {m['warmup_s']:g} s "
          f"warm-up, then {m['steady_s']:g} s without Revoke; {m['mix']}; root key {m['alg']}")
    print(f"daemon: {m['daemon']}")
    print("\ncalls by outcome (whole run):")
    for name, count in report["calls"].items():
        print(f"  {name:<28} {count:>8}")
    unintended = report["unintended"]
    print(f"unintended outcomes: {unintended['count']}")
    for line in unintended["first"]:
        print(f"  {line}")
    print(f"\nthroughput in the measured window: {report['throughput_per_s']:.0f} calls/s")
    for kind, figures in report["latency_ms"].items():
        print(f"  {kind:<9} {figures['calls']:>8} calls  p50 {figures['p50']:7.2f} ms  "
              f"p99 {figures['p99']:7.2f} ms")
    rss = report["rss_mib"]
    names = list(rss["window"]["start"])
    for key, title in (("window", "measured window"),
                       ("steady", f"steady phase without Revoke, from {SETTLE_S:g} s in "
                                  f"(checked)")):
        phase = rss[key]
        print(f"\nserver RSS (MiB), {title}, {phase['seconds']:g} s: "
              + ", ".join(f"{name} {phase['start'][name]:.1f} → {phase['end'].get(name, 0):.1f}"
                          for name in names)
              + f"; growth {phase['growth_pct']:+.1f} %")
        if rss["leak_b_per_signature"]:
            print(f"  SoftHSM2 EdDSA leak: {phase['signatures']} signatures × "
                  f"{rss['leak_b_per_signature']} B = {phase['leak_explained_mib']:.1f} MiB "
                  f"(issuer); growth without it {phase['growth_unexplained_pct']:+.1f} %")
    print(f"  samples ({'/'.join(names)}; steady phase from {rss['steady_from_t_s']:.0f} s): "
          + "; ".join(f"{s['t_s']:.0f} s " + "/".join(f"{s.get(name, 0):.1f}" for name in names)
                      for s in rss["samples"]))
    print("server CPU (cores): " + ", ".join(
        f"{name} {value:.2f}" for name, value in report["server_cpu_cores"].items())
        + f"; client process {report['client_cpu_cores']:.2f}")
    audit = report["audit"]
    print(f"\naudit log: {sum(audit['records'].values())} records "
          + ", ".join(f"{k} {v}" for k, v in sorted(audit["records"].items()))
          + f"; links handed out {audit['links_handed_out']}, denials {audit['denials']}, "
          f"revoked {audit['revoked']}; lost records {audit['lost_records']}; "
          f"{audit['checkpoints']} checkpoints; chain verifies: {audit['verifies']}")
    listed = report["revocation_list"]
    print(f"last revocation list: seq {listed['seq']}, {listed['entries']} jtis, "
          f"{listed['bytes']:,} bytes; on disk (MiB): "
          + ", ".join(f"{k} {v:.1f}" for k, v in report["disk_mib"].items()))
    for line in report["daemon_log_errors"]:
        print(f"  daemon log: {line}")
    print("\nchecks:")
    for name, passed in report["checks"].items():
        print(f"  {'ok    ' if passed else 'FAILED'} {name}")
    print(f"run time {report['run_seconds']:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=TASKS,
                        help=f"client tasks (default {TASKS})")
    parser.add_argument("--seconds", type=float, default=SECONDS,
                        help=f"measured seconds after the warm-up (default {SECONDS:g})")
    parser.add_argument("--warmup", type=float, default=WARMUP_S,
                        help=f"seconds of load before RSS and latency count (default "
                             f"{WARMUP_S:g})")
    parser.add_argument("--steady", type=float, default=STEADY_S,
                        help=f"seconds of the same load without Revoke after the window, "
                             f"over which memory must stay flat (default {STEADY_S:g})")
    parser.add_argument("--rss-growth", type=float, default=RSS_GROWTH_PCT,
                        help=f"largest RSS growth in the steady phase that counts as flat, "
                             f"percent (default {RSS_GROWTH_PCT:g})")
    parser.add_argument("--alg", choices=("ES256", "EdDSA"), default="ES256",
                        help="the root key's algorithm (default ES256: SoftHSM2 leaks "
                             f"~{SOFTHSM_EDDSA_LEAK_B} B per EdDSA signature, which the "
                             "report states and takes out of the memory check)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results as JSON to FILE ('-': stdout)")
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.seconds <= 0 or args.warmup <= 0 or args.steady <= 0:
        parser.error("--tasks, --seconds, --warmup and --steady must be positive")
    report = run(tasks=args.tasks, seconds=args.seconds, warmup=args.warmup,
                 steady=args.steady, rss_growth_pct=args.rss_growth, alg=args.alg)
    print_report(report)
    if args.json:
        write_json(report, args.json)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        sys.exit(load_main(sys.argv[2:]))
    sys.exit(main())
