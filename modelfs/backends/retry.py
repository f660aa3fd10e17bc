"""Retry with exponential backoff and full jitter, bounded by a total deadline.

Written once and applied above the Backend protocol (by the block store and the namespace),
so every backend retries the same way and a backend only has to classify its failures as
TransientError or not.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from modelfs.errors import TransientError
from modelfs.stopping import stopping

__all__ = ["retry_transient", "RetryStats"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryStats:
    """Counts retries by the message's kind, for metrics and tests."""

    def __init__(self) -> None:
        self.retries = 0
        self.gave_up = 0


async def retry_transient(
    op: Callable[[], Awaitable[T]],
    *,
    deadline: float,
    what: str,
    stats: RetryStats | None = None,
    first_delay: float = 0.05,
    max_delay: float = 4.0,
) -> T:
    """Run ``op`` until it succeeds, retrying TransientError until ``deadline`` seconds pass.

    The last error is re-raised as TransientError (which maps to EIO) once the next wait would
    cross the deadline. Other errors pass straight through: they will not get better.
    """
    start = trio.current_time()
    attempt = 0
    while True:
        try:
            return await op()
        except TransientError as exc:
            attempt += 1
            # (the exponent capped: 2**1024 is past a float, and long before that past max_delay)
            delay = random.uniform(0, min(max_delay, first_delay * (2 ** min(attempt, 60))))
            if trio.current_time() - start + delay > deadline:
                if stats is not None:
                    stats.gave_up += 1
                raise TransientError(f"{what}: failed after {attempt} attempt(s): {exc}") from exc
            if stats is not None:
                stats.retries += 1
            # Once the daemon is stopping, a retry (the grace lets a read finish) or a GET the
            # stop shut down ("the daemon is stopping") is not news: its one line is the stop's.
            log.log(logging.DEBUG if stopping() else logging.INFO, "retrying %s in %.2fs after: %s", what, delay, exc)
            await trio.sleep(delay)
