"""Filling the kernel's page cache for a reader that walks a file backward (FUSE ``notify_store``).

Why: the kernel only reads ahead of a reader that moves forward. A loader whose mmap'd copy
runs from the top down — glibc's memmove copies backward whenever the destination lies above
the source, which happens to some of the tensors safetensors copies out of its map, depending
on where the allocator put them — gets one synchronous FUSE round trip of ~512 KiB per fault:
with every block in memory, a backward page walk over a 384 MiB file ran at 0.5-1.05 GB/s
against 2.0-2.6 GB/s forward. Once three reads in a row each ended where the one before began,
the part of the block below the current read is handed to the kernel before that read is
answered, so the reader's next faults in the block never leave the kernel (same walk:
1.15-1.17 GB/s, 96-144 FUSE reads instead of 763). Pushing before the reply matters: pushed
in the background, the copy raced the reader from below and saved few reads.

Forward runs are left to the kernel's own read-ahead, which already keeps the next megabyte
in flight; random reads are left alone too (a block's worth of copying per 4 KiB read).

Only the bytes of the version the inode's page cache holds are ever pushed: a push checks
the inode's current version as it starts, and ``settle`` (awaited by ``open`` before it lets
the kernel drop the cache for a new version) waits for pushes already running.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import trio

from modelfs.cache.memory import Block, MemoryCache

__all__ = ["PageCacheFiller", "FillerStats", "PAGE"]

log = logging.getLogger(__name__)

PAGE = 4096
CHUNK = 1 << 20  # bytes per notify_store call

# notify(inode, file offset, bytes): pyfuse3.notify_store in the daemon, a recorder in tests.
Notify = Callable[[int, int, memoryview], None]


@dataclass
class FillerStats:
    pushes: int = 0
    pushed_bytes: int = 0
    skipped_stale: int = 0  # the inode had moved on to another version
    errors: int = 0


class PageCacheFiller:
    """Pushes the unread rest of a block into the page cache, in a worker thread."""

    def __init__(self, memory: MemoryCache, notify: Notify, current_version: Callable[[int], str | None], *,
                 threads: int = 2) -> None:
        self.memory = memory
        self.notify = notify
        self.current_version = current_version
        self.stats = FillerStats()
        self.enabled = True
        self._limiter = trio.CapacityLimiter(threads)
        self._in_flight: Counter[int] = Counter()  # inode -> pushes running
        self._settled = trio.lowlevel.ParkingLot()

    async def fill_below(self, inode: int, version: str, offset: int, block: Block, below: int) -> bool:
        """Put the bytes of ``block`` (at file ``offset``) below ``below`` into the page cache.

        ``below`` is relative to the block. The caller awaits this before it replies to the
        read that asked, so the reader cannot fault below it before the pages are there. The
        main loop keeps serving meanwhile: a page being pushed may be locked by another
        pending read, which must get its reply for the push to go on. True if the bytes
        were handed over.
        """
        lo = below - below % PAGE
        if not self.enabled or inode <= 0 or lo <= 0:
            return False
        if self.current_version(inode) != version:
            self.stats.skipped_stale += 1
            return False
        block.pins += 1  # the buffer must outlive the thread's copy
        self._in_flight[inode] += 1
        try:
            await trio.to_thread.run_sync(self._push_sync, inode, offset, block.view, lo, limiter=self._limiter)
            self.stats.pushes += 1
            self.stats.pushed_bytes += lo
            return True
        except OSError as exc:
            self.stats.errors += 1
            if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
                self.enabled = False
                log.info("the kernel does not take page cache pushes (%s): reads only", exc.strerror)
            else:  # e.g. ENOENT: the kernel already forgot the inode
                log.debug("page cache push to inode %d failed: %s", inode, exc)
            return False
        finally:
            self.memory.unpin(block)
            self._in_flight[inode] -= 1
            if not self._in_flight[inode]:
                del self._in_flight[inode]
                self._settled.unpark_all()

    async def settle(self, inode: int) -> None:
        """Wait until no push to ``inode`` is running."""
        while self._in_flight[inode]:
            await self._settled.park()

    def _push_sync(self, inode: int, offset: int, view: memoryview, lo: int) -> None:
        for end in range(lo, 0, -CHUNK):  # downward, nearest the reader first
            start = max(0, end - CHUNK)
            self.notify(inode, offset + start, view[start:end])
