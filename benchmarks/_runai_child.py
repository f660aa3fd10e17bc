"""Load one safetensors object from GCS with Run:ai Model Streamer, without torch (a child of peers.py).

Runs in the throwaway venv that ``peers.py --setup-runai`` makes (runai-model-streamer and
runai-model-streamer-gcs installed ``--no-deps``, plus numpy, humanize, google-cloud-storage,
google-auth): never in the project's venv, never a dependency of modelfs. The package's
``__init__`` (and ``file_streamer``'s) import torch, so this registers empty package objects in their place and imports
only the ctypes layer (``libstreamer``) and the request planner (``file_streamer/requests_iterator``),
then does what ``FileStreamer.stream_files``/``get_chunks`` do: read the 8-byte header length and
the JSON header with two small requests, plan one range per tensor into a ring of buffers sized by
``RUNAI_STREAMER_MEMORY_LIMIT``, keep every free buffer submitted, and hand each finished range to
the consumer as a numpy view (what the streamer hands to torch on the CPU path: no copy).

    python _runai_child.py gs://BUCKET/NAME [--digests FILE]

Prints one JSON line: seconds (first request to last range), bytes, tensors, peak_rss_kib and,
with ``--digests``, the names of tensors whose sha256 differs. The endpoint comes from
``CLOUD_STORAGE_EMULATOR_ENDPOINT`` (the parent sets a loopback URL; this refuses anything else).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import struct
import sys
import time
import types
from pathlib import Path
from typing import Any


def _import_without_package_init() -> tuple[Any, Any]:
    spec = importlib.util.find_spec("runai_model_streamer")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("runai_model_streamer is not installed in this interpreter's environment")
    root = next(iter(spec.submodule_search_locations))
    for name, where in (
        ("runai_model_streamer", root),
        ("runai_model_streamer.file_streamer", root + "/file_streamer"),
    ):
        package = types.ModuleType(name)  # an empty package: its __init__ (torch) is never run
        package.__path__ = [where]
        sys.modules[name] = package
    from runai_model_streamer.file_streamer import requests_iterator as planner
    from runai_model_streamer.libstreamer import libstreamer as lib

    return lib, planner


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--digests", type=Path, default=None)
    args = parser.parse_args()
    endpoint = os.environ.get("CLOUD_STORAGE_EMULATOR_ENDPOINT", "")
    if not endpoint.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise SystemExit(f"CLOUD_STORAGE_EMULATOR_ENDPOINT must be a loopback URL, not {endpoint!r}")
    lib, planner = _import_without_package_init()
    want: dict[str, str] = json.loads(args.digests.read_text()) if args.digests else {}

    streamer = lib.runai_start()
    keep_alive: list[Any] = []  # every ring buffer stays referenced until runai_end returns
    try:
        t0 = time.perf_counter()

        def small(offset: int, size: int) -> bytes:
            """One range read through the streamer (the header reads SafetensorsStreamer makes)."""
            chunks = [planner.FileChunks(0, args.url, [offset], [size])]
            ring = planner.FilesRequestsIteratorWithBuffer.with_memory_mode(chunks, None, planner.DIRECT_IO_BLOCK)
            request = ring.next_request()
            keep_alive.append(ring)
            lib.runai_request(streamer, [args.url], [1], [offset], [size], request.range_dsts)
            response = lib.runai_response(streamer)
            if response is None or response[0] != lib.SUCCESS_ERROR_CODE:
                raise RuntimeError(f"header read failed: {response and lib.runai_response_str(response[0])}")
            _, _, view = ring.get_global_file_and_range(request, 0, 0)
            return bytes(view)

        (header_len,) = struct.unpack("<Q", small(0, 8))
        header = json.loads(small(8, header_len))
        header.pop("__metadata__", None)
        base = 8 + header_len
        names = sorted(header, key=lambda n: header[n]["data_offsets"][0])
        offsets = [base + header[n]["data_offsets"][0] for n in names]
        sizes = [header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names]

        chunks = [planner.FileChunks(0, args.url, offsets, sizes)]
        ring = planner.FilesRequestsIteratorWithBuffer.with_memory_mode(chunks, None, planner.DIRECT_IO_BLOCK)
        keep_alive.append(ring)
        live: dict[int, Any] = {}

        def submit() -> None:
            while ring.has_free_buffer():
                request = ring.next_request()
                if request is None:
                    return
                sid = lib.runai_request(
                    streamer,
                    [f.path for f in request.files],
                    [len(f.sizes) for f in request.files],
                    [o for f in request.files for o in f.offsets],
                    [s for f in request.files for s in f.sizes],
                    request.range_dsts,
                )
                live[sid] = (request, request.num_ranges)

        submit()
        total = tensors = 0
        bad: list[str] = []
        while live:
            response = lib.runai_response(streamer)
            if response is None:
                break
            code, sid, file_index, range_index, done = response
            if code != lib.SUCCESS_ERROR_CODE:
                raise RuntimeError(f"range failed: {lib.runai_response_str(code)}")
            request, _ = live[sid]
            _, global_index, view = ring.get_global_file_and_range(request, file_index, range_index)
            total += view.nbytes
            tensors += 1
            if want:
                name = names[global_index]
                if hashlib.sha256(view).hexdigest() != want.get(name):
                    bad.append(name)
            del view
            if done:
                del live[sid]
                ring.release(request)
                submit()
        seconds = time.perf_counter() - t0
    finally:
        lib.runai_end(streamer)  # only now may the ring buffers in keep_alive go
    out: dict[str, Any] = {"seconds": seconds, "bytes": total, "tensors": tensors}
    if want:
        out.update(verified=True, bad=bad[:20], bad_count=len(bad), missing_count=len(want) - tensors)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            out["peak_rss_kib"] = int(line.split()[1])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
