"""The file:// backend's version check around a read: a file rewritten in place while it is
read must fail the read (VersionChanged), never hand back a mix of old and new bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelfs.backends import local
from modelfs.backends.local import LocalBackend
from modelfs.config import parse_source
from modelfs.errors import VersionChanged

SIZE = 64 << 10


async def test_a_rewrite_during_the_read_is_version_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rewrite lands after the pre-read check, while preadv copies: only a check after
    the read can see it. (Its mtime is set one second on, as a rewrite in a later timestamp
    tick has it; one within the same tick cannot be seen, see local.py.)"""
    path = tmp_path / "m.bin"
    path.write_bytes(b"a" * SIZE)
    backend = LocalBackend(parse_source(f"file://{tmp_path}"))
    info = await backend.stat("m.bin")
    real_preadv = os.preadv
    rewrites: list[int] = []

    def preadv_then_rewrite(fd: int, buffers: list[memoryview], offset: int) -> int:
        got = real_preadv(fd, buffers, offset)
        if not rewrites:  # a writer racing the copy: its bytes may be in what was read
            before = os.stat(path)
            with open(path, "r+b") as f:
                f.write(b"b" * SIZE)
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
            rewrites.append(got)
        return got

    monkeypatch.setattr(local.os, "preadv", preadv_then_rewrite)
    dest = bytearray(SIZE)
    with pytest.raises(VersionChanged, match="changed while it was read"):
        await backend.read_range("m.bin", info.version, 0, memoryview(dest))
    assert rewrites, "the read never reached preadv"
    await backend.aclose()


async def test_an_unchanged_file_reads_whole(tmp_path: Path) -> None:
    (tmp_path / "m.bin").write_bytes(bytes(range(256)) * 256)
    backend = LocalBackend(parse_source(f"file://{tmp_path}"))
    info = await backend.stat("m.bin")
    dest = bytearray(1000)
    await backend.read_range("m.bin", info.version, 300, memoryview(dest))
    assert bytes(dest) == ((bytes(range(256)) * 256)[300:1300])
    await backend.aclose()
