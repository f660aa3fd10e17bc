"""Eager streaming: copy whole weight files into the disk cache in the background.

mmap'd loaders (safetensors, torch.load(mmap=True), llama.cpp) fault pages in their own
order, which over a network filesystem turns into slow scattered reads. Once a reader of a
weight file reads at random — two seeks among its last 64 reads — (or, with
``--eager-model``, for every weight file at mount time),
the file's blocks are fetched with parallel ranged GETs in file order into the disk cache,
so the loader's faults find them local. A reader that only reads from start to end never
starts a stream: its read-ahead is as fast, and a stream beside it costs more CPU per GiB
(blocks fetched, written, evicted and read back from disk; see benchmarks/README.md). Demand
reads still go first: the stream only takes GET slots nobody is waiting for, and memory that
holds no unread data.

For ``.safetensors`` the JSON header is parsed first and the tensor data is streamed in the
order of the tensors' offsets, after the header's own blocks. A GGUF file needs no parsing
for the same order: its header (metadata, then the tensor infos) comes first and the tensor
data follows in ascending offsets (llama.cpp's writer lays it out so), so file order is
header first, then tensors by offset.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import trio

from modelfs.cache.blocks import BlockStore, ObjectRef
from modelfs.cache.memory import BufferKind
from modelfs.safetensors_header import PARSE_OVERHEAD, header_length, safetensors_block_order
from modelfs.stopping import stopping

__all__ = [
    "MAX_MODEL_FILES",
    "MAX_ORDERED_BLOCKS",
    "MAX_QUEUED_STREAMS",
    "MAX_STREAMS",
    "EagerStreamer",
    "ReaderActivity",
    "WEIGHT_SUFFIXES",
    "safetensors_block_order",
]

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".onnx")

MAX_ORDERED_BLOCKS = 1 << 16
"""The most blocks of one file put in header order; a file of more blocks (a huge shard with a
small --block-size) streams in file order, which needs no list. The order is an array of 4-byte
ints outside the memory budget: 256 KiB at most, kept while the stream runs, and 0.56 MiB while
it is made (with the ordering's 8-byte counts; measured with tracemalloc). It was a list of
ints, 2.53 MiB kept per stream, with which 60 streams at once took 107 MiB past the bound."""

MAX_STREAMS = 4
"""Streams of files read at random that run at once; more wait in a queue (first come, first
served) and start as running ones end. Each running stream holds its block order and
``workers`` tasks: with :data:`MAX_ORDERED_BLOCKS`, 4 x 0.56 MiB at most, inside the fixed
overhead beside the --eager-model run's one order (memlimit.FIXED_OVERHEAD). Two streams
already take every GET slot (each has ``--max-concurrency / 2`` workers); the other two keep
the slots busy while a stream pauses for a sequential reader or waits for memory. Without a
cap, 60 files read at random ran 60 streams, whose workers together starved demand reads for
up to 121 s."""

MAX_QUEUED_STREAMS = 1024
"""Streams waiting for their turn at most (~1.4 KB each until they start or their file
closes, like a model file's: 1.4 MiB); a file read at random beyond them is not streamed until
one of its later random reads finds room in the queue."""

MAX_MODEL_FILES = 4096
"""The most weight files --eager-model queues: each holds ~1.4 KB until the stream ends (its
reference, cancel scope, event and reader activity), outside the memory budget, so the fixed
overhead covers 5.6 MiB of them. The largest models have hundreds of shards; beyond that
the first files found are streamed and one warning names the rest as left out."""


def _failure_level() -> int:
    """A stream that fails while the daemon stops failed because of the stop: debug, not info."""
    return logging.DEBUG if stopping() else logging.INFO


class ReaderActivity:
    """Sequential progress of the readers of one streamed file, signalled by the readers.

    The reader side (``OpenFiles.read``) calls :meth:`progressed` on each read that continues
    a sequential run; the stream side asks :meth:`moved` (has a reader streamed since I last
    looked?) and awaits :meth:`quiet` (until no reader has streamed for ``idle`` seconds).
    A waiting stream sleeps in a cancel scope whose deadline each progress pushes forward, so
    it wakes once, when the reader stops or seeks, not once per read or per polling period
    (compare mountpoint-s3's backpressure controller: the consumer signals, the producer waits).
    """

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.count = 0  # sequential reads signalled so far
        self._seen = 0  # ``count`` when the stream last looked
        self._last = -math.inf  # trio time of the last signal
        self._waiting: set[trio.CancelScope] = set()

    def progressed(self) -> None:
        self.count += 1
        self._last = trio.current_time()
        for scope in self._waiting:
            scope.deadline = self._last + self.idle

    def moved(self) -> bool:
        """Whether a reader made sequential progress since the stream last looked."""
        moved = self.count != self._seen
        self._seen = self.count
        return moved

    async def quiet(self) -> bool:
        """Wait while readers keep streaming; True if it had to wait (the stream paused)."""
        if not self.moved() or self._last + self.idle <= trio.current_time():
            return False
        with trio.CancelScope(deadline=self._last + self.idle) as scope:
            self._waiting.add(scope)
            try:
                await trio.sleep_forever()
            finally:
                self._waiting.discard(scope)
        self._seen = self.count
        return True


@dataclass(eq=False)
class _Stream:
    ref: ObjectRef
    activity: ReaderActivity
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    users: int = 0  # open handles whose reads started or joined it
    pinned: bool = False  # started at mount (--eager-model): no close cancels it
    done: trio.Event = field(default_factory=trio.Event)
    deferred: bool = False  # model stream: put off behind the other files (a reader streamed it)
    failed: bool = False  # model stream: a block failed, the rest of this file is not streamed


@dataclass(eq=False)
class _ModelRun:
    """The --eager-model stream's shared position: its workers take each block once, in order."""

    queue: deque[_Stream]  # files not started yet (random readers move theirs to the front)
    # Put off: a reader streamed them. Their orders are dropped and made again when they come
    # back (the blocks already on disk are skipped): kept, each would hold its order.
    later: deque[_Stream] = field(default_factory=deque)
    current: tuple[_Stream, Iterator[int]] | None = None  # the file under way and its blocks left
    lock: trio.Lock = field(default_factory=trio.Lock)


class EagerStreamer:
    """Starts, tracks and cancels the background stream of each weight file."""

    def __init__(
        self,
        store: BlockStore,
        *,
        suffixes: Iterable[str] = WEIGHT_SUFFIXES,
        workers: int = 4,
        enabled: bool = True,
        reader_idle: float = 0.05,
        yield_to_readers: bool = True,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        self.store = store
        self.suffixes = tuple(s.lower() for s in suffixes)
        self.workers = max(1, workers)
        self.enabled = enabled and store.disk is not None
        # A stream pauses while a reader streams the file itself, until the reader has made no
        # sequential progress for ``reader_idle`` seconds (it stopped, or went back to seeking).
        self.reader_idle = reader_idle
        self.yield_to_readers = yield_to_readers
        self._streams: dict[tuple[str, str], _Stream] = {}
        self.max_streams = max(1, max_streams)
        self._running = 0  # random readers' streams running now (not the --eager-model run)
        self._waiting: deque[_Stream] = deque()  # random readers' streams waiting for their turn
        self._model_queue: deque[_Stream] = deque()  # --eager-model files not started yet
        self._nursery: trio.Nursery | None = None
        self.completed = 0
        self.cancelled = 0
        self.pauses = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def wants(self, name: str) -> bool:
        return self.enabled and name.lower().endswith(self.suffixes)

    @property
    def active(self) -> int:
        """Streams under way or queued by --eager-model (not those waiting for their turn)."""
        return len(self._streams) - len(self._waiting)

    @property
    def queued(self) -> int:
        """Random readers' streams waiting for a running one to end (:data:`MAX_STREAMS`)."""
        return len(self._waiting)

    def stream_model(self, refs: Iterable[ObjectRef]) -> int:
        """--eager-model: stream these weight files one after another, in name order.

        One file at a time, all workers on it, rather than every file at once: a model
        server loads its shards in name order, so a server that starts while the stream
        runs finds its first shards complete (all files at once, each finished only near
        the end). A file a reader streams through itself is put off until the rest are
        done (its read-ahead already fetches it); a queued file that a reader starts reading
        at random is moved to the front.
        At most :data:`MAX_MODEL_FILES` files are queued (the first ``refs`` gives).
        Returns how many files were queued.
        """
        if self._nursery is None:
            return 0
        wanted = [ref for ref in refs if self.wants(ref.name) and ref.size > 0]
        if len(wanted) > MAX_MODEL_FILES:
            log.warning(
                "--eager-model: more than %d weight files; streaming the first %d found (the others load when read)",
                MAX_MODEL_FILES,
                MAX_MODEL_FILES,
            )
            del wanted[MAX_MODEL_FILES:]
        disk = self.store.disk
        room = disk.capacity * 0.9 if disk is not None else 0
        queue: deque[_Stream] = deque()
        for ref in sorted(wanted, key=lambda r: r.name):
            if (ref.key, ref.version) in self._streams:
                continue
            if ref.size > room:
                log.info("not streaming %s: the disk cache has no room left for it", ref.name)
                continue
            room -= ref.size
            stream = _Stream(ref, ReaderActivity(self.reader_idle), pinned=True)
            self._streams[(ref.key, ref.version)] = stream
            queue.append(stream)
        if queue:
            self._model_queue = queue
            self._nursery.start_soon(self._run_model, queue)
        return len(queue)

    def read_at_random(self, ref: ObjectRef) -> bool:
        """A reader of ``ref`` reads it at random: stream it if it is not streaming already.

        At most :data:`MAX_STREAMS` such streams run; the next ones wait their turn. False if
        the queue was full too (ask again at a later random read), else True (the stream
        runs, waits, or will not be: nothing to ask again). Each True is one user, whose
        handle's close is :meth:`closed`.
        """
        if not self.wants(ref.name) or self._nursery is None or ref.size == 0:
            return True
        key = (ref.key, ref.version)
        stream = self._streams.get(key)
        if stream is not None and not stream.pinned and stream.scope.cancel_called:
            # Its last handle closed a moment ago and its task is still unwinding (a GET in
            # flight): gone for this reader, who gets a stream of its own (else a loader that
            # closes and reopens a file would find it and never be streamed).
            stream = None
        if stream is not None and stream in self._model_queue:
            # Waiting its turn in the model stream while a reader needs it now: next.
            self._model_queue.remove(stream)
            self._model_queue.appendleft(stream)
        if stream is None:
            disk = self.store.disk
            if disk is not None and ref.size > disk.capacity * 0.9:
                log.info("not streaming %s: larger than the disk cache", ref.name)
                return True
            if self._running >= self.max_streams and len(self._waiting) >= MAX_QUEUED_STREAMS:
                log.debug("not streaming %s yet: %d streams wait already", ref.name, len(self._waiting))
                return False
            stream = _Stream(ref, ReaderActivity(self.reader_idle))
            self._streams[key] = stream
            if self._running < self.max_streams:
                self._start(stream)
            else:
                self._waiting.append(stream)
        stream.users += 1
        return True

    def _start(self, stream: _Stream) -> None:
        assert self._nursery is not None
        self._running += 1
        self._nursery.start_soon(self._run_stream, stream)

    def _start_waiting(self) -> None:
        """Start queued streams while fewer than :data:`MAX_STREAMS` run (not once stopping)."""
        if self._nursery is None or self._nursery.cancel_scope.cancel_called:
            return
        while self._waiting and self._running < self.max_streams:
            self._start(self._waiting.popleft())

    def closed(self, ref: ObjectRef) -> None:
        """A handle closed: the last one cancels a stream the mount did not ask for."""
        stream = self._streams.get((ref.key, ref.version))
        if stream is None:
            return
        stream.users = max(0, stream.users - 1)
        if stream.users == 0 and not stream.pinned:
            if stream in self._waiting:  # (never started: nothing to unwind)
                self._waiting.remove(stream)
                del self._streams[(ref.key, ref.version)]
                self.cancelled += 1
                stream.done.set()
            else:
                stream.scope.cancel()

    def reader_progressed(self, ref: ObjectRef) -> None:
        """A read of ``ref`` continued a sequential run: a stream of it holds back."""
        stream = self._streams.get((ref.key, ref.version))
        if stream is not None:
            stream.activity.progressed()

    async def wait(self, ref: ObjectRef) -> None:
        """Wait until the stream of ``ref`` (if any) has ended."""
        stream = self._streams.get((ref.key, ref.version))
        if stream is not None:
            await stream.done.wait()

    async def _yield_to_sequential_reader(self, stream: _Stream) -> None:
        """Pause while a reader streams this file sequentially.

        Its read-ahead already fetches at full speed and writes every block through to the
        disk cache; a stream beside it would only fetch blocks that get evicted and read
        back from disk before the reader arrives (several times the CPU per GiB, see
        benchmarks/README.md). The stream goes on when the reader seeks or stops.
        """
        if self.yield_to_readers and await stream.activity.quiet():
            self.pauses += 1

    async def _order(self, ref: ObjectRef) -> Sequence[int]:
        await self.store.prepare(ref)  # (its blocks already on disk are skipped, not fetched)
        blocks = self.store.block_count(ref)
        if not ref.name.lower().endswith(".safetensors") or ref.size < 8:
            return range(blocks)
        if blocks > MAX_ORDERED_BLOCKS:
            log.info("%s: %d blocks, more than are put in header order; streaming in file order", ref.name, blocks)
            return range(blocks)
        try:
            return await self._safetensors_order(ref)
        except ValueError as exc:
            log.info("%s: not a readable safetensors header (%s); streaming in file order", ref.name, exc)
            return range(blocks)

    async def _safetensors_order(self, ref: ObjectRef) -> Sequence[int]:
        """The header read into a lease of the memory budget (with room for the parser's
        objects) and parsed in a worker thread; ValueError if it is bad or too large."""
        bs = self.store.block_size
        first = await self.store.get(ref, 0)
        header_len = header_length(first.view[:8], ref.size)
        memory = self.store.memory
        extra = header_len * PARSE_OVERHEAD
        if not memory.can_lease(header_len, extra=extra):
            raise ValueError(f"a header of {header_len} bytes is too large to parse within the memory budget")
        with await memory.lease(header_len, BufferKind.HEADER, extra=extra) as lease:
            header = lease.view
            offset = 8
            while offset < 8 + header_len:
                index = offset // bs
                block = await self.store.get(ref, index)
                start = offset - index * bs
                chunk = block.view[start : start + 8 + header_len - offset]
                header[offset - 8 : offset - 8 + len(chunk)] = chunk
                offset += len(chunk)
            # The lease's buffer belongs to this task alone until it is released: the thread
            # may read it (and builds the parser's objects, counted as the lease's extra). The
            # order is made there too: its cost grows with the entries and the blocks.
            return await trio.to_thread.run_sync(safetensors_block_order, header, header_len, bs, ref.size)

    def _reader_streams(self, stream: _Stream) -> bool:
        """Whether a reader has made sequential progress through this file since we last looked."""
        return self.yield_to_readers and stream.activity.moved()

    async def _next_model_block(self, run: _ModelRun) -> tuple[_Stream, int] | None:
        """The next (file, block) of the model stream, or None when every file is done."""
        async with run.lock:  # the workers share one position: each block once, in order
            while True:
                if run.current is not None:
                    stream, blocks = run.current
                    if stream.failed:
                        run.current = None
                        continue
                    if not stream.deferred and self._reader_streams(stream):
                        stream.deferred = True
                        run.later.append(stream)
                        run.current = None
                        continue
                    index = next(blocks, None)
                    if index is not None:
                        return stream, index
                    run.current = None
                if run.queue:
                    stream = run.queue.popleft()
                elif run.later:
                    stream = run.later.popleft()
                    if stream.failed:
                        continue
                else:
                    return None
                try:  # (for a file put off: its blocks already on disk are skipped, not fetched)
                    run.current = (stream, iter(await self._order(stream.ref)))
                except Exception as exc:  # its reader will see the error, if it reads
                    log.log(_failure_level(), "not streaming %s: %s", stream.ref.name, exc)

    async def _model_worker(self, run: _ModelRun) -> None:
        while (item := await self._next_model_block(run)) is not None:
            stream, index = item
            if stream.deferred:
                await self._yield_to_sequential_reader(stream)
            try:
                await self.store.stream(stream.ref, index)
            except Exception as exc:  # the reader's own reads report errors; this file stops
                if not stream.failed:
                    log.log(_failure_level(), "stopped streaming %s: %s", stream.ref.name, exc)
                stream.failed = True  # (its blocks left are dropped, the next file goes on)

    async def _run_model(self, queue: deque[_Stream]) -> None:
        run = _ModelRun(queue)
        streams = list(queue)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.workers):
                    nursery.start_soon(self._model_worker, run)
            self.completed += len(streams)
            log.debug("streamed the model (%d files)", len(streams))
        finally:
            for stream in streams:
                if self._streams.get((stream.ref.key, stream.ref.version)) is stream:
                    del self._streams[(stream.ref.key, stream.ref.version)]
                stream.done.set()

    async def _stream_worker(self, stream: _Stream, blocks: Iterator[int]) -> None:
        for index in blocks:  # the workers share one iterator: each block once, in order
            await self._yield_to_sequential_reader(stream)
            await self.store.stream(stream.ref, index)

    async def _run_stream(self, stream: _Stream) -> None:
        ref = stream.ref
        try:
            with stream.scope:
                order = await self._order(ref)
                blocks = iter(order)
                async with trio.open_nursery() as nursery:
                    for _ in range(self.workers):
                        nursery.start_soon(self._stream_worker, stream, blocks)
                self.completed += 1
                log.debug("streamed %s (%d blocks)", ref.name, len(order))
            if stream.scope.cancelled_caught:
                self.cancelled += 1
        except Exception as exc:  # the reader's own reads report errors; the stream just stops
            log.log(_failure_level(), "stopped streaming %s: %s", ref.name, exc)
        finally:
            # (a reader who reopened the file meanwhile may have put a new stream in its place)
            if self._streams.get((ref.key, ref.version)) is stream:
                del self._streams[(ref.key, ref.version)]
            self._running -= 1
            stream.done.set()
            self._start_waiting()
