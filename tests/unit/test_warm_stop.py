"""``warm()`` stopped by a signal, in-process: its watchdog must not outlive it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from modelfs import warm
from modelfs.backends.memory import ramp

from .warm_runs import serve_with_checksum, warm_config


class Watchdog:
    made: list[Watchdog] = []

    def __init__(self, mountpoint: object, seconds: float, *, code: int = 0) -> None:
        self.code, self.started, self.cancelled = code, False, False
        Watchdog.made.append(self)

    def start(self) -> None:
        self.started = True

    def cancel(self) -> None:
        self.cancelled = True


def test_a_stopped_warm_cancels_its_watchdog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog a stop signal starts ends the process 10 s later unless cancelled: an
    in-process caller of warm() that got a signal (warm raising WarmStopped, handled) was
    killed 10 s after. warm() now cancels it once it returns."""
    backend = serve_with_checksum(monkeypatch, ramp(300_000, seed=5), "crc32c:AAAAAA==")
    reading: list[trio.Event] = []

    async def stalled(*args: object, **kwargs: object) -> None:
        reading[0].set()
        await trio.sleep_forever()

    monkeypatch.setattr(backend, "read_range", stalled)
    monkeypatch.setattr(backend, "read_ranges", stalled)
    monkeypatch.setattr(warm, "StopWatchdog", Watchdog)
    Watchdog.made.clear()
    stopped: list[int] = []

    config = warm_config(tmp_path)

    async def run() -> None:
        try:
            await warm.warm(config)
        except warm.WarmStopped as exc:
            stopped.append(exc.signum)

    async def main() -> None:
        reading.append(trio.Event())  # (an Event belongs to one trio run)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            with trio.fail_after(30):
                await reading[0].wait()
            os.kill(os.getpid(), signal.SIGTERM)  # (taken by warm's signal receiver)

    trio.run(main)
    assert stopped == [signal.SIGTERM]
    [watchdog] = Watchdog.made
    assert watchdog.started and watchdog.code == 128 + signal.SIGTERM
    assert watchdog.cancelled, "the stop's watchdog outlived warm()"
