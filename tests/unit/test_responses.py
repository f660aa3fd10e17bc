"""check_range_response: one set of rules for every store's answer to a ranged GET."""

from __future__ import annotations

import pytest

from modelfs.backends.responses import RangeRequest, check_range_response, parse_content_range, short_reason
from modelfs.errors import AccessDenied, BackendError, TransientError, VersionChanged

SIZE = 1000


def req(offset: int = 100, length: int = 50, size: int | None = SIZE) -> RangeRequest:
    return RangeRequest("obj [100, +50]", offset, length, size)


def ranged(first: int = 100, last: int = 149, total: str = str(SIZE), length: int = 50) -> dict[str, str]:
    return {"content-range": f"bytes {first}-{last}/{total}", "content-length": str(length)}


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, VersionChanged),
        (410, VersionChanged),
        (412, VersionChanged),
        (416, VersionChanged),  # was a TransientError for GCS only
        (401, AccessDenied),
        (403, AccessDenied),
        (408, TransientError),
        (429, TransientError),
        (500, TransientError),
        (503, TransientError),
        (302, BackendError),
        (418, BackendError),
    ],
)
@pytest.mark.parametrize("size", [SIZE, None])
def test_statuses(status: int, error: type[Exception], size: int | None) -> None:
    with pytest.raises(error) as info:
        check_range_response(status, {}, req(size=size))
    assert type(info.value) is error


@pytest.mark.parametrize("size", [SIZE, None])
def test_the_exact_range_passes(size: int | None) -> None:
    check_range_response(206, ranged(), req(size=size))
    check_range_response(206, ranged(total="*"), req(size=size))


def test_content_range_rules() -> None:
    with pytest.raises(TransientError, match="bad Content-Range"):
        check_range_response(206, {"content-range": "bytes 100-149"}, req())
    with pytest.raises(TransientError, match="wrong Content-Range"):
        check_range_response(206, ranged(first=101, last=150), req())
    with pytest.raises(VersionChanged, match="size"):  # the pinned size is known and differs
        check_range_response(206, ranged(total="1001"), req())
    # The size is not known (GCS, S3): a range past the end is the caller's mistake.
    with pytest.raises(BackendError, match="beyond the end") as info:
        check_range_response(206, ranged(last=119, total="120", length=20), req(size=None))
    assert type(info.value) is BackendError
    with pytest.raises(TransientError, match="Content-Length"):
        check_range_response(206, ranged(length=49), req())


def test_a_whole_body_is_only_fine_for_the_whole_object() -> None:
    check_range_response(200, {"content-length": "1000"}, req(0, SIZE))
    check_range_response(200, {"content-length": "1000"}, req(0, SIZE, size=None))
    with pytest.raises(BackendError, match="does not support Range requests"):
        check_range_response(200, {"content-length": "1000"}, req())
    with pytest.raises(BackendError, match="does not support Range requests"):
        check_range_response(200, {"content-length": "1000"}, req(0, 50, size=None))
    with pytest.raises(VersionChanged):
        check_range_response(200, {"content-length": "1001"}, req(0, SIZE))


def test_encodings_and_the_backends_own_validator() -> None:
    with pytest.raises(BackendError, match="gzip"):
        check_range_response(206, {**ranged(), "content-encoding": "gzip"}, req())
    check_range_response(206, {**ranged(), "content-encoding": "gzip"}, req(), encodings=("gzip",))

    def pinned(headers: object) -> None:
        raise VersionChanged("other generation")

    with pytest.raises(VersionChanged, match="other generation"):
        check_range_response(206, ranged(), req(), pinned=pinned)
    with pytest.raises(AccessDenied):  # the status is judged before the validator
        check_range_response(403, {}, req(), pinned=pinned)


def test_parse_content_range_and_short_reason() -> None:
    assert parse_content_range("bytes 0-9/10") == (0, 9, 10)
    assert parse_content_range("bytes 0-9/*") == (0, 9, None)
    assert parse_content_range("bytes */10") is None
    assert short_reason(TimeoutError("x")) == "timed out"
    nested = OSError("Max retries exceeded (Caused by NewConnectionError('<c>: [Errno 111] Connection refused'))")
    assert short_reason(nested) == "connection refused"
