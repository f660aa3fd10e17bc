#!/usr/bin/env python3
"""Cold random reads through the mount: IOPS and read amplification, with and without the
random-read detector (acceptance of the "mmap'd model loads" issue, its fio part).

One run seeds one object of ``--size`` (default 1G) random-looking bytes into fake-gcs-server
(filesystem backend, a file plus its metadata xattr, no upload). The object is named
``random.dat``, which is not a weight-file suffix, and every mount also gets ``--no-eager``, so
no eager stream copies the whole object behind the reader's back. For each ``--random-read-size``
(default ``1M`` (modelfs' default), ``64K`` and ``0`` = detector off, whole blocks), each fio
block size (``--bs``, default 4k and 128k) and each job count (``--jobs``, default 1 and 4), it
mounts modelfs cold (fresh cache dir, page cache dropped) and runs one fio job::

    fio --rw=randread --bs=BS --direct=0 --ioengine=psync --numjobs=N --group_reporting
        --size=SIZE --runtime=RUNTIME --readonly --randrepeat=1

(fio's default ``fadvise_hint`` tells the kernel the file is read randomly, so the kernel does
no read-ahead: each fio read is one FUSE read of the same size.) It reports fio's IOPS, MB/s and
completion-latency percentiles, and from the mount root's ``user.modelfs.stats``: backend GETs
(and how many were the detector's small GETs) and bytes. Read amplification = backend bytes /
bytes fio read.

Exit status 1 if the run failed, 0 otherwise; numbers are reported, never checked.

    .venv/bin/python benchmarks/random_read.py [--size 1G] [--runtime 15] [--detector 1M,64K,0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (puts the repository on sys.path too)

from modelfs.testing.fakegcs import fake_gcs  # noqa: E402
from modelfs.testing.mounts import daemon_pid, mounted, peak_rss_kib  # noqa: E402

BUCKET = "bench"
OBJECT = "random.dat"  # not a weight suffix: eager streaming leaves it alone (and --no-eager too)


def fio(path: Path, *, bs: str, jobs: int, size: int, runtime: int) -> dict[str, Any]:
    cmd = [
        "fio",
        "--name=randread",
        f"--filename={path}",
        "--rw=randread",
        f"--bs={bs}",
        "--direct=0",
        "--ioengine=psync",
        f"--numjobs={jobs}",
        "--group_reporting",
        f"--size={size}",
        f"--runtime={runtime}",
        "--readonly",
        "--randrepeat=1",
        "--invalidate=1",
        "--output-format=json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=runtime + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed: {proc.stderr.strip() or proc.stdout.strip()}")
    text = proc.stdout
    data = json.loads(text[text.index("{") :])
    job = data["jobs"][0]  # group_reporting: one entry for all jobs
    read = job["read"]
    pct = read.get("clat_ns", {}).get("percentile", {})
    return {
        "iops": round(float(read["iops"]), 1),
        "mb_s": round(float(read["bw_bytes"]) / 1e6, 2),
        "io_bytes": int(read["io_bytes"]),
        "runtime_s": round(float(read["runtime"]) / 1000, 2),
        "clat_p50_us": round(pct.get("50.000000", 0) / 1000, 1),
        "clat_p99_us": round(pct.get("99.000000", 0) / 1000, 1),
        "errors": int(job.get("error", 0)),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="1G", help="object size, also fio's --size (default: %(default)s)")
    p.add_argument("--runtime", type=int, default=15, help="seconds per fio job, at most (default: %(default)s)")
    p.add_argument("--bs", default="4k,128k", help="fio block sizes (default: %(default)s)")
    p.add_argument("--jobs", default="1,4", help="fio job counts (default: %(default)s)")
    p.add_argument(
        "--detector",
        default="1M,64K,0",
        help="modelfs --random-read-size values; 0 = detector off (default: %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=1, help="rounds; the table shows medians (default: %(default)s)")
    p.add_argument("--memory-cache", default="256M", help="modelfs --memory-cache (default: %(default)s)")
    p.add_argument("--disk-cache", default="4G", help="modelfs --disk-cache (default: %(default)s)")
    p.add_argument(
        "--mount-option",
        action="append",
        default=[],
        metavar="OPT",
        help="extra modelfs mount option, e.g. --mount-option=--block-size=4M (repeatable)",
    )
    C.add_common_args(p, "random_read")
    return p.parse_args(argv)


def run(args: argparse.Namespace, cleanup: C.Cleanup) -> int:
    size = C.parse_size(args.size)
    block_sizes = [b.strip() for b in args.bs.split(",") if b.strip()]
    job_counts = [int(j) for j in args.jobs.split(",") if j.strip()]
    detectors = [d.strip() for d in args.detector.split(",") if d.strip()]
    for d in detectors:
        C.parse_size(d)  # fail early on a typo
    workdir: Path = args.workdir
    server_dir = C.prepare_dirs(args, "random_read", size, cleanup)
    base_options = [
        "--anonymous",
        "--no-eager",
        "--memory-cache",
        args.memory_cache,
        "--disk-cache",
        args.disk_cache,
        *args.mount_option,
    ]
    print(
        f"random_read: {size / C.GiB:.2f} GiB object {OBJECT}, fio randread bs {','.join(block_sizes)}, "
        f"jobs {','.join(map(str, job_counts))}, {args.runtime} s each, {args.rounds} round(s); modelfs "
        f"{' '.join(base_options[1:])} --random-read-size {'|'.join(detectors)}",
        flush=True,
    )
    source, _sha = C.ensure_object(server_dir / "src", OBJECT, size, tag=11)
    samples: dict[str, list[dict[str, Any]]] = {}
    order: list[tuple[str, str, int]] = []
    t_start = time.perf_counter()
    interrupted = False
    try:
        shutil.rmtree(server_dir / "gcs", ignore_errors=True)
        with fake_gcs(backend="filesystem", root=server_dir / "gcs") as gcs:
            gcs.create_bucket(BUCKET)
            gcs.seed_file(BUCKET, OBJECT, source)
            print(f"  seeded gs://{BUCKET}/{OBJECT} at {gcs.url}", flush=True)
            for r in range(args.rounds):
                if args.rounds > 1:
                    print(f"  round {r + 1}/{args.rounds}", flush=True)
                for detector in detectors:
                    for bs in block_sizes:
                        for jobs in job_counts:
                            key = f"{detector}/{bs}/{jobs}"
                            if (detector, bs, jobs) not in order:
                                order.append((detector, bs, jobs))
                            cache = workdir / f"cache-{detector}-{bs}-{jobs}-r{r}"
                            shutil.rmtree(cache, ignore_errors=True)
                            mnt = cleanup.mountpoint(workdir / "mnt-modelfs")
                            pid = None
                            busy = C.machine_busy()
                            try:
                                C.drop_caches()
                                with mounted(
                                    f"gs://{BUCKET}",
                                    mnt,
                                    cache,
                                    *base_options,
                                    "--random-read-size",
                                    detector,
                                    env=gcs.env(),
                                ):
                                    pid = daemon_pid(cache)
                                    out = fio(mnt / OBJECT, bs=bs, jobs=jobs, size=size, runtime=args.runtime)
                                    stats = C.mount_stats(mnt)
                                    out.update(
                                        peak_rss_kib=peak_rss_kib(pid),
                                        backend_gets=stats["backend_gets"],
                                        backend_bytes=stats["backend_bytes"],
                                        small_gets=stats["small_gets"],
                                        disk_hits=stats["disk_hits"],
                                        errors_daemon=stats["errors"],
                                        memory_hits=stats["memory_hits"],
                                        memory_misses=stats["memory_misses"],
                                    )
                            finally:
                                if pid is not None:
                                    C.wait_daemon_exit(pid)
                                shutil.rmtree(cache, ignore_errors=True)
                            out["busy_before_pct"] = busy
                            out["amplification"] = (
                                round(out["backend_bytes"] / out["io_bytes"], 2) if out["io_bytes"] else None
                            )
                            samples.setdefault(key, []).append(out)
                            print(
                                f"    --random-read-size {detector:<4} bs {bs:<5} jobs {jobs}: {out['iops']:9,.0f} IOPS "
                                f"{out['mb_s']:8,.1f} MB/s, read {out['io_bytes'] / C.MiB:8,.1f} MiB, backend "
                                f"{out['backend_gets']} GETs ({out['small_gets']} small) "
                                f"{out['backend_bytes'] / C.MiB:,.1f} MiB, amplification {out['amplification']}; "
                                f"CPU busy before {busy:.0f}%",
                                flush=True,
                            )
    except (KeyboardInterrupt, C._Terminated):
        interrupted = True
        print("  interrupted: reporting what was measured", flush=True)
    elapsed = time.perf_counter() - t_start

    rows = []
    medians: dict[str, dict[str, float]] = {}
    for detector, bs, jobs in order:
        key = f"{detector}/{bs}/{jobs}"
        ss = samples.get(key)
        if not ss:
            continue
        m = {
            f: C.median(s[f] for s in ss if s.get(f) is not None)
            for f in (
                "iops",
                "mb_s",
                "io_bytes",
                "backend_gets",
                "small_gets",
                "backend_bytes",
                "amplification",
                "clat_p50_us",
                "clat_p99_us",
                "peak_rss_kib",
            )
        }
        medians[key] = m
        rows.append(
            [
                detector if detector != "0" else "0 (off)",
                bs,
                jobs,
                f"{m['iops']:,.0f}",
                f"{m['mb_s']:,.1f}",
                f"{m['io_bytes'] / C.MiB:,.1f}",
                f"{m['backend_gets']:,.0f}",
                f"{m['small_gets']:,.0f}",
                f"{m['backend_bytes'] / C.MiB:,.1f}",
                f"{m['amplification']:,.2f}",
                f"{m['clat_p50_us']:,.0f}",
                f"{m['clat_p99_us']:,.0f}",
                f"{m['peak_rss_kib'] / 1024:.0f}",
            ]
        )
    print()
    print(
        f"random_read results: {size / C.GiB:.2f} GiB object, cold mounts, fio randread --direct=0 for at most "
        f"{args.runtime} s; medians of {args.rounds} round(s); amplification = backend bytes / bytes fio read"
    )
    print(
        C.fmt_table(
            [
                "--random-read-size",
                "bs",
                "jobs",
                "IOPS",
                "MB/s",
                "read MiB",
                "GETs",
                "small",
                "GET MiB",
                "amplif.",
                "p50 us",
                "p99 us",
                "RSS MiB",
            ],
            rows,
            align="lrrrrrrrrrrrr",
        )
    )
    busy_all = [s["busy_before_pct"] for ss in samples.values() for s in ss]
    if busy_all:
        print(
            f"other work on the machine: CPU busy {C.median(busy_all):.0f}% (median; max {max(busy_all):.0f}%) of "
            f"{100 * (os.cpu_count() or 1)}% in the second before each job (this benchmark idle)"
        )
    print(f"total time {elapsed:.0f} s")
    C.write_json(
        args.out,
        {
            "benchmark": "random_read",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "modelfs_rev": C.git_rev(),
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "fio": _version(["fio", "--version"])},
            "config": {
                "size": size,
                "object": OBJECT,
                "runtime": args.runtime,
                "bs": block_sizes,
                "jobs": job_counts,
                "detector": detectors,
                "rounds": args.rounds,
                "memory_cache": args.memory_cache,
                "disk_cache": args.disk_cache,
                "mount_options": base_options,
            },
            "medians": medians,
            "samples": samples,
            "seconds": round(elapsed, 1),
        },
    )
    print(f"results written to {args.out}")
    return 130 if interrupted else 0


def _version(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("fio"):
        print("random_read: needs fio (apt-get install -y fio)", file=sys.stderr)
        return 1
    return C.run_main("random_read", args, lambda c: run(args, c))


if __name__ == "__main__":
    sys.exit(main())
