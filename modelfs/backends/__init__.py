"""Object-store backends behind one protocol (see :mod:`modelfs.backends.base`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from modelfs.backends.base import Backend, ObjectInfo
from modelfs.errors import ConfigError, ModelfsError

if TYPE_CHECKING:
    from modelfs.cache.memory import MemoryCache
    from modelfs.config import Config

__all__ = ["Backend", "ObjectInfo", "open_backend"]

log = logging.getLogger(__name__)


def open_backend(config: Config, budget: MemoryCache | None = None) -> Backend:
    """The backend for ``config.source`` (through the cache tier with ``--cache-url``); response
    bodies it holds whole (directory indexes, listings and metadata answers) are charged to ``budget``."""
    try:
        backend = _open_origin(config, budget)
    except ModelfsError:
        raise
    except Exception as exc:
        # A client library refusing its own setup (an unknown AWS profile, a bad region or
        # endpoint, a credentials helper that fails): one line, not its traceback.
        raise ConfigError(f"cannot use {config.source.url}: {type(exc).__name__}: {str(exc)[:300]}") from None
    if not config.cache_url:
        return backend
    if config.source.query:
        # A query string (a presigned URL's signature, a token) is a secret: it would go to the
        # tier in plain HTTP, into its access log and its cache key (HTTPBackend.tier_target).
        log.warning(
            "--cache-url: %s has a query string (a signature or token, kept secret): "
            "its blocks are read from the origin, not through the cache tier",
            config.source.url,
        )
    from modelfs.backends.tiered import TieredBackend

    return TieredBackend(
        backend,
        config.cache_url,
        block_size=config.block_size,
        read_timeout=config.read_timeout,
        max_concurrency=config.max_concurrency,
    )


def _open_origin(config: Config, budget: MemoryCache | None) -> Backend:
    """The backend for ``config.source``; imports a store's client only when it is used."""
    source = config.source
    if source.scheme == "gs":
        from modelfs.backends.gcs import GCSBackend

        return GCSBackend(
            source,
            anonymous=config.anonymous,
            read_timeout=config.read_timeout,
            max_concurrency=config.max_concurrency,
            billing_project=config.billing_project,
            budget=budget,
        )
    if source.scheme == "file":
        from modelfs.backends.local import LocalBackend

        return LocalBackend(
            source, max_concurrency=config.max_concurrency, persist_weak_versions=config.persist_weak_versions
        )
    if source.scheme in ("http", "https"):
        from modelfs.backends.http import HTTPBackend

        return HTTPBackend(
            source,
            manifest=config.manifest,
            ca_cert=config.ca_cert,
            headers=config.header,
            read_timeout=config.read_timeout,
            max_concurrency=config.max_concurrency,
            persist_weak_versions=config.persist_weak_versions,
            cross_origin_redirects=config.allow_cross_origin_redirects,
            budget=budget,
        )
    if source.scheme == "s3":
        from modelfs.backends.s3 import S3Backend

        return S3Backend(
            source,
            endpoint_url=config.endpoint_url,
            anonymous=config.anonymous,
            ca_cert=config.ca_cert,
            read_timeout=config.read_timeout,
            max_concurrency=config.max_concurrency,
            requester_pays=config.requester_pays,
            budget=budget,
        )
    raise AssertionError(f"unknown scheme {source.scheme}")
