"""google-cloud-storage ``Client`` internals the GCS backend's media GET needs.

The media GET (gcs_media.py) is signed with the client's own credentials and sent to the
client's own endpoint (which honours ``STORAGE_EMULATOR_HOST`` and ``api_endpoint``), and
behind a proxy or with mutual TLS it goes through the client's authorized session. None of
the three is public API: ``_credentials``, ``_connection.API_BASE_URL`` and ``_http``.
Checked with google-cloud-storage 2.x and 3.x.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modelfs.backends.private import PrivateAPIChanged

__all__ = ["api_base_url", "authorized_session", "credentials", "verify"]


def api_base_url(client: Any) -> str:
    """The endpoint the client sends JSON API requests to (an emulator's, if one is set)."""
    base = getattr(client, "api_endpoint", None) or client._connection.API_BASE_URL
    return str(base)


def credentials(client: Any) -> object:
    """The google-auth credentials the client signs requests with."""
    return client._credentials


def authorized_session(client: Any) -> Any:
    """The client's authorized ``requests`` session (proxies, mTLS, token refresh)."""
    return client._http


def verify() -> None:
    """Raise PrivateAPIChanged unless an anonymous client still has the three attributes."""
    from google.cloud import storage

    client = storage.Client.create_anonymous_client()
    try:
        checks: tuple[tuple[str, Callable[[], object]], ...] = (
            ("_connection.API_BASE_URL", lambda: client._connection.API_BASE_URL),
            ("_credentials", lambda: client._credentials),
            ("_http", lambda: client._http),
        )
        for name, get in checks:
            try:
                value = get()
            except AttributeError:
                raise PrivateAPIChanged(f"google.cloud.storage.Client has no {name}") from None
            if value is None:
                raise PrivateAPIChanged(f"google.cloud.storage.Client.{name} is None")
        if not hasattr(client._http, "request"):
            raise PrivateAPIChanged("google.cloud.storage.Client._http is not a requests session")
    finally:
        client.close()
