"""http.client's ``HTTPConnection.response_class`` and ``HTTPResponse.fp``: every byte of an
answer, headers included, read under the data path's progress rule.

The read timeout bounds only the wait for one byte. A server that drips its answer, a byte
now and then, held a HEAD (whose answer is all headers) or a listing for ever, and a GET's
body too: ``BufferedReader.readinto`` fills a whole block's buffer before returning, so a
rule checked between ``readinto`` calls never ran. :func:`progress_response` makes a response
class whose ``fp`` reads the socket through :class:`modelfs.backends.body.Progress`, counted
at each receive, from the answer's first byte. A connection class with it as
``response_class`` gives each of its answers one. Checked with CPython 3.11-3.13's
http.client and urllib3 2.x (whose connection takes the response from http.client's
``getresponse``).
"""

from __future__ import annotations

import http.client
import io
from typing import Any

from modelfs.backends.body import Progress
from modelfs.backends.private import PrivateAPIChanged

__all__ = ["progress_response", "verify"]


class _Counted(io.RawIOBase):
    """A socket's raw reader whose every receive is counted (the window opens at the first byte:
    the wait for it is the read timeout's)."""

    def __init__(self, raw: io.RawIOBase, timeout: float) -> None:
        super().__init__()
        self._raw = raw
        self._timeout = timeout
        self._progress: Progress | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        n = self._raw.readinto(buffer)
        if n:
            if self._progress is None:
                self._progress = Progress(self._timeout)
            self._progress.add(n)
        return n

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()  # the socket counts its open readers: this one is done
        super().close()


def progress_response(
    timeout: float, base: type[http.client.HTTPResponse] = http.client.HTTPResponse
) -> type[http.client.HTTPResponse]:
    """A response class (a subclass of ``base``) whose answers bring at least MIN_PROGRESS
    bytes (or their end) in every ``timeout`` seconds after the first byte, else TimeoutError."""

    class ProgressResponse(base):  # type: ignore[valid-type, misc]
        def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(sock, *args, **kwargs)
            # (nothing was read yet: the buffer is empty, detaching loses no byte)
            fp: io.BufferedReader = self.fp  # type: ignore[has-type]
            self.fp = io.BufferedReader(_Counted(fp.detach(), timeout))

    return ProgressResponse


def verify() -> None:
    """Raise PrivateAPIChanged unless a response still reads through the ``fp`` it makes in
    ``__init__`` and connections (http.client's and urllib3's) build it from ``response_class``."""
    import inspect

    import urllib3.connection

    needed = (
        (http.client.HTTPResponse.__init__, 'self.fp = sock.makefile("rb")'),
        (http.client.HTTPConnection.getresponse, "self.response_class("),
        (urllib3.connection.HTTPConnection.getresponse, "super().getresponse()"),
    )
    for function, text in needed:
        if text not in inspect.getsource(function):
            raise PrivateAPIChanged(f"{function.__qualname__} no longer has {text!r}")
