"""The cache dir through the real CLI: planted symlinks and unsafe dirs are refused with one
line and a non-zero exit, and a cache dir deleted under a running mount comes back."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelfs.backends.memory import ramp
from modelfs.mount import is_mounted
from modelfs.testing.mounts import daemon_pid, force_unmount, mounted, run_modelfs

from .conftest import wait_for

MiB = 1 << 20


def _fails(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(ramp(3 * MiB, seed=1))
    (src / "b.bin").write_bytes(ramp(3 * MiB, seed=2))
    return src


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    force_unmount(path)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A copy of /etc/shadow: what a planted symlink points at."""
    copy = tmp_path / "shadow-copy"
    try:
        shutil.copyfile("/etc/shadow", copy)
    except OSError:
        copy.write_bytes(b"root:*:19000:0:99999:7:::\n")
    return copy


@pytest.mark.parametrize("planted", ["lock", "modelfs.log"])
def test_a_planted_symlink_in_the_cache_dir_fails_the_mount(
    source: Path, mnt: Path, tmp_path: Path, secret: Path, planted: str
) -> None:
    before = secret.read_bytes()
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    (cache / planted).symlink_to(secret)
    result = run_modelfs("mount", f"file://{source}", str(mnt), "--cache-dir", str(cache))
    _fails(result, "symlink")
    assert secret.read_bytes() == before
    assert not is_mounted(mnt)


def test_an_unsafe_cache_dir_fails_the_mount(source: Path, mnt: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    result = run_modelfs("mount", f"file://{source}", str(mnt), "--cache-dir", str(shared / "cache"), "--foreground")
    _fails(result, "writable by every user")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 4242, 4242)
    result = run_modelfs("mount", f"file://{source}", str(mnt), "--cache-dir", str(theirs))
    _fails(result, "owned by uid 4242")
    assert not is_mounted(mnt)


def _written_blocks(cache: Path) -> int:
    """Block files whose write is done: none still under a temporary name (a rename racing
    the test's rmtree would fail it), else -1."""
    files = [p for p in (cache / "blocks").rglob("*") if p.is_file()]
    if any(p.name.startswith(".") for p in files):
        return -1
    return len(files)


def test_a_cache_dir_deleted_while_mounted_is_recreated(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    log = tmp_path / "daemon.log"
    opts = ("--block-size", "1M", "--memory-cache", "4M", "--log-file", str(log), "--no-eager")
    with mounted(f"file://{source}", tmp_path / "mnt", cache, *opts) as mnt:
        pid = daemon_pid(cache)
        assert hashlib.sha256((mnt / "a.bin").read_bytes()).digest() == hashlib.sha256(ramp(3 * MiB, 1)).digest()
        wait_for("a.bin's blocks", lambda: _written_blocks(cache) == 3)
        shutil.rmtree(cache)
        assert (mnt / "b.bin").read_bytes() == ramp(3 * MiB, seed=2)
        wait_for("b.bin's blocks", lambda: _written_blocks(cache) == 3)
        assert (cache / "lock").read_text() == f"{pid}\n"
        assert oct((cache.stat().st_mode) & 0o777) == "0o700"
        # The recreated dir is locked again: a second mount on it is refused.
        other = tmp_path / "mnt2"
        other.mkdir()
        try:
            _fails(run_modelfs("mount", f"file://{source}", str(other), "--cache-dir", str(cache)), "in use")
        finally:
            force_unmount(other)
        assert (mnt / "a.bin").read_bytes() == ramp(3 * MiB, seed=1)
    text = log.read_text()
    assert text.count("recreated it and its lock") == 1, text


def test_a_cache_dir_read_with_another_block_size_serves_the_right_bytes(tmp_path: Path) -> None:
    """Block 1 of a 12 MiB file is [8, 12) MiB with 8 MiB blocks and [4, 8) MiB with 4 MiB ones,
    both 4 MiB long: a cache dir filled at one --block-size and mounted at another must not
    hand one for the other (each size names its files apart). (--persist-weak-versions: a
    local file has no strong version; without it no block is reused after a restart.)"""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(12 << 20)
    (src / "m.bin").write_bytes(data)
    cache = tmp_path / "cache"
    for block_size in ("8M", "4M", "8M", "2M", "4M"):
        mnt = tmp_path / f"mnt-{block_size}"
        with mounted(f"file://{src}", mnt, cache, "--block-size", block_size, "--no-eager", "--persist-weak-versions"):
            got = (mnt / "m.bin").read_bytes()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), block_size


def test_a_modelfs_module_in_the_current_directory_is_never_imported(tmp_path: Path, source: Path) -> None:
    """The daemon (a child; the re-exec that hides --header values likewise) runs ``python -m
    modelfs``, which would import a modelfs.py from the current directory — as root."""
    planted = tmp_path / "cwd"
    planted.mkdir()
    marker = tmp_path / "ran"
    (planted / "modelfs.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    installed = Path(sys.executable).parent / "modelfs"  # the console script, as users run it
    argv = [str(installed), "mount", f"file://{source}", str(mnt), "--cache-dir", str(tmp_path / "cache")]
    try:
        result = subprocess.run(argv, cwd=planted, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert (mnt / "a.bin").read_bytes() == (source / "a.bin").read_bytes()
        assert not marker.exists()
    finally:
        subprocess.run([str(installed), "unmount", str(mnt)], capture_output=True, check=False)
        force_unmount(mnt)


@pytest.fixture
def full_fs(tmp_path: Path) -> Path:
    """A 1 MiB tmpfs with no room left: a cache dir on a full disk."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(where)], check=True)
    try:
        with open(where / "filler", "wb") as filler:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("how", ["daemon", "foreground", "warm"])
def test_a_new_cache_dir_on_a_full_disk_is_one_line(source: Path, mnt: Path, full_fs: Path, how: str) -> None:
    """The lock file's pid could not be written: a traceback (-f, warm), or, from the daemon
    whose log could not be written either, "mount did not come up in time"."""
    cache = full_fs / "cache"
    options = {"daemon": (), "foreground": ("--foreground",), "warm": ()}[how]
    if how == "warm":
        result = run_modelfs("warm", f"file://{source}", "--cache-dir", str(cache), "--persist-weak-versions")
    else:
        result = run_modelfs("mount", f"file://{source}", str(mnt), "--cache-dir", str(cache), *options)
    _fails(result, "No space left on device")
    assert not is_mounted(mnt)
