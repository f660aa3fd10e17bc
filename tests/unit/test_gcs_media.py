"""The GCS data path's plain http.client transport, against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import http.server
import ssl
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from modelfs.backends.gcs_media import MediaTransport, plain_transport_applies
from modelfs.testing.nginx import make_ca
from modelfs.testing.servers import serving

DATA = hashlib.sha256(b"seed").digest() * 4096  # 128 KiB, no two 32-byte runs alike in order


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append((self.headers.get("Authorization"), self.client_address[1]))
        self.server.agents.add(self.headers.get("User-Agent"))
        if self.server.want_token and self.headers.get("Authorization") != self.server.want_token:
            self.send_response(401)
            self.send_header("Content-Length", str(self.server.unauthorized_body))
            self.end_headers()
            try:
                self.wfile.write(bytes(self.server.unauthorized_body))
            except OSError:  # (the client stopped reading it)
                self.close_connection = True
            return
        start, end = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
        body = DATA[start : end + 1]
        if self.server.stall:
            self._stall(start, end, body)
            return
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(DATA)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.server.close_after_response:
            self.close_connection = True  # drop the kept-alive connection without saying so

    def _stall(self, start: int, end: int, body: bytes) -> None:
        """Headers (Connection: close, as a faulty proxy sends) and half the body, then
        silence until the client closes its end: records whether it did within 10 s."""
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(DATA)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.connection.settimeout(10)
        try:
            self.server.client_closed.append(self.connection.recv(1) == b"")
        except OSError:
            self.server.client_closed.append(False)
        self.close_connection = True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str | None, int]] = []
        self.agents: set[str | None] = set()
        self.want_token: str | None = None
        self.close_after_response = False
        self.stall = False
        self.client_closed: list[bool] = []
        self.unauthorized_body = 0  # bytes of body sent with a 401


@pytest.fixture
def server() -> Iterator[_Server]:
    with serving(_Server()) as srv:
        yield srv


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[_Server, Path]]:
    """The same server behind TLS, with a certificate from a throwaway CA: (server, ca.pem)."""
    ca, cert, key = make_ca(tmp_path / "tls")
    srv = _Server()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    with serving(srv) as running:
        yield running, ca


class _Credentials:
    """google-auth's credentials surface that the transport uses: sign, and refresh on a 401."""

    def __init__(self) -> None:
        self.token = 0
        self.refreshes = 0

    def before_request(self, request: object, method: str, url: str, headers: dict[str, str]) -> None:
        headers["Authorization"] = f"Bearer t{self.token}"

    def refresh(self, request: object) -> None:
        self.refreshes += 1
        self.token += 1


def _ok(status: int, headers: Mapping[str, str]) -> None:
    assert status == 206, status


def _transport(server: _Server, credentials: object | None = None) -> MediaTransport:
    return MediaTransport(
        f"http://127.0.0.1:{server.server_address[1]}", credentials, connect_timeout=5, read_timeout=5, max_idle=4
    )


def test_ranges_arrive_exactly_and_the_connection_is_reused(server: _Server) -> None:
    media = _transport(server)
    try:
        for offset, length in [(0, 1), (1000, 65536), (len(DATA) - 7, 7), (12345, 40000)]:
            dest = memoryview(bytearray(length))
            media.get_into("/o", offset, dest, _ok)
            assert hashlib.sha256(dest).digest() == hashlib.sha256(DATA[offset : offset + length]).digest()
    finally:
        media.close()
    assert [auth for auth, _ in server.requests] == [None] * 4
    assert len({port for _, port in server.requests}) == 1
    assert len(server.agents) == 1 and next(iter(server.agents)).startswith("modelfs/")


def test_one_get_fills_several_buffers_in_order(server: _Server) -> None:
    """A joined read-ahead GET: one request, its body spread over the buffers exactly."""
    media = _transport(server)
    sizes = [4096, 1, 65536, 10000]
    dests = [memoryview(bytearray(n)) for n in sizes]
    try:
        media.get_joined_into("/o", 777, dests, _ok)
        assert len(server.requests) == 1
        assert b"".join(bytes(d) for d in dests) == DATA[777 : 777 + sum(sizes)]
        again = memoryview(bytearray(10))
        media.get_into("/o", 5, again, _ok)  # the connection is at a message boundary
    finally:
        media.close()
    assert bytes(again) == DATA[5:15]
    assert len({port for _, port in server.requests}) == 1


def test_the_crc32c_of_each_buffer_is_computed_as_the_body_arrives(server: _Server) -> None:
    """The sums the disk cache's write takes instead of a second pass over each block."""
    import crc32c

    media = _transport(server)
    dests = [memoryview(bytearray(n)) for n in (70000, 3, 50000)]
    sums: list[int] = [123]  # stale values are dropped
    try:
        media.get_joined_into("/o", 9, dests, _ok, sums)
    finally:
        media.close()
    assert b"".join(bytes(d) for d in dests) == DATA[9 : 9 + 120003]
    assert sums == [crc32c.crc32c(bytes(d)) for d in dests]


def test_a_joined_get_past_the_end_is_a_short_body(server: _Server) -> None:
    """The server sends less than the buffers hold: EOFError, whichever buffer it ends in."""
    media = _transport(server)
    try:
        with pytest.raises(EOFError):
            media.get_joined_into(
                "/o", len(DATA) - 15, [memoryview(bytearray(10)), memoryview(bytearray(10))], lambda s, h: None
            )
    finally:
        media.close()


@pytest.mark.parametrize("body", [0, 8 << 20])
def test_expired_token_is_refreshed_once_on_401(server: _Server, body: int) -> None:
    """One refresh, one retry. A 401's body is read no further than an error's (64 KiB): an
    empty one keeps its connection for the retry, a huge one's connection is closed (before:
    all of it was read into memory, 400 MiB for a lying server's 400 MiB)."""
    credentials = _Credentials()
    server.want_token = "Bearer t1"
    server.unauthorized_body = body
    media = _transport(server, credentials)
    dest = memoryview(bytearray(100))
    try:
        media.get_into("/o", 50, dest, _ok)
    finally:
        media.close()
    assert bytes(dest) == DATA[50:150]
    assert credentials.refreshes == 1
    assert [auth for auth, _ in server.requests] == ["Bearer t0", "Bearer t1"]
    (_, first_port), (_, second_port) = server.requests
    assert (first_port == second_port) == (body == 0)


def test_a_401_after_refresh_goes_to_the_check(server: _Server) -> None:
    server.want_token = "Bearer never"
    seen: list[int] = []

    def check(status: int, headers: Mapping[str, str]) -> None:
        seen.append(status)
        raise PermissionError(status)

    media = _transport(server, _Credentials())
    try:
        with pytest.raises(PermissionError):
            media.get_into("/o", 0, memoryview(bytearray(10)), check)
    finally:
        media.close()
    assert seen == [401]


def test_idle_connection_closed_by_the_server_is_not_reused(server: _Server) -> None:
    server.close_after_response = True
    media = _transport(server)
    try:
        first = memoryview(bytearray(10))
        media.get_into("/o", 0, first, _ok)
        # Wait until the server has really closed its end, then read again: the transport must
        # notice the dead idle connection and open a new one rather than fail the GET.
        for _ in range(200):
            if media._pool.idle and media._pool.dropped(media._pool.idle[-1]):
                break
            threading.Event().wait(0.01)
        second = memoryview(bytearray(10))
        media.get_into("/o", 10, second, _ok)
    finally:
        media.close()
    assert bytes(first) + bytes(second) == DATA[:20]
    assert len({port for _, port in server.requests}) == 2


def test_a_timed_out_read_closes_its_socket_at_once(server: _Server) -> None:
    """A read timeout mid-body (after a "Connection: close" response) must close the socket
    then, not when the exception, which holds the response, is garbage-collected: a stalled
    server would otherwise hold the connection (and the fault proxy's stall) open."""
    server.stall = True
    media = MediaTransport(
        f"http://127.0.0.1:{server.server_address[1]}", None, connect_timeout=5, read_timeout=0.5, max_idle=4
    )
    caught: list[BaseException] = []
    try:
        try:
            media.get_into("/o", 0, memoryview(bytearray(1000)), _ok)
        except OSError as exc:
            caught.append(exc)  # kept alive on purpose, as a caller's retry bookkeeping might
        assert caught and isinstance(caught[0], TimeoutError)
        for _ in range(1200):  # bounded wait for the server's verdict (its own 10 s limit)
            if server.client_closed:
                break
            threading.Event().wait(0.01)
        assert server.client_closed == [True]
    finally:
        media.close()


def test_short_body_raises_and_is_never_reused(server: _Server) -> None:
    media = _transport(server)
    try:
        # Asking for more than the object holds: the server sends a shorter 206 body.
        with pytest.raises((EOFError, OSError)):
            media.get_into("/o", len(DATA) - 10, memoryview(bytearray(20)), lambda s, h: None)
        assert media._pool.idle == []
    finally:
        media.close()


def test_https_ranges_with_the_ca_bundle_requests_would_use(
    tls_server: tuple[_Server, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over TLS, verified against REQUESTS_CA_BUNDLE (as the client library's session is)."""
    server, ca = tls_server
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    media = MediaTransport(
        f"https://127.0.0.1:{server.server_address[1]}", None, connect_timeout=5, read_timeout=5, max_idle=4
    )
    try:
        for offset, length in [(0, 4096), (70_000, 50_000)]:
            dest = memoryview(bytearray(length))
            media.get_into("/o", offset, dest, _ok)
            assert bytes(dest) == DATA[offset : offset + length]
    finally:
        media.close()
    assert len({port for _, port in server.requests}) == 1


def test_https_refuses_a_certificate_it_cannot_verify(
    tls_server: tuple[_Server, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ca = tls_server
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    media = MediaTransport(
        f"https://127.0.0.1:{server.server_address[1]}", None, connect_timeout=5, read_timeout=5, max_idle=4
    )
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            media.get_into("/o", 0, memoryview(bytearray(10)), _ok)
    finally:
        media.close()
    assert server.requests == []


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, True),
        ({"HTTPS_PROXY": "http://proxy.invalid:3128"}, False),
        ({"HTTPS_PROXY": "http://proxy.invalid:3128", "NO_PROXY": "storage.googleapis.com"}, True),
        ({"GOOGLE_API_USE_CLIENT_CERTIFICATE": "true"}, False),
    ],
)
def test_proxy_and_mtls_setups_keep_the_client_session(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: bool
) -> None:
    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "GOOGLE_API_USE_CLIENT_CERTIFICATE",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert plain_transport_applies("https://storage.googleapis.com/download/storage/v1/b/x/o/") is expected
