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
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import trio

from modelfs.backends.base import ObjectInfo
from modelfs.backends.body import read_urllib3_body
from modelfs.config import Source
from modelfs.errors import (
    AccessDenied,
    BackendError,
    ConfigError,
    NotFound,
    TransientError,
    VersionChanged,
)

__all__ = ["S3Backend"]

log = logging.getLogger(__name__)

_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
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


class S3Backend:
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
    ) -> None:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config as BotoConfig

        self._source = source
        self._prefix = source.prefix + "/" if source.prefix else ""
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
        # One extra thread beyond the GETs so a listing never waits behind a full pipe.
        self._limiter = trio.CapacityLimiter(max_concurrency + 1)

    @property
    def description(self) -> str:
        return self._source.url

    def object_key(self, name: str) -> str:
        return self._source.object_key(name)

    # --- error classification: the only place that knows botocore's exceptions.

    def _classify(self, exc: BaseException, what: str, *, reading: bool = False) -> BackendError:
        import http.client

        import urllib3.exceptions
        from botocore import exceptions as bexc

        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, bexc.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in ("PreconditionFailed", "412") or status == "412":
                return VersionChanged(f"{what}: changed in the store since it was opened (412 Precondition Failed)")
            if code in ("InvalidRange", "416") or status == "416":
                return VersionChanged(f"{what}: shorter in the store than when it was opened (416)")
            if code in _NOT_FOUND or status == "404":
                if reading:
                    return VersionChanged(f"{what}: deleted from the store since it was opened")
                return NotFound(f"{what}: not found ({code or status})")
            if code in _DENIED or status in ("401", "403"):
                return AccessDenied(f"{what}: access denied ({code or status})")
            if code in _THROTTLED or status.startswith("5"):
                return TransientError(f"{what}: {code or 'HTTP ' + status}")
            return BackendError(f"{what}: {code or 'HTTP ' + status}: {error.get('Message', '')}"[:300])
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
                http.client.HTTPException,
                urllib3.exceptions.HTTPError,
            ),
        ):
            # EndpointConnectionError, ConnectTimeout, ReadTimeout, ConnectionClosedError, resets
            text = str(exc).lower()
            return TransientError(f"{what}: {'timed out' if 'timeout' in text else str(exc)[:200]}")
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
                Bucket=self._source.bucket, Prefix=self._prefix
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    if item["Key"] == self._prefix:
                        continue
                    out.append(self._info(item["Key"], item["Size"], item.get("LastModified"), item["ETag"]))
        except Exception as exc:
            err = self._classify(exc, self._source.url)
            if isinstance(err, NotFound):
                raise NotFound(f"{self._source.url}: bucket {self._source.bucket!r} not found") from None
            raise err from None
        return out

    async def list_objects(self) -> list[ObjectInfo]:
        return await trio.to_thread.run_sync(self._list, limiter=self._limiter)

    def _stat(self, name: str) -> ObjectInfo:
        try:
            head = self._client.head_object(Bucket=self._source.bucket, Key=self._prefix + name)
        except Exception as exc:
            raise self._classify(exc, name) from None
        return self._info(self._prefix + name, head["ContentLength"], head.get("LastModified"), head["ETag"])

    async def stat(self, name: str) -> ObjectInfo:
        return await trio.to_thread.run_sync(self._stat, name, limiter=self._limiter)

    # --- the data path

    def _read(self, name: str, version: str, offset: int, dest: memoryview) -> None:
        length = len(dest)
        what = f"{name}@{version} [{offset}, +{length}]"
        try:
            resp = self._client.get_object(
                Bucket=self._source.bucket,
                Key=self._prefix + name,
                Range=f"bytes={offset}-{offset + length - 1}",
                IfMatch=version,
            )
        except Exception as exc:
            raise self._classify(exc, what, reading=True) from None
        raw = resp["Body"]._raw_stream  # urllib3's HTTPResponse
        try:
            etag = resp.get("ETag")
            if etag is not None and etag != version:
                raise VersionChanged(f"{what}: changed in the store (ETag is now {etag})")
            match = _CONTENT_RANGE_RE.fullmatch(resp.get("ContentRange") or "")
            if match is None:
                if offset != 0 or resp.get("ContentLength") != length:
                    raise BackendError(f"{what}: the store ignored the Range header")
            elif int(match.group(1)) != offset or int(match.group(2)) != offset + length - 1:
                if match.group(3) != "*" and offset + length > int(match.group(3)):
                    raise BackendError(f"{what}: beyond the end of the object ({match.group(3)} bytes)")
                raise TransientError(f"{what}: wrong Content-Range {resp.get('ContentRange')!r}")
            if resp.get("ContentLength") != length:
                raise TransientError(f"{what}: Content-Length {resp.get('ContentLength')}, expected {length}")
            read_urllib3_body(raw, dest, what)
        except Exception as exc:
            raw.close()
            raise self._classify(exc, what, reading=True) from None

    async def read_range(self, name: str, version: str, offset: int, dest: memoryview) -> None:
        if len(dest) == 0:
            return
        await trio.to_thread.run_sync(self._read, name, version, offset, dest, limiter=self._limiter)

    async def aclose(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing is best effort
            pass
