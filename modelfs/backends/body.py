"""Reading a response body straight into the caller's buffer: the one loop every
thread-based backend (GCS, S3) uses to fill a block without an intermediate copy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modelfs.errors import TransientError

__all__ = ["read_exactly", "read_urllib3_body"]


def read_exactly(readinto: Callable[[memoryview], int | None], dest: memoryview) -> int:
    """Call ``readinto`` until ``dest`` is full or the body ends; the number of bytes read."""
    got = 0
    while got < len(dest):
        n = readinto(dest[got:])
        if not n:
            break
        got += n
    return got


def read_urllib3_body(raw: object, dest: memoryview, what: str) -> None:
    """Fill ``dest`` from a streamed urllib3 response and give its connection back.

    http.client's ``readinto`` (the response's ``_fp``) fills our buffer from the socket with
    no copy; urllib3's own reads into a temporary first, so it is only the fallback if that
    layout ever changes. A short body is a TransientError (the caller retries).
    """
    body: Any = getattr(raw, "_fp", None) or raw
    got = read_exactly(body.readinto, dest)
    if got < len(dest):
        raise TransientError(f"{what}: body ended after {got} of {len(dest)} bytes")
    raw.release_conn()  # type: ignore[attr-defined]
