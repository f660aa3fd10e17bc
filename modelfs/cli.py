"""The ``modelfs`` command: mount, unmount. Flags become a Config; errors become exit codes.

Exit codes: 0 success, 1 a runtime failure (mount, backend), 2 bad usage or configuration.
Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from modelfs import __version__
from modelfs.config import Config, add_options, build_config
from modelfs.errors import ConfigError, ModelfsError

__all__ = ["main"]

log = logging.getLogger("modelfs")

_READY_FD_ENV = "MODELFS_READY_FD"  # set by a daemonizing parent for its child


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelfs", description="Mount model weights from object storage, read-only.")
    parser.add_argument("--version", action="version", version=f"modelfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser("mount", help="mount SOURCE at MOUNTPOINT",
                                description="Mount SOURCE (gs://BUCKET[/PREFIX] or file:///DIR) read-only at MOUNTPOINT.")
    mount.add_argument("source", metavar="SOURCE")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    add_options(mount)

    unmount = commands.add_parser("unmount", help="unmount MOUNTPOINT (also a dead one)")
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT")
    return parser


def setup_logging(level: str, stream: object = None) -> None:
    handler = logging.StreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("modelfs").setLevel(level.upper())


def _mount_foreground(config: Config) -> int:
    import trio

    from modelfs.mount import serve

    ready_fd = os.environ.pop(_READY_FD_ENV, None)

    def ready() -> None:
        log.info("ready: %s", config.mountpoint)
        if ready_fd is not None:
            os.write(int(ready_fd), b"ready\n")
            os.close(int(ready_fd))

    try:
        trio.run(serve, config, ready)
    except ModelfsError as exc:
        if ready_fd is not None:
            try:
                os.write(int(ready_fd), f"error: {exc}\n".encode())
            except OSError:
                pass
        raise
    return 0


def _mount_daemon(config: Config, argv: Sequence[str]) -> int:
    """Start a foreground child in its own session; return once it says the mount answers."""
    assert config.mountpoint is not None
    log_file = config.log_file or config.cache_dir / "modelfs.log"
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_out = open(log_file, "ab")
    except OSError as exc:
        raise ConfigError(f"cannot open log file {log_file}: {exc.strerror}") from None
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, **{_READY_FD_ENV: str(write_fd)})
    child = subprocess.Popen(
        [sys.executable, "-m", "modelfs", *argv, "--foreground"],
        stdin=subprocess.DEVNULL, stdout=log_out, stderr=log_out, env=env,
        pass_fds=(write_fd,), start_new_session=True,
    )
    os.close(write_fd)
    log_out.close()
    deadline = time.monotonic() + config.retry_deadline + 60
    message = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while b"\n" not in message and time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 0.5)
            if ready:
                chunk = pipe.read(4096)
                if not chunk:
                    break
                message += chunk
            elif child.poll() is not None:
                break
    line = message.decode(errors="replace").strip()
    if line == "ready":
        return 0
    if line.startswith("error: "):
        raise ModelfsError(line[len("error: ") :])
    if child.poll() is None:
        child.terminate()
        raise ModelfsError(f"mount did not come up in time; see {log_file}")
    raise ModelfsError(f"mount failed (exit {child.returncode}); see {log_file}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "mount":
            config = build_config(args.source, args.mountpoint, args)
            setup_logging(config.log_level)
            if config.foreground:
                return _mount_foreground(config)
            return _mount_daemon(config, argv)
        if args.command == "unmount":
            setup_logging("warning")
            from modelfs.mount import unmount

            unmount(Path(args.mountpoint).absolute())
            return 0
    except ConfigError as exc:
        print(f"modelfs: {exc}", file=sys.stderr)
        return 2
    except ModelfsError as exc:
        print(f"modelfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)
