"""GETs of the GCS JSON API (listings, object metadata) on kept-alive ``http.client`` connections.

The GCS backend's listing and stat requests used google-cloud-storage, whose import (with
requests and urllib3) was a third of the daemon's fixed memory; these are a handful of GETs
whose answers are small JSON documents. Signing is google-auth's (gcs_auth.Signer); an
expired token is refreshed and the request sent once more on a 401, as the client library's
authorized session does. Statuses other than 2xx raise :class:`StatusError`, which the
backend classifies (``classify``), so a 404 can mean a missing bucket or a missing object.

Every method blocks; the GCS backend calls them from trio worker threads.
"""

from __future__ import annotations

import http.client
import zlib
from typing import Protocol
from urllib.parse import quote, urlencode, urlsplit

from modelfs import __version__
from modelfs.backends import answers
from modelfs.backends.body import Progress
from modelfs.backends.connpool import ConnectionPool
from modelfs.backends.gcs_auth import Signer, tls_context
from modelfs.backends.gcs_scan import error_message
from modelfs.errors import BackendError, TransientError

__all__ = ["JsonApi", "JsonClient", "StatusError", "MAX_BODY", "MAX_ERROR_BODY", "object_path", "query"]

USER_AGENT = f"modelfs/{__version__} (python http.client)"
# A page of 1,000 entries with the fields modelfs asks for is well under 1 MiB even with
# 1,024-byte names; a server sending more than this is not answering that request.
MAX_BODY = 16 << 20
# An error's body is read this far for its message (GCS's are a few hundred bytes); the
# connection of a longer one is closed rather than drained.
MAX_ERROR_BODY = 64 << 10
_MAX_MESSAGE = 200
_DECODE_STEP = 1 << 20


class StatusError(Exception):
    """The JSON API answered with a status other than 2xx; ``message`` is the server's reason
    (its ``error.message``), on one line and at most 200 characters, if it gave one."""

    def __init__(self, status: int, reason: str, message: str | None = None) -> None:
        self.status = status
        self.message = one_line(message) if message else None
        text = f"HTTP {status} {reason}".strip()
        super().__init__(f"{text}: {self.message}" if self.message else text)

    @classmethod
    def of_body(cls, status: int, reason: str, body: bytes, encoding: str | None) -> StatusError:
        """The error with the message of ``body`` (at most MAX_ERROR_BODY of it, gzip or not)."""
        try:
            message = error_message(decode_body(body, encoding, MAX_ERROR_BODY))
        except BackendError:  # (a body cut short or not JSON: the status alone says it)
            message = None
        return cls(status, reason, message)


def one_line(text: str) -> str:
    """``text`` without control characters or line breaks (a server's words go into one log
    line), runs of blanks as one space, at most 200 characters."""
    kept = "".join(ch if ch.isprintable() else " " for ch in text[: _MAX_MESSAGE * 4])
    return " ".join(kept.split())[:_MAX_MESSAGE]


def object_path(bucket: str, name: str | None = None) -> str:
    """``/storage/v1/b/BUCKET/o[/NAME]`` with every character of the names escaped but none
    of the separators: '/', '%', '#', '?', spaces and non-ASCII (as UTF-8) all go as %XX."""
    path = f"/storage/v1/b/{quote(bucket, safe='')}/o"
    if name is None:
        return path
    escaped = quote(name, safe="")
    if escaped in (".", ".."):  # never a dot-segment a server or proxy could resolve away
        escaped = escaped.replace(".", "%2E")
    return f"{path}/{escaped}"


def query(params: dict[str, str | int | None]) -> str:
    """``?a=b&...`` of the parameters that are not None, each value escaped as a whole."""
    given = {k: str(v) for k, v in params.items() if v is not None}
    return "?" + urlencode(given, quote_via=quote, safe="") if given else ""


class JsonClient(Protocol):
    """What the backend needs of a JSON API transport (this one, or a session behind a proxy)."""

    def get_json(self, path: str) -> bytes: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


def decode_body(data: bytes, encoding: str | None, limit: int = MAX_BODY) -> bytes:
    """The body ``data`` (gzip-decoded if ``encoding`` says so), within ``limit`` bytes.

    It is not parsed here: the backend matches the fields it uses in place (gcs_scan.py).
    """
    encoding = (encoding or "identity").strip().lower()
    if encoding == "gzip":
        inflater = zlib.decompressobj(wbits=31)
        parts: list[bytes] = []
        total = 0
        rest = data
        try:
            # A step at a time, each charged to the memory budget before it is decoded
            # (modelfs.backends.answers): the encoded body beside what it decodes to.
            while total <= limit and not inflater.eof:
                step = min(_DECODE_STEP, limit + 1 - total)
                answers.grow(len(data) + total + step)
                part = inflater.decompress(rest, step)
                rest = inflater.unconsumed_tail
                if not part and not rest:
                    break
                parts.append(part)
                total += len(part)
        except zlib.error as exc:
            raise TransientError(f"the JSON API sent a corrupt gzip body ({exc})") from None
        if total > limit:
            raise BackendError(f"the JSON API's answer is larger than {limit} bytes")
        if not inflater.eof:
            raise TransientError("the JSON API's gzip body ended early")
        data = b"".join(parts)
    elif encoding not in ("identity", ""):
        raise BackendError(f"the JSON API sent a {encoding}-encoded body, which was not asked for")
    return data


class JsonApi:
    """GETs of ``base_url`` + path on pooled ``http.client`` connections, answers parsed as JSON."""

    def __init__(
        self, base_url: str, signer: Signer, *, connect_timeout: float, read_timeout: float, max_idle: int
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        https = parts.scheme == "https"
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._signer = signer
        self._read_timeout = read_timeout
        self._pool = ConnectionPool(
            parts.hostname,
            parts.port or (443 if https else 80),
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_idle=max_idle,
            ssl_context=tls_context() if https else None,
        )

    def close(self) -> None:
        self._pool.close()

    def abort(self) -> None:
        """The daemon is stopping: requests in flight fail now, not at the read timeout."""
        self._pool.abort()

    def get_json(self, path: str) -> bytes:
        """The JSON body at ``path`` (with its query string), decoded but not parsed.
        StatusError for a non-2xx answer; OSError or http.client.HTTPException when the
        network fails."""
        refreshed = False
        while True:
            headers = {"Accept": "application/json", "Accept-Encoding": "gzip", "User-Agent": USER_AGENT}
            self._signer.sign("GET", self._origin + path, headers, force_refresh=refreshed)
            status, encoding, data = self._get_once(path, headers)
            if status == 401 and not refreshed and self._signer.credentials is not None:
                refreshed = True
                continue
            if not 200 <= status < 300:
                raise StatusError.of_body(status, http.client.responses.get(status, ""), data, encoding)
            return decode_body(data, encoding)

    def _get_once(self, path: str, headers: dict[str, str]) -> tuple[int, str | None, bytes]:
        conn = self._pool.take()
        sock = conn.sock
        self._pool.track(conn, sock, True)
        try:
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
            except BaseException:
                conn.close()
                raise
            try:
                ok = 200 <= resp.status < 300
                limit = MAX_BODY if ok else MAX_ERROR_BODY
                encoding = (resp.getheader("content-encoding") or "identity").strip().lower()
                identity = encoding in ("identity", "")
                if ok and identity and resp.length is not None and resp.length > MAX_BODY:
                    raise BackendError(f"the JSON API's answer is larger than {MAX_BODY} bytes")
                # Charged to the memory budget from here until the call has parsed it: once
                # at its length if known, else as it grows (and as it is decoded: decode_body).
                answers.begin(limit + 1 if identity else 2 * (limit + 1), resp.length)
                data = _read_answer(resp, Progress(self._read_timeout), limit)
                if len(data) > limit:
                    if ok:
                        raise BackendError(f"the JSON API's answer is larger than {MAX_BODY} bytes")
                    # An error's body past MAX_ERROR_BODY is not read: its start says what it
                    # can, and the connection (the rest of it still unread) is not reused.
                    resp.close()
                    conn.close()
                    return resp.status, resp.getheader("content-encoding"), data[:limit]
                if resp.length:  # http.client returns a body cut short without a word
                    raise EOFError(f"the JSON API's answer ended {resp.length} bytes early")
            except BaseException:
                resp.close()  # after "Connection: close" the response alone holds the socket
                conn.close()
                raise
            self._pool.finish(conn, resp)
            return resp.status, resp.getheader("content-encoding"), data
        finally:
            self._pool.track(conn, sock, False)


def _read_answer(resp: http.client.HTTPResponse, progress: Progress, limit: int = MAX_BODY) -> bytes:
    """The body, at most ``limit`` + 1 bytes, with the data path's progress rule: an answer
    dripped a byte now and then (each within the read timeout) is a stall, not a wait of
    hours (the retry deadline is checked only between attempts)."""
    return answers.read_charged(resp.read1, lambda: getattr(resp, "length", None), limit, progress.add)
