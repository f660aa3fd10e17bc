"""ModelFS.stop(): requests still waiting on the backend when the daemon stops fail with EIO."""

from __future__ import annotations

import errno

import pyfuse3
import pytest
import trio
import trio.testing

from modelfs.backends.memory import MemoryBackend, ramp

from .conftest import BS, StoreFactory
from .test_operations import CTX, build, lookup_path


async def test_stop_fails_requests_in_flight_with_eio(make_store: StoreFactory) -> None:
    backend = MemoryBackend()
    backend.put("m.bin", ramp(3 * BS, seed=2))
    ops = await build(make_store, backend)
    attr = await lookup_path(ops, "m.bin")
    info = await ops.open(attr.st_ino, 0, CTX)
    backend.latency = 1e9  # a server that never answers
    results: list[object] = []

    async def read() -> None:
        try:
            results.append(await ops.read(info.fh, 0, 4096))
        except pyfuse3.FUSEError as exc:
            results.append(exc.errno)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert backend.in_flight >= 1 and results == []
        assert ops.stop() == 1
    assert results == [errno.EIO]
    # After the stop, a new request fails at once instead of waiting for the backend.
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await ops.read(info.fh, BS, 4096)
    assert caught.value.errno == errno.EIO
    assert ops.errors["EIO"] == 2
