"""Block GETs through a shared cache tier (``--cache-url``), the origin as the authority.

:class:`TieredBackend` is a decorator over any backend that can say how its store addresses
one pinned version (:class:`TierTarget`): listing and metadata go to the origin as before;
a whole-block read goes to one tier replica, picked by rendezvous (highest-random-weight)
hashing on (object, version, offset), so every node asks the same replica for the same
block, and adding or removing a replica moves only that replica's share of blocks.

The tier's answer is trusted no more than the origin's: status, Content-Range, Content-Length,
the version header (generation or ETag) and a body of exactly the range are checked as for
the origin, and the body's CRC32C must equal the ``X-Modelfs-Digest`` the tier computed when
it fetched the slice from the origin (modelfs/tierconf/fill.py) and that covers exactly this
range (a SHA-256 digest, as tiers before the fill stage sent, is checked too). Anything
else — an error, a refused connection, a stall longer than --read-timeout, a wrong header, a
damaged body — skips that replica for that block, so a dead or faulty replica costs time,
never bytes. A replica that failed (down, refusing, a name that does not resolve) passes the
block to the next replica in its rendezvous order, then the origin, all within one
--read-timeout; a wrong answer sends it to the origin. A replica that failed is left alone for
a while (doubling from 1 s to 30 s, halving per 30 s without a failure) so a dead one does not
cost a connect per block.

Reads that are not whole, block-aligned slices (random small reads) and versions the tier
cannot key (a web file without a strong ETag) go straight to the origin. The GET runs in a
worker thread on the block's own buffer, its body read like the origin's (one blocking
recv_into per block, backends/private/httpclient_body.py); every counter and the replicas'
health change only in trio tasks (docs/concurrency.md).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

import crc32c
import trio

from modelfs import __version__
from modelfs.backends.base import Backend, JoinedReads, ListPage, ObjectInfo, read_one_by_one
from modelfs.backends.body import read_exactly
from modelfs.backends.connpool import ConnectionPool
from modelfs.backends.private import httpclient_body
from modelfs.backends.resolver import Resolver
from modelfs.backends.responses import Headers, RangeRequest, check_range_response
from modelfs.errors import BackendError, ConfigError, VersionChanged
from modelfs.memlimit import receive_chunk

__all__ = [
    "SIZE_HEADER",
    "ReplicaStats",
    "TierAddressable",
    "TierStats",
    "TierTarget",
    "TieredBackend",
    "digest_matches",
    "header_pinned",
    "rendezvous_order",
]

log = logging.getLogger(__name__)

DIGEST_HEADER = "x-modelfs-digest"
# The size of the version a read is pinned to, where the node knows it: part of the tier's
# cache key (nginx.conf.in), and the answer's Content-Range total must be it.
SIZE_HEADER = "X-Modelfs-Size"
_DIGEST_RE = re.compile(r"(crc32c=[0-9a-f]{8}|sha256=[0-9a-f]{64}); range=(\d+)-(\d+)")
_USER_AGENT = f"modelfs/{__version__} (tier)"
_FIRST_BACKOFF = 1.0
_CHUNK = 256 << 10  # a body not read by recv_into is read in pieces of this size, checking the deadline
FALLBACK_REASONS = (
    "unreachable",
    "error",
    "stalled",
    "short_body",
    "status",
    "response",
    "version",
    "no_digest",
    "digest_range",
    "digest",
    "all_benched",
)
_MAX_BACKOFF = 30.0
# A replica's backoff halves for each this long it answers without a failure (see _answered).
_CALM = 30.0
# A replica's failures are one warning line per this long (the rest debug lines, all counted):
# a dead replica probed after each bench, or a full one failing each miss, is not a line per block.
_LOG_EVERY = 600.0


@dataclass(frozen=True)
class TierTarget:
    """How the origin names one pinned version: the raw path (and query) of its ranged GET,
    the headers that pin it, ``pinned(headers)``, which raises when a response's version
    headers show another version (the same check the backend makes of the origin), and the
    version's size where the version says it (an answer of another size is refused)."""

    path: str
    headers: Mapping[str, str]
    pinned: Callable[[Headers], None]
    size: int | None = None


@runtime_checkable
class TierAddressable(Protocol):
    """A backend whose reads a cache tier can serve: one method beside the Backend protocol."""

    def tier_target(self, name: str, version: str) -> TierTarget | None:
        """The target of ``name`` at ``version``, or None if the tier cannot key it."""
        ...


_OUT_OF_TIME = ("stalled", "unreachable")
"""Failures a replica given less than a whole --read-timeout may owe to that alone."""
_DEADLINE_SLACK = 0.01
"""Seconds before the deadline a timeout may fire (socket timeouts are set to the time left)."""


class TierRejected(Exception):
    """The tier's answer cannot be used; ``reason`` counts it, ``replica_down`` benches the replica."""

    def __init__(self, reason: str, detail: str, *, replica_down: bool) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.replica_down = replica_down


@dataclass
class ReplicaStats:
    gets: int = 0
    bytes: int = 0
    failures: int = 0  # errors, refused connections, stalls: the replica is benched
    rejected: int = 0  # answers that failed a check (headers, digest): that block only


@dataclass
class TierStats:
    """Counters of the tier routing; changed only in trio tasks, read by stats and metrics."""

    replicas: dict[str, ReplicaStats] = field(default_factory=dict)
    origin_gets: int = 0  # block reads that went to the origin after the tier failed them
    origin_bytes: int = 0
    bypass_gets: int = 0  # reads the tier cannot serve (small random reads, weak versions)
    bypass_bytes: int = 0
    failovers: int = 0  # block GETs sent to the next replica after one failed that block
    # reason -> blocks; every reason is there from the start, so the dict never changes size
    # while the metrics thread copies it.
    fallbacks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FALLBACK_REASONS, 0))

    def snapshot(self) -> dict[str, object]:
        return {
            "replicas": {url: vars(s).copy() for url, s in self.replicas.items()},
            "tier_bytes": sum(s.bytes for s in self.replicas.values()),
            "origin_gets": self.origin_gets,
            "origin_bytes": self.origin_bytes,
            "bypass_gets": self.bypass_gets,
            "bypass_bytes": self.bypass_bytes,
            "failovers": self.failovers,
            "fallbacks": sum(self.fallbacks.values()),
            "fallback_reasons": dict(self.fallbacks),
        }


def rendezvous_order(replicas: Sequence[str], key: str) -> list[int]:
    """Indexes of ``replicas`` best first for ``key`` (highest random weight)."""

    def weight(i: int) -> bytes:
        return hashlib.blake2b(f"{replicas[i]}\0{key}".encode(), digest_size=8).digest()

    return sorted(range(len(replicas)), key=weight, reverse=True)


def _parse_cache_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme != "http" or not parts.hostname or port == -1 or parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"--cache-url must be http://HOST[:PORT], not {url!r}")
    return parts.hostname, port or 80, f"http://{parts.netloc}"


class _Retry(Exception):
    """A kept-alive connection to a replica was closed by it before the request went through."""


class _Replica:
    """One tier replica: its kept-alive connections, each used by one thread at a time."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int,
        receive_chunk: int = httpclient_body.CHUNK,
        resolver: Resolver | None = None,
    ) -> None:
        self.host, self.port, self.url = _parse_cache_url(url)
        self._read_timeout = read_timeout
        self._receive_chunk = receive_chunk  # (memlimit.receive_chunk: what each socket may queue)
        self._pool = ConnectionPool(
            self.host,
            self.port,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_idle=max_idle,
            resolver=resolver,
        )
        self.benched_until = 0.0  # trio clock; only trio tasks read or write it
        self.backoff = _FIRST_BACKOFF
        self.calm_since = 0.0  # (trio clock) its last failure, or the last halving of its backoff
        self.logged_at: float | None = None  # (trio clock) its last failure's warning line
        self.unlogged = 0  # failures since then, logged at debug level

    def close(self) -> None:
        self._pool.close()

    def abort(self) -> None:
        """The daemon is stopping: GETs in flight fail now, not at the read timeout."""
        self._pool.abort()

    def get_into(self, target: TierTarget, offset: int, dest: memoryview, deadline: float | None = None) -> int | None:
        """Blocking: fill ``dest`` from the tier and verify it, or raise TierRejected.

        Returns the body's CRC32C when the tier's digest is one (summed as the body arrived,
        checked against the digest): the disk cache stores it without another pass.
        ``deadline`` (time.monotonic): when the block must be here, connect included; by
        default --read-timeout from now.
        """
        length = len(dest)
        headers = dict(target.headers)
        headers.update({"Range": f"bytes={offset}-{offset + length - 1}", "User-Agent": _USER_AGENT})
        headers["Accept-Encoding"] = "identity"
        # The whole block within --read-timeout, not just each byte: a replica that drips
        # bytes slowly is as stalled as one that sends none.
        if deadline is None:
            deadline = time.monotonic() + self._read_timeout
        for attempt in (0, 1):  # a kept-alive connection the tier closed meanwhile: once more
            left = deadline - time.monotonic()
            if left <= 0:
                raise TierRejected("stalled", f"no time left of {self._read_timeout:g} s", replica_down=True)
            try:
                conn = self._pool.take(left)  # (the name lookup and the connect within the time left)
            except ConnectionAbortedError as exc:  # the stop: not the replica's failure
                raise TierRejected("error", str(exc), replica_down=False) from None
            except OSError as exc:
                raise TierRejected("unreachable", str(exc), replica_down=True) from None
            sock = conn.sock
            if sock is not None:  # (no wait for the answer beyond the block's deadline either)
                sock.settimeout(max(0.001, min(self._read_timeout, deadline - time.monotonic())))
            try:
                self._pool.track(conn, sock, True)  # (abort() at a stop reaches it)
            except ConnectionAbortedError as exc:
                raise TierRejected("error", str(exc), replica_down=False) from None
            try:
                try:
                    return self._exchange(conn, target, headers, offset, dest, deadline)
                finally:
                    self._pool.track(conn, sock, False)
            except _Retry:
                if attempt == 0:
                    continue
                raise TierRejected("error", "the replica closed the connection", replica_down=True) from None
            except ConnectionAbortedError as exc:  # the stop aborted it: what it read does not count
                raise TierRejected("error", str(exc), replica_down=False) from None
        raise AssertionError("unreachable")  # (the loop returns or raises)

    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        target: TierTarget,
        headers: dict[str, str],
        offset: int,
        dest: memoryview,
        deadline: float,
    ) -> int | None:
        """One GET on ``conn``: the verified CRC32C (see :meth:`get_into`), or _Retry when a
        kept-alive connection turned out closed before the request went through."""
        length = len(dest)
        try:
            conn.request("GET", target.path, headers=headers)
            resp = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            conn.close()
            raise _Retry from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            reason = "stalled" if isinstance(exc, TimeoutError) else "error"
            raise TierRejected(reason, str(exc) or type(exc).__name__, replica_down=True) from None
        try:
            response_headers = {k.lower(): v for k, v in resp.headers.items()}
            digest = self._check(resp.status, response_headers, target, offset, length)
            sums: list[int] | None = [] if digest.startswith("crc32c=") else None
            self._read_body(conn, resp, dest, deadline, sums)
        except TierRejected:
            resp.close()
            conn.close()
            raise
        except http.client.IncompleteRead as exc:
            resp.close()
            conn.close()
            raise TierRejected("short_body", str(exc), replica_down=True) from None
        except (OSError, http.client.HTTPException) as exc:
            resp.close()
            conn.close()
            reason = "stalled" if isinstance(exc, TimeoutError) else "error"
            raise TierRejected(reason, str(exc) or type(exc).__name__, replica_down=True) from None
        self._pool.finish(conn, resp)
        crc = sums[0] if sums else (crc32c.crc32c(dest) if sums is not None else None)
        if not digest_matches(digest, dest, crc):
            raise TierRejected("digest", "the body does not match the tier's digest", replica_down=False)
        return crc

    def _read_body(
        self,
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        dest: memoryview,
        deadline: float,
        sums: list[int] | None = None,
    ) -> None:
        """Fill ``dest`` from the body by the deadline, or raise TierRejected (``sums``: see recv_body_into)."""
        sock = conn.sock
        if httpclient_body.applies(sock, resp):
            try:
                got = httpclient_body.recv_body_into(
                    sock, resp, dest, self._read_timeout, deadline, sums, chunk=self._receive_chunk
                )
            except TimeoutError as exc:
                raise TierRejected("stalled", f"{exc} ({self._read_timeout:g} s)", replica_down=True) from None
        else:
            got = self._read_pieces(conn, resp, dest, deadline)
        if got < len(dest):
            raise TierRejected("short_body", f"{got} of {len(dest)} bytes", replica_down=True)

    def _read_pieces(
        self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, dest: memoryview, deadline: float
    ) -> int:
        """The body by http.client's own reads (a chunked answer), the deadline checked between pieces."""
        got = 0
        while got < len(dest):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TierRejected(
                    "stalled", f"{got} of {len(dest)} bytes in {self._read_timeout:g} s", replica_down=True
                )
            if conn.sock is not None:
                conn.sock.settimeout(min(left, self._read_timeout))
            n = read_exactly(resp.readinto, dest[got : got + _CHUNK])
            if n == 0:
                break
            got += n
        if conn.sock is not None:
            conn.sock.settimeout(self._read_timeout)
        return got

    @staticmethod
    def _check(status: int, headers: Mapping[str, str], target: TierTarget, offset: int, length: int) -> str:
        """The digest the response announces for exactly this range ("kind=hex"), or TierRejected."""
        if status != 206:
            # A 404/412 from the tier is not the origin's word: the origin decides.
            raise TierRejected("status", f"HTTP {status}", replica_down=status >= 500 or status == 429)
        # The same rules as an answer from the origin (Content-Range exactly the block, its
        # length, no encoding, the pinned version), judged by the one place that has them.
        try:
            check_range_response(
                status, headers, RangeRequest("tier", offset, length, target.size), pinned=target.pinned
            )
        except VersionChanged as exc:
            raise TierRejected("version", str(exc), replica_down=False) from None
        except BackendError as exc:
            raise TierRejected("response", str(exc), replica_down=False) from None
        found = _DIGEST_RE.fullmatch((headers.get(DIGEST_HEADER) or "").strip())
        if not found:
            raise TierRejected("no_digest", "no X-Modelfs-Digest for the body", replica_down=False)
        if int(found.group(2)) != offset or int(found.group(3)) != offset + length - 1:
            # The tier's slice is not this block: its --block-size differs from the tier's slice.
            raise TierRejected("digest_range", f"digest covers {found.group(2)}-{found.group(3)}", replica_down=False)
        return found.group(1)


class TieredBackend:
    """``inner`` with whole-block reads served by cache tier replicas (see the module doc)."""

    def __init__(
        self,
        inner: Backend,
        cache_urls: Sequence[str],
        *,
        block_size: int,
        read_timeout: float,
        max_concurrency: int,
        connect_timeout: float = 5.0,
        first_backoff: float = _FIRST_BACKOFF,
        resolver: Resolver | None = None,
    ) -> None:
        if not isinstance(inner, TierAddressable):
            raise ConfigError(f"--cache-url does not apply to {inner.description} (gs://, s3:// and https:// only)")
        if not cache_urls:
            raise ConfigError("--cache-url: no cache replica given")
        self._inner = inner
        self._addressable: TierAddressable = inner
        self._block_size = block_size
        self._read_timeout = read_timeout
        self._replicas = [
            _Replica(
                url,
                connect_timeout=min(connect_timeout, read_timeout),
                read_timeout=read_timeout,
                max_idle=max_concurrency + 1,
                receive_chunk=receive_chunk(max_concurrency),
                resolver=resolver,
            )
            for url in cache_urls
        ]
        if len({r.url for r in self._replicas}) != len(self._replicas):
            raise ConfigError("--cache-url: the same replica is given twice")
        self._urls = [r.url for r in self._replicas]
        self._first_backoff = first_backoff
        for replica in self._replicas:
            replica.backoff = first_backoff
        self._limiter = trio.CapacityLimiter(max(1, max_concurrency))
        self._logged: set[tuple[str, str]] = set()
        self.tier_stats = TierStats(replicas={r.url: ReplicaStats() for r in self._replicas})

    # --- the Backend protocol: everything but whole-block reads is the origin's

    @property
    def description(self) -> str:
        return self._inner.description

    def object_key(self, name: str) -> str:
        return self._inner.object_key(name)

    async def list_objects(self) -> list[ObjectInfo]:
        return await self._inner.list_objects()

    async def list_dir(self, prefix: str, token: str | None = None, *, limit: int | None = None) -> ListPage:
        return await self._inner.list_dir(prefix, token, limit=limit)

    async def stat(self, name: str) -> ObjectInfo:
        return await self._inner.stat(name)

    def abort(self) -> None:
        """The daemon is stopping: end the GETs to replicas and to the origin now."""
        for replica in self._replicas:
            replica.abort()
        abort = getattr(self._inner, "abort", None)
        if callable(abort):
            abort()

    async def aclose(self) -> None:
        for replica in self._replicas:
            replica.close()
        await self._inner.aclose()

    # Not the origin's (which __getattr__ would hand out): the tier serves and stores whole
    # blocks, one GET each, and a joined read would go to the origin past it.
    joins_reads = False

    def __getattr__(self, name: str) -> object:
        # Backend-specific extras (warm's checksums, test counters) are the origin's.
        return getattr(self._inner, name)

    # --- the data path

    def _order(self, target: TierTarget, version: str, offset: int) -> list[_Replica]:
        """The block's replicas, its home first (rendezvous order); benched ones are skipped
        when their turn comes (see _read)."""
        return [self._replicas[i] for i in rendezvous_order(self._urls, f"{target.path}\0{version}\0{offset}")]

    async def read_ranges(
        self,
        name: str,
        version: str,
        offset: int,
        dests: Sequence[memoryview],
        sums: list[int] | None = None,
        *,
        size: int | None = None,
    ) -> None:
        """One block (``joins_reads`` is False: the block store asks no more), and with ``sums``
        its CRC32C: the tier's, summed as it arrived and checked against the fill stage's digest,
        or the origin's GET's (base.JoinedReads)."""
        if len(dests) != 1:
            await read_one_by_one(self.read_range, name, version, offset, dests, size)
            return
        await self._read(name, version, offset, dests[0], sums, size)

    async def read_range(
        self, name: str, version: str, offset: int, dest: memoryview, *, size: int | None = None
    ) -> None:
        await self._read(name, version, offset, dest, None, size)

    async def read_block(
        self,
        name: str,
        version: str,
        offset: int,
        dest: memoryview,
        sums: list[int] | None = None,
        *,
        size: int | None = None,
    ) -> None:
        """A whole block (base.BlockReads): the tier's, the object's short last one included."""
        await self._read(name, version, offset, dest, sums, size, whole=True)

    async def _origin(
        self, name: str, version: str, offset: int, dest: memoryview, sums: list[int] | None, size: int | None
    ) -> None:
        if sums is not None and isinstance(self._inner, JoinedReads):
            await self._inner.read_ranges(name, version, offset, (dest,), sums, size=size)
        else:
            await self._inner.read_range(name, version, offset, dest, size=size)

    async def _read(
        self,
        name: str,
        version: str,
        offset: int,
        dest: memoryview,
        sums: list[int] | None,
        size: int | None,
        *,
        whole: bool = False,
    ) -> None:
        length = len(dest)
        stats = self.tier_stats
        target = None
        # The tier serves whole slices (= blocks) and its digest covers a whole slice, so only
        # a whole block, or the last one of an object (only the block store tells: read_block),
        # can be checked; anything else (small random reads) is not the tier's. (A table of
        # sizes from listings told before, but only of the last 4,096 objects listed.)
        if length and offset % self._block_size == 0 and (whole or length == self._block_size):
            target = self._addressable.tier_target(name, version)
            if target is not None and target.size is None and size is not None:
                # (GCS and S3 versions do not say their size: the tier's answer must show the
                # listed one, as the origin's must)
                target = replace(target, size=size)
        if target is None:
            stats.bypass_gets += 1
            await self._origin(name, version, offset, dest, sums, size)
            stats.bypass_bytes += length
            return
        # A replica that fails the block (down, refusing, stalled: not a wrong answer) passes it
        # to the next replica in the block's rendezvous order before the origin: that replica
        # is where every node sends the block while the first is benched (and the one that
        # takes it over if the first leaves), so its miss fills the tier for the fleet, where
        # the origin's answer would fill only this node. All of them within one --read-timeout
        # from here (each GET gets what is left, its connect included): never a second slow
        # wait after a first one. A wrong answer (digest, headers, 404) goes to the origin at
        # once: it is most often the tier's configuration (a slice size), the same on every replica.
        deadline = time.monotonic() + self._read_timeout
        tried = 0
        for replica in self._order(target, version, offset):
            if replica.benched_until > trio.current_time():
                continue
            if tried and time.monotonic() >= deadline:
                break
            if tried:
                stats.failovers += 1
            tried += 1
            rstats = stats.replicas[replica.url]
            rstats.gets += 1
            try:
                crc = await trio.to_thread.run_sync(
                    replica.get_into, target, offset, dest, deadline, limiter=self._limiter
                )
            except TierRejected as exc:
                what = f"{name}@{version} [{offset}, +{length}]"
                if tried > 1 and exc.reason in _OUT_OF_TIME and time.monotonic() >= deadline - _DEADLINE_SLACK:
                    # A replica tried after another had only what that one left of the block's
                    # --read-timeout (maybe a sliver, after a late 504): running out of it is
                    # not its failure. Counted, not benched, no warning; the origin serves.
                    stats.fallbacks[exc.reason] += 1
                    log.debug("cache tier %s ran out of the block's time left (%s): %s", replica.url, exc, what)
                    break
                self._rejected(replica, exc, what)
                if exc.replica_down:
                    continue
                break
            rstats.bytes += length
            self._answered(replica)
            if sums is not None and crc is not None:
                sums.append(crc)
            return
        if not tried:
            stats.fallbacks["all_benched"] += 1
        stats.origin_gets += 1
        await self._origin(name, version, offset, dest, sums, size)
        stats.origin_bytes += length

    def _answered(self, replica: _Replica) -> None:
        """A good answer. The backoff comes down by half for each _CALM seconds without a
        failure, not back to the first at the first hit: a replica that answers one GET and
        fails the next (flapping) would then be tried again every first backoff forever; so
        its benches grow as for a dead one (what Envoy's outlier ejection does, decrementing
        its ejection multiplier per healthy interval)."""
        now = trio.current_time()
        if replica.backoff > self._first_backoff and now - replica.calm_since >= _CALM:
            replica.backoff = max(self._first_backoff, replica.backoff / 2)
            replica.calm_since = now

    def _rejected(self, replica: _Replica, exc: TierRejected, what: str) -> None:
        stats = self.tier_stats
        rstats = stats.replicas[replica.url]
        stats.fallbacks[exc.reason] += 1
        if exc.replica_down:
            rstats.failures += 1
            now = trio.current_time()
            if replica.benched_until > now:
                # A GET that was in flight when another one failed and benched the replica:
                # the same failure, not a second one (no longer bench, no second line).
                replica.calm_since = now
                replica.unlogged += 1
                log.debug("cache tier %s failed (%s) while benched: %s", replica.url, exc, what)
                return
            replica.benched_until = now + replica.backoff
            elsewhere = "the next replica or the origin" if len(self._replicas) > 1 else "the origin"
            if replica.logged_at is None or now - replica.logged_at >= _LOG_EVERY:
                since = f"; {replica.unlogged} more failures since the last line" if replica.unlogged else ""
                log.warning(
                    "cache tier %s failed (%s); its blocks go to %s for %.0f s, then it is tried again "
                    "(failures of this replica are counted in stats, logged at most every %.0f min%s)",
                    replica.url,
                    exc,
                    elsewhere,
                    replica.backoff,
                    _LOG_EVERY / 60,
                    since,
                )
                replica.logged_at, replica.unlogged = now, 0
            else:
                replica.unlogged += 1
                log.debug("cache tier %s failed (%s); benched %.0f s: %s", replica.url, exc, replica.backoff, what)
            replica.backoff = min(max(_MAX_BACKOFF, self._first_backoff), replica.backoff * 2)
            replica.calm_since = now
        else:
            rstats.rejected += 1
            # The first wrong answer of each kind per replica is worth a line; a replica that
            # keeps giving it (a slice size other than --block-size) is counted, not logged.
            first = (replica.url, exc.reason) not in self._logged
            self._logged.add((replica.url, exc.reason))
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "cache tier %s: %s: %s; read from the origin%s",
                replica.url,
                what,
                exc,
                " (further answers like this are counted in stats, logged at debug level)" if first else "",
            )


def digest_matches(digest: str, body: memoryview, crc: int | None = None) -> bool:
    """``body`` has ``digest`` ("crc32c=<8 hex>" from the fill stage, or "sha256=<64 hex>");
    ``crc``: the body's CRC32C if it was summed as it arrived."""
    kind, _, value = digest.partition("=")
    if kind == "crc32c":
        return (crc32c.crc32c(body) if crc is None else crc) == int(value, 16)
    return hashlib.sha256(body).hexdigest() == value


def header_pinned(header: str, version: str, label: str) -> Callable[[Headers], None]:
    """A TierTarget check: the response's ``header`` must be exactly ``version``."""

    def pinned(headers: Headers) -> None:
        value = headers.get(header)
        if value is None or value.strip() != version:
            raise VersionChanged(f"the tier sent {label} {value!r}, not {version!r}")

    return pinned
