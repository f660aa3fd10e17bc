"""A bare Debian machine for the README's commands: a ``debootstrap --variant=minbase`` root
(the container tests' base, :mod:`modelfs.testing.container`) run as a privileged podman
container, with the committed tree copied in.

Into the root goes only what this machine needs to reach the package registries: its apt
sources (and the apt settings and keyrings they use), its extra CA certificates (as Debian's
``/usr/local/share/ca-certificates``, so the root's own bundle trusts what this machine
trusts once ``ca-certificates`` is installed there), a ``pip.conf`` with this machine's pip
settings (less those naming local files the root does not have) and the proxy variables.
The container shares the host network (the registries, and loopback for the tests' own
servers) and has /dev/fuse; catatonit is its PID 1, so daemons that detach are reaped as on
a real machine. Inside, ``MODELFS_FRESH_ROOT=1`` keeps the test run from recursing into the
fresh-root test.
"""

from __future__ import annotations

import ast
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from modelfs.testing.container import BASE_IMAGE, CA_BUNDLE, PACKAGES, Podman, ensure_tools, exclusive

__all__ = [
    "FRESH_ENV",
    "WALL_TIMES",
    "FreshRoot",
    "Result",
    "collection_counts",
    "fresh_root",
    "host_access",
    "pip_config",
    "readme_commands",
    "tree_archive",
]

#: Set inside the fresh root: the test run there does not run the fresh-root test again.
FRESH_ENV = "MODELFS_FRESH_ROOT"
#: The fresh-root test's property with each command's wall time, which the run's summary shows.
WALL_TIMES = "fresh root wall times"
#: Where the tree goes in the root: a user's clone in root's home.
TREE = "/root/modelfs"
#: Left out when the tree is copied from disk (no git metadata): what a clone would not have.
_NOT_COMMITTED = {
    ".git",
    ".venv",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "build",
    "dist",
    ".bench",
}


def readme_commands(readme: Path) -> list[str]:
    """The commands of the first ``sh`` block under the README's "Two commands" heading, with
    their comments removed: [the demo's, the tests']."""
    lines = readme.read_text().splitlines()
    try:
        heading = next(i for i, line in enumerate(lines) if line.startswith("## Two commands"))
        fence = next(i for i in range(heading, len(lines)) if lines[i].strip() == "```sh")
        end = next(i for i in range(fence + 1, len(lines)) if lines[i].strip() == "```")
    except StopIteration:
        raise ValueError(f"{readme}: no ```sh block under a '## Two commands' heading") from None
    commands = [shlex.join(words) for line in lines[fence + 1 : end] if (words := shlex.split(line, comments=True))]
    if len(commands) != 2:
        raise ValueError(f"{readme}: expected two commands under '## Two commands', found {commands}")
    return commands


def collection_counts(output: str) -> tuple[int, int]:
    """(selected, deselected) from the closing line of ``pytest --collect-only -q``
    (``1064/1065 tests collected (1 deselected) in 2.50s``)."""
    found = re.search(r"^(\d+)(?:/\d+)? tests? collected(?: \((\d+) deselected\))?", output, re.MULTILINE)
    if not found:
        raise ValueError(f"no collection count in: {output[-500:]!r}")
    return int(found.group(1)), int(found.group(2) or 0)


def tree_archive(root: Path) -> tuple[bytes, str]:
    """A tar of the committed tree (``git archive HEAD``) and how it was made; without git
    metadata (a tree unpacked from a tarball), of the files on disk less venvs and caches."""
    if (root / ".git").exists() and shutil.which("git"):
        result = subprocess.run(
            ["git", "-C", str(root), "archive", "--format=tar", "HEAD"], capture_output=True, timeout=120, check=False
        )
        if result.returncode == 0:
            head = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            )
            return result.stdout, f"git archive HEAD ({head.stdout.strip()})"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            if _NOT_COMMITTED & set(relative.parts) or relative.parts[0].endswith(".egg-info"):
                continue
            if path.is_file() or path.is_symlink() or path.is_dir():
                tar.add(path, arcname=str(relative), recursive=False)
    return buffer.getvalue(), f"the files under {root} (no git metadata)"


def pip_config(listing: str) -> str:
    """This machine's pip settings (``pip config list`` output) as one pip.conf, less values
    naming local files or file:// indexes (the root has none of them); a CA bundle becomes
    the root's own bundle, which trusts what this machine trusts (see :func:`host_access`)."""
    sections: dict[str, dict[str, str]] = {}
    env: dict[str, str] = {}
    for line in listing.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        try:
            text = str(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            continue
        if key in ("cert", "client-cert"):
            kept = str(CA_BUNDLE) if key == "cert" else ""
        else:
            kept = " ".join(w for w in text.split() if not w.startswith(("/", "file:", "~", ".")))
        if kept:
            (env if section == ":env:" else sections.setdefault(section, {}))[key] = kept
    if env:
        sections.setdefault("global", {}).update(env)  # the environment overrides the files
    return "".join(
        f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) for section, values in sections.items()
    )


def _host_pip_config() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=False
    )
    return pip_config(result.stdout)


#: apt settings that decide whether a mirror can be reached: proxies, TLS, snapshot mirrors.
_APT_ACCESS = ("::Proxy", "::proxy", "CaInfo", "Verify-Peer", "Check-Valid-Until", "Check-Date")


def _signed_by(sources: list[Path]) -> set[Path]:
    keys = set()
    for path in sources:
        for line in path.read_text(errors="replace").splitlines():
            for word in line.replace("[", " ").replace("]", " ").split():
                if word.lower().startswith("signed-by="):
                    keys.add(Path(word.split("=", 1)[1]))
            if line.lower().startswith("signed-by:"):
                keys.add(Path(line.split(":", 1)[1].strip()))
    return {k for k in keys if k.is_absolute() and k.is_file()}


def host_access(work: Path) -> tuple[list[str], dict[str, str]]:
    """podman ``-v`` arguments and environment that let the root reach the package registries
    as this machine does. Generated files go under ``work``."""
    volumes: list[str] = []

    def bind(source: Path, target: Path | None = None) -> None:
        volumes.extend(["-v", f"{source}:{target or source}:ro"])

    apt = Path("/etc/apt")
    sources = [apt / "sources.list"] if (apt / "sources.list").is_file() else []
    if (apt / "sources.list.d").is_dir():
        sources += sorted(p for p in (apt / "sources.list.d").iterdir() if p.suffix in (".list", ".sources"))
        bind(apt / "sources.list.d")
    if (apt / "sources.list").is_file():
        bind(apt / "sources.list")
    else:  # the root's own sources.list would name the mirror a second time
        (work / "sources.list").write_text("")
        bind(work / "sources.list", apt / "sources.list")
    for conf in sorted((apt / "apt.conf.d").glob("*")) if (apt / "apt.conf.d").is_dir() else []:
        text = conf.read_text(errors="replace") if conf.is_file() else ""
        if any(setting in text for setting in _APT_ACCESS):
            bind(conf)
    for auth in (apt / "auth.conf", apt / "auth.conf.d"):
        if auth.exists():
            bind(auth)
    for key in sorted(_signed_by(sources)):
        bind(key)

    local_cas = Path("/usr/local/share/ca-certificates")
    if local_cas.is_dir() and any(local_cas.rglob("*.crt")):
        bind(local_cas)
    elif CA_BUNDLE.is_file():
        bind(CA_BUNDLE, local_cas / "host-bundle.crt")

    pip_conf = work / "pip.conf"
    pip_conf.write_text(_host_pip_config())
    bind(pip_conf, Path("/etc/pip.conf"))

    proxies = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
    env = {k: os.environ[k] for k in proxies if os.environ.get(k)}
    return volumes, env


@dataclass
class Result:
    command: str
    returncode: int
    seconds: float
    log: Path

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.strip().splitlines()[-lines:])


@dataclass
class FreshRoot:
    """A running bare root; :meth:`sh` runs a command in the tree as a user's shell would."""

    podman: Podman
    name: str
    work: Path
    env: dict[str, str]

    def sh(self, command: str, *, timeout: float, log_name: str) -> Result:
        """``sh -c COMMAND`` in the tree, as root, no stdin; output into ``work/log_name``."""
        log = self.work / log_name
        env_args = [a for k, v in self.env.items() for a in ("-e", f"{k}={v}")]
        args = ["podman", "exec", "-w", TREE, *env_args, self.name, "sh", "-c", command]
        start = time.monotonic()
        with open(log, "wb") as out:
            try:
                code = subprocess.run(
                    args,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=self.podman.env,
                    timeout=timeout,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                code = -1
                out.write(f"\n[fresh root: timed out after {timeout:.0f} s]\n".encode())
        return Result(command, code, time.monotonic() - start, log)


@contextmanager
def fresh_root(podman: Podman, tree: bytes, work: Path) -> Iterator[FreshRoot]:
    """Start the base image as a bare machine with ``tree`` unpacked at /root/modelfs; remove
    it (and everything the commands made in it) on exit."""
    ensure_tools((*PACKAGES, "catatonit"))
    with exclusive():
        podman.ensure_base_image()
    volumes, env = host_access(work)
    # The root's podman storage on this machine's disk, as a real machine's would be, not in the
    # container's own overlayfs layer: there podman can only use the vfs driver, which copies
    # the whole root for every image layer (12 GB for the container tests' builds, which filled
    # a CI machine's disk); here it uses overlay (about 1 GB).
    storage = work / "containers"
    storage.mkdir()
    volumes += ["-v", f"{storage}:/var/lib/containers"]
    init = ["--init", "--init-path", shutil.which("catatonit") or "/usr/bin/catatonit"]
    name = f"modelfs-fresh-{uuid.uuid4().hex[:8]}"
    try:
        podman(
            "run", "-d", "--name", name, "--privileged", "--device", "/dev/fuse", "--network", "host", *init,
            *volumes, BASE_IMAGE, "sleep", "infinity", timeout=300,
        )  # fmt: skip
        podman("exec", "-i", name, "sh", "-c", f"mkdir -p {TREE} && tar -x -C {TREE}", stdin=tree, timeout=300)
        yield FreshRoot(podman, name, work, {**env, FRESH_ENV: "1", "HOME": "/root"})
    finally:
        podman("rm", "-f", "-t", "10", name, check=False, timeout=600)
        # Gigabytes of image layers: not left for pytest's retention of the last three runs.
        shutil.rmtree(storage, ignore_errors=True)
