"""Ranged media GETs on plain ``http.client`` connections, for the GCS backend's data path.

An authorized ``requests`` session costs several times the CPU per GET
of a bare ``http.client`` request on a kept-alive connection before a byte moves (adapters,
hooks, cookie jar, urllib3 pool; the numbers are in docs/architecture.md, "Why these
numbers"). That fixed cost is what bounds random-read IOPS and a good part of the streaming
CPU, so the byte-moving GET gets its own small transport. Auth is google-auth's: the
backend's credentials sign every request (gcs_auth.Signer, refreshing the token when it
expires, and once more on a 401).

Every method blocks; the GCS backend calls them from trio worker threads. Connections are
pooled LIFO and used by one thread at a time.
"""

from __future__ import annotations

import http.client
import os
import ssl
import urllib.request
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from modelfs import __version__
from modelfs.backends import answers
from modelfs.backends.body import receive_into
from modelfs.backends.connpool import ConnectionPool
from modelfs.backends.gcs_auth import Signer, tls_context
from modelfs.backends.gcs_json import StatusError
from modelfs.backends.private import httpclient_body
from modelfs.backends.responses import Headers
from modelfs.errors import BackendError, TransientError

_MAX_ERROR_BODY = 64 << 10  # an answer that is not the body asked for is read no further

__all__ = ["CheckResponse", "MediaTransport", "plain_transport_applies"]

_USER_AGENT = f"modelfs/{__version__} (python http.client)"

CheckResponse = Callable[[int, Headers], None]


def plain_transport_applies(base_url: str) -> bool:
    """False when requests would do something we do not: go through a proxy, or mutual TLS.

    Then the backend sends its requests through google-auth's requests session (gcs_session.py).
    """
    if os.environ.get("GOOGLE_API_USE_CLIENT_CERTIFICATE", "").lower() == "true":
        return False
    parts = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    if parts.scheme in proxies or "all" in proxies:
        return bool(urllib.request.proxy_bypass(parts.hostname or ""))
    return True


class MediaTransport:
    """GETs of byte ranges from one ``http(s)://host[:port]``, read straight into a buffer."""

    def __init__(
        self,
        base_url: str,
        credentials: object | None,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int,
        receive_chunk: int = httpclient_body.CHUNK,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._https = parts.scheme == "https"
        self._origin = f"{parts.scheme}://{parts.netloc}"
        # ``credentials`` may be a Signer the backend shares with its JSON API requests (one
        # token refresh for both); anonymous access (public buckets, the emulator) signs nothing.
        if isinstance(credentials, Signer):
            self._signer = credentials
        elif credentials is None:
            self._signer = Signer(None)
        else:
            from google.auth.credentials import AnonymousCredentials

            self._signer = Signer(None if isinstance(credentials, AnonymousCredentials) else credentials)
        self._read_timeout = read_timeout
        self._receive_chunk = receive_chunk  # (memlimit.receive_chunk: what each socket may queue)
        self._pool = ConnectionPool(
            parts.hostname,
            parts.port or (443 if self._https else 80),
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_idle=max_idle,
            ssl_context=self._ssl_context() if self._https else None,
        )
        # The GCS backend sets "gzip": gzip-stored objects are then served as stored (gcs.py).
        self.accept_encoding = "identity"

    @staticmethod
    def _ssl_context() -> ssl.SSLContext:
        return tls_context()

    # --- auth

    def _sign(self, url: str, headers: dict[str, str], *, force_refresh: bool) -> None:
        self._signer.sign("GET", url, headers, force_refresh=force_refresh)

    # --- connections

    def close(self) -> None:
        self._pool.close()

    def abort(self) -> None:
        """The daemon is stopping: GETs in flight fail now, not at the read timeout."""
        self._pool.abort()

    # --- the GET

    def get_into(self, path: str, offset: int, dest: memoryview, check: CheckResponse) -> None:
        """Fill ``dest`` with bytes [offset, offset + len(dest)) of the resource at ``path``.

        ``check(status, headers)`` raises for any response that is not exactly this range;
        network failures surface as OSError or http.client.HTTPException, and a short body
        as EOFError. The connection is reused only after a complete, checked body.
        """
        self.get_joined_into(path, offset, (dest,), check)

    def get_joined_into(
        self,
        path: str,
        offset: int,
        dests: Sequence[memoryview],
        check: CheckResponse,
        sums: list[int] | None = None,
    ) -> None:
        """:meth:`get_into` for several buffers that together hold one range: one GET, its
        body received into each buffer in turn (joined read-ahead blocks). With ``sums``, the
        CRC32C of each buffer is appended to it as the body arrives (none if the transport
        reads the body another way)."""
        length = sum(len(dest) for dest in dests)
        url = self._origin + path
        refreshed = False
        while True:
            headers = {
                "Range": f"bytes={offset}-{offset + length - 1}",
                "Accept-Encoding": self.accept_encoding,
                "User-Agent": _USER_AGENT,
            }
            self._sign(url, headers, force_refresh=refreshed)
            conn = self._pool.take()
            sock = conn.sock
            self._pool.track(conn, sock, True)
            try:
                if self._get_once(conn, path, headers, dests, length, check, sums, retry_auth=not refreshed):
                    return
                refreshed = True
            finally:
                self._pool.track(conn, sock, False)

    @staticmethod
    def _error_body(resp: http.client.HTTPResponse) -> bytes:
        """At most _MAX_ERROR_BODY of an error answer's body, charged to the memory budget
        while the GET holds it (with what it decodes to, if gzip-encoded): b"" unread when the
        budget has no room for it now (a data GET may not wait: modelfs.backends.answers)."""
        encoding = (resp.getheader("content-encoding") or "identity").strip().lower()
        most = _MAX_ERROR_BODY + 1 if encoding in ("identity", "") else 2 * (_MAX_ERROR_BODY + 1)
        return resp.read(_MAX_ERROR_BODY) if answers.begin_optional(most) else b""

    @classmethod
    def _refused(cls, resp: http.client.HTTPResponse, check: CheckResponse) -> None:
        """An error answer: the check's error, with the server's reason (``error.message`` of
        at most the first 64 KiB of the body: "... requester pays bucket but no user project
        provided") when the error is a refusal, not a status that is retried."""
        body = cls._error_body(resp)
        message = (
            StatusError.of_body(resp.status, "", body, resp.getheader("content-encoding")).message if body else None
        )
        try:
            check(resp.status, resp.headers)
        except BackendError as exc:
            if message and not isinstance(exc, TransientError):
                raise type(exc)(f"{exc}: {message}") from None
            raise

    def _get_once(
        self,
        conn: http.client.HTTPConnection,
        path: str,
        headers: dict[str, str],
        dests: Sequence[memoryview],
        length: int,
        check: CheckResponse,
        sums: list[int] | None,
        *,
        retry_auth: bool,
    ) -> bool:
        """One GET on ``conn``; False if it answered 401 and a fresh token should be tried."""
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        try:
            if resp.status == 401 and retry_auth and self._signer.credentials is not None:
                self._error_body(resp)  # (read no further: a longer one, or one unread, closes the connection)
                if resp.isclosed():
                    self._pool.give_back(conn)
                else:
                    conn.close()
                return False
            if resp.status >= 400:
                self._refused(resp, check)
            # HTTPMessage answers get() case-insensitively, which is all the check asks of a mapping.
            check(resp.status, resp.headers)
            # (``sums`` starts empty: a 401 answered before had nothing of its body summed.)
            got = receive_into(conn, resp, dests, self._read_timeout, sums, self._receive_chunk)
            if got < length:
                raise EOFError(f"body ended after {got} of {length} bytes")
        except BaseException:
            # Close the response too: after a "Connection: close" answer http.client has
            # handed the socket to the response alone, and conn.close() would leave it
            # open until the exception's traceback (which holds ``resp``) is collected.
            resp.close()
            conn.close()
            raise
        self._pool.finish(conn, resp)
        return True
