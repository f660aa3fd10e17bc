"""The cache tier in front of a web server (an https:// source, keyed by URL + ETag), on
loopback: bytes through the tier, hits on a second node, and what the tier refuses."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.testing.fakegcs import free_port
from modelfs.testing.fleet import LOOPBACK, TierReplica, tier_replica
from modelfs.testing.mounts import mounted
from modelfs.testing.nginx import Nginx
from modelfs.testing.s3server import S3Server

pytestmark = pytest.mark.skipif(
    not Path("/usr/lib/nginx/modules/ngx_http_js_module.so").exists(), reason="needs libnginx-mod-http-js"
)

BLOCK = 1 << 20
SIZE = 5 * BLOCK + 12345


@pytest.fixture
def published(web: Nginx) -> tuple[str, bytes]:
    top = f"tier-{uuid.uuid4().hex[:8]}"
    data = os.urandom(SIZE)
    web.put(f"{top}/m.bin", data)
    return top, data


@pytest.fixture
def tier(web: Nginx, published: tuple[str, bytes], tmp_path: Path) -> Iterator[TierReplica]:
    top, _ = published
    origin = web.url("", tls=True).rstrip("/")
    with tier_replica(
        LOOPBACK,
        tmp_path / "tier",
        web.url(f"strong/{top}/", tls=True),
        origin,
        slice_size="1m",
        port=free_port(),
        origin_side_port=free_port(),
        ca_file=str(web.ca_cert),
        origin_name="localhost",  # nginx checks names, not IP addresses; the test CA signed both
    ) as replica:
        yield replica


def test_https_source_through_the_tier(
    web: Nginx, published: tuple[str, bytes], tier: TierReplica, tmp_path: Path
) -> None:
    top, data = published
    options = ("--ca-cert", str(web.ca_cert), "--block-size", "1M", "--cache-url", tier.url, "--anonymous")
    for node in ("a", "b"):
        with mounted(
            web.url(f"strong/{top}/m.bin", tls=True), tmp_path / f"mnt-{node}", tmp_path / f"c-{node}", *options
        ) as mnt:
            assert hashlib.sha256((mnt / "m.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
            tier_stats = json.loads(os.getxattr(mnt, "user.modelfs.stats"))["tier"]
            assert tier_stats["tier_bytes"] == SIZE and tier_stats["fallbacks"] == 0, tier_stats
    log = tier.access_log()
    assert log.count("cache=MISS") == 6 and log.count("cache=HIT") == 6, log


def test_a_presigned_url_is_not_read_through_the_tier_nor_a_query_logged(
    web: Nginx, published: tuple[str, bytes], tier: TierReplica, tmp_path: Path
) -> None:
    """A URL's query string (a presigned URL's signature) is a secret: the node reads such a
    source from the origin, never through the tier; and the tier logs no query string."""
    top, data = published
    secret = "X-Amz-Signature=SECRETSIG0123"
    url = web.url(f"strong/{top}/m.bin", tls=True) + f"?{secret}"
    options = ("--ca-cert", str(web.ca_cert), "--block-size", "1M", "--cache-url", tier.url, "--anonymous")
    with mounted(url, tmp_path / "mnt", tmp_path / "c", *options) as mnt:
        assert hashlib.sha256((mnt / "m.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
        tier_stats = json.loads(os.getxattr(mnt, "user.modelfs.stats"))["tier"]
        assert tier_stats["tier_bytes"] == 0 and tier_stats["bypass_bytes"] == SIZE, tier_stats
    assert "SECRETSIG" not in tier.access_log()
    # Whatever a client sends, the access log has the path without the query.
    head = urllib.request.Request(web.url(f"strong/{top}/m.bin"), method="HEAD")
    etag = urllib.request.urlopen(head, timeout=30).headers["ETag"]
    request = urllib.request.Request(
        tier.url + f"/strong/{top}/m.bin?{secret}", headers={"Range": "bytes=0-99", "If-Match": etag}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 206 and resp.read() == data[:100]
    log = tier.access_log()
    assert f"/strong/{top}/m.bin" in log and "SECRETSIG" not in log, log


def test_an_nginx_etag_of_mtime_and_size_is_not_read_through_the_tier(web: Nginx, tmp_path: Path) -> None:
    """nginx's ETag is the mtime and size: a file replaced by other bytes of the same size and
    mtime (cp -p, rsync -t, SOURCE_DATE_EPOCH builds) keeps it. Through the tier, whose
    entries never expire, a new node would get the old bytes forever; it gets the new ones."""
    top = f"tier-{uuid.uuid4().hex[:8]}"
    old, new = os.urandom(2 * BLOCK + 99), os.urandom(2 * BLOCK + 99)
    web.put(f"{top}/m.bin", old, mtime=1_000_000_000)
    origin = web.url("", tls=True).rstrip("/")
    with tier_replica(
        LOOPBACK,
        tmp_path / "tier",
        web.url(f"{top}/", tls=True),
        origin,
        slice_size="1m",
        port=free_port(),
        origin_side_port=free_port(),
        ca_file=str(web.ca_cert),
        origin_name="localhost",
    ) as tier:
        options = ("--ca-cert", str(web.ca_cert), "--block-size", "1M", "--cache-url", tier.url, "--anonymous")
        url = web.url(f"{top}/m.bin", tls=True)
        with mounted(url, tmp_path / "mnt-a", tmp_path / "c-a", *options) as mnt:
            assert hashlib.sha256((mnt / "m.bin").read_bytes()).digest() == hashlib.sha256(old).digest()
        web.put(f"{top}/m.bin", new, mtime=1_000_000_000)
        with mounted(url, tmp_path / "mnt-b", tmp_path / "c-b", *options) as mnt:
            assert hashlib.sha256((mnt / "m.bin").read_bytes()).digest() == hashlib.sha256(new).digest()
            tier_stats = json.loads(os.getxattr(mnt, "user.modelfs.stats"))["tier"]
            assert tier_stats["tier_bytes"] == 0, tier_stats
        assert "cache=" not in tier.access_log()


def test_a_replica_whose_cache_disk_is_full_makes_room_and_serves_misses_again(
    web: Nginx, published: tuple[str, bytes], tmp_path: Path
) -> None:
    """The replica's cache on a file system that fills (a 3 MiB tmpfs, room for two 1 MiB
    slices): the third miss is cut short (ENOSPC, never cached). nginx's cache manager then
    evicts to keep min_free free, and misses are served whole, and cached, again; without
    min_free every later miss failed for as long as the disk stayed full."""
    top, data = published
    cache = tmp_path / "tier" / "cache"
    cache.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0755", "tmpfs", str(cache)], check=True)
    try:
        with tier_replica(
            LOOPBACK,
            tmp_path / "tier",
            web.url(f"strong/{top}/", tls=True),
            web.url("", tls=True).rstrip("/"),
            slice_size="1m",
            port=free_port(),
            origin_side_port=free_port(),
            ca_file=str(web.ca_cert),
            origin_name="localhost",
            min_free="1m",
        ) as tier:
            head = urllib.request.Request(web.url(f"strong/{top}/m.bin"), method="HEAD")
            etag = urllib.request.urlopen(head, timeout=30).headers["ETag"]

            def get(index: int) -> bytes:
                """Slice ``index`` through the tier: the body, b"" if it was cut short."""
                first = index * BLOCK
                headers = {"Range": f"bytes={first}-{first + BLOCK - 1}", "If-Match": etag, "X-Modelfs-Size": str(SIZE)}
                request = urllib.request.Request(tier.url + f"/strong/{top}/m.bin", headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=30) as resp:
                        assert resp.status == 206
                        return resp.read()
                except http.client.IncompleteRead:
                    return b""

            got = [get(index) for index in range(3)]
            assert got[:2] == [data[:BLOCK], data[BLOCK : 2 * BLOCK]]
            assert got[2] == b"", "the third slice fit a full disk"
            assert "pwrite" in (tmp_path / "tier" / "error.log").read_text()  # (ENOSPC, or written only in part)
            # The cache manager makes room within ~10 s (nginx checks min_free at least that
            # often): polled for, the condition bounded by a deadline.
            deadline = time.monotonic() + 120
            while (body := get(2)) == b"":
                assert time.monotonic() < deadline, "the full replica never served a miss again"
                time.sleep(0.2)  # polling for the condition above, not waiting for time to pass
            assert body == data[2 * BLOCK : 3 * BLOCK]
            assert f" 206 {BLOCK} cache=MISS" in tier.access_log().splitlines()[-1]
            assert get(2) == body and f" 206 {BLOCK} cache=HIT" in tier.access_log().splitlines()[-1]
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)


def test_the_tier_serves_only_pinned_reads_of_its_paths(
    web: Nginx, published: tuple[str, bytes], tier: TierReplica
) -> None:
    top, _ = published

    def get(path: str, **headers: str) -> int:
        request = urllib.request.Request(tier.url + path, headers={"Range": "bytes=0-99", **headers})
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    etag = urllib.request.urlopen(
        urllib.request.Request(tier.url + f"/strong/{top}/m.bin", method="HEAD", headers={"If-Match": "*"}), timeout=30
    )
    assert etag.status in (200, 206)
    assert get(f"/strong/{top}/m.bin", **{"If-Match": '"nope"'}) == 412  # a version the origin does not have
    assert get(f"/strong/{top}/m.bin") == 400  # unpinned: never cached
    assert get("/elsewhere/m.bin", **{"If-Match": '"x"'}) == 403  # not the configured directory
    assert get(f"/strong/{top}/../private/x", **{"If-Match": '"x"'}) in (400, 403)
    assert get(f"/strong/{top}/%2e%2e/private/x", **{"If-Match": '"x"'}) in (400, 403)
    # Dot-segments after an encoded slash: the origin gets the raw path, which may name
    # another object than the normalised one.
    assert get(f"/strong/{top}/x/..%2Fm.bin", **{"If-Match": '"x"'}) == 400
    assert get(f"/strong/{top}/x%2F..%2Fm.bin", **{"If-Match": '"x"'}) == 400
    # A read with a body is refused: passed on, the body would be read by the fill stage as
    # the next request on its kept-alive connection (request smuggling).
    conn = http.client.HTTPConnection("127.0.0.1", int(tier.url.rpartition(":")[2]), timeout=30)
    conn.request("GET", f"/strong/{top}/m.bin", body=b"GET /elsewhere HTTP/1.1\r\n\r\n", headers={"If-Match": '"x"'})
    assert conn.getresponse().status == 400
    conn.close()
    assert get("/.modelfs-tier/health") == 200
    head = urllib.request.Request(tier.url + "/.modelfs-tier/health", method="HEAD")
    assert urllib.request.urlopen(head, timeout=30).status == 200
    # The fill stage alone is gone: nginx still answers, but the replica is not ready.
    tier.fill.kill()
    tier.fill.wait()
    assert get("/.modelfs-tier/health") == 502


def test_s3_source_through_a_tier_that_signs_its_own_requests(s3: S3Server, tmp_path: Path) -> None:
    """The tier reads the bucket with its own keys (SigV4 in tier.js); the node's stay home."""
    bucket = f"tier-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(bucket)
    data = os.urandom(3 * BLOCK + 777)
    s3.put(bucket, "m/weights.bin", data)
    keys = tmp_path / "aws-keys"
    keys.write_text(f"{s3.reader.access_key} {s3.reader.secret_key}\n")
    with tier_replica(
        LOOPBACK,
        tmp_path / "tier",
        f"s3://{bucket}",
        s3.url,
        slice_size="1m",
        port=free_port(),
        origin_side_port=free_port(),
        token_file=str(keys),
        auth="aws-sigv4",
    ) as tier:
        options = ("--endpoint-url", s3.url, "--block-size", "1M", "--cache-url", tier.url)
        with mounted(f"s3://{bucket}/m", tmp_path / "mnt", tmp_path / "c", *options, env=s3.env()) as mnt:
            assert (mnt / "weights.bin").read_bytes() == data
            tier_stats = json.loads(os.getxattr(mnt, "user.modelfs.stats"))["tier"]
            assert tier_stats["tier_bytes"] == len(data) and tier_stats["fallbacks"] == 0, tier_stats
        assert tier.access_log().count("cache=MISS") == 4
        # With a wrong secret the origin refuses the tier (its signature checked): every block
        # comes from the origin, and the bytes are still right.
        keys.write_text(f"{s3.reader.access_key} not-the-secret\n")
        s3.put(bucket, "m/other.bin", data[::-1])
        with mounted(f"s3://{bucket}/m", tmp_path / "mnt3", tmp_path / "c3", *options, env=s3.env()) as mnt:
            assert (mnt / "other.bin").read_bytes() == data[::-1]
            tier_stats = json.loads(os.getxattr(mnt, "user.modelfs.stats"))["tier"]
            assert tier_stats["tier_bytes"] == 0 and tier_stats["origin_bytes"] == len(data), tier_stats


def test_a_directory_whose_name_is_percent_encoded(web: Nginx, tmp_path: Path) -> None:
    """The raw path (%-encoded) goes to the origin, but nginx's ``location`` matches the decoded
    ``$uri``: a directory with a space, a UTF-8 letter, parentheses and a doubled slash is
    served by the tier (hits on the second node), not refused with every block from the origin."""
    top = f"tier-{uuid.uuid4().hex[:8]}"
    data = os.urandom(3 * BLOCK + 4321)
    web.put(f"{top}/my models ü(1)/x/m.bin", data)
    # (Under /strong/: nginx's own ETag is made of mtime and size, a weak version never sent
    # through the tier; that location hides Last-Modified, so its ETag counts as strong.)
    directory = f"strong/{top}/my%20models%20%C3%BC%281%29//x/"
    with tier_replica(
        LOOPBACK,
        tmp_path / "tier",
        web.url(directory, tls=True),
        web.url("", tls=True).rstrip("/"),
        slice_size="1m",
        port=free_port(),
        origin_side_port=free_port(),
        ca_file=str(web.ca_cert),
        origin_name="localhost",
    ) as tier:
        options = ("--ca-cert", str(web.ca_cert), "--block-size", "1M", "--cache-url", tier.url, "--anonymous")
        for node in ("a", "b"):
            source = web.url(directory + "m.bin", tls=True)
            with mounted(source, tmp_path / f"mnt-{node}", tmp_path / f"c-{node}", *options) as mnt:
                assert (mnt / "m.bin").read_bytes() == data
                tier_stats = json.loads(os.getxattr(mnt, "user.modelfs.stats"))["tier"]
                assert tier_stats["tier_bytes"] == len(data) and tier_stats["fallbacks"] == 0, tier_stats
        log = tier.access_log()
        assert log.count("cache=MISS") == 4 and log.count("cache=HIT") == 4, log
        # Outside the directory (decoded or raw) is still refused.
        request = urllib.request.Request(
            tier.url + f"/strong/{top}/my%20models%20%C3%BC%281%29/y/m.bin", headers={"If-Match": '"x"'}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 403
        refused.value.close()
