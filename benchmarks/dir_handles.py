"""The daemon's RSS with many idle open directory handles (a file:// source on tmpfs).

    .venv/bin/python benchmarks/dir_handles.py concurrent 64            # 64 opendirs at once
    .venv/bin/python benchmarks/dir_handles.py same 30 --metadata-ttl 0  # listed at every opendir
    DIRS=300 FILES=1000 .venv/bin/python benchmarks/dir_handles.py many 300  # one handle per directory

Each handle reads one entry (one getdents) and stays open. Prints the daemon's RSS and peak
before and after; the source (DIRS directories of FILES empty files, in /dev/shm) is removed
at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from modelfs.testing.mounts import daemon_pid, mounted


def rss(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            out[key + "_MiB"] = int(value.split()[0]) // 1024
    return out


def stats(mnt: Path) -> dict[str, object]:
    s = json.loads(os.getxattr(mnt, "user.modelfs.stats"))
    return {k: s.get(k) for k in ("dir_handles", "dir_handle_bytes", "dir_handles_parked", "metadata_bytes")}


def main() -> None:
    scenario, n, options = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    files, dirs = int(os.environ.get("FILES", "20000")), int(os.environ.get("DIRS", "1"))
    work = Path(tempfile.mkdtemp(prefix="modelfs-dir-handles-", dir="/dev/shm"))
    try:
        for d in range(dirs):
            (work / "src" / f"d{d:04d}").mkdir(parents=True)
            for i in range(files):
                (work / "src" / f"d{d:04d}" / f"object-{i:07d}.bin").touch()
        with mounted(f"file://{work / 'src'}", work / "mnt", work / "cache", *options) as mnt:
            pid = daemon_pid(work / "cache")
            print("mounted", rss(pid), flush=True)
            handles: list[object] = []
            lock = threading.Lock()

            def hold(path: Path) -> None:
                it = os.scandir(path)
                next(it)
                with lock:
                    handles.append(it)

            started = time.monotonic()
            if scenario == "concurrent":
                barrier = threading.Barrier(n)
                threads = [threading.Thread(target=lambda: (barrier.wait(), hold(mnt / "d0000"))) for _ in range(n)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            else:
                for i in range(n):
                    hold(mnt / (f"d{i:04d}" if scenario == "many" else "d0000"))
            print(f"{scenario} {n} in {time.monotonic() - started:.1f}s", rss(pid), stats(mnt), flush=True)
            for it in handles:
                it.close()  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
