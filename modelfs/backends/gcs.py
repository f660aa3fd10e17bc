"""Google Cloud Storage over the JSON API, on plain ``http.client`` connections.

Listings and object metadata are GETs of the JSON API (gcs_json.py); the byte-moving ranged
GET reads its body with ``readinto`` straight into the block's buffer (gcs_media.py). Both
are signed with google-auth credentials through a token-refresh transport on ``http.client``
(gcs_auth.py): neither google-cloud-storage nor requests is imported, which keeps a third of
the daemon's fixed memory out of it (docs/operations.md, "Memory"). Behind a proxy or with
mutual TLS every request goes through google-auth's requests session instead
(gcs_session.py). Every call blocks, so it runs in a trio worker thread on data that nothing
else touches. ``STORAGE_EMULATOR_HOST`` and the usual Google credentials are honoured
(gcs_auth.api_base_url, load_credentials).
"""

from __future__ import annotations

import http.client
import logging
import ssl
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING
from urllib.parse import quote

from modelfs.backends import answers
from modelfs.backends.answers import AnswerBudget, Cost
from modelfs.backends.base import ListPage, ObjectInfo
from modelfs.backends.gcs_auth import Signer, api_base_url, load_credentials
from modelfs.backends.gcs_json import JsonApi, JsonClient, StatusError, object_path, query
from modelfs.backends.gcs_media import MediaTransport, plain_transport_applies
from modelfs.backends.gcs_scan import MAX_PAGE_ENTRIES, Item, Listing, Malformed, parse_listing, parse_object
from modelfs.backends.responses import (
    Headers,
    RangeRequest,
    Unpinned,
    check_range_response,
    metadata_status_error,
    read_status_error,
    short_reason,
)
from modelfs.backends.skeleton import Buffers, Sums, ThreadedBackend
from modelfs.backends.tiered import TierTarget, header_pinned
from modelfs.config import Source
from modelfs.errors import AccessDenied, BackendError, NotFound, TransientError, VersionChanged
from modelfs.memlimit import receive_chunk

if TYPE_CHECKING:
    from modelfs.backends.gcs_session import SessionClient
    from modelfs.cache.memory import MemoryCache

__all__ = ["GCSBackend"]

log = logging.getLogger(__name__)

_INFO_FIELDS = "name,size,updated,generation,crc32c,md5Hash"
_LIST_FIELDS = f"items({_INFO_FIELDS}),nextPageToken"
_DIR_FIELDS = f"items({_INFO_FIELDS}),prefixes,nextPageToken"
_PAGE_SIZE = 1000  # GCS's own default; some servers send everything otherwise
# What a JSON API answer costs while held (backends/answers.py), by tracemalloc on 16 MiB
# bodies: read in chunks then joined (2x), a listing of one 16 MiB escaped string 3.25x, 10,000
# tiny entries ~80 bytes each beside their text (their Items and ObjectInfos).
ANSWER_COST = Cost(4, 200, 64 << 10)


class _BadSize(BackendError):
    """An object whose size is not a byte count: a listing skips it, a lookup fails."""


def _size(value: object) -> int | None:
    """The JSON API's size (a decimal string; absent for 0), None unless 0 <= size < 2**63."""
    if value is None or value == "":
        return 0
    if not isinstance(value, str) or not (value.isascii() and value.isdigit()) or len(value) > 19:
        return None
    size = int(value)
    return size if size < 1 << 63 else None


def _name_of(item: Item) -> object:
    return item.name


def _itself(name: str) -> object:
    return name


# An object stored with a Content-Encoding (gzip from gsutil cp -Z, or br, deflate, ...) is
# served as stored, like gcsfuse does: its size is the stored size, so its bytes must be the
# stored bytes. Without Accept-Encoding: gzip, GCS (and fake-gcs-server) decompress a gzip
# one and ignore Range. With it, a ranged GET gets the stored bytes; other encodings GCS
# never transcodes. Each answer's Content-Encoding must be the stored encoding
# (X-Goog-Stored-Content-Encoding, _check_stored_encoding), whatever it is, never a
# decompressed or recompressed body: that check, not a list of encodings, decides (a list
# of gzip alone refused every read of a br- or deflate-encoded object).
MEDIA_ACCEPT_ENCODING = "gzip"
_MEDIA_ENCODINGS = None


def _check_stored_encoding(headers: Headers, what: str) -> None:
    """BackendError unless the body is the object's bytes as stored (not transcoded)."""
    stored = (headers.get("x-goog-stored-content-encoding") or "identity").strip().lower()
    sent = (headers.get("content-encoding") or "identity").strip().lower()
    if stored != sent and not {stored, sent} <= {"identity", ""}:
        raise BackendError(
            f"{what}: stored with Content-Encoding {stored!r} but served as {sent!r}: not the stored bytes"
        )


def _mtime(updated: object) -> float:
    """Seconds since the epoch of an RFC 3339 ``updated`` time (0 when absent or malformed)."""
    if not isinstance(updated, str):
        return 0.0
    try:
        return datetime.fromisoformat(updated).timestamp()
    except ValueError:
        return 0.0


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


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
        billing_project: str | None = None,
        budget: MemoryCache | None = None,
    ) -> None:
        # One extra thread beyond the GETs so a listing never waits behind a full pipe.
        super().__init__(source, threads=max_concurrency + 1)
        self._unpinned = Unpinned(source.url, "X-Goog-Generation")
        if budget is not None:  # listings and metadata answers are charged to it while held
            self._answers = AnswerBudget(budget, ANSWER_COST, source.url)
        self._prefix = source.prefix + "/" if source.prefix else ""
        self._single: str | None = None  # set when the source names one object, not a prefix
        self._timeout = (connect_timeout, read_timeout)
        self._credentials = load_credentials(anonymous)
        base = api_base_url()
        self._bucket_path = object_path(source.bucket)
        self._media_path = f"/download{self._bucket_path}/"
        # Requester Pays: every request names the project billed for it (JSON API and media).
        self._user_project = billing_project
        self._session: SessionClient | None = None
        self._media: MediaTransport | None = None
        self._json: JsonClient
        if plain_transport_applies(base):
            # A token refresh waits as long as any other request of the mount (not 120 s).
            signer = Signer(self._credentials, timeout=read_timeout, connect_timeout=connect_timeout)
            self._json = JsonApi(base, signer, connect_timeout=connect_timeout, read_timeout=read_timeout, max_idle=4)
            self._media = MediaTransport(
                base,
                signer,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_idle=max_concurrency + 1,
                receive_chunk=receive_chunk(max_concurrency),
            )
            self._media.accept_encoding = MEDIA_ACCEPT_ENCODING
        else:
            self._json = self._session_client(base)

    def _session_client(self, base: str | None = None) -> SessionClient:
        """The requests session, made on first use (proxies, mTLS; tests of that path)."""
        if self._session is None:
            from modelfs.backends.gcs_session import SessionClient

            self._session = SessionClient(base or api_base_url(), self._credentials, timeout=self._timeout)
        return self._session

    # --- error classification: the only place that knows the transports' failure types.

    def classify(self, exc: BaseException, what: str, *, reading: bool = False) -> BackendError:
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, StatusError):
            error = read_status_error(exc.status, what) if reading else metadata_status_error(exc.status, what)
            if error is None:
                return BackendError(f"{what}: unexpected {exc}")
            if exc.message and not isinstance(error, TransientError):
                # The server's reason is the fix for a refusal ("... requester pays bucket but no
                # user project provided"); a retried status says it at each retry, it is left out.
                return type(error)(f"{error}: {exc.message}")
            return error
        if isinstance(exc, ssl.SSLCertVerificationError):  # (an OSError that waiting will not mend)
            return BackendError(f"{what}: {short_reason(exc)}")
        if isinstance(exc, (OSError, EOFError, http.client.HTTPException)):
            return TransientError(f"{what}: {short_reason(exc)}")
        auth = _auth_error(exc, what)
        if auth is not None:
            return auth
        return BackendError(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")

    # --- listing and metadata

    def _to_info(self, item: Item) -> ObjectInfo:
        name = item.name
        if not isinstance(name, str):
            raise BackendError(f"{self._source.url}: the JSON API sent an object without a name")
        size = _size(item.size)
        if size is None:
            raise _BadSize(f"{name}: the JSON API sent an invalid size {str(item.size)[:40]!r}")
        try:
            generation = str(int(item.generation))  # type: ignore[call-overload]
        except (TypeError, ValueError):  # (absent is None: a TypeError too)
            raise BackendError(f"{name}: the JSON API sent no valid generation") from None
        return ObjectInfo(
            name=name[len(self._prefix) :],
            size=size,
            mtime=_mtime(item.updated),
            version=generation,
            crc32c=_text(item.crc32c),
            md5=_text(item.md5Hash),
        )

    def _infos(self, items: Iterable[Item]) -> list[ObjectInfo]:
        """The listed objects; one with an invalid size is skipped (a warning), not the whole listing."""
        infos: list[ObjectInfo] = []
        for item in items:
            try:
                infos.append(self._to_info(item))
            except _BadSize as exc:
                log.warning("%s: not shown", exc)
        return infos

    def _list_page(self, params: dict[str, str | int | None]) -> Listing:
        body = self._json.get_json(
            self._bucket_path + query({"projection": "noAcl", **params, "userProject": self._user_project})
        )
        # Entries are separated by commas: what the parse (and _infos) make, charged before it.
        answers.grow(len(body), entries=min(MAX_PAGE_ENTRIES, body.count(b",") + 1))
        try:
            return parse_listing(body)
        except Malformed as exc:
            raise BackendError(f"{self._source.url}: {exc}") from None

    def _get_object(self, name: str) -> ObjectInfo | None:
        """The object's metadata, None if there is none (raises for any other failure)."""
        try:
            body = self._json.get_json(
                object_path(self._source.bucket, name)
                + query({"fields": _INFO_FIELDS, "userProject": self._user_project})
            )
        except StatusError as exc:
            if exc.status == 404:
                return None
            raise
        answers.grow(len(body), entries=1)
        return self._to_info(parse_object(body))

    def _single_object(self) -> ObjectInfo | None:
        """gs://bucket/path/model.safetensors: one object, shown in a directory of its own."""
        info = self._get_object(self._source.prefix)
        if info is None:
            return None
        parent, _, name = self._source.prefix.rpartition("/")
        self._prefix = parent + "/" if parent else ""
        self._single = name
        return replace(info, name=name)

    def _list(self) -> list[ObjectInfo]:
        try:
            if self._single is not None:
                single = self._get_object(self._prefix + self._single)
                return [single] if single is not None else []
            found: list[ObjectInfo] = []
            token: str | None = None
            while True:
                page = self._list_page(
                    {
                        "prefix": self._prefix or None,
                        "fields": _LIST_FIELDS,
                        "maxResults": _PAGE_SIZE,
                        "pageToken": token,
                    }
                )
                items = self.under(page.items, _name_of, self._prefix)
                found.extend(self._infos(i for i in items if i.name != self._prefix))
                token = _text(page.next_token)
                del page, items
                answers.done()  # (what is kept of the page is in found: the namespace counts it)
                if token is None:
                    break
            if not found and self._source.prefix and self._single is None:
                single = self._single_object()
                if single is not None:
                    return [single]
            return found
        except Exception as exc:
            raise self.listing_error(exc) from None

    async def list_objects(self) -> list[ObjectInfo]:
        return await self.run_answered(self._list)

    def _list_dir(self, prefix: str, token: str | None, limit: int | None) -> ListPage:
        try:
            if self._single is not None:
                if prefix:
                    return ListPage([], [])
                single = self._get_object(self._prefix + self._single)
                return ListPage([single] if single is not None else [], [])
            page = self._list_page(
                {
                    "prefix": self._prefix + prefix or None,
                    "delimiter": "/",
                    "fields": _DIR_FIELDS,
                    "maxResults": limit if limit is not None else _PAGE_SIZE,
                    "pageToken": token,
                }
            )
            within = self._prefix + prefix
            objects = self._infos(self.under(page.items, _name_of, within))
            if page.prefixes is None:
                raise BackendError(f"{self._source.url}: the JSON API sent malformed prefixes")
            prefixes = [p[len(self._prefix) :] for p in self.under(page.prefixes, _itself, within)]
            # Also with a limit: GCS may answer an empty page and a token (a probe follows it).
            next_token = _text(page.next_token)
            if not prefix and token is None and not objects and not prefixes and self._source.prefix:
                single = self._single_object()
                if single is not None:
                    return ListPage([single], [])
            return ListPage(objects, prefixes, next_token)
        except Exception as exc:
            raise self.listing_error(exc) from None

    async def list_dir(self, prefix: str, token: str | None = None, *, limit: int | None = None) -> ListPage:
        return await self.run_answered(self._list_dir, prefix, token, limit)

    def _stat(self, name: str) -> ObjectInfo:
        try:
            info = self._get_object(self._prefix + name)
        except Exception as exc:
            raise self.classify(exc, name) from None
        if info is None:
            raise NotFound(f"{name}: not found")
        return info

    async def stat(self, name: str) -> ObjectInfo:
        return await self.run_answered(self._stat, name)

    # --- the data path

    def _media_target(self, name: str, version: str) -> str:
        target = f"{self._media_path}{quote(self._prefix + name, safe='')}?alt=media&generation={version}"
        if self._user_project is not None:
            target += f"&userProject={quote(self._user_project, safe='')}"
        return target

    @property
    def joins_reads(self) -> bool:
        # The media transport receives one body into several buffers; the requests session
        # (behind a proxy, mTLS) fills one buffer per GET.
        return self._media is not None

    def _read_into_all(self, name: str, version: str, request: RangeRequest, dests: Buffers, sums: Sums = None) -> None:
        path = self._media_target(name, version)

        def pinned(headers: Headers) -> None:
            generation = headers.get("x-goog-generation")
            self._unpinned.check(generation, request.what)
            if generation is not None and generation != version:
                raise VersionChanged(f"{request.what}: server sent generation {generation}")
            _check_stored_encoding(headers, request.what)

        def check(status: int, headers: Headers) -> None:
            check_range_response(status, headers, request, pinned=pinned, encodings=_MEDIA_ENCODINGS)

        try:
            if self._media is not None:
                self._media.get_joined_into(path, request.offset, dests, check, sums)
            elif len(dests) == 1:
                self._session_client().get_into(path, request, MEDIA_ACCEPT_ENCODING, check, dests[0])
            else:  # joins_reads is False on this transport: the block store never asks
                raise BackendError(f"{request.what}: joined reads need the media transport")
        except Exception as exc:
            raise self.classify(exc, request.what, reading=True) from None

    def tier_target(self, name: str, version: str) -> TierTarget:
        """The media GET a cache tier serves for ``name`` at ``version`` (--cache-url)."""
        return TierTarget(
            self._media_target(name, version), {}, header_pinned("x-goog-generation", version, "generation")
        )

    def abort(self) -> None:
        """The daemon is stopping: end the GETs blocked in worker threads now."""
        if self._media is not None:
            self._media.abort()
        self._json.abort()

    async def aclose(self) -> None:
        if self._media is not None:
            self._media.close()
        self._json.close()
        if self._session is not None:
            self._session.close()


def _auth_error(exc: BaseException, what: str) -> BackendError | None:
    """What a google-auth failure to get a token means: retry a network failure or a
    retryable refusal; a refused credential is AccessDenied. None for anything else."""
    from google.auth.exceptions import RefreshError, TransportError

    if isinstance(exc, TransportError):
        return TransientError(f"{what}: getting an access token failed: {short_reason(exc)}")
    if isinstance(exc, RefreshError):
        if getattr(exc, "retryable", False):
            return TransientError(f"{what}: getting an access token failed: {str(exc)[:200]}")
        return AccessDenied(f"{what}: the credentials were refused: {str(exc)[:200]}")
    return None
