"""Reading a response body straight into the caller's buffer: the loops every thread-based
backend (GCS, S3, HTTP) uses to fill blocks without an intermediate copy."""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable, Sequence

from modelfs.backends.private import httpclient_body
from modelfs.backends.private.urllib3_fp import body_readinto
from modelfs.errors import TransientError

__all__ = ["MIN_PROGRESS", "Progress", "read_exactly", "read_urllib3_body", "receive_into"]

MIN_PROGRESS = 64 << 10
"""Bytes a body must bring in every ``--read-timeout`` seconds (~2 KiB/s at the default 30)."""


class Progress:
    """A body's bytes as they arrive: fewer than MIN_PROGRESS in ``timeout`` seconds is a
    stall (TimeoutError), like no byte at all in that time.

    The read timeout alone bounds the wait for one byte: a server dripping a byte now and then
    would hold a GET (and the reader, and a retry deadline checked only between attempts)
    forever. Checked as bytes arrive; the read timeout covers the wait for none.
    """

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout = timeout
        self._clock = clock
        self._since = clock()
        self._bytes = 0

    def add(self, n: int) -> None:
        """``n`` more bytes arrived (TimeoutError if the window they close brought too few)."""
        self._bytes += n
        now = self._clock()
        if now - self._since >= self._timeout:
            if self._bytes < MIN_PROGRESS:
                raise TimeoutError(f"fewer than {MIN_PROGRESS} body bytes in {self._timeout:g} s")
            self._since, self._bytes = now, 0


def read_exactly(
    readinto: Callable[[memoryview], int | None], dest: memoryview, progress: Progress | None = None
) -> int:
    """Call ``readinto`` until ``dest`` is full or the body ends; the number of bytes read."""
    got = 0
    while got < len(dest):
        n = readinto(dest[got:])
        if not n:
            break
        got += n
        if progress is not None:
            progress.add(n)
    return got


def read_urllib3_body(raw: object, dest: memoryview | Sequence[memoryview], what: str, timeout: float) -> None:
    """Fill ``dest`` (or each buffer of a sequence, in turn) from a streamed urllib3 response
    and give its connection back.

    A short body is a TransientError (the caller retries); one that stalls (see
    :class:`Progress`, ``timeout``: the read timeout) a TimeoutError.
    """
    readinto = body_readinto(raw)
    dests = (dest,) if isinstance(dest, memoryview) else dest
    progress = Progress(timeout)
    got = 0
    for part in dests:
        n = read_exactly(readinto, part, progress)
        got += n
        if n < len(part):
            raise TransientError(f"{what}: body ended after {got} of {sum(len(d) for d in dests)} bytes")
    raw.release_conn()  # type: ignore[attr-defined]


def receive_into(
    conn: http.client.HTTPConnection,
    resp: http.client.HTTPResponse,
    dests: Sequence[memoryview],
    timeout: float,
    sums: list[int] | None = None,
    chunk: int = httpclient_body.CHUNK,
) -> int:
    """Fill ``dests`` in turn with the body of ``resp`` (an ``http.client`` response on
    ``conn``); the bytes received, short if the body ended first.

    On a plain socket the body goes straight into the buffers (``httpclient_body``) and, with
    ``sums``, each buffer's CRC32C is appended as it arrives, the thread woken once per ``chunk``
    bytes queued (``SO_RCVLOWAT``); otherwise (TLS) through
    ``readinto``, and ``sums`` stays empty (the disk write computes them)."""
    fast = httpclient_body.applies(conn.sock, resp)
    if sums is not None:
        sums.clear()
    progress = Progress(timeout)  # (a body that drips is a stall too)
    got = 0
    for dest in dests:
        if fast:
            n = httpclient_body.recv_body_into(
                conn.sock, resp, dest, timeout, sums=sums, progress=progress.add, chunk=chunk
            )
        else:
            n = read_exactly(resp.readinto, dest, progress)
        got += n
        if n < len(dest):
            break
    return got
