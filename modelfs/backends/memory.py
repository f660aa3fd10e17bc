"""An in-memory backend for unit tests: op counters, latency and a fault hook.

Like mountpoint-s3's mock client: it behaves like a store (versions, ranges, NotFound,
VersionChanged) and counts what was asked of it, so tests can assert "N readers, one GET".
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from modelfs.backends.base import ObjectInfo
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
    """Objects held in a dict. ``fault(name, offset, length)`` may raise to inject failures."""

    objects: dict[str, _Stored] = field(default_factory=dict)
    latency: float = 0.0
    fault: Callable[[str, int, int], None] | None = None
    reads: Counter[tuple[str, int]] = field(default_factory=Counter)
    bytes_read: int = 0
    list_calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    read_log: list[tuple[str, int, int]] = field(default_factory=list)
    _next_version: int = 1

    description: str = "memory://"

    def put(self, name: str, data: bytes) -> str:
        """Create or overwrite an object; returns its new version."""
        self._next_version += 1
        self.objects[name] = _Stored(bytes(data), self._next_version, time.time())
        return str(self._next_version)

    def delete(self, name: str) -> None:
        del self.objects[name]

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

    async def stat(self, name: str) -> ObjectInfo:
        await trio.sleep(0)
        try:
            return self._info(name, self.objects[name])
        except KeyError:
            raise NotFound(f"{name}: no such object") from None

    async def read_range(self, name: str, version: str, offset: int, dest: memoryview) -> None:
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
            chunk = stored.data[offset : offset + len(dest)]
            if len(chunk) != len(dest):
                raise ValueError(f"range {offset}+{len(dest)} beyond the end of {name}")
            dest[:] = chunk
            self.bytes_read += len(dest)
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        pass
