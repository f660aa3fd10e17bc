"""Directory handles over a listing larger than the metadata cache: what each holds, and that
each reads every name once, in order."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from modelfs.backends.base import ListPage
from modelfs.backends.memory import MemoryBackend
from modelfs.errors import BackendError
from modelfs.inodes import ENTRY_BYTES, DirHandle, Namespace


async def read_on(ns: Namespace, handle: DirHandle, got: list[str]) -> None:
    while (entry := await ns.entry(handle, len(got))) is not None:
        got.append(entry[0].decode())


async def test_handles_of_a_frozen_listing_share_it_and_hold_one_page_each() -> None:
    """When a shared listing turns streaming, the handles that have not passed it read its
    names from it (no copy each) and hold one page of their own beyond it; the frozen listing
    is never extended, and a handle lets go of it once past its end."""
    backend = MemoryBackend(page_size=10)
    expected = [f"f{i:03d}" for i in range(100)]
    for name in expected:
        backend.put(name, b"z")
    ns = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=20 * ENTRY_BYTES)
    handles = [await ns.open_dir(ns.root) for _ in range(20)]
    shared = handles[0].listing
    assert all(handle.listing is shared for handle in handles)
    seen: list[list[str]] = [[] for _ in handles]
    while not shared.streaming:
        entry = await ns.entry(handles[0], len(seen[0]))
        assert entry is not None
        seen[0].append(entry[0].decode())
    frozen_names = len(shared.names)
    assert frozen_names > 10
    for handle, got in zip(handles[1:], seen[1:], strict=True):
        entry = await ns.entry(handle, 0)
        assert entry is not None
        got.append(entry[0].decode())
        assert handle.private and handle.frozen is shared
        assert len(handle.listing.names) == 0  # nothing copied: names below the frozen end are read from it
    for i, (handle, got) in enumerate(zip(handles, seen, strict=True)):
        while (entry := await ns.entry(handle, len(got))) is not None:
            got.append(entry[0].decode())
            assert len(handle.listing.names) <= 10  # one page of its own at most
            if len(got) > frozen_names:
                assert handle.frozen is None  # past the frozen end: let go of it
        assert got == expected, i
    assert len(shared.names) == frozen_names  # nobody extended the frozen listing


async def test_a_replaced_unfinished_listing_turns_streaming_past_the_cache() -> None:
    """A big directory's first listing is evicted by another's, and a second opendir caches a
    newer listing of it: the first handle's listing can never be cached again, yet it must not
    grow to the whole directory — past the cache's size it streams like any other."""
    backend = MemoryBackend(page_size=10)
    for i in range(500):
        backend.put(f"big/f{i:03d}", b"z")
    for i in range(15):
        backend.put(f"other/g{i:02d}", b"z")
    ns = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=20 * ENTRY_BYTES)
    await ns.start()
    big = await ns.lookup(1, b"big")
    ns.remember(big)
    other = await ns.lookup(1, b"other")
    ns.remember(other)
    first = await ns.open_dir(big)
    await read_on(ns, await ns.open_dir(other), [])  # its listing evicts big's
    assert big.listing is None
    second = await ns.open_dir(big)
    assert big.listing is second.listing is not first.listing
    got: list[str] = []
    while (entry := await ns.entry(first, len(got))) is not None:
        got.append(entry[0].decode())
        assert len(first.listing.names) <= 30  # the cache's 20 names plus a page, never the directory
    assert got == [f"f{i:03d}" for i in range(500)]
    assert first.private
    rest: list[str] = []
    await read_on(ns, second, rest)
    assert rest == got


async def test_a_file_and_a_directory_of_one_name_on_different_pages_are_listed_once() -> None:
    """'a' (a file) and 'a/' (objects below) sort apart: 'a.00'... lie between them, so they can
    fall on different pages. A handle reading page by page lets go of the page with 'a' before
    'a/' arrives; it must still list the name once, wherever the pages and the frozen listing's
    end fall (here: every position of 'a' across the first pages)."""
    for lead in range(45):
        backend = MemoryBackend(page_size=10)
        for i in range(lead):
            backend.put(f"0{i:02d}", b"z")
        backend.put("a", b"file")
        for i in range(7):
            backend.put(f"a.{i:02d}", b"z")  # sort between 'a' and 'a/'
        backend.put("a/x", b"below")
        for i in range(30):
            backend.put(f"b{i:02d}", b"z")
        ns = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=20 * ENTRY_BYTES)
        first, second = await ns.open_dir(ns.root), await ns.open_dir(ns.root)
        got: list[str] = []
        await read_on(ns, first, got)
        expected = [f"0{i:02d}" for i in range(lead)] + ["a"] + [f"a.{i:02d}" for i in range(7)]
        expected += [f"b{i:02d}" for i in range(30)]
        assert got == expected, lead
        again: list[str] = []
        await read_on(ns, second, again)  # goes private at its start: reads the frozen listing first
        assert again == expected, lead
        assert first.listing.passed is not None and len(first.listing.passed) <= 10  # forgotten once passed


async def test_a_held_node_keeps_its_inode_when_its_listing_outgrows_the_cache() -> None:
    """A listing that turns streaming is no longer cached: the nodes the kernel holds in it stay
    findable by name with their inodes (before: a new node, the kernel's page cache lost)."""
    backend = MemoryBackend(page_size=10)
    for i in range(500):
        backend.put(f"f{i:03d}", b"z")
    ns = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=20 * ENTRY_BYTES)
    h = await ns.open_dir(ns.root)
    x = await ns.lookup(1, b"f003")
    ns.remember(x)  # the kernel holds it (an open file, a cwd...)
    got = 0
    while await ns.entry(h, got) is not None:
        got += 1
    y = await ns.lookup(1, b"f003")
    assert y is x


async def test_a_held_node_keeps_its_inode_when_a_stale_unfinished_listing_is_replaced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A new listing replacing an unfinished one reuses the held nodes on its later pages too."""
    backend = MemoryBackend(page_size=10)
    for i in range(100):
        backend.put(f"f{i:03d}", b"z")
    ns = Namespace(backend, ttl=1, retry_deadline=1)
    h = await ns.open_dir(ns.root)
    for i in range(25):
        await ns.entry(h, i)  # three pages read
    x = await ns.lookup(1, b"f023")
    ns.remember(x)
    await trio.sleep(2)
    h2 = await ns.open_dir(ns.root)  # stale and unfinished: a new listing
    got = 0
    while await ns.entry(h2, got) is not None:
        got += 1
    y = await ns.lookup(1, b"f023")
    assert y is x


async def test_a_file_waiting_for_its_directory_is_not_forgotten_behind_thousands_of_others() -> None:
    """'a', then 5,000 files 'a.NNNN' (each 'a.NNNN/' already passed: forgotten at once), then
    'a/': the file 'a' is listed once (before: only names at the front were forgotten, so the
    5,000 filled the memory of passed names and pushed 'a' out; 'a' was listed twice)."""
    backend = MemoryBackend(page_size=100)
    backend.put("a", b"file")
    for i in range(5000):
        backend.put(f"a.{i:04d}", b"z")
    backend.put("a/x", b"below")
    ns = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=20 * ENTRY_BYTES)
    h = await ns.open_dir(ns.root)
    got: list[bytes] = []
    while (e := await ns.entry(h, len(got))) is not None:
        got.append(e[0])
    assert got.count(b"a") == 1 and len(got) == 5001


async def test_a_store_whose_pages_go_back_ends_a_handles_own_listing_with_an_error() -> None:
    """A directory larger than the cache, from a store that goes back to its first page with
    a token never sent before (a proxy losing its place): the handle's own listing forgets
    the names it passed, so only the order can tell; readdir fails with one error instead of
    listing for ever."""
    counter = itertools.count()

    class GoingBack(MemoryBackend):
        async def list_dir(self, prefix: str, token: str | None = None, *, limit: int | None = None) -> ListPage:
            real = token.split("#")[0] or None if token is not None else None
            page = await super().list_dir(prefix, real, limit=limit)
            if limit is not None or page.next_token is None:
                return page
            again = "" if page.next_token >= "f5000" else page.next_token  # past f5000: back to the start
            return ListPage(page.objects, page.prefixes, f"{again}#{next(counter)}")

    backend = GoingBack(page_size=100)
    for i in range(6000):
        backend.put(f"f{i:04d}", b"z")
    ns = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=200 * ENTRY_BYTES)
    h = await ns.open_dir(ns.root)
    got = 0
    with pytest.raises(BackendError, match="went back"):
        while await ns.entry(h, got) is not None and got < 50_000:
            got += 1
    assert h.private and got <= 5100


async def test_a_lookup_during_an_unfinished_listing_finds_the_directory_that_wins() -> None:
    """'a' (a file) is on the pages read so far, 'a/' would come later: the lookup asks for the
    name by itself, and the directory wins as it does in a whole listing (before: the file, for
    a whole TTL, and everything below 'a/' unreachable)."""
    backend = MemoryBackend(page_size=3)
    backend.put("d/a", b"file")
    for i in range(5):
        backend.put(f"d/a.{i}", b"z")  # between 'a' and 'a/'
    backend.put("d/a/x", b"below")
    backend.put("d/b", b"file")
    ns = Namespace(backend, ttl=60, retry_deadline=1)
    await ns.start()
    d = await ns.lookup(1, b"d")
    ns.remember(d)
    h = await ns.open_dir(d)  # its first page: a, a.0, a.1
    assert await ns.entry(h, 0) is not None
    assert (await ns.lookup(d.inode, b"a")).is_dir
    assert not (await ns.lookup(d.inode, b"a.0")).is_dir  # ('a.0/' would sort before 'a.1': passed)


async def test_a_later_opendir_shares_the_frozen_listing_while_handles_read_it() -> None:
    """A directory larger than the cache: an opendir while an earlier handle still reads its
    frozen listing shares that listing (one frozen listing for N handles, not one each); once
    no handle holds it, it is gone and the next opendir lists the directory anew."""
    backend = MemoryBackend(page_size=10)
    expected = [f"f{i:03d}" for i in range(100)]
    for name in expected:
        backend.put(name, b"z")
    ns = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=20 * ENTRY_BYTES)
    first = await ns.open_dir(ns.root)
    got_first: list[str] = []
    shared = first.listing
    while not shared.streaming:
        entry = await ns.entry(first, len(got_first))
        assert entry is not None
        got_first.append(entry[0].decode())
    frozen_names = len(shared.names)
    entry = await ns.entry(first, len(got_first))  # the first handle reads on in its own listing
    assert entry is not None
    got_first.append(entry[0].decode())
    assert len(got_first) < frozen_names and first.frozen is shared  # mid-directory, holding it
    pages = backend.page_calls
    later = [await ns.open_dir(ns.root) for _ in range(5)]
    assert all(handle.listing is shared for handle in later)  # shared, not listed again
    assert backend.page_calls == pages
    for handle in later:
        got: list[str] = []
        while (entry := await ns.entry(handle, len(got))) is not None:
            got.append(entry[0].decode())
            assert handle.listing is shared or len(handle.listing.names) <= 10  # a page of its own
        assert got == expected
    await read_on(ns, first, got_first)
    assert got_first == expected
    del shared, first, later, handle
    fresh = await ns.open_dir(ns.root)  # no handle holds the frozen listing: listed anew
    assert not fresh.listing.streaming and [n.decode() for n in fresh.listing.names] == expected[:10]
