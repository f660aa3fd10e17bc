"""The ``modelfs`` command: mount, unmount, warm, stats. Flags become a Config; errors become exit codes.

Exit codes: 0 success, 1 a runtime failure (mount, backend), 2 bad usage or configuration.
Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from modelfs import __version__, stopping
from modelfs.cache.disk_dir import open_log_file
from modelfs.config import Config, add_options, build_config
from modelfs.errors import ConfigError, ModelfsError
from modelfs.logs import escape, setup_logging

__all__ = ["main"]

log = logging.getLogger("modelfs")

_READY_FD_ENV = "MODELFS_READY_FD"  # set by a daemonizing parent for its child
_CPU_PER_GIB_FROM = 64 << 20  # bytes read before `stats` shows CPU per GiB and the ceiling
_EXIT_WAIT = 10.0  # seconds a child that closed its ready pipe without a word gets to exit


class _Parser(argparse.ArgumentParser):
    """Usage errors as every other error: one line ``modelfs: ...`` on stderr, exit 2 (not
    the whole usage block first); ``--help`` still prints it all. Subcommands' parsers are
    of this class too (``add_subparsers`` makes them of the parent's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}  # filled by _parser()

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"modelfs: {escape(message)} (see {self.prog} --help)\n")
        sys.exit(2)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """As argparse's, but an unknown option of a command is that command's error (its
        --help lists the options), not the top-level parser's."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            command = self.commands.get(getattr(parsed, "command", None) or "", self)
            command.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modelfs", description="Mount model weights from object storage, read-only.")
    parser.add_argument("--version", action="version", version=f"modelfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser(
        "mount",
        help="mount SOURCE at MOUNTPOINT",
        description=(
            "Mount SOURCE (gs://BUCKET[/PREFIX], s3://BUCKET[/PREFIX], https://HOST/PATH or file:///DIR)"
            " read-only at MOUNTPOINT."
        ),
    )
    mount.add_argument("source", metavar="SOURCE")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    add_options(mount)

    unmount = commands.add_parser("unmount", help="unmount MOUNTPOINT (also a dead one)")
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT")

    warm = commands.add_parser(
        "warm",
        help="fill the disk cache for SOURCE (and verify gs:// and s3:// objects' checksums)",
        description="Fetch every object of SOURCE into the disk cache that a later "
        "'modelfs mount SOURCE' uses, verifying each against its stored checksum where the store "
        "keeps one of the whole object (gs://: CRC32C or MD5; s3://: its CRC64NVME, CRC32, CRC32C, "
        "SHA-1, SHA-256, SHA-512, MD5, XXHASH64, XXHASH3 or XXHASH128, not a multipart upload's "
        "COMPOSITE one; http(s):// and file:// have none).",
    )
    warm.add_argument("source", metavar="SOURCE")
    add_options(warm, WARM_OPTIONS)

    stats = commands.add_parser("stats", help="print the counters of a running mount")
    stats.add_argument("mountpoint", metavar="MOUNTPOINT")
    stats.add_argument("--json", action="store_true", help="print the raw JSON")
    parser.commands.update(mount=mount, unmount=unmount, warm=warm, stats=stats)
    return parser


WARM_OPTIONS = {
    "cache-dir",
    "memory-cache",
    "disk-cache",
    "block-size",
    "max-prefetch",
    "max-concurrency",
    "prefetch-get-size",
    "retry-deadline",
    "read-timeout",
    "anonymous",
    "log-level",
    "log-format",
    "manifest",
    "ca-cert",
    "header",
    "billing-project",
    "requester-pays",
    "endpoint-url",
    "cache-url",
    "persist-weak-versions",
    "allow-cross-origin-redirects",
}


T = TypeVar("T")


def _run(fn: Callable[..., Awaitable[T]], *args: object) -> T:
    """``trio.run(fn, *args)``, with a Ctrl-C that comes out of a nursery (wrapped in an
    exception group, as trio's strict groups do) raised as the KeyboardInterrupt it is:
    main() makes that exit 130, not a traceback."""
    import trio

    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        _, rest = group.split(KeyboardInterrupt)
        if rest is None:  # nothing but Ctrl-C in it
            raise KeyboardInterrupt from None
        raise


def _warm(config: Config) -> int:
    from modelfs.warm import WarmStopped, warm

    try:
        result = _run(warm, config)
    except WarmStopped as stopped:
        # One line; the objects reported cached so far are in the disk cache, whole.
        print(f"modelfs: warm stopped by {signal.Signals(stopped.signum).name}", file=sys.stderr)
        return 128 + stopped.signum
    if result.failed:
        why = result.failed[0][1]
        more = f" (and {len(result.failed) - 1} more)" if len(result.failed) > 1 else ""
        raise ModelfsError(f"{len(result.failed)} object(s) not cached{more}: {why}")
    if result.mismatched:
        names = ", ".join(result.mismatched)
        raise ModelfsError(f"checksum mismatch in {len(result.mismatched)} object(s): {names}")
    if result.evicted:
        raise ModelfsError(
            f"the disk cache cannot hold all of {config.source.url}: {result.evicted} block(s) warmed were "
            f"evicted again to make room (it keeps to {result.cache_limit / 2**20:,.1f} MiB: --disk-cache, "
            f"or what the file system of {config.cache_dir} holds)"
        )
    return 0


def _stats(mountpoint: Path, as_json: bool) -> int:
    import json

    try:
        raw = os.getxattr(mountpoint, "user.modelfs.stats")
    except OSError as exc:
        from modelfs.mount import modelfs_mount_holding

        # A file or directory inside a mount: that mount's stats, as df answers for any path.
        root = modelfs_mount_holding(mountpoint) if exc.errno == errno.ENODATA else None
        try:
            if root is None:
                raise exc
            raw = os.getxattr(root, "user.modelfs.stats")
        except OSError as exc:
            raise ModelfsError(f"{mountpoint} is not a running modelfs mount ({exc.strerror})") from None
    unreadable = f"{mountpoint} is not a modelfs mount (its stats are not readable"
    try:
        stats = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's depth
        raise ModelfsError(f"{unreadable}: not JSON)") from None
    if not isinstance(stats, dict):
        raise ModelfsError(f"{unreadable}: not a JSON object)")
    try:
        text = _format_stats(stats)  # --json too: only what modelfs wrote is printed
    except KeyError as exc:
        raise ModelfsError(f"{unreadable}: no {exc.args[0]!r})") from None
    except (TypeError, ValueError, AttributeError, ArithmeticError):
        raise ModelfsError(f"{unreadable}: a value of the wrong type)") from None
    print(json.dumps(stats, indent=1) if as_json else text)
    return 0


def _format_stats(stats: dict[str, Any]) -> str:
    """``modelfs stats``'s lines; KeyError (a key missing), TypeError, ValueError... on what no modelfs mount writes."""
    mib = 1 << 20
    lines = [
        f"source            {stats['source']}",
        f"files             {stats['files']} ({stats['bytes'] / mib:,.1f} MiB), {stats['open_handles']} open handles",
        f"backend           {stats['backend_gets']} GETs ({stats['demand_gets']} demand, {stats['prefetch_gets']} "
        f"prefetch, {stats.get('joined_gets', 0)} of several blocks), {stats['backend_bytes'] / mib:,.1f} MiB, "
        f"{stats['retries']} retries",
        f"memory cache      {stats['memory_used'] / mib:,.1f} / {stats['memory_capacity'] / mib:,.0f} MiB "
        f"(peak {stats['memory_peak'] / mib:,.1f}), {stats['memory_hits']} hits, {stats['memory_misses']} misses, "
        f"{stats['memory_evictions']} evictions",
    ]
    parts = stats.get("memory_parts") or {}
    if parts:
        lines.append(
            "  budget parts    "
            + ", ".join(f"{name.replace('_', ' ')} {value / mib:,.1f}" for name, value in parts.items())
            + f" MiB; {stats.get('reads_in_flight', 0)} reads in flight"
        )
    if "disk_capacity" in stats:
        limit = stats.get("disk_limit", stats["disk_capacity"])
        full = (
            f" (keeps to {limit / mib:,.1f} MiB: what its file system holds)" if limit < stats["disk_capacity"] else ""
        )
        lines.append(
            f"disk cache        {stats['disk_used'] / mib:,.1f} / {stats['disk_capacity'] / mib:,.0f} MiB{full}, "
            f"{stats['disk_hits']} hits, {stats['disk_writes']} writes, {stats['disk_evictions']} evictions, "
            f"{stats['disk_corrupt']} corrupt, {stats.get('disk_write_errors', 0)} write errors"
        )
    tier = stats.get("tier")
    if tier:
        replicas = ", ".join(
            f"{url} {r['bytes'] / mib:,.1f} MiB ({r['failures']} failed, {r['rejected']} rejected)"
            for url, r in tier["replicas"].items()
        )
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(tier["fallback_reasons"].items()) if v) or "none"
        lines.append(f"cache tier        {replicas}")
        lines.append(
            f"tier fallbacks    {tier.get('origin_gets', tier['fallbacks'])} blocks from the origin "
            f"({tier['origin_bytes'] / mib:,.1f} MiB), {tier.get('failovers', 0)} passed to the next replica "
            f"(failures: {reasons}), {tier['bypass_bytes'] / mib:,.1f} MiB not for the tier"
        )
    lines.append(
        f"prefetch          window {stats['prefetch_window_bytes'] / mib:,.0f} MiB, "
        f"{stats['prefetch_resets']} resets, {stats['prefetch_refused']} refused for budget"
    )
    lines.append(_cpu_line(stats))
    errors = stats.get("errors_by_errno") or {}
    lines.append("errors            " + (", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none"))
    return "\n".join(lines)


def _cpu_line(stats: dict[str, Any]) -> str:
    """Daemon and event-loop CPU, per GiB read, and the single-mount ceiling the loop's share implies."""
    from modelfs.loopcpu import ceiling_bytes_per_s

    loop, total, read = stats.get("loop_cpu_s", 0.0), stats.get("daemon_cpu_s", 0.0), stats.get("read_bytes", 0)
    line = f"CPU               {total:,.2f} s daemon, {loop:,.2f} s event loop (serialized)"
    ceiling = ceiling_bytes_per_s(loop, read)
    # (Below this the startup's CPU dominates and the figures per GiB mean nothing.)
    if ceiling is not None and read >= _CPU_PER_GIB_FROM:
        gib = read / (1 << 30)
        line += (
            f"; per GiB read: {total / gib:.2f} / {loop / gib:.2f} s; one mount's ceiling ~{ceiling / 1e6:,.0f} MB/s"
        )
    return line


def _catch_stop_signals() -> list[int]:
    """Record the stop signals from now on, in the list returned, until serve() takes them.

    A mount must take them from its very start: the imports and the startup listing take
    seconds, and as PID 1 (the image) a SIGTERM without a handler is discarded by the kernel,
    leaving a daemon that mounts and serves anyway until the SIGKILL leaves a dead mount.
    """
    caught: list[int] = []

    def record(signum: int, frame: object) -> None:
        caught.append(signum)

    for signum in stopping.stop_signals():  # (not one the process was started ignoring: nohup)
        signal.signal(signum, record)
    return caught


class _Stopped(BaseException):
    """A stop signal to a ``modelfs mount`` waiting for the daemon it started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_on_stop_signals() -> None:
    raised = False

    def stop(signum: int, frame: object) -> None:
        nonlocal raised
        if not raised:  # once: a second Ctrl-C must not break out of stopping the child
            raised = True
            raise _Stopped(signum)

    for signum in stopping.stop_signals():
        signal.signal(signum, stop)


# Files the client libraries read by the path in these variables, maybe long after the start
# (a credentials file, a web identity token refreshed hourly, CA bundles).
_PATH_VARIABLES = (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)


def _leave_working_directory() -> None:
    """chdir("/") for the serving process: the directory it was started in stays busy for as
    long as the mount runs otherwise (``umount`` of that file system: "target is busy").

    By now build_config has read the config file and ``--header @FILE`` and made every path
    of the Config absolute; the paths the client libraries take from the environment are
    made absolute here, against the directory they were meant for."""
    for name in _PATH_VARIABLES:
        value = os.environ.get(name)
        if value and not os.path.isabs(value):
            os.environ[name] = os.path.abspath(value)
    os.chdir("/")


def _mount_foreground(config: Config, early_signals: list[int]) -> int:
    """Serve the mount in this process; ``early_signals``: see :func:`_catch_stop_signals`."""
    from modelfs.mount import serve

    ready_fd = os.environ.pop(_READY_FD_ENV, None)
    announced = False

    def ready() -> bool:
        """Report the mount up; False if the ``modelfs mount`` waiting for it is gone."""
        nonlocal announced
        announced = True
        if ready_fd is not None:
            try:
                os.write(int(ready_fd), b"ready\n")
            except OSError as exc:  # EPIPE: killed (SIGKILL) before this mount was ready
                log.warning(
                    "the modelfs mount that started this daemon is gone (%s): unmounting %s",
                    exc.strerror,
                    config.mountpoint,
                )
                return False
            finally:
                os.close(int(ready_fd))
        log.info("ready: %s", config.mountpoint)
        return True

    def tell_parent(line: str) -> None:
        if ready_fd is not None and not announced:
            try:
                os.write(int(ready_fd), f"{line}\n".encode(errors="backslashreplace"))
            except OSError:
                pass

    try:
        _run(serve, config, ready, early_signals)
    except ModelfsError as exc:
        tell_parent(f"error: {escape(str(exc))}")
        raise
    finally:
        # Served and cleaned up (or failed to start): a signal from now on, say a supervisor
        # repeating SIGTERM, must not turn the exit status into death by that signal.
        for signum in stopping.STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    tell_parent("error: stopped before the mount was ready")  # by a signal: serve() logged which
    return 0


# ``-P``: the re-executed daemon does not put the current directory on sys.path, as ``-m``
# otherwise would: a modelfs.py (or modelfs/) where the command ran would be imported, as root.
_SAFE_PATH = ("-P",)


def _child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a re-executed modelfs: it imports this very package (from where this process
    did, first on PYTHONPATH), whatever the current directory holds (see _SAFE_PATH)."""
    import modelfs

    here = str(Path(modelfs.__file__).resolve().parent.parent)
    rest = env.get("PYTHONPATH")
    return dict(env, PYTHONPATH=here + (os.pathsep + rest if rest else ""))


_ARGV_ENV = "MODELFS_ARGV"  # the real argv of a mount re-executed with secrets hidden (JSON)
_HIDDEN = "<hidden>"


def _is_header_flag(flag: str) -> bool:
    return len(flag) > 3 and "--header".startswith(flag)  # argparse accepts abbreviations


def _without_secrets(argv: Sequence[str], source: str | None) -> list[str]:
    """``argv`` as every local user may see it in ``ps`` and /proc/PID/cmdline: the query string
    of SOURCE (a presigned URL's signature) and ``--header`` values replaced by ``<hidden>``.
    ``--header @FILE`` stays: a path is no secret."""
    out: list[str] = []
    value_next = False
    for arg in argv:
        if value_next:
            value_next = False
            out.append(arg if arg.startswith("@") else _HIDDEN)
            continue
        flag, eq, value = arg.partition("=")
        if _is_header_flag(flag):
            if not eq:
                value_next = True
                out.append(arg)
            else:
                out.append(arg if value.startswith("@") else f"{flag}={_HIDDEN}")
            continue
        if source is not None and arg == source and "?" in arg:
            out.append(arg.split("?", 1)[0] + "?" + _HIDDEN)
            continue
        out.append(arg)
    return out


def _source_of(argv: Sequence[str]) -> str | None:
    try:
        args = _parser().parse_args(argv)
    except SystemExit:
        return None
    return getattr(args, "source", None)


def _restore_argv(shown: list[str]) -> list[str]:
    """The real argv of a process started by :func:`_hide_secrets` or :func:`_mount_daemon`:
    taken from the environment (readable by its user only) when what ``ps`` shows is exactly
    its redacted form; otherwise ``shown`` as it is."""
    raw = os.environ.pop(_ARGV_ENV, None)
    if raw is None:
        return shown
    try:
        real = json.loads(raw)
    except ValueError:
        return shown
    if not isinstance(real, list) or not all(isinstance(a, str) for a in real):
        return shown
    return real if _without_secrets(real, _source_of(real)) == shown else shown


def _hide_secrets(argv: list[str], source: str) -> None:
    """Re-execute this process (same pid: systemd and a container runtime keep tracking it)
    with the secrets of ``argv`` out of its command line and in its environment instead.
    Returns only when there is nothing to hide or the exec fails."""
    shown = _without_secrets(argv, source)
    if shown == argv or not sys.executable:
        return
    env = _child_env(dict(os.environ, **{_ARGV_ENV: json.dumps(argv)}))
    try:
        os.execve(sys.executable, [sys.executable, *_SAFE_PATH, "-m", "modelfs", *shown], env)
    except OSError as exc:
        log.warning("cannot re-execute without secrets in the command line (%s): they stay visible", exc.strerror)


def _mount_daemon(config: Config, argv: Sequence[str], stop_signals: list[int]) -> int:
    """Start a foreground child in its own session; return once it says the mount answers.

    The child is in its own session, so a Ctrl-C or SIGTERM for this process does not reach
    it: until the mount is ready, such a signal stops the child too (and waits for it), so
    that an interrupted ``modelfs mount`` leaves nothing mounted; exit 128 + the signal.
    ``stop_signals``: those caught so far (see :func:`_catch_stop_signals`).
    """
    if stop_signals:  # stopped before the daemon was even started
        return 128 + stop_signals[0]
    assert config.mountpoint is not None
    log_file = config.log_file or config.cache_dir / "modelfs.log"
    try:
        log_out = open_log_file(log_file, config.cache_dir)  # the cache dir's checks, O_NOFOLLOW
    except OSError as exc:
        raise ConfigError(f"cannot open log file {log_file}: {exc.strerror}") from None
    read_fd, write_fd = os.pipe()
    env = _child_env(dict(os.environ, **{_READY_FD_ENV: str(write_fd)}))
    argv = [*argv, "--foreground"]
    shown = _without_secrets(argv, _source_of(argv))
    if shown != argv:  # secrets go to the daemon in its environment, which only its user reads
        env[_ARGV_ENV] = json.dumps(argv)
    child = subprocess.Popen(
        [sys.executable, *_SAFE_PATH, "-m", "modelfs", *shown],
        stdin=subprocess.DEVNULL,
        stdout=log_out,
        stderr=log_out,
        env=env,
        pass_fds=(write_fd,),
        start_new_session=True,
    )
    os.close(write_fd)
    log_out.close()
    try:
        # Signals so far were only recorded (an exception inside Popen could lose the child).
        _raise_on_stop_signals()
        if stop_signals:
            raise _Stopped(stop_signals[0])
        message, closed = _wait_for_child(child, read_fd, time.monotonic() + config.retry_deadline + 60)
        # The child said its word (or is gone): the usual deaths by these signals from now on.
        # (Reset inside the try: a signal caught before the reset still stops the child, as
        # one caught while waiting does, and never leaves a mount behind an exit of 128 + N.)
        stopping.restore_stop_signals()
    except _Stopped as stopped:
        for signum in stopping.STOP_SIGNALS:  # more of them (Ctrl-C again) are ignored while the child stops
            signal.signal(signum, signal.SIG_IGN)
        _stop_child(child)
        return 128 + stopped.signum
    line = message.decode(errors="replace").strip()
    if line == "ready":
        return 0
    if line.startswith("error: "):
        raise ModelfsError(line[len("error: ") :])
    if closed and child.poll() is None:
        try:  # it closed the pipe without its word: it is exiting (say, it could not even log why)
            child.wait(_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            pass
    if child.poll() is None:
        child.terminate()
        raise ModelfsError(f"mount did not come up in time; see {log_file}")
    raise ModelfsError(f"mount failed (exit {child.returncode}); see {log_file}")


def _wait_for_child(child: subprocess.Popen[bytes], read_fd: int, deadline: float) -> tuple[bytes, bool]:
    """What the child wrote to the ready pipe (its line, or less if it exited or took too long),
    and whether the pipe was closed."""
    message = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while b"\n" not in message and time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 0.5)
            if ready:
                chunk = pipe.read(4096)
                if not chunk:
                    return message, True
                message += chunk
            elif child.poll() is not None:
                break
    return message, False


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM for a daemon still starting (or just mounted), and wait until it is gone: it
    stops a startup at once, and unmounts within the stop's timeouts (mount.py's STOP_GRACE)."""
    from modelfs.mount import STOP_GRACE

    child.terminate()
    try:
        child.wait(4 * STOP_GRACE)  # its own watchdog ends it at 2 x STOP_GRACE
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = _restore_argv(sys.argv[1:]) if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if from_command_line and args.command in ("mount", "warm") and argv == sys.argv[1:]:
        _hide_secrets(argv, args.source)  # not yet hidden: re-executes with them out of argv
    try:
        if args.command == "mount":
            early_signals = _catch_stop_signals()  # before anything slow: see there
            config = build_config(args.source, args.mountpoint, args)
            setup_logging(config.log_level, config.log_format)
            if config.foreground:  # (the daemon too: a --foreground child of _mount_daemon)
                _leave_working_directory()
                return _mount_foreground(config, early_signals)
            return _mount_daemon(config, argv, early_signals)
        if args.command == "unmount":
            setup_logging("warning")
            from modelfs.mount import unmount

            unmount(Path(args.mountpoint).absolute())
            return 0
        if args.command == "warm":
            config = build_config(args.source, None, args)
            setup_logging(config.log_level, config.log_format)
            return _warm(config)
        if args.command == "stats":
            return _stats(Path(args.mountpoint), args.json)
    except ConfigError as exc:
        print(f"modelfs: {escape(str(exc))}", file=sys.stderr)
        return 2
    except ModelfsError as exc:
        print(f"modelfs: {escape(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except _Stopped as stopped:  # (a second signal in the instant before _mount_daemon ignores them)
        return 128 + stopped.signum
    raise AssertionError(args.command)
