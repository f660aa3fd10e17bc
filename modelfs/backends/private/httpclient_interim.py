"""http.client's ``HTTPResponse._read_status``: skip every interim (1xx) answer, a bounded number.

``HTTPResponse.begin`` skips ``100 Continue`` answers itself, as many as come, and takes any
other 1xx as the final answer. So a ``103 Early Hints`` before a 206 (CDNs send them) failed
the GET as an unexpected status, where httpx (h11) skips it; and a server that sends
``100 Continue`` forever kept a GET waiting forever, each answer restarting the read timeout.
:class:`InterimSkippingResponse` reads the status line through ``_read_status``, skips the
headers of a 102-199 answer (101 Switching Protocols is final: it ends HTTP on the
connection) and lets ``begin`` skip 100s as before, and counts them all: more than
:data:`MAX_INTERIM` is an ``http.client.HTTPException``. Checked with CPython 3.11-3.13.
"""

from __future__ import annotations

import http.client
from typing import Any

from modelfs.backends.private import PrivateAPIChanged

__all__ = ["MAX_INTERIM", "InterimSkippingResponse", "verify"]

MAX_INTERIM = 16
"""Interim answers one response may start with (real servers send one or two)."""


class TooManyInterim(http.client.HTTPException):
    """A server that keeps sending 1xx answers instead of the response."""


class InterimSkippingResponse(http.client.HTTPResponse):
    """An ``HTTPResponse`` that skips any 1xx but 101 before the final answer, at most MAX_INTERIM."""

    _interim_seen = 0

    def _read_status(self) -> Any:
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not 100 <= status < 200 or status == 101:
                return version, status, reason
            self._interim_seen += 1
            if self._interim_seen > MAX_INTERIM:
                raise TooManyInterim(f"more than {MAX_INTERIM} interim (1xx) answers before the response")
            if status == 100:
                return version, status, reason  # begin() skips its headers and asks again
            http.client.parse_headers(self.fp)  # this interim answer's headers: skipped


def verify() -> None:
    """Raise PrivateAPIChanged unless ``begin`` still reads status lines through
    ``_read_status`` and skips only 100s itself."""
    import inspect

    source = inspect.getsource(http.client.HTTPResponse.begin)
    for needed in ("self._read_status()", "if status != CONTINUE:"):
        if needed not in source:
            raise PrivateAPIChanged(f"http.client.HTTPResponse.begin no longer has {needed!r}")
