"""The fault proxy itself: each fault looks to a client like the failure it stands for."""

from __future__ import annotations

import http.client
import json
import time
import uuid

import pytest

from modelfs.testing.fakegcs import FakeGCS
from modelfs.testing.faultproxy import FAULT_KINDS, FaultProxy, fault_proxy

DATA = bytes(range(256)) * 1024  # 256 KiB


@pytest.fixture
def proxied(gcs: FakeGCS) -> tuple[FaultProxy, str]:
    bucket = f"p-{uuid.uuid4().hex[:12]}"
    gcs.create_bucket(bucket)
    gcs.upload(bucket, "x.bin", DATA)
    with fault_proxy(gcs.url, seed=7, stall_seconds=30) as proxy:
        yield proxy, f"/download/storage/v1/b/{bucket}/o/x.bin?alt=media"


def _get(proxy: FaultProxy, path: str, rng: str = "bytes=1000-200999") -> tuple[int, bytes] | str:
    """(status, body), or the name of the exception the client saw."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=1)
    try:
        conn.request("GET", path, headers={"Range": rng})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def test_passes_ranges_through_and_keeps_connections_alive(proxied: tuple[FaultProxy, str]) -> None:
    proxy, path = proxied
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    try:
        for start in (0, 5, 100_000):
            conn.request("GET", path, headers={"Range": f"bytes={start}-{start + 9999}"})
            resp = conn.getresponse()
            assert resp.status == 206
            assert resp.read() == DATA[start : start + 10000]
    finally:
        conn.close()
    counts = proxy.counters()
    assert counts["requests"] == counts["media_requests"] == 3 and counts["faults"] == 0


def test_each_fault_kind(proxied: tuple[FaultProxy, str]) -> None:
    proxy, path = proxied
    seen: dict[str, object] = {}
    for kind in FAULT_KINDS:
        proxy.force(kind)
        seen[kind] = _get(proxy, path)
    assert seen["503"][0] == 503 and json.loads(seen["503"][1])["error"]["code"] == 503  # type: ignore[index]
    assert seen["429"][0] == 429  # type: ignore[index]
    assert seen["reset_before_body"] in ("ConnectionResetError", "RemoteDisconnected", "BadStatusLine")
    assert seen["reset_mid_body"] in ("ConnectionResetError", "IncompleteRead")
    assert seen["stall"] in ("TimeoutError", "timeout")
    assert seen["truncate"] == "IncompleteRead"
    assert proxy.faults_by_kind() == {kind: 1 for kind in FAULT_KINDS}
    deadline = time.monotonic() + 10
    while proxy.counters()["stall_client_gave_up"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert _get(proxy, path) == (206, DATA[1000:201000])  # and it works again


def test_rate_applies_to_media_only_unless_listings_asked(proxied: tuple[FaultProxy, str]) -> None:
    proxy, path = proxied
    proxy.configure(rate=1.0, kinds=["503"])
    listing = path.split("/download")[0] + "/storage/v1/b"
    assert _get(proxy, listing)[0] == 200  # type: ignore[index]
    assert _get(proxy, path)[0] == 503  # type: ignore[index]
    proxy.configure(fault_listings=True)
    assert _get(proxy, listing)[0] == 503  # type: ignore[index]
    proxy.configure(rate=0.0)
    assert _get(proxy, path)[0] == 206  # type: ignore[index]
    with pytest.raises(ValueError):
        proxy.configure(kinds=["meteor"])


def test_down_refuses_then_recovers(proxied: tuple[FaultProxy, str]) -> None:
    proxy, path = proxied
    proxy.down = True
    assert _get(proxy, path) in ("ConnectionResetError", "RemoteDisconnected", "BrokenPipeError")
    assert proxy.counters()["refused_down"] >= 1
    proxy.down = False
    assert _get(proxy, path) == (206, DATA[1000:201000])


def test_stop_ends_a_stall(gcs: FakeGCS) -> None:
    """stop() does not wait for a stalled response to run its course."""
    bucket = f"p-{uuid.uuid4().hex[:12]}"
    gcs.create_bucket(bucket)
    gcs.upload(bucket, "y", DATA)
    proxy = FaultProxy(gcs.url, stall_seconds=600).start()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    try:
        proxy.force("stall")
        conn.request("GET", f"/download/storage/v1/b/{bucket}/o/y?alt=media")
        resp = conn.getresponse()
        resp.read(1)
    finally:
        proxy.stop()
        conn.close()
    assert not proxy._thread.is_alive()


def test_corrupt_flips_one_byte_of_the_paths_asked_for_and_keeps_the_host() -> None:
    """``corrupt`` (asked for by name, never among the default kinds) relays the answer whole
    but for one flipped byte: other bytes of the right length. ``fault_paths`` picks the
    requests it strikes; ``keep_host`` hands the upstream the client's Host (S3 signs it)."""
    from modelfs.testing.servers import QuietHandler, loopback_http

    hosts: list[str | None] = []

    class Upstream(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hosts.append(self.headers.get("Host"))
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
            self.wfile.write(DATA)

    assert "corrupt" not in FAULT_KINDS
    with loopback_http(Upstream) as url:
        with fault_proxy(url, rate=1.0, kinds=["corrupt"], fault_paths=r"/bad$", keep_host=True, seed=1) as proxy:
            status, body = _get(proxy, "/bad")  # type: ignore[misc]
            assert status == 200 and len(body) == len(DATA)
            assert sum(a != b for a, b in zip(body, DATA, strict=True)) == 1
            assert _get(proxy, "/good") == (200, DATA)
            assert proxy.counters()["fault_corrupt"] == 1
            assert hosts == [f"127.0.0.1:{proxy.port}"] * 2
        with fault_proxy(url) as proxy:
            assert _get(proxy, "/bad") == (200, DATA)
            assert hosts[-1] == url.removeprefix("http://")
