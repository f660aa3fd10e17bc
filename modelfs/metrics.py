"""Prometheus metrics, read from the daemon's own counters at scrape time.

Nothing on the read path talks to prometheus-client: the layers keep plain counters (see
``ModelFS.stats()``) and this collector turns a snapshot of them into metric families when
``/metrics`` is scraped. The HTTP server (:class:`MetricsServer`, prometheus-client's WSGI
app) serves each connection in its own thread; they never read the daemon's live state
(dicts that trio tasks change while a scrape iterates them): a scrape asks the trio thread
for a :class:`MetricsSnapshot` (:func:`on_trio_thread`) and formats that copy. See
docs/concurrency.md.
"""

from __future__ import annotations

import bisect
import io
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import trio

__all__ = [
    "LatencyHistogram",
    "MetricsServer",
    "MetricsSnapshot",
    "ModelfsCollector",
    "on_trio_thread",
    "serve_metrics",
    "parse_addr",
]

T = TypeVar("T")

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistogram:
    """Counts per bucket, a sum and a count: cheap enough for every read()."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        total = 0
        for bound, n in zip(self.buckets, self.counts[:-1], strict=True):
            total += n
            out.append((repr(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT`` for 127.0.0.1) → (host, port); raises ValueError."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass(frozen=True)
class MetricsSnapshot:
    """Everything one scrape reports, copied on the trio thread (``ModelFS.metrics_snapshot``)."""

    stats: Mapping[str, Any]  # ModelFS.stats(): plain values and fresh dicts, nothing shared
    latency_buckets: list[tuple[str, int]]  # cumulative counts of read() latency, by upper bound
    latency_sum: float


def on_trio_thread(fn: Callable[[], T]) -> Callable[[], T | None]:
    """``fn`` made callable from any thread: it runs on the trio thread this is called on.

    The caller blocks until trio runs it (between two of its tasks' steps, so it sees a
    consistent state); None once the trio run is over (a scrape during unmount).
    """
    token = trio.lowlevel.current_trio_token()

    def call() -> T | None:
        try:
            return trio.from_thread.run_sync(fn, trio_token=token)
        except trio.RunFinishedError:
            return None

    return call


class ModelfsCollector:
    """A prometheus-client collector over a snapshot function (called in the metrics thread)."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot | None], backend: str) -> None:
        self._snapshot = snapshot
        self._backend = backend

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snap = self._snapshot()
        if snap is None:
            return
        s = snap.stats
        b = self._backend

        def counter(name: str, doc: str, value: float, **labels: str) -> Any:
            family = CounterMetricFamily(name, doc, labels=list(labels))
            family.add_metric(list(labels.values()), value)
            return family

        yield counter("modelfs_backend_requests", "Ranged GETs sent to the backend", s["backend_gets"], backend=b)
        yield counter("modelfs_backend_bytes", "Bytes fetched from the backend", s["backend_bytes"], backend=b)
        fetches = CounterMetricFamily("modelfs_backend_fetches", "Ranged GETs by cause", labels=["backend", "cause"])
        fetches.add_metric([b, "demand"], s["demand_gets"])
        fetches.add_metric([b, "prefetch"], s["prefetch_gets"])
        yield fetches
        tier = s.get("tier")
        if tier:  # --cache-url: where block bytes came from, and why the tier was skipped
            source = CounterMetricFamily(
                "modelfs_tier_bytes",
                "Block bytes by where they came from (a tier replica or the origin)",
                labels=["source"],
            )
            for url, replica in tier["replicas"].items():
                source.add_metric([url], replica["bytes"])
            source.add_metric(["origin-fallback"], tier["origin_bytes"])
            source.add_metric(["origin-bypass"], tier["bypass_bytes"])
            yield source
            fallbacks = CounterMetricFamily(
                "modelfs_tier_fallbacks",
                "Block GETs a tier replica failed (the block then went to its next replica or the origin)",
                labels=["reason"],
            )
            for reason, n in sorted(tier["fallback_reasons"].items()):
                fallbacks.add_metric([reason], n)
            yield fallbacks
            yield counter(
                "modelfs_tier_failovers",
                "Block GETs sent to the next replica in the block's order after one failed the block",
                tier.get("failovers", 0),
            )
        for kind in ("hits", "misses", "evictions"):
            family = CounterMetricFamily(f"modelfs_cache_{kind}", f"Block cache {kind} per tier", labels=["tier"])
            family.add_metric(["memory"], s[f"memory_{kind}"])
            if kind == "hits":
                family.add_metric(["disk"], s["disk_hits"])
            elif kind == "misses" and "disk_capacity" in s:
                family.add_metric(["disk"], s["disk_misses"])
            elif kind == "evictions" and "disk_capacity" in s:
                family.add_metric(["disk"], s["disk_evictions"])
            yield family
        if "disk_capacity" in s:
            yield counter(
                "modelfs_disk_cache_corrupt_blocks", "Disk blocks that failed their checks", s["disk_corrupt"]
            )
            yield GaugeMetricFamily("modelfs_disk_cache_bytes", "Disk cache bytes in use", value=s["disk_used"])
            yield GaugeMetricFamily("modelfs_disk_cache_capacity_bytes", "Disk cache cap", value=s["disk_capacity"])
            yield counter(
                "modelfs_disk_cache_write_errors", "Blocks that could not be written", s.get("disk_write_errors", 0)
            )
        yield GaugeMetricFamily(
            "modelfs_memory_cache_bytes", "Memory block bytes in use (cached, in flight)", value=s["memory_used"]
        )
        yield GaugeMetricFamily("modelfs_memory_cache_capacity_bytes", "Memory budget", value=s["memory_capacity"])
        parts = GaugeMetricFamily(
            "modelfs_memory_budget_bytes",
            "Memory budget in use by part (blocks, blocks in flight, pooled buffers, request buffers)",
            labels=["part"],
        )
        for part, value in dict(s.get("memory_parts") or {}).items():
            parts.add_metric([part], value)
        yield parts
        yield GaugeMetricFamily(
            "modelfs_reads_in_flight", "read() requests being served", value=s.get("reads_in_flight", 0)
        )
        yield GaugeMetricFamily(
            "modelfs_prefetch_window_bytes",
            "Largest read-ahead window of an open file",
            value=s["prefetch_window_bytes"],
        )
        yield counter("modelfs_prefetch_resets", "Read-ahead runs restarted by a seek", s["prefetch_resets"])
        yield counter("modelfs_prefetch_refused", "Prefetches refused for lack of budget", s["prefetch_refused"])
        yield counter("modelfs_retries", "Backend calls retried after a transient failure", s["retries"])
        errors = CounterMetricFamily("modelfs_errors", "Failed FUSE requests by errno", labels=["errno"])
        for name, n in sorted(dict(s["errors_by_errno"]).items()):
            errors.add_metric([name], n)
        yield errors
        yield GaugeMetricFamily("modelfs_open_handles", "Open file handles", value=s["open_handles"])
        yield counter("modelfs_read_bytes", "Bytes returned to FUSE read requests", s["read_bytes"])
        # rate(loop CPU) / rate(read bytes): the serialized CPU per byte, whose inverse is one mount's ceiling
        yield counter("modelfs_event_loop_cpu_seconds", "CPU time of the event-loop (trio) thread", s["loop_cpu_s"])
        yield counter("modelfs_daemon_cpu_seconds", "CPU time of the whole daemon (all threads)", s["daemon_cpu_s"])
        latency = HistogramMetricFamily("modelfs_read_latency_seconds", "Latency of read() requests")
        latency.add_metric([], snap.latency_buckets, sum_value=snap.latency_sum)
        yield latency


REQUEST_TIMEOUT = 10.0  # seconds to read a whole request (a scrape is one short GET), and for each write
MAX_CONNECTIONS = 16  # connections served at once; more are closed as soon as they are accepted
MAX_REQUEST_BYTES = 64 * 1024  # request line and headers; a scrape's are well under 1 KiB


class _RequestReader(io.RawIOBase):
    """A connection's reads, all within one deadline and a byte budget: one short request.

    A per-recv socket timeout alone lets a client that sends a byte now and then hold its
    thread for ever; this one is cut off ``timeout`` seconds after it was accepted.
    """

    def __init__(self, sock: socket.socket, timeout: float, limit: int) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = time.monotonic() + timeout
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not read in time")
        if self._left <= 0:
            raise ConnectionAbortedError("request too long")
        self._sock.settimeout(left)
        with memoryview(buffer) as view:
            n = self._sock.recv_into(view[: self._left])
        self._left -= n
        return n


class _ResponseWriter(io.BufferedIOBase):
    """Writes straight to the socket (as socketserver's own writer), each within the timeout."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self._timeout = timeout

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.settimeout(self._timeout)  # sendall: the timeout bounds the whole call
        self._sock.sendall(data)
        with memoryview(data) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()


class _Handler(WSGIRequestHandler):
    server: MetricsServer

    def setup(self) -> None:
        # Not StreamRequestHandler.setup: its makefile() readers would have no deadline.
        self.connection = self.request
        self.rfile = io.BufferedReader(_RequestReader(self.connection, self.server.timeout_s, MAX_REQUEST_BYTES))
        self.wfile = _ResponseWriter(self.connection, self.server.timeout_s)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """Log nothing per request (as prometheus-client's handler)."""


class MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most ``max_connections`` of them, each done within ``timeout``.

    prometheus-client's own server has neither bound: every idle or half-sent connection
    held a thread and its socket for ever (~26 KB each), so enough of them from anywhere
    that reaches the port would OOM-kill the mount. Beyond the cap a connection is closed
    as soon as it is accepted, with no thread. ``shutdown()`` stops accepting and closes the
    listening socket; it does not wait for the scrapes in flight (daemon threads: one may
    be waiting for the trio thread that calls it).
    """

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        # IPv6 as well as IPv4 (as prometheus-client's server picks the family).
        family, _, _, _, sockaddr = socket.getaddrinfo(*address, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.address_family = family
        self.timeout_s = timeout
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__((str(sockaddr[0]), address[1]), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug(
                "metrics: %d connections served already; closing one from %s", self.max_connections, client_address
            )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._slots.release()  # (the caller closes the connection)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._slots.release()  # before the close: a client that saw it may connect again at once
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out, sent too much or went away: not worth a traceback on stderr.
        # (The app's own errors are handled, as before, inside wsgiref's handler.)
        log.debug("metrics: connection from %s dropped: %s", client_address, sys.exc_info()[1])

    def shutdown(self) -> None:
        super().shutdown()
        self.server_close()


def serve_metrics(
    addr: str,
    collector: ModelfsCollector,
    *,
    timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> MetricsServer:
    """Serve ``/metrics`` on ``addr`` from a daemon thread; returns the server (call shutdown())."""
    from prometheus_client import CollectorRegistry, make_wsgi_app

    host, port = parse_addr(addr)
    registry = CollectorRegistry()
    registry.register(collector)
    server = MetricsServer((host, port), timeout, max_connections)
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, name="modelfs-metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
