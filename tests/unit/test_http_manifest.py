"""A --manifest is parsed once, held in name order and charged to the memory budget.

Before, the file was read and parsed for every directory listed, beside the budget: a
200,000-line manifest (12 MiB) took 68 MiB of Python memory on each ``list_dir`` (~2.8 s on
the event loop), and 64 MiB / 1,000,000 lines are allowed. Now it is parsed when first listed
and again only when the file changed; the parse and the parsed names are charged to the
budget (a one-line error where they cannot fit), and the parsed names give their room back
whenever a lease needs it.
"""

from __future__ import annotations

import mmap
import os
import tracemalloc
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from modelfs.backends import http_manifest
from modelfs.backends.http import PAGE_ENTRIES, HTTPBackend
from modelfs.backends.http_manifest import Manifest, held_charge
from modelfs.cache.memory import BufferKind, Lease, MemoryCache
from modelfs.config import parse_source
from modelfs.errors import BackendError, NotFound

from .test_http_backend import backend

MIB = 1 << 20


class Watched(MemoryCache):
    """A budget that records the most it ever lent."""

    most = 0

    def _grant(self, kind: BufferKind, nbytes: int, buf: mmap.mmap | None, charge: int, *, waited: bool) -> Lease:
        lease = super()._grant(kind, nbytes, buf, charge, waited=waited)
        self.most = max(self.most, self.leased)
        return lease


def _head(request: httpx.Request) -> httpx.Response:
    if request.method == "HEAD" and not request.url.path.endswith("/missing.bin"):
        return httpx.Response(200, headers={"Content-Length": "2", "ETag": '"e"', "Accept-Ranges": "bytes"})
    return httpx.Response(404)


def _backend(manifest: Path, budget: MemoryCache | None) -> HTTPBackend:
    b = HTTPBackend(parse_source("https://example.test/m/"), manifest=manifest, budget=budget)
    b._media, b._client = None, backend(_head, url="https://example.test/m/")._client
    return b


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every path the backend opens (the manifest is the only file it reads)."""
    opened: list[str] = []
    open_file = trio.open_file

    async def counted(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(path))
        return await open_file(path, *args, **kwargs)

    monkeypatch.setattr(trio, "open_file", counted)
    yield opened


def _names(dirs: int, files: int) -> list[str]:
    return [f"d{d:03d}/shard-{i:05d}.safetensors" for d in range(dirs) for i in range(files)]


async def test_the_manifest_is_parsed_once_and_held_charged(tmp_path: Path, reads: list[str]) -> None:
    manifest = tmp_path / "files.txt"
    names = _names(40, 50)
    manifest.write_text("".join(f"{name} 2\n" for name in reversed(names)))
    budget = Watched(64 * MIB, 8 * MIB)
    b = _backend(manifest, budget)
    root = await b.list_dir("")
    assert root.objects == [] and root.prefixes == [f"d{d:03d}/" for d in range(40)]
    for d in range(3):
        page = await b.list_dir(f"d{d:03d}/")
        assert [o.name for o in page.objects] == names[50 * d : 50 * (d + 1)]
    assert reads == [str(manifest)]  # (read for every listing before: 4 times)
    held = held_charge(sorted(names))
    assert budget.leased_by_kind[BufferKind.INDEX] == budget.leased == held > len(manifest.read_bytes())
    await b.aclose()
    assert budget.leased == 0


async def test_a_changed_manifest_is_read_again_at_the_next_listing(tmp_path: Path, reads: list[str]) -> None:
    manifest = tmp_path / "files.txt"
    manifest.write_text("a.bin\nsub/b.bin\n")
    budget = Watched(64 * MIB, 8 * MIB)
    b = _backend(manifest, budget)
    assert [o.name for o in (await b.list_dir("")).objects] == ["a.bin"]
    replaced = tmp_path / "new.txt"
    replaced.write_text("c.bin\n")
    os.replace(replaced, manifest)  # (as an editor saves it)
    page = await b.list_dir("")
    assert [o.name for o in page.objects] == ["c.bin"] and page.prefixes == []
    assert (await b.list_dir("sub/")).objects == []
    assert len(reads) == 2 and budget.leased == held_charge(["c.bin"])
    await b.aclose()


async def test_a_directory_of_a_manifest_is_paged_in_name_order(tmp_path: Path) -> None:
    """Subdirectories among the files, each one entry however much it holds; a page's token
    lists on after its last name."""
    manifest = tmp_path / "files.txt"
    files = [f"f{i:04d}.bin" for i in range(2300)]
    subdirs = [f"f{i:04d}/x{j}.bin" for i in range(0, 2300, 100) for j in range(30)]  # "f0100/" beside "f0100"
    manifest.write_text("\n".join(subdirs + files + ["f0100.bin/x.bin", "top/deep/er/y.bin"]) + "\n")
    b = _backend(manifest, Watched(64 * MIB, 8 * MIB))
    pages, token = [], None
    while True:
        page = await b.list_dir("", token)
        pages.append(page)
        if (token := page.next_token) is None:
            break
    listed = [name for page in pages for name in sorted([o.name for o in page.objects] + page.prefixes)]
    everything = set(files) | {name.split("/")[0] + "/" for name in subdirs} | {"f0100.bin/", "top/"}
    assert listed == sorted(everything) and len(listed) == len(set(listed))
    assert [len(p.objects) + len(p.prefixes) for p in pages] == [PAGE_ENTRIES, PAGE_ENTRIES, len(everything) - 2000]
    deep = await b.list_dir("top/deep/")
    assert deep.objects == [] and deep.prefixes == ["top/deep/er/"]
    assert [o.name for o in (await b.list_dir("f0100/", limit=1)).objects] == ["f0100/"]  # (a probe)
    await b.aclose()


def test_a_page_after_a_subdirectory_starts_past_every_name_below_it() -> None:
    names = sorted(["a", "a.txt", "a/x", "a/y/z", "a0", "a0/q", "b", "sub/a/x", "sub/a0"])
    manifest = Manifest(names, array("q", [-1] * len(names)), (0, 0, 0, 0, 0))
    assert manifest.children("", None, 100) == (
        [(n, None) for n in ["a", "a.txt", "a/", "a0", "a0/", "b", "sub/"]],
        False,
    )
    assert manifest.children("", "a/", 2) == ([("a0", None), ("a0/", None)], True)
    assert manifest.children("", "a0", 100) == ([("a0/", None), ("b", None), ("sub/", None)], False)
    assert manifest.children("sub/", "a/", 100) == ([("a0", None)], False)
    assert manifest.children("sub/a/", None, 1) == ([("x", None)], False)
    assert manifest.children("nothing/", None, 1) == ([], False)


async def test_a_manifest_that_cannot_fit_the_budget_is_one_line_error(tmp_path: Path) -> None:
    manifest = tmp_path / "files.txt"
    manifest.write_text("".join(f"{name}\n" for name in _names(100, 200)))  # 20,000 names: ~5 MiB to parse
    budget = Watched(3 * MIB, 1 * MIB)  # leases: at most 2 MiB
    b = _backend(manifest, budget)
    with pytest.raises(BackendError, match=r"the manifest does not fit in the memory budget \(raise --memory-cache\)"):
        await b.list_dir("d000/")
    assert budget.leased == 0
    await b.aclose()


async def test_the_parsed_manifest_gives_its_room_to_a_lease_that_needs_it(tmp_path: Path, reads: list[str]) -> None:
    """Held for ever, its room would be missing to a lease told it fits (a safetensors header,
    say), which would wait for ever: the budget takes it back, and the next listing parses
    the file again."""
    manifest = tmp_path / "files.txt"
    manifest.write_text("".join(f"{name}\n" for name in _names(20, 100)))
    budget = Watched(16 * MIB, 8 * MIB)
    b = _backend(manifest, budget)
    await b.list_dir("d000/")
    held = budget.leased
    assert held > 0
    with trio.fail_after(60):  # (only ends a wait that never ends)
        header = await budget.lease(0, BufferKind.HEADER, extra=budget.max_lease - held // 2)
    assert budget.leased == header.charge  # (the manifest's room was given back)
    header.release()
    assert [o.name for o in (await b.list_dir("d001/")).objects] == _names(20, 100)[100:200]
    assert len(reads) == 2 and budget.leased == held
    await b.aclose()


async def test_a_listed_file_missing_on_the_server_is_that_error(tmp_path: Path) -> None:
    manifest = tmp_path / "files.txt"
    manifest.write_text("here.bin\nmissing.bin\n")
    b = _backend(manifest, Watched(64 * MIB, 8 * MIB))
    with pytest.raises(NotFound, match="in the manifest but not on the server"):
        await b.list_dir("")
    await b.aclose()


@pytest.mark.parametrize("wide", [False, True])
async def test_a_manifests_parse_holds_no_more_than_its_charge(tmp_path: Path, wide: bool) -> None:
    """The Python memory of the first listing (the parse and what it keeps) stays within what
    the budget was charged, ASCII names or names made wide by one character each."""
    manifest = tmp_path / "files.txt"
    tail = "\U0001f600" if wide else ""
    manifest.write_text("".join(f"{name}{tail} {i}\n" for i, name in enumerate(_names(50, 400))), encoding="utf-8")
    budget = Watched(256 * MIB, 8 * MIB)
    b = _backend(manifest, budget)
    await b.list_dir("")  # (imports and first-use allocations out of the count)
    http_manifest_file = b._manifest
    assert http_manifest_file is not None
    http_manifest_file.close()
    budget.most = 0
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        await b.list_dir("")
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base <= budget.most, f"{(peak - base) / MIB:.1f} MiB > {budget.most / MIB:.1f} MiB"
    assert current - base <= budget.leased
    await b.aclose()


def test_the_bounds_are_the_documented_ones() -> None:
    assert http_manifest.MAX_MANIFEST_BYTES == 64 << 20 and http_manifest.MAX_MANIFEST_ENTRIES == 1_000_000
