"""An in-memory backend for unit tests: op counters, latency and a fault hook.

Like mountpoint-s3's mock client: it behaves like a store (versions, ranges, NotFound,
VersionChanged) and counts what was asked of it, so tests can assert "N readers, one GET".
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import crc32c
import trio

from modelfs.backends.base import ListPage, ObjectInfo
from modelfs.errors import NotFound, VersionChanged

__all__ = ["MemoryBackend", "ramp"]


def ramp(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes where any offset is checkable: byte i is (i * 7 + i // 251 + seed) % 256."""
    pattern = bytes((i * 7 + i // 251 + seed) % 256 for i in range(251 * 256))
    reps = size // len(pattern) + 1
    return (pattern * reps)[:size]


@dataclass
class _Stored:
    data: bytes
    version: int
    mtime: float


@dataclass
class MemoryBackend:
    """Objects held in a dict. ``fault(name, offset, length)`` may raise to inject failures.

    Listing and metadata calls are counted apart: ``list_calls`` whole-tree listings,
    ``page_calls`` directory pages, ``probe_calls`` one-result listings (is there anything
    below ``name/``?), ``stat_calls`` object metadata. ``meta_fault(op, name)`` may raise to
    fail them (an outage); while ``list_gate`` is set to an unset event, directory pages wait
    for it (a slow listing).
    """

    objects: dict[str, _Stored] = field(default_factory=dict)
    latency: float = 0.0
    fault: Callable[[str, int, int], None] | None = None
    reads: Counter[tuple[str, int]] = field(default_factory=Counter)
    bytes_read: int = 0
    list_calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    read_log: list[tuple[str, int, int]] = field(default_factory=list)
    page_size: int = 1000
    page_calls: int = 0
    probe_calls: int = 0
    stat_calls: int = 0
    meta_fault: Callable[[str, str], None] | None = None
    list_gate: trio.Event | None = None
    # Tests of the block store's joined read-ahead GETs turn this on (backends/base.JoinedReads).
    joins_reads: bool = False
    _next_version: int = 1
    _sorted: list[str] | None = None

    description: str = "memory://"

    def put(self, name: str, data: bytes) -> str:
        """Create or overwrite an object; returns its new version."""
        self._next_version += 1
        if name not in self.objects:
            self._sorted = None
        self.objects[name] = _Stored(bytes(data), self._next_version, time.time())
        return str(self._next_version)

    def delete(self, name: str) -> None:
        del self.objects[name]
        self._sorted = None

    def object_key(self, name: str) -> str:
        return f"memory:///{name}"

    @property
    def read_calls(self) -> int:
        return sum(self.reads.values())

    def _info(self, name: str, stored: _Stored) -> ObjectInfo:
        return ObjectInfo(name, len(stored.data), stored.mtime, str(stored.version))

    async def list_objects(self) -> list[ObjectInfo]:
        self.list_calls += 1
        await trio.sleep(0)
        return [self._info(name, obj) for name, obj in sorted(self.objects.items())]

    def _keys(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(self.objects)
        return self._sorted

    async def list_dir(self, prefix: str, token: str | None = None, *, limit: int | None = None) -> ListPage:
        if limit == 1:
            self.probe_calls += 1
        else:
            self.page_calls += 1
            if self.list_gate is not None:
                await self.list_gate.wait()
        await trio.sleep(0)
        if self.meta_fault is not None:
            self.meta_fault("list", prefix)
        keys = self._keys()
        if token is None:
            i = bisect.bisect_left(keys, prefix)
        elif token.endswith("/"):
            i = bisect.bisect_left(keys, token[:-1] + "0")  # '0' follows '/': past everything below it
        else:
            i = bisect.bisect_right(keys, token)
        room = min(limit or self.page_size, self.page_size)
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        last: str | None = None
        while i < len(keys) and keys[i].startswith(prefix):
            if len(objects) + len(prefixes) >= room:
                return ListPage(objects, prefixes, last)
            rest = keys[i][len(prefix) :]
            if "/" in rest:
                last = prefix + rest.split("/", 1)[0] + "/"
                prefixes.append(last)
                i = bisect.bisect_left(keys, last[:-1] + "0")
            else:
                last = keys[i]
                objects.append(self._info(last, self.objects[last]))
                i += 1
        return ListPage(objects, prefixes, None)

    async def stat(self, name: str) -> ObjectInfo:
        self.stat_calls += 1
        await trio.sleep(0)
        if self.meta_fault is not None:
            self.meta_fault("stat", name)
        try:
            return self._info(name, self.objects[name])
        except KeyError:
            raise NotFound(f"{name}: no such object") from None

    async def read_range(
        self, name: str, version: str, offset: int, dest: memoryview, *, size: int | None = None
    ) -> None:
        self.reads[(name, offset)] += 1
        self.read_log.append((name, offset, len(dest)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                await trio.sleep(self.latency)
            else:
                await trio.sleep(0)
            if self.fault is not None:
                self.fault(name, offset, len(dest))
            stored = self.objects.get(name)
            if stored is None or str(stored.version) != version:
                raise VersionChanged(f"{name}: version {version} is gone")
            if size is not None and size != len(stored.data):
                raise VersionChanged(f"{name}: {len(stored.data)} bytes, not the {size} pinned")
            chunk = stored.data[offset : offset + len(dest)]
            if len(chunk) != len(dest):
                raise ValueError(f"range {offset}+{len(dest)} beyond the end of {name}")
            dest[:] = chunk
            self.bytes_read += len(dest)
        finally:
            self.in_flight -= 1

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
        """One (logged) read of the whole range, split over ``dests`` (and their CRC32Cs, as GCS's)."""
        total = sum(len(d) for d in dests)
        whole = memoryview(bytearray(total))
        await self.read_range(name, version, offset, whole, size=size)
        at = 0
        for dest in dests:
            dest[:] = whole[at : at + len(dest)]
            at += len(dest)
        if sums is not None:
            sums.extend(crc32c.crc32c(dest) for dest in dests)

    async def aclose(self) -> None:
        pass
