"""A local directory as a backend (``file:///dir``): for development, demos and tests.

The version of a file is its inode, size, mtime and ctime, checked before and after every
read, so a file changed while it is open reads as VersionChanged, like an overwritten object.
It is a weak version: see weak.py. A limit: file timestamps advance in ticks of the kernel's
coarse clock (a few milliseconds), so a rewrite in place of the same size within one tick of
the version taken can go unseen, and a read may then return a mix of old and new bytes.
Replace files by rename (a new inode, always seen), never by writing over them.

Nothing outside the directory is ever listed, stat'ed or read (beneath.py): a symlink to a
file below it is shown as that file (a Hugging Face cache snapshot links to its blobs); one
that leads out of it, loops or dangles, and one to a directory, is left out with a warning.
Every name is resolved again, component by component without following any symlink the
kernel's way, at each stat and read: a symlink swapped in after the listing cannot escape.

A modelfs mount inside the directory is left out too, with a warning: it may be this mount
itself, reached through a bind mount that the path check of the config cannot see, and
listing it would list the mount within itself without end.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from modelfs.backends.base import ListPage, ObjectInfo
from modelfs.backends.beneath import Refused, open_dir, open_file
from modelfs.backends.responses import RangeRequest
from modelfs.backends.skeleton import ThreadedBackend
from modelfs.backends.weak import run_marker
from modelfs.config import Source
from modelfs.errors import AccessDenied, BackendError, NotFound, VersionChanged

__all__ = ["LocalBackend"]

log = logging.getLogger(__name__)

_MAX_WARNINGS = 1000  # names warned about once each, at most


def _modelfs_devices(mountinfo: str = "/proc/self/mountinfo") -> set[int]:
    """The devices of the modelfs mounts this process sees (empty if mountinfo is unreadable)."""
    devices: set[int] = set()
    try:
        with open(mountinfo, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return devices
    for line in lines:
        fields, _, rest = line.partition(b" - ")
        parts = fields.split()
        if len(parts) > 2 and rest.split()[:1] == [b"fuse.modelfs"]:
            major, _, minor = parts[2].partition(b":")
            if major.isdigit() and minor.isdigit():
                devices.add(os.makedev(int(major), int(minor)))
    return devices


def _version(st: os.stat_result, run: str) -> str:
    """Inode, size, mtime and ctime (ns): a replacement by rename has another inode, an
    in-place rewrite another ctime (which no user can set back). Still a weak version: an
    inode number can be reused, so ``run`` (weak.py) keeps it from outliving the daemon."""
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ctime_ns:x}{run}"


class LocalBackend(ThreadedBackend):
    """Serves the files below one directory; blocking calls run in trio worker threads."""

    def __init__(self, source: Source, max_concurrency: int = 8, *, persist_weak_versions: bool = False) -> None:
        super().__init__(source, threads=max_concurrency)
        self._root = source.bucket
        # Which absolute symlink targets lie below the root. (Only that: every name is still
        # resolved from the root's descriptor, so a stale value cannot lead out of it.)
        self._real_root = os.path.realpath(self._root)
        self._run = run_marker(persist_weak_versions)
        self._warned: set[str] = set()

    def classify(self, exc: BaseException, what: str, *, reading: bool = False) -> BackendError:
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, Refused):
            if reading:
                return VersionChanged(f"{what}: {exc}")
            return NotFound(f"{what}: {exc}")
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            if reading:
                return VersionChanged(f"{what}: deleted since it was opened")
            return NotFound(f"{what}: no such file")
        if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno == errno.EACCES):
            return AccessDenied(f"{what}: permission denied")
        if isinstance(exc, OSError):  # a failing disk: retrying will not fix it
            return BackendError(f"{what}: {exc.strerror or exc}")
        return super().classify(exc, what, reading=reading)

    def _warn_once(self, name: str, message: str, *args: object) -> None:
        """Log ``message`` the first time ``name`` is left out (of the first 1,000: the set is bounded)."""
        if name not in self._warned and len(self._warned) < _MAX_WARNINGS:
            self._warned.add(name)
            log.warning(message, *args)

    def _open_root(self) -> int:
        """The root directory's descriptor (SOURCE itself may be a symlink: the user named it)."""
        try:
            return os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{self._source.url}: no such directory") from None

    def _open(self, name: str) -> int:
        """A descriptor of the regular file ``name``, found without leaving the root (beneath.py)."""
        root = self._open_root()
        try:
            return open_file(root, name, self._real_root)
        finally:
            os.close(root)

    def _scan(self, root: int, fd: int, prefix: str, limit: int | None, objects: list[ObjectInfo]) -> list[str]:
        """The entries of the directory ``fd`` (named ``prefix``) appended to ``objects``, up to
        ``limit`` entries in all with the subdirectories, which are returned (names ending in '/').

        A regular file is listed as it is; a symlink as the regular file below the root it
        leads to (its target's size and version: a read pins the same), else left out with a
        warning; a symlink is never a subdirectory. Devices, FIFOs and sockets are left out.
        """
        prefixes: list[str] = []
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        here = os.fstat(fd).st_dev
        for i, entry in enumerate(entries):
            # Each DirEntry (and the stat it caches) goes once used: held to the end, 20,000 of
            # them were 7.8 MiB beside the listing made of the page, and the holes they left
            # among the page's ObjectInfos kept the daemon's RSS up after the page was gone.
            entries[i] = None  # type: ignore[call-overload]
            if limit is not None and len(objects) + len(prefixes) >= limit:
                break
            name = prefix + entry.name
            try:
                if entry.is_symlink():
                    try:
                        target = open_file(root, name, self._real_root)
                    except (Refused, OSError) as exc:
                        self._left_out(fd, name, entry.name, exc)
                        continue
                    try:
                        st = os.fstat(target)
                    finally:
                        os.close(target)
                elif entry.is_dir(follow_symlinks=False):
                    # (Only a mount point has another device: the mount table is read for those.)
                    device = entry.stat(follow_symlinks=False).st_dev
                    if device != here and device in _modelfs_devices():
                        self._warn_once(
                            name, "%r is a modelfs mount (maybe this one): not shown", os.path.join(self._root, name)
                        )
                        continue
                    prefixes.append(name + "/")
                    continue
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):  # replaced since the directory was read
                        continue
                else:
                    continue
            except OSError:  # gone since the directory was read
                continue
            objects.append(ObjectInfo(name, st.st_size, st.st_mtime, _version(st, self._run)))
        return prefixes

    def _left_out(self, fd: int, name: str, entry: str, exc: BaseException) -> None:
        """One warning (per name) for a symlink not shown: where it points, and why."""
        if name in self._warned or len(self._warned) >= _MAX_WARNINGS:
            return
        try:
            target = os.readlink(entry, dir_fd=fd)
        except OSError:
            target = "?"
        reason = (
            "no such file"
            if isinstance(exc, FileNotFoundError)
            else (exc.strerror or exc)
            if isinstance(exc, OSError)
            else exc
        )
        self._warn_once(name, "%r -> %r: %s; not shown", os.path.join(self._root, name), target, reason)

    def _list(self) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        root = self._open_root()
        try:
            todo = [""]  # directories to list, the next one last: depth first, sorted
            while todo:
                prefix = todo.pop()
                try:
                    fd = open_dir(root, prefix.split("/")[:-1])
                except OSError:  # gone, or swapped for a symlink, since its parent was read
                    continue
                try:
                    mtime = os.fstat(fd).st_mtime
                    placeholder = len(out)
                    subdirs = self._scan(root, fd, prefix, None, out)
                except OSError:
                    continue
                finally:
                    os.close(fd)
                if prefix and len(out) == placeholder and not subdirs:  # an empty directory is kept
                    out.append(ObjectInfo(prefix, 0, mtime, "0"))
                todo.extend(reversed(subdirs))
        finally:
            os.close(root)
        return out

    async def list_objects(self) -> list[ObjectInfo]:
        return await self.run_blocking(self._list)

    def _list_dir(self, prefix: str, limit: int | None) -> ListPage:
        """One directory in one page; a subdirectory's own entry stands for its placeholder."""
        objects: list[ObjectInfo] = []
        root = self._open_root()
        try:
            fd = open_dir(root, prefix.split("/")[:-1])
            try:
                if prefix:
                    objects.append(ObjectInfo(prefix, 0, os.fstat(fd).st_mtime, "0"))
                prefixes = self._scan(root, fd, prefix, limit, objects)
            finally:
                os.close(fd)
        except (FileNotFoundError, NotADirectoryError):  # (a symlink in its place is not followed)
            return ListPage([], [])
        except PermissionError:
            raise AccessDenied(f"{prefix}: permission denied") from None
        finally:
            os.close(root)
        return ListPage(objects, prefixes)

    async def list_dir(self, prefix: str, token: str | None = None, *, limit: int | None = None) -> ListPage:
        return await self.run_blocking(self._list_dir, prefix, limit)

    def _stat(self, name: str) -> ObjectInfo:
        try:
            fd = self._open(name)
        except (Refused, OSError) as exc:
            raise self.classify(exc, name) from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return ObjectInfo(name, st.st_size, st.st_mtime, _version(st, self._run))

    async def stat(self, name: str) -> ObjectInfo:
        return await self.run_blocking(self._stat, name)

    def _read(self, name: str, version: str, request: RangeRequest, dest: memoryview) -> None:
        try:
            fd = self._open(name)
        except (Refused, OSError) as exc:
            raise self.classify(exc, name, reading=True) from None
        try:
            if _version(os.fstat(fd), self._run) != version:
                raise VersionChanged(f"{name}: changed since it was opened")
            got = 0
            while got < len(dest):
                n = os.preadv(fd, [dest[got:]], request.offset + got)
                if n == 0:
                    raise VersionChanged(f"{name}: shorter than when it was opened")
                got += n
            # Again after the read: a rewrite in place while preadv copied may have put some of
            # its bytes into ``dest``. (One within the same timestamp tick changes nothing that
            # fstat shows: see the module's docstring.)
            if _version(os.fstat(fd), self._run) != version:
                raise VersionChanged(f"{name}: changed while it was read")
        except OSError as exc:
            raise self.classify(exc, name, reading=True) from None
        finally:
            os.close(fd)

    async def aclose(self) -> None:
        pass
