"""Open directory handles that sit idle: what they hold outside the metadata cache is bounded
(the least recently used give their pages back and read them again when next used), and a
handle that gave its page back still reads every name once, in order."""

from __future__ import annotations

import gc
import weakref

import trio
import trio.testing

from modelfs.backends.memory import MemoryBackend
from modelfs.inodes import ENTRY_BYTES, DirHandle, Namespace

PAGE = 10
CAP = 20 * ENTRY_BYTES  # the metadata cache: two pages of ten


def held_outside(handles: list[DirHandle]) -> int:
    """The names held by the listings ``handles`` read that are not their directory's cached listing."""
    listings = {}
    for handle in handles:
        for listing in (handle.listing, handle.frozen):
            if listing is not None and listing.directory.listing is not listing:
                listings[id(listing)] = listing
    return sum(len(listing.names) for listing in listings.values())


BOUND = 2 * 20 + 2 * PAGE  # twice the cache's worth of names, and the pages of the handle used last


async def read_all(ns: Namespace, handle: DirHandle, got: list[str]) -> list[str]:
    while (entry := await ns.entry(handle, len(got))) is not None:
        got.append(entry[0].decode())
    return got


async def test_concurrent_opendirs_of_a_directory_not_listed_share_one_listing() -> None:
    """64 processes open a directory at once: one listing of it, not 64 (a file:// directory
    of 20,000 names is one page: 64 at once took the daemon to 812 MiB)."""
    backend = MemoryBackend(page_size=PAGE)
    for i in range(50):
        backend.put(f"big/f{i:03d}", b"z")
    ns = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=CAP)
    await ns.start()
    big = await ns.lookup(1, b"big")
    ns.remember(big)
    pages = backend.page_calls
    backend.list_gate = trio.Event()
    handles: list[DirHandle] = []

    async def opendir() -> None:
        handles.append(await ns.open_dir(big))

    async with trio.open_nursery() as nursery:
        for _ in range(64):
            nursery.start_soon(opendir)
        await trio.testing.wait_all_tasks_blocked()
        backend.list_gate.set()
    assert backend.page_calls == pages + 1
    assert len({id(handle.listing) for handle in handles}) == 1
    for handle in handles[:3]:
        assert await read_all(ns, handle, []) == [f"f{i:03d}" for i in range(50)]


async def test_idle_handles_on_many_directories_hold_at_most_the_cache_outside_it() -> None:
    """One idle handle per directory, each having read a few names: the listings they hold that
    the cache evicted are bounded by the cache's size (plus the handle used last), not a page
    per handle; then each reads on and gets every name of its directory once, in order."""
    backend = MemoryBackend(page_size=PAGE)
    dirs = 40
    for d in range(dirs):
        for i in range(25):
            backend.put(f"d{d:02d}/f{i:02d}", b"z")
    ns = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=CAP)
    await ns.start()
    handles = []
    seen: list[list[str]] = []
    for d in range(dirs):
        node = await ns.lookup(1, f"d{d:02d}".encode())
        ns.remember(node)
        handle = await ns.open_dir(node)
        got: list[str] = []
        for _ in range(3 + d % 12):  # some mid-page, some past the first page
            entry = await ns.entry(handle, len(got))
            assert entry is not None
            got.append(entry[0].decode())
        handles.append(handle)
        seen.append(got)
        assert held_outside(handles) <= BOUND, d
    for d, (handle, got) in enumerate(zip(handles, seen, strict=True)):
        assert await read_all(ns, handle, got) == [f"f{i:02d}" for i in range(25)], d
        assert held_outside(handles) <= BOUND
    assert ns.handles_parked > 0
    for handle in handles:
        ns.close_dir(handle)
    assert ns.handle_bytes == 0


async def test_idle_handles_of_one_directory_listed_at_every_opendir_are_bounded() -> None:
    """``--metadata-ttl 0`` lists a directory again at every opendir: each idle handle kept
    its own listing (a file:// directory of 20,000 names: ~12 MiB of RSS per handle). They are
    bounded as any other, and each still reads every name once, in order."""
    backend = MemoryBackend(page_size=PAGE)
    expected = [f"f{i:03d}" for i in range(45)]
    for name in expected:
        backend.put(f"big/{name}", b"z")
    ns = Namespace(backend, ttl=0, retry_deadline=1, cache_bytes=CAP)
    await ns.start()
    big = await ns.lookup(1, b"big")
    ns.remember(big)
    handles = []
    seen: list[list[str]] = []
    for n in range(30):
        handle = await ns.open_dir(big)
        got: list[str] = []
        for _ in range(n % 17):
            entry = await ns.entry(handle, len(got))
            assert entry is not None
            got.append(entry[0].decode())
        handles.append(handle)
        seen.append(got)
        assert held_outside(handles) <= BOUND, n
    # Interleaved, a few names at a time: every handle given back and taken up again.
    while any(len(got) < len(expected) for got in seen):
        for handle, got in zip(handles, seen, strict=True):
            for _ in range(4):
                entry = await ns.entry(handle, len(got))
                if entry is None:
                    break
                got.append(entry[0].decode())
            assert held_outside(handles) <= BOUND
    assert all(got == expected for got in seen)
    assert ns.handles_parked > 30


async def test_a_handle_taken_up_again_lists_no_name_twice_and_skips_none_that_stayed() -> None:
    """A handle that gave its page back reads it again by its page's token and goes on after
    the last name it replied: names removed or added before it do not shift it."""
    backend = MemoryBackend(page_size=PAGE)
    for i in range(0, 60, 2):
        backend.put(f"a/f{i:02d}", b"z")
    for d in range(10):
        for i in range(25):
            backend.put(f"o{d}/g{i:02d}", b"z")
    ns = Namespace(backend, ttl=60, retry_deadline=1, cache_bytes=CAP)
    await ns.start()
    a = await ns.lookup(1, b"a")
    ns.remember(a)
    handle = await ns.open_dir(a)
    got: list[str] = []
    for _ in range(13):  # into the second page
        entry = await ns.entry(handle, len(got))
        assert entry is not None
        got.append(entry[0].decode())
    assert got[-1] == "f24"
    for d in range(10):  # others take the room: this handle's page is given back
        node = await ns.lookup(1, f"o{d}".encode())
        ns.remember(node)
        await read_all(ns, await ns.open_dir(node), [])
    assert held_outside([handle]) == 0  # its page given back
    backend.delete("a/f20")  # before the position (on its page)
    backend.put("a/f21", b"z")  # before the position: not listed (the handle is past it)
    backend.put("a/f25", b"z")  # after it: listed
    await read_all(ns, handle, got)
    assert got == [f"f{i:02d}" for i in range(0, 26, 2)] + ["f25"] + [f"f{i:02d}" for i in range(26, 60, 2)]
    assert len(got) == len(set(got))


async def test_a_new_listing_is_read_once_idle_handles_gave_back_what_they_hold() -> None:
    """``--metadata-ttl 0``: an opendir lists the directory again while the last handle still
    holds the frozen listing (larger than the cache). That listing is given back before the
    new one's first page is read, not after: a file:// directory is one page, so the old
    listing, the new one and the page's answer were all held at once (the daemon's peak)."""
    backend = MemoryBackend(page_size=PAGE)
    expected = [f"f{i:03d}" for i in range(50)]
    for name in expected:
        backend.put(f"big/{name}", b"z")
    ns = Namespace(backend, ttl=0, retry_deadline=1, cache_bytes=CAP)
    await ns.start()
    big = await ns.lookup(1, b"big")
    ns.remember(big)
    first = await ns.open_dir(big)
    got_first: list[str] = []
    while not first.listing.streaming:  # read until it outgrew the cache: frozen
        entry = await ns.entry(first, len(got_first))
        assert entry is not None
        got_first.append(entry[0].decode())
    frozen = weakref.ref(first.listing)
    backend.list_gate = trio.Event()
    second: list[DirHandle] = []

    async def opendir() -> None:
        second.append(await ns.open_dir(big))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(opendir)
        await trio.testing.wait_all_tasks_blocked()  # the new listing's first page is being read
        gc.collect()
        assert frozen() is None, "the frozen listing is still held while the new one is read"
        backend.list_gate.set()
    assert await read_all(ns, first, got_first) == expected
    assert await read_all(ns, second[0], []) == expected
