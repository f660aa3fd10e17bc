"""A local directory as a backend (``file:///dir``): for development, demos and tests.

The version of a file is its inode, size, mtime and ctime, checked before and after every
read, so a file changed while it is open reads as VersionChanged, like an overwritten object.
It is a weak version: see weak.py. A limit: file timestamps advance in ticks of the kernel's
coarse clock (a few milliseconds), so a rewrite in place of the same size within one tick of
the version taken can go unseen, and a read may then return a mix of old and new bytes.
Replace files by rename (a new inode, always seen), never by writing over them.
"""

from __future__ import annotations

import errno
import os

from modelfs.backends.base import ListPage, ObjectInfo
from modelfs.backends.responses import RangeRequest
from modelfs.backends.skeleton import ThreadedBackend
from modelfs.backends.weak import run_marker
from modelfs.config import Source
from modelfs.errors import AccessDenied, BackendError, NotFound, VersionChanged

__all__ = ["LocalBackend"]


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
        self._run = run_marker(persist_weak_versions)

    def classify(self, exc: BaseException, what: str, *, reading: bool = False) -> BackendError:
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, FileNotFoundError):
            if reading:
                return VersionChanged(f"{what}: deleted since it was opened")
            return NotFound(f"{what}: no such file")
        if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno == errno.EACCES):
            return AccessDenied(f"{what}: permission denied")
        if isinstance(exc, OSError):  # a failing disk: retrying will not fix it
            return BackendError(f"{what}: {exc.strerror or exc}")
        return super().classify(exc, what, reading=reading)

    def _list(self) -> list[ObjectInfo]:
        if not os.path.isdir(self._root):
            raise NotFound(f"{self._source.url}: no such directory")
        out: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(self._root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, self._root)
            rel = "" if rel == "." else rel + "/"
            if rel and not filenames and not dirnames:
                out.append(ObjectInfo(rel, 0, os.stat(dirpath).st_mtime, "0"))
            for filename in sorted(filenames):
                path = os.path.join(dirpath, filename)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if not os.path.isfile(path):
                    continue
                out.append(ObjectInfo(rel + filename, st.st_size, st.st_mtime, _version(st, self._run)))
        return out

    async def list_objects(self) -> list[ObjectInfo]:
        return await self.run_blocking(self._list)

    def _list_dir(self, prefix: str, limit: int | None) -> ListPage:
        """One directory in one page; a subdirectory's own entry stands for its placeholder."""
        path = os.path.join(self._root, prefix)
        if not os.path.isdir(self._root):
            raise NotFound(f"{self._source.url}: no such directory")
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        try:
            if prefix:
                objects.append(ObjectInfo(prefix, 0, os.stat(path).st_mtime, "0"))
            with os.scandir(path) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    if limit is not None and len(objects) + len(prefixes) >= limit:
                        break
                    try:
                        if entry.is_dir():
                            prefixes.append(prefix + entry.name + "/")
                        elif entry.is_file():
                            st = entry.stat()
                            objects.append(
                                ObjectInfo(prefix + entry.name, st.st_size, st.st_mtime, _version(st, self._run))
                            )
                    except OSError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            return ListPage([], [])
        except PermissionError:
            raise AccessDenied(f"{prefix}: permission denied") from None
        return ListPage(objects, prefixes)

    async def list_dir(self, prefix: str, token: str | None = None, *, limit: int | None = None) -> ListPage:
        return await self.run_blocking(self._list_dir, prefix, limit)

    def _stat(self, name: str) -> ObjectInfo:
        try:
            st = os.stat(os.path.join(self._root, name))
        except (FileNotFoundError, PermissionError) as exc:
            raise self.classify(exc, name) from None
        return ObjectInfo(name, st.st_size, st.st_mtime, _version(st, self._run))

    async def stat(self, name: str) -> ObjectInfo:
        return await self.run_blocking(self._stat, name)

    def _read(self, name: str, version: str, request: RangeRequest, dest: memoryview) -> None:
        try:
            fd = os.open(os.path.join(self._root, name), os.O_RDONLY)
        except OSError as exc:
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
