"""The demo: a local bucket with a generated model, mounted, loaded, checked, unmounted.

``python -m modelfs.testing.demo [--size 1G] [--workdir DIR]`` starts fake-gcs-server on
127.0.0.1, seeds a safetensors model of a few shards plus config.json, mounts it with
modelfs, loads every tensor through the mount with ``safetensors.safe_open`` (mmap),
checks each tensor's sha256, and prints the load time, the bytes fetched and the daemon's
peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from modelfs.config import parse_size
from modelfs.testing.fakegcs import fake_gcs
from modelfs.testing.models import load_all, write_model
from modelfs.testing.mounts import daemon_pid, mounted, peak_rss_kib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="model size (default 1G)")
    parser.add_argument("--memory-cache", default="256M")
    parser.add_argument("--workdir", help="where the bucket and caches go (default: a temp dir, removed after)")
    args = parser.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="modelfs-demo-", dir="/var/tmp"))
    try:
        print(f"generating a {args.size} safetensors model ...", flush=True)
        model_dir = work / "model"
        digests = write_model(model_dir, parse_size(args.size), shards=4)
        with fake_gcs("filesystem", root=work / "bucket-root") as gcs:
            gcs.create_bucket("demo-bucket")
            for path in sorted(model_dir.iterdir()):
                gcs.seed_file("demo-bucket", f"models/demo-llama/{path.name}", path)
            source = "gs://demo-bucket/models/demo-llama"
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
                    import hashlib

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
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
