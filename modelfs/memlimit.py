"""The daemon's memory bound: its fixed overhead, and the cgroup memory limit it must fit in.

The bound modelfs keeps is: peak RSS <= ``--memory-cache`` + :data:`FIXED_OVERHEAD`, whatever
the number of objects, the file sizes and the number of readers, plus :data:`GET_BYTES` per GET
that ``--max-concurrency`` allows beyond its default (:func:`overhead`). ``--memory-cache`` counts
every data buffer (blocks, small reads, reads across a block edge, headers being parsed,
index bodies: see :mod:`modelfs.cache.memory`); the overhead is what is not a data buffer:
the interpreter and its libraries, the backend's client, the metadata cache (the listings it
holds, and the nodes the kernel holds: :func:`held_nodes`), thread stacks and malloc arenas.
docs/operations.md has the measurements behind the number.

``modelfs mount`` reads the memory limit of its own cgroup (v1 or v2) and refuses to start
when the budget plus the overhead does not fit; ``--memory-cache auto`` takes the limit
minus the overhead and :data:`AUTO_HEADROOM` (kernel memory the cgroup is charged for:
socket buffers, page cache of the disk cache's I/O). What the GETs in flight let the kernel
queue on their sockets is held to :data:`SOCKET_QUEUE` together (:func:`receive_chunk`).
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = [
    "DEFAULT_METADATA_CACHE",
    "DISK_BLOCKS_INCLUDED",
    "DISK_INDEX_ENTRY",
    "HELD_NODE_BYTES",
    "MIN_HELD_NODES",
    "held_nodes",
    "BLOCK_OBJECT",
    "CONCURRENCY_INCLUDED",
    "GET_BYTES",
    "MEMORY_BLOCKS_INCLUDED",
    "SOCKET_QUEUE",
    "disk_index_files",
    "overhead",
    "AUTO_HEADROOM",
    "FIXED_OVERHEAD",
    "MAX_FUSE_TASKS",
    "MAX_REQUEST",
    "auto_budget",
    "cgroup_memory_limit",
    "describe",
    "fuse_tasks",
    "receive_chunk",
    "tune_malloc",
    "str_bytes",
]

FIXED_OVERHEAD = 64 << 20
"""RSS above ``--memory-cache`` that the daemon may reach: interpreter, libraries, and a
metadata cache of the default size (:data:`DEFAULT_METADATA_CACHE`: its listings, and the
:func:`held_nodes` nodes the kernel may hold beside them)."""

DEFAULT_METADATA_CACHE = 8 << 20
"""``--metadata-cache``'s default; a larger one adds its excess to the overhead."""

HELD_NODE_BYTES = 1024
"""Memory per node the kernel holds (a lookup or readdirplus reply it has not forgotten): the
Node, its ObjectInfo and strings, its entries in the inode table, the LRU and its directory's
names (~0.7 KiB of RSS measured per node held outside any cached listing)."""

MIN_HELD_NODES = 256
"""The fewest nodes kept for the kernel, however small ``--metadata-cache``."""

DISK_INDEX_ENTRY = 512
"""Memory per block file the disk cache's index holds (its path, size, LRU and version
entries: ~330 B each measured, ~460 B at the startup scan's peak)."""

BLOCK_OBJECT = 1536
"""Memory per cached block besides its buffer: the Block, its event, mmap and memoryview
objects, the LRU entry and the kernel's mapping (~1.1 KiB measured). A short block's budget
charge includes it (modelfs.cache.memory); full blocks' is counted here, beyond
:data:`MEMORY_BLOCKS_INCLUDED` of them."""

MEMORY_BLOCKS_INCLUDED = 4096
"""Full blocks whose objects the fixed overhead covers (6 MiB of it): 32 GiB of 8 MiB blocks;
a small ``--block-size`` over a large budget adds :data:`BLOCK_OBJECT` per block beyond."""

DISK_BLOCKS_INCLUDED = 16384
"""Block files whose index the fixed overhead covers (8 MiB of it); beyond them each adds
:data:`DISK_INDEX_ENTRY` (a 10 GiB disk cache of 8 MiB blocks is 1,280)."""

CONCURRENCY_INCLUDED = 8
"""GETs in flight whose cost the fixed overhead covers: ``--max-concurrency``'s default."""

GET_BYTES = 128 << 10
"""RSS per GET in flight beyond :data:`CONCURRENCY_INCLUDED`, besides the block buffer it fills
(which the budget counts): its worker thread, its kept-alive connection (socket, client
objects, OpenSSL's buffers over TLS) and the client's request and response objects. Measured
(docs/operations.md, "Concurrency"): 37 (GCS), 66 (S3) and 81 KiB (HTTPS) per GET held in
flight by one backend alone; in the daemon at ``--max-concurrency 256`` the peak RSS over the
budget grew by 52 (GCS, S3) and up to 98 KiB (HTTPS) per GET beyond 8."""

SOCKET_QUEUE = 32 << 20
"""What the GETs in flight together let the kernel queue on their sockets before their threads
wake to take it (``SO_RCVLOWAT``: :func:`receive_chunk`). Socket buffers are outside RSS but
charged to the cgroup (v2 always; v1 in ``memory.kmem.tcp.*`` apart from the limit), and a
chunk of 1 MiB per GET queued ~1 MiB per connection: 259 MiB at ``--max-concurrency 256``.
With the shares, 38-48 MiB were measured at 64 and 256 (bytes keep coming while a thread
wakes), within :data:`AUTO_HEADROOM`."""

MAX_RECEIVE_CHUNK = 1 << 20
"""The largest chunk a GET thread waits for (docs/architecture.md: one wake-up per MiB)."""

MIN_RECEIVE_CHUNK = 64 << 10
"""A floor, never reached while ``--max-concurrency`` is at most 256 (128 KiB each there)."""

AUTO_HEADROOM = 64 << 20
"""What ``--memory-cache auto`` leaves free below the cgroup limit besides the overhead."""

MAX_REQUEST = 1 << 20
"""The largest FUSE read the kernel sends (libfuse's request buffer holds 256 pages)."""

MAX_FUSE_TASKS = 64
"""The most FUSE requests served at once (pyfuse3 worker tasks), however large the budget."""

# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit number.
_UNLIMITED = 1 << 60


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # "max" (v2), or unreadable
        return None
    value = int(text)
    return value if value < _UNLIMITED else None


def _mounted_cgroup(base: Path, mountinfo: str) -> str | None:
    """The cgroup path whose hierarchy is mounted at ``base``: ``/`` on a host, the container's
    own cgroup inside a container that sees only its part of the hierarchy (podman on v1)."""
    try:
        lines = Path(mountinfo).read_text(errors="surrogateescape").splitlines()  # (paths need not be UTF-8)
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) > 4 and fields[4] == str(base) and right.split()[:1] in (["cgroup"], ["cgroup2"]):
            return fields[3]
    return None


def cgroup_memory_limit(
    proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup", mountinfo: str = "/proc/self/mountinfo"
) -> int | None:
    """The memory limit of this process's cgroup in bytes (the smallest of it and its
    ancestors), or None when there is none.

    v1: the ``memory`` controller's ``memory.limit_in_bytes``; v2: ``memory.max``. Inside a
    container the cgroup path in /proc/self/cgroup may name a host path the container does
    not see, while its own cgroup is mounted at the root: the root's file counts too.
    """
    try:
        lines = Path(proc_cgroup).read_text(errors="surrogateescape").splitlines()
    except OSError:
        return None
    v1_path: str | None = None
    v2_path: str | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "memory" in controllers.split(","):
            v1_path = path
        elif parts[0] == "0" and controllers == "":
            v2_path = path
    if v1_path is not None:
        base, name, cgroup = Path(root) / "memory", "memory.limit_in_bytes", v1_path
    elif v2_path is not None:
        base, name, cgroup = Path(root), "memory.max", v2_path
    else:
        return None
    # A child of a container's cgroup (a test's, a pod's sub-group) is seen below the mount's root.
    mounted = _mounted_cgroup(base, mountinfo)
    if mounted not in (None, "/") and (cgroup == mounted or cgroup.startswith(f"{mounted}/")):
        cgroup = cgroup[len(mounted) :] or "/"
    limits: list[int] = []
    rel = Path(cgroup.lstrip("/"))
    while True:
        limit = _read_limit(base / rel / name)
        if limit is not None:
            limits.append(limit)
        if rel == Path("."):
            break
        rel = rel.parent
    return min(limits) if limits else None


_EMPTY_STR = sys.getsizeof("")


def str_bytes(text: str) -> int:
    """The bytes ``text``'s characters take in memory beside an empty str's: its length for
    ASCII; for other text more than its UTF-8 length (one wide character makes every
    character of the str two or four bytes, and the header grows)."""
    return sys.getsizeof(text) - _EMPTY_STR


def held_nodes(metadata_cache: int = DEFAULT_METADATA_CACHE) -> int:
    """The most file nodes the daemon keeps for the kernel (lookup and readdirplus replies
    not yet forgotten), one per :data:`HELD_NODE_BYTES` of ``--metadata-cache`` (8,192 at its
    default).

    Past it the daemon asks the kernel to drop the least recently replied ones that no open
    handle uses (``modelfs.inodes.Namespace``); it frees them when the kernel forgets them.
    Files open handles use are kept beyond it, and so are directories: they are never given
    back (a process's working directory would lose its name: getcwd() fails), and are few
    beside files. Nodes the kernel was asked to drop stay until it says so.
    """
    return max(MIN_HELD_NODES, metadata_cache // HELD_NODE_BYTES)


def overhead(
    metadata_cache: int = DEFAULT_METADATA_CACHE,
    disk_blocks: int = 0,
    memory_blocks: int = 0,
    max_concurrency: int = CONCURRENCY_INCLUDED,
) -> int:
    """The daemon's RSS beyond ``--memory-cache`` with this ``--metadata-cache``, a disk cache
    of ``disk_blocks`` blocks (``--disk-cache`` / ``--block-size``), a budget of
    ``memory_blocks`` blocks (``--memory-cache`` / ``--block-size``) and ``--max-concurrency``."""
    gets = max(0, max_concurrency - CONCURRENCY_INCLUDED) * GET_BYTES
    index = max(0, disk_blocks - DISK_BLOCKS_INCLUDED) * DISK_INDEX_ENTRY
    blocks = max(0, memory_blocks - MEMORY_BLOCKS_INCLUDED) * BLOCK_OBJECT
    # The metadata cache beyond its default counts four times: the listings it holds, the one
    # refresh at a time that builds a listing of up to its size beside them, and twice its size
    # of listings open directory handles hold outside it (inodes.Namespace.handle_cap); and the
    # nodes the kernel holds beyond the default's (held_nodes) count at HELD_NODE_BYTES each.
    nodes = max(0, held_nodes(metadata_cache) - held_nodes()) * HELD_NODE_BYTES
    return FIXED_OVERHEAD + 4 * max(0, metadata_cache - DEFAULT_METADATA_CACHE) + nodes + index + blocks + gets


def disk_index_files(disk_cache: int, block_size: int) -> int:
    """The most block files the disk cache's index holds: what :func:`overhead` counts for
    ``disk_cache // block_size`` blocks (the cache evicts beyond it, whatever the files' sizes)."""
    return max(DISK_BLOCKS_INCLUDED, disk_cache // block_size)


def auto_budget(
    limit: int,
    block_size: int,
    metadata_cache: int = DEFAULT_METADATA_CACHE,
    disk_blocks: int = 0,
    max_concurrency: int = CONCURRENCY_INCLUDED,
) -> int:
    """``--memory-cache auto``: the limit minus overhead and headroom, in whole blocks."""
    room = limit - overhead(metadata_cache, disk_blocks, max_concurrency=max_concurrency) - AUTO_HEADROOM
    blocks = max(0, room) // block_size
    if blocks > MEMORY_BLOCKS_INCLUDED:  # each block beyond them also takes BLOCK_OBJECT of the room
        blocks = (room + MEMORY_BLOCKS_INCLUDED * BLOCK_OBJECT) // (block_size + BLOCK_OBJECT)
    return blocks * block_size


def describe(nbytes: int) -> str:
    """``192M``-style text for messages."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{unit}"
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.1f}M"
    return str(nbytes)


def receive_chunk(max_concurrency: int) -> int:
    """The bytes a GET thread lets the kernel queue on its socket before it wakes to take them:
    1 MiB up to 32 GETs in flight, then :data:`SOCKET_QUEUE` shared among them (128 KiB at
    256), never under :data:`MIN_RECEIVE_CHUNK`."""
    share = SOCKET_QUEUE // max(1, max_concurrency)
    return max(MIN_RECEIVE_CHUNK, min(MAX_RECEIVE_CHUNK, share))


def fuse_tasks(max_lease: int) -> int:
    """How many FUSE requests to serve at once: as many 1 MiB reads as the budget's leases can
    hold beside a block (8 at least, so a small budget still overlaps a few GETs)."""
    return max(8, min(MAX_FUSE_TASKS, max_lease // MAX_REQUEST))


def tune_malloc() -> None:
    """Make glibc's malloc give freed memory back and keep one arena (before threads start).

    A fixed mmap threshold (128 KiB) stops glibc from raising it after the first large free,
    which would put later large buffers (libfuse's 1 MiB request buffers, a client's response
    bodies) on the heap, where freed memory stays resident. One arena instead of eight per
    core: each worker thread's arena kept its own freed memory (the GIL serializes the
    allocating threads anyway); under the random-read workload the peak RSS was 127.6 and
    133.2 MiB with two arenas, 123.7-125.3 MiB with one (docs/operations.md).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_arena_max, m_mmap_threshold = -8, -3
    mallopt(m_mmap_threshold, 128 << 10)
    mallopt(m_arena_max, 1)
