#!/usr/bin/env python3
"""The pyfuse3 floor: what serving 1 MiB FUSE reads costs before any modelfs code (issue 15).

A null filesystem — pyfuse3 + trio as modelfs runs them, one file whose reads return slices
of one preallocated buffer, the bdi's read-ahead as modelfs sets it — beside a modelfs mount
whose memory cache holds the whole object (``--disk-cache 0``, read once to fill it), in the
same rounds. Each round drops the page cache and reads the file with ``dd bs=1M``; it prints
MB/s and the CPU-s per GiB of the daemon, of its main (trio) thread and of dd, and how much
more the modelfs loop thread spends per request than the null one. What modelfs adds over
the floor is its own request path (cache lookup, read-ahead bookkeeping, the request's cancel
scope) and the trio hand-offs of its GET threads; the floor itself (reading the request,
the kernel copy of the reply into the page cache) is pyfuse3's and the kernel's, and bounds
what any change inside modelfs can save on the loop thread. Timings are never checked; the
bytes of the files are, once before the rounds (sha256 of the null file's pattern and of the object).

    flock /tmp/modelfs-bench.lock .venv/bin/python benchmarks/fuse_floor.py [--size 1G] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (puts the repository on sys.path too)

from modelfs.testing.fakegcs import fake_gcs  # noqa: E402
from modelfs.testing.mounts import mounted  # noqa: E402

BUCKET = "bench"
PATTERN = 8 << 20  # the null file repeats one 8 MiB buffer: every read is a slice of it
READ_AHEAD_KB = 1024  # modelfs's --read-ahead-kb default, set the same way on the null mount


def _pattern() -> bytes:
    return hashlib.sha256(b"fuse-floor").digest() * (PATTERN // 32)


def serve_null(mountpoint: str, size: int) -> None:
    """The null filesystem (run as a child process, so its CPU is its own)."""
    import errno
    import stat

    import pyfuse3
    import trio

    from modelfs.mount import _raise_read_ahead

    buf = mmap.mmap(-1, 2 * PATTERN, flags=mmap.MAP_PRIVATE)
    buf.write(_pattern() * 2)
    view = memoryview(buf)

    class NullFS(pyfuse3.Operations):
        async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
            attrs = pyfuse3.EntryAttributes()
            attrs.st_ino = inode
            attrs.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o444)
            attrs.st_size = 0 if inode == pyfuse3.ROOT_INODE else size
            attrs.attr_timeout = attrs.entry_timeout = 300
            return attrs

        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
            if name != b"file":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self.getattr(2)

        async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=inode)

        async def read(self, fh: int, off: int, size: int) -> memoryview:
            start = off % PATTERN
            return view[start : start + size]

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            # Once requests are served: raising the bdi's read-ahead stats the mount itself.
            await trio.to_thread.run_sync(_raise_read_ahead, Path(mountpoint), READ_AHEAD_KB)

    options = set(pyfuse3.default_options) | {"fsname=nullfs", "ro"}
    pyfuse3.init(NullFS(), mountpoint, options)
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)


def _thread_cpu(pid: int) -> float:
    """CPU seconds of a process's main thread (the trio loop, in both daemons)."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _verify(path: Path, expect: str) -> None:
    result = C.read_file(path)
    if result.sha256 != expect:
        raise SystemExit(f"fuse_floor: WRONG BYTES reading {path}")


def _sample(path: Path, pid: int) -> dict[str, float]:
    C.drop_caches()
    daemon0, main0, reader0 = C.cpu_seconds(pid), _thread_cpu(pid), C.children_cpu_seconds()
    result = C.run_dd(path)
    gib = result.nbytes / C.GiB
    return {
        "mb_s": result.mb_s,
        "daemon": (C.cpu_seconds(pid) - daemon0) / gib,
        "main": (_thread_cpu(pid) - main0) / gib,
        "reader": (C.children_cpu_seconds() - reader0) / gib,
    }


def run(args: argparse.Namespace, cleanup: C.Cleanup) -> int:
    size = args.size // PATTERN * PATTERN
    server_dir = C.prepare_dirs(args, "fuse_floor", size, cleanup)
    work = args.workdir
    null_mnt = cleanup.mountpoint(work / "mnt-null")  # ("mnt*": unmount_leftovers finds it after a kill)
    null_mnt.mkdir(parents=True, exist_ok=True)
    null_sha = hashlib.sha256()
    chunk = _pattern()
    for _ in range(size // PATTERN):
        null_sha.update(chunk)
    null = cleanup.process(
        subprocess.Popen([sys.executable, __file__, "--serve-null", str(null_mnt), str(size)], stderr=subprocess.PIPE)
    )
    deadline = time.monotonic() + 30
    while not os.path.ismount(null_mnt):
        if null.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the null filesystem did not mount: {null.stderr.read() if null.stderr else ''}")
        time.sleep(0.05)

    source, sha = C.ensure_object(server_dir / "objects", "model.bin", size, tag=15)
    samples: dict[str, list[dict[str, float]]] = {"null": [], "modelfs": []}
    with fake_gcs(backend="filesystem", root=server_dir / "gcs") as gcs:
        gcs.create_bucket(BUCKET)
        gcs.seed_file(BUCKET, "model.bin", source)
        mnt = cleanup.mountpoint(work / "mnt")
        mnt.mkdir(exist_ok=True)
        budget = f"{size // C.MiB + 256}M"
        options = ["--anonymous", "--memory-cache", budget, "--disk-cache", "0", "--no-eager"]
        with mounted(f"gs://{BUCKET}", mnt, work / "cache", *options, env=gcs.env()):
            pid = C.modelfs_daemon_pid(mnt, work / "cache")
            _verify(mnt / "model.bin", sha)  # fills the memory cache: the rounds make no GET
            _verify(null_mnt / "file", null_sha.hexdigest())
            gets = C.mount_stats(mnt)["backend_gets"]
            for rnd in range(args.rounds):
                samples["null"].append(_sample(null_mnt / "file", null.pid))
                samples["modelfs"].append(_sample(mnt / "model.bin", pid))
                print(
                    f"  round {rnd + 1}: null {samples['null'][-1]['mb_s']:,.0f} MB/s, "
                    f"modelfs from memory {samples['modelfs'][-1]['mb_s']:,.0f} MB/s",
                    flush=True,
                )
            if C.mount_stats(mnt)["backend_gets"] != gets:
                raise RuntimeError(
                    "the modelfs rounds fetched from the backend: the memory cache did not hold the object"
                )
    null.terminate()
    null.wait(30)

    rows = []
    med: dict[str, dict[str, float]] = {}
    for name, label in (("null", "null pyfuse3 filesystem (the floor)"), ("modelfs", "modelfs, object in memory")):
        med[name] = {key: C.median(s[key] for s in samples[name]) for key in ("mb_s", "daemon", "main", "reader")}
        m = med[name]
        rows.append([label, f"{m['mb_s']:,.0f}", f"{m['daemon']:.3f}", f"{m['main']:.3f}", f"{m['reader']:.3f}"])
    print(f"\nfuse_floor: {size / C.GiB:.2f} GiB read with dd bs=1M per sample, median of {args.rounds} round(s)")
    print(C.fmt_table(["path", "MB/s", "daemon CPU-s/GiB", "main thread", "dd"], rows))
    extra = med["modelfs"]["main"] - med["null"]["main"]
    print(
        f"\nmodelfs's loop thread: {med['modelfs']['main'] / med['null']['main']:.2f}x the floor's, "
        f"+{extra:.3f} CPU-s/GiB = +{extra * 1e6 / 1024:.0f} µs per 1 MiB request; the floor alone "
        f"caps one mount at ~{1 / med['null']['main']:.1f} GiB/s of loop-thread CPU"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-null"]:
        serve_null(argv[1], int(argv[2]))
        return 0
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=C.parse_size, default=C.parse_size("1G"), help="bytes read per sample")
    p.add_argument("--rounds", type=int, default=3)
    C.add_common_args(p, "fuse_floor")
    args = p.parse_args(argv)
    return C.run_main("fuse_floor", args, lambda cleanup: run(args, cleanup))


if __name__ == "__main__":
    sys.exit(main())
