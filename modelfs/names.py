"""Which object names become which paths (the rules are written out in docs/semantics.md).

Object stores allow names that no POSIX path can be. The rule is: a name maps to the path
of its '/'-separated components; a trailing '/' makes a directory placeholder; a name with
an empty, '.' or '..' component, a NUL, a component over 255 bytes, or text that is not
valid UTF-8 is skipped with one warning. An object ``a`` beside objects under ``a/`` is
hidden: the directory wins, so every path below it stays reachable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["ParsedName", "parse_object_name", "NAME_MAX"]

log = logging.getLogger(__name__)

NAME_MAX = 255


@dataclass(frozen=True, slots=True)
class ParsedName:
    parts: tuple[str, ...]
    is_dir: bool


def parse_object_name(name: str) -> ParsedName | str:
    """The path components of an object name, or a reason it cannot be a path."""
    is_dir = name.endswith("/")
    body = name[:-1] if is_dir else name
    if not body:
        return "empty name"
    if "\0" in body:
        return "contains a NUL byte"
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    parts = tuple(body.split("/"))
    for part in parts:
        if part == "":
            return "has an empty path component ('//' or a leading '/')"
        if part in (".", ".."):
            return f"has a {part!r} path component"
        if len(part.encode("utf-8")) > NAME_MAX:
            return f"has a component longer than {NAME_MAX} bytes"
    return ParsedName(parts, is_dir)
