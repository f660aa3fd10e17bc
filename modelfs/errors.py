"""Error classes and the one table that maps them to errnos.

Every layer raises these; only :func:`errno_for` decides what the kernel sees. Messages are
one line, fit to print to a user as they are.
"""

from __future__ import annotations

import errno

__all__ = [
    "ModelfsError",
    "ConfigError",
    "MountError",
    "BackendError",
    "NotFound",
    "AccessDenied",
    "VersionChanged",
    "TransientError",
    "errno_for",
]


class ModelfsError(Exception):
    """Base of every error modelfs raises on purpose; ``str()`` is a one-line message."""


class ConfigError(ModelfsError):
    """A flag, environment variable, config file or SOURCE that cannot be used."""


class MountError(ModelfsError):
    """The mountpoint cannot be used, or the kernel refused the mount."""


class BackendError(ModelfsError):
    """A backend call failed for a reason that retrying will not fix."""


class NotFound(BackendError):
    """The bucket, prefix or object does not exist."""


class AccessDenied(BackendError):
    """The credentials were refused (HTTP 401/403)."""


class VersionChanged(BackendError):
    """The pinned object version is gone: the object was overwritten or deleted."""


class TransientError(BackendError):
    """A failure worth retrying: 429, 5xx, a reset, a stall, a short body."""


_ERRNO: tuple[tuple[type[BaseException], int], ...] = (
    (NotFound, errno.ENOENT),
    (AccessDenied, errno.EACCES),
    (VersionChanged, errno.ESTALE),
)


def errno_for(exc: BaseException) -> int:
    """The errno a FUSE request fails with when ``exc`` escapes: ENOENT, EACCES, ESTALE or EIO."""
    for cls, code in _ERRNO:
        if isinstance(exc, cls):
            return code
    return errno.EIO
