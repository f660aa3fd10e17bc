"""A directory of 30,000 files under nginx's JSON index, listed through a real mount in a
memory cgroup of the documented size (budget + 128 MiB).

Before, one ``ls`` of such a directory started a trio task per file (50,000 files: the
daemon's peak RSS went from 44 to 260 MiB, and in that cgroup it was OOM-killed, leaving a
dead mount). Now the directory is listed in pages of PAGE_ENTRIES, HEADed by a pool of the
HEAD concurrency, its sorted entries kept in the budget between pages.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

from modelfs.memlimit import FIXED_OVERHEAD
from modelfs.testing.cgroups import MemoryCgroup
from modelfs.testing.mounts import daemon_pid, force_unmount, peak_rss_kib, run_modelfs
from modelfs.testing.nginx import Nginx

from .conftest import CGROUP_TESTS

pytestmark = CGROUP_TESTS

MiB = 1 << 20
BUDGET = 64 * MiB
LIMIT = BUDGET + 128 * MiB
FILES = 30_000


def _content(i: int) -> bytes:
    return bytes([i % 251])


def test_ls_of_a_30000_file_index_directory_within_budget_plus_128m(web: Nginx, tmp_path: Path) -> None:
    top = f"big-{uuid.uuid4().hex[:8]}"
    directory = web.root / top
    directory.mkdir()
    for i in range(FILES):
        (directory / f"f{i:06d}.bin").write_bytes(_content(i))
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    argv = [
        sys.executable,
        "-m",
        "modelfs",
        "mount",
        web.url(f"{top}/", tls=True),
        str(mnt),
        "--cache-dir",
        str(cache),
        "--ca-cert",
        str(web.ca_cert),
        "--memory-cache",
        "64M",
    ]
    with MemoryCgroup(LIMIT) as cg:
        result = subprocess.run(cg.wrap(argv), capture_output=True, text=True, timeout=180, check=False)
        assert result.returncode == 0, result.stderr
        try:
            pid = daemon_pid(cache)
            assert pid in cg.pids()
            names = os.listdir(mnt)
            assert sorted(names) == [f"f{i:06d}.bin" for i in range(FILES)]
            for i in random.Random(3).sample(range(FILES), 5):
                path = mnt / f"f{i:06d}.bin"
                assert path.stat().st_size == 1 and path.read_bytes() == _content(i)
            assert cg.oom_kills() == 0
            assert pid in cg.pids(), "the daemon is gone"
            # The documented bound, not just the cgroup's limit (the kernel would have killed it).
            assert peak_rss_kib(pid) * 1024 <= BUDGET + FIXED_OVERHEAD, peak_rss_kib(pid)
        finally:
            try:
                run_modelfs("unmount", str(mnt), timeout=60)
            finally:
                force_unmount(mnt)
        assert cg.oom_kills() == 0
