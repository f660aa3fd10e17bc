"""The disk cache against a hostile or vanishing cache dir, lying headers and several versions.

Every test here failed on the code before the disk cache was split (issue 13): a planted
lock symlink truncated its target, unsafe directories were used, the scan followed symlinks,
a 4 GiB key length raised MemoryError, a deleted cache dir stayed deleted, and the current
version of an object was known only to the process that wrote it.
"""

from __future__ import annotations

import logging
import mmap
import os
import resource
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.cache.disk import HEADER, PAGE, DiskCache
from modelfs.cache.disk_dir import open_log_file
from modelfs.cache.memory import BlockKey
from modelfs.errors import MountError, VersionChanged
from modelfs.files import OpenFiles

from .conftest import BS, StoreFactory, put_ramp

OTHER_UID = 4242


def page_buffer(data: bytes) -> memoryview:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return memoryview(buf)


def key(i: int, obj: str = "memory:///model.bin", version: str = "7") -> BlockKey:
    return (obj, version, i)


def path_of(cache: DiskCache, k: BlockKey) -> Path:
    return cache.root / "blocks" / cache._relpath(k)


async def read(cache: DiskCache, k: BlockKey, length: int = BS, *, direct: bool = True) -> bytes | None:
    dest = page_buffer(bytes(length))
    if await cache.read_into(k, dest, direct=direct):
        return bytes(dest)
    return None


@pytest.fixture
def secret(tmp_path: Path) -> Iterator[Path]:
    """A copy of /etc/shadow (or a stand-in where it cannot be read): the target of planted links."""
    copy = tmp_path / "shadow-copy"
    try:
        shutil.copyfile("/etc/shadow", copy)
    except OSError:
        copy.write_bytes(b"root:*:19000:0:99999:7:::\n")
    os.chmod(copy, 0o640)
    yield copy


# --- the cache directory


def test_a_lock_file_planted_as_a_symlink_leaves_its_target_untouched(tmp_path: Path, secret: Path) -> None:
    before = secret.read_bytes()
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    (root / "lock").symlink_to(secret)
    with pytest.raises(MountError, match="lock file .* is a symlink") as info:
        DiskCache(root, 1 << 30).open()
    assert "\n" not in str(info.value)
    assert secret.read_bytes() == before
    assert stat.S_IMODE(secret.stat().st_mode) == 0o640


def test_a_log_file_planted_as_a_symlink_is_refused(tmp_path: Path, secret: Path) -> None:
    before = secret.read_bytes()
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    (root / "modelfs.log").symlink_to(secret)
    with pytest.raises(MountError, match="symlink"):
        open_log_file(root / "modelfs.log", root)
    assert secret.read_bytes() == before


def test_a_cache_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "cache").symlink_to(real)
    with pytest.raises(MountError, match="symlink"):
        DiskCache(tmp_path / "cache", 1 << 30).open()
    assert not (real / "lock").exists()


def test_a_symlinked_parent_not_owned_by_root_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    link = tmp_path / "link"
    link.symlink_to(real)
    os.lchown(link, OTHER_UID, OTHER_UID)
    with pytest.raises(MountError, match="is a symlink"):
        DiskCache(link / "cache", 1 << 30).open()
    assert not (real / "cache").exists()


def test_a_root_owned_symlinked_parent_is_followed(tmp_path: Path) -> None:
    """Like /var/run -> /run: only root could have made it point elsewhere."""
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(real)
    cache = DiskCache(tmp_path / "link" / "cache", 1 << 30)
    cache.open()
    cache.close()
    assert (real / "cache" / "lock").is_file()


def test_a_cache_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    os.chown(root, OTHER_UID, OTHER_UID)
    with pytest.raises(MountError, match=f"owned by uid {OTHER_UID}"):
        DiskCache(root, 1 << 30).open()
    assert not (root / "lock").exists()


def test_a_parent_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, OTHER_UID, OTHER_UID)
    with pytest.raises(MountError, match=f"owned by uid {OTHER_UID}"):
        DiskCache(parent / "cache", 1 << 30).open()


def test_a_parent_writable_by_everyone_needs_the_sticky_bit(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(MountError, match="writable by every user"):
        DiskCache(shared / "cache", 1 << 30).open()
    assert not (shared / "cache").exists()
    os.chmod(shared, 0o1777)  # like /tmp
    cache = DiskCache(shared / "cache", 1 << 30)
    cache.open()
    cache.close()


def test_a_cache_dir_writable_by_everyone_is_used_only_if_empty(tmp_path: Path) -> None:
    """A fresh emptyDir (0777, empty) is fine once made 0700; one with content may hold plants."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    os.chmod(fresh, 0o777)
    cache = DiskCache(fresh, 1 << 30)
    cache.open()
    cache.close()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700

    used = tmp_path / "used"
    used.mkdir()
    (used / "blocks").mkdir()
    os.chmod(used, 0o777)
    with pytest.raises(MountError, match="not empty"):
        DiskCache(used, 1 << 30).open()
    assert stat.S_IMODE(used.stat().st_mode) == 0o777  # refused: left as it was


@pytest.mark.parametrize("content", [[], ["x"]])
def test_a_shared_sticky_dir_is_refused_and_left_as_it_was(tmp_path: Path, content: list[str]) -> None:
    """``--cache-dir /tmp`` (or a fresh /dev/shm) was made 0700 for the whole machine, and
    refused afterwards when not empty."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    for name in content:
        (shared / name).write_text("someone's")
    os.chmod(shared, 0o1777)
    with pytest.raises(MountError, match="shared directory"):
        DiskCache(shared, 1 << 30).open()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert sorted(os.listdir(shared)) == content


def test_a_directory_with_other_files_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """A home directory, a project directory or ``/`` was made 0700 (and filled with blocks)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    (home / ".bashrc").write_text("")
    (home / "blocks").mkdir()
    with pytest.raises(MountError, match="files modelfs did not make .'.bashrc'."):
        DiskCache(home, 1 << 30).open()
    assert stat.S_IMODE(home.stat().st_mode) == 0o755
    assert sorted(os.listdir(home)) == [".bashrc", "blocks"]


def test_a_cache_dir_modelfs_made_and_a_new_file_systems_root_are_taken(tmp_path: Path) -> None:
    """What modelfs leaves in its cache dir (blocks/, lock, its log) and an ext4 root's
    lost+found do not make a directory someone else's."""
    ours = tmp_path / "ours"
    for name in ("blocks", "lost+found"):
        (ours / name).mkdir(parents=True)
    for name in ("lock", "modelfs.log", "other.log"):
        (ours / name).write_text("")
    os.chmod(ours, 0o755)
    cache = DiskCache(ours, 1 << 30)
    cache.open()
    cache.close()
    assert stat.S_IMODE(ours.stat().st_mode) == 0o700


async def test_the_scan_does_not_follow_symlinks(tmp_path: Path) -> None:
    """Symlinks in blocks/ (a directory's, a file's) are removed as links; targets untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.tmp").write_bytes(b"looks like a crashed write")
    (outside / "0123456789abcdef-0").write_bytes(b"x" * 10_000)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    cache = DiskCache(tmp_path / "cache", 2 * (PAGE + BS))
    cache.open()
    try:
        await cache.write(key(0), page_buffer(ramp(BS)))
        blocks = tmp_path / "cache" / "blocks"
        (blocks / "ffffffffffffffffffffffffffffffff").symlink_to(outside)
        obj_dir = path_of(cache, key(0)).parent
        (obj_dir / "0123456789abcdef-1").symlink_to(victim)
        await cache.scan()
        assert sorted(p.name for p in outside.iterdir()) == ["0123456789abcdef-0", "precious.tmp"]
        assert victim.read_bytes() == b"keep me"
        assert not (blocks / "ffffffffffffffffffffffffffffffff").is_symlink()
        assert not (obj_dir / "0123456789abcdef-1").is_symlink()
        assert len(cache._index) == 1 and cache.used == PAGE + BS
        assert await read(cache, key(0)) == ramp(BS)
    finally:
        cache.close()


async def test_a_block_file_planted_as_a_symlink_is_not_followed(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "cache", 1 << 30)
    cache.open()
    try:
        await cache.write(key(0), page_buffer(ramp(BS)))
        real = tmp_path / "elsewhere"
        shutil.copyfile(path_of(cache, key(0)), real)
        path_of(cache, key(0)).unlink()
        path_of(cache, key(0)).symlink_to(real)
        assert await read(cache, key(0), direct=False) is None
        assert real.exists() and not path_of(cache, key(0)).is_symlink()
        assert cache.stats.corrupt == 1
    finally:
        cache.close()


@pytest.mark.parametrize("direct", [True, False])
async def test_a_fifo_in_place_of_a_block_file_is_corrupt_not_a_hang(tmp_path: Path, direct: bool) -> None:
    """Opening a FIFO for reading waits for a writer: the read must not."""
    cache = DiskCache(tmp_path / "cache", 1 << 30)
    cache.open()
    try:
        await cache.write(key(0), page_buffer(ramp(BS)))
        path_of(cache, key(0)).unlink()
        os.mkfifo(path_of(cache, key(0)))
        with trio.fail_after(30):  # (a bound that turns a hang into a failure)
            assert await read(cache, key(0), direct=direct) is None
        assert cache.stats.corrupt == 1 and not path_of(cache, key(0)).exists()
    finally:
        cache.close()


# --- lying headers


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("field", ["key_len", "data_offset"])
async def test_an_absurd_header_length_is_a_corrupt_block_refetched(
    make_store: StoreFactory, field: str, direct: bool
) -> None:
    """key_len (or the data offset) of 4 GiB: deleted and fetched again, not EIO forever.

    The address space is capped for the read, as in a memory-limited container, so code that
    allocates what the header claims fails with MemoryError instead of quietly succeeding.
    """
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "m.bin", 2 * BS, seed=3)
    store = await make_store(backend, block_size=BS, memory_blocks=1, disk=True)
    assert store.disk is not None
    await store.get(ref, 0)
    await store.drain()
    path = path_of(store.disk, (ref.key, ref.version, 0))
    raw = bytearray(path.read_bytes())
    fields = list(HEADER.unpack_from(raw))
    fields[6 if field == "key_len" else 7] = 0xFFFFFFFF
    HEADER.pack_into(raw, 0, *fields)
    path.write_bytes(raw)
    await store.get(ref, 1)  # pushes block 0 out of memory
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), hard))
    try:
        dest = page_buffer(bytes(BS))
        hit = await store.disk.read_into((ref.key, ref.version, 0), dest, direct=direct)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert not hit and store.disk.stats.corrupt == 1
    assert not path.exists()
    block = await store.get(ref, 0)
    assert bytes(block.view) == data[:BS]
    assert backend.reads[("m.bin", 0)] == 2


# --- a cache dir deleted while mounted


async def test_a_deleted_cache_dir_is_recreated_with_its_lock(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "cache"
    cache = DiskCache(root, 1 << 30)
    cache.open()
    try:
        await cache.write(key(0), page_buffer(ramp(BS)))
        shutil.rmtree(root)
        with caplog.at_level(logging.WARNING):
            for i in range(1, 4):
                await cache.write(key(i), page_buffer(ramp(BS, seed=i)))
        assert [r.getMessage() for r in caplog.records if "recreated" in r.getMessage()] != []
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert (root / "lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(MountError, match="in use"):
            DiskCache(root, 1 << 30).open()  # locked again
        for i in range(1, 4):
            assert await read(cache, key(i)) == ramp(BS, seed=i)
        assert await read(cache, key(0)) is None
        assert cache.used == 3 * (PAGE + BS)
    finally:
        cache.close()


async def test_a_deleted_blocks_dir_is_recreated_under_the_lock_still_held(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only blocks/ deleted: the lock file is still ours. Recreating must keep that lock, not
    take its own flock for another process's and turn the disk cache off."""
    root = tmp_path / "cache"
    cache = DiskCache(root, 1 << 30)
    cache.open()
    try:
        await cache.write(key(0), page_buffer(ramp(BS)))
        shutil.rmtree(root / "blocks")
        with caplog.at_level(logging.WARNING):
            for i in range(1, 4):
                await cache.write(key(i), page_buffer(ramp(BS, seed=i)))
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "recreated" in warnings[0], warnings
        assert cache.stats.writes == 4 and all(path_of(cache, key(i)).exists() for i in range(1, 4))
        assert await read(cache, key(2), direct=False) == ramp(BS, seed=2)
        with pytest.raises(MountError, match="in use"):  # still locked against other mounts
            DiskCache(root, 1 << 30).open()
    finally:
        cache.close()


async def test_concurrent_writes_into_a_deleted_cache_dir_recreate_it_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cache"
    cache = DiskCache(root, 1 << 30)
    cache.open()
    try:
        await cache.write(key(0), page_buffer(ramp(BS)))
        shutil.rmtree(root)
        with caplog.at_level(logging.WARNING):
            async with trio.open_nursery() as nursery:
                for i in range(1, 9):
                    nursery.start_soon(cache.write, key(i), page_buffer(ramp(BS, seed=i)))
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "recreated" in warnings[0], warnings
        for i in range(1, 9):
            assert await read(cache, key(i)) == ramp(BS, seed=i)
        assert (root / "lock").read_text() == f"{os.getpid()}\n"
    finally:
        cache.close()


async def test_a_cache_dir_that_cannot_be_recreated_turns_the_tier_off_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cache"
    cache = DiskCache(root, 1 << 30)
    cache.open()
    try:
        await cache.write(key(0), page_buffer(ramp(BS)))
        shutil.rmtree(root)
        root.write_bytes(b"a file where the cache dir was")
        with caplog.at_level(logging.WARNING):
            for i in range(1, 4):
                await cache.write(key(i), page_buffer(ramp(BS, seed=i)))
            assert await read(cache, key(1)) is None
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "disk cache off" in warnings[0]
        assert not cache.contains(key(1)) and cache.used == 0
        assert root.read_bytes() == b"a file where the cache dir was"
    finally:
        cache.close()


# --- versions on disk


async def test_two_open_versions_keep_each_others_blocks(make_store: StoreFactory) -> None:
    """A reader of the old version and one of the new, side by side: neither loses its blocks."""
    backend = MemoryBackend()
    old_ref, old = put_ramp(backend, "m.bin", 4 * BS, seed=1)
    store = await make_store(backend, block_size=BS, memory_blocks=2, disk=True)
    files = OpenFiles(store, max_prefetch=0, random_read_size=BS)
    old_fh = files.open(old_ref)
    for index in range(4):
        await store.get(old_ref, index)
    await store.drain()
    new_ref, new = put_ramp(backend, "m.bin", 4 * BS, seed=2)  # overwritten: the old version is gone upstream
    new_fh = files.open(new_ref)
    for index in range(4):
        await store.get(new_ref, index)
    await store.drain()
    # The old version's blocks are read back from disk: upstream it would be ESTALE.
    for index in range(4):
        assert bytes((await store.get(old_ref, index)).view) == old[index * BS : (index + 1) * BS]
    files.release(old_fh)  # nobody reads the old version any more: its blocks go
    assert store.disk is not None
    await store.disk.settle()
    assert not any(store.disk.contains((old_ref.key, old_ref.version, i)) for i in range(4))
    assert all(store.disk.contains((new_ref.key, new_ref.version, i)) for i in range(4))
    assert store.disk.used == 4 * (PAGE + BS)
    with pytest.raises(VersionChanged):  # upstream, the old version is gone
        await backend.read_range("m.bin", old_ref.version, 0, memoryview(bytearray(1)))
    files.release(new_fh)
    assert all(store.disk.contains((new_ref.key, new_ref.version, i)) for i in range(4))
    assert bytes((await store.get(new_ref, 3)).view) == new[3 * BS :]


async def test_old_versions_left_by_an_earlier_run_go_when_the_object_is_opened(tmp_path: Path) -> None:
    first = DiskCache(tmp_path / "c", 1 << 30)
    first.open()
    for i in range(3):
        await first.write(key(i, version="7"), page_buffer(ramp(BS, seed=i)))
    first.close()
    second = DiskCache(tmp_path / "c", 1 << 30)
    second.open()
    try:
        await second.scan()
        assert second.used == 3 * (PAGE + BS)
        second.pin("memory:///model.bin", "8")  # the object was overwritten: version 8 is opened
        await second.settle()
        assert second.used == 0
        assert not any(path_of(second, key(i, version="7")).exists() for i in range(3))
    finally:
        second.close()


async def test_eviction_takes_blocks_of_unpinned_versions_first(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", 3 * (PAGE + BS))
    cache.open()
    try:
        cache.pin("memory:///a", "1")
        await cache.write(key(0, "memory:///a", "1"), page_buffer(ramp(BS)))  # oldest, but pinned
        await cache.write(key(1, "memory:///a", "1"), page_buffer(ramp(BS)))
        await cache.write(key(0, "memory:///b", "1"), page_buffer(ramp(BS)))
        await cache.write(key(1, "memory:///b", "1"), page_buffer(ramp(BS)))  # over the cap
        assert cache.contains(key(0, "memory:///a", "1")) and cache.contains(key(1, "memory:///a", "1"))
        assert not cache.contains(key(0, "memory:///b", "1"))
        assert not path_of(cache, key(0, "memory:///b", "1")).exists()
        cache.unpin("memory:///a", "1")  # the current version: kept, now evictable in LRU order
        await cache.write(key(2, "memory:///b", "1"), page_buffer(ramp(BS)))
        assert not cache.contains(key(0, "memory:///a", "1"))
        assert cache.used == 3 * (PAGE + BS)
    finally:
        cache.close()
