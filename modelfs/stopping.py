"""Whether this daemon is stopping: a stop signal came, or its mount was unmounted.

Once it is, the failures the stop itself causes or ends (GETs it shuts down, retries of a
backend it no longer waits for, streams it cancels) are not failures of the daemon, and are
logged at debug level: the stop's own lines say what it abandoned. A trio ``RunVar``, so it
belongs to one ``trio.run`` (one daemon, one ``modelfs warm``, one test), never to the process.
"""

from __future__ import annotations

from trio.lowlevel import RunVar

__all__ = ["begin", "stopping"]

_STOPPING: RunVar[bool] = RunVar("modelfs.stopping", default=False)


def begin() -> None:
    """The stop began (idempotent). Call on the trio thread."""
    _STOPPING.set(True)


def stopping() -> bool:
    """Whether the stop began in this trio run (False outside one)."""
    try:
        return _STOPPING.get()
    except RuntimeError:  # not in a trio run
        return False
