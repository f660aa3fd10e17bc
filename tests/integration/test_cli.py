"""Bad input gets one line on stderr, a non-zero exit, and leaves nothing mounted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelfs.mount import is_mounted
from modelfs.testing.fakegcs import FakeGCS
from modelfs.testing.mounts import force_unmount, run_modelfs

from .conftest import MountFn


def _fails(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("modelfs: ")
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    force_unmount(path)


def test_bad_source(mnt: Path, gcs: FakeGCS) -> None:
    _fails(run_modelfs("mount", "ftp://x/y", str(mnt), env=gcs.env()), 2, "unsupported source")
    _fails(run_modelfs("mount", "gs://Bad_Bucket!/p", str(mnt), env=gcs.env()), 2, "bucket name")
    _fails(run_modelfs("mount", "file://relative/dir", str(mnt), env=gcs.env()), 2, "absolute")
    assert not is_mounted(mnt)


def test_bad_options(mnt: Path, gcs: FakeGCS, bucket: str) -> None:
    src = f"gs://{bucket}"
    _fails(run_modelfs("mount", src, str(mnt), "--memory-cache", "lots", env=gcs.env()), 2, "--memory-cache")
    _fails(
        run_modelfs("mount", src, str(mnt), "--memory-cache", "1M", "--block-size", "1M", env=gcs.env()),
        2,
        "two blocks",
    )
    assert not is_mounted(mnt)


def test_missing_bucket(mnt: Path, gcs: FakeGCS, tmp_path: Path) -> None:
    result = run_modelfs(
        "mount",
        "gs://no-such-bucket-here/models",
        str(mnt),
        "--anonymous",
        "--cache-dir",
        str(tmp_path / "c"),
        "--retry-deadline",
        "2",
        env=gcs.env(),
    )
    _fails(result, 1, "no-such-bucket-here", "not found")
    assert not is_mounted(mnt)


def test_dead_server(mnt: Path, tmp_path: Path) -> None:
    env = dict(os.environ, STORAGE_EMULATOR_HOST="http://127.0.0.1:9")  # nothing listens on port 9
    result = run_modelfs(
        "mount",
        "gs://some-bucket",
        str(mnt),
        "--anonymous",
        "--cache-dir",
        str(tmp_path / "c"),
        "--retry-deadline",
        "1",
        env=env,
    )
    _fails(result, 1)
    assert not is_mounted(mnt)


def test_bad_mountpoints(gcs: FakeGCS, bucket: str, tmp_path: Path, mount: MountFn) -> None:
    gcs.upload(bucket, "a.bin", b"a")
    src = f"gs://{bucket}"
    cache = str(tmp_path / "c")
    _fails(
        run_modelfs("mount", src, str(tmp_path / "missing"), "--anonymous", "--cache-dir", cache, env=gcs.env()),
        1,
        "does not exist",
    )
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    _fails(run_modelfs("mount", src, str(full), "--anonymous", "--cache-dir", cache, env=gcs.env()), 1, "not empty")
    afile = tmp_path / "afile"
    afile.write_text("x")
    _fails(
        run_modelfs("mount", src, str(afile), "--anonymous", "--cache-dir", cache, env=gcs.env()), 1, "not a directory"
    )
    mounted_at = mount(src)
    _fails(
        run_modelfs("mount", src, str(mounted_at), "--anonymous", "--cache-dir", cache, env=gcs.env()),
        1,
        "already mounted",
    )
    assert (mounted_at / "a.bin").read_bytes() == b"a"  # the first mount still works
    _fails(run_modelfs("unmount", str(tmp_path / "full"), env=gcs.env()), 1, "not mounted")


def test_cache_dir_in_use(gcs: FakeGCS, bucket: str, tmp_path: Path, mount: MountFn) -> None:
    gcs.upload(bucket, "a.bin", b"a")
    cache = tmp_path / "shared-cache"
    mount(f"gs://{bucket}", cache_dir=cache)
    other = tmp_path / "other"
    other.mkdir()
    result = run_modelfs("mount", f"gs://{bucket}", str(other), "--anonymous", "--cache-dir", str(cache), env=gcs.env())
    _fails(result, 1, "in use")
    assert not is_mounted(other)


def _foreground_mount(gcs: FakeGCS, bucket: str, mnt: Path, tmp_path: Path) -> subprocess.Popen[str]:
    """``modelfs mount --foreground`` of gs://BUCKET/m (holding a.bin = b"abc"), once it answers."""
    gcs.upload(bucket, "m/a.bin", b"abc")
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelfs", "mount", f"gs://{bucket}/m", str(mnt), "--foreground", "--anonymous"]
        + ["--cache-dir", str(tmp_path / "c")],
        env=gcs.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not is_mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"mount did not come up: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def test_sigterm_unmounts_cleanly(gcs: FakeGCS, bucket: str, mnt: Path, tmp_path: Path) -> None:
    proc = _foreground_mount(gcs, bucket, mnt, tmp_path)
    try:
        assert (mnt / "a.bin").read_bytes() == b"abc"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_signals_that_keep_coming_during_the_stop_never_kill_it(
    gcs: FakeGCS, bucket: str, mnt: Path, tmp_path: Path
) -> None:
    """A supervisor that repeats SIGTERM (or a user pressing Ctrl-C again) while the daemon
    unmounts and cleans up: it still exits 0 with the mount gone, never by the signal (143)."""
    proc = _foreground_mount(gcs, bucket, mnt, tmp_path)
    try:
        assert (mnt / "a.bin").read_bytes() == b"abc"
        sent = 0
        while proc.poll() is None and sent < 2000:  # until it is gone: some land mid-clean-up
            proc.send_signal(signal.SIGTERM)
            sent += 1
            try:
                proc.wait(timeout=0.005)
            except subprocess.TimeoutExpired:
                pass
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (sent, err)
        assert "Traceback" not in err
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mnt)


def test_a_mount_elsewhere_with_a_path_that_is_not_utf8_breaks_nothing(tmp_path: Path) -> None:
    """/proc/self/mounts lists every mount of the host; one whose path is not UTF-8 must not
    break mounting, unmounting or recognising mounts anywhere else."""
    from modelfs.mount import mounted_fstype

    odd = Path(os.fsdecode(bytes(tmp_path) + b"/odd\xff name"))
    odd.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(odd)], check=True)
    try:
        assert is_mounted(odd) and mounted_fstype(odd) == "tmpfs"
        src = tmp_path / "src"
        src.mkdir()
        (src / "a.bin").write_bytes(b"abc")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        result = run_modelfs("mount", f"file://{src}", str(mnt), "--cache-dir", str(tmp_path / "cache"))
        assert result.returncode == 0, result.stderr
        try:
            assert is_mounted(mnt) and mounted_fstype(mnt) == "fuse.modelfs"
            assert (mnt / "a.bin").read_bytes() == b"abc"
        finally:
            result = run_modelfs("unmount", str(mnt))
            force_unmount(mnt)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
        # Another file system is never unmounted by `modelfs unmount`.
        refused = run_modelfs("unmount", str(odd))
        assert refused.returncode == 1 and "not a modelfs mount (tmpfs)" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and is_mounted(odd)
    finally:
        subprocess.run(["umount", "-l", str(odd)], check=False)


def test_unmount_of_a_busy_mount_fails_like_umount(tmp_path: Path, mnt: Path) -> None:
    """With a file open in the mount, `modelfs unmount` detached it lazily, blocked a minute
    waiting for a daemon that could not exit, and exited 0. Now: one line, exit 1, still
    mounted and serving; once the file is closed it unmounts."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(100_000)
    (src / "f").write_bytes(data)
    result = run_modelfs("mount", f"file://{src}", str(mnt), "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    with open(mnt / "f", "rb") as held:
        busy = run_modelfs("unmount", str(mnt), timeout=30)
        _fails(busy, 1, f"{mnt} is busy")
        assert is_mounted(mnt)
        assert held.read() == data
    done = run_modelfs("unmount", str(mnt), timeout=90)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert not is_mounted(mnt)


def test_the_daemon_leaves_the_directory_it_was_started_in(tmp_path: Path, mnt: Path) -> None:
    """The daemon kept the caller's working directory: that file system could not be
    unmounted ("target is busy") while the mount ran. Relative paths (the mountpoint, the
    cache dir, the config file) are resolved first, against that directory."""
    from modelfs.testing.mounts import daemon_pid

    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(300_000)
    (src / "w.bin").write_bytes(data)
    work = tmp_path / "work"
    work.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(work)], check=True)
    try:
        (work / "c.toml").write_text('memory-cache = "64M"\n')
        result = subprocess.run(
            [sys.executable, "-m", "modelfs", "mount", f"file://{src}", "../mnt", "--cache-dir", "../cache"]
            + ["--config", "c.toml"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        pid = daemon_pid(tmp_path / "cache")
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        stats = run_modelfs("stats", str(mnt), "--json")
        assert '"memory_capacity": 67108864' in stats.stdout, stats.stdout
        # The file system the command ran in is free to go.
        assert subprocess.run(["umount", str(work)], capture_output=True, check=False).returncode == 0
        assert (mnt / "w.bin").read_bytes() == data
        assert run_modelfs("unmount", str(mnt)).returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(work)], capture_output=True, check=False)


def test_a_source_whose_name_never_resolves_fails_the_mount_in_one_line(mnt: Path, tmp_path: Path) -> None:
    """A resolver that never answers for the endpoint's name (getaddrinfo blocked in the
    daemon by a sitecustomize: no DNS server involved): the mount's first check of the bucket
    fails at the connect timeout, is retried within --retry-deadline, then one line and exit 1.
    It waited for the lookup without end (here: until run_modelfs's timeout)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import socket, threading\n"
        "_real = socket.getaddrinfo\n"
        "def _blocked(host, *args, **kwargs):\n"
        "    if host in ('s3-dns.test', b's3-dns.test'):\n"
        "        threading.Event().wait()  # a resolver that never answers\n"
        "    return _real(host, *args, **kwargs)\n"
        "socket.getaddrinfo = _blocked\n"
    )
    env = dict(os.environ, PYTHONPATH=str(hooks), AWS_EC2_METADATA_DISABLED="true")
    result = run_modelfs(
        "mount",
        "s3://bkt/m",
        str(mnt),
        "--endpoint-url",
        "http://s3-dns.test:9",
        "--anonymous",
        "--foreground",
        "--cache-dir",
        str(tmp_path / "c"),
        "--retry-deadline",
        "1",
        env=env,
        timeout=60,
    )
    _fails(result, 1, "s3://bkt/m", "timed out")
    assert not is_mounted(mnt)
