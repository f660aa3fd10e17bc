"""``modelfs warm``: fill the disk cache ahead of a mount, and verify every object.

It uses the mount's own block store (same cache dir, same block files), so a mount that
follows starts warm. Each object is read block by block in order, with the next blocks
prefetched in parallel; the bytes are folded into the checksum the store keeps of the whole
object and compared with it: gs:// its CRC32C (or MD5 where there is no CRC), s3:// the one
it was uploaded with or S3 computed (CRC32, CRC32C, CRC64NVME, SHA-1, SHA-256, SHA-512, MD5,
XXHASH64, XXHASH3 or XXHASH128; HeadObject gives it, a listing does not, so each s3:// object
is stat'ed first). A mismatch removes the object's blocks from the cache and makes the
command fail. An object with none to check (other stores, an S3 object without one) is
reported so, and so is one whose checksum cannot be checked: an S3 multipart upload's
COMPOSITE checksum (of its parts' checksums, not of its bytes), or one of a type modelfs has
no implementation of.

An object is reported cached only once its disk writes are done and every block of it is in
the disk cache; one whose blocks could not be written (a full disk, an I/O error) or were
pushed out again while it was warmed fails the command, and so does a source the cache
cannot hold to the end (blocks warmed earlier evicted by later ones): an init container must
not report success on a cold cache.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import IO

import crc32c
import trio

from modelfs import stopping
from modelfs.backends import open_backend
from modelfs.backends.base import Backend, ObjectInfo
from modelfs.backends.retry import retry_transient
from modelfs.cache.blocks import BlockStore, ObjectRef
from modelfs.cache.disk import DiskCache
from modelfs.cache.memory import MemoryCache
from modelfs.config import Config
from modelfs.errors import BackendError, ConfigError, ModelfsError, VersionChanged
from modelfs.fold import Folder, Hash
from modelfs.mount import STOP_GRACE, StopWatchdog
from modelfs.walk import walk_objects

__all__ = ["warm", "WarmResult", "WarmStopped"]

log = logging.getLogger(__name__)

_WALK_AHEAD = 1000  # objects the walk may list ahead of the fetches
# Threads folding blocks into checksums (fold.py): objects are warmed one at a time, and each
# one's checksum is sequential, so one is all there is to use; the limiter keeps it so.
_FOLD_THREADS = 1


@dataclass
class WarmResult:
    objects: int = 0
    bytes: int = 0
    fetched_bytes: int = 0
    mismatched: list[str] = field(default_factory=list)
    unverified: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, why): not cached
    evicted: int = 0  # blocks warmed, then pushed out again by the cap or a full file system
    cache_limit: int = 0  # what it keeps to (--disk-cache, or less on a smaller file system)


class _Progress:
    """A one-line bar on a terminal; a plain line per object (and every 10 s) otherwise."""

    def __init__(self, total: int, out: IO[str]) -> None:
        self.total = total
        self.done = 0
        self.out = out
        self.tty = out.isatty()
        self.start = time.monotonic()
        self._last_line = self.start

    def _text(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.done / 2**20:,.0f}/{self.total / 2**20:,.0f} MiB ({pct:.0f}%) "
            f"{rate / 1e6:,.0f} MB/s ETA {eta:,.0f}s"
        )

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty:
            width = 30
            filled = int(width * self.done / self.total) if self.total else width
            self.out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self._text()}   ")
            self.out.flush()
        elif now - self._last_line >= 10:
            self._last_line = now
            print(f"warm: {self._text()}", file=self.out, flush=True)

    def object_done(self, name: str, status: str) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        print(f"warm: {name}: {status}", file=self.out, flush=True)

    def finish(self) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        print(f"warm: {self._text()}", file=self.out, flush=True)


class _Crc:
    """A CRC32, CRC32C or CRC64NVME folded block by block; its digest big-endian (``size``
    bytes), as the stores give it."""

    def __init__(self, fn: Callable[[memoryview, int], int], size: int = 4) -> None:
        self._fn = fn
        self._size = size
        self._value = 0

    def update(self, data: memoryview, /) -> None:
        self._value = self._fn(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self._size, "big")


def _crc64nvme() -> _Crc:
    """S3's CRC64NVME (CRC-64/NVME), from awscrt: what botocore computes it with too. Imported
    here, so a warm that checks none does not load the library."""
    from awscrt.checksums import crc64nvme

    return _Crc(crc64nvme, 8)


class _XXHash:
    """S3's XXHASH64, XXHASH3 (XXH3-64) and XXHASH128 (XXH3-128), from awscrt as botocore
    computes them; the digest is xxHash's canonical (big-endian) form, as S3 gives it."""

    # awscrt takes bytes only (not a view of a block's mmap): each block is copied in pieces
    # this large, so what is held beside the budget stays this small.
    PIECE = 64 << 10

    def __init__(self, kind: str) -> None:
        from awscrt.checksums import XXHash

        self._hash = getattr(XXHash, f"new_{kind}")()

    def update(self, data: memoryview, /) -> None:
        for start in range(0, len(data), self.PIECE):
            self._hash.update(bytes(data[start : start + self.PIECE]))

    def digest(self) -> bytes:
        return bytes(self._hash.finalize())


# What warm can check, and each one's digest size. (S3's ChecksumAlgorithm names, lower-case.)
_HASHES: dict[str, tuple[Callable[[], Hash], int]] = {
    "crc32c": (lambda: _Crc(crc32c.crc32c), 4),
    "crc32": (lambda: _Crc(zlib.crc32), 4),
    "crc64nvme": (_crc64nvme, 8),
    "md5": (lambda: hashlib.md5(usedforsecurity=False), 16),
    "sha1": (lambda: hashlib.sha1(usedforsecurity=False), 20),
    "sha256": (hashlib.sha256, 32),
    "sha512": (hashlib.sha512, 64),
    "xxhash64": (lambda: _XXHash("xxhash64"), 8),
    "xxhash3": (lambda: _XXHash("xxhash3_64"), 8),
    "xxhash128": (lambda: _XXHash("xxhash3_128"), 16),
}
NO_CHECKSUM = "no checksum to verify"


def _expected(info: ObjectInfo) -> tuple[str, bytes] | str:
    """(algorithm, digest) of the whole object to check its bytes against; else why there is
    none to check, for the object's line ("cached (<why>)")."""
    if info.crc32c:
        return "crc32c", base64.b64decode(info.crc32c)
    if info.md5:
        return "md5", base64.b64decode(info.md5)
    if not info.checksum:
        return NO_CHECKSUM
    algorithm, _, value = info.checksum.partition(":")
    name = algorithm.upper()
    if "-" in value:
        parts = value.rpartition("-")[2]
        of = f"its {parts} parts" if parts.isdigit() else "its parts"
        return (
            f"not verified: its {name} is a multipart upload's COMPOSITE checksum of {of}, not one of the whole object"
        )
    if algorithm not in _HASHES:
        return f"not verified: its checksum is {name}, which modelfs has no implementation of"
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != _HASHES[algorithm][1]:
        return f"not verified: the store's {name} checksum {value[:64]!r} is not one"
    return algorithm, digest


async def _warm_object(
    store: BlockStore, info: ObjectInfo, key: str, window: int, progress: _Progress, fold: trio.CapacityLimiter
) -> bool | None:
    """Read one object through the store; True/False: checksum matched or not; None: no checksum."""
    ref = ObjectRef(key, info.name, info.version, info.size)
    expected = _expected(info)
    hasher = _HASHES[expected[0]][0]() if isinstance(expected, tuple) else None
    await store.prepare(ref)
    count = store.block_count(ref)
    ahead = 1  # blocks below this were handed to prefetch already
    failed: ModelfsError | None = None
    async with trio.open_nursery() as nursery:
        # Each block is folded in a thread while the next is read (fold.py).
        folder = Folder(hasher, store.memory, fold) if hasher is not None else None
        if folder is not None:
            nursery.start_soon(folder.run)
        try:
            for index in range(count):
                ahead = max(ahead, index + 1)
                stop = min(count, index + 1 + window)
                if stop - ahead >= store.join_blocks or (stop == count and stop > ahead):
                    ahead += store.prefetch_blocks(ref, range(ahead, stop))
                block = await store.get(ref, index)
                if folder is not None:
                    await folder.add(block)
                progress.add(block.length)
        except ModelfsError as exc:  # raised below as itself, not inside the nursery's exception group
            failed = exc
        finally:
            if folder is not None:
                folder.close()  # (run returns once the last block handed over is folded)
    if failed is not None:
        raise failed
    if hasher is None or not isinstance(expected, tuple):
        return None
    if hasher.digest() == expected[1]:
        return True
    if store.disk is not None:
        await store.drain()  # the object's blocks must be on disk before they can be removed
        for index in range(count):
            await store.disk.discard((key, info.version, index))
    return False


async def _with_checksum(backend: Backend, info: ObjectInfo, retry_deadline: float) -> ObjectInfo:
    """``info`` from a stat, which has the checksum a listing lacks (s3://).

    A stat of another version, or of the version listed at another size, fails the object:
    warmed as listed, it was read without a checksum (a store that answered its GETs with the
    listed version anyway had its bytes checked against nothing), and the mount that follows
    would read another version."""
    fresh = await retry_transient(
        functools.partial(backend.stat, info.name),
        deadline=retry_deadline,
        what=f"{backend.description}: {info.name}",
    )
    if fresh.version != info.version:
        raise VersionChanged(
            f"{info.name}: changed in the store since the listing "
            f"(its HEAD's version is {fresh.version!r:.80}, not {info.version!r:.80})"
        )
    if fresh.size != info.size:
        raise BackendError(
            f"{info.name}: the store's HEAD says {fresh.size} bytes at the version listed, its listing {info.size}"
        )
    return fresh


@dataclass
class _Written:
    """An object read to the end, whose disk writes may still be under way."""

    info: ObjectInfo
    key: str
    blocks: int
    last_write: int  # the store's write number when its last block was fetched
    unchecked: str | None  # why its checksum was not checked (None: it was, and matched)


def _check_cached(disk: DiskCache, done: _Written, result: WarmResult, progress: _Progress) -> None:
    """Report ``done`` cached if every block of it is in the disk cache, else not cached (why)."""
    name = done.info.name
    unwritten = disk.unwritten.pop(done.key, 0) if disk.unwritten is not None else 0
    missing = sum(1 for i in range(done.blocks) if not disk.contains((done.key, done.info.version, i)))
    if missing:
        if unwritten:
            why = (
                f"{unwritten} of {done.blocks} block(s) could not be written to the disk cache "
                f"({disk.last_write_error or 'not stored'})"
            )
        else:
            why = (
                f"{missing} of {done.blocks} block(s) were evicted again to make room "
                f"(the disk cache keeps to {disk.limit / 2**20:,.1f} MiB)"
            )
        result.failed.append((name, f"{name}: {why}"))
        progress.object_done(name, f"NOT CACHED: {why}")
        return
    result.objects += 1
    result.bytes += done.info.size
    if done.unchecked is None:
        progress.object_done(name, "cached, checksum ok")
    else:
        result.unverified += 1
        progress.object_done(name, f"cached ({done.unchecked})")


class WarmStopped(BaseException):
    """``modelfs warm`` was stopped by a signal (the CLI exits 128 + ``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


async def _on_stop_signal(
    signals: AsyncIterator[int],
    backend: Backend,
    scope: trio.CancelScope,
    stopped: list[int],
    watchdogs: list[StopWatchdog],
) -> None:
    async for signum in signals:
        stopped.append(signum)
        stopping.begin()  # (what the stop fails is not logged as failures)
        watchdog = StopWatchdog(None, 2 * STOP_GRACE, code=128 + signum)
        watchdogs.append(watchdog)  # (cancelled once warm() returns: it ends only a warm that cannot)
        watchdog.start()
        abort = getattr(backend, "abort", None)
        if callable(abort):
            abort()
        scope.cancel()
        return


async def warm(config: Config, out: IO[str] = sys.stderr) -> WarmResult:
    """Fetch every object of ``config.source`` into the disk cache and verify it."""
    if config.disk_cache <= 0:
        raise ConfigError("warm needs a disk cache (--disk-cache must be more than 0)")  # bad usage: exit 2
    if config.source.scheme == "file" and not config.persist_weak_versions:
        # A file:// version is weak: without the flag it holds for one run (weak.py), so the
        # mount that follows could use none of what this warm cached.
        raise ConfigError(
            "warm of a file:// source needs --persist-weak-versions, on warm and on the mount that follows: "
            "without it the blocks cached are for this run only"
        )
    backend = open_backend(config)
    watchdogs: list[StopWatchdog] = []  # (a stop signal's)
    disk = DiskCache(config.cache_dir, config.disk_cache, block_size=config.block_size)
    disk.unwritten = Counter()
    # The read-ahead window fits the budget (the block being read and one more beside it),
    # never the other way round: warm keeps --memory-cache as the mount does.
    room = config.memory_cache // config.block_size - 2
    window = max(1, min(config.max_concurrency * 2, config.max_prefetch // config.block_size, room))
    memory = MemoryCache(config.memory_cache, config.block_size)
    store = BlockStore.from_config(config, backend, memory, disk)
    result = WarmResult()
    try:
        disk.open()
        # The walk runs ahead of the fetches through a bounded channel: the total grows as it
        # finds objects, and only the queued ones are held, never the whole listing.
        progress = _Progress(0, out)
        send, receive = trio.open_memory_channel[ObjectInfo](_WALK_AHEAD)

        failed: list[BaseException] = []

        async def produce() -> None:
            warned = False
            # Closed without a checkpoint: ``async with`` closes at one, and the nursery's
            # cancel (the loop below ends once the channel closes) raised there replaced an
            # error on its way out, a Ctrl-C included: warm then ended as if it had finished.
            with send:
                try:
                    async for info in walk_objects(backend, retry_deadline=config.retry_deadline):
                        progress.total += info.size
                        if progress.total > config.disk_cache and not warned:
                            warned = True
                            log.warning(
                                "the source is larger than --disk-cache (%d bytes): "
                                "the first objects will be evicted again",
                                config.disk_cache,
                            )
                        await send.send(info)
                except ModelfsError as exc:
                    failed.append(exc)  # raised below as itself, not inside an exception group

        # Objects read to the end wait here, in order, until their disk writes are done; then
        # each is reported cached or not. (Never more than the writes the budget holds.)
        written: deque[_Written] = deque()

        def report(*, final: bool = False) -> None:
            while written and (final or store.writes_done(written[0].last_write)):
                _check_cached(disk, written.popleft(), result, progress)

        by_stat = bool(getattr(backend, "checksums_by_stat", False))
        # A stop signal ends the warm at once: the GETs in flight are shut down (the threads
        # blocked on a stalled server would hold it for --read-timeout), the writes under way
        # finish (each block file is written under a temporary name and renamed: never half
        # there), and a watchdog ends the process if a GET cannot be reached (still connecting).
        stopped: list[int] = []
        fold = trio.CapacityLimiter(_FOLD_THREADS)
        # (Not a signal the process was started ignoring: nohup's SIGHUP, a background job's SIGINT.)
        with trio.open_signal_receiver(*stopping.stop_signals()) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_on_stop_signal, signals, backend, nursery.cancel_scope, stopped, watchdogs)
                await nursery.start(store.run)
                nursery.start_soon(produce)
                async for info in receive:
                    key = backend.object_key(info.name)
                    try:
                        if by_stat:
                            info = await _with_checksum(backend, info, config.retry_deadline)
                        ok = await _warm_object(store, info, key, window, progress, fold)
                    except ModelfsError as exc:  # changed or gone since the listing, unreadable: the others go on
                        result.failed.append((info.name, str(exc)))
                        progress.object_done(info.name, f"FAILED: {exc}")
                        report()
                        continue
                    if ok is False:
                        result.objects += 1
                        result.bytes += info.size
                        result.mismatched.append(info.name)
                        progress.object_done(info.name, "CHECKSUM MISMATCH (not cached)")
                    else:
                        blocks = store.block_count(ObjectRef(key, info.name, info.version, info.size))
                        expected = _expected(info)
                        unchecked = None if ok is True else expected if isinstance(expected, str) else NO_CHECKSUM
                        written.append(_Written(info, key, blocks, store.write_seq, unchecked))
                    report()
                await store.drain()
                report(final=True)
                nursery.cancel_scope.cancel()
        if stopped:
            raise WarmStopped(stopped[0])
        result.evicted = disk.evicted_this_run
        result.cache_limit = disk.limit
        if failed:
            raise failed[0]
        if config.source.prefix and not result.objects and not result.failed:
            raise ModelfsError(f"nothing found at {config.source.url} (no object with that name or prefix)")
        progress.finish()
        result.fetched_bytes = store.stats.backend_bytes
        return result
    finally:
        disk.close()
        await backend.aclose()
        for watchdog in watchdogs:
            watchdog.cancel()
