"""Logging setup: readable lines by default, one JSON object per line for clusters.

Nothing modelfs logs contains credentials: backends never put request headers or tokens
into messages, and this module adds none. In the text format every control character of a
message (an object name may hold a newline) is escaped, so one record is always one line and
no name can forge a log line; the JSON format escapes them as JSON does.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import IO

__all__ = ["setup_logging", "JsonFormatter", "TextFormatter", "escape"]

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` on one line: control characters become ``\\n``, ``\\x1b``, ``\\u2028``...
    Backslashes are kept as they are (names with backslashes stay readable); the escapes are
    for reading, not for decoding back."""
    return _CONTROL_RE.sub(_escape_one, text)


class JsonFormatter(logging.Formatter):
    """``{"time": ..., "level": ..., "logger": ..., "message": ...}`` per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE``, the message escaped to one line; a traceback's lines are
    indented, so no line of it can pass for a record of its own."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - the base's name
        copy = logging.makeLogRecord(record.__dict__)
        copy.message = escape(record.message)
        return super().formatMessage(copy)

    def formatException(self, ei: object) -> str:  # noqa: N802 - the base's name
        text = super().formatException(ei)  # type: ignore[arg-type]
        return "\n".join("    " + escape(line) for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - the base's name
        return "\n".join("    " + escape(line) for line in stack_info.splitlines())


def setup_logging(level: str, fmt: str = "text", stream: IO[str] | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("modelfs").setLevel(level.upper())
