"""A cache dir whose file system fills up before --disk-cache is reached (ENOSPC).

The disk cache then keeps to what the file system holds: it makes room from its own least
recently used blocks (those of pinned versions last), keeps caching new blocks, warns once,
counts what it could not write, and writes again once room is free. A fake file system of a
few blocks stands in for the small disk: its writes raise ENOSPC past its size, and its
``statvfs`` says what is free.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from modelfs import cli
from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.cache import disk as disk_module
from modelfs.cache.disk import PAGE, DiskCache
from modelfs.cache.disk_format import WriteResult
from modelfs.cache.memory import BlockKey

from .conftest import BS, StoreFactory, put_ramp

FILE = PAGE + BS  # one block file: a header page and a full block


class SmallFs:
    """The file system of the cache dir, ``size`` bytes, of which ``other`` are not the cache's."""

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.size = size
        self.other = 0
        self.refused = 0  # writes that raised ENOSPC

    def used(self) -> int:
        return self.other + sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    def space(self, path: str) -> tuple[int, int]:
        return max(0, self.size - self.used()), self.size

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = disk_module.write_block

        def write_block(dir_path: str, name: str, key_bytes: bytes, index: int, data: memoryview, **kw: Any) -> Any:
            if self.used() + disk_module.data_offset_for(key_bytes) + len(data) > self.size:
                self.refused += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            result: WriteResult = real(dir_path, name, key_bytes, index, data, **kw)
            return result

        monkeypatch.setattr(disk_module, "write_block", write_block)
        monkeypatch.setattr(disk_module, "_space", self.space, raising=False)  # (raising: absent before the fix)


def key(i: int, obj: str = "memory:///a.bin", version: str = "1") -> BlockKey:
    return (obj, version, i)


def page_buffer(data: bytes) -> memoryview:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return memoryview(buf)


async def read(cache: DiskCache, k: BlockKey) -> bytes | None:
    dest = bytearray(BS)
    return bytes(dest) if await cache.read_into(k, memoryview(dest)) else None


def seed(k: BlockKey) -> int:
    return hash(k) & 0xFFFF


@pytest.fixture
def small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SmallFs:
    """A file system of 40 block files (keeping 1/20 of it free: room for 38)."""
    fs = SmallFs(tmp_path / "cache", 40 * FILE)
    fs.install(monkeypatch)
    return fs


@pytest.fixture
def cache(tmp_path: Path, small: SmallFs) -> Iterator[DiskCache]:
    """A disk cache with a cap far beyond its file system (the default 10G on a small disk)."""
    c = DiskCache(tmp_path / "cache", 10 << 30)
    c.open()
    yield c
    c.close()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_cap_larger_than_the_file_system_is_warned_about_once_at_start(
    tmp_path: Path, small: SmallFs, caplog: pytest.LogCaptureFixture
) -> None:
    c = DiskCache(tmp_path / "cache", 10 << 30)
    c.open()
    try:
        assert warnings_of(caplog) == [
            f"--disk-cache (10.0 GiB) is larger than the file system of the cache dir {tmp_path / 'cache'} (0.3 MiB): "
            "the disk cache keeps to what fits there, evicting its least recently used blocks"
        ]
        for i in range(100):
            await c.write(key(i), page_buffer(ramp(BS, seed(key(i)))))
        assert len(warnings_of(caplog)) == 1  # and nothing more while it keeps to the file system
    finally:
        c.close()
    caplog.clear()
    fits = DiskCache(tmp_path / "other", 10 * FILE)
    fits.open()
    fits.close()
    assert warnings_of(caplog) == []  # a cap the file system holds: no warning


async def test_a_full_file_system_evicts_the_oldest_blocks_and_keeps_caching(
    cache: DiskCache, small: SmallFs, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: once the file system was full, every later block failed to write (the cap of
    10G never evicted), so nothing new was ever cached again."""
    keys = [key(i) for i in range(100)]
    for k in keys:
        await cache.write(k, page_buffer(ramp(BS, seed(k))))
    assert cache.stats.write_errors == 0 and cache.stats.writes == 100
    assert small.used() <= small.size - small.size // 20  # a share of the file system stays free
    assert cache.limit < cache.capacity
    held = [k for k in keys if cache.contains(k)]
    assert held == keys[-len(held) :] and len(held) >= 30  # the newest, as many as fit
    for k in held:  # the right bytes, hash by hash
        got = await read(cache, k)
        assert got is not None and hashlib.sha256(got).digest() == hashlib.sha256(ramp(BS, seed(k))).digest()
    for k in keys[: -len(held)]:
        assert await read(cache, k) is None
    assert cache.stats.corrupt == 0
    assert warnings_of(caplog) == []  # (warned once at the start: the cap is larger than the file system)


async def test_enospc_before_the_cap_makes_room_and_warns_once(
    tmp_path: Path, small: SmallFs, caplog: pytest.LogCaptureFixture
) -> None:
    """A cap the file system could hold, but other files fill it: the write that hits ENOSPC
    makes room from the cache's own blocks and is written; one warning says so."""
    c = DiskCache(tmp_path / "cache", 30 * FILE)
    c.open()
    try:
        for i in range(10):
            await c.write(key(i), page_buffer(ramp(BS, i)))
        small.other = small.size - small.used()  # someone else fills the rest
        for i in range(10, 15):
            await c.write(key(i), page_buffer(ramp(BS, i)))
        assert small.refused == 1  # the first write found it full; the others measured first
        assert c.stats.write_errors == 0
        assert all(c.contains(key(i)) for i in range(10, 15))
        for i in range(10, 15):
            assert await read(c, key(i)) == ramp(BS, i)
        (warning,) = warnings_of(caplog)
        assert warning.startswith(f"the file system of the cache dir {tmp_path / 'cache'} is full with ")
        assert "less than --disk-cache (0.2 MiB): the disk cache keeps to what fits there" in warning
    finally:
        c.close()


async def test_a_file_system_full_of_other_files_then_freed_caches_again(
    cache: DiskCache, small: SmallFs, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing of the cache's own to evict: the block is not cached and counted; once the
    other files go, blocks are written again (the disk tier never turns itself off)."""
    small.other = small.size
    assert not await cache.write(key(0), page_buffer(ramp(BS, 0)))
    assert cache.stats.write_errors == 1 and cache.last_write_error == "disk full"
    assert await read(cache, key(0)) is None
    assert "cannot write the disk cache" in warnings_of(caplog)[-1]
    small.other = 0
    for i in range(1, 20):
        assert await cache.write(key(i), page_buffer(ramp(BS, i))) is True
        assert await read(cache, key(i)) == ramp(BS, i)
    assert cache.stats.write_errors == 1
    assert cache.limit == cache.capacity or cache.limit >= 20 * FILE  # raised back as room came free


async def test_blocks_of_pinned_versions_are_evicted_last(cache: DiskCache, small: SmallFs) -> None:
    """Room is made as the cap makes it: blocks of versions an open file pins go last."""
    cache.pin("memory:///open.bin", "1")
    for i in range(10):
        await cache.write(key(i, "memory:///open.bin"), page_buffer(ramp(BS, 100 + i)))
    for i in range(60):
        await cache.write(key(i, "memory:///other.bin"), page_buffer(ramp(BS, i)))
    for i in range(10):  # all still there, right bytes
        assert await read(cache, key(i, "memory:///open.bin")) == ramp(BS, 100 + i)
    assert not cache.contains(key(0, "memory:///other.bin"))
    assert cache.contains(key(59, "memory:///other.bin"))
    assert cache.stats.write_errors == 0


async def test_a_block_evicted_while_it_is_read_is_not_held_again(
    cache: DiskCache, small: SmallFs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read returns the right bytes (the file was open), but the index must not take back
    a file that is gone: it would claim a block the disk no longer has."""
    await cache.write(key(0), page_buffer(ramp(BS, 0)))
    real = disk_module.read_block

    def read_then_evicted(path: str, *args: Any, **kw: Any) -> Any:
        result = real(path, *args, **kw)
        trio.from_thread.run_sync(cache._index.remove, cache._relpath(key(0)))  # evicted while this read runs
        os.unlink(path)
        return result

    monkeypatch.setattr(disk_module, "read_block", read_then_evicted)
    assert await read(cache, key(0)) == ramp(BS, 0)
    assert not cache.contains(key(0))


async def test_a_store_keeps_caching_new_files_on_a_full_file_system(
    make_store: StoreFactory, small: SmallFs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reviewer's case through the block store: one file fills the file system, then a
    second file is read twice; the second read comes from disk, not the backend."""
    backend = MemoryBackend()
    a, a_data = put_ramp(backend, "a.bin", 30 * BS, seed=1)
    b, b_data = put_ramp(backend, "b.bin", 30 * BS, seed=2)
    store = await make_store(backend, memory_blocks=4, disk=True, disk_capacity=10 << 30)
    assert store.disk is not None
    small.root = store.disk.root

    async def whole(ref: Any) -> bytes:
        out = b"".join([bytes((await store.get(ref, i)).view) for i in range(30)])
        await store.drain()
        return out

    assert hashlib.sha256(await whole(a)).digest() == hashlib.sha256(a_data).digest()
    assert hashlib.sha256(await whole(b)).digest() == hashlib.sha256(b_data).digest()
    gets = backend.read_calls
    assert hashlib.sha256(await whole(b)).digest() == hashlib.sha256(b_data).digest()
    assert backend.read_calls == gets  # every block of b from the disk cache
    assert store.disk.stats.write_errors == 0 and store.disk.stats.evictions > 0


def test_text_stats_show_write_errors_and_the_lowered_cap() -> None:
    stats = {
        "source": "gs://b/m",
        "files": 1,
        "bytes": 0,
        "open_handles": 0,
        "backend_gets": 0,
        "demand_gets": 0,
        "prefetch_gets": 0,
        "backend_bytes": 0,
        "retries": 0,
        "memory_used": 0,
        "memory_capacity": 1 << 20,
        "memory_peak": 0,
        "memory_hits": 0,
        "memory_misses": 0,
        "memory_evictions": 0,
        "disk_capacity": 10 << 30,
        "disk_limit": 22 << 20,
        "disk_used": 21 << 20,
        "disk_hits": 1,
        "disk_writes": 2,
        "disk_evictions": 3,
        "disk_corrupt": 0,
        "disk_write_errors": 4,
        "prefetch_window_bytes": 0,
        "prefetch_resets": 0,
        "prefetch_refused": 0,
    }
    line = next(line for line in cli._format_stats(stats).splitlines() if line.startswith("disk cache"))
    assert "(keeps to 22.0 MiB: what its file system holds)" in line and line.endswith("0 corrupt, 4 write errors")
