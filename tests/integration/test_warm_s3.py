"""``modelfs warm s3://…`` against moto: each object is checked against the checksum S3 keeps of it.

S3 keeps the checksum an object was uploaded with (CRC32, CRC32C, CRC64NVME, SHA-1, SHA-256) and
gives it on HeadObject with ChecksumMode=ENABLED. warm checks the whole-object ones, fails on a
mismatch as for gs:// (one line, exit 1, the object's blocks dropped from the cache), and says
why it did not check the others: a multipart upload's COMPOSITE checksum is of its parts'
checksums, not of its bytes. A CRC64NVME (S3's default since 2025) is always of the whole
object, multipart uploads included; the value moto keeps is checked against a plain Python
CRC-64/NVME here, so the test does not only trust awscrt (which warm, botocore and moto use).
"""

from __future__ import annotations

import base64
import hashlib
import random
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import crc32c
import pytest
from awscrt.checksums import XXHash
from botocore.config import Config

from modelfs.testing.crc64nvme import crc64nvme_b64
from modelfs.testing.faultproxy import fault_proxy
from modelfs.testing.mounts import mounted, run_modelfs
from modelfs.testing.s3server import REGION, S3Server

OPTIONS = ("--block-size", "64K", "--memory-cache", "1536K")


def _bucket(s3: S3Server) -> str:
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(bucket)
    return bucket


def _lines(stderr: str) -> dict[str, str]:
    """Each object's line of warm's output: name → what it said."""
    out = {}
    for line in stderr.splitlines():
        if line.startswith("warm: ") and ": " in line[6:]:
            name, _, status = line[6:].partition(": ")
            out[name] = status
    return out


# The checksums S3 added in 2025 beside the first five, computed here: botocore has no MD5 one
# and takes the xxHash ones from awscrt, kept from it in this process (as for CRC64NVME).
_GIVEN: dict[str, Callable[[bytes], bytes]] = {
    "CRC64NVME": lambda body: base64.b64decode(crc64nvme_b64(body)),
    "SHA512": lambda body: hashlib.sha512(body).digest(),
    "MD5": lambda body: hashlib.md5(body).digest(),
    "XXHASH64": lambda body: XXHash.compute_xxhash64(body),
    "XXHASH3": lambda body: XXHash.compute_xxhash3_64(body),
    "XXHASH128": lambda body: XXHash.compute_xxhash3_128(body),
}


def _checksum(algorithm: str, body: bytes) -> dict[str, str]:
    """An upload's checksum arguments. A CRC64NVME's value is given, not left to botocore: in
    a process that imported modelfs' S3 backend botocore cannot compute it (it is kept from
    awscrt, docs/backends.md), as a user's uploader without awscrt cannot either; so are the
    others of _GIVEN (moto keeps what it is given, as S3 checks and keeps it)."""
    if algorithm in _GIVEN:
        value = base64.b64encode(_GIVEN[algorithm](body)).decode()
        return {"ChecksumAlgorithm": algorithm, f"Checksum{algorithm}": value}
    return {"ChecksumAlgorithm": algorithm}


def test_warm_checks_each_checksum_s3_keeps(s3: S3Server, tmp_path: Path) -> None:
    bucket = _bucket(s3)
    client = s3.client()
    data = {name: random.Random(i).randbytes(150_000 + i) for i, name in enumerate("abcdef")}
    client.put_object(Bucket=bucket, Key="m/crc32.bin", Body=data["a"], ChecksumAlgorithm="CRC32")
    crc = base64.b64encode(crc32c.crc32c(data["b"]).to_bytes(4, "big")).decode()
    client.put_object(Bucket=bucket, Key="m/crc32c.bin", Body=data["b"], ChecksumAlgorithm="CRC32C", ChecksumCRC32C=crc)
    client.put_object(Bucket=bucket, Key="m/sha1.bin", Body=data["c"], ChecksumAlgorithm="SHA1")
    client.put_object(Bucket=bucket, Key="m/sha256.bin", Body=data["d"], ChecksumAlgorithm="SHA256")
    client.put_object(Bucket=bucket, Key="m/crc64.bin", Body=data["e"], **_checksum("CRC64NVME", data["e"]))
    head = client.head_object(Bucket=bucket, Key="m/crc64.bin", ChecksumMode="ENABLED")
    assert head["ChecksumCRC64NVME"] == crc64nvme_b64(data["e"])  # what moto keeps is CRC-64/NVME
    bare = boto3.client(
        "s3",
        endpoint_url=s3.url,
        region_name=REGION,
        aws_access_key_id=s3.admin.access_key,
        aws_secret_access_key=s3.admin.secret_key,
        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"),
    )
    bare.put_object(Bucket=bucket, Key="m/bare.bin", Body=data["f"])  # uploaded without a checksum
    cache = tmp_path / "cache"
    options = ("--endpoint-url", s3.url, "--cache-dir", str(cache), *OPTIONS)
    result = run_modelfs("warm", f"s3://{bucket}/m", *options, env=s3.env())
    assert result.returncode == 0, result.stderr
    lines = _lines(result.stderr)
    for name in ("crc32.bin", "crc32c.bin", "crc64.bin", "sha1.bin", "sha256.bin"):
        assert lines[name] == "cached, checksum ok", result.stderr
    assert lines["bare.bin"] == "cached (no checksum to verify)"
    # What warm cached is what the mount then reads, without a GET.
    with mounted(f"s3://{bucket}/m", tmp_path / "mnt", cache, *options[:2], *OPTIONS, env=s3.env()) as mnt:
        assert (mnt / "sha256.bin").read_bytes() == data["d"]


@pytest.mark.parametrize("algorithm", ["SHA256", "CRC64NVME", "XXHASH128"])
def test_warm_fails_when_s3_serves_other_bytes(s3: S3Server, tmp_path: Path, algorithm: str) -> None:
    """A server that answers with other bytes of the right length (one flipped by a proxy on
    every GET of bad.bin): warm ends with one line naming it and exit 1, and drops its blocks,
    so a mount that follows reads the object again instead of the bytes that failed."""
    bucket = _bucket(s3)
    good, bad = random.Random(1).randbytes(200_000), random.Random(2).randbytes(200_000)
    for name, body in (("good.bin", good), ("bad.bin", bad)):
        s3.client().put_object(Bucket=bucket, Key=f"m/{name}", Body=body, **_checksum(algorithm, body))
    cache = tmp_path / "cache"
    with fault_proxy(s3.url, rate=1.0, kinds=["corrupt"], fault_paths=r"/bad\.bin$", keep_host=True, seed=5) as proxy:
        result = run_modelfs(
            "warm", f"s3://{bucket}/m", "--endpoint-url", proxy.url, "--cache-dir", str(cache), *OPTIONS, env=s3.env()
        )
        assert proxy.counters()["fault_corrupt"] >= 1
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == "modelfs: checksum mismatch in 1 object(s): bad.bin", result.stderr
    assert _lines(result.stderr)["good.bin"] == "cached, checksum ok"
    assert "Traceback" not in result.stderr
    options = ("--endpoint-url", s3.url, *OPTIONS, "--no-eager")
    with mounted(f"s3://{bucket}/m", tmp_path / "mnt", cache, *options, env=s3.env()) as mnt:
        assert hashlib.sha256((mnt / "bad.bin").read_bytes()).digest() == hashlib.sha256(bad).digest()
        assert (mnt / "good.bin").read_bytes() == good


def test_warm_checks_s3s_newer_checksums(s3: S3Server, tmp_path: Path) -> None:
    """SHA-512, MD5, XXHASH64, XXHASH3 and XXHASH128 (S3's since 2025): HeadObject gives them as
    it gives the others, and warm checks each (it used to say "no checksum to verify")."""
    bucket = _bucket(s3)
    client = s3.client()
    data = {}
    for i, algorithm in enumerate(("SHA512", "MD5", "XXHASH64", "XXHASH3", "XXHASH128")):
        data[algorithm] = body = random.Random(10 + i).randbytes(150_000 + i)
        client.put_object(Bucket=bucket, Key=f"m/{algorithm}.bin", Body=body, **_checksum(algorithm, body))
        head = client.head_object(Bucket=bucket, Key=f"m/{algorithm}.bin", ChecksumMode="ENABLED")
        assert head[f"Checksum{algorithm}"] == _checksum(algorithm, body)[f"Checksum{algorithm}"]
    options = ("--endpoint-url", s3.url, "--cache-dir", str(tmp_path / "cache"), *OPTIONS)
    result = run_modelfs("warm", f"s3://{bucket}/m", *options, env=s3.env())
    assert result.returncode == 0, result.stderr
    lines = _lines(result.stderr)
    assert {name: lines[f"{name}.bin"] for name in data} == dict.fromkeys(data, "cached, checksum ok"), result.stderr


def test_warm_skips_a_multipart_composite_checksum(s3: S3Server, tmp_path: Path) -> None:
    """A multipart upload's CRC32 checksum is COMPOSITE by default (a checksum of its parts'
    checksums): no hash of the bytes can match it, so warm says so and does not fail. One
    uploaded as FULL_OBJECT is of the bytes, and is checked; so is a CRC64NVME, which is only
    ever FULL_OBJECT (moto's HEAD does not say the type of either)."""
    bucket = _bucket(s3)
    client = s3.client()
    rng = random.Random(3)
    parts = [rng.randbytes(5 << 20), rng.randbytes(1000)]  # (moto's least part: 5 MiB)
    for name, algorithm, kind in (
        ("composite.bin", "CRC32", None),
        ("full.bin", "CRC32", "FULL_OBJECT"),
        ("crc64.bin", "CRC64NVME", None),
    ):
        extra = {"ChecksumType": kind} if kind else {}
        upload = client.create_multipart_upload(Bucket=bucket, Key=f"m/{name}", ChecksumAlgorithm=algorithm, **extra)
        done = []
        for number, part in enumerate(parts, 1):
            answer = client.upload_part(
                Bucket=bucket,
                Key=f"m/{name}",
                UploadId=upload["UploadId"],
                PartNumber=number,
                Body=part,
                **_checksum(algorithm, part),
            )
            field = f"Checksum{algorithm}"
            done.append({"PartNumber": number, "ETag": answer["ETag"], field: answer[field]})
        client.complete_multipart_upload(
            Bucket=bucket, Key=f"m/{name}", UploadId=upload["UploadId"], MultipartUpload={"Parts": done}
        )
    head = client.head_object(Bucket=bucket, Key="m/crc64.bin", ChecksumMode="ENABLED")
    assert head["ChecksumCRC64NVME"] == crc64nvme_b64(b"".join(parts))  # of the whole object
    options = ("--endpoint-url", s3.url, "--cache-dir", str(tmp_path / "cache"), "--block-size", "1M")
    result = run_modelfs("warm", f"s3://{bucket}/m", *options, env=s3.env())
    assert result.returncode == 0, result.stderr
    lines = _lines(result.stderr)
    assert lines["full.bin"] == "cached, checksum ok", result.stderr
    assert lines["crc64.bin"] == "cached, checksum ok", result.stderr
    assert lines["composite.bin"] == (
        "cached (not verified: its CRC32 is a multipart upload's COMPOSITE checksum of its 2 parts, "
        "not one of the whole object)"
    ), result.stderr
