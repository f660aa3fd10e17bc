"""S3 answers that are not object data, from a lying server on loopback: botocore reads no
more of them than a real answer can be, parses no more than it can hold, and an answer
dripped a byte at a time is a stall, not a wait as long as the server likes."""

from __future__ import annotations

import threading
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from modelfs.backends.s3 import S3Backend
from modelfs.backends.s3_answers import MAX_ANSWER, MAX_ERROR_TAGS, MAX_TAGS
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


@pytest.mark.usefixtures("aws_env")
async def test_a_listing_cut_short_is_said_to_be_malformed_not_a_500() -> None:
    """A 200 whose XML ends mid-element (a proxy cut it short): botocore makes it an error of
    its own with status 500, which was reported as "HTTP 500", a status the store never sent.
    It is a malformed answer with the real status, and worth another try."""
    body = HEAD + b"<Contents><Key>m/sub/a</Key><Size>1</Si"

    def answer(handler: QuietHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with s3_answering(answer) as backend:
        with pytest.raises(TransientError, match=r"malformed answer \(HTTP 200\)") as caught:
            await backend.list_dir("sub/")
        assert "500" not in str(caught.value)


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


def answering(status: int, body: bytes) -> Callable[[QuietHandler], None]:
    def answer(handler: QuietHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return answer


@pytest.mark.usefixtures("aws_env")
async def test_an_error_answer_of_many_elements_is_not_parsed() -> None:
    """A 403 whose 64 KiB body is ``<a/>`` again and again took botocore's parse ~1.3 MiB (per
    GET, in each worker thread): past MAX_ERROR_TAGS tags an error's body is dropped unparsed
    and its status says what went wrong; an error of a few elements is parsed, its code kept."""
    elements = b"<Error><Code>AccessDenied</Code>" + b"<a/>" * (MAX_ERROR_TAGS + 1) + b"</Error>"
    few = b"<Error><Code>AccessDenied</Code><Message>no</Message>" + b"<a/>" * (MAX_ERROR_TAGS - 8) + b"</Error>"
    found: list[str] = []
    for body in (elements, few):
        with s3_answering(answering(403, body)) as backend:
            with pytest.raises(AccessDenied) as caught:
                await backend.read_range("a.bin", ETAG, 0, memoryview(bytearray(10)))
            found.append(str(caught.value))
    assert not found[0].endswith("(AccessDenied)") and found[1].endswith("(AccessDenied)"), found


def dripping(stop: threading.Event, answer: bytes, pace: float, sent: Sent) -> Callable[[QuietHandler], None]:
    """A server that sends ``answer`` (the whole HTTP answer) a byte every ``pace`` seconds."""

    def drip(handler: QuietHandler) -> None:
        try:
            for i in range(len(answer)):
                handler.connection.sendall(answer[i : i + 1])
                sent.bytes += 1
                if stop.wait(pace):
                    break
        except OSError:
            sent.cut.set()
        finally:
            sent.done.set()
            handler.close_connection = True

    return drip


HEAD_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nLast-Modified: Thu, 01 Jan 2026 00:00:00 GMT\r\n"
    b'ETag: "0123456789abcdef0123456789abcdef"\r\nx-amz-request-id: 0123456789ABCDEF\r\n\r\n'
)
LISTING = (
    HEAD + b"<Contents><Key>m/a.bin</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
    b"<ETag>&quot;e&quot;</ETag><Size>10</Size></Contents></ListBucketResult>"
)
LISTING_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(LISTING), LISTING)
GET_ANSWER = (
    b"HTTP/1.1 206 Partial Content\r\nContent-Length: 100\r\nContent-Range: bytes 0-99/100\r\nETag: %s\r\n\r\n%s"
    % (ETAG.encode(), bytes(100))
)
ANSWERS = {"stat": HEAD_ANSWER, "list_dir": LISTING_ANSWER, "read_range": GET_ANSWER}


@pytest.mark.parametrize("what", sorted(ANSWERS))
@pytest.mark.usefixtures("aws_env")
async def test_an_answer_dripped_within_the_read_timeout_is_a_stall(what: str) -> None:
    """A HEAD's answer (all headers), a listing's or a ranged GET's, a byte every fifth of the
    read timeout: fewer than the progress rule's 64 KiB in one read timeout is a stall, a
    TransientError well before the answer's end (before, each took as long as the server
    liked, here ~10-30 s; at the default 30 s read timeout, hours. The GET's body too: its
    block's ``readinto`` returned only once the buffer was full, so the rule never ran)."""
    read_timeout = 0.5
    stop, sent = threading.Event(), Sent()
    answer = ANSWERS[what]
    try:
        with s3_answering(dripping(stop, answer, read_timeout / 5, sent), read_timeout) as backend:
            with pytest.raises(TransientError):
                if what == "stat":
                    await backend.stat("a.bin")
                elif what == "list_dir":
                    await backend.list_dir("")
                else:
                    await backend.read_range("a.bin", ETAG, 0, memoryview(bytearray(100)))
            assert sent.bytes < len(answer)
    finally:
        stop.set()
