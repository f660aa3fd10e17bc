"""Answers dripped a few bytes at a time on the pooled ``http.client`` connections (GCS media
and JSON API GETs, the HTTP backend's data GETs): each byte comes well within the read timeout,
but fewer than the progress rule's bytes per read timeout is a stall (TimeoutError, which the
backends retry until --retry-deadline), headers included, and a body read through
http.client's buffered reader (TLS, chunked) too.

Before, only a body on a plain socket with a Content-Length (the recv_into fast path) was
checked: headers dripped (a byte per 50 ms here, a byte per second in the review) held the
GET, and the reader in D state, as long as the server liked; so did a body over TLS or
chunked, since ``BufferedReader.readinto`` returned only once the whole block had come.

The server drips at most DRIP_FOR seconds' worth, then finishes the answer properly: without
the progress rule the GET succeeds (late) and the test fails, rather than hanging.
"""

from __future__ import annotations

import hashlib
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelfs.backends.gcs_auth import Signer
from modelfs.backends.gcs_json import JsonApi
from modelfs.backends.gcs_media import MediaTransport
from modelfs.backends.http_media import HTTPMedia
from modelfs.backends.redirects import RedirectPolicy
from modelfs.testing.nginx import make_ca
from modelfs.testing.servers import serving

DATA = hashlib.sha256(b"drip").digest() * 4096  # 128 KiB: more than the progress rule asks for in a read timeout
READ_TIMEOUT = 0.5
STEP = 0.02  # the server's pause between pieces (a fault it injects, not a test sleep)
DRIP_FOR = 12.0  # then it sends the rest at once


class _Dripper(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # the request's head
            pass
        mode = self.server.mode
        stop = self.server.stop
        pieces = int(DRIP_FOR / STEP)
        if mode == "headers":
            self._write(b"HTTP/1.1 206 Partial Content\r\nX-Pad: ")
            for _ in range(pieces):
                if stop.wait(STEP):
                    return
                self._write(b"a")
            body = DATA[:1000]
            self._write(
                b"\r\nContent-Range: bytes 0-999/%d\r\nContent-Length: 1000\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\n\r\n" % len(DATA) + body
            )
            return
        chunked = mode == "chunked"
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(DATA)
        self._write(
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-%d/%d\r\n%s\r\nConnection: close\r\n\r\n"
            % (len(DATA) - 1, len(DATA), framing)
        )
        size = max(1, len(DATA) // pieces)
        for at in range(0, len(DATA), size):
            if stop.wait(STEP):
                return
            piece = DATA[at : at + size]
            self._write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            self._write(b"0\r\n\r\n")

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client gave up: the stall was seen
            self.server.stop.set()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, mode: str, context: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Dripper)
        self.mode = mode
        self.stop = threading.Event()
        self._context = context

    def get_request(self) -> tuple[object, object]:
        sock, addr = super().get_request()
        if self._context is not None:
            sock = self._context.wrap_socket(sock, server_side=True)
        return sock, addr

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # (a client that gave up mid-handshake or mid-answer: what the tests provoke)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def dripping(tmp_path: Path) -> Iterator[Callable[..., tuple[str, Path | None]]]:
    """``dripping(mode, tls=False)``: (base URL, CA file or None) of a server that drips."""
    made: list[_Server] = []
    stack: list[object] = []

    def make(mode: str, *, tls: bool = False) -> tuple[str, Path | None]:
        ca = None
        context = None
        if tls:
            ca, cert, key = make_ca(tmp_path / f"tls{len(made)}")
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
        server = _Server(mode, context)
        cm = serving(server)
        cm.__enter__()
        stack.append(cm)
        made.append(server)
        return f"{'https' if tls else 'http'}://127.0.0.1:{server.port}", ca

    yield make
    for server in made:
        server.stop.set()
    for cm in reversed(stack):
        cm.__exit__(None, None, None)  # type: ignore[attr-defined]


def _gcs_media(url: str) -> MediaTransport:
    return MediaTransport(url, None, connect_timeout=5, read_timeout=READ_TIMEOUT, max_idle=2)


def _ok(status: int, headers: object) -> None:
    assert status == 206


@pytest.mark.parametrize(("mode", "tls"), [("headers", False), ("body", True), ("chunked", False)])
def test_gcs_media_get_dripped_is_a_stall(
    dripping: Callable[..., tuple[str, Path | None]], monkeypatch: pytest.MonkeyPatch, mode: str, tls: bool
) -> None:
    url, ca = dripping(mode, tls=tls)
    if ca is not None:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    media = _gcs_media(url)
    try:
        with pytest.raises(TimeoutError, match="fewer than"):
            media.get_into("/o", 0, memoryview(bytearray(len(DATA) if mode != "headers" else 1000)), _ok)
    finally:
        media.close()


def test_gcs_json_answer_whose_headers_drip_is_a_stall(dripping: Callable[..., tuple[str, Path | None]]) -> None:
    url, _ = dripping("headers")
    api = JsonApi(url, Signer(None), connect_timeout=5, read_timeout=READ_TIMEOUT, max_idle=2)
    try:
        with pytest.raises(TimeoutError, match="fewer than"):
            api.get_json("/storage/v1/b/bkt/o/x")
    finally:
        api.close()


@pytest.mark.parametrize(("mode", "tls"), [("headers", False), ("body", True), ("chunked", False)])
def test_http_data_get_dripped_is_a_stall(
    dripping: Callable[..., tuple[str, Path | None]], mode: str, tls: bool
) -> None:
    url, ca = dripping(mode, tls=tls)
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    media = HTTPMedia(
        ssl_context=context,
        connect_timeout=5,
        read_timeout=READ_TIMEOUT,
        max_idle=2,
        headers={"User-Agent": "test"},
        user_headers=[],
        redirects=RedirectPolicy(url + "/", cross_origin=False),
    )
    try:
        size = len(DATA) if mode != "headers" else 1000
        with pytest.raises(TimeoutError, match="fewer than"):
            media.get_into(url + "/m.bin", {"Range": f"bytes=0-{size - 1}"}, [memoryview(bytearray(size))], _ok, "m")
    finally:
        media.close()


@pytest.mark.parametrize("mode", ["headers", "body", "chunked"])
def test_gcs_get_through_a_proxy_dripped_is_a_stall(
    dripping: Callable[..., tuple[str, Path | None]], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Behind a proxy the GCS backend's GETs go through google-auth's requests session
    (gcs_session.py): its connections read under the same rule (the proxy here drips)."""
    from modelfs.backends.gcs_session import SessionClient
    from modelfs.backends.responses import RangeRequest

    proxy, _ = dripping(mode)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    client = SessionClient("http://storage.example.test", None, timeout=(5, READ_TIMEOUT))
    size = len(DATA) if mode != "headers" else 1000
    try:
        with pytest.raises(OSError, match="fewer than|timed out"):
            client.get_into("/o", RangeRequest("o", 0, size), "identity", _ok, memoryview(bytearray(size)))
    finally:
        client.close()


def test_a_token_answer_dripped_is_a_transport_error(dripping: Callable[..., tuple[str, Path | None]]) -> None:
    """The token (or metadata) endpoint's answer is read under the same rule: a refresh holds
    the Signer's lock, and every request that needs a token waits for it."""
    from google.auth.exceptions import TransportError

    from modelfs.backends.gcs_auth import HttpRequest

    url, _ = dripping("headers")
    with pytest.raises(TransportError, match="fewer than"):
        HttpRequest(timeout=READ_TIMEOUT)(url + "/token", method="POST", body=b"grant_type=x")
