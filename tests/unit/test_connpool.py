"""The shared connection pool (backends/connpool.py): which GETs a stop reaches."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.backends.connpool import ConnectionPool, InFlight


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
    with pytest.raises(ConnectionAbortedError):  # what GET 2 read after the stop does not count
        pool.track(second, sock, False)
    second.close()


def test_a_stop_under_tls_never_hands_encrypted_records_to_a_reader(tmp_path: Path) -> None:
    """The stop shuts a TLS GET's socket down while the body's records are queued on it: what
    the reader still gets is the plaintext (or nothing), never the records themselves, and the
    GET counts as failed either way."""
    from modelfs.testing.nginx import make_ca

    ca, cert, key = make_ca(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    body = bytes(range(256)) * 128  # 32 KiB: two TLS records
    release = threading.Event()
    listening = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listening.accept()
        with server_tls.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)
            tls.sendall(body)
            release.wait(60)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_tls = ssl.create_default_context(cafile=str(ca))
    sock = client_tls.wrap_socket(socket.create_connection(listening.getsockname()), server_hostname="127.0.0.1")
    try:
        sock.sendall(b"x")
        in_flight = InFlight()
        in_flight.enter(sock)
        # Wait until the records are queued on the socket (not yet decrypted): readable only
        # once at least the body's length is there.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, len(body))
        assert select.select([sock], [], [], 60)[0]
        in_flight.abort()
        got = bytearray()
        buf = bytearray(len(body))
        with contextlib.suppress(OSError):
            while n := sock.recv_into(buf):
                got += buf[:n]
        assert bytes(got) == body[: len(got)]
        with pytest.raises(ConnectionAbortedError):
            in_flight.leave(sock)
    finally:
        release.set()
        sock.close()
        thread.join(10)
        listening.close()
