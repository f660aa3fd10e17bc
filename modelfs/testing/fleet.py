"""A fleet on one machine: hosts in network namespaces on one bridge, for the cache tier tests.

:func:`fleet_network` makes a hub namespace holding a bridge and, for each host, a namespace
joined to it by a veth pair (``eth0`` inside, MTU 65000 so an interface's byte counter is
within ~0.1% of the payload it carried). Every address lives inside namespaces made here
(``10.77.N.0/24``, N random), so nothing on the machine's own network changes, and everything
is deleted on exit, however the test ended.

Processes run in a host's network namespace only (``nsenter --net``), not its mount namespace
(``ip netns exec`` would unshare that too): a modelfs mount started in a node stays visible to
the test. :func:`call_in_netns` runs a Python function in a thread that joined a namespace,
so the test can reach any host directly. :class:`TierReplica` runs the cache tier's nginx
(the config rendered by :mod:`modelfs.tierconf`, as shipped) and its fill stage in a host.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from hashlib import md5
from pathlib import Path
from typing import TypeVar

from modelfs.testing.fakegcs import binary_path
from modelfs.testing.nginx import nginx_binary
from modelfs.testing.processes import stop_process
from modelfs.tierconf import TierSettings, render_nginx, settings_for_source, tier_js
from modelfs.tierconf.fill import FILL_SOCKET

__all__ = [
    "LOOPBACK",
    "Host",
    "Network",
    "TierReplica",
    "call_in_netns",
    "fleet_network",
    "node_env",
    "node_mount",
    "origin_gcs",
    "tier_replica",
    "tx_bytes",
    "wait_for_port",
]

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000
_MTU = 65000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    """One host: its namespace and its address on the fleet's bridge."""

    netns: str
    addr: str

    def command(self, *argv: str) -> list[str]:
        """``argv`` run with this host's network (and the caller's mounts)."""
        if not self.netns:  # LOOPBACK: this machine's own network
            return list(argv)
        return ["nsenter", f"--net=/run/netns/{self.netns}", *argv]


#: The machine itself, for a tier on 127.0.0.1 in front of a loopback origin.
LOOPBACK = Host("", "127.0.0.1")


@dataclass
class Network:
    hub: str
    hosts: dict[str, Host] = field(default_factory=dict)


@contextmanager
def fleet_network(names: Sequence[str]) -> Iterator[Network]:
    """Hosts called ``names`` on one bridge; every namespace is deleted on exit."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None:
        raise RuntimeError("a fleet needs root, iproute2 and nsenter (scripts/setup.sh installs them)")
    tag = secrets.token_hex(3)
    subnet = f"10.77.{secrets.randbelow(250) + 1}"
    network = Network(hub=f"mfs{tag}-hub")
    made: list[str] = []
    try:
        _ip("netns", "add", network.hub)
        made.append(network.hub)
        _ip("-n", network.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", network.hub, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            netns = f"mfs{tag}-{name}"
            _ip("netns", "add", netns)
            made.append(netns)
            _ip("-n", netns, "link", "set", "lo", "up")
            # Both ends made in the host's namespace, then one moved to the hub: names are
            # per namespace, so every host can call its end eth0.
            _ip("-n", netns, "link", "add", "eth0", "mtu", str(_MTU), "type", "veth", "peer", "name", f"p{i}")
            _ip("-n", netns, "link", "set", f"p{i}", "netns", network.hub)
            _ip("-n", network.hub, "link", "set", f"p{i}", "mtu", str(_MTU), "master", "br0", "up")
            addr = f"{subnet}.{i + 2}"
            _ip("-n", netns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            network.hosts[name] = Host(netns, addr)
        yield network
    finally:
        for netns in reversed(made):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


def call_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """``fn()`` in a new thread that joined ``netns``: its sockets are that host's."""
    if not netns:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def wait_for_port(host: Host, port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Return once ``host:port`` accepts connections; raise if ``process`` died or time ran out."""

    def probe() -> bool:
        try:
            with socket.create_connection((host.addr, port), timeout=1):
                return True
        except OSError:
            return False

    deadline = time.monotonic() + timeout
    while not call_in_netns(host.netns, probe):
        if process.poll() is not None:
            raise RuntimeError(f"the server for {host.addr}:{port} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {host.addr}:{port} after {timeout:.0f} s")
        time.sleep(0.05)


def tx_bytes(host: Host) -> int:
    """Bytes ``host`` has sent on its fleet interface: what it served to the others."""
    out = subprocess.run(
        ["ip", "-n", host.netns, "-s", "-j", "link", "show", "eth0"], capture_output=True, text=True, check=True
    ).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


@contextmanager
def origin_gcs(host: Host, root: Path, port: int = 4443) -> Iterator[str]:
    """fake-gcs-server (filesystem backend under ``root``) on ``host``; yields its URL."""
    root.mkdir(parents=True, exist_ok=True)
    argv = host.command(
        str(binary_path()),
        *("-scheme", "http", "-host", host.addr, "-port", str(port)),
        *("-backend", "filesystem", "-filesystem-root", str(root), "-log-level", "error"),
    )
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(host, port, process)
        yield f"http://{host.addr}:{port}"
    finally:
        stop_process(process)


@dataclass
class TierReplica:
    """One cache tier replica on a host: nginx running the shipped config, and its fill stage."""

    host: Host
    port: int
    workdir: Path
    settings: TierSettings
    process: subprocess.Popen[bytes]  # nginx's master
    fill: subprocess.Popen[bytes]  # python -m modelfs.tierconf.fill, the leader of the process group

    @property
    def url(self) -> str:
        return f"http://{self.host.addr}:{self.port}"

    @property
    def pgid(self) -> int:
        """The process group of nginx (master and workers) and the fill stage."""
        return self.fill.pid

    def kill(self) -> None:
        """SIGKILL nginx, its workers and the fill stage at once: the replica is gone mid-response."""
        if self.fill.poll() is None or self.process.poll() is None:
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.fill.wait()

    def cache_file(self, key: str) -> Path:
        """Where nginx keeps the entry of ``key`` (proxy_cache_path levels=1:2)."""
        digest = md5(key.encode()).hexdigest()
        return Path(self.settings.cache_dir) / digest[-1] / digest[-3:-1] / digest

    def access_log(self) -> str:
        path = Path(self.settings.access_log)
        return path.read_text() if path.exists() else ""


@contextmanager
def tier_replica(
    host: Host,
    workdir: Path,
    source: str,
    origin: str,
    *,
    slice_size: str = "8m",
    port: int = 8080,
    origin_side_port: int = 8081,
    **overrides: str,
) -> Iterator[TierReplica]:
    """The cache tier for ``source`` on ``host``, its config rendered as packaging/ ships it."""
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = {"token_file": "", "user": "root", **overrides}  # root: workers reach pytest's tmp dir
    settings = settings_for_source(
        source,
        origin=origin,
        listen=f"{host.addr}:{port}",
        origin_side=f"127.0.0.1:{origin_side_port}",  # the host's own loopback
        slice=slice_size,
        cache_dir=str(workdir / "cache"),
        max_size="4g",
        run_dir=str(workdir),
        js_dir=str(workdir),
        error_log=str(workdir / "error.log"),
        access_log=str(workdir / "access.log"),
        **overrides,
    )
    (workdir / "tier.js").write_text(tier_js())
    (workdir / "nginx.conf").write_text(render_nginx(settings))
    with open(workdir / "fill.log", "ab") as fill_log:
        fill = subprocess.Popen(
            host.command(
                sys.executable,
                "-m",
                "modelfs.tierconf.fill",
                "--run-dir",
                str(workdir),
                "--origin-side",
                settings.origin_side,
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=fill_log,
            process_group=0,  # its own process group, which nginx joins: kill() takes them all
        )
    argv = host.command(
        nginx_binary(), "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", str(workdir / "error.log")
    )
    try:
        process = subprocess.Popen(
            [*argv, "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            process_group=fill.pid,
        )
    except BaseException:
        os.killpg(fill.pid, signal.SIGKILL)
        fill.wait()
        raise
    replica = TierReplica(host, port, workdir, settings, process, fill)
    try:
        wait_for_port(host, port, process)
        _wait_for_socket(workdir / FILL_SOCKET, fill)
        yield replica
    finally:
        replica.kill()


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Return once the fill stage accepts connections on ``path``."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(str(path))
                return
            except OSError:
                pass
        if process.poll() is not None:
            raise RuntimeError(f"the tier's fill stage exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the tier's fill stage does not listen on {path} after {timeout:.0f} s")
        time.sleep(0.05)


def node_env(origin: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a modelfs node: the origin is the emulator at ``origin``."""
    return dict(os.environ, STORAGE_EMULATOR_HOST=origin, **(extra or {}))


@contextmanager
def node_mount(
    host: Host, source: str, mountpoint: Path, cache_dir: Path, *options: str, env: Mapping[str, str]
) -> Iterator[Path]:
    """``modelfs mount`` with the daemon's network in ``host``; unmounted on exit, whatever happens."""
    from modelfs.testing.mounts import _wait_gone, force_unmount, run_modelfs

    mountpoint.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        stack.callback(_wait_gone, cache_dir)
        stack.callback(force_unmount, mountpoint)
        done = subprocess.run(
            host.command(
                sys.executable,
                "-m",
                "modelfs",
                "mount",
                source,
                str(mountpoint),
                "--cache-dir",
                str(cache_dir),
                "--anonymous",
                *options,
            ),
            capture_output=True,
            text=True,
            env=dict(env),
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"modelfs mount on {host.netns} failed ({done.returncode}): {done.stderr.strip()}")
        stack.callback(run_modelfs, "unmount", str(mountpoint), env=env, timeout=60)
        yield mountpoint
