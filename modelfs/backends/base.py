"""The Backend protocol: the narrow seam between the filesystem and an object store.

A backend lists objects under its root, stats one, and fills a caller-owned buffer with one
byte range of one pinned version. It knows nothing of caches, inodes or FUSE; everything
above this seam is the same for every store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["ObjectInfo", "ListPage", "Backend", "BlockReads", "JoinedReads", "joins_reads", "read_one_by_one"]


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object below the backend's root.

    ``name`` is relative to the root, '/'-separated, exactly as the store spells it (it may
    end in '/' for a directory placeholder). ``version`` is what reads pin: the GCS
    generation, or an ETag.
    """

    name: str
    size: int
    mtime: float
    version: str
    crc32c: str | None = None  # base64 of the big-endian CRC32C, as GCS reports it
    md5: str | None = None
    # Another checksum the store keeps of the object (S3): "<algorithm>:<base64>", the
    # algorithm one of crc32, crc32c, crc64nvme, sha1, sha256. A COMPOSITE one (a multipart
    # upload's checksum of its parts' checksums, not of the object's bytes) ends in
    # "-<parts>", as S3 spells it ("-?" when the store did not say how many).
    checksum: str | None = None


@dataclass(frozen=True, slots=True)
class ListPage:
    """One page of one directory's listing (a delimiter listing: nothing below a subdirectory).

    ``objects`` are the objects directly in the directory, named like :class:`ObjectInfo`
    (relative to the root); the directory's own placeholder object (name == the prefix) may
    be among them. ``prefixes`` are its subdirectories, relative to the root, each ending in
    '/'. ``next_token`` continues the listing; None on the last page.
    """

    objects: list[ObjectInfo]
    prefixes: list[str]
    next_token: str | None = None


@runtime_checkable
class Backend(Protocol):
    """What modelfs needs of an object store. Every method may raise a BackendError."""

    @property
    def description(self) -> str:
        """Human-readable source, e.g. ``gs://bucket/prefix``; used in messages."""
        ...

    def object_key(self, name: str) -> str:
        """A key unique across backends (scheme, bucket, full name); names cache entries."""
        ...

    async def list_objects(self) -> list[ObjectInfo]:
        """Every object below the root (recursively). NotFound if the bucket or root is missing."""
        ...

    async def list_dir(self, prefix: str, token: str | None = None, *, limit: int | None = None) -> ListPage:
        """One page of the directory ``prefix`` ('' for the root, else ending in '/').

        ``token`` is the previous page's ``next_token``; ``limit`` caps the entries of this
        page (objects plus prefixes), e.g. 1 to ask whether anything lies below a prefix.
        NotFound if the bucket or root is missing (a missing subdirectory is an empty page).
        """
        ...

    async def stat(self, name: str) -> ObjectInfo:
        """The current metadata of one object; NotFound if there is none."""
        ...

    async def read_range(
        self, name: str, version: str, offset: int, dest: memoryview, *, size: int | None = None
    ) -> None:
        """Fill all of ``dest`` with the bytes of ``name`` at ``version`` from ``offset``.

        ``size``: the pinned version's size, as its listing or stat gave it (the block store
        always passes it). An answer that shows the object at another size (a Content-Range
        total, a whole body's length) is of another version: VersionChanged, even when the
        store ignored the version pin and sent no version header. None: not known here.

        Raises VersionChanged if that version is gone, TransientError for failures worth
        retrying (the caller retries), never returns with ``dest`` partly filled.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and threads."""
        ...


@runtime_checkable
class JoinedReads(Protocol):
    """A backend that can fill several buffers from one GET of the range they cover together.

    Optional: the block store joins the blocks of a sequential read-ahead into one GET only
    when :func:`joins_reads` says the backend can (GCS media GETs, S3, HTTP); every other backend gets
    one ``read_range`` per block, as before. Fewer, larger GETs cost less CPU per byte on both
    ends of the connection (docs/architecture.md, "Joined read-ahead GETs").
    """

    @property
    def joins_reads(self) -> bool:
        """Whether :meth:`read_ranges` is one GET here (it may depend on the transport)."""
        ...

    async def read_ranges(
        self,
        name: str,
        version: str,
        offset: int,
        dests: Sequence[memoryview],
        sums: list[int] | None = None,
        *,
        size: int | None = None,
    ) -> None:
        """Fill every buffer of ``dests`` in order with the bytes from ``offset`` on (one GET).

        The same contract as ``read_range`` for the whole range (``size`` too): all of it or an error. With
        ``sums``, a backend that sees the bytes land may append each buffer's CRC32C to it
        (all of them or none); the block store hands them to the disk cache's write.
        """
        ...


@runtime_checkable
class BlockReads(Protocol):
    """A backend that serves whole blocks otherwise than other ranges (the cache tier: it
    stores and checks whole blocks only, and an object's last block may be short, which the
    range alone does not tell). The block store reads every block it fetches alone through
    :meth:`read_block`; small random reads and joined read-ahead go the usual way."""

    async def read_block(
        self,
        name: str,
        version: str,
        offset: int,
        dest: memoryview,
        sums: list[int] | None = None,
        *,
        size: int | None = None,
    ) -> None:
        """``read_range`` of a whole block (``size`` too): ``block_size`` bytes, or fewer for the object's
        last block. With ``sums``, its CRC32C may be appended (as in ``read_ranges``)."""
        ...


def joins_reads(backend: Backend) -> bool:
    """True when ``backend`` fills several neighbouring blocks with one GET."""
    return isinstance(backend, JoinedReads) and backend.joins_reads


async def read_one_by_one(
    read_range: Callable[..., Awaitable[None]],
    name: str,
    version: str,
    offset: int,
    dests: Sequence[memoryview],
    size: int | None = None,
) -> None:
    """``read_ranges`` on a backend that does not join: one ``read_range`` per buffer, in order
    (each told the pinned ``size``)."""
    for dest in dests:
        await read_range(name, version, offset, dest, size=size)
        offset += len(dest)
