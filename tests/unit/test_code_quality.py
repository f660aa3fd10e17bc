"""Lint, format and type checks run as tests, so the README's test command (and CI) enforces them.

The rule sets live in pyproject.toml ([tool.ruff], [tool.mypy]); these tests only run the tools.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed:\n{proc.stdout}{proc.stderr}", pytrace=False)


def test_ruff_check() -> None:
    _run("ruff", "check", "--no-cache", ".")


def test_ruff_format() -> None:
    _run("ruff", "format", "--check", "--no-cache", ".")


def test_mypy() -> None:
    _run("mypy", "modelfs")
