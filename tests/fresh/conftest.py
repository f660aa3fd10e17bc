"""Inside the fresh root the suite runs without the fresh-root test itself (no recursion)."""

from __future__ import annotations

import os

import pytest

from modelfs.testing.fresh import FRESH_ENV


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get(FRESH_ENV):
        return
    inner = [item for item in items if item.get_closest_marker("fresh")]
    if inner:
        config.hook.pytest_deselected(items=inner)
        items[:] = [item for item in items if item not in inner]
