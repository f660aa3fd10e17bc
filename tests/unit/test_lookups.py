"""Every connection by name has its lookup bounded by the connect timeout: a resolver that
does not answer (socket.getaddrinfo blocked in-process for a few .test names) fails the
request as a transient error, never holds it for as long as the resolver likes. The pools'
own lookups are tested in test_connpool.py, S3's in test_s3_backend.py."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import trio

from modelfs.backends.gcs_auth import HttpRequest
from modelfs.backends.http import HTTPBackend
from modelfs.backends.redirects import RedirectPolicy
from modelfs.config import parse_source
from modelfs.errors import TransientError
from modelfs.testing.servers import QuietHandler, loopback_http, serving

from .blocked_lookups import BlockedResolver

DATA = bytes(range(256)) * 4


class _Files(QuietHandler):
    """One file, /m.bin, with a strong ETag; and /token, a token endpoint's JSON."""

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._headers()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b'{"access_token": "t"}' if self.path == "/token" else DATA
        self._headers(len(body))
        self.wfile.write(body)

    def _headers(self, length: int = len(DATA)) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", '"v1"')
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()


@pytest.fixture
def blocked() -> Iterator[BlockedResolver]:
    resolver = BlockedResolver("web-0.test", "models.test", "token-0.test", "token-1.test")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", resolver)
        yield resolver
    resolver.close()


async def test_an_http_sources_listing_fails_at_the_connect_timeout(blocked: BlockedResolver) -> None:
    """httpx on trio already bounds the lookup: httpcore's trio backend wraps
    trio.open_tcp_stream (whose getaddrinfo runs in a thread trio abandons when cancelled) in
    fail_after(connect timeout). Nothing changed for it; this holds it so."""
    with loopback_http(_Files) as url:
        port = url.rsplit(":", 1)[1]
        backend = HTTPBackend(parse_source(f"http://web-0.test:{port}/m.bin"), connect_timeout=0.3, read_timeout=30)
        try:
            with pytest.raises(TransientError, match="timed out"):
                await backend.list_objects()
            assert blocked.calls >= 1 and not blocked.freed_by_watchdog
            blocked.release.set()
            [info] = await backend.list_objects()
            assert (info.name, info.size) == ("m.bin", len(DATA))
        finally:
            await backend.aclose()


async def test_a_redirects_name_check_fails_at_the_connect_timeout(blocked: BlockedResolver) -> None:
    """The redirect policy looks names up (is the source internal? where does the target
    point?) on the trio thread, for a HEAD or a data GET waiting on it: that lookup had no
    bound. It is a transient error at the connect timeout, and is not remembered: once the
    resolver answers, the verdict is made."""
    policy = RedirectPolicy("https://models.test/dir/", cross_origin=True, connect_timeout=0.2)
    current, target = httpx.URL("https://models.test/dir/m.bin"), httpx.URL("https://cdn.example/x")
    with pytest.raises(TransientError, match="resolving models.test took more than 0.2 s"):
        await policy.verdict(current, target, "m.bin")
    assert not blocked.freed_by_watchdog
    blocked.release.set()  # models.test now resolves (to loopback: an internal source)
    verdict = await policy.verdict(current, target, "m.bin")
    assert verdict.same_origin is False and verdict.addresses is None


async def test_a_redirect_policy_given_a_resolver_bounds_it_too(autojump_clock: trio.abc.Clock) -> None:
    async def never(host: str) -> list[str]:
        await trio.sleep_forever()
        raise AssertionError

    policy = RedirectPolicy("https://models.example/", cross_origin=True, resolve=never, connect_timeout=5)
    with trio.fail_after(60):  # (a hang becomes a failure)
        with pytest.raises(TransientError, match="more than 5 s"):
            await policy.verdict(httpx.URL("https://models.example/m"), httpx.URL("https://cdn.example/x"), "m")


def test_a_token_request_fails_at_the_connect_timeout(blocked: BlockedResolver) -> None:
    """google-auth's token refresh and metadata checks go through gcs_auth.HttpRequest, one
    http.client connection per call: its lookup waited as long as the resolver did."""
    from google.auth.exceptions import TransportError

    with loopback_http(_Files) as url:
        port = url.rsplit(":", 1)[1]
        request = HttpRequest(30, connect_timeout=0.2)
        with pytest.raises(TransportError, match="token-0.test"):
            request(f"http://token-0.test:{port}/token")
        assert blocked.calls == 1 and not blocked.freed_by_watchdog
        blocked.release.set()
        answer = request(f"http://token-0.test:{port}/token")
        assert (answer.status, answer.data) == (200, b'{"access_token": "t"}')


def test_a_token_request_checks_the_certificate_for_the_name(
    blocked: BlockedResolver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connected to the address its lookup gave, the TLS check is still the name's:
    token-1.test (resolved to 127.0.0.1, which the certificate names) is refused, localhost
    (named too) is served."""
    from google.auth.exceptions import TransportError

    from modelfs.testing.nginx import make_ca

    blocked.release.set()
    ca, cert, key = make_ca(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    server.daemon_threads = True
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with serving(server):
        port = server.server_address[1]
        request = HttpRequest(30, connect_timeout=5)
        with pytest.raises(TransportError, match="certificate verify failed"):
            request(f"https://token-1.test:{port}/token")
        assert request(f"https://localhost:{port}/token").status == 200


def test_the_gcs_session_bounds_its_lookups_too(blocked: BlockedResolver) -> None:
    """Behind a proxy or with mTLS the GCS backend goes through a requests session (urllib3):
    its connections' lookups are bounded as S3's are."""
    from modelfs.backends.gcs_session import SessionClient

    with loopback_http(_Files) as url:
        port = url.rsplit(":", 1)[1]
        client = SessionClient(f"http://web-0.test:{port}", None, timeout=(0.2, 30))
        try:
            with pytest.raises(OSError):
                client.get_json("/m.bin")
            assert not blocked.freed_by_watchdog
        finally:
            client.close()
