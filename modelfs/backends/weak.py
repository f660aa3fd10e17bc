"""Weak versions: validators that do not prove two objects hold the same bytes.

A GCS generation, an S3 ETag and an HTTP strong ETag change with every new content. An HTTP
file without a strong ETag is versioned by its size and Last-Modified (a second-granular
date, possibly absent), a ``file://`` file by its inode, size and nanosecond mtime/ctime: a
replacement can keep all of them, and its blocks on disk would then be served as the new
file's. So unless the user opts in (``--persist-weak-versions``) a weak version carries a
marker of this daemon run: within the run blocks are cached as usual, and the next daemon,
with another marker, never reuses them (old-version blocks are evicted first).
"""

from __future__ import annotations

import secrets

__all__ = ["run_marker", "without_run_marker"]

_MARK = "#run="


def run_marker(persist: bool) -> str:
    """What a backend appends to its weak versions: empty when they may persist, else a
    random marker of this run (one per backend, which is one per daemon)."""
    return "" if persist else _MARK + secrets.token_hex(6)


def without_run_marker(version: str) -> str:
    """The validator itself, as sent to the server."""
    return version.split(_MARK, 1)[0]
