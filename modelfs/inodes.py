"""The namespace: object listing → a tree of inodes, refreshed when its TTL runs out.

The whole listing below the root is read at once (model prefixes hold tens to thousands of
objects) and turned into directories and files by :mod:`modelfs.names`. A path keeps its
inode number for as long as it exists with the same kind (and, for a file, the same object
version), so the kernel's cached entries stay valid across refreshes; a file whose object
was overwritten gets a new inode, and the old one serves its open handles until forgotten.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from modelfs.backends.base import Backend, ObjectInfo
from modelfs.backends.retry import retry_transient
from modelfs.errors import NotFound, TransientError
from modelfs.names import ParsedName, parse_object_name

__all__ = ["Node", "Namespace", "ROOT_INODE"]

log = logging.getLogger(__name__)

ROOT_INODE = 1


@dataclass(eq=False)
class Node:
    inode: int
    path: str  # '' for the root, else 'a/b'
    is_dir: bool
    info: ObjectInfo | None = None  # files only
    mtime: float = 0.0
    children: dict[bytes, Node] = field(default_factory=dict)  # directories only
    lookups: int = 0  # the kernel's references (lookup and readdirplus replies)

    @property
    def size(self) -> int:
        return self.info.size if self.info is not None else 0


class Namespace:
    """Path ↔ inode, with the listing cached for ``ttl`` seconds (-1: never refreshed)."""

    def __init__(self, backend: Backend, *, ttl: float, retry_deadline: float) -> None:
        self.backend = backend
        self.ttl = ttl
        self.retry_deadline = retry_deadline
        self.root = Node(ROOT_INODE, "", True, mtime=time.time())
        self._by_inode: dict[int, Node] = {ROOT_INODE: self.root}
        self._by_path: dict[tuple[str, bool], Node] = {("", True): self.root}
        self._next_inode = ROOT_INODE + 1
        self._listed_at: float | None = None
        self._lock = trio.Lock()
        self._warned: set[str] = set()
        self.file_count = 0
        self.total_bytes = 0

    # --- refresh

    def _stale(self) -> bool:
        if self._listed_at is None:
            return True
        if self.ttl < 0:
            return False
        return trio.current_time() - self._listed_at >= self.ttl

    async def refresh(self, *, force: bool = False) -> None:
        """Re-list the backend if the listing is older than the TTL (one listing at a time)."""
        if not force and not self._stale():
            return
        async with self._lock:
            if not force and not self._stale():
                return
            try:
                objects = await retry_transient(
                    self.backend.list_objects, deadline=self.retry_deadline, what=f"listing {self.backend.description}"
                )
            except TransientError as exc:
                if force or self._listed_at is None:
                    raise
                # The backend is unreachable: what is cached stays readable under the last
                # listing rather than every lookup failing; try again after another TTL.
                log.warning("cannot refresh the listing (%s); serving the last listing for another %gs", exc, self.ttl)
                self._listed_at = trio.current_time()
                return
            self._apply(objects)
            self._listed_at = trio.current_time()

    def _warn_once(self, name: str, why: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            log.warning("object %r is not shown: %s", name, why)

    def _node(self, path: str, is_dir: bool) -> Node:
        node = self._by_path.get((path, is_dir))
        if node is None:
            node = Node(self._next_inode, path, is_dir)
            self._next_inode += 1
            self._by_path[(path, is_dir)] = node
            self._by_inode[node.inode] = node
        return node

    def _apply(self, objects: list[ObjectInfo]) -> None:
        dirs: dict[str, float] = {"": self.root.mtime}
        files: dict[str, ObjectInfo] = {}
        for obj in objects:
            parsed = parse_object_name(obj.name)
            if not isinstance(parsed, ParsedName):
                self._warn_once(obj.name, parsed)
                continue
            for depth in range(1, len(parsed.parts)):
                dirs.setdefault("/".join(parsed.parts[:depth]), obj.mtime)
            path = "/".join(parsed.parts)
            if parsed.is_dir:
                dirs[path] = obj.mtime
            else:
                files[path] = obj
        for path in [p for p in files if p in dirs]:
            self._warn_once(files[path].name, "a directory of the same name exists (the directory wins)")
            del files[path]

        live: set[tuple[str, bool]] = {(p, True) for p in dirs} | {(p, False) for p in files}
        for key in [k for k in self._by_path if k not in live]:
            node = self._by_path.pop(key)
            node.children = {}
            # Kept in _by_inode until the kernel forgets it; open handles keep their ref.

        for node in self._by_path.values():
            if node.is_dir:
                node.children = {}
        for path in sorted(dirs):
            node = self._node(path, True)
            node.mtime = dirs[path]
            if path:
                parent_path, _, name = path.rpartition("/")
                self._by_path[(parent_path, True)].children[name.encode()] = node
        for path, obj in files.items():
            old = self._by_path.get((path, False))
            if old is not None and old.info is not None and old.info.version != obj.version:
                # An overwritten object is a new file to the kernel, as after a rename over
                # it: the kernel's page cache is per inode, and an old handle must never be
                # served pages read from the new version. The old inode lives on for its
                # open handles until the kernel forgets it.
                del self._by_path[(path, False)]
                if old.lookups == 0:
                    del self._by_inode[old.inode]
            node = self._node(path, False)
            node.info = obj
            node.mtime = obj.mtime
            parent_path, _, name = path.rpartition("/")
            self._by_path[(parent_path, True)].children[name.encode()] = node
        self.file_count = len(files)
        self.total_bytes = sum(obj.size for obj in files.values())

    # --- queries

    def files(self) -> list[Node]:
        """Every file node in the current tree."""
        return [node for (_, is_dir), node in self._by_path.items() if not is_dir and node.info is not None]

    def get(self, inode: int) -> Node:
        try:
            return self._by_inode[inode]
        except KeyError:
            raise NotFound(f"inode {inode} is unknown") from None

    async def lookup(self, parent: int, name: bytes) -> Node:
        await self.refresh()
        directory = self.get(parent)
        if name == b".":
            return directory
        if name == b"..":
            if not directory.path:
                return directory
            return self._by_path.get((directory.path.rpartition("/")[0], True), self.root)
        child = directory.children.get(name)
        if child is None:
            raise NotFound(f"{name!r} not found")
        return child

    def forget(self, inode: int, count: int) -> None:
        """The kernel dropped ``count`` references; a node gone from the tree is freed at zero."""
        node = self._by_inode.get(inode)
        if node is None or inode == ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - count)
        if node.lookups == 0 and self._by_path.get((node.path, node.is_dir)) is not node:
            del self._by_inode[inode]
