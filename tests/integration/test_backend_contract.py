"""The Backend contract: one set of tests, run against every backend and a real server each.

memory and local need nothing; gs:// runs against fake-gcs-server, http(s):// against nginx
(JSON directory index, and a manifest), s3:// against moto's S3 server with authentication on.
Each test gets a fresh root (bucket, prefix or directory), writes objects through the store's
own API, and checks what the backend reports and the bytes it puts in the caller's buffer.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from modelfs.backends.base import Backend
from modelfs.backends.memory import MemoryBackend
from modelfs.config import Source, parse_source
from modelfs.errors import AccessDenied, BackendError, NotFound, VersionChanged
from modelfs.testing.fakegcs import FakeGCS
from modelfs.testing.nginx import Nginx
from modelfs.testing.s3server import S3Server

BS = 64 * 1024
KINDS = ["memory", "local", "gcs", "gcs-session", "http", "https", "http-manifest", "s3"]


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Harness:
    """One backend kind over one fresh root, and the store-side operations the tests need."""

    kind: str
    make: Callable[[], Backend]  # a backend over the root (a new one each call)
    put: Callable[[str, bytes], None]  # create or replace an object below the root
    delete: Callable[[str], None]
    put_outside: Callable[[str, bytes], None] | None = None  # an object beside the root
    missing_root: Callable[[], Backend] | None = None  # a backend whose root does not exist
    # (backend, name): a backend whose stat and read of ``name`` are refused; ``name`` exists.
    denied: Callable[[bytes], tuple[Backend, str]] | None = None
    opened: list[Backend] = field(default_factory=list)

    def backend(self) -> Backend:
        backend = self.make()
        self.opened.append(backend)
        return backend


def _memory(tmp_path: Path) -> Harness:
    store = MemoryBackend()
    return Harness("memory", lambda: store, lambda name, data: store.put(name, data) and None, store.delete)


def _local(tmp_path: Path) -> Harness:
    from modelfs.backends.local import LocalBackend

    root = tmp_path / "root"
    root.mkdir()

    def put(name: str, data: bytes) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    return Harness(
        "local",
        lambda: LocalBackend(parse_source(f"file://{root}")),
        put,
        lambda name: (root / name).unlink(),
        put_outside=lambda name, data: (tmp_path / name).write_bytes(data),
        missing_root=lambda: LocalBackend(parse_source(f"file://{tmp_path}/missing")),
    )


def _gcs(gcs: FakeGCS, monkeypatch: pytest.MonkeyPatch, *, session: bool = False) -> Harness:
    """``session``: listings, metadata and media GETs through google-auth's requests session,
    the path modelfs takes behind an HTTP(S) proxy or with mutual TLS, instead of its own
    http.client connections."""
    from modelfs.backends.gcs import GCSBackend

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    bucket = f"c-{uuid.uuid4().hex[:12]}"
    gcs.create_bucket(bucket)

    def make() -> GCSBackend:
        backend = GCSBackend(parse_source(f"gs://{bucket}/root"), anonymous=True)
        assert backend._media is not None  # no proxy here: the plain transport is the default
        if session:  # every request through google-auth's requests session
            backend._media.close()
            backend._media = None
            backend._json.close()
            backend._json = backend._session_client()
        return backend

    return Harness(
        "gcs",
        make,
        lambda name, data: gcs.upload(bucket, f"root/{name}", data) and None,
        lambda name: gcs.delete(bucket, f"root/{name}"),
        put_outside=lambda name, data: gcs.upload(bucket, f"rootx/{name}", data) and None,
        missing_root=lambda: GCSBackend(parse_source(f"gs://{bucket}-missing/root"), anonymous=True),
    )


def _http(web: Nginx, tmp_path: Path, *, tls: bool, manifest: bool) -> Harness:
    from modelfs.backends.http import HTTPBackend

    top = f"c-{uuid.uuid4().hex[:12]}"
    names: set[str] = set()
    ca = web.ca_cert if tls else None
    manifest_path = tmp_path / "manifest.txt"

    def make() -> HTTPBackend:
        source = parse_source(web.url(f"{top}/", tls=tls))
        if not manifest:
            return HTTPBackend(source, ca_cert=ca)
        # Sizes on some lines: a manifest may carry them (the server's answer wins).
        lines = [
            f"{name} {(web.root / top / name).stat().st_size}" if i % 2 else name
            for i, name in enumerate(sorted(names))
        ]
        manifest_path.write_text("# made by the contract test\n" + "\n".join(lines) + "\n")
        return HTTPBackend(source, ca_cert=ca, manifest=manifest_path)

    def put(name: str, data: bytes) -> None:
        names.add(name)
        web.put(f"{top}/{name}", data)

    def delete(name: str) -> None:
        (web.root / top / name).unlink()

    def denied(data: bytes) -> tuple[Backend, str]:
        web.put(f"private/{top}/secret.bin", data)
        return HTTPBackend(parse_source(web.url(f"private/{top}/", tls=tls)), ca_cert=ca), "secret.bin"

    return Harness(
        "http",
        make,
        put,
        delete,
        put_outside=lambda name, data: web.put(f"{top}x/{name}", data) and None,
        missing_root=lambda: HTTPBackend(parse_source(web.url(f"{top}-missing/", tls=tls)), ca_cert=ca),
        denied=denied,
    )


def _s3(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> Harness:
    from modelfs.backends.s3 import S3Backend

    for key, value in s3.reader.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"c-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(bucket)

    def denied(data: bytes) -> tuple[Backend, str]:
        s3.put(bucket, "root/denied/secret.bin", data)
        return S3Backend(parse_source(f"s3://{bucket}/root"), endpoint_url=s3.url), "denied/secret.bin"

    return Harness(
        "s3",
        lambda: S3Backend(parse_source(f"s3://{bucket}/root"), endpoint_url=s3.url),
        lambda name, data: s3.put(bucket, f"root/{name}", data) and None,
        lambda name: s3.delete(bucket, f"root/{name}"),
        put_outside=lambda name, data: s3.put(bucket, f"rootx/{name}", data) and None,
        missing_root=lambda: S3Backend(parse_source(f"s3://{bucket}-missing/root"), endpoint_url=s3.url),
        denied=denied,
    )


@pytest.fixture(params=KINDS)
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Harness]:
    kind = request.param
    if kind == "memory":
        harness = _memory(tmp_path)
    elif kind == "local":
        harness = _local(tmp_path)
    elif kind in ("gcs", "gcs-session"):
        harness = _gcs(request.getfixturevalue("gcs"), monkeypatch, session=kind == "gcs-session")
    elif kind in ("http", "https", "http-manifest"):
        harness = _http(request.getfixturevalue("web"), tmp_path, tls=kind == "https", manifest=kind == "http-manifest")
    else:
        harness = _s3(request.getfixturevalue("s3"), monkeypatch)
    harness.kind = kind
    try:
        yield harness
    finally:
        for backend in harness.opened:
            await backend.aclose()


async def _read(backend: Backend, name: str, version: str, offset: int, length: int) -> bytes:
    buf = bytearray(b"\xee" * length)
    await backend.read_range(name, version, offset, memoryview(buf))
    return bytes(buf)


TREE = {
    "config.json": b'{"hidden_size": 64}',
    "empty.bin": b"",
    "one.bin": b"\x7f",
    "sub/deeper/model.safetensors": _data(3 * BS + 123, 1),
    "sub/tokenizer.json": _data(3000, 2),
}


async def test_list(store: Harness) -> None:
    for name, data in TREE.items():
        store.put(name, data)
    if store.put_outside is not None:
        store.put_outside("neighbour.bin", b"not below the root")
    listed = await store.backend().list_objects()
    assert {o.name: o.size for o in listed} == {name: len(data) for name, data in TREE.items()}
    assert all(isinstance(o.version, str) and o.version for o in listed)


async def test_stat_matches_list(store: Harness) -> None:
    for name, data in TREE.items():
        store.put(name, data)
    backend = store.backend()
    listed = {o.name: o for o in await backend.list_objects()}
    for name, data in TREE.items():
        info = await backend.stat(name)
        assert info.name == name
        assert info.size == len(data)
        assert info.version == listed[name].version, name


async def test_ranged_reads_at_the_edges(store: Harness) -> None:
    name = "sub/deeper/model.safetensors"
    data = TREE[name]
    size = len(data)
    store.put(name, data)
    backend = store.backend()
    info = await backend.stat(name)
    v = info.version
    assert await _read(backend, name, v, 0, 1) == data[:1]  # first byte
    assert await _read(backend, name, v, size - 1, 1) == data[-1:]  # last byte
    assert await _read(backend, name, v, 0, size) == data  # exactly the whole object
    assert await _read(backend, name, v, BS - 1, 2) == data[BS - 1 : BS + 1]  # across a block boundary
    last = (size // BS) * BS  # the last block: shorter than a block, ends at the end
    assert await _read(backend, name, v, last, size - last) == data[last:]
    for index in range(size // BS):  # exact block-size reads
        assert await _read(backend, name, v, index * BS, BS) == data[index * BS : (index + 1) * BS], index
    rng = random.Random(7)
    for _ in range(20):
        offset = rng.randrange(size)
        length = rng.randrange(1, size - offset + 1)
        assert await _read(backend, name, v, offset, length) == data[offset : offset + length], (offset, length)
    # A full block asked for where the object has less: an error, never a partly filled buffer.
    with pytest.raises((BackendError, ValueError)):
        await _read(backend, name, v, last, BS)


async def test_small_objects(store: Harness) -> None:
    store.put("one.bin", b"\x7f")
    store.put("config.json", TREE["config.json"])
    backend = store.backend()
    one = await backend.stat("one.bin")
    assert await _read(backend, "one.bin", one.version, 0, 1) == b"\x7f"
    cfg = await backend.stat("config.json")
    assert await _read(backend, "config.json", cfg.version, 5, 6) == TREE["config.json"][5:11]


async def test_pinned_version_of_a_replaced_object(store: Harness) -> None:
    name = "model.bin"
    old, new = _data(2 * BS, 3), _data(2 * BS, 4)  # same size: only the version tells them apart
    store.put(name, old)
    backend = store.backend()
    before = await backend.stat(name)
    assert await _read(backend, name, before.version, BS, 16) == old[BS : BS + 16]
    store.put(name, new)
    with pytest.raises(VersionChanged):
        await _read(backend, name, before.version, 0, BS)
    after = await backend.stat(name)
    assert after.version != before.version
    assert await _read(backend, name, after.version, 0, 2 * BS) == new


async def test_pinned_version_of_a_deleted_object(store: Harness) -> None:
    store.put("gone.bin", _data(5000, 5))
    store.put("stays.bin", b"x")  # keeps a listable root once gone.bin is gone
    backend = store.backend()
    info = await backend.stat("gone.bin")
    store.delete("gone.bin")
    with pytest.raises(VersionChanged):
        await _read(backend, "gone.bin", info.version, 0, 100)
    with pytest.raises(NotFound):
        await backend.stat("gone.bin")


async def test_not_found(store: Harness) -> None:
    store.put("here.bin", b"here")
    backend = store.backend()
    with pytest.raises(NotFound):
        await backend.stat("nope.bin")
    with pytest.raises(NotFound):
        await backend.stat("sub/nope.bin")


# memory has no root that can be missing.
@pytest.mark.parametrize("store", [k for k in KINDS if k != "memory"], indirect=True)
async def test_missing_root(store: Harness) -> None:
    assert store.missing_root is not None
    missing = store.missing_root()
    store.opened.append(missing)
    with pytest.raises(NotFound):
        await missing.list_objects()


# Where the test server can refuse access: nginx's /private/ (a bearer token), moto with IAM on.
# (fake-gcs-server has no auth; local files cannot be denied to root; memory has no auth.)
@pytest.mark.parametrize("store", ["http", "https", "http-manifest", "s3"], indirect=True)
async def test_denied(store: Harness) -> None:
    assert store.denied is not None
    data = _data(3000, 6)
    backend, name = store.denied(data)
    store.opened.append(backend)
    with pytest.raises(AccessDenied):
        await backend.stat(name)
    # A read is refused too (AccessDenied, not a TransientError that would be retried).
    with pytest.raises(AccessDenied):
        await _read(backend, name, _any_version(store.kind, data), 0, 100)


def _any_version(kind: str, data: bytes) -> str:
    """A well-formed version for ``data``: the read must be refused before any version check."""
    import hashlib

    if kind == "s3":
        return f'"{hashlib.md5(data).hexdigest()}"'
    return f'{len(data)}/"0-0"'


async def test_descriptions_and_keys(store: Harness) -> None:
    backend = store.backend()
    assert backend.description
    assert backend.object_key("a/b.bin") != backend.object_key("a/c.bin")
    assert backend.object_key("a/b.bin").endswith("a/b.bin")


async def test_concurrent_reads_fill_their_own_buffers(store: Harness) -> None:
    data = _data(4 * BS, 8)
    store.put("c.bin", data)
    backend = store.backend()
    info = await backend.stat("c.bin")
    results: dict[int, bytes] = {}

    async def one(index: int) -> None:
        results[index] = await _read(backend, "c.bin", info.version, index * BS, BS)

    async with trio.open_nursery() as nursery:
        for index in range(4):
            nursery.start_soon(one, index)
    assert b"".join(results[i] for i in range(4)) == data


def test_sources_parse() -> None:
    """The SOURCE forms each backend is opened from."""
    assert parse_source("s3://bucket/a/b/") == Source("s3", "bucket", "a/b", "s3://bucket/a/b/")
    single = parse_source("https://h:8443/models/my%20m.bin?sig=abc")
    assert (single.scheme, single.bucket, single.prefix, single.file) == ("https", "h:8443", "models", "my m.bin")
    assert single.url == "https://h:8443/models/my%20m.bin" and single.query == "sig=abc"
    assert "sig=abc" not in repr(single)
    directory = parse_source("http://h/models/")
    assert (directory.prefix, directory.file) == ("models", "")
