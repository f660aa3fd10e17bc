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
from datetime import datetime
from urllib.parse import quote, urlsplit

from modelfs.backends.base import ListPage, ObjectInfo
from modelfs.backends.body import read_urllib3_body
from modelfs.backends.gcs_media import CheckResponse, MediaTransport, plain_transport_applies
from modelfs.backends.private import gcs_client
from modelfs.backends.responses import Headers, RangeRequest, check_range_response, short_reason
from modelfs.backends.skeleton import ThreadedBackend
from modelfs.backends.tiered import TierTarget, header_pinned
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
_DIR_FIELDS = "items(name,size,updated,generation,crc32c,md5Hash),prefixes,nextPageToken"
_PAGE_SIZE = 1000


# An object stored with Content-Encoding: gzip (gsutil cp -Z) is served as stored, like
# gcsfuse does: its size is the stored size, so its bytes must be the stored bytes. Without
# Accept-Encoding: gzip, GCS (and fake-gcs-server) decompress it and ignore Range. With it,
# a ranged GET gets the stored bytes; each answer's Content-Encoding must then be the stored
# encoding (X-Goog-Stored-Content-Encoding), never a decompressed or recompressed body.
MEDIA_ACCEPT_ENCODING = "gzip"
_MEDIA_ENCODINGS = ("identity", "", "gzip")


def _check_stored_encoding(headers: Headers, what: str) -> None:
    """BackendError unless the body is the object's bytes as stored (not transcoded)."""
    stored = (headers.get("x-goog-stored-content-encoding") or "identity").strip().lower()
    sent = (headers.get("content-encoding") or "identity").strip().lower()
    if stored != sent and not {stored, sent} <= {"identity", ""}:
        raise BackendError(
            f"{what}: stored with Content-Encoding {stored!r} but served as {sent!r}: not the stored bytes"
        )


def _mtime(updated: datetime | None) -> float:
    return updated.timestamp() if updated is not None else 0.0


class GCSBackend(ThreadedBackend):
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

        # One extra thread beyond the GETs so a listing never waits behind a full pipe.
        super().__init__(source, threads=max_concurrency + 1)
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
        base = gcs_client.api_base_url(self._client)
        self._media_base = f"{base.rstrip('/')}/download/storage/v1/b/{quote(source.bucket, safe='')}/o/"
        self._media: MediaTransport | None = None
        if plain_transport_applies(self._media_base):
            self._media = MediaTransport(
                base,
                gcs_client.credentials(self._client),
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_idle=max_concurrency + 1,
            )
            self._media.accept_encoding = MEDIA_ACCEPT_ENCODING

    # --- error classification: the only place that knows google/requests exception types.

    def classify(self, exc: BaseException, what: str, *, reading: bool = False) -> BackendError:
        import requests
        from google.api_core import exceptions as gexc
        from google.auth.exceptions import TransportError

        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, gexc.NotFound):
            if reading:
                return VersionChanged(f"{what}: this version of the object is gone (overwritten or deleted)")
            return NotFound(f"{what}: not found")
        if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized)):
            return AccessDenied(f"{what}: access denied ({exc.code})")
        if isinstance(exc, (gexc.TooManyRequests, gexc.ServerError)):
            return TransientError(f"{what}: HTTP {exc.code}")
        if isinstance(
            exc,
            (requests.RequestException, TransportError, OSError, EOFError, http.client.HTTPException),
        ):
            return TransientError(f"{what}: {short_reason(exc)}")
        return BackendError(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")

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
        except Exception as exc:
            raise self.listing_error(exc) from None

    async def list_objects(self) -> list[ObjectInfo]:
        return await self.run_blocking(self._list)

    def _list_dir(self, prefix: str, token: str | None, limit: int | None) -> ListPage:
        try:
            if self._single is not None:
                return ListPage([self._stat(self._single)] if not prefix else [], [])
            iterator = self._client.list_blobs(
                self._bucket,
                prefix=self._prefix + prefix or None,
                delimiter="/",
                page_token=token,
                max_results=limit,
                page_size=_PAGE_SIZE,  # GCS's own default; some servers send everything otherwise
                fields=_DIR_FIELDS,
                timeout=self._timeout,
                retry=None,
            )
            page = next(iterator.pages)
            objects = [self._to_info(blob) for blob in page]
            prefixes = [p[len(self._prefix) :] for p in page.prefixes]
            next_token = iterator.next_page_token if limit is None else None
            if not prefix and token is None and not objects and not prefixes and self._source.prefix:
                # gs://bucket/path/model.safetensors: one object, shown in a directory of its own.
                blob = self._bucket.get_blob(self._source.prefix, timeout=self._timeout, retry=None)
                if blob is not None:
                    parent, _, name = self._source.prefix.rpartition("/")
                    self._prefix = parent + "/" if parent else ""
                    self._single = name
                    return ListPage([self._to_info(blob)], [])
            return ListPage(objects, prefixes, next_token)
        except Exception as exc:
            raise self.listing_error(exc) from None

    async def list_dir(self, prefix: str, token: str | None = None, *, limit: int | None = None) -> ListPage:
        return await self.run_blocking(self._list_dir, prefix, token, limit)

    def _stat(self, name: str) -> ObjectInfo:
        try:
            blob = self._bucket.get_blob(self._prefix + name, timeout=self._timeout, retry=None)
        except Exception as exc:
            raise self.classify(exc, name) from None
        if blob is None:
            raise NotFound(f"{name}: not found")
        return self._to_info(blob)

    async def stat(self, name: str) -> ObjectInfo:
        return await self.run_blocking(self._stat, name)

    # --- the data path

    def _read(self, name: str, version: str, request: RangeRequest, dest: memoryview) -> None:
        url = f"{self._media_base}{quote(self._prefix + name, safe='')}?alt=media&generation={version}"

        def pinned(headers: Headers) -> None:
            generation = headers.get("x-goog-generation")
            if generation is not None and generation != version:
                raise VersionChanged(f"{request.what}: server sent generation {generation}")
            _check_stored_encoding(headers, request.what)

        def check(status: int, headers: Headers) -> None:
            check_range_response(status, headers, request, pinned=pinned, encodings=_MEDIA_ENCODINGS)

        try:
            if self._media is None:
                self._read_by_session(url, request, check, dest)
            else:
                parts = urlsplit(url)
                self._media.get_into(f"{parts.path}?{parts.query}", request.offset, dest, check)
        except Exception as exc:
            raise self.classify(exc, request.what, reading=True) from None

    def _read_by_session(self, url: str, request: RangeRequest, check: CheckResponse, dest: memoryview) -> None:
        """The same GET through the client's authorized requests session (proxies, mTLS)."""
        headers = {"Range": request.header, "Accept-Encoding": MEDIA_ACCEPT_ENCODING}
        session = gcs_client.authorized_session(self._client)
        resp = session.request("GET", url, headers=headers, stream=True, timeout=self._timeout)
        try:
            check(resp.status_code, resp.headers)
            read_urllib3_body(resp.raw, dest, request.what)
        except BaseException:
            resp.close()
            raise

    def tier_target(self, name: str, version: str) -> TierTarget:
        """The media GET a cache tier serves for ``name`` at ``version`` (--cache-url)."""
        path = f"{urlsplit(self._media_base).path}{quote(self._prefix + name, safe='')}?alt=media&generation={version}"
        return TierTarget(path, {}, header_pinned("x-goog-generation", version, "generation"))

    def abort(self) -> None:
        """The daemon is stopping: end the media GETs blocked in worker threads now."""
        if self._media is not None:
            self._media.abort()

    async def aclose(self) -> None:
        if self._media is not None:
            self._media.close()
        try:
            self._client.close()
        except Exception:  # closing is best effort
            pass
