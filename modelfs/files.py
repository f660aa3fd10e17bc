"""Open files: the pinned version of each, its read-ahead state, and the read itself.

Opening pins the object version the namespace holds at that moment; every block of the
handle is read at that version, so an overwrite mid-read fails (ESTALE) instead of mixing
versions. Handles of the same version share one :class:`~modelfs.prefetch.ReadAhead`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from modelfs.cache.blocks import BlockStore, ObjectRef
from modelfs.cache.memory import BufferKind, detached
from modelfs.eager import EagerStreamer
from modelfs.errors import TransientError
from modelfs.prefetch import PrefetchConfig, ReadAhead

__all__ = ["OpenFiles"]

log = logging.getLogger(__name__)
# When the kernel's read-ahead read fails, it reads the page the reader wanted again at once,
# on the same handle: a second read that would retry for another whole --retry-deadline (a
# `cat` of a file whose server kept failing took twice the deadline). A read of a handle inside
# a range that gave up less than this long ago gets the same error at once instead.
GAVE_UP_SECONDS = 2.0
_GAVE_UP_KEPT = 16  # ranges remembered per handle (a read-ahead window's requests)


@dataclass(frozen=True)
class _GaveUp:
    """A read of a handle that failed after retrying to the deadline."""

    start: int
    end: int
    error: BaseException  # without its traceback (see detached)
    until: float  # trio time


@dataclass
class _OpenVersion:
    """One open object version: what all its handles share."""

    ref: ObjectRef
    read_ahead: ReadAhead
    handles: int = 0
    streaming: bool = False  # the eager stream was started for this version


class OpenFiles:
    """File handles → pinned objects; ``read`` turns a byte range into block reads."""

    def __init__(
        self,
        store: BlockStore,
        *,
        max_prefetch: int,
        random_read_size: int = 0,
        prefetch_config: PrefetchConfig = PrefetchConfig(),
        eager: EagerStreamer | None = None,
    ) -> None:
        self.store = store
        self.eager = eager
        self.prefetch_config = prefetch_config
        self.max_prefetch = max_prefetch
        self.random_read_size = random_read_size
        self._handles: dict[int, _OpenVersion] = {}
        self._by_version: dict[tuple[str, str], _OpenVersion] = {}
        self._next_fh = 1
        self._closed_resets = 0
        self._gave_up: dict[int, list[_GaveUp]] = {}  # fh -> its reads that gave up just now
        self.reads_in_flight = 0  # read() calls being served now

    def __len__(self) -> int:
        return len(self._handles)

    def open(self, ref: ObjectRef) -> int:
        entry = self._by_version.get((ref.key, ref.version))
        if entry is None:
            read_ahead = ReadAhead(
                ref.size,
                self.store.block_size,
                self.max_prefetch,
                self.prefetch_config,
                batch_blocks=self.store.join_blocks,
            )
            entry = _OpenVersion(ref, read_ahead)
            self._by_version[(ref.key, ref.version)] = entry
            self.store.opened(ref)
        entry.handles += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = entry
        return fh

    def release(self, fh: int) -> None:
        entry = self._handles.pop(fh, None)
        self._gave_up.pop(fh, None)
        if entry is None:
            return
        entry.handles -= 1
        if self.eager is not None and entry.handles == 0 and entry.streaming:
            self.eager.closed(entry.ref)
        if entry.handles == 0:
            del self._by_version[(entry.ref.key, entry.ref.version)]
            self.store.closed(entry.ref)
            self._closed_resets += entry.read_ahead.resets
            self.store.memory.forget_prefetches(entry.ref.key, entry.ref.version)

    def resets(self) -> int:
        """Read-ahead runs restarted by seeks, over all files ever opened."""
        return self._closed_resets + sum(e.read_ahead.resets for e in self._by_version.values())

    def max_window_blocks(self) -> int:
        """The largest read-ahead window of any open file, in blocks."""
        return max((c.window for e in self._by_version.values() for c in e.read_ahead.cursors), default=0)

    def sequential_reads(self) -> int:
        """Reads of the open versions that continued a sequential run."""
        return sum(e.read_ahead.sequential_reads for e in self._by_version.values())

    async def read(self, fh: int, offset: int, size: int) -> memoryview | bytes | bytearray:
        """Up to ``size`` bytes from ``offset``; a memoryview into the block when it fits in one.

        The bytes stay valid until the calling task next yields to trio: a lease's buffer (a
        small GET, a read across blocks) goes back to the budget as this returns, and a block
        may be evicted. pyfuse3 copies the reply before that.
        """
        self._raise_if_gave_up(fh, offset)
        self.reads_in_flight += 1
        try:
            return await self._read(fh, offset, size)
        except TransientError as exc:  # (raised only once the retries reached the deadline)
            if fh in self._handles:
                now = trio.current_time()
                kept = [g for g in self._gave_up.get(fh, ()) if g.until > now][-_GAVE_UP_KEPT + 1 :]
                self._gave_up[fh] = [*kept, _GaveUp(offset, offset + size, detached(exc), now + GAVE_UP_SECONDS)]
            raise
        finally:
            self.reads_in_flight -= 1

    def _raise_if_gave_up(self, fh: int, offset: int) -> None:
        failed = self._gave_up.get(fh)
        if not failed:  # (every read asks: almost always nothing to look at)
            return
        now = trio.current_time()
        for gave_up in failed:
            if gave_up.start <= offset < gave_up.end and now < gave_up.until:
                raise detached(gave_up.error)

    async def _read(self, fh: int, offset: int, size: int) -> memoryview | bytes | bytearray:
        entry = self._handles[fh]
        ref = entry.ref
        if offset >= ref.size or size <= 0:
            return b""
        size = min(size, ref.size - offset)
        # Ask for read-ahead before waiting on the demand block, so they fetch in parallel.
        sequential_before = entry.read_ahead.sequential_reads
        wanted = entry.read_ahead.on_read(offset, size)
        taken = self.store.prefetch_blocks(ref, wanted) if wanted else 0
        if taken < len(wanted):
            entry.read_ahead.unschedule(wanted.start + taken)
        if self.eager is not None and entry.read_ahead.sequential_reads != sequential_before:
            self.eager.reader_progressed(ref)  # a stream of this file holds back
        if self.eager is not None and not entry.streaming and entry.read_ahead.random_mode:
            # Reads at random (two seeks among the last 64): a loader touching tensors in its
            # own order, say. A reader that streams through the file — safetensors' loaders,
            # whose one jump per big tensor (memmove reads the tail first) stays inside the
            # read-ahead window — is served by read-ahead alone, which fetches as fast and
            # writes through to the disk cache without the stream's extra copies (numbers in
            # benchmarks/README.md, "When the eager stream runs").
            # (False: too many streams wait their turn already; a later random read asks again)
            entry.streaming = self.eager.read_at_random(ref)
        bs = self.store.block_size
        first, last = offset // bs, (offset + size - 1) // bs
        if (
            entry.read_ahead.last_random
            and 0 < self.random_read_size < bs
            and size <= self.random_read_size
            and not entry.read_ahead.wants_whole_block(first)
        ):
            # A random read of an uncached block: fetch a small aligned range, not the block.
            small = await self.store.read_small(ref, offset, size, self.random_read_size)
            if small is not None:
                entry.read_ahead.record_small_get(first)
                return small
        if first == last:
            block = await self.store.get(ref, first)
            start = offset - first * bs
            return block.view[start : start + size]
        # Across a block boundary: one copy into a buffer of the memory budget, each block's
        # part taken before the next await. The lease is given back as this returns: pyfuse3
        # copies the reply before any other task can take the buffer.
        with await self.store.memory.lease(size, BufferKind.BOUNDARY) as lease:
            out = lease.view
            for index in range(first, last + 1):
                block = await self.store.get(ref, index)
                lo = max(offset, index * bs) - index * bs
                hi = min(offset + size, (index + 1) * bs) - index * bs
                at = index * bs + lo - offset
                out[at : at + hi - lo] = block.view[lo:hi]
            return out
