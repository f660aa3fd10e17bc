"""A mount stopped while it starts: the signal is taken, the startup ends, nothing is mounted.

The startup listing is held by an origin that answers only when the test releases it, so the
test knows the mount is mid-startup (its request arrived) without waiting on a clock.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.mount import is_mounted
from modelfs.testing.held import HeldOrigin, held_origin
from modelfs.testing.mounts import force_unmount, run_modelfs

needs_unshare = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    force_unmount(path)


@pytest.fixture
def origin() -> Iterator[HeldOrigin]:
    with held_origin() as held:
        yield held


def _modelfs(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "modelfs", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _only_child(pid: int) -> int:
    """The one child of ``pid`` (unshare --fork's: the PID 1 of the new namespace)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("as_pid_1", [False, pytest.param(True, marks=needs_unshare)], ids=["process", "pid-1"])
def test_sigterm_during_startup_stops_it_and_nothing_is_mounted(
    origin: HeldOrigin, mnt: Path, tmp_path: Path, as_pid_1: bool
) -> None:
    """As PID 1 (the image) a SIGTERM that finds no handler is discarded: the daemon would
    mount and serve anyway. It must be taken from the start and end the startup listing."""
    prefix = ("unshare", "--pid", "--fork", "--kill-child=SIGKILL") if as_pid_1 else ()
    proc = _modelfs(
        "mount", origin.url, str(mnt), "--foreground", "--cache-dir", str(tmp_path / "cache"), prefix=prefix
    )
    try:
        assert origin.arrived.wait(60), "the startup listing never reached the origin"
        os.kill(_only_child(proc.pid) if as_pid_1 else proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)  # a guard against a hang only: the origin never answers
    finally:
        _reap(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert err.count("got SIGTERM during startup") == 1, err
    assert "mounted" not in err.replace("nothing mounted", "")
    assert not is_mounted(mnt)


def _mounts_at(path: Path) -> list[str]:
    """The types of the mounts stacked at ``path`` (a test path: nothing to unescape)."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return [fields[2] for fields in (line.split() for line in f) if fields[1] == target]


def test_two_mounts_racing_for_one_mountpoint_never_stack(origin: HeldOrigin, mnt: Path, tmp_path: Path) -> None:
    """The first start passes the mountpoint check, then waits on its listing; a second start
    mounts meanwhile. Released, the first must see that mount and fail, not mount over it."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.bin").write_bytes(b"abc")
    first = _modelfs("mount", origin.url, str(mnt), "--cache-dir", str(tmp_path / "cache1"))
    try:
        assert origin.arrived.wait(60), "the first start's listing never reached the origin"
        second = run_modelfs("mount", f"file://{source}", str(mnt), "--cache-dir", str(tmp_path / "cache2"))
        assert second.returncode == 0, second.stderr
        try:
            origin.release()
            _, err = first.communicate(timeout=120)  # a guard against a hang only
            assert first.returncode == 1, err
            assert err.strip() == f"modelfs: mountpoint {mnt} is already mounted", err
            assert _mounts_at(mnt) == ["fuse.modelfs"]
            assert (mnt / "m.bin").exists() is False and (mnt / "a.bin").read_bytes() == b"abc"
        finally:
            run_modelfs("unmount", str(mnt), timeout=60)
    finally:
        _reap(first)
        force_unmount(mnt)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_mount_stops_the_daemon_it_started(
    origin: HeldOrigin, mnt: Path, tmp_path: Path, signum: int, code: int
) -> None:
    """The daemon runs in its own session: Ctrl-C on ``modelfs mount`` reaches only the
    parent. It must stop the daemon it started, or the mount would appear after all."""
    cache = tmp_path / "cache"
    proc = _modelfs("mount", origin.url, str(mnt), "--cache-dir", str(cache))
    daemon: int | None = None
    try:
        assert origin.arrived.wait(60), "the daemon's startup listing never reached the origin"
        daemon = _only_child(proc.pid)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)  # a guard against a hang only
        assert proc.returncode == code, err
        assert err.strip() == "", err
        # The parent waited for it (and reaped it): gone before the origin ever answers.
        assert not Path(f"/proc/{daemon}").exists()
        assert "got SIGTERM during startup" in (cache / "modelfs.log").read_text()
        assert not is_mounted(mnt)
    finally:
        _reap(proc)
        if daemon is not None and Path(f"/proc/{daemon}").exists():
            os.kill(daemon, signal.SIGKILL)


def test_a_daemon_whose_starter_is_gone_unmounts_again(mnt: Path, tmp_path: Path) -> None:
    """The ``modelfs mount`` that started the daemon was killed (SIGKILL: no chance to stop
    it) before the mount was ready: the daemon's 'ready' meets a closed pipe (EPIPE). One
    log line, the mount taken down, exit 0; no traceback."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.bin").write_bytes(b"abc")
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelfs", "mount", f"file://{source}", str(mnt), "--foreground"]
        + ["--cache-dir", str(tmp_path / "cache")],
        env=dict(os.environ, MODELFS_READY_FD=str(write_end)),
        pass_fds=(write_end,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write_end)
    os.close(read_end)  # the starter is gone before the daemon is ready
    try:
        _, err = proc.communicate(timeout=60)  # a guard against a hang only
    finally:
        _reap(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert err.count("the modelfs mount that started this daemon is gone") == 1, err
    assert "unmounted" in err
    assert not is_mounted(mnt)
