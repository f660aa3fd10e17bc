"""Issue 13's hardening, through real mounts: secrets out of the command line, a bounded stop.

Every test mounts modelfs as a subprocess, the way a user (or systemd, or a pod) starts it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.mount import is_mounted
from modelfs.testing.mounts import daemon_pid, force_unmount, mounted
from modelfs.testing.nginx import TOKEN, Nginx

OPTIONS = ("--block-size", "64K", "--memory-cache", "512K", "--disk-cache", "8M")


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
