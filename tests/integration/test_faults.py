"""Never a wrong byte: real mounts under injected faults, overwrites, corruption and crashes.

Every test mounts modelfs as a subprocess over fake-gcs-server, in most of them through the
fault-injecting proxy of :mod:`modelfs.testing.faultproxy`, and checks the bytes it reads
against what was uploaded. Reads go around the kernel's page cache (POSIX_FADV_DONTNEED before
a read, POSIX_FADV_RANDOM against kernel read-ahead) so that they really reach the daemon.
There are no timing assertions: waits are bounded polls, and reads that must fail run in a
thread with a generous timeout so a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelfs.mount import is_mounted
from modelfs.names import parse_object_name
from modelfs.testing.fakegcs import FakeGCS
from modelfs.testing.faultproxy import FAULT_KINDS, FaultProxy, fault_proxy
from modelfs.testing.mounts import daemon_pid, force_unmount, mounted, run_modelfs
from modelfs.testing.nginx import Nginx

from .conftest import MountFn, wait_for

BLOCK = 64 * 1024
# Small blocks and caches so that a few MB of data mean many GETs and much eviction.
BASE = ("--block-size", "64K", "--read-timeout", "1", "--log-level", "info")


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stats(mnt: Path) -> dict[str, int]:
    return json.loads(os.getxattr(mnt, "user.modelfs.stats"))


def _pread_uncached(fd: int, length: int, offset: int) -> bytes:
    """pread that reaches the daemon: drop the kernel's cached pages of the range first."""
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    return os.pread(fd, length, offset)


def _read_whole(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _in_thread(fn: Callable[[], object], timeout: float = 90.0) -> object:
    """Run ``fn`` in a thread; its exception is re-raised here; a hang fails the test."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(fn)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise AssertionError(f"read still blocked after {timeout}s: it must fail, not hang") from None


def _no_traceback(cache_dir: Path) -> str:
    log = (cache_dir / "modelfs.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
    return log


@pytest.fixture
def proxy(gcs: FakeGCS) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's fake-gcs-server, faults off until configured."""
    with fault_proxy(gcs.url, rate=0.0, seed=20240601, stall_seconds=3.0) as p:
        yield p


def _via(proxy: FaultProxy) -> dict[str, str]:
    return dict(os.environ, STORAGE_EMULATOR_HOST=proxy.url)


# --- retries: a flaky backend never yields a wrong byte


FAULT_FILES = {
    "weights/model-00001.safetensors": _data(16 * BLOCK + 123, 11),
    "weights/model-00002.safetensors": _data(24 * BLOCK + 7, 12),
    "tokenizer.json": _data(10 * BLOCK, 13),
}


def test_right_bytes_under_faults(gcs: FakeGCS, bucket: str, proxy: FaultProxy, mount: MountFn, tmp_path: Path) -> None:
    for name, data in FAULT_FILES.items():
        gcs.upload(bucket, f"m/{name}", data)
    cache = tmp_path / "cache"
    # No disk cache and 8 blocks of memory: re-reads go back to the backend.
    mnt = mount(
        f"gs://{bucket}/m",
        *BASE,
        "--memory-cache",
        "1536K",
        "--disk-cache",
        "0",
        "--retry-deadline",
        "15",
        "--metadata-ttl",
        "0",  # every listing is stale at once: no test waits for a TTL to pass
        cache_dir=cache,
        env=_via(proxy),
    )
    for kind in FAULT_KINDS:  # every kind at least once, whatever the dice say
        proxy.force(kind)
    # A stall far longer than --read-timeout: only the client's timeout ends it in time.
    proxy.configure(rate=0.2, stall_seconds=60)

    for name, data in FAULT_FILES.items():
        assert _sha(_read_whole(mnt / name)) == _sha(data), name

    # Random ranges from four threads at once, each read fetched anew by the daemon.
    names = sorted(FAULT_FILES)
    errors: list[str] = []

    def ranges(seed: int) -> None:
        rng = random.Random(seed)
        fds = {name: os.open(mnt / name, os.O_RDONLY) for name in names}
        try:
            for f in fds.values():
                os.posix_fadvise(f, 0, 0, os.POSIX_FADV_RANDOM)
            for _ in range(30):
                name = rng.choice(names)
                data = FAULT_FILES[name]
                offset = rng.randrange(0, len(data))
                length = rng.choice([1, 4096, BLOCK - 1, BLOCK + 1, 2 * BLOCK, rng.randrange(1, 3 * BLOCK)])
                got = _pread_uncached(fds[name], length, offset)
                if _sha(got) != _sha(data[offset : offset + length]):
                    exp = data[offset : offset + length]
                    diff = next((i for i, (a, b) in enumerate(zip(got, exp, strict=False)) if a != b), None)
                    errors.append(f"{name} [{offset}, +{length}]: wrong bytes (got {len(got)}, first diff {diff})")
        except OSError as exc:
            errors.append(f"read failed: {exc}")
        finally:
            for f in fds.values():
                os.close(f)

    threads = [threading.Thread(target=ranges, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads), "a reader hung"
    assert errors == []

    media_faults = proxy.counters()["faults"]
    stats = _stats(mnt)
    # Every injected fault failed one GET attempt, and each was retried (none became EIO).
    assert stats["retries"] >= media_faults, (stats, proxy.counters())
    assert stats["errors"] == 0, stats

    # Listings go through the faults too: the tree is still right after the TTL.
    listings_before = proxy.counters()["requests"] - proxy.counters()["media_requests"]
    proxy.configure(fault_listings=True)
    for kind in ("503", "truncate", "reset_mid_body"):  # the next listing fails three times
        proxy.force(kind)
    refreshes_before = _stats(mnt)["dir_refreshes"]
    # Past the TTL (0), so the walk lists again. Stale-while-revalidate: the walk is answered
    # from the listings at once, and the directories are listed again behind it, through the
    # faults (three failures, retried).
    found = {os.path.relpath(os.path.join(d, f), mnt) for d, _, fs in os.walk(mnt) for f in fs}
    assert found == set(FAULT_FILES)
    wait_for("the listings to be refreshed", lambda: _stats(mnt)["dir_refreshes"] > refreshes_before)
    proxy.configure(rate=0.0)
    assert proxy.counters()["requests"] - proxy.counters()["media_requests"] >= listings_before + 4
    found = {os.path.relpath(os.path.join(d, f), mnt) for d, _, fs in os.walk(mnt) for f in fs}
    assert found == set(FAULT_FILES)

    counts = proxy.counters()
    assert all(n >= 1 for n in proxy.faults_by_kind().values()), counts
    assert counts["media_requests"] >= 100, counts  # 120 ranged reads and 3 whole files
    assert counts["faults"] >= 0.1 * counts["media_requests"], counts
    # Every stall was abandoned by the client (its read timeout), not ended by the proxy.
    wait_for(
        "stalled connections to be closed by the client",
        lambda: proxy.counters()["stall_client_gave_up"] == proxy.counters()["fault_stall"],
    )
    assert _stats(mnt)["errors"] == 0
    _no_traceback(cache)


def test_backend_down_then_back(gcs: FakeGCS, bucket: str, proxy: FaultProxy, mount: MountFn, tmp_path: Path) -> None:
    cached, uncached = _data(20 * BLOCK + 99, 21), _data(5 * BLOCK + 1, 22)
    gcs.upload(bucket, "m/cached.bin", cached)
    gcs.upload(bucket, "m/uncached.bin", uncached)
    cache = tmp_path / "cache"
    mnt = mount(
        f"gs://{bucket}/m",
        *BASE,
        "--memory-cache",
        "1152K",
        "--disk-cache",
        "4M",
        "--retry-deadline",
        "3",
        "--metadata-ttl",
        "0",  # every listing is stale at once: no test waits for a TTL to pass
        cache_dir=cache,
        env=_via(proxy),
    )
    assert _read_whole(mnt / "cached.bin") == cached  # into the disk cache (memory holds only 18 blocks)
    (mnt / "uncached.bin").stat()

    proxy.down = True
    try:
        # Past the TTL (0): the listing cannot be refreshed now.
        # Cached blocks are still served, from memory or disk, under the last listing.
        assert _in_thread(lambda: _read_whole(mnt / "cached.bin")) == cached
        # An uncached block fails with EIO once the retry deadline is spent; it does not hang.
        with pytest.raises(OSError) as info:
            _in_thread(lambda: _read_whole(mnt / "uncached.bin"))
        assert info.value.errno == errno.EIO
        assert proxy.counters()["refused_down"] >= 1
        assert is_mounted(mnt) and _stats(mnt)["errors"] >= 1
        # The lookups past the TTL were answered from the stale listing at once; its refresh,
        # behind them, gives up after the retry deadline and keeps it.
        wait_for("the listing refresh to give up", lambda: _stats(mnt)["dir_refresh_failures"] >= 1)
        assert (mnt / "cached.bin").stat().st_size == len(cached)
    finally:
        proxy.down = False
    # Back: the same read succeeds, with the right bytes.
    assert _in_thread(lambda: _read_whole(mnt / "uncached.bin")) == uncached
    log = _no_traceback(cache)
    assert "serving the last listing" in log


def test_a_read_the_backend_keeps_failing_waits_one_retry_deadline(
    gcs: FakeGCS, bucket: str, proxy: FaultProxy, mount: MountFn
) -> None:
    """The kernel reads a page again at once when its read-ahead read failed: `cat` of a file
    whose server kept failing waited for two whole --retry-deadlines (7.4 s at 4 s), retrying
    all the way twice. That second read of the handle now gets the first one's error at once."""
    data = _data(1 << 20, 31)  # one block: no read-ahead GETs of other blocks
    gcs.upload(bucket, "m/one.bin", data)
    mnt = mount(f"gs://{bucket}/m", "--block-size", "4M", "--retry-deadline", "2", "--disk-cache", "0", env=_via(proxy))
    assert (mnt / "one.bin").stat().st_size == len(data)
    proxy.down = True
    try:
        with pytest.raises(OSError) as info:
            _in_thread(lambda: _read_whole(mnt / "one.bin"))
        assert info.value.errno == errno.EIO
        stats = _stats(mnt)
        assert stats["retries_gave_up"] == 1, stats
    finally:
        proxy.down = False
    # Once the server is back, the same read (another open) succeeds at once.
    assert _in_thread(lambda: _read_whole(mnt / "one.bin")) == data


# --- pinned versions: an overwrite or a delete never mixes versions


def test_overwrite_while_open_is_estale(gcs: FakeGCS, bucket: str, mount: MountFn) -> None:
    old, new = _data(8 * BLOCK, 31), _data(6 * BLOCK + 5, 32)
    gcs.upload(bucket, "m/w.bin", old)
    gcs.upload(bucket, "m/other.bin", b"x")
    mnt = mount(
        f"gs://{bucket}/m",
        *BASE,
        "--memory-cache",
        "1152K",
        "--disk-cache",
        "0",
        "--max-prefetch",
        "0",
        "--metadata-ttl",
        "0",  # every listing is stale at once: no test waits for a TTL to pass
    )
    fd = os.open(mnt / "w.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(fd, 100, 0) == old[:100]
        gcs.upload(bucket, "m/w.bin", new)

        # The handle is pinned to the old generation: an uncached block fails, never new bytes.
        for offset in (3 * BLOCK, 5 * BLOCK + 17, 0):
            try:
                got = _pread_uncached(fd, 1000, offset)
            except OSError as exc:
                assert exc.errno == errno.ESTALE, exc
            else:
                assert offset == 0 and got == old[:1000], "read bytes that are not the old version's"
        with pytest.raises(OSError) as info:
            _pread_uncached(fd, 1000, 7 * BLOCK)
        assert info.value.errno == errno.ESTALE

        # Past the TTL (0): the first lookup is answered stale and lists the directory behind it.
        wait_for("the new version to be listed", lambda: (mnt / "w.bin").stat().st_size == len(new))
        assert _read_whole(mnt / "w.bin") == new
        # The old handle still sees only the old version: the new version's pages, now in
        # the kernel's cache, are not its pages.
        for offset in (0, BLOCK, 5 * BLOCK):
            try:
                got = os.pread(fd, 1000, offset)
            except OSError as exc:
                assert exc.errno == errno.ESTALE, exc
            else:
                assert got == old[offset : offset + 1000], f"old handle read new bytes at {offset}"
    finally:
        os.close(fd)


def test_delete_while_open_is_estale_then_enoent(gcs: FakeGCS, bucket: str, mount: MountFn) -> None:
    data = _data(4 * BLOCK, 41)
    gcs.upload(bucket, "m/gone.bin", data)
    gcs.upload(bucket, "m/stays.bin", b"y")
    mnt = mount(
        f"gs://{bucket}/m",
        *BASE,
        "--memory-cache",
        "1152K",
        "--disk-cache",
        "0",
        "--max-prefetch",
        "0",
        "--metadata-ttl",
        "0",  # every listing is stale at once: no test waits for a TTL to pass
    )
    fd = os.open(mnt / "gone.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(fd, 10, 0) == data[:10]
        gcs.delete(bucket, "m/gone.bin")
        with pytest.raises(OSError) as info:
            _pread_uncached(fd, 1000, 3 * BLOCK)
        assert info.value.errno == errno.ESTALE
        # Past the TTL (0): the first lookup is answered stale and lists the directory behind it.
        wait_for("the deletion to be listed", lambda: not (mnt / "gone.bin").exists())
        with pytest.raises(FileNotFoundError):
            (mnt / "gone.bin").stat()
        wait_for("the deletion to reach readdir", lambda: sorted(os.listdir(mnt)) == ["stays.bin"])
    finally:
        os.close(fd)


# --- the disk cache: checked on every read, and it survives kill -9


def _block_files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "blocks").glob("*/*") if not p.name.endswith(".tmp"))


def test_corrupt_disk_block_is_refetched(gcs: FakeGCS, bucket: str, mount: MountFn, tmp_path: Path) -> None:
    data = _data(6 * BLOCK + 10, 51)
    gcs.upload(bucket, "m/c.bin", data)
    cache = tmp_path / "cache"
    options = (*BASE, "--memory-cache", "1152K", "--disk-cache", "8M")
    mnt = mount(f"gs://{bucket}/m", *options, cache_dir=cache)
    assert _read_whole(mnt / "c.bin") == data
    wait_for("disk writes", lambda: _stats(mnt)["disk_writes"] == 7)
    run_modelfs("unmount", str(mnt), env=gcs.env())
    wait_for("the daemon to exit", lambda: not is_mounted(mnt))

    files = _block_files(cache)
    assert len(files) == 7
    flipped = next(p for p in files if p.name.endswith("-2"))
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) - 1000] ^= 0x01  # a data byte (the data is the file's last 64 KiB)
    flipped.write_bytes(raw)
    short = next(p for p in files if p.name.endswith("-4"))
    os.truncate(short, short.stat().st_size - 1)

    mnt = mount(f"gs://{bucket}/m", *options, cache_dir=cache, mountpoint=tmp_path / "mnt-again")
    assert _read_whole(mnt / "c.bin") == data
    stats = _stats(mnt)
    assert stats["disk_corrupt"] == 2, stats
    assert stats["backend_gets"] == 2, stats  # exactly the two bad blocks, fetched again
    assert stats["disk_hits"] == 5, stats
    log = _no_traceback(cache)
    assert "disk cache block 2 of gs://" in log and "CRC32C mismatch" in log, log[-2000:]
    assert "disk cache block 4 of gs://" in log, log[-2000:]
    # The good copies are written back.
    wait_for("disk writes", lambda: _stats(mnt)["disk_writes"] == 2)


def _wait_dead(pid: int) -> None:
    def dead() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        except OSError:
            return True

    wait_for(f"pid {pid} to die", dead)


def test_kill_9_mid_read_then_remount_warm(gcs: FakeGCS, bucket: str, tmp_path: Path) -> None:
    data = _data(16 * BLOCK, 61)
    gcs.upload(bucket, "m/k.bin", data)
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    source = f"gs://{bucket}/m"
    options = ("--anonymous", "--cache-dir", str(cache), *BASE, "--memory-cache", "1152K", "--disk-cache", "8M")
    pids: list[int] = []
    try:
        result = run_modelfs("mount", source, str(mnt), *options, env=gcs.env())
        assert result.returncode == 0, result.stderr
        pids.append(daemon_pid(cache))
        half = 8 * BLOCK
        fd = os.open(mnt / "k.bin", os.O_RDONLY)
        try:
            got = b""
            while len(got) < half:
                got += os.read(fd, min(BLOCK, half - len(got)))
            assert got == data[:half]
            # Every block fetched so far (the half and some read-ahead) reached the disk.
            wait_for(
                "disk writes",
                lambda: (
                    _stats(mnt)["disk_writes"] >= 8
                    and _stats(mnt)["disk_writes"] * BLOCK == _stats(mnt)["backend_bytes"]
                ),  # (GETs may join blocks)
            )
            os.kill(pids[0], signal.SIGKILL)  # the reader still holds the file open, mid-file
            _wait_dead(pids[0])
            with pytest.raises(OSError) as info:
                _pread_uncached(fd, BLOCK, half + 4 * BLOCK)
            assert info.value.errno == errno.ENOTCONN
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        with pytest.raises(OSError) as info:
            os.listdir(mnt)
        assert info.value.errno == errno.ENOTCONN  # a dead mount

        # Mount again on the dead mount, with the same cache dir: it is cleaned up and mounted.
        result = run_modelfs("mount", source, str(mnt), *options, "--max-prefetch", "0", env=gcs.env())
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        pids.append(daemon_pid(cache))
        fd = os.open(mnt / "k.bin", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead past the half
            got = b"".join(os.pread(fd, BLOCK, off) for off in range(0, half, BLOCK))
        finally:
            os.close(fd)
        assert got == data[:half]
        stats = _stats(mnt)
        assert stats["backend_gets"] == 0 and stats["disk_hits"] >= 8, stats
        assert _read_whole(mnt / "k.bin") == data  # and the rest comes from the backend
        _no_traceback(cache)

        # `modelfs unmount` works on a dead mount too.
        os.kill(pids[1], signal.SIGKILL)
        _wait_dead(pids[1])
        result = run_modelfs("unmount", str(mnt), env=gcs.env())
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
        assert os.listdir(mnt) == []
    finally:
        force_unmount(mnt)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- hostile object names


HOSTILE_VALID = {
    "ok.bin": _data(3 * BLOCK + 5, 71),
    "dir/good.bin": b"good\n",
    "v" * 255: b"longest allowed component\n",
    "sp ace \u00fc\u00f1\u00ee.txt": b"unicode\n",
    "a/b": b"under a\n",
    "dots/..x/.y": b"dots that are not . or ..\n",
}
HOSTILE_SKIPPED = ["e//b", "./x", "x2/../y", "c" * 300, "nul\0x", "/lead", "t/.", "z/..", "dots/./in"]
# Directories are listed one at a time: the warning names the object, or the first prefix
# that cannot be a path (everything below it is left out); the directory above such a
# prefix is shown, empty.
HOSTILE_WARNED = {
    "e//b": "objects below 'e//'",
    "./x": "objects below './'",
    "x2/../y": "objects below 'x2/../'",
    "/lead": "objects below '/'",
    "dots/./in": "objects below 'dots/./'",
}
HOSTILE_EMPTY_DIRS = {"e", "x2", "t", "z"}
# An object beside a prefix of the same name: the directory wins, the object is hidden.
HOSTILE_HIDDEN = {"a": b"a file named like a directory\n"}


def test_hostile_names(gcs: FakeGCS, bucket: str, mount: MountFn, tmp_path: Path) -> None:
    for name, data in {**HOSTILE_VALID, **HOSTILE_HIDDEN}.items():
        gcs.upload(bucket, f"h/{name}", data)
    for name in HOSTILE_SKIPPED:
        gcs.upload(bucket, f"h/{name}", b"never shown")
    for name in HOSTILE_SKIPPED:  # the rule of modelfs/names.py, as documented
        assert isinstance(parse_object_name(name), str), name
    cache = tmp_path / "cache"
    mnt = mount(f"gs://{bucket}/h", *BASE, "--metadata-ttl", "0", cache_dir=cache)  # every listing stale at once

    def walk() -> tuple[set[str], set[str]]:
        dirs, files = set(), set()
        for dirpath, dirnames, filenames in os.walk(mnt):
            rel = os.path.relpath(dirpath, mnt)
            dirs |= {os.path.normpath(os.path.join(rel, d)) for d in dirnames}
            files |= {os.path.normpath(os.path.join(rel, f)) for f in filenames}
        return dirs, files

    for _ in range(2):  # a second listing after the TTL: same tree, and no second warning
        dirs, files = walk()
        assert files == set(HOSTILE_VALID)
        assert dirs == {"a", "dir", "dots", "dots/..x"} | HOSTILE_EMPTY_DIRS
        assert all(os.listdir(mnt / d) == [] for d in HOSTILE_EMPTY_DIRS)
        for name, data in HOSTILE_VALID.items():
            assert (mnt / name).read_bytes() == data, name
        assert (mnt / "a").is_dir()
        for missing in ("x", "y", "lead", "nul"):
            assert not (mnt / missing).exists(), missing
        with pytest.raises(FileNotFoundError):  # FUSE passes names up to 1024 bytes; not ours
            (mnt / ("c" * 300)).stat()
        # Past the TTL (0): wait until the directories were listed again before the next walk.
        refreshed = _stats(mnt)["dir_refreshes"]
        wait_for(
            "the directories to be listed again",
            lambda refreshed=refreshed: bool(os.listdir(mnt)) and _stats(mnt)["dir_refreshes"] > refreshed,
        )

    stats = _stats(mnt)  # the daemon is up and answering
    assert stats["files"] == len(HOSTILE_VALID)
    log = _no_traceback(cache)
    for name in [*HOSTILE_SKIPPED, *HOSTILE_HIDDEN]:
        said = HOSTILE_WARNED.get(name, f"object {name!r}")
        assert log.count(f"{said} are not shown" if name in HOSTILE_WARNED else f"{said} is not shown") == 1, (
            name,
            log[-3000:],
        )


# --- many readers, one small budget


def test_concurrent_readers_small_budget(gcs: FakeGCS, bucket: str, mount: MountFn, tmp_path: Path) -> None:
    files = {f"f{i}.bin": _data(12 * BLOCK + 1000 * i, 80 + i) for i in range(4)}
    for name, data in files.items():
        gcs.upload(bucket, f"m/{name}", data)
    cache = tmp_path / "cache"
    mnt = mount(
        f"gs://{bucket}/m",
        *BASE,
        "--memory-cache",
        "1536K",
        "--disk-cache",
        "1M",
        "--max-concurrency",
        "4",
        cache_dir=cache,
    )
    names = sorted(files)
    errors: list[str] = []
    start = threading.Barrier(16)

    def reader(i: int) -> None:
        name = names[i % 4]  # four readers on each file
        data = files[name]
        rng = random.Random(i)
        try:
            fd = os.open(mnt / name, os.O_RDONLY)
            try:
                start.wait(30)
                if i % 2:
                    # Sequential, in odd sizes, each read past the page cache.
                    got, offset = [], 0
                    while offset < len(data):
                        n = rng.randrange(1, 3 * BLOCK)
                        got.append(_pread_uncached(fd, n, offset))
                        offset += n
                    if _sha(b"".join(got)) != _sha(data):
                        errors.append(f"reader {i}: {name} whole-file hash differs")
                else:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    for _ in range(25):
                        offset = rng.randrange(0, len(data))
                        n = rng.randrange(1, 2 * BLOCK)
                        if _pread_uncached(fd, n, offset) != data[offset : offset + n]:
                            errors.append(f"reader {i}: {name} [{offset}, +{n}] differs")
            finally:
                os.close(fd)
        except Exception as exc:  # reported below, with the others
            errors.append(f"reader {i}: {exc!r}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads), "a reader hung"
    assert errors == []
    stats = _stats(mnt)
    assert stats["memory_peak"] <= stats["memory_capacity"] == 1536 * 1024, stats
    assert stats["errors"] == 0, stats
    assert stats["memory_evictions"] > 0, stats  # the budget really was under pressure
    _no_traceback(cache)


# --- bad input: one line, no traceback


@pytest.mark.parametrize(
    "args",
    [
        ["mount", "gs://bkt/p", "/nonexistent-mnt", "--read-timeout", "0"],
        ["mount", "gs://bkt/p", "/nonexistent-mnt", "--retry-deadline", "-1"],
        ["mount", "gs://bkt/p", "/nonexistent-mnt", "--retry-deadline", "soon"],
        ["mount", "gs://bkt/p", "/nonexistent-mnt", "--anonymous", "--retry-deadline", "1"],
        ["unmount", "/nonexistent-mnt"],
    ],
)
def test_bad_input_has_no_traceback(args: list[str], gcs: FakeGCS, tmp_path: Path) -> None:
    if args[0] == "mount":
        args = [*args, "--cache-dir", str(tmp_path / "c")]
    result = run_modelfs(*args, env=gcs.env())
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelfs: "), result.stderr


def test_http_source_right_bytes_under_faults(web: Nginx, tmp_path: Path) -> None:
    """An HTTP source's data GETs (http.client in worker threads) through the same faults:
    every one retried, every byte right, stalls ended by the client's read timeout."""
    top = f"faults-{os.getpid()}-{random.randrange(1 << 30)}"
    files = {"a.bin": _data(24 * BLOCK + 5, 21), "b.bin": _data(9 * BLOCK, 22)}
    for name, data in files.items():
        web.put(f"{top}/{name}", data)
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("".join(f"{name}\n" for name in files))
    cache = tmp_path / "cache"
    with fault_proxy(web.url(""), rate=0.0, seed=20261130, stall_seconds=60) as proxy:
        options = (*BASE, "--memory-cache", "1536K", "--disk-cache", "0", "--retry-deadline", "15")
        with mounted(f"{proxy.url}/{top}/", tmp_path / "mnt", cache, "--manifest", str(manifest), *options) as mnt:
            proxy.configure(fault_listings=True)  # (an nginx GET has no alt=media)
            for kind in FAULT_KINDS:  # every kind at least once, whatever the dice say
                proxy.force(kind)
            proxy.configure(rate=0.2)
            for name, data in files.items():
                assert _sha(_read_whole(mnt / name)) == _sha(data), name
            rng = random.Random(7)
            fd = os.open(mnt / "a.bin", os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                data = files["a.bin"]
                for _ in range(40):
                    offset = rng.randrange(len(data))
                    length = rng.choice([1, 4096, BLOCK + 1, rng.randrange(1, 3 * BLOCK)])
                    assert _pread_uncached(fd, length, offset) == data[offset : offset + length], (offset, length)
            finally:
                os.close(fd)
            proxy.configure(rate=0.0)
            stats = _stats(mnt)
            counts = proxy.counters()
            assert all(n >= 1 for n in proxy.faults_by_kind().values()), counts
            assert stats["retries"] >= counts["faults"] and stats["errors"] == 0, (stats, counts)
            wait_for(
                "stalled connections to be closed by the client",
                lambda: proxy.counters()["stall_client_gave_up"] == proxy.counters()["fault_stall"],
            )
    _no_traceback(cache)
