"""A streaming walk of every object below a backend's root, one directory page at a time.

``modelfs warm`` and ``--eager-model`` need every file, but not the tree at once: the walk
holds the page it is reading and the prefixes of the directories still to list, so its
memory follows the widest directory, not the object count.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator

from modelfs.backends.base import Backend, ListPage, ObjectInfo
from modelfs.backends.retry import retry_transient
from modelfs.errors import BackendError
from modelfs.names import ParsedName, parse_object_name
from modelfs.pages import PageGuard

__all__ = ["walk_objects"]

log = logging.getLogger(__name__)


async def walk_objects(backend: Backend, *, retry_deadline: float) -> AsyncIterator[ObjectInfo]:
    """Every file object below the root (no placeholders, no names that cannot be paths).

    Depth first; within a directory its files come before its subdirectories, each in the
    store's order. Transient failures are retried up to ``retry_deadline`` per page. A backend
    whose tree may have no end (an HTTP index over a symlink loop) names a ``walk_dir_limit``:
    more directories than that in one walk is a BackendError, and so is a directory whose
    continuation tokens never end or whose pages go back in name order (modelfs/pages.py).
    """
    limit: int | None = getattr(backend, "walk_dir_limit", None)  # optional: object stores have none
    listed = 0
    pending = [""]
    while pending:
        prefix = pending.pop()
        listed += 1
        if limit is not None and listed > limit:
            raise BackendError(
                f"{backend.description}: more than {limit} directories in one walk (a symlink loop?); "
                "list the files with --manifest FILE"
            )
        token: str | None = None
        subdirs: list[str] = []
        guard = PageGuard(f"listing {backend.description} {prefix}")
        while True:
            page: ListPage = await retry_transient(
                functools.partial(backend.list_dir, prefix, token),
                deadline=retry_deadline,
                what=guard.what,
            )
            guard.token(token, page.next_token)  # a token that loops would walk the same objects forever
            # (and a cycle longer than the guard's window of tokens goes back in name order)
            guard.forward([o.name for o in page.objects] + page.prefixes, page.next_token)
            for info in page.objects:
                if info.name.endswith("/"):
                    continue
                parsed = parse_object_name(info.name)
                if isinstance(parsed, ParsedName):
                    yield info
                else:
                    log.debug("skipping %r: %s", info.name, parsed)
            subdirs.extend(p for p in page.prefixes if isinstance(parse_object_name(p), ParsedName))
            token = page.next_token
            if token is None:
                break
        pending.extend(reversed(subdirs))
