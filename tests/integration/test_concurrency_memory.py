"""The memory bound at ``--max-concurrency 256``: every GET slot busy, the daemon in a cgroup.

A store that sends each answer at 1 MiB/s per connection (modelfs.testing.throttle) keeps
GETs in flight: two 256 MiB safetensors files read at random are streamed by 128 workers
each (``--eager``), 256 GETs of 1 MiB blocks at once, for gs:// (fake-gcs-server over HTTP),
https:// (nginx over TLS) and s3:// (moto). The daemon takes ``--memory-cache auto`` in a
cgroup of 640 MiB. Every byte read must be right, the kernel must never have killed the
daemon, its peak RSS must stay within the budget plus ``memlimit.overhead()`` for 256 GETs
(a thread, a kept-alive connection and the client's objects each: ~0.1 MiB over TLS), and
what the kernel queued on its sockets within the headroom ``auto`` leaves below the limit
(cgroup v1 counts socket buffers apart, in ``memory.kmem.tcp.*``, once a tcp limit is set:
set here; v2 counts them in the group's charge, so there no OOM kill is the check). A GET
thread that waited for a whole 1 MiB chunk queued on its socket (``SO_RCVLOWAT``) let the
kernel hold ~1 MiB per connection: 259 MiB at 256 GETs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.memlimit import AUTO_HEADROOM, auto_budget, overhead
from modelfs.mount import wait_for_exit
from modelfs.testing.cgroups import MemoryCgroup
from modelfs.testing.mounts import force_unmount, peak_rss_kib, run_modelfs
from modelfs.testing.throttle import slow_source
from modelfs.testing.workload import ReadStats, random_readers, write_safetensors

from .conftest import CGROUP_TESTS

pytestmark = CGROUP_TESTS

MiB = 1 << 20
LIMIT = 640 * MiB
CONCURRENCY = 256
DISK_CACHE = 1 << 30


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("conc-src")
    paths = [root / f"src{i}.safetensors" for i in range(2)]
    for i, path in enumerate(paths):
        write_safetensors(path, 256 * MiB, seed=10 + i)
    return paths


@pytest.fixture
def cgroup() -> Iterator[MemoryCgroup]:
    with MemoryCgroup(LIMIT) as cg:
        tcp = cg.path / "memory.kmem.tcp.limit_in_bytes"
        if cg.version == 1 and tcp.exists():  # v1 counts socket buffers only once a tcp limit is set
            tcp.write_text(str(LIMIT))
        yield cg


def _tcp_peak(cg: MemoryCgroup) -> int | None:
    try:
        return int((cg.path / "memory.kmem.tcp.max_usage_in_bytes").read_text())
    except (OSError, ValueError):
        return None


def _daemon_pid(mnt: Path) -> int:
    return int(json.loads(os.getxattr(mnt, "user.modelfs.stats"))["pid"])


@pytest.mark.parametrize("kind", ["gcs", "https", "s3"])
def test_256_gets_in_flight_stay_within_the_bound(
    kind: str, files: list[Path], cgroup: MemoryCgroup, tmp_path: Path
) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    with slow_source(kind, files, tmp_path / "store", rate=MiB) as store:
        argv = [sys.executable, "-m", "modelfs", "mount", store.source, str(mnt), "--cache-dir", str(cache)]
        argv += [*store.options, "--memory-cache", "auto", "--max-concurrency", str(CONCURRENCY)]
        argv += ["--block-size", "1M", "--prefetch-get-size", "1M", "--disk-cache", str(DISK_CACHE)]
        result = subprocess.run(cgroup.wrap(argv), capture_output=True, text=True, env=store.env, timeout=180)
        assert result.returncode == 0, result.stderr
        pid = 0
        try:
            pid = _daemon_pid(mnt)
            assert pid in cgroup.pids()
            stats = ReadStats()
            readers = []
            for i, src in enumerate(files):
                readers += random_readers(
                    mnt / f"f{i}.safetensors", src, threads=8, read_size=MiB + 4097, stats=stats, reads_per_thread=24
                )
            for t in readers:
                t.join(600)
            assert not any(t.is_alive() for t in readers), "a reader hung"
            assert stats.wrong == [] and stats.errors == [], (stats.wrong[:5], stats.errors[:5])
            assert stats.reads == 2 * 8 * 24
            daemon = json.loads(os.getxattr(mnt, "user.modelfs.stats"))
            budget = daemon["memory_capacity"]
            assert budget == auto_budget(LIMIT, MiB, disk_blocks=DISK_CACHE // MiB, max_concurrency=CONCURRENCY)
            assert daemon["gets_in_flight_peak"] == CONCURRENCY, daemon  # every GET slot was busy
            assert daemon["errors"] == 0, daemon
            peak = peak_rss_kib(pid) * 1024
            bound = budget + overhead(
                disk_blocks=DISK_CACHE // MiB, memory_blocks=budget // MiB, max_concurrency=CONCURRENCY
            )
            assert peak <= bound, f"peak RSS {peak / MiB:.1f} MiB over the bound {bound / MiB:.1f} MiB"
            assert cgroup.oom_kills() == 0 and pid in cgroup.pids(), "the kernel killed the daemon"
        finally:
            try:
                run_modelfs("unmount", str(mnt), env=store.env, timeout=120)
            finally:
                force_unmount(mnt)
                assert not pid or wait_for_exit(pid, 120), "the daemon did not exit after its unmount"
    assert cgroup.oom_kills() == 0
    sockets = _tcp_peak(cgroup)
    if sockets is not None:  # (v1 with tcp accounting; v2 charges them to the group: no OOM kill above)
        assert sockets <= AUTO_HEADROOM, f"{sockets / MiB:.1f} MiB queued on the daemon's sockets"
