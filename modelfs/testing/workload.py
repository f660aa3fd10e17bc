"""The memory-bound workload: many small objects, a safetensors file, random readers, a walker.

Shared by the cgroup integration test and ``benchmarks/memory_bound.py --workload random``.
Objects are seeded straight into fake-gcs-server's filesystem backend (a file plus the
``user.metadata`` xattr an upload writes), which is thousands of times faster than uploads.
Every byte read is checked: random reads against the source file, small files against their
known contents.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import crc32c

from modelfs.testing.fakegcs import checksums_of_file, object_metadata

__all__ = [
    "ReadStats",
    "random_readers",
    "seed_object",
    "seed_small_objects",
    "small_content",
    "walk_tree",
    "write_safetensors",
]

_NOW = "2026-01-01T00:00:00.000000Z"


def seed_object(
    root: Path, bucket: str, name: str, data: bytes | None, generation: int, *, path: Path | None = None
) -> None:
    """One object in the emulator's filesystem backend: ``data`` (or the file at ``path``,
    hard-linked) and its metadata xattr."""
    dest = root / bucket / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if path is not None:
        if dest.exists():
            dest.unlink()
        os.link(path, dest)
        crc, md5 = checksums_of_file(path)
    else:
        assert data is not None
        dest.write_bytes(data)
        crc = crc32c.crc32c(data)
        md5 = hashlib.md5(data).digest()
    metadata = object_metadata(crc, md5, generation, _NOW)
    os.setxattr(dest, "user.metadata", json.dumps(metadata).encode())


def small_content(name: str) -> bytes:
    """The known contents of a small seeded object (50-300 bytes, different per name)."""
    line = f"{name}\n".encode()
    return line * (1 + len(name) % 7)


def seed_small_objects(
    root: Path, bucket: str, prefix: str, count: int, dirs: int, generation: int = 1000
) -> list[str]:
    """``count`` small objects spread over ``dirs`` directories under ``prefix``; their names."""
    names = []
    for i in range(count):
        name = f"{prefix}/d{i % dirs:05d}/obj-{i:07d}.json"
        seed_object(root, bucket, name, small_content(name), generation + i)
        names.append(name)
    return names


def write_safetensors(path: Path, size: int, tensor_size: int = 1 << 20, seed: int = 1) -> None:
    """A safetensors file of about ``size`` bytes: many U8 tensors and random-looking data."""
    count = max(1, (size - 4096) // tensor_size)
    meta: dict[str, object] = {"__metadata__": {"format": "np"}}
    for i in range(count):
        meta[f"layers.{i}.weight"] = {
            "dtype": "U8",
            "shape": [tensor_size],
            "data_offsets": [i * tensor_size, (i + 1) * tensor_size],
        }
    header = json.dumps(meta).encode()
    header += b" " * (-(8 + len(header)) % 8)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        chunk = rng.randbytes(1 << 20)
        for i in range(count * tensor_size >> 20):
            # Each MiB differs (a rotation and its index), so a misplaced block is caught.
            f.write(chunk[i % 997 :] + chunk[: i % 997])
        rest = count * tensor_size % (1 << 20)
        if rest:
            f.write(chunk[:rest])


@dataclass
class ReadStats:
    reads: int = 0
    bytes: int = 0
    wrong: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    walks: int = 0
    entries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def random_readers(
    mounted_file: Path,
    source_file: Path,
    *,
    threads: int,
    read_size: int,
    stats: ReadStats,
    reads_per_thread: int | None = None,
    until: float | None = None,
    seed: int = 0,
) -> list[threading.Thread]:
    """Start ``threads`` readers doing unaligned ``pread``s at random offsets, each compared to the
    source; each read's pages are dropped from the page cache after, so reads reach the daemon.
    Each stops after ``reads_per_thread`` reads or at ``until`` (time.monotonic)."""
    size = source_file.stat().st_size
    src_file = open(source_file, "rb")  # noqa: SIM115 - closed by the last reader
    src = mmap.mmap(src_file.fileno(), 0, prot=mmap.PROT_READ)
    remaining = [threads]

    def reader(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        try:
            fd = os.open(mounted_file, os.O_RDONLY)
            try:
                n = 0
                while (reads_per_thread is None or n < reads_per_thread) and (
                    until is None or time.monotonic() < until
                ):
                    offset = rng.randrange(0, size - read_size)
                    got = os.pread(fd, read_size, offset)
                    if got != src[offset : offset + read_size]:
                        with stats.lock:
                            stats.wrong.append(f"reader {i}: [{offset}, +{read_size}] differs (got {len(got)} bytes)")
                    os.posix_fadvise(fd, offset, read_size, os.POSIX_FADV_DONTNEED)
                    n += 1
                    with stats.lock:
                        stats.reads += 1
                        stats.bytes += len(got)
            finally:
                os.close(fd)
        except OSError as exc:
            with stats.lock:
                stats.errors.append(f"reader {i}: {exc!r}")
        finally:
            with stats.lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                src.close()
                src_file.close()

    workers = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(threads)]
    for t in workers:
        t.start()
    return workers


def walk_tree(
    root: Path, stats: ReadStats, stop: threading.Event, *, read_every: int = 50, max_walks: int | None = None
) -> None:
    """Walk the tree again and again (stat every entry; read and check every ``read_every``-th
    small ``.json`` object) until ``stop`` is set or ``max_walks`` walks are done."""
    count = 0
    while not stop.is_set() and (max_walks is None or stats.walks < max_walks):
        try:
            for dirpath, _dirnames, filenames in os.walk(root):
                if stop.is_set():
                    return
                for filename in filenames:
                    path = Path(dirpath) / filename
                    path.stat()
                    count += 1
                    if filename.endswith(".json") and count % read_every == 0:
                        name = str(path.relative_to(root))
                        if path.read_bytes() != small_content(name):
                            with stats.lock:
                                stats.wrong.append(f"walker: {name} differs")
                    if stop.is_set():
                        break
                with stats.lock:
                    stats.entries += len(filenames)
        except OSError as exc:
            with stats.lock:
                stats.errors.append(f"walker: {exc!r}")
            return
        with stats.lock:
            stats.walks += 1
