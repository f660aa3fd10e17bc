"""--log-format json writes one JSON object per line; text stays human-readable."""

from __future__ import annotations

import io
import json
import logging

from modelfs.logs import setup_logging


def test_json_lines() -> None:
    out = io.StringIO()
    setup_logging("info", "json", out)
    try:
        logging.getLogger("modelfs.test").info("mounted %s at %s", "gs://b/p", "/mnt")
        logging.getLogger("modelfs.test").debug("not shown at info")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("modelfs.test").exception("failed")
    finally:
        setup_logging("warning", "text")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "mounted gs://b/p at /mnt"
    assert first["level"] == "info" and first["logger"] == "modelfs.test" and "T" in first["time"]
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]


def test_text_lines() -> None:
    out = io.StringIO()
    setup_logging("debug", "text", out)
    try:
        logging.getLogger("modelfs.x").debug("hello %d", 3)
    finally:
        setup_logging("warning", "text")
    line = out.getvalue().strip()
    assert line.endswith("DEBUG modelfs.x: hello 3")
    assert not line.startswith("{")


def test_text_lines_cannot_be_forged() -> None:
    """An object name with a newline (legal in GCS and on Linux) stays inside its own record."""
    out = io.StringIO()
    setup_logging("info", "text", out)
    name = "a\n2026-01-01 00:00:00,000 ERROR modelfs: forged\r\x1b[2J\u2028z"
    try:
        logging.getLogger("modelfs.x").warning("read of %s failed", name)
        try:
            raise ValueError(f"bad {name}")
        except ValueError:
            logging.getLogger("modelfs.x").exception("failed on %s", name)
    finally:
        setup_logging("warning", "text")
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(r"read of a\n2026-01-01 00:00:00,000 ERROR modelfs: forged\r\x1b[2J\u2028z failed")
    assert lines[1].endswith(r"failed on a\n2026-01-01 00:00:00,000 ERROR modelfs: forged\r\x1b[2J\u2028z")
    assert all(line.startswith("    ") for line in lines[2:]), lines  # the traceback, indented
    assert not any(line.startswith("2026-01-01") for line in lines)
