"""What every backend shares, written once: naming, the thread limiter, the read template.

A backend subclasses :class:`BackendSkeleton` and writes only what is its own: how to build
a request for its store and how to classify that store's failures (``classify``, the one
place a backend knows its client library's exception types). Like gcsfuse's ``Bucket``
interface and mountpoint-s3's ``ObjectClient``, the seam stays narrow (see
:mod:`modelfs.backends.base`): decorators and test doubles (``memory.py``) stand in for a
store without knowing which one it is.

Blocking client libraries (google-cloud-storage, boto3, the file system) run in trio worker
threads through :meth:`BackendSkeleton.run_blocking`, bounded by one CapacityLimiter per
backend. Those threads only ever fill the buffer they were handed (a block that is pinned and
FILLING) or build a result nothing else holds; see docs/concurrency.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar, TypeVarTuple, Unpack

import trio

from modelfs.backends.answers import AnswerBudget
from modelfs.backends.base import read_one_by_one
from modelfs.backends.responses import RangeRequest
from modelfs.config import Source
from modelfs.errors import BackendError, NotFound

__all__ = ["BackendSkeleton", "Buffers", "Sums", "ThreadedBackend"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Buffers = Sequence[memoryview]  # the block buffers one GET fills in turn
Sums = list[int] | None  # where a GET appends each buffer's CRC32C, if it sums them
Ts = TypeVarTuple("Ts")


class BackendSkeleton:
    """Naming, the worker-thread limiter and the zero-length read, for every store.

    ``threads`` bounds the worker threads this backend may occupy at once: the GETs the block
    store allows (``--max-concurrency``) plus one, so a listing never waits behind a full
    pipe of reads.
    """

    def __init__(self, source: Source, *, threads: int) -> None:
        self._source = source
        self._limiter = trio.CapacityLimiter(max(1, threads))
        self._answers: AnswerBudget | None = None  # set by a backend whose answers the budget counts

    @property
    def description(self) -> str:
        """The source as the user gave it (never with a query string)."""
        return self._source.url

    def object_key(self, name: str) -> str:
        """A key unique across backends: names disk-cache entries."""
        return self._source.object_key(name)

    async def run_blocking(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        """``fn(*args)`` in a worker thread, within this backend's thread limit."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def run_answered(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts, waits: bool = True) -> T:
        """:meth:`run_blocking` of a call that reads listings or metadata answers: each is
        charged to the memory budget while the call holds it (modelfs.backends.answers).
        ``waits=False``: a data GET, which may not wait for room (its error's body is read only
        if its charge fits now)."""
        if self._answers is None:
            return await self.run_blocking(fn, *args)
        charge = self._answers.charge(waits=waits)
        try:
            return await charge.call(self.run_blocking, fn, *args)
        finally:
            charge.release()  # (the thread has ended: only this task touches the charge now)

    def classify(self, exc: BaseException, what: str, *, reading: bool = False) -> BackendError:
        """The BackendError ``exc`` means (``reading``: during a ranged GET of a pinned version).

        Every backend overrides this; the default knows only our own errors.
        """
        if isinstance(exc, BackendError):
            return exc
        return BackendError(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")

    def under(self, items: list[T], name_of: Callable[[T], object], within: str) -> list[T]:
        """The listed ``items`` whose name starts with ``within`` (the prefix asked for).

        A store (or a proxy) that lists a name outside it would have it shown in the wrong
        directory, reading another object's bytes: those are dropped, with one warning per page.
        Items without a string name are kept for the caller's own check.
        """
        kept: list[T] = []
        stray: list[str] = []
        for item in items:
            name = name_of(item)
            if isinstance(name, str) and not name.startswith(within):
                stray.append(name)
            else:
                kept.append(item)
        if stray:
            log.warning(
                "%s: the listing of %r named %d object(s) outside it (e.g. %r): not shown",
                self._source.url,
                within,
                len(stray),
                stray[0],
            )
        return kept

    def listing_error(self, exc: BaseException) -> BackendError:
        """What a failed listing of the root raises: there, "not found" means the bucket is missing."""
        if isinstance(exc, BackendError):  # raised by the backend's own code: already says what it means
            return exc
        error = self.classify(exc, self._source.url)
        if isinstance(error, NotFound):
            return NotFound(f"{self._source.url}: bucket {self._source.bucket!r} not found")
        return error

    async def read_range(
        self, name: str, version: str, offset: int, dest: memoryview, *, size: int | None = None
    ) -> None:
        """Fill all of ``dest`` with ``name`` at ``version`` from ``offset`` (the Backend protocol)."""
        if len(dest) == 0:
            return
        await self._read_range(name, version, self._request(name, version, offset, len(dest), size), dest)

    @property
    def joins_reads(self) -> bool:
        """Whether :meth:`read_ranges` is one GET (base.JoinedReads); a backend that can says so."""
        return False

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
        """Fill ``dests`` in order from ``offset``: one GET if :attr:`joins_reads`, else one per buffer."""
        if not self.joins_reads:
            await read_one_by_one(self.read_range, name, version, offset, dests, size)
            return
        request = self._request(name, version, offset, sum(len(dest) for dest in dests), size)
        await self._read_joined(name, version, request, dests, sums)

    def _request(self, name: str, version: str, offset: int, length: int, listed: int | None = None) -> RangeRequest:
        """The range a read asks for, refused here if it cannot be inside the pinned object.

        Its ``size`` is the one the version says (HTTP versions), else ``listed``: the size the
        listing or stat gave with the version (GCS and S3 pin by generation or ETag alone). The
        answer's Content-Range total must be that size (responses.check_range_response), so a
        store that ignored the pin and sent no version header still cannot pass off another
        object of another size as this one."""
        size = self._pinned_size(version)
        if size is None:
            size = listed
        request = RangeRequest(self._describe(name, version, offset, length), offset, length, size)
        if offset < 0 or (size is not None and offset + length > size):
            raise BackendError(f"{request.what}: the range is beyond the end ({size} bytes)")
        return request

    def _describe(self, name: str, version: str, offset: int, length: int) -> str:
        """How a read is named in errors and logs."""
        return f"{name}@{version} [{offset}, +{length}]"

    def _pinned_size(self, version: str) -> int | None:
        """The object's size if its version says it (HTTP versions do), else None (the caller's
        ``size``, from the listing, is then the pinned size)."""
        return None

    async def _read_range(self, name: str, version: str, request: RangeRequest, dest: memoryview) -> None:
        raise NotImplementedError

    async def _read_joined(
        self, name: str, version: str, request: RangeRequest, dests: Sequence[memoryview], sums: list[int] | None
    ) -> None:
        """The one GET of :meth:`read_ranges`, for a backend whose ``joins_reads`` is True."""
        raise NotImplementedError


class ThreadedBackend(BackendSkeleton):
    """A backend whose client blocks: ``_read`` runs in a worker thread and fills ``dest``.

    The GETs run as calls whose answers are charged without waiting for room (an error's body:
    see modelfs.backends.answers); the data itself goes into the pinned blocks' buffers."""

    async def _read_range(self, name: str, version: str, request: RangeRequest, dest: memoryview) -> None:
        await self.run_answered(self._read, name, version, request, dest, waits=False)

    def _read(self, name: str, version: str, request: RangeRequest, dest: memoryview) -> None:
        """Blocking: fill ``dest`` or raise a classified BackendError. Runs in a worker thread.

        By default the one-buffer case of :meth:`_read_into_all` (GCS, S3)."""
        self._read_into_all(name, version, request, (dest,))

    async def _read_joined(
        self, name: str, version: str, request: RangeRequest, dests: Sequence[memoryview], sums: list[int] | None
    ) -> None:
        await self.run_answered(self._read_into_all, name, version, request, dests, sums, waits=False)

    def _read_into_all(self, name: str, version: str, request: RangeRequest, dests: Buffers, sums: Sums = None) -> None:
        """Blocking: fill every buffer of ``dests`` from one GET of ``request`` (see joins_reads),
        appending each one's CRC32C to ``sums`` if the transport computes them."""
        raise NotImplementedError
