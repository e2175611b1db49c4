"""Shared by the benchmark scripts: how a run's figures leave the process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(result: dict[str, Any], destination: str) -> None:
    """The figures as JSON to ``destination`` (a file, or ``-`` for stdout)."""
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if destination == "-":
        print(text)
    else:
        Path(destination).write_text(text + "\n", encoding="utf-8")
