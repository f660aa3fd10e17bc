#!/usr/bin/env python3
"""N nodes load one model, with and without the shared cache tier (issue 16).

A fleet on this machine (modelfs/testing/fleet.py): the origin (fake-gcs-server), two nginx
cache tier replicas (the config packaging/tier ships, rendered by modelfs.tierconf) and up to
six nodes, each a host in its own network namespace on one bridge, each with its own modelfs
mount (fresh cache dir every time). For N = 1, 3, 6 nodes loading one safetensors model at
once (every tensor, safetensors framework="numpy", checked against its sha256), three ways:

  origin      no tier: every node reads the origin
  tier cold   --cache-url per replica, the tier's caches empty
  tier warm   the same, the tier already holding the model (the nodes' own caches fresh)

The cold tier runs once per fleet size; then direct and warm-tier runs alternate ``--repeat``
times (each pair in the other order than the one before, so drift in the neighbours' load
falls on both alike), each after a sync so no run pays for flushing the previous one's writes.
It prints the bytes the origin sent (its interface's tx counter) as a multiple of the model,
each node's load time over all runs (min / median / max; the time from the first open to the
last tensor), and the CPU seconds per GiB loaded of every process involved, in total and by
kind (loaders, modelfs daemons, the tier's nginx and fill stage, the origin). Warm tier
against direct is judged per back-to-back pair (the ratio of the two runs' median node
times; the verdict is the median ratio), since the neighbours' load drifts over minutes. The origin's objects live in /dev/shm and the tier's cache in the page cache once
written, so both serve from memory (``--drop-caches`` drops the page cache before each run:
the warm tier then reads its disk while the origin still serves RAM). Timings are reported, never checked; a wrong byte makes the exit status 1.

    flock /tmp/modelfs-bench.lock .venv/bin/python benchmarks/fleet.py [--model-mib 512] [--nodes 1,3,6] [--repeat 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (puts the repository on sys.path too)

from modelfs.testing.fakegcs import FakeGCS  # noqa: E402
from modelfs.testing.fleet import (  # noqa: E402
    Host,
    TierReplica,
    fleet_network,
    node_env,
    node_mount,
    origin_gcs,
    tier_replica,
    tx_bytes,
)
from modelfs.testing.models import write_model  # noqa: E402

BUCKET = "fleet-bench"
PREFIX = "model"
SOURCE = f"gs://{BUCKET}/{PREFIX}"
REPLICAS = ("tier1", "tier2")

LOAD = """
import hashlib, json, pathlib, sys, time
from modelfs.testing.models import load_all
start = time.perf_counter()
digests = {n: hashlib.sha256(a.tobytes()).hexdigest() for n, a in load_all(pathlib.Path(sys.argv[1]))}
print(json.dumps({"seconds": time.perf_counter() - start, "digests": digests}))
"""


def pgid_cpu_seconds(pgid: int) -> float:
    """CPU seconds of every live process in process group ``pgid`` (nginx master + workers, the fill stage)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


CPU_KINDS = ("loaders", "daemons", "tier", "origin")


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _row(n: int, mode: str, runs: list[dict[str, Any]], model_bytes: int) -> list[Any]:
    """One table row over every run of ``mode``: times of every node, CPU per GiB by process kind."""
    secs = sorted(t for r in runs for t in r["seconds"])
    gib = n * model_bytes / C.GiB
    by_kind = [C.median(r["cpu"][k] / gib for r in runs) for k in CPU_KINDS]
    return [
        n,
        mode,
        len(runs),
        C.median(r["origin_bytes"] for r in runs) / model_bytes,
        secs[0],
        C.median(secs),
        secs[-1],
        C.median(sum(r["cpu"].values()) / gib for r in runs),
        *by_kind,
        "ok" if all(r["bytes_ok"] for r in runs) else "WRONG",
    ]


def _remove_all(dirs: list[Path]) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def run_once(
    nodes: list[Host],
    replicas: list[TierReplica] | None,
    origin: Host,
    origin_url: str,
    origin_pid: int,
    workdir: Path,
    digests: dict[str, str],
    args: argparse.Namespace,
    *,
    drop: bool,
) -> dict[str, Any]:
    """N nodes load the model at once; what the origin sent, each node's time, CPU per process kind."""
    options: list[str] = args.mount_option
    if drop:
        C.drop_caches()
    else:
        # The previous run's writes (the tier's cache files, the nodes' disk caches) are on
        # disk before this one starts, not flushed by the kernel while it runs.
        os.sync()
    cache_urls = [a for r in replicas or [] for a in ("--cache-url", r.url)]
    env = node_env(origin_url)
    tier_cpu_before = sum(pgid_cpu_seconds(r.pgid) for r in replicas or [])
    origin_cpu_before = C.cpu_seconds(origin_pid)
    run_dirs: list[Path] = []
    with ExitStack() as stack:
        # Each node's cache goes once the run is over (unmounted first): 9 runs of 6 nodes
        # would otherwise keep ~27 GiB of caches on disk until the end.
        stack.callback(_remove_all, run_dirs)
        mounts = []
        for i, node in enumerate(nodes):
            run_dir = workdir / f"run-{time.monotonic_ns()}-{i}"
            run_dirs.append(run_dir)
            mounts.append(
                stack.enter_context(
                    node_mount(node, SOURCE, run_dir / "mnt", run_dir / "cache", *cache_urls, *options, env=env)
                )
            )
        before = tx_bytes(origin)
        loaders = [
            subprocess.Popen([sys.executable, "-c", LOAD, str(m)], stdout=subprocess.PIPE, text=True) for m in mounts
        ]
        results, loader_cpu = [], 0.0
        for proc in loaders:
            out = proc.stdout.read() if proc.stdout else ""
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            loader_cpu += usage.ru_utime + usage.ru_stime
            results.append(json.loads(out) if proc.returncode == 0 else {"seconds": float("nan"), "digests": {}})
        served = tx_bytes(origin) - before
        daemon_cpu = 0.0
        for m in mounts:
            stats = C.mount_stats(m)
            daemon_cpu += C.cpu_seconds(int(stats["pid"]))
    return {
        "origin_bytes": served,
        "seconds": [r["seconds"] for r in results],
        "bytes_ok": all(r["digests"] == digests for r in results),
        "cpu": {
            "loaders": loader_cpu,
            "daemons": daemon_cpu,
            "tier": sum(pgid_cpu_seconds(r.pgid) for r in replicas or []) - tier_cpu_before,
            "origin": C.cpu_seconds(origin_pid) - origin_cpu_before,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-mib", type=int, default=512)
    parser.add_argument("--nodes", default="1,3,6", help="comma-separated fleet sizes (default: %(default)s)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=4,
        help="direct and warm-tier runs per fleet size, alternating (default: %(default)s); the cold tier runs once",
    )
    parser.add_argument("--mount-option", action="append", default=[], help="extra modelfs mount flags")
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="drop the page cache before each run: the warm tier then reads its cache from disk, while the "
        "origin's objects stay in RAM (/dev/shm); by default both serve from memory",
    )
    C.add_common_args(parser, "fleet")
    args = parser.parse_args()
    sizes = [int(n) for n in args.nodes.split(",")]
    cleanup = C.Cleanup()
    C.install_signal_handlers()
    started = time.monotonic()
    rows: list[list[Any]] = []
    samples: dict[str, Any] = {}
    wrong = False
    try:
        server_dir = C.prepare_dirs(args, "fleet", args.model_mib << 20, cleanup)
        with C.page_reporting_paused(args.keep_page_reporting):
            model_dir = args.workdir / "model"
            digests = write_model(model_dir, args.model_mib << 20, shards=2, seed=16)
            gcs_root = server_dir / "gcs"
            (gcs_root / BUCKET).mkdir(parents=True, exist_ok=True)
            seeder = FakeGCS(0, gcs_root, "filesystem", None)  # type: ignore[arg-type]  # seeding only
            files = sorted(p.name for p in model_dir.iterdir())
            for name in files:
                seeder.seed_file(BUCKET, f"{PREFIX}/{name}", model_dir / name)
            model_bytes = sum((model_dir / n).stat().st_size for n in files)
            names = ["origin", *REPLICAS, *(f"node{i + 1}" for i in range(max(sizes)))]
            with fleet_network(names) as network, origin_gcs(network.hosts["origin"], gcs_root) as origin_url:
                origin = network.hosts["origin"]
                origin_pid = _origin_pid(gcs_root)
                for n in sizes:
                    nodes = [network.hosts[f"node{i + 1}"] for i in range(n)]
                    workdir = args.workdir / f"n{n}"
                    cleanup.remove_later(workdir)

                    def run(
                        replicas: list[TierReplica] | None, nodes: list[Host] = nodes, workdir: Path = workdir
                    ) -> Any:
                        return run_once(
                            nodes,
                            replicas,
                            origin,
                            origin_url,
                            origin_pid,
                            workdir,
                            digests,
                            args,
                            drop=args.drop_caches,
                        )

                    with ExitStack() as stack:
                        replicas = [
                            stack.enter_context(tier_replica(network.hosts[r], workdir / r, SOURCE, origin_url))
                            for r in REPLICAS
                        ]
                        # The cold tier once (it is warm after); then direct and warm-tier runs
                        # alternate, each pair in the other order than the one before, so drift
                        # in the neighbours' load falls on both alike.
                        order: list[tuple[str, list[TierReplica] | None]] = [("tier cold", replicas)]
                        for i in range(args.repeat):
                            pair = [("origin", None), ("tier warm", replicas)]
                            order += pair if i % 2 else pair[::-1]
                        for mode, tier in order:
                            result = run(tier)
                            samples.setdefault(f"{n}/{mode}", []).append(result)
                            wrong |= not result["bytes_ok"]
                            print(
                                f"  N={n} {mode}: {result['origin_bytes'] / C.MiB:.0f} MiB from the origin, "
                                f"median {C.median(result['seconds']):.2f} s (load {_loadavg()})"
                            )
                        for mode in ("origin", "tier cold", "tier warm"):
                            rows.append(_row(n, mode, samples[f"{n}/{mode}"], model_bytes))
    finally:
        cleanup.run()
    print()
    print(f"fleet results: a {model_bytes / C.MiB:.0f} MiB model (2 shards), 2 tier replicas; times in seconds")
    print(
        C.fmt_table(
            ["nodes", "path", "runs", "x model", "min s", "median s", "max s", "CPU-s/GiB", *CPU_KINDS, "bytes"],
            rows,
            align="rlrrrrrrrrrrl",
        )
    )
    print(
        "  x model: bytes the origin sent / the model's bytes (median over runs); times: every node of every run;"
        " CPU-s/GiB: every process involved, then by kind, per GiB loaded (median over runs)"
    )
    acceptance: dict[str, Any] = {"bytes_ok": not wrong}
    for n in sizes:
        cold = samples[f"{n}/tier cold"][0]
        warm_runs, direct_runs = samples[f"{n}/tier warm"], samples[f"{n}/origin"]
        ratio = cold["origin_bytes"] / model_bytes
        warm = C.median(t for r in warm_runs for t in r["seconds"])
        direct = C.median(t for r in direct_runs for t in r["seconds"])
        # Each warm-tier run against the direct run next to it: the neighbours' load drifts
        # over minutes, and a pair sees the same drift (the pooled medians do not).
        ratios = [C.median(w["seconds"]) / C.median(d["seconds"]) for w, d in zip(warm_runs, direct_runs, strict=True)]
        paired = C.median(ratios)
        acceptance[str(n)] = {
            "origin_x_model_tier": round(ratio, 3),
            "origin_x_model_direct": round(C.median(r["origin_bytes"] for r in direct_runs) / model_bytes, 3),
            "warm_median_s": round(warm, 3),
            "direct_median_s": round(direct, 3),
            "warm_over_direct_pairs": [round(r, 3) for r in ratios],
            "warm_over_direct_median": round(paired, 3),
            "warm_not_slower": paired <= 1.0,
        }
        print(
            f"N={n}: origin sent {ratio:.3f}x the model through the cold tier (goal <= 1.05): "
            f"{'met' if ratio <= 1.05 else 'NOT MET'}; without it "
            f"{acceptance[str(n)]['origin_x_model_direct']:.2f}x; warm-tier load time <= direct: "
            f"{'met' if paired <= 1.0 else 'NOT MET'} (warm / direct, median of {len(ratios)} back-to-back pairs: "
            f"{paired:.2f} [{', '.join(f'{r:.2f}' for r in ratios)}]; pooled medians {warm:.2f} vs {direct:.2f} s)"
        )
    print(
        f"bytes: {'WRONG BYTES READ' if wrong else 'every load correct'}; total time {time.monotonic() - started:.0f} s"
    )
    C.write_json(
        args.out,
        {
            "benchmark": "fleet",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "modelfs_rev": C.git_rev(),
            "config": {
                "model_bytes": model_bytes,
                "nodes": sizes,
                "repeat": args.repeat,
                "mount_options": args.mount_option,
            },
            "samples": samples,
            "acceptance": acceptance,
        },
    )
    return 1 if wrong else 0


def _origin_pid(gcs_root: Path) -> int:
    """The fake-gcs-server serving ``gcs_root`` (started by origin_gcs through nsenter)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"fake-gcs-server" in cmdline[0] and str(gcs_root).encode() in cmdline:
                return int(entry.name)
    raise RuntimeError("the origin's fake-gcs-server is not running")


if __name__ == "__main__":
    sys.exit(main())
