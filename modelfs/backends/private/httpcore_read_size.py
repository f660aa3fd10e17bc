"""httpcore's ``AsyncHTTP11Connection.READ_NUM_BYTES``: how much one socket read asks for.

httpcore reads a response 64 KiB at a time, and each read costs a trip through h11 and two
async generators: for the HTTP backend that is most of its CPU per byte. Raising the class
attribute makes each read larger (the numbers are in docs/backends.md); the extra transient
memory is at most that much per connection. Checked with httpcore 1.x.
"""

from __future__ import annotations

from modelfs.backends.private import PrivateAPIChanged

__all__ = ["raise_read_size", "verify"]


def raise_read_size(size: int) -> None:
    """Make httpcore's HTTP/1.1 connections read at least ``size`` bytes at a time."""
    from httpcore._async.http11 import AsyncHTTP11Connection

    AsyncHTTP11Connection.READ_NUM_BYTES = max(AsyncHTTP11Connection.READ_NUM_BYTES, size)


def verify() -> None:
    """Raise PrivateAPIChanged unless httpcore still reads ``READ_NUM_BYTES`` per socket read."""
    import inspect

    try:
        from httpcore._async import http11
    except ImportError:
        raise PrivateAPIChanged("httpcore._async.http11 is gone") from None
    connection = getattr(http11, "AsyncHTTP11Connection", None)
    if not isinstance(getattr(connection, "READ_NUM_BYTES", None), int):
        raise PrivateAPIChanged("httpcore's AsyncHTTP11Connection has no READ_NUM_BYTES")
    if "self.READ_NUM_BYTES" not in inspect.getsource(http11):
        raise PrivateAPIChanged("httpcore's AsyncHTTP11Connection no longer reads READ_NUM_BYTES")
