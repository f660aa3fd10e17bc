"""BlockStore: single-flight, spill to disk and reload, demand before prefetch, budget, retries."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from modelfs.backends.memory import MemoryBackend
from modelfs.cache.blocks import BlockStore, FetchSlots, ObjectRef
from modelfs.cache.memory import MemoryCache
from modelfs.errors import TransientError, VersionChanged
from modelfs.files import GAVE_UP_SECONDS, OpenFiles

from .conftest import BS, StoreFactory, put_ramp, ref_for, wait_until


async def test_concurrent_readers_of_one_block_cause_one_get(make_store: StoreFactory) -> None:
    """20 readers of one block at once: exactly one backend read, all see the same exact bytes."""
    backend = MemoryBackend(latency=0.01)
    ref, data = put_ramp(backend, "m.bin", 3 * BS)
    store = await make_store(backend)
    got: list[bytes] = []

    async def reader() -> None:
        block = await store.get(ref, 1)
        got.append(bytes(block.view))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(reader)
    assert backend.read_calls == 1
    assert backend.reads[("m.bin", BS)] == 1
    assert got == [data[BS : 2 * BS]] * 20
    assert store.stats.backend_gets == 1
    assert store.memory.stats.misses == 1 and store.memory.stats.hits == 19


async def test_every_block_exact_including_short_last(make_store: StoreFactory) -> None:
    """Each block of an object is its exact slice; the last one is short."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "m.bin", 3 * BS + 77, seed=3)
    store = await make_store(backend)
    assert store.block_count(ref) == 4
    for i in range(4):
        block = await store.get(ref, i)
        assert bytes(block.view) == data[i * BS : (i + 1) * BS]
    assert len((await store.get(ref, 3)).view) == 77
    assert store.stats.backend_bytes == len(data)


async def test_spill_to_disk_and_reload(make_store: StoreFactory) -> None:
    """With 2 blocks of memory, a block read long ago comes back from disk, not the backend."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "m.bin", 6 * BS, seed=1)
    store = await make_store(backend, memory_blocks=2, disk=True)
    assert store.disk is not None
    for i in range(6):
        block = await store.get(ref, i)
        assert bytes(block.view) == data[i * BS : (i + 1) * BS]
        assert store.memory.used <= store.memory.capacity
    await wait_until(lambda: store.disk is not None and store.disk.stats.writes == 6)
    # A block stays pinned until its disk write ends, so on a busy machine the LRU may have
    # kept block 0 (its write the slowest) and let a later one go: reading the last two again
    # leaves only them in memory (from memory or disk, never the backend).
    for i in (4, 5):
        assert bytes((await store.get(ref, i)).view) == data[i * BS : (i + 1) * BS]
    assert store.memory.lookup((ref.key, ref.version, 0)) is None  # evicted from memory
    reads_before = backend.read_calls
    assert reads_before == 6
    hits_before = store.disk.stats.hits
    block = await store.get(ref, 0)
    assert bytes(block.view) == data[:BS]
    assert backend.read_calls == reads_before
    assert store.disk.stats.hits == hits_before + 1
    assert store.memory.stats.peak_bytes <= store.memory.capacity


async def test_without_disk_evicted_block_is_refetched(make_store: StoreFactory) -> None:
    """With the disk cache disabled, a block evicted from memory is fetched again."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "m.bin", 6 * BS, seed=1)
    store = await make_store(backend, memory_blocks=2)
    for i in range(6):
        await store.get(ref, i)
    block = await store.get(ref, 0)
    assert bytes(block.view) == data[:BS]
    assert backend.reads[("m.bin", 0)] == 2
    assert backend.read_calls == 7
    assert store.disk is None  # so no disk hits


async def test_demand_read_overtakes_queued_prefetches(
    make_store: StoreFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """With one GET slot busy, a demand read waiting for it goes before every queued prefetch."""
    backend = MemoryBackend(latency=1.0)
    ref, data = put_ramp(backend, "m.bin", 10 * BS)
    store = await make_store(backend, max_concurrency=1)
    for i in range(1, 5):
        assert store.prefetch(ref, i)
    await trio.testing.wait_all_tasks_blocked()  # prefetch 1 holds the slot, 2..4 are queued
    assert store.slots.in_use == 1 and store.slots.waiting_prefetches == 3
    block = await store.get(ref, 8)
    assert bytes(block.view) == data[8 * BS : 9 * BS]
    await wait_until(lambda: backend.read_calls == 5)
    order = [offset // BS for _, offset, _ in backend.read_log]
    # Which prefetch got the slot first is up to trio's scheduler; the demand block is next.
    assert order[1] == 8
    assert sorted(order[:1] + order[2:]) == [1, 2, 3, 4]
    assert store.stats.demand_gets == 1 and store.stats.prefetch_gets == 4
    assert backend.max_in_flight == 1


async def test_concurrency_cap_is_respected(make_store: StoreFactory, autojump_clock: trio.testing.MockClock) -> None:
    """No more GETs in flight than max_concurrency, whatever mix of readers and prefetches."""
    backend = MemoryBackend(latency=0.5)
    ref, data = put_ramp(backend, "m.bin", 16 * BS)
    store = await make_store(backend, max_concurrency=3)
    for i in range(8, 16):
        store.prefetch(ref, i)
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(store.get, ref, i)
    await wait_until(lambda: backend.read_calls == 16)
    assert backend.max_in_flight == 3
    await wait_until(lambda: store.slots.in_use == 0)


async def test_cancelled_fetch_releases_its_slot_and_block(
    make_store: StoreFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """A demand read cancelled mid-GET frees its slot and budget; a later read succeeds."""
    backend = MemoryBackend(latency=10.0)
    ref, data = put_ramp(backend, "m.bin", 2 * BS)
    store = await make_store(backend, max_concurrency=1)
    with trio.move_on_after(1.0):
        await store.get(ref, 0)
    assert store.slots.in_use == 0
    assert store.memory.used == 0 and len(store.memory) == 0
    block = await store.get(ref, 0)
    assert bytes(block.view) == data[:BS]


async def test_cancelled_acquire_does_not_leak_a_slot() -> None:
    """FetchSlots.acquire cancelled before it could take a free slot leaves the slot free."""
    slots = FetchSlots(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        await slots.acquire(demand=True)
    assert slots.in_use == 0
    await slots.acquire(demand=False)
    assert slots.in_use == 1
    slots.release()
    assert slots.in_use == 0


async def test_budget_never_exceeded_during_sequential_read_with_prefetch(make_store: StoreFactory) -> None:
    """A sequential read with read-ahead through a 4-block budget stays within it, bytes exact."""
    backend = MemoryBackend(latency=0.001)
    ref, data = put_ramp(backend, "m.bin", 40 * BS + 100, seed=5)
    store = await make_store(backend, memory_blocks=4, disk=True)
    files = OpenFiles(store, max_prefetch=16 * BS)
    fh = files.open(ref)
    samples: list[int] = []
    out = bytearray()
    chunk = BS // 2
    for offset in range(0, len(data), chunk):
        piece = await files.read(fh, offset, chunk)
        out += piece
        samples.append(store.memory.used)
    assert bytes(out) == data
    assert max(samples) <= store.memory.capacity
    assert store.memory.stats.peak_bytes <= store.memory.capacity
    assert store.stats.prefetch_gets > 0  # read-ahead did run
    files.release(fh)


async def test_no_block_fetched_twice_while_cached(make_store: StoreFactory) -> None:
    """Two full passes (with read-ahead) through a budget that holds the file: one GET per block."""
    backend = MemoryBackend(latency=0.001)
    ref, data = put_ramp(backend, "m.bin", 12 * BS + 5, seed=2)
    store = await make_store(backend, memory_blocks=16)
    files = OpenFiles(store, max_prefetch=8 * BS)
    for _ in range(2):
        fh = files.open(ref)
        out = bytearray()
        for offset in range(0, len(data), 3000):
            out += await files.read(fh, offset, 3000)
        assert bytes(out) == data
        files.release(fh)
    await wait_until(lambda: store.slots.in_use == 0)
    assert backend.read_calls == 13
    assert set(backend.reads.values()) == {1}


async def test_transient_faults_are_retried(make_store: StoreFactory, autojump_clock: trio.testing.MockClock) -> None:
    """The first K GETs fail with TransientError; the read retries and returns exact bytes."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "m.bin", 2 * BS, seed=9)
    calls = 0

    def fault(name: str, offset: int, length: int) -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise TransientError("503 try again")

    backend.fault = fault
    store = await make_store(backend, retry_deadline=60.0)
    block = await store.get(ref, 1)
    assert bytes(block.view) == data[BS:]
    assert backend.read_calls == 4
    assert store.stats.retry.retries == 3 and store.stats.retry.gave_up == 0
    assert store.stats.errors == 0


async def test_version_changed_propagates(make_store: StoreFactory) -> None:
    """An overwrite between open and read fails the read with VersionChanged, not a retry loop."""
    backend = MemoryBackend()
    ref, _ = put_ramp(backend, "m.bin", 2 * BS)
    backend.put("m.bin", b"new contents")
    store = await make_store(backend)
    try:
        await store.get(ref, 0)
    except VersionChanged:
        pass
    else:
        raise AssertionError("VersionChanged not raised")
    assert backend.read_calls == 1
    assert store.stats.errors == 1 and store.stats.retry.retries == 0
    assert store.memory.used == 0 and len(store.memory) == 0
    # The new version reads fine.
    new = ref_for(backend, "m.bin")
    assert bytes((await store.get(new, 0)).view) == b"new contents"


async def test_gives_up_after_retry_deadline_with_transient_error(
    make_store: StoreFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """A GET that keeps failing is retried until the deadline, then fails with TransientError."""
    backend = MemoryBackend()
    ref, _ = put_ramp(backend, "m.bin", BS)

    def fault(name: str, offset: int, length: int) -> None:
        raise TransientError("connection reset")

    backend.fault = fault
    store = await make_store(backend, retry_deadline=5.0)
    start = trio.current_time()
    try:
        await store.get(ref, 0)
    except TransientError as exc:
        assert "failed after" in str(exc)
    else:
        raise AssertionError("TransientError not raised")
    assert trio.current_time() - start <= 5.0 + 0.01  # virtual time: the deadline bounds the retries
    assert backend.read_calls > 1
    assert store.stats.retry.gave_up == 1
    assert store.memory.used == 0
    assert store.slots.in_use == 0


async def test_waiters_on_a_failed_fetch_get_its_error(make_store: StoreFactory) -> None:
    """Readers waiting on a fetch that fails all see the error; none starts a second GET."""
    backend = MemoryBackend(latency=0.01)
    ref, _ = put_ramp(backend, "m.bin", BS)
    backend.put("m.bin", b"x")  # ref's version is gone
    store = await make_store(backend)
    errors: list[BaseException] = []

    async def reader() -> None:
        try:
            await store.get(ref, 0)
        except VersionChanged as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(reader)
    assert len(errors) == 5
    assert backend.read_calls == 1


async def test_prefetch_refused_beyond_last_block_or_budget(make_store: StoreFactory) -> None:
    """prefetch() is False past the end and when the budget's prefetch share is full."""
    backend = MemoryBackend(latency=0.01)
    ref, _ = put_ramp(backend, "m.bin", 8 * BS)
    store = await make_store(backend, memory_blocks=2)  # share 0.75: one prefetched block
    assert not store.prefetch(ref, 8)
    assert store.prefetch(ref, 1)
    assert store.prefetch(ref, 1)  # already there: nothing new
    assert not store.prefetch(ref, 2)
    assert store.memory.stats.prefetch_refused == 1
    await wait_until(lambda: backend.read_calls == 1)


async def test_prefetched_block_serves_demand_read(make_store: StoreFactory) -> None:
    """A demand read of a prefetched block uses it (no second GET) and consumes its share."""
    backend = MemoryBackend(latency=0.01)
    ref, data = put_ramp(backend, "m.bin", 4 * BS, seed=4)
    store = await make_store(backend)
    assert store.prefetch(ref, 2)
    block = await store.get(ref, 2)  # waits on the in-flight prefetch
    assert bytes(block.view) == data[2 * BS : 3 * BS]
    assert backend.read_calls == 1
    assert store.memory.unread_prefetch_bytes == 0
    assert store.stats.prefetch_gets == 1 and store.stats.demand_gets == 0


def test_block_count_and_lengths() -> None:
    """BlockStore block arithmetic: count and lengths, no I/O."""
    store = BlockStore(
        MemoryBackend(), MemoryCache(2 * BS, BS), None, block_size=BS, max_concurrency=1, retry_deadline=1.0
    )
    ref = ObjectRef("k", "n", "1", 2 * BS + 1)
    assert store.block_count(ref) == 3
    assert [store._length(ref, i) for i in range(3)] == [BS, BS, 1]
    assert store.block_count(ObjectRef("k", "n", "1", 0)) == 0


async def test_a_read_that_gave_up_fails_again_at_once_on_its_handle(
    make_store: StoreFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """The kernel reads a page again on the same handle right after its read-ahead read failed;
    that read gets the same error at once instead of retrying for another whole deadline. Other
    handles (a reader trying again), other ranges and the same range a little later ask again."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "m.bin", 4 * BS, seed=3)
    down = True

    def fault(name: str, offset: int, length: int) -> None:
        if down:
            raise TransientError("503")

    backend.fault = fault
    store = await make_store(backend, memory_blocks=4, retry_deadline=5.0)
    files = OpenFiles(store, max_prefetch=0)
    fh = files.open(ref)
    with pytest.raises(TransientError, match="failed after"):
        await files.read(fh, 0, 2 * BS)  # a read-ahead read
    calls, start = backend.read_calls, trio.current_time()
    with pytest.raises(TransientError, match="failed after"):
        await files.read(fh, BS, 100)  # the kernel's page read
    assert backend.read_calls == calls and trio.current_time() == start
    assert store.stats.retry.gave_up == 1
    with pytest.raises(TransientError):  # outside the range that failed: asked again
        await files.read(fh, 3 * BS, 100)
    assert store.stats.retry.gave_up == 2
    down = False
    other = files.open(ref)  # another handle: asked again at once
    assert bytes(await files.read(other, 0, 100)) == data[:100]
    files.release(other)
    await trio.sleep(GAVE_UP_SECONDS)
    assert bytes(await files.read(fh, 0, 100)) == data[:100]
    files.release(fh)
    assert not files._gave_up
