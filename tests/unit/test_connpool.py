"""The shared connection pool (backends/connpool.py): which GETs a stop reaches."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelfs.backends.connpool import ConnectionPool, InFlight
from modelfs.backends.resolver import Address, Resolver

from .blocked_lookups import BlockedResolver


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


@pytest.fixture
def blocked_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[BlockedResolver]:
    resolver = BlockedResolver("tier-0.test")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    yield resolver
    resolver.close()


def test_a_resolver_that_does_not_answer_fails_the_connect_at_its_timeout(
    listener: int, blocked_resolver: BlockedResolver
) -> None:
    """getaddrinfo has no timeout: the name lookup is part of the connect and bounded by its
    timeout, and a second connect meanwhile waits for the same lookup (one thread per name
    however many connects)."""
    pool = ConnectionPool("tier-0.test", listener, connect_timeout=0.2, read_timeout=30, max_idle=4)
    for _ in range(2):
        with pytest.raises(TimeoutError, match="resolving tier-0.test"):
            pool.take()
    assert blocked_resolver.calls == 1 and not blocked_resolver.freed_by_watchdog
    blocked_resolver.release.set()  # the resolver answers again: so do connects
    conn = pool.take()
    assert conn.sock is not None and conn.sock.getpeername()[1] == listener
    conn.close()
    pool.close()


def test_a_stop_ends_a_wait_for_a_name_lookup(listener: int, blocked_resolver: BlockedResolver) -> None:
    pool = ConnectionPool("tier-0.test", listener, connect_timeout=600, read_timeout=30, max_idle=4)
    thread, outcome = _take_in_thread(pool)
    thread.start()
    _until(lambda: blocked_resolver.calls == 1)
    pool.abort()
    thread.join(15)
    assert not blocked_resolver.freed_by_watchdog
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionAbortedError)


def _take_in_thread(pool: ConnectionPool) -> tuple[threading.Thread, list[BaseException | None]]:
    """A thread (not started) that takes a connection from ``pool`` and closes it; what it
    raised (None: it connected) lands in the list."""
    outcome: list[BaseException | None] = []

    def take() -> None:
        try:
            pool.take().close()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    return threading.Thread(target=take, daemon=True), outcome


def _until(cond: Callable[[], bool]) -> None:
    """Wait for another thread's progress (bounded: a hang becomes a failure)."""
    ready = threading.Event()
    for _ in range(20_000):
        if cond():
            return
        ready.wait(0.001)
    raise AssertionError("the condition never held")


def _syn_sent_to(port: int) -> bool:
    """Whether a loopback connect to ``port`` is in progress (SYN_SENT in /proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[2].endswith(f":{port:04X}") and fields[3] == "02":
                return True
    return False


def test_a_stop_ends_a_connect_in_progress() -> None:
    """A listener whose accept queue is full drops SYNs: the connect waits (here up to its
    600 s timeout). abort() must end it at once, as it ends GETs in flight."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)  # one connection fills the queue; nothing accepts it
    port = server.getsockname()[1]
    first = socket.create_connection(("127.0.0.1", port), timeout=10)
    pool = ConnectionPool("127.0.0.1", port, connect_timeout=600, read_timeout=30, max_idle=4)
    thread, outcome = _take_in_thread(pool)
    try:
        thread.start()
        _until(lambda: _syn_sent_to(port))
        pool.abort()
        thread.join(15)
        assert len(outcome) == 1 and isinstance(outcome[0], OSError), outcome
        with pytest.raises(ConnectionAbortedError):  # and none starts after the stop
            pool.take()
    finally:
        server.close()  # (without the fix: the SYN's next retry is refused, the thread ends)
        first.close()
        thread.join(30)


def test_a_name_whose_first_address_drops_syns_is_reached_at_its_second() -> None:
    """A dual-stack name whose first address is black-holed (an IPv6 route that drops SYNs,
    here a listener with a full accept queue) and whose second answers: the connect must
    reach the second within the connect timeout, not spend all of it on the first (as
    create_connection did not: it gave each address the whole timeout)."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead.listen(0)  # one connection fills the queue; SYNs to it are dropped from then on
    dead_port = dead.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", dead_port), timeout=10)
    good = socket.create_server(("127.0.0.1", 0))
    good_port = good.getsockname()[1]

    def lookup(host: str, port: int) -> list[Address]:
        return [(socket.AF_INET, ("127.0.0.1", dead_port)), (socket.AF_INET, ("127.0.0.1", good_port))]

    pool = ConnectionPool("dual.test", 443, connect_timeout=2.0, read_timeout=30, max_idle=4, resolver=Resolver(lookup))
    try:
        conn = pool.take()  # (bounded by its 2 s connect timeout)
        assert conn.sock is not None and conn.sock.getpeername()[1] == good_port
        conn.close()
    finally:
        pool.close()
        filler.close()
        dead.close()
        good.close()


def test_a_lookup_thread_that_cannot_start_fails_the_connect_and_is_not_left_pending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No thread to be had for a lookup ("can't start new thread"): its pending entry stayed,
    so every later connect to that name waited for a lookup no one ran and timed out. Now
    the connect fails at once with that reason, and the next one looks the name up."""
    resolver = Resolver(lambda host, port: [(socket.AF_INET, ("127.0.0.1", port))])
    in_flight = InFlight()
    start = threading.Thread.start

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(OSError, match="can't start new thread"):
        resolver.resolve("name.test", 80, 600.0, in_flight.wait)
    monkeypatch.setattr(threading.Thread, "start", start)
    assert resolver.resolve("name.test", 80, 600.0, in_flight.wait) == [(socket.AF_INET, ("127.0.0.1", 80))]
