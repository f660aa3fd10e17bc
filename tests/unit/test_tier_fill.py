"""The cache tier's fill stage (modelfs.tierconf.fill) between a client on its Unix socket (nginx,
in production) and a real HTTP server standing in for nginx's origin side: the digest it adds
is the CRC32C of exactly the body it passes on, and a body it cannot vouch for is never passed
on as a cacheable answer."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import crc32c
import pytest

from modelfs.backends.memory import ramp
from modelfs.testing.servers import serving
from modelfs.tierconf.fill import FILL_SOCKET, FillServer

DATA = ramp(3 << 20, seed=16)


@dataclass
class OriginSide:
    """What the fill stage GETs from; ``mode`` picks the answer, ``seen`` keeps the requests' headers."""

    mode: str = "ok"
    seen: list[dict[str, str]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=30)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@pytest.fixture
def fill(tmp_path: Path) -> Iterator[tuple[OriginSide, Path]]:
    origin = OriginSide()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            origin.seen.append(dict(self.headers.items()))
            if origin.mode == "404":
                body = b"no such object\n"
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if origin.mode == "ignore_range":  # the whole object, 200
                self.send_response(200)
                self.send_header("Content-Length", str(len(DATA)))
                self.end_headers()
                self.wfile.write(DATA)
                return
            first, last = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
            last = min(last, len(DATA) - 1)
            body = DATA[first : last + 1]
            self.send_response(206)
            # An origin that ignores the version the GET names (If-Match, the generation), or
            # keeps an ETag for bytes of another size: it answers with what it holds now.
            total = len(DATA) + (1 << 20) if origin.mode == "other_size" else len(DATA)
            self.send_header("Content-Range", f"bytes {first}-{last}/{total}")
            self.send_header("x-goog-generation", "18" if origin.mode == "other_generation" else "17")
            if origin.mode == "other_etag":
                self.send_header("ETag", '"w"')
            elif origin.mode != "other_generation":
                self.send_header("ETag", '"v"')
            self.send_header("X-Not-Passed", "1")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if origin.mode == "short":  # the connection drops 10 bytes before the end
                self.wfile.write(body[:-10])
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    origin.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    origin.server.daemon_threads = True
    fill = FillServer(tmp_path, f"127.0.0.1:{origin.server.server_address[1]}", max_fills=2)
    with serving(origin.server), serving(fill):
        yield origin, tmp_path / FILL_SOCKET


def _get(
    conn: http.client.HTTPConnection, first: int, last: int, extra: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn.request(
        "GET",
        "/download/storage/v1/b/b/o/m%2Fx.bin?alt=media&generation=17",
        headers={"Range": f"bytes={first}-{last}", "If-Match": '"v"', "Connection": "keep-alive", **(extra or {})},
    )
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def test_a_slice_comes_with_the_crc32c_of_exactly_its_bytes(fill: tuple[OriginSide, Path]) -> None:
    origin, path = fill
    conn = _UnixHTTPConnection(path)
    slice_size = 1 << 20
    for first in (0, slice_size, 2 * slice_size):  # one kept-alive connection, three slices
        status, headers, body = _get(conn, first, first + slice_size - 1)
        assert status == 206 and body == DATA[first : first + slice_size]
        assert (
            headers["x-modelfs-digest"] == f"crc32c={crc32c.crc32c(body):08x}; range={first}-{first + slice_size - 1}"
        )
        assert headers["content-range"] == f"bytes {first}-{first + slice_size - 1}/{len(DATA)}"
        assert headers["x-goog-generation"] == "17" and "x-not-passed" not in headers
    # The request went on as sent (path, range, version), hop-by-hop headers not.
    assert origin.seen[0]["Range"] == "bytes=0-1048575" and origin.seen[0]["If-Match"] == '"v"'
    assert "Connection" not in origin.seen[0] and origin.seen[0]["Accept-Encoding"] == "identity"
    conn.close()


def test_a_body_cut_short_is_never_answered_as_a_slice(fill: tuple[OriginSide, Path]) -> None:
    origin, path = fill
    origin.mode = "short"
    conn = _UnixHTTPConnection(path)
    status, headers, _ = _get(conn, 0, (1 << 20) - 1)
    assert status == 502 and "x-modelfs-digest" not in headers
    origin.mode = "ok"  # the next miss is served again
    status, headers, body = _get(conn, 0, 99)
    assert status == 206 and body == DATA[:100]
    assert headers["x-modelfs-digest"] == f"crc32c={crc32c.crc32c(DATA[:100]):08x}; range=0-99"
    conn.close()


def test_more_than_the_slice_asked_for_is_never_buffered(fill: tuple[OriginSide, Path]) -> None:
    origin, path = fill
    origin.mode = "ignore_range"
    conn = _UnixHTTPConnection(path)
    status, headers, _ = _get(conn, 0, 99)
    assert status == 502 and "x-modelfs-digest" not in headers
    conn.close()


@pytest.mark.parametrize("mode", ["other_size", "other_etag", "other_generation"])
def test_an_answer_of_another_version_than_asked_for_is_never_a_slice(fill: tuple[OriginSide, Path], mode: str) -> None:
    """The cache key is the version the node names (generation or If-Match, and the size of its
    version): an answer of another one, stored under it, would be served for that version to
    every node for as long as it stays cached. It is a 412 (never cached)."""
    origin, path = fill
    conn = _UnixHTTPConnection(path)
    size = {"X-Modelfs-Size": str(len(DATA))}
    status, headers, body = _get(conn, 0, 99, size)  # the version asked for: served
    assert status == 206 and body == DATA[:100] and "x-modelfs-digest" in headers
    origin.mode = mode
    status, headers, body = _get(conn, 1 << 20, (2 << 20) - 1, size)
    assert status == 412 and "x-modelfs-digest" not in headers and DATA[1 << 20 : (1 << 20) + 100] not in body
    origin.mode = "ok"
    status, headers, body = _get(conn, 1 << 20, (2 << 20) - 1, size)
    assert status == 206 and body == DATA[1 << 20 : 2 << 20]
    conn.close()


def test_the_origins_errors_pass_through_without_a_digest(fill: tuple[OriginSide, Path]) -> None:
    origin, path = fill
    origin.mode = "404"
    conn = _UnixHTTPConnection(path)
    status, headers, body = _get(conn, 0, 99)
    assert (status, body) == (404, b"no such object\n") and "x-modelfs-digest" not in headers
    conn.close()


def test_no_origin_side_is_a_502(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with serving(FillServer(tmp_path, f"127.0.0.1:{port}")):
        conn = _UnixHTTPConnection(tmp_path / FILL_SOCKET)
        status, headers, _ = _get(conn, 0, 99)
        assert status == 502 and "x-modelfs-digest" not in headers
        conn.close()


def test_a_request_with_a_body_is_refused_and_its_body_never_read_as_a_request(
    fill: tuple[OriginSide, Path],
) -> None:
    """A body on a kept-alive connection would be read as the next request: its answer would
    go to nginx as the answer to another request and be cached under that one's key. It is
    refused (400) and the connection closed; the origin is never asked for the smuggled path."""
    origin, path = fill
    smuggled = (
        b"GET /download/storage/v1/b/b/o/other.bin?alt=media&generation=17 HTTP/1.1\r\n"
        b"Host: y\r\nRange: bytes=0-99\r\n\r\n"
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(path))
    head = b"GET /download/storage/v1/b/b/o/m%2Fx.bin?alt=media&generation=17 HTTP/1.1\r\nHost: x\r\n"
    sock.sendall(head + b"Range: bytes=0-99\r\nContent-Length: " + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled)
    answer = b""
    while chunk := sock.recv(65536):  # (the fill stage closes the connection)
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1 ") == 1
    assert origin.seen == []
    conn = _UnixHTTPConnection(path)  # the stage still serves
    status, _, body = _get(conn, 0, 99)
    assert status == 206 and body == DATA[:100]
    conn.close()


def test_a_fill_slower_than_nginx_waits_ends_and_frees_its_slot(fill: tuple[OriginSide, Path], tmp_path: Path) -> None:
    """nginx waits 120 s for this stage's answer; an origin that trickles a slice (never long
    enough without a byte for a read timeout) would otherwise hold a fill slot, and the
    slice's memory, long after nginx gave up. The clock here moves a minute per look."""
    origin, _ = fill
    assert origin.server is not None
    now = [0.0]

    def clock() -> float:
        now[0] += 60.0
        return now[0]

    slow = tmp_path / "slow"
    slow.mkdir()
    stage = FillServer(slow, f"127.0.0.1:{origin.server.server_address[1]}", max_fills=1, clock=clock)
    with serving(stage):
        conn = _UnixHTTPConnection(slow / FILL_SOCKET)
        status, headers, body = _get(conn, 0, len(DATA) - 1)  # 3 MiB: several receives
        assert status == 502 and "x-modelfs-digest" not in headers and b"took more than 115 s" in body
        stage.fill_deadline = 1e9  # the one slot is free again: the next fill is served
        status, headers, body = _get(conn, 0, len(DATA) - 1)
        assert status == 206 and body == DATA
        assert headers["x-modelfs-digest"] == f"crc32c={crc32c.crc32c(DATA):08x}; range=0-{len(DATA) - 1}"
        conn.close()
