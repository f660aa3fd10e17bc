"""What the GCS and S3 backends do with a listing that lies: names outside the prefix asked
for are dropped (never shown in the wrong directory), and hostile sizes are skipped."""

from __future__ import annotations

import json
from typing import Any

import pytest

from modelfs.backends.gcs import GCSBackend
from modelfs.backends.gcs_scan import parse_listing
from modelfs.backends.s3 import S3Backend
from modelfs.config import parse_source
from modelfs.errors import BackendError
from modelfs.inodes import Namespace
from modelfs.testing.servers import QuietHandler, loopback_http
from modelfs.walk import walk_objects

from .test_s3_backend import aws_env, scripted

__all__ = ["aws_env"]  # the fixture, imported to be used by name


def gcs_answering(monkeypatch: pytest.MonkeyPatch, doc: dict[str, Any]) -> GCSBackend:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    backend = GCSBackend(parse_source("gs://bkt/m"), anonymous=True)
    body = json.dumps(doc).encode()
    monkeypatch.setattr(backend, "_list_page", lambda params: parse_listing(body))
    return backend


def gcs_item(name: str, size: object = "1") -> dict[str, Any]:
    return {"name": name, "size": size, "generation": "7", "updated": "2026-01-01T00:00:00Z"}


async def test_gcs_drops_names_outside_the_prefix(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    doc = {
        "items": [gcs_item("m/a/ok"), gcs_item("other/evil"), gcs_item("m/b")],
        "prefixes": ["m/a/sub/", "x/sub/"],
    }
    backend = gcs_answering(monkeypatch, doc)
    page = await backend.list_dir("a/")
    assert [o.name for o in page.objects] == ["a/ok"] and page.prefixes == ["a/sub/"]
    assert "named 2 object(s) outside it (e.g. 'other/evil')" in caplog.text  # and m/b
    assert "named 1 object(s) outside it (e.g. 'x/sub/')" in caplog.text
    everything = await backend.list_objects()
    assert [o.name for o in everything] == ["a/ok", "b"]


LIES_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>bkt</Name><Prefix>m/a/</Prefix>'
    b"<IsTruncated>false</IsTruncated>"
    b"<Contents><Key>m/a/ok</Key><ETag>&quot;e&quot;</ETag><Size>10</Size></Contents>"
    b"<Contents><Key>other/evil</Key><ETag>&quot;e&quot;</ETag><Size>10</Size></Contents>"
    b"<CommonPrefixes><Prefix>m/a/sub/</Prefix></CommonPrefixes>"
    b"<CommonPrefixes><Prefix>x/</Prefix></CommonPrefixes>"
    b"</ListBucketResult>"
)


@pytest.mark.usefixtures("aws_env")
async def test_s3_drops_names_outside_the_prefix(caplog: pytest.LogCaptureFixture) -> None:
    backend = S3Backend(parse_source("s3://bkt/m"), endpoint_url="http://127.0.0.1:9", anonymous=True)
    scripted(backend, 200, LIES_XML)
    page = await backend.list_dir("a/")
    assert [o.name for o in page.objects] == ["a/ok"] and page.prefixes == ["a/sub/"]
    assert "named 1 object(s) outside it (e.g. 'other/evil')" in caplog.text
    assert "named 1 object(s) outside it (e.g. 'x/')" in caplog.text
    assert [o.name for o in await backend.list_objects()] == ["a/ok"]


async def test_gcs_skips_objects_whose_size_is_not_a_byte_count(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only decimal digits below 2**63: '-5', ' 5', '1e3' and 2**63 skip their object (one
    warning each), never the whole listing."""
    sizes = ["-5", " 5", "1e3", str(1 << 63), 12, "12", "0", None]
    doc = {"items": [gcs_item(f"m/f{i}", size) for i, size in enumerate(sizes)]}
    backend = gcs_answering(monkeypatch, doc)
    page = await backend.list_dir("")
    assert [(o.name, o.size) for o in page.objects] == [("f5", 12), ("f6", 0), ("f7", 0)]
    assert caplog.text.count("the JSON API sent an invalid size") == 5


async def test_a_limited_gcs_page_keeps_its_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-result probe answered empty with a token passes the token on (the namespace follows it)."""
    backend = gcs_answering(monkeypatch, {"items": [], "nextPageToken": "more"})
    assert (await backend.list_dir("d/", limit=1)).next_token == "more"


LIMITED_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>bkt</Name><Prefix>m/d/</Prefix>'
    b"<KeyCount>0</KeyCount><IsTruncated>true</IsTruncated><NextContinuationToken>more</NextContinuationToken>"
    b"</ListBucketResult>"
)


@pytest.mark.usefixtures("aws_env")
async def test_a_limited_s3_page_keeps_its_token() -> None:
    backend = S3Backend(parse_source("s3://bkt/m"), endpoint_url="http://127.0.0.1:9", anonymous=True)
    scripted(backend, 200, LIMITED_XML)
    assert (await backend.list_dir("d/", limit=1)).next_token == "more"


def endless_listing(pages: list[int]) -> type[QuietHandler]:
    """An S3 stub whose every ListObjectsV2 page lists m/a and m/b again with a fresh
    continuation token (a store whose pages go back, or a token cycle longer than any window
    of tokens), for SENT_PAGES pages: then it ends, so a client that never notices ends too."""

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            pages.append(1)
            more = len(pages) < SENT_PAGES
            body = (
                b'<?xml version="1.0"?><ListBucketResult><Name>bkt</Name><Prefix>m/</Prefix>'
                b"<IsTruncated>%s</IsTruncated><NextContinuationToken>t%d</NextContinuationToken>"
                b"<Contents><Key>m/a</Key><ETag>&quot;e&quot;</ETag><Size>1</Size></Contents>"
                b"<Contents><Key>m/b</Key><ETag>&quot;e&quot;</ETag><Size>1</Size></Contents>"
                b"</ListBucketResult>"
            ) % (b"true" if more else b"false", len(pages))
            # (one write: headers and body in two would wait for a delayed ACK on each page)
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    return Handler


SENT_PAGES = 1500  # more than readdir's 1,000 pages without a new name


@pytest.mark.parametrize("reader", ["readdir", "walk"])
@pytest.mark.usefixtures("aws_env")
async def test_s3_pages_that_go_back_with_fresh_tokens_end_in_an_error(reader: str) -> None:
    """readdir and a walk (``modelfs warm``, ``--eager-model``) of such a listing end with one
    BackendError. readdir counts the names a page adds (none here: 1,000 such pages are an
    error); a walk counted the names a page lists and went on for all 1,500 pages, yielding
    m/a and m/b 1,500 times (for ever, from a store that never ends). Now a page that lists a
    name before one an earlier page gave is an error at once (stores list in byte order)."""
    pages: list[int] = []
    with loopback_http(endless_listing(pages)) as endpoint:
        backend = S3Backend(parse_source("s3://bkt/m"), endpoint_url=endpoint, anonymous=True)
        with pytest.raises(BackendError, match="a listing without end"):
            if reader == "readdir":
                from .test_namespace import names

                ns = Namespace(backend, ttl=60, retry_deadline=1)
                await names(ns, ns.root)
            else:
                async for _ in walk_objects(backend, retry_deadline=1):
                    pass
    assert len(pages) < SENT_PAGES
