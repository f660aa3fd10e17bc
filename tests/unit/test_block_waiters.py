"""A reader waiting on a block being fetched gets the whole block, even under memory pressure.

Regression test for a race found by the fault-injection tests: the fetcher unpinned the block
as soon as it was READY, and another task could evict it (its buffer going back to the pool)
before the waiting reader ran again; the waiter then returned an emptied view, a short read
that the kernel takes as end of file.
"""

from __future__ import annotations

import trio
import trio.testing

from modelfs.backends.memory import MemoryBackend

from .conftest import BS, StoreFactory, put_ramp


class GatedBackend(MemoryBackend):
    """Reads of offset 0 wait until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()

    async def read_range(self, name: str, version: str, offset: int, dest: memoryview, **kw: int | None) -> None:
        if offset == 0:
            await self.gate.wait()
        await super().read_range(name, version, offset, dest, **kw)


async def test_waiter_gets_full_block_when_fetcher_evicts_it(make_store: StoreFactory) -> None:
    backend = GatedBackend()
    ref, data = put_ramp(backend, "m.bin", 3 * BS, seed=5)
    store = await make_store(backend, memory_blocks=1)  # room for exactly one block
    got: dict[str, bytes] = {}

    async def fetcher() -> None:
        await store.get(ref, 0)
        # No checkpoint between the fetch completing and this reservation: without the
        # waiter's pin, block 0 is evicted here before the waiter wakes up.
        block = await store.get(ref, 1)
        got["fetcher"] = bytes(block.view)

    async def waiter() -> None:
        block = await store.get(ref, 0)
        got["waiter"] = bytes(block.view)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetcher)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        backend.gate.set()
    assert got["waiter"] == data[:BS]
    assert got["fetcher"] == data[BS : 2 * BS]
    assert store.memory.stats.peak_bytes <= store.memory.capacity
