"""The cache directory: made safe to use, locked by one daemon, recreated if it disappears.

modelfs usually runs as root, so a cache dir another user can write to could be turned
against the host: a lock or log file planted as a symlink to ``/etc/shadow`` would have it
truncated, and a block file planted under an object's name would be served. So, before
anything is created or opened in it:

- every directory from ``/`` down to the cache dir must be owned by root or by the daemon's
  user, and none may be writable by others unless it has the sticky bit (``/tmp``); a
  symlink on the way is followed only if root owns it (``/var/run``);
- the cache dir itself must be a real directory (not a symlink) owned by the daemon's user,
  holding nothing but what modelfs puts there (so ``/``, a home directory or a project
  directory is refused, never made private). It is made 0700; one that was writable by
  others is accepted only if it is empty (a fresh Kubernetes ``emptyDir`` is 0777), since
  anything in it may have been planted, and a shared sticky one (``/tmp``, ``/dev/shm``) is
  refused: it is not the daemon's to make private. A refused directory is left as it was;
- the lock file, the log file and every block and temporary file are opened with
  ``O_NOFOLLOW`` (see disk_format.py), so a planted symlink fails instead of being followed.

Every refusal is a one-line MountError naming the path and the reason.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO

from modelfs.errors import MountError

__all__ = ["CacheDir", "check_dir_chain", "open_log_file", "prepare_dir"]

_MAX_SYMLINKS = 40


def _refuse(path: Path | str, why: str) -> MountError:
    return MountError(f"refusing cache dir {path}: {why}")


def _check_ancestor(path: str, st: os.stat_result, uid: int) -> None:
    if st.st_uid not in (0, uid):
        raise _refuse(path, f"owned by uid {st.st_uid}, not by root or the daemon's user (uid {uid})")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "not a directory")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise _refuse(path, "writable by every user and not sticky")


def check_dir_chain(path: Path, uid: int | None = None, _depth: int = 0) -> Path:
    """Check every existing directory from ``/`` down to ``path``; the real path checked.

    Components below the first missing one are not checked (they will be created 0700 by
    the daemon's user). Root-owned symlinks are followed and their targets checked the same
    way; any other symlink is refused.
    """
    uid = os.geteuid() if uid is None else uid
    if _depth > _MAX_SYMLINKS:
        raise _refuse(path, "too many levels of symbolic links")
    parts = Path(os.path.abspath(path)).parts
    current = Path(parts[0])
    for position, name in enumerate(parts[1:], 1):
        candidate = current / name
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            return current.joinpath(*parts[position:])
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid != 0:
                raise _refuse(path, f"{candidate} is a symlink")
            target = current / os.readlink(candidate)
            current = check_dir_chain(target, uid, _depth + 1)
            continue
        _check_ancestor(str(candidate), st, uid)
        current = candidate
    return current


def prepare_dir(root: Path) -> None:
    """Create ``root`` (0700) if needed and check it and its ancestors; MountError if unsafe."""
    uid = os.geteuid()
    check_dir_chain(root.parent, uid)
    try:
        root.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise MountError(f"cannot use cache dir {root}: {exc.strerror}") from None
    check_dir_chain(root.parent, uid)  # what was created must pass too
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refuse(root, "a symlink or not a directory") from None
        raise MountError(f"cannot use cache dir {root}: {exc.strerror}") from None
    try:
        _take(root, fd, uid)
    except OSError as exc:
        raise MountError(f"cannot use cache dir {root}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _take(root: Path, fd: int, uid: int) -> None:
    """Make the open directory ``fd`` a private cache dir (0700), or refuse it as it was found.

    A directory the user named is often someone else's too (``/tmp``, ``/dev/shm``, a home
    directory, ``/``): modelfs changes its mode only once it knows it will use it, and puts it
    back when a check made after tightening fails.
    """
    st = os.fstat(fd)
    if st.st_uid != uid:
        raise _refuse(root, f"owned by uid {st.st_uid}, not by the daemon's user (uid {uid})")
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH and mode & stat.S_ISVTX:
        raise _refuse(root, "a shared directory (writable by every user, sticky, like /tmp): use a new directory in it")
    if mode & (stat.S_IWOTH | stat.S_IWGRP):
        # Tightened first, then looked into: nothing can be planted after the chmod.
        os.fchmod(fd, 0o700)
        try:
            if os.listdir(fd):
                raise _refuse(root, "it was writable by other users and is not empty (anything in it may be planted)")
        except BaseException:
            os.fchmod(fd, mode)
            raise
        return
    foreign = sorted(name for name in os.listdir(fd) if not _ours(name))
    if foreign:
        raise _refuse(
            root,
            f"it holds files modelfs did not make ({foreign[0]!r}{' ...' if len(foreign) > 1 else ''}): "
            "give modelfs an empty or new directory",
        )
    if mode != 0o700:
        os.fchmod(fd, 0o700)


def _ours(name: str) -> bool:
    """What modelfs keeps in a cache dir (its blocks, its lock, log files), or a new file
    system's lost+found: a directory holding anything else is not one modelfs made."""
    return name in ("blocks", "lock", "lost+found") or name.endswith(".log")


def open_log_file(path: Path, cache_dir: Path) -> BinaryIO:
    """The daemon's log file, opened for appending without following a symlink.

    A log file inside the cache dir gets the cache dir's checks first.
    """
    if path.parent == cache_dir:
        prepare_dir(cache_dir)
    else:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MountError(f"refusing log file {path}: it is a symlink") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise MountError(f"refusing log file {path}: not a regular file")
    return os.fdopen(fd, "ab")


class CacheDir:
    """``root`` with its ``blocks`` subdirectory and its lock, held while the daemon runs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blocks = root / "blocks"
        self._lock_fd: int | None = None

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    def open(self) -> None:
        """Check, create and lock the cache dir, so two daemons never share one.

        MountError (one line) if it is unsafe, unusable or locked by another process.
        """
        self.adopt(self.create_and_lock())

    def create_and_lock(self, held: int | None = None) -> int:
        """The blocking part of :meth:`open`: the locked lock file's descriptor. Changes no state,
        so it may run in a worker thread; :meth:`adopt` takes the result on the caller's side.
        ``held``: the lock this process holds already (a recreation after part of the cache dir
        was deleted): if its file is still the lock file, that lock is kept."""
        prepare_dir(self.root)
        try:
            os.mkdir(self.blocks, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise MountError(f"cannot use cache dir {self.root}: {exc.strerror}") from None
        st = os.lstat(self.blocks)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise _refuse(self.root, f"{self.blocks} is not a directory of the daemon's user")
        return self._lock(held)

    def adopt(self, lock_fd: int) -> None:
        """Hold ``lock_fd`` as the lock (closing the one held before, e.g. of a deleted dir)."""
        self.close()
        self._lock_fd = lock_fd

    def _lock(self, held: int | None = None) -> int:
        path = self.root / "lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _refuse(self.root, f"its lock file {path} is a symlink") from None
            raise MountError(f"cannot use cache dir {self.root}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                raise _refuse(self.root, f"its lock file {path} is not a private regular file")
            if held is not None:
                mine = os.fstat(held)
                if (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino):
                    os.close(fd)
                    return os.dup(held)  # our own lock file, still there: the same lock
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise MountError(
                    f"cache dir {self.root} is in use by another modelfs process (give this mount its own --cache-dir)"
                ) from None
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError as exc:  # (a full file system: ENOSPC)
                raise MountError(f"cannot use cache dir {self.root}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    @property
    def lock_fd(self) -> int | None:
        return self._lock_fd

    def lost(self, lock_fd: int) -> bool:
        """True if the cache dir, its blocks dir or the lock file ``lock_fd`` is no longer there.

        Blocking, and reads no state of this object (the caller passes the descriptor).
        """
        try:
            held = os.fstat(lock_fd)
            now = os.lstat(self.root / "lock")
            os.lstat(self.blocks)
        except OSError:
            return True
        return (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
