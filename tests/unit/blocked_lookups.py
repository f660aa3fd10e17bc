"""A name resolver that does not answer, in-process: socket.getaddrinfo replaced for a few
test names (never a real DNS server, never an address off loopback)."""

from __future__ import annotations

import socket
import threading


class BlockedResolver:
    """socket.getaddrinfo of one of ``names`` (a lookup, not an AI_NUMERICHOST parse) blocks
    until ``release`` is set (a resolver that does not answer), then gives loopback; every
    other name is the real resolver's. A watchdog sets ``release`` after a while, so code that
    waits for the lookup cannot hang the test, and ``freed_by_watchdog`` tells that it waited."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)
        self.release = threading.Event()
        self.asked = threading.Event()  # (set at the first lookup of a blocked name)
        self.calls = 0
        self.freed_by_watchdog = False
        self._real = socket.getaddrinfo
        self._watchdog = threading.Timer(20, self._free)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _free(self) -> None:
        self.freed_by_watchdog = True
        self.release.set()

    def __call__(self, host: object, port: object, *args: object, **kwargs: object) -> object:
        flags = kwargs.get("flags", args[3] if len(args) > 3 else 0)
        name = host.decode() if isinstance(host, bytes) else host  # (trio passes IDNA-encoded bytes)
        if name not in self.names or int(flags) & socket.AI_NUMERICHOST:  # (no lookup: an answer at once)
            return self._real(host, port, *args, **kwargs)  # type: ignore[arg-type]
        self.calls += 1
        self.asked.set()
        self.release.wait()
        return self._real("127.0.0.1", port, *args, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        self._watchdog.cancel()
        self.release.set()
