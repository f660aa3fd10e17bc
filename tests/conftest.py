"""Fixtures shared by every test: a fake-gcs-server for the session; the fresh-root test's
wall times in the run's summary."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from modelfs.testing.fakegcs import FakeGCS, fake_gcs
from modelfs.testing.fresh import WALL_TIMES

# The suite may run under nohup or as a shell's background job: SIGHUP or SIGINT are then
# ignored, and every process it starts inherits that, so a mount the tests stop with SIGINT
# would (rightly: modelfs keeps a stop signal ignored at its start) not stop. The processes
# the tests start get a terminal's dispositions: a handled signal is the default after exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture(scope="session")
def gcs() -> Iterator[FakeGCS]:
    """fake-gcs-server with the memory backend: any object name works, objects stay small."""
    with fake_gcs("memory") as server:
        yield server


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fresh-root test's wall times belong in CI's log, passing or not; on an xdist worker
    its own output is not shown, so they come with its report."""
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) == "call":
                for name, value in report.user_properties:
                    if name == WALL_TIMES:
                        terminalreporter.write_line(f"{name}: {value}")
