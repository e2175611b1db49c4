"""The README's demo must keep working: run it as a user would."""

import os
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo_offline.py"


def test_offline_demo_runs_and_every_step_behaves() -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all steps behaved as shown" in result.stdout
    for code in ("uses_exhausted", "denied", "pop_invalid", "expired", "revoked"):
        assert f"{code}:" in result.stdout


def test_the_end_to_end_demo_runs_on_real_parts_and_every_step_behaves() -> None:
    demo = DEMO.parent / "demo.py"
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    result = subprocess.run(
        [sys.executable, str(demo)], capture_output=True, text=True, timeout=240, check=False,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "all steps behaved as shown" in out
    assert "FAIL" not in out
    for shown in ("uses_exhausted", "denied", "pop_invalid", "expired", "revoked",
                  "capability_not_contained", "mandate audit verify"):
        assert shown in out
