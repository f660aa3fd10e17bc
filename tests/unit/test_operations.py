"""fs.ModelFS called directly (no mount): attributes, read-only errors, bytes, errno mapping, stats."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Awaitable

import pyfuse3
import pytest
import trio
import trio.testing

from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.errors import TransientError
from modelfs.files import OpenFiles
from modelfs.fs import ModelFS
from modelfs.inodes import ROOT_INODE, Namespace, Node

from .conftest import BS, StoreFactory

CTX = pyfuse3.RequestContext()
MODEL = ramp(5 * BS + 123, seed=11)


async def build(
    make_store: StoreFactory, backend: MemoryBackend, *, ttl: float = 60.0, retry_deadline: float = 5.0
) -> ModelFS:
    """The layers as mount.build() wires them, over a MemoryBackend and without a disk cache."""
    store = await make_store(backend, memory_blocks=8, retry_deadline=retry_deadline)
    namespace = Namespace(backend, ttl=ttl, retry_deadline=retry_deadline)
    files = OpenFiles(store, max_prefetch=4 * BS)
    ops = ModelFS(namespace, files, ttl=ttl, block_size=BS)
    await namespace.refresh(force=True)
    return ops


@pytest.fixture
def backend() -> MemoryBackend:
    b = MemoryBackend()
    b.put("config.json", b'{"a": 1}')
    b.put("sub/model.bin", MODEL)
    b.put("sub/empty.bin", b"")
    return b


async def fuse_errno(call: Awaitable[object]) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call
    return info.value.errno


async def lookup_path(ops: ModelFS, path: str) -> pyfuse3.EntryAttributes:
    inode = ROOT_INODE
    attr = await ops.getattr(ROOT_INODE, CTX)
    for part in path.split("/"):
        attr = await ops.lookup(inode, part.encode(), CTX)
        inode = attr.st_ino
    return attr


async def test_lookup_and_getattr_sizes_and_modes(make_store: StoreFactory, backend: MemoryBackend) -> None:
    """Files are 0444 regular files of the object's size; directories are 0555; timeouts are the TTL."""
    ops = await build(make_store, backend)
    root = await ops.getattr(ROOT_INODE, CTX)
    assert stat.S_ISDIR(root.st_mode) and stat.S_IMODE(root.st_mode) == 0o555
    sub = await ops.lookup(ROOT_INODE, b"sub", CTX)
    assert stat.S_ISDIR(sub.st_mode) and sub.st_size == 0
    model = await ops.lookup(sub.st_ino, b"model.bin", CTX)
    assert stat.S_ISREG(model.st_mode) and stat.S_IMODE(model.st_mode) == 0o444
    assert model.st_size == len(MODEL)
    assert model.st_blocks == -(-len(MODEL) // 512)
    assert (
        model.st_uid == os.getuid() and 59 < model.entry_timeout <= 60.0 and model.attr_timeout == model.entry_timeout
    )
    again = await ops.getattr(model.st_ino, CTX)
    assert again.st_ino == model.st_ino and again.st_size == len(MODEL)
    assert (await lookup_path(ops, "sub/empty.bin")).st_size == 0
    assert (await lookup_path(ops, "config.json")).st_size == len(b'{"a": 1}')
    assert ops.namespace.get(model.st_ino).lookups == 1


async def test_ttl_minus_one_gives_the_kernel_a_long_timeout(make_store: StoreFactory, backend: MemoryBackend) -> None:
    """--metadata-ttl -1 becomes a year-long entry/attr timeout, not a negative one."""
    ops = await build(make_store, backend, ttl=-1)
    attr = await ops.lookup(ROOT_INODE, b"config.json", CTX)
    assert attr.entry_timeout >= 365 * 24 * 3600


async def test_lookup_of_missing_name_is_enoent(make_store: StoreFactory, backend: MemoryBackend) -> None:
    """NotFound from the namespace becomes ENOENT; so does an unknown inode."""
    ops = await build(make_store, backend)
    assert await fuse_errno(ops.lookup(ROOT_INODE, b"nope", CTX)) == errno.ENOENT
    assert await fuse_errno(ops.getattr(424242, CTX)) == errno.ENOENT


async def test_a_lookup_whose_reply_cannot_be_built_counts_no_reference(
    make_store: StoreFactory, backend: MemoryBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel gets no entry when its attributes fail (EIO): the node's reference count
    must not grow, or the node would never be freed."""
    ops = await build(make_store, backend)

    def broken(node: Node) -> pyfuse3.EntryAttributes:
        raise OverflowError("st_size out of range")

    monkeypatch.setattr(ops, "_attrs", broken)
    assert await fuse_errno(ops.lookup(ROOT_INODE, b"config.json", CTX)) == errno.EIO
    assert (await ops.namespace.lookup(ROOT_INODE, b"config.json")).lookups == 0


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND])
async def test_open_for_writing_is_erofs(make_store: StoreFactory, backend: MemoryBackend, flags: int) -> None:
    """Any open that could write fails with EROFS and leaves no handle."""
    ops = await build(make_store, backend)
    attr = await ops.lookup(ROOT_INODE, b"config.json", CTX)
    assert await fuse_errno(ops.open(attr.st_ino, flags, CTX)) == errno.EROFS
    assert len(ops.files) == 0


async def test_write_side_operations_are_erofs(make_store: StoreFactory, backend: MemoryBackend) -> None:
    """mkdir, unlink, write, create, rename, setattr, setxattr all fail with EROFS."""
    ops = await build(make_store, backend)
    attr = await ops.lookup(ROOT_INODE, b"config.json", CTX)
    calls: list[Awaitable[object]] = [
        ops.mkdir(ROOT_INODE, b"d", 0o755, CTX),
        ops.unlink(ROOT_INODE, b"config.json", CTX),
        ops.rmdir(ROOT_INODE, b"sub", CTX),
        ops.write(1, 0, b"x"),
        ops.create(ROOT_INODE, b"new", 0o644, os.O_WRONLY, CTX),
        ops.rename(ROOT_INODE, b"config.json", ROOT_INODE, b"x", 0, CTX),
        ops.setattr(attr.st_ino, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, CTX),
        ops.setxattr(attr.st_ino, b"user.x", b"1", CTX),
        ops.symlink(ROOT_INODE, b"l", b"config.json", CTX),
    ]
    for call in calls:
        assert await fuse_errno(call) == errno.EROFS
    assert await ops.access(attr.st_ino, os.W_OK, CTX) is False
    assert await ops.access(attr.st_ino, os.R_OK, CTX) is True
    assert set(backend.objects) == {"config.json", "sub/model.bin", "sub/empty.bin"}


async def test_open_directory_is_eisdir_and_opendir_file_is_enotdir(
    make_store: StoreFactory, backend: MemoryBackend
) -> None:
    """Opening a directory as a file, or a file as a directory, fails with the right errno."""
    ops = await build(make_store, backend)
    sub = await ops.lookup(ROOT_INODE, b"sub", CTX)
    conf = await ops.lookup(ROOT_INODE, b"config.json", CTX)
    assert await fuse_errno(ops.open(sub.st_ino, os.O_RDONLY, CTX)) == errno.EISDIR
    assert await fuse_errno(ops.opendir(conf.st_ino, CTX)) == errno.ENOTDIR
    fh = await ops.opendir(sub.st_ino, CTX)
    assert ops._dir_handles[fh].listing.names == [b"empty.bin", b"model.bin"]
    await ops.releasedir(fh)
    assert fh not in ops._dir_handles


async def test_read_returns_exact_bytes(make_store: StoreFactory, backend: MemoryBackend) -> None:
    """Reads at any offset and size return the object's exact bytes; release drops the handle."""
    ops = await build(make_store, backend)
    attr = await lookup_path(ops, "sub/model.bin")
    info = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
    fh = info.fh
    out = bytearray()
    for off in range(0, len(MODEL), 128 * 1024 // 32):
        out += await ops.read(fh, off, 128 * 1024 // 32)
    assert bytes(out) == MODEL
    assert bytes(await ops.read(fh, BS - 5, 10)) == MODEL[BS - 5 : BS + 5]
    assert bytes(await ops.read(fh, len(MODEL) - 3, 100)) == MODEL[-3:]
    assert await ops.read(fh, len(MODEL), 100) == b""
    await ops.flush(fh)
    await ops.release(fh)
    assert len(ops.files) == 0


async def test_keep_cache_only_for_the_same_version(make_store: StoreFactory, backend: MemoryBackend) -> None:
    """The page cache is kept on a reopen of the same version, dropped after an overwrite."""
    ops = await build(make_store, backend)
    attr = await ops.lookup(ROOT_INODE, b"config.json", CTX)
    first = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
    second = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
    assert first.keep_cache is False and second.keep_cache is True
    backend.put("config.json", b'{"a": 2}')
    await ops.namespace.refresh(force=True)
    attr = await ops.lookup(ROOT_INODE, b"config.json", CTX)  # a new inode for the new version
    third = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
    assert third.keep_cache is False
    assert bytes(await ops.read(third.fh, 0, 100)) == b'{"a": 2}'


async def test_version_changed_during_read_is_estale(make_store: StoreFactory, backend: MemoryBackend) -> None:
    """An object overwritten after open fails reads of the old version with ESTALE."""
    ops = await build(make_store, backend)
    attr = await lookup_path(ops, "sub/model.bin")
    info = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
    backend.put("sub/model.bin", b"overwritten")
    assert await fuse_errno(ops.read(info.fh, 0, 4096)) == errno.ESTALE
    assert ops.files.store.stats.errors >= 1


async def test_unexpected_exception_becomes_eio(make_store: StoreFactory, backend: MemoryBackend) -> None:
    """A bug-like exception (unknown handle, a backend raising RuntimeError) is EIO, and the fs goes on."""
    ops = await build(make_store, backend)
    assert await fuse_errno(ops.read(987654, 0, 10)) == errno.EIO  # KeyError inside

    def fault(name: str, offset: int, length: int) -> None:
        raise RuntimeError("unexpected")

    backend.fault = fault
    attr = await lookup_path(ops, "sub/model.bin")
    info = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
    assert await fuse_errno(ops.read(info.fh, 0, 10)) == errno.EIO
    backend.fault = None
    assert bytes(await ops.read(info.fh, 0, 10)) == MODEL[:10]


async def test_transient_errors_past_the_deadline_are_eio(
    make_store: StoreFactory, backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    """A read that keeps failing transiently fails with EIO once the retry deadline passes."""
    ops = await build(make_store, backend, retry_deadline=3.0)

    def fault(name: str, offset: int, length: int) -> None:
        raise TransientError("503")

    backend.fault = fault
    attr = await lookup_path(ops, "config.json")
    info = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
    assert await fuse_errno(ops.read(info.fh, 0, 10)) == errno.EIO
    assert ops.files.store.stats.retry.gave_up >= 1


async def test_stats_xattr_on_root(make_store: StoreFactory, backend: MemoryBackend) -> None:
    """user.modelfs.stats on the root is JSON whose counters follow the reads."""
    ops = await build(make_store, backend)
    stats = json.loads(await ops.getxattr(ROOT_INODE, b"user.modelfs.stats", CTX))
    assert stats["backend_gets"] == 0 and stats["files"] == 1 and stats["bytes"] == 8  # the root's listing
    assert stats["cached_dirs"] == 1 and 0 < stats["metadata_bytes"] <= stats["metadata_capacity"]
    sub = await ops.lookup(ROOT_INODE, b"sub", CTX)
    await ops.releasedir(await ops.opendir(sub.st_ino, CTX))
    stats = json.loads(await ops.getxattr(ROOT_INODE, b"user.modelfs.stats", CTX))
    assert stats["files"] == 3 and stats["bytes"] == len(MODEL) + 8 and stats["listing_pages"] == 2
    attr = await lookup_path(ops, "config.json")
    info = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
    await ops.read(info.fh, 0, 100)
    stats = json.loads(await ops.getxattr(ROOT_INODE, b"user.modelfs.stats", CTX))
    assert stats["backend_gets"] == 1 and stats["backend_bytes"] == 8
    assert stats["open_handles"] == 1
    assert stats["memory_capacity"] == 8 * BS and stats["memory_used"] == BS  # (an 8-byte block counts its page)
    assert "disk_capacity" not in stats
    assert await ops.listxattr(ROOT_INODE, CTX) == [b"user.modelfs.stats"]


async def test_file_xattrs(make_store: StoreFactory, backend: MemoryBackend) -> None:
    """Files expose source and version xattrs; unknown names and directories give ENOATTR."""
    ops = await build(make_store, backend)
    attr = await ops.lookup(ROOT_INODE, b"config.json", CTX)
    version = str(backend.objects["config.json"].version)
    assert await ops.getxattr(attr.st_ino, b"user.modelfs.version", CTX) == version.encode()
    assert await ops.getxattr(attr.st_ino, b"user.modelfs.source", CTX) == b"memory:///config.json"
    assert await ops.listxattr(attr.st_ino, CTX) == [b"user.modelfs.source", b"user.modelfs.version"]
    assert await fuse_errno(ops.getxattr(attr.st_ino, b"user.modelfs.crc32c", CTX)) == pyfuse3.ENOATTR
    assert await fuse_errno(ops.getxattr(attr.st_ino, b"user.other", CTX)) == pyfuse3.ENOATTR
    sub = await ops.lookup(ROOT_INODE, b"sub", CTX)
    assert await fuse_errno(ops.getxattr(sub.st_ino, b"user.modelfs.version", CTX)) == pyfuse3.ENOATTR
    assert await ops.listxattr(sub.st_ino, CTX) == []


async def test_statfs_reports_totals(make_store: StoreFactory, backend: MemoryBackend) -> None:
    """statfs: files and their size in 512-byte units over the listed directories, nothing free."""
    ops = await build(make_store, backend)
    sub = await ops.lookup(ROOT_INODE, b"sub", CTX)
    await ops.releasedir(await ops.opendir(sub.st_ino, CTX))
    st = await ops.statfs(CTX)
    assert st.f_files == 3
    assert st.f_blocks == -(-(len(MODEL) + 8) // 512)
    assert st.f_bfree == 0 and st.f_namemax == 255


async def test_forget_frees_nodes_and_dir_handles_free_listings(
    make_store: StoreFactory, backend: MemoryBackend
) -> None:
    """Looked-up nodes leave the inode table when forgotten; a reopen after that starts a fresh
    page cache (keep_cache off); releasedir drops the handle."""
    ops = await build(make_store, backend)
    sub = await ops.lookup(ROOT_INODE, b"sub", CTX)
    model = await ops.lookup(sub.st_ino, b"model.bin", CTX)
    first = await ops.open(model.st_ino, os.O_RDONLY, CTX)
    await ops.release(first.fh)
    fh = await ops.opendir(sub.st_ino, CTX)
    assert ops.namespace.inodes == 3
    await ops.releasedir(fh)
    await ops.forget([(model.st_ino, 1), (sub.st_ino, 1)])
    assert ops.namespace.inodes == 1 and not ops._dir_handles
    sub = await ops.lookup(ROOT_INODE, b"sub", CTX)
    model = await ops.lookup(sub.st_ino, b"model.bin", CTX)
    assert (await ops.open(model.st_ino, os.O_RDONLY, CTX)).keep_cache is False


async def test_forget_releases_deleted_inodes(make_store: StoreFactory, backend: MemoryBackend) -> None:
    """forget() drops the kernel's references; a deleted file's inode is then gone."""
    ops = await build(make_store, backend)
    attr = await ops.lookup(ROOT_INODE, b"config.json", CTX)
    backend.delete("config.json")
    await ops.namespace.refresh(force=True)
    assert (await ops.getattr(attr.st_ino, CTX)).st_ino == attr.st_ino
    await ops.forget([(attr.st_ino, 1)])
    assert await fuse_errno(ops.getattr(attr.st_ino, CTX)) == errno.ENOENT


async def test_a_readdir_that_fails_midway_leaves_no_lookup_counted(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """readdir counted a lookup for each entry it put in the reply; when a later listing page
    then failed, the whole reply became an error: the kernel never got those entries, so it
    never FORGETs them, and their nodes stayed for good. Only a reply that goes out counts."""
    from modelfs.errors import AccessDenied

    backend = MemoryBackend(page_size=3)
    for i in range(10):
        backend.put(f"d/f{i:02d}", b"x")
    ops = await build(make_store, backend, ttl=60.0)
    d = await ops.lookup(ROOT_INODE, b"d", CTX)
    fh = await ops.opendir(d.st_ino, CTX)
    replied: list[bytes] = []

    def reply(token: object, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        replied.append(name)
        return True

    def outage(op: str, name: str) -> None:
        if op == "list" and backend.page_calls > 1:
            raise AccessDenied(f"{name}: listing refused")

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    backend.meta_fault = outage
    inodes_before = ops.stats()["inodes"]
    assert await fuse_errno(ops.readdir(fh, 0, pyfuse3.ReaddirToken())) == errno.EACCES
    assert replied, "entries were put in the reply before the page failed"
    listed = ops._dir_handles[fh].listing.by_name
    assert all(listed[name].lookups == 0 for name in replied), "the kernel never got them"
    assert ops.stats()["inodes"] == inodes_before
    # Once the listing works, a readdir's entries are counted (once each).
    backend.meta_fault = None
    replied.clear()
    await ops.readdir(fh, 0, pyfuse3.ReaddirToken())
    assert replied == [f"f{i:02d}".encode() for i in range(10)]
    listed = ops._dir_handles[fh].listing.by_name
    assert [listed[name].lookups for name in replied] == [1] * 10
    await ops.releasedir(fh)
