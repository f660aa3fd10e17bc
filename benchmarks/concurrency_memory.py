#!/usr/bin/env python3
"""The memory bound at a high ``--max-concurrency``: peak RSS and the cgroup's charge per backend.

The daemon runs in a memory cgroup (limit ``--cgroup-limit``, high enough not to interfere)
over ``--files`` objects of ``--file-size`` on a local store that sends each answer at most
``--rate`` bytes/s per connection, so GETs last and all ``--max-concurrency`` of them are in
flight (modelfs.testing.throttle): fake-gcs-server (``gcs``), nginx over TLS (``https``) or
moto (``s3``). ``--seq-readers`` threads read the
objects sequentially with 1 MiB reads (wrapping around, each starting elsewhere) and
``--rand-readers`` threads do unaligned 1 MiB preads at random offsets, for ``--duration``
seconds; every byte is checked and each read's pages dropped from the page cache, so reads
reach the daemon. With a disk cache, the random readers' files are streamed (``--eager``:
``--max-concurrency`` / 2 workers per file), which keeps every GET slot busy; read-ahead of the
sequential readers adds its GETs (``--prefetch-get-size`` defaults to the block size: one GET
per block, as many GETs as the budget holds blocks).

It prints the daemon's peak RSS (VmHWM), the cgroup's peak charge (v1
``memory.max_usage_in_bytes``, v2 ``memory.peak``) and, on v1, the peak of the socket buffers
charged to the group (``memory.kmem.tcp.max_usage_in_bytes``: v1 counts them apart, once a
tcp limit is written, which this does; v2 counts them in the group's charge), beside
``--memory-cache`` + ``memlimit.overhead()``; and what it sampled: the most blocks being
filled at once, the daemon's threads and TCP connections, the most bytes in its sockets'
receive queues (``ss -tm``), and the daemon's own count of the most GETs in flight at once.

    .venv/bin/python benchmarks/concurrency_memory.py --backend https --concurrency 256 \
        --memory-cache 512M --file-size 256M --files 4 --seq-files 2 --rate 1M --disk-cache 2G
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (puts the repository on sys.path too)

from modelfs import memlimit  # noqa: E402
from modelfs.testing.cgroups import MemoryCgroup  # noqa: E402
from modelfs.testing.mounts import force_unmount, run_modelfs  # noqa: E402
from modelfs.testing.throttle import slow_source  # noqa: E402
from modelfs.testing.workload import ReadStats, random_readers, write_safetensors  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backend", choices=("gcs", "https", "s3"), default="gcs")
    p.add_argument("--concurrency", type=int, default=64, help="--max-concurrency (default: %(default)s)")
    p.add_argument("--memory-cache", default="256M", help="(default: %(default)s)")
    p.add_argument("--block-size", default="1M", help="(default: %(default)s)")
    p.add_argument("--prefetch-get-size", default=None, help="(default: the block size)")
    p.add_argument("--disk-cache", default="2G", help="(default: %(default)s)")
    p.add_argument("--files", type=int, default=4, help="objects (default: %(default)s)")
    p.add_argument(
        "--seq-files", type=int, default=2, help="of them, those the sequential readers read (default: %(default)s)"
    )
    p.add_argument("--file-size", default="256M", help="(default: %(default)s)")
    p.add_argument("--seq-readers", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--rand-readers", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of reading (default: %(default)s)")
    p.add_argument(
        "--rate",
        default="2M",
        help="bytes/s the server sends per connection, so GETs last and many are in flight; 0: unlimited "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--cgroup-limit",
        default="2G",
        help="the daemon's cgroup limit; 'bound': --memory-cache + overhead() + the headroom "
        "--memory-cache auto leaves (default: %(default)s)",
    )
    p.add_argument(
        "--mount-option",
        action="append",
        default=[],
        help="another mount option (repeatable; e.g. --mount-option=--eager)",
    )
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/modelfs-bench/concurrency_memory"))
    p.add_argument("--out", type=Path, default=None, help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    if args.prefetch_get_size is None:
        args.prefetch_get_size = args.block_size
    return args


# --- readers and sampling


def sequential_readers(
    files: list[tuple[Path, Path]], *, threads: int, stats: ReadStats, until: float, read_size: int = 1 << 20
) -> list[threading.Thread]:
    """``threads`` readers, reader i reads file i % len(files) forward from a random offset,
    wrapping at its end; every byte checked, each read's pages dropped after."""

    def reader(i: int) -> None:
        mounted, source = files[i % len(files)]
        with open(source, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as src:
            size = len(src)
            offset = random.Random(i).randrange(0, size // read_size) * read_size
            try:
                fd = os.open(mounted, os.O_RDONLY)
            except OSError as exc:
                with stats.lock:
                    stats.errors.append(f"seq {i}: {exc!r}")
                return
            try:
                while time.monotonic() < until:
                    n = min(read_size, size - offset)
                    got = os.pread(fd, n, offset)
                    if got != src[offset : offset + n]:
                        with stats.lock:
                            stats.wrong.append(f"seq {i}: [{offset}, +{n}] differs (got {len(got)})")
                    os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
                    with stats.lock:
                        stats.reads += 1
                        stats.bytes += len(got)
                    offset = (offset + n) % size
            except OSError as exc:
                with stats.lock:
                    stats.errors.append(f"seq {i}: {exc!r}")
            finally:
                os.close(fd)

    workers = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(threads)]
    for t in workers:
        t.start()
    return workers


_SKMEM = re.compile(r"skmem:\(r(\d+),rb(\d+),t(\d+),tb(\d+)")


def _sockets(pid: int) -> tuple[int, int, int]:
    """The daemon's established TCP connections, the bytes its receive queues hold now
    (rmem_alloc, skb truesize) and the sum of their receive buffer sizes (rcvbuf)."""
    out = subprocess.run(["ss", "-tmnpH", "state", "established"], capture_output=True, text=True, check=False).stdout
    count = rmem = rcvbuf = 0
    lines = out.splitlines()
    for j, line in enumerate(lines):
        if f"pid={pid}," not in line:
            continue
        m = _SKMEM.search(line) or (_SKMEM.search(lines[j + 1]) if j + 1 < len(lines) else None)
        count += 1
        if m:
            rmem += int(m.group(1))
            rcvbuf += int(m.group(2))
    return count, rmem, rcvbuf


class Sampler(threading.Thread):
    def __init__(self, pid: int, mnt: Path, block_size: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.mnt, self.block_size = pid, mnt, block_size
        self.stop = threading.Event()
        self.most: dict[str, int] = {
            "threads": 0,
            "connections": 0,
            "rmem_alloc": 0,
            "rcvbuf": 0,
            "blocks_in_flight": 0,
            "reads_in_flight": 0,
        }

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
                conns, rmem, rcvbuf = _sockets(self.pid)
                daemon = json.loads(os.getxattr(self.mnt, "user.modelfs.stats"))
            except (OSError, ValueError, AttributeError):
                continue
            now = {
                "threads": threads,
                "connections": conns,
                "rmem_alloc": rmem,
                "rcvbuf": rcvbuf,
                "blocks_in_flight": daemon["memory_parts"]["blocks_in_flight"] // self.block_size,
                "reads_in_flight": daemon["reads_in_flight"],
            }
            for k, v in now.items():
                self.most[k] = max(self.most[k], v)


def _cg_read(cg: MemoryCgroup, name: str) -> int | None:
    try:
        return int((cg.path / name).read_text())
    except (OSError, ValueError):
        return None


def run(args: argparse.Namespace) -> int:
    budget = C.parse_size(args.memory_cache)
    block = C.parse_size(args.block_size)
    size = C.parse_size(args.file_size)
    disk = C.parse_size(args.disk_cache)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    data.mkdir(exist_ok=True)
    sources = []
    for i in range(args.files):
        src = data / f"src-{args.file_size}-{i}.safetensors"
        if not src.exists():
            write_safetensors(src, size, seed=100 + i)
        sources.append(src)
    bound = budget + memlimit.overhead(
        disk_blocks=memlimit.disk_index_files(disk, block) if disk else 0,
        memory_blocks=budget // block,
        max_concurrency=args.concurrency,
    )
    limit = bound + memlimit.AUTO_HEADROOM if args.cgroup_limit == "bound" else C.parse_size(args.cgroup_limit)
    mnt, cache = work / "mnt", work / "cache"
    force_unmount(mnt)
    shutil.rmtree(cache, ignore_errors=True)
    mnt.mkdir(exist_ok=True)
    stats = ReadStats()
    record: dict[str, Any] = {}
    with (
        slow_source(args.backend, sources, work, C.parse_size(args.rate)) as store,
        MemoryCgroup(limit, prefix="modelfs-conc") as cg,
    ):
        env = store.env
        tcp = cg.version == 1 and (cg.path / "memory.kmem.tcp.limit_in_bytes").exists()
        if tcp:  # v1 charges socket buffers (apart from memory.usage) only once a tcp limit is set
            (cg.path / "memory.kmem.tcp.limit_in_bytes").write_text(str(limit))
        argv = [sys.executable, "-m", "modelfs", "mount", store.source, str(mnt), "--cache-dir", str(cache)]
        argv += store.options
        argv += ["--memory-cache", args.memory_cache, "--block-size", args.block_size, "--disk-cache", args.disk_cache]
        argv += ["--max-concurrency", str(args.concurrency), "--prefetch-get-size", args.prefetch_get_size]
        argv += args.mount_option
        result = subprocess.run(cg.wrap(argv), capture_output=True, text=True, env=env, timeout=180, check=False)
        if result.returncode != 0:
            print(f"mount failed ({result.returncode}): {result.stderr.strip()}")
            return 1
        pid = 0
        try:
            pid = C.modelfs_daemon_pid(mnt, cache)
            after_mount = C.rss_kib(pid)
            names = sorted(os.listdir(mnt))
            files = [(mnt / f"f{i}.safetensors", src) for i, src in enumerate(sources)]
            assert names == sorted(p.name for p, _ in files), names
            sampler = Sampler(pid, mnt, block)
            sampler.start()
            until = time.monotonic() + args.duration
            t0 = time.perf_counter()
            # Sequential and random readers on files of their own: a file's read-ahead state is
            # shared by its readers, and random reads there would end the sequential runs' windows.
            seq_files = files[: args.seq_files] if args.rand_readers else files
            rand_files = files[args.seq_files :] or files
            readers = sequential_readers(seq_files, threads=args.seq_readers, stats=stats, until=until)
            per_file = max(1, args.rand_readers // len(rand_files))
            for i, (mounted, src) in enumerate(rand_files):
                if args.rand_readers:
                    readers += random_readers(
                        mounted, src, threads=per_file, read_size=(1 << 20) + 4097, stats=stats, until=until, seed=i
                    )
            for t in readers:
                t.join(args.duration + 300)
            seconds = time.perf_counter() - t0
            sampler.stop.set()
            sampler.join()
            daemon = json.loads(os.getxattr(mnt, "user.modelfs.stats"))
            alive = pid in cg.pids()
            record = {
                "backend": args.backend,
                "concurrency": args.concurrency,
                "memory_cache": args.memory_cache,
                "block_size": args.block_size,
                "prefetch_get_size": args.prefetch_get_size,
                "rate": args.rate,
                "disk_cache": args.disk_cache,
                "files": f"{args.files} x {args.file_size}",
                "readers": f"{args.seq_readers} seq on {len(seq_files)} + {per_file * len(rand_files) if args.rand_readers else 0} random on {len(rand_files)}",
                "options": args.mount_option,
                "rss_after_mount_mib": round(after_mount / 1024, 1),
                "peak_rss_mib": round(C.rss_kib(pid) / 1024, 1),
                "cgroup_peak_mib": round((cg.peak() or 0) / C.MiB, 1),
                "tcp_peak_mib": round((_cg_read(cg, "memory.kmem.tcp.max_usage_in_bytes") or 0) / C.MiB, 1)
                if tcp
                else None,
                "kmem_peak_mib": round((_cg_read(cg, "memory.kmem.max_usage_in_bytes") or 0) / C.MiB, 1),
                "stat_end_mib": {
                    k: round(cg._counter("memory.stat", k) / C.MiB, 1)
                    for k in ("total_cache", "total_rss", "total_shmem", "total_mapped_file", "total_inactive_file")
                }
                if cg.version == 1
                else None,
                "bound_mib": round(bound / C.MiB, 1),
                "most": {**sampler.most, "rmem_alloc_mib": round(sampler.most["rmem_alloc"] / C.MiB, 1)},
                "mb_s": round(stats.bytes / seconds / 1e6, 1),
                "reads": stats.reads,
                "gets": daemon["backend_gets"],
                "gets_in_flight_peak": daemon.get("gets_in_flight_peak"),
                "cgroup_limit_mib": round(limit / C.MiB, 1),
                "failcnt": cg.failcnt(),
                "memory_peak_mib": round(daemon["memory_peak"] / C.MiB, 1),
                "errors": daemon["errors"],
                "wrong": stats.wrong[:5],
                "read_errors": stats.errors[:5],
                "oom_kills": cg.oom_kills(),
                "alive": alive,
                "load": os.getloadavg()[0],
            }
        finally:
            try:
                run_modelfs("unmount", str(mnt), env=env, timeout=120)
            finally:
                force_unmount(mnt)
                try:
                    if pid:
                        C.wait_exit(pid)
                except Exception:  # noqa: BLE001 - reported, the run's numbers stand
                    print(f"daemon {pid} did not exit", file=sys.stderr)
    print(json.dumps(record))
    if args.out is not None:
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0 if not stats.wrong and not stats.errors else 1


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
