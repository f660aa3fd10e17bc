"""modelfs mounted for real over fake-gcs-server: tree, bytes, read-only, unmount."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from modelfs.mount import is_mounted, wait_for_exit
from modelfs.testing.fakegcs import FakeGCS
from modelfs.testing.faultproxy import fault_proxy
from modelfs.testing.mounts import daemon_pid, mounted, run_modelfs

from .conftest import MountFn

BLOCK = 64 * 1024
PREFIX = "models/llama"


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# Object name (below PREFIX) -> contents. A trailing '/' is a directory placeholder.
TREE: dict[str, bytes] = {
    "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}).encode(),
    "empty.bin": b"",
    "one.bin": b"\x7f",
    "block.bin": _data(BLOCK, 1),
    "block_plus_one.bin": _data(BLOCK + 1, 2),
    "multi.bin": _data(5 * BLOCK + 123, 3),
    "sub/deeper/model.safetensors": _data(12 * BLOCK + 7, 4),
    "sub/tokenizer.json": _data(3000, 5),
    "placeholder/": b"",
    "withplace/": b"",
    "withplace/file.txt": b"hello\n",
}
FILES = {name: data for name, data in TREE.items() if not name.endswith("/")}
DIRS = {"sub", "sub/deeper", "placeholder", "withplace"}
GCS_OPTIONS = ("--block-size", "64K", "--memory-cache", "1152K", "--disk-cache", "1M")


@pytest.fixture
def seeded(gcs: FakeGCS, bucket: str) -> str:
    for name, data in TREE.items():
        gcs.upload(bucket, f"{PREFIX}/{name}", data)
    # Neighbours that must not show up: a sibling prefix and an object beside the prefix.
    gcs.upload(bucket, "models/llama2/other.bin", b"not mine")
    gcs.upload(bucket, "models/readme.md", b"not mine either")
    return bucket


def _walk(root: Path) -> tuple[set[str], set[str]]:
    dirs: set[str] = set()
    files: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            dirs.add(os.path.normpath(os.path.join(rel, d)))
        for f in filenames:
            files.add(os.path.normpath(os.path.join(rel, f)))
    return dirs, files


def test_tree_and_bytes(seeded: str, mount: MountFn) -> None:
    mnt = mount(f"gs://{seeded}/{PREFIX}", *GCS_OPTIONS)
    dirs, files = _walk(mnt)
    assert dirs == DIRS
    assert files == set(FILES)
    for name, data in FILES.items():
        path = mnt / name
        assert path.stat().st_size == len(data), name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest(), name
    assert os.listdir(mnt / "placeholder") == []


def test_random_ranges(seeded: str, mount: MountFn) -> None:
    mnt = mount(f"gs://{seeded}/{PREFIX}", *GCS_OPTIONS)
    rng = random.Random(42)
    names = [n for n, d in FILES.items() if len(d) > 1]
    fds = {name: os.open(mnt / name, os.O_RDONLY) for name in names}
    try:
        for _ in range(200):
            name = rng.choice(names)
            data = FILES[name]
            offset = rng.randrange(0, len(data) + BLOCK // 2)  # some start past the end
            length = rng.choice([1, 17, 4096, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, rng.randrange(1, 4 * BLOCK)])
            got = os.pread(fds[name], length, offset)
            assert got == data[offset : offset + length], (name, offset, length)
    finally:
        for fd in fds.values():
            os.close(fd)


def test_remount_reads_from_disk_cache(seeded: str, gcs: FakeGCS, tmp_path: Path) -> None:
    """A second mount on the same cache dir serves every block from the disk cache."""
    source = f"gs://{seeded}/{PREFIX}"
    options = ("--anonymous", "--block-size", "64K", "--memory-cache", "1152K", "--disk-cache", "64M")
    cache = tmp_path / "cache"
    name = "sub/deeper/model.safetensors"
    with mounted(source, tmp_path / "mnt", cache, *options, env=gcs.env()) as mnt:
        assert (mnt / name).read_bytes() == FILES[name]
        first = json.loads(os.getxattr(mnt, "user.modelfs.stats"))
    assert first["backend_gets"] == 13  # 12 whole blocks and one of 7 bytes, each fetched once
    with mounted(source, tmp_path / "mnt", cache, *options, env=gcs.env()) as mnt:
        assert (mnt / name).read_bytes() == FILES[name]
        second = json.loads(os.getxattr(mnt, "user.modelfs.stats"))
    assert second["backend_gets"] == 0
    assert second["disk_hits"] == 13


def test_read_only(seeded: str, mount: MountFn) -> None:
    mnt = mount(f"gs://{seeded}/{PREFIX}", *GCS_OPTIONS)
    target = mnt / "config.json"
    attempts = {
        "open for writing": lambda: open(target, "r+b"),
        "create": lambda: os.open(mnt / "new.bin", os.O_CREAT | os.O_WRONLY, 0o644),
        "mkdir": lambda: os.mkdir(mnt / "newdir"),
        "unlink": lambda: os.unlink(target),
        "rmdir": lambda: os.rmdir(mnt / "placeholder"),
        "rename": lambda: os.rename(target, mnt / "renamed.json"),
        "chmod": lambda: os.chmod(target, 0o777),
        "truncate": lambda: os.truncate(target, 0),
        "symlink": lambda: os.symlink("config.json", mnt / "link"),
        "setxattr": lambda: os.setxattr(target, "user.x", b"1"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, what
    # Nothing changed.
    assert target.read_bytes() == FILES["config.json"]
    assert sorted(os.listdir(mnt)) == sorted({n.split("/")[0] for n in TREE})


def test_missing_file_is_enoent(seeded: str, mount: MountFn) -> None:
    mnt = mount(f"gs://{seeded}/{PREFIX}", *GCS_OPTIONS)
    with pytest.raises(FileNotFoundError):
        (mnt / "nope.bin").stat()
    with pytest.raises(NotADirectoryError):
        os.listdir(mnt / "config.json")


def test_unmount_leaves_nothing(seeded: str, gcs: FakeGCS, tmp_path: Path) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    result = run_modelfs(
        "mount",
        f"gs://{seeded}/{PREFIX}",
        str(mnt),
        "--anonymous",
        "--cache-dir",
        str(cache),
        *GCS_OPTIONS,
        env=gcs.env(),
    )
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt)
        pid = daemon_pid(cache)
        assert (mnt / "one.bin").read_bytes() == b"\x7f"
        result = run_modelfs("unmount", str(mnt), env=gcs.env())
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
        assert os.listdir(mnt) == []
        _wait_exit(pid)
    finally:
        if is_mounted(mnt):
            os.system(f"fusermount3 -uz {mnt}")


def _wait_exit(pid: int, timeout: float = 10.0) -> None:
    assert wait_for_exit(pid, timeout), f"daemon {pid} still running after unmount"


def test_single_object_source(seeded: str, mount: MountFn) -> None:
    """gs://bucket/path/file mounts a directory holding just that file."""
    mnt = mount(f"gs://{seeded}/{PREFIX}/multi.bin", *GCS_OPTIONS)
    assert os.listdir(mnt) == ["multi.bin"]
    assert (mnt / "multi.bin").read_bytes() == FILES["multi.bin"]


def test_prefix_with_nothing_is_an_error(seeded: str, gcs: FakeGCS, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run_modelfs(
        "mount",
        f"gs://{seeded}/models/no-such-model",
        str(mnt),
        "--anonymous",
        "--cache-dir",
        str(tmp_path / "c"),
        env=gcs.env(),
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"modelfs: nothing found at gs://{seeded}/models/no-such-model (no object with that name or prefix)"
    )
    assert not is_mounted(mnt)


def test_prefix_whose_first_page_outgrows_the_metadata_cache_mounts(bucket: str, gcs: FakeGCS, mount: MountFn) -> None:
    """A root whose first page is larger than --metadata-cache is not kept, but it is not
    "nothing found": the mount comes up and lists it page by page."""
    names = {f"shard-{i:04d}.bin" for i in range(300)}  # ~300 x 700 bytes: more than 64K
    for name in names:
        gcs.upload(bucket, f"big/{name}", b"x")
    mnt = mount(f"gs://{bucket}/big", *GCS_OPTIONS, "--metadata-cache", "64K")
    assert sorted(os.listdir(mnt)) == sorted(names)


def _stats(mnt: Path) -> dict[str, int]:
    stats: dict[str, int] = json.loads(os.getxattr(mnt, "user.modelfs.stats"))
    return stats


def test_lazy_namespace_pages_and_lookups(gcs: FakeGCS, bucket: str, mount: MountFn) -> None:
    """One directory is listed at a time: the mount lists only the root, a path in a directory
    never listed is found by name (no listing), and a directory of more entries than a page
    and than the whole metadata cache streams into readdir page by page, every entry once."""
    big = {f"big/f{i:04d}.txt": f"{i}\n".encode() for i in range(1200)}
    for name, data in {**big, "other/deep/x.bin": b"x" * 1000, "top.json": b"{}"}.items():
        gcs.upload(bucket, f"lazy/{name}", data)
    mnt = mount(f"gs://{bucket}/lazy", "--metadata-cache", "128K")
    stats = _stats(mnt)
    assert stats["listing_pages"] == 1 and stats["cached_dirs"] == 1
    assert (mnt / "other" / "deep" / "x.bin").read_bytes() == b"x" * 1000  # never listed: found by name
    stats = _stats(mnt)
    assert stats["listing_pages"] == 1 and stats["name_lookups"] == 2  # "deep" and "x.bin"; the root has "other"
    names = os.listdir(mnt / "big")
    assert sorted(names) == sorted(name.split("/")[1] for name in big) and len(names) == len(set(names))
    stats = _stats(mnt)
    assert stats["listing_pages"] >= 3  # the emulator's pages are 1,000 entries at most
    assert stats["metadata_bytes"] <= stats["metadata_capacity"] == 128 << 10
    assert stats["dir_handles"] == 0
    for i in (0, 999, 1000, 1199):
        assert (mnt / "big" / f"f{i:04d}.txt").read_bytes() == f"{i}\n".encode()
    assert not (mnt / "big" / "f1200.txt").exists()


@pytest.mark.parametrize("get_size", ["256K", "64K"])
def test_sequential_read_ahead_joins_blocks_into_larger_gets(
    gcs: FakeGCS, bucket: str, tmp_path: Path, get_size: str
) -> None:
    """A sequential read on GCS: read-ahead GETs join neighbouring blocks (up to
    --prefetch-get-size), every byte is fetched once and right, each block is cached on its
    own (a remount reads them all from the disk cache); the block size turns joining off."""
    data = _data(40 * BLOCK + 5, 77)
    gcs.upload(bucket, "j/weights.bin", data)
    options = ("--anonymous", "--block-size", "64K", "--memory-cache", "4M", "--disk-cache", "64M")
    # The proportions of the defaults (8M blocks, 32M GETs, 1M kernel read-ahead), in 64K blocks.
    options += ("--prefetch-get-size", get_size, "--read-ahead-kb", "64")
    cache = tmp_path / "cache"
    with mounted(f"gs://{bucket}/j", tmp_path / "mnt", cache, *options, env=gcs.env()) as mnt:
        with open(mnt / "weights.bin", "rb", buffering=0) as f:
            got = b"".join(iter(lambda: f.read(BLOCK // 2), b""))
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        stats = _stats(mnt)
        # (Disk writes still queued at the unmount are done before the daemon exits.)
    assert stats["backend_bytes"] == len(data)  # each byte once
    if get_size == "64K":
        assert stats["joined_gets"] == 0 and stats["backend_gets"] == 41
    else:
        assert stats["joined_gets"] >= 5 and stats["backend_gets"] <= 20, stats
    with mounted(f"gs://{bucket}/j", tmp_path / "mnt", cache, *options, env=gcs.env()) as mnt:
        # Whole blocks, each from its own file in the disk cache.
        assert hashlib.sha256((mnt / "weights.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
        stats = _stats(mnt)
        assert stats["backend_gets"] == 0 and stats["disk_hits"] == 41, stats
        rng = random.Random(5)
        with open(mnt / "weights.bin", "rb", buffering=0) as f:
            for _ in range(50):
                offset = rng.randrange(len(data))
                f.seek(offset)
                assert f.read(3000) == data[offset : offset + 3000]


def test_billing_project_is_sent_with_every_request(gcs: FakeGCS, bucket: str, tmp_path: Path) -> None:
    """--billing-project (Requester Pays): every listing, stat and media GET names the project."""
    data = _data(5 * BLOCK + 9, 31)
    gcs.upload(bucket, "rp/sub/w.bin", data)
    options = ("--anonymous", "--block-size", "64K", "--billing-project", "my-proj-123", "--metadata-ttl", "0")
    with fault_proxy(gcs.url, rate=0.0) as proxy:
        env = dict(os.environ, STORAGE_EMULATOR_HOST=proxy.url)
        with mounted(f"gs://{bucket}/rp", tmp_path / "mnt", tmp_path / "cache", *options, env=env) as mnt:
            assert os.listdir(mnt) == ["sub"]
            assert hashlib.sha256((mnt / "sub" / "w.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
            paths = list(proxy.paths)
    assert any("alt=media" in p for p in paths) and any("/o?" in p for p in paths), paths
    missing = [p for p in paths if "userProject=my-proj-123" not in p]
    assert missing == [], missing


@pytest.mark.parametrize(
    ("source", "value", "error"),
    [
        ("s3://bkt/p", "my-proj", "applies to gs://"),
        ("gs://bkt/p", "My Project", "not a Google Cloud project"),
        ("gs://bkt/p", "x" * 100, "not a Google Cloud project"),
    ],
)
def test_billing_project_mistakes_are_one_line_errors(tmp_path: Path, source: str, value: str, error: str) -> None:
    (tmp_path / "mnt").mkdir()
    result = run_modelfs(
        "mount", source, str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "c"), "--billing-project", value
    )
    assert result.returncode != 0 and error in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
