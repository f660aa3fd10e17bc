"""Right after a restart the startup scan of the cache dir may not be done when the first file
is opened: opening an object lists its own block files, so small reads and joined read-ahead
use the disk cache at once instead of fetching from the backend what is already on disk."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from modelfs.backends.memory import MemoryBackend
from modelfs.cache import disk as disk_module
from modelfs.cache.blocks import BlockStore, ObjectRef
from modelfs.cache.disk import DiskCache
from modelfs.cache.memory import MemoryCache
from modelfs.files import OpenFiles
from modelfs.prefetch import PrefetchConfig

from .conftest import BS, put_ramp, wait_until

BLOCKS = 24


@pytest.fixture
def held_scan(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The startup scan blocks (in its thread) until the returned event is set."""
    release = threading.Event()
    real = disk_module.scan_blocks

    def slow_scan(*args: Any) -> list[tuple[str, int]]:
        release.wait(60)
        return real(*args)

    monkeypatch.setattr(disk_module, "scan_blocks", slow_scan)
    yield release
    release.set()


async def _store(nursery: trio.Nursery, backend: MemoryBackend, root: Path) -> BlockStore:
    disk = DiskCache(root, 1 << 30)
    disk.open()
    store = BlockStore(
        backend, MemoryCache(64 * BS, BS), disk, block_size=BS, max_concurrency=4, retry_deadline=5, join_blocks=4
    )
    await nursery.start(store.run)
    return store


async def _fill_cache(root: Path, backend: MemoryBackend, ref: ObjectRef, data: bytes) -> None:
    """An earlier daemon: reads the whole object, writes every block, stops."""
    async with trio.open_nursery() as nursery:
        store = await _store(nursery, backend, root)
        files = OpenFiles(store, max_prefetch=8 * BS)
        fh = files.open(ref)
        assert await files.read(fh, 0, len(data)) == data
        files.release(fh)
        await store.drain()
        assert store.disk is not None and store.disk.stats.writes == BLOCKS
        nursery.cancel_scope.cancel()
    assert store.disk is not None
    store.disk.close()


async def _release_at_exit(event: threading.Event) -> None:
    """A failing test must not leave the scan thread waiting out its minute."""
    try:
        await trio.sleep_forever()
    finally:
        event.set()


async def test_open_before_the_scan_ends_serves_from_disk(tmp_path: Path, held_scan: threading.Event) -> None:
    backend = MemoryBackend(latency=0.001, joins_reads=True)
    ref, data = put_ramp(backend, "m.bin", BLOCKS * BS, seed=21)
    other, other_data = put_ramp(backend, "other.bin", 4 * BS, seed=22)
    root = tmp_path / "cache"
    held_scan.set()
    await _fill_cache(root, backend, ref, data)
    held_scan.clear()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_release_at_exit, held_scan)
        store = await _store(nursery, backend, root)
        disk = store.disk
        assert disk is not None and not disk._scanned  # the scan is held in its thread
        calls = backend.read_calls
        await store.prepare(ref)
        # Random reads (after two seeks the detector takes small GETs, never whole blocks):
        # every one is served by reading its block from disk.
        never_whole = PrefetchConfig(backward_tolerance=64, forward_tolerance=64, small_gets_per_block=1000)
        files = OpenFiles(store, max_prefetch=0, random_read_size=BS // 4, prefetch_config=never_whole)
        fh = files.open(ref)
        for offset in (5 * BS + 17, 19 * BS + 3, 2 * BS + 100, 11 * BS + 900, 7 * BS + 2000, 15 * BS + 1):
            assert await files.read(fh, offset, 64) == data[offset : offset + 64]
        files.release(fh)
        assert store.stats.small_gets == 0
        # A sequential read: read-ahead takes every block from disk and joins no GET.
        files = OpenFiles(store, max_prefetch=8 * BS)
        fh = files.open(ref)
        for offset in range(0, len(data), BS):
            assert await files.read(fh, offset, BS) == data[offset : offset + BS]
        files.release(fh)
        await wait_until(lambda: store.slots.in_use == 0)
        assert backend.read_calls == calls
        assert store.stats.joined_gets == 0 and store.stats.backend_gets == 0
        assert disk.stats.hits == BLOCKS

        # An object with nothing on disk is fetched as before (listing it found nothing).
        await store.prepare(other)
        fh = files.open(other)
        assert await files.read(fh, 0, len(other_data)) == other_data
        files.release(fh)
        assert backend.read_calls > calls

        # The scan ends: it adds what the early listing had not, and counts nothing twice.
        held_scan.set()
        await wait_until(lambda: disk._scanned)
        await store.drain()
        assert len(disk._index) == BLOCKS + 4
        assert disk.used == sum(p.stat().st_size for p in Path(disk._blocks_dir).rglob("*") if p.is_file())
        nursery.cancel_scope.cancel()
    disk.close()


async def test_a_block_dropped_while_the_scan_runs_is_not_held_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan listed the cache dir, then (before it applied what it found) a block of an
    object opened meanwhile was dropped, its file deleted: the scan's listing must not make
    the index hold that block again (a miss later, and bytes counted that are not on disk)."""
    backend = MemoryBackend(latency=0.001, joins_reads=True)
    ref, data = put_ramp(backend, "m.bin", BLOCKS * BS, seed=23)
    root = tmp_path / "cache"
    await _fill_cache(root, backend, ref, data)

    listed, release = threading.Event(), threading.Event()
    real = disk_module.scan_blocks

    def listed_then_held(*args: Any) -> list[tuple[str, int]]:
        found = real(*args)
        listed.set()
        release.wait(60)
        return found

    monkeypatch.setattr(disk_module, "scan_blocks", listed_then_held)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_release_at_exit, release)
        store = await _store(nursery, backend, root)
        disk = store.disk
        assert disk is not None
        await trio.to_thread.run_sync(listed.wait, 60)  # the listing is taken, not yet applied
        await store.prepare(ref)
        dropped = (ref.key, ref.version, 3)
        assert disk.contains(dropped)
        await disk.discard(dropped)  # found bad, say: forgotten and deleted
        assert not disk.contains(dropped)
        release.set()
        await wait_until(lambda: disk._scanned)
        assert not disk.contains(dropped)
        assert len(disk._index) == BLOCKS - 1
        assert disk.used == sum(p.stat().st_size for p in Path(disk._blocks_dir).rglob("*") if p.is_file())
        nursery.cancel_scope.cancel()
    disk.close()
