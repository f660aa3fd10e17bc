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
