"""A memory cgroup for tests and benchmarks: run the daemon under a hard memory limit.

Works on cgroup v1 (a child of this process's own memory cgroup) and v2 (a child of the root,
with the memory controller enabled there). The group is created on entry and removed on exit;
processes still in it are moved back to the parent first. ``oom_kills`` and ``failcnt`` say
whether the kernel had to kill or refuse; ``peak`` is the group's high-water mark (it counts
page cache charged to the group too).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["MemoryCgroup", "cgroup_version"]

_ROOT = Path("/sys/fs/cgroup")


def cgroup_version() -> int | None:
    """1 when the memory controller is mounted as v1, 2 for the unified hierarchy, else None."""
    if (_ROOT / "memory" / "memory.limit_in_bytes").exists():
        return 1
    controllers = _ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return 2
    return None


def _own_v1_memory_dir() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            candidate = _ROOT / "memory" / path.lstrip("/")
            if candidate.is_dir():
                return candidate
    return _ROOT / "memory"


class MemoryCgroup:
    """``with MemoryCgroup(limit) as cg: subprocess.run(cg.wrap(argv))``."""

    def __init__(self, limit: int, prefix: str = "modelfs-test") -> None:
        version = cgroup_version()
        if version is None:
            raise RuntimeError("no cgroup memory controller on this machine")
        self.version = version
        self.limit = limit
        name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        if version == 1:
            self.parent = _own_v1_memory_dir()
        else:
            self.parent = _ROOT
        self.path = self.parent / name

    # --- lifecycle

    def __enter__(self) -> MemoryCgroup:
        if self.version == 2:
            control = self.parent / "cgroup.subtree_control"
            if "memory" not in control.read_text().split():
                control.write_text("+memory")
        self.path.mkdir()
        try:
            if self.version == 1:
                self._write("memory.limit_in_bytes", str(self.limit))
                if (self.path / "memory.memsw.limit_in_bytes").exists():  # no swapping out of the limit
                    self._write("memory.memsw.limit_in_bytes", str(self.limit))
            else:
                self._write("memory.max", str(self.limit))
                if (self.path / "memory.swap.max").exists():
                    self._write("memory.swap.max", "0")
        except BaseException:
            self.path.rmdir()
            raise
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.remove()

    def remove(self) -> None:
        if not self.path.exists():
            return
        for pid in self.pids():  # still running: back to the parent, or the rmdir fails
            try:
                (self.parent / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass
        try:
            self.path.rmdir()
        except OSError:
            pass

    # --- use

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` started inside the group (its children, a daemon too, stay in it)."""
        return ["sh", "-c", f'echo $$ > "{self.procs_file}" && exec "$@"', "sh", *argv]

    def add(self, pid: int) -> None:
        self.procs_file.write_text(str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self.procs_file.read_text().split()]
        except OSError:
            return []

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def _counter(self, filename: str, key: str) -> int:
        for line in self._read(filename).splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key:
                return int(parts[1])
        return 0

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer killed in this group."""
        if self.version == 1:
            return self._counter("memory.oom_control", "oom_kill")
        return self._counter("memory.events", "oom_kill")

    def failcnt(self) -> int:
        """How often the group hit its limit (v1 ``failcnt``, v2 ``max`` events): reclaim ran."""
        if self.version == 1:
            return int(self._read("memory.failcnt"))
        return self._counter("memory.events", "max")

    def peak(self) -> int | None:
        """The group's highest charge in bytes (RSS and page cache), if the kernel keeps it."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int(self._read(name))
        except (OSError, ValueError):
            return None

    def anon_bytes(self) -> int:
        """Anonymous memory charged to the group now (no page cache)."""
        key = "rss" if self.version == 1 else "anon"
        return self._counter("memory.stat", key)
