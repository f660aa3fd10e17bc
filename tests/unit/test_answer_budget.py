"""GCS and S3 listings and metadata answers are charged to the memory budget while held
(modelfs.backends.answers): a lying server answering concurrent listings with big pages shows
in the budget's ``metadata_answers`` part, the budget stays within its capacity, an answer
too big for it is a one-line error, and the process's Python memory stays near the budget
(before: each of the 9 worker threads held its answer and parse beside it)."""

from __future__ import annotations

import threading
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing

from modelfs.backends.answers import AnswerBudget
from modelfs.backends.gcs import ANSWER_COST as GCS_COST
from modelfs.backends.gcs import GCSBackend
from modelfs.backends.s3 import ANSWER_COST as S3_COST
from modelfs.backends.s3 import S3Backend
from modelfs.backends.skeleton import BackendSkeleton
from modelfs.cache.memory import BufferKind, Lease, MemoryCache
from modelfs.config import parse_source
from modelfs.errors import AccessDenied, BackendError
from modelfs.testing.servers import QuietHandler, loopback_http

from .test_s3_backend import ETAG, aws_env

__all__ = ["aws_env"]  # the fixture, imported to be used by name

MIB = 1 << 20
S3_HEAD = b'<?xml version="1.0"?><ListBucketResult><Name>bkt</Name><Prefix>m/</Prefix><IsTruncated>false</IsTruncated>'


def gcs_page(size: int) -> bytes:
    """A listing whose next page token is one long escaped string: its parse decodes all of it."""
    head, tail = b'{"nextPageToken":"\\u00e9', b'"}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def s3_page(size: int) -> bytes:
    """A listing of long common prefixes (botocore's parse takes ~3 times it)."""
    unit = b"<CommonPrefixes><Prefix>m/" + b"p" * 1000 + b"/</Prefix></CommonPrefixes>"
    tail = b"</ListBucketResult>"
    return S3_HEAD + unit * ((size - len(S3_HEAD) - len(tail)) // len(unit)) + tail


class Watched(MemoryCache):
    """A budget that records the most it lent to metadata answers, checks it never holds more
    than its capacity, and tells a waiting test each time it lends to one."""

    def __init__(self, capacity: int, block_size: int) -> None:
        super().__init__(capacity, block_size)
        self.most_metadata = 0
        self.granted = 0
        self.changed = trio.Event()

    def _grant(self, kind: BufferKind, nbytes: int, buf: object, charge: int, *, waited: bool) -> Lease:
        lease = super()._grant(kind, nbytes, buf, charge, waited=waited)  # type: ignore[arg-type]
        assert self.used <= self.capacity
        if kind is BufferKind.METADATA:
            self.most_metadata = max(self.most_metadata, self.leased_by_kind[kind])
            self.granted += 1
            self.changed.set()
            self.changed = trio.Event()
        return lease

    async def wait_granted(self, count: int) -> None:
        while self.granted < count:
            await self.changed.wait()


class Server:
    """Answers every GET with ``body``; with ``gate``, only the first half until it is set."""

    def __init__(
        self, body: bytes, *, length: bool = True, gate: threading.Event | None = None, status: int = 200
    ) -> None:
        self.body = body
        self.status = status
        self.length = length
        self.gate = gate
        self.requests = 0

    def handler(self) -> type[QuietHandler]:
        server = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.requests += 1
                body = server.body
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                if server.length:
                    self.send_header("Content-Length", str(len(body)))
                else:  # the length is known only at the end (the connection closes)
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                try:
                    half = len(body) // 2
                    self.wfile.write(body[:half])
                    if server.gate is not None:
                        server.gate.wait(60)
                    self.wfile.write(body[half:])
                except OSError:
                    pass

            do_HEAD = do_GET  # noqa: N815

        return Handler


@contextmanager
def backend_for(kind: str, server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[BackendSkeleton]:
    with loopback_http(server.handler()) as url:
        if kind == "gcs":
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
            yield GCSBackend(parse_source("gs://bkt"), anonymous=True)
        else:
            yield S3Backend(parse_source("s3://bkt/m"), endpoint_url=url, anonymous=True)


def charged(backend: BackendSkeleton, budget: MemoryCache) -> None:
    """Wire ``budget`` as mount.build() does (open_backend(config, budget))."""
    cost = GCS_COST if isinstance(backend, GCSBackend) else S3_COST
    backend._answers = AnswerBudget(budget, cost, backend.description)


PAGES: dict[str, Callable[[int], bytes]] = {"gcs": gcs_page, "s3": s3_page}
KINDS = pytest.mark.parametrize("kind", ["gcs", "s3"])


@KINDS
@pytest.mark.usefixtures("aws_env")
async def test_concurrent_big_listings_are_charged_while_held(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nine listings of 4 MiB pages at once: the budget's metadata part holds each one's
    charge while its answer is read, never more than it can lend, and nothing once done."""
    body = PAGES[kind](4 * MIB)
    gate = threading.Event()
    budget = Watched(64 * MIB, 8 * MIB)  # lends 56 MiB: two answers (~14-16 MiB each) and more
    server = Server(body, gate=gate)
    with backend_for(kind, server, monkeypatch) as backend:
        charged(backend, budget)
        async with trio.open_nursery() as nursery:
            for _ in range(9):
                nursery.start_soon(backend.list_dir, "")
            await budget.wait_granted(2)  # (the server holds every answer's second half)
            cost = GCS_COST if kind == "gcs" else S3_COST
            assert budget.parts()["metadata_answers"] >= 2 * cost.of(len(body))
            assert budget.leased <= budget.max_lease
            gate.set()
        await backend.aclose()
    assert budget.most_metadata <= budget.max_lease
    assert budget.parts()["metadata_answers"] == 0 and budget.leased == 0
    assert budget.stats.lease_waits > 0  # 9 did not fit at once: some waited for room


@KINDS
@pytest.mark.usefixtures("aws_env")
async def test_an_answer_too_big_for_the_budget_is_a_one_line_error(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 12 MiB page's charge (its parse included) is more than a 32 MiB budget lends beside
    a block: EIO at once, not a wait for room that never comes."""
    budget = Watched(32 * MIB, 8 * MIB)
    with backend_for(kind, Server(PAGES[kind](12 * MIB)), monkeypatch) as backend:
        charged(backend, budget)
        with pytest.raises(BackendError, match="raise --memory-cache") as caught:
            await backend.list_dir("")
        await backend.aclose()
    assert "\n" not in str(caught.value)
    assert budget.leased == 0


@KINDS
@pytest.mark.usefixtures("aws_env")
async def test_answers_of_unknown_length_grow_their_charge(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages sent without a length (to the connection's close), several at once in a budget
    that holds one or two: each grows its charge as it is read; one that cannot grow while
    others hold the room is asked again with its charge taken first. All complete."""
    body = PAGES[kind](3 * MIB)
    budget = Watched(40 * MIB, 8 * MIB)  # lends 32 MiB: ~2 answers of 3 MiB at their full charge
    server = Server(body, length=False)
    results: list[object] = []
    with backend_for(kind, server, monkeypatch) as backend:
        charged(backend, budget)

        async def one() -> None:
            results.append(await backend.list_dir(""))

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(one)
        await backend.aclose()
    assert len(results) == 6
    assert budget.most_metadata <= budget.max_lease and budget.leased == 0
    assert budget.granted > 6  # grown in steps


@KINDS
@pytest.mark.usefixtures("aws_env")
async def test_concurrent_big_listings_stay_near_the_budget(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nine listings of 8 MiB pages at once took ~9 x 26 MiB of Python memory (each thread's
    answer and its parse); charged, they take about what the budget lends."""
    budget = Watched(64 * MIB, 8 * MIB)
    with backend_for(kind, Server(PAGES[kind](8 * MIB)), monkeypatch) as backend:
        charged(backend, budget)
        await backend.list_dir("")  # (imports and first-use allocations out of the count)
        tracemalloc.start()
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(9):
                    nursery.start_soon(backend.list_dir, "")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        await backend.aclose()
    assert peak <= budget.max_lease + 8 * MIB, f"{peak / MIB:.0f} MiB"


def test_a_thread_never_waits_for_room_while_a_data_get_needs_it() -> None:
    """A call whose answer finds no room gives its thread back and waits in its task: the
    room is held by what a data GET (which needs a thread) would free. Before, the thread
    waited for room holding the backend's only free thread: neither could go on."""
    from modelfs.backends import answers

    budget = MemoryCache(4 * MIB, MIB)
    charged = AnswerBudget(budget, answers.Cost(1, 0, 0), "gs://bkt")
    limiter = trio.CapacityLimiter(1)  # the backend's threads, all but this one busy

    async def run_blocking(fn: Callable[..., object], *args: object) -> object:
        return await trio.to_thread.run_sync(fn, *args, limiter=limiter)

    def read_answer() -> str:
        answers.begin(MIB, MIB)  # a 1 MiB page: its charge finds no room now
        return "parsed"

    results: list[object] = []

    async def main() -> None:
        hog = await budget.lease(0, BufferKind.METADATA, extra=budget.max_lease)  # (pinned blocks, say)

        async def listing() -> None:
            charge = charged.charge()
            try:
                results.append(await charge.call(run_blocking, read_answer))
            finally:
                charge.release()

        async def data_get() -> None:
            await run_blocking(lambda: None)  # needs the thread
            hog.release()  # its block is done: the room it held is free

        with trio.fail_after(60):  # (only ends a deadlock: no passing run comes near it)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(listing)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(data_get)
        assert budget.leased == 0

    trio.run(main)
    assert results == ["parsed"]


def test_a_long_listing_keeps_the_room_it_waited_for_across_its_pages() -> None:
    """After a Recharge the task waits for the room and makes the call again. A page that
    is done gives back its own charge, not that room: given back, a reader it woke could take
    it before the next page, which would then find no room and start the listing over (found
    by review). Here a reader takes whatever the budget has free after every page."""
    from modelfs.backends import answers

    budget = MemoryCache(4 * MIB, MIB)  # lends 3 MiB
    charged = AnswerBudget(budget, answers.Cost(1, 0, 0), "gs://bkt")
    attempts: list[int] = []
    readers: list[Lease] = []
    hog: list[Lease] = []

    async def run_blocking(fn: Callable[..., object], *args: object) -> object:
        try:
            return await trio.to_thread.run_sync(fn, *args)
        finally:
            while hog:  # the room the first attempt found taken is free once it has ended
                hog.pop().release()

    def take_what_is_free() -> None:  # (a reader woken by a release)
        free = budget.max_lease - budget.leased
        if free > 0:
            lease = budget.try_lease(0, BufferKind.SMALL_READ, extra=free)
            if lease is not None:
                readers.append(lease)

    def listing() -> str:
        attempts.append(1)
        for _page in range(3):
            answers.begin(2 * MIB, 2 * MIB)
            answers.done()
            trio.from_thread.run_sync(take_what_is_free)
        return "listed"

    async def main() -> str:
        hog.append(await budget.lease(0, BufferKind.SMALL_READ, extra=2 * MIB))
        charge = charged.charge()
        try:
            with trio.fail_after(60):  # (only ends a listing that cannot go on)
                return await charge.call(run_blocking, listing)
        finally:
            charge.release()
            for lease in readers:
                lease.release()

    assert trio.run(main) == "listed"
    assert len(attempts) == 2  # the first found no room; the second kept what it waited for


# An error answer of each store with a long message, and how its code or message shows in the
# error raised when the body was read (from the status alone it is not there).
ERRORS: dict[str, tuple[bytes, str]] = {
    "gcs": (b'{"error":{"code":403,"message":"' + b"m" * (48 << 10) + b'"}}', ": mmm"),
    "s3": (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>'
        + b"m" * (48 << 10)
        + b"</Message></Error>",
        "(AccessDenied)",
    ),
}
VERSIONS = {"gcs": "7", "s3": ETAG}


async def _refused_read(backend: BackendSkeleton, kind: str, name: str, errors: list[str]) -> None:
    with pytest.raises(AccessDenied) as caught:
        await backend.read_range(name, VERSIONS[kind], 0, memoryview(bytearray(10)))
    errors.append(str(caught.value))


@KINDS
@pytest.mark.usefixtures("aws_env")
async def test_error_bodies_of_failing_data_gets_are_charged_while_held(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight ranged GETs answered 403 with a 48 KiB error body at once: each body is charged
    (its parse included) while its thread holds it, and nothing once done. Before, a data
    GET's error body was held beside the budget (S3: 64 KiB of ``<a/>`` and botocore's parse
    ~1.3 MiB a GET, 55 MiB for 64 GETs failing at once; GCS ~90 KiB a GET)."""
    body, marker = ERRORS[kind]
    gate = threading.Event()
    budget = Watched(64 * MIB, 8 * MIB)
    errors: list[str] = []
    with backend_for(kind, Server(body, gate=gate, status=403), monkeypatch) as backend:
        charged(backend, budget)
        with trio.fail_after(60):  # (only ends a hang: no passing run comes near it)
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(_refused_read, backend, kind, f"a{i}.bin", errors)
                await budget.wait_granted(8)  # (the server holds every body's second half)
                assert budget.parts()["metadata_answers"] >= 8 * len(body)
                gate.set()
        await backend.aclose()
    assert len(errors) == 8 and all(marker in error for error in errors)  # (the bodies were read)
    assert budget.leased == 0 and budget.stats.lease_waits == 0


@KINDS
@pytest.mark.usefixtures("aws_env")
async def test_a_data_gets_error_body_is_not_read_without_room_free_now(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data GET's task holds a pinned block, so it may not wait for room (GETs waiting so
    could pin the whole budget, and nothing would free it): with no room free, its error's
    body is not read, and its status alone says what went wrong."""
    body, _ = ERRORS[kind]
    budget = Watched(16 * MIB, 8 * MIB)
    errors: list[str] = []
    with backend_for(kind, Server(body, status=403), monkeypatch) as backend:
        charged(backend, budget)
        hog = await budget.lease(0, BufferKind.SMALL_READ, extra=budget.max_lease)  # (pinned blocks, say)
        with trio.fail_after(60):  # (only ends a deadlock)
            await _refused_read(backend, kind, "a.bin", errors)
        hog.release()
        await backend.aclose()
    assert len(errors) == 1 and errors[0].endswith("access denied (403)"), errors  # (no word of the store's)
    assert budget.granted == 0 and budget.stats.lease_waits == 0


def test_a_data_gets_charge_never_waits_even_for_an_answer_charged_by_mistake() -> None:
    """A data GET's charge (waits=False) lets only optional answers in; one charged as a
    listing's would be, finding no room, ends the GET with one line instead of a wait that a
    budget full of pinned blocks might never end."""
    from modelfs.backends import answers

    budget = MemoryCache(4 * MIB, MIB)
    charged = AnswerBudget(budget, answers.Cost(1, 0, 0), "s3://bkt")

    async def run_blocking(fn: Callable[..., object], *args: object) -> object:
        return await trio.to_thread.run_sync(fn, *args)

    def read_answer() -> str:
        answers.begin(MIB, MIB)
        return "parsed"

    async def main() -> None:
        hog = await budget.lease(0, BufferKind.SMALL_READ, extra=budget.max_lease)  # (pinned blocks, say)
        charge = charged.charge(waits=False)
        try:
            with trio.fail_after(60), pytest.raises(BackendError, match="may not wait for room"):  # (only ends a hang)
                await charge.call(run_blocking, read_answer)
        finally:
            charge.release()
            hog.release()
        assert budget.leased == 0 and budget.stats.lease_waits == 0

    trio.run(main)
