"""http.client's ``HTTPResponse.fp``/``length``/``chunked``: the body read with one blocking recv per block.

``HTTPResponse.readinto`` fills a large buffer through ``BufferedReader`` → ``SocketIO.readinto``
(Python) → ``recv_into``, one round trip per few hundred KiB, each preceded by a ``poll`` when
the socket has a timeout. A plain TCP socket switched to blocking mode with ``SO_RCVTIMEO`` and
read with ``recv_into(..., MSG_WAITALL)`` fills the whole block in one system call that sleeps in
the kernel until the bytes are there. The response's own buffer may already hold the first bytes
of the body (read with the headers): those are taken first with ``fp.readinto``. Afterwards
``length`` is lowered by what was read, so the response ends exactly as if it had read them and
the connection stays reusable. Checked with CPython 3.11-3.13's http.client.
"""

from __future__ import annotations

import http.client
import socket
import struct
import time

from modelfs.backends.private import PrivateAPIChanged

__all__ = ["applies", "recv_body_into", "verify"]


def applies(sock: object, resp: http.client.HTTPResponse) -> bool:
    """Only for a plain TCP socket (TLS sockets take no recv flags) and a body of known length."""
    return (
        type(sock) is socket.socket
        and not resp.chunked
        and resp.length is not None
        and getattr(resp, "fp", None) is not None
    )


def recv_body_into(
    sock: socket.socket, resp: http.client.HTTPResponse, dest: memoryview, timeout: float, deadline: float | None = None
) -> int:
    """Read up to ``len(dest)`` body bytes of ``resp`` into ``dest``; the number read (short at EOF).

    A stall raises TimeoutError after ``timeout`` seconds without a byte (at most twice that after
    the last byte: a call that got some bytes before its timer ran out returns them first).
    With a ``deadline`` (time.monotonic()), TimeoutError also once it has passed, however
    steadily bytes trickle in (the cache tier wants a whole block in --read-timeout).
    """
    assert resp.fp is not None and resp.length is not None
    want = min(len(dest), resp.length)
    got = 0
    buffered = resp.fp.peek(0)[:want]  # what the header parse already pulled off the socket
    if buffered:
        got = resp.fp.readinto(dest[: len(buffered)])
    sock.settimeout(None)  # blocking: the wait happens inside recv, bounded by SO_RCVTIMEO
    _set_timeout(sock, timeout)
    try:
        while got < want:
            if deadline is not None:
                left = min(timeout, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError(f"{got} of {want} body bytes by the deadline")
                _set_timeout(sock, max(left, 0.001))  # (0, 0) would mean no timeout at all
            try:
                n = sock.recv_into(dest[got:want], want - got, socket.MSG_WAITALL)
            except BlockingIOError:
                raise TimeoutError(f"no body bytes for {timeout:g} s") from None
            if not n:
                break
            got += n
    finally:
        sock.settimeout(timeout)  # back to non-blocking + poll for the next request's headers
    resp.length -= got
    if resp.length == 0:
        resp.read()  # the body is complete: the response closes its file and frees the connection
    return got


def _set_timeout(sock: socket.socket, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def verify() -> None:
    """Raise PrivateAPIChanged unless HTTPResponse still keeps fp, length and chunked as used here."""
    import inspect

    source = inspect.getsource(http.client.HTTPResponse)
    for name in ("self.fp", "self.length", "self.chunked", "self._safe_read(self.length)"):
        if name not in source:
            raise PrivateAPIChanged(f"http.client.HTTPResponse no longer uses {name}")
