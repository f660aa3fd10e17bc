"""DiskCache: exact round trips, restart, byte cap, corruption handling, lock and layout."""

from __future__ import annotations

import mmap
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs import memlimit
from modelfs.backends.memory import ramp
from modelfs.cache.disk import HEADER, MAGIC, PAGE, DiskCache
from modelfs.cache.memory import BlockKey
from modelfs.errors import MountError

BS = 4096
FILE_SIZE = PAGE + BS  # one header page plus a full block


def page_buffer(data: bytes) -> memoryview:
    """A page-aligned buffer holding ``data``, like a memory-cache block (O_DIRECT-able)."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return memoryview(buf)


def key(i: int, obj: str = "memory:///model.bin", version: str = "7") -> BlockKey:
    return (obj, version, i)


def block_data(i: int, length: int = BS) -> bytes:
    return ramp(length, seed=i)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[DiskCache]:
    """An opened (locked) disk cache with a cap that never evicts."""
    cache = DiskCache(tmp_path / "cache", 1 << 30)
    cache.open()
    yield cache
    cache.close()


def path_of(cache: DiskCache, k: BlockKey) -> Path:
    return cache.root / "blocks" / cache._relpath(k)


async def read(cache: DiskCache, k: BlockKey, length: int = BS) -> bytes | None:
    dest = bytearray(length)
    if await cache.read_into(k, memoryview(dest)):
        return bytes(dest)
    return None


async def test_write_then_read_back_exact_bytes(disk: DiskCache) -> None:
    """Full (O_DIRECT) and short blocks, from aligned and unaligned buffers, read back exactly."""
    await disk.write(key(0), page_buffer(block_data(0)))
    await disk.write(key(1), memoryview(block_data(1)))  # not page-aligned
    await disk.write(key(2), page_buffer(block_data(2, 1234)))  # the last, short block
    assert await read(disk, key(0)) == block_data(0)
    assert await read(disk, key(1)) == block_data(1)
    assert await read(disk, key(2), 1234) == block_data(2, 1234)
    assert disk.stats.writes == 3 and disk.stats.hits == 3 and disk.stats.corrupt == 0
    assert disk.used == 2 * FILE_SIZE + PAGE + 1234
    assert path_of(disk, key(0)).stat().st_size == FILE_SIZE


async def test_absent_block_is_a_plain_miss(disk: DiskCache) -> None:
    """No file: False, a miss, not counted as corrupt."""
    assert await read(disk, key(5)) is None
    assert disk.stats.misses == 1 and disk.stats.corrupt == 0


async def test_after_the_scan_only_indexed_blocks_are_looked_up(tmp_path: Path) -> None:
    """Once the scan has run the index is the whole truth: a block it does not know is a miss
    without a look at the disk, and every block written or found is still served."""
    disk = DiskCache(tmp_path / "c", 1 << 30)
    disk.open()
    try:
        await disk.write(key(0), page_buffer(block_data(0)))
        await disk.scan()
        await disk.write(key(1), page_buffer(block_data(1)))
        stray = path_of(disk, key(2))  # a file the index never heard of (not written by this cache)
        stray.write_bytes(path_of(disk, key(1)).read_bytes())
        assert await read(disk, key(0)) == block_data(0)
        assert await read(disk, key(1)) == block_data(1)
        assert await read(disk, key(2)) is None and disk.stats.corrupt == 0  # not even opened
    finally:
        disk.close()


async def test_survives_restart_after_scan(tmp_path: Path) -> None:
    """A new DiskCache on the same dir serves the blocks an earlier one wrote; scan re-accounts them."""
    first = DiskCache(tmp_path / "c", 1 << 30)
    first.open()
    for i in range(3):
        await first.write(key(i), page_buffer(block_data(i)))
    first.close()

    second = DiskCache(tmp_path / "c", 1 << 30)
    second.open()
    try:
        await second.scan()
        assert second.used == 3 * FILE_SIZE
        assert len(second._index) == 3
        for i in range(3):
            assert await read(second, key(i)) == block_data(i)
        assert second.stats.hits == 3
        assert second.used == 3 * FILE_SIZE  # hits of scanned blocks are not counted twice
    finally:
        second.close()


async def test_scan_enforces_a_smaller_cap_oldest_first(tmp_path: Path) -> None:
    """Restarted with a smaller cap, the scan deletes the least recently used files."""
    first = DiskCache(tmp_path / "c", 1 << 30)
    first.open()
    for i in range(4):
        await first.write(key(i), page_buffer(block_data(i)))
    first.close()
    for i in range(4):  # make the LRU order explicit: block 0 is the oldest
        os.utime(path_of(first, key(i)), (1_000_000 + i, 1_000_000 + i))

    second = DiskCache(tmp_path / "c", 2 * FILE_SIZE)
    second.open()
    try:
        await second.scan()
        assert second.used == 2 * FILE_SIZE
        assert second.stats.evictions == 2
        assert not path_of(second, key(0)).exists() and not path_of(second, key(1)).exists()
        assert await read(second, key(2)) == block_data(2)
        assert await read(second, key(3)) == block_data(3)
    finally:
        second.close()


async def test_byte_cap_with_lru_eviction_deletes_files(tmp_path: Path) -> None:
    """Writing past the cap deletes the least recently used block file; a hit refreshes recency."""
    cache = DiskCache(tmp_path / "c", 3 * FILE_SIZE)
    cache.open()
    try:
        for i in range(3):
            await cache.write(key(i), page_buffer(block_data(i)))
        assert cache.used == 3 * FILE_SIZE and cache.stats.evictions == 0
        assert await read(cache, key(0)) == block_data(0)  # 0 is now the most recent
        await cache.write(key(3), page_buffer(block_data(3)))
        assert cache.used == 3 * FILE_SIZE <= cache.capacity
        assert cache.stats.evictions == 1
        assert not path_of(cache, key(1)).exists()
        assert path_of(cache, key(0)).exists()
        assert await read(cache, key(1)) is None
        await cache.write(key(4), page_buffer(block_data(4)))
        assert not path_of(cache, key(2)).exists()
        files = [p for p in (cache.root / "blocks").rglob("*") if p.is_file()]
        assert len(files) == 3
        assert sum(p.stat().st_size for p in files) == cache.used
    finally:
        cache.close()


async def test_the_index_holds_at_most_the_files_the_memory_bound_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small files (the last block of each small object) fit the byte cap by the thousand; the
    index, whose entries the memory bound counts per block of --block-size, evicts beyond that
    count too (least recently used first)."""
    monkeypatch.setattr(memlimit, "DISK_BLOCKS_INCLUDED", 3)
    cache = DiskCache(tmp_path / "c", 1 << 30, block_size=1 << 30)  # one block's worth: 3 files
    cache.open()
    try:
        for i in range(5):
            await cache.write(key(0, obj=f"memory:///small-{i}.json"), memoryview(block_data(i, 100)))
        assert len(cache._index) == 3 and cache.stats.evictions == 2
        files = [p for p in (cache.root / "blocks").rglob("*") if p.is_file()]
        assert len(files) == 3
        for i in range(5):
            got = await read(cache, key(0, obj=f"memory:///small-{i}.json"), 100)
            assert got == (None if i < 2 else block_data(i, 100))
    finally:
        cache.close()


async def test_a_restart_after_a_run_that_left_more_files_keeps_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier run with a smaller --block-size can leave more files than this run's index
    may hold: the scan lists only that many (the most recently used), deletes the rest as it
    goes, and never touches a file this run wrote."""
    first = DiskCache(tmp_path / "c", 1 << 30)
    first.open()
    for i in range(6):
        await first.write(key(i), page_buffer(block_data(i)))
    first.close()
    for i in range(6):  # block 0 is the least recently used
        os.utime(path_of(first, key(i)), (1_000_000 + i, 1_000_000 + i))

    monkeypatch.setattr(memlimit, "DISK_BLOCKS_INCLUDED", 2)
    second = DiskCache(tmp_path / "c", 16 << 20)  # two 8 MiB blocks: holds 2 files
    second.open()
    ours = key(0, obj="memory:///other.bin")
    try:
        await second.write(ours, page_buffer(block_data(6)))  # this run's: the newest
        await second.scan()
        assert len(second._index) == 2
        assert [i for i in range(6) if path_of(second, key(i)).exists()] == [5]
        assert await read(second, ours) == block_data(6)
        assert await read(second, key(5)) == block_data(5)
    finally:
        second.close()


async def test_files_of_an_earlier_run_under_a_clock_that_stepped_back_still_obey_the_caps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files modified 'after' this run began (the clock stepped back since the earlier run)
    are not deleted by the scan as this run's might be, but listed: the index then keeps
    them within its caps (before: neither deleted nor counted, past --disk-cache for good)."""
    first = DiskCache(tmp_path / "c", 1 << 30)
    first.open()
    for i in range(6):
        await first.write(key(i), page_buffer(block_data(i)))
    first.close()
    future = time.time() + 3600
    for i in range(6):
        os.utime(path_of(first, key(i)), (1_000_000 + i, future))
    monkeypatch.setattr(memlimit, "DISK_BLOCKS_INCLUDED", 2)
    second = DiskCache(tmp_path / "c", 16 << 20)  # holds 2 files
    second.open()
    try:
        await second.scan()
        files = [p for p in (second.root / "blocks").rglob("*") if p.is_file()]
        assert len(second._index) == 2 and len(files) == 2
        assert await read(second, key(5)) == block_data(5)
    finally:
        second.close()


def test_the_scan_lists_at_most_keep_files_and_spares_this_runs(tmp_path: Path) -> None:
    from modelfs.cache.disk_scan import scan_blocks, scan_object

    blocks = tmp_path / "blocks"
    for obj in ("a", "b"):
        (blocks / obj).mkdir(parents=True)
        for i in range(4):
            path = blocks / obj / f"v-{i}"
            path.write_bytes(b"x" * (i + 1))
            os.utime(path, (1_000 + i * 10 + (obj == "b"), 1_000))
    ours = blocks / "a" / "w-0"
    ours.write_bytes(b"written by this run")
    os.utime(ours, (500, 5_000))  # the least recently used, but modified since the run began
    assert scan_object(str(blocks), "a", 10, 2_000) == [("a/w-0", 19)] + [(f"a/v-{i}", i + 1) for i in range(4)]
    assert scan_blocks(str(blocks), 3, 2_000) == [("a/w-0", 19), ("b/v-2", 3), ("a/v-3", 4), ("b/v-3", 4)]
    left = sorted(str(p.relative_to(blocks)) for p in blocks.rglob("*") if p.is_file())
    assert left == ["a/v-3", "a/w-0", "b/v-2", "b/v-3"]
    assert scan_object(str(blocks), "b", 1, 2_000) == [("b/v-3", 4)]
    assert not (blocks / "b" / "v-2").exists() and ours.exists()


async def test_flipped_data_byte_is_a_miss_and_deleted(disk: DiskCache) -> None:
    """One flipped data byte fails the CRC32C: False, the file is deleted, corrupt counted."""
    await disk.write(key(0), page_buffer(block_data(0)))
    path = path_of(disk, key(0))
    raw = bytearray(path.read_bytes())
    raw[PAGE + 1000] ^= 0x01
    path.write_bytes(raw)
    assert await read(disk, key(0)) is None
    assert not path.exists()
    assert disk.stats.corrupt == 1 and disk.stats.misses == 1 and disk.stats.hits == 0
    assert disk.used == 0
    # Written again, it is served again.
    await disk.write(key(0), page_buffer(block_data(0)))
    assert await read(disk, key(0)) == block_data(0)


@pytest.mark.parametrize("damage", ["magic", "format", "index", "length", "truncated", "trailing", "short header"])
async def test_bad_header_or_size_is_a_miss_and_deleted(disk: DiskCache, damage: str) -> None:
    """Any header field that does not match, or a file of the wrong size, is a discarded miss."""
    await disk.write(key(0), page_buffer(block_data(0)))
    path = path_of(disk, key(0))
    raw = bytearray(path.read_bytes())
    fields = list(HEADER.unpack_from(raw))
    if damage == "magic":
        fields[0] = b"XXXX"
    elif damage == "format":
        fields[1] = 99
    elif damage == "index":
        fields[3] = 1
    elif damage == "length":
        fields[4] = BS - 1
    HEADER.pack_into(raw, 0, *fields)
    if damage == "truncated":
        raw = raw[:-1]
    elif damage == "trailing":
        raw += b"\0"
    elif damage == "short header":
        raw = raw[:10]
    path.write_bytes(raw)
    assert await read(disk, key(0)) is None
    assert not path.exists()
    assert disk.stats.corrupt == 1


async def test_file_of_another_key_is_a_miss_and_deleted(disk: DiskCache) -> None:
    """A block file found under another key's name (other object, same index) is never served."""
    await disk.write(key(0, obj="memory:///a.bin"), page_buffer(block_data(0)))
    wrong = path_of(disk, key(0, obj="memory:///b.bin"))
    wrong.parent.mkdir(parents=True, exist_ok=True)
    wrong.write_bytes(path_of(disk, key(0, obj="memory:///a.bin")).read_bytes())
    assert await read(disk, key(0, obj="memory:///b.bin")) is None
    assert not wrong.exists()
    assert disk.stats.corrupt == 1
    assert await read(disk, key(0, obj="memory:///a.bin")) == block_data(0)


async def test_blocks_of_another_version_are_never_served(disk: DiskCache) -> None:
    """Version 7's block is not returned for version 8, even when its file sits at 8's path."""
    await disk.write(key(0, version="7"), page_buffer(block_data(0)))
    assert await read(disk, key(0, version="8")) is None
    assert disk.stats.corrupt == 0  # simply absent
    planted = path_of(disk, key(0, version="8"))
    planted.write_bytes(path_of(disk, key(0, version="7")).read_bytes())
    assert await read(disk, key(0, version="8")) is None
    assert not planted.exists()
    assert disk.stats.corrupt == 1
    assert await read(disk, key(0, version="7")) == block_data(0)


async def test_corrupt_scanned_block_leaves_the_byte_count(tmp_path: Path) -> None:
    """A bad file left by an earlier run (scanned into the index) is removed from the byte count."""
    first = DiskCache(tmp_path / "c", 1 << 30)
    first.open()
    await first.write(key(0), page_buffer(block_data(0)))
    await first.write(key(1), page_buffer(block_data(1)))
    first.close()
    path = path_of(first, key(0))
    raw = bytearray(path.read_bytes())
    raw[:4] = b"JUNK"
    path.write_bytes(raw)
    second = DiskCache(tmp_path / "c", 1 << 30)
    second.open()
    try:
        await second.scan()
        assert second.used == 2 * FILE_SIZE
        assert await read(second, key(0)) is None
        assert second.used == FILE_SIZE and second.stats.corrupt == 1
        assert not path.exists()
    finally:
        second.close()


def test_second_open_on_same_dir_raises(tmp_path: Path) -> None:
    """The lock: another DiskCache on a dir in use fails with MountError, and works after close."""
    first = DiskCache(tmp_path / "c", 1 << 30)
    first.open()
    second = DiskCache(tmp_path / "c", 1 << 30)
    with pytest.raises(MountError, match="in use"):
        second.open()
    assert (tmp_path / "c" / "lock").read_text() == f"{os.getpid()}\n"
    first.close()
    second.open()
    second.close()


def test_dir_mode_is_0700(tmp_path: Path) -> None:
    """The cache dir is made private even when it already existed with a wider mode."""
    root = tmp_path / "c"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    cache = DiskCache(root, 1 << 30)
    cache.open()
    try:
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert stat.S_IMODE((root / "blocks").stat().st_mode) & 0o077 == 0
    finally:
        cache.close()


def test_unusable_dir_raises_mount_error(tmp_path: Path) -> None:
    """A cache dir path that is a regular file is a MountError, not an OSError."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(MountError):
        DiskCache(tmp_path / "file", 1 << 30).open()


async def test_scan_removes_leftover_tmp_files(disk: DiskCache) -> None:
    """*.tmp files of a crashed write are deleted by scan and not counted."""
    await disk.write(key(0), page_buffer(block_data(0)))
    obj_dir = path_of(disk, key(0)).parent
    leftover = obj_dir / f".{path_of(disk, key(1)).name}.12345.tmp"
    leftover.write_bytes(b"partial")
    await disk.scan()
    assert not leftover.exists()
    assert disk.used == FILE_SIZE and len(disk._index) == 1
    assert await read(disk, key(0)) == block_data(0)


async def test_write_failure_is_counted_not_raised(disk: DiskCache) -> None:
    """A write that fails (here: the object's dir is a file) is counted and the cache goes on."""
    obj_dir = path_of(disk, key(0)).parent
    obj_dir.parent.mkdir(parents=True, exist_ok=True)
    obj_dir.write_bytes(b"not a directory")
    await disk.write(key(0), page_buffer(block_data(0)))
    assert disk.stats.write_errors == 1 and disk.stats.writes == 0
    assert disk.used == 0
    assert not list(obj_dir.parent.glob("*.tmp"))
    await disk.write(key(0, obj="memory:///other"), page_buffer(block_data(1)))
    assert await read(disk, key(0, obj="memory:///other")) == block_data(1)


async def test_rewrite_of_known_block_is_not_double_counted(disk: DiskCache) -> None:
    """Writing a block already in the index changes neither the byte count nor the file."""
    await disk.write(key(0), page_buffer(block_data(0)))
    await disk.write(key(0), page_buffer(block_data(0)))
    assert disk.used == FILE_SIZE and disk.stats.writes == 1


def test_header_layout() -> None:
    """The magic and the header size that the data offset padding relies on."""
    assert MAGIC == b"MFSB"
    assert HEADER.size < PAGE
