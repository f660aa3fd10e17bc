"""Issue 13's hardening, through real mounts: secrets out of the command line, a bounded stop.

Every test mounts modelfs as a subprocess, the way a user (or systemd, or a pod) starts it.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.mount import is_mounted
from modelfs.testing.fakegcs import FakeGCS
from modelfs.testing.faultproxy import fault_proxy
from modelfs.testing.mounts import daemon_pid, force_unmount, mounted
from modelfs.testing.nginx import TOKEN, Nginx

from .conftest import MountFn

OPTIONS = ("--block-size", "64K", "--memory-cache", "2M", "--disk-cache", "8M")


def _wait_for(what: str, predicate: object, timeout: float = 60.0) -> None:
    """A bounded poll, not a timing assertion: a hang fails the test instead of blocking it."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.fixture
def signed(web: Nginx) -> Iterator[tuple[str, bytes]]:
    """A file under /signed/: nginx answers only with ``?sig=TOKEN`` and ``X-Api-Key: TOKEN``."""
    name = f"s-{uuid.uuid4().hex[:10]}/m.bin"
    data = os.urandom(200_000)
    web.put(f"signed/{name}", data)
    yield web.url(f"signed/{name}") + f"?X-Goog-Date=20260101&sig={TOKEN}", data


def test_secrets_not_in_cmdline_foreground(signed: tuple[str, bytes], tmp_path: Path) -> None:
    """--foreground (the systemd unit, the pods): the daemon's own argv holds no secret."""
    source, data = signed
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelfs",
                "mount",
                source,
                str(mnt),
                "--foreground",
                "--header",
                f"X-Api-Key: {TOKEN}",
                "--cache-dir",
                str(tmp_path / "cache"),
                *OPTIONS,
            ],
            stdout=out,
            stderr=out,
        )
    try:
        _wait_for("the mount", lambda: is_mounted(mnt) or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()
        assert (mnt / "m.bin").read_bytes() == data  # the secrets were used: nginx wants both
        cmdline = _cmdline(proc.pid)  # the same pid: re-executed in place, not forked
        assert TOKEN.encode() not in cmdline, cmdline
        assert b"<hidden>" in cmdline and b"--foreground" in cmdline
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mnt)
    assert TOKEN not in log.read_text()
    assert not is_mounted(mnt)


def test_secrets_not_in_cmdline_daemonized(signed: tuple[str, bytes], tmp_path: Path) -> None:
    """Daemonized: neither the daemon's argv nor its log holds the query string or the header."""
    source, data = signed
    cache = tmp_path / "cache"
    log = tmp_path / "daemon.log"
    with mounted(
        source,
        tmp_path / "mnt",
        cache,
        f"--header=X-Api-Key: {TOKEN}",
        "--log-level",
        "debug",
        "--log-file",
        str(log),
        *OPTIONS,
    ) as mnt:
        assert (mnt / "m.bin").read_bytes() == data
        cmdline = _cmdline(daemon_pid(cache))
        assert TOKEN.encode() not in cmdline, cmdline
        assert b"<hidden>" in cmdline
    assert TOKEN not in log.read_text()


# --- stop: bounded, whatever the backend does


def test_sigterm_with_a_stalled_read_unmounts_cleanly(gcs: FakeGCS, bucket: str, tmp_path: Path) -> None:
    """A read stuck on a server that stopped sending (read timeout and retry deadline far longer
    than any stop timeout) fails with EIO after a short grace, and the daemon unmounts and
    exits: systemd and the kubelet never have to SIGKILL it and leave a dead mount."""
    data = os.urandom(4 * 65536)
    gcs.upload(bucket, "m/w.bin", data)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "out.log"
    with fault_proxy(gcs.url, rate=0.0, stall_seconds=600.0) as proxy, open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelfs",
                "mount",
                f"gs://{bucket}/m",
                str(mnt),
                "--foreground",
                "--anonymous",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--read-timeout",
                "600",
                "--retry-deadline",
                "600",
                "--no-eager",
                *OPTIONS,
            ],
            env=dict(os.environ, STORAGE_EMULATOR_HOST=proxy.url),
            stdout=out,
            stderr=out,
        )
        outcome: dict[str, object] = {}

        def reader() -> None:
            fd = os.open(mnt / "w.bin", os.O_RDONLY)
            try:
                outcome["data"] = os.pread(fd, 4096, 0)
            except OSError as exc:
                outcome["errno"] = exc.errno
            try:
                os.close(fd)
            except OSError:  # the mount is gone by now
                pass

        thread = threading.Thread(target=reader, daemon=True)
        try:
            _wait_for("the mount", lambda: is_mounted(mnt) or proc.poll() is not None)
            assert proc.poll() is None, log.read_text()
            proxy.force("stall", 1000)
            thread.start()
            _wait_for("the stalled GET", lambda: proxy.counters().get("fault_stall", 0) > 0)
            proc.send_signal(signal.SIGTERM)
            # Far longer than the daemon's bound (2 x STOP_GRACE), far shorter than its timeouts.
            code = proc.wait(timeout=45)
            thread.join(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            force_unmount(mnt)
        assert not thread.is_alive()
        assert code == 0, log.read_text()
        # EIO when the read was waiting on the block store; ENOTCONN when its own GET was blocked
        # in a worker thread and the watchdog had to detach the mount (docs/operations.md).
        assert outcome.get("errno") in (errno.EIO, errno.ENOTCONN), outcome
        assert not is_mounted(mnt)
        assert "Traceback" not in log.read_text()


# --- gzip-encoded GCS objects: served as stored


def _upload_gzip_encoded(gcs: FakeGCS, bucket: str, name: str, stored: bytes) -> None:
    """What ``gsutil cp -Z`` makes: an object whose stored bytes are gzip, with Content-Encoding: gzip."""
    boundary = "modelfs-boundary"
    meta = json.dumps({"name": name, "contentEncoding": "gzip", "contentType": "application/json"}).encode()
    body = (
        f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode()
        + meta
        + f"\r\n--{boundary}\r\nContent-Type: application/json\r\n\r\n".encode()
        + stored
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{gcs.url}/upload/storage/v1/b/{bucket}/o?uploadType=multipart",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/related; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert int(json.loads(resp.read())["size"]) == len(stored)


def test_gzip_encoded_gcs_object_reads_as_stored(gcs: FakeGCS, bucket: str, mount: MountFn) -> None:
    """``tokenizer.json`` uploaded with ``gsutil cp -Z``: stat shows the stored size and every
    byte read is the stored (gzip) byte at that offset, never decompressed bytes."""
    plain = json.dumps({"vocab": {f"tok{i}": i for i in range(40_000)}}).encode()
    stored = gzip.compress(plain)
    assert len(stored) > 2 * 65536  # several blocks
    _upload_gzip_encoded(gcs, bucket, "m/tokenizer.json", stored)
    gcs.upload(bucket, "m/plain.bin", plain[:100_000])
    mnt = mount(f"gs://{bucket}/m", *OPTIONS)
    path = mnt / "tokenizer.json"
    assert path.stat().st_size == len(stored)
    assert path.read_bytes() == stored
    assert gzip.decompress(path.read_bytes()) == plain
    rng = random.Random(5)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(20):
            offset = rng.randrange(len(stored))
            length = rng.randrange(1, 100_000)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, length, offset) == stored[offset : offset + length]
    finally:
        os.close(fd)
    assert (mnt / "plain.bin").read_bytes() == plain[:100_000]  # an ordinary object is unchanged
