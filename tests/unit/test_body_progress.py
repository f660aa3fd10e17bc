"""A body that drips is a stall (backends/body.py ``Progress``): the read timeout alone bounds
only the wait for one byte, so a server sending a byte now and then held a GET forever.
Time here is a fake clock; the socket test's only real waits are its short read timeouts."""

from __future__ import annotations

import http.client
import socket
import threading

import pytest

from modelfs.backends.body import MIN_PROGRESS, Progress, read_exactly
from modelfs.backends.private import httpclient_body


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_too_few_bytes_in_a_read_timeout_is_a_stall_enough_is_not() -> None:
    clock = Clock()
    steady = Progress(30, clock)
    for _ in range(10):  # a slow but steady body: MIN_PROGRESS every 29 s
        clock.now += 29
        steady.add(MIN_PROGRESS)
    dripping = Progress(30, clock)
    clock.now += 29
    dripping.add(MIN_PROGRESS - 1)
    clock.now += 2  # the window closes with one byte too few
    with pytest.raises(TimeoutError, match="fewer than"):
        dripping.add(0)


def test_read_exactly_gives_up_on_a_dripping_body() -> None:
    clock = Clock()
    calls = 0

    def drip(dest: memoryview) -> int:
        nonlocal calls
        calls += 1
        clock.now += 11  # one byte every 11 s, each well inside a 30 s read timeout
        dest[0] = 7
        return 1

    with pytest.raises(TimeoutError):
        read_exactly(drip, memoryview(bytearray(1000)), Progress(30, clock))
    assert calls == 3  # at 33 s: 3 bytes in the first 30 s window


def test_a_body_received_straight_into_the_buffer_gives_up_on_drips_too() -> None:
    """recv_body_into reports every receive: a server that sends one byte per ask (the fake
    clock moves 11 s per byte) fails within the window, not after the whole body."""
    listener = socket.create_server(("127.0.0.1", 0))
    more = threading.Semaphore(0)
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            while not stop.is_set():
                if more.acquire(timeout=0.05):
                    conn.sendall(b"x")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    clock = Clock()
    progress = Progress(30, clock)

    def told(n: int) -> None:
        clock.now += 11
        progress.add(n)
        more.release()

    conn = http.client.HTTPConnection("127.0.0.1", listener.getsockname()[1], timeout=10)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        more.release()  # the first byte
        assert conn.sock is not None
        dest = bytearray(1000)
        with pytest.raises(TimeoutError, match="fewer than"):
            # A 0.1 s wait per byte for a whole chunk, then the byte is taken (a trickle).
            httpclient_body.recv_body_into(conn.sock, resp, memoryview(dest), 0.1, progress=told)
    finally:
        stop.set()
        conn.close()
        thread.join(10)
        listener.close()
