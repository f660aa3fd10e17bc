"""A store (or a gateway or caching proxy in front of it) that ignores the version pin and sends
no version header: GCS's ``generation=`` and X-Goog-Generation, S3's If-Match and ETag.

It serves whatever object it has now. When that object's size differs from the size the
listing gave with the pinned version, the Content-Range total says so, and the read is
VersionChanged (ESTALE), never the other object's bytes (docs/semantics.md, "Versions: never
a mix"). Before, the GCS and S3 reads did not know the pinned size and returned the first
bytes of the other object.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from modelfs.backends.base import Backend
from modelfs.backends.gcs import GCSBackend
from modelfs.backends.s3 import S3Backend
from modelfs.cache.blocks import ObjectRef
from modelfs.config import parse_source
from modelfs.errors import VersionChanged
from modelfs.testing.servers import QuietHandler, loopback_http

from .conftest import BS, StoreFactory
from .test_s3_backend import aws_env

__all__ = ["aws_env"]  # the fixture, imported to be used by name

LISTED = bytes(range(256)) * 40  # 10,240 bytes: the version the listing (and stat) gave
OTHER = bytes(255 - (i % 256) for i in range(2 * len(LISTED)))  # what the store serves now


class _Liar(QuietHandler):
    """GCS's JSON API and media GETs, and path-style S3, that pin nothing: metadata of the listed
    object, the bytes of another (larger) one, no version header on a GET."""

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # S3's stat: the listed version
        self._send(200, {"ETag": '"v1"', "Last-Modified": "Thu, 01 Jan 2026 00:00:00 GMT"}, LISTED)

    def do_GET(self) -> None:
        if self.path.startswith("/storage/v1/"):  # GCS's stat
            info = {"name": "m/x.bin", "size": str(len(LISTED)), "generation": "1", "updated": "2026-01-01T00:00:00Z"}
            self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode())
            return
        first, last = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
        body = OTHER[first : last + 1]
        self._send(206, {"Content-Range": f"bytes {first}-{first + len(body) - 1}/{len(OTHER)}"}, body)


@pytest.fixture
def liar() -> Iterator[str]:
    with loopback_http(_Liar) as url:
        yield url


def _gcs(url: str, monkeypatch: pytest.MonkeyPatch) -> GCSBackend:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    return GCSBackend(parse_source("gs://bkt/m"), anonymous=True, read_timeout=10)


def _s3(url: str) -> S3Backend:
    return S3Backend(parse_source("s3://bkt/m"), endpoint_url=url, anonymous=True, read_timeout=10)


async def _check_refused(backend: Backend, make_store: StoreFactory, caplog: pytest.LogCaptureFixture) -> None:
    info = await backend.stat("x.bin")
    assert info.size == len(LISTED)
    ref = ObjectRef(backend.object_key("x.bin"), "x.bin", info.version, info.size)
    # A block alone, and a joined read-ahead GET of two blocks: the same check.
    for join_blocks in (1, 2):
        store = await make_store(backend, join_blocks=join_blocks)
        with pytest.raises(VersionChanged, match="size 10240 is now 20480"):
            await store.get(ref, 0)
        assert store.stats.errors >= 1
    with pytest.raises(VersionChanged):  # a small random read (read_small) too
        await (await make_store(backend)).read_small(ref, 100, 10, BS)
    assert caplog.text.count("without") == 1  # the missing version header, said once
    await backend.aclose()


async def test_gcs_another_objects_bytes_are_never_served(
    liar: str, make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await _check_refused(_gcs(liar, monkeypatch), make_store, caplog)
    assert "without X-Goog-Generation" in caplog.text


@pytest.mark.usefixtures("aws_env")
async def test_s3_another_objects_bytes_are_never_served(
    liar: str, make_store: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await _check_refused(_s3(liar), make_store, caplog)
    assert "without ETag" in caplog.text
