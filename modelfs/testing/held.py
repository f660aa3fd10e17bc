"""An HTTP origin of one file that holds every request until the test releases it.

A test sees a request arrive (``arrived``), does what it means to do while the client is
blocked on it (a signal, a second mount), then ``release()``s it: no sleeps, no timing.
Released requests are answered properly (HEAD, and GET with one Range), so a mount whose
startup was held goes on to mount.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer

from modelfs.testing.servers import QuietHandler, serving

__all__ = ["HeldOrigin", "held_origin"]


class HeldOrigin:
    def __init__(self, name: str, body: bytes) -> None:
        self.name = name
        self.body = body
        self.url = ""  # set once listening: the file's http:// URL
        self.arrived = threading.Event()  # a request is being held
        self._released = threading.Event()

    def release(self) -> None:
        """Answer the held requests, and every later one at once."""
        self._released.set()


@contextmanager
def held_origin(name: str = "m.bin", body: bytes = b"abc") -> Iterator[HeldOrigin]:
    """Serve ``body`` as ``/name`` on 127.0.0.1; every request waits for ``release()`` (done at
    exit too, so no handler thread outlives the block)."""
    origin = HeldOrigin(name, body)

    class Handler(QuietHandler):
        def _hold(self) -> bool:
            origin.arrived.set()
            origin._released.wait()
            if self.path != f"/{origin.name}":
                self.send_error(404)
                return False
            return True

        def _headers(self, status: int, length: int, extra: dict[str, str]) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(length))
            self.send_header("ETag", '"v1"')
            self.send_header("Accept-Ranges", "bytes")
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()

        def do_HEAD(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's name
            try:
                if self._hold():
                    self._headers(200, len(origin.body), {})
            except OSError:
                pass  # the client gave up on the held request (a cancelled startup)

        def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's name
            try:
                if not self._hold():
                    return
                size = len(origin.body)
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if match is None:
                    self._headers(200, size, {})
                    self.wfile.write(origin.body)
                    return
                start = int(match.group(1))
                end = min(size - 1, int(match.group(2))) if match.group(2) else size - 1
                self._headers(206, end + 1 - start, {"Content-Range": f"bytes {start}-{end}/{size}"})
                self.wfile.write(origin.body[start : end + 1])
            except OSError:
                pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    origin.url = f"http://127.0.0.1:{httpd.server_address[1]}/{name}"
    with serving(httpd):
        try:
            yield origin
        finally:
            origin.release()
