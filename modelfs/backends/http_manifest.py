"""A ``--manifest`` file: parsed once, held sorted and charged to the memory budget.

The manifest lists the files an ``http(s)://…/`` source mounts, one relative path a line
(``path size`` optionally, ``#`` a comment). It may be 64 MiB and 1,000,000 lines: read and
parsed for every directory listed, as it was, each listing built beside the budget several
times the file (~290 MiB for 1,000,000 names, the mount's every ``ls``). Here it is parsed
once into its names in code point order (UTF-8 byte order) and their sizes, charged to the
budget while held, and a directory's page is cut from that (:meth:`Manifest.children`: a
subdirectory is skipped over by one bisection, so a page costs its own entries, not the
names below them). The file is stat'ed at each listing and parsed again when it changed (its
size, mtime, ctime or inode): an edit is seen by the next listing, as before.

Its parse is charged before it starts, from the file's size and line count (the bytes, the
names as str, a dict entry and a size each); what is held after it, from its names. One too
big for what the budget can lend is a one-line error ("raise --memory-cache"). What is held
is only there to be quicker: its room is given back whenever a lease needs it, and the next
listing parses the file again (:class:`ManifestFile`).
"""

from __future__ import annotations

import functools
import io
import os
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from modelfs.errors import ConfigError, TransientError

if TYPE_CHECKING:
    from modelfs.cache.memory import Lease

__all__ = ["MAX_MANIFEST_BYTES", "MAX_MANIFEST_ENTRIES", "Manifest", "ManifestFile", "parse_manifest"]

MAX_MANIFEST_BYTES = 64 << 20
MAX_MANIFEST_ENTRIES = 1_000_000

HELD_ENTRY_BYTES = 32
"""Bytes per held name beside its str (``sys.getsizeof``): its list slot, its size in the
array, the allocator's rounding of the str."""
PARSE_ENTRY_BYTES = 160
"""Bytes per line while the manifest is parsed, beside its bytes and the names' str: the
dict entry (name to size), the size's int, the sorted list and the array made from the dict."""
_STR_BYTES = 96
"""The most a str takes beside its characters (its header and the allocator's rounding)."""
_NO_SIZE = -1  # (in the sizes array: a line without a size, or one no file can have)
_MAX_SIZE = (1 << 63) - 1

DirEntry = tuple[str, int | None]
"""One entry of a directory (as HTTPBackend.list_dir pages it): a name relative to the
directory, a subdirectory's with '/' after it; the size the manifest gives, or None."""
Stamp = tuple[int, int, int, int, int]
"""What tells that the file changed: (device, inode, size, mtime, ctime) in ns."""
LeaseFor = Callable[[int, str, int], Awaitable["Lease | None"]]
"""How the manifest gets room from the budget: ``(charge, holding, beside)``: ``charge`` bytes
for ``holding`` (what the one-line error says does not fit) beside ``beside`` bytes its caller
holds already; None without a budget."""


class Manifest:
    """The files a manifest lists: their names in order, the sizes it gives beside them."""

    __slots__ = ("names", "sizes", "charge", "stamp", "lease")

    def __init__(self, names: list[str], sizes: array[int], stamp: Stamp) -> None:
        self.names = names
        self.sizes = sizes
        self.stamp = stamp
        self.charge = held_charge(names)  # what the budget counts for them
        self.lease: Lease | None = None

    def children(self, prefix: str, after: str | None, count: int) -> tuple[list[DirEntry], bool]:
        """Up to ``count`` entries of the directory ``prefix`` ('' or ending in '/') after the
        entry named ``after`` (None: from the first), in name order, and whether more follow.

        Every name below ``prefix + 'd/'`` lies between it and ``prefix + 'd0'`` ('0' follows
        '/'), so a subdirectory is one entry and one bisection, whatever it holds."""
        names, sizes = self.names, self.sizes
        start = bisect_left(names, prefix)
        if after is not None:  # (past a subdirectory: past every name below it)
            if after.endswith("/"):
                start = max(start, bisect_left(names, prefix + after[:-1] + "0"))
            else:
                start = max(start, bisect_right(names, prefix + after))
        found: list[DirEntry] = []
        at = start
        while at < len(names) and names[at].startswith(prefix):
            if len(found) == count:
                return found, True
            rest = names[at][len(prefix) :]
            slash = rest.find("/")
            if slash < 0:
                size = sizes[at]
                found.append((rest, None if size == _NO_SIZE else size))
                at += 1
            else:
                found.append((rest[: slash + 1], None))
                at = bisect_left(names, prefix + rest[:slash] + "0", at)
        return found, False

    def release(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release()


def held_charge(names: list[str]) -> int:
    """What ``names`` (and their sizes) take in memory while held."""
    return sum(sys.getsizeof(name) for name in names) + HELD_ENTRY_BYTES * len(names)


def parse_charge(data: bytes, lines: int) -> int:
    """What parsing ``data`` of ``lines`` lines takes at most: the bytes, the names as str (a
    line of ASCII at one byte a character; else at most four, one wide character making the
    whole str wide), and PARSE_ENTRY_BYTES a line."""
    names = len(data) if data.isascii() else 4 * len(data)
    return len(data) + names + (_STR_BYTES + PARSE_ENTRY_BYTES) * lines


def parse_manifest(data: bytes, origin: str) -> tuple[list[str], array[int]]:
    """The names (sorted, each once: the last line of a name gives its size) and sizes of a
    manifest; ConfigError names the bad line. Blocking: runs in a worker thread."""
    found: dict[str, int] = {}
    number = 0
    for raw in io.BytesIO(data):  # (a line at a time: never a list of them all)
        try:
            text = raw.decode()  # (no UTF-8 sequence holds a '\n' byte)
        except UnicodeDecodeError:
            raise ConfigError(f"manifest {origin} is not UTF-8 text") from None
        for line in text.splitlines() or [""]:  # (numbered as str.splitlines numbers the file's lines)
            number += 1
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, size = line, _NO_SIZE
            parts = line.rsplit(None, 1)
            if len(parts) == 2 and parts[1].isdigit():
                name, size = parts[0].rstrip(), int(parts[1])
                if not 0 <= size <= _MAX_SIZE:
                    size = _NO_SIZE
            while name.startswith("./"):
                name = name[2:]
            if name.startswith("/") or name.endswith("/") or any(p in ("", ".", "..") for p in name.split("/")):
                raise ConfigError(f"{origin} line {number}: not a relative file path: {name!r}")
            found[name] = size
    if not found:
        raise ConfigError(f"{origin}: lists no files")
    names = sorted(found)
    return names, array("q", (found[name] for name in names))


def _build(data: bytes, origin: str, stamp: Stamp) -> Manifest:
    """The parsed manifest of ``data`` (its charge counted here too: a worker thread's work)."""
    return Manifest(*parse_manifest(data, origin), stamp)


class ManifestFile:
    """The manifest at ``path``, parsed when first asked for and again when it changed.

    The parsed manifest's room in the budget is droppable (``Lease.droppable``): a lease that
    finds no room takes it back, and the next listing parses the file again. Held for ever, it
    would take room that waiters were told they can have (a safetensors header, say)."""

    def __init__(self, path: Path, lease_for: LeaseFor) -> None:
        self._path = path
        self._lease_for = lease_for
        self._held: Manifest | None = None
        self._lock = trio.Lock()  # (one parse at a time: listings at once wait for it)

    async def current(self) -> Manifest:
        """The manifest as the file is now (ConfigError if it cannot be read or parsed). Use it
        before the next checkpoint: its room may be taken back at any checkpoint after."""
        async with self._lock:
            try:
                stat = await trio.to_thread.run_sync(os.stat, self._path)
            except OSError as exc:
                raise ConfigError(f"cannot read manifest {self._path}: {exc.strerror}") from None
            stamp = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
            held = self._held
            if held is not None and held.stamp == stamp:
                return held
            self.close()  # (its room is the new one's: never both at once)
            manifest = await self._parse(stamp)
            self._held = manifest
            if manifest.lease is not None:
                manifest.lease.droppable(functools.partial(self._forget, manifest))
            return manifest

    async def _parse(self, stamp: Stamp) -> Manifest:
        path, size = self._path, stamp[2]
        if size > MAX_MANIFEST_BYTES:
            raise ConfigError(f"manifest {path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        leases: list[Lease | None] = []
        try:
            leases.append(await self._lease_for(size + 1, "the manifest", 0))  # (the bytes, before they are read)
            try:
                async with await trio.open_file(path, "rb") as f:
                    data = await f.read(size + 1)
            except OSError as exc:
                raise ConfigError(f"cannot read manifest {path}: {exc.strerror}") from None
            if len(data) > size:
                raise TransientError(f"manifest {path} changed while it was read")
            lines = data.count(b"\n")
            if lines > MAX_MANIFEST_ENTRIES:
                raise ConfigError(f"manifest {path} lists more than {MAX_MANIFEST_ENTRIES} entries")
            leases.append(await self._lease_for(parse_charge(data, lines + 1) - (size + 1), "the manifest", size + 1))
            manifest = await trio.to_thread.run_sync(_build, data, str(path), stamp)
            del data
        finally:
            for lease in leases:
                if lease is not None:
                    lease.release()
        # (Its names held in less than their parse took, the room just given back: no wait.)
        manifest.lease = await self._lease_for(manifest.charge, "the manifest", 0)
        return manifest

    def _forget(self, manifest: Manifest) -> None:
        """The budget took ``manifest``'s room back: it is parsed again when next asked for."""
        if self._held is manifest:
            self._held = None

    def close(self) -> None:
        """Let go of the parsed manifest (and its room in the budget)."""
        held, self._held = self._held, None
        if held is not None:
            held.release()
