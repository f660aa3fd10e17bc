"""GCS and S3 answers that are not object data, charged to the memory budget while held.

A listing page, an object's metadata or an error is read whole by a worker thread and parsed
there (gcs_scan.py; botocore's XML parse): a 2xx answer may be 16 MiB (gcs_json.MAX_BODY,
s3_answers.MAX_ANSWER) and its parse several times that. Up to --max-concurrency + 1 threads
each hold one, so concurrent listings of big pages (or a lying server) took several hundred
MiB beside the budget. Here each is charged to it (``BufferKind.METADATA``, shown by
``modelfs stats``) from the moment its size is known until the call that parses it is done,
like the HTTP backend's index bodies.

What an answer is charged: :class:`Cost` of the bytes it holds (its body, and the body
decoded if it came gzip-encoded), a factor per backend measured on the worst shapes of
answer its parse accepts. A body of known length (Content-Length, not encoded) is charged
once before it is read; one of unknown length is charged as it grows (by half again each time, so a few
steps). An answer whose charge could never fit the budget's lease maximum is a one-line
BackendError (EIO), read no further, unless it is no larger than a real store's page
(:data:`LEGIT`): that one is charged all the budget can lend.

How the thread and the budget meet (docs/architecture.md, "Concurrency"): a backend call that
reads such answers runs through ``BackendSkeleton.run_answered`` in a trio task; its worker thread
calls :func:`begin` and :func:`grow` as it reads, which reach the budget through
``trio.from_thread.run_sync``, so the budget is still changed only in trio, never in the
thread. A worker thread never waits for room: it takes only room that is free now. If there
is none, the answer read so far is dropped (its connection closed), the charge given back,
the thread ends, and the calling task waits for all the answer needs, holding no thread,
then makes the call again. (A thread waiting for room would hold one of the backend's
threads while the blocks that fill the budget wait for a thread to be fetched.)

A data GET's answers are the other kind: its error answer (a 403, a 500: its body only adds
the store's words to what the status says) is charged too, but by a call that may not wait
(``waits=False``): its task holds a pinned block, and blocks pinned by GETs waiting for room
could fill the budget for ever. Such an answer (:func:`begin_optional`) is charged all it may
cost before a byte of it is read, if there is room now; if not, it is read no further (its
connection closed) and the status alone says what went wrong.

Without a budget (unit tests, ``modelfs warm``) these calls do nothing.
"""

from __future__ import annotations

import contextvars
import functools
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, TypeVarTuple, Unpack

import trio

from modelfs.errors import BackendError

if TYPE_CHECKING:
    from modelfs.cache.memory import Lease, MemoryCache

__all__ = ["AnswerBudget", "Charge", "Cost", "Recharge", "begin", "begin_optional", "done", "grow", "read_charged"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_READ = 1 << 16  # the most one receive of an answer asks for

FIRST = 64 << 10
"""What an answer of unknown length is charged for first (a listing page is usually less)."""

LEGIT = 6 << 20
"""The largest answer a real store sends (a GCS page of 1,000 entries with 1,024-byte escaped
names; S3's are at most ~5.5 MiB). At the smallest --memory-cache (a budget that lends 1 MiB)
such a page's charge cannot fit: rather than fail a listing a real store sent, an answer up to
this size is charged all the budget lends (it is read alone; at most ~25 MiB of its cost is
then beside the budget). Only a larger one is refused when its charge cannot fit."""


@dataclass(frozen=True)
class Cost:
    """What an answer costs at most, its parse included: ``factor`` per byte it holds (the body,
    its copies, the decoded text), ``per_entry`` per entry its parse may make (a bound the
    backend counts in the body before the parse), and a ``constant``."""

    factor: float
    per_entry: int
    constant: int

    def of(self, nbytes: int, entries: int = 0) -> int:
        return int(self.factor * nbytes) + self.per_entry * entries + self.constant


class Recharge(BackendError):
    """Internal: the answer outgrew its charge and the budget had no room free at once; the
    call is made again with ``need`` bytes charged up front. Never leaves :meth:`Charge.call`
    (a BackendError so that the backends' error handling passes it on unchanged)."""

    def __init__(self, need: int, body: int) -> None:
        super().__init__(f"an answer needs {need} bytes of the memory budget")
        self.need = need
        self.body = body


_current: contextvars.ContextVar[Charge | None] = contextvars.ContextVar("modelfs_answer_charge", default=None)


class AnswerBudget:
    """A backend's answers charged to ``budget`` at ``cost``."""

    def __init__(self, budget: MemoryCache, cost: Cost, what: str) -> None:
        self.budget = budget
        self.cost = cost
        self.what = what

    def charge(self, *, waits: bool = True) -> Charge:
        """A charge for one backend call (made in its trio task); ``waits=False`` for a call
        that may not wait for room (a data GET: see the module's docstring)."""
        return Charge(self, waits=waits)


class Charge:
    """The budget held for one backend call's answers; used by its worker thread only, but for
    :meth:`release` once that thread has ended."""

    def __init__(self, answers: AnswerBudget, *, waits: bool = True) -> None:
        self._answers = answers
        self._waits = waits
        self._leases: list[Lease] = []
        # Taken by the task after a Recharge, for the call made again: kept while the call
        # goes on (a long listing's later pages), or the page that needed it could lose the
        # room again to the readers its release wakes, and the listing start over for ever.
        self._reserved: Lease | None = None
        self._held = 0  # what the leases charge
        self._base = 0  # the cost of this call's earlier answers (their parse may still be alive)
        self._body = 0  # the bytes the current answer's charge covers
        self._entries = 0  # and the entries its parse may make
        self._most = 0  # the bytes the current answer may hold at most

    # --- in the calling trio task

    async def call(self, run_blocking: Callable[..., Awaitable[T]], fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        """In the calling trio task: ``fn(*args)`` through ``run_blocking`` (a worker thread),
        its answers charged as they come. A worker thread never waits for room: it only takes
        room that is free now, and an answer that finds none ends the call (:class:`Recharge`);
        this task then waits for all the answer needs, holding no thread, and makes the call
        again. (A thread waiting for room would hold one of the backend's threads while the
        blocks that fill the budget wait for a thread to be fetched: a deadlock.)"""
        while True:
            try:
                return await run_blocking(self._run, fn, *args)
            except Recharge as exc:
                _drop_locals(exc)
                self.release()
                if not self._waits:  # (a data GET charges only optional answers: never so; but never a wait)
                    raise BackendError(
                        f"{self._answers.what}: an answer needs {exc.need / (1 << 20):.1f} MiB of the memory "
                        "budget, and a data GET may not wait for room"
                    ) from None
                if not self._answers.budget.can_lease(0, extra=exc.need):
                    raise BackendError(self._too_big(exc.need, exc.body)) from None
                from modelfs.cache.memory import BufferKind

                lease = await self._answers.budget.lease(0, BufferKind.METADATA, extra=exc.need)
                self._leases.append(lease)
                self._reserved = lease
                self._held = lease.charge
            except BaseException as exc:
                _drop_locals(exc)
                raise

    # --- in the worker thread

    def _run(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        _current.set(self)  # (this thread's own copy of the context)
        return fn(*args)

    def begin(self, most: int, known: int | None, entries: int = 0) -> None:
        """A new answer that will hold at most ``most`` bytes (``known`` of them for sure), and
        its parse make at most ``entries`` entries."""
        self._base = self._needed(self._body, self._entries) if self._body else self._base
        self._body = self._entries = 0
        self._most = most
        self.grow(min(most, known if known is not None else FIRST), entries)

    def begin_optional(self, most: int, entries: int) -> bool:
        """A new answer the call can do without (an error's body), charged all it may cost
        (``most`` bytes, ``entries`` entries) before it is read. False: not charged, read it
        not; that is when the call may not wait and the room is not free now, or when the
        charge could never fit."""
        try:
            self.begin(most, most, entries)
        except Recharge:
            if self._waits:
                raise  # (the task waits for the room, and the call is made again)
            return False
        except BackendError:  # more than the budget can ever lend: the status says enough
            return False
        return True

    def grow(self, nbytes: int, entries: int = 0) -> None:
        """The current answer is about to hold ``nbytes`` bytes (and its parse to make at most
        ``entries`` entries): charge them if not yet done."""
        if nbytes <= self._body and entries <= self._entries:
            return
        target = max(nbytes, min(self._body * 3 // 2, self._most)) if nbytes > self._body else self._body
        entries = max(entries, self._entries)
        need = self._needed(target, entries)
        if target <= LEGIT and need > self._answers.budget.max_lease:
            # A page a real store can send, in a budget too small for it (--memory-cache's
            # least): charged all the budget lends, so it is read alone, and the rest of its
            # cost is beside the budget. A larger answer is refused (see LEGIT).
            need = self._answers.budget.max_lease
        if need > self._held:
            self._take(need, target)
        self._body, self._entries = target, entries

    def done(self) -> None:
        """The call's answers so far are parsed and dropped (a page of a long listing)."""
        trio.from_thread.run_sync(self._release_answers)

    def _needed(self, body: int, entries: int) -> int:
        return self._base + self._answers.cost.of(body, entries)

    def _take(self, need: int, body: int) -> None:
        """Charge ``need`` in all, from room free now (else Recharge: see :meth:`call`)."""
        from modelfs.cache.memory import BufferKind

        budget = self._answers.budget
        if not budget.can_lease(0, extra=need):
            raise BackendError(self._too_big(need, body))
        taken = trio.from_thread.run_sync(
            functools.partial(budget.try_lease, 0, BufferKind.METADATA, extra=need - self._held)
        )
        if taken is None:
            raise Recharge(need, body)
        self._leases.append(taken)
        self._held += taken.charge

    def _too_big(self, need: int, body: int) -> str:
        budget = self._answers.budget
        return (
            f"{self._answers.what}: an answer of {body / (1 << 20):.1f} MiB (and its parse) needs "
            f"{need / (1 << 20):.1f} MiB of the memory budget, more than it can lend "
            f"({budget.max_lease / (1 << 20):.1f} MiB): raise --memory-cache"
        )

    # --- in trio (also once the thread has ended)

    def release(self) -> None:
        """Give every byte back (idempotent)."""
        self._reserved = None
        self._release_answers()

    def _release_answers(self) -> None:
        """Give back what the answers took; the room reserved for the call stays."""
        reserved = self._reserved
        leases, self._leases = self._leases, []
        for lease in leases:
            if lease is not reserved:
                lease.release()
        self._leases = [reserved] if reserved is not None else []
        self._held = reserved.charge if reserved is not None else 0
        self._base = self._body = self._entries = 0


def _drop_locals(exc: BaseException) -> None:
    """Free what the frames of ``exc``'s traceback hold (an answer's body, its parse) now.

    The exception is often in a reference cycle with them (botocore keeps it in a local of a
    frame of its own traceback): the body, no longer charged, would live until the garbage
    collector ran, and a thread waiting for a charge holds it meanwhile (9 at once took 175 MiB
    beside a 128 MiB budget)."""
    traceback.clear_frames(exc.__traceback__)


def begin(most: int, known: int | None = None) -> None:
    """In a worker thread: a new answer of at most ``most`` bytes begins (``known``: its
    length, if the headers say it). Charged now; a no-op outside :meth:`Charge.call`."""
    charge = _current.get()
    if charge is not None:
        charge.begin(most, known)


def begin_optional(most: int, entries: int = 0) -> bool:
    """In a worker thread: an answer the call can do without (an error's body, whose status
    says what went wrong) begins, of at most ``most`` bytes and ``entries`` entries of parse;
    all of it charged now. False: read it not (the call may not wait and there is no room now,
    see the module's docstring). True outside :meth:`Charge.call`."""
    charge = _current.get()
    return charge is None or charge.begin_optional(most, entries)


def grow(nbytes: int, entries: int = 0) -> None:
    """In a worker thread: the current answer is about to hold ``nbytes`` bytes in all (and
    its parse to make at most ``entries`` entries)."""
    charge = _current.get()
    if charge is not None:
        charge.grow(nbytes, entries)


def read_charged(
    read1: Callable[[int], bytes],
    left: Callable[[], int | None],
    limit: int,
    on_chunk: Callable[[int], None] | None = None,
) -> bytes:
    """In a worker thread: an answer's body, at most ``limit`` + 1 bytes, one receive of at
    most 64 KiB at a time, each charged before it is read (:func:`grow`). ``left()``: the bytes
    the answer's length still promises (charged already by :func:`begin`), or None;
    ``on_chunk``: told each receive's size (a progress rule)."""
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        want = min(_READ, limit + 1 - total)
        remaining = left()
        if remaining is not None:
            want = min(want, remaining)
        grow(total + want)
        chunk = read1(want)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if on_chunk is not None:
            on_chunk(len(chunk))
    return b"".join(chunks)


def done() -> None:
    """In a worker thread: the answers read so far are parsed and dropped."""
    charge = _current.get()
    if charge is not None:
        charge.done()
