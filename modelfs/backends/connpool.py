"""Kept-alive ``http.client`` connections to one host, for the GETs that fill block buffers.

The GCS media transport (gcs_media.py) and the cache tier's replicas (tiered.py) both read a
block's body straight into its buffer on a plain ``http.client`` connection; this is the one
pool they share. Connections are handed out LIFO (the most recently used one is the most
likely to still be open) and used by one worker thread at a time. An idle connection the
server closed meanwhile is noticed before it is reused, so a request is never silently sent
twice on a dead socket (which would hide real resets from the retry counters). A new
connection's name lookup and connect together take at most the connect timeout (the lookup
waited for with a deadline: resolver.py), and a stop ends both (InFlight.abort).

This is the one object here that worker threads share: its own lock guards the idle list,
the sockets of GETs in flight and the closed flag (docs/concurrency.md).
"""

from __future__ import annotations

import errno
import http.client
import math
import os
import select
import socket
import ssl
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence

from modelfs.backends.private.httpclient_interim import InterimSkippingResponse
from modelfs.backends.private.httpclient_progress import progress_response
from modelfs.backends.resolver import RESOLVER, Address, Resolver, numeric

__all__ = ["ConnectionPool", "InFlight", "one_connection", "open_socket"]


def open_socket(
    host: str,
    port: int,
    timeout: float,
    in_flight: InFlight,
    *,
    resolver: Resolver | None = None,
    addresses: tuple[str, ...] | None = None,
    prepare: Callable[[socket.socket], None] | None = None,
) -> socket.socket:
    """A TCP socket connected to ``host`` within ``timeout`` seconds, its name lookup included
    (socket.create_connection bounds neither the lookup nor all addresses together).

    ``addresses``: IP addresses to connect to instead of looking ``host`` up. ``prepare``
    sets a new socket's options before it connects. TimeoutError past the timeout, OSError if
    the name does not resolve or no address answers, ConnectionAbortedError at a stop."""
    deadline = time.monotonic() + timeout
    if addresses is not None:
        found = [a for address in addresses for a in numeric(address, port)]
    else:
        found = (resolver or RESOLVER).resolve(host, port, timeout, in_flight.wait)
    return _connect_to_one(found, deadline, in_flight, prepare)


def one_connection(
    host: str,
    port: int | None,
    *,
    timeout: float,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> http.client.HTTPConnection:
    """An ``http.client`` connection, not pooled, whose connect (name lookup included) takes
    at most ``connect_timeout`` seconds; then each wait for a byte at most ``timeout``. Over
    TLS the certificate is checked for ``host`` (and SNI sent for it), not for the address."""
    in_flight = InFlight()
    port = port or (443 if ssl_context is not None else 80)

    def connected(within: float) -> socket.socket:
        sock = open_socket(host, port, within, in_flight)
        sock.settimeout(timeout)
        return sock

    if ssl_context is not None:
        return _TLSConnection(
            host, port, timeout=connect_timeout, context=ssl_context, open_socket=connected, opened=in_flight.opened
        )
    return _Connection(host, port, timeout=connect_timeout, open_socket=connected)


def _connect_to_one(
    addresses: Sequence[Address],
    deadline: float,
    in_flight: InFlight,
    prepare: Callable[[socket.socket], None] | None = None,
) -> socket.socket:
    """A TCP connection to the first of ``addresses`` that answers by ``deadline`` (monotonic),
    as create_connection does but within one deadline for all of them, and abortable.

    An address with others after it gets half the time left (as curl does): one that drops
    SYNs (a dual-stack name whose IPv6 route is black-holed) must not spend the whole
    deadline, or the name is never reached, where create_connection reached it one connect
    timeout later."""
    error: OSError | None = None
    for i, (family, sockaddr) in enumerate(addresses):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if i < len(addresses) - 1:
            left /= 2
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if prepare is not None:
                prepare(sock)
            _connect(sock, sockaddr, left, in_flight)
        except ConnectionAbortedError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            error = exc
        else:
            # (the TLS handshake that follows has what is left of the deadline, not the
            # address's half of it)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            return sock
    raise error or TimeoutError("no connection within the connect timeout")


def _connect(sock: socket.socket, sockaddr: tuple[object, ...], timeout: float, in_flight: InFlight) -> None:
    """Connect ``sock`` within ``timeout``; a stop (InFlight.abort) ends the wait at once."""
    in_flight.connecting(sock)  # (ConnectionAbortedError once the daemon is stopping)
    sock.setblocking(False)
    err = sock.connect_ex(sockaddr)
    if err == errno.EINPROGRESS:
        # An abort between connecting() and connect_ex shut down a socket that was not yet
        # connecting, which does not keep it from connecting: see the stop here instead.
        in_flight.check()
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        # (a shutdown by abort() wakes this poll: the kernel drops the SYN_SENT connection)
        if not poller.poll(max(1, math.ceil(timeout * 1000))):
            raise TimeoutError(f"no connection within {timeout:g} s")
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        in_flight.check()
    if err:
        raise OSError(err, os.strerror(err))
    sock.settimeout(timeout)


class _Connection(http.client.HTTPConnection):
    """A connection to ``host`` (its Host header) whose socket ``open_socket(timeout)`` makes."""

    def __init__(self, host: str, port: int, *, timeout: float, open_socket: Callable[[float], socket.socket]) -> None:
        super().__init__(host, port, timeout=timeout)
        self._open = open_socket
        self._within = timeout

    def connect(self) -> None:
        self.sock = self._open(self._within)


class _TLSConnection(http.client.HTTPSConnection):
    """The same over TLS: the certificate is checked for ``host`` (SNI too), not the address;
    ``opened(tls)`` before the handshake, so a stop ends a handshake in progress too."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        context: ssl.SSLContext,
        open_socket: Callable[[float], socket.socket],
        opened: Callable[[socket.socket], None],
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._open = open_socket
        self._within = timeout
        self._opened = opened
        self._tls = context

    def connect(self) -> None:
        sock = self._open(self._within)
        try:
            tls = self._tls.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
        except BaseException:
            sock.close()
            raise
        try:
            self._opened(tls)
            tls.do_handshake()
        except BaseException:
            tls.close()
            raise
        self.sock = tls


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
        self._waiting: set[threading.Event] = set()  # (see wait)
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

    def connecting(self, sock: socket.socket) -> None:
        """``sock`` is about to connect: a stop shuts it down (a connect in progress then fails
        at once, not at the connect timeout), as it does an opened one. ConnectionAbortedError
        if the daemon is stopping already."""
        with self._lock:
            if self._aborted:
                raise ConnectionAbortedError("the daemon is stopping")
            self._opened.add(sock)

    def check(self) -> None:
        """ConnectionAbortedError if the stop aborted GETs."""
        with self._lock:
            if self._aborted:
                raise ConnectionAbortedError("the daemon is stopping")

    def wait(self, wake: threading.Event, timeout: float) -> None:
        """Wait until ``wake`` is set or ``timeout`` passes (a name lookup); a stop sets it
        too, and then this raises ConnectionAbortedError."""
        with self._lock:
            if self._aborted:
                raise ConnectionAbortedError("the daemon is stopping")
            self._waiting.add(wake)
        try:
            wake.wait(max(0.0, timeout))
        finally:
            with self._lock:
                self._waiting.discard(wake)
        self.check()

    def abort(self) -> None:
        """No GET enters any more, and those in flight end now: their sockets are shut down, so
        the worker threads blocked on them return (with an error) instead of at the read
        timeout; so do connects in progress and waits for a name lookup."""
        with self._lock:
            self._closed = self._aborted = True
            active = [*self._sockets, *self._opened]
            waiting = list(self._waiting)
        for sock in active:
            _shut_down(sock)
        for wake in waiting:
            wake.set()


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
    Otherwise ``host`` is resolved for each new connection by ``resolver`` (see Resolver),
    the lookup and the connect together within the connect timeout.
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
        resolver: Resolver | None = None,
    ) -> None:
        self.host = host
        self._addresses = addresses
        self._resolver = resolver or RESOLVER
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

    def take(self, connect_timeout: float | None = None) -> http.client.HTTPConnection:
        """An idle connection the server has not closed, else a new one (OSError if none can be
        made within ``connect_timeout``, the pool's if None; ConnectionAbortedError at a stop)."""
        conn: http.client.HTTPConnection
        while True:
            with self._lock:
                if not self._idle:
                    break
                conn = self._idle.pop()
            if not self.dropped(conn):
                return conn
            conn.close()
        self._in_flight.check()
        timeout = self._connect_timeout if connect_timeout is None else min(connect_timeout, self._connect_timeout)
        if self._ssl is not None:
            conn = _TLSConnection(
                self.host,
                self.port,
                timeout=timeout,
                context=self._ssl,
                open_socket=self._open_socket,
                opened=self._in_flight.opened,
            )
        else:
            conn = _Connection(self.host, self.port, timeout=timeout, open_socket=self._open_socket)
        conn.response_class = self._response_class
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self.read_timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _open_socket(self, timeout: float) -> socket.socket:
        """A socket connected to the server within ``timeout`` seconds, its name lookup included."""
        return open_socket(
            self.host, self.port, timeout, self._in_flight, resolver=self._resolver, addresses=self._addresses
        )

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
