"""TieredBackend against real HTTP "replicas" on loopback: good answers are used, every kind of
wrong or failed answer is replaced by the origin's bytes, and replicas share blocks by
rendezvous hashing."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import crc32c
import pytest
import trio
import trio.testing

from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.backends.tiered import TieredBackend, TierTarget, header_pinned, rendezvous_order
from modelfs.config import Config, add_options, build_config
from modelfs.errors import ConfigError

from .conftest import StoreFactory, wait_until

BLOCK = 64 << 10


@dataclass
class OriginWithTier(MemoryBackend):
    """The memory backend, addressable by a tier the way GCS is (path + generation)."""

    def tier_target(self, name: str, version: str) -> TierTarget | None:
        if name.startswith("weak"):
            return None
        return TierTarget(f"/o/{name}?generation={version}", {}, header_pinned("x-goog-generation", version, "gen"))


@dataclass
class Replica:
    """A tier replica on loopback serving ``origin``'s bytes; ``mode(offset)`` picks a lie."""

    origin: MemoryBackend
    mode: Callable[[int], str] = lambda offset: "ok"
    gets: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    together: threading.Barrier | None = None  # "held_500": answered once this many GETs wait
    server: ThreadingHTTPServer | None = None
    digest_kind: str = "crc32c"  # the fill stage's; "sha256" as tiers before it sent

    def digest(self, body: bytes) -> str:
        if self.digest_kind == "sha256":
            return f"sha256={hashlib.sha256(body).hexdigest()}"
        return f"crc32c={crc32c.crc32c(body):08x}"

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, path: str, range_header: str) -> tuple[int, Mapping[str, str], bytes]:
        self.gets += 1
        parts = urlsplit(path)
        name = parts.path.removeprefix("/o/")
        version = parse_qs(parts.query)["generation"][0]
        data = self.origin.objects[name].data
        first, last = (int(x) for x in range_header.removeprefix("bytes=").split("-"))
        last = min(last, len(data) - 1)
        body = data[first : last + 1]
        headers = {
            "Content-Range": f"bytes {first}-{last}/{len(data)}",
            "x-goog-generation": version,
            "X-Modelfs-Digest": f"{self.digest(body)}; range={first}-{last}",
        }
        mode = self.mode(first)
        if mode == "corrupt":
            body = bytes([body[0] ^ 1]) + body[1:]
        elif mode == "corrupt_end":  # the last bit of the slice
            body = body[:-1] + bytes([body[-1] ^ 0x80])
        elif mode == "swapped":  # the right bytes, two 4 KiB pages in the wrong order
            body = body[4096:8192] + body[:4096] + body[8192:]
        elif mode == "digest_range":
            headers["X-Modelfs-Digest"] = f"{self.digest(body)}; range={first}-{last + 1}"
        elif mode == "no_digest":
            del headers["X-Modelfs-Digest"]
        elif mode == "content_range":
            headers["Content-Range"] = f"bytes {first + 1}-{last + 1}/{len(data)}"
        elif mode == "version":
            headers["x-goog-generation"] = "1"
        elif mode == "other_size":  # the pinned generation said, but an object of another size
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data) + BLOCK}"
        elif mode == "short":
            headers["Content-Length"] = str(len(body))
            body = body[:-10]
        elif mode in ("500", "404"):
            return int(mode), {}, b"no\n"
        elif mode == "held_500":  # every GET in flight fails at once (a replica's disk filling up)
            assert self.together is not None
            self.together.wait(30)
            return 500, {}, b"no\n"
        elif mode == "stall":
            self.release.wait(30)
        return 206, headers, body


@pytest.fixture
def replicas() -> Iterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(
        origin: MemoryBackend, mode: Callable[[int], str] = lambda offset: "ok", digest_kind: str = "crc32c"
    ) -> Replica:
        replica = Replica(origin, mode, digest_kind=digest_kind)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                status, headers, body = replica.answer(self.path, self.headers["Range"])
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if replica.mode(int(self.headers["Range"].split("=")[1].split("-")[0])) == "drip":
                    # Bytes keep coming, each well within the per-byte timeout, the block never
                    # within the deadline (a fault injected by the server, not a test sleep).
                    for i in range(0, len(body), 16 << 10):
                        if replica.release.wait(0.05):
                            break
                        self.wfile.write(body[i : i + (16 << 10)])
                        self.wfile.flush()
                    return
                self.wfile.write(body)
                if "Content-Length" in headers:  # a body shorter than announced: hang up
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        replica.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        replica.server.daemon_threads = True
        threading.Thread(target=replica.server.serve_forever, daemon=True).start()
        made.append(replica)
        return replica

    yield make
    for replica in made:
        replica.release.set()
        assert replica.server is not None
        replica.server.shutdown()
        replica.server.server_close()


def tiered(origin: MemoryBackend, *urls: str, read_timeout: float = 10.0) -> TieredBackend:
    # A replica that failed stays benched for the whole test: what goes where is deterministic.
    return TieredBackend(
        origin, urls, block_size=BLOCK, read_timeout=read_timeout, max_concurrency=4, first_backoff=3600
    )


async def read_all(backend: TieredBackend, name: str, version: str, size: int) -> bytes:
    """Block by block, as the block store reads (read_block: each a whole block, the last short)."""
    out = bytearray(size)
    view = memoryview(out)
    for offset in range(0, size, BLOCK):
        await backend.read_block(name, version, offset, view[offset : offset + BLOCK], size=size)
    return bytes(out)


SIZE = 10 * BLOCK + 1234  # a short last block too
DATA = ramp(SIZE, seed=7)


@pytest.mark.parametrize("digest_kind", ["crc32c", "sha256"])
async def test_blocks_come_from_the_tier(replicas: Callable[..., Replica], digest_kind: str) -> None:
    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    a, b = replicas(origin, digest_kind=digest_kind), replicas(origin, digest_kind=digest_kind)
    backend = tiered(origin, a.url, b.url)
    assert await read_all(backend, "m.bin", version, SIZE) == DATA
    assert origin.read_calls == 0
    stats = backend.tier_stats.snapshot()
    assert stats["tier_bytes"] == SIZE and stats["fallbacks"] == 0
    assert a.gets > 0 and b.gets > 0 and a.gets + b.gets == 11  # both replicas own some blocks
    # Every node picks the same replica for a block: a second reader adds no new owner.
    again = tiered(origin, b.url, a.url)
    before = (a.gets, b.gets)
    assert await read_all(again, "m.bin", version, SIZE) == DATA
    assert (a.gets - before[0], b.gets - before[1]) == before
    await backend.aclose()
    await again.aclose()


@pytest.mark.parametrize(
    ("lie", "digest_kind"),
    [
        *((lie, "crc32c") for lie in ("corrupt", "corrupt_end", "swapped", "digest_range", "no_digest")),
        *((lie, "crc32c") for lie in ("content_range", "version", "other_size", "short", "500", "404")),
        ("corrupt", "sha256"),
        ("corrupt_end", "sha256"),
    ],
)
async def test_a_lying_replica_costs_one_origin_read_per_bad_block(
    replicas: Callable[..., Replica], lie: str, digest_kind: str
) -> None:
    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    bad_offset = 3 * BLOCK
    replica = replicas(origin, lambda offset: lie if offset == bad_offset else "ok", digest_kind)
    backend = tiered(origin, replica.url)
    assert await read_all(backend, "m.bin", version, SIZE) == DATA
    stats = backend.tier_stats.snapshot()
    reasons = {k: v for k, v in stats["fallback_reasons"].items() if v}  # type: ignore[union-attr]
    expected = {
        "corrupt": "digest",
        "corrupt_end": "digest",
        "swapped": "digest",
        "500": "status",
        "404": "status",
        "short": "short_body",
        "content_range": "response",
        "other_size": "version",  # the listed size is the pinned one (GCS, S3 versions do not say it)
    }.get(lie, lie)
    if lie in ("500", "short"):
        # A failing replica is benched: the blocks after it come from the origin too.
        assert origin.reads == {("m.bin", offset): 1 for offset in range(bad_offset, SIZE, BLOCK)}
        assert reasons == {expected: 1, "all_benched": 7}
    else:  # a wrong answer costs that block only
        assert origin.reads == {("m.bin", bad_offset): 1}
        assert stats["fallbacks"] == 1 and stats["origin_bytes"] == BLOCK
        assert reasons == {expected: 1}
    await backend.aclose()


async def test_a_dead_replica_is_benched_and_its_blocks_go_elsewhere(replicas: Callable[..., Replica]) -> None:
    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    live = replicas(origin)
    dead = replicas(origin)
    dead_url = dead.url
    assert dead.server is not None
    dead.server.shutdown()
    dead.server.server_close()
    backend = tiered(origin, live.url, dead_url)
    assert await read_all(backend, "m.bin", version, SIZE) == DATA
    # One block found the dead replica and went on to the next replica in its order, not to
    # the origin; then the replica was benched and the blocks it owns went there directly.
    assert origin.read_calls == 0
    stats = backend.tier_stats.snapshot()
    assert stats["fallback_reasons"]["unreachable"] == 1  # type: ignore[index]
    assert stats["failovers"] == 1 and stats["origin_gets"] == 0
    assert live.gets == 11
    await backend.aclose()


async def test_a_failing_replica_is_one_warning_not_a_line_per_block(
    replicas: Callable[..., Replica], mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """GETs in flight together that all fail (a replica whose cache disk is full cuts every
    miss short) bench it once, for the first backoff, with one line; so do the failures of
    its later probes, until a line is due again."""
    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    replica = replicas(origin, lambda offset: "held_500")
    replica.together = threading.Barrier(4)
    backend = TieredBackend(origin, [replica.url], block_size=BLOCK, read_timeout=10, max_concurrency=4)
    caplog.set_level(logging.DEBUG, "modelfs.backends.tiered")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    async def read(offset: int) -> None:
        dest = bytearray(BLOCK)
        await backend.read_block("m.bin", version, offset, memoryview(dest), size=SIZE)
        assert bytes(dest) == DATA[offset : offset + BLOCK]

    async with trio.open_nursery() as nursery:
        for index in range(4):
            nursery.start_soon(read, index * BLOCK)
    stats = backend.tier_stats.snapshot()
    assert stats["replicas"][replica.url]["failures"] == 4 and replica.gets == 4  # type: ignore[index]
    assert len(warnings()) == 1 and "for 1 s" in warnings()[0], warnings()
    # Benched for the first backoff, not four doublings of it: a second later it is tried again.
    await read(4 * BLOCK)
    assert replica.gets == 4
    replica.together = threading.Barrier(1)
    mock_clock.jump(1)
    await read(5 * BLOCK)
    assert replica.gets == 5 and len(warnings()) == 1  # still down: counted, not logged
    mock_clock.jump(600)
    await read(6 * BLOCK)
    assert replica.gets == 6 and len(warnings()) == 2
    assert "4 more failures since the last line" in warnings()[1], warnings()
    await backend.aclose()


async def test_a_stalled_replica_times_out_and_the_origin_answers(replicas: Callable[..., Replica]) -> None:
    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    replica = replicas(origin, lambda offset: "stall" if offset == 0 else "ok")
    backend = tiered(origin, replica.url, read_timeout=0.5)
    dest = bytearray(BLOCK)
    await backend.read_range("m.bin", version, 0, memoryview(dest))
    assert bytes(dest) == DATA[:BLOCK]
    assert backend.tier_stats.fallbacks["stalled"] == 1
    assert origin.read_calls == 1
    await backend.aclose()


async def test_a_replica_that_drips_bytes_counts_as_stalled(
    replicas: Callable[..., Replica], caplog: pytest.LogCaptureFixture
) -> None:
    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    replica = replicas(origin, lambda offset: "drip" if offset == 0 else "ok")
    # 16 KiB every 50 ms: every read of the socket succeeds well within the timeout, and
    # the 512 KiB block would take 1.6 s, over the 0.5 s the whole block may take.
    big = 8 * BLOCK
    backend = TieredBackend(origin, [replica.url], block_size=big, read_timeout=0.5, max_concurrency=1)
    dest = bytearray(big)
    await backend.read_range("m.bin", version, 0, memoryview(dest))
    assert bytes(dest) == DATA[:big]
    assert backend.tier_stats.fallbacks["stalled"] == 1
    # The line says the sub-second timeout as it was given (it said "(0 s)").
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "stalled" in line and "0.5 s" in line and "(0 s)" not in line, line
    await backend.aclose()


async def test_reads_the_tier_cannot_key_or_check_go_to_the_origin(replicas: Callable[..., Replica]) -> None:
    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    weak = origin.put("weak.bin", DATA)
    replica = replicas(origin)
    backend = tiered(origin, replica.url)
    small = bytearray(1000)
    await backend.read_range("m.bin", version, 100, memoryview(small))  # not a whole block
    assert bytes(small) == DATA[100:1100]
    await backend.stat("m.bin")
    await backend.read_range("m.bin", version, BLOCK, memoryview(small))  # aligned, still not whole
    assert bytes(small) == DATA[BLOCK : BLOCK + 1000]
    last = bytearray(SIZE % BLOCK)  # the last block's range, but read as a range (a small read)
    await backend.read_range("m.bin", version, SIZE - len(last), memoryview(last))
    assert bytes(last) == DATA[SIZE - len(last) :]
    assert await read_all(backend, "weak.bin", weak, SIZE) == DATA  # no strong version
    assert replica.gets == 0
    assert backend.tier_stats.bypass_bytes == 2000 + len(last) + SIZE
    await backend.read_block("m.bin", version, SIZE - len(last), memoryview(last))  # the block: the tier's
    assert bytes(last) == DATA[SIZE - len(last) :] and replica.gets == 1
    await backend.aclose()


async def test_the_last_block_of_objects_never_listed_comes_from_the_tier(
    replicas: Callable[..., Replica], make_store: StoreFactory
) -> None:
    """Whether a short block is an object's last one was told by a table of the sizes of the
    last 4,096 objects listed: past that, every object's last block skipped the tier (430 of
    4,500 objects' blocks went to the origin from every node). The block store says so now."""
    from modelfs.cache.blocks import ObjectRef

    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    replica = replicas(origin)
    backend = tiered(origin, replica.url)
    store = await make_store(backend, memory_blocks=16, block_size=BLOCK)  # type: ignore[arg-type]
    ref = ObjectRef(backend.object_key("m.bin"), "m.bin", version, SIZE)  # no listing, no stat
    for index in range(store.block_count(ref)):
        block = await store.get(ref, index)
        assert bytes(block.view) == DATA[index * BLOCK : (index + 1) * BLOCK]
    assert origin.read_calls == 0 and replica.gets == 11
    assert backend.tier_stats.snapshot()["tier_bytes"] == SIZE
    await backend.aclose()


def test_rendezvous_moves_only_the_new_replicas_share() -> None:
    keys = [f"o\0{v}\0{i * BLOCK}" for v in range(3) for i in range(200)]
    two = ["http://a:1", "http://b:1"]
    three = [*two, "http://c:1"]
    before = {k: two[rendezvous_order(two, k)[0]] for k in keys}
    after = {k: three[rendezvous_order(three, k)[0]] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "http://c:1" for k in moved)
    assert 0.2 < len(moved) / len(keys) < 0.45
    assert 0.4 < sum(1 for k in keys if before[k] == "http://a:1") / len(keys) < 0.6


def config(*argv: str, source: str = "gs://bucket/m") -> Config:
    import argparse

    parser = argparse.ArgumentParser()
    add_options(parser)
    return build_config(source, "/mnt", parser.parse_args(list(argv)), environ={})


def test_cache_url_option() -> None:
    assert config("--cache-url", "http://10.0.0.1:8080/", "--cache-url", "http://tier").cache_url == (
        "http://10.0.0.1:8080",
        "http://tier:80",
    )
    for bad in ("https://tier:1", "http://tier:1/path", "tier:80", "http://u:p@tier:1", "http://tier:99999"):
        with pytest.raises(ConfigError, match="cache-url"):
            config("--cache-url", bad)
    with pytest.raises(ConfigError, match="twice"):
        config("--cache-url", "http://t:1", "--cache-url", "http://t:1/")
    with pytest.raises(ConfigError, match="cache-url"):
        config("--cache-url", "http://t:1", source="file:///tmp")


async def test_stats_and_metrics_count_bytes_by_tier(
    replicas: Callable[..., Replica], make_store: StoreFactory
) -> None:
    """The daemon's stats (``modelfs stats``) and /metrics carry the tier's counters."""
    from prometheus_client import CollectorRegistry, generate_latest

    from modelfs.cache.blocks import ObjectRef
    from modelfs.files import OpenFiles
    from modelfs.fs import ModelFS
    from modelfs.inodes import Namespace
    from modelfs.metrics import ModelfsCollector, on_trio_thread

    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    good = replicas(origin)
    bad = replicas(origin, lambda offset: "corrupt")
    backend = tiered(origin, good.url, bad.url)
    store = await make_store(backend, memory_blocks=16, block_size=BLOCK)  # type: ignore[arg-type]
    namespace = Namespace(backend, ttl=60, retry_deadline=5)
    ops = ModelFS(namespace, OpenFiles(store, max_prefetch=2 * BLOCK), ttl=60, block_size=BLOCK)
    await namespace.refresh(force=True)
    fh = ops.files.open(ObjectRef(backend.object_key("m.bin"), "m.bin", version, SIZE))
    assert bytes(await ops.files.read(fh, 0, SIZE)) == DATA
    ops.files.release(fh)
    tier = ops.stats()["tier"]
    assert isinstance(tier, dict)
    assert tier["replicas"][good.url]["bytes"] + tier["origin_bytes"] == SIZE
    assert tier["replicas"][bad.url]["rejected"] == bad.gets > 0
    assert tier["fallback_reasons"]["digest"] == bad.gets
    registry = CollectorRegistry()
    registry.register(ModelfsCollector(on_trio_thread(ops.metrics_snapshot), "memory"))
    text = (await trio.to_thread.run_sync(generate_latest, registry)).decode()
    assert f'modelfs_tier_bytes_total{{source="{good.url}"}}' in text
    assert f'modelfs_tier_fallbacks_total{{reason="digest"}} {float(bad.gets)}' in text
    await backend.aclose()


def test_the_tier_never_joins_blocks_into_one_origin_get() -> None:
    """A joined read-ahead GET would bypass the tier (read_ranges is the origin's): the block
    store must see a tiered backend as one that cannot join, whatever its origin can."""
    from modelfs.backends.base import joins_reads

    origin = OriginWithTier(joins_reads=True)
    assert joins_reads(origin)
    assert not joins_reads(tiered(origin, "http://127.0.0.1:9"))


@pytest.mark.parametrize("digest_kind", ["crc32c", "sha256"])
async def test_the_tiers_checked_crc32c_goes_to_the_disk_write(
    replicas: Callable[..., Replica], digest_kind: str
) -> None:
    """read_block hands back the CRC32C the node checked the tier's body with
    (summed as it arrived), so the disk write makes no second pass; none for a sha256 tier,
    the origin's own for a block the tier does not serve (here: bypassed, a short range)."""
    import crc32c

    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    backend = tiered(origin, replicas(origin, digest_kind=digest_kind).url)
    for offset in (0, 3 * BLOCK, SIZE - SIZE % BLOCK):
        dest = memoryview(bytearray(min(BLOCK, SIZE - offset)))
        sums: list[int] = []
        await backend.read_block("m.bin", version, offset, dest, sums)
        assert bytes(dest) == DATA[offset : offset + len(dest)]
        assert sums == ([crc32c.crc32c(dest)] if digest_kind == "crc32c" else [])
    assert origin.read_calls == 0
    half = memoryview(bytearray(BLOCK // 2))
    sums = []
    await backend.read_ranges("m.bin", version, 5, [half], sums)  # not a whole block: the origin's
    assert bytes(half) == DATA[5 : 5 + BLOCK // 2] and origin.read_calls == 1
    await backend.aclose()


async def test_a_stop_ends_a_get_to_a_stalled_replica_at_once(replicas: Callable[..., Replica]) -> None:
    """abort() (the daemon's stop) shuts the replica GET's socket: it ends now, not at the
    read timeout, and the read goes to the origin (no replica counted as stalled)."""
    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    replica = replicas(origin, lambda offset: "stall")
    backend = tiered(origin, replica.url, read_timeout=600)
    dest = bytearray(BLOCK)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.read_range, "m.bin", version, 0, memoryview(dest))
        await wait_until(lambda: replica.gets == 1)
        backend.abort()
    assert bytes(dest) == DATA[:BLOCK]
    assert backend.tier_stats.fallbacks["error"] == 1 and backend.tier_stats.fallbacks["stalled"] == 0
    await backend.aclose()


class HangingLookup:
    """A name lookup (the Resolver seam) that blocks until released, as when the resolver
    does not answer; or, with ``answer``, fails at once (NXDOMAIN). Released at teardown."""

    def __init__(self, nxdomain: bool = False) -> None:
        self.nxdomain = nxdomain
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, host: str, port: int) -> list[tuple[int, tuple[object, ...]]]:
        import socket

        self.calls += 1
        if self.nxdomain:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        self.release.wait(60)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")


@pytest.mark.parametrize("nxdomain", [False, True])
async def test_a_replica_whose_name_does_not_resolve_is_benched_and_the_next_one_serves(
    replicas: Callable[..., Replica], nxdomain: bool
) -> None:
    """A resolver that does not answer (or a name that does not exist) costs one connect
    timeout, not the resolver's own timeouts: the replica is benched as a dead one and its
    blocks go to the next replica (the origin if none)."""
    from modelfs.backends.resolver import Resolver

    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    live = replicas(origin)
    lookup = HangingLookup(nxdomain)
    unnamed = "http://tier-0.test:8080"
    try:
        backend = TieredBackend(
            origin,
            [live.url, unnamed],
            block_size=BLOCK,
            read_timeout=600,
            connect_timeout=0.2,
            max_concurrency=4,
            first_backoff=3600,
            resolver=Resolver(lookup),
        )
        with trio.fail_after(30):  # (without a bound on the lookup: blocked for its 60 s)
            assert await read_all(backend, "m.bin", version, SIZE) == DATA
        stats = backend.tier_stats.snapshot()
        assert lookup.calls == 1 and origin.read_calls == 0 and live.gets == 11
        assert stats["fallback_reasons"]["unreachable"] == 1 and stats["failovers"] == 1  # type: ignore[index]
        alone = TieredBackend(
            origin,
            [unnamed],
            block_size=BLOCK,
            read_timeout=600,
            connect_timeout=0.2,
            max_concurrency=4,
            first_backoff=3600,
            resolver=Resolver(lookup),
        )
        with trio.fail_after(30):
            assert await read_all(alone, "m.bin", version, SIZE) == DATA
        assert lookup.calls == 2 and origin.read_calls == 11
        await backend.aclose()
        await alone.aclose()
    finally:
        lookup.release.set()


def _home_of(backend_urls: list[str], offset: int, version: str) -> int:
    return rendezvous_order(backend_urls, f"/o/m.bin?generation={version}\0{version}\0{offset}")[0]


async def test_a_block_a_replica_fails_goes_to_the_next_replica_then_the_origin(
    replicas: Callable[..., Replica],
) -> None:
    """Fast failures (a 500, a refused connect) pass the block along its rendezvous order,
    each replica once; only when all failed does the origin serve it."""
    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    failing = [replicas(origin, lambda offset: "500") for _ in range(2)]
    live = replicas(origin)
    backend = tiered(origin, failing[0].url, failing[1].url, live.url)
    urls = [failing[0].url, failing[1].url, live.url]
    offset = next(
        o
        for o in range(0, SIZE, BLOCK)
        if rendezvous_order(urls, f"/o/m.bin?generation={version}\0{version}\0{o}")[-1] == 2
    )
    dest = bytearray(BLOCK)
    await backend.read_block("m.bin", version, offset, memoryview(dest), size=SIZE)
    assert bytes(dest) == DATA[offset : offset + BLOCK]
    stats = backend.tier_stats.snapshot()
    assert (failing[0].gets, failing[1].gets, live.gets) == (1, 1, 1)
    assert stats["failovers"] == 2 and stats["origin_gets"] == 0 and origin.read_calls == 0
    assert stats["fallback_reasons"]["status"] == 2  # type: ignore[index]
    # Every replica failing: each tried once, then the origin.
    none_left = tiered(origin, failing[0].url, failing[1].url)
    await none_left.read_block("m.bin", version, 0, memoryview(dest), size=SIZE)
    assert bytes(dest) == DATA[:BLOCK]
    assert (failing[0].gets, failing[1].gets) == (2, 2) and origin.read_calls == 1
    assert none_left.tier_stats.failovers == 1 and none_left.tier_stats.origin_gets == 1
    await backend.aclose()
    await none_left.aclose()


async def test_after_a_stalled_replica_the_block_goes_to_the_origin_not_a_second_replica(
    replicas: Callable[..., Replica],
) -> None:
    """The replicas share one --read-timeout per block: a stall used it up, so the block is
    not sent to a second replica (which could stall as long again) but to the origin."""
    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    stalled = replicas(origin, lambda offset: "stall")
    other = replicas(origin)
    urls = [stalled.url, other.url]
    backend = tiered(origin, *urls, read_timeout=0.5)
    offset = next(o for o in range(0, SIZE, BLOCK) if _home_of(urls, o, version) == 0)
    dest = bytearray(BLOCK)
    await backend.read_block("m.bin", version, offset, memoryview(dest), size=SIZE)
    assert bytes(dest) == DATA[offset : offset + BLOCK]
    assert stalled.gets == 1 and other.gets == 0 and origin.read_calls == 1
    assert backend.tier_stats.fallbacks["stalled"] == 1 and backend.tier_stats.failovers == 0
    await backend.aclose()


async def test_a_flapping_replica_is_benched_longer_each_time(
    replicas: Callable[..., Replica], mock_clock: trio.testing.MockClock
) -> None:
    """A replica that answers one GET and fails the next: one good answer no longer resets its
    backoff to the first (it was probed every second forever); the backoff halves only for each
    30 s the replica answers without failing."""
    origin = OriginWithTier()
    big = ramp(40 * BLOCK, seed=3)
    version = origin.put("m.bin", big)
    flapping = replicas(origin, lambda offset: "500" if offset // BLOCK % 2 == 0 else "ok")
    backend = TieredBackend(origin, [flapping.url], block_size=BLOCK, read_timeout=10, max_concurrency=4)

    async def read(index: int) -> None:
        dest = bytearray(BLOCK)
        await backend.read_block("m.bin", version, index * BLOCK, memoryview(dest), size=len(big))
        assert bytes(dest) == big[index * BLOCK : (index + 1) * BLOCK]

    await read(0)  # fails: benched 1 s
    assert flapping.gets == 1
    mock_clock.jump(1)
    await read(1)  # answers
    await read(2)  # fails again: benched 2 s (it was 1 s again after the answer)
    assert flapping.gets == 3
    mock_clock.jump(1)
    await read(3)
    assert flapping.gets == 3  # still benched
    mock_clock.jump(1)
    await read(3)
    assert flapping.gets == 4  # its bench over: answers; the next failure benches it 4 s
    # 30 s of good answers halve the backoff, 30 s more bring it back to the first.
    for step in range(2):
        mock_clock.jump(30)
        await read(5 + 2 * step)
    assert flapping.gets == 6
    await read(8)  # fails: benched 1 s only
    mock_clock.jump(1)
    await read(9)
    assert flapping.gets == 8
    await backend.aclose()


async def test_a_replica_tried_with_a_sliver_of_time_left_is_not_benched_for_running_out(
    replicas: Callable[..., Replica], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block's home replica failed late (a 504 just before the block's --read-timeout ran
    out); the next replica got what was left, ran out of it and was benched, with a warning,
    though nothing was wrong with it. Now it is counted, not benched; the origin serves."""
    import types

    from modelfs.backends import tiered as tiered_module
    from modelfs.backends.tiered import TierRejected

    origin = OriginWithTier()
    version = origin.put("m.bin", DATA)
    made = [replicas(origin), replicas(origin)]
    urls = [r.url for r in made]
    backend = tiered(origin, *urls, read_timeout=10)
    offset = next(o for o in range(0, SIZE, BLOCK) if _home_of(urls, o, version) == 0)
    now = [1000.0]
    monkeypatch.setattr(tiered_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))

    def late_504(target: TierTarget, offset: int, dest: memoryview, deadline: float) -> int | None:
        now[0] = deadline - 0.5
        raise TierRejected("status", "HTTP 504", replica_down=True)

    def ran_out(target: TierTarget, offset: int, dest: memoryview, deadline: float) -> int | None:
        now[0] = deadline + 0.001
        raise TierRejected("stalled", "timed out", replica_down=True)

    home, second = backend._replicas  # (in the order given: urls)
    home.get_into = late_504  # type: ignore[method-assign]
    second.get_into = ran_out  # type: ignore[method-assign]
    dest = bytearray(BLOCK)
    await backend.read_block("m.bin", version, offset, memoryview(dest), size=SIZE)
    assert bytes(dest) == DATA[offset : offset + BLOCK]
    stats = backend.tier_stats
    assert stats.failovers == 1 and stats.origin_gets == 1 and origin.read_calls == 1
    assert stats.fallbacks["status"] == 1 and stats.fallbacks["stalled"] == 1
    assert home.benched_until > trio.current_time()  # (its own failure)
    assert second.benched_until <= trio.current_time(), "benched for the time the replica before it used"
    await backend.aclose()
