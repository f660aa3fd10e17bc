"""The modelfs image, built with podman and run privileged, as a sidecar runs it.

The image is built from a locally debootstrapped Debian base (no registry is reachable; the
base stays in podman's storage between runs). A container mounts a bucket of fake-gcs-server
(on the host, reached over the host network) at /mnt/models, a volume bound ``rshared`` to a
shared mount point on the host: the host reads the model through the propagated mount, as a
model-server container reads a sidecar's mount through a Bidirectional/HostToContainer volume.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.testing.container import ContainerError, Podman, ensure_tools, exclusive, is_mount_point, shared_mount
from modelfs.testing.fakegcs import FakeGCS, fake_gcs
from modelfs.testing.models import tensor_digests, write_model

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
]

ROOT = Path(__file__).resolve().parents[2]
TAG = "localhost/modelfs:test"
BUCKET, PREFIX = "models", "llama-tiny"
MODEL_BYTES = 64 << 20
#: The sidecar's budget, smaller than the model, and its container memory limit by the rule the
#: manifests follow (budget + 192 MiB, see packaging/kubernetes/deployment.yaml).
MEMORY_CACHE = 32 << 20
MEMORY_LIMIT = MEMORY_CACHE + (192 << 20)


def run_args(
    name: str,
    image: str,
    gcs: FakeGCS,
    shared: Path,
    memory_cache: int | str,
    limits: list[str],
    env: list[str] = [],  # noqa: B006 - never mutated
    command: list[str] = [],  # noqa: B006 - never mutated
) -> list[str]:
    """``podman run`` arguments for the image mounting the test bucket at ``shared`` (the
    volume's root, ``/mnt/models`` inside), privileged, on the host network, with ``limits``
    (``--memory ...``), extra ``env`` (``NAME=value``) and the container's arguments
    (``command``; none: the entrypoint's MODELFS_* form)."""
    return [
        "run",
        "-d",
        "--name",
        name,
        "--privileged",
        "--device",
        "/dev/fuse",
        "--network",
        "host",
        *limits,
        *(
            a
            for e in [
                f"STORAGE_EMULATOR_HOST={gcs.url}",
                f"MODELFS_SOURCE=gs://{BUCKET}/{PREFIX}",
                "MODELFS_ANONYMOUS=true",
                f"MODELFS_MEMORY_CACHE={memory_cache}",
                "MODELFS_BLOCK_SIZE=4M",
                *env,
            ]
            for a in ("-e", e)
        ),
        "-v",
        f"{shared}:/mnt/models:rshared",
        image,
        *command,
    ]


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    try:
        ensure_tools()
    except ContainerError as exc:
        pytest.fail(f"cannot install podman: {exc}", pytrace=False)
    return Podman(tmp_path_factory.mktemp("podman"))


#: The image this process built from the work tree, which does not change during a run: the
#: next module uses it as it is, unless another run has put another image under TAG meanwhile
#: (a rebuild with every step cached took 110 s under nested podman's vfs driver).
_BUILT: dict[str, str] = {}


@pytest.fixture(scope="module")
def image(podman: Podman) -> Iterator[str]:
    """The image built from this work tree (the base image built first if podman lacks it).
    Another run of these tests on the machine waits until this module is done with it."""
    with exclusive():
        try:
            podman.ensure_base_image()
            built = _BUILT.get(TAG)
            if built is None or podman.image_id(TAG) != built:
                built = _BUILT[TAG] = podman.build(ROOT, TAG)
        except ContainerError as exc:
            pytest.fail(f"building the image failed: {exc}", pytrace=False)
        yield built


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A generated safetensors model (shards, index, config.json) and its tensors' sha256."""
    directory = tmp_path_factory.mktemp("model")
    digests = write_model(directory, MODEL_BYTES, shards=3)
    return directory, digests


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory, model: tuple[Path, dict[str, str]]) -> Iterator[FakeGCS]:
    """fake-gcs-server on the host (filesystem backend) holding the model under PREFIX."""
    with fake_gcs("filesystem", root=tmp_path_factory.mktemp("gcs") / "root") as server:
        server.create_bucket(BUCKET)
        for path in sorted(model[0].iterdir()):
            server.seed_file(BUCKET, f"{PREFIX}/{path.name}", path)
        yield server


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Sidecar:
    """One modelfs container mounting the bucket into a shared host directory."""

    def __init__(self, podman: Podman, image: str, gcs: FakeGCS, shared: Path) -> None:
        self.podman, self.image, self.gcs, self.shared = podman, image, gcs, shared
        self.name = f"modelfs-test-{uuid.uuid4().hex[:8]}"
        self.mount = shared  # where the host sees the mount

    def start(self, subdir: str = "") -> None:
        """Mount at the volume's root (the image's default, from MODELFS_* variables) or at a
        subdirectory of it, with arguments as the Kubernetes manifests pass them: the
        entrypoint creates the subdirectory, which the fresh volume does not have."""
        self.mount = self.shared / subdir if subdir else self.shared
        command = ["mount", f"gs://{BUCKET}/{PREFIX}", f"/mnt/models/{subdir}", "--foreground"] if subdir else []
        limits = ["--memory", str(MEMORY_LIMIT)]
        self.podman(
            *run_args(self.name, self.image, self.gcs, self.shared, MEMORY_CACHE, limits, command=command),
            timeout=120,
        )

    def state(self) -> str:
        """``running 0``, ``exited 0``...; ``OOM`` is appended if the memory limit killed it."""
        fields = self.podman(
            "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}", self.name, timeout=60
        ).stdout.split()
        return " ".join(fields[:2]) + (" OOM" if fields[2] == "true" else "")

    def logs(self) -> str:
        result = self.podman("logs", self.name, check=False, timeout=60)
        return (result.stdout + result.stderr).strip()

    def wait_mounted(self, timeout: float = 60) -> float:
        """Seconds until the host sees the mount with files in it."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                if is_mount_point(self.mount, "fuse") and os.listdir(self.mount):
                    return time.monotonic() - start
            except OSError:  # a dead mount from before, not yet cleared
                pass
            if not self.state().startswith("running"):
                break
            time.sleep(0.1)
        pytest.fail(f"the host did not see the mount (container {self.state()}); logs:\n{self.logs()}", pytrace=False)

    def remove(self) -> None:
        self.podman("rm", "-f", "-t", "5", self.name, check=False, timeout=60)


@pytest.fixture
def sidecar(podman: Podman, image: str, bucket: FakeGCS, tmp_path: Path) -> Iterator[Sidecar]:
    with shared_mount(tmp_path / "shared") as shared:
        side = Sidecar(podman, image, bucket, shared)
        try:
            yield side
        finally:
            side.remove()


def test_host_reads_model_through_propagated_mount(sidecar: Sidecar, model: tuple[Path, dict[str, str]]) -> None:
    source, digests = model
    sidecar.start()
    sidecar.wait_mounted()
    shared = sidecar.shared

    assert sorted(os.listdir(shared)) == sorted(p.name for p in source.iterdir())
    for path in sorted(source.iterdir()):
        assert (shared / path.name).stat().st_size == path.stat().st_size, path.name
        assert _sha256(shared / path.name) == _sha256(path), path.name
    # The way a model server loads it: safetensors.safe_open (mmap) on the host side.
    assert tensor_digests(shared) == digests
    with pytest.raises(OSError):
        (shared / "new.bin").write_bytes(b"x")

    start = time.monotonic()
    sidecar.podman("stop", "-t", "30", sidecar.name, timeout=90)
    stopped_in = time.monotonic() - start
    # modelfs unmounted on SIGTERM and exited 0 (a SIGKILL after the timeout would be 137).
    assert sidecar.state() == "exited 0", sidecar.logs()
    assert stopped_in < 25, f"podman stop took {stopped_in:.1f} s"
    assert "unmounted /mnt/models" in sidecar.logs()
    # No mount left on the host, not even a dead one: the directory is the plain empty bind.
    assert not is_mount_point(shared, "fuse")
    assert os.listdir(shared) == []


def test_restart_after_kill_recovers_dead_mount(sidecar: Sidecar, model: tuple[Path, dict[str, str]]) -> None:
    """A sidecar killed with SIGKILL (an OOM kill) leaves a dead FUSE mount behind. Mounted in a
    subdirectory of the shared volume (as the Kubernetes manifests do), the volume itself stays
    healthy, so a new container starts on it and modelfs clears the dead mount itself. (Had the
    mount been the volume's root, the runtime could not even stat the volume to start a new
    container: "transport endpoint is not connected".)"""
    source, _ = model
    sidecar.start("model")
    sidecar.wait_mounted()
    sidecar.podman("kill", "--signal", "KILL", sidecar.name, timeout=60)
    sidecar.podman("wait", sidecar.name, timeout=60)
    assert is_mount_point(sidecar.mount, "fuse")  # dead: the daemon is gone
    with pytest.raises(OSError):
        os.listdir(sidecar.mount)
    sidecar.remove()

    sidecar.start("model")  # a new container on the same volume, as a pod restarts its sidecar
    sidecar.wait_mounted()
    assert (sidecar.mount / "config.json").read_bytes() == (source / "config.json").read_bytes()
    assert "dead mount" in sidecar.logs()
    sidecar.podman("stop", "-t", "30", sidecar.name, timeout=90)
    assert sidecar.state() == "exited 0", sidecar.logs()
    assert not is_mount_point(sidecar.mount, "fuse")
    assert os.listdir(sidecar.mount) == []


def test_image_is_slim_and_says_what_is_missing(podman: Podman, image: str) -> None:
    run = ("run", "--rm", "--network", "host")
    version = podman(*run, image, "--version", timeout=60)
    assert version.stdout.startswith("modelfs ")
    # No compiler or build headers in the final image (pyfuse3 was compiled in the build stage).
    # What the probes and `modelfs unmount` use is there.
    tools = podman(
        *run,
        "--entrypoint",
        "sh",
        image,
        "-c",
        "for t in gcc cc x86_64-linux-gnu-gcc pkg-config fusermount3 mountpoint; do command -v $t; done;"
        " ls /usr/include/fuse3 2>/dev/null; true",
        timeout=60,
    )
    assert tools.stdout.split() == ["/usr/bin/fusermount3", "/usr/bin/mountpoint"]
    # No MODELFS_SOURCE and no arguments: one clear line, non-zero exit.
    bare = podman(*run, image, check=False, timeout=60)
    assert bare.returncode != 0
    assert "MODELFS_SOURCE" in bare.stderr
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image, timeout=60).stdout)
    assert size < 400 << 20, f"image is {size >> 20} MiB"
