"""CPU time of the event-loop thread: the part of the daemon's work that one core must do.

Everything a FUSE request needs in Python (pyfuse3's dispatch, the read handler, the caches'
bookkeeping, the reply's copy into the kernel) runs on the one thread that runs trio; GETs,
disk reads and writes run in worker threads and spread over cores. So the loop thread's CPU
seconds per GiB delivered bound what one mount can serve however many cores the machine has:
at most ``1 / (loop CPU-s per GiB)`` GiB/s (docs/architecture.md, "A ceiling for big machines").

The clock is the thread's own CPU clock (``pthread_getcpuclockid``), which any thread may read:
the metrics thread reads it without touching state the loop owns.
"""

from __future__ import annotations

import threading
import time

__all__ = ["LoopClock", "ceiling_bytes_per_s"]

GiB = 1 << 30


class LoopClock:
    """CPU seconds of the thread that created it (create it on the trio thread), and of the process."""

    def __init__(self) -> None:
        self._clock = time.pthread_getcpuclockid(threading.get_ident())

    def loop_seconds(self) -> float:
        return time.clock_gettime(self._clock)

    @staticmethod
    def process_seconds() -> float:
        return time.process_time()


def ceiling_bytes_per_s(loop_cpu_s: float, delivered_bytes: int) -> float | None:
    """The projected single-mount ceiling: bytes per second if the loop thread had a core to itself
    and every other part kept up. None until something was delivered."""
    if delivered_bytes <= 0 or loop_cpu_s <= 0:
        return None
    return delivered_bytes / loop_cpu_s
