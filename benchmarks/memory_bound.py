#!/usr/bin/env python3
"""Memory bound and disk-cache re-read of the core mount (acceptance of the "core mount" issue).

For each object (default 256 MiB and 2 GiB of random-looking bytes, seeded into
fake-gcs-server's filesystem backend without an upload) this mounts modelfs with
``--memory-cache 64M --disk-cache 4G`` and reads the whole object twice with plain 1 MiB
read() calls, dropping the kernel page cache before each pass so both passes go to the daemon.
Pass 1 comes from the backend, pass 2 should come from the disk cache. Per pass it prints the
throughput, the backend GETs and disk-cache hits of that pass (deltas of the mount root's
``user.modelfs.stats`` xattr) and the daemon's peak RSS (VmHWM, reset before each pass), and
it checks every byte (sha256 of what was read against the source).

Exit status: 1 if any byte read was wrong (or the run failed), 0 otherwise; with ``--strict``
also 2 when an acceptance bound (RSS, pass-2 GETs) is not met. Timings are never checked.

    .venv/bin/python benchmarks/memory_bound.py [--objects 256M,2G] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (puts the repository on sys.path too)

from modelfs.testing.fakegcs import fake_gcs  # noqa: E402
from modelfs.testing.mounts import daemon_pid, mounted  # noqa: E402

BUCKET = "bench"


def human(size: int) -> str:
    return f"{size // C.GiB}G" if size % C.GiB == 0 else f"{size // C.MiB}M"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--objects", default="256M,2G", help="comma-separated object sizes (default: %(default)s)")
    p.add_argument("--memory-cache", default="64M", help="modelfs --memory-cache (default: %(default)s)")
    p.add_argument("--disk-cache", default="4G", help="modelfs --disk-cache (default: %(default)s)")
    p.add_argument("--rss-slack", default="64M", help="allowed peak RSS above the memory budget (default: %(default)s)")
    p.add_argument("--chunk", default="1M", help="size of each read() call (default: %(default)s)")
    p.add_argument(
        "--mount-option",
        action="append",
        default=[],
        metavar="OPT",
        help="extra modelfs mount option, e.g. --mount-option=--block-size=16M (repeatable)",
    )
    p.add_argument("--strict", action="store_true", help="exit 2 when an acceptance bound is not met")
    C.add_common_args(p, "memory_bound")
    return p.parse_args(argv)


def run(args: argparse.Namespace, cleanup: C.Cleanup) -> int:
    sizes = [C.parse_size(s) for s in args.objects.split(",") if s.strip()]
    memory_cache = C.parse_size(args.memory_cache)
    bound_kib = (memory_cache + C.parse_size(args.rss_slack)) // 1024
    chunk = C.parse_size(args.chunk)

    workdir: Path = args.workdir
    server_dir = C.prepare_dirs(args, "memory_bound", sum(sizes), cleanup)
    print(
        f"memory_bound: objects {', '.join(human(s) for s in sizes)}; --memory-cache {args.memory_cache} "
        f"--disk-cache {args.disk_cache} {' '.join(args.mount_option)}".rstrip()
    )
    print(f"  server objects in {server_dir}; caches and mountpoints in {workdir}", flush=True)

    objects: list[tuple[str, int, Path, str]] = []
    for i, size in enumerate(sizes):
        name = f"obj-{human(size)}.bin"
        path, sha = C.ensure_object(server_dir / "src", name, size, tag=100 + i)
        objects.append((name, size, path, sha))

    records: list[dict[str, Any]] = []
    wrong_bytes = False
    with fake_gcs(backend="filesystem", root=server_dir / "gcs") as gcs:
        gcs.create_bucket(BUCKET)
        for name, _, path, _ in objects:
            t0 = time.perf_counter()
            gcs.seed_file(BUCKET, name, path)
            print(f"  seeded gs://{BUCKET}/{name} in {time.perf_counter() - t0:.1f} s", flush=True)

        for name, size, _, sha in objects:
            cache = workdir / f"cache-{name}"
            shutil.rmtree(cache, ignore_errors=True)
            mnt = cleanup.mountpoint(workdir / f"mnt-{name}")
            options = [
                "--anonymous",
                "--memory-cache",
                args.memory_cache,
                "--disk-cache",
                args.disk_cache,
                *args.mount_option,
            ]
            with mounted(f"gs://{BUCKET}", mnt, cache, *options, env=gcs.env()):
                pid = daemon_pid(cache)
                startup_peak = C.rss_kib(pid)
                idle = C.rss_kib(pid, peak=False)
                for n in (1, 2):
                    C.drop_caches(1)
                    C.reset_peak_rss(pid)
                    before = C.mount_stats(mnt)
                    result = C.read_file(mnt / name, chunk=chunk, verify=True)
                    after = C.mount_stats(mnt)
                    peak = C.rss_kib(pid)
                    ok = result.sha256 == sha and result.nbytes == size
                    wrong_bytes |= not ok

                    def delta(key: str, after: dict[str, Any] = after, before: dict[str, Any] = before) -> int:
                        return int(after.get(key, 0)) - int(before.get(key, 0))

                    rec = {
                        "object": name,
                        "size": size,
                        "pass": n,
                        "bytes_read": result.nbytes,
                        "seconds": round(result.seconds, 3),
                        "mb_s": round(result.mb_s, 1),
                        "backend_gets": delta("backend_gets"),
                        "backend_bytes": delta("backend_bytes"),
                        "disk_hits": delta("disk_hits"),
                        "memory_hits": delta("memory_hits"),
                        "prefetch_refused": delta("prefetch_refused"),
                        "errors": delta("errors"),
                        "retries": delta("retries"),
                        "memory_peak_bytes": after.get("memory_peak"),
                        "peak_rss_kib": peak,
                        "startup_peak_rss_kib": startup_peak,
                        "idle_rss_kib": idle,
                        "sha256_ok": ok,
                        "sha256": result.sha256,
                    }
                    records.append(rec)
                    print(
                        f"  {name} pass {n}: {rec['mb_s']:,.0f} MB/s, {rec['backend_gets']} GETs, "
                        f"{rec['disk_hits']} disk hits, peak RSS {peak / 1024:.1f} MiB, "
                        f"bytes {'ok' if ok else 'WRONG'}",
                        flush=True,
                    )
                final = C.mount_stats(mnt)
                records[-1]["final_stats"] = final
            waited = C.wait_exit(pid)  # so the next object's daemon does not run beside this one
            if waited > 5:
                print(f"  note: the daemon took {waited:.1f} s to exit after its unmount", flush=True)

    # --- the table and the acceptance verdicts
    rows = []
    for r in records:
        rows.append(
            [
                r["object"],
                human(r["size"]),
                r["pass"],
                f"{r['mb_s']:,.0f}",
                r["backend_gets"],
                f"{r['backend_bytes'] / C.MiB:,.0f}",
                r["disk_hits"],
                r["memory_hits"],
                f"{r['idle_rss_kib'] / 1024:.1f}",
                f"{r['peak_rss_kib'] / 1024:.1f}",
                "ok" if r["sha256_ok"] else "WRONG",
            ]
        )
    print()
    print(
        f"memory_bound results (--memory-cache {args.memory_cache}, --disk-cache {args.disk_cache}; "
        f"MB = 10^6 bytes; reads of {args.chunk} with sha256 in a second thread; page cache dropped before each pass)"
    )
    print(
        C.fmt_table(
            [
                "object",
                "size",
                "pass",
                "MB/s",
                "GETs",
                "GET MiB",
                "disk hits",
                "mem hits",
                "idle RSS MiB",
                "peak RSS MiB",
                "sha256",
            ],
            rows,
        )
    )

    peaks = {
        name: max(max(r["peak_rss_kib"], r["startup_peak_rss_kib"]) for r in records if r["object"] == name)
        for name, *_ in objects
    }
    blocks = {name: -(-size // (8 * C.MiB)) for name, size, *_ in objects}
    pass2 = {r["object"]: r for r in records if r["pass"] == 2}
    rss_ok = all(p < bound_kib for p in peaks.values())
    gets_ok = all(r["backend_gets"] <= max(1, blocks[r["object"]] // 50) for r in pass2.values())
    spread_kib = max(peaks.values()) - min(peaks.values())
    flat_ok = spread_kib <= 16 * 1024
    acceptance = {
        "bytes_ok": not wrong_bytes,
        "peak_rss_under_bound": rss_ok,
        "bound_mib": bound_kib / 1024,
        "peak_rss_mib": {k: round(v / 1024, 1) for k, v in peaks.items()},
        "pass2_near_zero_gets": gets_ok,
        "pass2_gets": {k: r["backend_gets"] for k, r in pass2.items()},
        "peak_flat_across_sizes": flat_ok,
        "peak_spread_mib": round(spread_kib / 1024, 1),
    }
    print()
    print(f"bytes: {'all correct' if not wrong_bytes else 'WRONG BYTES READ'}")
    print(
        f"peak RSS (incl. startup) per object: "
        f"{', '.join(f'{k} {v / 1024:.1f} MiB' for k, v in peaks.items())}; bound {bound_kib / 1024:.0f} MiB "
        f"(memory cache + {args.rss_slack}): {'met' if rss_ok else 'NOT MET'}"
    )
    print(
        f"peak RSS spread across sizes: {spread_kib / 1024:.1f} MiB (<= 16 MiB counts as flat): "
        f"{'flat' if flat_ok else 'GROWS'}"
    )
    gets_text = ", ".join(f"{k} {r['backend_gets']}" for k, r in pass2.items())
    print(f"pass 2 backend GETs: {gets_text} (near zero = served from the disk cache): {'yes' if gets_ok else 'NO'}")

    C.write_json(
        args.out,
        {
            "benchmark": "memory_bound",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "modelfs_rev": C.git_rev(),
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
            "config": {
                "objects": [human(s) for s in sizes],
                "memory_cache": args.memory_cache,
                "disk_cache": args.disk_cache,
                "chunk": args.chunk,
                "mount_options": args.mount_option,
                "server_dir": str(server_dir),
            },
            "passes": records,
            "acceptance": acceptance,
        },
    )
    print(f"results written to {args.out}")
    if wrong_bytes:
        return 1
    if args.strict and not (rss_ok and gets_ok and flat_ok):
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return C.run_main("memory_bound", args, lambda c: run(args, c))


if __name__ == "__main__":
    sys.exit(main())
