"""The daemon under a hard cgroup memory limit (v1 or v2): never OOM-killed, every byte right.

The daemon runs in a memory cgroup made by the fixture with a limit of budget + 128 MiB, over
a bucket of many small objects and a safetensors file, while 32 readers do unaligned 1 MiB
reads at random offsets (each read's pages dropped from the page cache, so reads reach the
daemon), a walker stats and reads the tree, and the eager stream runs. The kernel must never
have had to kill it, and every byte read must be right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.testing.cgroups import MemoryCgroup
from modelfs.testing.fakegcs import FakeGCS, fake_gcs
from modelfs.testing.mounts import daemon_pid, force_unmount, peak_rss_kib, run_modelfs
from modelfs.testing.workload import (
    ReadStats,
    random_readers,
    seed_object,
    seed_small_objects,
    walk_tree,
    write_safetensors,
)

from .conftest import CGROUP_TESTS

pytestmark = CGROUP_TESTS

MiB = 1 << 20
BUDGET = 64 * MiB
LIMIT = BUDGET + 128 * MiB
BUCKET = "membound"
MODEL = "model/model.safetensors"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeGCS, Path]]:
    """fake-gcs-server (filesystem backend) with 4,000 small objects in 40 directories and a 96 MiB safetensors file."""
    root = tmp_path_factory.mktemp("memlimit")
    source = root / "model.safetensors"
    write_safetensors(source, 96 * MiB)
    gcs_root = root / "gcs"
    (gcs_root / BUCKET).mkdir(parents=True)
    seed_small_objects(gcs_root, BUCKET, "small", 4000, 40)
    seed_object(gcs_root, BUCKET, MODEL, None, 1, path=source)
    with fake_gcs(backend="filesystem", root=gcs_root) as gcs:
        yield gcs, source


def _mount_in(
    cg: MemoryCgroup, gcs: FakeGCS, mnt: Path, cache: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    mnt.mkdir(exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "modelfs",
        "mount",
        f"gs://{BUCKET}",
        str(mnt),
        "--cache-dir",
        str(cache),
        "--anonymous",
        *options,
    ]
    return subprocess.run(cg.wrap(argv), capture_output=True, text=True, env=gcs.env(), timeout=180, check=False)


def _unmount(mnt: Path, gcs: FakeGCS) -> None:
    try:
        run_modelfs("unmount", str(mnt), env=gcs.env(), timeout=60)
    finally:
        force_unmount(mnt)


def test_daemon_in_a_cgroup_of_budget_plus_128m_is_never_killed(seeded: tuple[FakeGCS, Path], tmp_path: Path) -> None:
    gcs, source = seeded
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    with MemoryCgroup(LIMIT) as cg:
        result = _mount_in(cg, gcs, mnt, cache, "--memory-cache", "64M", "--disk-cache", "1G")
        assert result.returncode == 0, result.stderr
        try:
            pid = daemon_pid(cache)
            assert pid in cg.pids()
            stats = ReadStats()
            stop = threading.Event()
            walker = threading.Thread(target=walk_tree, args=(mnt, stats, stop), kwargs={"max_walks": 1}, daemon=True)
            walker.start()
            readers = random_readers(
                mnt / MODEL, source, threads=32, read_size=MiB + 4097, stats=stats, reads_per_thread=12
            )
            for t in readers:
                t.join(300)
            walker.join(300)  # one whole walk of the tree, beside the readers
            stop.set()
            assert not any(t.is_alive() for t in [*readers, walker]), "a reader or the walker hung"
            assert stats.wrong == [] and stats.errors == [], (stats.wrong[:5], stats.errors[:5])
            assert stats.reads == 32 * 12 and stats.walks >= 1 and stats.entries >= 4000
            assert cg.oom_kills() == 0
            assert pid in cg.pids(), "the daemon is gone"
            daemon = json.loads(os.getxattr(mnt, "user.modelfs.stats"))
            assert daemon["memory_capacity"] == BUDGET
            assert daemon["memory_peak"] <= BUDGET, daemon
            assert daemon["small_gets"] > 0 or daemon["memory_misses"] > 0, daemon
            assert daemon["errors"] == 0, daemon
            # The whole process stays below the limit it runs in (the kernel would have killed it).
            assert peak_rss_kib(pid) * 1024 < LIMIT
        finally:
            _unmount(mnt, gcs)
        assert cg.oom_kills() == 0


def test_mount_refuses_a_budget_its_cgroup_cannot_hold(seeded: tuple[FakeGCS, Path], tmp_path: Path) -> None:
    gcs, _ = seeded
    with MemoryCgroup(160 * MiB) as cg:
        result = _mount_in(cg, gcs, tmp_path / "mnt", tmp_path / "cache", "--memory-cache", "128M")
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "cgroup memory limit 160M" in lines[0] and "auto" in lines[0], result.stderr
        assert not (tmp_path / "mnt").is_mount()


def test_memory_cache_auto_takes_the_limit_minus_the_overhead(seeded: tuple[FakeGCS, Path], tmp_path: Path) -> None:
    gcs, _ = seeded
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    with MemoryCgroup(LIMIT) as cg:
        result = _mount_in(cg, gcs, mnt, cache, "--memory-cache", "auto", "--disk-cache", "0")
        assert result.returncode == 0, result.stderr
        try:
            daemon = json.loads(os.getxattr(mnt, "user.modelfs.stats"))
            assert daemon["memory_capacity"] == BUDGET  # 192M - 64M overhead - 64M headroom
        finally:
            _unmount(mnt, gcs)
