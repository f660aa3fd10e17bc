"""Prometheus metrics, read from the daemon's own counters at scrape time.

Nothing on the read path talks to prometheus-client: the layers keep plain counters (see
``ModelFS.stats()``) and this collector turns a snapshot of them into metric families when
``/metrics`` is scraped. The HTTP server is prometheus-client's, in its own threads; they
never read the daemon's live state (dicts that trio tasks change while a scrape iterates
them): a scrape asks the trio thread for a :class:`MetricsSnapshot` (:func:`on_trio_thread`)
and formats that copy. See docs/concurrency.md.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

import trio

__all__ = ["LatencyHistogram", "MetricsSnapshot", "ModelfsCollector", "on_trio_thread", "serve_metrics", "parse_addr"]

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
                "modelfs_tier_fallbacks", "Blocks read from the origin because the tier failed them", labels=["reason"]
            )
            for reason, n in sorted(tier["fallback_reasons"].items()):
                fallbacks.add_metric([reason], n)
            yield fallbacks
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


def serve_metrics(addr: str, collector: ModelfsCollector) -> WSGIServer:
    """Serve ``/metrics`` on ``addr`` from a daemon thread; returns the server (call shutdown())."""
    from prometheus_client import CollectorRegistry, start_http_server

    host, port = parse_addr(addr)
    registry = CollectorRegistry()
    registry.register(collector)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
