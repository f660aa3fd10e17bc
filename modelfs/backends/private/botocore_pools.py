"""botocore's ``BaseClient._endpoint.http_session._pool_classes_by_scheme``: the urllib3
connection-pool classes a client's requests use.

A stop must end every GET in flight at once, including one still waiting for its response
headers; before the headers botocore hands out nothing that leads to the socket. Replacing
the pool classes (before the client's first request: pools are made on first use) with
subclasses whose connections report themselves once connected lets the S3 backend reach
every socket it has opened. botocore's direct and proxy pool managers share that dict, so
one replacement covers both. Checked with botocore 1.x and urllib3 1.26 and 2.x.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modelfs.backends.private import PrivateAPIChanged
from modelfs.backends.private.urllib3_connect import bounded_new_conn

__all__ = ["report_connections", "verify"]


def _pool_classes(client: Any) -> dict[str, Any]:
    try:
        classes = client._endpoint.http_session._pool_classes_by_scheme
    except AttributeError:
        raise PrivateAPIChanged("a botocore client has no _endpoint.http_session._pool_classes_by_scheme") from None
    if not isinstance(classes, dict) or not all(hasattr(cls, "ConnectionCls") for cls in classes.values()):
        raise PrivateAPIChanged("botocore's _pool_classes_by_scheme is not a dict of urllib3 pool classes")
    return classes


def report_connections(
    client: Any, connected: Callable[[Any], None], response_class: type | None = None, in_flight: Any | None = None
) -> None:
    """From now on every connection ``client`` opens is passed to ``connected`` (in the
    thread that opened it) once its socket (``.sock``) is connected, and reads its answers
    with ``response_class`` (an ``http.client.HTTPResponse``) if one is given. With
    ``in_flight`` (a connpool.InFlight) its name lookup and connect take at most the
    client's connect timeout (urllib3_connect.py) and a stop ends them."""
    classes = _pool_classes(client)
    for scheme, pool_class in list(classes.items()):
        base = pool_class.ConnectionCls

        def connect(self: Any, _base: type = base) -> None:
            _base.connect(self)  # type: ignore[attr-defined]
            connected(self)

        members: dict[str, Any] = {"connect": connect}
        if response_class is not None:
            # (botocore's connection takes it as the class it goes back to after each answer)
            members["response_class"] = response_class
        if in_flight is not None:
            members["_new_conn"] = bounded_new_conn(base, in_flight)
        reporting = type(f"Reporting{base.__name__}", (base,), members)
        classes[scheme] = type(f"Reporting{pool_class.__name__}", (pool_class,), {"ConnectionCls": reporting})


def verify() -> None:
    """Raise PrivateAPIChanged unless a new client's pool classes can be replaced so."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9", config=Config(signature_version=UNSIGNED)
    )
    try:
        report_connections(client, lambda connection: None)
        session = client._endpoint.http_session
        if session._manager.pool_classes_by_scheme is not session._pool_classes_by_scheme:
            raise PrivateAPIChanged("botocore's pool manager no longer shares _pool_classes_by_scheme")
    finally:
        client.close()
