"""Helpers shared by the benchmark scripts in this directory (they are scripts, not tests).

Conventions: MB/s means 10^6 bytes per second (what dd, fio and curl print); sizes of
objects and memory are in MiB/GiB. Generated data lives under a work dir (default
``/var/tmp/modelfs-bench/<script>``) and the server's objects under a tmpfs dir, never in git.
Every mount, server and child process a script starts is registered here and torn down on
exit, including on SIGTERM and Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MiB",
    "GiB",
    "ROOT",
    "Cleanup",
    "ReadResult",
    "add_common_args",
    "choose_server_dir",
    "drop_caches",
    "ensure_object",
    "fmt_table",
    "mb_per_s",
    "median",
    "parse_size",
    "read_file",
    "reset_peak_rss",
    "rss_kib",
    "cpu_seconds",
    "children_cpu_seconds",
    "mount_stats",
    "git_rev",
    "unmount_leftovers",
    "wait_exit",
    "modelfs_daemon_pid",
    "install_signal_handlers",
    "write_json",
    "run_dd",
    "run_fio",
]

MiB = 1 << 20
GiB = 1 << 30
ROOT = Path(__file__).resolve().parent.parent  # the repository
sys.path.insert(0, str(ROOT))  # `python benchmarks/x.py` imports this checkout's modelfs


def parse_size(text: str) -> int:
    from modelfs.config import parse_size as parse

    return parse(text)


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("nan")


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


# --- arguments, signals, cleanup


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/modelfs-bench") / name,
        help="scratch dir for caches, mountpoints, logs (default: %(default)s)",
    )
    parser.add_argument(
        "--server-dir",
        type=Path,
        default=None,
        help="where the fake-gcs-server root and the source objects live (default: a "
        "dir under /dev/shm when it has room, so dropping page caches never "
        "makes the 'wire' a disk read; else under --workdir)",
    )
    parser.add_argument(
        "--keep-data", action="store_true", help="keep the generated objects (reused by the next run) and the work dir"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / f"results-{name}.json",
        help="JSON results file (default: %(default)s, git-ignored)",
    )
    parser.add_argument(
        "--keep-page-reporting",
        action="store_true",
        help="leave the VM's free page reporting (virtio-balloon) on during the run; by "
        "default it is paused and 8 GiB of memory pre-faulted (see benchmarks/README.md)",
    )


# --- the VM's memory: free page reporting

PAGE_REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")


def add_mount_option_arg(parser: argparse.ArgumentParser) -> None:
    """``--mount-option OPT`` (repeatable): extra flags for every modelfs mount of a benchmark."""
    parser.add_argument(
        "--mount-option",
        action="append",
        default=[],
        metavar="OPT",
        help="extra modelfs mount option, e.g. --mount-option=--block-size=16M (repeatable)",
    )


@contextmanager
def page_reporting_paused(keep: bool, prefault: int = 8 * GiB) -> Iterator[None]:
    """Pause virtio-balloon free page reporting for the run, and restore it after.

    With it on (as on this VM), every page the guest frees is handed back to the host a few
    seconds later, and the next write to it faults in the host: filling the page cache after
    ``drop_caches`` then costs ~2 s of kernel CPU per GiB (a 2 GiB local-file read: 0.2 s of
    sys time with freshly freed pages, 4 s ten seconds later). That lands on every path that
    fills the page cache (modelfs, rclone, download-then-read) and not on ``curl -o
    /dev/null``, and it is not a cost of the software under test: cloud VMs back their memory.
    Pausing it and touching ``prefault`` bytes of memory once makes the rounds comparable.
    """
    old: str | None = None
    if not keep and PAGE_REPORTING_ORDER.exists():
        try:
            old = PAGE_REPORTING_ORDER.read_text().strip()
            PAGE_REPORTING_ORDER.write_text("11\n")  # above MAX_PAGE_ORDER: no block qualifies
        except OSError as exc:
            print(f"  note: cannot pause free page reporting: {exc}", flush=True)
            old = None
        else:
            size = max(0, min(prefault, _mem_available() - 4 * GiB))
            _, seconds = timed(lambda: _touch_memory(size))
            print(
                f"  free page reporting paused (page_reporting_order {old} -> 11, restored at exit); "
                f"pre-faulted {size / GiB:.1f} GiB in {seconds:.1f} s",
                flush=True,
            )
    try:
        yield
    finally:
        if old is not None:
            try:
                PAGE_REPORTING_ORDER.write_text(old + "\n")
            except OSError as exc:
                print(f"warning: cannot restore page_reporting_order {old}: {exc}", file=sys.stderr)


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _touch_memory(size: int) -> None:
    """Write one byte per page of ``size`` bytes of anonymous memory, then free it."""
    import mmap

    if size <= 0:
        return
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        area.madvise(mmap.MADV_NOHUGEPAGE)  # 4 KiB pages, like the page cache's
        for offset in range(0, size, mmap.PAGESIZE):
            area[offset] = 1
    finally:
        area.close()


class _Terminated(BaseException):
    pass


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every ``finally`` (unmounts, server stop) runs."""

    def handler(signum: int, _frame: object) -> None:
        raise _Terminated(f"got signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


class Cleanup:
    """Last-resort teardown of whatever a script started: child processes (by pid, that we
    started) and mountpoints (lazy unmount). Normal teardown happens earlier in ``finally``s."""

    def __init__(self) -> None:
        self.mountpoints: list[Path] = []
        self.processes: list[subprocess.Popen[Any]] = []
        self.paths: list[Path] = []

    def mountpoint(self, path: Path) -> Path:
        self.mountpoints.append(path)
        return path

    def process(self, proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        self.processes.append(proc)
        return proc

    def remove_later(self, path: Path) -> Path:
        self.paths.append(path)
        return path

    def run(self) -> None:
        from modelfs.mount import is_mounted

        for mnt in reversed(self.mountpoints):
            try:
                if is_mounted(mnt):
                    subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
            except Exception as exc:  # keep cleaning the rest
                print(f"warning: cannot unmount {mnt}: {exc}", file=sys.stderr)
        from modelfs.testing.processes import stop_process

        for proc in reversed(self.processes):
            stop_process(proc)
        for path in reversed(self.paths):
            shutil.rmtree(path, ignore_errors=True)


def unmount_leftovers(workdir: Path) -> None:
    """Lazy-unmount mountpoints an earlier, killed run of the same script left under ``workdir``."""
    from modelfs.mount import is_mounted

    if not workdir.is_dir():
        return
    for path in workdir.iterdir():
        if path.name.startswith("mnt") and is_mounted(path):
            print(f"note: unmounting {path}, left mounted by an earlier run", file=sys.stderr)
            subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, check=False)


def modelfs_daemon_pid(mountpoint: Path, cache_dir: Path) -> int:
    """The pid of the daemon serving ``mountpoint``: from the cache dir's lock file, or (no
    disk cache, so no lock file) the foreground ``modelfs mount`` process naming it."""
    from modelfs.testing.mounts import daemon_pid

    try:
        return daemon_pid(cache_dir)
    except (OSError, ValueError, IndexError):
        pass
    target = str(mountpoint)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "modelfs" in args and "mount" in args and target in args and "--foreground" in args:
            return int(entry.name)
    raise RuntimeError(f"no modelfs daemon found for {mountpoint}")


def wait_exit(pid: int, timeout: float = 120.0) -> float:
    """Wait for a process (a daemon we started) to exit; seconds waited. After ``timeout`` it
    is sent SIGTERM, then SIGKILL, and RuntimeError says so."""
    t0 = time.monotonic()

    def gone() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        except OSError:
            return True

    while not gone():
        if time.monotonic() - t0 > timeout:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                time.sleep(5)
                if gone():
                    break
            raise RuntimeError(f"daemon {pid} did not exit within {timeout:.0f} s of its unmount; killed")
        time.sleep(0.05)
    return time.monotonic() - t0


def prepare_dirs(args: argparse.Namespace, name: str, need: int, cleanup: Cleanup) -> Path:
    """Every script's start: unmount what a killed earlier run left, create ``--workdir``, and
    pick the server dir (removed at exit unless ``--keep-data``). Returns the server dir."""
    unmount_leftovers(args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    server_dir = choose_server_dir(args, name, need)
    if not args.keep_data:
        cleanup.remove_later(server_dir)
    return server_dir


def choose_server_dir(args: argparse.Namespace, name: str, need: int) -> Path:
    if args.server_dir is not None:
        return args.server_dir
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > need + 2 * GiB:
            return shm / f"modelfs-bench-{name}"
    except OSError:
        pass
    print(
        f"note: /dev/shm lacks room; the server's objects go under {args.workdir} (dropping page "
        "caches then also makes the server read from disk)",
        file=sys.stderr,
    )
    return args.workdir / "server"


def git_rev() -> str:
    """The checkout's commit, with +dirty when modelfs/ has uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "modelfs"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


# --- data


def _generate(path: Path, size: int, tag: int) -> str:
    """Random-looking bytes, fast: 64 MiB of urandom repeated, each MiB stamped with
    (tag, chunk, MiB index), so no two MiB (and no two blocks) of any object are equal."""
    base = os.urandom(64 * MiB)
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb", buffering=0) as f:
        done, chunk_no = 0, 0
        while done < size:
            n = min(len(base), size - done)
            buf = bytearray(base[:n])
            for m in range(0, n, MiB):
                buf[m : m + 24] = struct.pack("<QQQ", tag, chunk_no, m // MiB)[: max(0, min(24, n - m))]
            digest.update(buf)
            view = memoryview(buf)
            while view:
                view = view[f.write(view) :]
            done += n
            chunk_no += 1
    tmp.replace(path)
    return digest.hexdigest()


def ensure_object(directory: Path, name: str, size: int, tag: int) -> tuple[Path, str]:
    """The source file of one object and its sha256, generated unless a previous run left it."""
    path = directory / name
    meta = directory / (name + ".json")
    want = {"size": size, "tag": tag, "format": 1}
    if path.exists() and meta.exists():
        try:
            known = json.loads(meta.read_text())
            if {k: known.get(k) for k in want} == want and path.stat().st_size == size:
                return path, known["sha256"]
        except (OSError, ValueError, KeyError):
            pass
    t0 = time.perf_counter()
    sha = _generate(path, size, tag)
    meta.write_text(json.dumps(dict(want, sha256=sha)))
    print(f"  generated {name}: {size / GiB:.2f} GiB in {time.perf_counter() - t0:.1f} s", flush=True)
    return path, sha


# --- page cache, processes


def drop_caches(level: int = 3) -> None:
    """``sync; echo LEVEL > /proc/sys/vm/drop_caches`` (1: page cache; 3: also dentries/inodes)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(f"{level}\n")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def rss_kib(pid: int, *, peak: bool = True) -> int:
    """VmHWM (peak resident set) or VmRSS of a process, KiB."""
    return _status_kib(pid, "VmHWM" if peak else "VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's waited-for children (dd, fio, curl, clients)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reset_peak_rss(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (``echo 5 > /proc/PID/clear_refs``)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5\n")
        return True
    except OSError:
        return False


def mount_stats(mountpoint: Path) -> dict[str, Any]:
    return json.loads(os.getxattr(mountpoint, "user.modelfs.stats"))


# --- readers


@dataclass
class ReadResult:
    nbytes: int
    seconds: float
    sha256: str | None

    @property
    def mb_s(self) -> float:
        return mb_per_s(self.nbytes, self.seconds)


def read_file(
    path: Path, *, chunk: int = MiB, verify: bool = True, buffers: int = 4, buffer_size: int = 8 * MiB
) -> ReadResult:
    """Read ``path`` sequentially with ``chunk``-sized read() calls. With ``verify`` the
    sha256 runs in a second thread over filled buffers (hashlib and readinto both release
    the GIL), so hashing overlaps the reads instead of adding to them."""
    if not verify:
        buf = bytearray(chunk)
        view = memoryview(buf)
        total = 0
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
        return ReadResult(total, time.perf_counter() - t0, None)

    free: queue.Queue[bytearray] = queue.Queue()
    full: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    for _ in range(buffers):
        free.put(bytearray(buffer_size))
    digest = hashlib.sha256()

    def hasher() -> None:
        while (item := full.get()) is not None:
            buf, n = item
            digest.update(memoryview(buf)[:n])
            free.put(buf)

    thread = threading.Thread(target=hasher, daemon=True)
    thread.start()
    total = 0
    t0 = time.perf_counter()
    try:
        with open(path, "rb", buffering=0) as f:
            eof = False
            while not eof:
                buf = free.get()
                view = memoryview(buf)
                filled = 0
                while filled < len(buf):
                    n = f.readinto(view[filled : filled + chunk])
                    if not n:
                        eof = True
                        break
                    filled += n
                total += filled
                full.put((buf, filled))
    finally:
        full.put(None)
        thread.join()
    return ReadResult(total, time.perf_counter() - t0, digest.hexdigest())


def run_dd(path: Path, bs: str = "1M") -> ReadResult:
    t0 = time.perf_counter()
    proc = subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={bs}"], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"dd {path} failed: {proc.stderr.strip()}")
    # "4294967296 bytes (4.3 GB, 4.0 GiB) copied, 1.9 s, 2.2 GB/s"
    nbytes = int(proc.stderr.strip().splitlines()[-1].split()[0])
    return ReadResult(nbytes, seconds, None)


def run_fio(path: Path, size: int, bs: str = "1M") -> ReadResult:
    """One fio sequential-read job over the whole file (psync, buffered, 1 MiB requests)."""
    # --iomem=mmap: with its default malloc buffers fio reads page-cache hits at ~1.7 GB/s
    # here where dd gets ~8 GB/s; with mmap buffers it matches dd.
    cmd = [
        "fio",
        "--name=seqread",
        f"--filename={path}",
        "--rw=read",
        f"--bs={bs}",
        "--ioengine=psync",
        "--iomem=mmap",
        f"--size={size}",
        "--readonly",
        "--invalidate=0",
        "--numjobs=1",
        "--output-format=json",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed: {proc.stderr.strip() or proc.stdout.strip()}")
    text = proc.stdout
    data = json.loads(text[text.index("{") :])
    read = data["jobs"][0]["read"]
    nbytes = int(read["io_bytes"])
    # fio's own clock (runtime in ms) excludes its startup; keep ours if it is missing.
    runtime_ms = float(read.get("runtime") or 0)
    return ReadResult(nbytes, runtime_ms / 1000 if runtime_ms > 0 else seconds, None)


# --- output


def fmt_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A plain text table; ``align`` is one char per column, 'l' or 'r' (default: first left)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "-"
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"
        return "-" if v is None else str(v)

    text_rows = [[cell(v) for v in row] for row in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(h), *(len(r[i]) for r in text_rows)) if text_rows else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(values, widths, align, strict=False)
        ).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in text_rows]
    return "\n".join(out)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def run_main(name: str, args: argparse.Namespace, body: Callable[[Cleanup], int]) -> int:
    """The scripts' shared main(): root check, signal handling, cleanup of every mount,
    server and work dir however the run ends, and exit codes (130 interrupted, 1 broken)."""
    import traceback

    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print(f"{name}: needs root (drop_caches, /proc/PID/clear_refs, the FUSE bdi) and /dev/fuse", file=sys.stderr)
        return 1
    install_signal_handlers()
    cleanup = Cleanup()
    try:
        with page_reporting_paused(getattr(args, "keep_page_reporting", False)):
            return body(cleanup)
    except (KeyboardInterrupt, _Terminated):
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        cleanup.run()
        if not args.keep_data:
            shutil.rmtree(args.workdir, ignore_errors=True)


def machine_busy(seconds: float = 1.0) -> float:
    """Percent of all CPUs busy over ``seconds`` (200 = both cores of a 2-core machine), sampled
    while the benchmark is idle: how much other work competes with the measurement."""

    def sample() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]

    a = sample()
    time.sleep(seconds)
    d = [y - x for x, y in zip(a, sample(), strict=True)]
    total = sum(d) or 1
    return round((total - d[3] - d[4]) / total * 100 * (os.cpu_count() or 1), 0)


def wait_daemon_exit(pid: int, timeout: float = 60.0) -> None:
    """Wait for a modelfs daemon we started to exit after its unmount (it holds the cache dir's lock)."""
    from modelfs.mount import wait_for_exit

    if not wait_for_exit(pid, timeout):
        print(f"    note: modelfs daemon {pid} still running {timeout:.0f} s after its unmount", flush=True)


def stop_fuse_process(proc: subprocess.Popen[bytes], mnt: Path) -> None:
    """Unmount a FUSE mount served by ``proc`` (rclone) and make sure both are gone."""
    from modelfs.mount import is_mounted

    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        from modelfs.testing.processes import stop_process

        stop_process(proc)
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
