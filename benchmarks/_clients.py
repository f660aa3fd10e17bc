#!/usr/bin/env python3
"""Client-library workloads of benchmarks/streaming.py, each run in its own process so its
peak RSS is its own and its GIL is not the harness's. Prints one JSON line.

    _clients.py ranged BUCKET NAME SIZE --threads N [--range-size 8M]
    _clients.py download BUCKET NAME SIZE --dest FILE

``ranged``: google-cloud-storage ``Blob.download_as_bytes(start, end)`` over consecutive
ranges, N threads sharing one anonymous client, each taking the next range.
``download``: ``Blob.download_to_filename`` (the library's checksum validation included), then
a sequential 1 MiB read of the downloaded file: "download the whole model, then load it".
STORAGE_EMULATOR_HOST must name the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def ranged(bucket: str, name: str, size: int, threads: int, range_size: int) -> dict[str, object]:
    from google.cloud import storage

    client = storage.Client.create_anonymous_client()
    blob = client.bucket(bucket).blob(name)
    count = -(-size // range_size)
    lock = threading.Lock()
    next_index = [0]
    got = [0]
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= count:
                    return
                start = i * range_size
                end = min(size, start + range_size) - 1
                data = blob.download_as_bytes(start=start, end=end)
                if len(data) != end - start + 1:
                    raise RuntimeError(f"range {start}-{end}: got {len(data)} bytes")
                with lock:
                    got[0] += len(data)
                del data
        except BaseException as exc:  # reported by the parent
            errors.append(exc)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {"bytes": got[0], "seconds": seconds, "peak_rss_kib": peak_rss_kib()}


def download(bucket: str, name: str, size: int, dest: Path) -> dict[str, object]:
    from google.cloud import storage

    client = storage.Client.create_anonymous_client()
    blob = client.bucket(bucket).blob(name)
    t0 = time.perf_counter()
    blob.download_to_filename(str(dest))
    t1 = time.perf_counter()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    with open(dest, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    t2 = time.perf_counter()
    if total != size:
        raise RuntimeError(f"downloaded {total} bytes, expected {size}")
    return {
        "bytes": total,
        "seconds": t2 - t0,
        "download_seconds": t1 - t0,
        "read_seconds": t2 - t1,
        "peak_rss_kib": peak_rss_kib(),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["ranged", "download"])
    p.add_argument("bucket")
    p.add_argument("name")
    p.add_argument("size", type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--range-size", type=int, default=8 << 20)
    p.add_argument("--dest", type=Path)
    args = p.parse_args()
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if not (host.startswith("http://127.0.0.1:") or host.startswith("http://localhost:")):
        # Never let a benchmark talk to real GCS.
        print(f"STORAGE_EMULATOR_HOST must be a loopback URL, not {host!r}", file=sys.stderr)
        return 2
    if args.mode == "ranged":
        out = ranged(args.bucket, args.name, args.size, args.threads, args.range_size)
    else:
        out = download(args.bucket, args.name, args.size, args.dest)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
