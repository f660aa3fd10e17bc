"""``modelfs warm`` whose blocks do not all end up in the disk cache: a full disk, a failing
write, a source larger than the cache holds. It reported every object "cached" and exited 0
(an init container then passed on a cold cache); now each such object is named, with why,
and the command fails (exit 1, like the other failures of warm)."""

from __future__ import annotations

import argparse
import errno
import io
from pathlib import Path
from typing import Any

import pytest
import trio

from modelfs import cli, warm
from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.cache import disk as disk_module
from modelfs.config import Config, add_options, build_config
from modelfs.errors import ModelfsError

from .test_disk_full import SmallFs

KiB = 1 << 10
BLOCK_FILE = 4096 + 64 * KiB  # a header page and a 64K block


def _config(tmp_path: Path, *argv: str) -> Config:
    parser = argparse.ArgumentParser()
    add_options(parser)
    options = ["--anonymous", "--cache-dir", str(tmp_path / "cache"), "--block-size", "64K", "--memory-cache", "1088K"]
    return build_config("gs://bkt/m", None, parser.parse_args([*options, *argv]), environ={})


def _backend(monkeypatch: pytest.MonkeyPatch, *sizes: int) -> MemoryBackend:
    backend = MemoryBackend()
    for i, size in enumerate(sizes):
        backend.put(f"part{i}.bin", ramp(size, seed=i))
    monkeypatch.setattr(warm, "open_backend", lambda config: backend)
    return backend


def _cli_error(monkeypatch: pytest.MonkeyPatch, config: Config, result: warm.WarmResult) -> str:
    """The one line ``modelfs warm`` ends with on ``result`` (its exit code is 1)."""
    monkeypatch.setattr(trio, "run", lambda fn, config: result)
    with pytest.raises(ModelfsError) as caught:
        cli._warm(config)
    return str(caught.value)


def _ends_cold_for_the_first_objects(result: warm.WarmResult, out: str) -> None:
    """The last object is cached; the first ones are not (named, or counted in ``evicted``)."""
    lines = out.splitlines()
    assert "warm: part2.bin: cached (no checksum to verify)" in lines
    assert result.objects + len(result.failed) == 3
    assert {name for name, _ in result.failed} <= {"part0.bin", "part1.bin"}
    for name, why in result.failed:
        assert (
            why.startswith(f"{name}: ") and "block(s) were evicted again to make room (the disk cache keeps to" in why
        )
        assert f"warm: {name}: NOT CACHED: {why.removeprefix(name + ': ')}" in lines
    assert result.evicted > 0  # blocks warmed, then pushed out: at least the first object's


def test_warm_into_a_file_system_smaller_than_the_source_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reviewer's case: 3 objects of 10 blocks into a file system of 12 block files.
    Before: "cached" three times, exit 0, most blocks never written."""
    _backend(monkeypatch, 640 * KiB, 640 * KiB, 640 * KiB)
    small = SmallFs(tmp_path / "cache", 12 * BLOCK_FILE)
    small.install(monkeypatch)
    out = io.StringIO()
    config = _config(tmp_path)
    result = trio.run(warm.warm, config, out)
    _ends_cold_for_the_first_objects(result, out.getvalue())
    assert small.refused <= 1  # room is made before writing, not after failing
    error = _cli_error(monkeypatch, config, result)
    assert error.startswith(("2 object(s) not cached (and 1 more): part0.bin: ", "1 object(s) not cached: part")) or (
        error.startswith("the disk cache cannot hold all of gs://bkt/m: ") and not result.failed
    ), error


def test_an_object_whose_blocks_could_not_be_written_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails (here EIO, for one object only): that object is not cached, the
    others are; the line names the object and the error."""
    _backend(monkeypatch, 200 * KiB, 200 * KiB, 200 * KiB)
    real = disk_module.write_block

    def write_block(dir_path: str, name: str, key_bytes: bytes, index: int, data: memoryview, **kw: Any) -> Any:
        if b"part1.bin" in key_bytes and index == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(dir_path, name, key_bytes, index, data, **kw)

    monkeypatch.setattr(disk_module, "write_block", write_block)
    out = io.StringIO()
    config = _config(tmp_path)
    result = trio.run(warm.warm, config, out)
    why = "1 of 4 block(s) could not be written to the disk cache (Input/output error)"
    assert result.failed == [("part1.bin", f"part1.bin: {why}")]
    assert result.objects == 2 and result.evicted == 0
    assert f"warm: part1.bin: NOT CACHED: {why}" in out.getvalue().splitlines()
    assert out.getvalue().count("cached (no checksum to verify)") == 2
    assert _cli_error(monkeypatch, config, result) == f"1 object(s) not cached: part1.bin: {why}"


def test_a_disk_full_of_other_files_fails_every_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _backend(monkeypatch, 100 * KiB, 100 * KiB)
    small = SmallFs(tmp_path / "cache", 64 * BLOCK_FILE)
    small.other = small.size
    small.install(monkeypatch)
    out = io.StringIO()
    result = trio.run(warm.warm, _config(tmp_path), out)
    assert [name for name, _ in result.failed] == ["part0.bin", "part1.bin"]
    assert all("could not be written to the disk cache (disk full)" in why for _, why in result.failed)
    assert result.objects == 0


def test_a_source_larger_than_disk_cache_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Later objects push the first ones out again: the cache ends cold for them."""
    _backend(monkeypatch, 320 * KiB, 320 * KiB, 320 * KiB)
    config = _config(tmp_path, "--disk-cache", str(11 * BLOCK_FILE))
    out = io.StringIO()
    result = trio.run(warm.warm, config, out)
    _ends_cold_for_the_first_objects(result, out.getvalue())


def test_blocks_evicted_after_their_object_was_checked_fail_warm_with_a_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every object was in the cache when it was checked, but later ones pushed blocks out."""
    result = warm.WarmResult(objects=3, bytes=3 << 20, evicted=5, cache_limit=2 << 20)
    assert _cli_error(monkeypatch, _config(tmp_path), result) == (
        "the disk cache cannot hold all of gs://bkt/m: 5 block(s) warmed were evicted again to make room "
        f"(it keeps to 2.0 MiB: --disk-cache, or what the file system of {tmp_path / 'cache'} holds)"
    )


def test_a_source_the_cache_holds_still_succeeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _backend(monkeypatch, 320 * KiB, 1, 320 * KiB)
    small = SmallFs(tmp_path / "cache", 64 * BLOCK_FILE)
    small.install(monkeypatch)
    result = trio.run(warm.warm, _config(tmp_path), io.StringIO())
    assert result.objects == 3 and not result.failed and result.evicted == 0
    monkeypatch.setattr(trio, "run", lambda fn, config: result)
    assert cli._warm(_config(tmp_path)) == 0
