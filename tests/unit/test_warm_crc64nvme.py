"""``modelfs warm`` checks S3's CRC64NVME (the checksum S3 computes by default since 2025, of
the whole object even for a multipart upload) as it checks the others: folded block by block,
a mismatch fails the object. The value it computes (awscrt's) is checked here against the CRC
catalogue's check value and a plain Python CRC-64/NVME, not only against awscrt itself."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from modelfs import warm
from modelfs.backends.memory import ramp
from modelfs.config import Config, add_options, build_config
from modelfs.testing.crc64nvme import CHECK, REFLECTED, crc64nvme_b64
from modelfs.testing.crc64nvme import crc64nvme as crc64nvme_reference

from .warm_runs import run_warm, serve_with_checksum

VECTORS = [b"", b"123456789", bytes(32), b"\xff" * 32, bytes(range(256)), ramp(70_000, seed=4)]


def test_warms_crc64nvme_is_crc64_nvme_folded_block_by_block() -> None:
    """The CRC catalogue's CRC-64/NVME (poly 0xad93d23594c93659 reflected, init and xorout all
    ones, check value 0xae8b14860a799888): the reference is it, and awscrt and warm's hasher,
    fed the bytes in pieces as blocks, give what the reference gives."""
    from awscrt.checksums import crc64nvme

    assert CHECK == 0xAE8B14860A799888 and REFLECTED == 0x9A6C9329AC4BC9B5
    assert crc64nvme_reference(b"123456789") == CHECK
    assert crc64nvme_b64(b"123456789") == "rosUhgp5mIg="
    make, size = warm._HASHES["crc64nvme"]
    assert size == 8
    for data in VECTORS:
        expected = crc64nvme_reference(data)
        assert crc64nvme(data) == expected, len(data)
        for cuts in ([], [1], [4, 5], [len(data) // 3, len(data) // 2, len(data) - 1]):
            hasher = make()
            start = 0
            for stop in [*cuts, len(data)]:
                hasher.update(memoryview(data)[start:stop])
                start = stop
            assert hasher.digest() == expected.to_bytes(8, "big"), (len(data), cuts)


def _config(tmp_path: Path) -> Config:
    parser = argparse.ArgumentParser()
    add_options(parser)
    args = parser.parse_args(["--anonymous", "--cache-dir", str(tmp_path / "cache"), "--block-size", "64K"])
    return build_config("s3://bkt/m", None, args, environ={})


def _warm_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes, checksum: str
) -> tuple[warm.WarmResult, str]:
    serve_with_checksum(monkeypatch, data, checksum)
    return run_warm(tmp_path)


def test_warm_verifies_a_crc64nvme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = ramp(200_000, seed=7)  # four 64 KiB blocks
    result, out = _warm_with(tmp_path, monkeypatch, data, "crc64nvme:" + crc64nvme_b64(data))
    assert result.objects == 1 and result.unverified == 0 and not result.mismatched, out
    assert "warm: a.bin: cached, checksum ok" in out


def test_warm_fails_an_object_whose_crc64nvme_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = ramp(200_000, seed=7)
    other = bytearray(data)
    other[150_000] ^= 1  # one bit in the third block
    result, out = _warm_with(tmp_path, monkeypatch, data, "crc64nvme:" + crc64nvme_b64(bytes(other)))
    assert result.mismatched == ["a.bin"] and result.unverified == 0, out
    assert "warm: a.bin: CHECKSUM MISMATCH (not cached)" in out


def test_botocore_never_loads_awscrt_in_the_daemon() -> None:
    """awscrt is there for warm's CRC64NVME only: botocore, imported by the S3 backend, must
    not find it (it would sign with the CRT and load ~6 MiB outside the overhead). In a new
    interpreter, as the daemon imports them; awscrt's checksums still work beside it."""
    code = (
        "import modelfs.backends.s3, boto3, botocore.compat, sys\n"
        "boto3.session.Session().client('s3', region_name='us-east-1', endpoint_url='http://127.0.0.1:9')\n"
        "from awscrt.checksums import crc64nvme\n"
        "print(botocore.compat.HAS_CRT, 'awscrt.auth' in sys.modules and sys.modules['awscrt.auth'] is not None,"
        " hex(crc64nvme(b'123456789')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False", "0xae8b14860a799888"], out.stderr
