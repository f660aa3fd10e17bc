"""Sequential-read detection and read-ahead windows, as pure bookkeeping.

One :class:`ReadAhead` per open object version (shared by all its handles). It keeps a few
cursors, each the end of a run of reads; a read that starts near a cursor continues that run,
anything else starts a new run. Tracking by offset rather than by handle or process means
the kernel's reordered read-ahead, and several readers interleaving on one file, each stay
sequential. A run's window starts at one block and doubles each time the run enters a new
block, up to ``max_window``; a new run (a random seek) starts with no window.

This module decides *which* blocks to prefetch; the block store decides whether the memory
budget lets it, so the window here is an upper bound, never a memory commitment.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["ReadAhead", "Cursor", "PrefetchDefaults"]


@dataclass(frozen=True)
class PrefetchDefaults:
    """Tuning in one place (compare mountpoint-s3's prefetcher config)."""

    max_cursors: int = 8
    # How far behind a cursor a read may start and still continue its run: the kernel
    # issues read-ahead requests concurrently and they can arrive out of order.
    backward_tolerance: int = 4 << 20
    # How far past a cursor a read may start and still continue its run, beyond the window.
    forward_tolerance: int = 1 << 20
    # After this many seeks, a read that starts a new run is served by a small ranged GET
    # instead of a whole block (gcsfuse switches after 2 seeks too).
    random_after_seeks: int = 2
    # Only seeks among the last this many reads count: a loader that seeks, then streams
    # for a long while, is sequential again.
    seek_memory: int = 64
    # After this many small GETs in one block, the next random read there fetches the whole
    # block (which is cached): reads keep landing in it, and small GETs are never cached.
    small_gets_per_block: int = 2


@dataclass
class Cursor:
    end: int  # one past the furthest byte read in this run
    block: int  # block index of the furthest byte read
    window: int  # blocks to keep fetched ahead of ``block``
    scheduled: int  # blocks below this index were already handed out for prefetch
    seq: int  # recency, for replacing the oldest cursor


class ReadAhead:
    """Which blocks of one object to prefetch after each read."""

    def __init__(
        self, size: int, block_size: int, max_window: int, defaults: PrefetchDefaults = PrefetchDefaults()
    ) -> None:
        self.size = size
        self.block_size = block_size
        self.max_window_blocks = max(0, max_window // block_size)
        self.defaults = defaults
        self.cursors: list[Cursor] = []
        self.resets = 0
        self.last_random = False  # the last read looked random: it started a run after several seeks
        self.last_backward = False  # the last read continued a backward walk (3+ steps down)
        self._previous: tuple[int, int] = (-1, -1)  # offset and end of the last read
        self._backward_steps = 0  # consecutive reads that each ended where the one before began
        self._walk_fetched_below = 0  # a backward walk has asked for every block from here up
        self.sequential_reads = 0  # reads that continued a run with a window of 2+ blocks
        self._seq = 0
        self._recent_seeks: deque[int] = deque()  # read numbers of recent seeks
        self._blocks = -(-size // block_size)
        self._small_gets: dict[int, int] = {}  # block index -> small GETs served from it

    @property
    def random_mode(self) -> bool:
        """Several recent seeks: reads are scattered (an mmap loader, a random-read job)."""
        return len(self._recent_seeks) >= self.defaults.random_after_seeks

    def _find(self, offset: int) -> Cursor | None:
        best: Cursor | None = None
        random_mode = self.random_mode
        for c in self.cursors:
            if random_mode:
                # Scattered reads: only a read that starts right at a run's end continues it;
                # one that merely lands near it would otherwise fetch whole blocks for nothing.
                behind = ahead = min(self.defaults.forward_tolerance, self.defaults.backward_tolerance)
            else:
                behind = self.defaults.backward_tolerance
                ahead = c.window * self.block_size + self.defaults.forward_tolerance
            if c.end - behind <= offset <= c.end + ahead:
                if best is None or abs(c.end - offset) < abs(best.end - offset):
                    best = c
        return best

    def on_read(self, offset: int, size: int) -> range:
        """Record a read of [offset, offset+size); return the block indices to prefetch."""
        if size <= 0 or offset >= self.size:
            return range(0)
        end = min(offset + size, self.size)
        last_block = (end - 1) // self.block_size
        self._seq += 1
        # A walk down the file (an mmap'd copy running backward): each fault reads the
        # pages just below the previous read (the kernel's read-around stops at the first
        # cached page, so the read ends exactly where the last one began), and the kernel
        # reads ahead of none of them.
        # Three such steps in a row: one or two are often just read-ahead requests of a
        # forward run handled out of order.
        previous = self._previous[0]
        if offset < previous == end:
            self._backward_steps += 1
        else:
            self._backward_steps = 0
            self._walk_fetched_below = self._blocks
        self.last_backward = self._backward_steps >= 3
        self._previous = (offset, end)
        if self._backward_steps:
            # A step down is neither a seek nor random (so it neither starts the eager
            # stream nor takes a small GET); once it is a walk it counts as sequential
            # progress (the stream yields to it), and the next block down is fetched ahead.
            self.last_random = False
            if not self.last_backward:
                return range(0)
            self.sequential_reads += 1
            below = offset // self.block_size - 1
            if 0 <= below < self._walk_fetched_below and self.max_window_blocks:
                self._walk_fetched_below = below
                return range(below, below + 1)
            return range(0)
        cursor = self._find(offset)
        if cursor is None:
            # A new run: from the start of the file it is probably a full read, so it gets a
            # window at once; elsewhere it is a seek and earns its window by staying sequential.
            window = min(1, self.max_window_blocks) if offset == 0 else 0
            if self.cursors:
                self.resets += 1
                self._recent_seeks.append(self._seq)
            while self._recent_seeks and self._recent_seeks[0] <= self._seq - self.defaults.seek_memory:
                self._recent_seeks.popleft()
            self.last_random = len(self._recent_seeks) >= self.defaults.random_after_seeks
            cursor = Cursor(end=end, block=last_block, window=window, scheduled=last_block + 1, seq=self._seq)
            self.cursors.append(cursor)
            if len(self.cursors) > self.defaults.max_cursors:
                self.cursors.remove(min(self.cursors, key=lambda c: c.seq))
        else:
            self.last_random = False
            if cursor.window >= 2:
                self.sequential_reads += 1
            cursor.seq = self._seq
            if end > cursor.end:
                cursor.end = end
            if last_block > cursor.block:
                cursor.block = last_block
                cursor.window = min(self.max_window_blocks, max(1, cursor.window * 2))
        start = max(cursor.scheduled, cursor.block + 1)
        stop = min(cursor.block + 1 + cursor.window, self._blocks)
        if stop <= start:
            return range(0)
        cursor.scheduled = stop
        return range(start, stop)

    def wants_whole_block(self, index: int) -> bool:
        """True once random reads have taken enough small GETs from block ``index``."""
        return self._small_gets.get(index, 0) >= self.defaults.small_gets_per_block

    def small_get(self, index: int) -> None:
        """A random read in block ``index`` was served by a small GET."""
        self._small_gets[index] = self._small_gets.get(index, 0) + 1

    def unschedule(self, index: int) -> None:
        """A prefetch of ``index`` was refused (no budget): let a later read ask again."""
        for c in self.cursors:
            if c.scheduled > index >= c.block + 1:
                c.scheduled = index
