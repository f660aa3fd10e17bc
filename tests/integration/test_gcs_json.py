"""The GCS backend's own JSON API and auth transports against fake-gcs-server: names that need
escaping in every request, and a daemon that signs with user credentials refreshed from a
token endpoint on loopback (not anonymous, the path a real deployment takes)."""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from pathlib import Path

import pytest
import trio

from modelfs.backends.gcs import GCSBackend
from modelfs.config import parse_source
from modelfs.errors import NotFound
from modelfs.testing.fakegcs import FakeGCS
from modelfs.testing.gauth import credentials_env, token_server
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
            assert len(first.objects) == 1 and first.next_token is not None  # (a probe may follow it)
            second = await backend.list_dir("we#ird dir+/", first.next_token, limit=1)
            assert len(second.objects) == 1 and second.objects[0].name != first.objects[0].name
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


# --- a daemon with service-account credentials, tokens from an endpoint on loopback


def test_mount_with_service_account_credentials(gcs: FakeGCS, bucket: str, tmp_path: Path) -> None:
    """Not anonymous: google.auth.default() finds the key file, the daemon gets its token
    through its http.client transport (a signed JWT grant, read-only scope), and every byte
    arrives."""
    data = _data("model")
    gcs.upload(bucket, "m/model.bin", data)
    gcs.upload(bucket, "m/sp ace #1.json", b"{}")
    cache = tmp_path / "cache"
    with token_server() as tokens:
        env = credentials_env(gcs.url, tokens, tmp_path / "key.json") | {"HOME": str(tmp_path)}
        with mounted(f"gs://{bucket}/m", tmp_path / "mnt", cache, env=env) as mnt:
            assert sorted(os.listdir(mnt)) == ["model.bin", "sp ace #1.json"]
            assert (mnt / "model.bin").read_bytes() == data
            assert (mnt / "sp ace #1.json").read_bytes() == b"{}"
            maps = Path(f"/proc/{daemon_pid(cache)}/maps").read_text()
        assert tokens.grants == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
        assert tokens.claims()["scope"] == "https://www.googleapis.com/auth/devstorage.read_only"
    # charset_normalizer's compiled modules come with requests: not loaded by this daemon.
    assert "charset_normalizer" not in maps


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate"])
def test_an_encoded_object_reads_as_stored(encoding: str, gcs: FakeGCS, monkeypatch: pytest.MonkeyPatch) -> None:
    """An object stored with Content-Encoding br or deflate (gzip too) is shown as stored: its
    size is the stored size and every range is the stored bytes (before: br and deflate failed
    every read, 'sent a br-encoded body, which was not asked for')."""
    bucket = f"e-{uuid.uuid4().hex[:12]}"
    gcs.create_bucket(bucket)
    stored = random.Random(encoding).randbytes(300_000)  # (the store does not look inside)
    generation = gcs.upload_encoded(bucket, f"m/tokenizer.{encoding}", stored, encoding)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)

    async def check() -> None:
        backend = GCSBackend(parse_source(f"gs://{bucket}/m"), anonymous=True)
        try:
            listed = (await backend.list_dir("")).objects
            assert [(o.name, o.size) for o in listed] == [(f"tokenizer.{encoding}", len(stored))]
            info = await backend.stat(f"tokenizer.{encoding}")
            assert (info.size, info.version) == (len(stored), str(generation))
            rng = random.Random(7)
            for offset, length in [(0, len(stored)), *((rng.randrange(len(stored) - 100), 100) for _ in range(5))]:
                dest = bytearray(length)
                await backend.read_range(info.name, info.version, offset, memoryview(dest))
                assert dest == stored[offset : offset + length], (offset, length)
        finally:
            await backend.aclose()

    trio.run(check)
