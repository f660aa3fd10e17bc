"""urllib3's ``HTTPResponse._fp``: the http.client response underneath, for ``readinto``.

urllib3 2.x reads a body into a temporary and copies it out, even through ``readinto``;
http.client's ``readinto`` fills the caller's buffer straight from the socket. A streamed
(``preload_content=False``) response without content decoding has read nothing past the
headers, so reading its ``_fp`` directly is safe. Checked with urllib3 2.x.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable

from modelfs.backends.private import PrivateAPIChanged

__all__ = ["body_readinto", "verify"]


def body_readinto(raw: object) -> Callable[[memoryview], int | None]:
    """The zero-copy ``readinto`` of a streamed urllib3 response, else its own ``readinto``.

    The fallback keeps reads correct (one more copy) for response-like objects that are not
    urllib3's, such as the test doubles botocore is given in unit tests.
    """
    fp = getattr(raw, "_fp", None)
    if isinstance(fp, http.client.HTTPResponse):
        return fp.readinto
    return raw.readinto  # type: ignore[attr-defined, no-any-return]


def verify() -> None:
    """Raise PrivateAPIChanged unless urllib3's response still keeps its http.client response in ``_fp``."""
    import inspect

    from urllib3.response import HTTPResponse

    source = inspect.getsource(HTTPResponse.__init__)
    if "self._fp" not in source:
        raise PrivateAPIChanged("urllib3.response.HTTPResponse no longer sets _fp")
