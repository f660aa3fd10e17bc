"""A fault-injecting HTTP/1.1 reverse proxy for tests and benchmarks (stdlib only).

It listens on 127.0.0.1 in front of one upstream (fake-gcs-server), forwards every request
over a kept-alive ``http.client`` connection, and streams response bodies back. Per request,
with probability ``rate`` and a seedable RNG, it replaces the normal answer by one fault:

``503``, ``429``
    an error status with a small JSON body; the upstream is not asked.
``reset_before_body``
    the connection is reset (RST) before any byte of the response is sent, or (half of the
    time) right after the status line and headers, before any byte of the body.
``reset_mid_body``
    the status line, headers and part of the body are sent, then the connection is reset.
``stall``
    the headers and part of the body are sent, then nothing for ``stall_seconds`` (set it
    longer than the client's read timeout); then the connection is closed. A client that
    gives up first (closes the connection) is counted in ``stall_client_gave_up``.
``truncate``
    the headers (with the full Content-Length) and fewer bytes than that are sent, then the
    connection is closed cleanly (FIN).
``corrupt``
    the answer is relayed whole, status, headers and length as the upstream sent them, but
    with one byte of its body flipped: a server that serves other bytes than it stores. Not
    among the kinds picked by default (every other fault is one a client recovers from by
    asking again; this one only a whole-object checksum finds): ask for it by name.

Faults apply to media GETs (``alt=media`` in the query) only, unless ``fault_listings`` is
set, which extends them to every other request; ``fault_paths`` (a regular expression
searched in each request's path) makes exactly the requests it matches eligible instead.
The upstream gets the proxy's own Host header, unless ``keep_host`` is set: then the client's
goes on unchanged (an S3 request's signature covers it). ``force(kind, n)`` makes the next ``n``
eligible requests fail with ``kind`` whatever the rate. ``down = True`` resets every new
connection and every request on a kept-alive one, as a backend that is gone; ``down = False``
brings it back. ``counters()`` reports requests and injected faults by kind.

Use it as a context manager::

    with fault_proxy(gcs.url, rate=0.2, seed=1) as proxy:
        env = dict(os.environ, STORAGE_EMULATOR_HOST=proxy.url)

or from the command line (for benchmarks)::

    python -m modelfs.testing.faultproxy --upstream http://127.0.0.1:4443 --rate 0.1
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["FaultProxy", "fault_proxy", "FAULT_KINDS"]

FAULT_KINDS: tuple[str, ...] = ("503", "429", "reset_before_body", "reset_mid_body", "stall", "truncate")
_KNOWN_KINDS: tuple[str, ...] = (*FAULT_KINDS, "corrupt")  # corrupt only when asked for

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
}
_CHUNK = 256 * 1024


def _reset(sock: socket.socket) -> None:
    """Abort a connection with a TCP RST (SO_LINGER 0, then close)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Aborted(Exception):
    """The proxy gave up on this client connection on purpose (a fault, or down)."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm and
        # the client's delayed ACK add 40 ms to every small response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._upstream: http.client.HTTPConnection | None = None
        self.server.proxy._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        if self._upstream is not None:
            self._upstream.close()
        self.server.proxy._track(self.connection, False)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        if self.server.proxy.verbose:
            super().log_message(format, *args)

    # --- aborting a connection

    def _abort(self) -> None:
        """Reset the client connection now. The socket's makefile()s must go first, or
        close() only drops a reference and the kernel never sends the RST."""
        self.close_connection = True
        for f in (self.rfile, self.wfile):
            try:
                f.close()
            except OSError:
                pass
        _reset(self.connection)
        raise _Aborted

    def _close_cleanly(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        raise _Aborted

    # --- the upstream

    def _upstream_conn(self) -> http.client.HTTPConnection:
        if self._upstream is None:
            proxy = self.server.proxy
            self._upstream = http.client.HTTPConnection(
                proxy.upstream_host, proxy.upstream_port, timeout=proxy.upstream_timeout
            )
        return self._upstream

    def _forward(self, body: bytes | None) -> http.client.HTTPResponse:
        proxy = self.server.proxy
        keep = {"host"} if proxy.keep_host else set()
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP and (k.lower() != "host" or keep)
        }
        if not keep:
            headers["Host"] = f"{proxy.upstream_host}:{proxy.upstream_port}"
        for attempt in (1, 2):
            conn = self._upstream_conn()
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                return conn.getresponse()
            except (ConnectionError, http.client.HTTPException, OSError):
                # A kept-alive upstream connection may have been closed by the upstream:
                # try once more on a fresh one, then give up with a 502.
                conn.close()
                self._upstream = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # --- one request

    def _handle(self) -> None:
        proxy = self.server.proxy
        if proxy.down:
            proxy._count("refused_down")
            self._abort()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        kind = proxy._pick_fault(self.path)
        corrupt = kind == "corrupt"
        if corrupt:
            kind = None  # relayed as a normal answer, but for one byte
        if kind in ("503", "429"):
            self._send_error_status(int(kind))
            return
        if kind == "reset_before_body" and proxy._coin():
            self._abort()  # before the status line; otherwise right after the headers
        try:
            resp = self._forward(body)
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            proxy._count("upstream_errors")
            self._send_error_status(502, f"upstream: {exc}")
            return
        try:
            self._relay(resp, kind, corrupt=corrupt)
        finally:
            if kind is not None or self.close_connection:
                # The upstream body may not have been read to its end: never reuse it.
                if self._upstream is not None:
                    self._upstream.close()
                    self._upstream = None

    def _send_error_status(self, status: int, message: str | None = None) -> None:
        payload = json.dumps({"error": {"code": status, "message": message or f"injected {status}"}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _relay(self, resp: http.client.HTTPResponse, kind: str | None, *, corrupt: bool = False) -> None:
        proxy = self.server.proxy
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        content_length = resp.getheader("Content-Length")
        buffered: bytes | None = None
        if no_body:
            total = 0
        elif content_length is not None:
            total = int(content_length)
        else:
            # Chunked or close-delimited (listings): re-frame with a Content-Length.
            buffered = resp.read()
            total = len(buffered)
        self.send_response(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        if self.command == "HEAD" and content_length is not None:
            self.send_header("Content-Length", content_length)  # what a GET would send
        else:
            self.send_header("Content-Length", str(total))
        if kind is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        if no_body:
            return
        # Where a body fault strikes: somewhere strictly inside the body when there is one.
        cut = total if kind is None else 0 if kind == "reset_before_body" else proxy._cut_point(total)
        flip = proxy._cut_point(total + 1) - 1 if corrupt else -1  # the byte a corrupt answer flips
        sent = 0
        if buffered is not None:
            body = bytearray(buffered[:cut])
            if 0 <= flip < len(body):
                body[flip] ^= 0x01
            self.wfile.write(body)
            sent = cut
        else:
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            while sent < cut:
                n = resp.readinto(view[: min(_CHUNK, cut - sent)])
                if not n:
                    # The upstream's body ended early: pass the short body on and close.
                    proxy._count("upstream_short")
                    self._close_cleanly()
                if sent <= flip < sent + n:
                    view[flip - sent] ^= 0x01
                self.wfile.write(view[:n])
                sent += n
        proxy._add_bytes(sent)
        if kind in ("reset_before_body", "reset_mid_body"):
            self._abort()
        if kind == "truncate":
            self._close_cleanly()
        if kind == "stall":
            self.wfile.flush()
            if self._client_gave_up(proxy.stall_seconds):
                proxy._count("stall_client_gave_up")
            self._close_cleanly()

    def _client_gave_up(self, seconds: float) -> bool:
        """Send nothing for ``seconds``; True if the client closed the connection meanwhile
        (its read timeout fired), False if the stall ran its course or the proxy stopped."""
        proxy = self.server.proxy
        deadline = time.monotonic() + seconds
        while not proxy._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.1))
            if readable:
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        return True
                except OSError:
                    return True
                # The client sent something mid-response; not a give-up, keep stalling.
                time.sleep(min(left, 0.1))
        return False

    def handle_one_request(self) -> None:
        # The base class's loop, with our dispatch for every method and _Aborted as a quiet end.
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(414)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            self.server.proxy._count("requests")
            self._handle()
            self.wfile.flush()
        except _Aborted:
            self.close_connection = True
        except (ConnectionError, TimeoutError, OSError, ValueError):
            # The client went away (or the socket was closed by stop()): nothing to answer.
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(address, _Handler)

    def verify_request(self, request: object, client_address: object) -> bool:
        if self.proxy.down:
            self.proxy._count("refused_down")
            _reset(request)  # type: ignore[arg-type]
            return False
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.proxy.verbose:
            super().handle_error(request, client_address)


class FaultProxy:
    """A running proxy. Every attribute below may be changed while it runs."""

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        kinds: Iterable[str] = FAULT_KINDS,
        seed: int | None = None,
        fault_listings: bool = False,
        fault_paths: str | None = None,
        keep_host: bool = False,
        stall_seconds: float = 3.0,
        port: int = 0,
        upstream_timeout: float = 60.0,
        verbose: bool = False,
    ) -> None:
        parts = urlsplit(upstream if "://" in upstream else f"http://{upstream}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://HOST:PORT, not {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_timeout = upstream_timeout
        self.rate = rate
        self.kinds = tuple(kinds)
        self.fault_listings = fault_listings
        self.fault_paths = re.compile(fault_paths) if fault_paths is not None else None
        self.keep_host = keep_host
        self.stall_seconds = stall_seconds
        self.down = False
        self.verbose = verbose
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._forced: list[str] = []
        self.paths: list[str] = []  # every request's path and query, in order (for tests)
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="faultproxy", daemon=True
        )
        self._check_kinds(self.kinds)

    @staticmethod
    def _check_kinds(kinds: Iterable[str]) -> None:
        unknown = set(kinds) - set(_KNOWN_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kind(s) {sorted(unknown)}; known: {', '.join(_KNOWN_KINDS)}")

    # --- lifetime

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """What STORAGE_EMULATOR_HOST should be for clients to go through the proxy."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake stalled responses and close every client connection."""
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(10)

    # --- controls

    def configure(
        self,
        *,
        rate: float | None = None,
        kinds: Iterable[str] | None = None,
        fault_listings: bool | None = None,
        stall_seconds: float | None = None,
        seed: int | None = None,
    ) -> None:
        with self._lock:
            if rate is not None:
                self.rate = rate
            if kinds is not None:
                kinds = tuple(kinds)
                self._check_kinds(kinds)
                self.kinds = kinds
            if fault_listings is not None:
                self.fault_listings = fault_listings
            if stall_seconds is not None:
                self.stall_seconds = stall_seconds
            if seed is not None:
                self._rng.seed(seed)

    def force(self, kind: str, count: int = 1) -> None:
        """Fail the next ``count`` eligible requests with ``kind``, whatever the rate."""
        self._check_kinds([kind])
        with self._lock:
            self._forced.extend([kind] * count)

    def counters(self) -> dict[str, int]:
        """``requests``, ``media_requests``, ``faults`` (total), ``fault_<kind>`` per kind,
        ``stall_client_gave_up``, ``refused_down``, ``upstream_errors``, ``bytes``."""
        with self._lock:
            out = dict(self._counts)
        for kind in _KNOWN_KINDS:
            out.setdefault(f"fault_{kind}", 0)
        for name in (
            "requests",
            "media_requests",
            "faults",
            "stall_client_gave_up",
            "refused_down",
            "upstream_errors",
            "bytes",
        ):
            out.setdefault(name, 0)
        return out

    def faults_by_kind(self) -> dict[str, int]:
        counts = self.counters()
        return {kind: counts[f"fault_{kind}"] for kind in FAULT_KINDS}

    def reset_counters(self) -> None:
        with self._lock:
            self._counts.clear()

    # --- used by the handler threads

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(sock)
            else:
                self._connections.discard(sock)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _add_bytes(self, n: int) -> None:
        self._count("bytes", n)

    def _pick_fault(self, path: str) -> str | None:
        query = parse_qs(urlsplit(path).query)
        media = query.get("alt") == ["media"]
        with self._lock:
            self.paths.append(path)
            if media:
                self._counts["media_requests"] += 1
            if self.fault_paths is not None:
                if not self.fault_paths.search(path):
                    return None
            elif not media and not self.fault_listings:
                return None
            if self._forced:
                kind: str | None = self._forced.pop(0)
            elif self.kinds and self.rate > 0 and self._rng.random() < self.rate:
                kind = self._rng.choice(self.kinds)
            else:
                kind = None
            if kind is not None:
                self._counts["faults"] += 1
                self._counts[f"fault_{kind}"] += 1
            return kind

    def _coin(self) -> bool:
        with self._lock:
            return self._rng.random() < 0.5

    def _cut_point(self, total: int) -> int:
        if total <= 1:
            return 0
        with self._lock:
            return self._rng.randrange(1, total)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def fault_proxy(upstream: str, **options: object) -> Iterator[FaultProxy]:
    """Start a proxy to ``upstream`` on a free loopback port; stop it on exit."""
    proxy = FaultProxy(upstream, **options).start()  # type: ignore[arg-type]
    try:
        yield proxy
    finally:
        proxy.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modelfs.testing.faultproxy",
        description="Fault-injecting HTTP proxy on 127.0.0.1 (for tests and benchmarks).",
    )
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of the real server")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any free one)")
    parser.add_argument("--rate", type=float, default=0.0, help="probability of a fault per eligible request")
    parser.add_argument("--kinds", default=",".join(FAULT_KINDS), help="comma-separated fault kinds")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stall-seconds", type=float, default=3.0)
    parser.add_argument("--fault-listings", action="store_true", help="also fault non-media requests")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        proxy = FaultProxy(
            args.upstream,
            rate=args.rate,
            kinds=[k for k in args.kinds.split(",") if k],
            seed=args.seed,
            fault_listings=args.fault_listings,
            stall_seconds=args.stall_seconds,
            port=args.port,
            verbose=args.verbose,
        )
    except (ValueError, OSError) as exc:
        print(f"faultproxy: {exc}", file=sys.stderr)
        return 2
    proxy.start()
    print(proxy.url, flush=True)
    # SIGTERM (how a benchmark stops it) ends it like Ctrl-C: the counters are printed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        threading.Event().wait()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        print(json.dumps(proxy.counters()), file=sys.stderr, flush=True)
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
