"""The cgroup memory limit (v1 and v2 layouts), --memory-cache auto and the refusal to start."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from modelfs import memlimit
from modelfs.config import add_options, build_config
from modelfs.errors import ConfigError
from modelfs.memlimit import AUTO_HEADROOM, FIXED_OVERHEAD, auto_budget, cgroup_memory_limit, fuse_tasks

MiB = 1 << 20
V1_UNLIMITED = "9223372036854771712"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v1_limit_of_own_cgroup_and_ancestors(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    write(proc, "12:pids:/\n4:memory:/pods/pod1/ctr\n1:cpu,cpuacct:/\n0::/\n")
    root = tmp_path / "fs"
    write(root / "memory/memory.limit_in_bytes", V1_UNLIMITED)
    write(root / "memory/pods/memory.limit_in_bytes", str(512 * MiB))
    write(root / "memory/pods/pod1/ctr/memory.limit_in_bytes", str(192 * MiB))
    assert cgroup_memory_limit(str(proc), str(root)) == 192 * MiB
    write(root / "memory/pods/pod1/ctr/memory.limit_in_bytes", V1_UNLIMITED)
    assert cgroup_memory_limit(str(proc), str(root)) == 512 * MiB  # the parent's limit binds


def test_v1_inside_a_container_reads_the_mounted_root(tmp_path: Path) -> None:
    """The host path in /proc/self/cgroup is not visible; the container's cgroup is the root."""
    proc = tmp_path / "cgroup"
    write(proc, "4:memory:/machine.slice/libpod-abc.scope\n")
    write(tmp_path / "fs/memory/memory.limit_in_bytes", str(300 * MiB))
    assert cgroup_memory_limit(str(proc), str(tmp_path / "fs")) == 300 * MiB


def test_v1_child_of_a_container_cgroup(tmp_path: Path) -> None:
    """podman on v1 mounts the container's own cgroup at /sys/fs/cgroup/memory: a child group
    made inside the container is found below the mount's root, its limit and the root's count."""
    root = tmp_path / "fs"
    proc = tmp_path / "cgroup"
    write(proc, "4:memory:/libpod_parent/libpod-abc/modelfs-test-1\n")
    mountinfo = tmp_path / "mountinfo"
    write(
        mountinfo,
        f"177 173 0:32 /libpod_parent/libpod-abc {root}/memory rw,nosuid - cgroup cgroup rw,memory\n"
        f"178 173 0:33 / {root}/cpu rw,nosuid - cgroup cgroup rw,cpu\n",
    )
    write(root / "memory/memory.limit_in_bytes", V1_UNLIMITED)
    write(root / "memory/modelfs-test-1/memory.limit_in_bytes", str(192 * MiB))
    assert cgroup_memory_limit(str(proc), str(root), str(mountinfo)) == 192 * MiB
    write(root / "memory/modelfs-test-1/memory.limit_in_bytes", V1_UNLIMITED)
    write(root / "memory/memory.limit_in_bytes", str(400 * MiB))
    assert cgroup_memory_limit(str(proc), str(root), str(mountinfo)) == 400 * MiB
    # Without the mount table the host path is not found: only the mounted root counts.
    write(root / "memory/memory.limit_in_bytes", V1_UNLIMITED)
    write(root / "memory/modelfs-test-1/memory.limit_in_bytes", str(192 * MiB))
    assert cgroup_memory_limit(str(proc), str(root), str(tmp_path / "none")) is None


def test_v2_memory_max(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    write(proc, "0::/system.slice/modelfs.service\n")
    root = tmp_path / "fs"
    write(root / "system.slice/modelfs.service/memory.max", f"{256 * MiB}\n")
    write(root / "system.slice/memory.max", "max\n")
    assert cgroup_memory_limit(str(proc), str(root)) == 256 * MiB
    write(root / "system.slice/modelfs.service/memory.max", "max\n")
    assert cgroup_memory_limit(str(proc), str(root)) is None


def test_no_cgroup_no_limit(tmp_path: Path) -> None:
    assert cgroup_memory_limit(str(tmp_path / "missing"), str(tmp_path)) is None
    write(tmp_path / "cgroup", "4:memory:/a\n")
    assert cgroup_memory_limit(str(tmp_path / "cgroup"), str(tmp_path / "fs")) is None
    write(tmp_path / "fs/memory/a/memory.limit_in_bytes", V1_UNLIMITED)
    assert cgroup_memory_limit(str(tmp_path / "cgroup"), str(tmp_path / "fs")) is None


def test_auto_budget_and_fuse_tasks() -> None:
    limit = 448 * MiB
    assert auto_budget(limit, 8 * MiB) == limit - FIXED_OVERHEAD - AUTO_HEADROOM
    assert auto_budget(limit + 3 * MiB, 8 * MiB) % (8 * MiB) == 0
    assert fuse_tasks(0) == 8 and fuse_tasks(56 * MiB) == 56 and fuse_tasks(1 << 40) == 64


def _config(*argv: str, mount: bool = True) -> int:
    parser = argparse.ArgumentParser()
    add_options(parser)
    args = parser.parse_args(list(argv))
    return build_config("gs://bucket/m", "/mnt/x" if mount else None, args, environ={}).memory_cache


def test_mount_refuses_a_budget_the_cgroup_cannot_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memlimit, "cgroup_memory_limit", lambda: 192 * MiB)
    assert _config("--memory-cache", "64M") == 64 * MiB
    assert _config("--memory-cache", "128M") == 128 * MiB  # exactly budget + overhead
    with pytest.raises(ConfigError, match="exceeds the cgroup memory limit 192M"):
        _config("--memory-cache", "129M")
    with pytest.raises(ConfigError, match="at most 128M"):
        _config()  # the default 256M
    assert _config(mount=False) == 256 * MiB  # warm does not mount: no check
    assert _config("--memory-cache", "auto") == 192 * MiB - FIXED_OVERHEAD - AUTO_HEADROOM
    assert FIXED_OVERHEAD + AUTO_HEADROOM == 128 * MiB  # docs: auto = the limit minus 128 MiB


def test_auto_needs_a_limit_that_leaves_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memlimit, "cgroup_memory_limit", lambda: None)
    with pytest.raises(ConfigError, match="needs a cgroup memory limit"):
        _config("--memory-cache", "auto")
    monkeypatch.setattr(memlimit, "cgroup_memory_limit", lambda: 140 * MiB)
    with pytest.raises(ConfigError, match="auto"):
        _config("--memory-cache", "AUTO")


def test_budget_must_hold_a_request_beside_a_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memlimit, "cgroup_memory_limit", lambda: None)
    assert _config("--block-size", "64K", "--memory-cache", "1088K") == 1088 << 10
    with pytest.raises(ConfigError, match="at least 1088K"):
        _config("--block-size", "64K", "--memory-cache", "1M")


def test_a_larger_metadata_cache_adds_to_the_overhead(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelfs.inodes import DEFAULT_METADATA_CACHE

    assert memlimit.DEFAULT_METADATA_CACHE == DEFAULT_METADATA_CACHE
    monkeypatch.setattr(memlimit, "cgroup_memory_limit", lambda: 320 * MiB)
    assert _config("--memory-cache", "128M", "--metadata-cache", "4M") == 128 * MiB
    # The cache beyond its default, four times: the listings it holds, one refresh building a
    # listing of up to its size beside them (inodes: one refresh at a time), and twice its size
    # of listings idle directory handles hold outside it (inodes: handle_cap); and the nodes
    # the kernel may hold beyond the default's, one per KiB of it (memlimit.held_nodes).
    with pytest.raises(ConfigError, match=r"overhead \(224M\)"):
        _config("--memory-cache", "192M", "--metadata-cache", "40M")
    assert _config("--memory-cache", "auto", "--metadata-cache", "40M") == 320 * MiB - 224 * MiB - AUTO_HEADROOM


def test_a_disk_cache_of_many_blocks_counts_its_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk index holds an entry per block file in memory: a disk cache of many small
    blocks (1,638,400 of 64 KiB in 100G) must fit in the cgroup too, and `auto` leaves room."""
    from modelfs.memlimit import DISK_BLOCKS_INCLUDED, DISK_INDEX_ENTRY, overhead

    monkeypatch.setattr(memlimit, "cgroup_memory_limit", lambda: 1024 * MiB)
    small = ("--block-size", "64K", "--disk-cache", "100G")
    index = (100 * 1024 * 16 - DISK_BLOCKS_INCLUDED) * DISK_INDEX_ENTRY
    assert overhead(disk_blocks=100 * 1024 * 16) == FIXED_OVERHEAD + index
    with pytest.raises(ConfigError, match="disk cache's index .* larger --block-size"):
        _config(*small, "--memory-cache", "512M")
    assert _config(*small, "--memory-cache", "auto") == 1024 * MiB - FIXED_OVERHEAD - index - AUTO_HEADROOM
    # The default disk cache (10G of 8 MiB blocks) adds nothing.
    assert _config("--memory-cache", "auto") == 1024 * MiB - FIXED_OVERHEAD - AUTO_HEADROOM


def test_a_budget_of_many_small_blocks_counts_their_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each cached block holds ~1 KiB of objects beside its buffer: a budget of more blocks
    than the fixed overhead covers (4,096) counts the rest, in the check and in `auto`."""
    from modelfs.memlimit import BLOCK_OBJECT, MEMORY_BLOCKS_INCLUDED, overhead

    assert overhead(memory_blocks=MEMORY_BLOCKS_INCLUDED) == FIXED_OVERHEAD
    assert overhead(memory_blocks=MEMORY_BLOCKS_INCLUDED + 10) == FIXED_OVERHEAD + 10 * BLOCK_OBJECT
    monkeypatch.setattr(memlimit, "cgroup_memory_limit", lambda: 2048 * MiB)
    budget = _config("--block-size", "64K", "--disk-cache", "0", "--memory-cache", "auto")  # ~29,000 blocks
    blocks = budget // (64 << 10)
    assert budget % (64 << 10) == 0 and blocks > MEMORY_BLOCKS_INCLUDED
    spent = budget + overhead(memory_blocks=blocks) + AUTO_HEADROOM
    assert spent <= 2048 * MiB < spent + (64 << 10) + BLOCK_OBJECT  # as many blocks as fit, no more
    with pytest.raises(ConfigError, match="exceeds the cgroup memory limit"):
        _config("--block-size", "64K", "--disk-cache", "0", "--memory-cache", str(2048 * MiB - FIXED_OVERHEAD))


def test_the_block_size_is_whole_pages() -> None:
    with pytest.raises(ConfigError, match="multiple of 4K"):
        _config("--block-size", "5000", mount=False)
    assert _config("--block-size", "12K", "--memory-cache", "64M", mount=False) == 64 * MiB


def test_each_get_beyond_the_default_concurrency_adds_to_the_overhead(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GET in flight holds a worker thread and a kept-alive connection beside its buffer
    (~0.1 MiB over TLS, docs/operations.md): --max-concurrency beyond the default 8 counts
    GET_BYTES each, in the refusal and in `auto`."""
    from modelfs.memlimit import CONCURRENCY_INCLUDED, GET_BYTES, overhead

    assert CONCURRENCY_INCLUDED == 8
    assert overhead(max_concurrency=1) == overhead(max_concurrency=8) == FIXED_OVERHEAD
    assert overhead(max_concurrency=256) == FIXED_OVERHEAD + 248 * GET_BYTES == FIXED_OVERHEAD + 31 * MiB
    monkeypatch.setattr(memlimit, "cgroup_memory_limit", lambda: 512 * MiB)
    assert _config("--memory-cache", "448M") == 448 * MiB
    with pytest.raises(ConfigError, match=r"256 GETs in flight \(95M\) .* at most 417M .*--max-concurrency"):
        _config("--memory-cache", "448M", "--max-concurrency", "256")
    assert _config("--memory-cache", "417M", "--max-concurrency", "256") == 417 * MiB
    assert _config("--memory-cache", "auto") == 512 * MiB - FIXED_OVERHEAD - AUTO_HEADROOM
    auto = _config("--memory-cache", "auto", "--max-concurrency", "256")
    assert auto == auto_budget(512 * MiB, 8 * MiB, max_concurrency=256) == 352 * MiB  # 353 MiB, in whole blocks


def test_receive_chunk_shares_the_socket_queue_among_the_gets() -> None:
    """What a GET thread lets the kernel queue before it wakes: 1 MiB each up to 32 GETs, then
    SOCKET_QUEUE shared (sockets are charged to the cgroup, not counted in RSS)."""
    from modelfs.memlimit import SOCKET_QUEUE, receive_chunk

    assert SOCKET_QUEUE == 32 * MiB
    assert receive_chunk(1) == receive_chunk(8) == receive_chunk(32) == MiB
    assert receive_chunk(64) == 512 << 10 and receive_chunk(256) == 128 << 10
    assert receive_chunk(1 << 20) == 64 << 10  # never less
    assert all(n * receive_chunk(n) <= SOCKET_QUEUE for n in range(32, 513))


def test_the_backends_wait_for_their_share_of_the_socket_queue() -> None:
    from modelfs.backends.gcs import GCSBackend
    from modelfs.backends.http import HTTPBackend
    from modelfs.backends.tiered import TieredBackend
    from modelfs.config import parse_source
    from modelfs.memlimit import receive_chunk

    gcs = GCSBackend(parse_source("gs://bucket/m"), anonymous=True, max_concurrency=256)
    assert gcs._media is not None and gcs._media._receive_chunk == receive_chunk(256)
    http = HTTPBackend(parse_source("http://127.0.0.1:9/m/"), max_concurrency=64)
    assert http._media is not None and http._media._receive_chunk == receive_chunk(64)
    tier = TieredBackend(gcs, ["http://127.0.0.1:9"], block_size=MiB, read_timeout=5, max_concurrency=256)
    assert tier._replicas[0]._receive_chunk == receive_chunk(256)
