#!/usr/bin/env python3
"""Run the long fuzzing profile of tests/test_fuzz.py and report it per target.

Each target runs in a pytest process of its own with ``MANDATE_FUZZ=long``: at
least --examples examples (default 100,000), no deadline, no example database.
A target that crashes its process is reported with the signal, and the others
go on. Per target: examples run, wall time, why it stopped (its examples, its
time budget, a failure) and the failure, with the log of its run.

Usage: fuzz.py [--examples N] [--target NAME ...] [--minutes-per-target M]
               [--jobs J] [--json FILE] [--log-dir DIR]

--minutes-per-target gives each target a time budget; once spent, the target
stops where it is and the report says how many examples it ran. --jobs runs
that many targets at once (each target is still one process).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_FILE = ROOT / "tests" / "test_fuzz.py"
TARGETS = ("chains", "pops", "revocation_lists", "trust_bundles", "policy_files",
           "config_files", "delegate", "revoke", "admin", "rpc_bytes")
# Daemon targets first, so that with --jobs 2 the slow ones start at once.
ORDER = ("delegate", "chains", "revoke", "policy_files", "admin", "rpc_bytes",
         "revocation_lists", "config_files", "pops", "trust_bundles")
HARD_LIMIT_S = 6 * 3600  # no target runs longer than this, whatever it was asked


@dataclass
class Result:
    target: str
    examples: int | None  # None: the process ended before reporting
    seconds: float
    stopped: str  # "examples", "time budget", "failure" or "crash"
    failure: str
    log: str

    @property
    def ok(self) -> bool:
        return self.stopped in ("examples", "time budget") and not self.failure


def run_target(target: str, *, examples: int, budget_s: float | None, logs: Path) -> Result:
    report = logs / f"{target}.jsonl"
    log = logs / f"{target}.log"
    report.unlink(missing_ok=True)
    env = {**os.environ, "MANDATE_FUZZ": "long", "MANDATE_FUZZ_EXAMPLES": str(examples),
           "MANDATE_FUZZ_REPORT": str(report)}
    if budget_s:
        env["MANDATE_FUZZ_SECONDS"] = str(budget_s)
    command = [sys.executable, "-m", "pytest", f"{TEST_FILE}::test_fuzz_{target}", "-q",
               "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]
    start = time.perf_counter()
    with open(log, "wb") as out:
        try:
            proc = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=HARD_LIMIT_S if not budget_s else budget_s + 1800,
                                  check=False)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.perf_counter() - start
    lines = report.read_text().splitlines() if report.exists() else []
    if not lines:
        why = ("it ran past its hard time limit" if code is None
               else f"killed by signal {-code}" if code < 0
               else f"exit status {code} before any report")
        return Result(target, None, round(seconds, 1), "crash", why, str(log))
    line = json.loads(lines[-1])
    failure = line["failure"]
    if not failure and code != 0:
        failure = f"pytest exit status {code} after the target (see the log)"
    return Result(target, int(line["examples"]), float(line["seconds"]),
                  "failure" if failure else line["stopped"], failure, str(log))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100_000,
                        help="examples per target (default 100,000)")
    parser.add_argument("--target", action="append", choices=TARGETS,
                        help="a target to run (repeatable; default: all)")
    parser.add_argument("--minutes-per-target", type=float, default=None,
                        help="stop a target after this long and report what it ran")
    parser.add_argument("--jobs", type=int, default=1, help="targets run at once (default 1)")
    parser.add_argument("--json", type=Path, help="write the summary as JSON to this file")
    parser.add_argument("--log-dir", type=Path, help="where each target's log goes")
    args = parser.parse_args()
    if args.examples < 1 or args.jobs < 1:
        parser.error("--examples and --jobs must be at least 1")
    targets = [t for t in ORDER if t in (args.target or TARGETS)]
    logs = args.log_dir or Path(tempfile.mkdtemp(prefix="mandate-fuzz-"))
    logs.mkdir(parents=True, exist_ok=True)
    budget_s = args.minutes_per_target * 60 if args.minutes_per_target else None

    started = datetime.datetime.now(datetime.UTC)
    wall = time.perf_counter()
    todo: queue.Queue[str] = queue.Queue()
    for target in targets:
        todo.put(target)
    results: dict[str, Result] = {}
    lock = threading.Lock()

    def worker() -> None:
        while True:
            try:
                target = todo.get_nowait()
            except queue.Empty:
                return
            result = run_target(target, examples=args.examples, budget_s=budget_s, logs=logs)
            with lock:
                results[target] = result
                print(f"{target}: {result.examples} examples in {result.seconds:.0f} s "
                      f"({result.stopped}){' FAILED' if not result.ok else ''}", flush=True)

    workers = [threading.Thread(target=worker) for _ in range(min(args.jobs, len(targets)))]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()

    ordered = [results[t] for t in TARGETS if t in results]
    print(f"\n{'target':<18}{'examples':>10}{'seconds':>10}{'per s':>8}  stopped / result")
    for r in ordered:
        rate = f"{r.examples / r.seconds:.0f}" if r.examples and r.seconds else "-"
        shown = "-" if r.examples is None else f"{r.examples:,}"
        print(f"{r.target:<18}{shown:>10}{r.seconds:>10.0f}{rate:>8}  {r.stopped}"
              + ("" if r.ok else f"  FAILED: {r.failure.splitlines()[0][:120]}"))
    print(f"\nlogs: {logs}")
    if args.json:
        summary = {
            "profile": "long", "examples_per_target": args.examples,
            "minutes_per_target": args.minutes_per_target, "jobs": args.jobs,
            "started": started.isoformat(timespec="seconds"),
            "wall_seconds": round(time.perf_counter() - wall, 1),
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "targets": [asdict(r) for r in ordered],
            "failures": sum(not r.ok for r in ordered),
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(r.ok for r in ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
