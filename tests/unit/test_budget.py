"""Every buffer in the one memory budget: leases beside blocks, checked on the accounting itself.

An instrument checks the budget after every step of every trio task: the bytes the cache
counts (``used``) are exactly the blocks' lengths plus the live leases' charges, never more
than the capacity, and the idle pooled buffers fit in what is left.
"""

from __future__ import annotations

import json
import random
import struct

import pytest
import trio
import trio.testing

from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.cache.memory import BufferKind, Lease, MemoryCache
from modelfs.eager import EagerStreamer
from modelfs.files import OpenFiles
from modelfs.prefetch import PrefetchConfig
from modelfs.safetensors_header import MAX_HEADER, PARSE_OVERHEAD, block_order, header_length, tensor_spans

from .conftest import BS, StoreFactory, put_ramp, ref_for

BLOCK = 64 * 1024
TIGHT = PrefetchConfig(backward_tolerance=1024, forward_tolerance=1024)


class BudgetChecker(trio.abc.Instrument):
    """Asserts the budget's invariants after every task step; remembers the highest ``used``."""

    def __init__(self, memory: MemoryCache) -> None:
        self.memory = memory
        self.leases: set[Lease] = set()
        self.peak = 0
        self.peak_leased = 0
        self.steps = 0
        self.failure: str | None = None

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        m = self.memory
        self.steps += 1
        blocks = sum(b.charge for b in m._blocks.values())
        leased = sum(lease.charge for lease in self.leases if lease._cache is not None)
        self.peak = max(self.peak, m.used)
        self.peak_leased = max(self.peak_leased, m.leased)
        problems = []
        if m.used != blocks + m.leased:
            problems.append(f"used {m.used} != blocks {blocks} + leased {m.leased}")
        if m.leased != leased or m.leased != sum(m.leased_by_kind.values()):
            problems.append(f"leased {m.leased} != live leases {leased} / by kind {m.leased_by_kind}")
        if m.used > m.capacity or m.used + m.pooled_bytes > m.capacity:
            problems.append(f"used {m.used} + pooled {m.pooled_bytes} > capacity {m.capacity}")
        if m.leased > m.max_lease:
            problems.append(f"leased {m.leased} > max_lease {m.max_lease}")
        if problems and self.failure is None:
            self.failure = "; ".join(problems)


def track_leases(memory: MemoryCache, checker: BudgetChecker) -> None:
    """Let the checker see every lease the cache hands out."""
    original = memory.lease

    async def lease(nbytes: int, kind: BufferKind, *, extra: int = 0) -> Lease:
        got = await original(nbytes, kind, extra=extra)
        checker.leases.add(got)
        return got

    memory.lease = lease  # type: ignore[method-assign]


# --- the cache's lease accounting


async def test_lease_counts_in_used_and_comes_back() -> None:
    cache = MemoryCache(4 * BS, BS)
    lease = await cache.lease(100, BufferKind.SMALL_READ)
    assert lease.charge == BS  # whole pages: what the mapping can hold resident
    assert cache.used == cache.leased == BS and cache.leased_by_kind[BufferKind.SMALL_READ] == BS
    assert len(lease.view) == 100
    lease.view[:] = b"x" * 100
    lease.release()
    lease.release()  # idempotent
    assert cache.used == cache.leased == 0 and len(lease.view) == 0
    with await cache.lease(0, BufferKind.HEADER, extra=1000) as extra_only:
        assert extra_only.charge == 1000 and cache.used == 1000
    assert cache.used == 0
    assert cache.stats.leases == 2


async def test_lease_evicts_unpinned_blocks() -> None:
    cache = MemoryCache(4 * BS, BS)
    for i in range(4):
        block = await cache.reserve(("o", "v", i), BS)
        assert block is not None
        cache.complete(block)
        cache.unpin(block)
    assert cache.used == 4 * BS
    with await cache.lease(2 * BS, BufferKind.BOUNDARY):
        assert cache.used == 4 * BS and len(cache) == 2  # the two least recently used went
        assert cache.lookup(("o", "v", 0)) is None and cache.lookup(("o", "v", 3)) is not None


async def test_lease_waits_while_the_budget_is_pinned() -> None:
    """With every byte pinned a lease waits (never allocates past the budget) until a block is unpinned."""
    cache = MemoryCache(3 * BS, BS)
    pinned = []
    for i in range(3):
        block = await cache.reserve(("o", "v", i), BS)
        assert block is not None
        pinned.append(block)
    got: list[Lease] = []

    async def want() -> None:
        got.append(await cache.lease(BS, BufferKind.SMALL_READ))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(want)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and cache.used == 3 * BS
        cache.complete(pinned[0])
        cache.unpin(pinned[0])
    assert len(got) == 1 and cache.used == 3 * BS and cache.stats.lease_waits == 1
    got[0].release()


async def test_leases_leave_room_for_one_block() -> None:
    """Leases together stay below capacity - block_size: a lease holder waiting for a block gets one."""
    cache = MemoryCache(4 * BS, BS)
    assert cache.max_lease == 3 * BS
    assert cache.can_lease(3 * BS) and not cache.can_lease(3 * BS + 1)
    with pytest.raises(ValueError):
        await cache.lease(3 * BS + 1, BufferKind.BOUNDARY)
    held = [await cache.lease(BS, BufferKind.BOUNDARY) for _ in range(3)]
    waiting: list[Lease] = []
    async with trio.open_nursery() as nursery:

        async def fourth() -> None:
            waiting.append(await cache.lease(BS, BufferKind.BOUNDARY))

        nursery.start_soon(fourth)
        await trio.testing.wait_all_tasks_blocked()
        assert waiting == []  # the fourth waits although a block's worth is free ...
        block = await cache.reserve(("o", "v", 0), BS)  # ... which a block can always take
        assert block is not None and cache.used == 4 * BS
        held.pop().release()
    assert len(waiting) == 1
    for lease in [*held, *waiting]:
        lease.release()
    cache.complete(block)
    cache.unpin(block)
    assert cache.used == BS


async def test_droppable_leases_give_their_room_to_leases_that_need_it() -> None:
    """Room kept only to be quicker (a parsed manifest) is given back, the oldest first and no
    more than needed, when a lease finds none, its holder told; kept, a lease told it fits
    (can_lease) would wait for it for ever."""
    cache = MemoryCache(4 * BS, BS)  # leases: at most 3 blocks' worth
    dropped: list[str] = []
    kept = {name: await cache.lease(0, BufferKind.INDEX, extra=BS) for name in ("old", "new")}
    for name, lease in kept.items():
        lease.droppable(lambda name=name: dropped.append(name))
    small = await cache.lease(0, BufferKind.SMALL_READ, extra=BS)  # (fits beside both)
    assert dropped == []
    with trio.fail_after(60):  # (only ends a wait that never ends)
        big = await cache.lease(0, BufferKind.HEADER, extra=BS)
    assert dropped == ["old"] and cache.leased == 3 * BS
    kept["new"].release()  # (released by its holder: nothing to tell)
    small.release()
    big.release()
    assert dropped == ["old"] and cache.leased == 0 and not cache._droppable


async def test_pooled_lease_buffers_stay_within_budget() -> None:
    cache = MemoryCache(4 * BS, BS)
    for size in (BS, 2 * BS, 100, 3 * BS, BS, 2 * BS):
        with await cache.lease(size, BufferKind.SMALL_READ):
            assert cache.used + cache.pooled_bytes <= cache.capacity
        assert cache.used + cache.pooled_bytes <= cache.capacity
    # Blocks take back what the pool holds.
    for i in range(4):
        block = await cache.reserve(("o", "v", i), BS)
        assert block is not None
        assert cache.used + cache.pooled_bytes <= cache.capacity
    assert cache.parts()["blocks"] == 4 * BS and cache.parts()["blocks_in_flight"] == 4 * BS


# --- concurrent small, boundary and block reads, and a header parse, through OpenFiles


async def test_a_lease_that_can_be_granted_is_granted_whatever_the_pool_holds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A pooled buffer larger than asked is not charged when it would not fit beside the
    lease's ``extra``: a fresh one is used (before: the lease took the same pooled buffer on
    every wake-up and waited forever, with nothing else holding memory)."""
    mib = 1 << 20
    cache = MemoryCache(8 * mib, 4 * mib)  # leases up to 4 MiB
    with await cache.lease(mib, BufferKind.BOUNDARY):  # a read across a block edge ...
        pass  # ... leaves a 1 MiB buffer in the pool
    header = 800 << 10
    assert cache.can_lease(header, extra=4 * header)
    with trio.fail_after(60):  # (the mock clock jumps: a wait forever fails here)
        lease = await cache.lease(header, BufferKind.HEADER, extra=4 * header)
    assert lease.charge <= cache.max_lease and len(lease.view) == header
    lease.release()
    assert cache.used == 0 and cache.leased == 0


async def test_concurrent_reads_never_exceed_the_budget(make_store: StoreFactory) -> None:
    """32 readers (random small reads, reads across block edges, sequential block reads) and an
    eager header parse share a 6-block budget: the accounting never passes it, bytes are right."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.bin", 48 * BLOCK + 123, seed=11)
    tensors = {
        f"t{i}": {"dtype": "U8", "shape": [BLOCK], "data_offsets": [i * BLOCK, (i + 1) * BLOCK]} for i in range(8)
    }
    header = json.dumps(tensors).encode() + b" " * 3000
    model = struct.pack("<Q", len(header)) + header + ramp(8 * BLOCK, 4)
    backend.put("m.safetensors", model)
    store = await make_store(backend, block_size=BLOCK, memory_blocks=6, disk=True, max_concurrency=3)
    memory = store.memory
    checker = BudgetChecker(memory)
    track_leases(memory, checker)
    streamer = EagerStreamer(store, workers=2)
    files = OpenFiles(store, max_prefetch=2 * BLOCK, random_read_size=4096, prefetch_config=TIGHT, eager=streamer)
    trio.lowlevel.add_instrument(checker)
    errors: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(streamer.run)

            async def reader(i: int) -> None:
                rng = random.Random(i)
                fh = files.open(ref)
                try:
                    for n in range(12):
                        if i % 3 == 0:  # small random reads (the detector turns them into small GETs)
                            size = rng.randrange(1, 2048)
                            offset = rng.randrange(0, len(data) - size)
                        elif i % 3 == 1:  # across a block edge, up to 1.5 blocks
                            size = rng.randrange(BLOCK // 2, BLOCK + BLOCK // 2)
                            offset = rng.randrange(1, 40) * BLOCK - rng.randrange(1, BLOCK // 2)
                        else:  # sequential through blocks
                            size = BLOCK // 2
                            offset = (i * 7 + n) * size % (len(data) - size)
                        got = bytes(await files.read(fh, offset, size))
                        if got != data[offset : offset + size]:
                            errors.append(f"reader {i}: [{offset}, +{size}] wrong")
                        await trio.sleep(0)
                finally:
                    files.release(fh)

            async def header_reader() -> None:
                model_ref = ref_for(backend, "m.safetensors")
                fh = files.open(model_ref)
                try:
                    for offset in (0, 7 * BLOCK, 2 * BLOCK, 5 * BLOCK):  # seeks: the file streams
                        got = bytes(await files.read(fh, offset, 100))
                        assert got == model[offset : offset + 100]
                    await streamer.wait(model_ref)
                finally:
                    files.release(fh)

            async with trio.open_nursery() as readers:
                for i in range(32):
                    readers.start_soon(reader, i)
                readers.start_soon(header_reader)
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(checker)
    assert errors == []
    assert checker.failure is None, checker.failure
    assert checker.steps > 100
    assert checker.peak <= memory.capacity and memory.stats.peak_bytes <= memory.capacity
    kinds = {lease.kind for lease in checker.leases}
    assert {BufferKind.SMALL_READ, BufferKind.BOUNDARY, BufferKind.HEADER} <= kinds, kinds
    assert store.stats.small_gets > 0
    assert memory.leased == 0 and memory.used <= memory.capacity


# --- the safetensors header: bounded, distrustful


def test_header_entries_with_bad_offsets_are_ignored() -> None:
    header = json.dumps(
        {
            "ok": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
            "negative": {"data_offsets": [-8, 4]},
            "past_end": {"data_offsets": [4, 10_000]},
            "reversed": {"data_offsets": [9, 5]},
            "bools": {"data_offsets": [False, True]},
            "floats": {"data_offsets": [0.0, 4.0]},
            "three": {"data_offsets": [0, 1, 2]},
            "string": {"data_offsets": "0-4"},
            "no_offsets": {"dtype": "U8"},
            "__metadata__": {"format": "pt"},
            "last": {"data_offsets": [4, 100]},
        }
    ).encode()
    assert tensor_spans(header, 100) == [(0, 4), (4, 100)]
    assert block_order(tensor_spans(header, 100), len(header), BS, 8 + len(header) + 100)[0] == 0


@pytest.mark.parametrize("bad", [b"[1, 2]", b"\xff\xfe{}", b"{", b"nul", b'{"data_offsets": [0, 1]}', b"42"])
def test_header_that_is_not_an_object_of_tensors_is_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        tensor_spans(bad, 100)


def test_header_with_no_tensors_is_empty() -> None:
    assert tensor_spans(b'  {"__metadata__": {"a": "b"}}', 10) == []
    assert tensor_spans(b"{}", 10) == []


def test_header_length_is_capped() -> None:
    assert header_length(struct.pack("<Q", 10), 100) == 10
    with pytest.raises(ValueError):
        header_length(struct.pack("<Q", 93), 100)  # longer than the file
    with pytest.raises(ValueError):
        header_length(struct.pack("<Q", MAX_HEADER + 1), 1 << 40)
    with pytest.raises(ValueError):
        header_length(struct.pack("<Q", 2**63), 1 << 40)


async def test_header_too_large_for_the_budget_streams_in_file_order(make_store: StoreFactory) -> None:
    """A header that could not be parsed within the budget is not read: the file streams in
    file order, and nothing is allocated for it."""
    backend = MemoryBackend()
    header = json.dumps({"t": {"dtype": "U8", "shape": [10], "data_offsets": [0, 10]}}).encode() + b" " * (6 * BS)
    model = struct.pack("<Q", len(header)) + header + ramp(10, 1)
    backend.put("m.safetensors", model)
    ref = ref_for(backend, "m.safetensors")
    store = await make_store(backend, memory_blocks=8, disk=True)  # leases up to 7 blocks < 5 x header
    streamer = EagerStreamer(store, workers=1)
    order = await streamer._order(ref)
    assert list(order) == list(range(store.block_count(ref)))
    assert store.memory.stats.leases == 0


_SHAPE = 256 << 10  # each shape about this long


def _repeat(start: bytes, item: bytes, last: bytes) -> bytes:
    return start + item * ((_SHAPE - len(start) - len(last)) // len(item)) + last


_HOSTILE_HEADERS = {
    # What json.loads kept alive before anything could be dropped (22x and more).
    "empty lists": _repeat(b'{"x":[', b"[],", b"[]]}"),
    "empty lists in an entry": _repeat(b'{"x":{"a":[', b"[],", b"[]]}}"),
    "empty objects": _repeat(b'{"x":{"a":[', b"{},", b"{}]}}"),
    "distinct keys": b'{"x":{' + b",".join(b'"%d":0' % i for i in range(_SHAPE // 10)) + b"}}",
    "floats in an array": _repeat(b'{"x":{"a":[', b"1.5,", b"1]}}"),
    "short strings in an array": _repeat(b'{"x":{"a":[', b'"ab",', b"1]}}"),
    "astral escapes": _repeat(b'{"x":{"a":"', b"\\ud83d\\ude00a", b'"}}'),
    "escapes": _repeat(b'{"x":{"a":"', b"\\n", b'"}}'),
    "deep arrays": b"[" * _SHAPE,
    "deep objects": b'{"a":' * (_SHAPE // 5),
    # What the parser keeps: one span per entry, the smallest entries.
    "tiny entries": _repeat(b"{", b'"":{"data_offsets":[257,258]},', b'"":{}}'),
    "tiny entries, big offsets": _repeat(
        b"{", b'"":{"data_offsets":[1152921504606846976,1152921504606846977]},', b'"":{}}'
    ),
    "tiny entries, small offsets": _repeat(b"{", b'"":{"data_offsets":[0,1]},', b'"":{}}'),
}


@pytest.mark.parametrize("name", list(_HOSTILE_HEADERS))
def test_header_parse_stays_within_what_the_budget_charges(name: str) -> None:
    """Whatever its shape, parsing a header allocates at most PARSE_OVERHEAD times its size
    (the eager stream leases that beside the header's own bytes); a shape that is not a
    safetensors header (nested, or not JSON) is refused with ValueError, never RecursionError."""
    import tracemalloc

    header = _HOSTILE_HEADERS[name]
    tracemalloc.start()
    try:
        tensor_spans(header, 1 << 62)
    except ValueError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= PARSE_OVERHEAD * len(header), f"{peak / len(header):.1f}x"


@pytest.mark.parametrize("bad", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"{}" + b"}" * 100_000])
def test_deeply_nested_header_is_refused_as_bad(bad: bytes) -> None:
    with pytest.raises(ValueError):
        tensor_spans(bad, 100)


async def test_deeply_nested_header_streams_in_file_order(make_store: StoreFactory) -> None:
    backend = MemoryBackend()
    header = b'{"a":' * 50_000 + b"{}" + b"}" * 50_000
    backend.put("m.safetensors", struct.pack("<Q", len(header)) + header + ramp(10, 1))
    ref = ref_for(backend, "m.safetensors")
    store = await make_store(backend, memory_blocks=512, disk=True)
    order = await EagerStreamer(store, workers=1)._order(ref)
    assert list(order) == list(range(store.block_count(ref)))


# --- HTTP directory index bodies and probe bodies

# Stopping an httpx body early leaves its (and the mock stream's) async generators to the
# garbage collector, which trio reports as a ResourceWarning: that is httpx's, not a leak.
_EARLY_STOP = pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")


def _index_backend(pages: dict[str, bytes], budget: MemoryCache | None, chunked: bool = False) -> object:
    import httpx

    from modelfs.backends.http import HTTPBackend
    from modelfs.config import parse_source

    class Chunks(httpx.AsyncByteStream):
        def __init__(self, data: bytes) -> None:
            self.data = data

        async def __aiter__(self):  # type: ignore[no-untyped-def]
            for i in range(0, len(self.data), 1000):
                yield self.data[i : i + 1000]

    def handler(request: httpx.Request) -> httpx.Response:
        body = pages.get(request.url.path)
        if body is None:
            return httpx.Response(404)
        headers = {"Content-Type": "application/json"}
        if not chunked:
            headers["Content-Length"] = str(len(body))
        return httpx.Response(200, stream=Chunks(body), headers=headers)

    b = HTTPBackend(parse_source("https://example.test/models/"), budget=budget)
    b._client = httpx.AsyncClient(transport=httpx.MockTransport(handler), follow_redirects=True)
    return b


@pytest.mark.parametrize("chunked", [False, True])
async def test_index_body_is_read_into_the_budget(chunked: bool) -> None:
    """A directory index of ~300 KiB is read into INDEX leases (growing when no length is sent)
    and parsed with its objects counted: the budget never passes its capacity."""
    entries = [
        {"name": f"f{i:06d}.bin", "type": "file", "size": i, "mtime": "Sat, 01 Jan 2026 00:00:00 GMT"}
        for i in range(3000)
    ]
    entries.append({"name": "sub", "type": "directory"})
    body = json.dumps(entries).encode()
    cache = MemoryCache(8 << 20, 1 << 20)
    checker = BudgetChecker(cache)
    track_leases(cache, checker)
    b = _index_backend({"/models/": body}, cache, chunked)
    trio.lowlevel.add_instrument(checker)
    try:
        listed = await b._index_dir("")  # type: ignore[attr-defined]
    finally:
        trio.lowlevel.remove_instrument(checker)
    entries = listed.entries  # sorted, a subdirectory's name with '/' after it
    assert len(entries) == 3001 and entries[7] == ("f000007.bin", 7) and entries[-1] == ("sub/", None)
    assert checker.failure is None, checker.failure
    assert {lease.kind for lease in checker.leases} == {BufferKind.INDEX}
    assert checker.peak_leased >= len(body) * 4  # body + the parser's objects were counted
    assert cache.leased == listed.charge  # the sorted entries stay counted until released
    listed.release()
    assert cache.leased == 0


@_EARLY_STOP
async def test_index_larger_than_the_budget_allows_is_a_clear_error() -> None:
    from modelfs.errors import BackendError

    body = json.dumps([{"name": f"f{i:06d}.bin", "type": "file", "size": i} for i in range(20000)]).encode()
    cache = MemoryCache(2 << 20, 1 << 20)  # leases up to 1 MiB: not enough for ~900 KiB + parsing
    b = _index_backend({"/models/": body}, cache, chunked=True)
    with pytest.raises(BackendError, match="memory budget"):
        await b._index_dir("")  # type: ignore[attr-defined]
    assert cache.leased == 0


def test_parse_index_keeps_name_type_size_only() -> None:
    from modelfs.backends.http import parse_index

    body = (
        b'[{"name":"a","type":"file","size":3,"mtime":"x"},{"name":5},{"type":"file"},"x",'
        b'{"name":"b","size":true},{"name":"c","size":-1}]'
    )
    assert parse_index(body) == [("a", "file", 3), ("b", None, None), ("c", None, None)]
    assert parse_index(b'{"name": "a"}') is None
    assert parse_index(b"<html>") is None
    assert parse_index(b"\xff") is None


@pytest.mark.parametrize(
    "shape",
    [
        b"[" + b"[]," * 300_000 + b"[]]",  # json.loads: 22x the body in lists before any check
        b"[" + b"{}," * 300_000 + b"{}]",
        b'[{"name":"a","x":[' + b"1," * 300_000 + b"1]}]",
        b"[" + b'{"name":"a"},' * 100_000 + b"{}]",  # the most entries per byte
        b"[" + b'{"name":"a","type":"file","size":1},' * 50_000 + b"{}]",
        b"[" + b'"s",' * 200_000 + b"null]",
    ],
)
def test_parsing_an_index_holds_no_more_than_its_charge(shape: bytes) -> None:
    """The index is matched in place (modelfs.jsonscan), never handed to json.loads: whatever
    its shape, parsing holds at most what _get_index charges for it (INDEX_ENTRY_BYTES per
    object it could hold, and its length for the names)."""
    import tracemalloc

    from modelfs.backends.http import INDEX_ENTRY_BYTES, count_index_objects, parse_index

    charge = count_index_objects(shape) * INDEX_ENTRY_BYTES + len(shape)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        parsed = parse_index(shape)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= charge, (peak, charge)
    expected = json.loads(shape)
    if any(isinstance(item, list) for item in expected):
        assert parsed is None  # (an array is not an index entry: not an index)
    else:
        named = [i for i in expected if isinstance(i, dict) and isinstance(i.get("name"), str)]
        assert parsed is not None and len(parsed) == len(named)


def test_parse_index_decodes_what_json_would() -> None:
    from modelfs.backends.http import parse_index

    entries = [
        {"name": 'caf\u00e9 "q" \\ b.bin', "type": "file", "mtime": "x", "size": 12},
        {"name": "d\u0000ir", "type": "directory"},
        {"type": "file", "name": "late", "size": 1.5},
        {"name": "big", "size": 2**70},
        {"name": "twice", "name2": 1, "size": 1, "size": 2},  # noqa: F601 (a repeated key: the last)
    ]
    body = json.dumps(entries, ensure_ascii=False, indent=1).replace("\\\\u", "\\u").encode()
    parsed = parse_index(body)
    assert parsed is not None
    assert [(n, t) for n, t, _ in parsed] == [(e["name"], e.get("type")) for e in entries]
    assert [size for _, _, size in parsed] == [12, None, None, None, 2]


@_EARLY_STOP
async def test_probe_body_is_read_no_further_than_a_bound() -> None:
    """A server that answers a one-byte probe with a huge body is not read to its end."""
    import httpx

    from modelfs.backends.http import HTTPBackend
    from modelfs.config import parse_source

    sent = [0]

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            while sent[0] < 1 << 30:
                sent[0] += 1 << 16
                yield b"x" * (1 << 16)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(405)
        return httpx.Response(206, stream=Endless(), headers={"Content-Range": "bytes 0-0/5000", "ETag": '"e"'})

    b = HTTPBackend(parse_source("https://example.test/models/m.bin"))
    b._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    info = await b.stat("m.bin")
    assert info.size == 5000
    assert sent[0] <= 1 << 18
