"""OpenFiles.read through a BlockStore: exact bytes across blocks, EOF, handles and read-ahead."""

from __future__ import annotations

from modelfs.backends.memory import MemoryBackend
from modelfs.errors import VersionChanged
from modelfs.files import OpenFiles

from .conftest import BS, StoreFactory, put_ramp, ref_for, wait_until


async def test_read_within_one_block_and_spanning_two(make_store: StoreFactory) -> None:
    """A read inside a block and one across a block boundary return the exact slices."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "m.bin", 4 * BS + 300, seed=1)
    files = OpenFiles(await make_store(backend), max_prefetch=0)
    fh = files.open(ref)
    assert bytes(await files.read(fh, 100, 200)) == data[100:300]
    assert bytes(await files.read(fh, BS - 10, 30)) == data[BS - 10 : BS + 20]
    assert bytes(await files.read(fh, BS // 2, 2 * BS)) == data[BS // 2 : BS // 2 + 2 * BS]  # three blocks
    assert bytes(await files.read(fh, 0, len(data))) == data


async def test_reads_at_and_past_eof(make_store: StoreFactory) -> None:
    """At or past EOF a read is empty; a read crossing EOF is cut to the file's end."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "m.bin", 2 * BS + 50, seed=2)
    store = await make_store(backend)
    files = OpenFiles(store, max_prefetch=0)
    fh = files.open(ref)
    assert await files.read(fh, len(data), 10) == b""
    assert await files.read(fh, len(data) + BS, 10) == b""
    assert await files.read(fh, 0, 0) == b""
    assert bytes(await files.read(fh, len(data) - 20, 4096)) == data[-20:]
    assert backend.read_calls == 1  # only the last block was fetched


async def test_last_partial_block(make_store: StoreFactory) -> None:
    """The short last block is read whole, alone and together with the block before it."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "m.bin", 3 * BS + 7, seed=3)
    files = OpenFiles(await make_store(backend), max_prefetch=0)
    fh = files.open(ref)
    assert bytes(await files.read(fh, 3 * BS, BS)) == data[3 * BS :]
    assert len(data[3 * BS :]) == 7
    assert bytes(await files.read(fh, 2 * BS + 1, 2 * BS)) == data[2 * BS + 1 :]


async def test_tiny_and_empty_files(make_store: StoreFactory) -> None:
    """A one-byte file reads as that byte; an empty file reads as nothing and fetches nothing."""
    backend = MemoryBackend()
    backend.put("one", b"\x7f")
    backend.put("empty", b"")
    files = OpenFiles(await make_store(backend), max_prefetch=8 * BS)
    fh1 = files.open(ref_for(backend, "one"))
    fh0 = files.open(ref_for(backend, "empty"))
    assert bytes(await files.read(fh1, 0, 4096)) == b"\x7f"
    assert await files.read(fh0, 0, 4096) == b""
    assert backend.read_calls == 1


async def test_sequential_read_prefetches_ahead(make_store: StoreFactory) -> None:
    """A sequential read triggers prefetches, which later reads use instead of new GETs."""
    backend = MemoryBackend(latency=0.001)
    ref, data = put_ramp(backend, "m.bin", 16 * BS, seed=4)
    store = await make_store(backend)
    files = OpenFiles(store, max_prefetch=4 * BS)
    fh = files.open(ref)
    out = bytearray()
    for off in range(0, len(data), BS // 4):
        out += await files.read(fh, off, BS // 4)
    assert bytes(out) == data
    assert store.stats.prefetch_gets >= 10
    assert store.stats.demand_gets + store.stats.prefetch_gets == 16
    assert backend.read_calls == 16


async def test_handles_of_one_version_share_read_ahead(make_store: StoreFactory) -> None:
    """Two handles of the same version share one ReadAhead; release of the last frees it."""
    backend = MemoryBackend()
    ref, _ = put_ramp(backend, "m.bin", 4 * BS)
    files = OpenFiles(await make_store(backend), max_prefetch=4 * BS)
    a, b = files.open(ref), files.open(ref)
    assert a != b and len(files) == 2
    assert files._handles[a] is files._handles[b]
    files.release(a)
    assert len(files) == 1 and files._handles[b].ref == ref
    files.release(b)
    files.release(b)  # a second release is harmless
    assert len(files) == 0 and not files._by_version


async def test_release_forgets_unread_prefetches(make_store: StoreFactory) -> None:
    """Closing the last handle stops its unread prefetches from holding the prefetch share."""
    backend = MemoryBackend()
    ref, _ = put_ramp(backend, "m.bin", 16 * BS)
    store = await make_store(backend)
    files = OpenFiles(store, max_prefetch=8 * BS)
    fh = files.open(ref)
    await files.read(fh, 0, BS)
    await files.read(fh, BS, BS)
    await wait_until(lambda: store.slots.in_use == 0 and backend.read_calls == 4)
    assert store.memory.unread_prefetch_bytes == 2 * BS  # blocks 2 and 3
    files.release(fh)
    assert store.memory.unread_prefetch_bytes == 0


async def test_handle_keeps_its_version_after_overwrite(make_store: StoreFactory) -> None:
    """A handle opened before an overwrite fails its next uncached read with VersionChanged."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "m.bin", 2 * BS, seed=6)
    files = OpenFiles(await make_store(backend), max_prefetch=0)
    fh = files.open(ref)
    assert bytes(await files.read(fh, 0, 10)) == data[:10]
    backend.put("m.bin", b"replaced")
    assert bytes(await files.read(fh, 10, 10)) == data[10:20]  # cached block of the pinned version
    try:
        await files.read(fh, BS, 10)
    except VersionChanged:
        pass
    else:
        raise AssertionError("read of the old version did not fail")
    fh2 = files.open(ref_for(backend, "m.bin"))
    assert bytes(await files.read(fh2, 0, 100)) == b"replaced"
