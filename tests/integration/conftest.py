"""Real FUSE mounts of modelfs, started the way a user starts them (a subprocess)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path

import pytest

from modelfs.testing.cgroups import cgroup_version
from modelfs.testing.fakegcs import FakeGCS
from modelfs.testing.mounts import force_unmount, mounted
from modelfs.testing.nginx import Nginx, nginx
from modelfs.testing.s3server import S3Server, s3_server

needs_fuse = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")

CGROUP_TESTS = [
    pytest.mark.fuse,
    pytest.mark.skipif(
        os.geteuid() != 0 or cgroup_version() is None, reason="needs root and a cgroup memory controller"
    ),
]
"""The ``pytestmark`` of a module whose tests mount inside a real memory cgroup."""


def wait_for(what: str, predicate: Callable[[], object], timeout: float = 60.0) -> None:
    """Poll until ``predicate()`` holds: a bounded wait for another process's progress, not a
    timing assertion (a hang fails the test instead of blocking it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.fuse)
            item.add_marker(needs_fuse)


@pytest.fixture
def bucket(gcs: FakeGCS) -> str:
    """A fresh, empty bucket for one test."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    gcs.create_bucket(name)
    return name


MountFn = Callable[..., Path]


@pytest.fixture
def mount(tmp_path: Path, gcs: FakeGCS) -> Iterator[MountFn]:
    """``mount(source, *options)`` mounts with modelfs and returns the mountpoint (``env=`` to
    reach the emulator another way, e.g. through a fault proxy); every mount
    is unmounted at teardown, however the test ended."""
    with ExitStack() as stack:
        count = 0

        def do_mount(
            source: str,
            *options: str,
            mountpoint: Path | None = None,
            cache_dir: Path | None = None,
            env: Mapping[str, str] | None = None,
        ) -> Path:
            nonlocal count
            count += 1
            mnt = mountpoint or tmp_path / f"mnt{count}"
            cache = cache_dir or tmp_path / f"cache{count}"
            stack.callback(force_unmount, mnt)
            return stack.enter_context(
                mounted(source, mnt, cache, "--anonymous", *options, env=gcs.env() if env is None else env)
            )

        yield do_mount


@pytest.fixture(scope="session")
def web() -> Iterator[Nginx]:
    """nginx on loopback, HTTP and HTTPS (self-signed CA at ``web.ca_cert``), JSON autoindex."""
    with nginx() as server:
        yield server


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """moto's S3 server with authentication on (``s3.admin`` seeds, ``s3.reader`` reads)."""
    with s3_server() as server:
        yield server
