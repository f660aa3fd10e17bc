"""The image under ``podman run --memory``: ``--memory-cache auto`` sizes the budget from the
container's limit, random readers on the host never get it OOM-killed, and a budget the limit
cannot hold is refused with one line.

The image, the bucket and the model come from test_container.py's fixtures.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.testing.container import Podman, is_mount_point, shared_mount
from modelfs.testing.fakegcs import FakeGCS
from modelfs.testing.workload import ReadStats, random_readers

from .test_container import bucket, image, model, podman, run_args  # noqa: F401 - fixtures

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
]

MiB = 1 << 20
LIMIT = 160 * MiB  # --memory-cache auto: 160M - 64M overhead - 64M headroom = 32M


class Container:
    def __init__(self, podman: Podman, image: str, gcs: FakeGCS, shared: Path) -> None:  # noqa: F811
        self.podman, self.image, self.gcs, self.shared = podman, image, gcs, shared
        self.name = f"modelfs-mem-{uuid.uuid4().hex[:8]}"

    def run(self, memory_cache: str, limit: int) -> None:
        limits = ["--memory", str(limit), "--memory-swap", str(limit)]
        self.podman(*run_args(self.name, self.image, self.gcs, self.shared, memory_cache, limits), timeout=120)

    def state(self) -> tuple[str, str, bool]:
        status, code, oom = self.podman(
            "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}", self.name, timeout=60
        ).stdout.split()
        return status, code, oom == "true"

    def logs(self) -> str:
        result = self.podman("logs", self.name, check=False, timeout=60)
        return (result.stdout + result.stderr).strip()

    def wait(self, mounted: bool, timeout: float = 60) -> None:
        """Until the host sees the mount (``mounted``) or the container has exited."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            status = self.state()[0]
            if mounted and is_mount_point(self.shared, "fuse") and os.listdir(self.shared):
                return
            if not mounted and status == "exited":
                return
            if mounted and status != "running":
                break
            time.sleep(0.1)
        pytest.fail(f"container {self.state()}; logs:\n{self.logs()}", pytrace=False)

    def remove(self) -> None:
        self.podman("rm", "-f", "-t", "5", self.name, check=False, timeout=60)


@pytest.fixture
def container(podman: Podman, image: str, bucket: FakeGCS, tmp_path: Path) -> Iterator[Container]:  # noqa: F811
    with shared_mount(tmp_path / "shared") as shared:
        c = Container(podman, image, bucket, shared)
        try:
            yield c
        finally:
            c.remove()


def test_auto_budget_random_readers_never_oom_killed(
    container: Container,
    model: tuple[Path, dict[str, str]],  # noqa: F811
) -> None:
    source, _ = model
    container.run("auto", LIMIT)
    container.wait(mounted=True)
    stats = json.loads(os.getxattr(container.shared, "user.modelfs.stats"))
    assert stats["memory_capacity"] == 32 * MiB, stats
    shards = sorted(p.name for p in source.iterdir() if p.name.endswith(".safetensors"))
    assert shards
    reads = ReadStats()
    threads = []
    for i, name in enumerate(shards):
        threads += random_readers(
            container.shared / name,
            source / name,
            threads=8,
            read_size=MiB + 1,
            stats=reads,
            reads_per_thread=8,
            seed=i,
        )
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert reads.wrong == [] and reads.errors == [], (reads.wrong[:3], reads.errors[:3])
    assert reads.reads == len(threads) * 8
    status, _, oom = container.state()
    assert status == "running" and not oom, container.logs()
    after = json.loads(os.getxattr(container.shared, "user.modelfs.stats"))
    assert after["memory_peak"] <= after["memory_capacity"] == 32 * MiB, after
    container.podman("stop", "-t", "30", container.name, timeout=90)
    assert container.state()[:2] == ("exited", "0"), container.logs()


def test_budget_the_limit_cannot_hold_is_refused(container: Container) -> None:
    container.run("128M", LIMIT)
    container.wait(mounted=False)
    status, code, oom = container.state()
    assert status == "exited" and code != "0" and not oom
    errors = [line for line in container.logs().splitlines() if "cgroup memory limit" in line]
    assert len(errors) == 1 and "160M" in errors[0] and "auto" in errors[0], container.logs()
    assert not is_mount_point(container.shared, "fuse")
