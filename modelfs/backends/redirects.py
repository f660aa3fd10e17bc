"""Which redirects the HTTP backend follows, and whether ``--header`` values go along.

The rules (docs/semantics.md, "Redirects"):

- https never redirects to plain http: a token or the bytes would travel in clear text.
- Same origin (scheme, host and port of SOURCE): followed, with every ``--header``.
- Another origin (an artifact store that answers with a presigned URL elsewhere): refused
  unless ``--allow-cross-origin-redirects``; then followed *without* any ``--header``: the
  URL it redirects to carries its own authorization, and a token for the source must not
  reach another host. (httpx alone strips only ``Authorization``, and only across hosts.)
- A redirect to an internal address (loopback, link-local such as the cloud metadata server
  169.254.169.254, the unspecified address, or a known metadata address) is refused, unless
  the source itself is internal: a user who mounts ``http://127.0.0.1:8080/`` expects its
  redirects to its own host to work, a public server must not steer the daemon (which holds
  credentials) at the node's metadata server or at services listening on loopback. The
  target's name is resolved and every address checked; the data GETs (http_media.py) then
  connect to the addresses that were checked, so a name that resolves differently a moment
  later (DNS rebinding) cannot steer them elsewhere.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import trio

from modelfs.errors import BackendError, TransientError

__all__ = ["RedirectPolicy", "Verdict", "is_internal_address", "MAX_REDIRECTS"]

MAX_REDIRECTS = 8
# Cloud metadata services that are not link-local: AWS IMDS over IPv6, Alibaba Cloud.
_METADATA = {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}

Resolver = Callable[[str], Awaitable[list[str]]]


def is_internal_address(text: str) -> bool:
    """True for loopback, link-local, unspecified and known metadata addresses."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_link_local or address.is_unspecified or address in _METADATA


async def _resolve(host: str) -> list[str]:
    try:
        infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []  # the connection will fail on its own
    return [str(info[4][0]) for info in infos]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host.lower(), url.port or default


@dataclass(frozen=True)
class Verdict:
    """A redirect that may be followed: whether the user's headers go along (``same_origin``),
    and the addresses the target's name was checked at (None: the name was not checked, as
    for the source's own origin or an internal source, and may be connected to by name)."""

    same_origin: bool
    addresses: tuple[str, ...] | None = None


class RedirectPolicy:
    """Checks each redirect of a request that started at ``source`` (an http(s) URL)."""

    def __init__(
        self, source: str, *, cross_origin: bool, resolve: Resolver | None = None, connect_timeout: float = 10.0
    ) -> None:
        self._source = httpx.URL(source)
        self._origin = _origin(self._source)
        self._cross_origin = cross_origin
        self._resolver = resolve or _resolve
        self._timeout = connect_timeout
        self._source_internal: bool | None = None

    async def _resolve(self, host: str, what: str) -> list[str]:
        """``host``'s addresses, looked up within the connect timeout: getaddrinfo has no
        timeout of its own, and a resolver that did not answer held the request (and a data
        GET's thread) for as long as resolv.conf's timeouts added up to. Past it, a failure
        worth retrying, as a connect that timed out is."""
        with trio.move_on_after(self._timeout):
            return await self._resolver(host)
        raise TransientError(f"{what}: resolving {host} took more than {self._timeout:g} s")

    async def _internal(self, host: str, what: str) -> bool:
        if is_internal_address(host) or host.lower() in ("localhost", "metadata.google.internal"):
            return True
        return any(is_internal_address(a) for a in await self._resolve(host, what))

    async def verdict(self, current: httpx.URL, target: httpx.URL, what: str) -> Verdict:
        """Raise BackendError if ``current`` may not redirect to ``target``; else whether the
        user's headers may be sent to ``target`` (same origin as the source) and the addresses
        it was checked at (see :class:`Verdict`)."""
        shown = f"{target.scheme}://{target.netloc.decode()}"  # never the path or query: may be signed
        if target.scheme not in ("http", "https"):
            raise BackendError(f"{what}: redirected to a {target.scheme or 'relative'}:// URL; not followed")
        if current.scheme == "https" and target.scheme == "http":
            raise BackendError(f"{what}: redirected from https to plain http ({shown}); not followed")
        same = _origin(target) == self._origin
        if not same and not self._cross_origin:
            raise BackendError(
                f"{what}: redirected to another origin ({shown}); not followed without "
                "--allow-cross-origin-redirects (which sends it no --header)"
            )
        if same:
            return Verdict(True)
        if self._source_internal is None:
            self._source_internal = await self._internal(self._source.host, what)
        if self._source_internal:
            return Verdict(False)
        host = target.host
        if is_internal_address(host) or host.lower() in ("localhost", "metadata.google.internal"):
            raise BackendError(f"{what}: redirected to an internal address ({shown}); not followed")
        addresses = [host] if _is_address(host) else await self._resolve(host, what)
        if any(is_internal_address(a) for a in addresses):
            raise BackendError(f"{what}: redirected to an internal address ({shown}); not followed")
        return Verdict(False, tuple(addresses))
