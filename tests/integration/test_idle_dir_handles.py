"""Idle open directory handles of a directory of 20,000 names, in a memory cgroup of the bound.

A file:// directory is listed in one page. Before, 64 processes opening it at once each
listed it (812 MiB of RSS at the default budget), and with ``--metadata-ttl 0`` every opendir
listed it again and each idle handle kept its listing (30 handles: 400 MiB): the daemon was
far past ``--memory-cache`` + the overhead, and OOM-killed in a cgroup of that size.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

from modelfs.memlimit import FIXED_OVERHEAD, overhead
from modelfs.testing.cgroups import MemoryCgroup
from modelfs.testing.mounts import daemon_pid, force_unmount, peak_rss_kib, run_modelfs

from .conftest import CGROUP_TESTS

pytestmark = CGROUP_TESTS

MiB = 1 << 20
BUDGET = 64 * MiB
FILES = 20_000
AT_ONCE = 48
ONE_BY_ONE = 12


def test_idle_handles_of_a_20000_name_directory_stay_within_the_bound(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "big").mkdir(parents=True)
    expected = [f"object-{i:06d}.bin" for i in range(FILES)]
    for name in expected:
        (source / "big" / name).touch()
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    argv = [sys.executable, "-m", "modelfs", "mount", f"file://{source}", str(mnt), "--cache-dir", str(cache)]
    argv += ["--memory-cache", "64M", "--metadata-ttl", "0"]
    handles: list[os.DirEntry[str]] = []
    iterators = []
    with MemoryCgroup(BUDGET + FIXED_OVERHEAD) as cg:
        result = subprocess.run(cg.wrap(argv), capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        try:
            pid = daemon_pid(cache)
            lock = threading.Lock()
            start = threading.Barrier(AT_ONCE)

            def opendir() -> None:
                it = os.scandir(mnt / "big")
                first = next(it)  # one getdents, then idle
                with lock:
                    iterators.append(it)
                    handles.append(first)

            start_all = [threading.Thread(target=lambda: (start.wait(), opendir())) for _ in range(AT_ONCE)]
            for thread in start_all:
                thread.start()
            for thread in start_all:
                thread.join(timeout=60)
            for _ in range(ONE_BY_ONE):  # --metadata-ttl 0: each opendir lists the directory again
                opendir()
            assert len(iterators) == AT_ONCE + ONE_BY_ONE
            assert all(entry.name == expected[0] for entry in handles)
            for it in iterators[:2] + iterators[-2:]:  # read on after the others: every name once
                assert [expected[0]] + [entry.name for entry in it] == expected
            assert cg.oom_kills() == 0
            assert pid in cg.pids(), "the daemon is gone"
            assert peak_rss_kib(pid) * 1024 <= BUDGET + FIXED_OVERHEAD, peak_rss_kib(pid)
        finally:
            for it in iterators:
                it.close()
            try:
                run_modelfs("unmount", str(mnt), timeout=60)
            finally:
                force_unmount(mnt)
        assert cg.oom_kills() == 0


FILE = 96 * MiB  # larger than the budget: every block of it passes through the memory cache
BEFORE, AFTER = 10, 10


def test_idle_handles_with_the_block_budget_full_stay_within_the_bound(tmp_path: Path) -> None:
    """The same idle handles (``--metadata-ttl 0``: each opendir lists the directory again) while
    a file larger than the budget is read through the mount: the blocks fill the budget beside
    what the handles made the daemon hold. Before, the last handle's listing, the new one and
    its page's answer were held at once, and the RSS they took was never given back: 137 MiB
    against 128 (64M + the overhead)."""
    source = tmp_path / "src"
    (source / "big").mkdir(parents=True)
    expected = [f"object-{i:06d}.bin" for i in range(FILES)]
    for name in expected:
        (source / "big" / name).touch()
    data = os.urandom(1 << 20) * (FILE >> 20)  # (any bytes: the digest tells a wrong one)
    (source / "model.bin").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    del data
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    argv = [sys.executable, "-m", "modelfs", "mount", f"file://{source}", str(mnt), "--cache-dir", str(cache)]
    argv += ["--memory-cache", "64M", "--metadata-ttl", "0"]
    bound = BUDGET + overhead()
    iterators = []
    with MemoryCgroup(bound) as cg:
        result = subprocess.run(cg.wrap(argv), capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        try:
            pid = daemon_pid(cache)

            def opendir() -> None:
                it = os.scandir(mnt / "big")
                assert next(it).name == expected[0]  # one getdents, then idle
                iterators.append(it)

            for _ in range(BEFORE):
                opendir()
            read = hashlib.sha256()
            with open(mnt / "model.bin", "rb") as f:
                while chunk := f.read(1 << 20):
                    read.update(chunk)
            assert read.hexdigest() == digest
            for _ in range(AFTER):
                opendir()
            for it in iterators[:1] + iterators[-1:]:  # read on after the others: every name once
                assert [expected[0]] + [entry.name for entry in it] == expected
            assert cg.oom_kills() == 0
            assert pid in cg.pids(), "the daemon is gone"
            peak = peak_rss_kib(pid) * 1024
            assert peak <= bound, f"peak RSS {peak / MiB:.1f} MiB > {bound / MiB:.0f} MiB"
        finally:
            for it in iterators:
                it.close()
            try:
                run_modelfs("unmount", str(mnt), timeout=60)
            finally:
                force_unmount(mnt)
        assert cg.oom_kills() == 0
