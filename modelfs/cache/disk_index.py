"""Which block files the disk cache holds, in what order they go, and which versions stay.

Pure bookkeeping on the trio thread: no I/O. Every method that forgets files returns their
relative paths, and the caller deletes them (in a worker thread).

Block files are named ``<object hash>/<version hash>-<index>``, so the index knows each
file's object and version without reading it. Two rules decide what goes:

- **The caps.** Files are kept in LRU order and the least recently used go first once
  their sizes add up to more than the capacity, or once there are more than ``max_files``
  (the memory bound counts that many entries: small files, such as the last block of each
  small object, would otherwise let the index grow without one). Files of a version that an open file pins
  are in a second LRU that is drawn from only when the first is empty: blocks of versions
  nobody has open are dropped first.
- **Versions.** An object's *current* version is the one last opened (pinned) or written.
  Blocks of its other versions can never be served to a new open, so they are dropped at
  once, unless an open file still pins that version; when that file closes they go too.
  After a restart the startup scan cannot know which version is current: it puts every
  version but each object's most recently written one at the old end of the LRU, and the
  object's next open or write drops them.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

__all__ = ["DiskIndex", "split_rel"]


def split_rel(rel: str) -> tuple[str, str]:
    """(object hash, version hash) of a block file's relative path."""
    obj, _, name = rel.partition("/")
    return obj, name.partition("-")[0]


class DiskIndex:
    """Block files by relative path → size on disk, with the LRU order and version rules."""

    def __init__(self, capacity: int, *, max_files: int | None = None) -> None:
        self.capacity = capacity
        self.max_files = max_files if max_files is not None else capacity  # (no file is under 1 byte)
        self._free: OrderedDict[str, int] = OrderedDict()  # files of unpinned versions, LRU first
        self._pinned: OrderedDict[str, int] = OrderedDict()  # files of pinned versions, LRU first
        self._bytes = 0
        self._versions: dict[str, dict[str, set[str]]] = {}  # object → version → files
        self._current: dict[str, str] = {}  # object → its current version
        self._pins: Counter[tuple[str, str]] = Counter()  # (object, version) → open files
        # Recency ticks, so files moving between the two lists keep their place in LRU order.
        self._used_at: dict[str, int] = {}
        self._newest_tick = 0
        self._oldest_tick = 0
        # One set per listing of the cache dir in progress: the files forgotten meanwhile,
        # which that listing may still show (see removed_while).
        self._listings: list[set[str]] = []
        # Files this run wrote or read that a cap pushed out again (``modelfs warm`` fails on them).
        self.evicted_this_run = 0

    # --- lookups

    def __contains__(self, rel: object) -> bool:
        return rel in self._free or rel in self._pinned

    def __len__(self) -> int:
        return len(self._free) + len(self._pinned)

    def __iter__(self) -> Iterator[str]:
        yield from self._free
        yield from self._pinned

    @property
    def used(self) -> int:
        """Bytes of the files the index holds."""
        return self._bytes

    def touch(self, rel: str) -> None:
        """Mark a file most recently used."""
        for lru in (self._free, self._pinned):
            if rel in lru:
                lru.move_to_end(rel)
                self._newest_tick += 1
                self._used_at[rel] = self._newest_tick
                return

    # --- adding and removing

    def add(self, rel: str, size: int) -> list[str]:
        """Hold a file (most recently used); the files the cap pushes out (maybe ``rel`` itself)."""
        if rel in self:
            self.touch(rel)
            return []
        if size > self.capacity:
            return [rel]
        self._insert(rel, size, recent=True)
        return self._over_cap()

    @contextmanager
    def removed_while(self) -> Iterator[set[str]]:
        """The files forgotten (evicted, dropped, found bad) while a listing of the cache dir
        runs in a thread: pass them to :meth:`add_scanned` with that listing, which may still
        show them (listed before their file was deleted), so they are not held again."""
        removed: set[str] = set()
        self._listings.append(removed)
        try:
            yield removed
        finally:
            self._listings = [other for other in self._listings if other is not removed]

    def add_scanned(
        self, found: Iterable[tuple[str, int]], removed: set[str] | frozenset[str] = frozenset()
    ) -> list[str]:
        """Files an earlier run left, oldest first: they go before every file known already.
        ``removed``: files forgotten since the listing began (see :meth:`removed_while`).

        Per object, every version but the one listed last (the most recently written) goes
        to the old end: it is probably stale, and the object's next open decides.
        """
        fresh = [(rel, size) for rel, size in found if rel not in self and rel not in removed]
        victims = [rel for rel, size in fresh if size > self.capacity]
        fresh = [(rel, size) for rel, size in fresh if size <= self.capacity]
        newest: dict[str, str] = {}
        for rel, _ in fresh:
            obj, version = split_rel(rel)
            newest[obj] = version

        def probably_stale(rel: str) -> bool:
            obj, version = split_rel(rel)
            return version != self._current.get(obj, newest[obj])

        stale = [(rel, size) for rel, size in fresh if probably_stale(rel)]
        kept = [(rel, size) for rel, size in fresh if not probably_stale(rel)]
        # Inserted at the old end in reverse, so the final order is the stale files, then the
        # kept ones oldest first, then every file this run has already touched.
        for rel, size in reversed(kept):
            self._insert(rel, size, recent=False)
        for rel, size in reversed(stale):
            self._insert(rel, size, recent=False)
        for obj in {split_rel(rel)[0] for rel, _ in stale}:
            if obj in self._current:  # opened or written during the scan: its current version is known
                victims += self.set_current(obj, self._current[obj])
        return victims + self._over_cap()

    def remove(self, rel: str) -> bool:
        """Forget a file (it was deleted or found bad); False if it was not held."""
        size = self._free.pop(rel, None)
        if size is None:
            size = self._pinned.pop(rel, None)
        if size is None:
            return False
        del self._used_at[rel]
        self._bytes -= size
        for removed in self._listings:
            removed.add(rel)
        obj, version = split_rel(rel)
        files = self._versions[obj][version]
        files.discard(rel)
        if not files:
            del self._versions[obj][version]
            if not self._versions[obj]:
                del self._versions[obj]
                if (obj, self._current.get(obj)) not in self._pins:
                    self._current.pop(obj, None)  # (else one entry per object ever seen would stay)
        return True

    def clear(self) -> None:
        """Forget every file (the cache dir was lost); pins and current versions stay."""
        for removed in self._listings:
            removed.update(self)
        self._free.clear()
        self._pinned.clear()
        self._versions.clear()
        self._used_at.clear()
        self._bytes = 0

    # --- versions

    def pin(self, obj: str, version: str) -> list[str]:
        """An open file pins ``version`` of ``obj``: it becomes current; unpinned others go."""
        self._pins[(obj, version)] += 1
        if self._pins[(obj, version)] == 1:
            for rel in self._versions.get(obj, {}).get(version, ()):
                self._pinned[rel] = self._free.pop(rel)
        return self.set_current(obj, version)

    def unpin(self, obj: str, version: str) -> list[str]:
        """An open file of ``version`` closed; the version's files go if it is not current."""
        self._pins[(obj, version)] -= 1
        if self._pins[(obj, version)] > 0:
            return []
        del self._pins[(obj, version)]
        files = sorted(self._versions.get(obj, {}).get(version, ()))
        if self._current.get(obj) != version:
            for rel in files:
                self.remove(rel)
            return files
        if files:  # back among the unpinned, each in its place in LRU order
            moved = [(rel, self._pinned.pop(rel)) for rel in sorted(files, key=self._used_at.__getitem__)]
            merged = heapq.merge(self._free.items(), moved, key=lambda item: self._used_at[item[0]])
            self._free = OrderedDict(merged)
        return []

    def set_current(self, obj: str, version: str) -> list[str]:
        """``version`` is the object's current one (opened or written): drop unpinned others."""
        if self._current.get(obj) == version and len(self._versions.get(obj, ())) <= 1:
            return []
        self._current[obj] = version
        stale = [
            rel
            for other, files in self._versions.get(obj, {}).items()
            if other != version and (obj, other) not in self._pins
            for rel in files
        ]
        for rel in stale:
            self.remove(rel)
        return stale

    def written(self, obj: str, version: str) -> list[str]:
        """A block of ``version`` was written: unless an open file pins it (then its open
        already made it current), it is the current version now."""
        if (obj, version) in self._pins:
            return []
        return self.set_current(obj, version)

    def is_pinned(self, rel: str) -> bool:
        return rel in self._pinned

    def limit(self, capacity: int, *, room: int = 0) -> list[str]:
        """Keep to ``capacity`` bytes from now on (the file system holds less than the cap it
        was made with), with ``room`` bytes left free beside the files held; the files that go,
        least recently used first and those of pinned versions last, as the caps take them."""
        self.capacity = capacity
        return self._over_cap(room)

    # --- internals

    def _insert(self, rel: str, size: int, *, recent: bool) -> None:
        obj, version = split_rel(rel)
        lru = self._pinned if (obj, version) in self._pins else self._free
        lru[rel] = size
        if recent:
            self._newest_tick += 1
            self._used_at[rel] = self._newest_tick
        else:
            lru.move_to_end(rel, last=False)
            self._oldest_tick -= 1
            self._used_at[rel] = self._oldest_tick
        self._bytes += size
        self._versions.setdefault(obj, {}).setdefault(version, set()).add(rel)

    def _over_cap(self, room: int = 0) -> list[str]:
        """Evict until the files held and ``room`` more bytes fit the caps (or none is left)."""
        victims: list[str] = []
        while self and (self._bytes + room > self.capacity or len(self) > self.max_files):
            victims.append(self._evict_one())
        return victims

    def _evict_one(self) -> str:
        """Forget the least recently used file, of an unpinned version if there is one."""
        rel = next(iter(self._free if self._free else self._pinned))
        if self._used_at[rel] > 0:  # written or read by this run (an earlier run's are below 0)
            self.evicted_this_run += 1
        self.remove(rel)
        return rel
