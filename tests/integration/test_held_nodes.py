"""A real mount keeps the nodes the kernel holds bounded: a walk that stats and reads many more
files than ``held_nodes(--metadata-cache)`` ends with the daemon holding about that many,
and every file's attributes and bytes right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from modelfs.memlimit import held_nodes
from modelfs.testing.mounts import mounted

DIRS = 40
PER_DIR = 100


def content(name: str) -> bytes:
    return f"{name}\n".encode() * (1 + len(name) % 7)


def stats(mnt: Path) -> dict[str, object]:
    return json.loads(os.getxattr(mnt, "user.modelfs.stats"))  # type: ignore[no-any-return]


def test_a_walk_of_many_files_leaves_the_held_nodes_bounded(tmp_path: Path) -> None:
    source = tmp_path / "src"
    names = []
    for d in range(DIRS):
        (source / f"d{d:02d}").mkdir(parents=True)
        for i in range(PER_DIR):
            name = f"d{d:02d}/f{i:03d}.json"
            (source / name).write_bytes(content(name))
            names.append(name)
    cap = held_nodes(64 << 10)
    assert len(names) > 10 * cap
    with mounted(f"file://{source}", tmp_path / "mnt", tmp_path / "cache", "--metadata-cache", "64K") as mnt:
        seen = []
        for dirpath, dirnames, filenames in os.walk(mnt):
            dirnames.sort()
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                name = str(path.relative_to(mnt))
                assert path.stat().st_size == len(content(name)), name
                assert path.read_bytes() == content(name), name
                seen.append(name)
        assert seen == names
        after = stats(mnt)
        assert after["held_cap"] == cap
        # The kernel was asked to drop the least recently replied nodes, a batch at a time (a
        # directory's entry takes the unused entries below it along)...
        assert after["node_invalidations"] >= DIRS  # type: ignore[operator]
        # ...so the daemon holds about the cap (plus what arrived while the last batch was being
        # sent, and what the kernel has not forgotten yet), not a node per file walked.
        assert after["held_nodes"] <= 2 * cap  # type: ignore[operator]
        assert after["inodes"] <= 3 * cap  # type: ignore[operator]
        # A second pass (nodes looked up again after the kernel forgot them) reads the same.
        for name in names[:: PER_DIR // 4]:
            path = mnt / name
            assert path.stat().st_size == len(content(name))
            assert path.read_bytes() == content(name)
        assert sorted(os.listdir(mnt / "d07")) == sorted(n.split("/")[1] for n in names if n.startswith("d07/"))


def test_a_working_directory_keeps_its_name_through_a_walk(tmp_path: Path) -> None:
    """A model server started in the model's directory sits idle while something else walks
    many more files than the cap. Its directory is never given back: dropping the entry of a
    working directory unhashes it, and getcwd() there failed with ENOENT (found by review)."""
    source = tmp_path / "src"
    (source / "model").mkdir(parents=True)
    (source / "model" / "config.json").write_text("{}")
    for d in range(10):
        (source / f"d{d}").mkdir()
        for i in range(100):
            (source / f"d{d}" / f"f{i}").write_text("x")
    with mounted(f"file://{source}", tmp_path / "mnt", tmp_path / "cache", "--metadata-cache", "64K") as mnt:
        server = subprocess.Popen(
            [sys.executable, "-c", _IN_THE_MODEL_DIRECTORY, str(mnt / "model")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None and server.stdin is not None
            assert server.stdout.readline() == f"cwd {mnt / 'model'}\n"
            for d in range(10):
                for i in range(100):
                    assert (mnt / f"d{d}" / f"f{i}").stat().st_size == 1
            assert stats(mnt)["node_invalidations"] >= 500  # type: ignore[operator]
            out, _ = server.communicate("\n", timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
                server.communicate()
        assert out == f"cwd {mnt / 'model'}\nread {{}}\n"


_IN_THE_MODEL_DIRECTORY = """
import os, sys
os.chdir(sys.argv[1])
print("cwd", os.getcwd(), flush=True)
sys.stdin.readline()
try:
    print("cwd", os.getcwd())
except OSError as exc:
    print("getcwd failed:", exc)
print("read", open("config.json").read())
"""
