"""The configuration reference documents every option the code has."""

from __future__ import annotations

from pathlib import Path

from modelfs.config import OPTIONS

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_option_is_documented() -> None:
    text = DOC.read_text()
    missing = []
    for opt in OPTIONS:
        for spelling in (f"`--{opt.name}", f"`{opt.env}`", f"`{opt.name}`"):
            if spelling not in text:
                missing.append(f"{opt.name}: {spelling}")
    assert not missing, "not in docs/configuration.md: " + ", ".join(missing)
