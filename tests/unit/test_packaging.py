"""The deployment files in packaging/ and the Dockerfile: parsed, and the fields that matter checked.

The sidecar's arguments go through modelfs' own option parser, so a misspelt or removed option
in a manifest fails here, and the memory limit is checked against the budget it really sets.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfs.config import Config, add_options, build_config

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "packaging" / "kubernetes"
MANIFESTS = sorted(KUBERNETES.glob("*.yaml"))
#: What the sidecar's memory limit must hold beyond --memory-cache: the interpreter and its
#: libraries (~60 MiB), socket and kernel buffers, page cache of disk-cache I/O, headroom.
OVERHEAD = 192 << 20

_UNITS = {
    "": 1,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
}


def quantity(text: str | int) -> int:
    """A Kubernetes resource quantity (``448Mi``, ``1G``, ``512``) in bytes."""
    match = re.fullmatch(r"(\d+)([kMGT]i?|Ki)?", str(text))
    assert match, f"not a quantity: {text!r}"
    return int(match.group(1)) * _UNITS[match.group(2) or ""]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "InferenceService":
        return doc["spec"]["predictor"]
    raise AssertionError(f"unexpected kind {doc['kind']}")


def load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, path
    return docs[0]


def sidecar_config(args: list[str]) -> Config:
    """The Config the sidecar's ``modelfs mount ...`` arguments produce (no environment)."""
    assert args[0] == "mount", args
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    add_options(parser)
    ns, unknown = parser.parse_known_args(args[1:])
    assert not unknown, f"not modelfs mount options: {unknown}"
    return build_config(ns.source, ns.mountpoint, ns, environ={})


class Pod:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.spec = pod_spec(doc)
        everyone = self.spec.get("initContainers", []) + self.spec["containers"]
        sidecars = [c for c in everyone if c.get("args", [None])[0] == "mount"]
        assert len(sidecars) == 1, "one modelfs sidecar running `modelfs mount`"
        self.sidecar = sidecars[0]
        self.servers = self.spec["containers"]
        assert self.sidecar not in self.servers or len(self.servers) > 1
        self.servers = [c for c in self.servers if c is not self.sidecar]
        self.config = sidecar_config(self.sidecar["args"])
        self.volumes = {v["name"]: v for v in self.spec["volumes"]}

    def model_mount(self) -> dict[str, Any]:
        """The sidecar's volumeMount that holds the modelfs mountpoint."""
        mountpoint = str(self.config.mountpoint)
        holding = [
            m
            for m in self.sidecar["volumeMounts"]
            if mountpoint == m["mountPath"] or mountpoint.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        assert len(holding) == 1, f"{mountpoint} is not on a volume of the sidecar"
        return holding[0]


@pytest.fixture(params=MANIFESTS, ids=[p.name for p in MANIFESTS])
def pod(request: pytest.FixtureRequest) -> Pod:
    return Pod(load(request.param))


def test_manifests_exist() -> None:
    assert {p.name for p in MANIFESTS} >= {"deployment.yaml", "kserve-inferenceservice.yaml"}


def test_sidecar_is_privileged_and_stays_in_the_foreground(pod: Pod) -> None:
    security = pod.sidecar.get("securityContext", {})
    # FUSE needs /dev/fuse and CAP_SYS_ADMIN; Bidirectional propagation needs privileged.
    assert security.get("privileged") is True
    assert pod.config.foreground, "without --foreground modelfs daemonizes and the container exits"
    assert pod.config.source.scheme == "gs"
    assert pod.config.allow_other, "the server runs as another user than the sidecar"


def test_mount_propagates_from_sidecar_to_server(pod: Pod) -> None:
    model = pod.model_mount()
    assert model["mountPropagation"] == "Bidirectional"
    assert "emptyDir" in pod.volumes[model["name"]]
    # A subdirectory of the volume: a dead mount (sidecar OOM-killed) then leaves the volume
    # usable for the restarted sidecar, which clears it (tests/container checks this).
    relative = Path(str(pod.config.mountpoint)).relative_to(model["mountPath"])
    assert str(relative) not in ("", ".")
    for server in pod.servers:
        mounts = [m for m in server["volumeMounts"] if m["name"] == model["name"]]
        assert len(mounts) == 1, server["name"]
        assert mounts[0]["mountPropagation"] == "HostToContainer"
        assert mounts[0].get("readOnly") is True
        # The server is pointed at the model where it sees it.
        model_path = f"{mounts[0]['mountPath'].rstrip('/')}/{relative}"
        assert model_path in server.get("args", []) + server.get("command", []), server["name"]


def test_memory_limit_follows_the_budget(pod: Pod) -> None:
    resources = pod.sidecar["resources"]
    limit = quantity(resources["limits"]["memory"])
    assert limit >= pod.config.memory_cache + OVERHEAD, (
        f"memory limit {limit >> 20} MiB < --memory-cache {pod.config.memory_cache >> 20} MiB + {OVERHEAD >> 20} MiB"
    )
    assert limit <= pod.config.memory_cache + 4 * OVERHEAD, "a limit far above the budget hides leaks"
    assert quantity(resources["requests"]["memory"]) == limit
    assert "cpu" not in resources["limits"], "CPU throttling stalls FUSE replies"


def test_disk_cache_fits_its_volume(pod: Pod) -> None:
    cache_dir = str(pod.config.cache_dir)
    mounts = [m for m in pod.sidecar["volumeMounts"] if m["mountPath"] == cache_dir]
    assert len(mounts) == 1, f"--cache-dir {cache_dir} is not a volume"
    volume = pod.volumes[mounts[0]["name"]]
    if "emptyDir" in volume:
        assert quantity(volume["emptyDir"]["sizeLimit"]) >= pod.config.disk_cache


def test_probes_wait_for_the_mount(pod: Pod) -> None:
    mountpoint = str(pod.config.mountpoint)
    startup = pod.sidecar["startupProbe"]
    assert mountpoint in " ".join(startup["exec"]["command"])
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    assert mountpoint in " ".join(pod.sidecar["readinessProbe"]["exec"]["command"])
    if pod.sidecar in pod.spec.get("initContainers", []):
        # A native sidecar: its startupProbe gates the start of the server containers.
        assert pod.sidecar["restartPolicy"] == "Always"
    for server in pod.servers:
        assert "readinessProbe" in server
        assert "startupProbe" in server


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def test_systemd_unit() -> None:
    unit = _unit(ROOT / "packaging" / "systemd" / "modelfs@.service")
    service = unit["Service"]
    values = {k: v for k, v in service}
    assert values["Type"] == "simple"
    start = shlex.split(values["ExecStart"])
    assert start[1:2] == ["mount"] and "--foreground" in start
    stop = shlex.split(values["ExecStop"].lstrip("-"))
    assert stop[0] == start[0] and stop[1] == "unmount"
    assert stop[2] == start[3], "ExecStop unmounts the mountpoint that ExecStart mounts"
    assert values["Restart"] == "on-failure"
    assert "mountpoint" in values["ExecStartPost"], "active only once the mount answers"
    assert "fusermount3 -uz" in values["ExecStopPost"], "a dead mount is detached after a crash"
    assert "network-online.target" in dict(unit["Unit"])["After"]
    assert dict(unit["Install"])["WantedBy"] == "multi-user.target"


def test_dockerfile_base_is_a_build_arg() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    first_from = next(i for i, line in enumerate(lines) if line.startswith("FROM "))
    assert "ARG BASE_IMAGE=debian:bookworm-slim" in lines[:first_from]
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert froms and all(f == "${BASE_IMAGE}" for f in froms), froms
    assert lines[-2:] == ['ENTRYPOINT ["/usr/local/bin/modelfs-entrypoint"]', "CMD []"]
    # The final stage installs no compiler.
    final = text.rsplit("\nFROM ", 1)[1]
    assert not re.search(r"\b(gcc|g\+\+|build-essential|-dev)\b", final)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


def test_entrypoint_script() -> None:
    script = ROOT / "packaging" / "entrypoint.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["sh", "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    assert 'exec modelfs "$@"' in text
    assert '"$MODELFS_SOURCE" "$mountpoint" --foreground' in text
