"""The stop: requests still waiting on the backend fail with EIO (ModelFS.stop); blocks
queued for the disk cache are written first, within a grace (BlockStore.finish_writes)."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing

from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.cache import disk as disk_module
from modelfs.cache.blocks import BlockStore, ObjectRef
from modelfs.cache.disk_format import WriteResult

from .conftest import BS, StoreFactory, put_ramp
from .test_operations import CTX, build, lookup_path


async def test_stop_fails_requests_in_flight_with_eio(make_store: StoreFactory) -> None:
    backend = MemoryBackend()
    backend.put("m.bin", ramp(3 * BS, seed=2))
    ops = await build(make_store, backend)
    attr = await lookup_path(ops, "m.bin")
    info = await ops.open(attr.st_ino, 0, CTX)
    backend.latency = 1e9  # a server that never answers
    results: list[object] = []

    async def read() -> None:
        try:
            results.append(await ops.read(info.fh, 0, 4096))
        except pyfuse3.FUSEError as exc:
            results.append(exc.errno)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert backend.in_flight >= 1 and results == []
        assert ops.stop() == 1
    assert results == [errno.EIO]
    # After the stop, a new request fails at once instead of waiting for the backend.
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await ops.read(info.fh, BS, 4096)
    assert caught.value.errno == errno.EIO
    assert ops.errors["EIO"] == 2


@pytest.fixture
def held_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Disk-cache writes wait (in their threads) until the returned event is set."""
    go = threading.Event()
    real = disk_module.write_block

    def held(*args: Any, **kwargs: Any) -> WriteResult:
        go.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(disk_module, "write_block", held)
    yield go
    go.set()


async def _stop_writing(nursery: trio.Nursery, store: BlockStore) -> list[bool]:
    """Start the stop's ``finish_writes`` in ``nursery``; its result lands in the list returned."""
    finished: list[bool] = []

    async def finish() -> None:
        finished.append(await store.finish_writes(60))

    nursery.start_soon(finish)
    await trio.testing.wait_all_tasks_blocked()
    return finished


async def _fetch_blocks(store: BlockStore, ref: ObjectRef, data: bytes, count: int) -> None:
    for index in range(count):
        block = await store.get(ref, index)
        assert bytes(block.view) == data[index * BS : (index + 1) * BS]


async def test_stop_writes_what_is_queued_for_the_disk_cache(
    make_store: StoreFactory, held_writes: threading.Event
) -> None:
    """Blocks fetched but not yet on disk when the daemon stops are written before it exits:
    the next start finds every block this run read."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "m.bin", 8 * BS, seed=3)
    store = await make_store(backend, disk=True)
    await _fetch_blocks(store, ref, data, 8)
    assert store.disk is not None and store.disk.stats.writes == 0
    async with trio.open_nursery() as nursery:
        finished = await _stop_writing(nursery, store)
        assert finished == []  # waiting for the queued writes
        held_writes.set()
    assert finished == [True] and store.disk.stats.writes == 8
    for index in range(8):
        dest = memoryview(bytearray(BS))
        assert await store.disk.read_into((ref.key, ref.version, index), dest)
        assert bytes(dest) == data[index * BS : (index + 1) * BS]


async def test_stop_gives_up_on_a_stuck_disk_after_the_grace(
    make_store: StoreFactory, held_writes: threading.Event, autojump_clock: trio.testing.MockClock
) -> None:
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "m.bin", 4 * BS, seed=4)
    store = await make_store(backend, disk=True)
    await _fetch_blocks(store, ref, data, 4)
    start = trio.current_time()
    assert not await store.finish_writes(5)
    assert trio.current_time() - start == pytest.approx(5)
    assert store.disk is not None and store.disk.stats.writes == 0
    held_writes.set()  # (the threads end; the fixture's nursery waits for them)


async def test_stop_waits_only_for_the_writes_queued_when_it_began(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks still landing after the stop began (prefetches, the eager stream) are not waited
    for: the stop ends when the writes queued at its start are done."""
    go, later = threading.Event(), threading.Event()
    real = disk_module.write_block

    def held(dir_path: str, name: str, key_bytes: bytes, index: int, *args: Any, **kwargs: Any) -> WriteResult:
        (go if index < 4 else later).wait(60)
        return real(dir_path, name, key_bytes, index, *args, **kwargs)

    monkeypatch.setattr(disk_module, "write_block", held)
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "m.bin", 6 * BS, seed=5)
    store = await make_store(backend, disk=True)
    try:
        await _fetch_blocks(store, ref, data, 4)
        async with trio.open_nursery() as nursery:
            finished = await _stop_writing(nursery, store)
            for index in (4, 5):  # fetched after the stop began: their writes wait on ``later``
                block = await store.get(ref, index)
                assert bytes(block.view) == data[index * BS : (index + 1) * BS]
            await trio.testing.wait_all_tasks_blocked()
            assert finished == []
            go.set()
        assert finished == [True]
        assert store.disk is not None and store.disk.stats.writes == 4
    finally:
        go.set()
        later.set()


def test_unmount_acts_on_the_path_it_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mount is checked (a modelfs mount, not another file system) on the resolved path
    and fusermount3 gets that same path: a symlink in the path swapped after the check cannot
    point the unmount at another mount."""
    import subprocess

    import modelfs.mount as mount_module

    real = tmp_path / "real-mnt"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    checked: list[str] = []
    unmounted: list[list[str]] = []

    def fstype(path: Path) -> str:
        checked.append(str(path))
        return "fuse.modelfs"

    def fusermount(args: list[str]) -> subprocess.CompletedProcess[str]:
        unmounted.append(args)
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(mount_module, "is_mounted", lambda path: True)
    monkeypatch.setattr(mount_module, "mounted_fstype", fstype)
    monkeypatch.setattr(mount_module, "_daemon_pid", lambda path: None)
    monkeypatch.setattr(mount_module, "_fusermount", fusermount)
    mount_module.unmount(link)
    assert checked == [str(real)] and unmounted == [["-u", str(real)]]


def _fake_unmount(monkeypatch: pytest.MonkeyPatch, failure: str, *, dead: bool) -> list[list[str]]:
    """mount.unmount's view of a modelfs mount whose ``fusermount3 -u`` fails with ``failure``
    (its statfs failing with ENOTCONN if ``dead``); the fusermount3 calls made are returned."""
    import subprocess

    import modelfs.mount as mount_module

    calls: list[list[str]] = []

    def fusermount(args: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        if args[0] == "-u":
            return subprocess.CompletedProcess(args, 1, "", f"fusermount3: {failure}\n")
        return subprocess.CompletedProcess(args, 0, "", "")

    real_statvfs = os.statvfs

    def statvfs(path: object) -> os.statvfs_result:
        if dead:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return real_statvfs(path)  # type: ignore[arg-type]

    monkeypatch.setattr(mount_module, "is_mounted", lambda path: True)
    monkeypatch.setattr(mount_module, "mounted_fstype", lambda path: "fuse.modelfs")
    monkeypatch.setattr(mount_module, "_daemon_pid", lambda path: None if dead else os.getpid())
    monkeypatch.setattr(mount_module, "_fusermount", fusermount)
    monkeypatch.setattr(mount_module.os, "statvfs", statvfs)
    return calls


def test_unmount_of_a_busy_live_mount_fails_and_leaves_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file held open made `modelfs unmount` detach the mount lazily, then wait 60 s for a
    daemon that could not exit, and exit 0. Now, like umount: one error, no lazy detach, no wait
    (the daemon, here this very process, would never exit)."""
    import modelfs.mount as mount_module
    from modelfs.errors import MountError

    calls = _fake_unmount(monkeypatch, f"failed to unmount {tmp_path}: Device or resource busy", dead=False)
    with pytest.raises(MountError, match=rf"^{tmp_path} is busy \(files are open in it\); close them"):
        mount_module.unmount(tmp_path, wait=0)
    assert calls == [["-u", str(tmp_path)]]


def test_unmount_of_a_live_mount_that_fusermount_refuses_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modelfs.mount as mount_module
    from modelfs.errors import MountError

    calls = _fake_unmount(monkeypatch, "entry for /x not found in /etc/mtab", dead=False)
    with pytest.raises(MountError, match=rf"^cannot unmount {tmp_path}: fusermount3: entry for /x not found"):
        mount_module.unmount(tmp_path, wait=0)
    assert calls == [["-u", str(tmp_path)]]


def test_unmount_of_a_dead_mount_detaches_it_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelfs.mount as mount_module

    calls = _fake_unmount(monkeypatch, f"failed to unmount {tmp_path}: Device or resource busy", dead=True)
    mount_module.unmount(tmp_path)
    assert calls == [["-u", str(tmp_path)], ["-uz", str(tmp_path)]]
