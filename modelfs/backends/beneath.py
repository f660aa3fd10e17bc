"""Opening a name below a directory without ever leaving it, whatever its symlinks say.

The ``file://`` backend (local.py) serves a directory another user may write into, through a
mount other users may read (``--allow-other``). A symlink in it (``notes.txt -> /etc/shadow``,
``data -> /``) must not hand them what lies outside. So nothing here lets the kernel follow a
symlink: each component of a name is looked at (``lstat``) and opened (``O_NOFOLLOW``, relative
to its parent's descriptor) one at a time; a symlink is read and its target resolved the same
way, starting from the directory it sits in, and refused as soon as it would climb above the
root (or names an absolute path outside it). ``..`` is our own step back along the path
walked, never the kernel's, and a component swapped for a symlink between the look and the
open fails the open (``ELOOP``/``ENOTDIR``) instead of being followed: no race can leave the root.

So a symlink to another file below the root is followed (a Hugging Face cache snapshot,
``snapshots/<rev>/model.safetensors -> ../../blobs/<hash>``); one out of it, one that loops or
dangles, one to anything but a regular file is refused (:class:`Refused`), and so is a path
through a symlink to a directory, even one below the root: the listing never descends into
one (a loop, or the same tree twice), so no name it shows goes through one.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["MAX_LINKS", "Refused", "open_dir", "open_file"]

MAX_LINKS = 40  # symlinks followed to resolve one name (the kernel's own limit)

_OUTSIDE = "leads out of the source"
_A_DIRECTORY = "a directory (symlinks to directories are not followed)"
_THROUGH_A_LINK = "a path through a symlink to a directory (not followed)"

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the look opens at once (and fails the S_ISREG check)
# instead of blocking the thread until a writer comes.
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Refused(Exception):
    """The name leads out of the root, loops, or is not a regular file: it is never opened."""


def open_dir(root: int, parts: list[str]) -> int:
    """A descriptor of the directory ``root/parts[0]/parts[1]/…``, each a real directory (no symlink).

    OSError as the kernel raises it: FileNotFoundError, NotADirectoryError (a file, or a symlink
    put there), PermissionError. The caller closes the descriptor.
    """
    fd = os.dup(root)
    try:
        for part in parts:
            if part in ("", ".", ".."):
                raise FileNotFoundError(errno.ENOENT, "not a name below the root", part)
            below = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(root: int, name: str, real_root: str) -> int:
    """A read-only descriptor of the regular file ``name`` ('/'-separated, relative to ``root``).

    Symlinks on the way are followed only while they stay below the root (``real_root``, its
    resolved path, says which absolute targets do). Raises :class:`Refused`, or OSError as the
    kernel raises it (FileNotFoundError: nothing there). The caller closes the descriptor.
    """
    pending = _parts(name)
    where: list[str] = []  # the path from the root to ``fd``: real directories only
    links = 0
    fd = os.dup(root)
    try:
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if not where:
                    raise Refused(_OUTSIDE)
                where.pop()
                parent = open_dir(root, where)  # from the root again: never the kernel's ".."
                os.close(fd)
                fd = parent
                continue
            st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                if pending:  # a directory on the way: only real ones (as the listing walks)
                    raise Refused(_THROUGH_A_LINK)
                links += 1
                if links > MAX_LINKS:
                    raise Refused(f"more than {MAX_LINKS} symlinks (a loop?)")
                target = os.readlink(part, dir_fd=fd)
                if target.startswith("/"):
                    inside = _below(target, real_root)
                    if inside is None:
                        raise Refused(_OUTSIDE)
                    where.clear()
                    top = os.dup(root)
                    os.close(fd)
                    fd = top
                    target = inside
                pending.extend(_parts(target))
                continue
            if not pending:  # the last component: the file itself
                if stat.S_ISDIR(st.st_mode):
                    raise Refused(_A_DIRECTORY)
                if not stat.S_ISREG(st.st_mode):
                    raise Refused("not a regular file")
                opened = _open(part, _FILE, fd)
                os.close(fd)
                fd = opened
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the look
                    raise Refused("not a regular file")
                return fd
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", part)
            below = _open(part, _DIR, fd)
            os.close(fd)
            fd = below
            where.append(part)
        raise Refused(_A_DIRECTORY)  # the name (or a symlink's target) ends in '/'
    except BaseException:
        os.close(fd)
        raise


def _open(part: str, flags: int, fd: int) -> int:
    """``part`` opened below ``fd``; Refused if it was swapped for a symlink (or another kind of
    file) since it was looked at: O_NOFOLLOW and O_DIRECTORY refuse it rather than follow it."""
    try:
        return os.open(part, flags, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused("replaced while it was opened") from None
        raise


def _parts(path: str) -> list[str]:
    """The components of ``path``, last first (a stack: the next one is popped). A trailing
    '/' leaves an empty last component, so the one before it must be a directory."""
    parts = path.split("/")
    parts.reverse()
    return parts


def _below(target: str, real_root: str) -> str | None:
    """An absolute ``target`` as a path relative to the root, or None if it is not below it.
    Its ".." are left to the walk, which goes back along the real path (never above the root)."""
    if real_root == "/":
        return target.lstrip("/")
    if target == real_root:
        return ""
    if target.startswith(real_root + "/"):
        return target[len(real_root) + 1 :]
    return None
