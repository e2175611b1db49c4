#!/usr/bin/env python3
"""Delegate throughput with the state and the audit log on PostgreSQL against
SQLite, in one run (docs/performance.md, "Signer state: PostgreSQL vs SQLite").

Two daemons built as ``bench/delegate.py`` builds its daemon (same config,
own SoftHSM2 token each, mutual TLS on 127.0.0.1, the shipped ``[server]``
defaults), differing only in ``[state]``: one keeps SQLite files in its
directory, the other uses a PostgreSQL database on a private server started
here (``initdb`` in a temporary directory, loopback only, fsync on, default
settings otherwise) or the one ``--postgres-url`` names (password from
PGPASSWORD). Load comes from the same client process as in delegate.py: a
closed loop keeping 1 or 8 calls in flight, in alternating rounds.

After the load, one link from each daemon is verified with verifier_sdk,
both daemons are stopped, and each audit log must hold one ``delegate``
record per successful call and verify against its checkpoints.

Run: ``python bench/storage.py [--seconds N] [--rounds N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

from _report import write_json  # bench/, first on sys.path when run
from delegate import (
    PIN_ENV,
    Server,
    add_round_options,
    check_daemon,
    load_holder,
    make_pki,
    make_server_dir,
    process_cpu_s,
    round_plan,
    run_rounds,
    server_process,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres_server import PostgresCluster  # the tests' private server

BACKENDS = ("sqlite", "postgresql")
CONCURRENCY = (1, 8)
PASSWORD_ENV = "MANDATE_BENCH_PG_PASSWORD"  # noqa: S105 - a variable name


@contextmanager
def postgres(url: str | None) -> Iterator[tuple[str, str, int | None]]:
    """(database URL, password, postmaster pid or None): a fresh database on a
    private server, or the server ``url`` names."""
    if url is not None:
        yield url, os.environ.get("PGPASSWORD", ""), None
        return
    cluster = PostgresCluster.start(fsync=True)
    try:
        pid = int((cluster.root / "data" / "postmaster.pid").read_text().split()[0])
        yield cluster.create_database(), cluster.password, pid
    finally:
        cluster.stop()


def use_postgres(directory: Path, url: str) -> None:
    """Point a daemon directory's config at the database instead of its files."""
    config = directory / "signer.toml"
    text = config.read_text(encoding="utf-8")
    sqlite = '[state]\ndir = "state"\n'
    if sqlite not in text:
        raise RuntimeError(f"{config} has no [state] dir to replace")
    config.write_text(text.replace(
        sqlite, f'[state]\nurl = "{url}"\npassword_env = "{PASSWORD_ENV}"\n'), encoding="utf-8")


def audit_check(directory: Path, backend: str, url: str, password: str,
                bundle_jwks: str) -> tuple[int, bool]:
    """(delegate records, whether the log verifies) of a stopped daemon."""
    from signer._audit import AuditLocation, read_records, verify_log
    from signer._pg import PgAuditStore, PgDatabase
    from verifier_sdk import TrustBundle

    where: AuditLocation = directory / "state" / "audit.db"
    if backend == "postgresql":
        where = PgAuditStore(PgDatabase(url, password=password or None))
    report = verify_log(where, TrustBundle.from_jwks(bundle_jwks))
    return len(read_records(where, event="delegate")), report.ok


def trust_bundle(server: Server, pki: dict[str, Path]) -> str:
    import grpc

    from signer._proto.mandate.v1 import signer_pb2 as pb
    from signer._proto.mandate.v1 import signer_pb2_grpc as pb_grpc

    creds = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(), private_key=pki["client_key"].read_bytes(),
        certificate_chain=pki["client_cert"].read_bytes())
    with grpc.secure_channel(server.target, creds) as channel:
        reply = pb_grpc.SignerStub(channel).GetTrustBundle(pb.GetTrustBundleRequest(),
                                                           timeout=10)
    return str(reply.jwks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_round_options(parser, "backend")
    parser.add_argument("--postgres-url", help="an existing, empty database (its password in "
                                               "PGPASSWORD); default: a private server")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results as JSON to FILE ('-': stdout)")
    args = parser.parse_args(argv)
    rounds, window, warmup = round_plan(args)
    started = time.perf_counter()

    from signer._pg import PgDatabase, migrate

    holder, holder_jwk, payload = load_holder()
    pin = secrets.token_hex(8)
    pg_cpu_s = dict.fromkeys(CONCURRENCY, 0.0)
    checks: dict[str, dict[str, Any]] = {}

    with tempfile.TemporaryDirectory(prefix="mandate-bench-") as tmp, \
            postgres(args.postgres_url) as (url, password, postmaster), ExitStack() as stack:
        migrate(PgDatabase(url, password=password or None))
        env = {**os.environ, PIN_ENV: pin, PASSWORD_ENV: password}
        base = Path(tmp)
        pki = make_pki(base)
        directories = {backend: make_server_dir(base, backend, pki, pin) for backend in BACKENDS}
        use_postgres(directories["postgresql"], url)
        servers = {backend: stack.enter_context(server_process("daemon", directory, env))
                   for backend, directory in directories.items()}

        @contextmanager
        def postgres_cpu(backend: str, concurrency: int) -> Iterator[None]:
            """The private server's CPU seconds during a PostgreSQL run, into pg_cpu_s."""
            before = process_cpu_s(postmaster) if postmaster else 0.0
            yield
            if postmaster and backend == "postgresql":
                pg_cpu_s[concurrency] += process_cpu_s(postmaster) - before

        rows = run_rounds(servers, CONCURRENCY, rounds=rounds, window=window, warmup=warmup,
                          pki=pki, holder_jwk=holder_jwk, payload=payload, around=postgres_cpu)
        jwks = {}
        for backend in BACKENDS:
            check_daemon(servers[backend], pki, holder)
            jwks[backend] = trust_bundle(servers[backend], pki)
        stack.close()  # stop both daemons: their audit logs are flushed and checkpointed
        for backend in BACKENDS:
            ok_calls = sum(r.ok_total for (b, _), row in rows.items() if b == backend
                           for r in row.runs) + 1
            recorded, verified = audit_check(directories[backend], backend, url, password,
                                             jwks[backend])
            checks[backend] = {"ok_delegate_calls": ok_calls, "audit_records": recorded,
                               "equal": recorded == ok_calls, "log_verifies": verified}
    elapsed = time.perf_counter() - started

    print(f"Signer state benchmark — {os.cpu_count()} CPU(s), Python "
          f"{platform.python_version()}, psycopg {version('psycopg')}; Delegate over loopback "
          f"mTLS, one client process; {rounds} round(s) × {window:.1f} s per cell after "
          f"{warmup:.1f} s warm-up")
    print(f"{'state':<10} {'in flight':>9} {'calls/s':>8} {'rounds calls/s':>16} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'errors':>6} {'signer CPU µs/call':>18} {'PG CPU µs/call':>14}")
    cells: dict[str, Any] = {}
    for concurrency in CONCURRENCY:
        for backend in BACKENDS:
            row = rows[(backend, concurrency)]
            calls = sum(r.ok_total for r in row.runs)
            pg_us = (1e6 * pg_cpu_s[concurrency] / max(calls, 1)
                     if backend == "postgresql" and postmaster else None)
            spread = "/".join(f"{x:.0f}" for x in row.round_throughputs)
            print(f"{backend:<10} {concurrency:>9} {row.throughput:>8.0f} {spread:>16} "
                  f"{row.p50_ms:>7.2f} {row.p99_ms:>7.2f} {row.errors:>6} "
                  f"{row.server_cpu_us:>18.0f} {'-' if pg_us is None else f'{pg_us:.0f}':>14}")
            cells[f"{backend} {concurrency}"] = {
                "calls_per_s": round(row.throughput, 1),
                "rounds_calls_per_s": [round(x, 1) for x in row.round_throughputs],
                "p50_ms": round(row.p50_ms, 3), "p99_ms": round(row.p99_ms, 3),
                "errors": row.errors, "signer_cpu_us_per_call": round(row.server_cpu_us, 1),
                "postgres_cpu_us_per_call": None if pg_us is None else round(pg_us, 1),
            }
    print(f"\n{'in flight':>9} {'PostgreSQL / SQLite':>19} {'rounds':>11}")
    ratios: dict[str, Any] = {}
    for concurrency in CONCURRENCY:
        sqlite, pg = rows[("sqlite", concurrency)], rows[("postgresql", concurrency)]
        value = pg.throughput / sqlite.throughput
        per_round = [p / s for p, s in zip(pg.round_throughputs, sqlite.round_throughputs,
                                           strict=True)]
        ratios[str(concurrency)] = {"value": round(value, 3),
                                    "rounds": [round(x, 3) for x in per_round]}
        print(f"{concurrency:>9} {value:>19.2f} {'/'.join(f'{x:.2f}' for x in per_round):>11}")
    good = all(c["equal"] and c["log_verifies"] for c in checks.values())
    for backend, check in checks.items():
        print(f"checks ({backend}): a link verifies; audit log holds {check['audit_records']} "
              f"delegate records for {check['ok_delegate_calls']} successful calls "
              f"({'equal' if check['equal'] else 'DIFFERENT'}); the log "
              f"{'verifies' if check['log_verifies'] else 'does NOT verify'}")
    print(f"run time {elapsed:.0f} s")
    if args.json:
        write_json({
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "versions": {p: version(p) for p in ("grpcio", "psycopg", "python-pkcs11")},
            "method": {"rounds": rounds, "window_s": window, "warmup_s": warmup,
                       "postgres": "external" if args.postgres_url else "private, fsync on"},
            "cells": cells, "ratios_postgres_to_sqlite": ratios, "checks": checks,
            "run_seconds": round(elapsed, 1),
        }, args.json)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
