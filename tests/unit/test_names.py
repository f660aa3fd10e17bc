"""names.parse_object_name: every rule that decides whether an object name can be a path."""

from __future__ import annotations

import pytest

from modelfs.names import NAME_MAX, ParsedName, parse_object_name


@pytest.mark.parametrize(
    ("name", "parts", "is_dir"),
    [
        ("model.safetensors", ("model.safetensors",), False),
        ("a/b/c.bin", ("a", "b", "c.bin"), False),
        ("dir/", ("dir",), True),
        ("a/b/", ("a", "b"), True),
        ("with space/ünïcødé.json", ("with space", "ünïcødé.json"), False),
        ("...", ("...",), False),
        (".hidden/..x", (".hidden", "..x"), False),
        ("x" * NAME_MAX, ("x" * NAME_MAX,), False),
    ],
)
def test_ordinary_names_and_placeholders(name: str, parts: tuple[str, ...], is_dir: bool) -> None:
    """Ordinary names split on '/'; a trailing '/' makes a directory placeholder."""
    assert parse_object_name(name) == ParsedName(parts, is_dir)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty name"),
        ("/", "empty name"),
        ("a//b", "empty path component"),
        ("/a", "empty path component"),
        ("a//", "empty path component"),
        (".", "'.'"),
        ("a/./b", "'.'"),
        ("..", "'..'"),
        ("a/../b", "'..'"),
        ("../", "'..'"),
        ("a\0b", "NUL"),
        ("dir\0/", "NUL"),
        ("x" * (NAME_MAX + 1), "longer than 255"),
        ("a/" + "é" * 128, "longer than 255"),  # 128 characters, 256 bytes
        ("bad\udcffname", "UTF-8"),
    ],
)
def test_rejected_names(name: str, reason: str) -> None:
    """Each rule rejects with a reason string naming what is wrong."""
    result = parse_object_name(name)
    assert isinstance(result, str)
    assert reason in result
