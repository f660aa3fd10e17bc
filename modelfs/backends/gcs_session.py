"""The GCS backend's requests through google-auth's ``AuthorizedSession``: behind an HTTP(S)
proxy or with mutual TLS, which the plain ``http.client`` transports do not do.

Imported only in those setups (``gcs_media.plain_transport_applies``), so requests and
urllib3 stay out of every other daemon. requests' exceptions never leave this module: they
become OSError, which the backend classifies as a failure worth retrying.
"""

from __future__ import annotations

import requests
import urllib3.exceptions
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession

from modelfs.backends import answers
from modelfs.backends.body import read_urllib3_body
from modelfs.backends.connpool import InFlight
from modelfs.backends.gcs_auth import DEFAULT_ENDPOINT
from modelfs.backends.gcs_json import MAX_BODY, MAX_ERROR_BODY, StatusError
from modelfs.backends.gcs_media import CheckResponse
from modelfs.backends.private.httpclient_progress import progress_response
from modelfs.backends.private.requests_pools import install_response_class
from modelfs.backends.responses import RangeRequest, short_reason
from modelfs.errors import BackendError

__all__ = ["MTLS_ENDPOINT", "SessionClient"]

MTLS_ENDPOINT = "https://storage.mtls.googleapis.com"


class SessionClient:
    """JSON API GETs and ranged media GETs through one authorized requests session."""

    def __init__(self, base_url: str, credentials: object | None, *, timeout: tuple[float, float]) -> None:
        self._session = AuthorizedSession(  # type: ignore[no-untyped-call]
            credentials if credentials is not None else AnonymousCredentials(),  # type: ignore[no-untyped-call]
            refresh_timeout=timeout[1],  # (a token refresh waits as long as any request)
        )
        # With GOOGLE_API_USE_CLIENT_CERTIFICATE=true and a client certificate, the default
        # endpoint becomes the mTLS one, as google-cloud-storage switches it.
        self._session.configure_mtls_channel()  # type: ignore[no-untyped-call]
        # Every answer, headers too, under the data path's progress rule (a body dripped, read
        # through http.client's buffered reader, was checked only once the whole block had come).
        # Each new connection's name lookup and connect (to the proxy, or to the endpoint)
        # within the connect timeout, not for as long as getaddrinfo takes.
        self._in_flight = InFlight()
        install_response_class(self._session, progress_response(timeout[1]), self._in_flight)
        mtls = bool(self._session.is_mtls) and base_url == DEFAULT_ENDPOINT
        self.base_url = MTLS_ENDPOINT if mtls else base_url
        self._timeout = timeout

    def get_json(self, path: str) -> bytes:
        """The JSON body at ``path``, decoded but not parsed (gcs_json.JsonApi.get_json)."""
        try:
            resp = self._session.get(
                self.base_url + path, headers={"Accept": "application/json"}, stream=True, timeout=self._timeout
            )
            try:
                if not 200 <= resp.status_code < 300:
                    # (an error's message is in its first bytes: MAX_ERROR_BODY of it, decoded)
                    answers.begin(MAX_ERROR_BODY, MAX_ERROR_BODY)
                    head = resp.raw.read(MAX_ERROR_BODY, decode_content=True)
                    raise StatusError.of_body(resp.status_code, resp.reason or "", head, None)
                # urllib3 decodes a gzip body as it reads; read at most MAX_BODY of it, charged
                # to the memory budget as it grows (modelfs.backends.answers).
                data = _read_decoded(resp)
            finally:
                resp.close()
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise OSError(short_reason(exc)) from exc
        if len(data) > MAX_BODY:
            raise BackendError(f"the JSON API's answer is larger than {MAX_BODY} bytes")
        return bytes(data)

    def get_into(
        self, path: str, request: RangeRequest, accept_encoding: str, check: CheckResponse, dest: memoryview
    ) -> None:
        """The media GET of ``request`` into ``dest`` (``check`` judges status and headers)."""
        headers = {"Range": request.header, "Accept-Encoding": accept_encoding}
        try:
            resp = self._session.request(  # type: ignore[no-untyped-call]
                "GET", self.base_url + path, headers=headers, stream=True, timeout=self._timeout
            )
            try:
                check(resp.status_code, resp.headers)
                read_urllib3_body(resp.raw, dest, request.what, self._timeout[1])
            except BaseException:
                resp.close()
                raise
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise OSError(short_reason(exc)) from exc

    def close(self) -> None:
        self._session.close()  # type: ignore[no-untyped-call]

    def abort(self) -> None:
        """The stop: name lookups and connects in progress end now, and no new one starts;
        the session's GETs end at their read timeout."""
        self._in_flight.abort()


def _read_decoded(resp: requests.Response) -> bytes:
    """At most MAX_BODY + 1 bytes of the decoded body, each step charged before it is read."""
    encoded = resp.headers.get("content-encoding", "identity").strip().lower() not in ("identity", "")
    length = resp.headers.get("content-length", "")
    known = int(length) if length.isdigit() and not encoded else None
    if known is not None and known > MAX_BODY:
        raise BackendError(f"the JSON API's answer is larger than {MAX_BODY} bytes")
    answers.begin(MAX_BODY + 1, known)
    chunks: list[bytes] = []
    total = 0
    while total <= MAX_BODY:
        want = min(1 << 16, MAX_BODY + 1 - total)
        answers.grow(total + want)
        chunk = resp.raw.read(want, decode_content=True)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)
