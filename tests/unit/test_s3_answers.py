"""S3 answers that are not object data, from a lying server on loopback: botocore reads no
more of them than a real answer can be, and botocore parses no more of them than it can hold."""

from __future__ import annotations

import threading
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from modelfs.backends.s3 import S3Backend
from modelfs.backends.s3_answers import MAX_ANSWER, MAX_TAGS
from modelfs.config import parse_source
from modelfs.errors import AccessDenied, BackendError, TransientError
from modelfs.testing.servers import QuietHandler, loopback_http

from .test_s3_backend import ETAG, aws_env

__all__ = ["aws_env"]  # the fixture, imported to be used by name

HEAD = b'<?xml version="1.0"?><ListBucketResult><Name>bkt</Name><IsTruncated>false</IsTruncated>'
SENT_AT_MOST = 64 << 20  # what the endless answers below send before they give up


class Sent:
    """What a server's answer got out before the client hung up."""

    def __init__(self) -> None:
        self.bytes = 0
        self.cut = threading.Event()  # the client closed the connection before the end
        self.done = threading.Event()


def endless(handler: QuietHandler, status: int, sent: Sent, unit: bytes = b"a" * 4096, head: bytes = b"") -> None:
    """Answer ``status`` with a body of SENT_AT_MOST bytes: ``head``, then ``unit`` again and again."""
    handler.send_response(status)
    handler.send_header("Content-Length", str(SENT_AT_MOST))
    handler.end_headers()
    try:
        handler.wfile.write(head)
        sent.bytes = len(head)
        while sent.bytes + len(unit) <= SENT_AT_MOST:
            handler.wfile.write(unit)
            sent.bytes += len(unit)
    except OSError:
        sent.cut.set()
    finally:
        sent.done.set()
        handler.close_connection = True


@contextmanager
def s3_answering(answer: Callable[[QuietHandler], None], read_timeout: float = 30.0) -> Iterator[S3Backend]:
    """An S3Backend on ``s3://bkt/m`` whose every request ``answer`` answers."""

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            answer(self)

        do_HEAD = do_GET  # noqa: N815

    with loopback_http(Handler) as endpoint:
        yield S3Backend(parse_source("s3://bkt/m"), endpoint_url=endpoint, anonymous=True, read_timeout=read_timeout)


@pytest.mark.usefixtures("aws_env")
async def test_a_listing_answer_larger_than_a_page_is_read_no_further() -> None:
    """A 64 MiB listing answer: one line naming the bound, after at most MAX_ANSWER bytes
    (the server's write fails: the client hung up). botocore read it whole before (300 MB
    took 1.5 GB of RSS)."""
    sent = Sent()
    with s3_answering(lambda h: endless(h, 200, sent, head=HEAD + b"<Name>")) as backend:
        with pytest.raises(BackendError, match="larger than 16 MiB") as caught:
            await backend.list_dir("")
        assert type(caught.value) is BackendError  # not transient: not asked again
        assert sent.done.wait(30) and sent.cut.is_set() and sent.bytes < SENT_AT_MOST


@pytest.mark.usefixtures("aws_env")
async def test_a_listing_of_tiny_elements_is_refused_before_the_parse() -> None:
    """Just under MAX_ANSWER of ``<Contents/>``: botocore's parse of it peaked at 235 MiB of
    Python objects; refused on its tag count, the whole listing stays within ~3 times the answer."""
    unit = b"<Contents/>"
    body = HEAD + unit * ((MAX_ANSWER - len(HEAD) - 19) // len(unit)) + b"</ListBucketResult>"

    def answer(handler: QuietHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with s3_answering(answer) as backend:
        tracemalloc.start()
        try:
            with pytest.raises(BackendError, match=f"more than the {MAX_TAGS}"):
                await backend.list_dir("")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 3 * MAX_ANSWER, peak


@pytest.mark.usefixtures("aws_env")
async def test_a_listing_with_a_dtd_is_refused() -> None:
    """Entities declared in a DTD are expanded by expat up to 100-fold: S3 sends none."""
    body = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><ListBucketResult>&a;</ListBucketResult>'

    def answer(handler: QuietHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with s3_answering(answer) as backend:
        with pytest.raises(BackendError, match="a DTD"):
            await backend.list_dir("")


@pytest.mark.parametrize(("status", "error"), [(403, AccessDenied), (500, TransientError)])
@pytest.mark.usefixtures("aws_env")
async def test_a_ranged_gets_endless_error_answer_is_read_no_further(status: int, error: type[Exception]) -> None:
    """A 403 or 500 whose body does not end: its status says what went wrong, and the client
    hangs up after at most 64 KiB (before, botocore read all of it: the server's write ended)."""
    sent = Sent()
    with s3_answering(lambda h: endless(h, status, sent, head=b"<Error><Code>")) as backend:
        with pytest.raises(error):
            await backend.read_range("a.bin", ETAG, 0, memoryview(bytearray(10)))
        assert sent.done.wait(30) and sent.cut.is_set() and sent.bytes < SENT_AT_MOST
