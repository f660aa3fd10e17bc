"""The client libraries' private attributes modelfs uses are still there and still work.

Each shim in modelfs/backends/private/ is checked twice: its ``verify()`` (which the shim's
docstring ties to the version bounds in pyproject.toml), and once on real library objects,
so an upgrade that moves an attribute fails here instead of silently taking a slower path.
"""

from __future__ import annotations

import http.client
import importlib
import io
import socket
import threading
from collections.abc import Iterator

import pytest

from modelfs.backends.private import PrivateAPIChanged, botocore_raw, gcs_client, httpcore_read_size, urllib3_fp

SHIMS = ["botocore_raw", "gcs_client", "httpcore_read_size", "urllib3_fp"]


@pytest.mark.parametrize("name", SHIMS)
def test_every_shim_verifies_against_the_installed_library(name: str) -> None:
    module = importlib.import_module(f"modelfs.backends.private.{name}")
    module.verify()


def test_every_private_module_is_checked_here() -> None:
    import pkgutil

    import modelfs.backends.private as package

    assert sorted(m.name for m in pkgutil.iter_modules(package.__path__)) == SHIMS


@pytest.fixture
def http_server() -> Iterator[int]:
    """A one-shot HTTP server on loopback answering one GET with a 102,400-byte body."""
    body = bytes(range(256)) * 400
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    thread.join(timeout=10)
    listener.close()


def test_urllib3_response_reads_through_http_client(http_server: int) -> None:
    """A streamed urllib3 response is read with http.client's readinto, straight into our buffer."""
    import urllib3

    pool = urllib3.HTTPConnectionPool("127.0.0.1", http_server)
    resp = pool.request("GET", "/", preload_content=False)
    readinto = urllib3_fp.body_readinto(resp)
    assert getattr(readinto, "__self__", None) is resp._fp
    assert isinstance(resp._fp, http.client.HTTPResponse)
    buf = bytearray(len(bytes(range(256)) * 400))
    got = 0
    view = memoryview(buf)
    while got < len(buf):
        n = readinto(view[got:])
        assert n
        got += n
    assert bytes(buf) == bytes(range(256)) * 400
    resp.release_conn()
    pool.close()


def test_botocore_streaming_body_exposes_its_stream() -> None:
    from botocore.response import StreamingBody

    stream = io.BytesIO(b"abc")
    assert botocore_raw.raw_stream(StreamingBody(stream, 3)) is stream
    with pytest.raises(PrivateAPIChanged):
        botocore_raw.raw_stream(object())


def test_httpcore_read_size_is_raised_not_lowered() -> None:
    from httpcore._async.http11 import AsyncHTTP11Connection

    before = AsyncHTTP11Connection.READ_NUM_BYTES
    try:
        httpcore_read_size.raise_read_size(before + 1)
        assert AsyncHTTP11Connection.READ_NUM_BYTES == before + 1
        httpcore_read_size.raise_read_size(1)
        assert AsyncHTTP11Connection.READ_NUM_BYTES == before + 1
    finally:
        AsyncHTTP11Connection.READ_NUM_BYTES = before


def test_gcs_client_internals(monkeypatch: pytest.MonkeyPatch) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    client = storage.Client.create_anonymous_client()
    try:
        assert gcs_client.api_base_url(client) == "http://127.0.0.1:9"
        assert isinstance(gcs_client.credentials(client), AnonymousCredentials)
        assert hasattr(gcs_client.authorized_session(client), "request")
    finally:
        client.close()
