"""Amazon S3 and S3-compatible stores through boto3, with a zero-copy ranged GET.

boto3 does what is hard to get right elsewhere: the credential chain (``AWS_*`` variables,
profiles, SSO, web identity, instance metadata), SigV4 signing, endpoint and region rules.
``--endpoint-url`` points it at another store (path-style addressing), ``--anonymous`` sends
unsigned requests (public buckets).

The ranged GET pins the object's ETag with ``If-Match``, checks the ETag and Content-Range of
the answer, and reads the body with ``readinto`` straight into the block's buffer, below
botocore's StreamingBody (which would read into a temporary and copy). Every boto3 call
blocks, so it runs in a trio worker thread on data nothing else touches; the number of
threads is bounded by a CapacityLimiter. Why threads and not an async client on trio: this
path measured faster (see docs/backends.md).

boto3 retries nothing here (``total_max_attempts=1``): retry is done once, above the
backend, like for every store.

``stat`` (HeadObject with ChecksumMode=ENABLED) learns the checksum S3 keeps of the object
(``head_checksum``); a listing carries none, so ``modelfs warm`` stats each object it checks.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from modelfs.backends import answers
from modelfs.backends.answers import AnswerBudget, Cost
from modelfs.backends.base import ListPage, ObjectInfo
from modelfs.backends.body import read_urllib3_body
from modelfs.backends.connpool import InFlight
from modelfs.backends.private.botocore_answers import read_answers
from modelfs.backends.private.botocore_pools import report_connections
from modelfs.backends.private.botocore_raw import raw_stream
from modelfs.backends.private.httpclient_progress import progress_response
from modelfs.backends.responses import (
    Headers,
    RangeRequest,
    Unpinned,
    check_range_response,
    metadata_status_error,
    read_status_error,
    short_reason,
)
from modelfs.backends.s3_answers import read_answer
from modelfs.backends.skeleton import Buffers, Sums, ThreadedBackend
from modelfs.backends.tiered import TierTarget, header_pinned
from modelfs.config import Source
from modelfs.errors import (
    AccessDenied,
    BackendError,
    ConfigError,
    TransientError,
    VersionChanged,
)

if TYPE_CHECKING:
    from modelfs.cache.memory import MemoryCache

__all__ = ["S3Backend"]

# What an answer costs while held (backends/answers.py), by tracemalloc: 16 MiB of long keys or
# prefixes (botocore's parse, the body read and joined) 3.0-3.25x; 0.5-1.1 MiB of 65,000 tags
# (the most s3_answers lets botocore parse) 5.4-9.3 MiB: ~120 bytes a tag beside the text.
ANSWER_COST = Cost(3.5, 160, 64 << 10)

log = logging.getLogger(__name__)

_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED = {
    "401",
    "403",
    "AccessDenied",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
    "AccountProblem",
}
_THROTTLED = {
    "429",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
}
_CODE_STATUS: tuple[tuple[frozenset[str] | set[str], int], ...] = (
    (frozenset({"PreconditionFailed", "412"}), 412),
    (frozenset({"InvalidRange", "416"}), 416),
    (_NOT_FOUND, 404),
    (_DENIED, 403),
    (_THROTTLED, 503),
)


# HeadObject's fields for the checksums S3 keeps of an object (ChecksumMode=ENABLED), and the
# names ObjectInfo.checksum gives them (S3's ChecksumAlgorithm, lower-case).
_CHECKSUM_FIELDS = (
    ("ChecksumCRC32", "crc32"),
    ("ChecksumCRC32C", "crc32c"),
    ("ChecksumCRC64NVME", "crc64nvme"),
    ("ChecksumSHA1", "sha1"),
    ("ChecksumSHA256", "sha256"),
    ("ChecksumSHA512", "sha512"),
    ("ChecksumMD5", "md5"),
    ("ChecksumXXHASH64", "xxhash64"),
    ("ChecksumXXHASH3", "xxhash3"),
    ("ChecksumXXHASH128", "xxhash128"),
)
# A checksum is sent as the header x-amz-checksum-<algorithm>; these two are not checksums.
_CHECKSUM_HEADER = re.compile(r"x-amz-checksum-([a-z0-9]+)")
_NOT_CHECKSUMS = {"type", "mode"}
_PARTS = re.compile(r"-(\d+)\"?$")  # a multipart upload's ETag ("…-<parts>") or composite checksum


def head_checksum(head: dict[str, Any], etag: str) -> str | None:
    """The object's checksum from a HeadObject answer, as ObjectInfo.checksum spells it.

    A checksum is of the whole object when S3 says so (ChecksumType FULL_OBJECT), or when it
    says nothing and the object is not a multipart upload (a single PUT's checksum is of its
    bytes), or when it is a CRC64NVME (S3 keeps only full-object ones of that, multipart
    uploads included). Otherwise it is COMPOSITE: S3 spells those "<base64>-<parts>"; one
    without the suffix (a store that leaves out the type, as moto does on HEAD) gets the ETag's
    part count.
    """
    found = next(((name, head[field]) for field, name in _CHECKSUM_FIELDS if isinstance(head.get(field), str)), None)
    if found is None:
        # One of a type this botocore does not parse is in the answer's headers only: it is
        # kept by the name it was sent with (warm says it cannot check it), not dropped.
        headers = head.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        found = next(
            (
                (match.group(1), value)
                for header, value in headers.items()
                if (match := _CHECKSUM_HEADER.fullmatch(header.lower())) and match.group(1) not in _NOT_CHECKSUMS
            ),
            None,
        )
    if found is None or not isinstance(found[1], str) or not found[1]:
        return None
    algorithm, value = found
    kind = head.get("ChecksumType")
    multipart = _PARTS.search(etag)
    if "-" in value:  # (base64 has no '-': this is S3's "-<parts>" of a composite checksum)
        return f"{algorithm}:{value}"
    if kind == "COMPOSITE" or (kind != "FULL_OBJECT" and algorithm != "crc64nvme" and multipart is not None):
        return f"{algorithm}:{value}-{multipart.group(1) if multipart else '?'}"
    return f"{algorithm}:{value}"


def _key_of(item: dict[str, Any]) -> object:
    return item.get("Key")


def _prefix_of(item: dict[str, Any]) -> object:
    return item.get("Prefix")


def _keep_crt_from_botocore() -> None:
    """awscrt is installed for warm's CRC64NVME only. botocore imports ``awscrt.auth`` when it
    can, and then signs with the CRT and loads ~6 MiB of native library into the daemon,
    outside the memory bound's overhead (docs/backends.md): these two imports fail for it."""
    if "botocore.compat" not in sys.modules:  # (decided once, when botocore is first imported)
        for name in ("awscrt.auth", "awscrt.crypto"):
            sys.modules.setdefault(name, None)  # type: ignore[arg-type]


_keep_crt_from_botocore()


class S3Backend(ThreadedBackend):
    """Objects below ``s3://bucket/prefix``; names are relative to the prefix."""

    def __init__(
        self,
        source: Source,
        *,
        endpoint_url: str | None = None,
        anonymous: bool = False,
        ca_cert: Path | None = None,
        read_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_concurrency: int = 8,
        requester_pays: bool = False,
        budget: MemoryCache | None = None,
    ) -> None:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config as BotoConfig

        # One extra thread beyond the GETs so a listing never waits behind a full pipe.
        super().__init__(source, threads=max_concurrency + 1)
        self._unpinned = Unpinned(source.url, "ETag")
        if budget is not None:  # listings, HEADs' and errors' answers are charged to it while held
            self._answers = AnswerBudget(budget, ANSWER_COST, source.url)
        self._prefix = source.prefix + "/" if source.prefix else ""
        # A Requester Pays bucket: every request says the requester accepts the charges.
        self._payer: dict[str, str] = {"RequestPayer": "requester"} if requester_pays else {}
        self._in_flight = InFlight()
        self._read_timeout = read_timeout
        session = boto3.session.Session()
        if not anonymous and session.get_credentials() is None:
            raise ConfigError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or pass --anonymous for a public bucket"
            )
        options: dict[str, Any] = dict(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max_concurrency + 2,
            response_checksum_validation="when_required",  # ranges have no whole-object checksum
            request_checksum_calculation="when_required",
            user_agent_extra="modelfs",
        )
        if anonymous:
            options["signature_version"] = UNSIGNED
        if endpoint_url is not None:
            options["s3"] = {"addressing_style": "path"}
        region = session.region_name or ("us-east-1" if endpoint_url else None)
        self._client = session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            verify=str(ca_cert) if ca_cert is not None else None,
            config=BotoConfig(**options),
        )
        # Every socket the client opens, so a stop also ends a GET still waiting for headers;
        # every answer, headers too, under the data path's progress rule (a HEAD or a listing
        # dripped a byte per read timeout was a wait without end).
        # Each new connection's name lookup and connect, within the connect timeout (urllib3's
        # getaddrinfo has none: a resolver that did not answer held a GET, a listing or the
        # mount's first check for tens of seconds), and a stop ends them.
        report_connections(self._client, self._connected, progress_response(read_timeout), in_flight=self._in_flight)
        # botocore reads listings, HEADs' and errors' bodies whole: these are read bounded.
        read_answers(self._client, read_answer)

    # --- error classification: the only place that knows botocore's exceptions.

    def classify(self, exc: BaseException, what: str, *, reading: bool = False) -> BackendError:
        import http.client

        import urllib3.exceptions
        from botocore import exceptions as bexc

        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, bexc.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            # S3-compatible stores disagree on statuses more than on error codes: the code
            # decides, then the status means what it means for every store (responses.py).
            number = int(status) if status.isdigit() else 0
            if code.isdigit():
                number = int(code)
            else:
                for codes, meaning in _CODE_STATUS:
                    if code in codes:
                        number = meaning
                        break
            table = read_status_error if reading else metadata_status_error
            found = table(number, what) if number else None
            if found is None or type(found) is BackendError:
                return BackendError(f"{what}: {code or 'HTTP ' + status}: {error.get('Message', '')}"[:300])
            return type(found)(f"{found} ({code})" if code and not code.isdigit() else str(found))
        if isinstance(exc, bexc.NoCredentialsError):
            return AccessDenied(f"{what}: no AWS credentials found (or pass --anonymous)")
        if isinstance(exc, bexc.SSLError):
            return BackendError(f"{what}: TLS failed ({str(exc)[:200]}); pass --ca-cert FILE to trust a private CA")
        if isinstance(
            exc,
            (
                bexc.ConnectionError,
                bexc.HTTPClientError,
                OSError,
                EOFError,
                http.client.HTTPException,
                urllib3.exceptions.HTTPError,
            ),
        ):
            # EndpointConnectionError, ConnectTimeout, ReadTimeout, ConnectionClosedError, resets
            return TransientError(f"{what}: {short_reason(exc)}")
        return BackendError(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")

    # --- listing and metadata

    def _info(self, key: str, size: int, modified: Any, etag: str) -> ObjectInfo:
        return ObjectInfo(
            name=key[len(self._prefix) :],
            size=int(size),
            mtime=modified.timestamp() if modified is not None else 0.0,
            version=etag,
        )

    def _list(self) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self._source.bucket, Prefix=self._prefix, **self._payer
            )
            for page in pages:
                for item in self.under(list(page.get("Contents", ())), _key_of, self._prefix):
                    if item["Key"] == self._prefix:
                        continue
                    out.append(self._info(item["Key"], item["Size"], item.get("LastModified"), item["ETag"]))
                del page
                answers.done()  # (what is kept of the page is in out: the namespace counts it)
        except Exception as exc:
            raise self.listing_error(exc) from None
        return out

    async def list_objects(self) -> list[ObjectInfo]:
        return await self.run_answered(self._list)

    def _list_dir(self, prefix: str, token: str | None, limit: int | None) -> ListPage:
        params: dict[str, Any] = {
            "Bucket": self._source.bucket,
            "Prefix": self._prefix + prefix,
            "Delimiter": "/",
            **self._payer,
        }
        if token is not None:
            params["ContinuationToken"] = token
        params["MaxKeys"] = limit if limit is not None else 1000  # S3's own default, asked for explicitly
        try:
            resp = self._client.list_objects_v2(**params)
        except Exception as exc:
            raise self.listing_error(exc) from None
        within = self._prefix + prefix
        try:
            objects = [
                self._info(item["Key"], item["Size"], item.get("LastModified"), item["ETag"])
                for item in self.under(list(resp.get("Contents", ())), _key_of, within)
            ]
            common = self.under(list(resp.get("CommonPrefixes", ())), _prefix_of, within)
            prefixes = [item["Prefix"][len(self._prefix) :] for item in common]
        except (KeyError, TypeError) as exc:
            raise BackendError(f"{self._source.url}: the store listed an object without its {exc} field") from None
        truncated = resp.get("IsTruncated")  # also with a limit: an empty page may say there is more
        return ListPage(objects, prefixes, resp.get("NextContinuationToken") if truncated else None)

    async def list_dir(self, prefix: str, token: str | None = None, *, limit: int | None = None) -> ListPage:
        return await self.run_answered(self._list_dir, prefix, token, limit)

    # A listing carries no checksum (ListObjectsV2 names the algorithm at most): HeadObject with
    # ChecksumMode=ENABLED does, so ``modelfs warm`` stats each object before it reads it.
    checksums_by_stat = True

    def _stat(self, name: str) -> ObjectInfo:
        try:
            head = self._client.head_object(
                Bucket=self._source.bucket, Key=self._prefix + name, ChecksumMode="ENABLED", **self._payer
            )
        except Exception as exc:
            raise self.classify(exc, name) from None
        try:
            etag = head["ETag"]
            info = self._info(self._prefix + name, head["ContentLength"], head.get("LastModified"), etag)
        except (KeyError, TypeError) as exc:
            raise BackendError(f"{name}: the store answered HEAD without its {exc} header") from None
        checksum = head_checksum(head, str(etag))
        return info if checksum is None else dataclasses.replace(info, checksum=checksum)

    async def stat(self, name: str) -> ObjectInfo:
        return await self.run_answered(self._stat, name)

    # --- the data path

    # A GET's body is read into several buffers in turn: read-ahead joins neighbouring blocks.
    joins_reads = True

    def _read_into_all(self, name: str, version: str, request: RangeRequest, dests: Buffers, sums: Sums = None) -> None:
        what = request.what
        if self._in_flight.closed:
            raise self.classify(ConnectionAbortedError("the daemon is stopping"), what, reading=True)
        try:
            resp = self._client.get_object(
                Bucket=self._source.bucket,
                Key=self._prefix + name,
                Range=request.header,
                IfMatch=version,
                **self._payer,
            )
        except Exception as exc:
            if not self._in_flight.closed:
                raise self.classify(exc, what, reading=True) from None
            # (the stop shut its socket down while it waited for headers)
            raise self.classify(ConnectionAbortedError("the daemon is stopping"), what, reading=True) from None
        raw = raw_stream(resp["Body"])  # urllib3's HTTPResponse
        # The body's socket, so a stop can end the read and what was read after it does not
        # count (before the headers, the stop reaches the socket as one the client opened).
        sock = getattr(getattr(raw, "connection", None), "sock", None)
        if sock is not None:
            try:
                self._in_flight.enter(sock)
            except ConnectionAbortedError:
                raw.close()  # type: ignore[attr-defined]
                raise self.classify(ConnectionAbortedError("the daemon is stopping"), what, reading=True) from None

        def pinned(headers: Headers) -> None:
            etag = resp.get("ETag")
            self._unpinned.check(etag, what)
            if etag is not None and etag != version:
                raise VersionChanged(f"{what}: changed in the store (ETag is now {etag})")

        try:
            try:
                meta = resp.get("ResponseMetadata", {})
                headers = {key.lower(): value for key, value in meta.get("HTTPHeaders", {}).items()}
                # S3 never decodes on the way out: an object stored with Content-Encoding gzip
                # (say) is sent as stored, sizes and ranges are of those bytes, and so is the file.
                check_range_response(meta.get("HTTPStatusCode", 0), headers, request, pinned=pinned, encodings=None)
                read_urllib3_body(raw, dests, what, self._read_timeout)
            finally:
                if sock is not None:
                    self._in_flight.leave(sock)  # (raises if the stop aborted the GET meanwhile)
        except Exception as exc:
            raw.close()  # type: ignore[attr-defined]
            raise self.classify(exc, what, reading=True) from None

    def tier_target(self, name: str, version: str) -> TierTarget:
        """The path-style GET a cache tier serves for ``name`` at ``version`` (--cache-url)."""
        path = f"/{quote(self._source.bucket, safe='')}/{quote(self._prefix + name, safe='/~')}"
        return TierTarget(path, {"If-Match": version}, header_pinned("etag", version, "ETag"))

    def _connected(self, connection: Any) -> None:
        sock = getattr(connection, "sock", None)
        if sock is not None:
            self._in_flight.opened(sock)

    def abort(self) -> None:
        """The daemon is stopping: GETs in flight end now, those reading a body and those
        waiting for headers (every socket the client opened is shut down), and no new GET starts."""
        self._in_flight.abort()

    async def aclose(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing is best effort
            pass
