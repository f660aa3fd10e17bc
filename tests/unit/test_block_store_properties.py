"""Property tests of the block store (hypothesis): random concurrent reads and cancellations
against the memory backend. Whatever the sequence: the bytes are always right, the memory
budget is never exceeded, a block is never fetched while it is cached or while another GET
of it is in flight, and nothing stays pinned or reserved once the readers are done.

Each example runs in its own trio run on a MockClock that jumps whenever every task waits,
so backend latency and cancellation delays cost no wall-clock time.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.cache.blocks import BlockStore, ObjectRef
from modelfs.cache.memory import BlockKey, BlockState, MemoryCache
from modelfs.files import OpenFiles
from modelfs.prefetch import PrefetchConfig

BS = 4096
TIGHT = PrefetchConfig(backward_tolerance=BS, forward_tolerance=BS)


@dataclass
class CheckingBackend(MemoryBackend):
    """A memory backend that checks, at every whole-block GET, the store's promises about it."""

    memory: MemoryCache | None = None
    keys: dict[str, str] = field(default_factory=dict)  # name -> object key
    fetching: set[BlockKey] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)

    async def read_range(self, name: str, version: str, offset: int, dest: memoryview, **kw: int | None) -> None:
        assert self.memory is not None
        if self.memory.used > self.memory.capacity:
            self.violations.append(f"budget exceeded: {self.memory.used} > {self.memory.capacity}")
        size = len(self.objects[name].data) if name in self.objects else 0
        whole_block = offset % BS == 0 and len(dest) == min(BS, size - offset)
        if not whole_block:  # a small GET for a random read: not cached, nothing to check
            await super().read_range(name, version, offset, dest, **kw)
            return
        key: BlockKey = (self.keys[name], version, offset // BS)
        block = self.memory._blocks.get(key)
        if block is None or block.state is not BlockState.FILLING:
            self.violations.append(f"GET of {key} while it is {None if block is None else block.state}")
        if key in self.fetching:
            self.violations.append(f"second GET of {key} while one is in flight")
        self.fetching.add(key)
        try:
            await super().read_range(name, version, offset, dest, **kw)
        finally:
            self.fetching.discard(key)


@dataclass(frozen=True)
class Read:
    file: int
    offset: int  # taken modulo the file's size
    size: int
    start: float  # virtual seconds after the readers start
    cancel_after: float | None  # give up on the read after this long (virtual), if set


reads = st.lists(
    st.builds(
        Read,
        file=st.integers(0, 1),
        offset=st.integers(0, 8 * BS),
        size=st.integers(1, 2 * BS),
        start=st.sampled_from([0.0, 0.0, 0.001, 0.004, 0.01, 0.03]),
        cancel_after=st.sampled_from([None, None, 0.0, 0.0005, 0.003, 0.008]),
    ),
    min_size=1,
    max_size=60,
)


async def _scenario(
    sizes: list[int], memory_blocks: int, concurrency: int, prefetch_blocks: int, small_reads: bool, ops: list[Read]
) -> None:
    backend = CheckingBackend(latency=0.004)
    datas, refs = [], []
    for n, size in enumerate(sizes):
        name = f"f{n}.bin"
        datas.append(ramp(size, seed=n))
        backend.put(name, datas[-1])
        backend.keys[name] = backend.object_key(name)
        stored = backend.objects[name]
        refs.append(ObjectRef(backend.object_key(name), name, str(stored.version), size))
    memory = MemoryCache(memory_blocks * BS, BS)
    backend.memory = memory
    store = BlockStore(backend, memory, None, block_size=BS, max_concurrency=concurrency, retry_deadline=5.0)
    files = OpenFiles(
        store,
        max_prefetch=prefetch_blocks * BS,
        random_read_size=1024 if small_reads else 0,
        prefetch_config=TIGHT,
    )
    wrong: list[str] = []

    async def one(op: Read, fh: int, data: bytes) -> None:
        await trio.sleep(op.start)
        offset = op.offset % len(data)
        with trio.move_on_after(op.cancel_after) if op.cancel_after is not None else nullcontext():
            got = bytes(await files.read(fh, offset, op.size))  # copied before the next yield
            if got != data[offset : offset + op.size]:
                wrong.append(f"{op}: wrong bytes")

    with trio.fail_after(600):  # virtual: a deadlock fails the example instead of hanging it
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            handles = [files.open(ref) for ref in refs]
            async with trio.open_nursery() as readers:
                for op in ops:
                    readers.start_soon(one, op, handles[op.file], datas[op.file])
            # Then every file once more, whole, in block-sized reads: still the right bytes.
            for fh, data in zip(handles, datas, strict=True):
                for offset in range(0, len(data), BS):
                    if bytes(await files.read(fh, offset, BS)) != data[offset : offset + BS]:
                        wrong.append(f"re-read at {offset}: wrong bytes")
            for fh in handles:
                files.release(fh)
            await trio.testing.wait_all_tasks_blocked()  # prefetches still running finish
            while any(b.state is BlockState.FILLING for b in memory._blocks.values()):
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    assert wrong == []
    assert backend.violations == []
    assert memory.stats.peak_bytes <= memory.capacity
    assert all(b.pins == 0 and b.state is BlockState.READY for b in memory._blocks.values())
    assert memory.leased == 0 and memory.used == sum(memory.charge(b.length) for b in memory._blocks.values())


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12 * BS + BS - 1), min_size=2, max_size=2),
    memory_blocks=st.integers(3, 8),
    concurrency=st.integers(1, 4),
    prefetch_blocks=st.sampled_from([0, 1, 4]),
    small_reads=st.booleans(),
    ops=reads,
)
def test_random_reads_and_cancellations_keep_every_promise(
    sizes: list[int], memory_blocks: int, concurrency: int, prefetch_blocks: int, small_reads: bool, ops: list[Read]
) -> None:
    _run(sizes, memory_blocks, concurrency, prefetch_blocks, small_reads, ops)


def _run(
    sizes: list[int], memory_blocks: int, concurrency: int, prefetch_blocks: int, small_reads: bool, ops: list[Read]
) -> None:
    trio.run(
        _scenario,
        sizes,
        memory_blocks,
        concurrency,
        prefetch_blocks,
        small_reads,
        ops,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )
