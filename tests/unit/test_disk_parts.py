"""The disk cache's parts on their own: typed results, one header check, and the thread rule."""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from pathlib import Path

import pytest

import modelfs.cache.disk_format as disk_format
from modelfs.backends.memory import ramp
from modelfs.cache.disk import DiskCache
from modelfs.cache.disk_format import (
    HEADER,
    PAGE,
    BlockHeader,
    CorruptBlock,
    ReadOutcome,
    read_block,
    write_block,
)
from modelfs.cache.disk_index import DiskIndex

KEY = b"memory:///m.bin\n7"


def page_buffer(data: bytes) -> memoryview:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return memoryview(buf)


@pytest.mark.parametrize("direct", [True, False])
def test_write_then_read_returns_typed_results(tmp_path: Path, direct: bool) -> None:
    data = page_buffer(ramp(2 * PAGE))
    result = write_block(str(tmp_path / "obj"), "v-3", KEY, 3, data, direct=direct)
    assert result.size == PAGE + 2 * PAGE
    dest = page_buffer(bytes(2 * PAGE))
    found = read_block(str(tmp_path / "obj" / "v-3"), KEY, 3, dest, direct=direct)
    assert found.outcome is ReadOutcome.HIT and bytes(dest) == ramp(2 * PAGE)
    absent = read_block(str(tmp_path / "obj" / "v-4"), KEY, 4, dest, direct=direct)
    assert absent.outcome is ReadOutcome.ABSENT
    wrong = read_block(str(tmp_path / "obj" / "v-3"), KEY, 4, dest, direct=direct)
    assert (wrong.outcome, wrong.reason) == (ReadOutcome.CORRUPT, "header names another block")
    assert sorted(os.listdir(tmp_path / "obj")) == ["v-3"]  # no temporary left


def test_one_validate_for_every_header_field() -> None:
    data = memoryview(ramp(100))
    header = BlockHeader.for_block(KEY, 5, data)
    assert BlockHeader.parse(header.pack()) == header
    header.validate(KEY, 5, 100, KEY)
    header.check_data(data)
    cases = [
        (lambda: BlockHeader.parse(b"short"), "short header"),
        (lambda: BlockHeader.parse(b"XXXX" + header.pack()[4:]), "bad magic"),
        (lambda: header.validate(KEY, 6, 100, KEY), "another block"),
        (lambda: header.validate(KEY, 5, 99, KEY), "another block"),
        (lambda: header.validate(KEY + b"x", 5, 100, None), "another object"),
        (lambda: header.validate(KEY, 5, 100, b"memory:///m.bin\n8"), "another object"),
        (lambda: BlockHeader(5, 100, header.crc, len(KEY), 100).validate(KEY, 5, 100, KEY), "bad data offset"),
        (lambda: header.check_data(memoryview(ramp(100, seed=1))), "CRC32C"),
    ]
    for call, reason in cases:
        with pytest.raises(CorruptBlock, match=reason):
            call()
    assert HEADER.size < PAGE


async def test_the_direct_io_flag_changes_only_on_the_trio_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses O_DIRECT: the worker threads report it, the trio task records it."""
    real_open = os.open

    def no_direct(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    writers: list[threading.Thread] = []

    class Watched(DiskCache):
        def __setattr__(self, name: str, value: object) -> None:
            if name == "_direct_io":
                writers.append(threading.current_thread())
            super().__setattr__(name, value)

    cache = Watched(tmp_path / "c", 1 << 30)
    cache.open()
    try:
        monkeypatch.setattr(disk_format.os, "open", no_direct)
        await cache.write(("memory:///m", "1", 0), page_buffer(ramp(PAGE)))
        dest = page_buffer(bytes(PAGE))
        assert await cache.read_into(("memory:///m", "1", 0), dest, direct=True)
        assert bytes(dest) == ramp(PAGE)
    finally:
        monkeypatch.undo()
        cache.close()
    assert cache._direct_io is False
    assert writers and all(t is threading.main_thread() for t in writers)


def test_index_lru_keeps_order_across_pins() -> None:
    index = DiskIndex(capacity=10)
    assert index.add("a/1-0", 2) == [] and index.add("b/1-0", 2) == [] and index.add("a/1-1", 2) == []
    assert index.pin("a", "1") == []
    assert index.add("c/1-0", 2) == [] and index.add("d/1-0", 2) == []
    assert index.add("e/1-0", 2) == ["b/1-0"]  # the pinned a/* are older but stay
    assert index.unpin("a", "1") == []  # current: kept, back in its place in LRU order
    assert index.add("f/1-0", 2) == ["a/1-0"]
    assert index.set_current("a", "2") == ["a/1-1"]  # another version became current
    assert index.used == 8 and len(index) == 4


def test_the_scan_removes_only_temporaries_of_other_processes(tmp_path: Path) -> None:
    from modelfs.cache.disk_format import temp_name
    from modelfs.cache.disk_scan import scan_blocks

    obj = tmp_path / "blocks" / "obj"
    obj.mkdir(parents=True)
    ours, crashed = obj / temp_name("v-0"), obj / ".v-1.999999999-1.tmp"
    # A crashed run with our pid (in a container the daemon is pid 1 every time).
    same_pid = obj / f".v-3.{os.getpid()}-0badc0de-1.tmp"
    ours.write_bytes(b"being written")
    crashed.write_bytes(b"left by a crash")
    same_pid.write_bytes(b"left by a crash of a run with our pid")
    (obj / "v-2").write_bytes(b"x" * 10)
    assert scan_blocks(str(tmp_path / "blocks"), 10, time.time() + 60) == [("obj/v-2", 10)]
    assert ours.exists() and not crashed.exists() and not same_pid.exists()
