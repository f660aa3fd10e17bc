"""A guard on a directory listing's continuation tokens: a listing that never ends is an error.

A store (or a proxy in front of it) that sends the same ``next_token`` again, goes round a
cycle of tokens, or sends page after page with nothing new would keep ``readdir`` and
``walk_objects`` (``modelfs warm``, ``--eager-model``) listing forever. One guard follows one
pass over one directory; it holds a bounded window of the tokens seen (their hashes).
"""

from __future__ import annotations

from collections import deque

from modelfs.errors import BackendError

__all__ = ["PageGuard", "RECENT_TOKENS", "QUIET_PAGES"]

RECENT_TOKENS = 1024  # a cycle of up to this many pages is caught at its first repeat
QUIET_PAGES = 1000  # pages in a row that bring no new entry (GCS may send a few empty pages)


class PageGuard:
    """Checks each page of one listing pass; raises BackendError when it cannot end."""

    __slots__ = ("what", "_order", "_seen", "_quiet")

    def __init__(self, what: str) -> None:
        self.what = what
        self._order: deque[int] = deque()
        self._seen: set[int] = set()
        self._quiet = 0

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
