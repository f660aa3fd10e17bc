"""Page cache fill for backward walks: detection, what is pushed, and never a stale version."""

from __future__ import annotations

import errno
import threading

import trio

from modelfs.backends.memory import MemoryBackend
from modelfs.files import OpenFiles
from modelfs.pagecache import PAGE, PageCacheFiller
from modelfs.prefetch import ReadAhead

from .conftest import StoreFactory, put_ramp

BLOCK = 64 * PAGE  # 256 KiB blocks: several pages each, so "the rest of the block" means something
STEP = 4 * PAGE  # one kernel read-around below the last, as a backward mmap copy faults


def _walk_down(size: int, step: int = STEP) -> list[tuple[int, int]]:
    """Reads (offset, size) of a walk from the end of a file to its start."""
    out = []
    end = size
    while end > 0:
        start = max(0, end - step)
        out.append((start, end - start))
        end = start
    return out


class Recorder:
    """Stands in for pyfuse3.notify_store: remembers what the kernel would have been given."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bytes]] = []
        self.fail_with: int | None = None
        self.gate: threading.Event | None = None  # set: a push waits for it

    def __call__(self, inode: int, offset: int, data: memoryview) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_with is not None:
            raise OSError(self.fail_with, "refused")
        self.calls.append((inode, offset, bytes(data)))


def test_backward_walk_is_detected_after_three_steps() -> None:
    ra = ReadAhead(64 * BLOCK, BLOCK, 0)
    seen = []
    for offset, size in _walk_down(8 * BLOCK)[:6]:
        ra.on_read(offset, size)
        seen.append(ra.last_backward)
    assert seen == [False, False, False, True, True, True]


def test_forward_runs_reordered_pairs_and_seeks_are_not_backward() -> None:
    ra = ReadAhead(64 * BLOCK, BLOCK, 8 * BLOCK)
    # Forward, with neighbouring read-ahead requests handled out of order now and then.
    for offset in (0, STEP, 3 * STEP, 2 * STEP, 4 * STEP, 6 * STEP, 5 * STEP, 7 * STEP):
        ra.on_read(offset, STEP)
        assert not ra.last_backward, offset
    # Scattered seeks that happen to go down, but not to where the last read began.
    for offset in (40 * BLOCK, 30 * BLOCK, 20 * BLOCK, 10 * BLOCK):
        ra.on_read(offset, STEP)
        assert not ra.last_backward, offset


async def _files_with_filler(make_store: StoreFactory, backend: MemoryBackend, versions: dict[int, str],
                             recorder: Recorder) -> OpenFiles:
    store = await make_store(backend, block_size=BLOCK, memory_blocks=16)
    files = OpenFiles(store, max_prefetch=0)
    files.filler = PageCacheFiller(store.memory, recorder, versions.get)
    return files


async def test_backward_walk_pushes_each_block_below_the_read_once(make_store: StoreFactory) -> None:
    """What is pushed is the file's bytes at their offsets, below the read, each block once."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.safetensors", 3 * BLOCK + 5 * PAGE + 123, seed=7)
    recorder = Recorder()
    files = await _files_with_filler(make_store, backend, {9: ref.version}, recorder)
    fh = files.open(ref, inode=9)
    for offset, size in _walk_down(len(data)):
        assert bytes(await files.read(fh, offset, size)) == data[offset : offset + size]
    assert recorder.calls, "a backward walk pushed nothing"
    covered: set[int] = set()
    for inode, offset, chunk in recorder.calls:
        assert inode == 9
        assert offset % PAGE == 0
        assert chunk == data[offset : offset + len(chunk)], f"pushed wrong bytes at {offset}"
        pages = range(offset // PAGE, (offset + len(chunk)) // PAGE)
        assert not covered & set(pages), "a page was pushed twice"
        covered.update(pages)
    # Blocks 2, 1 and 0 were entered walking down; each got its pages below the read pushed.
    assert files.filler is not None and files.filler.stats.pushes == 3
    for block in range(3):
        assert block * BLOCK // PAGE in covered


async def test_forward_reads_push_nothing(make_store: StoreFactory) -> None:
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.bin", 4 * BLOCK, seed=8)
    recorder = Recorder()
    files = await _files_with_filler(make_store, backend, {3: ref.version}, recorder)
    fh = files.open(ref, inode=3)
    for offset in range(0, len(data), STEP):
        assert bytes(await files.read(fh, offset, STEP)) == data[offset : offset + STEP]
    assert recorder.calls == []


async def test_no_push_for_a_version_the_page_cache_does_not_hold(make_store: StoreFactory) -> None:
    """An old handle walking down after the inode moved to a new version pushes nothing."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.bin", 2 * BLOCK, seed=9)
    recorder = Recorder()
    versions = {5: "a-newer-version"}
    files = await _files_with_filler(make_store, backend, versions, recorder)
    fh = files.open(ref, inode=5)
    for offset, size in _walk_down(len(data)):
        assert bytes(await files.read(fh, offset, size)) == data[offset : offset + size]
    assert recorder.calls == []
    assert files.filler is not None and files.filler.stats.skipped_stale >= 1


async def test_settle_waits_for_a_running_push(make_store: StoreFactory, nursery: trio.Nursery) -> None:
    """open() of a new version must not return while an old push may still land."""
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.bin", 2 * BLOCK, seed=10)
    recorder = Recorder()
    recorder.gate = threading.Event()
    files = await _files_with_filler(make_store, backend, {4: ref.version}, recorder)
    filler = files.filler
    assert filler is not None
    fh = files.open(ref, inode=4)
    walk = _walk_down(len(data))

    async def reader() -> None:
        for offset, size in walk[:4]:  # the fourth read starts a push, which waits on the gate
            await files.read(fh, offset, size)

    nursery.start_soon(reader)
    settled = trio.Event()

    async def settle() -> None:
        await trio.sleep(0.05)
        await filler.settle(4)
        settled.set()

    nursery.start_soon(settle)
    await trio.sleep(0.3)
    assert not settled.is_set(), "settle returned while a push was still running"
    recorder.gate.set()
    with trio.fail_after(10):
        await settled.wait()
    assert recorder.calls


async def test_a_kernel_without_notify_store_turns_filling_off(make_store: StoreFactory) -> None:
    backend = MemoryBackend()
    ref, data = put_ramp(backend, "w.bin", 3 * BLOCK, seed=11)
    recorder = Recorder()
    recorder.fail_with = errno.ENOSYS
    files = await _files_with_filler(make_store, backend, {2: ref.version}, recorder)
    fh = files.open(ref, inode=2)
    for offset, size in _walk_down(len(data)):
        assert bytes(await files.read(fh, offset, size)) == data[offset : offset + size]
    assert files.filler is not None
    assert not files.filler.enabled and files.filler.stats.errors == 1
