"""requests' ``HTTPAdapter.poolmanager`` / ``proxy_manager_for`` and urllib3's
``PoolManager.pool_classes_by_scheme``: the connection classes a requests session's GETs use.

The GCS backend goes through google-auth's requests session behind a proxy or with mutual
TLS (gcs_session.py). Its answers were bounded only per recv: headers dripped a byte at a time
never stalled, and neither did a body, which http.client's buffered reader returns only once
the whole block has come. Giving every connection of the session (direct, and through each
proxy manager the adapter makes) a ``response_class`` that counts each receive
(httpclient_progress) puts them under the data path's progress rule, as the S3 backend's
botocore connections are (botocore_pools). urllib3's managers share one module-level dict of
pool classes: each manager here gets its own copy. Checked with requests 2.x and urllib3 2.x.
"""

from __future__ import annotations

from typing import Any

from modelfs.backends.private import PrivateAPIChanged
from modelfs.backends.private.urllib3_connect import bounded_new_conn

__all__ = ["install_response_class", "verify"]


def _replace_pool_classes(manager: Any, response_class: type, in_flight: Any | None) -> None:
    classes = getattr(manager, "pool_classes_by_scheme", None)
    if not isinstance(classes, dict) or not all(hasattr(cls, "ConnectionCls") for cls in classes.values()):
        raise PrivateAPIChanged("a urllib3 pool manager has no pool_classes_by_scheme of pool classes")
    if getattr(manager, "_modelfs_response_class", None) is response_class:
        return
    replaced = {}
    for scheme, pool_class in classes.items():
        base = pool_class.ConnectionCls
        members: dict[str, Any] = {"response_class": response_class}
        if in_flight is not None:  # (the name lookup and connect within the connect timeout)
            members["_new_conn"] = bounded_new_conn(base, in_flight)
        counted = type(f"Progress{base.__name__}", (base,), members)
        replaced[scheme] = type(f"Progress{pool_class.__name__}", (pool_class,), {"ConnectionCls": counted})
    manager.pool_classes_by_scheme = replaced
    manager._modelfs_response_class = response_class


def install_response_class(session: Any, response_class: type, in_flight: Any | None = None) -> None:
    """From now on every connection of ``session`` (a requests Session whose adapters made no
    connection yet) reads its answers with ``response_class``, also through a proxy; with
    ``in_flight`` (a connpool.InFlight) its name lookup and connect take at most the request's
    connect timeout (urllib3_connect.py) and a stop ends them."""
    from requests.adapters import HTTPAdapter

    for adapter in session.adapters.values():
        if not isinstance(adapter, HTTPAdapter) or not hasattr(adapter, "poolmanager"):
            raise PrivateAPIChanged("a requests session's adapter is not an HTTPAdapter with a poolmanager")
        _replace_pool_classes(adapter.poolmanager, response_class, in_flight)
        made = adapter.proxy_manager_for

        def proxy_manager_for(proxy: Any, *args: Any, _made: Any = made, **kwargs: Any) -> Any:
            manager = _made(proxy, *args, **kwargs)
            _replace_pool_classes(manager, response_class, in_flight)
            return manager

        adapter.proxy_manager_for = proxy_manager_for  # type: ignore[method-assign]


def verify() -> None:
    """Raise PrivateAPIChanged unless a session's direct and proxy managers take the classes."""
    import http.client

    import requests

    session = requests.Session()
    try:
        install_response_class(session, http.client.HTTPResponse)
        adapter = session.get_adapter("http://example.test/")
        manager = adapter.proxy_manager_for("http://127.0.0.1:9")  # type: ignore[attr-defined]
        for each in (adapter.poolmanager, manager):  # type: ignore[attr-defined]
            pool_class = each.pool_classes_by_scheme["https"]
            if pool_class.ConnectionCls.response_class is not http.client.HTTPResponse:
                raise PrivateAPIChanged("urllib3's pool classes no longer carry a connection class")
            if each.connection_from_url("https://example.test/").ConnectionCls is not pool_class.ConnectionCls:
                raise PrivateAPIChanged("urllib3's pool manager no longer makes pools of pool_classes_by_scheme")
    finally:
        session.close()
