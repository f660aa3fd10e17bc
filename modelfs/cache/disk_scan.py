"""The startup scan: what an earlier run left in the blocks directory. Blocking; one thread.

It lists ``blocks/<object>/<file>`` without following a symlink anywhere: a symlink found
where a directory or a block file belongs is removed (the link, never its target), so
nothing outside the cache dir is ever listed, counted or deleted. Temporary files of a
crashed write are deleted (no other process writes here while we hold the lock), except
our own: the scan runs beside this process's writes.

What it returns is bounded by ``keep`` files, the most the index may hold (the memory bound
counts that many; modelfs.memlimit): an earlier run with a smaller ``--block-size``, or many
small objects, can leave more files than that in the same bytes. The least recently used
beyond ``keep`` are deleted as the listing goes (the index would drop them at once anyway),
but never a file this run may have written (modified since ``written_before``, the run's
start): those are listed, and the index decides.
"""

from __future__ import annotations

import heapq
import os
import stat
from collections.abc import Iterator

from modelfs.cache.disk_format import is_own_temp

__all__ = ["scan_blocks", "scan_object"]


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class _Newest:
    """The ``keep`` most recently used block files seen so far; older ones are deleted."""

    def __init__(self, blocks_dir: str, keep: int, written_before: float) -> None:
        self._blocks_dir = blocks_dir
        self._keep = keep
        self._written_before = written_before
        self._heap: list[tuple[float, str, int, float]] = []  # (atime, relative path, size, mtime), oldest on top
        # Pushed out but modified since the run began: this run's (the index holds them, or
        # dropped them), or an earlier run's under a clock that stepped back. Returned, not
        # deleted: the index skips the ones it holds and evicts the others by its caps.
        self._spared: list[tuple[float, str, int, float]] = []

    def add_dir(self, path: str, obj: str) -> None:
        for entry in _block_files(path, obj):
            if len(self._heap) < self._keep:
                heapq.heappush(self._heap, entry)
                continue
            oldest = heapq.heappushpop(self._heap, entry)
            if oldest[3] < self._written_before:
                _remove(os.path.join(self._blocks_dir, oldest[1]))
            else:
                self._spared.append(oldest)

    def oldest_first(self) -> list[tuple[str, int]]:
        return [(rel, size) for _, rel, size, _ in sorted(self._spared + self._heap)]


def scan_blocks(blocks_dir: str, keep: int, written_before: float) -> list[tuple[str, int]]:
    """``(relative path, size)`` of the block files (at most ``keep``, the most recently used),
    least recently used (atime) first."""
    newest = _Newest(blocks_dir, keep, written_before)
    try:
        with os.scandir(blocks_dir) as objects:
            for obj_dir in objects:
                if obj_dir.is_symlink():
                    _remove(obj_dir.path)
                elif obj_dir.is_dir(follow_symlinks=False):
                    newest.add_dir(obj_dir.path, obj_dir.name)
    except OSError:  # (the blocks directory is gone: nothing to add)
        pass
    return newest.oldest_first()


def scan_object(blocks_dir: str, obj: str, keep: int, written_before: float) -> list[tuple[str, int]]:
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
    newest = _Newest(blocks_dir, keep, written_before)
    newest.add_dir(path, obj)
    return newest.oldest_first()


def _block_files(path: str, obj: str) -> Iterator[tuple[float, str, int, float]]:
    """(atime, relative path, size, mtime) of the block files in one object's directory."""
    try:
        with os.scandir(path) as entries:
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
                yield st.st_atime, f"{obj}/{entry.name}", st.st_size, st.st_mtime
    except OSError:
        return
