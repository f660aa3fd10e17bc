"""The namespace: one directory listed at a time, kept in a bounded cache, served stale-while-revalidate.

Nothing is listed until it is asked for. A directory's listing is read page by page with a
delimiter (``Backend.list_dir``) when it is first opened, as far as ``readdir`` reads it; a
lookup in a directory that has no complete listing asks for that one name (object metadata,
and a one-result listing below ``name/`` to tell a directory) instead of listing anything.
Listings are held in an LRU bounded in (estimated) bytes; an evicted listing is listed again
when next needed. Past the TTL a complete listing still answers at once, and the directory is
listed again in the background (one refresh per directory at a time); a refresh that fails
keeps the old listing, so an outage never makes a lookup wait for the retry deadline; a
refresh stops once it outgrows the whole cache. A stale name found by lookup outside any
listing is asked for again by itself, never by listing its directory. Only a directory never
listed waits for the backend.

Inodes: a node keeps its inode while it is in a cached listing or the kernel holds it. A file
whose object changed version is a new node (new inode): the kernel's page cache is per inode,
and an open handle must never be served pages of another version. ``_by_inode`` holds only
the nodes the kernel references (lookup and readdirplus replies, minus forgets) and the root:
those are the only inodes the kernel can ask about, and a forgotten node is freed there.

Held nodes are bounded: the kernel keeps a dentry and inode for every name it was given until
its own caches shrink (under host memory pressure only), so a walk of a large tree would make
the daemon keep a node per file. The nodes the kernel holds are kept in the order of their
last lookup or readdirplus reply; past ``held_cap`` (:func:`modelfs.memlimit.held_nodes`) a
background task asks the kernel to drop the least recently replied ones that no open file or
directory handle uses (``invalidate_entry``, a batch at a time, in a worker thread), and the
node is freed when the kernel's FORGET comes, never before: its inode stays valid until then.
"""

from __future__ import annotations

import bisect
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable

import cachetools
import trio

from modelfs.backends.base import Backend, ListPage, ObjectInfo
from modelfs.backends.retry import retry_transient
from modelfs.errors import BackendError, NotFound
from modelfs.memlimit import held_nodes
from modelfs.names import NAME_MAX, ParsedName, parse_object_name
from modelfs.pages import PageGuard

__all__ = ["Node", "Listing", "DirHandle", "Namespace", "ROOT_INODE", "DEFAULT_METADATA_CACHE", "ENTRY_BYTES"]

log = logging.getLogger(__name__)

ROOT_INODE = 1
DEFAULT_METADATA_CACHE = 8 << 20
# What one listed entry costs in memory besides its name, estimated from sys.getsizeof of a
# node, its ObjectInfo, its strings, its dict slot and list slot (benchmarks/namespace.py
# measures the real figure).
ENTRY_BYTES = 640
_MAX_WARNINGS = 1000
_MAX_MISSING = 4096
# A handle's own streaming listing remembers this many of the file names readdir passed that
# may still be followed by a directory of the same name ('a' then 'a/' on a later page).
_MAX_PASSED = 4096
_PROBE_PAGES = 8  # empty pages with a token a name lookup's probe follows before it says "no directory"
MAX_SIZE = 1 << 63  # st_size is an off_t: a larger size (a store that lies) cannot be shown


class Node:
    """A file or directory. Directories carry their listing (if cached) and looked-up names."""

    __slots__ = (
        "inode",
        "name",
        "path",
        "parent",
        "is_dir",
        "info",
        "mtime",
        "lookups",
        "checked_at",
        "opened_version",
        "listing",
        "extra",
        "refreshing",
        "opens",
        "frozen",
        "opening",
    )

    def __init__(
        self,
        inode: int,
        name: bytes,
        path: str,
        parent: Node | None,
        is_dir: bool,
        info: ObjectInfo | None = None,
        mtime: float = 0.0,
    ) -> None:
        self.inode = inode
        self.name = name  # the last path component; b'' for the root
        self.path = path  # '' for the root, else 'a/b'
        self.parent = parent
        self.is_dir = is_dir
        self.info = info  # files only; never changes (a new version is a new node)
        self.mtime = mtime
        self.lookups = 0  # the kernel's references (lookup and readdirplus replies)
        self.checked_at = 0.0  # trio time the backend last confirmed it (looked-up nodes)
        self.opened_version: str | None = None  # the version last opened: the kernel's page cache holds it
        self.listing: Listing | None = None  # directories: the cached listing
        self.extra: dict[bytes, Node] | None = None  # directories: names found by lookup, outside a listing
        self.refreshing = False  # directories: a background listing is running
        self.opens = 0  # open file or directory handles on it: the kernel is not asked to drop it
        # Directories: the listing that outgrew the cache, while handles still read it (later
        # opendirs share it rather than each listing the directory up to the cache's size again).
        self.frozen: weakref.ref[Listing] | None = None
        # Directories: a new listing whose first page is being read; opendirs meanwhile share it
        # (64 processes opening a directory at once made 64 listings of it).
        self.opening: Listing | None = None

    @property
    def size(self) -> int:
        return self.info.size if self.info is not None else 0

    @property
    def prefix(self) -> str:
        """The backend's name of this directory: '' or 'a/b/'."""
        return self.path + "/" if self.path else ""

    @property
    def children(self) -> dict[bytes, Node]:
        """The entries known now: the listing's, else those found by lookup."""
        if self.listing is not None:
            return self.listing.by_name
        return dict(self.extra or {})

    def __repr__(self) -> str:
        return f"Node({self.inode}, {self.path!r}, {'dir' if self.is_dir else 'file'})"


class Listing:
    """One directory's entries in listing order, filled page by page.

    ``readdir`` offsets index ``names``; a refresh builds a new Listing and swaps it in, so an
    open directory handle keeps reading the one it started with (no copy is made).
    """

    __slots__ = (
        "directory",
        "names",
        "by_name",
        "token",
        "complete",
        "started_at",
        "cost",
        "files",
        "bytes",
        "lock",
        "base",
        "streaming",
        "private",
        "passed",
        "guard",
        "reached",
        "pages",
        "resume_after",
        "__weakref__",
    )

    def __init__(self, directory: Node, started_at: float) -> None:
        self.directory = directory
        self.names: list[bytes] = []
        self.by_name: dict[bytes, Node] = {}
        self.token: str | None = None
        self.complete = False
        self.started_at = started_at
        self.cost = ENTRY_BYTES
        self.files = 0
        self.bytes = 0
        self.lock = trio.Lock()
        self.base = 0  # the readdir offset of names[0]: a handle's own streaming copy drops what readdir passed
        self.streaming = False  # too large for the cache: each handle reads on in a listing of its own
        self.private = False  # one handle's own streaming listing (trimmed as readdir passes)
        # Private: file names trimmed that a later page may name again as a directory (_passed_file).
        self.passed: dict[bytes, None] | None = None
        self.guard: PageGuard | None = None  # while more pages follow: a token that loops is an error
        # A handle's own listing: the greatest name its pages gave. It forgets the names it
        # passed, so the guard cannot tell a store that went back to an earlier page; the
        # names a store lists only ever increase (byte order), which is checked instead.
        self.reached: str | None = None
        # Where each page read into ``names`` starts (its readdir offset) and the token it was
        # asked with: a handle that gives its pages back reads the page of its position again.
        self.pages: list[tuple[int, str | None]] = []
        # A handle's own listing taken up again: its first page is one the handle had read up to
        # this name (replied already; names up to it are left out).
        self.resume_after: bytes | None = None


class DirHandle:
    """One opendir: the listing it reads, shared with other handles until that turns streaming.

    A shared listing is never trimmed. Once it is streaming (too large for the cache) it is
    frozen: nothing extends it any more, and each handle reads on in a listing of its own
    that starts where the frozen one ends and holds only the page ahead of it (two handles
    reading at different speeds must not drop names the other has still to read). Until the
    handle has passed the frozen listing's end it reads those names from the frozen listing
    itself (no copy); then it lets go of it, so N handles cost one frozen listing plus a page
    each, not N copies of it.
    """

    __slots__ = ("listing", "frozen", "directory", "position", "busy")

    def __init__(self, listing: Listing) -> None:
        self.listing = listing
        self.frozen: Listing | None = None  # private: the frozen shared listing, until readdir passes its end
        self.directory = listing.directory
        self.position = 0  # the offset readdir asked for last: every entry before it was replied
        self.busy = 0  # readdir is reading an entry of it (its listing is not given back meanwhile)

    @property
    def private(self) -> bool:
        """Whether ``listing`` is this handle's own streaming listing."""
        return self.listing.private


def _key(name: bytes, is_dir: bool) -> bytes:
    """Where an entry sorts in a listing: by its object name or prefix ('a' < 'a.0' < 'a/' < 'a0')."""
    return name + b"/" if is_dir else name


def _passed_place(listing: Listing, name: bytes) -> bool:
    """Whether an unfinished ``listing`` has read past where a directory ``name/`` would be."""
    if not listing.names:
        return False
    last = listing.names[-1]
    return _key(last, listing.by_name[last].is_dir) > name + b"/"


def _passed_file(passed: dict[bytes, None], name: bytes) -> None:
    """Remember a file name readdir passed; past ``_MAX_PASSED`` the oldest is forgotten (a
    directory of its name on a later page would then be listed besides the file)."""
    passed[name] = None
    if len(passed) > _MAX_PASSED:
        del passed[next(iter(passed))]


def _forget_passed(passed: dict[bytes, None], reached: bytes) -> None:
    """The listing reached ``reached``: a file whose 'name/' sorts before it is past its
    directory's place. Every one is looked at: listing order is not 'name/' order ('a' comes
    before 'a.0', but 'a.0/' before 'a/')."""
    for name in [name for name in passed if name + b"/" < reached]:
        del passed[name]


def _tail_files(listing: Listing, end: int | None = None) -> dict[bytes, None]:
    """The file names at the end of ``listing`` (of its first ``end`` names) that a later page
    may still name as a directory."""
    names = listing.names if end is None else listing.names[: max(0, end)]
    if not names:
        return {}
    last = names[-1]
    reached = _key(last, listing.by_name[last].is_dir)
    tail: list[bytes] = []
    for name in reversed(names[-_MAX_PASSED:]):
        if not listing.by_name[name].is_dir and name + b"/" >= reached:
            tail.append(name)
    return dict.fromkeys(reversed(tail))


def _own_cost(listing: Listing) -> int:
    """A handle's own listing's estimated bytes: the names it holds and the passed file names."""
    per = ENTRY_BYTES + len(listing.directory.path)
    cost = ENTRY_BYTES + sum(per + 2 * len(name) for name in listing.names)
    return cost + sum(64 + len(name) for name in listing.passed or ())


class _ListingCache(cachetools.LRUCache[int, Listing]):
    """Directory inode → listing, bounded by the listings' estimated bytes."""

    def __init__(self, maxsize: int, on_evict: Callable[[Listing], None]) -> None:
        super().__init__(maxsize, getsizeof=lambda listing: listing.cost)
        self._on_evict = on_evict

    def popitem(self) -> tuple[int, Listing]:
        key, listing = super().popitem()
        self._on_evict(listing)
        return key, listing


Invalidate = Callable[[int, bytes], None]
"""``invalidate(parent_inode, name)``: ask the kernel to drop a directory entry (pyfuse3's
``invalidate_entry``; called in a worker thread: it blocks while the kernel serves a request
in that directory). Raises FileNotFoundError when the kernel has no such entry."""


class Namespace:
    """Path ↔ inode over a lazily listed backend; listings valid for ``ttl`` seconds (-1: forever).

    ``invalidate`` (a mount passes pyfuse3's): how the nodes the kernel holds beyond
    ``held_cap`` (default: :func:`modelfs.memlimit.held_nodes` of ``cache_bytes``) are given
    back, while :meth:`run` runs; without it they are not bounded.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        ttl: float,
        retry_deadline: float,
        cache_bytes: int = DEFAULT_METADATA_CACHE,
        held_cap: int | None = None,
        invalidate: Invalidate | None = None,
    ) -> None:
        self.backend = backend
        self.ttl = ttl
        self.retry_deadline = retry_deadline
        self.root = Node(ROOT_INODE, b"", "", None, True, mtime=time.time())
        self.root.lookups = 1
        self._by_inode: dict[int, Node] = {ROOT_INODE: self.root}
        self._next_inode = ROOT_INODE + 1
        self._listings = _ListingCache(max(cache_bytes, 1), self._evicted)
        self._refresh_slot = trio.Lock()  # (see _refresh_dir)
        self._nursery: trio.Nursery | None = None
        # Names a lookup found missing in a directory that has no listing, and when: a loader
        # probing for optional files (config names) asks again and again, and the kernel does
        # not remember an ENOENT. Bounded in entries (~200 bytes each).
        self._missing: cachetools.LRUCache[tuple[int, bytes], float] = cachetools.LRUCache(_MAX_MISSING)
        self._warned: set[str] = set()
        self._rechecking: set[tuple[int, bytes]] = set()  # stale looked-up names being asked for again
        self.pages = 0  # directory pages read
        self.name_lookups = 0  # lookups answered by asking the backend for one name
        self.refreshes = 0  # background refreshes finished
        self.stale_served = 0  # lookups and opendirs answered from a listing past its TTL
        self.refresh_failures = 0
        # The nodes the kernel holds (not the root), least recently replied first, but for those
        # it was asked to drop and has not forgotten yet (in _by_inode only).
        self._held: dict[int, Node] = {}
        self.held_cap = held_nodes(cache_bytes) if held_cap is None else max(1, held_cap)
        # Invalidations go a batch at a time, from held_cap down to held_cap - batch: one
        # worker-thread call per `batch` new nodes, not one per node.
        self._batch = max(16, self.held_cap // 16)
        self._trim_at = self.held_cap  # _held's length that wakes the trimmer
        self._trim_wanted = trio.Event()
        self._invalidate = invalidate
        self._invalidating = False  # a batch is being sent (a worker thread)
        self._invalidated = trio.Event()  # set when that batch is done
        # Set by the trio thread at the stop; the worker thread checks it between entries.
        self._halt = threading.Event()
        self.invalidations = 0  # entries the kernel was asked to drop
        self.trim_passes = 0  # times the trimmer looked for nodes to give back
        # Open directory handles, least recently read first. The listings they hold that are not
        # in the cache (evicted, replaced, frozen, their own pages) are bounded by ``handle_cap``
        # together: past it the least recently read give theirs back (_bound_handles).
        self._handles: dict[DirHandle, None] = {}
        # Twice the cache: a listing frozen past the cache (at most the cache plus a page), which
        # later opendirs share while handles read it, and the pages of handles beside it.
        self.handle_cap = 2 * max(cache_bytes, 1)
        self.handles_parked = 0  # times a handle gave its listing back

    # --- the background nursery

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve background refreshes until cancelled (without it, stale listings refresh inline)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._invalidate is not None:
                nursery.start_soon(self._trim_held, self._invalidate)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # --- figures for statfs and stats: what the cached listings hold, not the whole source

    @property
    def file_count(self) -> int:
        """Files in the cached directory listings (the source's total is never listed)."""
        return sum(listing.files for listing in self._listings.values())

    @property
    def total_bytes(self) -> int:
        """Bytes of the files in the cached directory listings."""
        return sum(listing.bytes for listing in self._listings.values())

    @property
    def metadata_bytes(self) -> int:
        """Estimated bytes the cached listings hold (bounded by ``metadata_capacity``)."""
        return int(self._listings.currsize)

    @property
    def metadata_capacity(self) -> int:
        return int(self._listings.maxsize)

    @property
    def cached_dirs(self) -> int:
        return len(self._listings)

    @property
    def inodes(self) -> int:
        """Nodes the kernel holds references to (plus the root)."""
        return len(self._by_inode)

    @property
    def handle_bytes(self) -> int:
        """Estimated bytes of the listings open directory handles hold outside the cache."""
        return sum(listing.cost for listing in self._outside_listings(list(self._handles)).values())

    @property
    def held_nodes(self) -> int:
        """Nodes the kernel holds that it was not asked to drop (bounded by ``held_cap`` but
        for those open handles use, and what arrives while a batch is being sent)."""
        return len(self._held)

    # --- state helpers

    def _now(self) -> float:
        return trio.current_time()

    def _fresh(self, since: float) -> bool:
        return self.ttl < 0 or self._now() - since < self.ttl

    def _warn_once(self, name: str, why: str, *, below: bool = False) -> None:
        if len(self._warned) < _MAX_WARNINGS and name not in self._warned:
            self._warned.add(name)
            if below:  # a prefix ('a//', 'x/../'): every object under it is left out
                log.warning("objects below %r are not shown: %s", name, why)
            else:
                log.warning("object %r is not shown: %s", name, why)

    def _new_node(self, directory: Node, name: bytes, is_dir: bool, info: ObjectInfo | None) -> Node:
        inode = self._next_inode
        self._next_inode += 1
        if info is not None and not is_dir:
            path = info.name  # the same string: no second copy per file
        else:
            path = directory.prefix + name.decode()
        mtime = info.mtime if info is not None else self.root.mtime
        return Node(inode, name, path, directory, is_dir, info, mtime)

    def _known(self, directory: Node, name: bytes, previous: Listing | None) -> Node | None:
        node = previous.by_name.get(name) if previous is not None else None
        if node is None and directory.extra is not None:
            node = directory.extra.get(name)
        if node is None and directory.listing is not None and directory.listing is not previous:
            node = directory.listing.by_name.get(name)
        return node

    def _reuse(
        self, directory: Node, name: bytes, is_dir: bool, info: ObjectInfo | None, previous: Listing | None
    ) -> Node:
        """The node for this entry: the known one if kind and version are the same, else a new one."""
        old = self._known(directory, name, previous)
        if old is not None and old.is_dir == is_dir:
            if is_dir or (old.info is not None and info is not None and old.info.version == info.version):
                return old
        return self._new_node(directory, name, is_dir, info)

    def _component(self, directory: Node, full: str, is_dir: bool) -> bytes | None:
        """The entry name of ``full`` (an object name or prefix) in ``directory``; None if it cannot be one."""
        parsed = parse_object_name(full)
        if not isinstance(parsed, ParsedName):
            self._warn_once(full, parsed, below=is_dir)
            return None
        depth = directory.path.count("/") + 1 if directory.path else 0
        if len(parsed.parts) != depth + 1 or parsed.is_dir != is_dir:
            return None
        if "/".join(parsed.parts[:-1]) != directory.path:
            # Listed here by a store that lies: shown here, it would read another object's bytes.
            self._warn_once(full, f"listed in {directory.prefix or '/'!r}, outside it")
            return None
        return parsed.parts[-1].encode()

    def _sized(self, info: ObjectInfo) -> bool:
        """Whether the object's size can be a file's (st_size is a signed 64-bit number)."""
        if 0 <= info.size < MAX_SIZE:
            return True
        self._warn_once(info.name, f"its size {info.size} is not a file size")
        return False

    def _add_page(self, listing: Listing, page: ListPage, previous: Listing | None) -> None:
        directory = listing.directory
        entries: list[tuple[bytes, bool, ObjectInfo | None]] = []
        for obj in page.objects:
            if obj.name == directory.prefix:
                continue  # the directory's own placeholder
            if obj.name.endswith("/"):
                name = self._component(directory, obj.name, True)
                if name is not None:
                    entries.append((name, True, None))
                continue
            name = self._component(directory, obj.name, False)
            if name is not None and self._sized(obj):
                entries.append((name, False, obj))
        for prefix in page.prefixes:
            name = self._component(directory, prefix, True)
            if name is not None:
                entries.append((name, True, None))
        # A page is one contiguous run of names: sorted, pages follow each other in readdir.
        entries.sort(key=lambda entry: entry[0])
        passed = listing.passed
        for name, is_dir, info in entries:
            have = listing.by_name.get(name)
            if have is None and passed and name in passed:
                # Replied already as a file, on a page this handle let go of: listed once, as
                # the file (a lookup of the name finds the directory, which wins there).
                if is_dir:
                    self._warn_once(
                        directory.prefix + name.decode(errors="replace") + "/",
                        "a file of the same name was listed before them (in readdir; a lookup finds the directory)",
                        below=True,
                    )
                elif info is not None:
                    self._warn_once(info.name, "listed twice")
                continue
            if have is not None:
                if have.is_dir or not is_dir:
                    if info is not None:
                        why = (
                            "a directory of the same name exists (the directory wins)"
                            if have.is_dir
                            else "listed twice"
                        )
                        self._warn_once(info.name, why)
                    continue
                # A file 'a' beside objects under 'a/': the directory wins, so every path below stays reachable.
                assert have.info is not None
                self._warn_once(have.info.name, "a directory of the same name exists (the directory wins)")
                listing.files -= 1
                listing.bytes -= have.size
                listing.by_name[name] = self._reuse(directory, name, True, None, previous)
                continue
            node = self._reuse(directory, name, is_dir, info, previous)
            listing.names.append(name)
            listing.by_name[name] = node
            listing.cost += ENTRY_BYTES + 2 * len(name) + len(directory.path)
            if info is not None:
                listing.files += 1
                listing.bytes += info.size
        if passed and entries:
            _forget_passed(passed, max(_key(name, is_dir) for name, is_dir, _ in entries))
        listing.token = page.next_token
        listing.complete = page.next_token is None
        self.pages += 1

    def _what(self, directory: Node) -> str:
        return f"listing {self.backend.description}{'/' if directory.path else ''}{directory.path}"

    async def _page(self, directory: Node, token: str | None, deadline: float | None = None) -> ListPage:
        return await retry_transient(
            lambda: self.backend.list_dir(directory.prefix, token),
            deadline=self.retry_deadline if deadline is None else deadline,
            what=self._what(directory),
        )

    def _cache(self, listing: Listing) -> None:
        """Install (or re-size) ``listing`` as its directory's cached listing."""
        directory = listing.directory
        old = directory.listing
        if old is not None and old is not listing:
            self._replaced(old, listing)
            if not listing.complete:
                # Its later pages still reuse the nodes the kernel holds (found by name until
                # the new listing is complete), whose inodes would otherwise change.
                self._keep_held(old)
        # Out and in again: re-sizing an entry in place may evict the entry itself.
        self._listings.pop(directory.inode, None)
        try:
            self._listings[directory.inode] = listing
        except ValueError:
            # Larger than the whole cache: frozen, it lives only while readdir handles that have
            # not passed its end hold it, each reading on in a listing of its own that keeps only
            # the page ahead of it (DirHandle), and lookups in that directory ask for their one name.
            listing.streaming = True
            # Not cached now (nor the listing it replaces): the nodes the kernel holds in
            # either keep their inodes, found by name.
            for held in {id(x): x for x in (directory.listing, listing) if x is not None}.values():
                self._keep_held(held)
            directory.listing = None
            directory.frozen = weakref.ref(listing)
            return
        directory.listing = listing
        if listing.complete:
            directory.extra = None  # every name it knows is in the listing now

    def _dropped_dirs(self, nodes: list[Node]) -> None:
        """Free the cached listings below directories that left the tree."""
        stack = [node for node in nodes if node.is_dir]
        while stack:
            node = stack.pop()
            listing = node.listing
            if listing is None:
                continue
            node.listing = None
            self._listings.pop(node.inode, None)
            stack.extend(child for child in listing.by_name.values() if child.is_dir)

    def _replaced(self, old: Listing, new: Listing) -> None:
        gone = [node for name, node in old.by_name.items() if new.by_name.get(name) is not node]
        if new.complete:
            self._dropped_dirs(gone)

    def _evicted(self, listing: Listing) -> None:
        """An LRU eviction: nodes the kernel holds stay findable by name; the rest are freed."""
        directory = listing.directory
        if directory.listing is not listing:
            return
        directory.listing = None
        self._keep_held(listing)
        self._dropped_dirs([node for node in listing.by_name.values() if node.lookups == 0])

    def _keep_held(self, listing: Listing) -> None:
        """The nodes of ``listing`` the kernel holds stay findable by name (their inodes kept)
        once it is no longer its directory's cached listing."""
        directory = listing.directory
        held = {name: node for name, node in listing.by_name.items() if node.lookups > 0}
        now = self._now()
        for node in held.values():
            node.checked_at = listing.started_at if listing.complete else now
        if held:
            directory.extra = {**(directory.extra or {}), **held}

    # --- listing a directory

    async def start(self, deadline: float | None = None) -> bool:
        """List the first page of the root: a missing bucket or root raises NotFound here.

        ``deadline``: how long transient failures of this first page are retried (default: the
        retry deadline). A mount passes a short one: an unreachable source should fail the mount
        with its one-line error in seconds, not after the minute a running mount's reads wait.
        Returns whether the root may have entries: the page named one, or a next page follows.
        That is judged on the page read, not on what was cached (a first page larger than the
        whole cache is not kept).
        """
        listing = Listing(self.root, self._now())
        await self._more(listing, None, deadline)
        return bool(listing.names) or not listing.complete

    async def open_listing(self, directory: Node) -> Listing:
        """The listing an ``opendir`` reads: the cached one (refreshed behind if stale), or a new one.

        A new listing has its first page read before this returns; ``entry`` reads the rest
        as ``readdir`` gets to it.
        """
        listing = directory.listing
        if listing is not None:
            self._listings.get(directory.inode)  # mark it recently used
            if listing.complete:
                if not self._fresh(listing.started_at):
                    self.stale_served += 1
                    await self._revalidate(directory)
                return directory.listing or listing
            if self._fresh(listing.started_at):
                return listing
        elif directory.frozen is not None:
            frozen = directory.frozen()
            if frozen is not None and self._fresh(frozen.started_at):
                # Too large for the cache, and handles still read it: this one reads it too,
                # then on in a listing of its own (DirHandle), instead of building another.
                return frozen
            # (Not kept in a local either: this coroutine's frame would hold the stale frozen
            # listing, handles parked or not, while the new one is read beside it.)
            del frozen
            directory.frozen = None
        opening = directory.opening
        if opening is not None:
            # Another opendir is reading the first page of a new listing: share it (whatever
            # the TTL: it is being listed now).
            async with opening.lock:
                pass
            if opening.pages or opening.complete:
                return opening
            # (Its first page failed: this opendir lists anew and gets its own answer.)
        # A new listing: what idle handles hold outside the cache makes room for it first, or the
        # listing being read (a file:// directory is one page, whatever its size) and the page's
        # answer come on top of the listings they hold (30 opendirs of a 20,000-name directory
        # with --metadata-ttl 0: the last one's listing, the new one and its page at once).
        self._room_for_a_listing()
        listing = Listing(directory, self._now())
        directory.opening = listing
        try:
            await self._more(listing, None)
        finally:
            if directory.opening is listing:
                directory.opening = None
        return listing

    async def open_dir(self, directory: Node) -> DirHandle:
        """An ``opendir``'s handle: its position state over ``open_listing``'s listing."""
        handle = DirHandle(await self.open_listing(directory))
        self._handles[handle] = None
        self._bound_handles()
        return handle

    def close_dir(self, handle: DirHandle) -> None:
        """A ``releasedir``: the handle's listing is no longer held for it."""
        self._handles.pop(handle, None)
        self.closed(handle.directory)

    # --- the listings idle handles hold

    @staticmethod
    def _outside_listings(handles: list[DirHandle]) -> dict[int, Listing]:
        """The distinct listings ``handles`` hold that are not their directory's cached one."""
        out: dict[int, Listing] = {}
        for handle in handles:
            for listing in (handle.listing, handle.frozen):
                if listing is not None and listing.directory.listing is not listing:
                    out[id(listing)] = listing
        return out

    def _bound_handles(self, cap: int | None = None, *, spare_last: bool = True) -> None:
        """Past ``cap`` (``handle_cap``), the least recently read handles (not one readdir is
        reading, nor the last one read unless ``spare_last`` is false) give their listings back:
        a listing goes once no handle holds it. Each reads the page of its position again when
        next read (:meth:`_park`)."""
        cap = self.handle_cap if cap is None else max(0, cap)
        order = list(self._handles)
        if len(order) < (2 if spare_last else 1):
            return
        outside = self._outside_listings(order)
        total = sum(listing.cost for listing in outside.values())
        if total <= cap:
            return
        holders: dict[int, int] = dict.fromkeys(outside, 0)
        for handle in order:
            for key in {id(x) for x in (handle.listing, handle.frozen) if x is not None and id(x) in outside}:
                holders[key] += 1
        for handle in order[:-1] if spare_last else order:
            if total <= cap:
                return
            held = {id(x) for x in (handle.listing, handle.frozen) if x is not None and id(x) in outside}
            if handle.busy or not held or self._parked(handle):
                continue
            self._park(handle)
            total += handle.listing.cost
            for key in held:
                holders[key] -= 1
                if not holders[key]:
                    total -= outside[key].cost

    def _room_for_a_listing(self) -> None:
        """Before a listing is read from nothing (a new one, or a parked handle's page again):
        the listings idle handles hold outside the cache go down to ``handle_cap`` less the
        cache's size, the last one read included (never one readdir is reading). A page comes
        whole (a file:// directory is one page, whatever its size), so bounding them after it
        came held the old listing, the new one and the page's answer at once: the daemon's peak."""
        self._bound_handles(self.handle_cap - int(self._listings.maxsize), spare_last=False)

    @staticmethod
    def _parked(handle: DirHandle) -> bool:
        listing = handle.listing
        return listing.private and handle.frozen is None and not listing.names  # (its passed names stay)

    def _park(self, handle: DirHandle) -> None:
        """Give ``handle``'s listing back: it gets an empty listing of its own that reads the
        page holding its position again (by that page's token) and leaves out the names up to
        the last one replied, so it neither repeats nor skips a name that stayed."""
        self.handles_parked += 1
        position = handle.position
        listing, frozen = handle.listing, handle.frozen
        own = Listing(handle.directory, listing.started_at)
        own.streaming = own.private = True
        own.base = position
        last = position - 1
        source = None
        if frozen is not None and frozen.base <= last < listing.base:
            source = frozen
        elif listing.base <= last < listing.base + len(listing.names):
            source = listing
        if source is not None and source.pages:
            at = bisect.bisect_right([start for start, _ in source.pages], last) - 1
            start, token = source.pages[max(0, at)]
            own.token = token
            own.resume_after = source.names[last - source.base]
            if source.private and source.passed is not None:
                own.passed = dict(source.passed)
            else:
                own.passed = _tail_files(source, start - source.base)
        elif position and position == listing.base + len(listing.names):
            # Between pages: the next one is the listing's next token.
            own.token = listing.token
            own.complete = listing.complete
            own.passed = dict(listing.passed) if listing.passed else None
        else:
            own.base = 0  # (another offset: read from the start, as a rewind does)
        own.cost = _own_cost(own)
        handle.listing = own
        handle.frozen = None

    async def _more(self, listing: Listing, previous: Listing | None, deadline: float | None = None) -> None:
        """Read the next page of ``listing`` (one page at a time: readers queue on its lock)."""
        async with listing.lock:
            if listing.complete or (listing.streaming and not listing.private):
                return  # a streaming shared listing is frozen: its handles read on in their own
            sent = listing.token
            if listing.resume_after is not None:
                self._room_for_a_listing()  # a parked handle reads its page again
            page = await self._page(listing.directory, sent, deadline)
            if listing.private:
                self._check_forward(listing, page)
            guard = listing.guard
            if guard is None and page.next_token is not None:
                guard = listing.guard = PageGuard(self._what(listing.directory))
            if guard is not None:
                guard.token(sent, page.next_token)
            held = listing.base + len(listing.names)
            listing.pages.append((held, sent))
            self._add_page(listing, page, previous if previous is not None else listing.directory.listing)
            if listing.resume_after is not None:
                self._resume(listing)
            if guard is not None:
                guard.entries(listing.base + len(listing.names) - held, page.next_token)
                if page.next_token is None:
                    listing.guard = None  # complete: nothing more to check
            current = listing.directory.listing
            newer = current is None or current is listing or current.started_at < listing.started_at
            if previous is None and not listing.streaming and not listing.private:
                if newer:
                    self._cache(listing)
                elif listing.cost > self._listings.maxsize:
                    # Replaced (a newer listing of the directory is cached): it can never be
                    # cached, so past the cache's size it streams as one that outgrew it does.
                    listing.streaming = True
        if listing.private:
            listing.cost = _own_cost(listing)
        self._bound_handles()  # it grew (or is another page): idle handles may have to give theirs back

    def _resume(self, listing: Listing) -> None:
        """A handle's own listing taken up again read the page of its position: the names up to
        the last one it replied go (a page's names are in name order); file names among them
        are remembered as passed, as a trimmed page's are."""
        after = listing.resume_after
        listing.resume_after = None
        assert after is not None and listing.private
        cut = bisect.bisect_right(listing.names, after)
        passed = listing.passed if listing.passed is not None else {}
        for name in listing.names[:cut]:
            if not listing.by_name.pop(name).is_dir:
                _passed_file(passed, name)
        del listing.names[:cut]
        listing.passed = passed

    def _check_forward(self, listing: Listing, page: ListPage) -> None:
        """A handle's own listing: BackendError if the page lists a name before one an earlier
        page gave (a store whose pages went back would be listed for ever). The same name
        again is let through: a store may repeat a prefix on the next page."""
        names = [obj.name for obj in page.objects] + list(page.prefixes)
        if not names:
            return
        first = min(names)
        if listing.reached is not None and first < listing.reached:
            raise BackendError(
                f"{self._what(listing.directory)}: the store listed {first!r} after {listing.reached!r} "
                "(its pages went back)"
            )
        listing.reached = max(names)

    async def entry(self, handle: DirHandle, index: int) -> tuple[bytes, Node] | None:
        """The ``index``-th entry of ``handle``'s listing, reading pages as far as needed; None past the end.

        readdir asks for ``index`` once every entry before it was replied: that is the handle's
        position if it has to give its listing back (:meth:`_park`)."""
        handle.position = index
        if handle in self._handles:  # (the most recently read last)
            del self._handles[handle]
            self._handles[handle] = None
        handle.busy += 1
        try:
            return await self._entry(handle, index)
        finally:
            handle.busy -= 1

    async def _entry(self, handle: DirHandle, index: int) -> tuple[bytes, Node] | None:
        while True:
            listing = handle.listing
            if listing.streaming and not handle.private:
                self._go_private(handle)
                continue
            frozen = handle.frozen
            if frozen is not None:
                if frozen.base <= index < listing.base:
                    name = frozen.names[index - frozen.base]
                    return name, frozen.by_name[name]
                handle.frozen = None  # past its end (or rewound below it): this handle needs it no more
            i = index - listing.base
            if i < 0:  # a handle's own listing asked to go back (rewinddir): list it again from the start
                async with listing.lock:
                    if listing.base:
                        listing.names.clear()
                        listing.by_name.clear()
                        listing.token = None
                        listing.complete = False
                        listing.base = 0
                        listing.guard = None  # a new pass may see the same tokens again
                        listing.reached = None
                        listing.passed = None
                        listing.pages.clear()
                        listing.resume_after = None
                continue
            if i < len(listing.names):
                name = listing.names[i]
                return name, listing.by_name[name]
            if listing.complete:
                return None
            if handle.private and listing.names:
                # Everything held is before ``index``, replied already: held once, never the whole directory.
                passed = listing.passed if listing.passed is not None else {}
                for name in listing.names:
                    if not listing.by_name[name].is_dir:
                        _passed_file(passed, name)
                listing.passed = passed
                listing.by_name.clear()
                listing.base += len(listing.names)
                listing.names.clear()
                listing.pages.clear()
                listing.cost = _own_cost(listing)
            await self._more(listing, None)

    def _go_private(self, handle: DirHandle) -> None:
        """``handle``'s shared listing turned streaming (frozen): the handle keeps a reference
        to it for the names up to its end, and reads on in a listing of its own from its token."""
        shared = handle.listing
        own = Listing(shared.directory, shared.started_at)
        own.token = shared.token
        own.complete = shared.complete
        own.base = shared.base + len(shared.names)
        own.streaming = True
        own.private = True
        own.passed = _tail_files(shared)
        handle.listing = own
        handle.frozen = shared

    async def _list_whole(self, directory: Node) -> Listing | None:
        """A new complete listing of ``directory``; None as soon as it outgrows the whole cache
        (it could not be kept, and reading on would hold the whole directory at once)."""
        previous = directory.listing
        listing = Listing(directory, self._now())
        while not listing.complete:
            await self._more(listing, previous)
            if listing.cost > self._listings.maxsize:
                return None
        return listing

    def _too_large(self, directory: Node) -> None:
        """A refresh found ``directory`` larger than the cache: its stale listing goes, as if
        evicted (held nodes stay findable by name and are checked one by one), and opendir
        reads it page by page from now on."""
        old = directory.listing
        if old is None:
            return
        log.info("%s is now larger than --metadata-cache: looked up by name from now on", directory.path or "/")
        self._listings.pop(directory.inode, None)
        self._evicted(old)

    async def _revalidate(self, directory: Node) -> None:
        """List ``directory`` again behind the stale listing (inline when no nursery runs)."""
        if directory.refreshing:
            return
        if self._nursery is None:
            await self._refresh_dir(directory)
        else:
            directory.refreshing = True
            self._nursery.start_soon(self._refresh_dir, directory)

    async def _refresh_dir(self, directory: Node) -> None:
        directory.refreshing = True
        try:
            # One refresh at a time: each builds a listing of up to the whole cache beside the
            # cached ones (what the memory bound counts: modelfs.memlimit), and the stale
            # listings answer meanwhile.
            async with self._refresh_slot:
                listing = await self._list_whole(directory)
        except BackendError as exc:
            self.refresh_failures += 1
            # Unreachable (or gone): what is cached stays readable rather than every lookup
            # failing; try again after another TTL.
            log.warning(
                "cannot refresh %s (%s); serving the last listing for another %gs", directory.path or "/", exc, self.ttl
            )
            old = directory.listing
            if old is not None:
                old.started_at = self._now()
            return
        except Exception:
            log.exception("refreshing %s failed", directory.path or "/")
            return
        finally:
            directory.refreshing = False
        self.refreshes += 1
        if listing is None:
            self._too_large(directory)
        else:
            self._cache(listing)

    async def refresh(self, *, force: bool = False) -> None:
        """List the root if it never was; with ``force``, list every cached directory again now."""
        if not force:
            if self.root.listing is None:
                await self.start()
            return
        for directory in [listing.directory for listing in list(self._listings.values())] or [self.root]:
            async with self._refresh_slot:  # (one at a time, as the background refreshes)
                listing = await self._list_whole(directory)
            if listing is None:
                self._too_large(directory)
            else:
                self._cache(listing)

    # --- queries

    def get(self, inode: int) -> Node:
        """A node the kernel holds (or the root)."""
        try:
            return self._by_inode[inode]
        except KeyError:
            raise NotFound(f"inode {inode} is unknown") from None

    def valid_for(self, node: Node) -> float:
        """Seconds the kernel may trust ``node``'s entry: what is left of the TTL of the listing
        (or name lookup) that vouches for it; 0 once stale, so a refreshed answer is asked for
        soon. -1 when the TTL is -1 (never expires)."""
        if self.ttl < 0:
            return -1.0
        parent = node.parent
        if parent is None:
            return self.ttl
        since: float | None = None
        listing = parent.listing
        if listing is not None and listing.by_name.get(node.name) is node:
            since = listing.started_at
        elif parent.extra is not None and parent.extra.get(node.name) is node:
            since = node.checked_at
        if since is None:
            return 0.0
        return max(0.0, self.ttl - (self._now() - since))

    def remember(self, node: Node) -> None:
        """The kernel got a reference to ``node`` (a lookup or readdirplus reply)."""
        node.lookups += 1
        inode = node.inode
        self._by_inode[inode] = node
        if inode == ROOT_INODE or node.is_dir:
            # Only files are ever given back. Dropping a directory's entry unhashes it even
            # while it is a process's working directory (d_invalidate does not refuse since
            # Linux 3.18): getcwd() there then fails with ENOENT. And a directory given back
            # while walked makes the kernel drop the entries just listed below it. Directories
            # are few beside files; theirs stay until the kernel's FORGET.
            return
        held = self._held
        held.pop(inode, None)  # the most recently replied goes last
        held[inode] = node
        if len(held) > self._trim_at:
            self._trim_wanted.set()

    def opened(self, node: Node) -> None:
        """An open file or directory handle uses ``node``: the kernel is not asked to drop it."""
        node.opens += 1

    def closed(self, node: Node) -> None:
        node.opens = max(0, node.opens - 1)

    # --- giving nodes back to the kernel

    def _pick(self) -> list[tuple[int, bytes]]:
        """The entries to ask the kernel to drop: the least recently replied held files, from
        beyond ``held_cap`` down to ``held_cap - batch``, but for those an open handle uses
        (they go last, looked at again after the others). They leave ``_held`` (the kernel
        still holds them: they stay in ``_by_inode`` until its FORGET)."""
        self.trim_passes += 1
        held = self._held
        want = len(held) - max(0, self.held_cap - self._batch)
        picked: list[Node] = []
        skipped: list[Node] = []
        if want > 0:
            for node in held.values():
                if node.opens:
                    skipped.append(node)
                    continue
                picked.append(node)
                if len(picked) >= want:
                    break
        for node in picked:
            del held[node.inode]
        for node in skipped:
            del held[node.inode]
            held[node.inode] = node
        # Too few could go (open handles use the rest): look again only after another batch
        # of new nodes, so a lookup storm over open files cannot make this spin.
        self._trim_at = self.held_cap if len(picked) >= want else max(self.held_cap, len(held) + self._batch)
        return [(node.parent.inode, node.name) for node in picked if node.parent is not None]

    @staticmethod
    def _send(invalidate: Invalidate, batch: list[tuple[int, bytes]], halt: threading.Event) -> OSError | None:
        """(A worker thread: it touches ``batch``, a list nothing else holds, and ``halt``.) Ask
        the kernel to drop each entry; the first error other than "no such entry" ends the
        batch and is returned."""
        for parent, name in batch:
            if halt.is_set():
                return None
            try:
                invalidate(parent, name)
            except FileNotFoundError:
                continue  # the kernel dropped it already: its FORGET is on the way
            except OSError as exc:
                return exc
        return None

    async def _trim_held(self, invalidate: Invalidate) -> None:
        """Give held nodes back to the kernel, a batch at a time, whenever there are too many."""
        limiter = trio.CapacityLimiter(1)
        while True:
            await self._trim_wanted.wait()
            self._trim_wanted = trio.Event()
            if self._halt.is_set():
                return
            batch = self._pick()
            if not batch:
                continue
            self._invalidating = True
            try:
                # Abandoned on cancel: the call may block in the kernel until a request in the
                # entry's directory is answered, which a stopping daemon may never do.
                failed = await trio.to_thread.run_sync(
                    self._send,
                    invalidate,
                    batch,
                    self._halt,
                    abandon_on_cancel=True,
                    limiter=limiter,
                )
            finally:
                self._invalidating = False
                self._invalidated.set()
                self._invalidated = trio.Event()
            self.invalidations += len(batch)
            if failed is not None and not self._halt.is_set():
                log.warning(
                    "cannot ask the kernel to drop entries (%s): the nodes it holds are no longer bounded", failed
                )
                return

    def halt_invalidations(self) -> None:
        """Send no more invalidations (a batch being sent stops before its next entry)."""
        self._halt.set()
        self._trim_wanted.set()

    async def stop_invalidating(self, timeout: float = 1.0) -> None:
        """Send no more invalidations, and wait (up to ``timeout``) for the one being sent:
        the FUSE session must outlive every call into it."""
        self.halt_invalidations()
        with trio.move_on_after(timeout):
            while self._invalidating:
                await self._invalidated.wait()

    async def lookup(self, parent: int, name: bytes) -> Node:
        directory = self.get(parent)
        if not directory.is_dir:
            raise NotFound(f"inode {parent} is not a directory")
        if name == b".":
            return directory
        if name == b"..":
            return directory.parent or self.root
        listing = directory.listing
        if listing is not None:
            self._listings.get(directory.inode)
            node = listing.by_name.get(name)
            if listing.complete:
                if not self._fresh(listing.started_at):
                    self.stale_served += 1
                    await self._revalidate(directory)
                    if self._nursery is None and directory.listing is not None:
                        node = directory.listing.by_name.get(name)
                        listing = directory.listing
                if node is None:
                    raise NotFound(f"{name!r} not found")
                return node
            if node is not None and self._fresh(listing.started_at) and (node.is_dir or _passed_place(listing, name)):
                return node
            # (A file on a page read so far, whose 'name/' may still come on a later page: a
            # directory of that name wins, so the name is asked for by itself below.)
        node = directory.extra.get(name) if directory.extra is not None else None
        if node is not None:
            if self._fresh(node.checked_at):
                return node
            if self._nursery is not None:
                # Checked again by itself behind the answer: the directory has no listing
                # (never listed, evicted or larger than the cache), and listing all of it
                # to confirm one name could cost the whole directory, every TTL.
                self.stale_served += 1
                key = (directory.inode, name)
                if key not in self._rechecking:
                    self._rechecking.add(key)
                    self._nursery.start_soon(self._recheck_name, directory, name, node)
                return node
        missing_since = self._missing.get((directory.inode, name))
        if missing_since is not None and self._fresh(missing_since):
            raise NotFound(f"{name!r} not found")
        return await self._lookup_name(directory, name)

    async def _lookup_name(self, directory: Node, name: bytes) -> Node:
        """Ask the backend for one name: is ``name/`` a directory, else is ``name`` an object."""
        if not name or len(name) > NAME_MAX or b"/" in name or b"\0" in name:
            raise NotFound(f"{name!r} not found")
        try:
            text = name.decode()
        except UnicodeDecodeError:
            raise NotFound(f"{name!r} not found") from None
        full = directory.prefix + text
        if not isinstance(parse_object_name(full), ParsedName):
            raise NotFound(f"{name!r} not found")
        self.name_lookups += 1
        below: ListPage | None = None
        info: ObjectInfo | None = None
        failed: list[BackendError] = []

        async def probe() -> None:
            nonlocal below
            token: str | None = None
            try:
                # A store may answer an empty page with a token (GCS skipping deleted objects):
                # the next pages tell, up to a few; an empty answer past that is not a directory.
                for _ in range(_PROBE_PAGES):
                    below = await retry_transient(
                        functools.partial(self.backend.list_dir, full + "/", token, limit=1),
                        deadline=self.retry_deadline,
                        what=f"listing {full}/",
                    )
                    if below.objects or below.prefixes or below.next_token in (None, token):
                        return
                    token = below.next_token
            except BackendError as exc:
                failed.append(exc)

        async def stat() -> None:
            nonlocal info
            try:
                info = await retry_transient(
                    lambda: self.backend.stat(full), deadline=self.retry_deadline, what=f"metadata of {full}"
                )
            except NotFound:
                info = None
            except BackendError as exc:
                failed.append(exc)

        # Both at once; a failure is raised as itself (the errno table maps it), not in a group.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe)
            nursery.start_soon(stat)
        if failed:
            raise failed[0]
        if info is not None and info.name != full:
            self._warn_once(info.name, f"the store answered it for {full!r}")
            info = None  # another object's metadata: its node would read that object's bytes
        if info is not None and not self._sized(info):
            info = None
        is_dir = below is not None and bool(below.objects or below.prefixes)
        if not is_dir and info is None:
            self._missing[(directory.inode, name)] = self._now()
            raise NotFound(f"{full!r} not found")
        self._missing.pop((directory.inode, name), None)
        listing = directory.listing
        if listing is not None and listing.complete and name in listing.by_name:
            return listing.by_name[name]  # a listing landed meanwhile: it names the node
        node = self._reuse(directory, name, is_dir, None if is_dir else info, None)
        node.checked_at = self._now()
        if directory.extra is None:
            directory.extra = {}
        directory.extra[name] = node
        return node

    async def _recheck_name(self, directory: Node, name: bytes, node: Node) -> None:
        """Ask the backend for a stale looked-up name again (in the background)."""
        try:
            await self._lookup_name(directory, name)
        except NotFound:
            if directory.extra is not None and directory.extra.get(name) is node:
                del directory.extra[name]  # gone: the next lookup is ENOENT (remembered as missing)
                if not directory.extra:
                    directory.extra = None
        except BackendError as exc:
            # Unreachable: keep serving what was found for another TTL, as a refresh does.
            log.warning("cannot check %s again (%s); serving it for another %gs", node.path, exc, self.ttl)
            node.checked_at = self._now()
        except Exception:
            log.exception("checking %s again failed", node.path)
        finally:
            self._rechecking.discard((directory.inode, name))

    def forget(self, inode: int, count: int) -> None:
        """The kernel dropped ``count`` references; at zero the node is freed unless a listing holds it."""
        node = self._by_inode.get(inode)
        if node is None or inode == ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - count)
        if node.lookups:
            return
        del self._by_inode[inode]
        self._held.pop(inode, None)
        node.opened_version = None  # the kernel dropped the inode and its page cache with it
        parent = node.parent
        if parent is None:
            return
        if parent.extra is not None and parent.extra.get(node.name) is node:
            del parent.extra[node.name]
            if not parent.extra:
                parent.extra = None
        in_listing = parent.listing is not None and parent.listing.by_name.get(node.name) is node
        if not in_listing:
            self._dropped_dirs([node])
