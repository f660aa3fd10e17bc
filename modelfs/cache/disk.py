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

import errno
import hashlib
import logging
import os
import time
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
        """Check, create (0700) and lock the cache dir; MountError (one line) if unusable."""
        self._dir.open()

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
            else:  # a file an earlier run left, before the scan got to it
                await self._unlink(self._index.add(rel, data_offset_for(key_bytes) + len(dest)), evicted=True)
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

    async def write(self, key: BlockKey, data: memoryview, *, crc: int | None = None) -> None:
        """Store a block; a full or failing disk is logged once and otherwise ignored.

        ``crc``: the CRC32C of ``data`` if the GET computed it as the bytes arrived (else the
        write computes it).
        """
        rel = self._relpath(key)
        if not self._enabled:
            return
        if rel in self._index:
            self._index.touch(rel)
            return
        obj, _, name = rel.partition("/")
        generation = self._generation
        try:
            result = await self._write_file(obj, name, key, data, crc)
        except OSError as exc:
            if not await self._recover(generation):
                if self._enabled:  # (if it was turned off just now, that was warned about)
                    self._write_failed(exc)
                return
            try:  # once more, into the recreated cache dir
                result = await self._write_file(obj, name, key, data, crc)
            except OSError as again:
                self._write_failed(again)
                return
        if result.direct_failed:
            self._direct_io = False
        self.stats.writes += 1
        victims = self._index.written(obj, name.partition("-")[0])
        await self._unlink(victims + self._index.add(rel, result.size), evicted=True)

    async def _write_file(self, obj: str, name: str, key: BlockKey, data: memoryview, crc: int | None) -> WriteResult:
        dir_path = str(self._blocks_dir / obj)
        key_bytes = _key_bytes(key)
        direct = self._direct_io
        return await trio.to_thread.run_sync(
            lambda: write_block(dir_path, name, key_bytes, key[2], data, direct=direct, crc=crc), limiter=self._limiter
        )

    def _write_failed(self, exc: OSError) -> None:
        self.stats.write_errors += 1
        if not self._warned_write:
            self._warned_write = True
            why = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
            log.warning("cannot write the disk cache in %s (%s); serving without it", self.root, why)

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
