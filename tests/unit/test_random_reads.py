"""The random-read detector: small GETs for random reads, whole blocks for sequential runs."""

from __future__ import annotations

import random

import pytest

import modelfs.cache.disk as disk_module
from modelfs.backends.memory import MemoryBackend
from modelfs.cache.disk_format import ReadResult
from modelfs.files import OpenFiles
from modelfs.prefetch import PrefetchConfig

from .conftest import StoreFactory, put_ramp, wait_until

BLOCK = 64 * 1024
GRANULE = 4096
# Cursor tolerances scaled to this small file (the defaults suit multi-GB files and 8 MiB blocks).
TIGHT = PrefetchConfig(backward_tolerance=1024, forward_tolerance=1024)


async def _random_reads(files: OpenFiles, fh: int, data: bytes, count: int) -> int:
    rng = random.Random(3)
    read = 0
    for _ in range(count):
        offset = rng.randrange(0, len(data) - 512)
        got = bytes(await files.read(fh, offset, 512))
        assert got == data[offset : offset + 512], offset
        read += 512
    return read


async def test_random_reads_fetch_small_ranges(make_store: StoreFactory) -> None:
    """After two seeks, random 512-byte reads move one 4 KiB granule each, not a 64 KiB block."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.bin", 64 * BLOCK, seed=5)
    store = await make_store(backend, block_size=BLOCK, memory_blocks=8)
    never_whole = PrefetchConfig(backward_tolerance=1024, forward_tolerance=1024, small_gets_per_block=1000)
    files = OpenFiles(store, max_prefetch=0, random_read_size=GRANULE, prefetch_config=never_whole)
    fh = files.open(ref)
    read = await _random_reads(files, fh, data, 50)
    assert store.stats.small_gets >= 45  # the first reads, before two seeks, take whole blocks
    assert backend.bytes_read < 50 * GRANULE + 3 * BLOCK
    assert backend.bytes_read / read < 16


async def test_without_detector_random_reads_fetch_blocks(make_store: StoreFactory) -> None:
    """With the detector off (size 0) the same reads fetch whole blocks: much more traffic."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.bin", 64 * BLOCK, seed=5)
    store = await make_store(backend, block_size=BLOCK, memory_blocks=8)
    files = OpenFiles(store, max_prefetch=0, random_read_size=0, prefetch_config=TIGHT)
    fh = files.open(ref)
    read = await _random_reads(files, fh, data, 50)
    assert store.stats.small_gets == 0
    assert backend.bytes_read / read > 50


async def test_sequential_run_after_seeks_gets_blocks(make_store: StoreFactory) -> None:
    """A run that continues sequentially after random seeks goes back to whole blocks."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.bin", 32 * BLOCK, seed=6)
    store = await make_store(backend, block_size=BLOCK, memory_blocks=8)
    files = OpenFiles(store, max_prefetch=0, random_read_size=GRANULE, prefetch_config=TIGHT)
    fh = files.open(ref)
    for offset in (20 * BLOCK, 3 * BLOCK, 11 * BLOCK):  # seeks: the third read is "random"
        assert bytes(await files.read(fh, offset, 1024)) == data[offset : offset + 1024]
    small_before = store.stats.small_gets
    assert small_before == 1
    offset = 11 * BLOCK + 1024
    while offset < 14 * BLOCK:  # now sequential from there
        assert bytes(await files.read(fh, offset, 4096)) == data[offset : offset + 4096]
        offset += 4096
    assert store.stats.small_gets == small_before
    assert (ref.name, 12 * BLOCK) in backend.reads and (ref.name, 13 * BLOCK) in backend.reads


async def test_cached_block_is_used_for_random_reads(make_store: StoreFactory) -> None:
    """A random read of a block already in memory uses it: no GET at all."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.bin", 8 * BLOCK, seed=7)
    store = await make_store(backend, block_size=BLOCK, memory_blocks=16)
    files = OpenFiles(store, max_prefetch=0, random_read_size=GRANULE, prefetch_config=TIGHT)
    fh = files.open(ref)
    for index in range(8):  # sequential: every block cached
        await files.read(fh, index * BLOCK, BLOCK)
    calls = backend.read_calls
    for offset in (5 * BLOCK + 7, 1 * BLOCK + 99, 6 * BLOCK + 3, 2 * BLOCK):
        assert bytes(await files.read(fh, offset, 100)) == data[offset : offset + 100]
    assert backend.read_calls == calls


async def test_block_with_several_small_gets_is_fetched_whole(make_store: StoreFactory) -> None:
    """Random reads that keep landing in one block: after two small GETs the block is fetched
    whole (and cached), and later reads there need no GET at all."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.bin", 32 * BLOCK, seed=9)
    store = await make_store(backend, block_size=BLOCK, memory_blocks=8)
    files = OpenFiles(store, max_prefetch=0, random_read_size=GRANULE, prefetch_config=TIGHT)
    fh = files.open(ref)
    for offset in (20 * BLOCK, 3 * BLOCK):  # two seeks: random mode from the next new run
        assert bytes(await files.read(fh, offset, 512)) == data[offset : offset + 512]
    base = 11 * BLOCK
    for k, offset in enumerate((base + 40_000, base + 8_000, base + 24_000, base + 56_000, base + 100)):
        gets = backend.read_calls
        assert bytes(await files.read(fh, offset, 512)) == data[offset : offset + 512]
        if k < 2:
            assert store.stats.small_gets == k + 1 and backend.read_calls == gets + 1
        elif k == 2:
            assert backend.reads[(ref.name, base)] == 1 and backend.read_calls == gets + 1  # the whole block
        else:
            assert backend.read_calls == gets  # cached
    assert store.stats.small_gets == 2


def test_in_random_mode_only_a_read_at_a_run_end_continues_it() -> None:
    """Among scattered reads, landing a few MiB behind a run's end is a new run (a seek), where
    in sequential mode the kernel's reordering tolerance would have continued the run and
    fetched whole blocks for it."""
    from modelfs.prefetch import ReadAhead

    mib = 1 << 20
    sequential = ReadAhead(1 << 30, 8 * mib, 0)
    sequential.on_read(100 * mib, 4096)
    sequential.on_read(100 * mib - 3 * mib, 4096)  # 3 MiB back: reordering, same run
    assert sequential.resets == 0

    scattered = ReadAhead(1 << 30, 8 * mib, 0)
    for offset in (700 * mib, 300 * mib, 100 * mib):  # two seeks: random mode
        scattered.on_read(offset, 4096)
    resets = scattered.resets
    scattered.on_read(100 * mib - 3 * mib, 4096)
    assert scattered.resets == resets + 1 and scattered.last_random
    scattered.on_read(100 * mib - 3 * mib + 4096, 4096)  # contiguous: continues that run
    assert scattered.resets == resets + 1 and not scattered.last_random


def test_random_mode_forgets_old_seeks() -> None:
    """Two seeks long ago do not make a later new run 'random'; two recent ones do."""
    from modelfs.prefetch import ReadAhead

    ra = ReadAhead(1 << 30, BLOCK, 0, PrefetchConfig(backward_tolerance=1024, forward_tolerance=1024, seek_memory=16))
    for offset in (0, 100 * BLOCK, 200 * BLOCK):  # two seeks
        ra.on_read(offset, 512)
    assert ra.last_random
    pos = 200 * BLOCK + 512
    for _ in range(40):  # a long sequential run
        ra.on_read(pos, 4096)
        pos += 4096
    ra.on_read(500 * BLOCK, 512)  # one new seek: only one seek in memory
    assert not ra.last_random
    ra.on_read(700 * BLOCK, 512)  # and a second one
    assert ra.last_random


async def test_demand_disk_reads_use_the_page_cache(make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk-cache hits for demand reads go through the page cache; read-ahead uses O_DIRECT."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.bin", 16 * BLOCK, seed=8)
    store = await make_store(backend, block_size=BLOCK, memory_blocks=4, disk=True)
    assert store.disk is not None
    for index in range(16):
        await store.get(ref, index)
    await store.drain()
    calls: list[bool] = []
    original = disk_module.read_block

    def spy(path: str, key_bytes: bytes, index: int, dest: memoryview, *, direct: bool) -> ReadResult:
        calls.append(direct)
        return original(path, key_bytes, index, dest, direct=direct)

    monkeypatch.setattr(disk_module, "read_block", spy)
    block = await store.get(ref, 0)  # evicted from memory: a demand disk hit
    assert bytes(block.view) == data[:BLOCK]
    assert calls == [False]
    assert store.prefetch(ref, 1)
    await wait_until(lambda: len(calls) == 2)
    assert calls == [False, True]
    assert backend.read_calls == 16


async def test_a_backward_walk_after_seeks_gets_whole_blocks_and_the_one_below(make_store: StoreFactory) -> None:
    """An mmap'd copy running backward (each read just below the last) is not random, even
    after seeks: whole blocks, each fetched once, the next one down asked for ahead."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.bin", 16 * BLOCK, seed=8)
    store = await make_store(backend, block_size=BLOCK, memory_blocks=8)
    files = OpenFiles(store, max_prefetch=4 * BLOCK, random_read_size=GRANULE, prefetch_config=TIGHT)
    fh = files.open(ref)
    for offset in (13 * BLOCK, 2 * BLOCK):  # two seeks: reads at random from here
        await files.read(fh, offset, 100)
    step = 4 * GRANULE
    top = 10 * BLOCK
    for end in range(top, 0, -step):
        assert bytes(await files.read(fh, end - step, step)) == data[end - step : end]
        if end - step == 9 * BLOCK:  # the walk has just entered block 9 ...
            await wait_until(lambda: backend.reads[("w.bin", 8 * BLOCK)] >= 1)  # ... and block 8 is on its way
    small_before_walk = 2  # the two seeks themselves were served by small GETs
    assert store.stats.small_gets <= small_before_walk + 2  # the walk's first steps, at most
    walked = [offset for (name, offset) in backend.reads if offset < top and offset % BLOCK == 0]
    assert all(backend.reads[("w.bin", o)] == 1 for o in walked)  # every block fetched once
    assert len(walked) >= 10


async def test_a_backward_walk_without_read_ahead_still_gets_whole_blocks(make_store: StoreFactory) -> None:
    """Without read-ahead (--max-prefetch 0) the walk's reads still fetch whole blocks: no
    small GET once the walk is recognised, however many seeks came before it."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.bin", 16 * BLOCK, seed=9)
    store = await make_store(backend, block_size=BLOCK, memory_blocks=8)
    files = OpenFiles(store, max_prefetch=0, random_read_size=8 * GRANULE, prefetch_config=TIGHT)
    fh = files.open(ref)
    for offset in (13 * BLOCK, 2 * BLOCK, 7 * BLOCK + 5):  # seeks: reads at random from here
        await files.read(fh, offset, 100)
    step = 4 * GRANULE
    gets_before = store.stats.small_gets
    for end in range(12 * BLOCK, 0, -step):
        assert bytes(await files.read(fh, end - step, step)) == data[end - step : end]
    assert store.stats.small_gets - gets_before <= 3  # the three steps before the walk is recognised


def test_small_get_counts_are_kept_for_recent_blocks_only() -> None:
    """The small GETs per block were counted for every block ever read at random, for as long
    as the file stayed open (~88 B per block: 1M blocks, 85 MiB outside the budget). Only the
    most recently counted blocks are kept; a block read again and again keeps its count."""
    from modelfs.prefetch import ReadAhead

    config = PrefetchConfig()
    ra = ReadAhead(1 << 40, BLOCK, 0, config)
    hot = 7
    ra.record_small_get(hot)
    for index in range(100_000):
        ra.record_small_get(1_000 + index)
        if index % 100 == 0:
            ra.record_small_get(hot)  # read now and then among the others: stays counted
        assert len(ra._small_gets) <= config.small_gets_blocks
    assert ra.wants_whole_block(hot)
    assert not ra.wants_whole_block(1_000)  # long out of the recent blocks
    ra.record_small_get(99_999 + 1_000)  # a recent block: its count goes on
    assert ra.wants_whole_block(99_999 + 1_000)
