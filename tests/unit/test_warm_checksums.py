"""The checksums S3 keeps beside CRC32, CRC32C, CRC64NVME, SHA-1 and SHA-256 (2025): SHA-512,
MD5, XXHASH64, XXHASH3 (XXH3-64) and XXHASH128 (XXH3-128). ``modelfs warm`` folds each block by
block as for the others; its value is checked here against hashlib's and the xxHash reference
implementation's (the ``xxhash`` package 4.0.1, run once to make the vectors below; warm uses
awscrt's, which botocore computes them with). A checksum S3 may send that modelfs has no
implementation of is reported so by its own name, never taken for another type."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from modelfs import warm
from modelfs.backends.memory import ramp
from modelfs.backends.s3 import head_checksum

from .warm_runs import run_warm, serve_with_checksum

RAMP = ramp(70_000, seed=4)

# Canonical (big-endian) digests, as S3 gives them base64'd, of the xxHash reference
# (xxhash.xxh64_digest, xxh3_64_digest, xxh3_128_digest); those of b"" and b"abc" are also
# the published ones (xxHash's README and test suite).
XXH_VECTORS = {
    "xxhash64": {b"": "ef46db3751d8e999", b"abc": "44bc2cf5ad770999", RAMP: "9b8856428a03de16"},
    "xxhash3": {b"": "2d06800538d394c2", b"abc": "78af5f94892f3950", RAMP: "be53cfc1340d07ce"},
    "xxhash128": {
        b"": "99aa06d3014798d86001c324468d497f",
        b"abc": "06b05ab6733a618578af5f94892f3950",
        RAMP: "4a6aeba2c6e093c1be53cfc1340d07ce",
    },
}


def _folded(algorithm: str, data: bytes, cuts: list[int]) -> bytes:
    """warm's hasher for ``algorithm`` fed ``data`` in pieces cut at ``cuts``, as blocks of a
    writable buffer (a block's view is of an mmap: awscrt's xxHash takes no such view)."""
    make, size = warm._HASHES[algorithm]
    hasher = make()
    buf = memoryview(bytearray(data))
    start = 0
    for stop in [*cuts, len(data)]:
        hasher.update(buf[start:stop])
        start = stop
    digest = hasher.digest()
    assert len(digest) == size
    return digest


CUTS = [[], [1], [4, 5], [23_333, 65_536, 65_537, 69_999]]


@pytest.mark.parametrize("algorithm", sorted(XXH_VECTORS))
def test_xxhash_checksums_are_the_reference_values(algorithm: str) -> None:
    for data, expected in XXH_VECTORS[algorithm].items():
        for cuts in CUTS:
            cuts = [c for c in cuts if c <= len(data)]
            assert _folded(algorithm, data, cuts).hex() == expected, (len(data), cuts)


@pytest.mark.parametrize(("algorithm", "reference"), [("sha512", hashlib.sha512), ("md5", hashlib.md5)])
def test_sha512_and_md5_are_hashlibs(algorithm: str, reference: object) -> None:
    for data in (b"", b"abc", RAMP):
        for cuts in CUTS:
            cuts = [c for c in cuts if c <= len(data)]
            assert _folded(algorithm, data, cuts) == reference(data).digest(), (len(data), cuts)  # type: ignore[operator]


B64 = base64.b64encode
ETAG = '"0123456789abcdef0123456789abcdef"'


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ({"ChecksumSHA512": B64(bytes(64)).decode()}, "sha512:" + B64(bytes(64)).decode()),
        ({"ChecksumMD5": "TV0cup6xiISlQQ9Lg7xpUQ=="}, "md5:TV0cup6xiISlQQ9Lg7xpUQ=="),
        ({"ChecksumXXHASH64": "6DnH1qcyXE4="}, "xxhash64:6DnH1qcyXE4="),
        ({"ChecksumXXHASH3": "4xfrLnDb960="}, "xxhash3:4xfrLnDb960="),
        ({"ChecksumXXHASH128": "t1TjS+aVuaPjF+sucNv3rQ=="}, "xxhash128:t1TjS+aVuaPjF+sucNv3rQ=="),
        # A type this botocore does not parse reaches the answer's headers only: it is named as
        # sent, not dropped (it said "no checksum") nor read as a type modelfs knows.
        (
            {
                "ResponseMetadata": {
                    "HTTPHeaders": {"x-amz-checksum-blake3": "q" * 43 + "=", "x-amz-checksum-type": "FULL_OBJECT"}
                }
            },
            "blake3:" + "q" * 43 + "=",
        ),
        # moto's echo of the upload's algorithm is no checksum, nor is the type alone
        (
            {
                "ResponseMetadata": {
                    "HTTPHeaders": {"x-amz-sdk-checksum-algorithm": "CRC32", "x-amz-checksum-type": "FULL_OBJECT"}
                }
            },
            None,
        ),
        # the parsed field and its header are one checksum
        (
            {"ChecksumCRC32": "iH6F8A==", "ResponseMetadata": {"HTTPHeaders": {"x-amz-checksum-crc32": "iH6F8A=="}}},
            "crc32:iH6F8A==",
        ),
    ],
)
def test_a_heads_newer_or_unknown_checksum_is_kept_by_its_own_name(
    head: dict[str, object], expected: str | None
) -> None:
    assert head_checksum(head, ETAG) == expected


def _warm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes, checksum: str) -> tuple[warm.WarmResult, str]:
    serve_with_checksum(monkeypatch, data, checksum)
    return run_warm(tmp_path)


@pytest.mark.parametrize("algorithm", ["sha512", "md5", "xxhash64", "xxhash3", "xxhash128"])
def test_warm_verifies_and_fails_each_newer_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str
) -> None:
    data = ramp(200_000, seed=7)  # four 64 KiB blocks
    digest = _folded(algorithm, data, [])
    result, out = _warm(tmp_path / "ok", monkeypatch, data, f"{algorithm}:{B64(digest).decode()}")
    assert result.objects == 1 and result.unverified == 0 and not result.mismatched, out
    assert "warm: a.bin: cached, checksum ok" in out
    wrong = bytes([digest[0] ^ 1]) + digest[1:]
    result, out = _warm(tmp_path / "bad", monkeypatch, data, f"{algorithm}:{B64(wrong).decode()}")
    assert result.mismatched == ["a.bin"], out


def test_a_checksum_modelfs_has_no_implementation_of_is_said_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 32-byte BLAKE3 is not a SHA-256 of the same size: it is not checked as one."""
    data = ramp(100_000)
    value = B64(hashlib.sha256(data).digest()).decode()
    result, out = _warm(tmp_path, monkeypatch, data, f"blake3:{value}")
    assert result.objects == 1 and result.unverified == 1 and not result.mismatched, out
    assert "warm: a.bin: cached (not verified: its checksum is BLAKE3, which modelfs has no implementation of)" in out
