"""Helpers shared by the unit tests: a block store over the in-memory backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio

from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.cache.blocks import BlockStore, ObjectRef
from modelfs.cache.disk import DiskCache
from modelfs.cache.memory import MemoryCache

BS = 4096  # one page: full blocks go through the disk cache's O_DIRECT path


def ref_for(backend: MemoryBackend, name: str) -> ObjectRef:
    """The ObjectRef an open of ``name`` would pin now."""
    stored = backend.objects[name]
    return ObjectRef(backend.object_key(name), name, str(stored.version), len(stored.data))


def put_ramp(backend: MemoryBackend, name: str, size: int, seed: int = 0) -> tuple[ObjectRef, bytes]:
    data = ramp(size, seed)
    backend.put(name, data)
    return ref_for(backend, name), data


async def wait_until(cond: Callable[[], bool]) -> None:
    """Wait (on whatever clock runs) until ``cond()`` holds, e.g. for disk writes in threads.

    The bound only turns a hang into a failure; it is generous because disk writes on a machine
    busy with other work (benchmarks writing GiBs) can be slow (a 10 s bound failed once then)."""
    with trio.fail_after(60):
        while not cond():
            await trio.sleep(0.001)


StoreFactory = Callable[..., Awaitable[BlockStore]]


@pytest.fixture
async def make_store(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """``await make_store(backend, memory_blocks=.., disk=False, ...)``: a running BlockStore.

    Its background tasks (prefetches, disk writes) run in pytest-trio's fixture nursery.
    """
    disks: list[DiskCache] = []

    async def make(
        backend: MemoryBackend,
        *,
        memory_blocks: int = 64,
        disk: bool = False,
        disk_capacity: int = 1 << 30,
        max_concurrency: int = 4,
        retry_deadline: float = 5.0,
        block_size: int = BS,
        join_blocks: int = 1,
    ) -> BlockStore:
        memory = MemoryCache(memory_blocks * block_size, block_size)
        disk_cache = None
        if disk:
            disk_cache = DiskCache(tmp_path / f"cache{len(disks)}", disk_capacity)
            disk_cache.open()
            disks.append(disk_cache)
        store = BlockStore(
            backend,
            memory,
            disk_cache,
            block_size=block_size,
            max_concurrency=max_concurrency,
            retry_deadline=retry_deadline,
            join_blocks=join_blocks,
        )
        await nursery.start(store.run)
        return store

    yield make
    for d in disks:
        d.close()
