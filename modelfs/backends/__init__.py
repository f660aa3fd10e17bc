"""Object-store backends behind one protocol (see :mod:`modelfs.backends.base`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelfs.backends.base import Backend, ObjectInfo

if TYPE_CHECKING:
    from modelfs.config import Config

__all__ = ["Backend", "ObjectInfo", "open_backend"]


def open_backend(config: "Config") -> Backend:
    """The backend for ``config.source``; imports a store's client only when it is used."""
    source = config.source
    if source.scheme == "gs":
        from modelfs.backends.gcs import GCSBackend

        return GCSBackend(source, anonymous=config.anonymous, read_timeout=config.read_timeout,
                          max_concurrency=config.max_concurrency)
    if source.scheme == "file":
        from modelfs.backends.local import LocalBackend

        return LocalBackend(source, max_concurrency=config.max_concurrency)
    raise AssertionError(f"unknown scheme {source.scheme}")
