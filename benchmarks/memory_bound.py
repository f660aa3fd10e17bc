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

``--workload random`` is the whole-process bound instead (issue 12): the daemon runs in a
memory cgroup (v1 or v2) of ``--cgroup-limit`` over a bucket of ``--count`` small objects in
``--dirs`` directories and one ``--safetensors``-sized safetensors file, while ``--readers``
threads do unaligned ``--read-size`` preads at random offsets for ``--duration`` seconds
(each read's pages dropped from the page cache, so reads reach the daemon) and another
thread walks the directories. It prints the mount time, the daemon's peak RSS (VmHWM) against
``--memory-cache`` + 64M, the cgroup's OOM kills and whether the daemon is alive, and checks
every byte. The seeded bucket is kept in the server dir for the next run with ``--keep-data``.
``--service-account`` mounts with service-account credentials (a key file and a token endpoint
on loopback, modelfs/testing/gauth.py) instead of ``--anonymous``, as a real deployment runs.

    flock /tmp/modelfs-bench.lock .venv/bin/python benchmarks/memory_bound.py --workload random \
        --count 200000 --dirs 2000 --keep-data
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
    C.add_mount_option_arg(p)
    p.add_argument("--strict", action="store_true", help="exit 2 when an acceptance bound is not met")
    p.add_argument(
        "--workload",
        choices=("sequential", "random"),
        default="sequential",
        help="sequential: whole-object reads per size; random: the cgroup run described above",
    )
    p.add_argument("--count", type=int, default=20000, help="random: small objects (default: %(default)s)")
    p.add_argument(
        "--dirs", type=int, default=200, help="random: directories they are spread over (default: %(default)s)"
    )
    p.add_argument("--safetensors", default="256M", help="random: size of the safetensors file (default: %(default)s)")
    p.add_argument("--readers", type=int, default=32, help="random: reader threads (default: %(default)s)")
    p.add_argument("--read-size", default="1M", help="random: bytes per pread (default: %(default)s)")
    p.add_argument("--duration", type=float, default=20.0, help="random: seconds of reading (default: %(default)s)")
    p.add_argument(
        "--cgroup-limit",
        default="192M",
        help="random: the daemon's cgroup memory limit; 0 = none (default: %(default)s)",
    )
    p.add_argument(
        "--service-account",
        action="store_true",
        help="random: the daemon signs with service-account credentials (tokens from an endpoint on loopback) "
        "instead of --anonymous, so google-auth's credential modules are loaded as in a real deployment",
    )
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


def run_random(args: argparse.Namespace, cleanup: C.Cleanup) -> int:
    """The whole-process bound under a cgroup limit: many objects, random readers, a walker."""
    import json
    import subprocess
    import threading
    from contextlib import nullcontext

    from modelfs.testing.cgroups import MemoryCgroup
    from modelfs.testing.gauth import credentials_env, token_server
    from modelfs.testing.mounts import force_unmount, run_modelfs
    from modelfs.testing.workload import (
        ReadStats,
        random_readers,
        seed_object,
        seed_small_objects,
        walk_tree,
        write_safetensors,
    )

    memory_cache = C.parse_size(args.memory_cache)
    bound = memory_cache + C.parse_size(args.rss_slack)
    limit = C.parse_size(args.cgroup_limit)
    model_size = C.parse_size(args.safetensors)
    read_size = C.parse_size(args.read_size)
    workdir: Path = args.workdir
    server_dir = C.prepare_dirs(args, "memory_bound", model_size, cleanup)
    tag = f"{args.count}-{args.dirs}-{args.safetensors}"
    gcs_root = server_dir / f"gcs-{tag}"
    source = server_dir / f"model-{args.safetensors}.safetensors"
    done = gcs_root / ".seeded"
    if not done.exists():
        shutil.rmtree(gcs_root, ignore_errors=True)
        (gcs_root / BUCKET).mkdir(parents=True)
        t0 = time.perf_counter()
        if not source.exists():
            write_safetensors(source, model_size)
        seed_small_objects(gcs_root, BUCKET, "small", args.count, args.dirs)
        seed_object(gcs_root, BUCKET, "model/model.safetensors", None, 1, path=source)
        done.write_text("ok\n")
        print(
            f"  seeded {args.count:,} objects and a {args.safetensors} safetensors file in {time.perf_counter() - t0:.1f} s"
        )
    print(
        f"memory_bound --workload random: {args.count:,} objects in {args.dirs:,} dirs, {args.readers} readers of "
        f"{args.read_size} for {args.duration:.0f} s, a walker, --memory-cache {args.memory_cache}, cgroup limit "
        f"{args.cgroup_limit} {' '.join(args.mount_option)}".rstrip(),
        flush=True,
    )
    mnt = cleanup.mountpoint(workdir / "mnt-random")
    mnt.mkdir(parents=True, exist_ok=True)
    cache = workdir / "cache-random"
    shutil.rmtree(cache, ignore_errors=True)
    stats = ReadStats()
    record: dict[str, Any] = {}
    with (
        fake_gcs(backend="filesystem", root=gcs_root) as gcs,
        MemoryCgroup(limit, prefix="modelfs-bench") if limit else nullcontext() as cg,
        token_server() if args.service_account else nullcontext() as tokens,
    ):
        env = gcs.env() if tokens is None else credentials_env(gcs.url, tokens, workdir / "service-account.json")
        argv = [sys.executable, "-m", "modelfs", "mount", f"gs://{BUCKET}", str(mnt), "--cache-dir", str(cache)]
        argv += [
            *(["--anonymous"] if tokens is None else []),
            "--memory-cache",
            args.memory_cache,
            "--disk-cache",
            args.disk_cache,
            *args.mount_option,
        ]
        t0 = time.perf_counter()
        result = subprocess.run(cg.wrap(argv) if cg else argv, capture_output=True, text=True, env=env, check=False)
        mount_s = time.perf_counter() - t0
        if result.returncode != 0:
            print(f"  mount failed ({result.returncode}): {result.stderr.strip()}")
            return 1
        pid = C.modelfs_daemon_pid(mnt, cache)
        try:
            after_mount = C.rss_kib(pid)
            t0 = time.perf_counter()
            first_ls = len(os.listdir(mnt / "small" / "d00000"))
            ls_s = time.perf_counter() - t0
            stop = threading.Event()
            walker = threading.Thread(target=walk_tree, args=(mnt, stats, stop), daemon=True)
            walker.start()
            t0 = time.perf_counter()
            readers = random_readers(
                mnt / "model" / "model.safetensors",
                source,
                threads=args.readers,
                read_size=read_size,
                stats=stats,
                until=time.monotonic() + args.duration,
            )
            for t in readers:
                t.join(args.duration + 300)
            seconds = time.perf_counter() - t0
            stop.set()
            walker.join(120)
            alive = C.rss_kib(pid, peak=False) > 0 and (cg is None or pid in cg.pids())
            daemon = C.mount_stats(mnt)
            peak = C.rss_kib(pid)
            record = {
                "objects": args.count,
                "dirs": args.dirs,
                "mount_seconds": round(mount_s, 2),
                "first_ls_seconds": round(ls_s, 3),
                "first_ls_entries": first_ls,
                "rss_after_mount_mib": round(after_mount / 1024, 1),
                "peak_rss_mib": round(peak / 1024, 1),
                "bound_mib": bound / C.MiB,
                "reads": stats.reads,
                "mb_s": round(stats.bytes / seconds / 1e6, 1),
                "walks": stats.walks,
                "entries_walked": stats.entries,
                "wrong": stats.wrong[:10],
                "errors": stats.errors[:10],
                "daemon_alive": alive,
                "cgroup": None
                if cg is None
                else {
                    "version": cg.version,
                    "limit_mib": limit / C.MiB,
                    "oom_kills": cg.oom_kills(),
                    "failcnt": cg.failcnt(),
                    "peak_mib": round((cg.peak() or 0) / C.MiB, 1),
                },
                "budget_peak_bytes": daemon.get("memory_peak"),
                "budget_parts": daemon.get("memory_parts"),
                "lease_waits": daemon.get("memory_lease_waits"),
                "small_gets": daemon.get("small_gets"),
                "backend_gets": daemon.get("backend_gets"),
                "streamed_blocks": daemon.get("streamed_blocks"),
                "credentials": "anonymous"
                if tokens is None
                else f"service account ({len(tokens.grants)} token grants)",
            }
        finally:
            try:
                run_modelfs("unmount", str(mnt), env=env, timeout=120)
            finally:
                force_unmount(mnt)
        if cg is not None:
            record["cgroup"]["oom_kills"] = cg.oom_kills()
    ok_bytes = not stats.wrong and not stats.errors
    rss_ok = record["peak_rss_mib"] * C.MiB <= bound
    oom_ok = record["cgroup"] is None or (record["cgroup"]["oom_kills"] == 0 and record["daemon_alive"])
    print(json.dumps(record, indent=1))
    print()
    print(f"mount returned after {record['mount_seconds']} s; first ls of a directory {record['first_ls_seconds']} s")
    print(
        f"peak RSS {record['peak_rss_mib']} MiB (after mount {record['rss_after_mount_mib']} MiB); bound "
        f"{bound / C.MiB:.0f} MiB (--memory-cache + {args.rss_slack}): {'met' if rss_ok else 'NOT MET'}"
    )
    if record["cgroup"] is not None:
        print(
            f"cgroup v{record['cgroup']['version']} limit {args.cgroup_limit}: {record['cgroup']['oom_kills']} OOM kills, "
            f"daemon {'alive' if record['daemon_alive'] else 'GONE'}: {'met' if oom_ok else 'NOT MET'}"
        )
    print(
        f"reads: {stats.reads} ({record['mb_s']} MB/s), walks {stats.walks}; bytes {'all correct' if ok_bytes else 'WRONG'}"
    )
    C.write_json(
        args.out,
        {
            "benchmark": "memory_bound",
            "workload": "random",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "modelfs_rev": C.git_rev(),
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
            "config": {k: str(v) for k, v in vars(args).items()},
            "result": record,
        },
    )
    if not ok_bytes:
        return 1
    if args.strict and not (rss_ok and oom_ok):
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workload == "random":
        return C.run_main("memory_bound", args, lambda c: run_random(args, c))
    return C.run_main("memory_bound", args, lambda c: run(args, c))


if __name__ == "__main__":
    sys.exit(main())
