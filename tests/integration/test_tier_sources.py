"""The cache tier in front of a web server (an https:// source, keyed by URL + ETag), on
loopback: bytes through the tier, hits on a second node, and what the tier refuses."""

from __future__ import annotations

import hashlib
import json
import os
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
        web.url(f"{top}/", tls=True),
        origin,
        slice_size="1m",
        port=free_port(),
        fill_port=free_port(),
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
            web.url(f"{top}/m.bin", tls=True), tmp_path / f"mnt-{node}", tmp_path / f"c-{node}", *options
        ) as mnt:
            assert hashlib.sha256((mnt / "m.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
            tier_stats = json.loads(os.getxattr(mnt, "user.modelfs.stats"))["tier"]
            assert tier_stats["tier_bytes"] == SIZE and tier_stats["fallbacks"] == 0, tier_stats
    log = tier.access_log()
    assert log.count("cache=MISS") == 6 and log.count("cache=HIT") == 6, log


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
        urllib.request.Request(tier.url + f"/{top}/m.bin", method="HEAD", headers={"If-Match": "*"}), timeout=30
    )
    assert etag.status in (200, 206)
    assert get(f"/{top}/m.bin", **{"If-Match": '"nope"'}) == 412  # a version the origin does not have
    assert get(f"/{top}/m.bin") == 400  # unpinned: never cached
    assert get("/elsewhere/m.bin", **{"If-Match": '"x"'}) == 403  # not the configured directory
    assert get(f"/{top}/../private/x", **{"If-Match": '"x"'}) in (400, 403)
    assert get(f"/{top}/%2e%2e/private/x", **{"If-Match": '"x"'}) in (400, 403)
    assert get("/.modelfs-tier/health") == 200
