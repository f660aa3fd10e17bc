"""A backward mmap walk through the real kernel: the page-cache fill gives the exact bytes,
takes fewer FUSE reads than the walk has faults, and never shows an old version's bytes."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import time
from pathlib import Path

import pytest

from modelfs.testing.fakegcs import FakeGCS

from .conftest import MountFn

BLOCK = 4 << 20
OPTIONS = ("--block-size", "4M", "--memory-cache", "32M", "--disk-cache", "0", "--no-eager", "--metadata-ttl", "1")


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _stats(mnt: Path) -> dict[str, int]:
    return json.loads(os.getxattr(mnt, "user.modelfs.stats"))


def _walk_down(path: Path) -> bytes:
    """Copy a mapped file page by page from its last page to its first, as a backward memmove does."""
    size = path.stat().st_size
    out = bytearray(size)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        for start in range(size - size % mmap.PAGESIZE or size - mmap.PAGESIZE, -1, -mmap.PAGESIZE):
            out[start : start + mmap.PAGESIZE] = m[start : start + mmap.PAGESIZE]
    return bytes(out)


def _drop_page_cache() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


@pytest.mark.parametrize("fill", [True, False], ids=["fill", "no-fill"])
def test_backward_mmap_walk_reads_exact_bytes(gcs: FakeGCS, bucket: str, mount: MountFn, fill: bool) -> None:
    data = _data(3 * BLOCK + 5 * 4096 + 77, 61)  # a short last block, and a last page cut short
    gcs.upload(bucket, "m/model.safetensors", data)
    mnt = mount(f"gs://{bucket}/m", *OPTIONS, "--fill-page-cache" if fill else "--no-fill-page-cache")
    path = mnt / "model.safetensors"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()  # every block in memory
    _drop_page_cache()
    before = _stats(mnt)
    got = _walk_down(path)
    after = _stats(mnt)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    reads = after["reads"] - before["reads"]
    pushes = after["page_cache_pushes"] - before["page_cache_pushes"]
    faults = len(data) // (512 << 10)  # the kernel reads ~512 KiB per fault walking down
    if fill:
        assert pushes >= 2, after
        assert reads < faults // 2, f"{reads} FUSE reads for a walk of ~{faults} read-arounds"
    else:
        assert pushes == 0
        assert reads >= faults // 2


def test_fill_never_shows_the_old_version(gcs: FakeGCS, bucket: str, mount: MountFn) -> None:
    """Walk down version 1 (pushes), overwrite, walk down again: only version 2's bytes."""
    old, new = _data(2 * BLOCK + 4096 * 3, 62), _data(2 * BLOCK + 4096 * 3, 63)
    gcs.upload(bucket, "m/w.safetensors", old)
    gcs.upload(bucket, "m/other.bin", b"x")
    mnt = mount(f"gs://{bucket}/m", *OPTIONS)
    path = mnt / "w.safetensors"
    assert _walk_down(path) == old
    assert _stats(mnt)["page_cache_pushes"] >= 1
    gcs.upload(bucket, "m/w.safetensors", new)
    time.sleep(1.5)  # past --metadata-ttl: the next open sees the new generation
    assert _walk_down(path) == new
    assert path.read_bytes() == new
