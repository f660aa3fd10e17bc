"""Every private API of a client library that modelfs leans on, one small module each.

Each module names the attribute it reaches for, the versions it was checked against (the
upper bounds in pyproject.toml), and a ``verify()`` that raises :class:`PrivateAPIChanged`
when the installed library no longer has it. ``tests/unit/test_private_apis.py`` calls every
``verify()`` and exercises each shim on the real library objects, so a library upgrade that
moves one of these fails a test instead of silently taking a slower path or breaking reads.
"""

from __future__ import annotations

__all__ = ["PrivateAPIChanged"]


class PrivateAPIChanged(RuntimeError):
    """The installed client library no longer has a private attribute modelfs uses."""
