"""Name lookups with a deadline, for the connections of connpool.py.

getaddrinfo has no timeout of its own: a resolver that does not answer holds the calling
thread for as long as resolv.conf's timeouts and attempts add up to (tens of seconds), past
--connect-timeout and --read-timeout. A connect waits for a lookup at most until its own
deadline (Resolver.resolve); the lookup goes on in a thread of its own.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Sequence

__all__ = ["RESOLVER", "Address", "Lookup", "NameNotResolved", "Resolver", "is_address", "numeric", "system_lookup"]

Address = tuple[int, tuple[object, ...]]  # (family, sockaddr), as getaddrinfo gives them
Lookup = Callable[[str, int], Sequence[Address]]


class NameNotResolved(OSError):
    """The resolver answered that a name has no address (or failed to look it up)."""


def system_lookup(host: str, port: int) -> list[Address]:
    """The system resolver's addresses of ``host`` (blocking, for as long as the resolver takes)."""
    # (socket.getaddrinfo looked up at each call, not bound at import: tests replace it)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def numeric(address: str, port: int) -> list[Address]:
    """An IP address's sockaddr (no lookup: AI_NUMERICHOST)."""
    infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


class _Pending:
    """One lookup in flight: its answer, and the events of the threads waiting for it."""

    def __init__(self) -> None:
        self.done = False
        self.addresses: list[Address] = []
        self.error: NameNotResolved | None = None
        self.waiters: list[threading.Event] = []


class Resolver:
    """Name lookups a connect waits for at most until its deadline.

    getaddrinfo has no timeout of its own: a resolver that does not answer holds the calling
    thread for as long as resolv.conf's timeouts and attempts add up to (tens of seconds),
    past --connect-timeout and --read-timeout. So each lookup runs in a daemon thread of its
    own and the connecting thread waits for it with a deadline (and wakes at a stop). One
    lookup per (host, port) at a time, however many connects want it: a dead resolver holds
    one thread per name, not one per attempt. Its own lock guards the pending lookups.
    """

    def __init__(self, lookup: Lookup = system_lookup) -> None:
        self._lookup = lookup
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], _Pending] = {}

    def resolve(
        self, host: str, port: int, timeout: float, wait: Callable[[threading.Event, float], None]
    ) -> list[Address]:
        """The addresses of ``host`` within ``timeout`` seconds: TimeoutError if the lookup takes
        longer (it goes on; the next connect waits for the same one), NameNotResolved if it fails.
        ``wait(event, timeout)`` waits (InFlight.wait: a stop wakes it and raises)."""
        if is_address(host):  # (an IP address: nothing to look up, no thread)
            return numeric(host, port)
        key = (host, port)
        wake = threading.Event()
        with self._lock:
            pending = self._pending.get(key)
            start = pending is None
            if pending is None:
                pending = self._pending[key] = _Pending()
            pending.waiters.append(wake)
        if start:
            try:
                threading.Thread(
                    target=self._run, args=(key, pending), name=f"modelfs-lookup {host}", daemon=True
                ).start()
            except RuntimeError as exc:  # (no thread to be had: the lookup fails, and is not left pending for ever)
                self._finish(key, pending, [], NameNotResolved(f"resolving {host}: {exc}"))
        try:
            wait(wake, timeout)
        finally:
            with self._lock:
                pending.waiters.remove(wake)
                done, addresses, error = pending.done, pending.addresses, pending.error
        if not done:
            raise TimeoutError(f"resolving {host} took more than {timeout:g} s")
        if error is not None:
            raise error
        return addresses

    def _run(self, key: tuple[str, int], pending: _Pending) -> None:
        try:
            addresses = list(self._lookup(*key))
            error = None if addresses else NameNotResolved(f"{key[0]} resolves to no address")
        except OSError as exc:
            addresses, error = [], NameNotResolved(f"resolving {key[0]}: {exc}")
        except Exception as exc:  # (a lookup function's bug: the connect fails, nothing hangs)
            addresses, error = [], NameNotResolved(f"resolving {key[0]}: {type(exc).__name__}: {exc}")
        self._finish(key, pending, addresses, error)

    def _finish(
        self, key: tuple[str, int], pending: _Pending, addresses: list[Address], error: NameNotResolved | None
    ) -> None:
        with self._lock:
            if self._pending.get(key) is pending:
                del self._pending[key]
            pending.done, pending.addresses, pending.error = True, addresses, error
            waiters = list(pending.waiters)
        for wake in waiters:
            wake.set()


# Every pool's unless given its own (tests): one lookup per name at a time in the process.
RESOLVER = Resolver()
