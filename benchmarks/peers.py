#!/usr/bin/env python3
"""modelfs against Run:ai Model Streamer on the same object, in the same run (issue 15).

One run starts fake-gcs-server (filesystem backend, files on tmpfs) on 127.0.0.1 and seeds one
safetensors object of ``--size`` (one shard of a generated float16 model), then for each of
``--rounds`` rounds measures:

  runai[NAME]     Run:ai Model Streamer loading every tensor of the object (``_runai_child.py``
                  in a throwaway venv: its ctypes layer and request planner, no torch), once per
                  ``--runai NAME=ENV=VALUE,...`` setting (RUNAI_STREAMER_CONCURRENCY,
                  RUNAI_STREAMER_CHUNK_BYTESIZE, RUNAI_STREAMER_MEMORY_LIMIT)
  cold            modelfs, fresh cache dir, ``dd bs=1M`` of the object (disk cache on)
  nodisk          the same with ``--disk-cache 0``
  warm            remount on the cold run's cache dir, page cache dropped: the disk cache serves
  load            safetensors ``safe_open(framework="numpy")`` + ``get_tensor`` of every tensor
                  through a cold modelfs mount (a child process)
  floor           the same load from the tmpfs source file

Each sample records the CPU seconds of every process that moves the bytes (``/proc/PID/stat``
deltas): the emulator, the modelfs daemon (and its main thread, which runs the trio loop: the
serialized part), the reader (dd or the loader) and the streamer; peak RSS (VmHWM) of the daemon
or the loading process; the machine's load average. It prints medians of the rounds, CPU-s per GiB
per process, the ratios to the streamer's best setting, and the CPU budget per process that a
target throughput leaves on this machine (every process shares the same cores).

    .venv/bin/python benchmarks/peers.py --setup-runai          # once: the throwaway venv
    flock /tmp/modelfs-bench.lock .venv/bin/python benchmarks/peers.py [--size 2G] [--rounds 3]
        [--baseline CHECKOUT]    # also cold reads by an older commit's modelfs, same rounds

Exit status 1 if any verified read returned wrong bytes or the run failed; timings are never checked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # (puts the repository on sys.path too)

from modelfs.testing.fakegcs import FakeGCS, fake_gcs
from modelfs.testing.mounts import mounted

BUCKET = "bench"
OBJECT = "model.safetensors"
HERE = Path(__file__).resolve().parent
RUNAI_CHILD = HERE / "_runai_child.py"
LOADER = HERE / "model_load.py"
DEFAULT_RUNAI_VENV = Path("/var/tmp/modelfs-bench-runai-venv")
RUNAI_PACKAGES = ["runai-model-streamer", "runai-model-streamer-gcs"]
RUNAI_DEPS = ["numpy", "humanize", "google-cloud-storage", "google-auth"]
GROUPS = ("runai", "cold", "nodisk", "warm", "load", "floor")
DEFAULT_RUNAI = [
    "defaults=",
    (
        "c4-32M-512M=RUNAI_STREAMER_CONCURRENCY=4,RUNAI_STREAMER_CHUNK_BYTESIZE=33554432,"
        "RUNAI_STREAMER_MEMORY_LIMIT=536870912"
    ),
    (
        "c8-8M-512M=RUNAI_STREAMER_CONCURRENCY=8,RUNAI_STREAMER_CHUNK_BYTESIZE=8388608,"
        "RUNAI_STREAMER_MEMORY_LIMIT=536870912"
    ),
]


def setup_runai(venv: Path) -> int:
    """Make the throwaway venv: the streamer's wheels without their dependencies (torch), plus
    the four libraries its planner and GCS plugin need. Never part of the project's venv."""
    if not (venv / "bin" / "pip").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "--no-deps", *RUNAI_PACKAGES], check=True)
    subprocess.run([*pip, *RUNAI_DEPS], check=True)
    print(f"Run:ai Model Streamer installed in {venv} (no torch); run peers.py --runai-venv {venv}")
    return 0


def _thread_cpu(pid: int, tid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Peers:
    def __init__(self, args: argparse.Namespace, cleanup: C.Cleanup) -> None:
        self.args = args
        self.cleanup = cleanup
        self.size = C.parse_size(args.size)
        self.only = set(args.only.split(",")) if args.only else set(GROUPS)
        unknown = self.only - set(GROUPS)
        if unknown:
            raise SystemExit(f"--only: unknown group(s) {', '.join(sorted(unknown))}; known: {', '.join(GROUPS)}")
        self.runai: list[tuple[str, dict[str, str]]] = []
        for spec in args.runai or DEFAULT_RUNAI:
            name, _, rest = spec.partition("=")
            env = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
            self.runai.append((name, env))
        self.runai_python = args.runai_venv / "bin" / "python"
        if "runai" in self.only and not self.runai_python.exists():
            raise SystemExit(
                f"no Run:ai venv at {args.runai_venv}: run `{sys.executable} {__file__} --setup-runai` first"
            )
        self.samples: dict[str, list[dict[str, Any]]] = {}
        self.labels: dict[str, str] = {}
        self.wrong_bytes = False
        self.gcs: FakeGCS | None = None
        self.workdir: Path = args.workdir
        self.source: Path | None = None
        self.tensor_bytes = 0
        self.digests_file: Path | None = None
        self.baseline_rev = ""
        if args.baseline is not None:
            if not (args.baseline / "modelfs" / "__init__.py").exists():
                raise SystemExit(f"--baseline {args.baseline}: not a modelfs checkout")
            git = ["git", "-C", str(args.baseline)]
            self.baseline_rev = subprocess.run(
                [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            if subprocess.run(
                [*git, "status", "--porcelain", "modelfs"], capture_output=True, text=True
            ).stdout.strip():
                self.baseline_rev += (
                    "+edits"  # the checkout's modelfs differs from its commit (e.g. a change taken out)
                )

    # --- bookkeeping

    @contextmanager
    def cpu(self, daemon: int | None = None) -> Iterator[dict[str, float]]:
        """CPU seconds used during the block by the emulator, the waited-for children (reader,
        loader, streamer), and the daemon (with its main thread: the trio loop) if given."""
        assert self.gcs is not None
        server = self.gcs.process.pid
        out: dict[str, float] = {}
        s0, c0 = C.cpu_seconds(server), C.children_cpu_seconds()
        d0 = C.cpu_seconds(daemon) if daemon else 0.0
        m0 = _thread_cpu(daemon, daemon) if daemon else 0.0
        load = _loadavg()
        t0 = time.perf_counter()
        yield out
        out["wall_s"] = time.perf_counter() - t0
        out["emulator"] = C.cpu_seconds(server) - s0
        out["child"] = C.children_cpu_seconds() - c0
        if daemon:
            out["daemon"] = C.cpu_seconds(daemon) - d0
            out["daemon_main"] = _thread_cpu(daemon, daemon) - m0
        out["loadavg"] = load  # type: ignore[assignment]

    def record(self, key: str, label: str, nbytes: int, seconds: float, **extra: Any) -> None:
        self.labels.setdefault(key, label)
        sample = {"mb_s": C.mb_per_s(nbytes, seconds), "seconds": seconds, "bytes": nbytes, **extra}
        self.samples.setdefault(key, []).append(sample)
        gib = nbytes / C.GiB
        cpu = " ".join(
            f"{k} {extra[k] / gib:.2f}"
            for k in ("emulator", "daemon", "daemon_main", "reader", "streamer")
            if k in extra
        )
        rss = extra.get("peak_rss_kib")
        print(
            f"    {label:<44} {sample['mb_s']:7,.0f} MB/s  CPU-s/GiB: {cpu}"
            + (f"  peak RSS {rss / 1024:.0f} MiB" if rss else "")
            + f"  (load {extra.get('loadavg', '?')})",
            flush=True,
        )

    # --- modelfs

    def options(self, extra: list[str]) -> list[str]:
        return ["--anonymous", "--memory-cache", self.args.memory_cache, *self.args.mount_option, *extra]

    @contextmanager
    def modelfs(
        self, cache_name: str, *, fresh: bool, extra: list[str] | None = None, baseline: bool = False
    ) -> Iterator[tuple[Path, int]]:
        assert self.gcs is not None
        cache = self.workdir / cache_name
        if fresh:
            shutil.rmtree(cache, ignore_errors=True)
        mnt = self.cleanup.mountpoint(self.workdir / "mnt-modelfs")
        env = self.gcs.env()
        if baseline:  # `python -m modelfs` imports the other checkout's package (the cwd is the work dir)
            env["PYTHONPATH"] = str(self.args.baseline)
        with mounted(f"gs://{BUCKET}", mnt, cache, *self.options(extra or []), env=env):
            yield mnt, C.modelfs_daemon_pid(mnt, cache)

    def dd_sample(self, key: str, label: str, mnt: Path, pid: int) -> dict[str, Any]:
        C.drop_caches()
        C.reset_peak_rss(pid)
        with self.cpu(pid) as cpu:
            result = C.run_dd(mnt / OBJECT)
        if result.nbytes != self.size:
            raise RuntimeError(f"{key}: dd read {result.nbytes} bytes, expected {self.size}")
        stats = C.mount_stats(mnt)
        self.record(
            key,
            label,
            result.nbytes,
            result.seconds,
            emulator=cpu["emulator"],
            daemon=cpu["daemon"],
            daemon_main=cpu["daemon_main"],
            reader=cpu["child"],
            loadavg=cpu["loadavg"],
            peak_rss_kib=C.rss_kib(pid),
            stats=stats,
        )
        return stats

    def cold_and_warm(self) -> None:
        if "cold" in self.only or "warm" in self.only:
            with self.modelfs("cache-cold", fresh=True) as (mnt, pid):
                self.dd_sample("cold", "modelfs cold, dd bs=1M", mnt, pid)
            if "warm" in self.only:
                with self.modelfs("cache-cold", fresh=False) as (mnt, pid):
                    self.dd_sample("warm", "modelfs warm (disk cache), dd bs=1M", mnt, pid)
        if "nodisk" in self.only:
            with self.modelfs("cache-nodisk", fresh=True, extra=["--disk-cache", "0"]) as (mnt, pid):
                self.dd_sample("nodisk", "modelfs cold, --disk-cache 0, dd bs=1M", mnt, pid)
        if self.args.baseline is not None:
            rev = self.baseline_rev
            if "cold" in self.only:
                with self.modelfs("cache-base", fresh=True, baseline=True) as (mnt, pid):
                    self.dd_sample("cold-base", f"modelfs {rev} (baseline) cold, dd bs=1M", mnt, pid)
            if "nodisk" in self.only:
                with self.modelfs("cache-base", fresh=True, extra=["--disk-cache", "0"], baseline=True) as (mnt, pid):
                    self.dd_sample("nodisk-base", f"modelfs {rev} (baseline) cold, --disk-cache 0", mnt, pid)

    def verify(self) -> None:
        """Whole-object sha256 through a cold and a warm mount, and a checked streamer load."""
        assert self.source is not None
        want = C.read_file(self.source, verify=True).sha256
        for state, fresh in (("cold", True), ("warm", False)):
            with self.modelfs("cache-verify", fresh=fresh) as (mnt, _pid):
                C.drop_caches()
                got = C.read_file(mnt / OBJECT, verify=True).sha256
            ok = got == want
            self.wrong_bytes |= not ok
            print(f"    verify: modelfs {state} sha256 {'ok' if ok else 'WRONG BYTES'}", flush=True)
        if "runai" in self.only:
            name, env = self.runai[0]
            out = self.runai_load(env, verify=True)
            ok = out.get("bad_count", 1) == 0 and out.get("missing_count", 1) == 0
            self.wrong_bytes |= not ok
            print(f"    verify: Run:ai streamer [{name}] every tensor's sha256 {'ok' if ok else 'WRONG'}", flush=True)

    # --- loaders (child processes)

    def child(self, cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stderr.strip()[-3000:]}")
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        if out["bytes"] != self.tensor_bytes:
            raise RuntimeError(f"{' '.join(cmd[:3])} loaded {out['bytes']} tensor bytes, expected {self.tensor_bytes}")
        return out

    def runai_load(self, env: dict[str, str], *, verify: bool = False) -> dict[str, Any]:
        assert self.gcs is not None and self.digests_file is not None
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNAI_STREAMER_")}
        child_env.update(env, CLOUD_STORAGE_EMULATOR_ENDPOINT=self.gcs.url, RUNAI_STREAMER_LOG_LEVEL="WARNING")
        cmd = [str(self.runai_python), str(RUNAI_CHILD), f"gs://{BUCKET}/{OBJECT}"]
        if verify:
            cmd += ["--digests", str(self.digests_file)]
        return self.child(cmd, child_env)

    def runai_runs(self) -> None:
        for name, env in self.runai:
            C.drop_caches()
            with self.cpu() as cpu:
                out = self.runai_load(env)
            desc = ", ".join(f"{k.removeprefix('RUNAI_STREAMER_').lower()} {v}" for k, v in env.items()) or "defaults"
            self.record(
                f"runai[{name}]",
                f"Run:ai streamer, {desc}",
                out["bytes"],
                out["seconds"],
                emulator=cpu["emulator"],
                streamer=cpu["child"],
                loadavg=cpu["loadavg"],
                peak_rss_kib=out.get("peak_rss_kib"),
            )

    def load_runs(self) -> None:
        assert self.gcs is not None and self.source is not None
        cmd = [sys.executable, str(LOADER), "_child", "load"]
        if "load" in self.only:
            with self.modelfs("cache-load", fresh=True) as (mnt, pid):
                C.drop_caches()
                C.reset_peak_rss(pid)
                with self.cpu(pid) as cpu:
                    out = self.child([*cmd, str(mnt)], dict(os.environ))
                self.record(
                    "load",
                    "safe_open load through modelfs, cold",
                    out["bytes"],
                    out["seconds"],
                    emulator=cpu["emulator"],
                    daemon=cpu["daemon"],
                    daemon_main=cpu["daemon_main"],
                    reader=cpu["child"],
                    loadavg=cpu["loadavg"],
                    peak_rss_kib=C.rss_kib(pid),
                    loader_rss_kib=out.get("peak_rss_kib"),
                )
        if "floor" in self.only:
            with self.cpu() as cpu:
                out = self.child([*cmd, str(self.source.parent)], dict(os.environ))
            self.record(
                "floor",
                "safe_open load from tmpfs (floor)",
                out["bytes"],
                out["seconds"],
                reader=cpu["child"],
                loadavg=cpu["loadavg"],
                peak_rss_kib=out.get("peak_rss_kib"),
            )

    # --- the run

    def prepare(self, server_dir: Path) -> None:
        from modelfs.testing.models import write_model

        src = server_dir / "src"
        meta = src / "meta.json"
        want = {"size": self.size, "format": 1}
        known = json.loads(meta.read_text()) if meta.exists() else {}
        if {k: known.get(k) for k in want} != want or not (src / OBJECT).exists():
            shutil.rmtree(src, ignore_errors=True)
            t0 = time.perf_counter()
            digests = write_model(src / "gen", self.size, shards=1)
            (src / "gen" / "model-00001-of-00001.safetensors").rename(src / OBJECT)
            shutil.rmtree(src / "gen")
            meta.write_text(json.dumps(dict(want, digests=digests)))
            print(f"  generated {OBJECT}: {self.size / C.GiB:.2f} GiB in {time.perf_counter() - t0:.1f} s", flush=True)
            known = json.loads(meta.read_text())
        self.source = src / OBJECT
        self.digests_file = self.workdir / "digests.json"
        self.digests_file.write_text(json.dumps(known["digests"]))
        header_len = int.from_bytes(self.source.open("rb").read(8), "little")
        self.tensor_bytes = self.source.stat().st_size - 8 - header_len
        self.size = self.source.stat().st_size

    def run(self) -> int:
        args = self.args
        server_dir = C.prepare_dirs(args, "peers", self.size, self.cleanup)
        os.chdir(self.workdir)  # so `python -m modelfs` imports the installed package, or --baseline's
        self.prepare(server_dir)
        print(
            f"peers: {OBJECT} {self.size / C.GiB:.2f} GiB, {args.rounds} round(s); modelfs "
            f"{' '.join(self.options([])[1:])}; {os.cpu_count()} CPUs; load {_loadavg()}; "
            f"{C.machine_busy():.0f}% busy before the run",
            flush=True,
        )
        t_start = time.perf_counter()
        with fake_gcs(backend="filesystem", root=server_dir / "gcs") as gcs:
            self.gcs = gcs
            gcs.create_bucket(BUCKET)
            gcs.seed_file(BUCKET, OBJECT, self.source)
            if not args.no_verify:
                self.verify()
            for r in range(args.rounds):
                print(f"  round {r + 1}/{args.rounds} (load {_loadavg()})", flush=True)
                if "runai" in self.only:
                    self.runai_runs()
                self.cold_and_warm()
                self.load_runs()
        return self.report(time.perf_counter() - t_start)

    def med(self, key: str, field: str) -> float:
        return C.median(s[field] for s in self.samples.get(key, []) if s.get(field) is not None)

    def per_gib(self, key: str, field: str) -> float:
        return C.median(s[field] / (s["bytes"] / C.GiB) for s in self.samples.get(key, []) if field in s)

    def report(self, elapsed: float) -> int:
        procs = ("emulator", "daemon", "daemon_main", "reader", "streamer")
        rows = []
        for key, label in self.labels.items():
            samples = self.samples[key]
            speeds = [s["mb_s"] for s in samples]
            cpu = {p: self.per_gib(key, p) for p in procs}
            total = sum(v for p, v in cpu.items() if p != "daemon_main" and not math.isnan(v))
            rss = [s["peak_rss_kib"] for s in samples if s.get("peak_rss_kib")]
            reads = [s["stats"] for s in samples if "stats" in s and s["stats"].get("reads")]
            req = C.median(st["read_bytes"] / st["reads"] / 1024 for st in reads) if reads else float("nan")
            rows.append(
                [
                    label,
                    f"{C.median(speeds):,.0f}",
                    f"{min(speeds):,.0f}-{max(speeds):,.0f}",
                    len(speeds),
                    *(cpu[p] for p in procs),
                    total,
                    f"{max(rss) / 1024:.0f}" if rss else "-",
                    f"{req:.0f}" if not math.isnan(req) else "-",
                ]
            )
        print()
        print(
            f"peers: {self.size / C.GiB:.2f} GiB safetensors object, median of {len(next(iter(self.samples.values()), []))}"
            f" round(s), MB = 10^6 bytes; {os.cpu_count()} CPUs shared with other work: load at the end {_loadavg()}"
        )
        print(
            C.fmt_table(
                [
                    "path",
                    "MB/s",
                    "range",
                    "n",
                    "emulator",
                    "daemon",
                    "(trio thr.)",
                    "reader",
                    "streamer",
                    "CPU total",
                    "peak RSS MiB",
                    "FUSE req KiB",
                ],
                rows,
            )
        )
        print(
            "(CPU columns: CPU-s per GiB of each process; '(trio thr.)' is the daemon's main thread, part of 'daemon')"
        )
        best_name, best = "", float("nan")
        for key in self.samples:
            if key.startswith("runai[") and not (self.med(key, "mb_s") <= best):
                best_name, best = key, self.med(key, "mb_s")
        ratios: dict[str, float] = {}
        if not math.isnan(best):
            print()
            print(f"ratios to the streamer's best setting here, {best_name} ({best:,.0f} MB/s):")
            for key in ("cold", "nodisk", "warm", "load", "cold-base", "nodisk-base"):
                if key in self.samples:
                    ratios[key] = self.med(key, "mb_s") / best
                    print(f"  {self.labels[key]:<44} {ratios[key]:.2f}x")
        self.budget(best)
        main_gib = self.per_gib("cold", "daemon_main")
        if not math.isnan(main_gib) and main_gib > 0:
            print()
            print(
                f"serialized work: the daemon's main (trio) thread used {main_gib:.3f} CPU-s per GiB cold; "
                f"one mount cannot deliver more than ~{1 / main_gib:.1f} GiB/s ({C.GiB / main_gib / 1e6:,.0f} MB/s) "
                "whatever the cores"
            )
        print(
            f"bytes: {'WRONG BYTES READ' if self.wrong_bytes else 'verified ok' if not self.args.no_verify else 'not verified'}"
        )
        print(f"elapsed {elapsed:.0f} s")
        C.write_json(
            self.args.out,
            {
                "rev": C.git_rev(),
                "size": self.size,
                "cpus": os.cpu_count(),
                "samples": self.samples,
                "ratios": ratios,
                "wrong_bytes": self.wrong_bytes,
            },
        )
        return 1 if self.wrong_bytes else 0

    def budget(self, best: float) -> None:
        """What a target throughput leaves each process. All the processes moving the bytes share
        the cores; on a shared machine only part of them is ours, so the cores this run actually
        got are estimated from the streamer's best setting (its MB/s times its CPU-s per GiB, all
        processes): CPU-s per GiB of every process add up to at most cores / (GiB/s)."""
        if not ("cold" in self.samples and not math.isnan(best)):
            return
        ncpu = os.cpu_count() or 1
        best_key = max((k for k in self.samples if k.startswith("runai[")), key=lambda k: self.med(k, "mb_s"))
        runai_total = sum(self.per_gib(best_key, p) for p in ("emulator", "streamer"))
        cores = min(ncpu, best * 1e6 / C.GiB * runai_total)
        em, rd = self.per_gib("cold", "emulator"), self.per_gib("cold", "reader")
        print()
        print(
            f"CPU budget: the streamer's best used {runai_total:.2f} CPU-s/GiB (emulator + streamer) at {best:,.0f} MB/s, "
            f"so this run had ~{cores:.2f} of the {ncpu} cores (the rest went to other work on the machine)"
        )
        for factor in (0.7, 0.8, 1.0):
            target = factor * best
            for label, have in (("the cores this run had", cores), (f"all {ncpu} cores", float(ncpu))):
                allowed = have / (target * 1e6 / C.GiB)
                print(
                    f"  {factor:.1f}x the streamer = {target:,.0f} MB/s on {label}: {allowed:.2f} CPU-s/GiB in all; "
                    f"emulator {em:.2f} + reader {rd:.2f} leave the daemon {allowed - em - rd:.2f}"
                )
        for key in ("cold", "nodisk", "warm"):
            if key in self.samples:
                total = sum(self.per_gib(key, p) for p in ("emulator", "daemon", "reader"))
                print(
                    f"  {self.labels[key]}: daemon {self.per_gib(key, 'daemon'):.2f}, all processes {total:.2f} CPU-s/GiB: "
                    f"CPU-bound at ~{cores / total * C.GiB / 1e6:,.0f} MB/s on this run's cores, "
                    f"{ncpu / total * C.GiB / 1e6:,.0f} on {ncpu} idle cores"
                )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, "peers")
    p.add_argument("--size", default="2G", help="size of the safetensors object (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory-cache", default="256M", help="modelfs --memory-cache (default: %(default)s)")
    p.add_argument("--mount-option", action="append", default=[], help="extra modelfs mount option (repeatable)")
    p.add_argument("--only", default="", help=f"comma-separated groups of {', '.join(GROUPS)}")
    p.add_argument(
        "--runai",
        action="append",
        default=None,
        metavar="NAME=ENV=VALUE,...",
        help="a streamer setting (repeatable); default: defaults, 4 workers/32 MiB chunks/512 MiB, 8/8 MiB/512 MiB",
    )
    p.add_argument(
        "--runai-venv", type=Path, default=DEFAULT_RUNAI_VENV, help="the throwaway venv (default: %(default)s)"
    )
    p.add_argument("--setup-runai", action="store_true", help="create --runai-venv and exit")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 checks before the rounds")
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="CHECKOUT",
        help="also measure cold reads with the modelfs of another checkout (e.g. a `git worktree add DIR COMMIT`) "
        "in the same rounds: before/after in one run",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.setup_runai:
        return setup_runai(args.runai_venv)
    return C.run_main("peers", args, lambda c: Peers(args, c).run())


if __name__ == "__main__":
    sys.exit(main())
