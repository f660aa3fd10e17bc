"""``modelfs warm`` with an object that cannot be read after the listing (changed or deleted
in the store meanwhile): the others are cached, the failure is one line and exit 1, never a
traceback out of trio's exception groups."""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from modelfs import cli, warm
from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.config import Config, add_options, build_config
from modelfs.errors import ModelfsError, VersionChanged
from modelfs.testing.held import held_origin


def _config(tmp_path: Path, source: str = "gs://bkt/m", *argv: str) -> Config:
    parser = argparse.ArgumentParser()
    add_options(parser)
    args = parser.parse_args(["--anonymous", "--cache-dir", str(tmp_path / "cache"), "--block-size", "64K", *argv])
    return build_config(source, None, args, environ={})


def test_an_object_changed_after_the_listing_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = MemoryBackend()
    for name, seed in (("a.bin", 1), ("b.bin", 2), ("c.bin", 3)):
        backend.put(name, ramp(200_000, seed=seed))

    def changed(name: str, offset: int, length: int) -> None:
        if name == "b.bin":
            raise VersionChanged(f"{name}: changed in the store")

    backend.fault = changed
    monkeypatch.setattr(warm, "open_backend", lambda config: backend)
    out = io.StringIO()
    result = trio.run(warm.warm, _config(tmp_path), out)
    assert result.objects == 2 and result.bytes == 400_000
    assert result.failed == [("b.bin", "b.bin: changed in the store")]
    assert "warm: b.bin: FAILED: b.bin: changed in the store" in out.getvalue()

    monkeypatch.setattr(trio, "run", lambda fn, config: result)  # what the CLI makes of that result
    with pytest.raises(ModelfsError, match=r"^1 object\(s\) not cached: b.bin: changed in the store$"):
        cli._warm(_config(tmp_path))


def test_a_prefix_with_nothing_under_it_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = MemoryBackend()
    monkeypatch.setattr(warm, "open_backend", lambda config: backend)
    with pytest.raises(ModelfsError, match="nothing found at gs://bkt/m"):
        trio.run(warm.warm, _config(tmp_path), io.StringIO())


def test_warm_keeps_to_memory_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read-ahead window shrinks to the budget (before: the budget grew to the window,
    (16 + 2) blocks with the defaults, whatever --memory-cache said); bytes still right."""
    backend = MemoryBackend()
    data = ramp(3_000_000, seed=9)
    backend.put("big.bin", data)
    budgets: list[int] = []
    real = warm.MemoryCache

    class Noted(real):  # type: ignore[misc, valid-type]
        def __init__(self, capacity: int, block_size: int) -> None:
            budgets.append(capacity)
            super().__init__(capacity, block_size)

    monkeypatch.setattr(warm, "MemoryCache", Noted)
    monkeypatch.setattr(warm, "open_backend", lambda config: backend)
    config = _config(tmp_path, "gs://bkt/m", "--memory-cache", "1088K", "--max-prefetch", "64M")
    result = trio.run(warm.warm, config, io.StringIO())
    assert budgets == [1088 << 10]  # (17 blocks: the window is 15, not the 16 of 8 GETs x 2)
    assert result.objects == 1 and result.bytes == len(data) and not result.failed and not result.mismatched


def test_ctrl_c_during_warm_exits_130_without_a_traceback(tmp_path: Path) -> None:
    """The KeyboardInterrupt comes out of warm's nursery inside an exception group: it is
    still Ctrl-C (exit 130), not a 40-line traceback and exit 1."""
    with held_origin() as origin:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfs", "warm", origin.url, "--cache-dir", str(tmp_path / "cache")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # a hang's SIGABRT shows every thread's stack
            # As from a terminal: a test run started in the background by a shell (CI's `cmd &`)
            # has SIGINT ignored, and the child would inherit that (Ctrl-C then means nothing
            # to it, as to any process started so: this test hung in CI for that reason alone).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            assert origin.arrived.wait(60), "warm's listing never reached the origin"
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)  # a guard against a hang only
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGABRT)
                try:
                    _, err = proc.communicate(timeout=10)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.communicate()
                pytest.fail(f"warm did not stop on Ctrl-C; its stacks:\n{err}")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err


def test_warm_without_a_disk_cache_is_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--disk-cache 0`` leaves warm nothing to fill: a bad argument (exit 2), one line."""
    source = tmp_path / "src"
    source.mkdir()
    argv = ["warm", f"file://{source}", "--disk-cache", "0", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == "modelfs: warm needs a disk cache (--disk-cache must be more than 0)\n"


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_error_in_the_walk_is_never_taken_for_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    """The walk's task closed its channel with ``async with``, at a checkpoint: the loop over
    the channel ended there, cancelled the nursery, and the Cancelled raised at that
    checkpoint replaced the error on its way out. A Ctrl-C landing in the walk (or a bug in
    it) then ended warm as if the source were empty: exit 0, nothing cached. Whether the loop
    ran first was up to trio's scheduling, so it is tried many times."""
    backend = MemoryBackend()
    backend.put("m/a.bin", ramp(1000, seed=1))

    async def list_dir(prefix: str, token: str | None = None, *, limit: int | None = None) -> object:
        await trio.lowlevel.checkpoint()
        raise error("in the walk")

    monkeypatch.setattr(backend, "list_dir", list_dir)
    monkeypatch.setattr(warm, "open_backend", lambda config: backend)
    for attempt in range(30):
        with pytest.raises(BaseException) as caught:
            trio.run(warm.warm, _config(tmp_path / str(attempt), "gs://bkt/"), io.StringIO())
        found = caught.value.split(error)[0] if isinstance(caught.value, BaseExceptionGroup) else caught.value
        assert isinstance(found, BaseExceptionGroup | error), caught.value


def test_warm_of_a_file_source_without_persist_weak_versions_is_bad_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed "cached" and exited 0, but a file:// version is weak (one run's): the mount
    that followed used none of it. Now one line, exit 2, naming the flag; nothing is cached."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "w.bin").write_bytes(b"x" * 5000)
    cache = tmp_path / "cache"
    assert cli.main(["warm", f"file://{source}", "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("modelfs: warm of a file:// source needs --persist-weak-versions")
    assert "on the mount that follows" in err
    assert not cache.exists()
    # With the flag it warms.
    assert cli.main(["warm", f"file://{source}", "--cache-dir", str(cache), "--persist-weak-versions"]) == 0
    assert cache.is_dir() and any(cache.iterdir())


@pytest.mark.parametrize(
    ("checksum", "note"),
    [
        (
            "crc32:9286hw==-?",
            "not verified: its CRC32 is a multipart upload's COMPOSITE checksum of its parts, "
            "not one of the whole object",
        ),
        ("sha256:iH6F8A==", "not verified: the store's SHA256 checksum 'iH6F8A==' is not one"),
        ("crc32:not base64!", "not verified: the store's CRC32 checksum 'not base64!' is not one"),
    ],
)
def test_a_checksum_warm_cannot_check_is_said_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checksum: str, note: str
) -> None:
    backend = MemoryBackend()
    backend.put("a.bin", ramp(100_000))
    info = trio.run(backend.stat, "a.bin")
    monkeypatch.setattr(backend, "stat", _returning(dataclasses.replace(info, checksum=checksum)))
    monkeypatch.setattr(backend, "checksums_by_stat", True, raising=False)
    monkeypatch.setattr(warm, "open_backend", lambda config: backend)
    out = io.StringIO()
    result = trio.run(warm.warm, _config(tmp_path), out)
    assert result.objects == 1 and result.unverified == 1 and not result.mismatched
    assert f"warm: a.bin: cached ({note})" in out.getvalue()


def _returning(info: object) -> object:
    async def stat(name: str) -> object:
        return info

    return stat


def test_an_object_replaced_between_listing_and_stat_fails_as_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3:// objects are stat'ed for their checksum after the listing: one replaced meanwhile is
    not warmed as its new version under the listing's name (its read fails as changed since
    the listing, as for gs://); the stat's checksum is used only for the version listed."""
    backend = MemoryBackend()
    backend.put("a.bin", ramp(100_000, seed=1))
    backend.put("b.bin", ramp(100_000, seed=2))
    stat = backend.stat

    async def replaced(name: str) -> object:
        if name == "a.bin":
            backend.put("a.bin", ramp(100_000, seed=3))
        return dataclasses.replace(await stat(name), checksum=None)

    monkeypatch.setattr(backend, "stat", replaced)
    monkeypatch.setattr(backend, "checksums_by_stat", True, raising=False)
    monkeypatch.setattr(warm, "open_backend", lambda config: backend)
    out = io.StringIO()
    result = trio.run(warm.warm, _config(tmp_path), out)
    assert [name for name, _ in result.failed] == ["a.bin"], out.getvalue()
    assert result.objects == 1 and "warm: b.bin: cached (no checksum to verify)" in out.getvalue()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (
            {"version": '"v2"', "checksum": "sha256:" + "q" * 43 + "="},
            "a.bin: changed in the store since the listing (its HEAD's version is '\"v2\"', not",
        ),
        (
            {"size": 99_999, "checksum": "sha256:" + "q" * 43 + "="},
            "a.bin: the store's HEAD says 99999 bytes at the version listed, its listing 100000",
        ),
    ],
)
def test_a_head_that_contradicts_the_listing_fails_the_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict[str, object], why: str
) -> None:
    """A lying store: its HEAD has a checksum but another version or size than the listing,
    and its GETs serve the listing's version anyway. The object was warmed as 'no checksum to
    verify' (exit 0), its bytes checked against nothing: it fails, one line, exit 1."""
    backend = MemoryBackend()
    backend.put("a.bin", ramp(100_000, seed=1))
    backend.put("b.bin", ramp(100_000, seed=2))
    stat = backend.stat

    async def lying(name: str) -> object:
        info = await stat(name)
        return dataclasses.replace(info, **change) if name == "a.bin" else info  # type: ignore[arg-type]

    monkeypatch.setattr(backend, "stat", lying)
    monkeypatch.setattr(backend, "checksums_by_stat", True, raising=False)
    monkeypatch.setattr(warm, "open_backend", lambda config: backend)
    out = io.StringIO()
    result = trio.run(warm.warm, _config(tmp_path), out)
    [(name, message)] = result.failed
    assert name == "a.bin" and message.startswith(why), out.getvalue()
    assert result.objects == 1 and "warm: b.bin: cached (no checksum to verify)" in out.getvalue()
    assert f"warm: a.bin: FAILED: {message}" in out.getvalue().splitlines()
