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


def test_no_text_claims_warm_verifies_every_object() -> None:
    """The README said warm verifies "CRC32C/MD5 of every object", and its --help "verify
    every object": only gs:// objects and s3:// objects uploaded with a checksum carry one it
    can check; an http(s):// or file:// object is reported "cached (no checksum to verify)"."""
    import re

    from modelfs.cli import _parser

    root = DOC.parents[1]
    claim = re.compile(
        r"(verif\w*|checks?)\s+(CRC32C/MD5|\w+ checksum)\s+of\s+every\s+object"
        r"|every\s+object's\s+(checksum|CRC32C)|verify\s+every\s+object",
        re.IGNORECASE,
    )
    warm = _parser()._subparsers._group_actions[0].choices["warm"]  # type: ignore[union-attr]
    texts = {str(p.relative_to(root)): p.read_text() for p in [root / "README.md", *sorted(root.glob("docs/*.md"))]}
    texts["modelfs warm --help"] = warm.format_help()
    texts["modelfs --help"] = _parser().format_help()
    found = [
        f"{where}: {m.group(0)!r}" for where, text in texts.items() for m in claim.finditer(" ".join(text.split()))
    ]
    assert not found, found


def test_the_eager_help_says_when_it_starts() -> None:
    """``--eager``'s help said it streams a file "when it is opened"; it starts once a reader
    reads at random (files.py: two seeks among the last 64 reads), as the docs say."""
    help_text = next(opt.help for opt in OPTIONS if opt.name == "eager")
    assert "when it is opened" not in help_text
    assert "reads at random" in help_text and "reads at random" in DOC.read_text()
