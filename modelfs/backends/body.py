"""Reading a response body straight into the caller's buffer: the loops every thread-based
backend (GCS, S3, HTTP) uses to fill blocks without an intermediate copy."""

from __future__ import annotations

import http.client
from collections.abc import Callable, Sequence

from modelfs.backends.private import httpclient_body
from modelfs.backends.private.urllib3_fp import body_readinto
from modelfs.errors import TransientError

__all__ = ["read_exactly", "read_urllib3_body", "receive_into"]


def read_exactly(readinto: Callable[[memoryview], int | None], dest: memoryview) -> int:
    """Call ``readinto`` until ``dest`` is full or the body ends; the number of bytes read."""
    got = 0
    while got < len(dest):
        n = readinto(dest[got:])
        if not n:
            break
        got += n
    return got


def read_urllib3_body(raw: object, dest: memoryview | Sequence[memoryview], what: str) -> None:
    """Fill ``dest`` (or each buffer of a sequence, in turn) from a streamed urllib3 response
    and give its connection back.

    A short body is a TransientError (the caller retries).
    """
    readinto = body_readinto(raw)
    dests = (dest,) if isinstance(dest, memoryview) else dest
    got = 0
    for part in dests:
        n = read_exactly(readinto, part)
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
) -> int:
    """Fill ``dests`` in turn with the body of ``resp`` (an ``http.client`` response on
    ``conn``); the bytes received, short if the body ended first.

    On a plain socket the body goes straight into the buffers (``httpclient_body``) and, with
    ``sums``, each buffer's CRC32C is appended as it arrives; otherwise (TLS) through
    ``readinto``, and ``sums`` stays empty (the disk write computes them)."""
    fast = httpclient_body.applies(conn.sock, resp)
    if sums is not None:
        sums.clear()
    got = 0
    for dest in dests:
        if fast:
            n = httpclient_body.recv_body_into(conn.sock, resp, dest, timeout, sums=sums)
        else:
            n = read_exactly(resp.readinto, dest)
        got += n
        if n < len(dest):
            break
    return got
