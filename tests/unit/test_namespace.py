"""Namespace over a MemoryBackend: tree building, name conflicts, stable inodes, TTL."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from modelfs.backends.memory import MemoryBackend
from modelfs.errors import NotFound, TransientError
from modelfs.inodes import ROOT_INODE, Namespace, Node


def backend_with(*names: str) -> MemoryBackend:
    backend = MemoryBackend()
    for name in names:
        backend.put(name, name.encode() * 3 if not name.endswith("/") else b"")
    return backend


async def walk(ns: Namespace, path: str) -> Node:
    node = ns.root
    for part in path.split("/"):
        node = await ns.lookup(node.inode, part.encode())
    return node


def tree(node: Node, prefix: str = "") -> list[str]:
    """Every path below ``node``; directories end in '/'."""
    out: list[str] = []
    for name, child in sorted(node.children.items()):
        path = prefix + name.decode()
        if child.is_dir:
            out.append(path + "/")
            out += tree(child, path + "/")
        else:
            out.append(path)
    return out


async def test_tree_from_listing_with_nested_prefixes() -> None:
    """Nested names become nested directories; sizes and versions come from the listing."""
    backend = backend_with("config.json", "sub/deeper/model.bin", "sub/tok.json", "sub/deeper/x/y.bin")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    await ns.refresh()
    assert tree(ns.root) == [
        "config.json",
        "sub/",
        "sub/deeper/",
        "sub/deeper/model.bin",
        "sub/deeper/x/",
        "sub/deeper/x/y.bin",
        "sub/tok.json",
    ]
    model = await walk(ns, "sub/deeper/model.bin")
    assert not model.is_dir
    assert model.size == len(b"sub/deeper/model.bin") * 3
    assert model.info is not None and model.info.version == str(backend.objects["sub/deeper/model.bin"].version)
    assert ns.file_count == 4
    assert ns.total_bytes == sum(len(o.data) for o in backend.objects.values())
    sub = await walk(ns, "sub")
    assert sub.is_dir and (await ns.lookup(sub.inode, b"..")) is ns.root
    deeper = await walk(ns, "sub/deeper")
    assert await ns.lookup(deeper.inode, b"..") is sub
    assert await ns.lookup(deeper.inode, b".") is deeper
    assert await ns.lookup(ROOT_INODE, b"..") is ns.root


async def test_placeholder_directory_objects() -> None:
    """A 'dir/' object is an (empty) directory; a placeholder next to real children merges."""
    backend = backend_with("empty/", "withplace/", "withplace/file.txt")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    await ns.refresh()
    assert tree(ns.root) == ["empty/", "withplace/", "withplace/file.txt"]
    empty = await walk(ns, "empty")
    assert empty.is_dir and empty.children == {}
    assert ns.file_count == 1


async def test_object_beside_directory_of_same_name_is_hidden() -> None:
    """Object 'a' and object 'a/b': the directory wins, 'a/b' stays reachable."""
    backend = backend_with("a", "a/b", "p", "p/")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    await ns.refresh()
    assert tree(ns.root) == ["a/", "a/b", "p/"]
    assert (await walk(ns, "a")).is_dir
    assert not (await walk(ns, "a/b")).is_dir
    assert ns.file_count == 1


async def test_invalid_names_are_skipped() -> None:
    """Objects whose names cannot be paths are left out, the rest is shown."""
    backend = backend_with("ok.bin", "a//b", "x/../y", "nul\0", "x" * 300)
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    await ns.refresh()
    assert tree(ns.root) == ["ok.bin"]


async def test_lookup_of_missing_name_and_inode_raise_not_found() -> None:
    """Unknown names and inodes are NotFound (ENOENT above)."""
    ns = Namespace(backend_with("a"), ttl=60, retry_deadline=1)
    with pytest.raises(NotFound):
        await ns.lookup(ROOT_INODE, b"missing")
    with pytest.raises(NotFound):
        ns.get(9999)


async def test_inodes_stable_across_refresh_and_overwrite() -> None:
    """Paths keep their inode over refreshes; an overwritten object gets a new inode (the kernel's
    page cache is per inode: old handles must not see the new version's pages), and the old
    inode stays resolvable while the kernel holds it."""
    backend = backend_with("a/b.bin", "c.bin")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    await ns.refresh()
    a = await walk(ns, "a")
    b = await walk(ns, "a/b.bin")
    c = await walk(ns, "c.bin")
    old_version = b.info.version if b.info else None
    b.lookups = 1  # the kernel holds it, e.g. for an open file
    new_version = backend.put("a/b.bin", b"new and longer contents")
    backend.put("d.bin", b"d")
    await ns.refresh(force=True)
    assert (await walk(ns, "a")).inode == a.inode
    b2 = await walk(ns, "a/b.bin")
    assert b2.inode != b.inode
    assert ns.get(b.inode) is b and b.info is not None and b.info.version == old_version
    ns.forget(b.inode, 1)
    with pytest.raises(NotFound):
        ns.get(b.inode)
    assert b2.info is not None and b2.info.version == new_version != old_version
    assert b2.size == len(b"new and longer contents")
    assert (await walk(ns, "c.bin")).inode == c.inode
    d = await walk(ns, "d.bin")
    assert d.inode not in (ROOT_INODE, a.inode, b.inode, c.inode)


async def test_deleted_object_disappears_but_inode_lives_until_forgotten() -> None:
    """A deleted object leaves the tree; its inode stays resolvable until the kernel forgets it."""
    backend = backend_with("a.bin", "b.bin")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    await ns.refresh()
    a = await walk(ns, "a.bin")
    a.lookups = 2
    backend.delete("a.bin")
    await ns.refresh(force=True)
    with pytest.raises(NotFound):
        await ns.lookup(ROOT_INODE, b"a.bin")
    assert ns.get(a.inode) is a  # still referenced by the kernel
    ns.forget(a.inode, 1)
    assert ns.get(a.inode) is a
    ns.forget(a.inode, 1)
    with pytest.raises(NotFound):
        ns.get(a.inode)
    backend.put("a.bin", b"again")
    await ns.refresh(force=True)
    assert (await walk(ns, "a.bin")).inode != a.inode
    ns.forget(ROOT_INODE, 10)
    assert ns.get(ROOT_INODE) is ns.root


async def test_kind_change_gets_a_new_inode() -> None:
    """A path that turns from file into directory is a new inode."""
    backend = backend_with("x")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    await ns.refresh()
    file_node = await walk(ns, "x")
    backend.delete("x")
    backend.put("x/y", b"y")
    await ns.refresh(force=True)
    dir_node = await walk(ns, "x")
    assert dir_node.is_dir and dir_node.inode != file_node.inode


async def test_ttl_no_relisting_before_expiry_and_relisting_after(autojump_clock: trio.testing.MockClock) -> None:
    """Lookups within the TTL use the cached listing; after it, the next lookup relists."""
    backend = backend_with("a")
    ns = Namespace(backend, ttl=10, retry_deadline=1)
    await ns.lookup(ROOT_INODE, b"a")
    assert backend.list_calls == 1
    backend.put("b", b"b")
    await trio.sleep(9)
    for _ in range(5):
        await ns.lookup(ROOT_INODE, b"a")
    assert backend.list_calls == 1
    with pytest.raises(NotFound):
        await ns.lookup(ROOT_INODE, b"b")  # not seen yet
    await trio.sleep(1)
    assert (await ns.lookup(ROOT_INODE, b"b")).size == 1
    assert backend.list_calls == 2


async def test_ttl_minus_one_never_relists(autojump_clock: trio.testing.MockClock) -> None:
    """ttl -1: one listing for the life of the mount (force still relists)."""
    backend = backend_with("a")
    ns = Namespace(backend, ttl=-1, retry_deadline=1)
    await ns.lookup(ROOT_INODE, b"a")
    await trio.sleep(10**6)
    await ns.lookup(ROOT_INODE, b"a")
    await ns.refresh()
    assert backend.list_calls == 1
    await ns.refresh(force=True)
    assert backend.list_calls == 2


async def test_ttl_zero_relists_every_time(autojump_clock: trio.testing.MockClock) -> None:
    """ttl 0: every lookup sees a fresh listing."""
    backend = backend_with("a")
    ns = Namespace(backend, ttl=0, retry_deadline=1)
    for _ in range(3):
        await ns.lookup(ROOT_INODE, b"a")
    assert backend.list_calls == 3


async def test_concurrent_refreshes_list_once(autojump_clock: trio.testing.MockClock) -> None:
    """Many lookups racing on a stale listing cause one listing."""
    backend = backend_with("a")
    ns = Namespace(backend, ttl=10, retry_deadline=1)
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(ns.lookup, ROOT_INODE, b"a")
    assert backend.list_calls == 1


async def test_transient_listing_failure_is_retried(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing that fails transiently is retried; the tree appears."""
    backend = backend_with("a")
    real = backend.list_objects
    failures = 2

    async def flaky() -> list:  # type: ignore[type-arg]
        nonlocal failures
        if failures:
            failures -= 1
            raise TransientError("503")
        return await real()

    monkeypatch.setattr(backend, "list_objects", flaky)
    ns = Namespace(backend, ttl=10, retry_deadline=30)
    assert not (await ns.lookup(ROOT_INODE, b"a")).is_dir
    assert failures == 0


async def test_unreachable_backend_keeps_the_last_listing(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh that fails past the retry deadline keeps the last listing (cached data stays
    reachable) and tries again one TTL later; the first listing still has to succeed."""
    backend = backend_with("a.bin")
    real = backend.list_objects
    down = False
    calls = 0

    async def maybe_down() -> list:  # type: ignore[type-arg]
        nonlocal calls
        calls += 1
        if down:
            raise TransientError("connection refused")
        return await real()

    monkeypatch.setattr(backend, "list_objects", maybe_down)
    ns = Namespace(backend, ttl=10, retry_deadline=2)
    a = await walk(ns, "a.bin")
    down = True
    await trio.sleep(11)
    assert await walk(ns, "a.bin") is a  # served from the last listing, after the retries
    failed_calls = calls
    assert failed_calls > 2
    assert await walk(ns, "a.bin") is a
    assert calls == failed_calls  # no new attempt before another TTL
    down = False
    backend.put("b.bin", b"b")
    await trio.sleep(11)
    assert (await walk(ns, "b.bin")).size == 1
    fresh = Namespace(backend, ttl=10, retry_deadline=2)
    down = True
    with pytest.raises(TransientError):
        await fresh.refresh()
