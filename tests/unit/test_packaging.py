"""The deployment files in packaging/ and the Dockerfile: parsed, and the fields that matter checked.

The sidecar's arguments go through modelfs' own option parser, so a misspelt or removed option
in a manifest fails here, and the memory limit is checked against the budget it really sets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfs.config import Config, add_options, build_config
from modelfs.metrics import parse_addr
from modelfs.mount import STOP_GRACE, is_mounted
from modelfs.testing.mounts import force_unmount

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


POD_IP = "10.1.2.3"


def expand(args: list[str], container: dict[str, Any]) -> list[str]:
    """``$(VAR)`` in args as the kubelet expands it, from the container's env (fieldRefs get
    a stand-in value); an undefined variable is an error here, not left as it is."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[item["name"]] = POD_IP

    def one(match: re.Match[str]) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) is not defined in the container's env"
        return env[match.group(1)]

    return [re.sub(r"\$\((\w+)\)", one, arg) for arg in args]


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
        self.config = sidecar_config(expand(self.sidecar["args"], self.sidecar))
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
    # SIGTERM stops it; an ExecStop that waits for the daemon would eat TimeoutStopSec first.
    assert "ExecStop" not in values
    assert float(values["TimeoutStopSec"]) > 2 * STOP_GRACE, "modelfs exits within 2 x STOP_GRACE of SIGTERM"
    assert values["Restart"] == "on-failure"
    # A config error (exit 2, see cli.main) is not restarted every 2 s forever.
    assert values["RestartPreventExitStatus"].split() == ["2"]
    assert "mountpoint" in values["ExecStartPost"], "active only once the mount answers"
    assert "fusermount3 -uz" in values["ExecStopPost"], "a dead mount is detached after a crash"
    assert "network-online.target" in dict(unit["Unit"])["After"]
    assert dict(unit["Install"])["WantedBy"] == "multi-user.target"


def _example_env_file(unit: Path) -> dict[str, str]:
    """The example /etc/modelfs/INSTANCE.env in the unit's leading comment, read the way
    systemd's EnvironmentFile= reads it: a line whose first non-blank is '#' is a comment;
    anything else is KEY=VALUE with the value taken whole (a trailing '# ...' included), only
    surrounding blanks dropped."""
    lines = unit.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"#\s+/etc/modelfs/\w+\.env:", line))
    env: dict[str, str] = {}
    for line in lines[start + 1 :]:
        match = re.fullmatch(r"#     (.*)", line)
        if match is None:  # the block's end (the systemctl line is indented less)
            break
        text = match.group(1).strip()
        if not text or text.startswith(("#", ";")):
            continue
        key, eq, value = text.partition("=")
        assert eq and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"not KEY=VALUE: {line!r}"
        env[key] = value.strip()
    return env


def test_the_units_example_env_file_is_what_systemd_and_modelfs_accept() -> None:
    """The example had '# comments' after values: systemd kept them in the values
    (systemd/systemd#12527), and modelfs refused MODELFS_MEMORY_CACHE='256M   # any option...'
    with exit 2, which RestartPreventExitStatus=2 made final."""
    env = _example_env_file(ROOT / "packaging" / "systemd" / "modelfs@.service")
    assert {"MODELFS_SOURCE", "MODELFS_MOUNTPOINT", "MODELFS_MEMORY_CACHE"} <= set(env), env
    for key, value in env.items():
        assert "#" not in value, f"{key}: systemd would keep the comment in the value: {value!r}"
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_options(parser)
    options = {k: v for k, v in env.items() if k not in ("MODELFS_SOURCE", "MODELFS_MOUNTPOINT")}
    config = build_config(env["MODELFS_SOURCE"], env["MODELFS_MOUNTPOINT"], parser.parse_args([]), environ=options)
    assert config.memory_cache == 256 << 20 and config.allow_other
    assert config.metrics_addr == "127.0.0.1:9101" and config.cache_dir == Path("/var/cache/modelfs/llama")


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


ENTRYPOINT = ROOT / "packaging" / "entrypoint.sh"


def relocate(args: list[str], root: Path) -> list[str]:
    """``args`` with every absolute path (also ``--opt=/path``) moved under ``root``: the
    container's file system, in a test's directory."""
    out = []
    for arg in args:
        flag, eq, value = arg.partition("=")
        if arg.startswith("/"):
            out.append(f"{root}{arg}")
        elif eq and flag.startswith("--") and value.startswith("/"):
            out.append(f"{flag}={root}{value}")
        else:
            out.append(arg)
    return out


def fake_modelfs(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A PATH whose ``modelfs`` only records its arguments and whether its third one (the
    mountpoint of ``mount SOURCE MOUNTPOINT``) is a directory when it runs; and the record."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record"
    fake = bin_dir / "modelfs"
    fake.write_text(
        '#!/bin/sh\nif [ -d "${3-}" ]; then echo dir; else echo missing; fi > "$RECORD"\n'
        'printf "%s\\n" "$@" >> "$RECORD"\n'
    )
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(record)}, record


def test_entrypoint_creates_the_manifests_mountpoint(pod: Pod, tmp_path: Path) -> None:
    """The sidecar mounts at a subdirectory of an emptyDir, which is fresh and empty on the
    pod's first start: the entrypoint creates it (modelfs refuses a missing mountpoint)."""
    root = tmp_path / "container"
    volume = root / pod.model_mount()["mountPath"].lstrip("/")
    volume.mkdir(parents=True)  # the emptyDir, as the kubelet hands it over
    args = relocate(expand(pod.sidecar["args"], pod.sidecar), root)
    env, record = fake_modelfs(tmp_path)
    subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, cwd=tmp_path, check=True, timeout=30)
    lines = record.read_text().splitlines()
    assert lines[0] == "dir", "modelfs ran before the mountpoint existed"
    assert lines[1:] == args, "the arguments reach modelfs unchanged"
    mountpoint = Path(args[2])
    assert mountpoint.parent == volume or volume in mountpoint.parents
    assert mountpoint.is_dir() and not any(mountpoint.iterdir())


def test_entrypoint_creates_the_mountpoint_of_the_env_form(tmp_path: Path) -> None:
    env, record = fake_modelfs(tmp_path)
    mountpoint = tmp_path / "models" / "model"
    env.update(MODELFS_SOURCE="gs://b/p", MODELFS_MOUNTPOINT=str(mountpoint))
    subprocess.run(["sh", str(ENTRYPOINT)], env=env, cwd=tmp_path, check=True, timeout=30)
    assert record.read_text().splitlines() == ["dir", "mount", "gs://b/p", str(mountpoint), "--foreground"]


def test_entrypoint_creates_nothing_when_options_come_first(tmp_path: Path) -> None:
    """With an option before SOURCE or MOUNTPOINT the script cannot tell which argument is
    the mountpoint: it creates nothing (never a directory named after SOURCE)."""
    env, record = fake_modelfs(tmp_path)
    work = tmp_path / "cwd"
    work.mkdir()
    mountpoint = tmp_path / "mnt"
    for args in (["mount", "--foreground", "gs:/b", str(mountpoint)], ["mount", "gs:/b", "-f", str(mountpoint)]):
        subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, cwd=work, check=True, timeout=30)
        assert record.read_text().splitlines()[1:] == args
    assert not mountpoint.exists() and not any(work.iterdir())


@pytest.mark.fuse
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")
def test_the_manifests_args_mount_through_the_entrypoint(pod: Pod, tmp_path: Path) -> None:
    """The sidecar's own arguments, run through the real entrypoint and modelfs against an
    empty emptyDir: the mount comes up (file:// stands in for the bucket, 127.0.0.1 for
    the pod IP, and the disk cache is kept small), and SIGTERM takes it down."""
    root = tmp_path / "container"
    volume = root / pod.model_mount()["mountPath"].lstrip("/")
    volume.mkdir(parents=True)
    source = tmp_path / "bucket"
    source.mkdir()
    (source / "config.json").write_text("{}")
    with socket.socket() as probe:  # a free port on loopback for --metrics-addr
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = relocate(expand(pod.sidecar["args"], pod.sidecar), root)
    args = [
        f"file://{source}"
        if arg == str(pod.config.source.url)
        else "--disk-cache=64M"
        if arg.startswith("--disk-cache=")
        else f"--metrics-addr=127.0.0.1:{port}"
        if arg.startswith("--metrics-addr=")
        else arg
        for arg in args
    ]
    assert args[1] == f"file://{source}", args
    mountpoint = Path(args[2])
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.Popen(
        ["sh", str(ENTRYPOINT), *args], env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # JSON log lines (--log-format=json), until the mount answers
            if line.startswith("{") and json.loads(line).get("message", "").startswith("ready"):
                break
            seen.append(line)
        else:
            raise AssertionError(f"modelfs exited ({proc.wait()}) before the mount was ready: {''.join(seen)}")
        assert (mountpoint / "config.json").read_text() == "{}"
        proc.send_signal(signal.SIGTERM)  # exec'd: the shell's pid is modelfs'
        _, err = proc.communicate(timeout=60)  # a guard against a hang only
        assert proc.returncode == 0, err
        assert not is_mounted(mountpoint)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reaped, its pipe closed
        force_unmount(mountpoint)


# --- the cache tier (issue 16): one source in modelfs/tierconf/, rendered into packaging/tier/

TIER = ROOT / "packaging" / "tier"


def test_tier_files_are_rendered_from_the_one_source() -> None:
    from modelfs.tierconf import (
        TierSettings,
        render_kubernetes,
        render_nginx,
        render_systemd,
        settings_for_source,
        tier_js,
    )

    settings = settings_for_source("gs://my-bucket")
    assert (TIER / "nginx.conf").read_text() == render_nginx(settings), "run: python -m modelfs.tierconf nginx"
    assert (TIER / "tier.js").read_text() == tier_js(), "run: python -m modelfs.tierconf js"
    assert (TIER / "modelfs-tier-fill.service").read_text() == render_systemd(settings), (
        "run: python -m modelfs.tierconf systemd"
    )
    assert (TIER / "kubernetes.yaml").read_text() == render_kubernetes(settings), (
        "run: python -m modelfs.tierconf kubernetes"
    )
    assert settings.slice == "8m" and TierSettings(origin="", allow=()).slice == "8m"


def test_tier_kubernetes_objects_carry_the_rendered_config() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((TIER / "kubernetes.yaml").read_text()) if d}
    assert set(docs) == {"ConfigMap", "Service", "StatefulSet", "NetworkPolicy"}
    assert docs["ConfigMap"]["data"]["nginx.conf"] == (TIER / "nginx.conf").read_text()
    assert docs["ConfigMap"]["data"]["tier.js"] == (TIER / "tier.js").read_text()
    nginx_conf = (TIER / "nginx.conf").read_text()
    port = int(re.search(r"listen (\d+) reuseport;", nginx_conf).group(1))  # type: ignore[union-attr]
    assert docs["Service"]["spec"]["ports"][0]["port"] == port
    assert docs["Service"]["spec"]["clusterIP"] == "None"  # each replica addressable by name
    spec = docs["StatefulSet"]["spec"]
    nginx = spec["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in nginx["volumeMounts"]}
    assert nginx["command"][:3] == ["nginx", "-c", f"{mounts['config']}/nginx.conf"]
    assert f"js_path {mounts['config']};" in nginx_conf
    assert f"proxy_cache_path {mounts['cache']} " in nginx_conf
    assert re.search(rf"js_var \$tier_token_file \"{re.escape(mounts['token'])}/token\";", nginx_conf)
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "cache"
    # The fill stage runs beside nginx, listening where nginx's upstream points, and GETs
    # through nginx's origin side.
    fill = next(c for c in spec["template"]["spec"]["containers"] if c["name"] == "fill")
    run_dir = {m["name"]: m["mountPath"] for m in fill["volumeMounts"]}["run"]
    assert run_dir == mounts["run"] and fill["command"][1:3] == ["-m", "modelfs.tierconf.fill"]
    assert f"server unix:{run_dir}/fill.sock;" in nginx_conf
    origin_side = fill["command"][fill["command"].index("--origin-side") + 1]
    assert f"listen {origin_side};" in nginx_conf and origin_side.startswith("127.0.0.1:")
    max_size = re.search(r"max_size=(\d+)g", nginx_conf).group(1)  # type: ignore[union-attr]
    claim = spec["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert quantity(claim) > int(max_size) << 30
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert policy["ingress"][0]["ports"] == [{"port": port}]


def test_tier_config_is_what_the_issue_asks_for() -> None:
    conf = (TIER / "nginx.conf").read_text()
    for directive in (
        "slice 8m;",
        # the raw path, as the origin gets it, and the size of the node's version
        'proxy_cache_key "$request_uri|$modelfs_version|$http_x_modelfs_size|$slice_range";',
        "proxy_pass_request_body off;",
        "proxy_set_header If-Match $http_if_match;",
        "proxy_cache_valid 200 206 3650d;",
        "proxy_cache_lock on;",
        "proxy_set_header Range $slice_range;",
        'proxy_set_header Authorization "";',
        "max_size=100g",
        " min_free=256m ",  # a full disk: the cache manager evicts, misses are cached again
        "worker_processes 4;",  # not auto: that counts the node's CPUs, not the pod's
        "location ~ ^(/download/storage/v1/b/my\\-bucket/o/|/storage/v1/b/my\\-bucket/o/)",
    ):
        assert directive in conf, directive


@pytest.mark.skipif(not Path("/usr/lib/nginx/modules/ngx_http_js_module.so").exists(), reason="needs njs")
def test_tier_config_passes_nginx_t(tmp_path: Path) -> None:
    from modelfs.tierconf import render_nginx, settings_for_source, tier_js

    for source in ("gs://b", "s3://b", "https://127.0.0.1:8443/models/"):
        settings = settings_for_source(
            source,
            origin="https://127.0.0.1:9" if source.startswith("s3") else None,
            cache_dir=str(tmp_path / "cache"),
            run_dir=str(tmp_path),
            js_dir=str(tmp_path),
            error_log=str(tmp_path / "error.log"),
            access_log=str(tmp_path / "access.log"),
        )
        if source.startswith("gs"):
            settings = settings.__class__(**{**vars(settings), "origin": "http://127.0.0.1:9"})
        (tmp_path / "tier.js").write_text(tier_js())
        (tmp_path / "nginx.conf").write_text(render_nginx(settings))
        done = subprocess.run(
            ["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "e.log")],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr


def test_tier_systemd_unit_runs_the_fill_stage_where_nginx_expects_it() -> None:
    unit = (TIER / "modelfs-tier-fill.service").read_text()
    conf = (TIER / "nginx.conf").read_text()
    start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1).split()  # type: ignore[union-attr]
    run_dir = start[start.index("--run-dir") + 1]
    assert start[1:3] == ["-m", "modelfs.tierconf.fill"]
    assert f"server unix:{run_dir}/fill.sock;" in conf and f"pid {run_dir}/nginx.pid;" in conf
    assert f"listen {start[start.index('--origin-side') + 1]};" in conf
    assert f"RuntimeDirectory={run_dir.removeprefix('/run/')}" in unit


def test_tier_config_refuses_what_it_cannot_serve() -> None:
    from modelfs.errors import ConfigError
    from modelfs.tierconf import settings_for_source
    from modelfs.tierconf.__main__ import main

    for bad in ("file:///x", "gs://", "s3://b"):  # s3 needs --origin
        with pytest.raises(ConfigError):
            settings_for_source(bad)
    with pytest.raises(ConfigError):
        settings_for_source("gs://b", origin="ftp://x")
    assert main(["nginx", "--source", "s3://b"]) == 2
    assert main(["nginx", "--workers", "auto"]) == 2
    assert main(["systemd", "--run-dir", "/var/lib/x"]) == 2  # systemd makes /run/NAME only


def test_metrics_never_on_all_addresses(pod: Pod) -> None:
    """Metrics listen on the pod's own IP (from the downward API), not 0.0.0.0: with
    hostNetwork or a node port that would publish them on the host."""
    assert pod.config.metrics_addr is not None
    host, _ = parse_addr(pod.config.metrics_addr)
    assert host in ("127.0.0.1", "::1", POD_IP), pod.config.metrics_addr


def test_stop_fits_the_grace_period(pod: Pod) -> None:
    """modelfs is done 2 x STOP_GRACE after SIGTERM; the pod waits longer before its SIGKILL."""
    assert pod.spec.get("terminationGracePeriodSeconds", 30) > 2 * STOP_GRACE


def test_no_example_binds_all_addresses() -> None:
    for path in (ROOT / "packaging").rglob("*"):
        if path.is_file():
            assert "0.0.0.0" not in path.read_text(), path


@pytest.mark.parametrize(
    ("slice_size", "max_fills", "limit"),
    [("8m", 32, "512Mi"), ("64m", 4, "512Mi"), ("256m", 2, "768Mi"), ("1m", 32, "288Mi")],
)
def test_the_fill_stages_memory_follows_the_slice_size(slice_size: str, max_fills: int, limit: str) -> None:
    """The fill stage holds up to --max-fills slices at once: a large slice (the nodes'
    --block-size, up to 256M) gets fewer of them and a limit that holds them (32 slices of
    64m were 2 GiB under a fixed 512Mi limit)."""
    from modelfs.tierconf import render_kubernetes, render_systemd, settings_for_source

    settings = settings_for_source("gs://my-bucket", slice=slice_size)
    docs = {d["kind"]: d for d in yaml.safe_load_all(render_kubernetes(settings)) if d}
    [fill] = [c for c in docs["StatefulSet"]["spec"]["template"]["spec"]["containers"] if c["name"] == "fill"]
    assert fill["command"][-2:] == ["--max-fills", str(max_fills)]
    assert fill["resources"]["limits"]["memory"] == limit
    assert f"--max-fills {max_fills}" in render_systemd(settings)


def test_tier_workers_are_fixed_not_counted_from_the_node() -> None:
    """``worker_processes auto`` counts the node's CPUs inside a pod (96 on a big node), each
    worker costing memory under the pod's 1Gi limit: the count is a setting, 4 by default."""
    from modelfs.tierconf import render_nginx, settings_for_source

    assert re.search(r"^worker_processes 4;$", render_nginx(settings_for_source("gs://b")), re.M)
    assert re.search(r"^worker_processes 12;$", render_nginx(settings_for_source("gs://b", workers="12")), re.M)
    assert "worker_processes auto" not in (TIER / "nginx.conf").read_text()
