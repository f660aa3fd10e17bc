"""S3Backend's requests as botocore would send them, answered in-process (no server).

A ``before-send`` hook records each prepared request and returns a scripted response, so
these check what goes on the wire: unsigned with ``--anonymous``, signed otherwise, path-style
against ``--endpoint-url``, ``Range`` and ``If-Match`` on every GET, no retries inside boto3.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from botocore.awsrequest import AWSResponse

from modelfs.backends.s3 import S3Backend
from modelfs.config import parse_source
from modelfs.errors import BackendError, ConfigError, TransientError, VersionChanged
from modelfs.testing.servers import QuietHandler, loopback_http, serving

from .blocked_lookups import BlockedResolver

ETAG = '"0123456789abcdef0123456789abcdef"'


class _Raw:
    """What botocore reads a body from (urllib3-like): stream(), read(), readinto()."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        yield self.data

    def read(self, *args: Any, **kwargs: Any) -> bytes:
        data, self.data = self.data, b""
        return data

    def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), len(self.data))
        buf[:n] = self.data[:n]
        self.data = self.data[n:]
        return n

    def release_conn(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def scripted(backend: S3Backend, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> list[Any]:
    sent: list[Any] = []

    def before_send(request: Any, **kwargs: Any) -> AWSResponse:
        sent.append(request)
        return AWSResponse(request.url, status, headers or {}, _Raw(body))  # type: ignore[arg-type]

    backend._client.meta.events.register("before-send.s3", before_send)
    return sent


LIST_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>bkt</Name><Prefix>m/</Prefix>'
    b"<KeyCount>1</KeyCount><IsTruncated>false</IsTruncated><Contents><Key>m/a.bin</Key>"
    b"<LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>&quot;0123456789abcdef0123456789abcdef&quot;"
    b"</ETag><Size>10</Size></Contents></ListBucketResult>"
)


async def test_anonymous_requests_are_unsigned(aws_env: None) -> None:
    backend = S3Backend(parse_source("s3://bkt/m"), endpoint_url="http://127.0.0.1:9", anonymous=True)
    sent = scripted(backend, 200, LIST_XML)
    [info] = await backend.list_objects()
    assert (info.name, info.size, info.version) == ("a.bin", 10, ETAG)
    assert "Authorization" not in sent[0].headers
    assert sent[0].url.startswith("http://127.0.0.1:9/bkt?")  # path-style


async def test_signed_ranged_get_with_if_match(aws_env: None) -> None:
    backend = S3Backend(parse_source("s3://bkt/m"), endpoint_url="http://127.0.0.1:9")
    data = bytes(range(10))
    sent = scripted(backend, 206, data[2:6], {"ETag": ETAG, "Content-Range": "bytes 2-5/10", "Content-Length": "4"})
    buf = bytearray(4)
    await backend.read_range("a.bin", ETAG, 2, memoryview(buf))
    assert bytes(buf) == data[2:6]
    [request] = sent
    assert request.headers["Authorization"].startswith(b"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert request.headers["Range"] == b"bytes=2-5"
    assert request.headers["If-Match"] == ETAG.encode()
    assert request.url == "http://127.0.0.1:9/bkt/m/a.bin"


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (412, "PreconditionFailed", VersionChanged),
        (404, "NoSuchKey", VersionChanged),
        (503, "SlowDown", TransientError),
    ],
)
async def test_errors_are_classified_and_not_retried_by_boto3(
    aws_env: None, status: int, code: str, error: type[Exception]
) -> None:
    backend = S3Backend(parse_source("s3://bkt/m"), endpoint_url="http://127.0.0.1:9")
    body = f"<Error><Code>{code}</Code><Message>m</Message></Error>".encode()
    sent = scripted(backend, status, body)
    with pytest.raises(error):
        await backend.read_range("a.bin", ETAG, 0, memoryview(bytearray(4)))
    assert len(sent) == 1  # the block store retries, once, above every backend


def test_no_credentials_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match="--anonymous"):
        S3Backend(parse_source("s3://bkt/m"), endpoint_url="http://127.0.0.1:9")


async def test_requester_pays_is_said_and_signed_on_every_request(aws_env: None) -> None:
    backend = S3Backend(parse_source("s3://bkt/m"), endpoint_url="http://127.0.0.1:9", requester_pays=True)
    sent = scripted(backend, 200, LIST_XML, {"ETag": ETAG, "Content-Length": "10"})
    await backend.list_objects()
    await backend.list_dir("")
    await backend.stat("a.bin")
    reader = S3Backend(parse_source("s3://bkt/m"), endpoint_url="http://127.0.0.1:9", requester_pays=True)
    data = bytes(range(10))
    got = scripted(reader, 206, data[2:6], {"ETag": ETAG, "Content-Range": "bytes 2-5/10", "Content-Length": "4"})
    buf = bytearray(4)
    await reader.read_range("a.bin", ETAG, 2, memoryview(buf))
    assert bytes(buf) == data[2:6]
    assert len(sent) == 3 and len(got) == 1, [r.url for r in sent + got]
    for request in sent + got:
        assert request.headers["x-amz-request-payer"] == b"requester", request.url
        assert b"x-amz-request-payer" in request.headers["Authorization"]  # among the signed headers
    plain = S3Backend(parse_source("s3://bkt/m"), endpoint_url="http://127.0.0.1:9")
    sent = scripted(plain, 200, LIST_XML)
    await plain.list_objects()
    assert "x-amz-request-payer" not in sent[0].headers


async def _stopped_get(backend: S3Backend, started: threading.Event) -> TransientError:
    """Start a GET, wait until ``started`` is set (in a thread), stop the backend: the error
    the GET ended with, which must be the stop's and not the read timeout's."""
    failed: list[TransientError] = []
    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            try:
                await backend.read_range("a.bin", ETAG, 0, memoryview(bytearray(100)))
            except TransientError as exc:
                failed.append(exc)

        nursery.start_soon(reader)
        await trio.to_thread.run_sync(started.wait, 60)
        backend.abort()
    [error] = failed
    assert "the daemon is stopping" in str(error), error
    causes = []
    cause: BaseException | None = error
    while cause is not None:
        causes.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__context__
    # Ended by the stop, not by the read timeout (how the read saw the shut socket depends on
    # whether the stop came before or after the thread took what the server sent).
    assert len(causes) > 1 and not any(re.search(r"time(d)? ?out", c, re.IGNORECASE) for c in causes), causes
    return error


async def test_a_stop_ends_a_get_whose_body_the_server_holds(aws_env: None) -> None:
    """abort() (the daemon's stop) shuts the socket of a GET reading its body, so the worker
    thread returns now rather than at the read timeout; no GET starts afterwards."""
    release = threading.Event()
    paths: list[str] = []

    class Stall(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            paths.append(self.path)
            self.send_response(206)
            self.send_header("ETag", ETAG)
            self.send_header("Content-Range", "bytes 0-99/100")
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(bytes(10))
            self.wfile.flush()
            release.wait(60)

    with loopback_http(Stall) as endpoint:
        backend = S3Backend(parse_source("s3://bkt/m"), endpoint_url=endpoint, anonymous=True, read_timeout=30)
        reading = threading.Event()  # the GET's socket is noted: its thread reads the body
        note = backend._in_flight.enter

        def noted(sock: Any) -> None:
            note(sock)
            reading.set()

        backend._in_flight.enter = noted  # type: ignore[method-assign]
        try:
            await _stopped_get(backend, reading)
            with pytest.raises(TransientError, match="stopping"):
                await backend.read_range("a.bin", ETAG, 0, memoryview(bytearray(100)))
            assert paths == ["/bkt/m/a.bin"]
        finally:
            release.set()
            await backend.aclose()


async def test_a_stop_ends_a_get_still_waiting_for_its_headers(aws_env: None) -> None:
    """Before the headers botocore gives nothing that leads to the socket: abort() reaches it
    as one the client opened, so the GET ends now, not at the read timeout."""
    asked, release = threading.Event(), threading.Event()

    class Silent(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            asked.set()
            release.wait(120)  # never answers while the test runs

    with loopback_http(Silent) as endpoint:
        # A read timeout the test would notice: without the stop reaching the socket the GET
        # would end by it, with a timeout error rather than "stopping".
        backend = S3Backend(parse_source("s3://bkt/m"), endpoint_url=endpoint, anonymous=True, read_timeout=60)
        try:
            await _stopped_get(backend, asked)
        finally:
            release.set()
            await backend.aclose()


@pytest.mark.parametrize(
    "listing",
    [
        b'<?xml version="1.0"?><ListBucketResult><Name>bkt</Name><KeyCount>1</KeyCount><IsTruncated>false</IsTruncated>'
        b"<Contents><Key>m/a.bin</Key><Size>10</Size></Contents></ListBucketResult>",  # no ETag
        b'<?xml version="1.0"?><ListBucketResult><Name>bkt</Name><KeyCount>1</KeyCount><IsTruncated>false</IsTruncated>'
        b'<Contents><Key>m/a.bin</Key><ETag>"x"</ETag></Contents></ListBucketResult>',  # no Size
    ],
)
async def test_a_listing_without_an_objects_etag_or_size_is_a_backend_error(aws_env: None, listing: bytes) -> None:
    """A store (or a proxy) that leaves out a field: one BackendError line, not a KeyError
    traceback and EIO on every lookup."""
    from modelfs.errors import BackendError

    backend = S3Backend(parse_source("s3://bkt/m"), endpoint_url="http://127.0.0.1:9")
    scripted(backend, 200, listing)
    with pytest.raises(BackendError, match="without its"):
        await backend.list_dir("")
    scripted(backend, 200, b"", {"Content-Length": "10"})  # a HEAD answer without an ETag
    with pytest.raises(BackendError, match="without its"):
        await backend.stat("a.bin")


@pytest.mark.parametrize(
    ("head", "etag", "expected"),
    [
        ({"ChecksumCRC32": "iH6F8A=="}, ETAG, "crc32:iH6F8A=="),  # a single PUT's, type not said
        ({"ChecksumSHA256": "q" * 43 + "=", "ChecksumType": "FULL_OBJECT"}, ETAG, "sha256:" + "q" * 43 + "="),
        ({"ChecksumCRC32": "MA1hIQ==", "ChecksumType": "FULL_OBJECT"}, '"abc-2"', "crc32:MA1hIQ=="),
        ({"ChecksumCRC32C": "9286hw==-2", "ChecksumType": "COMPOSITE"}, '"abc-2"', "crc32c:9286hw==-2"),  # S3
        ({"ChecksumCRC32": "9286hw=="}, '"abc-2"', "crc32:9286hw==-2"),  # moto's HEAD: no type, no suffix
        (
            {"ChecksumSHA1": "LU0jSCSI0F3SqamOuIKfR/U9M04=", "ChecksumType": "COMPOSITE"},
            ETAG,
            "sha1:LU0jSCSI0F3SqamOuIKfR/U9M04=-?",
        ),
        ({"ChecksumCRC64NVME": "AAAAAAAAAAA="}, ETAG, "crc64nvme:AAAAAAAAAAA="),
        # CRC64NVME is only ever FULL_OBJECT: a multipart upload's, type not said (moto's HEAD), too
        ({"ChecksumCRC64NVME": "rosUhgp5mIg="}, '"abc-2"', "crc64nvme:rosUhgp5mIg="),
        ({}, ETAG, None),
        ({"ChecksumCRC32": ""}, ETAG, None),
    ],
)
def test_a_head_answers_checksum_is_whole_object_or_composite(head: dict[str, str], etag: str, expected: str) -> None:
    from modelfs.backends.s3 import head_checksum

    assert head_checksum(head, etag) == expected


async def test_stat_asks_for_the_objects_checksum(aws_env: None) -> None:
    """A listing has no checksum: HeadObject with ChecksumMode=ENABLED (what warm stats for)."""
    backend = S3Backend(parse_source("s3://bkt/m"), endpoint_url="http://127.0.0.1:9")
    value = "NMeTyb60RAz8O63Wl3YHEhUvy+CJBaaiE3s4lf13Gd8="
    headers = {
        "ETag": ETAG,
        "Content-Length": "10",
        "x-amz-checksum-sha256": value,
        "x-amz-checksum-type": "FULL_OBJECT",
    }
    sent = scripted(backend, 200, b"", headers)
    info = await backend.stat("a.bin")
    assert (info.name, info.size, info.version, info.checksum) == ("a.bin", 10, ETAG, f"sha256:{value}")
    [request] = sent
    assert request.method == "HEAD" and request.headers["x-amz-checksum-mode"] == b"ENABLED"
    assert b"x-amz-checksum-mode" in request.headers["Authorization"]  # signed
    assert backend.checksums_by_stat


class _Bucket(QuietHandler):
    """A bucket holding m/a.bin (10 bytes): its listing, HEAD and ranged GET."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if "list-type=2" in self.path:
            self._answer(200, LIST_XML, {"Content-Type": "application/xml"})
        else:
            self._answer(206, bytes(range(4)), {"ETag": ETAG, "Content-Range": "bytes 0-3/10"})

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("ETag", ETAG)
        self.send_header("Content-Length", "10")
        self.send_header("Last-Modified", "Thu, 01 Jan 2026 00:00:00 GMT")
        self.end_headers()

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def blocked_s3_name(monkeypatch: pytest.MonkeyPatch) -> Iterator[BlockedResolver]:
    resolver = BlockedResolver("s3-0.test", "s3-1.test")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    yield resolver
    resolver.close()


async def test_a_resolver_that_does_not_answer_fails_s3_requests_at_the_connect_timeout(
    aws_env: None, blocked_s3_name: BlockedResolver
) -> None:
    """urllib3's getaddrinfo had no timeout: a listing (the mount's first check of the bucket),
    a HEAD and a ranged GET each waited as long as the resolver did. Each is now a failure
    worth retrying at the connect timeout, with one lookup in flight for the name however
    many requests wait; once the resolver answers, requests go through."""
    with loopback_http(_Bucket) as endpoint:
        port = endpoint.rsplit(":", 1)[1]
        backend = S3Backend(
            parse_source("s3://bkt/m"), endpoint_url=f"http://s3-0.test:{port}", anonymous=True, connect_timeout=0.3
        )
        try:
            with pytest.raises(TransientError, match="timed out"):
                await backend.list_objects()
            with pytest.raises(TransientError):
                await backend.stat("a.bin")
            with pytest.raises(TransientError):
                await backend.read_range("a.bin", ETAG, 0, memoryview(bytearray(4)))
            assert blocked_s3_name.calls == 1 and not blocked_s3_name.freed_by_watchdog
            blocked_s3_name.release.set()  # the resolver answers again: so does the bucket
            [info] = await backend.list_objects()
            assert (info.name, info.size, info.version) == ("a.bin", 10, ETAG)
            buf = bytearray(4)
            await backend.read_range("a.bin", ETAG, 0, memoryview(buf))
            assert bytes(buf) == bytes(range(4))
        finally:
            await backend.aclose()


async def test_a_stop_ends_an_s3_request_waiting_for_a_name_lookup(
    aws_env: None, blocked_s3_name: BlockedResolver
) -> None:
    """With a connect timeout far longer than the test, the stop (abort) ends a listing
    whose connection waits for the name's lookup."""
    backend = S3Backend(
        parse_source("s3://bkt/m"), endpoint_url="http://s3-1.test:9", anonymous=True, connect_timeout=600
    )
    failed: list[BaseException] = []
    try:
        async with trio.open_nursery() as nursery:

            async def lister() -> None:
                try:
                    await backend.list_objects()
                except TransientError as exc:
                    failed.append(exc)

            nursery.start_soon(lister)
            assert await trio.to_thread.run_sync(blocked_s3_name.asked.wait, 30)
            backend.abort()
        assert not blocked_s3_name.freed_by_watchdog
        [error] = failed
        causes: list[BaseException] = []
        cause: BaseException | None = error
        while cause is not None:
            causes.append(cause)
            cause = cause.__cause__ or cause.__context__
        assert any(isinstance(c, ConnectionAbortedError) for c in causes), causes  # (the stop's, not a timeout)
    finally:
        await backend.aclose()


def _tls_bucket(tmp_path: Path) -> tuple[Path, ThreadingHTTPServer]:
    """The bucket over TLS, its certificate for 127.0.0.1 and localhost only."""
    from modelfs.testing.nginx import make_ca

    ca, cert, key = make_ca(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Bucket)
    server.daemon_threads = True
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return ca, server


async def test_s3_over_tls_checks_the_certificate_for_the_name_not_the_address(
    aws_env: None, tmp_path: Path, blocked_s3_name: BlockedResolver
) -> None:
    """The connection is made to the address the lookup gave, but TLS still checks the
    certificate for the endpoint's name: s3-0.test resolves to 127.0.0.1, which the
    certificate names, and is still refused; localhost, which it names too, is served."""
    blocked_s3_name.release.set()  # (s3-0.test resolves at once, to 127.0.0.1)
    ca, server = _tls_bucket(tmp_path)
    with serving(server):
        port = server.server_address[1]
        for host, works in (("s3-0.test", False), ("localhost", True)):
            backend = S3Backend(
                parse_source("s3://bkt/m"), endpoint_url=f"https://{host}:{port}", anonymous=True, ca_cert=ca
            )
            try:
                if works:
                    [info] = await backend.list_objects()
                    assert info.name == "a.bin"
                else:
                    with pytest.raises(BackendError, match="TLS failed") as raised:
                        await backend.list_objects()
                    assert not isinstance(raised.value, TransientError)
            finally:
                await backend.aclose()
