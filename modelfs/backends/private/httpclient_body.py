"""http.client's ``HTTPResponse.fp``/``length``/``chunked``: the body read in a few large recvs.

``HTTPResponse.readinto`` fills a large buffer through ``BufferedReader`` → ``SocketIO.readinto``
(Python) → ``recv_into``, one round trip per few hundred KiB. Here the body goes straight from
the socket into the block buffer with ``recv_into``, and ``SO_RCVLOWAT`` (the socket keeps its
read timeout, so each ``recv_into`` waits in ``poll``) makes each call wait until a whole chunk is
queued: the thread wakes once per chunk instead of once per few segments the sender queues,
and on loopback each wake-up is a context switch on both sides (numbers in
docs/architecture.md). The low-water mark never exceeds what is left of the body, so a wait
for it can always end; when a chunk's wait times out, whatever did arrive is taken (with the
mark back at one byte) before a stall is declared. The response's own buffer may already hold
the first bytes of the body (read with the headers): those are taken first with
``fp.readinto``. Afterwards ``length`` is lowered by what was read, so the response ends
exactly as if it had read them, the mark is back at one byte for the next response's headers,
and the connection stays reusable. Checked with CPython 3.11-3.13's http.client.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable

import crc32c

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


CHUNK = 1 << 20
"""Bytes one ``recv_into`` waits for (less at the end of the body), unless the caller asks for
fewer: the kernel queues up to that much on each socket, outside the memory budget, so many
GETs in flight wait for less each (``modelfs.memlimit.receive_chunk``)."""


def _set_lowat(sock: socket.socket, nbytes: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)


def recv_body_into(
    sock: socket.socket,
    resp: http.client.HTTPResponse,
    dest: memoryview,
    timeout: float,
    deadline: float | None = None,
    sums: list[int] | None = None,
    progress: Callable[[int], None] | None = None,
    chunk: int = CHUNK,
) -> int:
    """Read up to ``len(dest)`` body bytes of ``resp`` into ``dest``; the number read (short at EOF).

    A stall raises TimeoutError after ``timeout`` seconds without a byte (at most twice that after the last
    byte: a chunk's wait that times out is followed by one more wait for any byte at all).
    With a ``deadline`` (time.monotonic()), TimeoutError also once it has passed, however
    steadily bytes trickle in (the cache tier wants a whole block in --read-timeout).
    ``progress`` is told every receive's byte count (it may raise TimeoutError: a body that
    drips is a stall too).
    With ``sums``, the CRC32C of the bytes read is appended to it, computed chunk by chunk
    right after each receive copied the chunk in (while it is still in the CPU cache: the
    same pass over a whole block later, from memory, costs the disk write several times more).
    """
    assert resp.fp is not None and resp.length is not None
    want = min(len(dest), resp.length)
    got = 0
    buffered = resp.fp.peek(0)[:want]  # what the header parse already pulled off the socket
    crc = 0
    if buffered:
        got = resp.fp.readinto(dest[: len(buffered)])
        if sums is not None:
            crc = crc32c.crc32c(dest[:got])
        if progress is not None:
            progress(got)
    lowat = 1
    trickle = False  # the last wait for a whole chunk timed out: wait for any byte
    previous = sock.gettimeout()
    if previous != timeout:  # (the pool's connections have it already)
        sock.settimeout(timeout)
    try:
        while got < want:
            if deadline is not None:
                left = min(timeout, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError(f"{got} of {want} body bytes by the deadline")
                sock.settimeout(left)
            need = 1 if trickle else min(chunk, want - got)
            if need != lowat:
                _set_lowat(sock, need)
                lowat = need
            try:
                n = sock.recv_into(dest[got:want], want - got)
            except TimeoutError:
                if lowat == 1:
                    raise TimeoutError(f"no body bytes for {timeout:g} s") from None
                trickle = True  # fewer than a chunk came in time: a slow server, or a stalled one
                continue
            trickle = False
            if not n:
                break
            if sums is not None:
                crc = crc32c.crc32c(dest[got : got + n], crc)
            got += n
            if progress is not None:
                progress(n)
    finally:
        if lowat != 1:
            _set_lowat(sock, 1)  # the next response's headers are read a few bytes at a time
        if sock.gettimeout() != previous:
            sock.settimeout(previous)
    if sums is not None:
        sums.append(crc)
    resp.length -= got
    if resp.length == 0:
        resp.read()  # the body is complete: the response closes its file and frees the connection
    return got


def verify() -> None:
    """Raise PrivateAPIChanged unless HTTPResponse still keeps fp, length and chunked as used here."""
    import inspect

    source = inspect.getsource(http.client.HTTPResponse)
    for name in ("self.fp", "self.length", "self.chunked", "self._safe_read(self.length)"):
        if name not in source:
            raise PrivateAPIChanged(f"http.client.HTTPResponse no longer uses {name}")
