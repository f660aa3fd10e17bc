"""Reading a response body straight into the caller's buffer: the one loop every
thread-based backend (GCS, S3) uses to fill a block without an intermediate copy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from modelfs.backends.private.urllib3_fp import body_readinto
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
