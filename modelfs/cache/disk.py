"""The disk tier: checksummed block files that survive remounts, restarts and ``kill -9``.

:class:`DiskCache` is the part that runs on the trio thread and owns all of the tier's
shared state; it hands blocking work to worker threads and applies what they report. The
jobs are split (cf. mountpoint-s3's cache directory manager beside its ``DiskDataCache``):

- disk_dir.py: the directory, its safety checks and its lock; recreated if deleted;
- disk_format.py: the block file (header, O_DIRECT with its fallbacks), typed results;
- disk_index.py: the LRU index by bytes and which versions stay;
- disk_scan.py: the startup scan of what an earlier run left.

Layout: ``<root>/blocks/<hash of object key>/<hash of version>-<index>``. Lookups go
straight to the file system until the background scan after mount has put every file an
earlier run left into the index; from then on the index is the whole truth (the cache dir is
ours alone) and a block it does not know is a miss without a system call.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import trio

from modelfs.cache.disk_dir import CacheDir
from modelfs.cache.disk_format import (
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    PAGE,
    ReadOutcome,
    ReadResult,
    WriteResult,
    data_offset_for,
    read_block,
    write_block,
)
from modelfs.cache.disk_index import DiskIndex
from modelfs.cache.disk_scan import scan_blocks, scan_object
from modelfs.cache.memory import BlockKey
from modelfs.errors import MountError
from modelfs.memlimit import disk_index_files

__all__ = ["FORMAT_VERSION", "HEADER", "MAGIC", "PAGE", "DiskCache", "DiskStats"]

log = logging.getLogger(__name__)


@dataclass
class DiskStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    evictions: int = 0
    corrupt: int = 0
    write_errors: int = 0


_NAMED_WITHOUT_SIZE = 8 << 20
"""The default --block-size: its block files keep the names they had before names said the size."""

_KEEP_FREE_SHARE = 20
_KEEP_FREE_MAX = 1 << 30
"""Once its file system is full, the disk cache leaves 1/20 of it (at most 1 GiB) free: for
the log file beside it, for whoever else writes there, and for the writes in progress."""


def _space(path: str) -> tuple[int, int]:
    """(bytes free to this user, size) of the file system holding ``path``. Blocking."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 1 << 30 else f"{n / 2**20:,.1f} MiB"


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _key_bytes(key: BlockKey) -> bytes:
    return f"{key[0]}\n{key[1]}".encode("utf-8", "surrogateescape")


class DiskCache:
    """Block files under ``root`` capped at ``capacity`` bytes (data plus headers)."""

    def __init__(self, root: Path, capacity: int, *, block_size: int = _NAMED_WITHOUT_SIZE) -> None:
        self.root = root
        self.capacity = capacity
        self._block_size = block_size
        self.stats = DiskStats()
        self._dir = CacheDir(root)
        self._blocks_dir = self._dir.blocks
        self._index = DiskIndex(capacity, max_files=disk_index_files(capacity, block_size))
        self._started = time.time()  # block files modified since were written by this run
        self._warned_write = False
        self.last_write_error = ""  # why the last block write failed ("disk full", strerror)
        # Blocks :meth:`write` did not store, by object key, when set (``modelfs warm`` does).
        self.unwritten: Counter[str] | None = None
        # The file system filled up before the cap was reached (or is smaller than the cap):
        # from then on every write first measures the room there and makes room from the
        # least recently used blocks (_make_room), keeping the index's cap to what fits.
        self._fs_bound = False  # (warned about once, when set)
        self._writing = 0  # bytes of the block files being written in threads now
        self._write_landed = trio.lowlevel.ParkingLot()  # one of those writes ended
        self._write_slots = trio.Semaphore(4)  # writes measuring the room or writing
        # Once the file system is full, one write at a time measures the room and writes, so
        # what it measures is not taken by another meanwhile (one writer thread writes block
        # files nearly as fast as four: docs/architecture.md).
        self._room_lock = trio.Lock()
        # Reads get a deeper queue than writes: a warm sequential read keeps 8-12 block reads
        # in flight, and disks want a deep queue (docs/architecture.md). Writes stay at 4 so
        # they never crowd the GETs' CPU.
        self._read_limiter = trio.CapacityLimiter(16)
        self._limiter = trio.CapacityLimiter(4)  # writes, unlinks
        self._direct_io = True  # cleared (here, on the trio thread) once O_DIRECT is refused
        self._scanned = False  # the index holds every block file (set when the scan ends)
        self._listed: set[str] = set()  # objects whose files were listed before the scan ended
        self._enabled = True  # False once a lost cache dir could not be recreated
        self._doomed: list[str] = []  # files the version rules dropped, to delete
        self._doomed_added = trio.Event()
        self._recovering = trio.Lock()  # one recreation of a lost cache dir at a time
        self._generation = 0  # how many times the cache dir was recreated

    # --- lifetime

    def open(self) -> None:
        """Check, create (0700) and lock the cache dir; MountError (one line) if unusable.

        A cap larger than the cache dir's file system is warned about (once): the cache keeps
        to what fits there.
        """
        self._dir.open()
        try:
            _, fs_size = _space(str(self._blocks_dir))
        except OSError:
            return
        if fs_size < self.capacity:
            self._fs_bound = True
            log.warning(
                "--disk-cache (%s) is larger than the file system of the cache dir %s (%s): "
                "the disk cache keeps to what fits there, evicting its least recently used blocks",
                _size(self.capacity),
                self.root,
                _size(fs_size),
            )

    def close(self) -> None:
        self._dir.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The startup scan, then delete what the version rules drop, until cancelled."""
        task_status.started()
        await self.scan()
        while True:
            await self._doomed_added.wait()
            self._doomed_added = trio.Event()
            await self.settle()

    # --- names

    def _relpath(self, key: BlockKey) -> str:
        return f"{_hash(key[0])}/{self._version_tag(key[1])}-{key[2]}"

    def _version_tag(self, version: str) -> str:
        """The version part of a block file's name. It names the block size too: block 1 of a
        12 MiB object is [8, 12) MiB with 8 MiB blocks and [4, 8) MiB with 4 MiB ones, both
        4 MiB long, so a cache dir read with another --block-size must not find the other's
        files (they look like another version, and the version rules drop them)."""
        if self._block_size == _NAMED_WITHOUT_SIZE:
            return _hash(version)[:16]  # the default: names as before the size was part of them
        return _hash(f"{version}\nblock size {self._block_size}")[:16]

    @property
    def used(self) -> int:
        """Bytes of block files the index knows of."""
        return self._index.used

    @property
    def evicted_this_run(self) -> int:
        """Blocks this run wrote or read that the cap (or a full file system) pushed out again."""
        return self._index.evicted_this_run

    @property
    def limit(self) -> int:
        """The cap the cache keeps to: ``capacity``, or less once its file system is full."""
        return min(self.capacity, self._index.capacity)

    def contains(self, key: BlockKey) -> bool:
        """Whether the index knows this block (before the startup scan ends it may not yet,
        unless :meth:`prepare` listed the block's object)."""
        return self._enabled and self._relpath(key) in self._index

    async def prepare(self, obj_key: str) -> None:
        """Make :meth:`contains` right for ``obj_key``'s blocks before the startup scan ends.

        Right after a restart the scan may still be walking a large cache dir when the first
        file is opened; until then the index would not know that object's blocks, and small
        reads and joined read-ahead GETs would fetch from the backend what is on disk. So the
        first open of an object lists just its directory (what the scan would add there).
        """
        obj = _hash(obj_key)
        if self._scanned or obj in self._listed or not self._enabled:
            return
        self._listed.add(obj)
        with self._index.removed_while() as removed:
            found = await trio.to_thread.run_sync(
                scan_object,
                str(self._blocks_dir),
                obj,
                self._index.max_files,
                self._started,
                limiter=self._read_limiter,
            )
            victims = [] if self._scanned else self._index.add_scanned(found, removed)  # (else the scan added them)
        await self._unlink(victims, evicted=True)

    # --- versions

    def pin(self, obj_key: str, version: str) -> None:
        """An open file reads ``version`` of ``obj_key``: keep its blocks, drop unpinned others."""
        self._drop(self._index.pin(_hash(obj_key), self._version_tag(version)))

    def unpin(self, obj_key: str, version: str) -> None:
        """That file closed: the version's blocks go unless it is the object's current one."""
        self._drop(self._index.unpin(_hash(obj_key), self._version_tag(version)))

    def _drop(self, rels: list[str]) -> None:
        if rels:
            self._doomed += rels
            self._doomed_added.set()

    async def settle(self) -> None:
        """Delete the files the version rules dropped so far."""
        doomed, self._doomed = self._doomed, []
        await self._unlink(doomed, evicted=True)

    # --- reads

    async def read_into(self, key: BlockKey, dest: memoryview, *, direct: bool = True) -> bool:
        """Fill ``dest`` from the block file; False (a miss) if it is absent or fails any check.

        ``direct``: read with O_DIRECT (read-ahead of a sequential run: least CPU, no second
        copy in the page cache). Otherwise read through the page cache, which then keeps the
        block for the next random read of it: with O_DIRECT, random reads over more than the
        memory budget each re-read a whole block from the device.
        """
        rel = self._relpath(key)
        if not self._enabled or (self._scanned and rel not in self._index):
            self.stats.misses += 1
            return False
        path = str(self._blocks_dir / rel)
        key_bytes = _key_bytes(key)
        use_direct = direct and self._direct_io
        # A file the index knows and loses meanwhile was evicted; one it does not know yet (an
        # earlier run's, before the scan got to it) is added after the read unless removed meanwhile.
        known = rel in self._index
        with contextlib.nullcontext(set[str]()) if known else self._index.removed_while() as removed:
            try:
                result = await trio.to_thread.run_sync(
                    lambda: read_block(path, key_bytes, key[2], dest, direct=use_direct),
                    limiter=self._read_limiter,
                )
            except OSError as exc:
                result = ReadResult(ReadOutcome.CORRUPT, f"read error: {exc.strerror or exc}")
        if result.direct_failed:
            self._direct_io = False
        if result.outcome is ReadOutcome.HIT:
            self.stats.hits += 1
            if rel in self._index:
                self._index.touch(rel)
            elif not known and rel not in removed:  # a file an earlier run left, before the scan got to it
                await self._unlink(self._index.add(rel, data_offset_for(key_bytes) + len(dest)), evicted=True)
            # (else it was evicted while being read: the bytes read are right, the file is gone)
            return True
        self.stats.misses += 1
        if result.outcome is ReadOutcome.ABSENT:
            self._index.remove(rel)  # deleted behind our back (or never there)
            return False
        self.stats.corrupt += 1
        log.warning("disk cache block %s of %s is bad (%s): discarded, fetching again", key[2], key[0], result.reason)
        await self._unlink([rel])
        return False

    async def discard(self, key: BlockKey) -> None:
        """Delete a block file (its data turned out to be wrong)."""
        await self._unlink([self._relpath(key)])

    # --- writes

    async def write(self, key: BlockKey, data: memoryview, *, crc: int | None = None) -> bool:
        """Store a block; True if the cache holds it now. A failing disk is logged once,
        counted (``stats.write_errors``) and otherwise ignored. A full file system makes the
        cache keep to what fits there, evicting its least recently used blocks (see
        :meth:`_make_room`), and writes go on.

        ``crc``: the CRC32C of ``data`` if the GET computed it as the bytes arrived (else the
        write computes it).
        """
        stored = await self._write(key, data, crc)
        if not stored and self.unwritten is not None:
            self.unwritten[key[0]] += 1
        return stored

    async def _write(self, key: BlockKey, data: memoryview, crc: int | None) -> bool:
        rel = self._relpath(key)
        if not self._enabled:
            return False
        if rel in self._index:
            self._index.touch(rel)
            return True
        size = data_offset_for(_key_bytes(key)) + len(data)
        async with self._write_slots:
            if self._fs_bound:
                async with self._room_lock:
                    return await self._write_once(rel, key, data, crc, size, measured=True)
            return await self._write_once(rel, key, data, crc, size, measured=False)

    async def _write_once(
        self, rel: str, key: BlockKey, data: memoryview, crc: int | None, size: int, *, measured: bool
    ) -> bool:
        """Write the block file; ``measured``: holding the room lock, make room first."""
        obj, _, name = rel.partition("/")
        generation = self._generation
        if measured and not await self._make_room(size):
            self._write_failed(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            return False
        try:
            result = await self._write_file(obj, name, key, data, crc)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._full()
                if not measured:  # the first to find it full: from now on, one write at a time
                    async with self._room_lock:
                        return await self._write_once(rel, key, data, crc, size, measured=True)
                retry = await self._make_room(size)
            else:
                retry = await self._recover(generation)
            if not retry:
                if self._enabled:  # (if it was turned off just now, that was warned about)
                    self._write_failed(exc)
                return False
            try:  # once more: into the room made, or the recreated cache dir
                result = await self._write_file(obj, name, key, data, crc)
            except OSError as again:
                self._write_failed(again)
                return False
        if result.direct_failed:
            self._direct_io = False
        self.stats.writes += 1
        victims = self._index.written(obj, name.partition("-")[0])
        await self._unlink(victims + self._index.add(rel, result.size), evicted=True)
        return rel in self._index

    def _full(self) -> None:
        """A write found the file system full (ENOSPC): from now on keep to what fits there."""
        if not self._fs_bound:
            self._fs_bound = True
            log.warning(
                "the file system of the cache dir %s is full with %s of disk cache, less than "
                "--disk-cache (%s): the disk cache keeps to what fits there, evicting its least "
                "recently used blocks",
                self.root,
                _size(self.used),
                _size(self.capacity),
            )

    async def _make_room(self, size: int) -> bool:
        """Keep the cache to its file system: measure the room there, cap the index at what
        it holds (the cache's blocks and the free space, less a share kept free), and evict
        least recently used blocks (those of pinned versions last, as the cap does) until
        ``size`` more bytes fit beside the writes in progress. The cap is raised back, up to
        --disk-cache, as soon as room is free again. False if they do not fit even with every
        block gone and no write in progress (the file system is full of other files)."""
        while True:
            try:
                free, fs_size = await trio.to_thread.run_sync(_space, str(self._blocks_dir), limiter=self._limiter)
            except OSError:
                return True  # cannot tell: just try
            keep_free = min(fs_size // _KEEP_FREE_SHARE, _KEEP_FREE_MAX)
            cap = min(self.capacity, max(0, self._index.used + free - keep_free))
            # The writes in progress will take their whole size (part of it, written already,
            # is counted twice: a little more room is made than needed, never less).
            room = size + self._writing
            victims = self._index.limit(cap, room=room)
            fits = self._index.used + room <= cap  # (asked before the unlinks: other writes land meanwhile)
            writing = self._writing
            await self._unlink(victims, evicted=True)
            if fits or not writing:
                return fits
            # Not even with every block gone, but writes in progress hold part of the free
            # space counted twice: measure again once one of them is done.
            if self._writing:
                await self._write_landed.park()

    async def _write_file(self, obj: str, name: str, key: BlockKey, data: memoryview, crc: int | None) -> WriteResult:
        dir_path = str(self._blocks_dir / obj)
        key_bytes = _key_bytes(key)
        direct = self._direct_io
        size = data_offset_for(key_bytes) + len(data)
        self._writing += size
        try:
            return await trio.to_thread.run_sync(
                lambda: write_block(dir_path, name, key_bytes, key[2], data, direct=direct, crc=crc),
                limiter=self._limiter,
            )
        finally:  # (the caller indexes the file before it next yields: no await sees it in neither)
            self._writing -= size
            self._write_landed.unpark_all()

    def _write_failed(self, exc: OSError) -> None:
        self.stats.write_errors += 1
        why = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        self.last_write_error = why
        if not self._warned_write:
            self._warned_write = True
            if exc.errno == errno.ENOSPC:
                why = "disk full, even with the disk cache's own blocks evicted"
            log.warning("cannot write the disk cache in %s (%s): blocks go uncached until it can", self.root, why)

    async def _recover(self, generation: int) -> bool:
        """After a failed write: True if the cache dir was lost and is back (recreated, with
        its lock, by this task or by another since the write began); False if it was not lost,
        or cannot be recreated, which turns the disk tier off with one warning."""
        async with self._recovering:
            if generation != self._generation:
                return self._enabled
            lock_fd = self._dir.lock_fd
            if not self._enabled or lock_fd is None:
                return False
            if not await trio.to_thread.run_sync(self._dir.lost, lock_fd, limiter=self._limiter):
                return False
            try:
                new_fd = await trio.to_thread.run_sync(self._dir.create_and_lock, lock_fd, limiter=self._limiter)
            except (MountError, OSError) as exc:
                self._enabled = False
                self._index.clear()
                log.warning("cache dir %s was deleted and cannot be recreated (%s): disk cache off", self.root, exc)
                return False
            self._dir.adopt(new_fd)
            self._generation += 1
            self._index.clear()
            log.warning(
                "cache dir %s was deleted while mounted: recreated it and its lock (its blocks are gone)", self.root
            )
            return True

    # --- deleting

    async def _unlink(self, rels: list[str], *, evicted: bool = False) -> None:
        """Forget and delete files. ``evicted``: the index has forgotten them already."""
        if not rels:
            return
        if evicted:
            self.stats.evictions += len(rels)
        else:
            for rel in rels:
                self._index.remove(rel)
        paths = [str(self._blocks_dir / rel) for rel in rels]

        def unlink_all() -> None:
            for path in paths:
                try:
                    os.unlink(path)
                except OSError:
                    pass

        await trio.to_thread.run_sync(unlink_all, limiter=self._limiter)

    # --- the startup scan

    async def scan(self) -> None:
        """Add files left by earlier runs to the index (oldest first) and enforce the cap."""
        blocks = str(self._blocks_dir)
        with self._index.removed_while() as removed:
            found = await trio.to_thread.run_sync(scan_blocks, blocks, self._index.max_files, self._started)
            victims = self._index.add_scanned(found, removed)
        log.debug("disk cache index rebuilt: %d blocks, %d bytes", len(self._index), self.used)
        self._scanned = True
        await self._unlink(victims, evicted=True)
