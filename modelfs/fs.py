"""The pyfuse3 Operations: translate a request, call the layer below, map errors. Nothing else.

Every handler runs under :func:`_mapped`, the single point where modelfs errors become
errnos (through :func:`modelfs.errors.errno_for`) and where an unexpected exception is logged
and becomes EIO instead of killing pyfuse3's main loop. Write-side operations fail with EROFS.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from modelfs.cache.blocks import ObjectRef
from modelfs.eager import EagerStreamer
from modelfs.errors import ModelfsError, NotFound, errno_for
from modelfs.files import OpenFiles
from modelfs.inodes import ROOT_INODE, DirHandle, Namespace, Node
from modelfs.loopcpu import LoopClock
from modelfs.metrics import LatencyHistogram, MetricsSnapshot
from modelfs.stopping import stopping
from modelfs.units import ceil_div

__all__ = ["ModelFS"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

STATS_XATTR = b"user.modelfs.stats"
_NEVER = 365 * 24 * 3600.0  # the kernel's TTL when --metadata-ttl is -1


def _mapped(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        ops = args[0] if args and isinstance(args[0], ModelFS) else None
        # Each request runs in a cancel scope the daemon's stop can cancel (see ModelFS.stop).
        with trio.CancelScope() as scope:
            if ops is not None:
                ops._requests.add(scope)
                if ops._stopping:
                    scope.cancel()
            try:
                return await fn(*args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except NotFound:
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            except ModelfsError as exc:
                code = errno_for(exc)
                _count_error(args, code)
                # A request failed by the stop (its GET shut down) is one of those the stop's
                # own line counts, not a warning of its own.
                level = logging.DEBUG if stopping() else logging.WARNING
                log.log(level, "%s failed with %s: %s", fn.__name__, errno.errorcode.get(code, code), exc)
                raise pyfuse3.FUSEError(code) from None
            except Exception:
                _count_error(args, errno.EIO)
                log.exception("%s failed unexpectedly; returning EIO", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None
            finally:
                if ops is not None:
                    ops._requests.discard(scope)
        _count_error(args, errno.EIO)  # only a cancelled scope gets here: the daemon is stopping
        raise pyfuse3.FUSEError(errno.EIO)

    return wrapper


def _count_error(args: tuple[Any, ...], code: int) -> None:
    if args and isinstance(args[0], ModelFS):
        args[0].errors[errno.errorcode.get(code, str(code))] += 1


async def _read_only(*_: Any, **__: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


class ModelFS(pyfuse3.Operations):
    """A read-only view of the namespace; file data comes from :class:`OpenFiles`."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        namespace: Namespace,
        files: OpenFiles,
        *,
        ttl: float,
        block_size: int,
        eager: EagerStreamer | None = None,
    ) -> None:
        super().__init__()
        self.namespace = namespace
        self.files = files
        self.ttl = _NEVER if ttl < 0 else ttl
        self.block_size = block_size
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._dir_handles: dict[int, DirHandle] = {}
        self._file_nodes: dict[int, Node] = {}  # open file handle → its node (held while open)
        self._next_dir_fh = 1
        self.errors: Counter[str] = Counter()
        self._requests: set[trio.CancelScope] = set()  # the requests being served
        self._stopping = False
        self.eager = eager
        self.read_latency = LatencyHistogram()
        self.read_bytes = 0  # bytes returned by read(): with read_latency.count, the kernel's read size
        self.loop_clock = LoopClock()  # built on the trio thread (mount.build runs inside trio.run)

    def stop(self) -> int:
        """Fail every request still being served, and any that arrives later, with EIO.

        The daemon calls this a short grace after SIGTERM, so that a read waiting on a dead or
        stalled backend cannot hold the unmount past the stop timeout of systemd or the pod.
        Returns the number of requests cancelled.
        """
        self._stopping = True
        for scope in self._requests:
            scope.cancel()
        return len(self._requests)

    # --- attributes

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.generation = 0
        # What is left of the TTL of the listing that vouches for the node: an answer served
        # stale (while its directory is listed again) is asked for again soon.
        valid = self.namespace.valid_for(node)
        attr.entry_timeout = attr.attr_timeout = self.ttl if valid < 0 else min(self.ttl, valid)
        if node.is_dir:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.st_size = 0
        else:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = node.size
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_blksize = self.block_size
        attr.st_blocks = ceil_div(attr.st_size, 512)
        mtime_ns = int(node.mtime * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime_ns
        return attr

    @_mapped
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = await self.namespace.lookup(parent_inode, name)
        attrs = self._attrs(node)  # before the reference is counted: a failure here must not leak it
        self.namespace.remember(node)
        return attrs

    @_mapped
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self.namespace.get(inode))

    @_mapped
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.namespace.forget(inode, count)

    # --- directories

    @_mapped
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.namespace.get(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        # The handle reads the listing object itself, not a copy: a refresh swaps in a new
        # one, so this handle neither skips nor repeats entries (a listing too large for the
        # cache is read frozen, then page by page on the handle's own: inodes.DirHandle).
        handle = await self.namespace.open_dir(node)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dir_handles[fh] = handle
        self.namespace.opened(node)
        return fh

    @_mapped
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dir_handles[fh]
        index = start_id
        # Each entry put in the reply is counted as the kernel's lookup at once (an eviction of
        # the listing while a later page is read keeps it findable). If a later page fails, the
        # reply is an error and the kernel gets none of them: the counts are taken back, or
        # their nodes would wait for a FORGET that never comes.
        remembered: list[Node] = []
        try:
            while (entry := await self.namespace.entry(handle, index)) is not None:
                name, node = entry
                if not pyfuse3.readdir_reply(token, name, self._attrs(node), index + 1):
                    return
                self.namespace.remember(node)
                remembered.append(node)
                index += 1
        except BaseException:  # (a stop's cancellation too: the reply is an error then as well)
            for node in remembered:
                self.namespace.forget(node.inode, 1)
            raise

    @_mapped
    async def releasedir(self, fh: int) -> None:
        handle = self._dir_handles.pop(fh, None)
        if handle is not None:
            self.namespace.close_dir(handle)

    # --- files

    @_mapped
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self.namespace.get(inode)
        if node.is_dir or node.info is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        info = node.info
        ref = ObjectRef(self.namespace.backend.object_key(info.name), info.name, info.version, info.size)
        # The page cache may be kept only while the version is the one it was filled from
        # (the node's, which never changes; forgetting the inode clears it).
        keep = node.opened_version == info.version
        node.opened_version = info.version
        await self.files.store.prepare(ref)
        fh = self.files.open(ref)
        self._file_nodes[fh] = node
        self.namespace.opened(node)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=False)

    @_mapped
    async def read(self, fh: int, off: int, size: int) -> bytes:
        start = trio.current_time()
        try:
            data = await self.files.read(fh, off, size)
            self.read_bytes += len(data)
            return data  # type: ignore[return-value]  # memoryview is fine
        finally:
            self.read_latency.observe(trio.current_time() - start)

    @_mapped
    async def release(self, fh: int) -> None:
        node = self._file_nodes.pop(fh, None)
        if node is not None:
            self.namespace.closed(node)
        self.files.release(fh)

    @_mapped
    async def flush(self, fh: int) -> None:
        return None

    def metrics_snapshot(self) -> MetricsSnapshot:
        """What a /metrics scrape reports; call on the trio thread (see metrics.on_trio_thread)."""
        return MetricsSnapshot(self.stats(), self.read_latency.cumulative(), self.read_latency.sum)

    def stats(self) -> dict[str, object]:
        """Counters of the running daemon; ``modelfs stats`` and tests read them via an xattr.

        Runs on the trio thread only: it iterates live dicts. Everything returned is a copy.
        """
        store = self.files.store
        memory = store.memory
        out: dict[str, object] = {
            "source": self.namespace.backend.description,
            "pid": os.getpid(),
            "files": self.namespace.file_count,
            "bytes": self.namespace.total_bytes,
            "metadata_bytes": self.namespace.metadata_bytes,
            "metadata_capacity": self.namespace.metadata_capacity,
            "cached_dirs": self.namespace.cached_dirs,
            "inodes": self.namespace.inodes,
            "held_nodes": self.namespace.held_nodes,
            "held_cap": self.namespace.held_cap,
            "node_invalidations": self.namespace.invalidations,
            "dir_handles": len(self._dir_handles),
            "dir_handle_bytes": self.namespace.handle_bytes,
            "dir_handles_parked": self.namespace.handles_parked,
            "listing_pages": self.namespace.pages,
            "name_lookups": self.namespace.name_lookups,
            "stale_served": self.namespace.stale_served,
            "dir_refreshes": self.namespace.refreshes,
            "dir_refresh_failures": self.namespace.refresh_failures,
            "open_handles": len(self.files),
            "reads": self.read_latency.count,
            "read_bytes": self.read_bytes,
            "backend_gets": store.stats.backend_gets,
            "backend_bytes": store.stats.backend_bytes,
            "demand_gets": store.stats.demand_gets,
            "prefetch_gets": store.stats.prefetch_gets,
            "small_gets": store.stats.small_gets,
            "joined_gets": store.stats.joined_gets,
            "streamed_blocks": store.stats.streamed_blocks,
            "eager_streams_active": self.eager.active if self.eager is not None else 0,
            "eager_streams_queued": self.eager.queued if self.eager is not None else 0,
            "eager_streams_completed": self.eager.completed if self.eager is not None else 0,
            "eager_pauses": self.eager.pauses if self.eager is not None else 0,
            "eager_streams_cancelled": self.eager.cancelled if self.eager is not None else 0,
            "sequential_reads": self.files.sequential_reads(),
            "retries": store.stats.retry.retries,
            "retries_gave_up": store.stats.retry.gave_up,
            "errors": store.stats.errors,
            "memory_capacity": memory.capacity,
            "memory_used": memory.used,
            "memory_parts": {**memory.parts(), "metadata": self.namespace.metadata_bytes},
            "memory_leases": memory.stats.leases,
            "memory_lease_waits": memory.stats.lease_waits,
            "reads_in_flight": self.files.reads_in_flight,
            "gets_in_flight": store.slots.in_use,
            "gets_in_flight_peak": store.slots.peak,
            "memory_peak": memory.stats.peak_bytes,
            "memory_hits": memory.stats.hits,
            "memory_misses": memory.stats.misses,
            "memory_evictions": memory.stats.evictions,
            "prefetch_refused": memory.stats.prefetch_refused,
            "prefetch_window_bytes": self.files.max_window_blocks() * store.block_size,
            "prefetch_resets": self.files.resets(),
            "errors_by_errno": dict(self.errors),
            "disk_hits": store.disk.stats.hits if store.disk is not None else 0,
            # CPU seconds since start: of the event-loop thread (serialized) and the whole daemon
            "loop_cpu_s": round(self.loop_clock.loop_seconds(), 3),
            "daemon_cpu_s": round(self.loop_clock.process_seconds(), 3),
        }
        tier = getattr(self.namespace.backend, "tier_stats", None)
        if tier is not None:  # --cache-url: block bytes by tier replica, origin fallbacks
            out["tier"] = tier.snapshot()
        if store.disk is not None:
            disk = store.disk
            out.update(
                disk_capacity=disk.capacity,
                disk_limit=disk.limit,  # less than the capacity once the cache dir's file system is full
                disk_used=disk.used,
                disk_writes=disk.stats.writes,
                disk_misses=disk.stats.misses,
                disk_evictions=disk.stats.evictions,
                disk_corrupt=disk.stats.corrupt,
                disk_write_errors=disk.stats.write_errors,
            )
        return out

    # --- the rest of a read-only file system

    @_mapped
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = self.block_size
        st.f_frsize = 512
        st.f_blocks = ceil_div(self.namespace.total_bytes, 512)
        st.f_bfree = st.f_bavail = 0
        st.f_files = self.namespace.file_count
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    _XATTRS = (b"user.modelfs.source", b"user.modelfs.version", b"user.modelfs.crc32c", b"user.modelfs.md5")

    @_mapped
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT_INODE and name == STATS_XATTR:
            return json.dumps(self.stats()).encode()
        node = self.namespace.get(inode)
        info = node.info
        value: str | None = None
        if info is not None:
            value = {
                b"user.modelfs.source": self.namespace.backend.object_key(info.name),
                b"user.modelfs.version": info.version,
                b"user.modelfs.crc32c": info.crc32c,
                b"user.modelfs.md5": info.md5,
            }.get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode()

    @_mapped
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        info = self.namespace.get(inode).info
        if inode == ROOT_INODE:
            return [STATS_XATTR]
        if info is None:
            return []
        names = [b"user.modelfs.source", b"user.modelfs.version"]
        if info.crc32c:
            names.append(b"user.modelfs.crc32c")
        if info.md5:
            names.append(b"user.modelfs.md5")
        return names

    @_mapped
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not mode & os.W_OK

    # Everything that would change the tree or a file.
    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    write = create = setxattr = removexattr = fsync = fsyncdir = _read_only
