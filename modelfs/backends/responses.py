"""One set of rules for what an object store's answer means, shared by every HTTP backend.

A backend builds its request its own way (google-auth signed ``http.client``, botocore,
httpx) but the answer to a ranged GET is judged here, once: which statuses mean the pinned
version is gone, which are worth retrying, and whether the body that follows is exactly the
bytes asked for. Before this module each backend had its own Content-Range rules and a 416
was retried for GCS but final for S3 and HTTP.

The rules (a read always names a version and a range inside that version's size):

- 404, 410 (the version is gone), 412 (``If-Match`` failed) and 416 (the object is shorter
  than the pinned version was) mean the version changed: VersionChanged (ESTALE).
- 401, 403: AccessDenied. 408, 429 and 5xx: TransientError (the caller retries). Anything
  else that is not 200 or 206: BackendError.
- 206 needs a Content-Range of exactly the range asked for. Its total, when the caller knows
  the pinned size, must be that size (else VersionChanged); when it does not, a range that
  runs past the total is the caller's mistake (BackendError) and any other mismatch a
  TransientError.
- 200 (the server ignored Range) is acceptable only for a range that is the whole object.
- A Content-Length other than the range's length is a TransientError; so is a body that
  ends early, which the backends check while reading.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from modelfs.errors import AccessDenied, BackendError, NotFound, TransientError, VersionChanged

__all__ = [
    "Headers",
    "RangeRequest",
    "Unpinned",
    "check_range_response",
    "metadata_status_error",
    "no_range_support",
    "parse_content_range",
    "read_status_error",
    "short_reason",
]

log = logging.getLogger(__name__)

_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


class Headers(Protocol):
    """Response headers looked up by lower-case name: a dict, http.client's, requests', httpx's."""

    def get(self, name: str, /) -> str | None: ...


@dataclass(frozen=True, slots=True)
class RangeRequest:
    """What a ranged GET asked for: ``length`` bytes from ``offset`` of an object of ``size``.

    ``size`` is the pinned version's size: HTTP versions carry it, GCS and S3 reads are given
    the listed size (the block store passes it to every read); None only when the caller does
    not know it (a backend used directly, in tests and benchmarks).
    """

    what: str
    offset: int
    length: int
    size: int | None = None

    @property
    def header(self) -> str:
        """The ``Range`` header value."""
        return f"bytes={self.offset}-{self.offset + self.length - 1}"


class Unpinned:
    """Answers to a pinned GET that carry no version header at all (GCS's X-Goog-Generation,
    S3's ETag): accepted, as some S3-compatible stores and proxies drop the header, but then
    only the size check (the Content-Range total against the listed size) tells another object
    from the pinned one, so the first is worth one warning per backend. Worker threads note
    them; the flag is under its own lock."""

    def __init__(self, source: str, header: str) -> None:
        self._source = source
        self._header = header
        self._lock = threading.Lock()
        self._warned = False

    def check(self, value: str | None, what: str) -> None:
        """Note an answer whose ``header`` was ``value`` (None: missing; logged the first time)."""
        if value is not None:
            return
        with self._lock:
            if self._warned:
                return
            self._warned = True
        log.warning(
            "%s: %s: the store answered a pinned GET without %s, so it may not honour the "
            "version pin; reads are checked against the listed size only (logged once)",
            self._source,
            what,
            self._header,
        )


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``(first, last, total or None)`` of ``bytes first-last/total``, None if malformed."""
    match = _CONTENT_RANGE_RE.fullmatch((value or "").strip())
    if match is None:
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)), total


def read_status_error(status: int, what: str) -> BackendError | None:
    """The error a ranged GET's status means, or None for 200/206."""
    if status in (200, 206):
        return None
    if status == 412:
        return VersionChanged(f"{what}: changed in the store since it was opened (412 Precondition Failed)")
    if status == 416:
        return VersionChanged(f"{what}: shorter in the store than when it was opened (416)")
    return _status_error(status, what, VersionChanged(f"{what}: gone from the store since it was opened ({status})"))


def metadata_status_error(status: int, what: str) -> BackendError | None:
    """The error of a listing or stat request's status, or None for 2xx."""
    if 200 <= status < 300:
        return None
    return _status_error(status, what, NotFound(f"{what}: not found ({status})"))


def _status_error(status: int, what: str, gone: BackendError) -> BackendError:
    """What the statuses a read and a metadata request share mean; ``gone`` for 404 and 410."""
    if status in (404, 410):
        return gone
    if status in (401, 403):
        return AccessDenied(f"{what}: access denied ({status})")
    if status in (408, 429) or status >= 500:
        return TransientError(f"{what}: HTTP {status}")
    return BackendError(f"{what}: unexpected HTTP {status}")


def no_range_support(what: str) -> BackendError:
    """A server that answered a ranged GET with the whole object: nothing to retry."""
    return BackendError(
        f"{what}: the server does not support Range requests (it sent the whole file "
        "for a ranged GET); modelfs needs a server that honours Range"
    )


def _int_header(headers: Headers, name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None


def check_range_response(
    status: int,
    headers: Headers,
    request: RangeRequest,
    *,
    pinned: Callable[[Headers], None] | None = None,
    encodings: Collection[str] | None = ("identity", ""),
) -> None:
    """Raise unless ``status`` and ``headers`` announce exactly the bytes ``request`` asked for.

    ``headers`` is looked up with lower-case names (every client here gives a
    case-insensitive mapping, or lower-case keys). ``pinned(headers)`` is the backend's own
    validator check (generation, ETag, Last-Modified): it raises VersionChanged when the
    answer is of another version. ``encodings`` are the Content-Encodings the request
    accepted: any other means the body is not the stored bytes at these offsets (None: the
    store never transcodes, so the header only describes the stored bytes).
    """
    what, offset, length, size = request.what, request.offset, request.length, request.size
    error = read_status_error(status, what)
    if error is not None:
        raise error
    if pinned is not None:
        pinned(headers)
    encoding = (headers.get("content-encoding") or "identity").strip().lower()
    if encodings is not None and encoding not in encodings:
        raise BackendError(f"{what}: the server sent a {encoding}-encoded body, which was not asked for")
    content_length = _int_header(headers, "content-length")
    if status == 206:
        parsed = parse_content_range(headers.get("content-range"))
        if parsed is None:
            raise TransientError(f"{what}: bad Content-Range {headers.get('content-range')!r}")
        first, last, total = parsed
        if total is not None and size is not None and total != size:
            raise VersionChanged(f"{what}: changed in the store (size {size} is now {total})")
        if first != offset or last != offset + length - 1:
            if total is not None and offset + length > total:
                raise BackendError(f"{what}: beyond the end of the object ({total} bytes)")
            raise TransientError(f"{what}: wrong Content-Range {headers.get('content-range')!r}")
    else:  # 200: the whole object, acceptable only when the whole object was asked for
        # From offset 0 a whole body starts with the right bytes; how many came is checked
        # while reading when the length is not announced.
        whole = size if size is not None else content_length
        if offset != 0 or (whole is not None and whole != length):
            raise no_range_support(what)
        if size is not None and content_length is not None and content_length != size:
            raise VersionChanged(f"{what}: changed in the store (size {size} is now {content_length})")
    if content_length is not None and content_length != length:
        raise TransientError(f"{what}: Content-Length {content_length}, expected {length}")


def short_reason(exc: BaseException) -> str:
    """A one-line reason for a network failure: the client libraries nest it deep inside."""
    text = str(exc)
    lowered = text.lower()
    if isinstance(exc, TimeoutError) or "timed out" in lowered or "timeout" in lowered + type(exc).__name__.lower():
        return "timed out"
    match = _ERRNO_RE.search(text)
    if match:
        return match.group(1).strip().lower()
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
