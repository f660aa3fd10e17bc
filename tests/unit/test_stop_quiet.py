"""A stop logs no failure it caused: no retry lines for GETs it ends, no 'Nursery is closed'
for a stream fetch that lands after the block store stopped, and nothing left pinned."""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.cache.blocks import BlockStore
from modelfs.cache.disk import DiskCache
from modelfs.cache.memory import BlockState, MemoryCache
from modelfs.eager import EagerStreamer

from .conftest import BS, put_ramp, ref_for


class ThreadGetBackend(MemoryBackend):
    """Each GET waits in a worker thread until ``go`` is set: like a real GET, a cancel
    cannot end it (the thread is never abandoned); it returns the bytes once let go."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.started = 0

    async def read_range(
        self, name: str, version: str, offset: int, dest: memoryview, *, size: int | None = None
    ) -> None:
        self.started += 1
        await trio.to_thread.run_sync(self.go.wait, 60)
        await trio.lowlevel.cancel_shielded_checkpoint()
        stored = self.objects[name]
        dest[:] = stored.data[offset : offset + len(dest)]


@pytest.fixture
def backend() -> Iterator[ThreadGetBackend]:
    backend = ThreadGetBackend()
    yield backend
    backend.go.set()  # (never leave a thread waiting)


@pytest.mark.parametrize("name", ["w.safetensors", "w.bin"], ids=["header-read", "stream-block"])
async def test_a_stream_fetch_landing_after_the_store_stopped_ends_quietly(
    tmp_path: Path, backend: ThreadGetBackend, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    """At the stop the mount's nursery cancels the store and the eager stream together. The
    store's nursery closes at once; a stream GET in a thread lands later, and its disk write
    found the nursery closed: 'stopped streaming ...: Nursery is closed to new arrivals'
    (info), and the block stayed pinned. Now the late block's disk write is dropped quietly:
    no log line, no pin or lease left (the block stays READY, evictable). (A .safetensors
    stream first reads its header's block with ``get``; a .bin streams its blocks at once
    with ``stream``: both paths.)"""
    caplog.set_level(logging.DEBUG)
    if name.endswith(".safetensors"):
        header = json.dumps({"x": {"dtype": "U8", "shape": [3 * BS], "data_offsets": [0, 3 * BS]}}).encode()
        backend.put(name, struct.pack("<Q", len(header)) + header + ramp(3 * BS))
        ref = ref_for(backend, name)
    else:
        ref, _ = put_ramp(backend, name, 4 * BS)
    memory = MemoryCache(16 * BS, BS)
    disk = DiskCache(tmp_path / "cache", 1 << 20)
    disk.open()
    store = BlockStore(backend, memory, disk, block_size=BS, max_concurrency=2, retry_deadline=5.0)
    eager = EagerStreamer(store, workers=1)
    stop = trio.CancelScope()

    async def serve() -> None:
        with stop:  # the mount's nursery, which the stop cancels (mount.serve)
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                await nursery.start(eager.run)
                eager.stream_model([ref])  # (--eager-model: a stream no close ends)

    try:
        with trio.fail_after(30):  # (a bound against a hang only)
            async with trio.open_nursery() as outer:
                outer.start_soon(serve)
                while backend.started == 0:
                    await trio.sleep(0.001)
                await trio.testing.wait_all_tasks_blocked()
                stop.cancel()
                # The store's nursery has nothing in flight of its own: it closes now, while
                # the stream's GET still waits in its thread.
                await trio.testing.wait_all_tasks_blocked()
                backend.go.set()
    finally:
        disk.close()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert messages == [], messages
    blocks = list(memory._blocks.values())
    assert all(b.pins == 0 and b.state is BlockState.READY for b in blocks), [(b.key, b.pins, b.state) for b in blocks]
    assert memory.leased == 0  # (the header's lease too)
    assert disk.stats.writes == 0  # its disk write dropped: the store had stopped
