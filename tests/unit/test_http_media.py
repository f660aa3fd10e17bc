"""The HTTP backend's data GETs on http.client (backends/http_media.py), against loopback
servers: bytes into several buffers, redirects by the policy (headers only to the source's
origin), short and long bodies, and a stop that ends a GET the server never finishes."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import trio

from modelfs.backends.http_media import HTTPMedia
from modelfs.backends.redirects import RedirectPolicy, Verdict
from modelfs.backends.responses import Headers, RangeRequest, check_range_response
from modelfs.errors import BackendError, TransientError

DATA = bytes(range(256)) * 4096  # 1 MiB
Reply = Callable[[BaseHTTPRequestHandler], None]


@contextmanager
def server(reply: Reply) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A loopback HTTP/1.1 server answering every GET with ``reply``; the requests' headers."""
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append({k.lower(): v for k, v in self.headers.items()} | {":path": self.path})
            reply(self)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def ranged(handler: BaseHTTPRequestHandler, *, extra: bytes = b"", short: int = 0) -> None:
    """A 206 of the asked range (``short`` bytes fewer sent; ``extra`` sent after, unannounced)."""
    first, last = (int(x) for x in handler.headers["Range"].removeprefix("bytes=").split("-"))
    body = DATA[first : last + 1]
    handler.send_response(206)
    handler.send_header("Content-Range", f"bytes {first}-{last}/{len(DATA)}")
    if extra:
        handler.send_header("Connection", "close")  # the body's end is the connection's
    else:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body[: len(body) - short] + extra)
    handler.wfile.flush()
    if short:
        handler.close_connection = True


def redirect_to(location: str) -> Reply:
    def reply(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return reply


_made: list[HTTPMedia] = []


@pytest.fixture(autouse=True)
def _close_connections() -> Iterator[None]:
    yield
    while _made:
        _made.pop().close()


def media(source: str, *, cross_origin: bool = False) -> HTTPMedia:
    m = HTTPMedia(
        ssl_context=None,
        connect_timeout=5,
        read_timeout=30,
        max_idle=4,
        headers={"User-Agent": "test"},
        user_headers=[("X-Api-Key", "k3y")],
        redirects=RedirectPolicy(source, cross_origin=cross_origin),
    )
    _made.append(m)
    return m


async def get(m: HTTPMedia, url: str, offset: int, sizes: list[int]) -> bytes:
    request = RangeRequest("m.bin", offset, sum(sizes), len(DATA))

    def check(status: int, headers: Headers) -> None:
        check_range_response(status, headers, request)

    bufs = [bytearray(n) for n in sizes]
    sums: list[int] = []
    await trio.to_thread.run_sync(
        m.get_into, url, {"Range": request.header}, [memoryview(b) for b in bufs], check, "m.bin", sums
    )
    return b"".join(bufs)


async def test_one_get_into_several_buffers_on_a_kept_alive_connection() -> None:
    with server(ranged) as (url, seen):
        m = media(url)
        assert await get(m, f"{url}/m.bin", 1000, [300_000, 300_000, 7]) == DATA[1000:601_007]
        assert await get(m, f"{url}/m.bin", 0, [10]) == DATA[:10]
        assert [r[":path"] for r in seen] == ["/m.bin", "/m.bin"]
        assert seen[0]["range"] == "bytes=1000-601006" and seen[0]["x-api-key"] == "k3y"
        assert len(m._pools) == 1 and len(next(iter(m._pools.values())).idle) == 1  # reused


async def test_same_origin_redirect_keeps_the_headers() -> None:
    def reply(handler: BaseHTTPRequestHandler) -> None:
        if handler.path == "/old/m.bin":
            redirect_to("/new/m.bin")(handler)
        else:
            ranged(handler)

    with server(reply) as (url, seen):
        assert await get(media(url), f"{url}/old/m.bin", 5, [100]) == DATA[5:105]
        assert [(r[":path"], r.get("x-api-key")) for r in seen] == [("/old/m.bin", "k3y"), ("/new/m.bin", "k3y")]


async def test_a_redirect_to_an_odd_path_is_percent_encoded() -> None:
    def reply(handler: BaseHTTPRequestHandler) -> None:
        if handler.path == "/m.bin":
            redirect_to("/a dir/ü?x=1 2")(handler)
        else:
            ranged(handler)

    with server(reply) as (url, seen):
        assert await get(media(url), f"{url}/m.bin", 3, [30]) == DATA[3:33]
        assert seen[-1][":path"] == "/a%20dir/%C3%BC?x=1%202"


async def test_cross_origin_redirects_need_the_option_and_get_no_headers() -> None:
    with server(ranged) as (store, store_seen), server(lambda h: None) as (_, _seen):
        with server(redirect_to(f"{store}/m.bin")) as (source, source_seen):
            with pytest.raises(BackendError, match="another origin"):
                await get(media(source), f"{source}/m.bin", 0, [10])
            assert store_seen == []
            assert await get(media(source, cross_origin=True), f"{source}/m.bin", 7, [50]) == DATA[7:57]
            assert source_seen[-1]["x-api-key"] == "k3y" and "x-api-key" not in store_seen[-1]


async def test_https_never_redirects_to_plain_http() -> None:
    policy = RedirectPolicy("https://example.test/", cross_origin=True)
    with pytest.raises(BackendError, match="https to plain http"):
        await policy.verdict(httpx.URL("https://example.test/m"), httpx.URL("http://example.test/m"), "m")


async def test_a_short_body_and_a_longer_one_fail() -> None:
    with server(lambda h: ranged(h, short=10)) as (url, _):
        with pytest.raises(EOFError):
            await get(media(url), f"{url}/m.bin", 0, [4096, 4096])
    with server(lambda h: ranged(h, extra=b"x" * 100)) as (url, _):
        with pytest.raises(TransientError, match="more than"):
            await get(media(url), f"{url}/m.bin", 0, [4096])


async def test_a_wrong_range_is_refused_by_the_check() -> None:
    def wrong(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes 1-10/{len(DATA)}")
        handler.send_header("Content-Length", "10")
        handler.end_headers()
        handler.wfile.write(DATA[1:11])

    with server(wrong) as (url, _):
        with pytest.raises(TransientError, match="Content-Range"):
            await get(media(url), f"{url}/m.bin", 0, [10])


def _timed_out(error: BaseException) -> bool:
    """Whether ``error``, or one it was raised while handling, is a read timeout."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, TimeoutError):
            return True
        cause = cause.__context__
    return False


def stalling(started: threading.Event, release: threading.Event) -> Reply:
    """A 206 of 100 bytes that sends 10, sets ``started`` and holds the connection until ``release``."""

    def stall(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes 0-99/{len(DATA)}")
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        handler.wfile.write(DATA[:10])
        handler.wfile.flush()
        started.set()
        release.wait(60)

    return stall


async def test_abort_ends_a_get_the_server_never_finishes() -> None:
    started = threading.Event()
    release = threading.Event()
    stall = stalling(started, release)
    with server(stall) as (url, _):
        m = media(url)
        try:
            async with trio.open_nursery() as nursery:
                failed: list[BaseException] = []

                async def reader() -> None:
                    try:
                        await get(m, f"{url}/m.bin", 0, [100])
                    except (OSError, EOFError) as exc:
                        failed.append(exc)

                nursery.start_soon(reader)
                await trio.to_thread.run_sync(started.wait, 60)
                m.abort()
            assert len(failed) == 1
            assert not _timed_out(failed[0])  # ended by the stop, not by the read timeout
            with pytest.raises(ConnectionAbortedError):  # no new GET once stopping
                await get(m, f"{url}/m.bin", 0, [10])
        finally:
            release.set()


async def test_abort_ends_a_get_on_a_pool_no_longer_kept() -> None:
    """A GET to a checked redirect target whose pool was dropped meanwhile (more answer sets
    than are kept) is still ended by a stop."""
    started = threading.Event()
    release = threading.Event()
    stall = stalling(started, release)
    with server(stall) as (store, _):
        port = store.rsplit(":", 1)[1]
        with server(redirect_to(f"http://rebind.invalid:{port}/m.bin")) as (source, _):
            m = media(source, cross_origin=True)
            m._redirects = _PinningPolicy(source, cross_origin=True)
            try:
                failed: list[BaseException] = []
                async with trio.open_nursery() as nursery:

                    async def reader() -> None:
                        try:
                            await get(m, f"{source}/m.bin", 0, [100])
                        except (OSError, EOFError) as exc:
                            failed.append(exc)

                    nursery.start_soon(reader)
                    await trio.to_thread.run_sync(started.wait, 60)
                    for i in range(40):  # other answer sets push the stalled GET's pool out
                        m._pool("http", "cdn.example", 80, (f"198.51.100.{i}",))
                    assert ("http", "rebind.invalid", int(port), ("127.0.0.1",)) not in m._pools
                    m.abort()
                assert len(failed) == 1 and not _timed_out(failed[0])
            finally:
                release.set()


class _PinningPolicy(RedirectPolicy):
    """A policy that checked the redirect target at 127.0.0.1 (whatever its name resolves to)."""

    async def verdict(self, current: httpx.URL, target: httpx.URL, what: str) -> Verdict:
        return Verdict(False, ("127.0.0.1",))


async def test_a_checked_target_is_reached_at_the_checked_address() -> None:
    """No second resolution of the target's name: ``rebind.invalid`` resolves nowhere, the GET
    goes to the address the policy checked, with the name in its Host header."""
    with server(ranged) as (store, store_seen):
        port = store.rsplit(":", 1)[1]
        with server(redirect_to(f"http://rebind.invalid:{port}/m.bin")) as (source, _):
            m = media(source, cross_origin=True)
            m._redirects = _PinningPolicy(source, cross_origin=True)
            assert await get(m, f"{source}/m.bin", 9, [99]) == DATA[9:108]
    assert store_seen[-1]["host"] == f"rebind.invalid:{port}" and "x-api-key" not in store_seen[-1]


async def test_a_target_whose_name_did_not_resolve_is_not_fetched() -> None:
    class Unresolved(RedirectPolicy):
        async def verdict(self, current: httpx.URL, target: httpx.URL, what: str) -> Verdict:
            return Verdict(False, ())

    with server(ranged) as (store, store_seen):
        with server(redirect_to(f"{store}/m.bin")) as (source, _):
            m = media(source, cross_origin=True)
            m._redirects = Unresolved(source, cross_origin=True)
            with pytest.raises(OSError, match="does not resolve"):
                await get(m, f"{source}/m.bin", 0, [10])
    assert store_seen == []


async def test_a_redirect_where_a_proxy_applies_goes_through_httpx_and_the_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The source is reached directly (NO_PROXY), its redirect target only through the proxy:
    http.client would connect to the target directly, so that GET is made by httpx."""
    from modelfs.backends.http import HTTPBackend, make_version
    from modelfs.config import parse_source

    def proxy_reply(handler: BaseHTTPRequestHandler) -> None:
        ranged(handler)  # a forward proxy that answers for the store (enough to see it was asked)

    with server(ranged) as (store, store_seen), server(proxy_reply) as (proxy, proxy_seen):
        port = store.rsplit(":", 1)[1]
        with server(redirect_to(f"http://localhost:{port}/m.bin")) as (source, source_seen):
            monkeypatch.setenv("http_proxy", proxy)
            monkeypatch.setenv("no_proxy", "127.0.0.1")
            backend = HTTPBackend(parse_source(f"{source}/m.bin"), cross_origin_redirects=True)
            try:
                assert backend._media is not None  # the source itself is not proxied
                dest = bytearray(100)
                await backend.read_range("m.bin", make_version(len(DATA), None, "x"), 0, memoryview(dest))
            finally:
                await backend.aclose()
    assert bytes(dest) == DATA[:100]
    assert store_seen == [] and proxy_seen[-1][":path"] == f"http://localhost:{port}/m.bin"
    assert len(source_seen) == 2  # the data path's try, then httpx's GET


async def test_an_international_name_is_sent_as_httpx_encodes_it() -> None:
    """IDNA 2008 (punycode of ß), as the backend's httpx requests name the host, not the older
    IDNA 2003 mapping (ß → ss) Python's socket layer would apply: another domain."""
    with server(ranged) as (store, store_seen):
        port = store.rsplit(":", 1)[1]
        with server(redirect_to(f"http://straße.invalid:{port}/m.bin")) as (source, _):
            m = media(source, cross_origin=True)
            m._redirects = _PinningPolicy(source, cross_origin=True)
            assert await get(m, f"{source}/m.bin", 0, [10]) == DATA[:10]
    assert store_seen[-1]["host"] == f"xn--strae-oqa.invalid:{port}"


def test_pools_of_checked_addresses_are_one_per_answer_set_least_recently_used_go() -> None:
    m = media("http://127.0.0.1:1/")
    a = m._pool("http", "cdn.example", 80, ("192.0.2.1", "192.0.2.2"))
    assert m._pool("http", "cdn.example", 80, ("192.0.2.2", "192.0.2.1")) is a  # same answers, other order
    for i in range(40):
        m._pool("http", "cdn.example", 80, (f"198.51.100.{i}",))
        m._pool("http", "cdn.example", 80, ("192.0.2.2", "192.0.2.1"))  # a stays in use
    pinned = [key for key in m._pools if key[3] is not None]
    assert len(pinned) == 32 and ("http", "cdn.example", 80, ("192.0.2.1", "192.0.2.2")) in m._pools


async def test_lookups_do_not_wait_behind_data_gets_the_server_holds() -> None:
    """With --max-concurrency GETs in flight on a stalled server, a HEAD (lookup, open) still
    gets through: HEADs have their own limit, not the GET threads'."""
    from modelfs.backends.http import HTTPBackend, make_version
    from modelfs.config import parse_source

    release = threading.Event()
    holding = threading.Semaphore(0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", '"e1"')
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            holding.release()
            release.wait(60)
            ranged(self)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/m.bin"
    backend = HTTPBackend(parse_source(url), max_concurrency=2)
    version = make_version(len(DATA), '"e1"', None)
    try:
        async with trio.open_nursery() as nursery:
            for offset in (0, 4096):
                nursery.start_soon(backend.read_range, "m.bin", version, offset, memoryview(bytearray(100)))
            for _ in range(2):
                await trio.to_thread.run_sync(holding.acquire)
            with trio.fail_after(30):  # (a bound that turns a hang into a failure)
                info = await backend.stat("m.bin")
            assert info.size == len(DATA) and not release.is_set()
            release.set()
    finally:
        release.set()
        await backend.aclose()
        httpd.shutdown()
        httpd.server_close()


async def test_a_listing_heads_its_files_on_kept_alive_connections() -> None:
    """Each file of a listing is HEADed on a connection of the pool, not a new one: an answer
    closed unread closed its connection, so a directory of N files cost N connections (N TLS
    handshakes over https; a 30,000-file listing took 3 times as long)."""
    from modelfs.backends.http import HTTPBackend
    from modelfs.config import parse_source

    files = 40
    connections: set[tuple[str, int]] = set()
    heads: list[str] = []
    index = json.dumps(
        [
            {"name": f"f{i:02d}.bin", "type": "file", "mtime": "Wed, 01 Jan 2025 00:00:00 GMT", "size": 1}
            for i in range(files)
        ]
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            connections.add(self.client_address)
            heads.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "1")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{self.path}"')
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(index)))
            self.end_headers()
            self.wfile.write(index)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    backend = HTTPBackend(parse_source(f"http://127.0.0.1:{httpd.server_address[1]}/d/"), max_concurrency=2)
    try:
        with trio.fail_after(30):  # (a bound that turns a hang into a failure)
            page = await backend.list_dir("")
        assert sorted(info.name for info in page.objects) == [f"f{i:02d}.bin" for i in range(files)]
        assert len(heads) == files
        # At most one connection per HEAD in flight (the pool's, as many as the HEAD limit).
        assert len(connections) <= 2, f"{len(connections)} connections for {files} HEADs"
    finally:
        await backend.aclose()
        httpd.shutdown()
        httpd.server_close()


def _head_server(seen: list[dict[str, str]], *, redirect: str | None = None) -> ThreadingHTTPServer:
    """Answers HEAD with the object's size and ETag (or a 302 to ``redirect``); records headers."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            seen.append({k.lower(): v for k, v in self.headers.items()})
            if redirect is not None:
                self.send_response(302)
                self.send_header("Location", redirect)
                self.send_header("Content-Length", "0")
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(DATA)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", '"e1"')
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


async def test_a_lookup_redirected_to_a_checked_target_reaches_the_checked_address() -> None:
    """The HEAD of a lookup (httpx) follows a plain-http redirect to the addresses the policy
    checked, as the data GETs do: ``pinned.invalid`` is not resolved again (it resolves
    nowhere), and the name stays in Host."""
    from modelfs.backends.http import HTTPBackend
    from modelfs.config import parse_source

    store_seen: list[dict[str, str]] = []
    store = _head_server(store_seen)
    port = store.server_address[1]
    source = _head_server([], redirect=f"http://pinned.invalid:{port}/m.bin")
    backend = HTTPBackend(
        parse_source(f"http://127.0.0.1:{source.server_address[1]}/m.bin"), cross_origin_redirects=True
    )
    backend._redirects = _PinningPolicy(backend._base, cross_origin=True)
    try:
        info = await backend.stat("m.bin")
    finally:
        await backend.aclose()
        for httpd in (store, source):
            httpd.shutdown()
            httpd.server_close()
    assert info.size == len(DATA)
    assert store_seen[-1]["host"] == f"pinned.invalid:{port}"


async def test_a_lookup_answered_with_interim_answers_forever_fails_not_waits() -> None:
    """httpx skips ``100 Continue`` answers without end, each within its read timeout: the
    HEAD of a lookup is bounded as a whole (connect + read timeout), then retried/failed."""
    from modelfs.backends.http import HTTPBackend
    from modelfs.config import parse_source

    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for _ in range(100):  # 10 s of interim answers, then the real one
                if stop.wait(0.1):
                    return
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 10\r\nAccept-Ranges: bytes\r\nETag: "e"\r\n\r\n')

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/m.bin"
    backend = HTTPBackend(parse_source(url), read_timeout=0.5, connect_timeout=0.5)
    try:
        with pytest.raises(TransientError, match="timed out"):
            await backend.stat("m.bin")
    finally:
        stop.set()
        await backend.aclose()
        thread.join(10)
        listener.close()
