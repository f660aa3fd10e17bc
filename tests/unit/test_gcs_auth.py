"""The GCS backend's own HTTP pieces, against real HTTP servers on loopback: google-auth's token
refresh on http.client (gcs_auth), the JSON API GETs (gcs_json), how their failures are
classified, and that a GCS daemon imports neither requests nor google-cloud-storage."""

from __future__ import annotations

import gzip
import http.server
import json
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.backends.gcs_auth import HttpRequest, Signer, api_base_url
from modelfs.backends.gcs_json import MAX_BODY, JsonApi, StatusError, object_path, query
from modelfs.backends.gcs_scan import parse_object
from modelfs.errors import AccessDenied, BackendError, NotFound, TransientError
from modelfs.testing.servers import serving


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        """A token endpoint: each refresh-token grant gets the next access token."""
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        self.server.grants.append({k: v[0] for k, v in form.items()})
        if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != ["the-refresh-token"]:
            self._send(400, b'{"error": "invalid_grant", "error_description": "Bad Request"}')
            return
        self.server.issued += 1
        token = {"access_token": f"token-{self.server.issued}", "expires_in": 3600, "token_type": "Bearer"}
        self._send(200, json.dumps(token).encode(), {"Content-Type": "application/json"})

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        self.server.auth.append(self.headers.get("Authorization"))
        if self.server.want_token and self.headers.get("Authorization") != self.server.want_token:
            self._send(401, b'{"error": {"code": 401}}')
            return
        status, body, headers = self.server.answer
        self._send(status, body, headers)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.grants: list[dict[str, str]] = []
        self.issued = 0
        self.paths: list[str] = []
        self.auth: list[str | None] = []
        self.want_token: str | None = None
        self.answer: tuple[int, bytes, dict[str, str]] = (200, b'{"items": []}', {})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server() -> Iterator[_Server]:
    with serving(_Server()) as srv:
        yield srv


def _user_credentials(server: _Server) -> object:
    from google.oauth2.credentials import Credentials

    return Credentials(  # type: ignore[no-untyped-call]
        token=None,
        refresh_token="the-refresh-token",
        token_uri=f"{server.url}/token",
        client_id="client",
        client_secret="secret",
    )


# --- the token-refresh transport


def test_request_answers_status_headers_and_body(server: _Server) -> None:
    server.answer = (207, b"the body", {"X-Mixed-Case": "v"})
    resp = HttpRequest()(f"{server.url}/p?q=1", headers={"A": "b"}, timeout=5)
    assert (resp.status, resp.data, resp.headers["x-mixed-case"]) == (207, b"the body", "v")
    assert server.paths == ["/p?q=1"]


def test_request_failure_is_googles_transport_error() -> None:
    from google.auth.exceptions import TransportError

    with pytest.raises(TransportError):
        HttpRequest()("http://127.0.0.1:9/nothing-listens", timeout=5)
    with pytest.raises(TransportError):
        HttpRequest()("ftp://127.0.0.1/x")


def test_refresh_token_grant_through_http_client(server: _Server) -> None:
    """google-auth's own refresh code (user credentials) runs on our transport."""
    signer = Signer(_user_credentials(server))
    headers: dict[str, str] = {}
    signer.sign("GET", f"{server.url}/o", headers)
    assert headers["authorization"] == "Bearer token-1"
    assert server.grants[0]["grant_type"] == "refresh_token" and server.grants[0]["client_id"] == "client"
    signer.sign("GET", f"{server.url}/o", headers)  # still valid: no second grant
    assert server.issued == 1
    signer.sign("GET", f"{server.url}/o", headers, force_refresh=True)
    assert headers["authorization"] == "Bearer token-2"


def test_refused_refresh_token_is_access_denied(
    server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from google.oauth2.credentials import Credentials

    from modelfs.backends.gcs import GCSBackend
    from modelfs.config import parse_source

    credentials = Credentials(  # type: ignore[no-untyped-call]
        token=None, refresh_token="revoked", token_uri=f"{server.url}/token", client_id="c", client_secret="s"
    )
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    backend = GCSBackend(parse_source("gs://some-bucket"), anonymous=True)
    api = JsonApi(server.url, Signer(credentials), connect_timeout=5, read_timeout=5, max_idle=1)
    try:
        with pytest.raises(Exception) as caught:
            api.get_json("/storage/v1/b/x/o")
        error = backend.classify(caught.value, "gs://some-bucket")
    finally:
        api.close()
    assert isinstance(error, AccessDenied), error
    assert server.paths == []  # nothing was sent unsigned


# --- the JSON API transport


def test_json_get_refreshes_once_on_401(server: _Server) -> None:
    server.want_token = "Bearer token-2"  # the first token is already revoked
    api = JsonApi(server.url, Signer(_user_credentials(server)), connect_timeout=5, read_timeout=5, max_idle=2)
    try:
        assert api.get_json("/storage/v1/b/x/o") == b'{"items": []}'
    finally:
        api.close()
    assert server.auth == ["Bearer token-1", "Bearer token-2"]


def test_json_get_statuses_and_bodies(server: _Server) -> None:
    api = JsonApi(server.url, Signer(None), connect_timeout=5, read_timeout=5, max_idle=2)
    try:
        server.answer = (200, gzip.compress(b'{"a": 1}'), {"Content-Encoding": "gzip"})
        assert api.get_json("/x") == b'{"a": 1}'
        server.answer = (404, b'{"error": {}}', {})
        with pytest.raises(StatusError) as caught:
            api.get_json("/x")
        assert caught.value.status == 404
        server.answer = (200, b"[1, 2]", {})
        with pytest.raises(BackendError, match="not a JSON object"):
            parse_object(api.get_json("/x"))
        server.answer = (200, b"<html>", {})
        with pytest.raises(BackendError, match="not JSON"):
            parse_object(api.get_json("/x"))
        server.answer = (200, gzip.compress(b" " * (MAX_BODY + 10)), {"Content-Encoding": "gzip"})
        with pytest.raises(BackendError, match="larger than"):
            api.get_json("/x")
        server.answer = (200, b'{"ok": true}', {})
        assert parse_object(api.get_json("/x")) == parse_object(
            b'{"ok": true}'
        )  # the pool still works after every failure
    finally:
        api.close()
    assert server.auth == [None] * 6  # anonymous: no Authorization at all


@pytest.mark.parametrize(
    ("status", "listing", "expected"),
    [
        (404, False, NotFound),
        (403, False, AccessDenied),
        (401, False, AccessDenied),
        (429, False, TransientError),
        (503, False, TransientError),
        (400, False, BackendError),
    ],
)
def test_statuses_map_to_errors(
    status: int, listing: bool, expected: type[BackendError], monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelfs.backends.gcs import GCSBackend
    from modelfs.config import parse_source

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    backend = GCSBackend(parse_source("gs://some-bucket/p"), anonymous=True)
    error = backend.classify(StatusError(status, "x"), "name")
    assert type(error) is expected, error
    bucket = backend.listing_error(StatusError(404, "Not Found"))
    assert isinstance(bucket, NotFound) and "bucket 'some-bucket' not found" in str(bucket)
    assert isinstance(backend.classify(ConnectionResetError(104, "reset"), "n"), TransientError)


# --- names and endpoints


def test_names_are_escaped_whole() -> None:
    assert object_path("b") == "/storage/v1/b/b/o"
    assert object_path("b", "a/b c%d#e?f+g&h=ü") == "/storage/v1/b/b/o/a%2Fb%20c%25d%23e%3Ff%2Bg%26h%3D%C3%BC"
    assert object_path("b", "..") == "/storage/v1/b/b/o/%2E%2E"
    assert object_path("b", ".") == "/storage/v1/b/b/o/%2E"
    assert object_path("b", "../x") == "/storage/v1/b/b/o/..%2Fx"
    assert query({"prefix": "a b+c/#?&=", "pageToken": None, "maxResults": 1}) == (
        "?prefix=a%20b%2Bc%2F%23%3F%26%3D&maxResults=1"
    )
    assert query({"pageToken": None}) == ""


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "https://storage.googleapis.com"),
        ({"STORAGE_EMULATOR_HOST": "http://127.0.0.1:4443/"}, "http://127.0.0.1:4443"),
        ({"STORAGE_EMULATOR_HOST": "127.0.0.1:4443"}, "http://127.0.0.1:4443"),
        ({"API_ENDPOINT_OVERRIDE": "https://storage.example.com"}, "https://storage.example.com"),
    ],
)
def test_endpoint(env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STORAGE_EMULATOR_HOST", "API_ENDPOINT_OVERRIDE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert api_base_url() == expected


# --- what a GCS daemon imports

_IMPORT_CHECK = """
import json, os, sys
import modelfs.cli, modelfs.mount
from modelfs.config import parse_source
from modelfs.backends.gcs import GCSBackend
from modelfs.backends.gcs_auth import load_credentials

GCSBackend(parse_source("gs://some-bucket/p"), anonymous=True)
os.environ.pop("STORAGE_EMULATOR_HOST")
load_credentials(False)  # user credentials from GOOGLE_APPLICATION_CREDENTIALS
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("requests", "urllib3", "charset_normalizer")
                        or m.startswith(("google.cloud", "google.api_core", "google.auth.transport.requests")))))
"""


def test_a_gcs_daemon_imports_no_requests_nor_google_cloud_storage(tmp_path: Path) -> None:
    key = tmp_path / "adc.json"
    key.write_text(
        json.dumps({"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r"})
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9",
        "GOOGLE_APPLICATION_CREDENTIALS": str(key),
    }
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(out.stdout) == []
