"""MemoryCache: one byte budget over filling, pinned and cached blocks, LRU, prefetch rules."""

from __future__ import annotations

import mmap

import pytest
import trio
import trio.testing

from modelfs.cache.memory import Block, BlockKey, BlockState, MemoryCache
from modelfs.memlimit import BLOCK_OBJECT

BS = 4096
PAGE = mmap.PAGESIZE


def key(i: int, obj: str = "o", version: str = "v") -> BlockKey:
    return (obj, version, i)


def pooled(cache: MemoryCache) -> int:
    return sum(len(buf) for buf in cache._pool)


async def cached(cache: MemoryCache, i: int, length: int = BS) -> Block:
    """A demand block filled, completed and unpinned: READY and evictable."""
    block = await cache.reserve(key(i), length)
    assert block is not None
    block.view[:] = bytes([i % 256]) * length
    cache.complete(block)
    cache.unpin(block)
    return block


def prefetched(cache: MemoryCache, i: int) -> Block:
    """A prefetched block, READY, unpinned and not yet read."""
    block = cache.try_reserve_prefetch(key(i), BS)
    assert block is not None
    cache.complete(block)
    cache.unpin(block)
    return block


async def test_byte_accounting_counts_filling_blocks_and_partial_lengths() -> None:
    """used is the sum of block charges, FILLING blocks included; peak_bytes tracks the maximum.
    A short block counts its whole pages and its objects, never more than a full block."""
    big = 64 * BS
    cache = MemoryCache(4 * big, big)
    a = await cache.reserve(key(0), big)
    assert a is not None and a.state is BlockState.FILLING
    assert cache.used == big
    b = await cache.reserve(key(1), 100)
    assert b is not None
    assert cache.used == big + PAGE + BLOCK_OBJECT
    assert len(b.view) == 100
    cache.complete(a)
    cache.unpin(a)
    cache.fail(b, None)  # a failed fill gives its bytes back at once
    assert cache.used == big
    assert cache.stats.peak_bytes == big + PAGE + BLOCK_OBJECT
    assert cache.lookup(key(1)) is None
    assert MemoryCache(4 * BS, BS).charge(100) == BS  # (capped at a full block's)


async def test_many_small_files_stay_inside_the_budget() -> None:
    """Each short block counts its page and objects: 10,000 one-byte files cannot hold 10,000
    blocks in a budget of 64 (before: each counted 1 byte, and RSS grew ~5 KiB per file)."""
    cache = MemoryCache(64 * 8 * BS, 8 * BS)
    for i in range(10_000):
        block = await cache.reserve((f"memory:///small-{i}.json", "1", 0), 1)
        assert block is not None
        cache.complete(block)
        cache.unpin(block)
        assert cache.used <= cache.capacity
    assert len(cache) == cache.capacity // (PAGE + BLOCK_OBJECT)


async def test_used_never_exceeds_capacity_and_peak_is_bounded() -> None:
    """Filling 50 blocks through a 3-block budget keeps used <= capacity every step."""
    cache = MemoryCache(3 * BS, BS)
    for i in range(50):
        block = await cache.reserve(key(i), BS if i % 7 else 1000)
        assert block is not None
        assert cache.used <= cache.capacity
        cache.complete(block)
        cache.unpin(block)
        assert cache.used <= cache.capacity
    assert cache.stats.peak_bytes <= cache.capacity
    assert cache.stats.peak_bytes == 3 * BS
    assert len(cache) == 3


async def test_lru_eviction_order() -> None:
    """The least recently used block goes first; lookup refreshes recency."""
    cache = MemoryCache(3 * BS, BS)
    for i in range(3):
        await cached(cache, i)
    assert cache.lookup(key(0)) is not None  # 0 is now the most recent: order 1, 2, 0
    await cached(cache, 3)
    assert cache.lookup(key(1)) is None
    assert cache.stats.evictions == 1
    await cached(cache, 4)
    assert cache.lookup(key(2)) is None
    assert [k[2] for k in cache._blocks] == [0, 3, 4]
    assert cache.stats.evictions == 2


async def test_evicted_callback_sees_each_victim() -> None:
    """on_evict is called with exactly the evicted blocks, in LRU order."""
    seen: list[int] = []
    cache = MemoryCache(2 * BS, BS, on_evict=lambda b: seen.append(b.key[2]))
    for i in range(5):
        await cached(cache, i)
    assert seen == [0, 1, 2]


async def test_pinned_and_filling_blocks_are_never_evicted() -> None:
    """A reserve that would need a pinned or FILLING block's space waits instead of evicting it."""
    cache = MemoryCache(2 * BS, BS)
    pinned = await cache.reserve(key(0), BS)
    assert pinned is not None
    cache.complete(pinned)  # READY but still pinned
    filling = await cache.reserve(key(1), BS)
    assert filling is not None  # FILLING (and pinned)
    got: list[Block | None] = []

    async def demand() -> None:
        got.append(await cache.reserve(key(2), BS))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(demand)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # waiting, nothing evicted
        assert cache.lookup(key(0)) is pinned and cache.lookup(key(1)) is filling
        assert cache.stats.evictions == 0
        # Completing is not enough: the block is still pinned.
        cache.complete(filling)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        cache.unpin(filling)
    assert len(got) == 1 and got[0] is not None and got[0].key == key(2)
    assert cache.lookup(key(1)) is None  # the unpinned one was the victim
    assert cache.lookup(key(0)) is pinned
    assert cache.used == 2 * BS


async def test_demand_reserve_waits_until_unpin() -> None:
    """With every byte pinned, reserve parks, and proceeds once a block is unpinned."""
    cache = MemoryCache(2 * BS, BS)
    blocks = []
    for i in range(2):
        b = await cache.reserve(key(i), BS)
        assert b is not None
        cache.complete(b)
        blocks.append(b)
    done = trio.Event()
    result: list[Block | None] = []

    async def demand() -> None:
        result.append(await cache.reserve(key(9), BS))
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(demand)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert cache.used == 2 * BS
        cache.unpin(blocks[1])
        await done.wait()
    assert result[0] is not None and result[0].state is BlockState.FILLING
    assert cache.lookup(key(1)) is None and cache.lookup(key(0)) is blocks[0]
    assert cache.used <= cache.capacity


async def test_reserve_returns_none_when_another_task_created_the_block() -> None:
    """A waiter whose key was reserved meanwhile gets None (look it up again), not a duplicate."""
    cache = MemoryCache(BS, BS)
    first = await cache.reserve(key(0), BS)
    assert first is not None
    result: list[Block | None] = []

    async def waiter() -> None:
        result.append(await cache.reserve(key(1), BS))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        cache.fail(first, None)  # frees the space...
        other = await cache.reserve(key(1), BS)  # ...and someone else takes key 1 first
        assert other is not None
    assert result == [None]
    assert len(cache) == 1 and cache.used == BS


async def test_block_larger_than_budget_is_refused() -> None:
    """A block that can never fit raises instead of waiting forever."""
    cache = MemoryCache(BS, BS)
    with pytest.raises(ValueError):
        await cache.reserve(key(0), BS + 1)


def test_prefetch_refused_when_prefetch_share_is_used() -> None:
    """Unread prefetches may hold at most prefetch_share of the budget; beyond it, None at once."""
    cache = MemoryCache(4 * BS, BS)  # share 0.75: 3 blocks of unread prefetch
    for i in range(3):
        prefetched(cache, i)
    assert cache.unread_prefetch_bytes == 3 * BS
    assert cache.try_reserve_prefetch(key(3), BS) is None  # synchronous: it cannot wait
    assert cache.stats.prefetch_refused == 1
    assert len(cache) == 3 and cache.used == 3 * BS
    # Reading one frees its share.
    b0 = cache.lookup(key(0))
    assert b0 is not None
    cache.consume(b0)
    assert cache.unread_prefetch_bytes == 2 * BS
    assert cache.try_reserve_prefetch(key(3), BS) is not None
    assert cache.stats.prefetch_refused == 1


async def test_prefetch_refused_when_budget_is_pinned() -> None:
    """A prefetch never waits for pinned demand blocks: it is refused."""
    cache = MemoryCache(2 * BS, BS)
    for i in range(2):
        b = await cache.reserve(key(i), BS)
        assert b is not None
    assert cache.try_reserve_prefetch(key(5), BS) is None
    assert cache.stats.prefetch_refused == 1
    assert cache.used == 2 * BS
    assert cache.unread_prefetch_bytes == 0


async def test_prefetch_does_not_evict_unread_prefetches() -> None:
    """A prefetch may evict read blocks but never a prefetched block that was not read yet."""
    cache = MemoryCache(4 * BS, BS)
    cache.prefetch_share = 1.0  # isolate the eviction rule from the share rule
    for i in range(4):
        prefetched(cache, i)
    assert cache.try_reserve_prefetch(key(4), BS) is None
    assert [k[2] for k in cache._blocks] == [0, 1, 2, 3]
    assert cache.stats.evictions == 0
    b2 = cache.lookup(key(2))
    assert b2 is not None
    cache.consume(b2)  # block 2 was read: now it may go
    assert cache.try_reserve_prefetch(key(4), BS) is not None
    assert cache.lookup(key(2)) is None
    assert {k[2] for k in cache._blocks} == {0, 1, 3, 4}
    assert cache.unread_prefetch_bytes == 4 * BS


async def test_prefetch_evicts_read_blocks_before_refusing() -> None:
    """A prefetch takes the LRU read block's space when the budget is full of read blocks."""
    cache = MemoryCache(2 * BS, BS)
    await cached(cache, 0)
    await cached(cache, 1)
    block = cache.try_reserve_prefetch(key(2), BS)
    assert block is not None and block.unread_prefetch
    assert cache.lookup(key(0)) is None
    assert cache.stats.prefetch_refused == 0 and cache.stats.evictions == 1


async def test_demand_read_outranks_unread_prefetches() -> None:
    """When only unread prefetches are evictable, a demand reserve evicts them (oldest first)."""
    cache = MemoryCache(2 * BS, BS)
    cache.prefetch_share = 1.0
    prefetched(cache, 0)
    prefetched(cache, 1)
    with trio.fail_after(1):
        block = await cache.reserve(key(2), BS)
    assert block is not None
    assert cache.lookup(key(0)) is None and cache.lookup(key(1)) is not None
    assert cache.unread_prefetch_bytes == BS


async def test_demand_read_evicts_read_blocks_before_unread_prefetches() -> None:
    """A read block older than an unread prefetch is still the one a demand read evicts first."""
    cache = MemoryCache(2 * BS, BS)
    prefetched(cache, 0)  # older, unread
    await cached(cache, 1)  # newer, read
    block = await cache.reserve(key(2), BS)
    assert block is not None
    assert cache.lookup(key(0)) is not None
    assert cache.lookup(key(1)) is None


def test_forget_prefetches_releases_the_share_of_one_version() -> None:
    """forget_prefetches consumes the READY unread prefetches of that object version only."""
    cache = MemoryCache(8 * BS, BS)
    for i in range(2):
        prefetched(cache, i)
    other = cache.try_reserve_prefetch(("other", "v", 0), BS)
    assert other is not None
    cache.complete(other)
    cache.unpin(other)
    assert cache.unread_prefetch_bytes == 3 * BS
    cache.forget_prefetches("o", "v")
    assert cache.unread_prefetch_bytes == BS
    assert other.unread_prefetch


async def test_fail_wakes_waiters_and_keeps_error() -> None:
    """fail() drops the block, sets its error and its ready event."""
    cache = MemoryCache(2 * BS, BS)
    block = await cache.reserve(key(0), BS)
    assert block is not None
    err = RuntimeError("boom")
    cache.fail(block, err)
    assert block.ready.is_set() and block.state is BlockState.FAILED
    assert type(block.error) is RuntimeError and block.error.args == ("boom",) and block.error.__traceback__ is None
    assert cache.used == 0 and len(cache) == 0


async def test_buffer_pool_reuses_buffers() -> None:
    """An evicted full-size block's buffer is reused by the next full-size block."""
    cache = MemoryCache(2 * BS, BS)
    b0 = await cached(cache, 0)
    buf0 = b0._buf
    await cached(cache, 1)
    b2 = await cached(cache, 2)  # evicts 0
    assert b2._buf is buf0
    assert bytes(b2.view) == bytes([2]) * BS  # the new block's bytes, not the old ones
    assert len(b0.view) == 0  # the evicted block can no longer be read


async def test_buffer_pool_stays_within_budget() -> None:
    """used + pooled bytes never exceed capacity, with full, short, failed and evicted blocks."""
    cache = MemoryCache(3 * BS, BS)

    def check() -> None:
        assert cache.used <= cache.capacity
        assert cache.used + pooled(cache) <= cache.capacity, (cache.used, pooled(cache))

    lengths = [BS, BS, BS, 100, BS, 2000, 3000, BS, BS, 1, BS, BS]
    for i, length in enumerate(lengths):
        block = await cache.reserve(key(i), length)
        assert block is not None
        check()
        if i % 5 == 4:
            cache.fail(block, None)
        else:
            cache.complete(block)
            cache.unpin(block)
        check()
        if i % 4 == 3:
            cache._evict_one(keep_unread=False)  # a block removed out of turn
            check()
    # Prefetches take buffers from the same pool.
    for i in range(100, 103):
        b = cache.try_reserve_prefetch(key(i), BS)
        if b is not None:
            cache.complete(b)
            cache.unpin(b)
        check()


async def test_prefetches_still_filling_at_the_last_close_are_forgotten_too() -> None:
    """A read-ahead GET still running when the object's last handle closes lands as a block
    nobody will read: it must not hold the prefetch share (before: only READY blocks were
    forgotten, and such blocks kept read-ahead of other files starved for good)."""
    cache = MemoryCache(8 * BS, BS)
    landed = cache.try_reserve_prefetch(key(0, "a"), BS)
    filling = cache.try_reserve_prefetch(key(1, "a"), BS)
    other = cache.try_reserve_prefetch(key(0, "b"), BS)
    assert landed is not None and filling is not None and other is not None
    cache.complete(landed)
    cache.unpin(landed)
    cache.forget_prefetches("a", "v")
    assert cache.unread_prefetch_bytes == BS  # b's only
    cache.complete(filling)
    cache.unpin(filling)
    assert cache.unread_prefetch_bytes == BS and not filling.unread_prefetch
    assert bytes(cache.lookup(key(1, "a")).view) == bytes(BS)  # (still cached, just not held back)


async def test_demand_waiters_go_before_background_waiters_and_these_wake_one_at_a_time() -> None:
    """Demand reads parked for room get freed room before the eager stream's parked workers,
    round after round (they parked in one FIFO lot with them, and every freed block woke all:
    with 240 stream workers parked, demand reads waited up to 121 s). A freed block wakes one
    background waiter, not all of them; once no demand read waits, they all get room in turn."""
    cache = MemoryCache(4 * BS, BS)
    pinned = []
    for i in range(4):
        block = await cache.reserve(key(i), BS)
        assert block is not None
        cache.complete(block)
        pinned.append(block)  # the budget is full of pinned blocks (GETs in flight, say)
    streamed: list[Block] = []

    async def background(i: int) -> None:
        block = await cache.reserve_background(key(100 + i), BS)
        assert block is not None
        cache.complete(block)
        streamed.append(block)

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(background, i)
        await trio.testing.wait_all_tasks_blocked()
        assert cache.background_waiting == 4
        for round_ in range(8):
            got: list[Block] = []

            async def demand(i: int, got: list[Block]) -> None:
                block = await cache.reserve(key(10 + i), BS)
                assert block is not None
                cache.complete(block)
                got.append(block)

            nursery.start_soon(demand, round_, got)
            await trio.testing.wait_all_tasks_blocked()
            assert cache.demand_waiting == 1 and not got
            cache.unpin(pinned.pop(0))  # room for one block: the demand read's
            await trio.testing.wait_all_tasks_blocked()
            assert len(got) == 1 and streamed == [], round_
            assert cache.demand_waiting == 0 and cache.background_waiting == 4
            pinned.append(got[0])
        cache.unpin(pinned.pop(0))
        assert cache.background_waiting == 3  # one woken, three still parked
        for block in pinned:
            cache.unpin(block)
        await trio.testing.wait_all_tasks_blocked()
        assert len(streamed) == 4  # they all made progress
        for block in streamed:
            cache.unpin(block)
    assert cache.used <= cache.capacity
