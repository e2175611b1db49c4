"""A short run of the soak (bench/soak.py) in the suite: the daemon as
`mandate serve` with SoftHSM2, 8 client tasks for 5 s, and every check the
long run makes — no unintended outcome, the audit log equal to the calls,
a clean stop. The audit comparison itself is checked against tampered logs.
Figures (throughput, latency, memory over minutes) come from the long run."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, NamedTuple

import pytest
from helpers import load_bench

soak: Any = load_bench("soak")


@pytest.mark.slow
def test_a_short_soak_passes_every_check() -> None:
    # Memory cannot settle in 5 s; a gross leak still shows against 100 %.
    report = soak.run(tasks=8, seconds=5.0, warmup=1.0, rss_growth_pct=100.0)
    failed = [name for name, passed in report["checks"].items() if not passed]
    assert not failed, (failed, report["unintended"], report["daemon_log_errors"])
    calls = Counter({name.split()[0]: n for name, n in report["calls"].items()})
    assert set(calls) == {"delegate", "deny", "revoke"}  # the whole mix ran
    assert report["audit"]["links_handed_out"] == calls["delegate"] + 1
    assert set(report["rss_mib"]["start"]) == {"front end", "issuer"}
    assert all(value > 0 for value in report["rss_mib"]["end"].values())
    assert all(math.isfinite(kind["p99"]) for kind in report["latency_ms"].values())


class Record(NamedTuple):
    event: str
    jti: str = ""


TALLY: dict[str, Any] = {"delegated": ["j1", "j2", "j3"], "revoked": ["j1"], "denied": 2}
LOG = [Record("key"), Record("start"), Record("delegate", "j1"), Record("delegate", "j2"),
       Record("delegate", "j3"), Record("delegate", "extra"), Record("deny"), Record("deny"),
       Record("revoke", "j1"), Record("stop")]


def test_the_audit_comparison_accepts_the_exact_log() -> None:
    assert all(soak.audit_checks(TALLY, LOG, extra_links=1).values())


@pytest.mark.parametrize(
    ("log", "failing"),
    [
        ([r for r in LOG if r != Record("delegate", "j2")],
         {"a delegate record per link handed out", "records = successful calls + denials"}),
        ([*LOG, Record("delegate", "j2")],
         {"a delegate record per link handed out", "records = successful calls + denials"}),
        ([*LOG, Record("deny")],
         {"a deny record per denial", "records = successful calls + denials"}),
        ([r for r in LOG if r.event != "revoke"],
         {"a revoke record per revoked jti", "records = successful calls + denials"}),
        ([*LOG, Record("revoke", "j3")],
         {"a revoke record per revoked jti", "records = successful calls + denials"}),
    ],
    ids=["a-link-missing", "a-link-twice", "a-denial-too-many", "a-revocation-missing",
         "a-revocation-not-asked-for"],
)
def test_the_audit_comparison_catches_a_tampered_log(log: list[Record],
                                                     failing: set[str]) -> None:
    checks = soak.audit_checks(TALLY, log, extra_links=1)
    assert {name for name, passed in checks.items() if not passed} == failing
