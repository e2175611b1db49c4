"""Log output of ``mandate serve``: one JSON object per line, or text for humans.

A JSON line carries ``time`` (UTC, ISO 8601), ``level``, ``logger``,
``message`` and every field the call passed as ``extra`` (caller, sub, jti,
decision, reason, method, code, duration_ms, ...). Fields named like a
secret are replaced, a last guard: the daemon never passes a PIN or key to
a log call in the first place.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from ._errors import ConfigError

FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"
SECRET_FIELDS = frozenset({"pin", "user_pin", "so_pin", "password", "passphrase", "secret",
                           "private_key", "token_pin"})

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName",
}


# One encoder for all lines (json.dumps with options builds one per call).
_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False, separators=(",", ":"))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    _second: tuple[int, str] = (-1, "")  # the last whole second, formatted

    def _time(self, created: float, msecs: float) -> str:
        second, text = self._second
        if int(created) != second:
            second = int(created)
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)  # one assignment: safe across threads
        return f"{text}.{int(msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._time(record.created, record.msecs),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name in _STANDARD or name.startswith("_") or name in entry:
                continue
            entry[name] = REDACTED if name.lower() in SECRET_FIELDS else value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _ENCODER.encode(entry)


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ConfigError(f'config: [server] log_format must be "json" or "text", '
                      f"not {log_format!r}")


def configure_logging(log_format: str, *, level: int = logging.INFO,
                      stream: TextIO | None = None) -> logging.Handler:
    """Send all logging to ``stream`` (stderr) in ``log_format``, replacing the
    root logger's handlers; returns the handler."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
