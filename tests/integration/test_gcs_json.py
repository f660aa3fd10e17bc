"""The GCS backend's own JSON API and auth transports against fake-gcs-server: names that need
escaping in every request, and a daemon that signs with user credentials refreshed from a
token endpoint on loopback (not anonymous, the path a real deployment takes)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import random
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from modelfs.backends.gcs import GCSBackend
from modelfs.config import parse_source
from modelfs.errors import NotFound
from modelfs.testing.fakegcs import FakeGCS
from modelfs.testing.mounts import daemon_pid, mounted

# Every character that means something in a URL path or query, spaces, non-ASCII, dot runs.
HOSTILE = [
    "per%cent.bin",
    "per%25cent.bin",
    "hash#tag.bin",
    "que?ry=1&x=2.bin",
    "plus+sign.bin",
    "sp ace.bin",
    "ünïcødé ✓.bin",
    "a..b.bin",
    "..x",
    "semi;colon.bin",
    "we#ird dir+/in?side%20.bin",
    "we#ird dir+/..dots",
]


def _data(name: str) -> bytes:
    return random.Random(name).randbytes(1000 + len(name.encode()) * 37)


def test_hostile_names_list_stat_and_read(gcs: FakeGCS, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = f"h-{uuid.uuid4().hex[:12]}"
    gcs.create_bucket(bucket)
    generations = {name: gcs.upload(bucket, f"r #?%/{name}", _data(name)) for name in HOSTILE}
    gcs.upload(bucket, "r #?%x/outside.bin", b"beside the prefix")  # shares the prefix's characters
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    source = parse_source(f"gs://{bucket}/r #?%")  # a gs:// source is taken literally
    assert source.prefix == "r #?%"

    async def check() -> None:
        backend = GCSBackend(source, anonymous=True)
        try:
            root = await backend.list_dir("")
            assert sorted(o.name for o in root.objects) == sorted(n for n in HOSTILE if "/" not in n)
            assert root.prefixes == ["we#ird dir+/"]
            inner = await backend.list_dir("we#ird dir+/")
            assert sorted(o.name for o in inner.objects) == sorted(n for n in HOSTILE if "/" in n)
            first = await backend.list_dir("we#ird dir+/", limit=1)
            assert len(first.objects) == 1 and first.next_token is None
            for name in HOSTILE:
                data = _data(name)
                info = await backend.stat(name)
                assert (info.name, info.size, info.version) == (name, len(data), str(generations[name]))
                dest = bytearray(len(data) - 3)
                await backend.read_range(name, info.version, 3, memoryview(dest))
                assert hashlib.sha256(dest).digest() == hashlib.sha256(data[3:]).digest(), name
            for missing in ("per", "hash", "que", "..", ".", "we#ird dir+"):
                with pytest.raises(NotFound):
                    await backend.stat(missing)
        finally:
            await backend.aclose()

    trio.run(check)


def test_listing_pages_by_token(gcs: FakeGCS, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory of more than one page (1,000 entries) arrives whole, page by page."""
    bucket = f"p-{uuid.uuid4().hex[:12]}"
    gcs.create_bucket(bucket)
    names = {f"d/{i:04d} #.bin" for i in range(1005)} | {f"d/sub{i}/x" for i in range(3)}
    for name in names:
        gcs.upload(bucket, name, b"x")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)

    async def check() -> None:
        backend = GCSBackend(parse_source(f"gs://{bucket}"), anonymous=True)
        try:
            objects: list[str] = []
            prefixes: list[str] = []
            token: str | None = None
            pages = 0
            while True:
                page = await backend.list_dir("d/", token)
                pages += 1
                objects += [o.name for o in page.objects]
                prefixes += page.prefixes
                if page.next_token is None:
                    break
                token = page.next_token
            assert pages >= 2
            assert sorted(objects) == sorted(n for n in names if "sub" not in n)
            # fake-gcs-server repeats every prefix on every page (GCS does not); the namespace
            # keeps one of each.
            assert sorted(set(prefixes)) == [f"d/sub{i}/" for i in range(3)]
            assert sorted(o.name for o in await backend.list_objects()) == sorted(names)
        finally:
            await backend.aclose()

    trio.run(check)


# --- a daemon with user credentials, tokens from an endpoint on loopback


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TokenServer

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        self.server.grants.append(form.get("grant_type", [""])[0])
        self.server.assertions.append(form.get("assertion", [""])[0])
        body = json.dumps({"access_token": f"tok-{len(self.server.grants)}", "expires_in": 3600}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _TokenServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _TokenHandler)
        self.grants: list[str] = []
        self.assertions: list[str] = []


@pytest.fixture
def token_server() -> Iterator[_TokenServer]:
    srv = _TokenServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _service_account_key(token_uri: str) -> dict[str, str]:
    """A service-account key file's contents with a fresh RSA key and our token endpoint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "reader@test-project.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }


def test_mount_with_service_account_credentials(
    gcs: FakeGCS, bucket: str, token_server: _TokenServer, tmp_path: Path
) -> None:
    """Not anonymous: google.auth.default() finds the key file, the daemon gets its token
    through its http.client transport (a signed JWT grant, read-only scope), and every byte
    arrives."""
    data = _data("model")
    gcs.upload(bucket, "m/model.bin", data)
    gcs.upload(bucket, "m/sp ace #1.json", b"{}")
    key = tmp_path / "adc.json"
    key.write_text(json.dumps(_service_account_key(f"http://127.0.0.1:{token_server.server_address[1]}/token")))
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}
    # Another endpoint than Google's, but not an emulator: credentials are used (and sent).
    env |= {"API_ENDPOINT_OVERRIDE": gcs.url, "GOOGLE_APPLICATION_CREDENTIALS": str(key), "HOME": str(tmp_path)}
    cache = tmp_path / "cache"
    with mounted(f"gs://{bucket}/m", tmp_path / "mnt", cache, env=env) as mnt:
        assert sorted(os.listdir(mnt)) == ["model.bin", "sp ace #1.json"]
        assert (mnt / "model.bin").read_bytes() == data
        assert (mnt / "sp ace #1.json").read_bytes() == b"{}"
        maps = Path(f"/proc/{daemon_pid(cache)}/maps").read_text()
    assert token_server.grants == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    claims = token_server.assertions[0].split(".")[1]
    scope = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["scope"]
    assert scope == "https://www.googleapis.com/auth/devstorage.read_only"
    # charset_normalizer's compiled modules come with requests: not loaded by this daemon.
    assert "charset_normalizer" not in maps
