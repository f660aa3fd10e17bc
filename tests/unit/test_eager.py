"""Eager streaming: whole weight files into the disk cache, behind demand reads, in budget."""

from __future__ import annotations

import json
import random
import re
import struct
import sys
import threading
from array import array
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.cache.blocks import BlockStore
from modelfs.eager import MAX_ORDERED_BLOCKS, MAX_STREAMS, EagerStreamer, safetensors_block_order
from modelfs.errors import TransientError
from modelfs.files import OpenFiles
from modelfs.prefetch import PrefetchConfig
from modelfs.safetensors_header import block_order

from .conftest import BS, StoreFactory, put_ramp, ref_for, wait_until

# Cursor tolerances scaled to these small files (the defaults suit multi-GB files).
TIGHT = PrefetchConfig(backward_tolerance=BS, forward_tolerance=BS)


def _safetensors(tensors: list[tuple[str, int]], header_pad: int = 0) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A safetensors file whose tensors are stored in the given order (name, byte length)."""
    meta: dict[str, object] = {}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, length in tensors:
        meta[name] = {"dtype": "U8", "shape": [length], "data_offsets": [pos, pos + length]}
        offsets[name] = (pos, pos + length)
        pos += length
    meta["__metadata__"] = {"pad": "x" * header_pad}
    header = json.dumps(meta).encode()
    return struct.pack("<Q", len(header)) + header + ramp(pos, 9), offsets


def test_safetensors_order_header_first_then_by_offset() -> None:
    """Header blocks come first; data follows the tensors' offsets, each block once; all blocks listed."""
    header = json.dumps(
        {
            "b": {"dtype": "U8", "shape": [10], "data_offsets": [3 * BS, 3 * BS + 10]},
            "a": {"dtype": "U8", "shape": [10], "data_offsets": [0, 2 * BS]},
            "__metadata__": {"k": "v"},
        }
    ).encode()
    # A header of 1.5 blocks: blocks 0 and 1 hold it.
    hlen = BS + BS // 2 - 8
    padded = header + b" " * (hlen - len(header))
    size = 8 + hlen + 3 * BS + 10
    order = list(safetensors_block_order(padded, hlen, BS, size))
    blocks = -(-size // BS)
    assert order[:2] == [0, 1]
    assert sorted(order) == list(range(blocks))
    data_start = 8 + hlen
    assert order.index((data_start + 3 * BS) // BS) > order.index((data_start + 2 * BS - 1) // BS)


def test_safetensors_order_follows_offsets_not_names() -> None:
    """Tensors whose names sort opposite to their offsets are streamed by offset."""
    data, offsets = _safetensors([("z.weight", 3 * BS), ("a.weight", 3 * BS)])
    hlen = struct.unpack("<Q", data[:8])[0]
    order = list(safetensors_block_order(data[8 : 8 + hlen], hlen, BS, len(data)))
    start = 8 + hlen
    z_first = (start + offsets["z.weight"][0]) // BS
    a_first = (start + offsets["a.weight"][0]) // BS
    assert order.index(z_first) < order.index(a_first)
    assert order == sorted(order)  # stored in file order, so the stream is too


async def _streamer(store: BlockStore, workers: int = 2) -> EagerStreamer:
    streamer = EagerStreamer(store, workers=workers)
    assert streamer.enabled
    return streamer


async def test_stream_fills_disk_cache_and_then_reads_need_no_gets(
    make_store: StoreFactory, nursery: trio.Nursery
) -> None:
    """Opening a .safetensors streams every block to disk; reading it afterwards makes no GET."""
    backend = MemoryBackend()
    data, _ = _safetensors([("x", 5 * BS), ("y", 7 * BS + 3)])
    backend.put("m/model.safetensors", data)
    ref = ref_for(backend, "m/model.safetensors")
    store = await make_store(backend, memory_blocks=4, disk=True)
    streamer = await _streamer(store)
    await nursery.start(streamer.run)
    files = OpenFiles(store, max_prefetch=0, eager=streamer, prefetch_config=TIGHT)
    fh = files.open(ref)
    assert streamer.active == 0  # opening alone starts nothing ...
    assert bytes(await files.read(fh, 0, 8)) == data[:8]
    assert bytes(await files.read(fh, len(data) - 8, 8)) == data[-8:]  # a seek ...
    assert streamer.active == 0
    assert bytes(await files.read(fh, 3 * BS, 8)) == data[3 * BS : 3 * BS + 8]  # ... and another: reads at random
    assert streamer.active == 1
    await streamer.wait(ref)
    assert streamer.completed == 1
    await store.drain()
    blocks = store.block_count(ref)
    assert store.stats.streamed_blocks >= blocks - 3  # the three blocks read before it were demand reads
    assert store.disk is not None
    missing = [i for i in range(blocks) if not store.disk.contains((ref.key, ref.version, i))]
    assert missing == [], (missing, store.disk.stats, store.stats)
    gets = backend.read_calls
    # In reads the size FUSE sends (one whole-file read would not fit in this 4-block budget).
    assert b"".join([bytes(await files.read(fh, o, 2 * BS)) for o in range(0, len(data), 2 * BS)]) == data
    assert backend.read_calls == gets
    assert store.memory.stats.peak_bytes <= store.memory.capacity
    files.release(fh)


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Jumps only after 0.2 s of real idleness, so disk reads in threads finish before a jump."""
    return trio.testing.MockClock(autojump_threshold=0.2)


async def test_demand_reads_overtake_the_stream(
    make_store: StoreFactory, nursery: trio.Nursery, patient_clock: trio.testing.MockClock
) -> None:
    """With the stream holding every GET slot, a demand read for the file's end is fetched next."""
    backend = MemoryBackend(latency=1.0)
    ref, data = put_ramp(backend, "w.bin", 40 * BS)
    store = await make_store(backend, memory_blocks=8, disk=True, max_concurrency=1)
    streamer = await _streamer(store, workers=4)
    await nursery.start(streamer.run)
    files = OpenFiles(store, max_prefetch=0, eager=streamer, prefetch_config=TIGHT)
    fh = files.open(ref)
    await files.read(fh, 0, 1)
    await files.read(fh, 20 * BS, 1)
    await files.read(fh, 10 * BS, 1)  # two seeks: reads at random, the stream starts
    await wait_until(lambda: store.slots.in_use == 1)  # the stream holds the only slot ...
    await wait_until(lambda: store.slots.waiting_prefetches >= 1)  # ... and more blocks wait behind it
    logged = len(backend.read_log)  # including the GET in flight
    assert bytes(await files.read(fh, 39 * BS, BS)) == data[39 * BS :]
    order = [offset // BS for _, offset, _ in backend.read_log]
    # Next, or at worst one GET later under a loaded machine (a FIFO queue would put it
    # behind every block the stream's workers are waiting with).
    assert 39 in order[logged : logged + 2], (order, logged)
    files.release(fh)


async def test_stream_stays_in_budget_and_close_cancels(
    make_store: StoreFactory, nursery: trio.Nursery, patient_clock: trio.testing.MockClock
) -> None:
    """The stream never takes more than the memory budget, and the last close stops it cleanly."""
    backend = MemoryBackend(latency=0.1)
    ref, _ = put_ramp(backend, "big.gguf", 200 * BS)
    store = await make_store(backend, memory_blocks=4, disk=True, max_concurrency=4)
    streamer = await _streamer(store, workers=4)
    await nursery.start(streamer.run)
    files = OpenFiles(store, max_prefetch=0, eager=streamer, prefetch_config=TIGHT)
    fh = files.open(ref)
    await files.read(fh, 0, 1)
    await files.read(fh, 100 * BS, 1)
    await files.read(fh, 50 * BS, 1)  # two seeks: reads at random, the stream starts
    with trio.fail_after(60):
        while backend.read_calls < 12:
            await trio.sleep(0.01)
            assert store.memory.used <= store.memory.capacity
    assert backend.read_calls < 200
    files.release(fh)
    await streamer.wait(ref)
    assert streamer.cancelled == 1 and streamer.active == 0
    calls = backend.read_calls
    await store.drain()  # the last blocks' disk writes, then every task has settled: no time passes
    await trio.testing.wait_all_tasks_blocked()
    assert backend.read_calls == calls  # nothing more is fetched after the cancel
    await wait_until(lambda: store.slots.in_use == 0)
    assert store.memory.stats.peak_bytes <= store.memory.capacity


async def test_not_a_weight_file_or_no_disk_is_not_streamed(make_store: StoreFactory, nursery: trio.Nursery) -> None:
    """config.json is not streamed; without a disk cache nothing is."""
    backend = MemoryBackend()
    ref, _ = put_ramp(backend, "config.json", 10 * BS)
    store = await make_store(backend, memory_blocks=4, disk=True)
    streamer = await _streamer(store)
    await nursery.start(streamer.run)
    streamer.read_at_random(ref)
    assert streamer.active == 0
    no_disk = await make_store(backend, memory_blocks=4, disk=False)
    assert not EagerStreamer(no_disk).enabled


async def _sequential_read_with_stream(make_store: StoreFactory, nursery: trio.Nursery, *, pause: bool) -> BlockStore:
    backend = MemoryBackend(latency=0.002)
    ref, data = put_ramp(backend, "seq.bin", 96 * BS)
    store = await make_store(backend, memory_blocks=8, disk=True, max_concurrency=4)
    streamer = EagerStreamer(store, workers=4, yield_to_readers=pause)  # not: as before the stream yielded
    await nursery.start(streamer.run)
    files = OpenFiles(store, max_prefetch=4 * BS, eager=streamer, prefetch_config=TIGHT)
    fh = files.open(ref)
    assert bytes(await files.read(fh, len(data) - 10, 10)) == data[-10:]
    assert bytes(await files.read(fh, BS, 10)) == data[BS : BS + 10]  # two seeks start the stream
    for offset in range(0, len(data), BS // 2):
        assert bytes(await files.read(fh, offset, BS // 2)) == data[offset : offset + BS // 2]
    files.release(fh)
    await streamer.wait(ref)
    assert backend.read_calls <= 96 + 8
    return store


async def test_a_reader_from_the_start_starts_no_stream(make_store: StoreFactory, nursery: trio.Nursery) -> None:
    """Reading a weight file from start to end is left to read-ahead: no stream, no second copy."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "seq.safetensors.bin", 32 * BS)
    store = await make_store(backend, memory_blocks=8, disk=True)
    streamer = await _streamer(store)
    await nursery.start(streamer.run)
    files = OpenFiles(store, max_prefetch=4 * BS, eager=streamer, prefetch_config=TIGHT)
    fh = files.open(ref)
    for offset in range(0, len(data), BS):
        assert bytes(await files.read(fh, offset, BS)) == data[offset : offset + BS]
    assert streamer.active == 0 and streamer.completed == 0 and store.stats.streamed_blocks == 0
    assert backend.read_calls == 32
    files.release(fh)


async def test_stream_yields_to_a_sequential_reader(make_store: StoreFactory, nursery: trio.Nursery) -> None:
    """While a reader streams the file sequentially, the eager stream pauses instead of
    racing its read-ahead for the same blocks."""
    yielding = await _sequential_read_with_stream(make_store, nursery, pause=True)
    racing = await _sequential_read_with_stream(make_store, nursery, pause=False)
    # Yielding, the reader's own read-ahead fetches the file; racing, the stream takes a
    # large share of the blocks (each then written, evicted and maybe read back).
    assert yielding.stats.streamed_blocks < 48  # measured 7-24 of 96
    assert racing.stats.streamed_blocks > yielding.stats.streamed_blocks + 8  # measured 63-81
    assert yielding.disk is not None and yielding.disk.stats.hits <= 8, yielding.stats


# --- --eager-model: the whole model, one file after another


async def test_model_stream_goes_file_by_file_in_name_order(
    make_store: StoreFactory, nursery: trio.Nursery, patient_clock: trio.testing.MockClock
) -> None:
    """Every weight file ends up on disk; each file's GETs come before the next file's (bar the
    workers' overlap at the boundary), and non-weight files are left alone."""
    backend = MemoryBackend(latency=0.01)
    names = [
        "m/model-00003-of-00003.safetensors",
        "m/model-00001-of-00003.safetensors",
        "m/model-00002-of-00003.safetensors",
        "m/config.json",
    ]
    refs = {}
    for n, name in enumerate(names):
        refs[name] = put_ramp(backend, name, 12 * BS + n, seed=n)[0]
    store = await make_store(backend, memory_blocks=4, disk=True, max_concurrency=2)
    streamer = await _streamer(store, workers=2)
    await nursery.start(streamer.run)
    assert streamer.stream_model(refs.values()) == 3
    for ref in refs.values():
        await streamer.wait(ref)
    await store.drain()
    assert streamer.completed == 3 and streamer.active == 0
    assert store.disk is not None
    for name, ref in refs.items():
        on_disk = [store.disk.contains((ref.key, ref.version, i)) for i in range(store.block_count(ref))]
        assert all(on_disk) == name.endswith(".safetensors"), (name, on_disk)
    order = [name for name, _, _ in backend.read_log]
    firsts = [order.index(n) for n in sorted(names[:3])]
    lasts = [len(order) - 1 - order[::-1].index(n) for n in sorted(names[:3])]
    assert firsts == sorted(firsts)
    for file in range(2):  # the next file starts only when this one's last blocks are in flight
        assert firsts[file + 1] >= lasts[file] - 2, (order, firsts, lasts)


async def test_model_stream_moves_on_from_a_file_a_reader_streams(
    make_store: StoreFactory, nursery: trio.Nursery, patient_clock: trio.testing.MockClock
) -> None:
    """While a reader streams the first file itself, the model stream moves on to the next
    file instead of racing its read-ahead, and comes back for what is left afterwards."""
    backend = MemoryBackend(latency=0.05)
    ref_a, data_a = put_ramp(backend, "m/a.safetensors", 48 * BS, seed=1)
    ref_b, _ = put_ramp(backend, "m/b.safetensors", 16 * BS, seed=2)
    store = await make_store(backend, memory_blocks=16, disk=True, max_concurrency=4)
    streamer = await _streamer(store, workers=2)
    await nursery.start(streamer.run)
    files = OpenFiles(store, max_prefetch=4 * BS, eager=streamer, prefetch_config=TIGHT)
    fh = files.open(ref_a)
    for offset in range(0, 8 * BS, BS):  # the reader is streaming a.safetensors ...
        assert bytes(await files.read(fh, offset, BS)) == data_a[offset : offset + BS]
    streamer.stream_model([ref_b, ref_a])  # ... when the model stream starts
    for offset in range(8 * BS, len(data_a), BS):
        assert bytes(await files.read(fh, offset, BS)) == data_a[offset : offset + BS]
    files.release(fh)
    await streamer.wait(ref_a)
    await store.drain()
    order = [name for name, _, _ in backend.read_log]
    assert order.count("m/b.safetensors") == 16  # b was streamed whole ...
    last_a = len(order) - 1 - order[::-1].index("m/a.safetensors")
    assert order.index("m/b.safetensors") < last_a  # ... while the reader was still on a
    assert store.disk is not None
    assert all(store.disk.contains((ref_a.key, ref_a.version, i)) for i in range(48))
    assert backend.read_calls <= 48 + 16 + 2  # a's blocks were not fetched twice


async def test_a_random_reader_moves_its_file_to_the_front(make_store: StoreFactory, nursery: trio.Nursery) -> None:
    """A queued file that a reader starts reading at random is streamed next, whole."""
    backend = MemoryBackend(latency=0.01)
    refs = [put_ramp(backend, f"m/s{n}.safetensors", (48 if n == 0 else 24) * BS, seed=n)[0] for n in range(3)]
    store = await make_store(backend, memory_blocks=8, disk=True, max_concurrency=1)
    streamer = await _streamer(store, workers=1)
    await nursery.start(streamer.run)
    files = OpenFiles(store, max_prefetch=0, eager=streamer, prefetch_config=TIGHT)
    streamer.stream_model(refs)
    await wait_until(lambda: backend.read_calls >= 2)  # s0 under way
    fh = files.open(refs[2])
    for offset in (20 * BS, 3 * BS, 11 * BS):  # s2 read at random: it goes next
        await files.read(fh, offset, 1)
    await streamer.wait(refs[2])
    order = [name for name, _, _ in backend.read_log]
    assert order.index("m/s2.safetensors") < order.index("m/s1.safetensors")
    last_s2 = len(order) - 1 - order[::-1].index("m/s2.safetensors")
    first_s1 = order.index("m/s1.safetensors")
    s2_after_s1_began = [n for n in order[first_s1:last_s2] if n == "m/s2.safetensors"]
    assert not s2_after_s1_began, order  # s2 whole, then s1
    files.release(fh)


async def test_several_files_stream_at_once_within_the_concurrency_bound(
    make_store: StoreFactory, nursery: trio.Nursery
) -> None:
    """Two weight files read at random stream side by side, and never more GETs are in
    flight than --max-concurrency allows, over both."""
    backend = MemoryBackend(latency=0.005)
    refs = [put_ramp(backend, f"m/{n}.safetensors", 40 * BS, seed=20 + n) for n in range(2)]
    store = await make_store(backend, memory_blocks=8, disk=True, max_concurrency=3)
    streamer = await _streamer(store, workers=4)
    await nursery.start(streamer.run)
    files = OpenFiles(store, max_prefetch=0, eager=streamer, prefetch_config=TIGHT)
    handles = []
    for ref, data in refs:
        fh = files.open(ref)
        handles.append(fh)
        for offset in (30 * BS, 5 * BS, 17 * BS):  # at random: the stream starts
            assert bytes(await files.read(fh, offset, 10)) == data[offset : offset + 10]
    assert streamer.active == 2
    for ref, _ in refs:
        await streamer.wait(ref)
    assert streamer.completed == 2
    order = [name for name, _, _ in backend.read_log]
    first_done = min(len(order) - 1 - order[::-1].index(f"m/{n}.safetensors") for n in range(2))
    assert {"m/0.safetensors", "m/1.safetensors"} <= set(order[:first_done])  # side by side
    assert backend.max_in_flight <= 3
    await store.drain()
    assert store.disk is not None
    for ref, _ in refs:
        assert all(store.disk.contains((ref.key, ref.version, i)) for i in range(40))
    for fh in handles:
        files.release(fh)


def _order_by_sorted_spans(spans: list[tuple[int, int]], header_len: int, block_size: int, size: int) -> list[int]:
    """The order as defined: the header's blocks, each span's in offset order, then the rest."""
    blocks = -(-size // block_size)
    order = list(range(min(blocks, -(-(8 + header_len) // block_size))))
    for begin, end in sorted(spans):
        if end > begin:
            first, last = (8 + header_len + begin) // block_size, -(-(8 + header_len + end) // block_size)
            order += [i for i in range(first, min(blocks, last)) if i not in order]
    return order + [i for i in range(blocks) if i not in order]


def test_block_order_takes_spans_in_any_order() -> None:
    rng = random.Random(7)
    for _ in range(300):
        size = rng.randrange(8, 40 * BS)
        header_len = rng.randrange(0, size - 7)
        data = size - 8 - header_len
        spans = []
        for _ in range(rng.randrange(0, 8)):
            begin = rng.randrange(0, data + 1)
            spans.append((begin, rng.randrange(begin, data + 1)))
        expected = _order_by_sorted_spans(spans, header_len, BS, size)
        assert list(block_order(spans, header_len, BS, size)) == expected
        assert list(block_order(reversed(spans), header_len, BS, size)) == expected


def test_block_order_of_many_spans_over_all_the_data_is_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """20,000 entries each spanning all of a 20,000-block file: one pass over the entries and
    one over the blocks (it visited every block of every entry: 4e8 set lookups, seconds on
    the event loop). The blocks visited are counted through the module's ``range``."""
    entries = blocks = 20_000
    visited = 0

    def counting_range(*args: int) -> Iterator[int]:
        nonlocal visited
        for index in range(*args):
            visited += 1
            assert visited <= 2 * (entries + blocks), "block_order visits blocks per entry"
            yield index

    monkeypatch.setattr("modelfs.safetensors_header.range", counting_range, raising=False)
    size = blocks * BS
    order = block_order([(0, size - BS)] * entries, BS - 8, BS, size)
    assert list(order) == list(range(blocks))


async def test_safetensors_order_is_made_in_a_worker_thread(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parse and the order, whose costs grow with the header and the file, run off the event loop."""
    data, _ = _safetensors([("a", 3 * BS), ("b", BS)])
    backend = MemoryBackend()
    backend.put("m.safetensors", data)
    store = await make_store(backend, memory_blocks=16, disk=True)
    threads: list[threading.Thread] = []

    def order(*args: Any) -> list[int]:
        threads.append(threading.current_thread())
        return safetensors_block_order(*args)

    monkeypatch.setattr("modelfs.eager.safetensors_block_order", order)
    result = await (await _streamer(store))._order(ref_for(backend, "m.safetensors"))
    assert sorted(result) == list(range(store.block_count(ref_for(backend, "m.safetensors"))))
    assert threads and threads[0] is not threading.main_thread()


async def test_a_file_of_more_blocks_than_are_ordered_streams_in_file_order_without_a_list(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header order is an array of every block (outside the budget): a file of more blocks
    than MAX_ORDERED_BLOCKS (a huge shard, a small --block-size) streams in file order, as a
    range: no list."""
    data, _ = _safetensors([("b", 3 * BS), ("a", 2 * BS)])
    backend = MemoryBackend()
    backend.put("m.safetensors", data)
    store = await make_store(backend, memory_blocks=16, disk=True)
    streamer = await _streamer(store)
    ref = ref_for(backend, "m.safetensors")
    count = store.block_count(ref)
    monkeypatch.setattr("modelfs.eager.MAX_ORDERED_BLOCKS", count)
    assert isinstance(await streamer._order(ref), array)  # (at the bound: header order)
    monkeypatch.setattr("modelfs.eager.MAX_ORDERED_BLOCKS", count - 1)
    order = await streamer._order(ref)
    assert isinstance(order, range) and order == range(count)


async def test_a_failing_file_stops_its_model_stream_and_the_next_goes_on(
    make_store: StoreFactory, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """--eager-model: once a block of a file fails (after its retries), the file's other blocks
    are not fetched (each failed again after --retry-deadline: 573 GETs for 200 blocks); the
    model's next file is streamed whole."""
    backend = MemoryBackend()
    bad, _ = put_ramp(backend, "a.bin", 200 * BS)
    good, _ = put_ramp(backend, "b.bin", 3 * BS, seed=1)

    def fault(name: str, offset: int, length: int) -> None:
        if name == "a.bin":
            raise TransientError("503 from the store")

    backend.fault = fault
    store = await make_store(backend, memory_blocks=16, disk=True, retry_deadline=0.2)
    streamer = EagerStreamer(store, workers=4)
    await nursery.start(streamer.run)
    assert streamer.stream_model([bad, good]) == 2
    await streamer.wait(bad)
    await streamer.wait(good)
    gets_of_a = sum(n for (name, _), n in backend.reads.items() if name == "a.bin")
    assert gets_of_a <= 4 * 10  # the blocks the 4 workers had started, each with its retries
    assert sum(n for (name, _), n in backend.reads.items() if name == "b.bin") == 3


async def test_model_stream_queues_at_most_max_model_files(
    make_store: StoreFactory, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each queued file's state is outside the budget: past MAX_MODEL_FILES the rest are
    left out, with one warning."""
    monkeypatch.setattr("modelfs.eager.MAX_MODEL_FILES", 3)
    backend = MemoryBackend()
    refs = [put_ramp(backend, f"w{i}.bin", BS, seed=i)[0] for i in range(5)]
    store = await make_store(backend, memory_blocks=16, disk=True)
    streamer = EagerStreamer(store, workers=2)
    await nursery.start(streamer.run)
    with caplog.at_level("WARNING", logger="modelfs.eager"):
        assert streamer.stream_model(refs) == 3
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "--eager-model: more than 3 weight files; streaming the first 3 found (the others load when read)"
    ]
    for ref in refs:
        await streamer.wait(ref)
    assert sorted(name for name, _ in backend.reads) == ["w0.bin", "w1.bin", "w2.bin"]


class _RecordingPattern:
    """A compiled pattern that records the stretch of the header each match may cover."""

    def __init__(self, pattern: re.Pattern[bytes], spans: list[int]) -> None:
        self.pattern = pattern
        self.spans = spans

    def match(self, string: Any, pos: int = 0, endpos: int = sys.maxsize) -> re.Match[bytes] | None:
        self.spans.append(min(endpos, len(string)) - pos)
        return self.pattern.match(string, pos, endpos)


def test_a_huge_header_entry_is_refused_in_bounded_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """``re`` holds the GIL for a whole match: one entry matched whole (a 20M-element shape in
    a 40 MiB header) froze the mount for 2.2 s although the parse runs in a worker thread. An
    entry longer than MAX_ENTRY is refused (the file streams in file order), and no match
    covers more than MAX_METADATA_ENTRY bytes of the header, whatever its size."""
    from modelfs import safetensors_header as sh

    spans: list[int] = []
    monkeypatch.setattr(sh, "_ENTRY", _RecordingPattern(sh._ENTRY, spans))
    monkeypatch.setattr(sh, "_WS_RUN", _RecordingPattern(sh._WS_RUN, spans))
    shape = b"1," * (2 << 20) + b"1"  # a 4 MiB shape array
    huge = b'{"a":{"dtype":"U8","shape":[' + shape + b'],"data_offsets":[0,1]},"b":{"data_offsets":[1,2]}}'
    with pytest.raises(ValueError, match=f"longer than {sh.MAX_ENTRY} bytes"):
        list(sh.iter_spans(huge, 10))
    assert spans and max(spans) <= sh.MAX_METADATA_ENTRY
    # The same shape in __metadata__ (more room, still bounded) is refused too.
    with pytest.raises(ValueError, match=f"longer than {sh.MAX_METADATA_ENTRY} bytes"):
        list(sh.iter_spans(b'{"__metadata__":{"x":[' + shape + b"]}}", 10))
    # Not refused: whitespace of any length between entries and after the object (padding),
    # and a __metadata__ of a few hundred KiB.
    spans.clear()
    pad = b" " * (3 << 20)
    padded = b'{"a":{"data_offsets":[0,1]}' + pad + b"," + pad + b'"b":{"data_offsets":[1,2]}' + pad + b"}" + pad
    assert sh.tensor_spans(padded, 10) == [(0, 1), (1, 2)]
    meta = b'{"__metadata__":{"tags":"' + b"x" * (300 << 10) + b'"},"a":{"data_offsets":[0,4]}}'
    assert sh.tensor_spans(meta, 10) == [(0, 4)]
    assert max(spans) <= sh.MAX_METADATA_ENTRY


async def test_a_header_with_a_huge_entry_streams_in_file_order(
    make_store: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The refused header degrades as any unreadable one: file order, one line in the log."""
    entry = b'{"dtype":"U8","shape":[' + b"1," * (64 << 10) + b'1],"data_offsets":[0,%d]}' % (8 * BS)
    header = b'{"w":' + entry + b"}"
    data = struct.pack("<Q", len(header)) + header + ramp(8 * BS, 3)
    backend = MemoryBackend()
    backend.put("m.safetensors", data)
    store = await make_store(backend, memory_blocks=256, disk=True)
    streamer = await _streamer(store)
    ref = ref_for(backend, "m.safetensors")
    with caplog.at_level("INFO", logger="modelfs.eager"):
        order = await streamer._order(ref)
    assert order == range(store.block_count(ref))
    lines = [r.getMessage() for r in caplog.records if r.name == "modelfs.eager"]
    assert len(lines) == 1 and "not a readable safetensors header" in lines[0], lines


async def test_at_most_max_streams_run_and_the_rest_wait_their_turn(
    make_store: StoreFactory, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Each running stream holds its block order and workers outside the budget, and 60 of
    them starved demand reads: at most MAX_STREAMS run, the next ones queue and start as
    running ones end; a queued file closed before its turn is dropped without a GET."""
    backend = MemoryBackend(latency=0.05)
    files_n = MAX_STREAMS + 3
    blocks = 64  # (a stream takes 32 rounds of GETs: none ends while the files are opened)
    refs = [put_ramp(backend, f"m/{n}.gguf", blocks * BS, seed=n) for n in range(files_n)]
    store = await make_store(backend, memory_blocks=16, disk=True, max_concurrency=4)
    streamer = await _streamer(store, workers=2)
    await nursery.start(streamer.run)
    files = OpenFiles(store, max_prefetch=0, eager=streamer, prefetch_config=TIGHT)
    handles = []
    for ref, data in refs:
        fh = files.open(ref)
        handles.append(fh)
        for offset in (50 * BS, 10 * BS, 30 * BS):  # at random: a stream is asked for
            assert bytes(await files.read(fh, offset, 10)) == data[offset : offset + 10]
    assert streamer.active == MAX_STREAMS and streamer.queued == 3
    files.release(handles[-1])  # the last file's turn has not come: it is dropped
    assert streamer.queued == 2 and streamer.cancelled == 1
    most = 0
    while streamer.active or streamer.queued:
        most = max(most, streamer.active)
        await trio.sleep(0.005)
    assert most <= MAX_STREAMS
    assert streamer.completed == files_n - 1
    await store.drain()
    assert store.disk is not None
    for n, (ref, _) in enumerate(refs):
        on_disk = sum(store.disk.contains((ref.key, ref.version, i)) for i in range(blocks))
        assert on_disk == (3 if n == files_n - 1 else blocks), (n, on_disk)  # (the dropped one: its demand reads)
    for fh in handles[:-1]:
        files.release(fh)


def test_the_block_order_kept_by_a_stream_is_compact() -> None:
    """A stream keeps its order for its whole life, outside the budget: 4-byte ints (a list
    of MAX_ORDERED_BLOCKS ints was 2.53 MiB per stream), made in 0.6 MiB at most."""
    import tracemalloc

    blocks = MAX_ORDERED_BLOCKS
    size = blocks * BS
    header = b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,%d]}}' % (size - BS)
    header += b" " * (BS - 8 - len(header))
    tracemalloc.start()
    try:
        order = safetensors_block_order(header, len(header), BS, size)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert list(order) == list(range(blocks))
    assert isinstance(order, array) and order.itemsize == 4
    assert kept <= blocks * 4 + (16 << 10), kept
    assert peak <= blocks * 9 + (64 << 10), peak  # (with the ordering's 8-byte counts, dropped before)


async def test_a_file_closed_and_reopened_at_once_is_streamed_again(
    make_store: StoreFactory, nursery: trio.Nursery, patient_clock: trio.testing.MockClock
) -> None:
    """The last close cancels the stream, which stays known until its GET unwinds: a reader
    that reopened the file meanwhile joined that cancelled stream and started nothing (a
    loader opening the file per tensor got no stream at all). It gets a new one now."""
    backend = MemoryBackend(latency=1.0)
    ref, data = put_ramp(backend, "w.gguf", 24 * BS)
    store = await make_store(backend, memory_blocks=16, disk=True, max_concurrency=4)
    streamer = await _streamer(store, workers=2)
    await nursery.start(streamer.run)
    files = OpenFiles(store, max_prefetch=0, eager=streamer, prefetch_config=TIGHT)

    async def read_at_random() -> int:
        fh = files.open(ref)
        for offset in (20 * BS, 3 * BS, 11 * BS):
            assert bytes(await files.read(fh, offset, 10)) == data[offset : offset + 10]
        return fh

    fh = await read_at_random()
    assert streamer.active == 1
    await wait_until(lambda: store.slots.in_use > 0)  # the stream's GETs are in flight
    files.release(fh)  # cancels it; its task unwinds once its GETs return
    fh = await read_at_random()  # reopened at once
    await streamer.wait(ref)
    assert streamer.cancelled == 1 and streamer.completed == 1
    # Every block is on disk: the new stream waited for the blocks the cancelled one was
    # still filling, and fetched those whose fill it dropped (it skipped them, and about one
    # run in three left a block off the disk: the hang of a wait for them, and the flake).
    await store.drain()
    disk = store.disk
    assert disk is not None
    buf = memoryview(bytearray(BS))
    for index in range(24):
        assert await disk.read_into((ref.key, ref.version, index), buf), index
        assert bytes(buf) == data[index * BS : (index + 1) * BS]
    files.release(fh)


class _GatedReads(MemoryBackend):
    """The first read at each offset in ``gates`` waits until its event is set; ``arrived``
    is set once a read waits at a gate."""

    def __init__(self, *, joins_reads: bool = False) -> None:
        super().__init__(joins_reads=joins_reads)
        self.gates: dict[int, trio.Event] = {}
        self.arrived = trio.Event()

    async def read_range(self, name: str, version: str, offset: int, dest: memoryview, **kw: int | None) -> None:
        gate = self.gates.pop(offset, None)
        if gate is not None:
            self.arrived.set()
            await gate.wait()
        await super().read_range(name, version, offset, dest, **kw)


@pytest.mark.parametrize("filler", ["cancelled stream", "failed joined read-ahead"])
async def test_a_block_whose_fill_another_task_drops_is_still_streamed_to_disk(
    make_store: StoreFactory, nursery: trio.Nursery, filler: str
) -> None:
    """The stream skipped a block it found in memory while another task was filling it. If
    that fill was then dropped (the worker of a stream cancelled by the file's last close,
    still unwinding, as when the file is reopened at once; a joined read-ahead GET that
    failed, which is not retried), nobody fetched the block: the new stream counted it done,
    it never reached the disk, and a later read fetched it from the backend again."""
    backend = _GatedReads(joins_reads=filler != "cancelled stream")
    ref, data = put_ramp(backend, "w.gguf", 4 * BS)
    store = await make_store(backend, memory_blocks=8, disk=True, join_blocks=4)
    disk = store.disk
    assert disk is not None
    gate = backend.gates[0] = trio.Event()
    old = trio.CancelScope()

    async def old_stream() -> None:
        with old:
            await store.stream(ref, 0)

    if filler == "cancelled stream":
        nursery.start_soon(old_stream)
    else:
        assert store.prefetch_blocks(ref, range(4)) == 4  # one GET of blocks 0-3

        def refuse(name: str, offset: int, length: int) -> None:
            if length > BS:
                raise TransientError("the joined GET fails")

        backend.fault = refuse
    await backend.arrived.wait()  # block 0 is FILLING: its GET waits at the gate
    streamed = trio.Event()

    async def new_stream() -> None:
        await store.stream(ref, 0)
        streamed.set()

    nursery.start_soon(new_stream)
    await trio.testing.wait_all_tasks_blocked()
    if filler == "cancelled stream":
        old.cancel()  # its fill of block 0 is dropped
    else:
        gate.set()  # the joined GET fails: blocks 0-3 are dropped
    await streamed.wait()
    await store.drain()
    key = (ref.key, ref.version, 0)
    assert disk.contains(key), (store.memory.peek(key), dict(backend.reads))
    buf = bytearray(BS)
    assert await disk.read_into(key, memoryview(buf))
    assert bytes(buf) == data[:BS]


async def test_drain_waits_for_the_streams_writes_so_far_and_not_for_later_ones(
    make_store: StoreFactory, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """drain waits for the disk write of every block fetched before it was called, a streamed
    one's too; it used to wait until no write at all was queued, so with blocks still landing
    (a stream, read-ahead) it waited for writes queued after it, as long as they kept coming."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.gguf", 2 * BS)
    store = await make_store(backend, memory_blocks=8, disk=True)
    disk = store.disk
    assert disk is not None
    gates = {index: trio.Event() for index in range(2)}
    written = {index: trio.Event() for index in range(2)}
    write = disk.write

    async def held(key: tuple[str, str, int], view: memoryview, *, crc: int | None = None) -> bool:
        await gates[key[2]].wait()
        try:
            return await write(key, view, crc=crc)
        finally:
            written[key[2]].set()

    monkeypatch.setattr(disk, "write", held)
    await store.stream(ref, 0)  # fetched: its disk write is queued, held
    drained = trio.Event()

    async def drain() -> None:
        await store.drain()
        drained.set()

    nursery.start_soon(drain)
    await store.stream(ref, 1)  # fetched after drain was called: its write is held on
    await trio.testing.wait_all_tasks_blocked()
    assert not drained.is_set()  # block 0's write is not done
    gates[0].set()
    await written[0].wait()
    await trio.testing.wait_all_tasks_blocked()
    assert drained.is_set()  # block 1's write, queued later, is not waited for
    buf = memoryview(bytearray(BS))
    assert await disk.read_into((ref.key, ref.version, 0), buf)
    assert bytes(buf) == data[:BS]
    assert not disk.contains((ref.key, ref.version, 1))
    gates[1].set()
    await store.drain()
    assert await disk.read_into((ref.key, ref.version, 1), buf)
    assert bytes(buf) == data[BS:]
