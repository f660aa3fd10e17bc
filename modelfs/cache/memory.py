"""The memory tier: every data buffer the daemon holds, in one byte budget.

Blocks being filled, blocks waiting for their disk write and cached blocks all count against
the same ``capacity``, and so do the short-lived buffers of a request (:class:`Lease`): a
small random-read GET, a read that crosses a block edge, a safetensors header being parsed,
an HTTP index body, a GCS or S3 listing or metadata answer and what its parse builds. The
budget is a real bound on the daemon's data memory, not a soft target. Demand reads and leases
wait for space when everything is pinned; prefetches never wait and never push out a block
that was prefetched and not yet read.

Leases together never take more than ``capacity - block_size`` (``max_lease``): a request
that holds a lease may still wait for a block, and one block always fits beside every lease
held, so those waits end (pinned blocks are unpinned once their GET or disk write is done,
neither of which waits for memory).

This is a hand-kept OrderedDict rather than ``cachetools.LRUCache`` because eviction has to
skip pinned and not-yet-read blocks and account for reservations, which cachetools' fixed
``popitem`` policy cannot express.

All methods run in trio tasks (never in worker threads); the buffers themselves are handed
to threads only while pinned, when nothing else writes them.
"""

from __future__ import annotations

import copy
import enum
import mmap
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from modelfs.memlimit import BLOCK_OBJECT, MAX_REQUEST
from modelfs.units import round_up

__all__ = [
    "MAX_REQUEST",
    "Block",
    "BlockKey",
    "BlockState",
    "BufferKind",
    "Lease",
    "MemoryCache",
    "MemoryStats",
    "detached",
]

_PAGE = mmap.PAGESIZE

_HUGE_PAGE = 2 << 20

BlockKey = tuple[str, str, int]
"""(object key, version, block index)."""


class BlockState(enum.Enum):
    FILLING = "filling"
    READY = "ready"
    FAILED = "failed"


class Block:
    """One block's buffer and state. ``view`` is only valid to read once ``state`` is READY."""

    __slots__ = ("_buf", "charge", "crc", "error", "key", "length", "pins", "ready", "state", "unread_prefetch", "view")

    def __init__(self, key: BlockKey, length: int, buf: mmap.mmap, *, prefetch: bool, charge: int) -> None:
        self.key = key
        self.length = length
        self.charge = charge  # what the budget counts for it (see MemoryCache.charge)
        self._buf = buf
        self.view = memoryview(buf)[:length]
        self.state = BlockState.FILLING
        self.ready = trio.Event()
        self.error: BaseException | None = None
        self.pins = 1
        self.unread_prefetch = prefetch
        self.crc: int | None = None  # CRC32C of the bytes, if the GET computed it as they arrived

    def release_buffer(self) -> mmap.mmap:
        """Hand the buffer back for reuse; this block must not be read again."""
        buf = self._buf
        self.view = memoryview(b"")
        return buf


def detached(error: BaseException) -> BaseException:
    """A copy of ``error`` with no traceback, cause or context.

    A failed block keeps its error for the readers that waited on it. The error as raised
    carries a traceback whose frames hold the block (and views of its buffer): kept on the
    block, that is a reference cycle, and the block's buffer, no longer counted in the budget,
    would live until the garbage collector ran (a failing file read in a loop grew RSS past
    the bound). So the block keeps a copy without one, and each reader raises a copy of that.
    """
    try:
        clone = copy.copy(error)
    except Exception:  # an exception type that cannot be rebuilt from its args
        clone = RuntimeError(f"{type(error).__name__}: {error}")
    if type(clone) is not type(error) or clone.args != error.args:
        clone = RuntimeError(f"{type(error).__name__}: {error}")
    clone.__traceback__ = clone.__cause__ = clone.__context__ = None
    return clone


class BufferKind(enum.Enum):
    """What a lease's bytes are for; ``modelfs stats`` shows the budget by these parts."""

    SMALL_READ = "small_reads"
    BOUNDARY = "boundary_reads"
    HEADER = "headers"
    INDEX = "index"
    METADATA = "metadata_answers"  # GCS/S3 listings and metadata answers (backends/answers.py)


class Lease:
    """Bytes of the budget held for one short-lived buffer; :meth:`release` gives them back.

    ``view`` is the buffer (``nbytes`` long). ``charge`` is what the budget counts: the whole
    mapping plus ``extra`` bytes that stand for memory the holder allocates besides the buffer
    (the objects a parser builds, say). Use as a context manager or call :meth:`release` once.
    """

    __slots__ = ("_buf", "_cache", "charge", "kind", "nbytes", "view")

    def __init__(self, cache: MemoryCache, kind: BufferKind, nbytes: int, charge: int, buf: mmap.mmap | None) -> None:
        self.kind = kind
        self.nbytes = nbytes
        self.charge = charge
        self._buf = buf
        self._cache: MemoryCache | None = cache
        self.view = memoryview(buf)[:nbytes] if buf is not None else memoryview(b"")

    def release(self) -> None:
        """Give the bytes back (idempotent). The buffer may be handed to the next lease at once,
        so a memoryview of it may be read only until the calling task next yields to trio."""
        cache, self._cache = self._cache, None
        if cache is not None:
            cache._release(self)

    def droppable(self, dropped: Callable[[], None]) -> None:
        """Hold this lease only while no other needs its room: a lease that finds no room
        releases it (the oldest such first) and calls ``dropped()``, whose holder lets go of
        what the lease counted, then and there (it can make it again). For what is kept only
        to be quicker (a parsed manifest): kept for ever, its room would be missing to waiters
        that were told their lease fits (:meth:`MemoryCache.can_lease`), who would wait for ever."""
        if self._cache is not None:
            self._cache._droppable[self] = dropped

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pages(nbytes: int) -> int:
    return round_up(nbytes, _PAGE)


@dataclass
class MemoryStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetch_refused: int = 0
    peak_bytes: int = 0
    leases: int = 0
    lease_waits: int = 0  # leases that had to wait for room


class MemoryCache:
    """Blocks in LRU order, bounded in bytes including blocks still being filled."""

    def __init__(self, capacity: int, block_size: int, on_evict: Callable[[Block], None] | None = None) -> None:
        self.capacity = capacity
        self.block_size = block_size
        self.used = 0  # blocks + leases
        self.leased = 0
        self.leased_by_kind: dict[BufferKind, int] = dict.fromkeys(BufferKind, 0)
        # Leases together stay below this, so one block always fits beside them.
        self.max_lease = max(0, capacity - block_size)
        self._lease_pool: list[mmap.mmap] = []
        # Buffers of removed full-size blocks, reused for new ones: touching fresh pages
        # costs a page fault each, more than the GET itself (docs/architecture.md, "Memory: one budget").
        # The pool only ever holds what the budget has free, so used + pooled <= capacity.
        self._pool: list[mmap.mmap] = []
        self.stats = MemoryStats()
        self._blocks: OrderedDict[BlockKey, Block] = OrderedDict()
        self._droppable: dict[Lease, Callable[[], None]] = {}  # (in the order they were made droppable)
        # Tasks waiting for room. Demand reads and leases (a request waits on them) park in
        # ``_space`` and are woken on every change that may free room; while any of them waits
        # for room (``_demand_waiting``), background reservations (the eager stream) take none,
        # so a demand read never queues behind them. Background waiters park in ``_background``
        # and are woken one at a time: each one woken passes the wake-up on after its try
        # (:meth:`reserve_background`), so a freed block wakes one of them, not every stream
        # worker to rescan the LRU (240 parked workers made the loop the bottleneck).
        self._space = trio.lowlevel.ParkingLot()
        self._background = trio.lowlevel.ParkingLot()
        self._demand_waiting = 0
        self._on_evict = on_evict
        # Bytes of blocks that were prefetched and not read yet; prefetch may hold at most
        # this share of the budget, so demand reads always find room.
        self.prefetch_share = 0.75
        self.unread_prefetch_bytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, key: BlockKey) -> Block | None:
        """The block for ``key`` (in any state), marked most recently used."""
        block = self._blocks.get(key)
        if block is not None:
            self._blocks.move_to_end(key)
        return block

    def peek(self, key: BlockKey) -> Block | None:
        """The block for ``key`` (in any state), leaving its place in the LRU order alone."""
        return self._blocks.get(key)

    def consume(self, block: Block) -> None:
        """A reader used ``block``: it is no longer protected as a not-yet-read prefetch."""
        if block.unread_prefetch:
            block.unread_prefetch = False
            self.unread_prefetch_bytes -= block.charge
            self._wake()

    def _wake(self) -> None:
        """Room may have been freed: demand waiters first; background ones only if none waits."""
        if len(self._space):
            self._space.unpark_all()
        elif not self._demand_waiting:
            self._background.unpark(count=1)

    def _demand_done_waiting(self) -> None:
        self._demand_waiting -= 1
        if not self._demand_waiting:
            self._background.unpark(count=1)  # (held back while demand waited)

    @property
    def demand_waiting(self) -> int:
        """Demand reads and leases waiting for room now."""
        return self._demand_waiting

    @property
    def background_waiting(self) -> int:
        """Background reservations (eager stream workers) parked for room now."""
        return len(self._background)

    def charge(self, length: int) -> int:
        """What the budget counts for a block of ``length`` bytes.

        A full block: its length (a whole number of pages: --block-size is a multiple of 4K);
        the objects beside its buffer are in the fixed overhead, as full blocks are at most
        ``capacity / block_size`` (modelfs.memlimit). A short block (the end of an object, a
        small file) takes whole pages and the same objects, and any number of them fit in
        the budget: it counts those too, so thousands of small files cannot grow the daemon
        past its bound (never more than a full block, whose place it takes).
        """
        if length >= self.block_size:
            return length
        return min(self.block_size, _pages(length) + BLOCK_OBJECT)

    def _evict_one(self, *, keep_unread: bool) -> bool:
        for block in self._blocks.values():
            if block.pins or block.state is not BlockState.READY:
                continue
            if keep_unread and block.unread_prefetch:
                continue
            self._remove(block)
            self.stats.evictions += 1
            if self._on_evict is not None:
                self._on_evict(block)
            return True
        return False

    def _make_room(self, length: int, *, keep_unread: bool) -> bool:
        while self.used + length > self.capacity:
            if not self._evict_one(keep_unread=keep_unread):
                return False
        return True

    @property
    def pooled_bytes(self) -> int:
        """Bytes of idle buffers kept for reuse (touched pages: they count against capacity)."""
        return len(self._pool) * self.block_size + sum(len(b) for b in self._lease_pool)

    def _trim_pools(self, adding: int) -> None:
        """Drop pooled buffers until used + ``adding`` + pooled fits the capacity."""
        while self.used + adding + self.pooled_bytes > self.capacity and (self._lease_pool or self._pool):
            (self._lease_pool or self._pool).pop()

    def _insert(self, key: BlockKey, length: int, prefetch: bool) -> Block:
        charge = self.charge(length)
        if length == self.block_size and self._pool:
            buf = self._pool.pop()
        else:
            # An anonymous mapping, not a bytearray: freeing it always returns the pages to
            # the kernel, where glibc's malloc could keep large freed chunks in its heap.
            # MAP_PRIVATE: plain anonymous memory (a shared mapping is counted as shmem).
            buf = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE)
            if length >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
                # Huge pages: the O_DIRECT disk write and the FUSE reply pin the buffer's pages
                # (get_user_pages) on every use, and a fresh buffer faults its pages in once;
                # 2 MiB pages make both 512x fewer page operations (benchmarks/README.md).
                buf.madvise(mmap.MADV_HUGEPAGE)
            # A fresh buffer adds to used + pooled: give back pooled buffers the budget no
            # longer has room for (a short last block, or a new one beside a non-empty pool).
            self._trim_pools(charge)
        block = Block(key, length, buf, prefetch=prefetch, charge=charge)
        self._blocks[key] = block
        self.used += block.charge
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.used)
        if prefetch:
            self.unread_prefetch_bytes += block.charge
        return block

    async def reserve(self, key: BlockKey, length: int) -> Block | None:
        """A new pinned FILLING block for a demand read, waiting for space if all is pinned.

        None if another task created the block while this one waited: look it up again.
        """
        charge = self.charge(length)
        if charge > self.capacity:
            raise ValueError("block larger than the memory budget")
        waited = False
        try:
            while True:
                if key in self._blocks:
                    return None
                # First try to keep unread prefetches; if that is not enough, a demand read
                # outranks them.
                if self._make_room(charge, keep_unread=True) or self._make_room(charge, keep_unread=False):
                    return self._insert(key, length, prefetch=False)
                if not waited:
                    waited = True
                    self._demand_waiting += 1
                await self._space.park()
        finally:
            if waited:
                self._demand_done_waiting()

    async def reserve_background(self, key: BlockKey, length: int) -> Block | None:
        """A new pinned FILLING block for background streaming, or None if the block exists.

        Waits for room like a demand read, but makes room only from blocks already read:
        it never pushes out a prefetch a reader is about to use. Demand reads overtake it:
        it takes no room while one waits for room.
        """
        while True:
            if key in self._blocks:
                self._background.unpark(count=1)  # (the wake-up that brought us here, passed on)
                return None
            if not self._demand_waiting and self._make_room(self.charge(length), keep_unread=True):
                # There may be room for more: the next waiter tries (and parks again if not).
                self._background.unpark(count=1)
                return self._insert(key, length, prefetch=False)
            await self._background.park()

    def adopt_prefetch(self, block: Block) -> None:
        """Protect a cached, not yet read block as a prefetch, if the prefetch share allows."""
        if block.unread_prefetch or block.state is BlockState.FAILED:
            return
        if self.unread_prefetch_bytes + block.charge > self.capacity * self.prefetch_share:
            return
        block.unread_prefetch = True
        self.unread_prefetch_bytes += block.charge

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._blocks

    def prefetch_fits(self, nbytes: int) -> bool:
        """Whether the prefetch share has room for ``nbytes`` more of not-yet-read blocks."""
        return self.unread_prefetch_bytes + nbytes <= self.capacity * self.prefetch_share

    def try_reserve_prefetch(self, key: BlockKey, length: int) -> Block | None:
        """A new pinned FILLING block for a prefetch, or None when the budget has no room for it."""
        if key in self._blocks:
            return None
        charge = self.charge(length)
        if self._demand_waiting or not self.prefetch_fits(charge):  # (no room taken from a waiting demand read)
            self.stats.prefetch_refused += 1
            return None
        if not self._make_room(charge, keep_unread=True):
            self.stats.prefetch_refused += 1
            return None
        return self._insert(key, length, prefetch=True)

    def complete(self, block: Block) -> None:
        """``block`` is filled: readers may use it. It stays pinned until :meth:`unpin`."""
        block.state = BlockState.READY
        block.ready.set()

    def unpin(self, block: Block) -> None:
        block.pins -= 1
        if block.pins == 0:
            self._wake()

    def fail(self, block: Block, error: BaseException | None) -> None:
        """Filling ``block`` failed: drop it and wake its waiters (``error`` None: they retry)."""
        block.state = BlockState.FAILED
        block.error = None if error is None else detached(error)
        if self._blocks.get(block.key) is block:
            self._remove(block)
        block.ready.set()

    def _remove(self, block: Block) -> None:
        del self._blocks[block.key]
        self.used -= block.charge
        if block.length == self.block_size and block.pins == 0:
            self._pool.append(block.release_buffer())
        if block.unread_prefetch:
            block.unread_prefetch = False
            self.unread_prefetch_bytes -= block.charge
        self._wake()

    # --- leases: the short-lived buffers of requests

    def can_lease(self, nbytes: int, *, extra: int = 0) -> bool:
        """Whether a lease of this size can ever be granted (it fits beside one block)."""
        return _pages(nbytes) + extra <= self.max_lease

    async def lease(self, nbytes: int, kind: BufferKind, *, extra: int = 0) -> Lease:
        """A buffer of ``nbytes`` from the budget, waiting for room; ``extra`` more bytes counted.

        Room is made by evicting unpinned blocks, unread prefetches last, as for a demand read.
        Raises ValueError when the lease could never fit (see :meth:`can_lease`).
        """
        self._check_lease(nbytes, kind, extra)
        waited = False
        try:
            while (taken := self._take(nbytes, extra)) is None:
                if not waited:
                    waited = True
                    self._demand_waiting += 1
                await self._space.park()
            return self._grant(kind, nbytes, *taken, waited=waited)
        finally:
            if waited:
                self._demand_done_waiting()

    def try_lease(self, nbytes: int, kind: BufferKind, *, extra: int = 0) -> Lease | None:
        """:meth:`lease` if the budget has room for it now (evicting unpinned blocks), else None:
        never waits. For a holder of other bytes of the budget, whose wait could be a deadlock."""
        self._check_lease(nbytes, kind, extra)
        taken = self._take(nbytes, extra)
        return None if taken is None else self._grant(kind, nbytes, *taken, waited=False)

    def _check_lease(self, nbytes: int, kind: BufferKind, extra: int) -> None:
        if nbytes < 0 or extra < 0 or not self.can_lease(nbytes, extra=extra):
            raise ValueError(f"a {kind.value} buffer of {nbytes + extra} bytes does not fit in the memory budget")

    def _take(self, nbytes: int, extra: int) -> tuple[mmap.mmap | None, int] | None:
        """Room for a lease now (a pooled buffer, if one fits, and the charge), or None."""
        buf = self._pooled_lease_buffer(nbytes) if nbytes else None
        if buf is not None and len(buf) + extra > self.max_lease:
            # A pooled buffer larger than asked could never be charged beside ``extra``;
            # a fresh one of the size asked can (can_lease said so).
            self._lease_pool.append(buf)
            buf = None
        charge = (len(buf) if buf is not None else _pages(nbytes)) + extra
        self._drop_leases(charge)
        if self.leased + charge <= self.max_lease and (
            self._make_room(charge, keep_unread=True) or self._make_room(charge, keep_unread=False)
        ):
            return buf, charge
        if buf is not None:
            self._lease_pool.append(buf)
        return None

    def _drop_leases(self, charge: int) -> None:
        """Release droppable leases, the oldest first, until a lease of ``charge`` fits (or none is left)."""
        while self.leased + charge > self.max_lease and self._droppable:
            lease = next(iter(self._droppable))
            dropped = self._droppable.pop(lease)
            lease.release()
            dropped()

    def _grant(self, kind: BufferKind, nbytes: int, buf: mmap.mmap | None, charge: int, *, waited: bool) -> Lease:
        if buf is None and nbytes > 0:
            self._trim_pools(charge)
            buf = mmap.mmap(-1, _pages(nbytes), flags=mmap.MAP_PRIVATE)
        self.used += charge
        self._trim_pools(0)
        self.leased += charge
        self.leased_by_kind[kind] += charge
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.used)
        self.stats.leases += 1
        self.stats.lease_waits += waited
        return Lease(self, kind, nbytes, charge, buf)

    def _pooled_lease_buffer(self, nbytes: int) -> mmap.mmap | None:
        """The smallest pooled buffer that holds ``nbytes`` and is not more than twice that."""
        best = None
        for i, buf in enumerate(self._lease_pool):
            if nbytes <= len(buf) <= 2 * _pages(nbytes) and (best is None or len(buf) < len(self._lease_pool[best])):
                best = i
        return self._lease_pool.pop(best) if best is not None else None

    def _release(self, lease: Lease) -> None:
        self._droppable.pop(lease, None)
        self.used -= lease.charge
        self.leased -= lease.charge
        self.leased_by_kind[lease.kind] -= lease.charge
        buf, lease._buf = lease._buf, None
        lease.view = memoryview(b"")
        # Keep the buffer for the next lease (fresh pages cost a fault each); a few are enough.
        if buf is not None and len(self._lease_pool) < 8:
            self._lease_pool.append(buf)
            self._trim_pools(0)
        self._wake()

    def parts(self) -> dict[str, int]:
        """The budget by part: what ``modelfs stats`` and the metrics show."""
        filling = sum(b.charge for b in self._blocks.values() if b.state is BlockState.FILLING)
        out = {
            "blocks": self.used - self.leased,
            "blocks_in_flight": filling,
            "pooled": self.pooled_bytes,
        }
        out.update((kind.value, n) for kind, n in self.leased_by_kind.items())
        return out

    def forget_prefetches(self, object_key: str, version: str) -> None:
        """The object's last handle closed: its unread prefetches no longer hold budget back,
        also those whose GET is still running (nobody would read them when they land)."""
        for (key, ver, _), block in self._blocks.items():
            if key == object_key and ver == version and block.state is not BlockState.FAILED:
                self.consume(block)
