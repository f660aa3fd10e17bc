"""modelfs mounted for real over every remote backend: the same checks for each.

Sources: one file over HTTP and over HTTPS (``--ca-cert``), a ``--manifest`` mount of several
files, an HTTPS JSON directory index, an S3 prefix on moto (``--endpoint-url``, signed with
the reader's keys), and a GCS prefix on fake-gcs-server. Each is checked for its tree,
whole-file sha256, random-range preads, and ESTALE when a file is replaced on the server while
it is open. Then the http-only behaviours: header values never logged, a server without Range
support and an untrusted certificate each fail the mount with a one-line message.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from modelfs.testing.fakegcs import FakeGCS
from modelfs.testing.mounts import daemon_pid, force_unmount, mounted, run_modelfs
from modelfs.testing.nginx import TOKEN, Nginx
from modelfs.testing.s3server import S3Server

BLOCK = 64 * 1024
OPTIONS = (
    "--block-size",
    "64K",
    "--memory-cache",
    "1536K",
    "--disk-cache",
    "8M",
    "--read-ahead-kb",
    "128",
    "--max-prefetch",
    "128K",
)
# No disk cache for the replacement test: nothing may fetch the file ahead of the reads it makes.
STALE_OPTIONS = (
    "--block-size",
    "64K",
    "--memory-cache",
    "1536K",
    "--disk-cache",
    "0",
    "--read-ahead-kb",
    "128",
    "--max-prefetch",
    "128K",
)
BIG = "m.safetensors"
BIG_BLOCKS = 24


def _safetensors(seed: int, nbytes: int) -> bytes:
    """A valid safetensors file of about ``nbytes``: two uint8 tensors of random bytes."""
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    tensors = {
        "a.weight": rng.integers(0, 256, size=(nbytes // 2 // 256, 256), dtype=np.uint8),
        "b.weight": rng.integers(0, 256, size=(nbytes // 2,), dtype=np.uint8),
    }
    return save(tensors)


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Remote:
    """One mounted-source kind: how to place files on its server and what to mount."""

    kind: str
    files: dict[str, bytes]  # what the mount must show
    put: Callable[[str, bytes], None]  # replace a file on the server
    source: str
    options: tuple[str, ...]
    env: dict[str, str] | None


def _big(seed: int) -> bytes:
    return _safetensors(seed, BIG_BLOCKS * BLOCK - 300)


MANY = {
    BIG: _big(1),
    "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
    "tokenizer/tokenizer.json": _data(3 * BLOCK + 17, 2),
    "one.bin": b"\x01",
    "empty.bin": b"",
}


@pytest.fixture(params=["http-file", "https-file", "http-manifest", "https-index", "s3", "gcs"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Remote:
    kind = request.param
    top = f"m-{uuid.uuid4().hex[:10]}"
    if kind.startswith("http"):
        web: Nginx = request.getfixturevalue("web")
        tls = kind.startswith("https")
        ca = ("--ca-cert", str(web.ca_cert)) if tls else ()

        def put(name: str, data: bytes) -> None:
            web.put(f"{top}/{name}", data)

        if kind.endswith("-file"):
            files = {BIG: MANY[BIG]}
            for name, data in files.items():
                put(name, data)
            put("neighbour.bin", b"a file beside the one mounted")
            return Remote(kind, files, put, web.url(f"{top}/{BIG}", tls=tls), ca, None)
        files = dict(MANY)
        for name, data in files.items():
            put(name, data)
        put("unlisted.bin", b"in the directory, not in the manifest")
        if kind.endswith("-manifest"):
            manifest = tmp_path / "files.txt"
            manifest.write_text(
                "".join(
                    f"{name} {len(data)}\n" if i % 2 else f"{name}\n" for i, (name, data) in enumerate(files.items())
                )
            )
            return Remote(kind, files, put, web.url(f"{top}/", tls=tls), (*ca, "--manifest", str(manifest)), None)
        files["unlisted.bin"] = b"in the directory, not in the manifest"
        return Remote(kind, files, put, web.url(f"{top}/", tls=tls), ca, None)
    if kind == "s3":
        s3: S3Server = request.getfixturevalue("s3")
        bucket = f"b-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(bucket)
        for name, data in MANY.items():
            s3.put(bucket, f"{top}/{name}", data)
        s3.put(bucket, f"{top}x/neighbour.bin", b"beside the prefix")
        return Remote(
            kind,
            dict(MANY),
            lambda name, data: s3.put(bucket, f"{top}/{name}", data) and None,
            f"s3://{bucket}/{top}",
            ("--endpoint-url", s3.url),
            s3.env(),
        )
    gcs: FakeGCS = request.getfixturevalue("gcs")
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    gcs.create_bucket(bucket)
    for name, data in MANY.items():
        gcs.upload(bucket, f"{top}/{name}", data)
    return Remote(
        kind,
        dict(MANY),
        lambda name, data: gcs.upload(bucket, f"{top}/{name}", data) and None,
        f"gs://{bucket}/{top}",
        ("--anonymous",),
        gcs.env(),
    )


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``mount(remote, *options)``: mounted until the test ends, however it ends."""
    with ExitStack() as stack:
        count = 0

        def do_mount(remote: Remote, *options: str) -> Path:
            nonlocal count
            count += 1
            mnt, cache = tmp_path / f"mnt{count}", tmp_path / f"cache{count}"
            stack.callback(force_unmount, mnt)
            return stack.enter_context(mounted(remote.source, mnt, cache, *remote.options, *options, env=remote.env))

        yield do_mount


def _files_below(root: Path) -> set[str]:
    out = set()
    for dirpath, _dirs, filenames in os.walk(root):
        for filename in filenames:
            out.add(os.path.relpath(os.path.join(dirpath, filename), root))
    return out


def test_tree_and_whole_file_hashes(remote: Remote, mount: Callable[..., Path]) -> None:
    mnt = mount(remote, *OPTIONS)
    assert _files_below(mnt) == set(remote.files)
    for name, data in remote.files.items():
        path = mnt / name
        assert path.stat().st_size == len(data), name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest(), name


def test_random_range_preads(remote: Remote, mount: Callable[..., Path]) -> None:
    mnt = mount(remote, *OPTIONS)
    rng = random.Random(11)
    names = [name for name, data in remote.files.items() if len(data) > 1]
    fds = {name: os.open(mnt / name, os.O_RDONLY) for name in names}
    try:
        for _ in range(150):
            name = rng.choice(names)
            data = remote.files[name]
            offset = rng.randrange(0, len(data) + BLOCK // 2)  # some past the end
            length = rng.choice([1, 4096, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, rng.randrange(1, 4 * BLOCK)])
            assert os.pread(fds[name], length, offset) == data[offset : offset + length], (name, offset, length)
    finally:
        for fd in fds.values():
            os.close(fd)


def test_safetensors_loads_through_the_mount(remote: Remote, mount: Callable[..., Path]) -> None:
    from safetensors import safe_open
    from safetensors.numpy import load

    mnt = mount(remote, *OPTIONS)

    expected = load(remote.files[BIG])
    with safe_open(str(mnt / BIG), framework="numpy") as f:  # mmap'd
        assert sorted(f.keys()) == sorted(expected)
        for key in f.keys():
            assert np.array_equal(f.get_tensor(key), expected[key]), key


def test_replaced_while_open_is_estale(remote: Remote, mount: Callable[..., Path]) -> None:
    mnt = mount(remote, *STALE_OPTIONS)
    old = remote.files[BIG]
    new = _big(99)
    assert len(new) == len(old) and new != old  # only the version tells them apart
    far = (BIG_BLOCKS - 4) * BLOCK
    fd = os.open(mnt / BIG, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == old[:4096]
        remote.put(BIG, new)
        with pytest.raises(OSError) as info:
            os.pread(fd, 4096, far)  # a block nothing fetched yet
        assert info.value.errno == errno.ESTALE, info.value
        assert os.pread(fd, 4096, 0) == old[:4096]  # still cached: the old version's bytes, never mixed
    finally:
        os.close(fd)


# --- http-only behaviours


def test_header_values_are_never_logged(web: Nginx, tmp_path: Path) -> None:
    top = f"p-{uuid.uuid4().hex[:10]}"
    data = _data(2 * BLOCK + 5, 3)
    web.put(f"private/{top}/weights.bin", data)
    headers = tmp_path / "headers"
    headers.write_text(f"Authorization: Bearer {TOKEN}\n")
    log = tmp_path / "modelfs.log"
    source = web.url(f"private/{top}/weights.bin", tls=True)
    cache = tmp_path / "cache"
    with mounted(
        source,
        tmp_path / "mnt",
        cache,
        "--ca-cert",
        str(web.ca_cert),
        "--header",
        f"@{headers}",
        "--log-level",
        "debug",
        "--log-file",
        str(log),
        *OPTIONS,
    ) as mnt:
        assert (mnt / "weights.bin").read_bytes() == data
        cmdline = Path(f"/proc/{daemon_pid(cache)}/cmdline").read_bytes()
        assert TOKEN.encode() not in cmdline  # @FILE keeps it out of the process list
    # Given on the command line, the daemon still gets it through its environment, not its argv.
    with mounted(
        source,
        tmp_path / "mnt",
        cache,
        "--ca-cert",
        str(web.ca_cert),
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--log-level",
        "debug",
        "--log-file",
        str(log),
        *OPTIONS,
    ) as mnt:
        assert (mnt / "weights.bin").read_bytes() == data
        cmdline = Path(f"/proc/{daemon_pid(cache)}/cmdline").read_bytes()
        assert TOKEN.encode() not in cmdline
    text = log.read_text()
    assert "weights.bin" in text or "mounted" in text  # the log is the daemon's, and it wrote
    assert TOKEN not in text
    # A refused token: the mount fails with one line that names the refusal, not the token.
    wrong = f"Authorization: Bearer wrong-{TOKEN}"
    (tmp_path / "mnt2").mkdir()
    result = run_modelfs(
        "mount",
        source,
        str(tmp_path / "mnt2"),
        "--cache-dir",
        str(tmp_path / "cache2"),
        "--ca-cert",
        str(web.ca_cert),
        "--header",
        wrong,
        "--log-file",
        str(tmp_path / "log2"),
    )
    force_unmount(tmp_path / "mnt2")
    assert result.returncode == 1, result.stderr
    assert "access denied (401)" in result.stderr
    assert TOKEN not in result.stderr + result.stdout + (tmp_path / "log2").read_text()
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_server_without_range_support_fails_clearly(web: Nginx, tmp_path: Path) -> None:
    top = f"n-{uuid.uuid4().hex[:10]}"
    web.put(f"noranges/{top}/m.bin", _data(3 * BLOCK, 4))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run_modelfs(
        "mount", web.url(f"noranges/{top}/m.bin"), str(mnt), "--cache-dir", str(tmp_path / "c"), *OPTIONS
    )
    force_unmount(mnt)
    assert result.returncode == 1
    assert "does not support Range requests" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert os.listdir(mnt) == []


def test_untrusted_certificate_fails_clearly(web: Nginx, tmp_path: Path) -> None:
    top = f"t-{uuid.uuid4().hex[:10]}"
    web.put(f"{top}/m.bin", b"x")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run_modelfs("mount", web.url(f"{top}/m.bin", tls=True), str(mnt), "--cache-dir", str(tmp_path / "c"))
    force_unmount(mnt)
    assert result.returncode == 1
    assert "TLS certificate verification failed" in result.stderr and "--ca-cert" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_manifest_entry_missing_on_the_server_fails_the_mount(web: Nginx, tmp_path: Path) -> None:
    top = f"x-{uuid.uuid4().hex[:10]}"
    web.put(f"{top}/here.bin", b"here")
    manifest = tmp_path / "files.txt"
    manifest.write_text("here.bin\nmissing.bin\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run_modelfs(
        "mount", web.url(f"{top}/"), str(mnt), "--cache-dir", str(tmp_path / "c"), "--manifest", str(manifest)
    )
    force_unmount(mnt)
    assert result.returncode == 1
    assert "missing.bin" in result.stderr and "not on the server" in result.stderr


def test_sequential_read_ahead_joins_blocks_where_the_store_can(remote: Remote, mount: Callable[..., Path]) -> None:
    """Read-ahead GETs join neighbouring blocks on every remote kind (one body into several
    block buffers); every byte comes once and right."""
    import json

    options = ("--block-size", "64K", "--memory-cache", "4M", "--disk-cache", "16M", "--read-ahead-kb", "64")
    mnt = mount(remote, *options, "--prefetch-get-size", "256K", "--no-eager")
    data = remote.files[BIG]
    with open(mnt / BIG, "rb", buffering=0) as f:
        got = b"".join(iter(lambda: f.read(BLOCK // 2), b""))
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    stats = json.loads(os.getxattr(mnt, "user.modelfs.stats"))
    assert stats["backend_bytes"] == len(data), stats  # each byte once
    assert stats["joined_gets"] >= 3 and stats["backend_gets"] <= BIG_BLOCKS // 2, stats


def test_payer_options_belong_to_their_store(remote: Remote, mount: Callable[..., Path], tmp_path: Path) -> None:
    """--requester-pays (S3) and --billing-project (GCS): the store they name mounts with it and
    reads right; any other source refuses it with one line."""
    option = {"s3": ("--requester-pays",), "gcs": ("--billing-project", "my-proj")}.get(remote.kind)
    if option is not None:
        mnt = mount(remote, *OPTIONS, *option)
        name = sorted(remote.files)[0]
        assert hashlib.sha256((mnt / name).read_bytes()).digest() == hashlib.sha256(remote.files[name]).digest()
    for other in (("--requester-pays",), ("--billing-project", "my-proj")):
        if other == option:
            continue
        (tmp_path / "refused").mkdir(exist_ok=True)
        result = run_modelfs(
            "mount",
            remote.source,
            str(tmp_path / "refused"),
            "--cache-dir",
            str(tmp_path / "c"),
            *remote.options,
            *other,
        )
        assert result.returncode != 0 and "applies to" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_an_s3_object_stored_gzip_encoded_reads_as_stored(s3: S3Server, tmp_path: Path) -> None:
    """S3 sends an object stored with Content-Encoding: gzip as stored (sizes and ranges are
    of those bytes): the file is those bytes, as `aws s3 cp` gives (before: every read EIO)."""
    import gzip

    bucket = f"b-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(bucket)
    stored = gzip.compress(os.urandom(50_000) + b"tokenizer" * 10_000)
    s3.client().put_object(Bucket=bucket, Key="m/tokenizer.json", Body=stored, ContentEncoding="gzip")
    options = ("--endpoint-url", s3.url, "--block-size", "64K")
    with mounted(f"s3://{bucket}/m", tmp_path / "mnt", tmp_path / "cache", *options, env=s3.env()) as mnt:
        assert (mnt / "tokenizer.json").stat().st_size == len(stored)
        assert hashlib.sha256((mnt / "tokenizer.json").read_bytes()).digest() == hashlib.sha256(stored).digest()
        with open(mnt / "tokenizer.json", "rb") as f:
            f.seek(70_000)
            assert f.read(1000) == stored[70_000:71_000]
