"""Whether this daemon is stopping: a stop signal came, or its mount was unmounted.

Once it is, the failures the stop itself causes or ends (GETs it shuts down, retries of a
backend it no longer waits for, streams it cancels) are not failures of the daemon, and are
logged at debug level: the stop's own lines say what it abandoned. A trio ``RunVar``, so it
belongs to one ``trio.run`` (one daemon, one ``modelfs warm``, one test), never to the process.
"""

from __future__ import annotations

import signal

from trio.lowlevel import RunVar

__all__ = ["STOP_SIGNALS", "begin", "restore_stop_signals", "stop_signals", "stopping"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""What stops a mount or a warm: a supervisor's SIGTERM, Ctrl-C, a closed terminal."""

# Read at the first import (cli imports this module before it sets any handler): a stop signal
# the process was started ignoring stays ignored, as ``nohup`` (SIGHUP) and a shell's
# background job (SIGINT) ask. Python itself leaves an inherited SIG_IGN in place.
_IGNORED_AT_START = frozenset(s for s in STOP_SIGNALS if signal.getsignal(s) is signal.SIG_IGN)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The stop signals to take: those the process was not started ignoring."""
    return tuple(s for s in STOP_SIGNALS if s not in _IGNORED_AT_START)


def restore_stop_signals() -> None:
    """Give the stop signals their dispositions of the start back (the usual death by them,
    Ctrl-C as KeyboardInterrupt; ignored where they were ignored)."""
    for signum in STOP_SIGNALS:
        if signum in _IGNORED_AT_START:
            signal.signal(signum, signal.SIG_IGN)
        elif signum == signal.SIGINT:
            signal.signal(signum, signal.default_int_handler)
        else:
            signal.signal(signum, signal.SIG_DFL)


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
