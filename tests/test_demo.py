"""The README's demo must keep working: run it as a user would."""

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


def test_demo_runs_and_every_step_behaves() -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all steps behaved as shown" in result.stdout
    for code in ("uses_exhausted", "denied", "pop_invalid", "expired", "revoked"):
        assert f"{code}:" in result.stdout
