"""Google Cloud Storage through google-cloud-storage, with a zero-copy media GET.

The client library does auth, listing and metadata. The byte-moving ranged GET goes over
plain kept-alive ``http.client`` connections signed with the client's credentials
(gcs_media.py) and reads the body with ``readinto`` straight into the block's buffer: the
library's download helpers copy each block several times and hold the GIL, and its
authorized session costs ~1.6 ms of CPU per request (see docs/architecture.md for numbers).
Behind a proxy or with mutual TLS the GET uses the client's own session instead.
Every call blocks, so it runs in a trio worker thread on data that nothing else touches.
``STORAGE_EMULATOR_HOST`` and the usual Google credentials are honoured by the client itself.
"""

from __future__ import annotations

import http.client
import logging
import re
from collections.abc import Mapping
from datetime import datetime
from urllib.parse import quote, urlsplit

import trio

from modelfs.backends.base import ObjectInfo
from modelfs.backends.body import read_urllib3_body
from modelfs.backends.gcs_media import MediaTransport, plain_transport_applies
from modelfs.config import Source
from modelfs.errors import (
    AccessDenied,
    BackendError,
    ConfigError,
    NotFound,
    TransientError,
    VersionChanged,
)

__all__ = ["GCSBackend"]

log = logging.getLogger(__name__)

_LIST_FIELDS = "items(name,size,updated,generation,crc32c,md5Hash),nextPageToken"
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


def _short(exc: BaseException) -> str:
    """A one-line reason for a network error: requests nests the useful part deep inside."""
    import requests

    text = str(exc)
    match = _ERRNO_RE.search(text)
    if isinstance(exc, requests.Timeout) or "timed out" in text.lower():
        return "timed out"
    if match:
        return match.group(1).strip().lower()
    return f"{type(exc).__name__}: {text[:200]}"


def _mtime(updated: datetime | None) -> float:
    return updated.timestamp() if updated is not None else 0.0


class GCSBackend:
    """Objects below ``gs://bucket/prefix``; names are relative to the prefix."""

    def __init__(
        self,
        source: Source,
        *,
        anonymous: bool,
        read_timeout: float = 30.0,
        max_concurrency: int = 8,
        connect_timeout: float = 10.0,
    ) -> None:
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud import storage

        self._source = source
        self._prefix = source.prefix + "/" if source.prefix else ""
        self._single: str | None = None  # set when the source names one object, not a prefix
        try:
            self._client = storage.Client.create_anonymous_client() if anonymous else storage.Client()
        except DefaultCredentialsError:
            raise ConfigError(
                "no Google credentials found: set GOOGLE_APPLICATION_CREDENTIALS, run "
                "'gcloud auth application-default login', or pass --anonymous for a public bucket"
            ) from None
        self._bucket = self._client.bucket(source.bucket)
        self._timeout = (connect_timeout, read_timeout)
        base = getattr(self._client, "api_endpoint", None) or self._client._connection.API_BASE_URL
        self._media_base = f"{base.rstrip('/')}/download/storage/v1/b/{quote(source.bucket, safe='')}/o/"
        self._media: MediaTransport | None = None
        if plain_transport_applies(self._media_base):
            self._media = MediaTransport(
                base,
                self._client._credentials,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_idle=max_concurrency + 1,
            )
        # One extra thread beyond the GETs so a listing never waits behind a full pipe.
        self._limiter = trio.CapacityLimiter(max_concurrency + 1)

    @property
    def description(self) -> str:
        return self._source.url

    def object_key(self, name: str) -> str:
        return self._source.object_key(name)

    # --- error classification: the only place that knows google/requests exception types.

    def _classify(self, exc: BaseException, what: str) -> BackendError:
        import requests
        from google.api_core import exceptions as gexc
        from google.auth.exceptions import TransportError

        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, gexc.NotFound):
            return NotFound(f"{what}: not found")
        if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized)):
            return AccessDenied(f"{what}: access denied ({exc.code})")
        if isinstance(exc, (gexc.TooManyRequests, gexc.ServerError, gexc.RequestRangeNotSatisfiable)):
            return TransientError(f"{what}: HTTP {exc.code}")
        if isinstance(exc, (requests.RequestException, TransportError, OSError, ConnectionError)):
            return TransientError(f"{what}: {_short(exc)}")
        return BackendError(f"{what}: {type(exc).__name__}: {exc}")

    # --- listing and metadata

    def _to_info(self, blob: object) -> ObjectInfo:
        name: str = blob.name  # type: ignore[attr-defined]
        return ObjectInfo(
            name=name[len(self._prefix) :],
            size=int(blob.size or 0),  # type: ignore[attr-defined]
            mtime=_mtime(blob.updated),  # type: ignore[attr-defined]
            version=str(blob.generation),  # type: ignore[attr-defined]
            crc32c=blob.crc32c,  # type: ignore[attr-defined]
            md5=blob.md5_hash,  # type: ignore[attr-defined]
        )

    def _list(self) -> list[ObjectInfo]:
        try:
            if self._single is not None:
                try:
                    return [self._stat(self._single)]
                except NotFound:
                    return []
            blobs = self._client.list_blobs(
                self._bucket, prefix=self._prefix or None, fields=_LIST_FIELDS, timeout=self._timeout, retry=None
            )
            found = [self._to_info(b) for b in blobs if b.name != self._prefix]
            if not found and self._source.prefix and self._single is None:
                # gs://bucket/path/model.safetensors: one object, shown in a directory of its own.
                blob = self._bucket.get_blob(self._source.prefix, timeout=self._timeout, retry=None)
                if blob is not None:
                    parent, _, name = self._source.prefix.rpartition("/")
                    self._prefix = parent + "/" if parent else ""
                    self._single = name
                    return [self._to_info(blob)]
            return found
        except NotFound:
            raise
        except Exception as exc:
            err = self._classify(exc, self._source.url)
            if isinstance(err, NotFound):
                raise NotFound(f"{self._source.url}: bucket {self._source.bucket!r} not found") from None
            raise err from None

    async def list_objects(self) -> list[ObjectInfo]:
        return await trio.to_thread.run_sync(self._list, limiter=self._limiter)

    def _stat(self, name: str) -> ObjectInfo:
        try:
            blob = self._bucket.get_blob(self._prefix + name, timeout=self._timeout, retry=None)
        except Exception as exc:
            raise self._classify(exc, name) from None
        if blob is None:
            raise NotFound(f"{name}: not found")
        return self._to_info(blob)

    async def stat(self, name: str) -> ObjectInfo:
        return await trio.to_thread.run_sync(self._stat, name, limiter=self._limiter)

    # --- the data path

    def _read(self, name: str, version: str, offset: int, dest: memoryview) -> None:
        length = len(dest)
        url = f"{self._media_base}{quote(self._prefix + name, safe='')}?alt=media&generation={version}"
        what = f"{name}@{version} [{offset}, +{length}]"
        if self._media is None:
            self._read_by_session(url, what, version, offset, dest)
            return

        def check(status: int, headers: Mapping[str, str]) -> None:
            self._check_response(status, headers, what, version, offset, length)

        parts = urlsplit(url)
        try:
            self._media.get_into(f"{parts.path}?{parts.query}", offset, dest, check)
        except BackendError:
            raise
        except (OSError, EOFError, http.client.HTTPException) as exc:
            raise TransientError(f"{what}: {_short(exc)}") from None
        except Exception as exc:
            raise self._classify(exc, what) from None

    def _read_by_session(self, url: str, what: str, version: str, offset: int, dest: memoryview) -> None:
        """The same GET through the client's authorized requests session (proxies, mTLS)."""
        import requests

        length = len(dest)
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        try:
            resp = self._client._http.request("GET", url, headers=headers, stream=True, timeout=self._timeout)
        except Exception as exc:
            raise self._classify(exc, what) from None
        try:
            self._check_response(resp.status_code, resp.headers, what, version, offset, length)
            read_urllib3_body(resp.raw, dest, what)
        except (requests.RequestException, OSError) as exc:
            resp.close()
            raise TransientError(f"{what}: {_short(exc)}") from None
        except Exception as exc:
            resp.close()
            raise self._classify(exc, what) from None

    @staticmethod
    def _check_response(
        status: int, headers: Mapping[str, str], what: str, version: str, offset: int, length: int
    ) -> None:
        if status == 404:
            raise VersionChanged(f"{what}: this version of the object is gone (overwritten or deleted)")
        if status in (401, 403):
            raise AccessDenied(f"{what}: access denied ({status})")
        if status == 429 or status >= 500 or status == 416:
            raise TransientError(f"{what}: HTTP {status}")
        if status not in (200, 206):
            raise BackendError(f"{what}: unexpected HTTP {status}")
        generation = headers.get("x-goog-generation")
        if generation is not None and generation != version:
            raise VersionChanged(f"{what}: server sent generation {generation}")
        if status == 206:
            match = _CONTENT_RANGE_RE.fullmatch(headers.get("content-range", ""))
            if not match or int(match.group(1)) != offset or int(match.group(2)) != offset + length - 1:
                raise TransientError(f"{what}: wrong Content-Range {headers.get('content-range')!r}")
        content_length = headers.get("content-length")
        if status == 200 and (offset != 0 or (content_length is not None and int(content_length) != length)):
            raise BackendError(f"{what}: the server ignored the Range header")
        if content_length is not None and int(content_length) != length:
            raise TransientError(f"{what}: Content-Length {content_length}, expected {length}")

    async def read_range(self, name: str, version: str, offset: int, dest: memoryview) -> None:
        await trio.to_thread.run_sync(self._read, name, version, offset, dest, limiter=self._limiter)

    async def aclose(self) -> None:
        if self._media is not None:
            self._media.close()
        try:
            self._client.close()
        except Exception:  # closing is best effort
            pass
