"""Fixtures shared by every test: a fake-gcs-server for the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from modelfs.testing.fakegcs import FakeGCS, fake_gcs


@pytest.fixture(scope="session")
def gcs() -> Iterator[FakeGCS]:
    """fake-gcs-server with the memory backend: any object name works, objects stay small."""
    with fake_gcs("memory") as server:
        yield server
