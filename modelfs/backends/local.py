"""A local directory as a backend (``file:///dir``): for development, demos and tests.

The version of a file is its mtime and size, checked again on every read, so a file changed
while it is open reads as VersionChanged, like an overwritten object.
"""

from __future__ import annotations

import errno
import os

import trio

from modelfs.backends.base import ObjectInfo
from modelfs.config import Source
from modelfs.errors import AccessDenied, NotFound, VersionChanged

__all__ = ["LocalBackend"]


def _version(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


class LocalBackend:
    """Serves the files below one directory; blocking calls run in trio worker threads."""

    def __init__(self, source: Source, max_concurrency: int = 8) -> None:
        self._source = source
        self._root = source.bucket
        self._limiter = trio.CapacityLimiter(max_concurrency)

    @property
    def description(self) -> str:
        return self._source.url

    def object_key(self, name: str) -> str:
        return self._source.object_key(name)

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
                out.append(ObjectInfo(rel + filename, st.st_size, st.st_mtime, _version(st)))
        return out

    async def list_objects(self) -> list[ObjectInfo]:
        return await trio.to_thread.run_sync(self._list, limiter=self._limiter)

    def _stat(self, name: str) -> ObjectInfo:
        try:
            st = os.stat(os.path.join(self._root, name))
        except FileNotFoundError:
            raise NotFound(f"{name}: no such file") from None
        except PermissionError:
            raise AccessDenied(f"{name}: permission denied") from None
        return ObjectInfo(name, st.st_size, st.st_mtime, _version(st))

    async def stat(self, name: str) -> ObjectInfo:
        return await trio.to_thread.run_sync(self._stat, name, limiter=self._limiter)

    def _read(self, name: str, version: str, offset: int, dest: memoryview) -> None:
        try:
            fd = os.open(os.path.join(self._root, name), os.O_RDONLY)
        except FileNotFoundError:
            raise VersionChanged(f"{name}: deleted since it was opened") from None
        except PermissionError:
            raise AccessDenied(f"{name}: permission denied") from None
        try:
            if _version(os.fstat(fd)) != version:
                raise VersionChanged(f"{name}: changed since it was opened")
            got = 0
            while got < len(dest):
                n = os.preadv(fd, [dest[got:]], offset + got)
                if n == 0:
                    raise VersionChanged(f"{name}: shorter than when it was opened")
                got += n
        except OSError as exc:
            if exc.errno == errno.EACCES:
                raise AccessDenied(f"{name}: permission denied") from None
            raise
        finally:
            os.close(fd)

    async def read_range(self, name: str, version: str, offset: int, dest: memoryview) -> None:
        await trio.to_thread.run_sync(self._read, name, version, offset, dest, limiter=self._limiter)

    async def aclose(self) -> None:
        pass
