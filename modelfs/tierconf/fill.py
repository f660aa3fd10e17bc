"""The cache tier's fill stage: one origin GET per missed slice, answered with its CRC32C.

nginx's proxy_cache + slice asks this process (on ``RUN_DIR/fill.sock``) for one slice of one
pinned object version at a time, and only on a cache miss. It makes the one GET for that slice
through nginx's origin side (``--origin-side``, loopback, which adds the tier's own
credentials: tier.js), reads the body, computes its CRC32C and answers with the origin's status and headers
plus

    X-Modelfs-Digest: crc32c=<8 hex digits>; range=<first>-<last>

which proxy_cache stores with the slice. modelfs checks every body it gets from the tier
against that header (backends/tiered.py), so a cached slice damaged afterwards is read from
the origin instead. CRC32C because the reader's check then costs next to nothing (the
instruction the CPU has for it; a SHA-256 check of every tier body cost a node about as much
CPU as the whole origin GET it replaced, and njs has no CRC32C: docs/operations.md, "Cache
tier", has the numbers and the threat model).

A plain threaded HTTP/1.1 server on a Unix socket: one thread per connection nginx keeps
alive, at most ``--max-fills`` slices in memory at once, from the GET until nginx has the
last byte (the rest wait their turn).

    python -m modelfs.tierconf.fill --run-dir /run/modelfs-tier --origin-side 127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import re
import signal
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import crc32c

from modelfs.backends.connpool import ConnectionPool
from modelfs.backends.private import httpclient_body
from modelfs.backends.responses import parse_content_range

__all__ = ["FILL_SOCKET", "HEALTH_PATH", "PASS_HEADERS", "FillServer", "main"]

log = logging.getLogger("modelfs.tierconf.fill")

FILL_SOCKET = "fill.sock"  # nginx's cache server -> this process, in the tier's run dir
HEALTH_PATH = "/.modelfs-tier/health"  # the readiness probe nginx passes on

# The headers of the origin's answer that the reader checks or that describe the bytes.
PASS_HEADERS = (
    "Content-Range",
    "Content-Type",
    "ETag",
    "Last-Modified",
    "x-goog-generation",
    "x-goog-hash",
    "x-goog-stored-content-length",
    "x-goog-stored-content-encoding",
    "x-amz-version-id",
    "Accept-Ranges",
)
# Not forwarded: they describe this hop, not the request (RFC 9110 7.6.1), or nginx sets them.
_HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host")
    + ("content-length", "expect")
)
_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/")
_RANGE_ASKED_RE = re.compile(r"bytes=(\d+)-(\d+)")
_MAX_BODY = 256 << 20  # a GET without a range (nginx always sends the slice's)
_MAX_ERROR_BODY = 64 << 10
_TIMEOUT = 120.0  # nginx's proxy_read_timeout to the origin is 60 s; this only ends a hung socket
# One fill's whole time. nginx waits 120 s (proxy_read_timeout) for this stage's answer, which
# starts only once the whole slice is in: a fill still running then is answered to nobody, and
# an origin trickling bytes (never 60 s without one) would hold a slot, and its slice's memory,
# for as long as it likes.
_FILL_DEADLINE = 115.0


class FillServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The fill stage listening on ``run_dir/fill.sock``; serve_forever() runs it."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        run_dir: Path,
        origin_side: str,
        *,
        max_fills: int = 32,
        timeout: float = _TIMEOUT,
        fill_deadline: float = _FILL_DEADLINE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fill_deadline = fill_deadline
        self.clock = clock
        host, _, port = origin_side.rpartition(":")
        self.origin = ConnectionPool(
            host.strip("[]"), int(port), connect_timeout=timeout, read_timeout=timeout, max_idle=max_fills
        )
        self.fills = threading.BoundedSemaphore(max_fills)
        path = run_dir / FILL_SOCKET
        path.unlink(missing_ok=True)  # a socket left by a process that is gone
        super().__init__(str(path), _FillHandler)
        # nginx's workers may run as another user than this process (www-data); the run dir
        # is the tier's own, and the socket serves only what the tier's port serves anyway.
        os.chmod(path, 0o666)

    def server_close(self) -> None:
        super().server_close()
        self.origin.close()

    def handle_error(self, request: object, client_address: object) -> None:
        # One line, not socketserver's traceback: nginx closing a kept-alive connection
        # mid-request is ordinary.
        log.warning("connection from nginx ended with an error: %s", sys.exc_info()[1])


class _FillHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FillServer

    def address_string(self) -> str:  # a Unix socket's peer has no address
        return "nginx"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        log.warning("%s", format % args)

    def _has_body(self) -> bool:
        """A request with a body is refused, and its connection closed: the body would be
        read as the next request on this kept-alive connection, and its answer taken by
        nginx for another request's (stored under that request's cache key)."""
        if self.headers.get("Transfer-Encoding") is None and self.headers.get("Content-Length", "0").strip() == "0":
            return False
        self.close_connection = True
        self.send_error(400, "a read has no body")
        return True

    def do_HEAD(self) -> None:
        if self._has_body():
            return
        if self.path != HEALTH_PATH:
            self.send_error(405)
            return
        self._healthy(body=False)

    def _healthy(self, *, body: bool) -> None:
        """The readiness probe, passed on by nginx: this stage is up."""
        self.send_response_only(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "3")
        self.end_headers()
        if body:
            self.wfile.write(b"ok\n")

    def do_GET(self) -> None:
        if self._has_body():
            return
        if self.path == HEALTH_PATH:
            self._healthy(body=True)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        headers["Accept-Encoding"] = "identity"
        with self.server.fills:
            try:
                status, out, body = self._fetch(headers)
            except (OSError, http.client.HTTPException) as exc:
                status, out, body = 502, {"Content-Type": "text/plain"}, f"origin: {exc}\n".encode()
            try:
                self.send_response_only(status)
                for name, value in out.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(memoryview(body))
            except OSError:  # nginx went away (its client did): nothing to answer
                self.close_connection = True

    def _fetch(self, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes | bytearray]:
        """The origin's answer to the same GET: status, headers to pass on, body."""
        conn = self.server.origin.take()
        try:
            conn.request("GET", self.path, headers=headers)
            resp = conn.getresponse()
            out = {name: value for name in PASS_HEADERS if (value := resp.getheader(name)) is not None}
            if resp.status not in (200, 206):
                # Not cached (proxy_cache_valid 200 206): the reader falls back to the origin.
                body: bytes | bytearray = resp.read(_MAX_ERROR_BODY)
                if not resp.isclosed():
                    raise http.client.HTTPException("error body too long")
                out["Content-Type"] = resp.getheader("Content-Type", "text/plain")
                self.server.origin.give_back(conn)
                return resp.status, out, body
            other = self._other_version(resp)
            if other:
                # Never cached (proxy_cache_valid 200 206): under this request's key it would
                # be served, for good, to every node that asks for the version it names.
                conn.close()
                return 412, {"Content-Type": "text/plain"}, f"the origin answered {other}\n".encode()
            asked = _RANGE_ASKED_RE.fullmatch((self.headers.get("Range") or "").strip())
            most = int(asked.group(2)) - int(asked.group(1)) + 1 if asked else _MAX_BODY
            if resp.length is not None and resp.length > most:
                # More than the slice asked for (an origin that ignored Range): never buffer it.
                conn.close()
                return 502, {"Content-Type": "text/plain"}, b"origin body larger than the range asked for\n"
            body = self._read_body(conn, resp, most)
            found = _RANGE_RE.match(out.get("Content-Range", ""))
            first, last = (int(found.group(1)), int(found.group(2))) if found else (0, len(body) - 1)
            if last - first + 1 != len(body):
                # A short body from the origin: never hand it to the cache.
                conn.close()
                return 502, {"Content-Type": "text/plain"}, b"origin body does not match its Content-Range\n"
            self.server.origin.give_back(conn)
            out["X-Modelfs-Digest"] = f"crc32c={crc32c.crc32c(body):08x}; range={first}-{last}"
            return resp.status, out, body
        except BaseException:
            conn.close()
            raise

    def _other_version(self, resp: http.client.HTTPResponse) -> str:
        """What shows the origin's answer to be of another version than the request names
        (its generation, If-Match, the size of the node's version: X-Modelfs-Size), or "".

        The cache key is made of those, so an answer of another version would be stored as
        the named one's: an origin that ignores If-Match (some web servers and S3-compatible
        stores), or one that keeps an ETag for bytes of another size. The node would refuse it
        too, but at every read of that slice, from every node, for as long as it stays cached."""
        query = self.path.partition("?")[2]
        generation = next((v for k, _, v in (p.partition("=") for p in query.split("&")) if k == "generation"), None)
        sent = resp.getheader("x-goog-generation")
        if generation is not None and sent is not None and sent.strip() != generation:
            return f"generation {sent.strip()!r}, not {generation!r}"
        if_match, etag = (self.headers.get("If-Match") or "*").strip(), (resp.getheader("ETag") or "").strip()
        if if_match != "*" and etag and etag != if_match:
            return f"ETag {etag!r}, not {if_match!r}"
        size = (self.headers.get("X-Modelfs-Size") or "").strip()
        if size:
            if resp.status == 206:
                parsed = parse_content_range(resp.getheader("Content-Range"))
                total = parsed[2] if parsed is not None else None
            else:  # a 200 is the whole object
                total = resp.length
            if total is not None and str(total) != size:
                return f"an object of {total} bytes, not {size}"
        return ""

    def _read_body(
        self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, most: int
    ) -> bytes | bytearray:
        if resp.length is None:  # chunked: rare behind nginx, read it the ordinary way
            data = resp.read(most + 1)
            if len(data) > most or not resp.isclosed():
                raise http.client.HTTPException("origin body larger than the range asked for")
            return data
        body = bytearray(resp.length)
        view = memoryview(body)
        clock, deadline = self.server.clock, self.server.clock() + self.server.fill_deadline

        def in_time(n: int) -> None:
            if clock() > deadline:
                raise TimeoutError(f"the slice took more than {self.server.fill_deadline:g} s")

        if httpclient_body.applies(conn.sock, resp):
            # (``deadline`` bounds the waits between receives too, on the real clock.)
            got = httpclient_body.recv_body_into(
                conn.sock, resp, view, _TIMEOUT, deadline=time.monotonic() + self.server.fill_deadline, progress=in_time
            )
        else:
            got = 0
            while got < len(view) and (n := resp.readinto(view[got:])):
                got += n
                in_time(n)
        if got != len(body):
            raise http.client.IncompleteRead(b"", len(body) - got)
        return body


def _stop(signum: int, frame: object) -> None:
    # SIGTERM (systemd, Kubernetes) stops it like Ctrl-C: serve_forever() returns.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelfs.tierconf.fill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("/run/modelfs-tier"), help="default: %(default)s")
    parser.add_argument(
        "--origin-side",
        default="127.0.0.1:8081",
        help="nginx's origin side, which adds the tier's credentials (default: %(default)s)",
    )
    parser.add_argument("--max-fills", type=int, default=32, help="slices held in memory at once (default: 32)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="modelfs tier fill: %(message)s")
    httpclient_body.verify()
    try:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        server = FillServer(args.run_dir, args.origin_side, max_fills=max(1, args.max_fills))
    except OSError as exc:
        print(f"modelfs tier fill: cannot listen in {args.run_dir}: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        Path(server.server_address).unlink(missing_ok=True)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
