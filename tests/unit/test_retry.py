"""retry_transient: retries TransientError with backoff inside a deadline, passes other errors through."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from modelfs.backends.retry import RetryStats, retry_transient
from modelfs.errors import NotFound, TransientError, VersionChanged


class Flaky:
    """An operation failing ``failures`` times with ``error`` before returning ``value``."""

    def __init__(self, failures: int, error: Exception, value: str = "ok") -> None:
        self.failures = failures
        self.error = error
        self.value = value
        self.calls = 0
        self.times: list[float] = []

    async def __call__(self) -> str:
        self.calls += 1
        self.times.append(trio.current_time())
        await trio.sleep(0)
        if self.calls <= self.failures:
            raise self.error
        return self.value


async def test_succeeds_after_transient_failures(autojump_clock: trio.testing.MockClock) -> None:
    """K transient failures, then success: the value is returned after K retries."""
    op = Flaky(4, TransientError("503"))
    stats = RetryStats()
    assert await retry_transient(op, deadline=60, what="x", stats=stats) == "ok"
    assert op.calls == 5
    assert stats.retries == 4 and stats.gave_up == 0


async def test_backoff_waits_grow_within_their_caps(autojump_clock: trio.testing.MockClock) -> None:
    """Each wait is at most first_delay * 2**attempt (capped at max_delay): full jitter below that."""
    op = Flaky(6, TransientError("503"))
    await retry_transient(op, deadline=600, what="x", first_delay=0.5, max_delay=3.0)
    waits = [b - a for a, b in zip(op.times, op.times[1:], strict=False)]
    assert len(waits) == 6
    for attempt, wait in enumerate(waits, start=1):
        assert 0 <= wait <= min(3.0, 0.5 * 2**attempt) + 1e-9


@pytest.mark.parametrize("error", [VersionChanged("gone"), NotFound("missing"), ValueError("bug")])
async def test_other_errors_pass_straight_through(error: Exception, autojump_clock: trio.testing.MockClock) -> None:
    """Errors that retrying will not fix are raised at once, unchanged, after one attempt."""
    op = Flaky(1, error)
    stats = RetryStats()
    with pytest.raises(type(error)) as info:
        await retry_transient(op, deadline=60, what="x", stats=stats)
    assert info.value is error
    assert op.calls == 1 and stats.retries == 0 and stats.gave_up == 0


async def test_gives_up_at_the_deadline_with_transient_error(autojump_clock: trio.testing.MockClock) -> None:
    """Failing forever: retried until the next wait would cross the deadline, then TransientError."""
    original = TransientError("connection reset")
    op = Flaky(10**9, original)
    stats = RetryStats()
    start = trio.current_time()
    with pytest.raises(TransientError) as info:
        await retry_transient(op, deadline=10, what="block 3 of m.bin", stats=stats)
    assert trio.current_time() - start <= 10  # virtual time: never sleeps past the deadline
    assert info.value is not original and info.value.__cause__ is original
    assert "block 3 of m.bin" in str(info.value) and f"after {op.calls} attempt" in str(info.value)
    assert op.calls > 3
    assert stats.gave_up == 1 and stats.retries == op.calls - 1


async def test_zero_deadline_means_one_attempt(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With deadline 0 a transient failure is not retried (any positive backoff crosses it)."""
    monkeypatch.setattr("modelfs.backends.retry.random.uniform", lambda a, b: b)
    op = Flaky(1, TransientError("503"))
    with pytest.raises(TransientError):
        await retry_transient(op, deadline=0, what="x")
    assert op.calls == 1


async def test_a_long_deadline_retries_past_a_thousand_attempts(autojump_clock: trio.testing.MockClock) -> None:
    """--retry-deadline goes up to a day: past attempt 1,023 the backoff's 2**attempt was past
    a float (OverflowError, a traceback and EIO at ~34 min); it stays at its cap instead."""
    op = Flaky(10**9, TransientError("503"))
    with pytest.raises(TransientError, match="failed after"):
        await retry_transient(op, deadline=3 * 3600, what="m.bin")
    assert op.calls > 1024
