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

from modelfs.units import ceil_div

__all__ = ["ReadAhead", "Cursor", "PrefetchConfig"]


@dataclass(frozen=True)
class PrefetchConfig:
    """The read-ahead detectors' tuning, in one place (compare mountpoint-s3's prefetcher config)."""

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
    # The blocks whose small GETs are counted: the most recently read at random. A block out
    # of them starts its count again. Random reads that keep landing in one block (a tensor's
    # pages faulted one by one) come close together; counting every block ever read grew by
    # ~88 B per block for as long as the file was open (1M blocks: 85 MiB outside the budget).
    small_gets_blocks: int = 256
    # Consecutive steps down (each read ending where the one before began) that make a
    # backward walk: one or two are often just a forward run's read-ahead out of order.
    walk_steps: int = 3


@dataclass
class Cursor:
    end: int  # one past the furthest byte read in this run
    block: int  # block index of the furthest byte read
    window: int  # blocks to keep fetched ahead of ``block``
    scheduled: int  # blocks below this index were already handed out for prefetch
    seq: int  # recency, for replacing the oldest cursor


class SeekDetector:
    """Random access: enough seeks among the recent reads."""

    def __init__(self, config: PrefetchConfig) -> None:
        self.config = config
        self._recent: deque[int] = deque()  # read numbers of recent seeks

    @property
    def random(self) -> bool:
        return len(self._recent) >= self.config.random_after_seeks

    def new_run(self, seq: int, *, seek: bool) -> bool:
        """Read number ``seq`` started a new run (a seek, unless it is the file's first run).

        Returns whether the reads now look random.
        """
        if seek:
            self._recent.append(seq)
        while self._recent and self._recent[0] <= seq - self.config.seek_memory:
            self._recent.popleft()
        return self.random


class WalkDetector:
    """Backward walks: reads that each end exactly where the one before began.

    An mmap'd copy running backward faults the pages just below the previous read (the
    kernel's read-around stops at the first cached page, so the read ends exactly where the
    last one began), and the kernel reads ahead of none of them.
    """

    def __init__(self, config: PrefetchConfig, blocks: int) -> None:
        self.config = config
        self.steps = 0  # consecutive reads that each ended where the one before began
        self.fetched_below = blocks  # the walk has asked for every block from here up
        self._blocks = blocks
        self._previous_offset = -1

    @property
    def walking(self) -> bool:
        return self.steps >= self.config.walk_steps

    def observe(self, offset: int, end: int) -> bool:
        """Record a read of [offset, end); True if it is a step down."""
        if offset < self._previous_offset == end:
            self.steps += 1
        else:
            self.steps = 0
            self.fetched_below = self._blocks
        self._previous_offset = offset
        return self.steps > 0

    def block_below(self, offset: int, block_size: int) -> int | None:
        """While walking: the block below this read if not asked for yet, else None."""
        below = offset // block_size - 1
        if 0 <= below < self.fetched_below:
            self.fetched_below = below
            return below
        return None


class ReadAhead:
    """Which blocks of one object to prefetch after each read.

    Three detectors look at every read: :class:`WalkDetector` (steps down a file),
    the cursors (sequential runs, each with a growing window) and :class:`SeekDetector`
    (runs started by seeks: random mode).
    """

    def __init__(
        self,
        size: int,
        block_size: int,
        max_window: int,
        config: PrefetchConfig = PrefetchConfig(),
        *,
        batch_blocks: int = 1,
    ) -> None:
        self.size = size
        self.block_size = block_size
        self.max_window_blocks = max(0, max_window // block_size)
        self.config = config
        # Hand out a window's new blocks only this many at a time (fewer at the end of the
        # file or in a smaller window): the block store joins them into one GET.
        self.batch_blocks = max(1, batch_blocks)
        self.cursors: list[Cursor] = []
        self.resets = 0
        self.last_random = False  # the last read looked random: it started a run after several seeks
        self.sequential_reads = 0  # reads that continued a run with a window of 2+ blocks, or a walk
        self._seq = 0
        self._blocks = ceil_div(size, block_size)
        self._seeks = SeekDetector(config)
        self._walk = WalkDetector(config, self._blocks)
        # block index -> small GETs served from it, the least recently counted first
        self._small_gets: dict[int, int] = {}

    @property
    def random_mode(self) -> bool:
        """Several recent seeks: reads are scattered (an mmap loader, a random-read job)."""
        return self._seeks.random

    @property
    def last_backward(self) -> bool:
        """The last read continued a backward walk."""
        return self._walk.walking

    def on_read(self, offset: int, size: int) -> range:
        """Record a read of [offset, offset+size); return the block indices to prefetch."""
        if size <= 0 or offset >= self.size:
            return range(0)
        end = min(offset + size, self.size)
        self._seq += 1
        if self._walk.observe(offset, end):
            return self._step_down(offset)
        cursor = self._find(offset)
        if cursor is None:
            cursor = self._start_run(offset, end)
        else:
            self._continue_run(cursor, end)
        return self._schedule(cursor)

    def _step_down(self, offset: int) -> range:
        # A step down is neither a seek nor random (so it neither starts the eager stream nor
        # takes a small GET); once it is a walk it counts as sequential progress (the stream
        # yields to it), and the next block down is fetched ahead.
        self.last_random = False
        if not self._walk.walking:
            return range(0)
        self.sequential_reads += 1
        if not self.max_window_blocks:
            return range(0)
        below = self._walk.block_below(offset, self.block_size)
        return range(0) if below is None else range(below, below + 1)

    def _find(self, offset: int) -> Cursor | None:
        """The cursor whose run a read at ``offset`` continues (the nearest), if any."""
        best: Cursor | None = None
        random_mode = self.random_mode
        for c in self.cursors:
            if random_mode:
                # Scattered reads: only a read that starts right at a run's end continues it;
                # one that merely lands near it would otherwise fetch whole blocks for nothing.
                behind = ahead = min(self.config.forward_tolerance, self.config.backward_tolerance)
            else:
                behind = self.config.backward_tolerance
                ahead = c.window * self.block_size + self.config.forward_tolerance
            if c.end - behind <= offset <= c.end + ahead:
                if best is None or abs(c.end - offset) < abs(best.end - offset):
                    best = c
        return best

    def _start_run(self, offset: int, end: int) -> Cursor:
        # From the start of the file it is probably a full read, so it gets a window at once;
        # elsewhere it is a seek and earns its window by staying sequential.
        window = min(1, self.max_window_blocks) if offset == 0 else 0
        seek = bool(self.cursors)
        if seek:
            self.resets += 1
        self.last_random = self._seeks.new_run(self._seq, seek=seek)
        last_block = (end - 1) // self.block_size
        cursor = Cursor(end=end, block=last_block, window=window, scheduled=last_block + 1, seq=self._seq)
        self.cursors.append(cursor)
        if len(self.cursors) > self.config.max_cursors:
            self.cursors.remove(min(self.cursors, key=lambda c: c.seq))
        return cursor

    def _continue_run(self, cursor: Cursor, end: int) -> None:
        self.last_random = False
        if cursor.window >= 2:
            self.sequential_reads += 1
        cursor.seq = self._seq
        cursor.end = max(cursor.end, end)
        last_block = (end - 1) // self.block_size
        if last_block > cursor.block:
            cursor.block = last_block
            cursor.window = min(self.max_window_blocks, max(1, cursor.window * 2))

    def _schedule(self, cursor: Cursor) -> range:
        """The blocks of the cursor's window not handed out yet."""
        start = max(cursor.scheduled, cursor.block + 1)
        stop = min(cursor.block + 1 + cursor.window, self._blocks)
        if stop <= start or (stop - start < min(self.batch_blocks, cursor.window) and stop < self._blocks):
            return range(0)
        cursor.scheduled = stop
        return range(start, stop)

    def wants_whole_block(self, index: int) -> bool:
        """True once random reads have taken enough small GETs from block ``index``."""
        return self._small_gets.get(index, 0) >= self.config.small_gets_per_block

    def record_small_get(self, index: int) -> None:
        """A random read in block ``index`` was served by a small GET."""
        count = self._small_gets.pop(index, 0) + 1
        self._small_gets[index] = count  # (now the most recent)
        if len(self._small_gets) > self.config.small_gets_blocks:
            del self._small_gets[next(iter(self._small_gets))]

    def unschedule(self, index: int) -> None:
        """A prefetch of ``index`` was refused (no budget): let a later read ask again."""
        for c in self.cursors:
            if c.scheduled > index >= c.block + 1:
                c.scheduled = index
