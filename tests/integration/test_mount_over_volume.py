"""A mountpoint that is itself a mount of another kind: a container's volume, a bind mount.

That is how a sidecar gets the directory it shares (a Kubernetes emptyDir, ``-v DIR:/mnt``),
so modelfs mounts over it; only another FUSE file system there counts as "already mounted".
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.mount import mounted_fstype
from modelfs.testing.fakegcs import FakeGCS

from .conftest import MountFn


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A directory bind-mounted onto itself (requested before ``mount``, so removed after it)."""
    path = tmp_path / "volume"
    path.mkdir()
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def test_mount_over_a_bind_mount(volume: Path, gcs: FakeGCS, bucket: str, mount: MountFn) -> None:
    gcs.upload(bucket, "config.json", b"{}")
    assert mounted_fstype(volume) not in (None, "fuse.modelfs")
    mnt = mount(f"gs://{bucket}", mountpoint=volume)
    assert mounted_fstype(mnt) == "fuse.modelfs"
    assert (mnt / "config.json").read_bytes() == b"{}"
