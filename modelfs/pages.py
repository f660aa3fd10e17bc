"""A guard on a directory listing's continuation tokens: a listing that never ends is an error.

A store (or a proxy in front of it) that sends the same ``next_token`` again, goes round a
cycle of tokens, or sends page after page with nothing new would keep ``readdir`` and
``walk_objects`` (``modelfs warm``, ``--eager-model``) listing forever. One guard follows one
pass over one directory; it holds a bounded window of the tokens seen (their hashes).

A window catches a cycle no longer than itself; a walk also checks the names themselves
(:meth:`PageGuard.forward`): stores list in byte order, so a cycle of any length goes back
to a name before one it gave, and pages that never list a greater name count as empty.
"""

from __future__ import annotations

from collections import deque

from modelfs.errors import BackendError

__all__ = ["PageGuard", "RECENT_TOKENS", "QUIET_PAGES"]

RECENT_TOKENS = 1024  # a cycle of up to this many pages is caught at its first repeat
QUIET_PAGES = 1000  # pages in a row that bring no new entry (GCS may send a few empty pages)


class PageGuard:
    """Checks each page of one listing pass; raises BackendError when it cannot end."""

    __slots__ = ("what", "_order", "_seen", "_quiet", "_reached")

    def __init__(self, what: str) -> None:
        self.what = what
        self._order: deque[int] = deque()
        self._seen: set[int] = set()
        self._quiet = 0
        self._reached: str | None = None  # the greatest name a page gave (forward)

    def token(self, sent: str | None, next_token: str | None) -> None:
        """A page asked with ``sent`` answered ``next_token``: a token seen before loops."""
        if next_token is None:
            return
        key = hash(next_token)
        if next_token == sent or key in self._seen:
            raise BackendError(f"{self.what}: the server sent a continuation token again (a listing without end)")
        self._order.append(key)
        self._seen.add(key)
        if len(self._order) > RECENT_TOKENS:
            self._seen.discard(self._order.popleft())

    def entries(self, new: int, next_token: str | None) -> None:
        """The page brought ``new`` entries not seen in this pass: too many empty ones in a row loop."""
        self._quiet = 0 if new or next_token is None else self._quiet + 1
        if self._quiet >= QUIET_PAGES:
            raise BackendError(f"{self.what}: {QUIET_PAGES} pages in a row brought nothing new (a listing without end)")

    def forward(self, names: list[str], next_token: str | None) -> None:
        """A page listing ``names`` (objects and prefixes, relative to one root) answered
        ``next_token``: a name before one an earlier page gave is a listing gone back (GCS and
        S3 list in byte order, which str order is); a page with no name beyond the earlier
        pages' brought nothing new. (The same name again is let through: a store may repeat
        a prefix on the next page.)"""
        progressed = False
        if names:
            first, top = min(names), max(names)
            if self._reached is not None and first < self._reached:
                raise BackendError(
                    f"{self.what}: the store listed {first[:100]!r} after {self._reached[:100]!r} "
                    "(its pages went back: a listing without end)"
                )
            progressed = self._reached is None or top > self._reached
            if progressed:
                self._reached = top
        self.entries(1 if progressed else 0, next_token)
