"""The shared connection pool (backends/connpool.py): which GETs a stop reaches."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from modelfs.backends.connpool import ConnectionPool


@pytest.fixture
def listener() -> Iterator[int]:
    """A loopback port that accepts connections and keeps them open (it never answers)."""
    server = socket.create_server(("127.0.0.1", 0))
    kept: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                kept.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in kept:
        conn.close()
    server.close()


def test_a_connection_reused_before_the_first_get_let_go_is_still_aborted(listener: int) -> None:
    """GET 1 gives its connection back; GET 2 takes it before GET 1's track(False): the stop
    must still reach GET 2's socket (it would otherwise wait out its read timeout)."""
    pool = ConnectionPool("127.0.0.1", listener, connect_timeout=5, read_timeout=30, max_idle=4)
    first = pool.take()
    sock = first.sock
    pool.track(first, sock, True)
    pool.give_back(first)
    second = pool.take()
    assert second is first  # the same kept-alive connection
    pool.track(second, sock, True)
    pool.track(first, sock, False)  # GET 1's late bookkeeping
    pool.abort()
    assert sock is not None
    sock.settimeout(5)
    assert sock.recv(1) == b""  # shut down by the abort, not left to its read timeout
    pool.track(second, sock, False)
    second.close()
