"""Issue 13's hardening, through real mounts: secrets out of the command line, a bounded stop.

Every test mounts modelfs as a subprocess, the way a user (or systemd, or a pod) starts it.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio

from modelfs.mount import is_mounted
from modelfs.testing.fakegcs import FakeGCS
from modelfs.testing.faultproxy import fault_proxy
from modelfs.testing.mounts import daemon_pid, force_unmount, mounted, run_modelfs
from modelfs.testing.nginx import TOKEN, Nginx

from .conftest import MountFn, wait_for

OPTIONS = ("--block-size", "64K", "--memory-cache", "2M", "--disk-cache", "8M")


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
        wait_for("the mount", lambda: is_mounted(mnt) or proc.poll() is not None)
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
            wait_for("the mount", lambda: is_mounted(mnt) or proc.poll() is not None)
            assert proc.poll() is None, log.read_text()
            proxy.force("stall", 1000)
            thread.start()
            wait_for("the stalled GET", lambda: proxy.counters().get("fault_stall", 0) > 0)
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
        # The request in flight is answered EIO; the kernel then retries the page once by
        # itself, and that retry, sent after the daemon stopped reading requests, fails as
        # the connection goes (ECONNABORTED, or ENOTCONN once it is gone).
        assert outcome.get("errno") in (errno.EIO, errno.ECONNABORTED, errno.ENOTCONN), outcome
        text = log.read_text()
        assert "failing them with EIO" in text
        # The GCS backend ends the GETs blocked in worker threads (abort): no watchdog needed.
        assert "detaching" not in text
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


# --- redirects: headers stay with the source's origin


class _Redirector(ThreadingHTTPServer):
    """Answers every GET and HEAD with a 302 to ``target`` + the request path's last part."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.seen_api_key: list[str | None] = []

        class Handler(BaseHTTPRequestHandler):
            def _redirect(self) -> None:
                server = self.server
                assert isinstance(server, _Redirector)
                server.seen_api_key.append(self.headers.get("X-Api-Key"))
                self.send_response(302)
                self.send_header("Location", server.target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _redirect  # noqa: N815 - http.server's names

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @contextmanager
    def running(self) -> Iterator[str]:
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{self.server_address[1]}"
        finally:
            self.shutdown()
            self.server_close()


def _fails_with(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    assert TOKEN not in result.stderr


def test_cross_origin_redirect_needs_the_option_and_drops_headers(web: Nginx, tmp_path: Path) -> None:
    top = f"r-{uuid.uuid4().hex[:10]}"
    data = os.urandom(150_000)
    web.put(f"noapikey/{top}/m.bin", data)  # nginx answers 403 to a request that carries X-Api-Key
    with _Redirector(web.url(f"noapikey/{top}/m.bin")).running() as origin:
        source = f"{origin}/m.bin"
        header = f"X-Api-Key: {TOKEN}"
        (tmp_path / "mnt0").mkdir()
        result = run_modelfs(
            "mount", source, str(tmp_path / "mnt0"), "--cache-dir", str(tmp_path / "c0"), "--header", header, *OPTIONS
        )
        force_unmount(tmp_path / "mnt0")
        _fails_with(result, "another origin", "--allow-cross-origin-redirects")
        with mounted(
            source,
            tmp_path / "mnt",
            tmp_path / "cache",
            "--header",
            header,
            "--allow-cross-origin-redirects",
            *OPTIONS,
        ) as mnt:
            assert (mnt / "m.bin").read_bytes() == data  # the redirected requests had no X-Api-Key


def test_same_origin_redirect_keeps_headers(web: Nginx, tmp_path: Path) -> None:
    top = f"r-{uuid.uuid4().hex[:10]}"
    data = os.urandom(150_000)
    web.put(f"private/{top}/m.bin", data)  # needs Authorization: Bearer TOKEN
    with mounted(
        web.url(f"same/{top}/m.bin", tls=True),
        tmp_path / "mnt",
        tmp_path / "cache",
        "--ca-cert",
        str(web.ca_cert),
        "--header",
        f"Authorization: Bearer {TOKEN}",
        *OPTIONS,
    ) as mnt:
        assert (mnt / "m.bin").read_bytes() == data


def test_https_to_http_redirect_is_refused(web: Nginx, tmp_path: Path) -> None:
    top = f"r-{uuid.uuid4().hex[:10]}"
    web.put(f"plain/{top}/m.bin", os.urandom(1000))
    (tmp_path / "mnt").mkdir()
    result = run_modelfs(
        "mount",
        web.url(f"downgrade/{top}/m.bin", tls=True),
        str(tmp_path / "mnt"),
        "--cache-dir",
        str(tmp_path / "c"),
        "--ca-cert",
        str(web.ca_cert),
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--allow-cross-origin-redirects",
        *OPTIONS,
    )
    force_unmount(tmp_path / "mnt")
    _fails_with(result, "https to plain http")


# --- weak versions: no block of theirs outlives the daemon


def _same_size_same_times(path: Path, new: bytes) -> None:
    """Rewrite ``path`` in place (same inode) with ``new`` (same size) and put its mtime back."""
    st = path.stat()
    assert len(new) == st.st_size
    with open(path, "r+b") as f:
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_ino == st.st_ino


def _stats(mnt: Path) -> dict[str, int]:
    return json.loads(os.getxattr(mnt, "user.modelfs.stats"))  # type: ignore[no-any-return]


def test_file_source_replaced_with_same_size_and_mtime_is_not_served_stale(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    old, new = os.urandom(300_000), os.urandom(300_000)
    (src / "m.bin").write_bytes(old)
    cache = tmp_path / "cache"
    with mounted(f"file://{src}", tmp_path / "mnt", cache, *OPTIONS) as mnt:
        assert (mnt / "m.bin").read_bytes() == old  # now in the disk cache
    _same_size_same_times(src / "m.bin", new)
    with mounted(f"file://{src}", tmp_path / "mnt", cache, *OPTIONS) as mnt:
        assert (mnt / "m.bin").read_bytes() == new
    # Opted in, the blocks are reused by the next daemon.
    with mounted(f"file://{src}", tmp_path / "mnt", cache, "--persist-weak-versions", *OPTIONS) as mnt:
        assert (mnt / "m.bin").read_bytes() == new
    with mounted(f"file://{src}", tmp_path / "mnt", cache, "--persist-weak-versions", *OPTIONS) as mnt:
        assert (mnt / "m.bin").read_bytes() == new
        assert _stats(mnt)["backend_gets"] == 0


def test_http_file_without_etag_replaced_is_not_served_stale(web: Nginx, tmp_path: Path) -> None:
    top = f"w-{uuid.uuid4().hex[:10]}"
    old, new = os.urandom(300_000), os.urandom(300_000)
    path = web.put(f"weak/{top}/m.bin", old)  # nginx sends no ETag here: size + Last-Modified
    source = web.url(f"weak/{top}/m.bin")
    cache = tmp_path / "cache"
    with mounted(source, tmp_path / "mnt", cache, *OPTIONS) as mnt:
        assert (mnt / "m.bin").read_bytes() == old
    _same_size_same_times(path, new)
    with mounted(source, tmp_path / "mnt", cache, *OPTIONS) as mnt:
        assert (mnt / "m.bin").read_bytes() == new


# --- index walks: bounded


def _symlink_loop(web: Nginx) -> str:
    """A directory whose two subdirectories are itself: nginx's autoindex has no end below it."""
    top = f"loop-{uuid.uuid4().hex[:10]}"
    root = web.root / top
    web.put(f"{top}/m.bin", b"x" * 1000)
    (root / "a").symlink_to(".")
    (root / "b").symlink_to(".")
    return top


async def test_index_walk_with_symlink_loops_is_bounded(web: Nginx, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelfs.backends import http
    from modelfs.backends.base import ListPage
    from modelfs.backends.retry import retry_transient
    from modelfs.config import parse_source
    from modelfs.errors import BackendError, TransientError
    from modelfs.walk import walk_objects

    monkeypatch.setattr(http, "MAX_INDEX_DIRS", 50)  # the shipped bound, 10,000, only takes longer
    backend = http.HTTPBackend(parse_source(web.url(_symlink_loop(web)) + "/"))
    try:
        with trio.fail_after(120):  # a hang fails the test instead of blocking it
            with pytest.raises(BackendError, match="more than 50 directories"):
                await backend.list_objects()  # 2^32 directories without the bound
            for _ in range(2):  # the streaming walk (warm, --eager-model): bounded per walk, every walk
                with pytest.raises(BackendError, match="more than 50 directories in one walk"):
                    async for _info in walk_objects(backend, retry_deadline=1):
                        pass
            # The mount lists what is looked up: one path down the loop ends at the depth bound.
            # (Retried as the mount retries: nginx answered one listing 500 once, under load;
            # a failure shows its error log.)
            prefix, depth = "", 0

            async def listed(prefix: str) -> ListPage:
                try:
                    return await retry_transient(lambda: backend.list_dir(prefix), deadline=10, what=prefix)
                except TransientError:
                    log = web.error_log.read_text(errors="replace").splitlines()
                    print("nginx error log:", *log[-10:], sep="\n")
                    raise

            while (page := await listed(prefix)).prefixes:
                assert [o.name for o in page.objects] == [prefix + "m.bin"]
                prefix, depth = page.prefixes[0], depth + 1
        assert depth == http._MAX_INDEX_DEPTH
    finally:
        await backend.aclose()


async def test_more_directories_than_a_walk_may_list_are_all_listable(
    web: Nginx, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk bound is per walk: a mount looking up directories one by one lists every one of
    them, however many the daemon has listed before (the bound was once per daemon)."""
    from modelfs.backends import http
    from modelfs.config import parse_source

    monkeypatch.setattr(http, "MAX_INDEX_DIRS", 5)
    top = f"wide-{uuid.uuid4().hex[:10]}"
    for i in range(12):
        web.put(f"{top}/d{i}/f.bin", bytes([i]) * 10)
    backend = http.HTTPBackend(parse_source(web.url(top) + "/"))
    try:
        for i in range(12):
            page = await backend.list_dir(f"d{i}/")
            assert [(o.name, o.size) for o in page.objects] == [(f"d{i}/f.bin", 10)]
    finally:
        await backend.aclose()


async def test_oversized_manifest_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelfs.backends import http, http_manifest
    from modelfs.config import parse_source
    from modelfs.errors import ConfigError

    manifest = tmp_path / "files.txt"
    manifest.write_text("".join(f"f{i}.bin\n" for i in range(30)))
    monkeypatch.setattr(http_manifest, "MAX_MANIFEST_ENTRIES", 20)
    backend = http.HTTPBackend(parse_source("http://127.0.0.1:9/models/"), manifest=manifest)
    try:
        with pytest.raises(ConfigError, match="more than 20 entries"):
            await backend.list_objects()
    finally:
        await backend.aclose()


# --- file://: nothing outside SOURCE through the mount, whatever its symlinks say


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """``argv`` run as an unprivileged user (nobody, no groups): a reader of an --allow-other mount."""
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users may enter (pytest's tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="modelfs-sec-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        force_unmount(path / "mnt")
        shutil.rmtree(path, ignore_errors=True)


def test_file_source_symlinks_never_lead_out_of_it(tmp_path: Path, shared_dir: Path) -> None:
    """The reviewer's repro: ``notes.txt -> <a root-only file>`` and ``data -> /`` in SOURCE,
    mounted by root with --allow-other. An unprivileged reader gets neither through the mount,
    while a file and a Hugging Face cache style symlink to a blob below SOURCE read whole."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"root-only " + os.urandom(32).hex().encode())
    secret.chmod(0o600)
    src = tmp_path / "src"
    (src / "blobs").mkdir(parents=True)
    (src / "snapshots" / "rev").mkdir(parents=True)
    weights, blob = os.urandom(200_000), os.urandom(150_000)
    (src / "model.safetensors").write_bytes(weights)
    (src / "blobs" / "b1").write_bytes(blob)
    (src / "snapshots" / "rev" / "config.bin").symlink_to("../../blobs/b1")
    (src / "notes.txt").symlink_to(secret)
    (src / "data").symlink_to("/")
    assert _as_nobody("cat", str(secret)).returncode != 0  # the file is not the reader's
    log = tmp_path / "modelfs.log"
    with mounted(
        f"file://{src}", shared_dir / "mnt", tmp_path / "cache", "--allow-other", "--log-file", str(log), *OPTIONS
    ) as mnt:
        listed = _as_nobody("ls", "-A", str(mnt))
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.decode().split() == ["blobs", "model.safetensors", "snapshots"]
        for name in ("notes.txt", "data/etc/shadow", "data/etc/passwd"):
            read = _as_nobody("cat", str(mnt / name))
            assert read.returncode != 0 and read.stdout == b"", name
            assert b"No such file" in read.stderr, read.stderr
        assert _as_nobody("ls", str(mnt / "data")).returncode != 0
        for name, data in (("model.safetensors", weights), ("snapshots/rev/config.bin", blob), ("blobs/b1", blob)):
            read = _as_nobody("sha256sum", str(mnt / name))
            assert read.returncode == 0, read.stderr
            assert read.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest(), name
    text = log.read_text()
    assert text.count("notes.txt' -> '") == 1 and "leads out of the source" in text, text
    assert text.count("data' -> '/'") == 1, text


def test_file_source_holding_its_own_mount_through_a_bind_mount_lists_it_once(tmp_path: Path) -> None:
    """SOURCE/view is a bind mount of the mountpoint's parent, so the mount lies inside its own
    source where no path check sees it (the config refuses only a mountpoint below SOURCE by
    path). The mount inside is left out with one warning: the walk ends, the rest reads whole."""
    src, parent, log = tmp_path / "src", tmp_path / "parent", tmp_path / "modelfs.log"
    (src / "view").mkdir(parents=True)
    weights = os.urandom(300_000)
    (src / "w.bin").write_bytes(weights)
    with mounted(f"file://{src}", parent / "mnt", tmp_path / "cache", "--log-file", str(log), *OPTIONS) as mnt:
        # (recursive: the copy holds the mount itself; unmounted first, or it would keep it alive)
        subprocess.run(["mount", "--rbind", str(parent), str(src / "view")], check=True, timeout=30)
        try:
            # (bounded: without the check it goes mnt/view/mnt/view/... as deep as it is asked)
            walk = subprocess.run(
                ["find", str(mnt), "-maxdepth", "4"], capture_output=True, text=True, timeout=120, check=False
            )
            assert walk.returncode == 0, walk.stderr
            assert sorted(walk.stdout.split()) == [str(mnt), str(mnt / "view"), str(mnt / "w.bin")]
            assert hashlib.sha256((mnt / "w.bin").read_bytes()).digest() == hashlib.sha256(weights).digest()
        finally:
            subprocess.run(["umount", "-R", str(src / "view")], check=False, timeout=60)
    text = log.read_text()
    assert text.count("is a modelfs mount (maybe this one): not shown") == 1, text
