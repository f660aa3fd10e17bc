"""Operator tools against real mounts: /metrics, ``modelfs stats``, ``modelfs warm``."""

from __future__ import annotations

import hashlib
import json
import os
import random
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.testing.fakegcs import FakeGCS, fake_gcs, free_port
from modelfs.testing.mounts import mounted, run_modelfs

from .conftest import MountFn


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_move_during_reads(gcs: FakeGCS, bucket: str, mount: MountFn) -> None:
    data = random.Random(7).randbytes(10 * 65536)
    gcs.upload(bucket, "m/w.bin", data)
    gcs.upload(bucket, "m/sub/x.bin", b"x")
    port = free_port()
    mnt = mount(
        f"gs://{bucket}/m",
        "--no-eager",
        "--block-size",
        "64K",
        "--memory-cache",
        "1152K",
        "--prefetch-get-size",  # one GET per block: the counts below are exact
        "64K",
        "--metrics-addr",
        f"127.0.0.1:{port}",
    )
    before = _metrics(port)
    assert before['modelfs_backend_bytes_total{backend="gs"}'] == 0
    with open(mnt / "w.bin", "rb") as f:
        assert f.read(65536) == data[:65536]
        middle = _metrics(port)
        assert f.read() == data[65536:]
    after = _metrics(port)
    assert 0 < middle['modelfs_backend_bytes_total{backend="gs"}'] < after['modelfs_backend_bytes_total{backend="gs"}']
    assert after['modelfs_backend_bytes_total{backend="gs"}'] == len(data)
    assert after['modelfs_backend_requests_total{backend="gs"}'] == 10
    assert after["modelfs_read_latency_seconds_count"] > middle["modelfs_read_latency_seconds_count"]
    assert after["modelfs_memory_cache_capacity_bytes"] == 1152 * 1024
    assert 0 < after["modelfs_memory_cache_bytes"] <= 1152 * 1024
    assert after['modelfs_cache_misses_total{tier="memory"}'] >= 1
    assert after["modelfs_read_bytes_total"] == len(data)
    # the loop thread's CPU is part of the daemon's, and both only grow
    assert 0 < after["modelfs_event_loop_cpu_seconds_total"] <= after["modelfs_daemon_cpu_seconds_total"]
    assert after["modelfs_event_loop_cpu_seconds_total"] >= before["modelfs_event_loop_cpu_seconds_total"]

    result = run_modelfs("stats", str(mnt))
    assert result.returncode == 0, result.stderr
    assert f"gs://{bucket}/m" in result.stdout
    assert "10 GETs" in result.stdout
    assert "event loop (serialized)" in result.stdout
    assert "one mount's ceiling" not in result.stdout  # (a few blocks read: per GiB means nothing yet)
    raw = run_modelfs("stats", "--json", str(mnt))
    assert json.loads(raw.stdout)["backend_bytes"] == len(data)
    # A file or directory inside the mount: the mount's own stats, as df answers for any path.
    for inside in (mnt / "w.bin", mnt / "sub", mnt / "sub" / "x.bin"):
        result = run_modelfs("stats", "--json", str(inside))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["source"] == f"gs://{bucket}/m"


def test_stats_of_something_else(tmp_path: Path) -> None:
    result = run_modelfs("stats", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("modelfs: ") and "not a running modelfs mount" in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_port_in_use(gcs: FakeGCS, bucket: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        result = run_modelfs(
            "mount",
            f"gs://{bucket}",
            str(mnt),
            "--anonymous",
            "--cache-dir",
            str(tmp_path / "c"),
            "--metrics-addr",
            f"127.0.0.1:{port}",
            env=gcs.env(),
        )
    assert result.returncode == 1
    assert "metrics" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.ismount(mnt)


@pytest.fixture
def fs_gcs(tmp_path: Path) -> Iterator[FakeGCS]:
    """An emulator on the filesystem backend, so tests can corrupt an object's bytes under it."""
    with fake_gcs("filesystem", root=tmp_path / "gcs-root") as server:
        yield server


def test_warm_then_mount_reads_no_gets(fs_gcs: FakeGCS, tmp_path: Path) -> None:
    fs_gcs.create_bucket("warm-bucket")
    sources = {}
    for i, size in enumerate([5 * 65536 + 11, 65536, 3]):
        path = tmp_path / f"src{i}.bin"
        path.write_bytes(random.Random(i).randbytes(size))
        fs_gcs.seed_file("warm-bucket", f"model/part{i}.safetensors", path)
        sources[f"part{i}.safetensors"] = path.read_bytes()
    cache = tmp_path / "cache"
    options = ("--anonymous", "--cache-dir", str(cache), "--block-size", "64K", "--memory-cache", "1536K")
    result = run_modelfs("warm", "gs://warm-bucket/model", *options, env=fs_gcs.env())
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("checksum ok") == 3
    with mounted(
        "gs://warm-bucket/model", tmp_path / "mnt", cache, *options[1:], "--anonymous", env=fs_gcs.env()
    ) as mnt:
        for name, data in sources.items():
            assert hashlib.sha256((mnt / name).read_bytes()).digest() == hashlib.sha256(data).digest()
        stats = json.loads(os.getxattr(mnt, "user.modelfs.stats"))
    assert stats["backend_gets"] == 0
    assert stats["disk_hits"] == 6 + 1 + 1


def test_warm_fails_on_corrupt_object(fs_gcs: FakeGCS, tmp_path: Path) -> None:
    fs_gcs.create_bucket("warm-bad")
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    good.write_bytes(random.Random(1).randbytes(200_000))
    bad.write_bytes(random.Random(2).randbytes(200_000))
    fs_gcs.seed_file("warm-bad", "m/good.bin", good)
    fs_gcs.seed_file("warm-bad", "m/bad.bin", bad)
    stored = fs_gcs.root / "warm-bad" / "m" / "bad.bin"
    with open(stored, "r+b") as f:  # in place: the metadata xattr (with the old CRC32C) stays
        f.seek(123_456)
        byte = f.read(1)
        f.seek(123_456)
        f.write(bytes([byte[0] ^ 0x01]))
    cache = tmp_path / "cache"
    result = run_modelfs(
        "warm", "gs://warm-bad/m", "--anonymous", "--cache-dir", str(cache), "--block-size", "64K", env=fs_gcs.env()
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("modelfs: checksum mismatch") and "bad.bin" in last and "good.bin" not in last
    assert "Traceback" not in result.stderr
