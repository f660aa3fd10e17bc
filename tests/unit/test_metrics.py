"""/metrics scrapes: the snapshot is taken on the trio thread, never from live state in the metrics thread."""

from __future__ import annotations

import gzip
import http.client
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from modelfs.backends.memory import MemoryBackend, ramp
from modelfs.metrics import MetricsServer, MetricsSnapshot, ModelfsCollector, on_trio_thread, serve_metrics
from modelfs.testing.fakegcs import free_port

from .conftest import BS, StoreFactory, ref_for
from .test_operations import build


async def test_a_scrape_from_another_thread_snapshots_on_the_trio_thread(make_store: StoreFactory) -> None:
    """prometheus-client calls collect() in its own thread; the stats (which iterate live dicts
    such as the memory cache's blocks and the open files) are computed on the trio thread, while
    trio tasks keep changing them, and the exposition carries the values of that one snapshot."""
    backend = MemoryBackend()
    data = ramp(8 * BS, seed=3)
    backend.put("model.bin", data)
    ops = await build(make_store, backend)
    trio_thread = threading.get_ident()
    taken_on: list[int] = []

    def snapshot() -> MetricsSnapshot:
        taken_on.append(threading.get_ident())
        return ops.metrics_snapshot()

    registry = CollectorRegistry()
    registry.register(ModelfsCollector(on_trio_thread(snapshot), "memory"))
    ref_fh = ops.files.open(ref_for(backend, "model.bin"))
    scrapes: list[bytes] = []
    async with trio.open_nursery() as nursery:

        async def churn() -> None:  # reads (new blocks, errors counted) while the scrapes run
            for offset in range(0, len(data), BS // 2):
                assert bytes(await ops.files.read(ref_fh, offset, BS // 2)) == data[offset : offset + BS // 2]
                ops.errors[f"E{offset % 7}"] += 1
                await trio.lowlevel.checkpoint()

        nursery.start_soon(churn)
        for _ in range(5):
            scrapes.append(await trio.to_thread.run_sync(generate_latest, registry))
    assert taken_on and set(taken_on) == {trio_thread}
    text = scrapes[-1].decode()
    assert "modelfs_backend_requests_total" in text and "modelfs_read_latency_seconds_bucket" in text
    ops.files.release(ref_fh)


def test_a_scrape_after_the_trio_run_reports_nothing() -> None:
    """A scrape racing the unmount gets no families (not an exception, not a hang)."""

    async def main() -> ModelfsCollector:
        def boom() -> MetricsSnapshot:
            raise AssertionError("must not run after the trio run ended")

        return ModelfsCollector(on_trio_thread(boom), "memory")

    collector = trio.run(main)
    assert list(collector.collect()) == []


class _OneGauge:
    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("modelfs_test_up", "A gauge for the server tests", value=1)


def _serve(**limits: Any) -> tuple[MetricsServer, int]:
    port = free_port()
    return serve_metrics(f"127.0.0.1:{port}", _OneGauge(), **limits), port  # type: ignore[arg-type]


def _idle(port: int, sent: bytes = b"GET /metrics HTTP/1.1\r\n") -> socket.socket:
    """A connection that sends part of a request (or nothing) and then waits."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if sent:
        sock.sendall(sent)
    return sock


def _closed_by_server(sock: socket.socket, within: float = 10.0) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within ``within`` seconds: bytes it sends are kept."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def _scrape(port: int, **headers: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def test_the_metrics_server_caps_its_connections() -> None:
    """Idle connections beyond the cap are closed at once, with no thread each; once the
    held ones go, a scrape is served as before (the same app: content type, gzip)."""
    before = threading.active_count()
    server, port = _serve(timeout=60.0, max_connections=4)  # (the test never waits for the timeout)
    held: list[socket.socket] = []
    try:
        held = [_idle(port) for _ in range(4)]
        extra = [_idle(port) for _ in range(20)]
        for sock in extra:  # each closed as it is accepted: so the four before it have their threads
            assert _closed_by_server(sock)
            sock.close()
        assert threading.active_count() - before <= 4 + 1  # a thread per held connection, and the accept loop
        for sock in held:  # their requests end (EOF): the server closes them and frees their slots
            sock.shutdown(socket.SHUT_WR)
            assert _closed_by_server(sock)
        status, content_type, body = _scrape(port)
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert b"modelfs_test_up 1.0" in body
        status, _, body = _scrape(port, **{"Accept-Encoding": "gzip"})
        assert status == 200 and b"modelfs_test_up 1.0" in gzip.decompress(body)
    finally:
        for sock in held:
            sock.close()
        server.shutdown()


def test_the_metrics_server_drops_a_request_not_read_in_time() -> None:
    """A half-sent request, a silent connection and one that sends a byte now and then are
    all closed within the timeout (of the whole request, not each read); then a scrape works."""
    server, port = _serve(timeout=0.3, max_connections=4)
    socks: list[socket.socket] = []
    try:
        socks = [_idle(port), _idle(port, b""), _idle(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")]
        trickle = _idle(port, b"GET /metrics HTTP/1.1\r\n")
        socks.append(trickle)
        for _ in range(2000):  # a header byte at a time, each well within a per-read timeout of 0.3 s
            if select.select([trickle], [], [], 0.05)[0]:
                break  # the server closed it (or, without a deadline, would never)
            trickle.sendall(b"X")
        else:
            raise AssertionError("a request sent a byte at a time was never cut off")
        for sock in socks:
            assert _closed_by_server(sock)
        status, _, body = _scrape(port)
        assert status == 200 and b"modelfs_test_up 1.0" in body
    finally:
        for sock in socks:
            sock.close()
        server.shutdown()


def test_the_metrics_server_drops_an_oversized_request() -> None:
    """Headers past the request budget (64 KiB) are not read and not answered."""
    server, port = _serve(timeout=10.0, max_connections=4)
    sock = _idle(port, b"")
    try:
        request = b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 10_000) for i in range(10))
        try:
            sock.sendall(request + b"\r\n")
        except OSError:
            pass  # (the server closed it while we sent: a reset)
        response = b""
        try:
            while chunk := sock.recv(65536):
                response += chunk
        except ConnectionResetError:
            pass
        assert not response.startswith(b"HTTP/1.0 200"), response[:100]
        assert _scrape(port)[0] == 200
    finally:
        sock.close()
        server.shutdown()
