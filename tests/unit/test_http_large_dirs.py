"""A JSON-index directory of many files: HEADed by a fixed pool of tasks, listed in pages.

Before, list_dir started one trio task per file of the index, each parked on the HEAD
limiter: 50,000 files held 50,000 tasks at once (~4 KiB each; the daemon went from 44 to
260 MiB and was OOM-killed in its documented container). The directory came back as one page
holding all of it, counted nowhere. Now at most the HEAD concurrency of tasks run, and a page
holds PAGE_ENTRIES entries; the rest of the directory waits, sorted and counted in the memory
budget, for the next page.
"""

from __future__ import annotations

import mmap
import random
import sys
from collections.abc import Callable

import httpx
import pytest
import trio

from modelfs.backends.base import ListPage
from modelfs.backends.http import PAGE_ENTRIES, HTTPBackend, kept_charge, listed_charge
from modelfs.cache.memory import BufferKind, Lease, MemoryCache
from modelfs.config import parse_source
from modelfs.errors import BackendError

from .test_http_backend import backend, response

FILES = 30_000


def _live_tasks() -> int:
    """Every task of the running trio run, from the root down."""
    count, stack = 0, [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def _content(i: int) -> bytes:
    return bytes([i % 251, (i * 7) % 256])


def _handler(files: int, dirs: int, most: list[int], asked: list[str]):  # type: ignore[no-untyped-def]
    rows = [
        b'{"name":"f%06d.bin","type":"file","mtime":"Wed, 01 Jan 2025 00:00:00 GMT","size":2}' % i for i in range(files)
    ]
    rows += [b'{"name":"d%04d","type":"directory","mtime":"Wed, 01 Jan 2025 00:00:00 GMT"}' % i for i in range(dirs)]
    random.Random(1).shuffle(rows)  # a server's order need not be name order
    index = b"[" + b",\n".join(rows) + b"]"

    def handler(request: httpx.Request) -> httpx.Response:
        most[0] = max(most[0], _live_tasks())
        path = request.url.path
        asked.append(f"{request.method} {path}")
        if path == "/big/" and request.method == "GET":
            return response(200, index, {"Content-Type": "application/json"})
        name = path.removeprefix("/big/")
        if name.startswith("f") and name.endswith(".bin") and int(name[1:7]) < files:
            i = int(name[1:7])
            headers = {"ETag": f'"e{i}"', "Accept-Ranges": "bytes"}
            if request.method == "HEAD":
                return httpx.Response(200, headers={**headers, "Content-Length": "2"})
            start, end = (int(x) for x in request.headers["range"].removeprefix("bytes=").split("-"))
            data = _content(i)[start : end + 1]
            return response(206, data, {**headers, "Content-Range": f"bytes {start}-{start + len(data) - 1}/2"})
        return httpx.Response(404)

    return handler


async def _list_all(b: HTTPBackend, prefix: str = "") -> list[ListPage]:
    pages, token = [], None
    while True:
        page = await b.list_dir(prefix, token)
        pages.append(page)
        token = page.next_token
        if token is None:
            return pages


async def test_a_directory_of_30000_files_lists_whole_with_a_bounded_number_of_tasks() -> None:
    most: list[int] = [0]
    asked: list[str] = []
    b = backend(_handler(FILES, 0, most, asked), url="https://example.test/big/")
    baseline = _live_tasks()
    pages = await _list_all(b)
    # The HEADs ran in a pool of the HEAD concurrency (8), not a task per file (30,000).
    assert most[0] <= baseline + 8 + 2, most
    listed = [(o.name, o.size) for page in pages for o in page.objects]
    assert listed == [(f"f{i:06d}.bin", 2) for i in range(FILES)]
    assert all(not page.prefixes for page in pages)
    assert len(pages) == -(-FILES // PAGE_ENTRIES) and all(len(p.objects) == PAGE_ENTRIES for p in pages[:-1])
    # The index was read once: the pages after the first are listed from the kept entries.
    assert asked.count("GET /big/") == 1 and asked.count("HEAD /big/f000000.bin") == 1
    assert not b._kept  # dropped with the last page
    versions = {o.name: o.version for page in pages for o in page.objects}
    for i in random.Random(2).sample(range(FILES), 5):
        name = f"f{i:06d}.bin"
        buf = bytearray(2)
        await b.read_range(name, versions[name], 0, memoryview(buf))
        assert bytes(buf) == _content(i)


async def test_pages_are_in_name_order_with_subdirectories_among_the_files() -> None:
    asked: list[str] = []
    b = backend(_handler(1500, 700, [0], asked), url="https://example.test/big/")
    pages = await _list_all(b)
    names = [n for page in pages for n in sorted([o.name for o in page.objects] + page.prefixes)]
    assert names == sorted([f"f{i:06d}.bin" for i in range(1500)] + [f"d{i:04d}/" for i in range(700)])
    assert [len(p.objects) + len(p.prefixes) for p in pages] == [PAGE_ENTRIES, PAGE_ENTRIES, 200]
    assert pages[0].prefixes == [f"d{i:04d}/" for i in range(700)] and len(pages[0].objects) == 300


async def test_a_next_page_whose_kept_entries_are_gone_reads_the_index_again() -> None:
    """Dropped (idle, pressed out, another daemon's token): the index is read again and listed
    on after the last name of the token; the same token again gives the same page."""
    asked: list[str] = []
    b = backend(_handler(2500, 0, [0], asked), url="https://example.test/big/")
    first = await b.list_dir("")
    assert first.next_token is not None and len(b._kept) == 1
    again = await b.list_dir("", first.next_token)
    assert again == await b.list_dir("", first.next_token)  # (a retried page)
    assert asked.count("GET /big/") == 1
    b._drop(next(iter(b._kept.values())))
    second = await b.list_dir("", first.next_token)
    assert asked.count("GET /big/") == 2
    assert [o.name for o in second.objects] == [f"f{i:06d}.bin" for i in range(1000, 2000)]
    assert second.objects == again.objects
    third = await b.list_dir("", second.next_token)
    assert [o.name for o in third.objects] == [f"f{i:06d}.bin" for i in range(2000, 2500)]
    assert third.next_token is None and not b._kept
    with pytest.raises(BackendError, match="continuation token"):
        await b.list_dir("", "nonsense")


async def test_kept_entries_are_counted_in_the_budget_until_the_last_page() -> None:
    budget = MemoryCache(64 << 20, 8 << 20)
    b = HTTPBackend(parse_source("https://example.test/big/"), budget=budget)
    plain = backend(_handler(5000, 0, [0], []), url="https://example.test/big/")
    b._media, b._client = None, plain._client
    first = await b.list_dir("")
    kept = next(iter(b._kept.values()))
    assert budget.leased == kept.charge == kept_charge(kept.entries) >= 5000 * 160
    token = first.next_token
    while token is not None:
        token = (await b.list_dir("", token)).next_token
    assert budget.leased == 0 and not b._kept


async def test_a_directory_that_cannot_fit_the_budget_is_one_line_error() -> None:
    budget = MemoryCache(16 << 20, 8 << 20)  # leases: at most 8 MiB
    b = HTTPBackend(parse_source("https://example.test/big/"), budget=budget)
    plain = backend(_handler(FILES, 0, [0], []), url="https://example.test/big/")
    b._media, b._client = None, plain._client
    with pytest.raises(BackendError, match="does not fit in the memory budget"):
        await b.list_dir("")
    assert budget.leased == 0


def _tree(dirs: int, files: int) -> Callable[[httpx.Request], httpx.Response]:
    """An index tree: ``dirs`` directories below the root, ``files`` files in each."""
    root = b"[" + b",".join(b'{"name":"d%03d","type":"directory"}' % d for d in range(dirs)) + b"]"
    rows = b",".join(b'{"name":"a-file-with-a-long-name-%05d.bin","type":"file","size":2}' % i for i in range(files))

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path == "/tree/":
            return response(200, root, {"Content-Type": "application/json"})
        if request.method == "GET" and path.endswith("/"):
            return response(200, b"[" + rows + b"]", {"Content-Type": "application/json"})
        if request.method == "HEAD" and path.endswith(".bin"):
            return httpx.Response(200, headers={"Content-Length": "2", "ETag": f'"{path}"', "Accept-Ranges": "bytes"})
        return httpx.Response(404)

    return handler


class _Watched(MemoryCache):
    """A budget that records the most it ever lent."""

    most = 0

    def _grant(self, kind: BufferKind, nbytes: int, buf: mmap.mmap | None, charge: int, *, waited: bool) -> Lease:
        lease = super()._grant(kind, nbytes, buf, charge, waited=waited)
        self.most = max(self.most, self.leased)
        return lease


def _on_budget(handler: Callable[[httpx.Request], httpx.Response], budget: MemoryCache) -> HTTPBackend:
    b = HTTPBackend(parse_source("https://example.test/tree/"), budget=budget)
    b._media, b._client = None, backend(handler, url="https://example.test/tree/")._client
    return b


async def test_every_file_of_an_index_tree_is_charged_while_list_objects_gathers_it() -> None:
    """list_objects walked the whole tree into lists beside the budget (the index's entries,
    then an ObjectInfo per file: ~330 bytes each, 14 MiB of 50,000 files; 1,000,000 allowed).
    Now it walks directory pages as warm does, and what it gathers is charged as it grows."""
    budget = _Watched(64 << 20, 8 << 20)
    b = _on_budget(_tree(4, 1500), budget)
    found = await b.list_objects()
    assert sorted(o.name for o in found) == [
        f"d{d:03d}/a-file-with-a-long-name-{i:05d}.bin" for d in range(4) for i in range(1500)
    ]
    assert budget.most >= sum(listed_charge(o) for o in found) - (256 << 10)  # (charged in steps)
    assert budget.leased == 0 and not b._kept and b._walks_hold == 0
    await b.aclose()


async def test_an_index_tree_whose_files_cannot_fit_the_budget_is_one_line_error() -> None:
    budget = _Watched(3 << 20, 1 << 20)  # leases: at most 2 MiB; 6,000 files take ~2.3
    b = _on_budget(_tree(12, 500), budget)
    with pytest.raises(BackendError, match=r"does not fit in the memory budget \(raise --memory-cache\)") as caught:
        await b.list_objects()
    assert "\n" not in str(caught.value)
    assert budget.most <= budget.max_lease and budget.leased == 0 and b._walks_hold == 0
    await b.aclose()


async def test_kept_entries_give_their_room_to_a_lease_that_needs_it() -> None:
    """Between pages the rest of a directory is kept in the budget only to be quicker: a lease
    that finds no room (a block, a header read) takes it back at once, and the next page reads
    the index again. Kept, it held that room until the next HTTP listing dropped it as idle: a
    reader could wait for it as long as nobody listed."""
    budget = MemoryCache(16 << 20, 8 << 20)  # leases: at most 8 MiB
    b = HTTPBackend(parse_source("https://example.test/big/"), budget=budget)
    plain = backend(_handler(5000, 0, [0], []), url="https://example.test/big/")
    b._media, b._client = None, plain._client
    first = await b.list_dir("")
    assert first.next_token is not None and budget.leased > 0 and b._kept
    with trio.fail_after(5):  # (without the fix: waits for ever)
        lease = await budget.lease(budget.max_lease, BufferKind.SMALL_READ)
    assert not b._kept
    lease.release()
    token: str | None = first.next_token
    names = [o.name for o in first.objects]
    while token is not None:
        page = await b.list_dir("", token)
        names += [o.name for o in page.objects]
        token = page.next_token
    assert names == [f"f{i:06d}.bin" for i in range(5000)] and budget.leased == 0


def test_a_kept_name_is_counted_as_its_str_holds_it() -> None:
    """One wide character makes every character of a str four bytes: such a name was counted
    by its UTF-8 length, a quarter of what it holds (255 ASCII and an emoji: 259, not 1,024)."""
    name = "a" * 255 + "\N{GRINNING FACE}"
    assert kept_charge([(name, 1)]) - kept_charge([("", 1)]) >= sys.getsizeof(name) - sys.getsizeof("") >= 4 * 256
    assert kept_charge([("plain.bin", 1)]) - kept_charge([("", 1)]) == len("plain.bin")
