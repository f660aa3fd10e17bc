"""S3Backend's requests as botocore would send them, answered in-process (no server).

A ``before-send`` hook records each prepared request and returns a scripted response, so
these check what goes on the wire: unsigned with ``--anonymous``, signed otherwise, path-style
against ``--endpoint-url``, ``Range`` and ``If-Match`` on every GET, no retries inside boto3.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
import trio
from botocore.awsrequest import AWSResponse

from modelfs.backends.s3 import S3Backend
from modelfs.config import parse_source
from modelfs.errors import ConfigError, TransientError, VersionChanged
from modelfs.testing.servers import QuietHandler, loopback_http

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
