"""The random-read detector: small GETs for random reads, whole blocks for sequential runs."""

from __future__ import annotations

import random

from modelfs.backends.memory import MemoryBackend
from modelfs.files import OpenFiles
from modelfs.prefetch import PrefetchDefaults

from .conftest import StoreFactory, put_ramp

BLOCK = 64 * 1024
GRANULE = 4096
# Cursor tolerances scaled to this small file (the defaults suit multi-GB files and 8 MiB blocks).
TIGHT = PrefetchDefaults(backward_tolerance=1024, forward_tolerance=1024)


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
    files = OpenFiles(store, max_prefetch=0, random_read_size=GRANULE, prefetch_defaults=TIGHT)
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
    files = OpenFiles(store, max_prefetch=0, random_read_size=0, prefetch_defaults=TIGHT)
    fh = files.open(ref)
    read = await _random_reads(files, fh, data, 50)
    assert store.stats.small_gets == 0
    assert backend.bytes_read / read > 50


async def test_sequential_run_after_seeks_gets_blocks(make_store: StoreFactory) -> None:
    """A run that continues sequentially after random seeks goes back to whole blocks."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.bin", 32 * BLOCK, seed=6)
    store = await make_store(backend, block_size=BLOCK, memory_blocks=8)
    files = OpenFiles(store, max_prefetch=0, random_read_size=GRANULE, prefetch_defaults=TIGHT)
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
    files = OpenFiles(store, max_prefetch=0, random_read_size=GRANULE, prefetch_defaults=TIGHT)
    fh = files.open(ref)
    for index in range(8):  # sequential: every block cached
        await files.read(fh, index * BLOCK, BLOCK)
    calls = backend.read_calls
    for offset in (5 * BLOCK + 7, 1 * BLOCK + 99, 6 * BLOCK + 3, 2 * BLOCK):
        assert bytes(await files.read(fh, offset, 100)) == data[offset : offset + 100]
    assert backend.read_calls == calls
