"""``modelfs warm`` of one object from a memory backend whose stat carries a checksum, as an
S3 HEAD with ChecksumMode does: the tests of warm's verification share it."""

from __future__ import annotations

import argparse
import dataclasses
import io
from pathlib import Path

import pytest
import trio

from modelfs import warm
from modelfs.backends.memory import MemoryBackend
from modelfs.config import Config, add_options, build_config


def serve_with_checksum(monkeypatch: pytest.MonkeyPatch, data: bytes, checksum: str) -> MemoryBackend:
    """The backend warm opens: ``a.bin`` holding ``data``, its stat saying ``checksum``."""
    backend = MemoryBackend()
    backend.put("a.bin", data)
    info = dataclasses.replace(trio.run(backend.stat, "a.bin"), checksum=checksum)

    async def stat(name: str) -> object:
        return info

    monkeypatch.setattr(backend, "stat", stat)
    monkeypatch.setattr(backend, "checksums_by_stat", True, raising=False)
    monkeypatch.setattr(warm, "open_backend", lambda config: backend)
    return backend


def warm_config(tmp_path: Path, *options: str) -> Config:
    """``modelfs warm s3://bkt/m``'s config (64 KiB blocks unless ``options`` say otherwise)."""
    parser = argparse.ArgumentParser()
    add_options(parser)
    argv = ["--anonymous", "--cache-dir", str(tmp_path / "cache"), "--block-size", "64K", *options]
    return build_config("s3://bkt/m", None, parser.parse_args(argv), environ={})


def run_warm(tmp_path: Path, *options: str) -> tuple[warm.WarmResult, str]:
    """``modelfs warm s3://bkt/m`` (see :func:`warm_config`): its result and what it printed."""
    out = io.StringIO()
    return trio.run(warm.warm, warm_config(tmp_path, *options), out), out.getvalue()
