"""HTTPBackend against a scripted server (httpx.MockTransport): the answers nginx never gives.

Each case is a status or header a real server may send (HEAD refused, no ETag, weak ETag,
Range ignored, a changed ETag or total, a short or encoded body) and the error class or pin it
must turn into. The requests the backend sends (If-Match, If-Unmodified-Since, Range) are
recorded and checked too.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import trio
import trio.testing

from modelfs.backends.http import HTTPBackend, make_version, parse_version
from modelfs.backends.http_manifest import parse_manifest
from modelfs.config import parse_source
from modelfs.errors import AccessDenied, BackendError, ConfigError, NotFound, TransientError, VersionChanged

DATA = bytes(range(256)) * 40  # 10240 bytes
ETAG = '"abc-123"'
LM = "Wed, 21 Oct 2026 07:28:00 GMT"
SECRET = "Bearer sup3r-s3cret"

Handler = Callable[[httpx.Request], httpx.Response]


class _Body(httpx.AsyncByteStream):
    """A streamed body: with ``content=`` the Response would read (and decode) it when made."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        if self.data:
            yield self.data


def response(status: int, data: bytes = b"", headers: dict[str, str] | None = None) -> httpx.Response:
    headers = dict(headers or {})
    headers.setdefault("Content-Length", str(len(data)))
    return httpx.Response(status, stream=_Body(data), headers=headers)


def serve(
    data: bytes = DATA,
    *,
    etag: str | None = ETAG,
    last_modified: str | None = LM,
    head_status: int = 200,
    ranges: bool = True,
    accept_ranges: bool = True,
) -> tuple[Handler, list[httpx.Request]]:
    """A static-file server in a function; ``requests`` records what it was asked."""
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        headers = {}
        if etag:
            headers["ETag"] = etag
        if last_modified:
            headers["Last-Modified"] = last_modified
        if accept_ranges:
            headers["Accept-Ranges"] = "bytes"
        if request.method == "HEAD":
            if head_status != 200:
                return httpx.Response(head_status)
            return httpx.Response(200, headers={**headers, "Content-Length": str(len(data))})
        if_match = request.headers.get("if-match")
        if if_match is not None and if_match != etag:
            return httpx.Response(412)
        rng = request.headers.get("range")
        if rng and ranges:
            start, end = (int(x) for x in rng.removeprefix("bytes=").split("-"))
            end = min(end, len(data) - 1)
            return response(
                206, data[start : end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
            )
        return response(200, data, headers)

    return handler, requests


def backend(handler: Handler, url: str = "https://example.test/models/m.bin", **kwargs: object) -> HTTPBackend:
    """The backend on httpx's MockTransport: its metadata requests, and its data GETs on the
    httpx path (the one used behind a proxy). The http.client data path (http_media.py) is
    tested against loopback servers in test_http_media.py and the integration tests."""
    b = HTTPBackend(parse_source(url), **kwargs)  # type: ignore[arg-type]
    b._media = None
    b._client = httpx.AsyncClient(
        transport=httpx.MockTransport(handler), headers=b._client.headers, follow_redirects=True
    )
    return b


async def read(b: HTTPBackend, version: str, offset: int, length: int, name: str = "m.bin") -> bytes:
    buf = bytearray(length)
    await b.read_range(name, version, offset, memoryview(buf))
    return bytes(buf)


async def test_stat_pins_size_and_strong_etag_and_reads_send_if_match() -> None:
    handler, requests = serve()
    b = backend(handler)
    [info] = await b.list_objects()
    assert (info.name, info.size) == ("m.bin", len(DATA))
    assert parse_version(info.version) == (len(DATA), ETAG, None)
    assert await read(b, info.version, 100, 50) == DATA[100:150]
    get = requests[-1]
    assert get.headers["if-match"] == ETAG and get.headers["range"] == "bytes=100-149"
    assert get.headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("etag", [None, 'W/"weak"'])
async def test_without_a_strong_etag_the_pin_is_last_modified_and_size(etag: str | None) -> None:
    handler, requests = serve(etag=etag)
    b = backend(handler)
    [info] = await b.list_objects()
    assert parse_version(info.version) == (len(DATA), None, LM)
    assert await read(b, info.version, 0, 10) == DATA[:10]
    assert "if-match" not in requests[-1].headers
    assert requests[-1].headers["if-unmodified-since"] == LM
    changed, _ = serve(etag=etag, last_modified="Thu, 22 Oct 2026 07:28:00 GMT")
    with pytest.raises(VersionChanged):
        await read(backend(changed), info.version, 0, 10)


@pytest.mark.parametrize("status", [403, 405, 501])
async def test_head_refused_falls_back_to_a_one_byte_get(status: int) -> None:
    handler, requests = serve(head_status=status)
    b = backend(handler)
    [info] = await b.list_objects()
    assert info.size == len(DATA) and parse_version(info.version)[1] == ETAG
    assert requests[-1].method == "GET" and requests[-1].headers["range"] == "bytes=0-0"


class _OneByteThenHeld(httpx.AsyncByteStream):
    """A probe's answer whose body sends its byte and then neither ends nor sends more."""

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        yield DATA[:1]
        await trio.sleep_forever()


async def test_a_probe_whose_body_is_held_open_answers_after_the_read_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The size is in the probe's headers: a body held open after its byte (or dripped) costs
    at most the read timeout, not a hang (before: a wait on the body with no end)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(405)
        headers = {"ETag": ETAG, "Content-Range": f"bytes 0-0/{len(DATA)}", "Content-Length": "1"}
        return httpx.Response(206, stream=_OneByteThenHeld(), headers=headers)

    b = backend(handler, read_timeout=7.0)
    start = trio.current_time()
    with trio.fail_after(60):  # (the mock clock jumps: a hang fails here instead)
        [info] = await b.list_objects()
    assert info.size == len(DATA) and parse_version(info.version)[1] == ETAG
    assert trio.current_time() - start == pytest.approx(7.0)


async def test_a_server_that_ignores_range_fails_at_listing_with_a_clear_error() -> None:
    handler, _ = serve(ranges=False, accept_ranges=False)
    with pytest.raises(BackendError, match="does not support Range requests") as info:
        await backend(handler).list_objects()
    assert not isinstance(info.value, TransientError)


async def test_range_ignored_on_a_read_is_a_clear_error_but_a_whole_file_read_is_fine() -> None:
    handler, _ = serve(ranges=False)
    b = backend(handler)
    version = make_version(len(DATA), ETAG, LM)
    with pytest.raises(BackendError, match="does not support Range requests"):
        await read(b, version, 10, 10)
    assert await read(b, version, 0, len(DATA)) == DATA


async def test_changed_etag_or_total_is_version_changed() -> None:
    handler, _ = serve(etag='"other"')
    with pytest.raises(VersionChanged):  # 412 from If-Match
        await read(backend(handler), make_version(len(DATA), ETAG, None), 0, 10)

    def ignores_if_match(request: httpx.Request) -> httpx.Response:
        return response(206, DATA[:10], {"ETag": '"other"', "Content-Range": f"bytes 0-9/{len(DATA)}"})

    with pytest.raises(VersionChanged, match="ETag"):
        await read(backend(ignores_if_match), make_version(len(DATA), ETAG, None), 0, 10)

    def grew(request: httpx.Request) -> httpx.Response:
        return response(206, DATA[:10], {"Content-Range": f"bytes 0-9/{len(DATA) + 1}"})

    with pytest.raises(VersionChanged, match="size"):
        await read(backend(grew), make_version(len(DATA), ETAG, None), 0, 10)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, VersionChanged),
        (410, VersionChanged),
        (416, VersionChanged),
        (401, AccessDenied),
        (403, AccessDenied),
        (429, TransientError),
        (500, TransientError),
        (503, TransientError),
        (408, TransientError),
        (418, BackendError),
    ],
)
async def test_read_status_classification(status: int, error: type[Exception]) -> None:
    b = backend(lambda request: httpx.Response(status))
    with pytest.raises(error):
        await read(b, make_version(len(DATA), ETAG, None), 0, 10)


@pytest.mark.parametrize(("status", "error"), [(404, NotFound), (401, AccessDenied), (503, TransientError)])
async def test_stat_status_classification(status: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        await backend(lambda request: httpx.Response(status)).list_objects()


async def test_short_body_and_encoded_body() -> None:
    def short(request: httpx.Request) -> httpx.Response:
        return response(206, DATA[:5], {"Content-Range": f"bytes 0-9/{len(DATA)}", "Content-Length": "10"})

    with pytest.raises(TransientError):
        await read(backend(short), make_version(len(DATA), ETAG, None), 0, 10)

    def gzipped(request: httpx.Request) -> httpx.Response:
        return response(206, DATA[:10], {"Content-Range": f"bytes 0-9/{len(DATA)}", "Content-Encoding": "gzip"})

    with pytest.raises(BackendError, match="gzip"):
        await read(backend(gzipped), make_version(len(DATA), ETAG, None), 0, 10)


class _Pieces(httpx.AsyncByteStream):
    """A body that arrives in pieces of ``size`` bytes (they cross the buffers' edges)."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.size = data, size

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for i in range(0, len(self.data), self.size):
            yield self.data[i : i + self.size]


@pytest.mark.parametrize("piece", [1, 777, 4096, 100000])
async def test_one_get_fills_several_buffers_in_order(piece: int) -> None:
    """Joined read-ahead: one ranged GET, its body split across the blocks' buffers."""
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        start, end = (int(x) for x in request.headers["range"].removeprefix("bytes=").split("-"))
        body = DATA[start : end + 1]
        headers = {"ETag": ETAG, "Content-Range": f"bytes {start}-{end}/{len(DATA)}", "Content-Length": str(len(body))}
        return httpx.Response(206, stream=_Pieces(body, piece), headers=headers)

    b = backend(handler)
    assert b.joins_reads
    sizes = (4096, 4096, 1000)
    bufs = [bytearray(n) for n in sizes]
    await b.read_ranges("m.bin", make_version(len(DATA), ETAG, None), 100, [memoryview(x) for x in bufs])
    assert len(requests) == 1 and requests[0].headers["range"] == f"bytes=100-{100 + sum(sizes) - 1}"
    assert b"".join(bufs) == DATA[100 : 100 + sum(sizes)]


@pytest.mark.parametrize("sent", [8191, 8193])
async def test_a_joined_body_of_the_wrong_length_is_transient(sent: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Range": f"bytes 0-8191/{len(DATA)}", "Content-Length": str(sent)}
        return httpx.Response(206, stream=_Pieces(DATA[:sent], 1000), headers=headers)

    bufs = [memoryview(bytearray(4096)), memoryview(bytearray(4096))]
    with pytest.raises(TransientError):
        await backend(handler).read_ranges("m.bin", make_version(len(DATA), ETAG, None), 0, bufs)


async def test_reads_past_the_pinned_size_are_refused_without_a_request() -> None:
    handler, requests = serve()
    with pytest.raises(BackendError, match="beyond the end"):
        await read(backend(handler), make_version(len(DATA), ETAG, None), len(DATA) - 5, 10)
    assert requests == []


async def test_headers_are_sent_and_never_in_errors() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        return httpx.Response(401)

    b = backend(handler, headers=[f"Authorization: {SECRET}"])
    with pytest.raises(AccessDenied) as info:
        await b.list_objects()
    assert seen and all(value == SECRET for value in seen)
    assert "sup3r" not in str(info.value)


async def test_query_string_is_sent_but_not_shown() -> None:
    handler, requests = serve()
    b = backend(handler, url="https://example.test/models/m.bin?X-Amz-Signature=s3cr3t")
    [info] = await b.list_objects()
    assert "X-Amz-Signature=s3cr3t" in str(requests[0].url)
    assert "s3cr3t" not in b.description
    with pytest.raises(VersionChanged) as exc:
        await read(b, make_version(len(DATA), '"old"', None), 0, 10)
    assert "s3cr3t" not in str(exc.value)
    assert info.size == len(DATA)


async def test_json_index_is_walked_and_html_is_a_clear_error() -> None:
    index = {
        "/models/": b'[{"name":"sub","type":"directory"},{"name":"a.bin","type":"file","size":3},'
        b'{"name":"../x","type":"file"},{"name":"empty","type":"directory"}]',
        "/models/sub/": b'[{"name":"b.bin","type":"file","size":2}]',
        "/models/empty/": b"[]",
    }
    sizes = {"/models/a.bin": 3, "/models/sub/b.bin": 2}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path in index:
            return response(200, index[path], {"Content-Type": "application/json"})
        if request.method == "HEAD" and path in sizes:
            return httpx.Response(
                200, headers={"Content-Length": str(sizes[path]), "ETag": f'"{path}"', "Accept-Ranges": "bytes"}
            )
        return httpx.Response(404)

    listed = await backend(handler, url="https://example.test/models/").list_objects()
    # (files only, as every walk lists them: an empty directory has none)
    assert sorted((o.name, o.size) for o in listed) == [("a.bin", 3), ("sub/b.bin", 2)]

    html = backend(lambda r: response(200, b"<html>index</html>"), url="https://example.test/models/")
    with pytest.raises(BackendError, match="--manifest"):
        await html.list_objects()


@pytest.mark.parametrize("status", [403, 401])
async def test_a_file_of_the_index_refused_is_left_out_of_its_directory(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A file the index lists but the server refuses (nginx: unreadable, still in its autoindex)
    is left out with one warning; the others are listed, and a lookup of it has its own error.
    A transient failure of one HEAD still fails the page (the listing is retried)."""
    index = {"/models/": b'[{"name":"a.bin","type":"file","size":3},{"name":"secret.bin","type":"file","size":5}]'}
    failing = {"status": status}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path in index:
            return response(200, index[path], {"Content-Type": "application/json"})
        if request.method == "HEAD" and path == "/models/a.bin":
            return httpx.Response(200, headers={"Content-Length": "3", "ETag": '"a"', "Accept-Ranges": "bytes"})
        if path == "/models/secret.bin":
            return httpx.Response(failing["status"])
        return httpx.Response(404)

    b = backend(handler, url="https://example.test/models/")
    with caplog.at_level("WARNING", logger="modelfs.backends.http"):
        for _ in range(2):
            page = await b.list_dir("")
            assert [(o.name, o.size) for o in page.objects] == [("a.bin", 3)]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "secret.bin" in warnings[0], warnings
    with pytest.raises(BackendError) as raised:
        await b.stat("secret.bin")
    assert type(raised.value) is AccessDenied
    failing["status"] = 503
    with pytest.raises(TransientError):
        await b.list_dir("")
    failing["status"] = 400  # not a refusal of that file: an answer nothing here can be read with
    with pytest.raises(BackendError):
        await b.list_dir("")


async def test_an_index_of_files_whose_server_ignores_range_is_that_one_line_error() -> None:
    """Only a refused file is left out: a server that ignores Range fails the listing with
    its one line (before: every file was left out, and the mount showed empty directories)."""
    index = {"/models/": b'[{"name":"a.bin","type":"file","size":10240},{"name":"b.bin","type":"file","size":10240}]'}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path in index:
            return response(200, index[path], {"Content-Type": "application/json"})
        if path in ("/models/a.bin", "/models/b.bin"):
            if request.method == "HEAD":
                return httpx.Response(200, headers={"Content-Length": str(len(DATA)), "ETag": ETAG})
            return response(200, DATA, {"ETag": ETAG})  # Range ignored
        return httpx.Response(404)

    with pytest.raises(BackendError, match="does not support Range requests"):
        await backend(handler, url="https://example.test/models/").list_dir("")


async def test_one_directory_of_the_json_index_at_a_time() -> None:
    """list_dir reads one directory's index and HEADs only its files; a probe HEADs nothing;
    a missing subdirectory is an empty page, a missing root an error."""
    index = {
        "/models/": b'[{"name":"sub","type":"directory"},{"name":"a.bin","type":"file","size":3}]',
        "/models/sub/": b'[{"name":"b.bin","type":"file","size":2},{"name":"deeper","type":"directory"}]',
    }
    sizes = {"/models/a.bin": 3, "/models/sub/b.bin": 2}
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        asked.append(f"{request.method} {path}")
        if request.method == "GET" and path in index:
            return response(200, index[path], {"Content-Type": "application/json"})
        if request.method == "HEAD" and path in sizes:
            return httpx.Response(
                200, headers={"Content-Length": str(sizes[path]), "ETag": f'"{path}"', "Accept-Ranges": "bytes"}
            )
        return httpx.Response(404)

    b = backend(handler, url="https://example.test/models/")
    root = await b.list_dir("")
    assert [(o.name, o.size) for o in root.objects] == [("a.bin", 3)] and root.prefixes == ["sub/"]
    assert asked == ["GET /models/", "HEAD /models/a.bin"]
    asked.clear()
    sub = await b.list_dir("sub/")
    assert [o.name for o in sub.objects] == ["sub/b.bin"] and sub.prefixes == ["sub/deeper/"]
    assert sub.next_token is None
    asked.clear()
    probe = await b.list_dir("sub/", limit=1)
    assert [o.name for o in probe.objects] == ["sub/"] and asked == ["GET /models/sub/"]
    assert await b.list_dir("nope/", limit=1) == await b.list_dir("nope/")
    assert not (await b.list_dir("nope/")).objects
    gone = backend(lambda r: httpx.Response(404), url="https://example.test/models/")
    with pytest.raises(NotFound):
        await gone.list_dir("")


async def test_manifest_directories(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With a manifest, a directory is the manifest's names below it; only its files are HEADed."""
    manifest = tmp_path / "files.txt"
    manifest.write_text("config.json\nweights/a.safetensors 4\nweights/b.safetensors\n")
    heads: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        heads.append(request.url.path)
        return httpx.Response(200, headers={"Content-Length": "4", "ETag": '"e"', "Accept-Ranges": "bytes"})

    b = backend(handler, url="https://example.test/m/", manifest=manifest)
    root = await b.list_dir("")
    assert [o.name for o in root.objects] == ["config.json"] and root.prefixes == ["weights/"]
    assert heads == ["/m/config.json"]
    weights = await b.list_dir("weights/")
    assert sorted(o.name for o in weights.objects) == ["weights/a.safetensors", "weights/b.safetensors"]
    assert [o.name for o in (await b.list_dir("weights/", limit=1)).objects] == ["weights/"]
    assert (await b.list_dir("nothing/", limit=1)).objects == []


def test_parse_manifest() -> None:
    text = b"# model\n\nconfig.json\n./weights/model-1.safetensors 123\nname with spaces.bin\nname 12 x\n"
    names, sizes = parse_manifest(text, "m")
    assert list(zip(names, sizes, strict=True)) == [  # (in name order; -1: no size given)
        ("config.json", -1),
        ("name 12 x", -1),
        ("name with spaces.bin", -1),
        ("weights/model-1.safetensors", 123),
    ]
    for bad in ("/abs.bin", "a/../b.bin", "dir/", "a//b"):
        with pytest.raises(ConfigError, match="line 2: not a relative file path"):
            parse_manifest(b"ok.bin\r\n" + bad.encode() + b"\n", "m")
    with pytest.raises(ConfigError):
        parse_manifest(b"# nothing\n", "m")
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse_manifest(b"ok.bin\n\xff.bin\n", "m")


def test_versions_round_trip() -> None:
    assert parse_version(make_version(10, '"e/1"', LM)) == (10, '"e/1"', None)
    assert parse_version(make_version(10, 'W/"e"', LM)) == (10, None, LM)
    assert parse_version(make_version(0, None, None)) == (0, None, None)
