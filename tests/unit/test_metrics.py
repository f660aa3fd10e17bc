"""/metrics scrapes: the snapshot is taken on the trio thread, never from live state in the metrics thread."""

from __future__ import annotations

import threading

import trio
from prometheus_client import CollectorRegistry, generate_latest

from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.metrics import MetricsSnapshot, ModelfsCollector, on_trio_thread

from .conftest import BS, StoreFactory, ref_for
from .test_operations import build


async def test_a_scrape_from_another_thread_snapshots_on_the_trio_thread(make_store: StoreFactory) -> None:
    """prometheus-client calls collect() in its own thread; the stats (which iterate live dicts
    such as the memory cache's blocks and the open files) are computed on the trio thread, while
    trio tasks keep changing them, and the exposition carries the values of that one snapshot."""
    backend = MemoryBackend()
    data = ramp(8 * BS, seed=3)
    backend.put("model.bin", data)
    ops = await build(make_store, backend)
    trio_thread = threading.get_ident()
    taken_on: list[int] = []

    def snapshot() -> MetricsSnapshot:
        taken_on.append(threading.get_ident())
        return ops.metrics_snapshot()

    registry = CollectorRegistry()
    registry.register(ModelfsCollector(on_trio_thread(snapshot), "memory"))
    ref_fh = ops.files.open(ref_for(backend, "model.bin"))
    scrapes: list[bytes] = []
    async with trio.open_nursery() as nursery:

        async def churn() -> None:  # reads (new blocks, errors counted) while the scrapes run
            for offset in range(0, len(data), BS // 2):
                assert bytes(await ops.files.read(ref_fh, offset, BS // 2)) == data[offset : offset + BS // 2]
                ops.errors[f"E{offset % 7}"] += 1
                await trio.lowlevel.checkpoint()

        nursery.start_soon(churn)
        for _ in range(5):
            scrapes.append(await trio.to_thread.run_sync(generate_latest, registry))
    assert taken_on and set(taken_on) == {trio_thread}
    text = scrapes[-1].decode()
    assert "modelfs_backend_requests_total" in text and "modelfs_read_latency_seconds_bucket" in text
    ops.files.release(ref_fh)


def test_a_scrape_after_the_trio_run_reports_nothing() -> None:
    """A scrape racing the unmount gets no families (not an exception, not a hang)."""

    async def main() -> ModelfsCollector:
        def boom() -> MetricsSnapshot:
            raise AssertionError("must not run after the trio run ended")

        return ModelfsCollector(on_trio_thread(boom), "memory")

    collector = trio.run(main)
    assert list(collector.collect()) == []
