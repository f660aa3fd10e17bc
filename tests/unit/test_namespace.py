"""The lazy namespace over a MemoryBackend: per-directory listings, lookups by name, stale-while-
revalidate, bounded listing cache, freed nodes."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from modelfs.backends.base import ListPage, ObjectInfo
from modelfs.backends.memory import MemoryBackend
from modelfs.errors import AccessDenied, BackendError, NotFound, TransientError
from modelfs.inodes import ENTRY_BYTES, ROOT_INODE, DirHandle, Listing, Namespace, Node
from modelfs.walk import walk_objects


def backend_with(*names: str) -> MemoryBackend:
    backend = MemoryBackend()
    for name in names:
        backend.put(name, name.encode() * 3 if not name.endswith("/") else b"")
    return backend


async def walk(ns: Namespace, path: str, *, hold: bool = False) -> Node:
    """Look ``path`` up component by component, holding each directory as the kernel does;
    ``hold``: the last component too."""
    node = ns.root
    parts = path.split("/")
    for i, part in enumerate(parts):
        node = await ns.lookup(node.inode, part.encode())
        if hold or i < len(parts) - 1:
            ns.remember(node)
    return node


async def names(ns: Namespace, directory: Node) -> list[str]:
    """What readdir would return, in its order (directories end in '/')."""
    handle = await ns.open_dir(directory)
    out: list[str] = []
    index = 0
    while (entry := await ns.entry(handle, index)) is not None:
        name, node = entry
        out.append(name.decode() + ("/" if node.is_dir else ""))
        index += 1
    return out


async def tree(ns: Namespace, directory: Node, prefix: str = "") -> list[str]:
    """Every path below ``directory``, by listing each directory."""
    out: list[str] = []
    for name in await names(ns, directory):
        out.append(prefix + name)
        if name.endswith("/"):
            child = await ns.lookup(directory.inode, name[:-1].encode())
            ns.remember(child)
            out += await tree(ns, child, prefix + name)
    return out


async def test_tree_from_per_directory_listings() -> None:
    """Nested names become nested directories, each listed on its own; sizes and versions from the listing."""
    backend = backend_with("config.json", "sub/deeper/model.bin", "sub/tok.json", "sub/deeper/x/y.bin")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    await ns.start()
    assert backend.page_calls == 1 and backend.list_calls == 0
    assert await tree(ns, ns.root) == [
        "config.json",
        "sub/",
        "sub/deeper/",
        "sub/deeper/model.bin",
        "sub/deeper/x/",
        "sub/deeper/x/y.bin",
        "sub/tok.json",
    ]
    assert backend.page_calls == 4  # one page per directory, never the whole tree
    model = await walk(ns, "sub/deeper/model.bin")
    assert not model.is_dir and model.path == "sub/deeper/model.bin"
    assert model.size == len(b"sub/deeper/model.bin") * 3
    assert model.info is not None and model.info.version == str(backend.objects["sub/deeper/model.bin"].version)
    assert ns.file_count == 4
    assert ns.total_bytes == sum(len(o.data) for o in backend.objects.values())
    sub = await walk(ns, "sub")
    assert sub.is_dir and (await ns.lookup(sub.inode, b"..")) is ns.root
    ns.remember(sub)
    deeper = await ns.lookup(sub.inode, b"deeper")
    ns.remember(deeper)
    assert await ns.lookup(deeper.inode, b"..") is sub
    assert await ns.lookup(deeper.inode, b".") is deeper
    assert await ns.lookup(ROOT_INODE, b"..") is ns.root
    assert backend.stat_calls == 0 and backend.probe_calls == 0


async def test_placeholder_directory_objects() -> None:
    """A 'dir/' object is an (empty) directory; a placeholder next to real children merges."""
    backend = backend_with("empty/", "withplace/", "withplace/file.txt")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    assert await tree(ns, ns.root) == ["empty/", "withplace/", "withplace/file.txt"]
    empty = await walk(ns, "empty")
    assert empty.is_dir and await names(ns, empty) == []
    fresh = Namespace(backend, ttl=60, retry_deadline=1)
    assert (await walk(fresh, "empty")).is_dir  # found by name: the placeholder answers the probe


async def test_object_beside_directory_of_same_name_is_hidden() -> None:
    """Object 'a' and object 'a/b': the directory wins, 'a/b' stays reachable (listed or looked up)."""
    backend = backend_with("a", "a/b", "p", "p/")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    assert await tree(ns, ns.root) == ["a/", "a/b", "p/"]
    assert (await walk(ns, "a")).is_dir
    assert not (await walk(ns, "a/b")).is_dir
    assert ns.file_count == 1
    fresh = Namespace(backend, ttl=60, retry_deadline=1)
    assert (await walk(fresh, "a")).is_dir and (await walk(fresh, "p")).is_dir
    assert not (await walk(fresh, "a/b")).is_dir


async def test_object_beside_directory_across_pages() -> None:
    """'a' on one page and 'a/' on the next: one entry, the directory (a readdir that got to
    'a' before the next page came shows what it knew then)."""
    backend = backend_with("a", "a/b")
    backend.page_size = 1
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    await tree(ns, ns.root)
    assert await tree(ns, ns.root) == ["a/", "a/b"]
    assert (await walk(ns, "a")).is_dir


async def test_invalid_names_are_skipped() -> None:
    """Objects whose names cannot be paths are left out, the rest is shown (a directory that
    holds only such names is shown empty: it is not listed before it is opened)."""
    backend = backend_with("ok.bin", "a//b", "x/../y", "nul\0", "x" * 300)
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    assert await tree(ns, ns.root) == ["a/", "ok.bin", "x/"]
    fresh = Namespace(backend, ttl=60, retry_deadline=1)
    for bad in (b"x" * 300, b"nul\0", b"a/b", b"\xff"):
        with pytest.raises(NotFound):
            await fresh.lookup(ROOT_INODE, bad)


async def test_lookup_of_missing_name_and_inode_raise_not_found() -> None:
    """Unknown names and inodes are NotFound (ENOENT above), listed or not."""
    ns = Namespace(backend_with("a"), ttl=60, retry_deadline=1)
    with pytest.raises(NotFound):
        await ns.lookup(ROOT_INODE, b"missing")
    await ns.start()
    with pytest.raises(NotFound):
        await ns.lookup(ROOT_INODE, b"missing")
    with pytest.raises(NotFound):
        ns.get(9999)


async def test_unknown_name_costs_one_metadata_request_not_a_listing() -> None:
    """In a directory never listed, a lookup asks for that name: one stat and one one-result probe."""
    backend = backend_with(*(f"d{i}/f{j}.bin" for i in range(20) for j in range(20)), "top.bin")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    with pytest.raises(NotFound):
        await ns.lookup(ROOT_INODE, b"nothing-here")
    assert (backend.stat_calls, backend.probe_calls, backend.page_calls, backend.list_calls) == (1, 1, 0, 0)
    top = await ns.lookup(ROOT_INODE, b"top.bin")
    assert not top.is_dir and top.size == len(b"top.bin") * 3
    d7 = await walk(ns, "d7", hold=True)
    f3 = await ns.lookup(d7.inode, b"f3.bin")
    assert d7.is_dir and f3.path == "d7/f3.bin"
    assert backend.page_calls == 0 and backend.list_calls == 0
    assert backend.stat_calls == 4 and backend.probe_calls == 4
    assert await ns.lookup(ROOT_INODE, b"top.bin") is top  # within the TTL: no new request
    assert backend.stat_calls == 4
    with pytest.raises(NotFound):  # a miss is remembered for the TTL too
        await ns.lookup(ROOT_INODE, b"nothing-here")
    assert backend.stat_calls == 4 and backend.probe_calls == 4


async def test_name_lookup_then_listing_keeps_the_inode() -> None:
    """A node found by name is the node the directory's listing shows later (same inode)."""
    backend = backend_with("a/x.bin", "a/y.bin")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    a = await walk(ns, "a", hold=True)
    x = await ns.lookup(a.inode, b"x.bin")
    ns.remember(x)
    assert await names(ns, a) == ["x.bin", "y.bin"]
    assert await ns.lookup(a.inode, b"x.bin") is x
    assert await walk(ns, "a") is a  # the root's listing adopted the looked-up directory


async def test_inodes_stable_across_refresh_and_overwrite() -> None:
    """Paths keep their inode over refreshes; an overwritten object gets a new inode (the kernel's
    page cache is per inode: old handles must not see the new version's pages), and the old
    inode stays resolvable while the kernel holds it."""
    backend = backend_with("a/b.bin", "c.bin")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    await tree(ns, ns.root)
    a = await walk(ns, "a", hold=True)
    b = await ns.lookup(a.inode, b"b.bin")
    ns.remember(b)  # the kernel holds it, e.g. for an open file
    c = await walk(ns, "c.bin")
    old_version = b.info.version if b.info else None
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
    await ns.start()
    a = await walk(ns, "a.bin", hold=True)
    ns.remember(a)
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
    await ns.start()
    file_node = await walk(ns, "x")
    backend.delete("x")
    backend.put("x/y", b"y")
    await ns.refresh(force=True)
    dir_node = await walk(ns, "x")
    assert dir_node.is_dir and dir_node.inode != file_node.inode


async def test_forgotten_nodes_are_freed() -> None:
    """Nodes found by name and then forgotten leave nothing behind; a listing's nodes go with
    the listing once the kernel holds none of them."""
    backend = backend_with(*(f"d{i}/f{j}" for i in range(5) for j in range(5)))
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    held: list[Node] = []
    for i in range(5):
        d = await walk(ns, f"d{i}", hold=True)
        f = await ns.lookup(d.inode, b"f1")
        ns.remember(f)
        held += [d, f]
    assert ns.inodes == 11
    for node in held:
        ns.forget(node.inode, 1)
    assert ns.inodes == 1 and ns.root.extra is None
    assert all(node.extra is None for node in held if node.is_dir)
    # Listed directories: the listing holds its nodes while cached; a tiny cache drops them.
    small = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=12 * ENTRY_BYTES)
    for i in range(5):
        d = await walk(small, f"d{i}", hold=True)
        await names(small, d)
        small.forget(d.inode, 1)
    assert small.metadata_bytes <= small.metadata_capacity
    assert small.cached_dirs < 6 and small.inodes == 1


async def test_evicted_listing_keeps_held_nodes_findable() -> None:
    """When a listing is evicted, nodes the kernel still holds keep their inode on the next lookup."""
    backend = backend_with("a/x", "a/y", "b/x", "b/y", "c/x")
    ns = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=5 * ENTRY_BYTES)
    a = await walk(ns, "a", hold=True)
    await names(ns, a)
    x = await ns.lookup(a.inode, b"x")
    ns.remember(x)
    for other in ("b", "c"):
        await names(ns, await walk(ns, other, hold=True))
    assert a.listing is None  # evicted (least recently used)
    assert await ns.lookup(a.inode, b"x") is x
    assert await names(ns, a) == ["x", "y"]
    assert await ns.lookup(a.inode, b"x") is x


async def test_readdir_of_a_large_directory_page_by_page() -> None:
    """A directory of many entries is read page by page as readdir gets to them, in order, once."""
    backend = MemoryBackend(page_size=100)
    expected = [f"f{i:05d}" for i in range(1000)] + [f"sub{i}/" for i in range(5)]
    for name in expected:
        backend.put(name + ("x" if name.endswith("/") else ""), b"z")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    handle = await ns.open_dir(ns.root)
    listing = handle.listing
    assert backend.page_calls == 1 and len(listing.names) == 100
    first = await ns.entry(handle, 99)
    assert first is not None and first[0] == b"f00099" and backend.page_calls == 1
    second = await ns.entry(handle, 100)
    assert second is not None and second[0] == b"f00100" and backend.page_calls == 2
    assert await names(ns, ns.root) == expected
    assert backend.page_calls == 11
    assert len(listing.names) == len(listing.by_name) == len(expected)
    assert ns.file_count == 1000
    again = await ns.open_listing(ns.root)
    assert again is listing and backend.page_calls == 11  # cached, within the TTL


async def test_directory_larger_than_the_cache_is_still_listed() -> None:
    """A listing over the whole cache is read through its handle but not cached; lookups ask by name."""
    backend = MemoryBackend(page_size=10)
    for i in range(50):
        backend.put(f"f{i:02d}", b"z")
    ns = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=20 * ENTRY_BYTES)
    handle = await ns.open_dir(ns.root)
    seen = []
    index = 0
    while (entry := await ns.entry(handle, index)) is not None:
        seen.append(entry[0].decode())
        assert len(handle.listing.names) <= 20  # past the cache's size, only the page ahead of readdir is held
        index += 1
    assert seen == [f"f{i:02d}" for i in range(50)] and backend.page_calls == 5
    assert ns.metadata_bytes <= ns.metadata_capacity and ns.root.listing is None
    rewound = await ns.entry(handle, 0)  # rewinddir: listed again from the start
    assert rewound is not None and rewound[0] == b"f00" and backend.page_calls == 6
    assert not (await ns.lookup(ROOT_INODE, b"f42")).is_dir
    assert backend.stat_calls == 1


async def test_handles_sharing_a_listing_that_turns_streaming_each_read_every_name_once() -> None:
    """Two opendirs share the cached listing; when it grows past the cache, each reads on in a
    copy of its own: a fast and a slow reader (and one that rewinds) see every name once, in order."""
    backend = MemoryBackend(page_size=10)
    expected = [f"f{i:02d}" for i in range(50)]
    for name in expected:
        backend.put(name, b"z")
    ns = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=20 * ENTRY_BYTES)
    fast, slow, rewinding = [await ns.open_dir(ns.root) for _ in range(3)]
    assert fast.listing is slow.listing is rewinding.listing  # one cached listing, read by three handles
    seen: dict[int, list[str]] = {id(fast): [], id(slow): [], id(rewinding): []}

    async def step(handle: DirHandle) -> bool:
        got = seen[id(handle)]
        entry = await ns.entry(handle, len(got))
        if entry is not None:
            got.append(entry[0].decode())
        return entry is not None

    rewound = False
    while True:
        more = [await step(fast) for _ in range(3)] + [await step(slow)]
        if len(seen[id(rewinding)]) == 25 and not rewound:
            seen[id(rewinding)].clear()  # rewinddir half way
            rewound = True
        more.append(await step(rewinding))
        for handle in (fast, slow, rewinding):
            assert len(handle.listing.names) <= 30  # bounded: at most the shared listing's size
        if not any(more):
            break
    assert seen[id(fast)] == seen[id(slow)] == seen[id(rewinding)] == expected
    assert backend.page_calls < 20  # each handle lists the rest once (no re-listing from page 1)
    assert ns.metadata_bytes <= ns.metadata_capacity


async def test_lookup_after_the_ttl_does_not_wait_for_a_listing(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Past the TTL a lookup answers from the cached listing at once, while the directory is
    listed again behind it (the listing here blocks until the test lets it go)."""
    backend = backend_with("a", "b")
    ns = Namespace(backend, ttl=10, retry_deadline=30)
    await nursery.start(ns.run)
    await ns.start()
    a = await ns.lookup(ROOT_INODE, b"a")
    backend.put("c", b"c")
    backend.delete("b")
    await trio.sleep(11)
    backend.list_gate = trio.Event()
    with trio.fail_after(0.5):  # virtual time: a lookup that waited for the gate would time out
        for _ in range(20):
            assert await ns.lookup(ROOT_INODE, b"a") is a
        assert (await ns.lookup(ROOT_INODE, b"b")).size == 3  # stale, but answered at once
        with pytest.raises(NotFound):
            await ns.lookup(ROOT_INODE, b"c")
        listing = await ns.open_listing(ns.root)
        assert [n for n in listing.names] == [b"a", b"b"]
    await trio.sleep(1)
    assert backend.page_calls == 2  # one refresh for all those stale lookups
    assert ns.stale_served >= 20
    backend.list_gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert ns.refreshes == 1
    assert (await ns.lookup(ROOT_INODE, b"c")).size == 1
    with pytest.raises(NotFound):
        await ns.lookup(ROOT_INODE, b"b")
    assert await ns.lookup(ROOT_INODE, b"a") is a  # same version: same inode
    assert [n for n in listing.names] == [b"a", b"b"]  # an open handle keeps its listing


async def test_stale_name_lookup_is_served_and_checked_by_itself(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A name found by lookup (directory never listed) is served stale too, and asked for again
    by itself behind the answer (metadata and a one-result probe), never by listing the directory."""
    backend = backend_with("d/a", "d/b")
    ns = Namespace(backend, ttl=10, retry_deadline=30)
    await nursery.start(ns.run)
    d = await walk(ns, "d", hold=True)
    a = await ns.lookup(d.inode, b"a")
    ns.remember(a)
    pages, stats = backend.page_calls, backend.stat_calls
    await trio.sleep(11)
    with trio.fail_after(0.5):
        for _ in range(5):
            assert await ns.lookup(d.inode, b"a") is a
    await trio.testing.wait_all_tasks_blocked()
    assert backend.page_calls == pages and backend.stat_calls == stats + 1  # one check for the five
    assert d.listing is None and ns.valid_for(a) == 10  # confirmed: fresh again
    backend.delete("d/a")
    await trio.sleep(11)
    assert await ns.lookup(d.inode, b"a") is a  # stale, served; the check finds it gone
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(NotFound):
        await ns.lookup(d.inode, b"a")
    assert backend.page_calls == pages


async def test_stale_name_in_a_directory_larger_than_the_cache_lists_nothing(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Every TTL the kernel asks again for a name in a huge directory: two small requests each
    time, never a listing of the directory."""
    backend = MemoryBackend(page_size=100)
    for i in range(2000):
        backend.put(f"shards/s{i:05d}", b"z")
    ns = Namespace(backend, ttl=10, retry_deadline=30, cache_bytes=100 * ENTRY_BYTES)
    await nursery.start(ns.run)
    node = await walk(ns, "shards/s00001", hold=True)
    shards = node.parent
    assert shards is not None
    pages = backend.page_calls
    for _ in range(3):
        await trio.sleep(11)
        assert await ns.lookup(shards.inode, b"s00001") is node
        await trio.testing.wait_all_tasks_blocked()
    assert backend.page_calls == pages and shards.listing is None
    assert ns.metadata_bytes <= ns.metadata_capacity


async def test_refresh_of_a_listing_grown_past_the_cache_stops_there(autojump_clock: trio.testing.MockClock) -> None:
    """A cached directory that grew past the whole cache: its refresh stops at the page that
    outgrows the cache (never the whole directory in memory), drops the listing, and from then
    on its names are looked up one by one, not listed again every TTL."""
    backend = MemoryBackend(page_size=100)
    for i in range(10):
        backend.put(f"f{i:05d}", b"z")
    cap = 50 * ENTRY_BYTES
    ns = Namespace(backend, ttl=1, retry_deadline=1, cache_bytes=cap)
    await ns.start()
    assert ns.root.listing is not None and ns.root.listing.complete
    held = await walk(ns, "f00001", hold=True)
    for i in range(10, 5000):
        backend.put(f"f{i:05d}", b"z")
    peak = 0
    add_page = ns._add_page

    def measured(listing: Listing, page: ListPage, previous: Listing | None) -> None:
        nonlocal peak
        add_page(listing, page, previous)
        peak = max(peak, listing.cost)

    ns._add_page = measured  # type: ignore[method-assign]
    pages = backend.page_calls
    await trio.sleep(2)
    assert await walk(ns, "f00001") is held  # stale: refreshed inline (no nursery)
    assert peak <= cap + 100 * (ENTRY_BYTES + 2 * len("f00001"))  # the cache plus one page
    assert backend.page_calls == pages + 1 and ns.root.listing is None
    for _ in range(3):
        await trio.sleep(2)
        assert await walk(ns, "f00001") is held  # asked for by name
        assert (await walk(ns, "f04999")).size == 1
    assert backend.page_calls == pages + 1
    assert ns.metadata_bytes <= ns.metadata_capacity


async def test_outage_serves_stale_without_waiting_for_the_retry_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """With the backend down, stale listings answer at once; the failed refresh keeps them and
    tries again a TTL later; a directory never listed fails (after the retries)."""
    backend = backend_with("a.bin", "sub/x.bin", "other/y.bin")
    down = False

    def outage(op: str, name: str) -> None:
        if down:
            raise TransientError("connection refused")

    backend.meta_fault = outage
    ns = Namespace(backend, ttl=10, retry_deadline=30)
    await nursery.start(ns.run)
    await ns.start()
    a = await walk(ns, "a.bin")
    sub = await walk(ns, "sub", hold=True)
    await names(ns, sub)
    down = True
    await trio.sleep(11)
    with trio.fail_after(1):  # far below the 30 s retry deadline
        assert await walk(ns, "a.bin") is a
        assert await names(ns, sub) == ["x.bin"]
    await trio.sleep(70)  # the background refreshes give up (one after the other: 2 x 30 s)
    assert ns.refresh_failures == 2
    with trio.fail_after(1):
        assert await walk(ns, "a.bin") is a
    other = await ns.lookup(ROOT_INODE, b"other")
    ns.remember(other)
    with pytest.raises(TransientError):
        await ns.open_listing(other)  # never listed: nothing to serve
    down = False
    backend.put("b.bin", b"b")
    await trio.sleep(11)
    await walk(ns, "a.bin")  # stale: starts a refresh
    await trio.testing.wait_all_tasks_blocked()
    assert (await walk(ns, "b.bin")).size == 1


async def test_ttl_minus_one_never_relists(autojump_clock: trio.testing.MockClock) -> None:
    """ttl -1: one listing per directory for the life of the mount (force still relists)."""
    backend = backend_with("a")
    ns = Namespace(backend, ttl=-1, retry_deadline=1)
    await ns.start()
    await ns.lookup(ROOT_INODE, b"a")
    await trio.sleep(10**6)
    await ns.lookup(ROOT_INODE, b"a")
    await ns.open_listing(ns.root)
    assert backend.page_calls == 1
    await ns.refresh(force=True)
    assert backend.page_calls == 2


async def test_ttl_zero_without_a_nursery_relists_inline(autojump_clock: trio.testing.MockClock) -> None:
    """ttl 0 and no background nursery: every lookup sees a fresh listing."""
    backend = backend_with("a")
    ns = Namespace(backend, ttl=0, retry_deadline=1)
    await ns.start()
    for _ in range(3):
        await ns.lookup(ROOT_INODE, b"a")
    assert backend.page_calls == 4


async def test_transient_listing_failure_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    """A first listing that fails transiently is retried; the tree appears."""
    backend = backend_with("a")
    failures = 2

    def flaky(op: str, name: str) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise TransientError("503")

    backend.meta_fault = flaky
    ns = Namespace(backend, ttl=10, retry_deadline=30)
    await ns.start()
    assert not (await ns.lookup(ROOT_INODE, b"a")).is_dir
    assert failures == 0


async def test_start_gives_up_at_its_own_deadline(autojump_clock: trio.testing.MockClock) -> None:
    """An unreachable source fails start() once the deadline it was given has passed (the mount
    passes a short one), not after the retry deadline of a running mount's reads; the failure is
    the source's own error."""
    backend = backend_with("a")
    attempts = 0

    def down(op: str, name: str) -> None:
        nonlocal attempts
        attempts += 1
        raise TransientError("connection refused")

    backend.meta_fault = down
    ns = Namespace(backend, ttl=10, retry_deadline=60)
    started = trio.current_time()
    with pytest.raises(TransientError, match="connection refused"):
        await ns.start(deadline=10)
    assert attempts > 1  # retried, and ...
    assert trio.current_time() - started <= 10  # ... given up within the start deadline (virtual clock)
    attempts = 0
    with pytest.raises(TransientError):
        await ns.start()  # without one: the retry deadline
    assert trio.current_time() - started > 30


async def test_start_says_found_when_the_first_page_is_larger_than_the_cache() -> None:
    """A root whose first page does not fit --metadata-cache is not kept, but it was found (the
    mount must not say "nothing found"); an empty root is not."""
    backend = MemoryBackend()
    for i in range(200):
        backend.put(f"f{i:03d}", b"z")
    ns = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=100 * ENTRY_BYTES)
    assert await ns.start() is True
    assert ns.root.listing is None and not ns.root.children  # not cached: what the old check looked at
    assert await Namespace(backend_with("only/"), ttl=60, retry_deadline=1).start() is True
    assert await Namespace(MemoryBackend(), ttl=60, retry_deadline=1).start() is False


class EndlessTokens(MemoryBackend):
    """A store whose continuation tokens never end: ``style`` 'same' repeats the token it was
    sent, 'cycle' goes round three tokens, 'empty' sends fresh tokens with empty pages."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style

    async def list_dir(self, prefix: str, token: str | None = None, *, limit: int | None = None) -> ListPage:
        page = await super().list_dir(prefix, None, limit=limit)
        assert self.page_calls < 5000, "the listing would never end"
        if limit is not None:
            return page
        if self.style == "same":
            return ListPage(page.objects, page.prefixes, token or "again")
        if self.style == "cycle":
            return ListPage(page.objects, page.prefixes, f"t{self.page_calls % 3}")
        if token is None:
            return ListPage(page.objects, page.prefixes, "t0")
        return ListPage([], [], f"t{self.page_calls}")


@pytest.mark.parametrize("style", ["same", "cycle", "empty"])
async def test_a_listing_whose_tokens_never_end_is_an_error(style: str) -> None:
    """readdir and a walk (warm, --eager-model) of such a directory end with one BackendError
    (EIO), never list forever."""
    backend = EndlessTokens(style)
    backend.put("a", b"x")
    backend.put("b", b"y")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    with pytest.raises(BackendError, match="a listing without end"):
        await names(ns, ns.root)
    with pytest.raises(BackendError, match="a listing without end"):
        async for _ in walk_objects(backend, retry_deadline=1):
            pass


class Lying(MemoryBackend):
    """A store that lists 'x/evil' in every listing of 'a/', and answers the metadata of 'a/alias'
    with that of 'x/evil'."""

    async def list_dir(self, prefix: str, token: str | None = None, *, limit: int | None = None) -> ListPage:
        page = await super().list_dir(prefix, token, limit=limit)
        if prefix == "a/" and limit is None:
            evil = self._info("x/evil", self.objects["x/evil"])
            return ListPage([*page.objects, evil], [*page.prefixes, "x/sub/"], page.next_token)
        return page

    async def stat(self, name: str) -> ObjectInfo:
        return await super().stat("x/evil" if name == "a/alias" else name)


async def test_names_a_listing_puts_outside_its_directory_are_not_shown(caplog: pytest.LogCaptureFixture) -> None:
    """An object or prefix listed in the wrong directory is left out (with a warning), never
    shown there reading the other object's bytes; so is metadata answered for another name."""
    backend = Lying()
    backend.put("a/ok", b"ok")
    backend.put("x/evil", b"EVIL")
    backend.put("x/sub/y", b"y")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    a = await walk(ns, "a", hold=True)
    assert await names(ns, a) == ["ok"]
    assert "'x/evil' is not shown: listed in 'a/', outside it" in caplog.text
    fresh = Namespace(backend, ttl=60, retry_deadline=1)
    a = await walk(fresh, "a", hold=True)
    with pytest.raises(NotFound):
        await fresh.lookup(a.inode, b"alias")


class HostileSizes(MemoryBackend):
    """Reports the size of 'neg' as -5 and of 'huge' as 2**63, in listings and metadata."""

    def _info(self, name: str, stored: Any) -> ObjectInfo:
        info = super()._info(name, stored)
        size = {"neg": -5, "huge": 1 << 63}.get(name, info.size)
        return ObjectInfo(info.name, size, info.mtime, info.version)


async def test_objects_whose_size_cannot_be_a_file_size_are_not_shown() -> None:
    """A negative size or one of 2**63 and more (st_size overflows) is skipped with a warning:
    the rest of the directory lists; a lookup of it is ENOENT, never an OverflowError."""
    backend = HostileSizes()
    for name in ("neg", "huge", "ok"):
        backend.put(name, b"x")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    assert await names(ns, ns.root) == ["ok"]
    fresh = Namespace(backend, ttl=60, retry_deadline=1)
    for name in (b"neg", b"huge"):
        with pytest.raises(NotFound):
            await fresh.lookup(ROOT_INODE, name)


class EmptyFirstPages(MemoryBackend):
    """Answers every listing's first ``empty`` pages empty, with a token (as GCS may)."""

    def __init__(self, empty: int) -> None:
        super().__init__()
        self.empty = empty

    async def list_dir(self, prefix: str, token: str | None = None, *, limit: int | None = None) -> ListPage:
        skipped = int(token[1:]) if token is not None and token.startswith("~") else 0
        if skipped < self.empty:
            await super().list_dir(prefix, None, limit=limit)  # counted as asked
            return ListPage([], [], f"~{skipped + 1}")
        return await super().list_dir(prefix, None, limit=limit)


@pytest.mark.parametrize("empty", [1, 7])
async def test_a_name_lookup_follows_empty_probe_pages(empty: int) -> None:
    """An existing directory whose probe is first answered empty with a token is a directory
    (the probe follows the token a few times), not ENOENT."""
    backend = EmptyFirstPages(empty)
    backend.put("d/x", b"x")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    assert (await ns.lookup(ROOT_INODE, b"d")).is_dir
    assert backend.probe_calls == empty + 1
    with pytest.raises(NotFound):
        await ns.lookup(ROOT_INODE, b"nothing")


async def test_missing_root_fails_start() -> None:
    """A missing bucket or root (NotFound from the first page) fails start()."""
    backend = backend_with("a")

    def missing(op: str, name: str) -> None:
        raise NotFound("memory://: bucket 'x' not found")

    backend.meta_fault = missing
    with pytest.raises(NotFound):
        await Namespace(backend, ttl=10, retry_deadline=1).start()


async def test_walk_streams_every_file_page_by_page() -> None:
    """walk_objects yields each file once (no placeholders, no bad names), across pages and depths."""
    backend = backend_with("a.bin", "d/", "d/e/f.bin", "d/g.bin", "x//y", "z/1", "z/2", "z/3")
    backend.page_size = 2
    found = [info.name async for info in walk_objects(backend, retry_deadline=1)]
    assert sorted(found) == ["a.bin", "d/e/f.bin", "d/g.bin", "z/1", "z/2", "z/3"]
    assert backend.list_calls == 0


async def test_name_lookup_failures_raise_themselves(autojump_clock: trio.testing.MockClock) -> None:
    """A lookup by name that fails raises the backend's error itself (mapped to an errno above),
    not an exception group: EACCES for a refusal, EIO after the retries for an outage."""
    backend = backend_with("a")
    kind: type[Exception] = AccessDenied

    def refuse(op: str, name: str) -> None:
        raise kind(f"{name}: no")

    backend.meta_fault = refuse
    ns = Namespace(backend, ttl=10, retry_deadline=5)
    with pytest.raises(AccessDenied):
        await ns.lookup(ROOT_INODE, b"a")
    kind = TransientError
    with pytest.raises(TransientError):
        await ns.lookup(ROOT_INODE, b"a")


async def test_one_refresh_at_a_time(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    """Each refresh builds a listing of up to the whole cache beside the cached ones: stale
    directories are listed again one after another, never all at once (the memory bound
    counts one); stale answers are served meanwhile."""
    backend = backend_with("d1/a", "d2/b", "d3/c")
    ns = Namespace(backend, ttl=10, retry_deadline=30)
    await nursery.start(ns.run)
    await ns.start()
    dirs = [await ns.lookup(ROOT_INODE, name) for name in (b"d1", b"d2", b"d3")]
    for d in dirs:
        ns.remember(d)
        await ns.open_listing(d)
    await trio.sleep(11)
    backend.list_gate = trio.Event()
    calls = backend.page_calls
    for d, name in zip(dirs, (b"a", b"b", b"c"), strict=True):
        assert (await ns.lookup(d.inode, name)).size == 12  # stale, answered at once
    await trio.testing.wait_all_tasks_blocked()
    assert backend.page_calls == calls + 1  # one listing waits at the gate; the others queue
    backend.list_gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert ns.refreshes == 3 and backend.page_calls == calls + 3
