"""Google credentials, endpoint and request signing for the GCS backend, on plain ``http.client``.

google-auth refreshes an access token through a ``google.auth.transport.Request``. Its public
one is built on requests, which with urllib3 and the charset libraries is most of a daemon's
fixed memory (docs/operations.md, "Memory"); :class:`HttpRequest` is the same interface on
``http.client``. A refresh is one short request every hour or so, so it opens a connection
per call and keeps none.

The endpoint and the choice of credentials follow google-cloud-storage's ``Client`` (which
modelfs used before): ``STORAGE_EMULATOR_HOST`` names an emulator and means anonymous access,
``API_ENDPOINT_OVERRIDE`` another endpoint, else ``https://storage.googleapis.com`` with
``google.auth.default()`` credentials.
"""

from __future__ import annotations

import http.client
import logging
import os
import ssl
import stat
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from google.auth.credentials import TokenState
from google.auth.transport import Request

from modelfs.backends.connpool import one_connection
from modelfs.backends.private.httpclient_progress import progress_response
from modelfs.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ENDPOINT",
    "HttpRequest",
    "HttpResponse",
    "READ_ONLY_SCOPE",
    "Signer",
    "api_base_url",
    "load_credentials",
    "tls_context",
]

DEFAULT_ENDPOINT = "https://storage.googleapis.com"
READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
# google-auth's requests transport waits this long for a token endpoint when not told otherwise.
_DEFAULT_TIMEOUT = 120.0
# The connect timeout of the mount's connections (their name lookup included).
_CONNECT_TIMEOUT = 10.0
# A token or metadata-server answer is a few KiB; a server sending more is not one of those.
_MAX_AUTH_BODY = 1 << 20


def api_base_url() -> str:
    """``scheme://host[:port]`` of the JSON and media APIs, as google-cloud-storage picks it."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if emulator:
        # The variable names a host, but the Google libraries expect a URL: accept both.
        return (emulator if "://" in emulator else f"http://{emulator}").rstrip("/")
    override = os.environ.get("API_ENDPOINT_OVERRIDE", "").strip()
    return (override or DEFAULT_ENDPOINT).rstrip("/")


def load_credentials(anonymous: bool) -> object | None:
    """google-auth credentials for the JSON and media APIs, or None for anonymous access.

    With ``STORAGE_EMULATOR_HOST`` set access is anonymous, as google-cloud-storage makes it.
    The scope is read-only: modelfs never writes.
    """
    if anonymous or os.environ.get("STORAGE_EMULATOR_HOST", "").strip():
        return None
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    named = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS", "")
    if named:
        _check_credentials_file(named)
    try:
        credentials, _project = google.auth.default(scopes=[READ_ONLY_SCOPE], request=HttpRequest())
    except DefaultCredentialsError as exc:
        if named:  # (set, so "none found" would mislead: say what is wrong with it)
            raise ConfigError(f"GOOGLE_APPLICATION_CREDENTIALS={named}: {str(exc)[:300]}") from None
        raise ConfigError(
            "no Google credentials found: set GOOGLE_APPLICATION_CREDENTIALS, run "
            "'gcloud auth application-default login', or pass --anonymous for a public bucket"
        ) from None
    return credentials


_MAX_CREDENTIALS_FILE = 1 << 20


def _check_credentials_file(path: str) -> None:
    """A readable regular file of at most 1 MiB (google-auth reads the whole file it is given:
    a directory, /dev/zero or an unreadable file ended in a traceback or without memory)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"GOOGLE_APPLICATION_CREDENTIALS={path} is not a file")
        if st.st_size > _MAX_CREDENTIALS_FILE:
            raise ConfigError(f"GOOGLE_APPLICATION_CREDENTIALS={path} is larger than 1 MiB: not a credentials file")
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"GOOGLE_APPLICATION_CREDENTIALS={path}: {exc.strerror}") from None


def tls_context() -> ssl.SSLContext:
    """The CA bundle requests would use (REQUESTS_CA_BUNDLE, else certifi), for parity."""
    cafile = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if not cafile:
        try:
            import certifi

            cafile = certifi.where()
        except ImportError:  # pragma: no cover - certifi is a dependency
            cafile = None
    return ssl.create_default_context(cafile=cafile)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """google-auth's ``transport.Response``: status, headers (lower-case names), whole body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""


class HttpRequest(Request):
    """google-auth's ``transport.Request`` on ``http.client``, one connection per call.

    Failures to reach the server raise ``google.auth.exceptions.TransportError``, which
    google-auth's refresh code expects (and retries where it retries).
    """

    def __init__(self, timeout: float = _DEFAULT_TIMEOUT, *, connect_timeout: float = _CONNECT_TIMEOUT) -> None:
        self._timeout = timeout
        self._connect_timeout = connect_timeout

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: object,
    ) -> HttpResponse:
        from google.auth.exceptions import TransportError

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TransportError(f"not an http(s) URL: {url!r}")  # type: ignore[no-untyped-call]
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        wait = self._timeout if timeout is None else float(timeout)
        # The name lookup and connect within the connect timeout (http.client's getaddrinfo
        # has none: a resolver that did not answer held every request waiting for the token);
        # the certificate is still checked for the name.
        conn = one_connection(
            parts.hostname,
            parts.port,
            timeout=wait,
            connect_timeout=min(wait, self._connect_timeout),
            ssl_context=tls_context() if parts.scheme == "https" else None,
        )
        # The answer under the data path's progress rule, headers too: a token endpoint that
        # drips it a byte at a time would hold the refresh, and every request that waits for
        # it, as long as it liked (the timeout bounds only the wait for one byte).
        conn.response_class = progress_response(wait)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            data = resp.read(_MAX_AUTH_BODY + 1)
            if len(data) > _MAX_AUTH_BODY:
                raise TransportError(  # type: ignore[no-untyped-call]
                    f"{parts.hostname}: answer larger than {_MAX_AUTH_BODY} bytes"
                )
            return HttpResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError(f"{parts.hostname}: {exc}") from exc  # type: ignore[no-untyped-call]
        finally:
            conn.close()


class Signer:
    """Puts the credentials' ``Authorization`` (and quota-project) headers on a request,
    refreshing the token when it is due or when ``force_refresh`` says the server refused it.

    One refresh at a time (google-auth credentials are not safe to refresh concurrently), and
    only requests without a usable token wait for it: google-auth refreshes a token minutes
    before it expires, and while that refresh is in flight the others sign with the token
    that is still valid. (One lock around everything held all GCS I/O for as long as a
    blackholed token endpoint took to time out.) A refresh waits for the endpoint as long as
    the mount's ``--read-timeout`` (``timeout``); its failure is the request's error, retried
    as the mount retries (gcs._auth_error). ``credentials`` None means anonymous.
    """

    def __init__(
        self,
        credentials: object | None,
        request: object | None = None,
        *,
        timeout: float = _DEFAULT_TIMEOUT,
        connect_timeout: float = _CONNECT_TIMEOUT,
    ) -> None:
        self.credentials = credentials
        self._request = request if request is not None else HttpRequest(timeout, connect_timeout=connect_timeout)
        self._lock = threading.Lock()

    def sign(self, method: str, url: str, headers: dict[str, str], *, force_refresh: bool = False) -> None:
        credentials: Any = self.credentials
        if credentials is None:
            return
        state = getattr(credentials, "token_state", None)  # (google-auth >= 2.24; a stand-in may lack it)
        if state is not None and not force_refresh:
            if state is TokenState.FRESH:
                credentials.apply(headers)
                return
            if state is TokenState.STALE:
                if self._lock.acquire(blocking=False):
                    try:
                        self._refresh_ahead(credentials)
                    finally:
                        self._lock.release()
                credentials.apply(headers)  # (refreshed, or the valid token while another thread refreshes)
                return
        with self._lock:
            if force_refresh:
                credentials.refresh(self._request)
            elif state is not None and credentials.token_state is not TokenState.INVALID:
                credentials.apply(headers)  # refreshed by the thread this one waited for
                return
            credentials.before_request(self._request, method, url, headers)

    def _refresh_ahead(self, credentials: Any) -> None:
        """Refresh a token that is still valid: a failure is logged, not the request's (the
        next request past the refresh threshold tries again; past expiry, requests wait)."""
        try:
            credentials.refresh(self._request)
        except Exception as exc:  # (google-auth's TransportError, RefreshError, ...)
            log.warning("refreshing the access token ahead of its expiry failed: %s", str(exc)[:200])
