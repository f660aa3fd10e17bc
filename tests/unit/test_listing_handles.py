"""Directory handles over a listing larger than the metadata cache: what each holds, and that
each reads every name once, in order."""

from __future__ import annotations

from modelfs.backends.memory import MemoryBackend
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
