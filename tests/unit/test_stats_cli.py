"""``modelfs stats PATH`` on what is not a running modelfs mount: one line on stderr and exit 1,
never a traceback (a JSONDecodeError or KeyError from a stranger's ``user.modelfs.stats``)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelfs.backends.memory import MemoryBackend
from modelfs.cli import main

from .conftest import StoreFactory
from .test_operations import build

XATTR = "user.modelfs.stats"


def _set_stats(path: Path, value: bytes) -> None:
    try:
        os.setxattr(path, XATTR, value)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip(f"no user xattrs on {path}")
        raise


def _exit_1_one_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["stats", *argv]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelfs: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


async def _real_stats(make_store: StoreFactory) -> dict[str, Any]:
    backend = MemoryBackend()
    backend.put("model.bin", b"x" * 1000)
    ops = await build(make_store, backend)
    return json.loads(json.dumps(ops.stats()))  # as the mount's getxattr hands them out


async def test_the_stats_a_mount_writes_are_printed(
    make_store: StoreFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stats = await _real_stats(make_store)
    _set_stats(tmp_path, json.dumps(stats).encode())
    assert main(["stats", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("source ") and "memory cache" in out and "errors            none" in out
    assert main(["stats", "--json", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == stats


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),  # not UTF-8
        (b"[" * 1500 + b"]" * 1500, "not JSON"),  # nested past the parser's depth (3 KB: ext4 keeps 4 KiB)
        (b"[1, 2]", "not a JSON object"),
        (b'"gs://b"', "not a JSON object"),
        (b"{}", "no 'source'"),
        (b'{"source": "gs://b/m", "files": 3}', "no 'bytes'"),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_stats_that_are_not_modelfs_json(
    value: bytes, why: str, as_json: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _set_stats(tmp_path, value)
    line = _exit_1_one_line(capsys, *(["--json"] if as_json else []), str(tmp_path))
    assert line == f"modelfs: {tmp_path} is not a modelfs mount (its stats are not readable: {why})"


@pytest.mark.parametrize(
    "change",
    [
        lambda s: {**s, "bytes": "many"},
        lambda s: {**s, "memory_capacity": None},
        lambda s: {**s, "bytes": 10**400},  # past a float
        lambda s: {**s, "tier": "on"},
        lambda s: {**s, "errors_by_errno": [1, 2]},
    ],
)
async def test_stats_with_a_value_of_the_wrong_type(
    change: Callable[[dict[str, Any]], dict[str, Any]],
    make_store: StoreFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _set_stats(tmp_path, json.dumps(change(await _real_stats(make_store))).encode())
    line = _exit_1_one_line(capsys, str(tmp_path))
    assert line.endswith("is not a modelfs mount (its stats are not readable: a value of the wrong type)")


def test_stats_of_a_path_without_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_bytes(b"x")
    for path in (tmp_path, tmp_path / "file", tmp_path / "missing"):
        line = _exit_1_one_line(capsys, str(path))
        assert line.startswith(f"modelfs: {path} is not a running modelfs mount (")


def test_cpu_per_gib_and_the_ceiling_wait_for_enough_bytes_read() -> None:
    """After a 100-byte read the startup's CPU divided by it gave "21889 s per GiB, ~0 MB/s"."""
    from modelfs.cli import _cpu_line

    few = _cpu_line({"loop_cpu_s": 0.5, "daemon_cpu_s": 2.0, "read_bytes": 100})
    assert "event loop (serialized)" in few and "per GiB" not in few and "ceiling" not in few
    many = _cpu_line({"loop_cpu_s": 0.5, "daemon_cpu_s": 2.0, "read_bytes": 2 << 30})
    assert "per GiB read: 1.00 / 0.25 s" in many and "one mount's ceiling ~4,295 MB/s" in many
