"""The event-loop CPU clock: counts the loop thread's CPU only, readable from any thread."""

from __future__ import annotations

import threading
import time

import trio

from modelfs.loopcpu import LoopClock, ceiling_bytes_per_s


def _burn(seconds: float) -> None:
    """Use ``seconds`` of CPU on the calling thread (CPU time, not wall time)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_counts_the_loop_thread_not_workers() -> None:
    clock = LoopClock()
    loop0, proc0 = clock.loop_seconds(), clock.process_seconds()
    await trio.to_thread.run_sync(_burn, 0.2)  # a worker thread's CPU: the daemon's, not the loop's
    loop1, proc1 = clock.loop_seconds(), clock.process_seconds()
    assert proc1 - proc0 >= 0.2
    assert loop1 - loop0 < 0.1
    _burn(0.2)  # on the loop thread itself
    assert clock.loop_seconds() - loop1 >= 0.2


def test_readable_from_another_thread() -> None:
    clock = LoopClock()
    _burn(0.1)
    seen: list[float] = []
    reader = threading.Thread(target=lambda: seen.append(clock.loop_seconds()))
    reader.start()
    reader.join()
    assert seen[0] >= 0.1  # the creating thread's clock, not the reader's own (~0)


def test_ceiling() -> None:
    assert ceiling_bytes_per_s(0.0, 1 << 30) is None
    assert ceiling_bytes_per_s(0.5, 0) is None
    assert ceiling_bytes_per_s(0.25, 1 << 30) == 4 * (1 << 30)
