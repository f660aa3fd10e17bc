"""Files on a web server (``https://`` and ``http://``) through httpx, running on trio.

What is mounted:

- a URL of one file (``https://host/models/m.safetensors``): a directory holding that file;
- a URL ending in '/' with ``--manifest FILE``: the files FILE lists, one relative path a line
  (optionally ``path size``; ``#`` starts a comment);
- a URL ending in '/' without a manifest: the server's JSON directory index (nginx
  ``autoindex on; autoindex_format json;``), walked recursively.

Every file is stat'ed with HEAD (or, where HEAD is refused, a GET of its first byte), which
also proves the server honours Range. A file's version is its size and its strong ETag (not one made
of its mtime and size, as nginx's and Apache's defaults are: see etag_is_strong), or its
size and Last-Modified when it has none. Each ranged GET sends ``If-Match`` with that ETag (or
``If-Unmodified-Since``) and the response is checked again (ETag, Content-Range total), so a
file replaced on the server reads as VersionChanged (ESTALE), never as mixed bytes.

The body is read with ``aiter_raw`` and each chunk copied once into the caller's buffer: no
threads, no intermediate body buffer; httpcore is made to read 512 KiB at a time instead of
64 KiB (a third of the CPU per byte). ``--header`` values (tokens) are sent with every
request and never appear in a log line or an error message; neither does a URL's query
string (a signature, for presigned URLs).
"""

from __future__ import annotations

import email.utils
import functools
import http.client
import logging
import os
import re
import ssl
from bisect import bisect_right
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import quote, urlsplit

import httpx
import trio

from modelfs import __version__
from modelfs.backends.base import ListPage, ObjectInfo
from modelfs.backends.body import Progress
from modelfs.backends.http_manifest import DirEntry, ManifestFile
from modelfs.backends.http_media import HTTPMedia, NeedsProxy, proxied
from modelfs.backends.private.httpcore_read_size import raise_read_size
from modelfs.backends.redirects import MAX_REDIRECTS, RedirectPolicy
from modelfs.backends.responses import (
    Headers,
    RangeRequest,
    check_range_response,
    metadata_status_error,
    no_range_support,
    parse_content_range,
    short_reason,
)
from modelfs.backends.skeleton import BackendSkeleton
from modelfs.backends.tiered import SIZE_HEADER, TierTarget, header_pinned
from modelfs.backends.weak import run_marker, without_run_marker
from modelfs.config import Source
from modelfs.errors import (
    AccessDenied,
    BackendError,
    ConfigError,
    NotFound,
    TransientError,
    VersionChanged,
)
from modelfs.jsonscan import PARTS as JSON
from modelfs.jsonscan import decode_string
from modelfs.memlimit import receive_chunk, str_bytes
from modelfs.walk import walk_objects

if TYPE_CHECKING:
    from modelfs.cache.memory import Lease, MemoryCache

__all__ = ["HTTPBackend", "make_version", "parse_index", "parse_version"]

log = logging.getLogger(__name__)
# httpx logs every request's URL at INFO (with its query string, a signature for presigned
# URLs): keep both libraries quiet whatever the root logger's level is.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)

_UNSATISFIED_RANGE_RE = re.compile(r"bytes \*/(\d+)")
_PCHAR_SAFE = "/:@!$&'()*+,;=~"  # left as they are in a path (RFC 3986 pchar)
_MAX_INDEX_DEPTH = 32
_MAX_WARNINGS = 1000  # names warned about once each, at most
# Bounds on what a server can make the daemon hold or walk (a manifest's: http_manifest.py):
# one index or HEAD response, the entries and directories of one full walk (self-referencing
# symlinks under nginx autoindex make an index tree without end: the mount lists only what is
# looked up, which the depth bound ends; a walk of everything needs a bound of its own).
_MAX_INDEX_BYTES = 32 << 20
MAX_INDEX_ENTRIES = 1_000_000
MAX_INDEX_DIRS = 10_000
# An index body is read into leases of the memory budget that grow with it from this size.
_INDEX_FIRST_LEASE = 256 << 10
# A probe's body is one byte; a server that sends more is read no further than this.
_PROBE_BODY_LIMIT = 64 << 10

IndexEntry = tuple[str, str | None, int | None]
"""One entry of a JSON directory index: (name, type, size)."""
# list_dir answers a directory in pages of this many entries (files and subdirectories), in
# name order, as GCS and S3 do: the files of one page are HEADed, and the namespace holds no
# more than a page of a directory too large for its cache (inodes.py).
PAGE_ENTRIES = 1000
# A directory of more than one page keeps its sorted entries for the pages that follow (its
# index is not fetched and parsed again for each), counted in the memory budget: at most this
# many directories at a time, each dropped when its last page is listed, when idle this long,
# or when an index to be parsed needs its room. A dropped one is fetched again at the next page.
_MAX_KEPT = 4
_KEPT_IDLE = 300.0
KEPT_ENTRY_BYTES = 160
"""Bytes of Python objects per kept entry beside its name's characters (the name's str header,
the (name, size) tuple, the size, the list slot): what a kept directory is counted for."""
LISTED_OBJECT_BYTES = 320
"""Bytes of Python objects per ObjectInfo list_objects gathers beside its name's and version's
characters (the dataclass, its strs' headers, size, mtime, the list slot): ~245 measured."""
# list_objects charges what it gathers to the budget in leases of at least this much.
_FOUND_LEASE = 256 << 10
# Larger socket reads than httpcore's 64 KiB: see private/httpcore_read_size.py.
_READ_SIZE = 512 << 10
# One field of a web server's mtime/size ETag: hex, at most 64 bits (a hash is longer).
_HEX_FIELD_RE = re.compile(r"[0-9a-f]{1,16}")


# --- versions: what a read pins


def etag_is_strong(etag: str | None, size: int, last_modified: str | None) -> bool:
    """Whether ``etag`` may stand for the bytes: not ``W/``, and not one of the web servers'
    default ETags made of the file's modification time and size only, which a replacement
    with the same size and mtime (``cp -p``, ``rsync -t``, SOURCE_DATE_EPOCH builds) keeps:
    nginx's ``"MTIME-SIZE"`` (hex seconds, matching Last-Modified) and Apache's
    ``"SIZE-MTIME"`` / ``"INODE-SIZE-MTIME"`` (hex, MTIME in microseconds)."""
    if not etag or etag.startswith("W/"):
        return False
    parts = etag.strip('"').split("-")
    if not 2 <= len(parts) <= 3 or not all(_HEX_FIELD_RE.fullmatch(p) for p in parts):
        return True
    numbers = [int(p, 16) for p in parts]
    modified = _mtime(last_modified) if last_modified else None
    if len(numbers) == 2 and numbers[1] == size and modified is not None and numbers[0] == int(modified):
        return False  # nginx
    size_at = 0 if len(numbers) == 2 else 1
    # Apache: the size field, and an mtime (µs) in the second of Last-Modified when it is sent.
    return not (numbers[size_at] == size and (modified is None or numbers[size_at + 1] // 1_000_000 == int(modified)))


def make_version(size: int, etag: str | None, last_modified: str | None, run: str = "") -> str:
    """``SIZE/"etag"`` for a strong ETag (:func:`etag_is_strong`), else ``SIZE/lm:LAST-MODIFIED``
    (possibly empty) followed by ``run``, this daemon's marker for weak versions (see weak.py)."""
    if etag_is_strong(etag, size, last_modified):
        return f"{size}/{etag}"
    return f"{size}/lm:{last_modified or ''}{run}"


def parse_version(version: str) -> tuple[int, str | None, str | None]:
    """(size, strong ETag or None, Last-Modified or None) of a :func:`make_version` string."""
    size, _, tag = without_run_marker(version).partition("/")
    if tag.startswith("lm:"):
        return int(size), None, tag[3:] or None
    return int(size), tag, None


def _mtime(last_modified: str | None) -> float:
    if not last_modified:
        return 0.0
    try:
        return email.utils.parsedate_to_datetime(last_modified).timestamp()
    except (TypeError, ValueError, IndexError):
        return 0.0


def _find_cause(exc: BaseException, cls: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, cls):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _split_header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip(), value.strip()


class HTTPBackend(BackendSkeleton):
    """Files below one http(s) URL; names are relative to the URL's directory."""

    def __init__(
        self,
        source: Source,
        *,
        manifest: Path | None = None,
        ca_cert: Path | None = None,
        headers: Sequence[str] = (),
        read_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_concurrency: int = 8,
        persist_weak_versions: bool = False,
        cross_origin_redirects: bool = False,
        budget: MemoryCache | None = None,
    ) -> None:
        super().__init__(source, threads=max_concurrency)  # the data GETs' worker threads
        # HEADs (on trio) have their own limit: they never wait behind a full pipe of GETs.
        self._head_limiter = trio.CapacityLimiter(max(1, max_concurrency))
        self._read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._manifest = ManifestFile(manifest, self._lease_for) if manifest is not None else None
        self._budget = budget  # directory index bodies take their bytes from it
        self._run = run_marker(persist_weak_versions)
        # The directory every name is relative to, with its path as the user spelled it.
        self._base = source.url.rsplit("/", 1)[0] + "/" if source.file else source.url
        self._warned: set[str] = set()
        # Directories of more than one page, sorted, kept for their next pages (list_dir).
        self._kept: dict[int, _Kept] = {}
        self._kept_serial = 0
        self._walks_hold = 0  # of the budget, by list_objects calls for what they found
        raise_read_size(_READ_SIZE)
        context = self._ssl_context(ca_cert) if source.scheme == "https" else None
        client_headers = [("User-Agent", f"modelfs/{__version__}"), ("Accept-Encoding", "identity")]
        # The user's headers go only to the source's origin (redirects.py), so they are added
        # per request, not to the client.
        self._user_headers = [_split_header(line) for line in headers]
        self._secrets = [value for _, value in self._user_headers if len(value) >= 4]
        self._redirects = RedirectPolicy(
            self._base, cross_origin=cross_origin_redirects, connect_timeout=connect_timeout
        )
        # Data GETs in worker threads on http.client (http_media.py), unless a proxy applies
        # (httpx honours the proxy variables; http.client does not).
        self._media: HTTPMedia | None = None
        if not proxied(self._base):
            self._media = HTTPMedia(
                ssl_context=context if context is not None else self._ssl_context(ca_cert),
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_idle=max_concurrency + 4,
                receive_chunk=receive_chunk(max_concurrency),
                headers=dict(client_headers),
                user_headers=self._user_headers,
                redirects=self._redirects,
            )
        self._client = httpx.AsyncClient(
            headers=client_headers,
            verify=context if context is not None else True,
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=None),
            limits=httpx.Limits(max_connections=max_concurrency + 4, max_keepalive_connections=max_concurrency + 4),
            follow_redirects=False,  # followed by _send, by the rules of redirects.py
        )

    @staticmethod
    def _ssl_context(ca_cert: Path | None) -> ssl.SSLContext:
        import certifi

        context = ssl.create_default_context(cafile=certifi.where())
        # What httpx would trust from the environment too (it reads these when trust_env).
        cert_file, cert_dir = os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
        if cert_file or cert_dir:
            try:
                context.load_verify_locations(cafile=cert_file or None, capath=cert_dir or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"SSL_CERT_FILE / SSL_CERT_DIR: not usable ({exc})") from None
        if ca_cert is not None:
            try:
                context.load_verify_locations(cafile=str(ca_cert))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"--ca-cert {ca_cert}: not a readable PEM certificate file ({exc})") from None
        return context

    def _url(self, name: str) -> str:
        if self._source.file:
            return self._source.url + (f"?{self._source.query}" if self._source.query else "")
        return self._base + quote(name, safe=_PCHAR_SAFE)

    def _display(self, name: str) -> str:
        """The URL of ``name`` as it may be shown: never with a query string."""
        return self._source.url if self._source.file else self._base + name

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        """Log ``message`` the first time ``key`` is seen (of the first 1,000 keys: the set is bounded)."""
        if key not in self._warned and len(self._warned) < _MAX_WARNINGS:
            self._warned.add(key)
            log.warning(message, *args)

    # --- error classification: the only place that knows httpx's exceptions and HTTP statuses.

    def classify(self, exc: BaseException, what: str, *, reading: bool = False) -> BackendError:
        error = self._classify(exc, what)
        text = str(error)
        if any(secret in text for secret in self._secrets):  # e.g. h11 quoting an illegal header value
            for secret in self._secrets:
                text = text.replace(secret, "<hidden>")
            return type(error)(text)
        return error

    def _classify(self, exc: BaseException, what: str) -> BackendError:
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, httpx.TimeoutException):
            return TransientError(f"{what}: timed out")
        cert = _find_cause(exc, ssl.SSLCertVerificationError)
        if cert is not None:
            reason = getattr(cert, "verify_message", None) or "certificate verify failed"
            return BackendError(
                f"{what}: TLS certificate verification failed ({reason}); pass --ca-cert FILE to trust a private CA"
            )
        if isinstance(exc, (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.LocalProtocolError)):
            return BackendError(f"{what}: {type(exc).__name__}")  # their text may quote a URL or header
        if isinstance(exc, http.client.InvalidURL):
            return BackendError(f"{what}: {type(exc).__name__}")  # its text may quote a URL
        if isinstance(exc, (OSError, EOFError, http.client.HTTPException)) and not isinstance(exc, ssl.SSLError):
            return TransientError(f"{what}: {short_reason(exc)}")
        if isinstance(exc, (httpx.TransportError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)):
            text = str(exc) or type(exc).__name__
            return TransientError(f"{what}: {text[:200]}")
        return BackendError(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")

    # --- requests: redirects followed here, by the rules of redirects.py

    async def _send(self, method: str, url: str, headers: dict[str, str], what: str) -> httpx.Response:
        """A streamed response to ``method url`` after the redirects the policy allows; the
        caller closes it. ``--header`` values go only to the source's origin."""
        current = httpx.URL(url)
        same_origin = True
        addresses: tuple[str, ...] | None = None  # where the policy checked the current target
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers)
            if same_origin:
                sent.update(self._user_headers)
            resp = await self._send_once(method, current, sent, addresses)
            location = resp.headers.get("location")
            if resp.status_code not in (301, 302, 303, 307, 308) or location is None:
                return resp
            await resp.aclose()
            try:
                target = current.join(location)
            except httpx.InvalidURL:
                raise BackendError(f"{what}: redirected to an invalid URL") from None
            verdict = await self._redirects.verdict(current, target, what)
            same_origin = verdict.same_origin and same_origin
            addresses = verdict.addresses
            if resp.status_code == 303 and method != "HEAD":
                method = "GET"
            current = target
        raise BackendError(f"{what}: more than {MAX_REDIRECTS} redirects")

    async def _send_once(
        self, method: str, url: httpx.URL, headers: dict[str, str], addresses: tuple[str, ...] | None
    ) -> httpx.Response:
        """One request, streamed. A plain-http redirect target the policy checked is connected
        to at the addresses it checked, not at a fresh resolution of its name (which could now
        point elsewhere: DNS rebinding), with the name in Host. Over TLS the certificate check
        for the name already keeps a rebound name from reaching another server (and httpx's
        pool, keyed by address, would let a session made for one name serve another); behind
        a proxy from the environment the proxy resolves."""
        if addresses is None or url.scheme != "http" or proxied(str(url)):
            return await self._answer(self._client.build_request(method, url, headers=headers))
        if not addresses:
            raise OSError(f"{url.host}: the name does not resolve")
        pinned_headers = {**headers, "Host": url.netloc.decode("ascii")}
        error: httpx.ConnectError | None = None
        for address in addresses:  # in order, as a connection to the name would try them
            request = self._client.build_request(method, url.copy_with(host=address), headers=pinned_headers)
            try:
                return await self._answer(request)
            except httpx.ConnectError as exc:
                error = exc
        assert error is not None
        raise error

    async def _answer(self, request: httpx.Request) -> httpx.Response:
        """``request`` sent, its answer's status and headers read (the body streams later):
        within the connect and read timeouts in all. httpx bounds each wait for a byte only,
        and skips interim answers (``100 Continue``) without end: a server sending them
        forever would hold a lookup forever."""
        with trio.move_on_after(self._connect_timeout + self._read_timeout):
            return await self._client.send(request, stream=True)
        raise TimeoutError(f"no answer within {self._connect_timeout + self._read_timeout:g} s")

    @asynccontextmanager
    async def _stream(self, method: str, url: str, headers: dict[str, str], what: str) -> AsyncIterator[httpx.Response]:
        resp = await self._send(method, url, headers, what)
        try:
            yield resp
        finally:
            await resp.aclose()

    async def _head(self, url: str, what: str) -> httpx.Response:
        """A HEAD's answer: its status and headers (the connection goes back to the pool).

        Its (always empty) body is read before the answer is closed: an answer closed unread
        closes its connection too, and every HEAD of a listing then paid a new connection
        (and TLS handshake): 30,000 of them for a directory of 30,000 files."""
        async with self._stream("HEAD", url, {}, what) as resp:
            await resp.aread()
            return resp

    # --- metadata

    async def _stat(self, name: str, listed_size: int | None = None) -> ObjectInfo:
        what = self._display(name)
        async with self._head_limiter:
            try:
                resp = await self._head(self._url(name), what)
            except Exception as exc:
                raise self.classify(exc, what) from None
            headers = resp.headers
            length = headers.get("content-length")
            if resp.status_code in (403, 405, 501) or (resp.status_code == 200 and not (length or "").isdigit()):
                # HEAD refused (a presigned GET URL answers 403) or no size: the first byte tells.
                size, etag, last_modified = await self._probe(name, what)
            else:
                error = metadata_status_error(resp.status_code, what)
                if error is not None:
                    raise error
                size = int(length or 0)
                etag, last_modified = headers.get("etag"), headers.get("last-modified")
                if size > 0 and headers.get("accept-ranges", "").strip().lower() != "bytes":
                    await self._probe(name, what)  # raises if the server ignores Range
        if etag is not None and not etag.startswith("W/") and not etag_is_strong(etag, size, last_modified):
            # The server's default ETags (nginx, Apache) are of this kind: one line per mount.
            self._warn_once(
                "etag:mtime-size",
                "%s: the server's ETag %s is made of the file's modification time and size only, "
                "so it is a weak version like Last-Modified: changes are detected by Last-Modified and "
                "size only, blocks are not reused from the disk cache after a restart%s and not read "
                "through a cache tier (this applies to every such file; this is logged once)",
                what,
                etag,
                "" if self._run else " (--persist-weak-versions: they are)",
            )
        elif etag is None or etag.startswith("W/"):
            self._warn_once(
                f"etag:{name}",
                "%s has no strong ETag: changes are detected by %s only, and its blocks are not "
                "reused from the disk cache after a restart%s",
                what,
                "Last-Modified and size" if last_modified else "size",
                "" if self._run else " (--persist-weak-versions: they are)",
            )
        if listed_size is not None and listed_size != size:
            self._warn_once(
                f"size:{name}",
                "%s: the manifest says %d bytes, the server %d: using the server's",
                what,
                listed_size,
                size,
            )
        return ObjectInfo(name, size, _mtime(last_modified), make_version(size, etag, last_modified, self._run))

    async def _probe(self, name: str, what: str) -> tuple[int, str | None, str | None]:
        """GET the first byte: (size, ETag, Last-Modified); BackendError if Range is ignored."""
        try:
            async with self._stream("GET", self._url(name), {"Range": "bytes=0-0"}, what) as resp:
                headers = resp.headers
                status = resp.status_code
                etag, last_modified = headers.get("etag"), headers.get("last-modified")
                if status == 206:
                    parsed = parse_content_range(headers.get("content-range"))
                    if parsed is None or parsed[2] is None:
                        raise BackendError(
                            f"{what}: the server does not tell the file's size "
                            f"(Content-Range {headers.get('content-range')!r})"
                        )
                    await _drain(resp, self._read_timeout)  # one byte: keeps the connection reusable
                    return parsed[2], etag, last_modified
                if status == 416:
                    match = _UNSATISFIED_RANGE_RE.fullmatch(headers.get("content-range", ""))
                    if match:
                        return int(match.group(1)), etag, last_modified
                if status == 200:
                    length = headers.get("content-length", "")
                    if length in ("0", "1"):  # the whole file is what was asked for
                        await _drain(resp, self._read_timeout)
                        return int(length), etag, last_modified
                    raise no_range_support(what)
                error = metadata_status_error(status, what)
                raise error if error is not None else BackendError(f"{what}: unexpected HTTP {status}")
        except Exception as exc:
            raise self.classify(exc, what) from None

    async def stat(self, name: str) -> ObjectInfo:
        if self._source.file and name != self._source.file:
            raise NotFound(f"{self._base}{name}: not found")
        return await self._stat(name)

    # --- listing

    @property
    def walk_dir_limit(self) -> int | None:
        """Directories one walk of everything may list (``walk_objects``): an index tree may have no end."""
        return MAX_INDEX_DIRS if self._manifest is None and not self._source.file else None

    async def list_objects(self) -> list[ObjectInfo]:
        """Every file below the base URL, by the walk of ``modelfs warm`` (modelfs/walk.py):
        one page of a directory at a time, with :meth:`list_dir`'s bounds and charges (a
        directory's rest kept in the budget between its pages). What it gathers is charged to
        the budget as it grows (a one-line error when it cannot fit) until it is returned;
        the caller holds it then. Nothing in the daemon asks for every file at once (a mount
        lists what is looked up; warm and --eager-model stream the walk)."""
        if self._source.file:
            return [await self._stat(self._source.file)]
        found: list[ObjectInfo] = []
        leases: list[Lease] = []
        charge = 0  # of the objects found since the last lease (at most _FOUND_LEASE)
        walk = cast("AsyncGenerator[ObjectInfo, None]", walk_objects(self, retry_deadline=0))
        try:
            async with aclosing(walk):  # (ended here when this fails, not by the garbage collector)
                async for info in walk:
                    found.append(info)
                    charge += listed_charge(info)
                    if charge >= _FOUND_LEASE:
                        lease = await self._hold_found(charge)
                        leases += [lease] if lease is not None else []
                        charge = 0
                    if len(found) > MAX_INDEX_ENTRIES:
                        raise BackendError(f"{self._base}: more than {MAX_INDEX_ENTRIES} files")
            return found
        finally:
            for lease in leases:
                self._walks_hold -= lease.charge
                lease.release()

    async def _hold_found(self, charge: int) -> Lease | None:
        """``charge`` more of the budget for what list_objects found, counted in _walks_hold."""
        lease = await self._lease_for(charge, "the list of every file", 0)
        if lease is not None:
            self._walks_hold += lease.charge
        return lease

    async def _lease_for(self, charge: int, holding: str, beside: int) -> Lease | None:
        """``charge`` bytes of the budget for ``holding`` (None without a budget), beside
        ``beside`` the caller holds already: a one-line error if they cannot fit together."""
        return await self._lease(0, self._base, holding, extra=charge, beside=beside)

    async def _lease(self, size: int, what: str, holding: str, *, extra: int = 0, beside: int = 0) -> Lease | None:
        """A buffer of ``size`` bytes (and ``extra`` more counted) from the budget for
        ``holding`` (None without a budget); a one-line error naming ``what`` if it cannot fit
        beside the ``beside`` bytes the caller holds already."""
        if self._budget is None:
            return None
        from modelfs.cache.memory import BufferKind

        self._check_fits(size, what, holding, extra=extra + beside)
        return await self._budget.lease(size, BufferKind.INDEX, extra=extra)

    async def _stat_all(
        self, files: Sequence[tuple[str, int | None]], failed: Callable[[str, BackendError], BackendError | None]
    ) -> list[ObjectInfo]:
        """``files`` HEADed, in their order, by as many worker tasks as HEADs may run at once
        (not a task per file: each would hold its frame while it waits for the limiter, ~4 KiB
        a file, 200 MiB for a directory of 50,000). ``failed`` judges a HEAD's error: the
        error the whole call fails with (the first one; the other HEADs are cancelled), or
        None to leave that file out."""
        results: list[ObjectInfo | None] = [None] * len(files)
        errors: list[BaseException] = []
        work = iter(enumerate(files))  # shared: each worker takes the next file

        async def worker() -> None:
            for index, (name, size) in work:
                try:
                    results[index] = await self._stat(name, size)
                except BackendError as exc:
                    error = failed(name, exc)
                    if error is not None:
                        errors.append(error)
                        nursery.cancel_scope.cancel()
                        return

        async with trio.open_nursery() as nursery:
            for _ in range(min(len(files), int(self._head_limiter.total_tokens))):
                nursery.start_soon(worker)
        if errors:
            raise errors[0]
        return [info for info in results if info is not None]

    async def list_dir(self, prefix: str, token: str | None = None, *, limit: int | None = None) -> ListPage:
        """One page of a directory: the manifest's entries below ``prefix``, or the server's JSON index of it.

        Pages hold PAGE_ENTRIES entries, in name order. An index directory of more than one
        keeps its sorted entries, counted in the budget, for the pages that follow (the token
        names the kept entries and the last name listed: where they are gone, the index is
        read again and listed on after that name); a manifest's pages are each cut from the
        parsed manifest (http_manifest.py), after the token's last name. Each file of the
        page is HEADed for its size and version (within the connection limit); a probe
        (``limit``) only tells whether the directory exists, with a placeholder, and HEADs
        nothing. A file whose HEAD fails for
        good (403, a bad answer) is left out with one warning, as one gone since the index was
        read is: one unreadable file must not make its directory unlistable (a lookup of it
        gives its own error). A transient failure fails the page, to be retried.
        """
        if self._source.file:
            return ListPage([await self._stat(self._source.file)] if not prefix else [], [])
        number: int | None = None
        after: str | None = None
        if token is not None and limit is None:
            text, sep, after = token.partition(":")
            if not sep or not text.isdigit():
                raise BackendError(f"{self._base}{prefix}: not a continuation token of this listing")
            number = int(text)
        if self._manifest is not None:
            manifest = await self._manifest.current()
            # (cut from the parsed manifest, whose room may be taken back at the next checkpoint)
            chunk, more = manifest.children(prefix, after, PAGE_ENTRIES if limit is None else 1)
            del manifest
            if not chunk:
                return ListPage([], [])  # nothing in the manifest below it
            next_token = f"0:{chunk[-1][0]}" if more else None
        else:
            paged = await self._index_page(prefix, number, after, probe=limit is not None)
            if paged is None:
                return ListPage([], [])  # a missing subdirectory
            chunk, next_token = paged
        if limit is not None:
            return ListPage([ObjectInfo(prefix, 0, 0.0, "0/lm:")] if prefix else [], [])
        files = [(prefix + key, size) for key, size in chunk if not key.endswith("/")]
        prefixes = [prefix + key for key, _ in chunk if key.endswith("/")]
        del chunk

        def failed(name: str, exc: BackendError) -> BackendError | None:
            if isinstance(exc, NotFound):
                if self._manifest is not None:
                    return NotFound(f"{self._display(name)}: in the manifest but not on the server")
                log.debug("%s: gone since the index was read: %s", name, exc)
                return None
            if isinstance(exc, AccessDenied):
                if self._manifest is not None:  # (named by the user: as a missing one, an error)
                    return exc
                # A file the server lists but will not serve (nginx cannot read it).
                self._warn_once(f"unlisted {name}", "%s; not listed in its directory", exc)
                return None
            # Transient (the page is retried), or an answer no file here could be read
            # with (Range ignored, a bad size): the listing fails with that one line.
            return exc

        return ListPage(await self._stat_all(files, failed), prefixes, next_token)

    async def _index_page(
        self, prefix: str, number: int | None, after: str | None, *, probe: bool
    ) -> tuple[list[DirEntry], str | None] | None:
        """The page of the directory's JSON index after the name ``after`` and its next token,
        from the entries kept as ``number`` if they still are, else from the index read again;
        None if the directory is missing (a probe's page: no entries)."""
        self._drop_idle()
        kept = self._kept.get(number) if number is not None else None
        if kept is None or kept.prefix != prefix:
            kept = await self._index_dir(prefix)
            if kept is None:
                return None
            if probe:
                kept.release()
                return [], None
        entries = kept.entries
        start = bisect_right(entries, after, key=itemgetter(0)) if after is not None else 0
        chunk = entries[start : start + PAGE_ENTRIES]
        more = start + PAGE_ENTRIES < len(entries)
        del entries
        next_token: str | None = None
        if more:
            if kept.number is None:
                self._keep(kept, prefix)
            kept.used_at = trio.current_time()
            next_token = f"{kept.number}:{chunk[-1][0]}"
        else:
            self._drop(kept)
        return chunk, next_token

    def _keep(self, kept: _Kept, prefix: str) -> None:
        """Hold ``kept`` for the pages after the first (the oldest beyond _MAX_KEPT go)."""
        self._kept_serial += 1
        kept.number = self._kept_serial
        kept.prefix = prefix
        self._kept[kept.number] = kept
        if kept.lease is not None:
            # Kept only to be quicker (a later page reads the index again without it): any lease
            # that finds no room takes it back (MemoryCache), an index's and a block's alike, so a
            # kept directory nobody lists on never makes anything wait for room.
            kept.lease.droppable(functools.partial(self._drop, kept))
        while len(self._kept) > _MAX_KEPT:
            self._drop(next(iter(self._kept.values())))

    def _drop(self, kept: _Kept) -> None:
        if kept.number is not None:
            self._kept.pop(kept.number, None)
        kept.release()

    def _drop_idle(self) -> None:
        now = trio.current_time()
        for kept in [k for k in self._kept.values() if now - k.used_at > _KEPT_IDLE]:
            self._drop(kept)

    async def _index_dir(self, rel: str) -> _Kept | None:
        """The files and subdirectories of one JSON index, sorted; None if a subdirectory is missing.

        Its lease (the budget's count of the sorted entries) is the caller's to release."""
        what = self._base + rel
        deep = rel.count("/") >= _MAX_INDEX_DEPTH
        status, listed = await self._get_index(rel, what, deep=deep)
        if status == 404 and rel:
            return None
        error = metadata_status_error(status, what)
        if error is not None:
            raise error
        if not isinstance(listed, _Kept):
            if rel:
                return None  # a file, not a directory: nothing below it
            raise BackendError(
                f"{what}: the server sends no JSON directory index (nginx 'autoindex_format "
                "json') for this URL: list the files with --manifest FILE"
            )
        if listed.skipped:
            self._warn_once(f"depth:{rel}", "%s: deeper than %d directories: not listed", what, _MAX_INDEX_DEPTH)
        return listed

    async def _get_index(self, rel: str, what: str, *, deep: bool) -> tuple[int, _Kept | None]:
        """GET one JSON directory index: its status and its entries as one directory lists
        them (:func:`sorted_index`; None: not a JSON list).

        The body goes into leases of the memory budget that grow with it (at most
        _MAX_INDEX_BYTES; more is a BackendError) and is parsed in a worker thread, with the
        parser's objects counted too. Sorted entries come with a lease of their own, taken as
        those are released (they hold more): the caller releases it. Without a budget
        (``modelfs warm``) the same bounds hold.
        """
        url = self._base + quote(rel, safe=_PCHAR_SAFE)
        leases: list[Lease] = []
        try:
            async with self._stream("GET", url, {"Accept": "application/json"}, what) as resp:
                if resp.status_code != 200:
                    return resp.status_code, None
                declared = resp.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > _MAX_INDEX_BYTES:
                    raise BackendError(f"{what}: the directory index is larger than {_MAX_INDEX_BYTES >> 20} MiB")
                size = int(declared) if declared.isdigit() else _INDEX_FIRST_LEASE
                buf = await self._index_buffer(max(size, 1), leases, what)
                used = 0
                progress = Progress(self._read_timeout, trio.current_time)  # (a body that drips is a stall too)
                async with aclosing(cast(AsyncGenerator[bytes, None], resp.aiter_bytes())) as chunks:
                    async for chunk in chunks:
                        progress.add(len(chunk))
                        if used + len(chunk) > len(buf):
                            if used + len(chunk) > _MAX_INDEX_BYTES:
                                raise BackendError(
                                    f"{what}: the directory index is larger than {_MAX_INDEX_BYTES >> 20} MiB"
                                )
                            bigger = await self._index_buffer(
                                min(_MAX_INDEX_BYTES, max(2 * len(buf), used + len(chunk))), leases, what
                            )
                            bigger[:used] = buf[:used]
                            buf = bigger
                            if len(leases) > 1:
                                leases.pop(0).release()
                        buf[used : used + len(chunk)] = chunk
                        used += len(chunk)
            # The leased buffer is this task's alone until released: threads may read it. What
            # parsing keeps is counted before it is made: an entry per object at most, and
            # their names (modelfs.jsonscan: nothing else is decoded).
            objects = await trio.to_thread.run_sync(count_index_objects, buf[:used])
            await self._index_buffer(0, leases, what, extra=objects * INDEX_ENTRY_BYTES + used)
            kept = await trio.to_thread.run_sync(sorted_index, buf[:used], deep)
            if kept is None:
                return 200, None
            if len(kept.entries) > MAX_INDEX_ENTRIES:
                raise BackendError(f"{what}: the index lists more than {MAX_INDEX_ENTRIES} entries")
            if self._budget is not None:
                from modelfs.cache.memory import BufferKind

                for lease in leases:
                    lease.release()
                leases.clear()
                # (Never more than the leases just released held: no wait.)
                kept.lease = await self._budget.lease(0, BufferKind.INDEX, extra=kept.charge)
            return 200, kept
        except BackendError:
            raise
        except Exception as exc:
            raise self.classify(exc, what) from None
        finally:
            for lease in leases:
                lease.release()

    def _check_fits(self, size: int, what: str, holding: str, *, extra: int = 0) -> None:
        """A one-line error unless a lease of ``size`` (and ``extra``) can be lent beside what
        list_objects calls hold (until they end: a wait for room they hold would never end)."""
        if self._budget is not None and not self._budget.can_lease(size, extra=extra + self._walks_hold):
            raise BackendError(f"{what}: {holding} does not fit in the memory budget (raise --memory-cache)")

    async def _index_buffer(self, size: int, leases: list[Lease], what: str, *, extra: int = 0) -> memoryview:
        """A buffer of ``size`` bytes (and ``extra`` more counted) for the directory index,
        kept in ``leases``; a one-line error if it cannot fit beside them."""
        beside = sum(lease.charge for lease in leases)
        lease = await self._lease(size, what, "the directory index", extra=extra, beside=beside)
        if lease is None:
            return memoryview(bytearray(size))
        leases.append(lease)
        return lease.view

    # --- the data path

    def _describe(self, name: str, version: str, offset: int, length: int) -> str:
        return f"{self._display(name)} [{offset}, +{length}]"

    def _pinned_size(self, version: str) -> int | None:
        return parse_version(version)[0]

    @property
    def joins_reads(self) -> bool:
        """One GET fills several block buffers (the body is copied chunk by chunk anyway)."""
        return True

    async def _read_range(self, name: str, version: str, request: RangeRequest, dest: memoryview) -> None:
        await self._read_joined(name, version, request, (dest,), None)

    async def _read_joined(
        self, name: str, version: str, request: RangeRequest, dests: Sequence[memoryview], sums: list[int] | None
    ) -> None:
        """One GET of ``request`` into ``dests`` in turn; with ``sums``, their CRC32Cs where the
        transport computes them as the bytes arrive (plain HTTP in worker threads)."""
        _, etag, last_modified = parse_version(version)
        what, length = request.what, request.length
        headers = {"Range": request.header}
        if etag is not None:
            headers["If-Match"] = etag
        elif last_modified is not None:
            headers["If-Unmodified-Since"] = last_modified

        def pinned(sent: Headers) -> None:
            sent_etag = sent.get("etag")
            if etag is not None and sent_etag is not None and sent_etag != etag:
                raise VersionChanged(f"{what}: changed on the server (ETag {etag} is now {sent_etag})")
            sent_modified = sent.get("last-modified")
            if etag is None and last_modified is not None and sent_modified not in (None, last_modified):
                raise VersionChanged(f"{what}: changed on the server (Last-Modified is now {sent_modified})")

        if self._media is not None:

            def check(status: int, sent: Headers) -> None:
                check_range_response(status, sent, request, pinned=pinned)

            try:
                await self.run_blocking(self._media.get_into, self._url(name), headers, dests, check, what, sums)
                return
            except NeedsProxy:
                pass  # redirected where a proxy applies: this GET goes through httpx, below
            except Exception as exc:
                raise self.classify(exc, what, reading=True) from None
        try:
            async with self._stream("GET", self._url(name), headers, what) as resp:
                check_range_response(resp.status_code, resp.headers, request, pinned=pinned)
                got = 0
                buffers = iter(dests)
                dest, filled = next(buffers), 0
                progress = Progress(self._read_timeout, trio.current_time)  # (a body that drips is a stall too)
                async for chunk in resp.aiter_raw():
                    if got + len(chunk) > length:
                        raise TransientError(f"{what}: the server sent more than {length} bytes")
                    got += len(chunk)
                    progress.add(len(chunk))
                    view = memoryview(chunk)
                    while view:  # a chunk may end one block's buffer and start the next's
                        if filled == len(dest):
                            dest, filled = next(buffers), 0
                        n = min(len(view), len(dest) - filled)
                        dest[filled : filled + n] = view[:n]
                        filled += n
                        view = view[n:]
                if got != length:
                    raise TransientError(f"{what}: body ended after {got} of {length} bytes")
        except Exception as exc:
            raise self.classify(exc, what, reading=True) from None

    def tier_target(self, name: str, version: str) -> TierTarget | None:
        """The GET a cache tier serves for ``name`` at ``version`` (--cache-url): keyed by path,
        strong ETag and size; a file without a strong ETag, or a URL with a query string, is
        read from the origin."""
        size, etag, _ = parse_version(version)
        if etag is None or self._source.query:
            # A query string (a presigned URL's signature, a token) is a secret: it never goes
            # to the tier, in plain HTTP, into its log and its cache key (see open_backend).
            return None
        path = urlsplit(self._url(name)).path
        return TierTarget(
            path, {"If-Match": etag, SIZE_HEADER: str(size)}, header_pinned("etag", etag, "ETag"), size=size
        )

    def abort(self) -> None:
        """The daemon is stopping: data GETs in flight fail now, not at the read timeout."""
        if self._media is not None:
            self._media.abort()

    async def aclose(self) -> None:
        for kept in list(self._kept.values()):
            self._drop(kept)
        if self._manifest is not None:
            self._manifest.close()
        if self._media is not None:
            self._media.close()
        await self._client.aclose()


async def _drain(resp: httpx.Response, timeout: float) -> None:
    """Read what is left of a small body (a probe's one byte), at most _PROBE_BODY_LIMIT and
    for at most ``timeout`` seconds: the answer is already in the headers, so a server that
    sends more, or drips or holds the rest, is not waited for (the connection is then closed,
    not reused)."""
    seen = 0
    with trio.move_on_after(timeout):
        async with aclosing(cast(AsyncGenerator[bytes, None], resp.aiter_raw())) as chunks:
            async for chunk in chunks:
                seen += len(chunk)
                if seen > _PROBE_BODY_LIMIT:
                    break


_INDEX_OPEN = re.compile(rb"%(WS)b\[%(WS)b(\]%(WS)b\Z)?+" % JSON)
# One element of the list: a flat object (groups 1 and 2 its braces) or a scalar, and the
# comma or closing bracket after it (group 3).
_INDEX_ELEMENT = re.compile(
    rb"(?:(\{)%(WS)b(?:%(FIELD)b%(WS)b(?:,%(WS)b%(FIELD)b%(WS)b)*+)?+(\})|%(SCALAR)b)%(WS)b([,\]])%(WS)b" % JSON
)
# A field of an object the element pattern accepted: its key and value tokens. From a brace
# or comma the next quote opens a key, so the fields are found in order, none inside a string.
_INDEX_FIELD = re.compile(rb"(%(STRING)b)%(WS)b:%(WS)b((?>%(SCALAR)b|%(ARRAY)b))" % JSON)
_INDEX_END = re.compile(rb"%(WS)b\Z" % JSON)
_INDEX_KEYS = {b'"name"': "name", b'"type"': "type", b'"size"': "size"}
_INDEX_SIZE = re.compile(rb"[0-9]{1,20}")

INDEX_ENTRY_BYTES = 256
"""Bytes of Python objects per entry of a parsed index beside its name (the tuple, the type
string, the size, the list slot): counted in the budget while the index is parsed."""


class _Kept:
    """One directory's entries in name order (``DirEntry``), as list_dir pages them; while
    kept for the pages after the first, ``number`` names them in the continuation token."""

    __slots__ = ("entries", "charge", "lease", "number", "prefix", "used_at", "skipped")

    def __init__(self, entries: list[DirEntry], *, skipped: bool = False) -> None:
        self.entries = entries
        self.charge = kept_charge(entries)  # what the budget counts for them
        self.lease: Lease | None = None
        self.number: int | None = None
        self.prefix = ""
        self.used_at = 0.0
        self.skipped = skipped  # subdirectories left out (too deep)

    def release(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release()


def listed_charge(info: ObjectInfo) -> int:
    """What ``info`` takes in memory, at most (see LISTED_OBJECT_BYTES)."""
    return LISTED_OBJECT_BYTES + str_bytes(info.name) + str_bytes(info.version)


def kept_charge(entries: list[DirEntry]) -> int:
    """What ``entries`` take in memory, at most: KEPT_ENTRY_BYTES each and their names'
    characters (as their str holds them: a name of ASCII and one emoji takes four bytes a
    character, four times its UTF-8 length)."""
    return len(entries) * KEPT_ENTRY_BYTES + sum(str_bytes(key) for key, _ in entries)


def sorted_index(body: bytes | memoryview, deep: bool) -> _Kept | None:
    """The entries of a JSON directory index as one directory lists them: names (a
    subdirectory's with '/' after it) and sizes, in name order; None if it is not an index.
    Unusable names are left out, and with ``deep`` every subdirectory. The parsed entries are
    let go one by one as they are turned into these (never both whole at once)."""
    parsed = parse_index(body)
    if parsed is None:
        return None
    entries: list[DirEntry] = []
    skipped = False
    while parsed:
        name, kind, size = parsed.pop()
        if not name or "/" in name or name in (".", ".."):
            continue
        if kind == "directory":
            if deep:
                skipped = True
                continue
            entries.append((name + "/", None))
        elif kind == "file":
            entries.append((name, size))
    entries.sort(key=itemgetter(0))
    return _Kept(entries, skipped=skipped)


def count_index_objects(body: bytes | memoryview) -> int:
    """The most entries ``body`` can parse into (its opening braces), without a copy of it."""
    return sum(1 for _ in re.finditer(rb"\{", body))


def parse_index(body: bytes | memoryview) -> list[IndexEntry] | None:
    """The entries of a JSON directory index (nginx ``autoindex_format json``): a list of
    flat objects with ``name``, ``type`` and ``size``, one (name, type, size) tuple each.

    Matched in place (modelfs.jsonscan): nothing but the kept fields is ever decoded, so a
    hostile body costs no more than its entries. None when the body is not such a list (an
    element that is an array or holds one, or an object, is not); scalar elements and
    objects without a string name are left out, a size that is not a whole number is None.
    """
    opened = _INDEX_OPEN.match(body)
    if opened is None:
        return None
    if opened.group(1) is not None:
        return []
    entries: list[IndexEntry] = []
    pos = opened.end()
    try:
        while True:
            element = _INDEX_ELEMENT.match(body, pos)
            if element is None:
                return None
            if element.group(1) is not None:
                entry = _index_entry(body, element.start(1), element.end(2))
                if entry is not None:
                    entries.append(entry)
            pos = element.end()
            if element.group(3) == b"]":
                return entries if _INDEX_END.match(body, pos) is not None else None
    except ValueError:  # a kept field that is not valid JSON text (or not UTF-8)
        return None


def _index_entry(body: bytes | memoryview, start: int, end: int) -> IndexEntry | None:
    fields: dict[str, bytes] = {}
    for field in _INDEX_FIELD.finditer(body, start, end):
        key = field.group(1)
        known = _INDEX_KEYS.get(bytes(key)) if len(key) <= 6 else None
        if known is None and b"\\" in key:  # (a key written with escapes: "n\\u0061me")
            decoded = decode_string(bytes(key))
            known = decoded if decoded in _INDEX_KEYS.values() else None
        if known is not None:
            fields[known] = bytes(field.group(2))  # (the last of a repeated key, as JSON parsers do)
    name = fields.get("name")
    if name is None or not name.startswith(b'"'):
        return None
    kind = fields.get("type")
    size = fields.get("size")
    return (
        decode_string(name),
        decode_string(kind) if kind is not None and kind.startswith(b'"') else None,
        int(size) if size is not None and _INDEX_SIZE.fullmatch(size) else None,
    )
