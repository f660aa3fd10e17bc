"""Kept-alive ``http.client`` connections to one host, for the GETs that fill block buffers.

The GCS media transport (gcs_media.py) and the cache tier's replicas (tiered.py) both read a
block's body straight into its buffer on a plain ``http.client`` connection; this is the one
pool they share. Connections are handed out LIFO (the most recently used one is the most
likely to still be open) and used by one worker thread at a time. An idle connection the
server closed meanwhile is noticed before it is reused, so a request is never silently sent
twice on a dead socket (which would hide real resets from the retry counters).

This is the one object here that worker threads share: its own lock guards the idle list,
the sockets of GETs in flight and the closed flag (docs/concurrency.md).
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import weakref
from collections import Counter

from modelfs.backends.private.httpclient_interim import InterimSkippingResponse
from modelfs.backends.private.httpclient_progress import progress_response

__all__ = ["ConnectionPool", "InFlight"]


def _connect_to_one(addresses: tuple[str, ...], port: int, timeout: float | None) -> socket.socket:
    """A TCP connection to the first of ``addresses`` that answers (as create_connection does
    with the addresses a name resolves to)."""
    error: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout)
        except OSError as exc:
            error = exc
    raise error or OSError("no address to connect to")


class _PinnedConnection(http.client.HTTPConnection):
    """A connection to ``host`` (its Host header) made to addresses checked beforehand."""

    def __init__(self, host: str, port: int, *, addresses: tuple[str, ...], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def connect(self) -> None:
        self.sock = _connect_to_one(self._addresses, self.port, self.timeout)


class _PinnedTLSConnection(http.client.HTTPSConnection):
    """The same over TLS: the certificate is checked for ``host`` (SNI too), not the address."""

    def __init__(
        self, host: str, port: int, *, addresses: tuple[str, ...], timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._addresses = addresses
        self._tls = context

    def connect(self) -> None:
        sock = _connect_to_one(self._addresses, self.port, self.timeout)
        try:
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


class InFlight:
    """The sockets of blocking GETs in flight, so a stop can shut them down (:meth:`abort`).

    Counted, not a set: a connection given back may be taken by another thread before the
    first one's :meth:`leave`, which must then not drop the second GET's entry. Its own lock
    guards the counts and the closed flag; worker threads enter and leave, the stop aborts.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: Counter[socket.socket] = Counter()
        self._opened: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # (see opened)
        self._closed = False
        self._aborted = False

    @property
    def closed(self) -> bool:
        """Whether the daemon is stopping (no GET may start)."""
        with self._lock:
            return self._closed

    def enter(self, sock: socket.socket) -> None:
        """A GET on ``sock`` starts; ConnectionAbortedError once the daemon is stopping."""
        with self._lock:
            if self._closed:
                raise ConnectionAbortedError("the daemon is stopping")
            self._sockets[sock] += 1

    def leave(self, sock: socket.socket) -> None:
        """The GET on ``sock`` is done (whatever its outcome). ConnectionAbortedError if the
        stop aborted GETs meanwhile: whatever this one read after that does not count."""
        with self._lock:
            self._sockets[sock] -= 1
            if self._sockets[sock] <= 0:
                del self._sockets[sock]
            aborted = self._aborted
        if aborted:
            raise ConnectionAbortedError("the daemon is stopping")

    def close(self) -> None:
        """No GET enters any more; those in flight finish."""
        with self._lock:
            self._closed = True

    def opened(self, sock: socket.socket) -> None:
        """A client library connected ``sock``: a stop shuts it down too, so a request still
        waiting for its response's headers (before :meth:`enter` can be called) ends then as
        well. Held weakly: a socket the library drops is forgotten."""
        with self._lock:
            if not self._aborted:
                self._opened.add(sock)
                return
        _shut_down(sock)

    def abort(self) -> None:
        """No GET enters any more, and those in flight end now: their sockets are shut down, so
        the worker threads blocked on them return (with an error) instead of at the read timeout."""
        with self._lock:
            self._closed = self._aborted = True
            active = [*self._sockets, *self._opened]
        for sock in active:
            _shut_down(sock)


def _shut_down(sock: socket.socket) -> None:
    try:
        # The plain socket's shutdown, also under TLS: SSLSocket.shutdown would first drop its
        # TLS state, and a thread still reading would then take the encrypted records queued
        # on the socket for the body.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class ConnectionPool:
    """Connections to ``host:port`` (TLS when ``ssl_context`` is given), at most ``max_idle`` kept.

    ``addresses``: connect to these IP addresses rather than to whatever ``host`` resolves to
    now (addresses the caller checked: see redirects.py); ``host`` still names the server.
    ``in_flight``: where GETs in flight are noted, shared by the pools of one transport so its
    abort reaches them all (also those on a pool it no longer keeps); else the pool's own.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int,
        ssl_context: ssl.SSLContext | None = None,
        addresses: tuple[str, ...] | None = None,
        in_flight: InFlight | None = None,
    ) -> None:
        self.host = host
        self._addresses = addresses
        self.port = port
        self.read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._ssl = ssl_context
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []
        # Sockets of the GETs in flight (the socket, not the connection: after a "Connection:
        # close" answer http.client drops conn.sock and only the response holds it).
        self._in_flight = in_flight if in_flight is not None else InFlight()
        self._closed = False
        self._retired = False
        # Every answer skips interim ones (103 Early Hints, say: see the shim) and is read
        # under the data path's progress rule from its first byte, headers included: the read
        # timeout alone bounds only the wait for one byte, so headers (or a body read through
        # http.client's buffered reader: TLS, chunked) dripped a byte at a time held a GET,
        # and the reader in D state, for as long as the server liked.
        self._response_class = progress_response(read_timeout, InterimSkippingResponse)

    @property
    def idle(self) -> list[http.client.HTTPConnection]:
        """The idle connections, most recently used last (a copy, for tests and stats)."""
        with self._lock:
            return list(self._idle)

    @staticmethod
    def dropped(conn: http.client.HTTPConnection) -> bool:
        """True if the server closed this idle connection (its socket reads EOF or has junk)."""
        if conn.sock is None:
            return True
        readable, _, _ = select.select([conn.sock], [], [], 0)
        return bool(readable)

    def take(self) -> http.client.HTTPConnection:
        """An idle connection the server has not closed, else a new one (OSError if none can be made)."""
        conn: http.client.HTTPConnection
        while True:
            with self._lock:
                if not self._idle:
                    break
                conn = self._idle.pop()
            if not self.dropped(conn):
                return conn
            conn.close()
        timeout = self._connect_timeout
        pinned = self._addresses
        if pinned is not None and self._ssl is not None:
            conn = _PinnedTLSConnection(self.host, self.port, addresses=pinned, timeout=timeout, context=self._ssl)
        elif pinned is not None:
            conn = _PinnedConnection(self.host, self.port, addresses=pinned, timeout=timeout)
        elif self._ssl is not None:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        conn.response_class = self._response_class
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self.read_timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def give_back(self, conn: http.client.HTTPConnection) -> None:
        """Keep ``conn`` for the next GET; only after a complete, checked body (else close it)."""
        with self._lock:
            if not self._closed and not self._retired and conn.sock is not None and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def finish(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """After a complete, checked response: keep ``conn`` if the body ended at a message
        boundary, else (more body than was read) close both."""
        if resp.isclosed():
            self.give_back(conn)
        else:
            resp.close()
            conn.close()

    def track(self, conn: http.client.HTTPConnection, sock: socket.socket | None, active: bool) -> None:
        """Note the socket of a GET starting (``active``) or done, so :meth:`abort` can reach it."""
        if sock is None:
            return
        if not active:
            self._in_flight.leave(sock)
            return
        try:
            self._in_flight.enter(sock)
        except ConnectionAbortedError:
            conn.close()
            raise

    def retire(self) -> None:
        """No longer wanted (not a stop): close the idle connections; a connection in use is
        closed when it is given back, and a GET may still take a new one."""
        with self._lock:
            self._retired = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        """Close the idle connections and keep no more; GETs in flight finish."""
        self._in_flight.close()
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def abort(self) -> None:
        """The daemon is stopping: shut down the sockets of the GETs in flight (see
        :meth:`InFlight.abort`) and start no new GET."""
        self._in_flight.abort()
        self.close()
