"""Mount modelfs as a subprocess (the way a user does) and always clean up."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from modelfs.mount import is_mounted, wait_for_exit

__all__ = ["mounted", "run_modelfs", "daemon_pid", "peak_rss_kib", "force_unmount"]


def run_modelfs(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelfs", *args],
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        timeout=timeout,
        check=False,
    )


def force_unmount(mountpoint: Path) -> None:
    """Last resort: lazy-unmount whatever is left at ``mountpoint``."""
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True, check=False)


def daemon_pid(cache_dir: Path) -> int:
    """The pid of the daemon holding ``cache_dir`` (it writes its pid into the lock file)."""
    return int((cache_dir / "lock").read_text().split()[0])


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a process: its peak resident set size, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


@contextmanager
def mounted(
    source: str, mountpoint: Path, cache_dir: Path, *options: str, env: Mapping[str, str] | None = None
) -> Iterator[Path]:
    """``modelfs mount SOURCE MOUNTPOINT --cache-dir DIR OPTIONS``; unmounted on exit, whatever happens."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    result = run_modelfs("mount", source, str(mountpoint), "--cache-dir", str(cache_dir), *options, env=env)
    if result.returncode != 0:
        force_unmount(mountpoint)
        raise RuntimeError(f"modelfs mount failed ({result.returncode}): {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        try:
            run_modelfs("unmount", str(mountpoint), env=env, timeout=60)
        finally:
            force_unmount(mountpoint)
            _wait_gone(cache_dir)


def _wait_gone(cache_dir: Path, timeout: float = 120.0) -> None:
    """Wait for the daemon to exit after unmount, so the next mount can lock the cache dir."""
    try:
        pid = daemon_pid(cache_dir)
    except (OSError, ValueError, IndexError):
        return
    if not wait_for_exit(pid, timeout):
        raise RuntimeError(f"modelfs daemon {pid} still running {timeout:.0f} s after unmount")
