"""What an https source may send to a cache tier: never a weak version (an ETag made of the
file's mtime and size, as nginx and Apache send by default, is one), never the URL's query
string (a presigned URL's signature), and always the size of the version it reads."""

from __future__ import annotations

import argparse
import email.utils
import logging

import pytest

from modelfs.backends import open_backend
from modelfs.backends.http import HTTPBackend, etag_is_strong, parse_version
from modelfs.backends.tiered import SIZE_HEADER, TieredBackend
from modelfs.config import Config, add_options, build_config, parse_source

from .test_http_backend import backend, serve

SIZE = 10240  # test_http_backend.DATA
MTIME = 1_000_000_000
LM = email.utils.formatdate(MTIME, usegmt=True)
NGINX = f'"{MTIME:x}-{SIZE:x}"'
APACHE = f'"{SIZE:x}-{MTIME * 1_000_000 + 123456:x}"'
APACHE_INODE = f'"2a1b3-{SIZE:x}-{MTIME * 1_000_000:x}"'


@pytest.mark.parametrize(
    ("etag", "size", "last_modified", "strong"),
    [
        (NGINX, SIZE, LM, False),  # nginx: "%x-%x" of mtime and size
        (APACHE, SIZE, LM, False),  # Apache: FileETag MTime Size (the default)
        (APACHE_INODE, SIZE, LM, False),  # Apache: FileETag INode MTime Size
        (APACHE, SIZE, None, False),  # (no Last-Modified: the size field tells)
        (f"W/{NGINX}", SIZE, LM, False),
        ('W/"0815"', SIZE, LM, False),
        (None, SIZE, LM, False),
        (NGINX, SIZE + 1, LM, True),  # the size field is not the size: not made of it
        (NGINX, SIZE, email.utils.formatdate(MTIME + 5, usegmt=True), True),
        ('"d41d8cd98f00b204e9800998ecf8427e"', SIZE, LM, True),  # a content hash (S3)
        (f'"d41d8cd98f00b204e9800998ecf8427e-{SIZE:x}"', SIZE, LM, True),  # S3 multipart (hash-parts)
        ('"abc-123"', SIZE, LM, True),
        ('"v7"', SIZE, LM, True),
    ],
)
def test_etags_made_of_mtime_and_size_are_weak(
    etag: str | None, size: int, last_modified: str | None, strong: bool
) -> None:
    assert etag_is_strong(etag, size, last_modified) is strong


async def test_an_nginx_etag_is_a_weak_version_never_sent_to_the_tier(caplog: pytest.LogCaptureFixture) -> None:
    """A file replaced by other bytes of the same size and mtime keeps nginx's ETag: as a
    strong version the tier (whose entries never expire) would serve the old bytes forever."""
    handler, requests = serve(etag=NGINX, last_modified=LM)
    b = backend(handler)
    with caplog.at_level(logging.WARNING):
        [info] = await b.list_objects()
    assert parse_version(info.version) == (SIZE, None, LM)
    assert "#run=" in info.version  # not reused by the next daemon either (docs/semantics.md)
    assert b.tier_target("m.bin", info.version) is None
    assert "modification time and size only" in caplog.text
    buf = bytearray(100)
    await b.read_range("m.bin", info.version, 0, memoryview(buf))
    assert requests[-1].headers["if-unmodified-since"] == LM and "if-match" not in requests[-1].headers
    await b.aclose()


async def test_a_strong_etag_goes_to_the_tier_with_the_size_and_no_query() -> None:
    handler, _ = serve(etag='"content-7"', last_modified=LM)
    b = backend(handler, "https://example.test/models/")
    b._manifest = None
    info = await b.stat("m.bin")
    target = b.tier_target("m.bin", info.version)
    assert target is not None
    assert target.path == "/models/m.bin" and target.size == SIZE
    assert dict(target.headers) == {"If-Match": '"content-7"', SIZE_HEADER: str(SIZE)}
    await b.aclose()


def test_a_url_with_a_query_string_is_never_read_through_the_tier(caplog: pytest.LogCaptureFixture) -> None:
    url = "https://example.test/models/m.bin?X-Amz-Signature=SECRETSIG&X-Amz-Expires=60"
    b = HTTPBackend(parse_source(url))
    version = f'{SIZE}/"content-7"'
    assert b.tier_target("m.bin", version) is None  # not the query, not even the path
    parser = argparse.ArgumentParser()
    add_options(parser)
    args = parser.parse_args(["--cache-url", "http://tier.test:8080"])
    config: Config = build_config(url, "/mnt", args, environ={})
    with caplog.at_level(logging.WARNING):
        tiered = open_backend(config)
    assert isinstance(tiered, TieredBackend)
    assert tiered.tier_target("m.bin", version) is None
    [line] = [r.getMessage() for r in caplog.records if "cache tier" in r.getMessage()]
    assert "query string" in line and "SECRETSIG" not in line and "X-Amz" not in line
