"""The startup scan: what an earlier run left in the blocks directory. Blocking; one thread.

It lists ``blocks/<object>/<file>`` without following a symlink anywhere: a symlink found
where a directory or a block file belongs is removed (the link, never its target), so
nothing outside the cache dir is ever listed, counted or deleted. Temporary files of a
crashed write are deleted (no other process writes here while we hold the lock), except
our own: the scan runs beside this process's writes.
"""

from __future__ import annotations

import os
import stat

from modelfs.cache.disk_format import is_own_temp

__all__ = ["scan_blocks", "scan_object"]


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def scan_blocks(blocks_dir: str) -> list[tuple[str, int]]:
    """``(relative path, size)`` of every block file, least recently used (atime) first."""
    found: list[tuple[float, str, int]] = []
    try:
        objects = list(os.scandir(blocks_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for obj_dir in objects:
        if obj_dir.is_symlink():
            _remove(obj_dir.path)
            continue
        if obj_dir.is_dir(follow_symlinks=False):
            found += _scan_dir(obj_dir.path, obj_dir.name)
    found.sort()
    return [(rel, size) for _, rel, size in found]


def scan_object(blocks_dir: str, obj: str) -> list[tuple[str, int]]:
    """``(relative path, size)`` of the block files of one object (its directory ``obj``),
    least recently used first: what the whole scan would find there."""
    path = os.path.join(blocks_dir, obj)
    try:
        st = os.lstat(path)
    except OSError:
        return []
    if stat.S_ISLNK(st.st_mode):
        _remove(path)
        return []
    if not stat.S_ISDIR(st.st_mode):
        return []
    found = _scan_dir(path, obj)
    found.sort()
    return [(rel, size) for _, rel, size in found]


def _scan_dir(path: str, obj: str) -> list[tuple[float, str, int]]:
    """(atime, relative path, size) of the block files in one object's directory."""
    found: list[tuple[float, str, int]] = []
    try:
        entries = list(os.scandir(path))
    except OSError:
        return found
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            _remove(entry.path)
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if entry.name.endswith(".tmp"):
            if not is_own_temp(entry.name):  # ours are being written right now
                _remove(entry.path)  # left by a crash
            continue
        found.append((st.st_atime, f"{obj}/{entry.name}", st.st_size))
    return found
