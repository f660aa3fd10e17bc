#!/usr/bin/env python3
"""HTTP and S3 data paths side by side: which client moves bytes fastest, and the mount.

One run starts nginx (``modelfs.testing.nginx``, HTTP and HTTPS, files on tmpfs) and seeds one
object of ``--size`` random bytes. For each of ``--rounds`` rounds it measures, interleaved:

  curl-http / curl-https     full GET, ``curl -o /dev/null``: the wire limit
  http-backend c=N           modelfs's HTTPBackend (``http.client`` in trio threads, the body
                             received into the block buffer: http_media.py), ``--block``-sized
                             ranged GETs, N in flight
  s3-boto3-readinto c=N      modelfs's S3Backend (boto3 in trio threads, http.client readinto
                             straight into the block buffer)
  s3-httpx-presigned c=N     the alternative: a trio-native httpx GET of a botocore-presigned
                             URL (SigV4 by botocore, no threads), ``aiter_raw`` into the buffer
  s3-boto3-read c=1          boto3's own ``Body.read()`` (the library's default path)
  curl-s3                    curl of the same path

The S3 rows use nginx as the S3 data plane (path-style ``/bucket/key``; a GetObject with
Range and If-Match is a plain GET to it), because moto reads the whole object per GET and
would measure moto. ``--moto`` adds the same S3 rows against moto with a small object, to
show that the clients work against a real S3 API (those numbers are moto's limit).

``--mount`` adds: ``modelfs mount`` of the object over HTTP and HTTPS, read cold with 1 MiB
reads (fresh cache dir), and ``rclone mount`` of nginx's HTML index (rclone's http remote,
``--vfs-cache-mode full``) read the same way, next to curl.

Prints median MB/s (10^6 bytes/s) with min-max, and writes JSON to ``--out``. Timings are
reported, never checked.

    .venv/bin/python benchmarks/backends.py [--size 1G] [--rounds 3] [--mount] [--moto]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from modelfs.config import parse_size, parse_source  # noqa: E402
from modelfs.testing.mounts import force_unmount, mounted  # noqa: E402
from modelfs.testing.nginx import Nginx, nginx  # noqa: E402

MB = 1e6
BUCKET = "s3bench"


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def curl(url: str, ca: Path | None = None, headers: dict[str, str] | None = None) -> tuple[float, float]:
    cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download} %{http_code}"]
    if ca is not None:
        cmd += ["--cacert", str(ca)]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout.split()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out[1] not in ("200", "206"):
        raise RuntimeError(f"curl {url}: HTTP {out[1]}")
    return float(out[0]) / MB, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


async def ranged(read: Callable[[int, memoryview], Awaitable[None]], size: int, block: int, conc: int) -> float:
    """MB/s of reading [0, size) as ``block``-sized ranges, ``conc`` in flight, each into its own buffer."""
    buffers = [memoryview(bytearray(block)) for _ in range(conc)]
    next_offset = 0

    async def worker(buf: memoryview) -> None:
        nonlocal next_offset
        while next_offset < size:
            offset = next_offset
            next_offset += block
            await read(offset, buf[: min(block, size - offset)])

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for buf in buffers:
            nursery.start_soon(worker, buf)
    return size / (time.perf_counter() - start) / MB


async def http_backend(url: str, ca: Path | None, size: int, block: int, conc: int) -> float:
    from modelfs.backends.http import HTTPBackend

    backend = HTTPBackend(parse_source(url), ca_cert=ca, max_concurrency=conc)
    try:
        info = (await backend.list_objects())[0]
        return await ranged(lambda off, buf: backend.read_range(info.name, info.version, off, buf), size, block, conc)
    finally:
        await backend.aclose()


async def s3_backend(endpoint: str, key: str, size: int, block: int, conc: int) -> float:
    from modelfs.backends.s3 import S3Backend

    prefix, _, name = key.rpartition("/")
    backend = S3Backend(parse_source(f"s3://{BUCKET}/{prefix}"), endpoint_url=endpoint, max_concurrency=conc)
    try:
        info = await backend.stat(name)
        return await ranged(lambda off, buf: backend.read_range(name, info.version, off, buf), size, block, conc)
    finally:
        await backend.aclose()


async def s3_httpx_presigned(endpoint: str, key: str, size: int, block: int, conc: int) -> float:
    """The trio-native alternative: botocore signs (a presigned URL), httpx fetches on trio."""
    import boto3
    import httpx
    from botocore.config import Config

    from modelfs.backends.http import _READ_SIZE
    from modelfs.backends.private.httpcore_read_size import raise_read_size

    raise_read_size(_READ_SIZE)  # the same 512 KiB reads as the HTTP backend's httpx requests

    # A new session each time: boto3.client() would reuse the credentials of its first call.
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))
    etag = client.head_object(Bucket=BUCKET, Key=key)["ETag"]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=conc + 2), timeout=30) as http:

        async def read(offset: int, buf: memoryview) -> None:
            url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=600)
            headers = {"Range": f"bytes={offset}-{offset + len(buf) - 1}", "If-Match": etag}
            async with http.stream("GET", url, headers=headers) as resp:
                if resp.status_code != 206:
                    raise RuntimeError(f"HTTP {resp.status_code}")
                got = 0
                async for chunk in resp.aiter_raw():
                    buf[got : got + len(chunk)] = chunk
                    got += len(chunk)
                assert got == len(buf)

        return await ranged(read, size, block, conc)


def s3_boto3_read(endpoint: str, key: str, size: int, block: int) -> float:
    import boto3
    from botocore.config import Config

    # A new session each time: boto3.client() would reuse the credentials of its first call.
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))
    start = time.perf_counter()
    for offset in range(0, size, block):
        end = min(size, offset + block) - 1
        data = client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={offset}-{end}")["Body"].read()
        assert len(data) == end - offset + 1
    return size / (time.perf_counter() - start) / MB


def mount_read(source: str, name: str, options: list[str], work: Path, tag: str) -> tuple[float, float]:
    mnt, cache = work / f"mnt-{tag}", work / f"cache-{tag}"
    shutil.rmtree(cache, ignore_errors=True)
    try:
        with mounted(source, mnt, cache, "--memory-cache", "256M", "--disk-cache", "0", *options) as m:
            pid = C.modelfs_daemon_pid(m, cache)
            before = cpu_of(pid)
            mbps = C.read_file(m / name, verify=False).mb_s
            return mbps, cpu_of(pid) - before
    finally:
        force_unmount(mnt)
        shutil.rmtree(cache, ignore_errors=True)


def rclone_read(web: Nginx, rel: str, work: Path) -> tuple[float, float]:
    mnt, cache = work / "mnt-rclone", work / "cache-rclone"
    shutil.rmtree(cache, ignore_errors=True)
    mnt.mkdir(exist_ok=True)
    directory, _, name = rel.rpartition("/")
    proc = subprocess.Popen(
        [
            "rclone",
            "mount",
            ":http:",
            str(mnt),
            "--http-url",
            web.url(f"html/{directory}/"),
            "--read-only",
            "--vfs-cache-mode",
            "full",
            "--cache-dir",
            str(cache),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (mnt / name).exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("rclone mount did not come up")
            time.sleep(0.2)
        before = cpu_of(proc.pid)
        mbps = C.read_file(mnt / name, verify=False).mb_s
        return mbps, cpu_of(proc.pid) - before
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
        proc.terminate()
        proc.wait(30)
        force_unmount(mnt)
        shutil.rmtree(cache, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--block", default="8M", help="ranged GET size of the client rows")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conc", default="1,2,4", help="GETs in flight for the client rows")
    parser.add_argument("--mount", action="store_true", help="also modelfs mount (http, https) and rclone mount")
    parser.add_argument("--moto", action="store_true", help="also the S3 rows against moto (small object)")
    parser.add_argument("--out", type=Path, default=Path("/var/tmp/modelfs-bench/backends.json"))
    args = parser.parse_args(argv)
    size, block = parse_size(args.size), parse_size(args.block)
    concs = [int(c) for c in args.conc.split(",")]
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    shm = Path("/dev/shm") if shutil.disk_usage("/dev/shm").free > 2 * size else Path(tempfile.gettempdir())
    docroot = Path(tempfile.mkdtemp(prefix="modelfs-bench-www-", dir=shm))
    work = Path(tempfile.mkdtemp(prefix="modelfs-bench-"))
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def record(key: str, run: Callable[[], Any], nbytes: int = size) -> None:
        """``run()`` returns MB/s (CPU measured here, this process) or (MB/s, CPU s of the process that moved the bytes)."""
        start = time.process_time()
        try:
            value = run()
        except Exception as exc:  # e.g. moto refuses presigned URLs while authenticating
            print(f"  {key:32s} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            return
        seconds = time.process_time() - start
        if isinstance(value, tuple):
            value, seconds = value
        results.setdefault(key, []).append(value)
        cpu.setdefault(key, []).append(seconds / (nbytes / 1e9))
        print(f"  {key:32s} {value:9.0f} MB/s  {cpu[key][-1]:6.2f} CPU s/GB", flush=True)

    try:
        rel = f"{BUCKET}/models/big.bin"
        (docroot / BUCKET / "models").mkdir(parents=True)
        with open(docroot / rel, "wb") as f:
            for _ in range(0, size, 64 << 20):
                f.write(os.urandom(min(64 << 20, size - f.tell())))
        with nginx(docroot, workers=2) as web:
            key = "models/big.bin"
            for rnd in range(args.rounds):
                print(f"round {rnd + 1}/{args.rounds}", flush=True)
                record("curl-http", lambda: curl(web.url(rel)))
                record("curl-https", lambda: curl(web.url(rel, tls=True), web.ca_cert))
                for conc in concs:
                    record(
                        f"http-backend c={conc}",
                        lambda conc=conc: trio.run(http_backend, web.url(rel), None, size, block, conc),
                    )
                    record(
                        f"https-backend c={conc}",
                        lambda conc=conc: trio.run(
                            http_backend, web.url(rel, tls=True), web.ca_cert, size, block, conc
                        ),
                    )
                for conc in concs:
                    record(
                        f"s3-boto3-readinto c={conc}",
                        lambda conc=conc: trio.run(s3_backend, web.url(), key, size, block, conc),
                    )
                    record(
                        f"s3-httpx-presigned c={conc}",
                        lambda conc=conc: trio.run(s3_httpx_presigned, web.url(), key, size, block, conc),
                    )
                record("s3-boto3-read c=1", lambda: s3_boto3_read(web.url(), key, size, block))
                record("curl-s3-path", lambda: curl(web.url(rel)))
                if args.mount:
                    opts = ["--block-size", args.block]
                    record(
                        "modelfs-mount-http", lambda opts=opts: mount_read(web.url(rel), "big.bin", opts, work, "http")
                    )
                    record(
                        "modelfs-mount-https",
                        lambda opts=opts: mount_read(
                            web.url(rel, tls=True), "big.bin", [*opts, "--ca-cert", str(web.ca_cert)], work, "https"
                        ),
                    )
                    if shutil.which("rclone"):
                        record("rclone-mount-http", lambda: rclone_read(web, rel, work))
        if args.moto:
            run_moto(args, record, block, concs)
    finally:
        shutil.rmtree(docroot, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'path':34s} {'median':>8s} {'min':>8s} {'max':>8s}  MB/s   CPU s/GB (median)")
    summary: dict[str, Any] = {}
    for key, values in results.items():
        summary[key] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "runs": values,
            "cpu_s_per_gb": statistics.median(cpu[key]),
        }
        print(
            f"{key:34s} {summary[key]['median']:8.0f} {min(values):8.0f} {max(values):8.0f}"
            f"   {summary[key]['cpu_s_per_gb']:6.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"size": size, "block": block, "results": summary, "load": os.getloadavg()}, indent=1)
    )
    print(f"\nwrote {args.out}")
    return 0


def run_moto(args: argparse.Namespace, record: Callable[..., None], block: int, concs: list[int]) -> None:
    from modelfs.testing.s3server import s3_server

    size = 64 << 20
    with s3_server() as s3:
        s3.create_bucket(BUCKET)
        s3.put(BUCKET, "models/small.bin", os.urandom(size))
        os.environ.update(s3.admin.env())
        for rnd in range(args.rounds):
            print(f"moto round {rnd + 1}/{args.rounds}", flush=True)
            for conc in concs:
                record(
                    f"moto s3-boto3-readinto c={conc}",
                    lambda conc=conc: trio.run(s3_backend, s3.url, "models/small.bin", size, block, conc),
                    size,
                )
                record(
                    f"moto s3-httpx-presigned c={conc}",
                    lambda conc=conc: trio.run(s3_httpx_presigned, s3.url, "models/small.bin", size, block, conc),
                    size,
                )
            record("moto s3-boto3-read c=1", lambda: s3_boto3_read(s3.url, "models/small.bin", size, block), size)


if __name__ == "__main__":
    sys.exit(main())
