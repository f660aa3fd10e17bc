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

from modelfs.backends.private import (
    PrivateAPIChanged,
    botocore_pools,
    botocore_raw,
    httpclient_body,
    httpclient_interim,
    httpcore_read_size,
    urllib3_fp,
)

SHIMS = [
    "botocore_answers",
    "botocore_pools",
    "botocore_raw",
    "httpclient_body",
    "httpclient_interim",
    "httpclient_progress",
    "httpcore_read_size",
    "requests_pools",
    "urllib3_connect",
    "urllib3_fp",
]


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


def _serve(responses: list[bytes], *, stall_after: int | None = None) -> Iterator[int]:
    """Answer each request on one kept-alive connection with the next raw response; with
    ``stall_after``, send only that many bytes of the last one and then hold the connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for i, raw in enumerate(responses):
                conn.recv(65536)
                if stall_after is not None and i == len(responses) - 1:
                    conn.sendall(raw[:stall_after])
                    done.wait(10)
                    return
                conn.sendall(raw)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    done.set()
    thread.join(timeout=10)
    listener.close()


def _response(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


BODY = bytes(range(256)) * 40_000  # 10 MB: several socket buffers' worth


@pytest.fixture
def two_bodies() -> Iterator[int]:
    yield from _serve([_response(BODY), _response(BODY[:1000])])


def test_http_client_body_by_recv_waitall(two_bodies: int) -> None:
    """The body lands whole in our buffer and the connection serves the next request."""
    conn = http.client.HTTPConnection("127.0.0.1", two_bodies, timeout=10)
    for body in (BODY, BODY[:1000]):
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert conn.sock is not None and httpclient_body.applies(conn.sock, resp)
        buf = bytearray(len(body))
        assert httpclient_body.recv_body_into(conn.sock, resp, memoryview(buf), 10.0) == len(body)
        assert bytes(buf) == body
        assert resp.isclosed()  # complete: http.client considers the message done
        assert conn.sock.gettimeout() == 10.0  # back to the timeout the headers are read with
    conn.close()


def test_http_client_body_waits_for_the_chunk_it_is_given(two_bodies: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A smaller ``chunk`` (many GETs in flight: memlimit.receive_chunk) is the most the thread
    lets the kernel queue before it wakes; the body still lands whole."""
    marks: list[int] = []
    real = httpclient_body._set_lowat

    def record(sock: socket.socket, nbytes: int) -> None:
        marks.append(nbytes)
        real(sock, nbytes)

    monkeypatch.setattr(httpclient_body, "_set_lowat", record)
    conn = http.client.HTTPConnection("127.0.0.1", two_bodies, timeout=10)
    conn.request("GET", "/")
    resp = conn.getresponse()
    assert conn.sock is not None
    buf = bytearray(len(BODY))
    assert httpclient_body.recv_body_into(conn.sock, resp, memoryview(buf), 10.0, chunk=128 << 10) == len(BODY)
    assert bytes(buf) == BODY
    assert marks and max(marks) == 128 << 10 and marks[-1] == 1
    conn.close()


def test_http_client_body_stall_times_out() -> None:
    """A server that stops sending mid-body: TimeoutError, not a hang."""
    for port in _serve([_response(BODY)], stall_after=200_000):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert conn.sock is not None
        buf = bytearray(len(BODY))
        with pytest.raises(TimeoutError):
            httpclient_body.recv_body_into(conn.sock, resp, memoryview(buf), 0.3)
        assert bytes(buf[:100_000]) == BODY[:100_000]
        conn.close()


def test_http_client_body_from_a_slow_server() -> None:
    """A server slower than one chunk per timeout, but never silent for a whole timeout: the
    body arrives whole (each chunk's wait that times out takes what came so far)."""
    body = BODY[: 512 * 1024]
    raw = _response(body)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for at in range(0, len(raw), 64 * 1024):
                conn.sendall(raw[at : at + 64 * 1024])
                if stop.wait(0.25):  # a server trickling bytes: 64 KiB per quarter second
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    conn = http.client.HTTPConnection("127.0.0.1", listener.getsockname()[1], timeout=10)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert conn.sock is not None
        buf = bytearray(len(body))
        # The whole body (one chunk: 512 KiB) takes ~2 s to come; each wait gives up after 1 s.
        assert httpclient_body.recv_body_into(conn.sock, resp, memoryview(buf), 1.0) == len(body)
        assert bytes(buf) == body
        assert resp.isclosed()
        assert conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    finally:
        stop.set()
        conn.close()
        thread.join(timeout=10)
        listener.close()


def test_http_client_body_ends_early() -> None:
    """The peer closes after part of the body: the count read so far, no exception."""
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + BODY[:5000]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(raw)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    conn = http.client.HTTPConnection("127.0.0.1", listener.getsockname()[1], timeout=10)
    conn.request("GET", "/")
    resp = conn.getresponse()
    assert conn.sock is not None
    buf = bytearray(100_000)
    assert httpclient_body.recv_body_into(conn.sock, resp, memoryview(buf), 5.0) == 5000
    assert bytes(buf[:5000]) == BODY[:5000]
    assert not resp.isclosed()  # incomplete: the caller must close the connection
    conn.close()
    thread.join(timeout=10)
    listener.close()


def test_http_client_body_not_for_tls_or_chunked() -> None:
    plain = socket.socket()
    resp = http.client.HTTPResponse(plain)
    try:
        resp.chunked = False
        resp.length = 10
        assert httpclient_body.applies(plain, resp)
        resp.chunked = True
        assert not httpclient_body.applies(plain, resp)
        resp.chunked = False
        resp.length = None
        assert not httpclient_body.applies(plain, resp)
        resp.length = 10
        assert not httpclient_body.applies(object(), resp)  # an SSLSocket is not a plain socket
    finally:
        resp.close()
        plain.close()


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </m.css>; rel=preload\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"


def _get(conn: http.client.HTTPConnection) -> tuple[int, bytes]:
    conn.request("GET", "/")
    resp = conn.getresponse()
    return resp.status, resp.read()


@pytest.mark.parametrize("interim", [EARLY_HINTS, CONTINUE + PROCESSING + EARLY_HINTS + CONTINUE])
def test_interim_answers_are_skipped_and_the_connection_stays_usable(interim: bytes) -> None:
    """1xx answers before the response (103 Early Hints: http.client alone takes it for the
    answer) are skipped; the next response on the kept-alive connection is read right too."""
    for port in _serve([interim + _response(BODY[:5000]), interim + _response(BODY[:7])]):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.response_class = httpclient_interim.InterimSkippingResponse
        assert _get(conn) == (200, BODY[:5000])
        assert _get(conn) == (200, BODY[:7])
        conn.close()


def test_endless_interim_answers_end_in_an_error_not_a_wait() -> None:
    """A server that sends 100 Continue after 100 Continue (each within the read timeout)."""
    flood = (CONTINUE + EARLY_HINTS) * (httpclient_interim.MAX_INTERIM // 2 + 1)
    for port in _serve([flood + _response(b"late")]):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.response_class = httpclient_interim.InterimSkippingResponse
        with pytest.raises(http.client.HTTPException, match="interim"):
            _get(conn)
        conn.close()


def test_botocore_pools_reports_each_connection_the_client_opens(http_server: int) -> None:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        region_name="us-east-1",
        endpoint_url=f"http://127.0.0.1:{http_server}",
        config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}),
    )
    connected: list[object] = []
    botocore_pools.report_connections(client, lambda connection: connected.append(connection.sock))
    try:
        client.get_object(Bucket="b", Key="k")
    except Exception:  # (a 200 with a body of bytes: botocore may or may not like it)
        pass
    finally:
        client.close()
    [sock] = connected  # (what it was once connected: the close since has dropped it)
    assert isinstance(sock, socket.socket)
