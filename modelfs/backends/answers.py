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
``trio.from_thread.run``/``run_sync``, so the budget is still changed only in trio (in the
calling task), never in the thread. A charge that holds nothing waits for room like any lease;
one that already holds bytes (an answer that outgrew its first charge, a second answer of the
same call) takes only room that is free now: if there is none, the answer read so far is
dropped (its connection closed), the charge given back, and the call made again with all it
needed charged up front, waiting while holding nothing. So no thread waits for room while
holding some, and two growing answers cannot wait for each other.

Without a budget (unit tests, ``modelfs warm``) these calls do nothing.
"""

from __future__ import annotations

import contextvars
import functools
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, TypeVarTuple, Unpack

import trio

from modelfs.errors import BackendError

if TYPE_CHECKING:
    from modelfs.cache.memory import Lease, MemoryCache

__all__ = ["AnswerBudget", "Charge", "Cost", "Recharge", "begin", "done", "grow"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

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
    call is made again with ``need`` bytes charged up front. Never leaves :meth:`Charge.run`
    (a BackendError so that the backends' error handling passes it on unchanged)."""

    def __init__(self, need: int) -> None:
        super().__init__(f"an answer needs {need} bytes of the memory budget")
        self.need = need


_current: contextvars.ContextVar[Charge | None] = contextvars.ContextVar("modelfs_answer_charge", default=None)


class AnswerBudget:
    """A backend's answers charged to ``budget`` at ``cost``."""

    def __init__(self, budget: MemoryCache, cost: Cost, what: str) -> None:
        self.budget = budget
        self.cost = cost
        self.what = what

    def charge(self) -> Charge:
        """A charge for one backend call (made in its trio task)."""
        return Charge(self)


class Charge:
    """The budget held for one backend call's answers; used by its worker thread only, but for
    :meth:`release` once that thread has ended."""

    def __init__(self, answers: AnswerBudget) -> None:
        self._answers = answers
        self._leases: list[Lease] = []
        self._held = 0  # what the leases charge
        self._base = 0  # the cost of this call's earlier answers (their parse may still be alive)
        self._body = 0  # the bytes the current answer's charge covers
        self._entries = 0  # and the entries its parse may make
        self._most = 0  # the bytes the current answer may hold at most
        self._up_front = 0  # charged before the call starts (after a Recharge)

    # --- in the worker thread

    def run(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        _current.set(self)  # (this thread's own copy of the context)
        while True:
            try:
                if self._up_front:
                    self._take(self._up_front, 0, wait=True)
                return fn(*args)
            except Recharge as exc:
                _drop_locals(exc)
                self._up_front = exc.need
                trio.from_thread.run_sync(self.release)
            except BaseException as exc:
                _drop_locals(exc)
                raise

    def begin(self, most: int, known: int | None) -> None:
        """A new answer that will hold at most ``most`` bytes (``known`` of them for sure)."""
        self._base = self._needed(self._body, self._entries) if self._body else self._base
        self._body = self._entries = 0
        self._most = most
        self.grow(min(most, known if known is not None else FIRST))

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
            self._take(need, target, wait=not self._held)
        self._body, self._entries = target, entries

    def done(self) -> None:
        """The call's answers so far are parsed and dropped (a page of a long listing)."""
        trio.from_thread.run_sync(self.release)

    def _needed(self, body: int, entries: int) -> int:
        return self._base + self._answers.cost.of(body, entries)

    def _take(self, need: int, body: int, *, wait: bool) -> None:
        from modelfs.cache.memory import BufferKind

        budget = self._answers.budget
        if not budget.can_lease(0, extra=need):
            raise BackendError(
                f"{self._answers.what}: an answer of {body / (1 << 20):.1f} MiB (and its parse) needs "
                f"{need / (1 << 20):.1f} MiB of the memory budget, more than it can lend "
                f"({budget.max_lease / (1 << 20):.1f} MiB): raise --memory-cache"
            )
        extra = need - self._held
        if wait:
            lease = trio.from_thread.run(functools.partial(budget.lease, 0, BufferKind.METADATA, extra=extra))
        else:
            taken = trio.from_thread.run_sync(functools.partial(budget.try_lease, 0, BufferKind.METADATA, extra=extra))
            if taken is None:
                raise Recharge(need)
            lease = taken
        self._leases.append(lease)
        self._held += lease.charge

    # --- in trio

    def release(self) -> None:
        """Give every byte back (idempotent)."""
        leases, self._leases = self._leases, []
        for lease in leases:
            lease.release()
        self._held = self._base = self._body = self._entries = 0


def _drop_locals(exc: BaseException) -> None:
    """Free what the frames of ``exc``'s traceback hold (an answer's body, its parse) now.

    The exception is often in a reference cycle with them (botocore keeps it in a local of a
    frame of its own traceback): the body, no longer charged, would live until the garbage
    collector ran, and a thread waiting for a charge holds it meanwhile (9 at once took 175 MiB
    beside a 128 MiB budget)."""
    traceback.clear_frames(exc.__traceback__)


def begin(most: int, known: int | None = None) -> None:
    """In a worker thread: a new answer of at most ``most`` bytes begins (``known``: its
    length, if the headers say it). Charged now; a no-op outside :meth:`Charge.run`."""
    charge = _current.get()
    if charge is not None:
        charge.begin(most, known)


def grow(nbytes: int, entries: int = 0) -> None:
    """In a worker thread: the current answer is about to hold ``nbytes`` bytes in all (and
    its parse to make at most ``entries`` entries)."""
    charge = _current.get()
    if charge is not None:
        charge.grow(nbytes, entries)


def done() -> None:
    """In a worker thread: the answers read so far are parsed and dropped."""
    charge = _current.get()
    if charge is not None:
        charge.done()
