"""Ranged GETs of an HTTP(S) source on kept-alive ``http.client`` connections, in worker threads.

The HTTP backend's metadata requests (HEAD, index pages, manifests) go through httpx on the
trio loop. Its data GETs do not: httpx moves a body through h11's receive buffer, a bytearray
appended to and sliced from the front, so every byte is copied several times, all on the
event-loop thread that also answers the kernel (a cold read ran at ~280 MB/s plain and ~155
MB/s over TLS at 4-7 CPU-s per GiB; numbers in docs/architecture.md). Here the body is
received straight into the block buffers in a worker thread, as the GCS media GET does:
``recv_into`` with ``SO_RCVLOWAT`` on a plain socket (``httpclient_body``), the TLS layer's
``recv_into`` (through ``HTTPResponse.readinto``) over HTTPS.

Redirects follow the same rules as every other request of the backend (redirects.py): the
policy is asked on the trio thread (``trio.from_thread.run``) before a redirect is followed,
the user's ``--header`` values go to the source's origin only, and a target on another origin
is connected to at the address the policy checked, not resolved again. One connection pool per
origin a GET reaches (a source and the store it redirects to).

Every method blocks except where noted; the pools are the only state threads share, each
under its own lock, the dict of pools under this object's (docs/concurrency.md).
"""

from __future__ import annotations

import ssl
import threading
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit

import httpx
import trio

from modelfs.backends.body import receive_into
from modelfs.backends.connpool import ConnectionPool, InFlight
from modelfs.backends.private import httpclient_body
from modelfs.backends.redirects import MAX_REDIRECTS, RedirectPolicy
from modelfs.backends.responses import Headers
from modelfs.errors import BackendError, TransientError

__all__ = ["HTTPMedia", "NeedsProxy", "proxied"]

_REDIRECTS = (301, 302, 303, 307, 308)
_REDIRECT_BODY_LIMIT = 64 << 10  # read past to reuse the connection; a larger one closes it
_MAX_PINNED = 32

CheckResponse = Callable[[int, Headers], None]


class NeedsProxy(Exception):
    """A redirect leads where a proxy from the environment applies: http.client does not
    use one, so the caller makes this GET through httpx, which does."""


def proxied(url: str) -> bool:
    """Whether a proxy from the environment (``HTTPS_PROXY``, ``NO_PROXY``...) applies to ``url``."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    if parts.scheme in proxies or "all" in proxies:
        return not urllib.request.proxy_bypass(parts.hostname or "")
    return False


class HTTPMedia:
    """GETs of byte ranges below an http(s) source, each body read into block buffers."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int,
        headers: Mapping[str, str],
        user_headers: Sequence[tuple[str, str]],
        redirects: RedirectPolicy,
        receive_chunk: int = httpclient_body.CHUNK,
    ) -> None:
        self._ssl = ssl_context
        self._receive_chunk = receive_chunk  # (memlimit.receive_chunk: what each socket may queue)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_idle = max_idle
        self._headers = dict(headers)
        self._user_headers = list(user_headers)
        self._redirects = redirects
        self._lock = threading.Lock()
        # By origin, and by the addresses a checked redirect target must be reached at
        # (sorted: the same answers in another order are the same pool); least recently used first.
        self._pools: OrderedDict[tuple[str, str, int, tuple[str, ...] | None], ConnectionPool] = OrderedDict()
        # The GETs in flight on every pool, also on one no longer kept: a stop reaches them all.
        self._in_flight = InFlight()
        self._closed = False

    def _pool(self, scheme: str, host: str, port: int, addresses: tuple[str, ...] | None) -> ConnectionPool:
        with self._lock:
            if self._closed:
                raise ConnectionAbortedError("the daemon is stopping")
            key = (scheme, host, port, tuple(sorted(addresses)) if addresses is not None else None)
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
            else:
                if scheme == "https" and self._ssl is None:
                    raise BackendError(f"redirected to https://{host}: no TLS settings for a plain-http source")
                pool = ConnectionPool(
                    host,
                    port,
                    connect_timeout=self._connect_timeout,
                    read_timeout=self._read_timeout,
                    max_idle=self._max_idle,
                    ssl_context=self._ssl if scheme == "https" else None,
                    addresses=addresses,
                    in_flight=self._in_flight,
                )
                self._pools[key] = pool
                self._forget_old_pinned()
            return pool

    def _forget_old_pinned(self) -> None:
        """Keep at most _MAX_PINNED pools of checked addresses (a CDN's answers change); the
        least recently used goes: its idle connections close, GETs on it finish normally (a
        stop still reaches them: they are noted in the transport's in-flight set)."""
        pinned = [key for key in self._pools if key[3] is not None]
        for key in pinned[: max(0, len(pinned) - _MAX_PINNED)]:
            self._pools.pop(key).retire()

    def close(self) -> None:
        """Close idle connections; later GETs fail (the daemon is stopping)."""
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
        for pool in pools:
            pool.close()

    def abort(self) -> None:
        """The daemon is stopping: GETs in flight fail now, not at the read timeout."""
        self._in_flight.abort()
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
        for pool in pools:
            pool.abort()

    def get_into(
        self,
        url: str,
        headers: Mapping[str, str],
        dests: Sequence[memoryview],
        check: CheckResponse,
        what: str,
        sums: list[int] | None = None,
    ) -> None:
        """Fill ``dests`` in turn from one GET of ``url`` (``headers`` hold its Range and
        validators), following redirects by the policy. Runs in a trio worker thread.

        ``check(status, headers)`` raises for an answer that is not exactly the range asked
        for. With ``sums``, each buffer's CRC32C is appended as its bytes arrive (plain
        sockets only; else ``sums`` is left empty). Network failures surface as OSError,
        http.client.HTTPException or EOFError; a body longer than asked for is a
        TransientError.
        """
        length = sum(len(dest) for dest in dests)
        # httpx's URL parsing, as for the backend's other requests: the same normalization
        # and percent-encoding of whatever a Location header holds.
        current = httpx.URL(url)
        same_origin = True
        addresses: tuple[str, ...] | None = None  # where the policy checked the current target
        for _ in range(MAX_REDIRECTS + 1):
            # The name as httpx sends it (IDNA 2008, punycode), not as http.client would encode it.
            scheme, host = current.scheme, current.raw_host.decode("ascii")
            if scheme not in ("http", "https") or not host:
                raise BackendError(f"{what}: not an http(s) URL")
            port = current.port or (443 if scheme == "https" else 80)
            sent = dict(self._headers)
            sent.update(headers)
            if same_origin:
                sent.update(self._user_headers)
            target = current.raw_path.decode("ascii")
            if addresses is not None and not addresses:
                raise OSError(f"{host}: the name does not resolve")
            pool = self._pool(scheme, host, port, addresses)
            location = self._get_once(pool, target, sent, dests, length, check, sums, what)
            if location is None:
                return
            try:
                following = current.join(location)
            except httpx.InvalidURL:
                raise BackendError(f"{what}: redirected to an invalid URL") from None
            verdict = trio.from_thread.run(self._redirects.verdict, current, following, what)
            if proxied(str(following)):
                raise NeedsProxy(str(following))
            same_origin = verdict.same_origin and same_origin
            addresses = verdict.addresses
            current = following
        raise BackendError(f"{what}: more than {MAX_REDIRECTS} redirects")

    def _get_once(
        self,
        pool: ConnectionPool,
        target: str,
        headers: dict[str, str],
        dests: Sequence[memoryview],
        length: int,
        check: CheckResponse,
        sums: list[int] | None,
        what: str,
    ) -> str | None:
        """One GET on a pooled connection: None when ``dests`` are filled, or a redirect's Location."""
        conn = pool.take()
        sock = conn.sock
        pool.track(conn, sock, True)
        try:
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
            except BaseException:
                conn.close()
                raise
            try:
                location = resp.getheader("location")
                if resp.status in _REDIRECTS and location:
                    body = resp.read(_REDIRECT_BODY_LIMIT + 1)
                    if len(body) > _REDIRECT_BODY_LIMIT or not resp.isclosed():
                        resp.close()
                        conn.close()
                    else:
                        pool.give_back(conn)
                    return location
                # HTTPMessage answers get() case-insensitively, which is all the check asks of a mapping.
                check(resp.status, resp.headers)
                got = receive_into(conn, resp, dests, self._read_timeout, sums, self._receive_chunk)
                if got < length:
                    raise EOFError(f"body ended after {got} of {length} bytes")
                if not resp.isclosed() and resp.read(1):
                    raise TransientError(f"{what}: the server sent more than {length} bytes")
            except BaseException:
                # Close the response too: after a "Connection: close" answer http.client has
                # handed the socket to the response alone (see gcs_media.py).
                resp.close()
                conn.close()
                raise
            pool.finish(conn, resp)
            return None
        finally:
            pool.track(conn, sock, False)
