#!/usr/bin/env python3
"""Streaming throughput side by side (acceptance of the "stream at wire speed" issue).

One run starts fake-gcs-server (filesystem backend, its files on tmpfs) on 127.0.0.1, seeds
one object of ``--size`` random-looking bytes (a file plus its metadata xattr, no upload),
and then, for each of ``--rounds`` rounds, measures every path below on that one object:

  curl            full GET with ``curl -o /dev/null``: the wire limit
  gcs             google-cloud-storage ``download_as_bytes`` of 8 MiB ranges, 1 and 4 threads
  modelfs         cold (fresh cache dir, ``--memory-cache 128M``), warm (unmount, remount on
                  the same cache dir, page cache dropped: served by the disk cache) and hot
                  (read again in the same mount: keep_cache makes it a page-cache hit);
                  each with ``dd bs=1M`` and, when fio is installed, a fio sequential-read job
  baseline        the same bytes from a tmpfs file (page cache) and from a local-disk file
                  with the page cache dropped
  rclone          ``rclone mount`` (gcs remote on the same server), ``--vfs-cache-mode full``
                  and ``off``, cold and warm
  download        ``Blob.download_to_filename`` then a sequential read of the file
  verify          (first round only) a cold and a warm modelfs read hashed with sha256

Page caches are dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) before every cold and
warm measurement. The daemon's peak RSS (VmHWM) is recorded for every modelfs mount, rclone's
for every rclone mount, the client processes' for the library paths. It prints a table of
median MB/s (MB = 10^6 bytes) with min/max over the rounds, and the ratios of modelfs to
curl, rclone and download-then-read, and writes everything to ``--out`` as JSON.

Exit status: 1 if a verified read returned wrong bytes (or the run failed), 0 otherwise;
timings are reported, never checked.

    .venv/bin/python benchmarks/streaming.py [--size 4G] [--rounds 3] [--only modelfs,curl]
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (puts the repository on sys.path too)

from modelfs.mount import is_mounted  # noqa: E402
from modelfs.testing.fakegcs import FakeGCS, fake_gcs  # noqa: E402
from modelfs.testing.mounts import mounted  # noqa: E402

BUCKET = "bench"
OBJECT = "model.bin"
GROUPS = ("verify", "curl", "gcs", "modelfs", "fio", "baseline", "rclone", "download")
CLIENTS = Path(__file__).resolve().parent / "_clients.py"

# key -> label, in table order
LABELS: dict[str, str] = {
    "curl": "curl full GET (wire limit)",
    "gcs-ranged-1": "google-cloud-storage 8 MiB ranges, 1 thread",
    "gcs-ranged-4": "google-cloud-storage 8 MiB ranges, 4 threads",
    "download-then-read": "download_to_filename, then read the file",
    "modelfs-cold-dd": "modelfs cold, dd bs=1M",
    "modelfs-cold-fio": "modelfs cold, fio seq read 1M",
    "modelfs-warm-dd": "modelfs warm (remount, disk cache), dd",
    "modelfs-warm-fio": "modelfs warm (remount, disk cache), fio",
    "modelfs-hot-dd": "modelfs hot (page cache, keep_cache), dd",
    "modelfs-hot-fio": "modelfs hot (page cache, keep_cache), fio",
    "modelfs-cold-sha256": "modelfs cold, 1M reads + sha256 (verify)",
    "modelfs-warm-sha256": "modelfs warm, 1M reads + sha256 (verify)",
    "rclone-full-cold": "rclone mount --vfs-cache-mode full, cold",
    "rclone-full-warm": "rclone mount --vfs-cache-mode full, warm",
    "rclone-off-cold": "rclone mount --vfs-cache-mode off, cold",
    "rclone-off-warm": "rclone mount --vfs-cache-mode off, remount",
    "tmpfs-dd": "tmpfs file, dd (page-cache baseline)",
    "local-cold-dd": "local-disk file, page cache dropped, dd",
}

# (label, numerator, denominator)
RATIOS: list[tuple[str, str, str]] = [
    ("modelfs cold / curl", "modelfs-cold-dd", "curl"),
    ("modelfs cold / rclone full cold", "modelfs-cold-dd", "rclone-full-cold"),
    ("modelfs cold / rclone off cold", "modelfs-cold-dd", "rclone-off-cold"),
    ("modelfs cold / download-then-read", "modelfs-cold-dd", "download-then-read"),
    ("modelfs cold / gcs 8 MiB ranges, 1 thread", "modelfs-cold-dd", "gcs-ranged-1"),
    ("modelfs cold fio / curl", "modelfs-cold-fio", "curl"),
    ("modelfs warm / rclone full warm", "modelfs-warm-dd", "rclone-full-warm"),
    ("modelfs warm / local disk (cold page cache)", "modelfs-warm-dd", "local-cold-dd"),
    ("modelfs hot / tmpfs", "modelfs-hot-dd", "tmpfs-dd"),
]


class Bench:
    def __init__(self, args: argparse.Namespace, cleanup: C.Cleanup) -> None:
        self.args = args
        self.cleanup = cleanup
        self.size = C.parse_size(args.size)
        self.memory_cache = C.parse_size(args.memory_cache)
        self.samples: dict[str, list[dict[str, Any]]] = {}
        self.wrong_bytes = False
        self.rounds_done = 0
        self.rev_at_start = ""
        self.mount_seconds: list[float] = []  # modelfs mount command until the mount answers
        self.exit_seconds: list[float] = []  # unmount command until the daemon has exited
        self.workdir: Path = args.workdir
        self.gcs: FakeGCS | None = None
        self.source: Path | None = None
        self.sha256 = ""
        self.only = set(args.only.split(",")) if args.only else set(GROUPS)
        if args.variant:  # their rows go right after the default cold rows
            items = list(LABELS.items())
            LABELS.clear()
            for k, v in items:
                LABELS[k] = v
                if k == "modelfs-cold-fio":
                    for name, extra in args.variant:
                        LABELS[f"modelfs-cold-dd[{name}]"] = f"modelfs cold, dd, {' '.join(extra)}"
                        RATIOS.append(
                            (f"modelfs cold {name} / modelfs cold", f"modelfs-cold-dd[{name}]", "modelfs-cold-dd")
                        )
        unknown = self.only - set(GROUPS)
        if unknown:
            raise SystemExit(f"--only: unknown group(s) {', '.join(sorted(unknown))}; known: {', '.join(GROUPS)}")
        if "fio" in self.only and not shutil.which("fio"):
            print("note: fio is not installed (apt-get install -y fio): fio jobs skipped", file=sys.stderr)
            self.only.discard("fio")
        if "rclone" in self.only and not shutil.which("rclone"):
            print("note: rclone is not installed (apt-get install -y rclone): rclone skipped", file=sys.stderr)
            self.only.discard("rclone")

    # --- bookkeeping

    def record(self, key: str, result: C.ReadResult, **extra: Any) -> None:
        if result.nbytes != self.size:
            raise RuntimeError(f"{key}: read {result.nbytes} bytes, expected {self.size}")
        sample = {"mb_s": round(result.mb_s, 1), "seconds": round(result.seconds, 3), **extra}
        self.samples.setdefault(key, []).append(sample)
        rss = extra.get("peak_rss_kib")
        gets = extra.get("backend_gets")
        cpu = extra.get("cpu_s")
        note = (f", peak RSS {rss / 1024:.0f} MiB" if rss else "") + (f", {gets} GETs" if gets is not None else "")
        note += f", CPU {cpu:.1f} s" if cpu is not None else ""
        print(f"    {LABELS[key]:<46} {result.mb_s:8,.0f} MB/s{note}", flush=True)

    @contextmanager
    def cpu(self, worker: int | None = None) -> Iterator[dict[str, float]]:
        """CPU seconds used during the block: by ``worker`` (daemon, rclone) or else by the
        waited-for children (dd, fio, curl, client processes), and by the server."""
        assert self.gcs is not None
        out: dict[str, float] = {}
        server = self.gcs.process.pid
        w0 = C.cpu_seconds(worker) if worker else 0.0
        c0, s0 = C.children_cpu_seconds(), C.cpu_seconds(server)
        yield out
        children = C.children_cpu_seconds() - c0
        out["reader_cpu_s"] = round(children, 2)
        out["cpu_s"] = round(C.cpu_seconds(worker) - w0 if worker else children, 2)
        out["server_cpu_s"] = round(C.cpu_seconds(server) - s0, 2)

    def median(self, key: str) -> float:
        return C.median(s["mb_s"] for s in self.samples.get(key, []))

    # --- setup

    def modelfs_options(self, extra: list[str] | None = None) -> list[str]:
        return [
            "--anonymous",
            "--memory-cache",
            self.args.memory_cache,
            "--disk-cache",
            self.args.disk_cache,
            *self.args.mount_option,
            *(extra or []),
        ]

    @contextmanager
    def modelfs(self, cache_name: str, *, fresh: bool, extra: list[str] | None = None) -> Iterator[tuple[Path, int]]:
        assert self.gcs is not None
        cache = self.workdir / cache_name
        if fresh:
            shutil.rmtree(cache, ignore_errors=True)
        mnt = self.cleanup.mountpoint(self.workdir / "mnt-modelfs")
        pid = None
        t0 = time.monotonic()
        try:
            with mounted(f"gs://{BUCKET}", mnt, cache, *self.modelfs_options(extra), env=self.gcs.env()):
                pid = C.modelfs_daemon_pid(mnt, cache)
                self.mount_seconds.append(round(time.monotonic() - t0, 2))
                yield mnt, pid
                t0 = time.monotonic()
        finally:
            if pid is not None:
                # The next mount on this cache dir needs the lock this daemon holds until it exits.
                waited = C.wait_exit(pid) + time.monotonic() - t0
                self.exit_seconds.append(round(waited, 2))
                if waited > 5:
                    print(f"    note: the modelfs daemon took {waited:.1f} s to exit after unmount", flush=True)

    @contextmanager
    def rclone(self, mode: str, cache_name: str, *, fresh: bool) -> Iterator[tuple[Path, int]]:
        assert self.gcs is not None
        cache = self.workdir / cache_name
        if fresh:
            shutil.rmtree(cache, ignore_errors=True)
        mnt = self.cleanup.mountpoint(self.workdir / "mnt-rclone")
        mnt.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "rclone.log"
        cmd = [
            "rclone",
            "--config",
            str(self.workdir / "rclone.conf"),
            "--bind",
            "127.0.0.1",
            "mount",
            f"gcs:{BUCKET}",
            str(mnt),
            "--read-only",
            "--vfs-cache-mode",
            mode,
            "--cache-dir",
            str(cache),
            "--dir-cache-time",
            "1h",
            "--log-file",
            str(log),
            "-v",
            *self.args.rclone_option,
        ]
        proc = self.cleanup.process(
            subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        try:
            deadline = time.monotonic() + 30
            while not (is_mounted(mnt) and (mnt / OBJECT).exists()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(f"rclone mount did not come up (exit {proc.poll()}):\n{tail}")
                time.sleep(0.1)
            yield mnt, proc.pid
        finally:
            C.stop_fuse_process(proc, mnt)

    def write_rclone_conf(self) -> None:
        assert self.gcs is not None
        (self.workdir / "rclone.conf").write_text(
            f"[gcs]\ntype = google cloud storage\nanonymous = true\nendpoint = {self.gcs.url}/storage/v1/\n"
        )

    # --- the measurements

    def verify(self) -> None:
        """A cold and a warm full read through modelfs, hashed: wrong bytes fail the run."""
        for state, fresh in (("cold", True), ("warm", False)):
            with self.modelfs("cache-verify", fresh=fresh) as (mnt, pid):
                C.drop_caches()
                with self.cpu(pid) as cpu:
                    result = C.read_file(mnt / OBJECT, verify=True)
                stats = C.mount_stats(mnt)
                ok = result.sha256 == self.sha256
                self.wrong_bytes |= not ok
                self.record(
                    f"modelfs-{state}-sha256",
                    result,
                    peak_rss_kib=C.rss_kib(pid),
                    backend_gets=stats["backend_gets"],
                    sha256_ok=ok,
                    **cpu,
                )
                if not ok:
                    print(f"    WRONG BYTES: sha256 {result.sha256} != source {self.sha256}", flush=True)

    def curl(self) -> None:
        assert self.gcs is not None
        url = f"{self.gcs.url}/download/storage/v1/b/{BUCKET}/o/{OBJECT}?alt=media"
        C.drop_caches()
        with self.cpu() as cpu:
            proc = subprocess.run(
                ["curl", "-sS", "-f", "--noproxy", "*", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
                capture_output=True,
                text=True,
                check=False,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"curl failed: {proc.stderr.strip()}")
        nbytes, seconds = proc.stdout.split()
        self.record("curl", C.ReadResult(int(float(nbytes)), float(seconds), None), **cpu)

    def client(self, key: str, *cmd: str) -> dict[str, Any]:
        assert self.gcs is not None
        C.drop_caches()
        with self.cpu() as cpu:
            proc = subprocess.run(
                [sys.executable, str(CLIENTS), *cmd], capture_output=True, text=True, env=self.gcs.env(), check=False
            )
        if proc.returncode != 0:
            raise RuntimeError(f"{key} failed: {proc.stderr.strip()[-2000:]}")
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]), cpu=cpu)

    def gcs_ranged(self) -> None:
        for threads in self.args.threads:
            out = self.client(
                f"gcs-ranged-{threads}", "ranged", BUCKET, OBJECT, str(self.size), "--threads", str(threads)
            )
            self.record(
                f"gcs-ranged-{threads}",
                C.ReadResult(out["bytes"], out["seconds"], None),
                peak_rss_kib=out["peak_rss_kib"],
                **out["cpu"],
            )

    def download(self) -> None:
        dest = self.workdir / "downloaded.bin"
        try:
            out = self.client("download-then-read", "download", BUCKET, OBJECT, str(self.size), "--dest", str(dest))
        finally:
            dest.unlink(missing_ok=True)
        self.record(
            "download-then-read",
            C.ReadResult(out["bytes"], out["seconds"], None),
            peak_rss_kib=out["peak_rss_kib"],
            download_seconds=round(out["download_seconds"], 3),
            read_seconds=round(out["read_seconds"], 3),
            download_mb_s=round(C.mb_per_s(out["bytes"], out["download_seconds"]), 1),
            **out["cpu"],
        )

    def modelfs_runs(self, tool: str, reader: Callable[[Path], C.ReadResult]) -> None:
        """cold (fresh cache dir), then warm (remount) and hot (same mount, page cache kept)."""
        cache = f"cache-{tool}"
        with self.modelfs(cache, fresh=True) as (mnt, pid):
            C.drop_caches()
            with self.cpu(pid) as cpu:
                result = reader(mnt / OBJECT)
            stats = C.mount_stats(mnt)
            self.record(
                f"modelfs-cold-{tool}",
                result,
                peak_rss_kib=C.rss_kib(pid),
                backend_gets=stats["backend_gets"],
                stats=stats,
                **cpu,
            )
        with self.modelfs(cache, fresh=False) as (mnt, pid):
            C.drop_caches()
            with self.cpu(pid) as cpu:
                result = reader(mnt / OBJECT)
            stats = C.mount_stats(mnt)
            self.record(
                f"modelfs-warm-{tool}",
                result,
                peak_rss_kib=C.rss_kib(pid),
                backend_gets=stats["backend_gets"],
                stats=stats,
                **cpu,
            )
            before = stats
            with self.cpu(pid) as cpu:
                result = reader(mnt / OBJECT)
            stats = C.mount_stats(mnt)
            self.record(
                f"modelfs-hot-{tool}",
                result,
                peak_rss_kib=C.rss_kib(pid),
                backend_gets=stats["backend_gets"] - before["backend_gets"],
                daemon_reads=stats["memory_hits"]
                + stats["memory_misses"]
                - before["memory_hits"]
                - before["memory_misses"],
                **cpu,
            )

    def variants(self) -> None:
        """Cold dd reads with extra mount options (--variant NAME=OPTS), for tuning comparisons."""
        for name, extra in self.args.variant:
            key = f"modelfs-cold-dd[{name}]"
            try:
                with self.modelfs("cache-variant", fresh=True, extra=extra) as (mnt, pid):
                    C.drop_caches()
                    with self.cpu(pid) as cpu:
                        result = C.run_dd(mnt / OBJECT)
                    stats = C.mount_stats(mnt)
                    self.record(
                        key, result, peak_rss_kib=C.rss_kib(pid), backend_gets=stats["backend_gets"], stats=stats, **cpu
                    )
            except RuntimeError as exc:
                print(f"    variant {name} ({' '.join(extra)}) failed: {exc}", flush=True)

    def fio_reader(self, path: Path) -> C.ReadResult:
        return C.run_fio(path, self.size)

    def baseline(self) -> None:
        assert self.source is not None
        with self.cpu() as cpu:
            result = C.run_dd(self.source)
        self.record("tmpfs-dd", result, **cpu)
        local = self.workdir / "local-copy.bin"
        if not local.exists() or local.stat().st_size != self.size:
            shutil.copyfile(self.source, local)
        C.drop_caches()
        with self.cpu() as cpu:
            result = C.run_dd(local)
        self.record("local-cold-dd", result, **cpu)

    def rclone_runs(self) -> None:
        for mode in ("full", "off"):
            cache = f"rclone-cache-{mode}"
            for state, fresh in (("cold", True), ("warm", False)):
                with self.rclone(mode, cache, fresh=fresh) as (mnt, pid):
                    C.drop_caches()
                    with self.cpu(pid) as cpu:
                        result = C.run_dd(mnt / OBJECT)
                    self.record(f"rclone-{mode}-{state}", result, peak_rss_kib=C.rss_kib(pid), **cpu)

    # --- the run

    def run(self) -> int:
        args = self.args
        server_dir = C.prepare_dirs(args, "streaming", self.size, self.cleanup)
        print(
            f"streaming: {self.size / C.GiB:.2f} GiB object, {args.rounds} round(s); modelfs "
            f"{' '.join(self.modelfs_options()[1:])}; groups: {', '.join(g for g in GROUPS if g in self.only)}"
        )
        print(f"  server objects in {server_dir}; caches and mountpoints in {self.workdir}", flush=True)
        self.source, self.sha256 = C.ensure_object(server_dir / "src", OBJECT, self.size, tag=7)
        t_start = time.perf_counter()
        self.rev_at_start = C.git_rev()
        interrupted = False
        try:
            with fake_gcs(backend="filesystem", root=server_dir / "gcs") as gcs:
                self.gcs = gcs
                gcs.create_bucket(BUCKET)
                t0 = time.perf_counter()
                gcs.seed_file(BUCKET, OBJECT, self.source)
                print(f"  seeded gs://{BUCKET}/{OBJECT} at {gcs.url} in {time.perf_counter() - t0:.1f} s", flush=True)
                self.write_rclone_conf()
                t_rounds = time.perf_counter()
                for r in range(args.rounds):
                    if r and args.max_minutes is not None:
                        per_round = (time.perf_counter() - t_rounds) / r
                        if time.perf_counter() - t_start + per_round > args.max_minutes * 60:
                            print(
                                f"  stopping after {r} round(s): another would pass --max-minutes {args.max_minutes:g}",
                                flush=True,
                            )
                            break
                    print(f"  round {r + 1}/{args.rounds}", flush=True)
                    self.round(r)
                    self.rounds_done += 1
        except (KeyboardInterrupt, C._Terminated):
            # Report what was measured; the finally blocks have unmounted and stopped everything.
            interrupted = True
            print("  interrupted: reporting the rounds measured so far", flush=True)
        elapsed = time.perf_counter() - t_start
        code = self.report(elapsed)
        return 130 if interrupted else code

    def round(self, r: int) -> None:
        if "verify" in self.only and r == 0:
            self.verify()
        if "curl" in self.only:
            self.curl()
        if "gcs" in self.only:
            self.gcs_ranged()
        if "modelfs" in self.only:
            self.modelfs_runs("dd", C.run_dd)
            self.variants()
        if "fio" in self.only:
            self.modelfs_runs("fio", self.fio_reader)
        if "baseline" in self.only:
            self.baseline()
        if "rclone" in self.only:
            self.rclone_runs()
        if "download" in self.only:
            self.download()

    def report(self, elapsed: float) -> int:
        args = self.args
        rows = []
        for key, label in LABELS.items():
            samples = self.samples.get(key)
            if not samples:
                continue
            speeds = [s["mb_s"] for s in samples]
            rss = [s["peak_rss_kib"] for s in samples if s.get("peak_rss_kib")]
            gets = [s["backend_gets"] for s in samples if s.get("backend_gets") is not None]
            cpu = [s["cpu_s"] / (self.size / C.GiB) for s in samples if s.get("cpu_s") is not None]
            note = ""
            if key == "download-then-read":
                note = f"download alone {C.median(s['download_mb_s'] for s in samples):,.0f} MB/s"
            if key.endswith("sha256"):
                note = "bytes ok" if all(s["sha256_ok"] for s in samples) else "WRONG BYTES"
            rows.append(
                [
                    label,
                    f"{C.median(speeds):,.0f}",
                    f"{min(speeds):,.0f}",
                    f"{max(speeds):,.0f}",
                    len(speeds),
                    f"{max(rss) / 1024:.0f}" if rss else "-",
                    f"{C.median(gets):.0f}" if gets else "-",
                    f"{C.median(cpu):.2f}" if cpu else "-",
                    note,
                ]
            )
        print()
        done = f"{self.rounds_done} of {args.rounds}" if self.rounds_done != args.rounds else f"{args.rounds}"
        print(
            f"streaming results: {self.size / C.GiB:.2f} GiB object, {done} round(s), median MB/s "
            f"(MB = 10^6 bytes); modelfs {' '.join(self.modelfs_options()[1:])}"
        )
        print(
            C.fmt_table(
                ["path", "MB/s", "min", "max", "n", "peak RSS MiB", "GETs", "CPU s/GiB", "note"],
                rows,
                align="lrrrrrrrl",
            )
        )
        print("(peak RSS and CPU: of the modelfs daemon / rclone for mounts, else of the reading process)")

        ratios: dict[str, float] = {}
        ratio_rows = []
        for label, num, den in RATIOS:
            a, b = self.median(num), self.median(den)
            if a == a and b == b and b > 0:
                ratios[label] = round(a / b, 3)
                ratio_rows.append([label, f"{a / b:.2f}"])
        if ratio_rows:
            print()
            print(C.fmt_table(["ratio (of medians)", "x"], ratio_rows))

        acceptance: dict[str, Any] = {
            "bytes_ok": not self.wrong_bytes,
            "verified": any(k.endswith("sha256") for k in self.samples),
        }
        bound_kib = (self.memory_cache + 64 * C.MiB) // 1024
        cold = self.samples.get("modelfs-cold-dd", []) + self.samples.get("modelfs-cold-fio", [])
        print()
        print(
            f"bytes: {'WRONG BYTES READ' if self.wrong_bytes else 'all verified reads correct' if acceptance['verified'] else 'not verified (--only without verify)'}"
        )
        if cold:
            peak = max(s["peak_rss_kib"] for s in cold)
            acceptance.update(
                cold_peak_rss_mib=round(peak / 1024, 1),
                cold_peak_rss_bound_mib=bound_kib // 1024,
                cold_peak_rss_ok=peak < bound_kib,
            )
            print(
                f"modelfs cold peak RSS {peak / 1024:.0f} MiB; bound {bound_kib // 1024} MiB "
                f"(--memory-cache {args.memory_cache} + 64 MiB): {'met' if peak < bound_kib else 'NOT MET'}"
            )
        r = ratios.get("modelfs cold / rclone full cold")
        if r is not None:
            acceptance.update(cold_vs_rclone=r, cold_vs_rclone_goal=1.5)
            print(f"modelfs cold vs rclone full cold: {r:.2f}x (goal >= 1.5x): {'met' if r >= 1.5 else 'NOT MET'}")
        r = ratios.get("modelfs cold / download-then-read")
        if r is not None:
            acceptance["cold_vs_download_then_read"] = r
            print(f"modelfs cold vs download-then-read: {r:.2f}x (goal > 1x): {'met' if r > 1 else 'NOT MET'}")
        if self.exit_seconds:
            print(
                f"modelfs mount took {C.median(self.mount_seconds):.1f} s (median), unmount until the daemon "
                f"exited {C.median(self.exit_seconds):.1f} s (median, max {max(self.exit_seconds):.1f} s)"
            )
        print(f"total time {elapsed:.0f} s")

        C.write_json(
            args.out,
            {
                "benchmark": "streaming",
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "modelfs_rev": C.git_rev(),
                "modelfs_rev_at_start": self.rev_at_start,
                "machine": {
                    "cpus": os.cpu_count(),
                    "kernel": platform.release(),
                    "rclone": _version(["rclone", "version"]),
                    "fio": _version(["fio", "--version"]),
                },
                "config": {
                    "size": self.size,
                    "rounds": args.rounds,
                    "rounds_done": self.rounds_done,
                    "memory_cache": args.memory_cache,
                    "disk_cache": args.disk_cache,
                    "mount_options": args.mount_option,
                    "rclone_options": args.rclone_option,
                    "variants": {name: extra for name, extra in args.variant},
                    "groups": sorted(self.only),
                    "threads": args.threads,
                },
                "medians_mb_s": {k: self.median(k) for k in LABELS if k in self.samples},
                "ratios": ratios,
                "acceptance": acceptance,
                "samples": self.samples,
                "seconds": round(elapsed, 1),
                "modelfs_mount_seconds": self.mount_seconds,
                "modelfs_unmount_exit_seconds": self.exit_seconds,
            },
        )
        print(f"results written to {args.out}")
        return 1 if self.wrong_bytes else 0


def _version(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, opts = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=OPTIONS, not {text!r}")
    return name.strip(), opts.split()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="4G", help="object size (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the table shows medians (default: %(default)s)")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new round when it would end past this many minutes (default: no limit)",
    )
    p.add_argument("--only", default=None, help=f"comma-separated groups to run, of: {', '.join(GROUPS)}")
    p.add_argument("--memory-cache", default="128M", help="modelfs --memory-cache (default: %(default)s)")
    p.add_argument(
        "--disk-cache",
        default="8G",
        help="modelfs --disk-cache; must hold the whole object for the warm run (default: %(default)s)",
    )
    C.add_mount_option_arg(p)
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OPTS",
        type=_variant,
        help="also run a cold dd read with extra modelfs options, e.g. "
        "--variant 'bs16=--block-size 16M' (repeatable; a row per variant)",
    )
    p.add_argument(
        "--rclone-option",
        action="append",
        default=[],
        metavar="OPT",
        help="extra rclone mount option, e.g. --rclone-option=--buffer-size=64M (repeatable)",
    )
    p.add_argument(
        "--threads",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 4],
        help="thread counts of the google-cloud-storage ranged GETs (default: 1,4)",
    )
    C.add_common_args(p, "streaming")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return C.run_main("streaming", args, lambda c: Bench(args, c).run())


if __name__ == "__main__":
    sys.exit(main())
