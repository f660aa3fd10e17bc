"""A backward mmap walk through the real kernel (what glibc's memmove does to a tensor copied
out of safetensors' map when the destination lies above the source): exact bytes, and, even
after seeks have put the file in random mode, whole blocks rather than small GETs."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
from pathlib import Path

from modelfs.testing.fakegcs import FakeGCS

from .conftest import MountFn

BLOCK = 4 << 20  # above --random-read-size (1M), so random reads take small GETs
OPTIONS = ("--block-size", "4M", "--memory-cache", "64M", "--disk-cache", "0", "--no-eager")


def _stats(mnt: Path) -> dict[str, int]:
    return json.loads(os.getxattr(mnt, "user.modelfs.stats"))


def _walk_down(path: Path) -> bytes:
    """Copy a mapped file page by page from its last page to its first."""
    size = path.stat().st_size
    page = mmap.PAGESIZE
    out = bytearray(size)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        for start in range((size - 1) // page * page, -1, -page):
            out[start : start + page] = m[start : start + page]
    return bytes(out)


def test_backward_mmap_walk_after_seeks(gcs: FakeGCS, bucket: str, mount: MountFn) -> None:
    data = random.Random(71).randbytes(6 * BLOCK + 5 * 4096 + 77)  # a short last block and page
    gcs.upload(bucket, "m/model.safetensors", data)
    mnt = mount(f"gs://{bucket}/m", *OPTIONS)
    path = mnt / "model.safetensors"
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for offset in (5 * BLOCK + 100, 1 * BLOCK + 7, 3 * BLOCK + 4096):  # seeks: random mode
            assert os.pread(fd, 512, offset) == data[offset : offset + 512]
    finally:
        os.close(fd)
    before = _stats(mnt)
    assert before["small_gets"] >= 1, before  # the last seek was served by a small GET
    got = _walk_down(path)
    after = _stats(mnt)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    # The walk's first three steps may still look random; after that, whole blocks (one
    # small GET per block entered, or two before a block is fetched whole, without it).
    assert after["small_gets"] - before["small_gets"] <= 3, after
    assert after["backend_bytes"] <= len(data) + 8 * BLOCK, after
