"""The nodes the kernel holds are bounded: past ``held_cap`` the least recently replied ones that
no open handle uses are given back (pyfuse3's ``invalidate_entry``, faked here at the boundary),
and freed only when the kernel forgets them."""

from __future__ import annotations

import os
import threading

import pyfuse3
import pytest
import trio
import trio.testing

from modelfs.backends.memory import MemoryBackend
from modelfs.errors import NotFound
from modelfs.files import OpenFiles
from modelfs.fs import ModelFS
from modelfs.inodes import ROOT_INODE, Namespace, Node
from modelfs.memlimit import HELD_NODE_BYTES, MIN_HELD_NODES, held_nodes

from .conftest import BS, StoreFactory

CTX = pyfuse3.RequestContext()


class FakeKernel:
    """What the daemon asked the kernel to drop, in order (called from a worker thread)."""

    def __init__(self, missing: set[bytes] = frozenset()) -> None:  # type: ignore[assignment]
        self.asked: list[tuple[int, bytes]] = []
        self.threads: set[int] = set()
        self.missing = missing  # names the kernel no longer has (ENOENT)
        self.lock = threading.Lock()

    def __call__(self, parent: int, name: bytes) -> None:
        with self.lock:
            self.threads.add(threading.get_ident())
            self.asked.append((parent, name))
        if name in self.missing:
            raise FileNotFoundError(2, "no such entry")


def backend_of(count: int, directory: str = "d") -> MemoryBackend:
    backend = MemoryBackend()
    for i in range(count):
        backend.put(f"{directory}/f{i:03d}", f"file {i}".encode())
    return backend


async def settle(ns: Namespace) -> None:
    """Until the trimmer has nothing left to do: every batch it started has been sent."""
    while True:
        await trio.testing.wait_all_tasks_blocked()
        if not ns._invalidating:
            return
        await ns._invalidated.wait()


async def hold(ns: Namespace, directory: Node, name: str) -> Node:
    """A lookup reply: the kernel now holds the node."""
    node = await ns.lookup(directory.inode, name.encode())
    ns.remember(node)
    return node


def test_the_cap_comes_from_the_metadata_cache() -> None:
    assert held_nodes() == (8 << 20) // HELD_NODE_BYTES == 8192
    assert held_nodes(64 << 10) == MIN_HELD_NODES
    assert Namespace(MemoryBackend(), ttl=60, retry_deadline=1, cache_bytes=32 << 20).held_cap == 32768


async def test_least_recently_replied_nodes_are_given_back_never_open_ones_and_freed_at_forget() -> None:
    kernel = FakeKernel()
    ns = Namespace(backend_of(100), ttl=60, retry_deadline=1, held_cap=32, invalidate=kernel)
    async with trio.open_nursery() as nursery:
        await nursery.start(ns.run)
        directory = await hold(ns, ns.root, "d")
        ns.opened(directory)  # an open directory handle
        files = [await ns.lookup(directory.inode, f"f{i:03d}".encode()) for i in range(100)]
        for node in files:  # the replies, with no checkpoint between them
            ns.remember(node)
        ns.opened(files[0])  # an open file: the oldest, never given back
        ns.remember(files[1])  # replied again: now the most recent
        await settle(ns)
        assert kernel.threads and threading.get_ident() not in kernel.threads  # a worker thread
        asked = [name for _, name in kernel.asked]
        assert all(parent == directory.inode for parent, _ in kernel.asked)
        assert len(asked) == len(set(asked))  # each once
        assert b"d" not in asked and b"f000" not in asked  # open handles use them
        assert asked[0] == b"f002" and b"f001" not in asked  # oldest first; f001 was replied again
        assert ns.held_nodes <= ns.held_cap
        assert ns.invalidations == len(asked) and ns.trim_passes >= 1
        # Nothing is freed before the kernel forgets it: every inode it may still use answers.
        assert ns.inodes == 102
        given_back = [node for node in files if node.name in asked]
        for node in given_back:
            assert ns.get(node.inode) is node
        # A lookup before the kernel forgot: the same node, held again.
        again = await hold(ns, directory, given_back[0].name.decode())
        assert again is given_back[0]
        # FORGET frees them.
        for node in given_back[1:]:
            ns.forget(node.inode, node.lookups)
            with pytest.raises(NotFound):
                ns.get(node.inode)
        assert ns.inodes == 102 - len(given_back[1:])
        # A lookup after the kernel forgot: found again, with the object's attributes.
        node = await hold(ns, directory, given_back[-1].name.decode())
        assert node.size == len(f"file {int(given_back[-1].name[1:])}".encode())
        assert ns.get(node.inode) is node
        nursery.cancel_scope.cancel()


async def test_a_batch_at_a_time_not_one_call_per_node() -> None:
    kernel = FakeKernel()
    ns = Namespace(backend_of(300), ttl=60, retry_deadline=1, held_cap=64, invalidate=kernel)
    async with trio.open_nursery() as nursery:
        await nursery.start(ns.run)
        directory = await hold(ns, ns.root, "d")
        ns.opened(directory)
        done = 0
        for i in range(300):
            await hold(ns, directory, f"f{i:03d}")
            await settle(ns)  # the trimmer runs after every reply
            assert ns.held_nodes <= ns.held_cap
            by_name = {node.name: node for node in ns._by_inode.values() if node.parent is directory}
            for _, name in kernel.asked[done:]:  # the kernel drops them: FORGET
                ns.forget(by_name[name].inode, by_name[name].lookups)
            done = len(kernel.asked)
        # 300 file replies, 64 kept: ~240 given back in batches of `_batch`, not 240 passes.
        assert ns._batch == 16
        assert ns.trim_passes <= (300 - 64) // ns._batch + 2
        assert ns.inodes <= ns.held_cap + 1
        assert len(kernel.asked) == len(set(kernel.asked)) == 300 - ns.held_nodes
        nursery.cancel_scope.cancel()


async def test_a_lookup_storm_over_open_files_does_not_spin() -> None:
    """Every held node is open: nothing can be given back, and the trimmer looks again only
    after another batch of new nodes, not at every reply."""
    kernel = FakeKernel()
    ns = Namespace(backend_of(64), ttl=60, retry_deadline=1, held_cap=16, invalidate=kernel)
    async with trio.open_nursery() as nursery:
        await nursery.start(ns.run)
        directory = await hold(ns, ns.root, "d")
        ns.opened(directory)
        nodes = [await ns.lookup(directory.inode, f"f{i:03d}".encode()) for i in range(64)]
        for node in nodes:  # looked up and opened
            ns.remember(node)
            ns.opened(node)
        await settle(ns)
        passes = ns.trim_passes
        for _ in range(50):
            for node in nodes:
                ns.remember(node)
            await settle(ns)
        assert ns.trim_passes <= passes + 1
        assert not kernel.asked
        nursery.cancel_scope.cancel()


async def test_an_entry_the_kernel_dropped_already_is_not_an_error() -> None:
    kernel = FakeKernel(missing={b"f000", b"f001"})
    ns = Namespace(backend_of(40), ttl=60, retry_deadline=1, held_cap=16, invalidate=kernel)
    async with trio.open_nursery() as nursery:
        await nursery.start(ns.run)
        directory = await hold(ns, ns.root, "d")
        ns.opened(directory)
        for i in range(40):
            await hold(ns, directory, f"f{i:03d}")
        await settle(ns)
        asked = {name for _, name in kernel.asked}
        assert {b"f000", b"f001", b"f002"} <= asked  # went on past ENOENT
        nursery.cancel_scope.cancel()


async def test_an_error_stops_the_invalidations_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    def unmounted(parent: int, name: bytes) -> None:
        nonlocal calls
        calls += 1
        raise OSError(19, "no such device")

    ns = Namespace(backend_of(80), ttl=60, retry_deadline=1, held_cap=16, invalidate=unmounted)
    async with trio.open_nursery() as nursery:
        await nursery.start(ns.run)
        directory = await hold(ns, ns.root, "d")
        for i in range(80):
            await hold(ns, directory, f"f{i:03d}")
            await settle(ns)
        assert calls == 1
        assert sum("cannot ask the kernel to drop entries" in r.message for r in caplog.records) == 1
        nursery.cancel_scope.cancel()


async def test_without_a_session_nothing_is_given_back() -> None:
    """A Namespace built without ``invalidate`` (no mount) keeps what the kernel holds."""
    ns = Namespace(backend_of(40), ttl=60, retry_deadline=1, held_cap=16)
    async with trio.open_nursery() as nursery:
        await nursery.start(ns.run)
        directory = await hold(ns, ns.root, "d")
        for i in range(40):
            await hold(ns, directory, f"f{i:03d}")
        await settle(ns)
        assert ns.held_nodes == 40 and ns.invalidations == 0  # (files: directories are not counted)
        nursery.cancel_scope.cancel()


async def test_open_and_opendir_handles_pin_their_nodes(make_store: StoreFactory) -> None:
    """ModelFS counts the handles on a node from open/opendir to release/releasedir."""
    backend = backend_of(3)
    store = await make_store(backend, memory_blocks=8, retry_deadline=5.0)
    ns = Namespace(backend, ttl=60, retry_deadline=5.0)
    ops = ModelFS(ns, OpenFiles(store, max_prefetch=4 * BS), ttl=60, block_size=BS)
    d = await ops.lookup(ROOT_INODE, b"d", CTX)
    f = await ops.lookup(d.st_ino, b"f000", CTX)
    dir_fh = await ops.opendir(d.st_ino, CTX)
    first = await ops.open(f.st_ino, os.O_RDONLY, CTX)
    second = await ops.open(f.st_ino, os.O_RDONLY, CTX)
    assert ns.get(d.st_ino).opens == 1 and ns.get(f.st_ino).opens == 2
    await ops.release(first.fh)
    assert ns.get(f.st_ino).opens == 1
    await ops.release(second.fh)
    await ops.releasedir(dir_fh)
    assert ns.get(d.st_ino).opens == 0 and ns.get(f.st_ino).opens == 0
    stats = ops.stats()
    assert stats["held_nodes"] == 1 and stats["inodes"] == 3 and stats["held_cap"] == held_nodes()  # (the file)


async def test_directories_are_never_given_back() -> None:
    """A walk of 10 directories of 20 files with room for 48: files are given back, never a
    directory. (Dropping a directory's entry unhashes it even while it is a process's working
    directory: getcwd() there fails with ENOENT. Given back while walked, the kernel would
    also drop the entries just listed below it.) Nodes open files use stay."""
    backend = MemoryBackend()
    for d in range(10):
        for i in range(20):
            backend.put(f"a/d{d}/f{i:02d}", b"z")
    kernel = FakeKernel()
    ns = Namespace(backend, ttl=60, retry_deadline=1, held_cap=48, invalidate=kernel)
    async with trio.open_nursery() as nursery:
        await nursery.start(ns.run)
        a = await hold(ns, ns.root, "a")
        directories = {a.inode: a}
        opened = None
        for d in range(10):
            directory = await hold(ns, a, f"d{d}")
            directories[directory.inode] = directory
            for i in range(20):
                node = await hold(ns, directory, f"f{i:02d}")
                if d == 3 and i == 5:
                    ns.opened(node)
                    opened = node
            await settle(ns)
            # The kernel drops what it was asked to drop.
            for parent, name in kernel.asked:
                node = next(
                    (n for n in ns._by_inode.values() if n.parent and n.parent.inode == parent and n.name == name),
                    None,
                )
                if node is not None:
                    ns.forget(node.inode, node.lookups)
            await settle(ns)
            assert ns.held_nodes <= ns.held_cap + 1
        asked_parents = {parent for parent, _ in kernel.asked}
        assert asked_parents <= {directory.inode for directory in directories.values() if directory is not a}
        assert not [name for _, name in kernel.asked if name.startswith(b"d")]  # no directory entry, ever
        assert len(kernel.asked) >= 10 * 20 - ns.held_cap - 1  # files were given back
        assert all(ns.get(inode) is directory for inode, directory in directories.items())
        assert opened is not None and ns.get(opened.inode) is opened
        assert (opened.parent.inode, opened.name) not in kernel.asked  # type: ignore[union-attr]
        assert all(not node.is_dir for node in ns._held.values())
        nursery.cancel_scope.cancel()
