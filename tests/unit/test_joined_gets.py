"""Read-ahead joins neighbouring blocks into one GET (backends/base.JoinedReads): the bytes,
the GETs, the budget, failures; each joined block is still cached and written through alone."""

from __future__ import annotations

from collections.abc import Sequence

import trio
import trio.testing

from modelfs.backends.memory import MemoryBackend
from modelfs.cache.memory import BlockState
from modelfs.errors import TransientError
from modelfs.files import OpenFiles

from .conftest import BS, StoreFactory, put_ramp, wait_until


async def _read_all(files: OpenFiles, fh: int, size: int, chunk: int) -> bytes:
    out = bytearray()
    for offset in range(0, size, chunk):
        out += await files.read(fh, offset, chunk)
    return bytes(out)


async def test_sequential_read_joins_blocks_and_fetches_each_byte_once(make_store: StoreFactory) -> None:
    backend = MemoryBackend(latency=0.001, joins_reads=True)
    ref, data = put_ramp(backend, "m.bin", 40 * BS + 100, seed=11)
    store = await make_store(backend, memory_blocks=32, disk=True, join_blocks=4)
    assert store.join_blocks == 4
    files = OpenFiles(store, max_prefetch=16 * BS)
    fh = files.open(ref)
    assert await _read_all(files, fh, len(data), BS // 2) == data
    files.release(fh)
    await wait_until(lambda: store.slots.in_use == 0)
    lengths = [length for _, _, length in backend.read_log]
    # Every byte came from the backend exactly once, mostly by GETs of 4 blocks.
    assert sorted(offset for _, offset, _ in backend.read_log) == sorted({o for _, o, _ in backend.read_log})
    assert sum(lengths) == len(data)
    assert lengths.count(4 * BS) >= 7 and len(lengths) <= 16
    assert store.stats.joined_gets == lengths.count(4 * BS) + sum(1 for n in lengths if BS < n < 4 * BS)
    assert store.memory.stats.peak_bytes <= store.memory.capacity
    # Each block was written to the disk cache on its own, and comes back from it exactly.
    assert store.disk is not None
    await wait_until(lambda: store.disk is not None and store.disk.stats.writes == 41)
    store.memory = type(store.memory)(store.memory.capacity, BS)  # forget the memory tier
    calls = backend.read_calls
    for index in (0, 3, 4, 17, 40):
        block = await store.get(ref, index)
        assert bytes(block.view) == data[index * BS : (index + 1) * BS]
    assert backend.read_calls == calls


async def test_a_backend_that_cannot_join_gets_one_block_per_get(make_store: StoreFactory) -> None:
    backend = MemoryBackend(latency=0.001)  # joins_reads False: a local dir, a cache tier
    ref, data = put_ramp(backend, "m.bin", 20 * BS, seed=12)
    store = await make_store(backend, memory_blocks=32, join_blocks=4)
    assert store.join_blocks == 1
    files = OpenFiles(store, max_prefetch=16 * BS)
    fh = files.open(ref)
    assert await _read_all(files, fh, len(data), BS) == data
    files.release(fh)
    assert {length for _, _, length in backend.read_log} == {BS}
    assert store.stats.joined_gets == 0


async def test_a_small_budget_joins_fewer_blocks(make_store: StoreFactory) -> None:
    """A joined GET holds all its blocks until its last byte: at most half the prefetch share."""
    backend = MemoryBackend(joins_reads=True)
    put_ramp(backend, "m.bin", 4 * BS)
    assert (await make_store(backend, memory_blocks=4, join_blocks=4)).join_blocks == 1
    assert (await make_store(backend, memory_blocks=8, join_blocks=4)).join_blocks == 3
    assert (await make_store(backend, memory_blocks=64, join_blocks=4)).join_blocks == 4


async def test_budget_holds_while_joined_gets_run(make_store: StoreFactory) -> None:
    backend = MemoryBackend(latency=0.001, joins_reads=True)
    ref, data = put_ramp(backend, "m.bin", 30 * BS + 1, seed=13)
    store = await make_store(backend, memory_blocks=12, disk=True, join_blocks=4)
    files = OpenFiles(store, max_prefetch=16 * BS)
    fh = files.open(ref)
    out = bytearray()
    for offset in range(0, len(data), 1000):
        out += await files.read(fh, offset, 1000)
        assert store.memory.used <= store.memory.capacity
    files.release(fh)
    assert bytes(out) == data
    assert store.stats.joined_gets > 0
    assert store.memory.stats.peak_bytes <= store.memory.capacity


async def test_a_failed_joined_get_fails_its_blocks_and_readers_recover(
    make_store: StoreFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """Every joined GET fails: its blocks are dropped (none stays FILLING), and readers get
    the exact bytes from single-block demand GETs."""
    backend = MemoryBackend(joins_reads=True)
    ref, data = put_ramp(backend, "m.bin", 24 * BS, seed=14)
    failed: list[tuple[int, int]] = []

    def fault(name: str, offset: int, length: int) -> None:
        if length > BS:
            failed.append((offset, length))
            raise TransientError("503 on the joined GET")

    backend.fault = fault
    store = await make_store(backend, memory_blocks=32, join_blocks=4, retry_deadline=0.5)
    files = OpenFiles(store, max_prefetch=16 * BS)
    fh = files.open(ref)
    assert await _read_all(files, fh, len(data), BS) == data
    files.release(fh)
    await wait_until(lambda: store.slots.in_use == 0)
    assert failed
    assert store.stats.joined_gets == 0
    assert store.stats.retry.retries >= len(failed)  # each failed joined GET was fetched again
    assert all(b.state is not BlockState.FILLING for b in store.memory._blocks.values())


class _WrongSums(MemoryBackend):
    """Reports a CRC32C that does not match the bytes (a bug in a transport's summing)."""

    async def read_ranges(
        self,
        name: str,
        version: str,
        offset: int,
        dests: Sequence[memoryview],
        sums: list[int] | None = None,
        **kw: int | None,
    ) -> None:
        await super().read_ranges(name, version, offset, dests, sums, **kw)
        if sums is not None:
            sums[:] = [s ^ 1 for s in sums]


async def test_the_disk_cache_keeps_the_sums_the_get_computed_and_still_checks_them(
    make_store: StoreFactory,
) -> None:
    """Blocks are written with the CRC32C the GET computed; a wrong one is caught when the
    block is read back (it is fetched again), never served."""
    for backend, refetched in ((MemoryBackend(joins_reads=True), 0), (_WrongSums(joins_reads=True), 5)):
        ref, data = put_ramp(backend, "m.bin", 12 * BS, seed=15)
        store = await make_store(backend, memory_blocks=32, disk=True, join_blocks=4)
        files = OpenFiles(store, max_prefetch=16 * BS)
        fh = files.open(ref)
        assert await _read_all(files, fh, len(data), BS) == data
        files.release(fh)
        await wait_until(lambda s=store: s.disk is not None and s.disk.stats.writes == 12)
        store.memory = type(store.memory)(store.memory.capacity, BS)
        calls = backend.read_calls
        for index in (0, 1, 5, 8, 11):
            block = await store.get(ref, index)
            assert bytes(block.view) == data[index * BS : (index + 1) * BS]
        assert backend.read_calls == calls + refetched
