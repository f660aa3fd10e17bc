"""file:// never lists, stats or reads anything outside SOURCE, whatever its symlinks say.

A symlink to a file below the root is shown as that file (the Hugging Face cache layout);
one out of the root, one that loops or dangles, one to a directory, is left out with one
warning, and refused when asked for by name. A component swapped for a symlink between the
look and the open (made deterministic by doing the swap inside the look) is refused too.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from modelfs.backends import beneath
from modelfs.backends.local import LocalBackend
from modelfs.config import parse_source
from modelfs.errors import NotFound, VersionChanged

SECRET = b"root:$6$outside-the-source\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """SOURCE with a file, hostile symlinks, and an outside directory they point into."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shadow").write_bytes(SECRET)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "model.bin").write_bytes(b"weights" * 100)
    (src / "sub" / "a.txt").write_bytes(b"a")
    (src / "notes.txt").symlink_to(outside / "shadow")  # absolute, out
    (src / "rel-out").symlink_to("../outside/shadow")  # relative, out
    (src / "sneaky").symlink_to("sub/../../outside/shadow")  # climbs out through a real directory
    (src / "data").symlink_to("/")  # the whole filesystem
    (src / "outdir").symlink_to(outside)
    (src / "dangling").symlink_to("nowhere")
    (src / "loop-a").symlink_to("loop-b")
    (src / "loop-b").symlink_to("loop-a")
    (src / "self").symlink_to(".")  # a directory loop
    (src / "subdir-link").symlink_to("sub")  # a directory below the root: not followed either
    os.mkfifo(src / "fifo")
    return src


def _backend(src: Path) -> LocalBackend:
    return LocalBackend(parse_source(f"file://{src}"))


HOSTILE = ["notes.txt", "rel-out", "sneaky", "data", "outdir", "dangling", "loop-a", "loop-b", "self", "subdir-link"]


async def test_symlinks_out_of_the_source_are_not_listed(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend = _backend(tree)
    caplog.set_level(logging.WARNING, logger="modelfs.backends.local")
    names = [o.name for o in await backend.list_objects()]
    assert names == ["model.bin", "sub/a.txt"]
    page = await backend.list_dir("")
    assert [o.name for o in page.objects] == ["model.bin"]
    assert page.prefixes == ["sub/"]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(HOSTILE), warned  # one line per symlink left out ...
    assert any("notes.txt' -> '" in w and "leads out of the source" in w for w in warned), warned
    assert any("loop-a' -> 'loop-b'" in w and "loop" in w for w in warned), warned
    assert any("subdir-link' -> 'sub'" in w and "directories are not followed" in w for w in warned), warned
    await backend.list_objects()
    await backend.list_dir("")
    assert len(caplog.records) == len(HOSTILE)  # ... once, however often it is listed again
    await backend.aclose()


@pytest.mark.parametrize("name", [*HOSTILE, "data/etc/passwd", "outdir/shadow", "self/model.bin", "fifo", "sub"])
async def test_symlinks_out_of_the_source_are_not_stat_or_read(tree: Path, name: str) -> None:
    backend = _backend(tree)
    with pytest.raises(NotFound):
        await backend.stat(name)
    info = await backend.stat("model.bin")  # any version: the read must not reach the bytes
    dest = bytearray(len(SECRET))
    with pytest.raises(VersionChanged):
        await backend.read_range(name, info.version, 0, memoryview(dest))
    assert bytes(dest) == bytes(len(SECRET))
    await backend.aclose()


async def test_listing_a_symlinked_directory_by_name_shows_nothing(tree: Path) -> None:
    backend = _backend(tree)
    for prefix in ("data/", "outdir/", "self/", "data/etc/"):
        page = await backend.list_dir(prefix)
        assert (page.objects, page.prefixes) == ([], []), prefix
    await backend.aclose()


def _hf_cache(root: Path) -> dict[str, bytes]:
    """A Hugging Face hub cache repo: snapshots/<rev>/… are relative symlinks to ../../blobs/<sha>."""
    repo = root / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    (snap / "tokenizer").mkdir(parents=True)
    files = {
        "config.json": b'{"model_type": "tiny"}',
        "model.safetensors": os.urandom(300_000),
        "tokenizer/vocab.txt": b"a\nb\nc\n",
    }
    for rel, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / sha).write_bytes(data)
        depth = rel.count("/") + 2
        (snap / rel).symlink_to("../" * depth + "blobs/" + sha)
    (snap / "absolute.json").symlink_to(repo / "blobs" / hashlib.sha256(files["config.json"]).hexdigest())
    files["absolute.json"] = files["config.json"]
    return {f"models--org--tiny/snapshots/abc123/{rel}": data for rel, data in files.items()}


async def test_a_hugging_face_cache_reads_through_its_symlinks(tmp_path: Path) -> None:
    files = _hf_cache(tmp_path)
    backend = _backend(tmp_path)
    listed = {o.name: o for o in await backend.list_objects()}
    for name, data in files.items():
        assert listed[name].size == len(data)
        info = await backend.stat(name)
        assert info.version == listed[name].version
        dest = bytearray(len(data))
        await backend.read_range(name, info.version, 0, memoryview(dest))
        assert hashlib.sha256(dest).digest() == hashlib.sha256(data).digest(), name
    page = await backend.list_dir("models--org--tiny/snapshots/abc123/")
    assert sorted(o.name.rsplit("/", 1)[1] for o in page.objects[1:]) == sorted(
        ["absolute.json", "config.json", "model.safetensors"]
    )
    assert page.prefixes == ["models--org--tiny/snapshots/abc123/tokenizer/"]
    await backend.aclose()


async def test_a_symlink_pointed_elsewhere_after_the_listing_is_version_changed(tmp_path: Path) -> None:
    """The version is the target's: a link moved to another file (below the root) fails the read."""
    (tmp_path / "blob-1").write_bytes(b"1" * 100)
    (tmp_path / "blob-2").write_bytes(b"2" * 100)
    (tmp_path / "m.bin").symlink_to("blob-1")
    backend = _backend(tmp_path)
    info = await backend.stat("m.bin")
    (tmp_path / "m.bin").unlink()
    (tmp_path / "m.bin").symlink_to("blob-2")
    dest = bytearray(100)
    with pytest.raises(VersionChanged, match="changed since it was opened"):
        await backend.read_range("m.bin", info.version, 0, memoryview(dest))
    await backend.aclose()


def test_a_chain_of_symlinks_is_followed_up_to_the_kernels_limit(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    previous = "f"
    for i in range(beneath.MAX_LINKS + 1):
        (tmp_path / f"l{i}").symlink_to(previous)
        previous = f"l{i}"
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(beneath.open_file(root, f"l{beneath.MAX_LINKS - 1}", str(tmp_path)))  # MAX_LINKS links
        with pytest.raises(beneath.Refused, match="a loop"):
            beneath.open_file(root, f"l{beneath.MAX_LINKS}", str(tmp_path))
    finally:
        os.close(root)


def _swap_after_the_look(monkeypatch: pytest.MonkeyPatch, src: Path, component: str, to: Path) -> list[str]:
    """The attacker's race, made deterministic: the moment the walk has looked at ``component``
    (lstat: a real directory or file) it is renamed away and a symlink to ``to`` put in its place,
    before the walk opens it."""
    real_stat = os.stat
    swapped: list[str] = []

    def stat_then_swap(path: object, *args: object, **kwargs: object) -> os.stat_result:
        st = real_stat(path, *args, **kwargs)  # type: ignore[arg-type]
        if path == component and kwargs.get("dir_fd") is not None and not swapped:
            os.rename(src / component, src / (component + ".moved"))
            os.symlink(to, src / component)
            swapped.append(component)
        return st

    monkeypatch.setattr(beneath.os, "stat", stat_then_swap)
    return swapped


async def test_a_directory_swapped_for_a_symlink_during_the_walk_is_refused(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tree.parent / "outside" / "a.txt").write_bytes(SECRET)  # the same name, outside
    backend = _backend(tree)
    info = await backend.stat("sub/a.txt")
    swapped = _swap_after_the_look(monkeypatch, tree, "sub", tree.parent / "outside")
    dest = bytearray(1)
    with pytest.raises(VersionChanged, match="replaced while it was opened"):
        await backend.read_range("sub/a.txt", info.version, 0, memoryview(dest))
    assert swapped == ["sub"]
    assert bytes(dest) == b"\0"
    await backend.aclose()


async def test_a_file_swapped_for_a_symlink_during_the_walk_is_refused(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _backend(tree)
    swapped = _swap_after_the_look(monkeypatch, tree, "model.bin", tree.parent / "outside" / "shadow")
    with pytest.raises(NotFound, match="replaced while it was opened"):
        await backend.stat("model.bin")
    assert swapped == ["model.bin"]
    await backend.aclose()


async def test_a_directory_swapped_for_a_symlink_while_listed_is_not_listed(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk found sub/ a directory in the root's listing; by the time it opens it, it is a
    symlink out: nothing below it is listed (and no outside name appears)."""
    (tree.parent / "outside" / "b.txt").write_bytes(SECRET)
    backend = _backend(tree)
    real_open = os.open
    swapped: list[bool] = []

    def swap_then_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if path == "sub" and flags & os.O_DIRECTORY and not swapped:  # the walk descends into sub/
            os.rename(tree / "sub", tree / "sub.moved")
            os.symlink(tree.parent / "outside", tree / "sub")
            swapped.append(True)
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(beneath.os, "open", swap_then_open)
    names = [o.name for o in await backend.list_objects()]
    assert swapped
    assert names == ["model.bin"]
    await backend.aclose()
