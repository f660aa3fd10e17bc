"""The block store: memory, then disk, then one ranged GET, with single-flight.

``get`` is the whole read path below the filesystem: concurrent readers of one block wait on
the same fetch (one GET), demand fetches take GET slots ahead of queued prefetches, fetched
blocks are written through to the disk tier in the background, and every buffer lives in
the memory tier's one budget until the disk write is done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from modelfs.backends.base import Backend, BlockReads, JoinedReads, joins_reads
from modelfs.backends.retry import RetryStats, retry_transient
from modelfs.cache.disk import DiskCache
from modelfs.cache.memory import Block, BlockKey, BlockState, BufferKind, MemoryCache, detached
from modelfs.units import ceil_div, round_up

if TYPE_CHECKING:
    from modelfs.config import Config

__all__ = ["ObjectRef", "FetchSlots", "BlockStore", "StoreStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """One pinned version of one object: what an open file reads."""

    key: str  # backend-unique object key (names cache entries)
    name: str  # name relative to the backend root (what the backend reads)
    version: str
    size: int


class FetchSlots:
    """At most ``n`` GETs in flight; a freed slot goes to a waiting demand read first."""

    def __init__(self, n: int) -> None:
        self.capacity = n
        self._free = n
        self.peak = 0  # the most GETs in flight at once so far
        self._demand = trio.lowlevel.ParkingLot()
        self._prefetch = trio.lowlevel.ParkingLot()

    @property
    def in_use(self) -> int:
        return self.capacity - self._free

    @property
    def waiting_prefetches(self) -> int:
        return len(self._prefetch)

    async def acquire(self, *, demand: bool) -> None:
        if self._free > 0 and (demand or len(self._demand) == 0):
            # Take the slot only once cancellation can no longer strike: a Cancelled raised
            # after the decrement would leak the slot (the caller releases only on success).
            await trio.lowlevel.checkpoint_if_cancelled()
            self._free -= 1
            self.peak = max(self.peak, self.capacity - self._free)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        # A parked task is handed the slot by release(); the count does not change.
        await (self._demand if demand else self._prefetch).park()

    def release(self) -> None:
        if len(self._demand):
            self._demand.unpark(count=1)
        elif len(self._prefetch):
            self._prefetch.unpark(count=1)
        else:
            self._free += 1


@dataclass
class StoreStats:
    backend_gets: int = 0
    backend_bytes: int = 0
    demand_gets: int = 0
    prefetch_gets: int = 0
    small_gets: int = 0
    joined_gets: int = 0  # prefetch GETs that filled several neighbouring blocks at once
    streamed_blocks: int = 0
    errors: int = 0
    retry: RetryStats = field(default_factory=RetryStats)


class BlockStore:
    """Blocks of pinned objects, from memory, disk or the backend."""

    def __init__(
        self,
        backend: Backend,
        memory: MemoryCache,
        disk: DiskCache | None,
        *,
        block_size: int,
        max_concurrency: int,
        retry_deadline: float,
        join_blocks: int = 1,
    ) -> None:
        self.backend = backend
        self.memory = memory
        self.disk = disk
        self.block_size = block_size
        self.slots = FetchSlots(max_concurrency)
        self.retry_deadline = retry_deadline
        self.stats = StoreStats()
        self._nursery: trio.Nursery | None = None
        self._writes_done = trio.lowlevel.ParkingLot()
        self._write_seq = 0  # numbers the disk writes, in the order they were queued
        self._queued_writes: set[int] = set()  # the numbers of those not done yet
        # Read-ahead joins up to this many neighbouring blocks into one GET, on a backend
        # that can fill them from one body: fewer, larger GETs cost less CPU per byte on
        # both ends (docs/architecture.md, "Joined read-ahead GETs"). A joined GET holds
        # all its blocks until the last byte, so it takes at most half the prefetch share.
        # The same method fills one block and returns its CRC32C summed on arrival (GCS media,
        # the cache tier), for the disk write; several blocks only where joins_reads says so.
        self._joined: JoinedReads | None = backend if isinstance(backend, JoinedReads) else None
        self._block_reads: BlockReads | None = backend if isinstance(backend, BlockReads) else None
        share_blocks = int(memory.capacity * memory.prefetch_share) // (2 * block_size)
        self.join_blocks = max(1, min(join_blocks, share_blocks)) if joins_reads(backend) else 1

    @classmethod
    def from_config(cls, config: Config, backend: Backend, memory: MemoryCache, disk: DiskCache | None) -> BlockStore:
        """The store a mount or ``modelfs warm`` builds from the validated options."""
        return cls(
            backend,
            memory,
            disk,
            block_size=config.block_size,
            max_concurrency=config.max_concurrency,
            retry_deadline=config.retry_deadline,
            join_blocks=config.prefetch_get_size // config.block_size,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the background tasks (prefetches, disk writes) until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.disk is not None:
                    nursery.start_soon(self.disk.run)
                task_status.started()
                await trio.sleep_forever()
        finally:
            # Stopped. A fill that lands later (an eager stream's GET: the stop's cancel waits
            # for the worker thread) finds no nursery for its disk write: the block is left
            # READY and unpinned (see _filled), evictable like any other, instead of the
            # closed nursery's RuntimeError, which left it pinned and the stream logging it.
            self._nursery = None

    async def prepare(self, obj: ObjectRef) -> None:
        """Before reading ``obj``: know its blocks on disk even if the startup scan is not done."""
        if self.disk is not None:
            await self.disk.prepare(obj.key)

    def opened(self, obj: ObjectRef) -> None:
        """A file opened this version: its disk blocks stay while it is open (see disk_index.py)."""
        if self.disk is not None:
            self.disk.pin(obj.key, obj.version)

    def closed(self, obj: ObjectRef) -> None:
        """The last file open at this version closed."""
        if self.disk is not None:
            self.disk.unpin(obj.key, obj.version)

    def block_count(self, obj: ObjectRef) -> int:
        return ceil_div(obj.size, self.block_size)

    def _length(self, obj: ObjectRef, index: int) -> int:
        return min(self.block_size, obj.size - index * self.block_size)

    async def get(self, obj: ObjectRef, index: int) -> Block:
        """The READY block ``index`` of ``obj``, fetched if need be (raises BackendError)."""
        key: BlockKey = (obj.key, obj.version, index)
        while True:
            block = self.memory.lookup(key)
            if block is None:
                block = await self.memory.reserve(key, self._length(obj, index))
                if block is None:
                    continue
                self.memory.stats.misses += 1
                await self._fill(obj, block, demand=True)
                self.memory.consume(block)
                return block
            if block.state is BlockState.FILLING:
                # Pinned while we wait: once the fetcher unpins it, a READY block may be
                # evicted (and its buffer reused) before this task runs again, and we would
                # hand out an emptied view: a short read, which the kernel takes as EOF.
                block.pins += 1
                try:
                    await block.ready.wait()
                finally:
                    self.memory.unpin(block)
            if block.state is BlockState.READY:
                self.memory.stats.hits += 1
                self.memory.consume(block)
                return block
            if block.error is not None:
                raise detached(block.error)  # (never the kept one: see detached)
            # The fetch we waited on was cancelled: try again, maybe as the fetcher.

    async def read_small(self, obj: ObjectRef, offset: int, size: int, granule: int) -> memoryview | None:
        """Bytes [offset, offset+size) by one GET of the ``granule``-aligned range around them.

        For random reads: fetching a whole block for each would multiply the bytes moved.
        None when the block is cached (in memory or on disk), or when the range would not fit
        in the budget beside a block: the caller reads the block. The small buffer is a lease
        of the memory budget, not cached (the kernel's page cache keeps what was read); it is
        given back when the calling task next yields to trio (see :meth:`MemoryCache.lease`),
        so the caller must hand the bytes on (as a FUSE reply) before awaiting anything.
        """
        index = offset // self.block_size
        key: BlockKey = (obj.key, obj.version, index)
        if self.memory.lookup(key) is not None or (self.disk is not None and self.disk.contains(key)):
            return None
        start = offset - offset % granule
        end = min(obj.size, round_up(offset + size, granule))
        if not self.memory.can_lease(end - start):
            return None
        with await self.memory.lease(end - start, BufferKind.SMALL_READ) as lease:
            buf = lease.view

            async def attempt() -> None:
                await self.slots.acquire(demand=True)
                try:
                    self.stats.backend_gets += 1
                    self.stats.small_gets += 1
                    self.stats.demand_gets += 1
                    await self.backend.read_range(obj.name, obj.version, start, buf, size=obj.size)
                    self.stats.backend_bytes += len(buf)
                finally:
                    self.slots.release()

            try:
                await retry_transient(
                    attempt, deadline=self.retry_deadline, stats=self.stats.retry, what=f"{obj.name} [{start}, {end})"
                )
            except Exception:
                self.stats.errors += 1
                raise
            return buf[offset - start : offset - start + size]

    async def stream(self, obj: ObjectRef, index: int) -> None:
        """Bring a block into the disk cache in the background (eager streaming).

        Takes GET slots behind demand reads, and memory only from blocks already read; the
        block is readable at once and evictable as soon as its disk write is done. On return
        the block is on disk or READY in memory (fetched: its disk write queued; see drain):
        a block another task is filling counts only once that fill is done.
        """
        key: BlockKey = (obj.key, obj.version, index)
        while self.disk is not None and not self.disk.contains(key):
            block = self.memory.peek(key)
            if block is None:
                block = await self.memory.reserve_background(key, self._length(obj, index))
                if block is None:
                    continue  # another task made it meanwhile: see what became of it
                await self._fill(obj, block, demand=False)
                self.stats.streamed_blocks += 1
                return
            if block.state is BlockState.READY:
                return  # (fetched: its disk write is queued; else it was read from the disk)
            # Being filled by another task: a demand read, a prefetch, or the worker of a stream
            # cancelled by its file's last close, still unwinding. That fill may still be
            # dropped (cancelled, or a joined read-ahead GET that failed): skipped, the block
            # would be fetched by nobody and never reach the disk. Wait for it, pinned as in
            # get, and look again.
            block.pins += 1
            try:
                await block.ready.wait()
            finally:
                self.memory.unpin(block)

    def prefetch(self, obj: ObjectRef, index: int) -> bool:
        """Start fetching a block in the background if the budget has room; False if not."""
        return self.prefetch_blocks(obj, range(index, index + 1)) == 1

    def prefetch_blocks(self, obj: ObjectRef, indices: range) -> int:
        """Start fetching the blocks ``indices`` in the background, up to :attr:`join_blocks`
        neighbours by one GET; how many from the start were taken (the rest found no room).

        Blocks already here are adopted as prefetches; a block on disk is read from there
        alone. A joined GET starts only when the budget's prefetch share has room for all
        of its blocks, so a window held back by the budget still moves in joined steps.
        """
        if self._nursery is None:
            return 0
        indices = range(indices.start, min(indices.stop, self.block_count(obj)))
        run: list[Block] = []
        for index in indices:
            key: BlockKey = (obj.key, obj.version, index)
            existing = self.memory.lookup(key)
            if existing is not None:
                # Already here (e.g. fetched by the eager stream): protect it like our own
                # prefetch, so it is not evicted before the reader that asked gets to it.
                self.memory.adopt_prefetch(existing)
                run = self._start_prefetch(obj, run)
                continue
            length = self._length(obj, index)
            if not run:
                want = min(self.join_blocks, indices.stop - index)
                if want > 1 and not self.memory.prefetch_fits(want * self.block_size):
                    self.memory.stats.prefetch_refused += 1
                    return index - indices.start
            block = self.memory.try_reserve_prefetch(key, length)
            if block is None:
                self._start_prefetch(obj, run)
                return index - indices.start
            if self.disk is not None and self.disk.contains(key):
                run = self._start_prefetch(obj, run)
                self._start_prefetch(obj, [block])
                continue
            run.append(block)
            if len(run) == self.join_blocks:
                run = self._start_prefetch(obj, run)
        self._start_prefetch(obj, run)
        return len(indices)

    def _start_prefetch(self, obj: ObjectRef, blocks: list[Block]) -> list[Block]:
        """Start the background fill of reserved neighbouring ``blocks``; an empty run to go on with."""
        assert self._nursery is not None
        if len(blocks) == 1:
            self._nursery.start_soon(self._prefetch_task, obj, blocks[0])
        elif blocks:
            self._nursery.start_soon(self._prefetch_joined, obj, blocks)
        return []

    async def _prefetch_task(self, obj: ObjectRef, block: Block) -> None:
        try:
            await self._fill(obj, block, demand=False)
        except Exception as exc:  # a demand read of this block will retry and report it
            log.debug("prefetch of block %d of %s failed: %s", block.key[2], obj.name, exc)

    async def _prefetch_joined(self, obj: ObjectRef, blocks: list[Block]) -> None:
        """Fill neighbouring blocks (none of them on disk) with one GET; all READY or all dropped.

        One attempt, no retries: if it fails, readers waiting on these blocks fetch each one
        themselves (with retries, reporting the error), so joining never adds a failure.
        """
        first = blocks[0].key[2]
        try:
            sums = await self._fetch(obj, first, [block.view for block in blocks], demand=False, retry=False)
        except BaseException as exc:
            for block in blocks:
                self.memory.fail(block, None)
            if not isinstance(exc, Exception):
                raise
            # The blocks are fetched again, one GET each, by whoever reads them: a retry.
            self.stats.retry.retries += 1
            log.debug("prefetch of blocks %d-%d of %s failed: %s", first, first + len(blocks) - 1, obj.name, exc)
            return
        self.stats.joined_gets += 1
        for i, block in enumerate(blocks):
            block.crc = sums[i] if sums is not None else None
            self._filled(block, fetched=True)

    async def _fill(self, obj: ObjectRef, block: Block, *, demand: bool) -> None:
        """Fill a reserved block from disk or the backend; on return it is READY."""
        index = block.key[2]
        fetched = False
        try:
            # A disk hit is counted by the disk tier (DiskStats.hits), not again here.
            if self.disk is None or not await self.disk.read_into(block.key, block.view, direct=not demand):
                sums = await self._fetch(obj, index, [block.view], demand=demand)
                block.crc = sums[0] if sums is not None else None
                fetched = True
        except Exception as exc:
            self.stats.errors += 1
            self.memory.fail(block, exc)
            raise
        except BaseException:
            self.memory.fail(block, None)
            raise
        self._filled(block, fetched=fetched)

    def _filled(self, block: Block, *, fetched: bool) -> None:
        """``block`` holds its bytes: readers may use it; a fetched one is written through."""
        self.memory.complete(block)
        if fetched and self.disk is not None and self._nursery is not None:
            # Still pinned: the disk write reads the buffer in a thread, and the bytes stay
            # counted in the budget until it is done.
            self._write_seq += 1
            self._queued_writes.add(self._write_seq)
            self._nursery.start_soon(self._write_back, block, self._write_seq)
        else:
            self.memory.unpin(block)

    async def _write_back(self, block: Block, seq: int) -> None:
        try:
            assert self.disk is not None
            await self.disk.write(block.key, block.view, crc=block.crc)
        finally:
            self.memory.unpin(block)
            self._queued_writes.discard(seq)
            self._writes_done.unpark_all()

    @property
    def write_seq(self) -> int:
        """The number of the last disk write queued (see :meth:`writes_done`)."""
        return self._write_seq

    def writes_done(self, upto: int) -> bool:
        """Whether every disk write queued up to number ``upto`` is done (stored or failed)."""
        return not self._queued_writes or min(self._queued_writes) > upto

    async def drain(self) -> None:
        """Wait until the disk write of every block fetched so far has ended (stored, or failed:
        a full or failing disk), the eager stream's included. Writes queued meanwhile (read-ahead
        and streams still landing blocks) are not waited for. A block still being fetched is
        not fetched yet: wait for its reader or its stream first (a stream ends only once each
        block of its file is on disk or READY). Unbounded: the stop uses :meth:`finish_writes`."""
        await self._writes_up_to(self._write_seq)

    async def _writes_up_to(self, last: int) -> None:
        while not self.writes_done(last):
            await self._writes_done.park()

    async def finish_writes(self, grace: float) -> bool:
        """At the stop: finish the disk writes queued so far (at most the memory budget), so
        the next start finds the blocks this run fetched; False if ``grace`` seconds were not
        enough (a slow or stuck disk), and the rest is dropped. Writes queued after the call
        (prefetches and the eager stream still landing) are not waited for."""
        last = self._write_seq
        with trio.move_on_after(grace):
            await self._writes_up_to(last)
            return True
        left = sum(1 for seq in self._queued_writes if seq <= last)
        log.warning("stopped with %d disk-cache write(s) still queued: the next start fetches them again", left)
        return False

    async def _fetch(
        self, obj: ObjectRef, index: int, dests: list[memoryview], *, demand: bool, retry: bool = True
    ) -> list[int] | None:
        """One GET (retried unless not ``retry``) of the blocks from ``index`` on, into their
        buffers ``dests``; their CRC32Cs if the backend computed them as the bytes arrived."""
        offset = index * self.block_size
        nbytes = sum(len(dest) for dest in dests)
        # With a disk cache, the GET computes each block's CRC32C as its bytes arrive, for
        # the disk write (see httpclient_body.recv_body_into); without one, nobody needs it.
        joined = self._joined if self.disk is not None or len(dests) > 1 else None
        alone = self._block_reads if len(dests) == 1 else None
        sums: list[int] = []
        want_sums = sums if self.disk is not None else None

        async def attempt() -> None:
            await self.slots.acquire(demand=demand)
            try:
                self.stats.backend_gets += 1
                if demand:
                    self.stats.demand_gets += 1
                else:
                    self.stats.prefetch_gets += 1
                if alone is not None:
                    sums.clear()
                    await alone.read_block(obj.name, obj.version, offset, dests[0], want_sums, size=obj.size)
                elif joined is not None:
                    sums.clear()
                    await joined.read_ranges(obj.name, obj.version, offset, dests, want_sums, size=obj.size)
                else:
                    await self.backend.read_range(obj.name, obj.version, offset, dests[0], size=obj.size)
                self.stats.backend_bytes += nbytes
            finally:
                self.slots.release()

        if not retry:
            await attempt()
        else:
            what = f"{obj.name} block {index}" + (f"-{index + len(dests) - 1}" if len(dests) > 1 else "")
            await retry_transient(attempt, deadline=self.retry_deadline, stats=self.stats.retry, what=what)
        return sums if len(sums) == len(dests) else None
