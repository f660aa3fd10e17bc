"""The bytes ModelFS.read hands to pyfuse3 are valid until the calling task next yields (docs/concurrency.md §4).

ModelFS.read returns a memoryview into a cached block, without a copy. pyfuse3 copies it into
the kernel before any other task runs; a yield later, another read may have taken the block's
buffer. These tests show both sides, and check that the installed pyfuse3 still replies
without an ``await`` after ``operations.read``.
"""

from __future__ import annotations

import re
from importlib import resources

import trio

from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.files import OpenFiles
from modelfs.fs import ModelFS
from modelfs.inodes import Namespace

from .conftest import BS, StoreFactory, ref_for


async def test_reply_bytes_are_right_before_the_next_yield_and_not_after(make_store: StoreFactory) -> None:
    """Copied at once (what pyfuse3 does) the bytes are right; a yield later, after another read
    took the one-block budget, the same view shows the other block's bytes."""
    backend = MemoryBackend()
    first, second = ramp(BS, seed=1), ramp(BS, seed=2)
    backend.put("a.bin", first)
    backend.put("b.bin", second)
    store = await make_store(backend, memory_blocks=1)  # one block: the next read evicts this one
    files = OpenFiles(store, max_prefetch=0)
    ops = ModelFS(Namespace(backend, ttl=60, retry_deadline=5), files, ttl=60, block_size=BS)
    fa, fb = files.open(ref_for(backend, "a.bin")), files.open(ref_for(backend, "b.bin"))

    view = await ops.read(fa, 0, BS)
    reply = bytes(view)  # no yield between the read and the copy, as in pyfuse3's fuse_read_async
    assert reply == first

    async with trio.open_nursery() as nursery:  # other requests run: the budget goes to b.bin
        nursery.start_soon(ops.read, fb, 0, BS)
    assert bytes(await ops.read(fb, 0, BS)) == second
    assert bytes(view) != first  # the buffer now holds another block: a copy taken now would be wrong
    files.release(fa)
    files.release(fb)


def test_pyfuse3_replies_to_a_read_without_yielding() -> None:
    """pyfuse3's read handler copies the bytes into the kernel right after ``operations.read``
    returns, with no ``await`` in between: the rule above depends on it."""
    source = (resources.files("pyfuse3") / "handlers.pxi").read_text()
    handler = re.search(r"async def fuse_read_async\b.*?(?=\n(?:async )?c?def )", source, re.S)
    assert handler is not None, "pyfuse3's fuse_read_async is gone: re-check docs/concurrency.md §4"
    body = handler.group(0)
    after_read = body[body.index("await operations.read(") + 1 :]
    assert "fuse_reply_buf" in after_read and "await" not in after_read, body
