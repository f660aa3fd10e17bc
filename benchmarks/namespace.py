#!/usr/bin/env python3
"""The lazy namespace at 10k / 100k / 1M objects, beside ``rclone mount`` on the same emulator.

For each object count (``--counts``; ``--per-dir`` objects in each directory under one
prefix) the bucket is seeded straight into fake-gcs-server's filesystem backend (a file and
its ``user.metadata`` xattr per object, no upload) and kept for the next run with
``--keep-data``. Then, for modelfs and for rclone (gcs remote, ``--dir-cache-time`` = the TTL):

- ``page``: what the emulator takes for one delimiter listing page of the prefix (a plain
  HTTP GET, measured first: fake-gcs-server scans every object on each list call, so this is
  the floor of anything that lists);
- ``mount``: how long ``modelfs mount`` takes to return (rclone: until the mount's root lists);
- ``first ls``: ``os.listdir`` of a directory never listed (median of ``--dirs-read``);
- ``lookup new``: ``stat`` of a file in a directory never listed (modelfs: one object stat
  and a one-result probe; rclone lists the directory);
- ``lookup stale``: ``stat`` of a file right after the TTL ran out, in a directory already
  listed (modelfs answers from the stale listing and refreshes behind it);
- ``RSS``: the daemon's peak RSS (VmHWM) after all that.

Timings are printed, never checked.

    flock /tmp/modelfs-bench.lock .venv/bin/python benchmarks/namespace.py \\
        --counts 10000,100000,200000,1000000 --keep-data
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (puts the repository on sys.path too)

from modelfs.mount import is_mounted  # noqa: E402
from modelfs.testing.fakegcs import fake_gcs  # noqa: E402
from modelfs.testing.mounts import daemon_pid, mounted, peak_rss_kib  # noqa: E402
from modelfs.testing.workload import seed_object, small_content  # noqa: E402

PREFIX = "p"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--counts", default="10000,100000,1000000", help="object counts (default: %(default)s)")
    p.add_argument("--per-dir", type=int, default=100, help="objects per directory (default: %(default)s)")
    p.add_argument("--ttl", type=float, default=2.0, help="--metadata-ttl and rclone --dir-cache-time (s)")
    p.add_argument("--dirs-read", type=int, default=3, help="directories listed per run (default: %(default)s)")
    p.add_argument("--memory-cache", default="64M", help="modelfs --memory-cache (default: %(default)s)")
    p.add_argument("--only", default="modelfs,rclone", help="modelfs, rclone or both (default: %(default)s)")
    p.add_argument(
        "--modelfs-option",
        action="append",
        default=[],
        metavar="OPT",
        help="extra mount option, e.g. --modelfs-option=--read-timeout=300 (at 1M objects one page of the "
        "emulator takes ~2 min, more than the default 30 s read timeout)",
    )
    C.add_common_args(p, "namespace")
    return p.parse_args(argv)


def seed(root: Path, bucket: str, count: int, per_dir: int) -> None:
    """``count`` small objects in directories of ``per_dir`` (skipped when a marker says it is done)."""
    marker = root / f".seeded-{bucket}"
    if marker.exists():
        return
    shutil.rmtree(root / bucket, ignore_errors=True)
    (root / bucket).mkdir(parents=True)
    t0 = time.monotonic()
    for i in range(count):
        name = f"{PREFIX}/d{i // per_dir:06d}/obj-{i:07d}.json"
        seed_object(root, bucket, name, small_content(name), 1000 + i)
        if i and i % 100_000 == 0:
            print(f"    seeded {i:,} objects ({i / (time.monotonic() - t0):,.0f}/s)", flush=True)
    marker.touch()
    print(f"    seeded {count:,} objects in {time.monotonic() - t0:.0f} s", flush=True)


def emulator_page(url: str, bucket: str, *, once: bool = False) -> float:
    """Seconds for one delimiter listing page of the prefix, straight from the emulator."""
    query = f"/storage/v1/b/{bucket}/o?prefix={PREFIX}/&delimiter=/&maxResults=1000"
    times: list[float] = []
    while len(times) < (1 if once else 3) and sum(times) < 10:  # at 1M objects one page is minutes
        t0 = time.monotonic()
        with urllib.request.urlopen(url + query, timeout=600) as resp:
            resp.read()
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def probe(mnt: Path, dirs: list[str], ttl: float, pid_of: Any) -> dict[str, Any]:
    """The measurements common to both mounts, on directories nobody listed yet."""
    out: dict[str, Any] = {}
    first_ls, lookup_new = [], []
    for d in dirs:
        t0 = time.monotonic()
        os.stat(mnt / d / f"{names_in(d)[3]}")
        lookup_new.append(time.monotonic() - t0)
        t0 = time.monotonic()
        entries = os.listdir(mnt / d)
        first_ls.append(time.monotonic() - t0)
        assert sorted(entries) == names_in(d), d
    out["first_ls"] = statistics.median(first_ls)
    out["lookup_new"] = statistics.median(lookup_new)
    for d in dirs:
        os.stat(mnt / d / names_in(d)[0])
    time.sleep(ttl + 0.5)
    stale = []
    for d in dirs:
        t0 = time.monotonic()
        st = os.stat(mnt / d / names_in(d)[0])
        stale.append(time.monotonic() - t0)
        assert st.st_size == len(small_content(f"{PREFIX}/{d}/{names_in(d)[0]}")), d
    out["lookup_stale"] = statistics.median(stale)
    out["lookup_stale_max"] = max(stale)
    out["rss_mib"] = peak_rss_kib(pid_of()) / 1024
    return out


_PER_DIR = 100


def names_in(d: str) -> list[str]:
    index = int(d[1:])
    return [f"obj-{i:07d}.json" for i in range(index * _PER_DIR, (index + 1) * _PER_DIR)]


def run_modelfs(args: argparse.Namespace, gcs: Any, bucket: str, dirs: list[str]) -> dict[str, Any]:
    work = args.workdir
    mnt, cache = work / "mnt-modelfs", work / "cache-modelfs"
    shutil.rmtree(cache, ignore_errors=True)
    # The emulator's page time swings with the machine's load: measured again right before
    # the mount and right after it, the mount is compared with what the page cost then.
    before = emulator_page(gcs.url, bucket, once=True)
    t0 = time.monotonic()
    with mounted(
        f"gs://{bucket}/{PREFIX}",
        mnt,
        cache,
        "--anonymous",
        "--metadata-ttl",
        str(args.ttl),
        "--memory-cache",
        args.memory_cache,
        *args.modelfs_option,
        env=gcs.env(),
    ):
        mount_s = time.monotonic() - t0
        after = emulator_page(gcs.url, bucket, once=True)
        out = probe(mnt, dirs, args.ttl, lambda: daemon_pid(cache))
        out["mount"] = mount_s
        out["page_around_mount"] = (before + after) / 2
        stats = C.mount_stats(mnt)
        out["metadata_mib"] = stats.get("metadata_bytes", 0) / 2**20
        out["pages"] = stats.get("listing_pages")
        pid = daemon_pid(cache)
    C.wait_daemon_exit(pid)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def run_rclone(args: argparse.Namespace, gcs: Any, bucket: str, dirs: list[str], cleanup: C.Cleanup) -> dict[str, Any]:
    work = args.workdir
    conf = work / "rclone.conf"
    conf.write_text(f"[gcs]\ntype = google cloud storage\nanonymous = true\nendpoint = {gcs.url}/storage/v1/\n")
    mnt = cleanup.mountpoint(work / "mnt-rclone")
    mnt.mkdir(parents=True, exist_ok=True)
    log = work / "rclone.log"
    cmd = [
        "rclone",
        "--config",
        str(conf),
        "mount",
        f"gcs:{bucket}/{PREFIX}",
        str(mnt),
        "--read-only",
        "--dir-cache-time",
        f"{args.ttl}s",
        "--attr-timeout",
        f"{args.ttl}s",
        "--log-file",
        str(log),
    ]
    t0 = time.monotonic()
    proc = cleanup.process(
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    )
    try:
        deadline = time.monotonic() + 600
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rclone mount did not come up: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        out = {"mount": time.monotonic() - t0}
        out.update(probe(mnt, dirs, args.ttl, lambda: proc.pid))
        return out
    finally:
        C.stop_fuse_process(proc, mnt)


def body(args: argparse.Namespace, cleanup: C.Cleanup) -> int:
    global _PER_DIR
    _PER_DIR = args.per_dir
    counts = [int(c) for c in args.counts.split(",")]
    C.unmount_leftovers(args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    # Many small files with xattrs: a real file system, not /dev/shm.
    server = args.server_dir or args.workdir / "server"
    if not args.keep_data:
        cleanup.remove_later(server)
    root = server / "root"
    root.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    if "rclone" in only and not shutil.which("rclone"):
        print("note: rclone is not installed: skipped", file=sys.stderr)
        only.discard("rclone")
    rows = []
    results: dict[str, Any] = {"rev": C.git_rev(), "ttl": args.ttl, "per_dir": args.per_dir, "runs": []}
    for count in counts:
        bucket = f"ns{count}"
        print(f"== {count:,} objects in {count // args.per_dir:,} directories", flush=True)
        seed(root, bucket, count, args.per_dir)
        ndirs = count // args.per_dir
        step = max(1, ndirs // (2 * args.dirs_read + 1))
        picks = [f"d{i:06d}" for i in range(step, ndirs, step)][: 2 * args.dirs_read]
        with fake_gcs("filesystem", root=root) as gcs:
            page = emulator_page(gcs.url, bucket)
            print(f"    emulator: one listing page {page:.2f} s", flush=True)
            for tool in ("modelfs", "rclone"):
                if tool not in only:
                    continue
                # Each tool gets directories nobody listed; caches are not dropped: the emulator
                # keeps its bucket in the page cache, as during the page measurement above.
                dirs = picks[: args.dirs_read] if tool == "modelfs" else picks[args.dirs_read :]
                if tool == "modelfs":
                    r = run_modelfs(args, gcs, bucket, dirs)
                else:
                    r = run_rclone(args, gcs, bucket, dirs, cleanup)
                r.update(tool=tool, count=count, page=page)
                results["runs"].append(r)
                print(f"    {tool}: {r}", flush=True)
                rows.append(
                    [
                        f"{count:,}",
                        tool,
                        f"{page:.2f}",
                        f"{r['mount']:.2f}"
                        + (f" (page then {r['page_around_mount']:.2f})" if tool == "modelfs" else ""),
                        f"{r['first_ls']:.2f}",
                        f"{r['lookup_new']:.3f}",
                        f"{r['lookup_stale']:.4f} (max {r['lookup_stale_max']:.4f})",
                        f"{r['rss_mib']:.0f}",
                        f"{r.get('metadata_mib', 0):.2f}" if tool == "modelfs" else "-",
                    ]
                )
    print()
    print(
        C.fmt_table(
            [
                "objects",
                "mount",
                "emulator page s",
                "mount s",
                "first ls s",
                "lookup new s",
                "lookup after TTL s",
                "peak RSS MiB",
                "metadata MiB",
            ],
            rows,
        )
    )
    C.write_json(args.out, results)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return C.run_main("namespace", args, lambda cleanup: body(args, cleanup))


if __name__ == "__main__":
    sys.exit(main())
