"""Build and run the modelfs image with podman on a machine that reaches no image registry.

The recipe (see the Dockerfile): a Debian bookworm base is made locally with ``debootstrap
--variant=minbase`` from the mirror the machine's apt sources name and imported as
``localhost/debian:bookworm`` (kept in podman's storage, so later runs skip it); the image is
built with ``--network host`` from that base, with the host's apt sources and CA bundle
bind-mounted into the build. ``containers.conf`` selects runc (crun fails on a hybrid cgroup
v1/v2 host) and sets ulimits. Containers run ``--privileged --device /dev/fuse --network host``
(podman's default bridge would rewrite the host's firewall).

Every subprocess has a timeout; a failure raises :class:`ContainerError` with the command's
last lines of output, so a broken build reads as one clear error.

The debootstrapped root is kept as a tarball (``/var/cache/modelfs/``), so a machine whose
podman storage was reset imports it again in seconds; the fresh-root test (tests/fresh) runs
the same base as a bare Debian machine. Under nested podman (this recipe run inside a
container, whose /var/lib/containers is on overlayfs, where the overlay driver cannot work)
the storage driver is ``vfs``.

``python -m modelfs.testing.container`` builds the image (``--tag``, default
``localhost/modelfs:test``) the same way the container tests do.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "BASE_IMAGE",
    "PACKAGES",
    "ContainerError",
    "Podman",
    "apt_mirror",
    "base_tarball",
    "ca_bundle",
    "ensure_tools",
    "exclusive",
    "is_mount_point",
    "shared_mount",
    "storage_driver",
]

#: Debian packages the recipe needs (as root; rootless podman would need uidmap and more).
PACKAGES = ("podman", "runc", "debootstrap")
#: Where the debootstrapped base is kept between runs on one machine.
TARBALL_DIR = Path("/var/cache/modelfs")
GRAPH_ROOT = Path("/var/lib/containers/storage")
BASE_IMAGE = "localhost/debian:bookworm"
SUITE = "bookworm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CONTAINERS_CONF = """\
# Written by modelfs.testing.container.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
# crun fails on a host with a hybrid cgroup v1/v2 setup; runc works on both.
runtime = "runc"
"""


class ContainerError(RuntimeError):
    """A step of building or running the container failed; the message says which and why."""


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(
    args: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    what: str | None = None,
    check: bool = True,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout; on failure or timeout raise ContainerError with its output."""
    label = what or " ".join(args[:3])
    try:
        result = subprocess.run(list(args), env=env, capture_output=True, timeout=timeout, check=False, input=stdin)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        raise ContainerError(f"{label}: timed out after {timeout:.0f} s\n{_tail(out)}") from None
    except FileNotFoundError:
        raise ContainerError(f"{label}: {args[0]} is not installed") from None
    done = subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    )
    if check and done.returncode != 0:
        raise ContainerError(f"{label}: exit {done.returncode}\n{_tail(done.stdout + done.stderr)}")
    return done


def ensure_tools(packages: Sequence[str] = PACKAGES) -> None:
    """Install the recipe's Debian packages if a command is missing (root only)."""
    missing = [p for p in packages if shutil.which(p) is None and not Path(f"/usr/sbin/{p}").exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ContainerError(f"need root to install {' '.join(missing)} (apt-get install {' '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], timeout=300, env=env, what="apt-get update")
    run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        timeout=900,
        env=env,
        what=f"apt-get install {' '.join(missing)}",
    )


def _apt_source_files() -> list[Path]:
    files = [Path("/etc/apt/sources.list")]
    directory = Path("/etc/apt/sources.list.d")
    if directory.is_dir():
        files += sorted(p for p in directory.iterdir() if p.suffix in (".list", ".sources"))
    return [f for f in files if f.is_file()]


def apt_mirror(suite: str = SUITE) -> str:
    """The first Debian mirror in the machine's apt sources that serves ``suite`` itself."""
    for path in _apt_source_files():
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":  # deb822 stanzas
            for stanza in text.split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith((" ", "#")):
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.strip()
                if (
                    "deb" in fields.get("types", "").split()
                    and suite in fields.get("suites", "").split()
                    and fields.get("enabled", "yes").lower() != "no"
                ):
                    return fields["uris"].split()[0].rstrip("/")
        else:
            for line in text.splitlines():
                words = [w for w in line.split("#", 1)[0].split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite and "]" not in words[1]:
                    return words[1].rstrip("/")
    return "http://deb.debian.org/debian"


def _mount_fstype(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (or its nearest existing ancestor)."""
    target = Path(os.path.realpath(path))
    while not target.exists() and target != target.parent:
        target = target.parent
    best, fstype = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split()[4].encode().decode("unicode_escape")
            inside = str(target) == point or str(target).startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, fstype = point, right.split()[0]
    return fstype


def storage_driver(graph_root: Path = GRAPH_ROOT) -> str | None:
    """``vfs`` when podman's storage would lie on overlayfs (podman run inside a container: the
    overlay driver cannot stack on it), else None (podman's own choice)."""
    return "vfs" if _mount_fstype(graph_root) == "overlay" else None


def ca_bundle() -> Path | None:
    """The CA bundle pip uses on this machine (PIP_CERT, else the system bundle), for the build."""
    for candidate in (os.environ.get("PIP_CERT"), str(CA_BUNDLE)):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def base_tarball(suite: str = SUITE, directory: Path = TARBALL_DIR) -> Path:
    """A tar of a ``debootstrap --variant=minbase`` root of ``suite`` (apt's lists and .debs
    removed), made once per machine and kept in ``directory``. Callers hold :func:`exclusive`."""
    arch = run(["dpkg", "--print-architecture"], timeout=30).stdout.strip()
    tarball = directory / f"debian-{suite}-minbase-{arch}.tar"
    if tarball.is_file():
        return tarball
    ensure_tools()
    mirror = apt_mirror(suite)
    directory.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="modelfs-rootfs-", dir="/var/tmp"))
    try:
        rootfs = work / "rootfs"
        run(
            ["debootstrap", "--variant=minbase", suite, str(rootfs), mirror],
            timeout=900,
            what=f"debootstrap {suite} from {mirror}",
        )
        # apt's package lists and downloaded .debs are ~80 MB a fresh machine does not have.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / junk).glob("*"):
                if entry.is_file():
                    entry.unlink()
        partial = directory / f".{tarball.name}.{os.getpid()}"
        run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], timeout=600, what="tar the debootstrapped root")
        partial.rename(tarball)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tarball


LOCK_FILE = Path("/var/tmp/modelfs-podman.lock")


@contextmanager
def exclusive(timeout: float = 1800, lock_file: Path = LOCK_FILE) -> Iterator[None]:
    """Hold the machine-wide lock of this recipe: two test runs at once would import the base
    twice and replace each other's image under the same tag while the other still uses it."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ContainerError(f"{lock_file} is still held by another run after {timeout:.0f} s") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Podman:
    """podman with this recipe's containers.conf (written under ``state_dir``)."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        conf = state_dir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.state_dir = state_dir
        self.env = dict(os.environ, CONTAINERS_CONF=str(conf))
        driver = storage_driver()
        if driver:  # every call the same driver: podman's database remembers the first one
            storage = state_dir / "storage.conf"
            storage.write_text(
                f'[storage]\ndriver = "{driver}"\nrunroot = "/run/containers/storage"\ngraphroot = "{GRAPH_ROOT}"\n'
            )
            self.env["CONTAINERS_STORAGE_CONF"] = str(storage)

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run(["podman", *args], timeout=timeout, env=self.env, what=f"podman {args[0]}", check=check, stdin=stdin)

    def image_id(self, ref: str) -> str | None:
        result = self("image", "inspect", "--format", "{{.Id}}", ref, check=False, timeout=60)
        return result.stdout.strip() if result.returncode == 0 else None

    def ensure_base_image(self, ref: str = BASE_IMAGE, suite: str = SUITE) -> bool:
        """Import the debootstrapped Debian base (:func:`base_tarball`) unless podman already has
        it. True if imported now."""
        if self("image", "exists", ref, check=False, timeout=60).returncode == 0:
            return False
        tarball = base_tarball(suite)
        self("import", str(tarball), ref, timeout=600)
        return True

    def build(self, context: Path, tag: str, base: str = BASE_IMAGE, timeout: float = 1800) -> str:
        """``podman build`` the Dockerfile in ``context`` from ``base``; returns the image id.

        The previous image under ``tag`` (and its unshared layers) is removed once the new one
        exists, so repeated runs do not pile up images. The build stage is tagged too
        (``<tag>-build``), which keeps its layers (apt, the compiled pyfuse3) cached.
        """
        repo, _, version = tag.rpartition(":")
        build_tag = f"{repo}-build:{version}"
        previous = {t: self.image_id(t) for t in (tag, build_tag)}
        volumes: list[str] = []
        for source in (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d")):
            if source.exists():  # the build's apt uses the machine's mirrors
                volumes += ["-v", f"{source}:{source}:ro"]
        args = ["build", "--network", "host", "--jobs", "2", "--build-arg", f"BASE_IMAGE={base}", *volumes]
        bundle = ca_bundle()
        if bundle is not None:
            args += ["-v", f"{bundle}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"]
        self._build([*args, "-t", tag, str(context)], "build.log", timeout)
        # Same arguments, last stage = build: all cached, only names the build stage.
        self._build([*args, "--target", "build", "-t", build_tag, str(context)], "build-stage.log", timeout)
        for ref, old in previous.items():
            if old is not None and old != self.image_id(ref):
                self("rmi", old, check=False, timeout=120)
        image = self.image_id(tag)
        assert image is not None
        return image

    def _build(self, args: list[str], log_name: str, timeout: float) -> None:
        result = self(*args, timeout=timeout, check=False)
        log = self.state_dir / log_name
        log.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise ContainerError(
                f"podman build: exit {result.returncode} (whole log: {log})\n" + _tail(result.stdout + result.stderr)
            )


def is_mount_point(path: Path, fstype_prefix: str = "") -> bool:
    """Whether the host's mount table has a mount at ``path`` (of a type starting with the prefix)."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if (
                len(fields) > 2
                and fields[1].encode().decode("unicode_escape") == target
                and fields[2].startswith(fstype_prefix)
            ):
                return True
    return False


def _fuse_mounts_under(path: Path) -> list[str]:
    top = os.path.realpath(path)
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2].startswith("fuse"):
                target = fields[1].encode().decode("unicode_escape")
                if target == top or target.startswith(top + "/"):
                    found.append(target)
    return found


@contextmanager
def shared_mount(path: Path) -> Iterator[Path]:
    """Make ``path`` a shared mount point (bind it onto itself, ``--make-rshared``), so a mount
    made under it inside a container's mount namespace (``-v PATH:...:rshared``) shows up on the
    host; on exit whatever is left is detached (a dead FUSE mount too) and the bind removed."""
    path.mkdir(parents=True, exist_ok=True)
    run(["mount", "--bind", str(path), str(path)], timeout=30)
    try:
        run(["mount", "--make-rshared", str(path)], timeout=30)
        yield path
    finally:
        for target in reversed(_fuse_mounts_under(path)):
            run(["fusermount3", "-uz", target], timeout=30, check=False)
        run(["umount", "-l", str(path)], timeout=30, check=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the modelfs image with podman from a local Debian base.")
    parser.add_argument("--tag", default="localhost/modelfs:test")
    parser.add_argument("--context", default=str(Path(__file__).resolve().parents[2]))
    parser.add_argument("--state-dir", default="/var/tmp/modelfs-podman")
    args = parser.parse_args(argv)
    try:
        ensure_tools()
        podman = Podman(Path(args.state_dir))
        with exclusive():
            start = time.monotonic()
            if podman.ensure_base_image():
                print(f"base image {BASE_IMAGE} built in {time.monotonic() - start:.0f} s", flush=True)
            start = time.monotonic()
            image = podman.build(Path(args.context), args.tag)
        print(f"{args.tag} ({image[:12]}) built in {time.monotonic() - start:.0f} s")
    except ContainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
