"""GCS media GETs: an encoded object (gzip, br, ...) is accepted only as its stored bytes."""

from __future__ import annotations

import pytest

from modelfs.backends.gcs import _MEDIA_ENCODINGS, _check_stored_encoding
from modelfs.backends.responses import RangeRequest, check_range_response
from modelfs.errors import BackendError

REQ = RangeRequest("obj [10, +10]", 10, 10)


def _check(status: int, headers: dict[str, str]) -> None:
    check_range_response(
        status, headers, REQ, pinned=lambda h: _check_stored_encoding(h, REQ.what), encodings=_MEDIA_ENCODINGS
    )


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate", "zstd"])
def test_stored_encoded_bytes_are_accepted(encoding: str) -> None:
    """Whatever the stored encoding, its bytes as stored are the object's (before: br and
    deflate were refused as 'not asked for', so such objects could not be read at all)."""
    _check(
        206,
        {
            "content-encoding": encoding,
            "x-goog-stored-content-encoding": encoding,
            "content-range": "bytes 10-19/1395",
            "content-length": "10",
        },
    )
    _check(206, {"content-range": "bytes 10-19/1395", "content-length": "10"})  # an ordinary object


@pytest.mark.parametrize(
    "headers",
    [
        # decompressed (transcoded): whole, unranged, no Content-Encoding
        {"x-goog-stored-content-encoding": "gzip", "content-length": "10"},
        # compressed on the fly although stored plain: not the stored bytes at these offsets
        {"content-encoding": "gzip", "content-range": "bytes 10-19/1395", "content-length": "10"},
        {"content-encoding": "br", "content-range": "bytes 10-19/1395", "content-length": "10"},
        # stored as one encoding, served as another
        {"content-encoding": "gzip", "x-goog-stored-content-encoding": "br", "content-range": "bytes 10-19/1395"},
        {"x-goog-stored-content-encoding": "deflate", "content-range": "bytes 10-19/1395", "content-length": "10"},
    ],
)
def test_anything_but_the_stored_bytes_is_refused(headers: dict[str, str]) -> None:
    with pytest.raises(BackendError):
        _check(206 if "content-range" in headers else 200, headers)


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000])
def test_a_json_api_answer_nested_past_the_parser_is_a_one_line_error(body: bytes) -> None:
    """A lying server's answer nested deeper than json.loads goes is the same error as one
    that is not JSON (before: RecursionError, a traceback)."""
    from modelfs.backends.gcs_scan import parse_listing, parse_object
    from modelfs.errors import BackendError

    with pytest.raises(BackendError, match="not JSON"):
        parse_listing(body)
    with pytest.raises(BackendError, match="not JSON"):
        parse_object(body)


def test_a_certificate_the_client_does_not_trust_is_not_retried() -> None:
    """An intercepting proxy's or a self-signed endpoint's certificate will not get better:
    one error at once, not a retry of every request until --retry-deadline."""
    import ssl

    from modelfs.backends.gcs import GCSBackend
    from modelfs.config import parse_source
    from modelfs.errors import BackendError, TransientError

    backend = GCSBackend(parse_source("gs://bkt/m"), anonymous=True)
    error = backend.classify(ssl.SSLCertVerificationError(1, "certificate verify failed"), "m.bin")
    assert isinstance(error, BackendError) and not isinstance(error, TransientError)
    assert isinstance(backend.classify(ConnectionResetError(104, "reset"), "m.bin"), TransientError)


def test_a_json_api_answer_dripped_within_the_read_timeout_is_a_stall() -> None:
    """Each byte within the read timeout, but fewer than the progress rule's bytes per
    timeout: a stall (TimeoutError, retried as transient), not a wait as long as the server
    likes (before: a 20-byte answer at 0.5 s a byte took 9.5 s with a 1 s read timeout)."""
    from modelfs.backends.body import Progress
    from modelfs.backends.gcs_json import _read_answer

    now = [0.0]

    class Dripping:
        def read1(self, n: int) -> bytes:
            now[0] += 0.5
            return b"x"

    with pytest.raises(TimeoutError):
        _read_answer(Dripping(), Progress(1.0, lambda: now[0]))  # type: ignore[arg-type]
    assert now[0] <= 2.0
