"""``modelfs warm`` folds each block into the object's checksum in a worker thread while it
reads the next (fold.py), not on its event loop, where a SHA-256 (~0.64 GiB/s) and the I/O
took turns. A block being folded stays pinned in the memory budget: the next one's read cannot
take its buffer, and the budget still holds (tests/unit/test_warm_failures.py has the window's)."""

from __future__ import annotations

import base64
import hashlib
import threading
from pathlib import Path

import pytest

from modelfs import warm
from modelfs.backends.memory import ramp
from modelfs.cache.blocks import BlockStore, ObjectRef
from modelfs.cache.memory import Block

from .warm_runs import run_warm, serve_with_checksum

_budgets: list[warm.MemoryCache] = []
_object: list[tuple[str, str]] = []


def _pins_of(index: int) -> int:
    """The pins on block ``index`` of the object being warmed (0: not in memory)."""
    [memory] = _budgets
    [(key, version)] = _object
    block = memory.peek((key, version, index))
    return 0 if block is None else block.pins


class _Gated:
    """A SHA-256 whose update of block k first waits until warm has read block k + 1: a fold
    on the event loop waits in vain (bounded) and fails; one in a thread lets the read go on."""

    def __init__(self, blocks: int, read: dict[int, threading.Event], threads: list[bool], pins: list[int]) -> None:
        self._hash = hashlib.sha256()
        self._blocks = blocks
        self._read = read
        self._threads = threads
        self._pins = pins

    def update(self, data: memoryview, /) -> None:
        index = len(self._threads)
        self._threads.append(threading.current_thread() is not threading.main_thread())
        if index + 1 < self._blocks:
            assert self._read[index + 1].wait(20), f"block {index + 1} was not read while block {index} was folded"
        # (read from the loop's data in a thread: a snapshot of an int, good enough here)
        self._pins.append(_pins_of(index))
        self._hash.update(data)

    def digest(self) -> bytes:
        return self._hash.digest()


def test_blocks_are_folded_in_a_thread_while_the_next_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block k is hashed only after block k + 1 was read into the budget of two blocks (1 MiB
    ones, --memory-cache 2M): the fold ran beside the read, and the block being folded kept
    its buffer: it stayed pinned (unpinned, a read of a later one could take it)."""
    data = ramp(5 * (1 << 20) + 1000, seed=11)
    blocks = 6
    read = {index: threading.Event() for index in range(blocks)}
    threads: list[bool] = []
    pins: list[int] = []
    real_get = BlockStore.get

    async def get(self: BlockStore, obj: ObjectRef, index: int) -> Block:
        block = await real_get(self, obj, index)
        _object[:] = [(obj.key, obj.version)]
        read[index].set()
        return block

    monkeypatch.setattr(BlockStore, "get", get)
    monkeypatch.setitem(warm._HASHES, "sha256", (lambda: _Gated(blocks, read, threads, pins), 32))
    budgets = _budgets
    budgets.clear()
    real = warm.MemoryCache

    class Noted(real):  # type: ignore[misc, valid-type]
        def __init__(self, capacity: int, block_size: int) -> None:
            super().__init__(capacity, block_size)
            budgets.append(self)

    monkeypatch.setattr(warm, "MemoryCache", Noted)
    serve_with_checksum(monkeypatch, data, "sha256:" + base64.b64encode(hashlib.sha256(data).digest()).decode())
    result, printed = run_warm(tmp_path, "--block-size", "1M", "--memory-cache", "2M")
    assert result.objects == 1 and result.unverified == 0 and not result.mismatched, printed
    assert "warm: a.bin: cached, checksum ok" in printed
    assert threads == [True] * blocks
    assert all(pins), pins  # each block held in the budget while it was folded
    [memory] = budgets
    assert memory.stats.peak_bytes <= memory.capacity == 2 << 20
