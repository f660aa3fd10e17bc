"""A failed block is freed as soon as its filler and waiters are done with it, not when the
garbage collector next runs: the budget stops counting it at once, so anything that kept it
alive longer would hold its buffer outside the bound.

Found by review: the error kept on the block carried its traceback, whose frames hold the
block, a reference cycle; a file whose reads keep failing (replaced on the server, a lying
server, a failing disk) grew the daemon's RSS well past --memory-cache.
"""

from __future__ import annotations

import errno
import gc
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from modelfs.backends.memory import MemoryBackend
from modelfs.cache.memory import Block, BlockState, detached
from modelfs.errors import BackendError, VersionChanged

from .conftest import BS, StoreFactory, put_ramp


class FailingBackend(MemoryBackend):
    """Reads of ``bad`` fail (after ``gate`` is set, so waiters can gather on the block)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()

    async def read_range(self, name: str, version: str, offset: int, dest: memoryview, **kw: int | None) -> None:
        if name == "bad.bin":
            await self.gate.wait()
            dest[:16] = b"x" * 16  # some bytes landed before the answer was rejected
            raise VersionChanged(f"{name} changed on the server")
        await super().read_range(name, version, offset, dest, **kw)


def _failed_blocks() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is Block and o.state is BlockState.FAILED)


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_failed_blocks_die_with_their_last_reader(make_store: StoreFactory, no_gc: None) -> None:
    backend = FailingBackend()
    bad, _ = put_ramp(backend, "bad.bin", 4 * BS, seed=1)
    good, data = put_ramp(backend, "good.bin", 4 * BS, seed=2)
    store = await make_store(backend, memory_blocks=4, max_concurrency=8)
    errors: list[BaseException] = []

    async def read_bad(index: int) -> None:
        try:
            await store.get(bad, index)
        except VersionChanged as exc:
            errors.append(exc)

    for _ in range(10):
        backend.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            for index in range(3):
                for _reader in range(3):  # a filler and two waiters per block
                    nursery.start_soon(read_bad, index)
            await trio.testing.wait_all_tasks_blocked()
            backend.gate.set()
        for index in range(4):  # the budget's buffers keep turning over
            block = await store.get(good, index)
            assert bytes(block.view) == data[index * BS : (index + 1) * BS]
    assert len(errors) == 10 * 3 * 3
    assert all("changed on the server" in str(exc) for exc in errors)
    errors.clear()  # (each raised error's traceback holds its reader's frames)
    assert _failed_blocks() == 0
    assert store.memory.used <= store.memory.capacity


def test_the_kept_error_is_a_copy_without_traceback() -> None:
    try:
        try:
            raise OSError(errno.EIO, "disk said no")
        except OSError as inner:
            raise BackendError("read failed") from inner
    except BackendError as exc:
        kept = detached(exc)
    assert type(kept) is BackendError and kept.args == ("read failed",)
    assert kept.__traceback__ is None and kept.__cause__ is None and kept.__context__ is None
    timeout = detached(TimeoutError(errno.ETIMEDOUT, "no bytes"))
    assert type(timeout) is TimeoutError and timeout.errno == errno.ETIMEDOUT

    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"{a}/{b}")

    odd = detached(Odd(1, 2))  # cannot be rebuilt from its args: a plain error with its text
    assert type(odd) is RuntimeError and "Odd: 1/2" in str(odd)
