"""Wiring: build the layers from a Config, mount, serve until unmounted or signalled.

Order matters: the source is validated (a listing) and the mountpoint checked before
anything is mounted, so a bad SOURCE or mountpoint leaves nothing behind; the mountpoint is
checked again right before mounting (another mount may have come meanwhile). Stop signals
are taken from the start, so a stop during the startup leaves nothing mounted either.
Readiness is proven by a stat of the mountpoint answered by our own loop, and only then
reported.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import cast
from wsgiref.simple_server import WSGIServer

import pyfuse3
import trio

from modelfs import stopping
from modelfs.backends import ObjectInfo, open_backend
from modelfs.cache.blocks import BlockStore, ObjectRef
from modelfs.cache.disk import DiskCache
from modelfs.cache.memory import MemoryCache
from modelfs.config import Config
from modelfs.eager import MAX_MODEL_FILES, EagerStreamer
from modelfs.errors import BackendError, ModelfsError, MountError
from modelfs.files import OpenFiles
from modelfs.fs import ModelFS
from modelfs.inodes import Namespace
from modelfs.memlimit import fuse_tasks, tune_malloc
from modelfs.walk import walk_objects

__all__ = [
    "serve",
    "StopWatchdog",
    "STOP_GRACE",
    "START_RETRY_DEADLINE",
    "check_mountpoint",
    "unmount",
    "is_mounted",
    "mounted_fstype",
]

log = logging.getLogger(__name__)

# The mount's first listing retries transient failures this long at most (or --retry-deadline
# if shorter): like gcsfuse's and mountpoint-s3's start-up checks, an unreachable source fails
# the mount with its one-line error in seconds; reads of a running mount keep the full deadline.
START_RETRY_DEADLINE = 10.0


def _fusermount(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fusermount3", *args], capture_output=True, text=True, check=False)


_MOUNTS_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _mount_table() -> list[tuple[bytes, bytes]]:
    """(mount point, type) of every line of /proc/self/mounts, in order, as bytes: a mount
    point need not be UTF-8 (the kernel escapes only space, tab, newline and backslash)."""
    try:
        with open("/proc/self/mounts", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    table = []
    for line in lines:
        fields = line.split()
        if len(fields) > 2:
            point = _MOUNTS_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), fields[1])
            table.append((point, fields[2]))
    return table


def is_mounted(path: Path) -> bool:
    """True for a live or dead mount at ``path`` (per /proc/self/mounts)."""
    target = os.path.realpath(path)
    if any(point == os.fsencode(target) for point, _ in _mount_table()):
        return True
    return os.path.ismount(target)


def mounted_fstype(path: Path) -> str | None:
    """The type of the topmost mount at ``path`` (``fuse.modelfs``, ``ext4``...), or None."""
    target = os.fsencode(os.path.realpath(path))
    types = [fstype for point, fstype in _mount_table() if point == target]
    return types[-1].decode("ascii", "replace") if types else None  # later lines are on top


def modelfs_mount_holding(path: Path) -> Path | None:
    """The mount point of the modelfs mount that ``path`` (a file or directory) lies in, or None."""
    target = os.fsencode(os.path.realpath(path))
    best: tuple[bytes, bytes] | None = None
    for point, fstype in _mount_table():
        inside = target == point or target.startswith(point.rstrip(b"/") + b"/")
        if inside and (best is None or len(point) >= len(best[0])):  # later lines are on top
            best = (point, fstype)
    return Path(os.fsdecode(best[0])) if best is not None and best[1] == b"fuse.modelfs" else None


def check_mountpoint(path: Path) -> None:
    """An existing empty directory that is not mounted; a dead FUSE mount is cleaned up first."""
    try:
        os.stat(path)
        if is_mounted(path):
            # The stat may come from the kernel's attribute cache of a mount whose daemon is
            # gone; statfs always asks the file system, so a dead FUSE mount says ENOTCONN.
            os.statvfs(path)
    except FileNotFoundError:
        raise MountError(f"mountpoint {path} does not exist") from None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise MountError(f"mountpoint {path}: {exc.strerror}") from None
        log.warning("mountpoint %s is a dead mount (transport endpoint is not connected): unmounting it", path)
        result = _fusermount(["-uz", str(path)])
        if result.returncode != 0:
            raise MountError(
                f"mountpoint {path} is a dead mount and cannot be unmounted: {result.stderr.strip()}"
            ) from None
    if not path.is_dir():
        raise MountError(f"mountpoint {path} is not a directory")
    # Mounting over a mount of another kind is fine (a container's volume, an emptyDir, a bind
    # mount: the way a sidecar shares the model); over another FUSE file system it is not.
    fstype = mounted_fstype(path)
    if fstype is not None and fstype.startswith("fuse"):
        raise MountError(f"mountpoint {path} is already mounted")
    if any(os.scandir(path)):
        raise MountError(f"mountpoint {path} is not empty")


def unmount(path: Path, wait: float = 60.0) -> None:
    """Unmount a modelfs mount, live or dead (never another file system: as root, fusermount3
    would detach anything, say the volume the mount point sits in).

    For a live modelfs mount, also wait (up to ``wait`` seconds) for its daemon to exit, so
    the cache dir is free for the next mount when this returns. A live mount with files open
    in it is busy, as umount says: MountError, and it stays mounted; only a dead one (its
    daemon gone) is detached lazily.
    """
    # Resolved once: the path checked is the path unmounted (a symlink in ``path`` swapped
    # between the checks and fusermount3 would otherwise point it at another mount).
    path = Path(os.path.realpath(path))
    if not is_mounted(path):
        raise MountError(f"{path} is not mounted")
    fstype = mounted_fstype(path)
    if fstype != "fuse.modelfs":
        raise MountError(f"{path} is not a modelfs mount ({fstype or 'unknown type'}); not unmounting it")
    pid = _daemon_pid(path)
    result = _fusermount(["-u", str(path)])
    if result.returncode != 0:
        why = result.stderr.strip()
        if not _is_dead(path):
            # Like umount: a live mount with files open in it stays. (A lazy detach here kept
            # the daemon serving the holders, and the wait below blocked for a minute.)
            if "busy" in why.lower():
                raise MountError(
                    f"{path} is busy (files are open in it); close them, or detach it lazily with fusermount3 -uz"
                )
            raise MountError(f"cannot unmount {path}: {why}")
        result = _fusermount(["-uz", str(path)])  # a dead mount: nothing is served through it any more
        if result.returncode != 0:
            raise MountError(f"cannot unmount {path}: {result.stderr.strip()}")
    if pid is not None and not wait_for_exit(pid, wait):
        log.warning("daemon %d still running %.0f s after unmounting %s", pid, wait, path)


def _is_dead(path: Path) -> bool:
    """A FUSE mount whose daemon is gone: statfs, always answered by the file system itself,
    says ENOTCONN (see check_mountpoint)."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _daemon_pid(path: Path) -> int | None:
    """The pid a live modelfs daemon reports in its stats xattr (None for a dead or other mount)."""
    import json

    try:
        return int(json.loads(os.getxattr(path, "user.modelfs.stats"))["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Poll until process ``pid`` is gone (or a zombie); False on timeout."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _raise_read_ahead(path: Path, kb: int) -> None:
    """Ask the kernel for larger FUSE reads: pyfuse3 cannot pass max_readahead, the bdi can."""
    if kb <= 0:
        return
    st = os.stat(path)
    bdi = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    try:
        bdi.write_text(f"{kb}\n")
        log.debug("read_ahead_kb of %s set to %d", path, kb)
    except OSError as exc:
        log.debug("cannot set %s (%s); keeping the kernel's read-ahead", bdi, exc.strerror)


def build(config: Config) -> tuple[ModelFS, BlockStore, DiskCache | None]:
    memory = MemoryCache(config.memory_cache, config.block_size)
    backend = open_backend(config, memory)
    namespace = Namespace(
        backend,
        ttl=config.metadata_ttl,
        retry_deadline=config.retry_deadline,
        cache_bytes=config.metadata_cache,
        invalidate=pyfuse3.invalidate_entry,  # (in a worker thread, while namespace.run runs)
    )
    disk = (
        DiskCache(config.cache_dir, config.disk_cache, block_size=config.block_size) if config.disk_cache > 0 else None
    )
    store = BlockStore.from_config(config, backend, memory, disk)
    eager = EagerStreamer(
        store,
        suffixes=[s for s in config.eager_suffixes.split(",") if s],
        workers=max(1, config.max_concurrency // 2),
        enabled=config.eager or config.eager_model,
    )
    files = OpenFiles(
        store,
        max_prefetch=config.max_prefetch,
        random_read_size=config.random_read_size,
        eager=eager if config.eager else None,
    )
    ops = ModelFS(namespace, files, ttl=config.metadata_ttl, block_size=config.block_size, eager=eager)
    return ops, store, disk


async def serve(config: Config, ready: Callable[[], bool] = lambda: True, early_signals: Sequence[int] = ()) -> None:
    """Mount ``config.source`` at ``config.mountpoint`` and serve until unmounted or signalled.

    ``ready`` is called once the mount answers; False means whoever waited for it is gone,
    and the mount is taken down again. ``early_signals``: stop signals the caller caught
    before this ran (see cli.py); they stop the mount as if they came now.
    """
    assert config.mountpoint is not None
    mountpoint = config.mountpoint
    watchdog = StopWatchdog(mountpoint, 2 * STOP_GRACE)
    # The stop's signals are taken from the start (a SIGTERM during the startup listing must
    # stop it: as PID 1 a signal without a handler is discarded) until serve() returns, its
    # clean-up included: trio puts the default handler back (a signal would then kill us
    # mid-stop) only when the receiver closes.
    with trio.open_signal_receiver(*stopping.stop_signals()) as signals:
        for signum in early_signals:
            signal.raise_signal(signum)  # into the receiver, now that it takes them
        tune_malloc()
        check_mountpoint(mountpoint)
        ops, store, disk = build(config)
        try:
            started, metrics = await _start(config, ops, disk, signals, watchdog)
            if not started:
                return
            options = set(pyfuse3.default_options) | {"fsname=modelfs", "subtype=modelfs", "ro"}
            if config.allow_other:
                options.add("allow_other")
            try:
                # Checked again with no await before the mount: another mount may have been
                # made here while we listed (two starts at once would otherwise stack mounts).
                check_mountpoint(mountpoint)
                pyfuse3.init(ops, str(mountpoint), options)
            except (MountError, RuntimeError) as exc:
                if metrics is not None:
                    metrics.shutdown()
                if isinstance(exc, MountError):
                    raise
                raise MountError(f"cannot mount {mountpoint}: {exc}") from None
            log.info("mounted %s at %s", config.source.url, mountpoint)
            closed = False
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(store.run)
                    await nursery.start(ops.namespace.run)
                    assert ops.eager is not None
                    await nursery.start(ops.eager.run)
                    if config.eager_model:
                        nursery.start_soon(_stream_model, ops, config.retry_deadline)
                    nursery.start_soon(_on_signals, ops, watchdog, signals)
                    nursery.start_soon(_announce, mountpoint, config.read_ahead_kb, ready)
                    # Requests beyond what the budget can serve at once wait in the kernel's queue.
                    await pyfuse3.main(max_tasks=fuse_tasks(store.memory.max_lease))
                    # Ended by a signal or by an unmount (modelfs unmount, fusermount3 -u): the
                    # same bound either way, and what the stop ends is not logged as failures.
                    stopping.begin()
                    watchdog.start()
                    await ops.namespace.stop_invalidating()  # (no call into the session once it is closed)
                    # Unmount now, not once the tasks below have ended: a GET blocked in a worker
                    # thread on a stalled server must not keep the mount.
                    pyfuse3.close(unmount=True)
                    closed = True
                    log.info("unmounted %s", mountpoint)
                    # No request is left; the GETs still in flight are read-ahead and the eager
                    # stream's, which nothing waits for: end them now (after an unmount nothing
                    # else would, and one on a dead server would hold the exit for its timeout).
                    _abort(ops)
                    # Within the stop timeouts: never past the watchdog, when a signal started it.
                    left = watchdog.remaining()
                    await store.finish_writes(STOP_GRACE if left is None else max(0.0, min(STOP_GRACE, left - 1.0)))
                    nursery.cancel_scope.cancel()
            finally:
                if not closed:
                    ops.namespace.halt_invalidations()
                    pyfuse3.close(unmount=True)
                    log.info("unmounted %s", mountpoint)
                if metrics is not None:
                    metrics.shutdown()
        finally:
            if disk is not None:
                disk.close()
            await ops.namespace.backend.aclose()
            watchdog.cancel()


async def _start(
    config: Config, ops: ModelFS, disk: DiskCache | None, signals: AsyncIterator[int], watchdog: StopWatchdog
) -> tuple[bool, WSGIServer | None]:
    """Everything before the mount: the first listing, the disk cache, the metrics server.

    A stop signal meanwhile cancels it (the listing may wait on a server for many seconds):
    (False, None) then, and nothing is mounted. Otherwise (True, the metrics server if any).
    """
    backend = ops.namespace.backend
    stopped: list[int] = []
    failure: ModelfsError | None = None
    metrics: WSGIServer | None = None

    async def on_signal(startup: trio.CancelScope) -> None:
        async for signum in signals:
            stopped.append(signum)
            log.info("got %s during startup: stopping, nothing mounted", signal.Signals(signum).name)
            stopping.begin()
            watchdog.start()  # a listing that cannot be cancelled ends the process in time
            startup.cancel()
            # A GET blocked in a worker thread ends only when the thread returns: end it now.
            abort = getattr(backend, "abort", None)
            if callable(abort):
                abort()
            return

    # Errors are kept and raised after the nursery: raised inside it they would reach the
    # caller wrapped in an exception group, not as the one-line error they are.
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as startup:
            nursery.start_soon(on_signal, startup)
            try:
                # One page of the root, not the whole tree: a bad bucket or prefix fails here, before mounting.
                found = await ops.namespace.start(deadline=min(config.retry_deadline, START_RETRY_DEADLINE))
                if config.source.prefix and not found:
                    raise MountError(f"nothing found at {config.source.url} (no object with that name or prefix)")
                if disk is not None:
                    disk.open()
                metrics = _start_metrics(config, ops)  # before mounting: a busy port leaves nothing mounted
            except ModelfsError as exc:
                failure = exc
        nursery.cancel_scope.cancel()
    if stopped:  # whatever the startup got to, a failure included (an aborted GET): just stop
        if metrics is not None:
            metrics.shutdown()
        return False, None
    if failure is not None:
        raise failure
    return True, metrics


async def _stream_model(ops: ModelFS, retry_deadline: float) -> None:
    """--eager-model: stream every weight file now, before anyone opens it.

    The walk lists one directory page at a time and keeps only the weight files it finds,
    and stops past the most the stream queues (:data:`~modelfs.eager.MAX_MODEL_FILES`).
    """
    eager = ops.eager
    assert eager is not None
    backend = ops.namespace.backend
    refs: list[ObjectRef] = []
    try:
        walk = cast("AsyncGenerator[ObjectInfo, None]", walk_objects(backend, retry_deadline=retry_deadline))
        async with contextlib.aclosing(walk):
            async for info in walk:
                if eager.wants(info.name) and info.size > 0:
                    refs.append(ObjectRef(backend.object_key(info.name), info.name, info.version, info.size))
                    if len(refs) > MAX_MODEL_FILES:
                        break  # (the stream says how many it leaves out)
    except BackendError as exc:
        log.warning("--eager-model: cannot list %s (%s); streaming what was found", backend.description, exc)
    count = eager.stream_model(refs)
    log.info("streaming %d weight file(s) into the disk cache, in name order", count)


def _start_metrics(config: Config, ops: ModelFS) -> WSGIServer | None:
    if not config.metrics_addr:
        return None
    from modelfs.metrics import ModelfsCollector, on_trio_thread, serve_metrics

    # Scrapes run in the metrics server's threads; the snapshot itself is taken on the trio thread.
    collector = ModelfsCollector(on_trio_thread(ops.metrics_snapshot), config.source.scheme)
    try:
        return serve_metrics(config.metrics_addr, collector)
    except OSError as exc:
        raise MountError(f"cannot serve metrics on {config.metrics_addr}: {exc.strerror}") from None


async def _announce(mountpoint: Path, read_ahead_kb: int, ready: Callable[[], bool]) -> None:
    # The stat must run in a thread: our own loop has to answer it.
    await trio.to_thread.run_sync(_raise_read_ahead, mountpoint, read_ahead_kb)
    if not ready():
        pyfuse3.terminate()  # nobody waits for this mount any more (see cli.py): unmount


# After SIGTERM (SIGINT, SIGHUP) requests still being served STOP_GRACE seconds later fail
# with EIO, and the mount goes; whatever still holds the process STOP_GRACE seconds after
# that (a GET blocked in a worker thread on a stalled server) is cut by StopWatchdog. Both
# together stay well inside the shipped stop timeouts: systemd TimeoutStopSec=30 and the
# pods' terminationGracePeriodSeconds=60 (tests/unit/test_packaging.py checks them).
STOP_GRACE = 5.0


class StopWatchdog:
    """Ends the process ``seconds`` after the stop signal if serve() has not returned by then.

    It detaches the mount (``fusermount3 -uz``) and exits: what a SIGKILL from systemd or the
    kubelet would do, but with the mount cleaned up instead of left dead. A thread, because
    the trio loop it guards may be the thing that cannot finish; it only makes blocking calls.
    """

    def __init__(self, mountpoint: Path | None, seconds: float, *, code: int = 0) -> None:
        self.mountpoint = mountpoint  # (None: nothing to detach, as for modelfs warm)
        self.seconds = seconds
        self.code = code  # the exit status it ends the process with
        self._timer: threading.Timer | None = None
        self._fires_at: float | None = None

    def start(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(self.seconds, self._expire)
            self._timer.daemon = True
            self._fires_at = time.monotonic() + self.seconds
            self._timer.start()

    def remaining(self) -> float | None:
        """Seconds until it ends the process; None if no stop signal started it."""
        return None if self._fires_at is None else self._fires_at - time.monotonic()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        what = f"detaching {self.mountpoint} and exiting" if self.mountpoint is not None else "exiting"
        log.warning(
            "still running %.0f s after the stop signal (a backend request does not end): %s", self.seconds, what
        )
        if self.mountpoint is not None and is_mounted(self.mountpoint):
            try:
                _fusermount(["-uz", str(self.mountpoint)])
            except OSError:
                pass
        logging.shutdown()
        os._exit(self.code)


async def _on_signals(ops: ModelFS, watchdog: StopWatchdog, signals: AsyncIterator[int]) -> None:
    """The stop: unmount on the first signal, fail what still runs after the grace (or at a
    second signal). Later signals stay in ``signals``, unanswered: they never kill the stop."""
    async for signum in signals:
        log.info("got %s: unmounting", signal.Signals(signum).name)
        break
    stopping.begin()
    watchdog.start()
    pyfuse3.terminate()
    again = False
    with trio.move_on_after(STOP_GRACE):
        async for signum in signals:  # a second signal: no more grace
            log.info("got %s again: failing the requests in flight now", signal.Signals(signum).name)
            again = True
            break
    count = ops.stop()
    # A request whose own GET blocks in a worker thread is cancelled only once the thread
    # returns: a backend that can, ends those GETs now (GCS shuts their sockets down).
    _abort(ops)
    if count:
        # The stop's one line about what it abandoned (info: the stop is doing what it says;
        # the retries and shut-down GETs behind it are logged at debug level).
        after = "at the second signal" if again else f"{STOP_GRACE:.0f} s after the signal"
        log.info("%d request(s) still waiting on the backend %s: failing them with EIO", count, after)


def _abort(ops: ModelFS) -> None:
    """End the backend's GETs in flight now and let no new one start (idempotent)."""
    abort = getattr(ops.namespace.backend, "abort", None)
    if callable(abort):
        abort()
