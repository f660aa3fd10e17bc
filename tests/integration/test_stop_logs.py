"""What a stop leaves: one info line about the reads it abandoned, no retry lines, warnings or
tracebacks; the daemon gone within the stop bound, by a signal or by ``modelfs unmount``, the
mount gone, and the disk cache serving the right bytes after a restart."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.mount import STOP_GRACE, is_mounted, wait_for_exit
from modelfs.testing.fakegcs import FakeGCS
from modelfs.testing.faultproxy import FaultProxy, fault_proxy
from modelfs.testing.mounts import daemon_pid, force_unmount, mounted, run_modelfs

from .conftest import wait_for

# Timeouts far past any stop bound: only the stop can end these GETs in time.
SLOW = ("--read-timeout", "600", "--retry-deadline", "600")
OPTIONS = ("--block-size", "64K", "--memory-cache", "2M", "--disk-cache", "8M", *SLOW)
# A bound against a hang only: the daemon's own bound is 2 x STOP_GRACE after the stop.
HANG = 6 * STOP_GRACE


def _stop_lines(text: str, after: str) -> list[str]:
    """The log lines from the first one containing ``after`` on."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    return lines[start:]


def _quiet(lines: list[str]) -> None:
    """No line of a stop that reads as a failure: at most one about abandoned requests."""
    assert not [line for line in lines if "retrying" in line], lines
    assert not [line for line in lines if " WARNING " in line or " ERROR " in line], lines
    assert "Traceback" not in "\n".join(lines)
    assert "Nursery is closed" not in "\n".join(lines)
    assert sum("failing them with EIO" in line for line in lines) <= 1, lines


@pytest.fixture
def proxy(gcs: FakeGCS) -> Iterator[FaultProxy]:
    with fault_proxy(gcs.url, rate=0.0, stall_seconds=600.0) as proxy:
        yield proxy


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _remount_reads(gcs: FakeGCS, source: str, tmp_path: Path, cache: Path, name: str) -> str:
    """The hash of ``name`` read through a new mount on the same cache dir (no faults)."""
    with mounted(source, tmp_path / "mnt2", cache, "--anonymous", *OPTIONS, env=gcs.env()) as mnt:
        return _sha(mnt / name)


@pytest.mark.parametrize("fault", ["503", "stall"], ids=["retrying", "stalled"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_with_reads_retrying_or_stalled_logs_one_line(
    gcs: FakeGCS, bucket: str, proxy: FaultProxy, tmp_path: Path, fault: str, signum: int
) -> None:
    """Reads whose GETs fail (and are retried) or stall when ``modelfs mount -f`` is signalled:
    the stop logged a retry line per attempt after the signal ('retrying ... after: HTTP 503',
    '... after: ConnectionAbortedError: the daemon is stopping') and a warning for the reads
    it failed. Now: one info line, exit 0, the mount gone, and a restart reads right bytes."""
    data = os.urandom(8 * 65536)
    gcs.upload(bucket, "m/w.bin", data)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfs", "mount", f"gs://{bucket}/m", str(mnt), "-f", "--anonymous"]
            + ["--cache-dir", str(cache), "--no-eager", *OPTIONS],
            env=dict(os.environ, STORAGE_EMULATOR_HOST=proxy.url),
            stdout=out,
            stderr=out,
        )
    outcome: dict[str, object] = {}

    def reader() -> None:
        try:
            with open(mnt / "w.bin", "rb") as f:
                outcome["data"] = f.read()
        except OSError as exc:
            outcome["errno"] = exc.errno

    thread = threading.Thread(target=reader, daemon=True)
    try:
        wait_for("the mount", lambda: is_mounted(mnt) or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()
        proxy.force(fault, 1_000_000)
        thread.start()
        if fault == "503":  # retried: at least one retry line before the signal
            wait_for("a retry", lambda: "retrying" in log.read_text())
        else:
            wait_for("the stalled GET", lambda: proxy.counters().get("fault_stall", 0) > 0)
        proc.send_signal(signum)
        code = proc.wait(timeout=HANG)
        thread.join(HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mnt)
    assert code == 0, log.read_text()
    assert not thread.is_alive() and "data" not in outcome, outcome
    assert not is_mounted(mnt)
    lines = _stop_lines(log.read_text(), f"got {signal.Signals(signum).name}")
    _quiet(lines)
    assert sum("failing them with EIO" in line for line in lines) == 1, lines
    assert _remount_reads(gcs, f"gs://{bucket}/m", tmp_path, cache, "w.bin") == hashlib.sha256(data).hexdigest()


def test_unmount_with_the_eager_stream_stalled_exits_within_the_bound(
    gcs: FakeGCS, bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    """``modelfs unmount`` while --eager-model's GETs stall on the server: no request is left,
    so nothing aborted them (only a signal did), and no watchdog ran: the daemon waited for
    its stream threads until the read timeout (600 s here; unmount gave up after 60 s with a
    warning). Now the unmount ends them too: the daemon is gone within the stop bound, its
    log quiet, and a restart reads the right bytes (no partial block was left to serve)."""
    data = os.urandom(16 * 65536)
    gcs.upload(bucket, "m/w.safetensors", data)  # (not a safetensors header: file order)
    cache = tmp_path / "cache"
    proxy.force("stall", 1_000_000)  # media GETs only: the listings still answer
    env = dict(os.environ, STORAGE_EMULATOR_HOST=proxy.url)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run_modelfs(
        "mount",
        f"gs://{bucket}/m",
        str(mnt),
        "--anonymous",
        "--cache-dir",
        str(cache),
        "--eager-model",
        *OPTIONS,
        env=env,
    )
    try:
        assert result.returncode == 0, result.stderr
        pid = daemon_pid(cache)
        wait_for("the stream's stalled GETs", lambda: proxy.counters().get("fault_stall", 0) > 0)
        unmounted = run_modelfs("unmount", str(mnt), timeout=HANG * 3)
        assert unmounted.returncode == 0 and unmounted.stderr == "", unmounted.stderr
        assert wait_for_exit(pid, HANG)
    finally:
        force_unmount(mnt)
    assert not is_mounted(mnt)
    text = "".join(p.read_text() for p in cache.glob("*.log"))
    _quiet(_stop_lines(text, "unmounted"))
    assert "streaming 1 weight file(s)" in text
    assert _remount_reads(gcs, f"gs://{bucket}/m", tmp_path, cache, "w.safetensors") == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_warm_with_a_stalled_get_ends_it_at_once(
    gcs: FakeGCS, bucket: str, proxy: FaultProxy, tmp_path: Path, signum: int, code: int
) -> None:
    """Ctrl-C on ``modelfs warm`` while a GET stalled: trio's KeyboardInterrupt waited for the
    GET's worker thread, so warm hung for --read-timeout (600 s here). Now a stop signal shuts
    the GETs down: exit 128 + the signal, one line, and a warm that follows on the same cache
    dir finds every block right (its checksum checked against the store's)."""
    data = os.urandom(16 * 65536)
    gcs.upload(bucket, "m/w.bin", data)
    cache = tmp_path / "cache"
    proxy.force("stall", 2)
    args = ["warm", f"gs://{bucket}/m", "--anonymous", "--cache-dir", str(cache), "--block-size", "64K"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelfs", *args, "--memory-cache", "2M", *SLOW],
        env=dict(os.environ, STORAGE_EMULATOR_HOST=proxy.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a test run started in the background has SIGINT ignored, which
        # the child would inherit (and rightly keep ignoring).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for("the stalled GET", lambda: proxy.counters().get("fault_stall", 0) > 0)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert err.strip() == f"modelfs: warm stopped by {signal.Signals(signum).name}", err
    again = run_modelfs(*args, env=gcs.env())
    assert again.returncode == 0, again.stderr
    assert "warm: w.bin: cached, checksum ok" in again.stderr


def _signal_mask(pid: int, field: str) -> int:
    """``SigIgn`` or ``SigCgt`` of ``pid`` (/proc/PID/status): bit N-1 is signal N."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.parametrize(
    "ignored", [(), (signal.SIGHUP,), (signal.SIGHUP, signal.SIGINT)], ids=["none", "nohup", "background"]
)
def test_a_stop_signal_ignored_at_start_stays_ignored(tmp_path: Path, ignored: tuple[int, ...]) -> None:
    """``nohup modelfs mount -f`` (SIGHUP ignored) or a background job (SIGINT too): the mount
    took SIGHUP all the same, so closing the terminal stopped it. Now a stop signal the
    process was started ignoring stays ignored (as the kernel sees it: /proc's SigIgn), the
    others are caught; the mount serves the right bytes and SIGTERM still stops it."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(300_000)
    (src / "w.bin").write_bytes(data)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "out.log"

    def ignore() -> None:
        for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):  # (whatever the suite runs under)
            signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)

    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfs", "mount", f"file://{src}", str(mnt), "-f"]
            + ["--cache-dir", str(tmp_path / "cache")],
            stdout=out,
            stderr=out,
            preexec_fn=ignore,
        )
    try:
        wait_for("the mount", lambda: is_mounted(mnt) or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()
        assert hashlib.sha256((mnt / "w.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
        ign, cgt = _signal_mask(proc.pid, "SigIgn"), _signal_mask(proc.pid, "SigCgt")
        for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
            bit = 1 << (signum - 1)
            if signum in ignored:
                assert ign & bit and not cgt & bit, f"{signal.Signals(signum).name} taken though ignored at start"
            else:
                assert cgt & bit, f"{signal.Signals(signum).name} not caught"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mnt)
    assert code == 0, log.read_text()
    assert not is_mounted(mnt)
