"""urllib3's ``HTTPConnection._new_conn``, ``_dns_host``, ``timeout``, ``socket_options`` and
``source_address``: how a urllib3 connection (botocore's for S3, requests' for GCS behind a
proxy) opens its socket.

``_new_conn`` calls ``urllib3.util.connection.create_connection``, whose ``getaddrinfo`` has no
timeout: a resolver that does not answer held the request (an S3 GET, a listing, the mount's
first check of the bucket) for as long as resolv.conf's timeouts added up to, past the
connect timeout. :func:`bounded_new_conn` is a ``_new_conn`` that opens the socket with
``connpool.open_socket`` instead: the lookup and the connect together within the connection's
connect timeout, abortable by a stop. Only the socket is made here: urllib3 still wraps it in
TLS for the connection's host name (SNI and the certificate check are the name's, not the
address's), and talks to a proxy or tunnels through it as before. Failures are urllib3's own
exceptions, as ``_new_conn`` raises them, so botocore and requests map them as they always
did. Checked with urllib3 2.x.
"""

from __future__ import annotations

import inspect
import socket
from collections.abc import Callable
from typing import Any

from modelfs.backends.private import PrivateAPIChanged

__all__ = ["bounded_new_conn", "verify"]


def bounded_new_conn(base: type, in_flight: Any) -> Callable[[Any], socket.socket]:
    """A ``_new_conn`` for a subclass of urllib3 connection class ``base``, whose sockets
    ``in_flight`` (a connpool.InFlight) sees while they connect: a stop ends a lookup or a
    connect in progress."""
    from modelfs.backends.connpool import open_socket
    from modelfs.backends.resolver import NameNotResolved

    def _new_conn(self: Any) -> socket.socket:
        from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

        timeout = self.timeout
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            # No connect timeout given (urllib3's default sentinel, or None): every caller here
            # gives one; without, urllib3 connects as it always did.
            return base._new_conn(self)  # type: ignore[attr-defined,no-any-return]
        host = self._dns_host.strip("[]")  # (an IPv6 literal, as create_connection strips it)
        options = list(self.socket_options or ())
        source = self.source_address

        def prepare(sock: socket.socket) -> None:
            for option in options:
                sock.setsockopt(*option)
            if source is not None:
                sock.bind(source)

        try:
            sock = open_socket(host, self.port, float(timeout), in_flight, prepare=prepare)
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. ({exc})") from exc
        except NameNotResolved as exc:
            raise NameResolutionError(self.host, self, socket.gaierror(str(exc))) from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
        sock.settimeout(float(timeout))  # (the TLS handshake's; the pool sets the read timeout after)
        return sock

    return _new_conn


def verify() -> None:
    """Raise PrivateAPIChanged unless urllib3's connections still open their socket in
    ``_new_conn`` with the attributes used here."""
    import urllib3.connection

    for cls in (urllib3.connection.HTTPConnection, urllib3.connection.HTTPSConnection):
        try:
            source = inspect.getsource(cls.connect)
        except (OSError, TypeError):
            raise PrivateAPIChanged(f"urllib3's {cls.__name__}.connect has no source to check") from None
        if "self._new_conn()" not in source:
            raise PrivateAPIChanged(f"urllib3's {cls.__name__}.connect no longer opens its socket by _new_conn")
    base = urllib3.connection.HTTPConnection
    source = inspect.getsource(base._new_conn)
    if "self._dns_host" not in source or "create_connection" not in source:
        raise PrivateAPIChanged("urllib3's HTTPConnection._new_conn no longer connects to _dns_host")
    conn = base("example.test", 80, timeout=1.0)
    for name in ("_dns_host", "timeout", "socket_options", "source_address", "port", "host"):
        if not hasattr(conn, name):
            raise PrivateAPIChanged(f"a urllib3 HTTPConnection has no {name}")
