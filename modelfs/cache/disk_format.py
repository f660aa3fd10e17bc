"""The block file: its header, and reading and writing one whole file. Blocking; threads only.

A block file is a fixed header (magic, format version, block index, data length, CRC32C of
the data, length of the key, offset of the data), the key (object key and version), zero
padding to a 4 KiB page, and the data. The padding lets a whole block be written with
O_DIRECT straight from the block's page-aligned buffer (writing through the page cache costs
kernel CPU the read path needs; docs/architecture.md has the numbers). Everything in the
header is checked on every read, by :meth:`BlockHeader.validate` alone; a file that fails any
check reads as :attr:`ReadOutcome.CORRUPT` with the reason, and its caller deletes it.

These functions run in worker threads and touch nothing shared: they take everything they
need as arguments (including whether to try O_DIRECT) and report what they learned in their
result (``direct_failed``), which the trio task that awaited them applies. Files are opened
with O_NOFOLLOW; a block is written under a temporary name in a directory opened with
O_NOFOLLOW and renamed, so a crash leaves the whole block or nothing, and a symlink planted
in the cache dir is never followed.
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
import secrets
import stat
import struct
import threading
from dataclasses import dataclass

import crc32c

from modelfs.units import round_up

__all__ = [
    "FORMAT_VERSION",
    "HEADER",
    "MAGIC",
    "PAGE",
    "BlockHeader",
    "CorruptBlock",
    "ReadOutcome",
    "ReadResult",
    "WriteResult",
    "data_offset_for",
    "is_own_temp",
    "read_block",
    "temp_name",
    "write_block",
]

MAGIC = b"MFSB"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHHQQIII")  # magic, format, reserved, index, length, crc32c, key length, data offset
PAGE = 4096

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
# Opening a block file to read: O_NONBLOCK too, so a FIFO planted in its place opens at once
# (and then fails the regular-file check) instead of blocking until a writer comes.
_READ = _NOFOLLOW | os.O_NONBLOCK


class CorruptBlock(Exception):
    """A block file that does not hold the block asked for; ``str()`` says why."""


class _DirectRefused(Exception):
    """The file system refused O_DIRECT (EINVAL): read buffered, and stop trying it."""


class ReadOutcome(enum.Enum):
    HIT = "hit"  # ``dest`` holds the block, every check passed
    ABSENT = "absent"  # no such file: a plain miss
    CORRUPT = "corrupt"  # the file is there but wrong: delete it, fetch again


@dataclass(frozen=True, slots=True)
class ReadResult:
    outcome: ReadOutcome
    reason: str = ""
    direct_failed: bool = False  # O_DIRECT was refused (EINVAL): stop trying it


@dataclass(frozen=True, slots=True)
class WriteResult:
    size: int  # bytes on disk: header page(s) plus data
    direct_failed: bool = False


# This process's mark in its temporary files' names, beside its pid: in a container the daemon
# is pid 1 run after run, and a crashed run's temporaries must not look like this run's.
_RUN = secrets.token_hex(4)


def temp_name(name: str) -> str:
    """The temporary a write of ``name`` goes to: ``.NAME.PID-RUN-THREAD.tmp``."""
    return f".{name}.{os.getpid()}-{_RUN}-{threading.get_ident()}.tmp"


def is_own_temp(name: str) -> bool:
    """Whether a temporary file is being written by this process (the scan leaves it alone)."""
    return name.endswith(".tmp") and f".{os.getpid()}-{_RUN}-" in name


def data_offset_for(key_bytes: bytes) -> int:
    """Where the data starts: the header and key, padded to a page."""
    return round_up(HEADER.size + len(key_bytes), PAGE)


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """A parsed header. ``parse`` checks what needs no context, ``validate`` the rest."""

    index: int
    length: int
    crc: int
    key_len: int
    data_offset: int

    @classmethod
    def for_block(cls, key_bytes: bytes, index: int, data: memoryview, crc: int | None = None) -> BlockHeader:
        """The header of ``data``; ``crc``: its CRC32C if already known (computed as it arrived)."""
        if crc is None:
            crc = crc32c.crc32c(data)
        return cls(index, len(data), crc, len(key_bytes), data_offset_for(key_bytes))

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, FORMAT_VERSION, 0, self.index, self.length, self.crc, self.key_len, self.data_offset)

    @classmethod
    def parse(cls, raw: bytes | memoryview) -> BlockHeader:
        """The header at the start of ``raw``; CorruptBlock if it is short or not ours."""
        if len(raw) < HEADER.size:
            raise CorruptBlock("short header")
        magic, fmt, _, index, length, crc, key_len, data_offset = HEADER.unpack_from(raw)
        if magic != MAGIC or fmt != FORMAT_VERSION:
            raise CorruptBlock("bad magic or format version")
        return cls(index, length, crc, key_len, data_offset)

    def validate(self, key_bytes: bytes, index: int, length: int, stored_key: bytes | memoryview | None) -> None:
        """Raise CorruptBlock unless this header describes block ``index`` of ``key_bytes``.

        ``stored_key`` is the key as read from the file, or None when it is not read yet: the
        key length is checked first, so a header claiming an absurd key length is rejected
        before anything of that length is read or allocated.
        """
        if self.index != index or self.length != length:
            raise CorruptBlock("header names another block")
        if self.key_len != len(key_bytes):
            raise CorruptBlock("header names another object or version")
        if stored_key is not None and bytes(stored_key) != key_bytes:
            raise CorruptBlock("header names another object or version")
        if self.data_offset < HEADER.size + self.key_len or self.data_offset % PAGE:
            raise CorruptBlock("bad data offset")

    def check_data(self, data: memoryview) -> None:
        if crc32c.crc32c(data) != self.crc:
            raise CorruptBlock("CRC32C mismatch")


# --- reading


def _read_exactly(fd: int, dest: memoryview, offset: int) -> int:
    got = 0
    while got < len(dest):
        n = os.preadv(fd, [dest[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def _check_file(fd: int, expected_size: int) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise CorruptBlock("not a regular file")
    if st.st_size < expected_size:
        raise CorruptBlock("short data")
    if st.st_size > expected_size:
        raise CorruptBlock("trailing data")


def _read_direct(path: str, key_bytes: bytes, index: int, dest: memoryview) -> ReadResult | None:
    """One O_DIRECT read of header page and data into the page-aligned block buffer.

    No second copy in the page cache (the FUSE file's own pages already cache what readers
    read) and a fraction of the kernel CPU of a buffered read of a cold file. None when this
    path cannot read this file's layout: read it buffered. _DirectRefused if the file system
    refuses O_DIRECT.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | _READ)
    except FileNotFoundError:
        return ReadResult(ReadOutcome.ABSENT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise _DirectRefused from None
        raise
    head = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE)
    try:
        try:
            got = os.preadv(fd, [head, dest], 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            raise _DirectRefused from None
        header = BlockHeader.parse(head[: HEADER.size] if got >= HEADER.size else b"")
        key_end = HEADER.size + header.key_len
        stored_key = head[HEADER.size : key_end] if key_end <= PAGE else None
        header.validate(key_bytes, index, len(dest), stored_key)
        if header.data_offset != PAGE:
            return None  # a layout this path does not read; the buffered one does
        _check_file(fd, PAGE + len(dest))
        if got != PAGE + len(dest):
            raise CorruptBlock("short data")
        header.check_data(dest)
        return ReadResult(ReadOutcome.HIT)
    finally:
        head.close()
        os.close(fd)


def _read_buffered(path: str, key_bytes: bytes, index: int, dest: memoryview) -> ReadResult:
    try:
        fd = os.open(path, os.O_RDONLY | _READ)
    except FileNotFoundError:
        return ReadResult(ReadOutcome.ABSENT)
    try:
        header = BlockHeader.parse(os.pread(fd, HEADER.size, 0))
        header.validate(key_bytes, index, len(dest), None)  # before reading key_len bytes
        header.validate(key_bytes, index, len(dest), os.pread(fd, header.key_len, HEADER.size))
        _check_file(fd, header.data_offset + header.length)
        if _read_exactly(fd, dest, header.data_offset) != len(dest):
            raise CorruptBlock("short data")
        header.check_data(dest)
        return ReadResult(ReadOutcome.HIT)
    finally:
        os.close(fd)


def read_block(path: str, key_bytes: bytes, index: int, dest: memoryview, *, direct: bool) -> ReadResult:
    """Fill ``dest`` from the block file at ``path`` if it holds block ``index`` of ``key_bytes``.

    ``direct``: try one O_DIRECT read first (only for page-multiple lengths). OSError other
    than a missing file (EIO, ELOOP for a symlink) propagates; the caller treats it as bad.
    """
    direct_failed = False
    try:
        if direct and len(dest) % PAGE == 0 and HEADER.size + len(key_bytes) <= PAGE:
            try:
                found = _read_direct(path, key_bytes, index, dest)
            except _DirectRefused:
                found, direct_failed = None, True
            if found is not None:
                return found
        result = _read_buffered(path, key_bytes, index, dest)
    except CorruptBlock as exc:
        return ReadResult(ReadOutcome.CORRUPT, str(exc), direct_failed)
    return ReadResult(result.outcome, result.reason, direct_failed)


# --- writing


def _open_dir(path: str) -> int:
    """A descriptor of the directory ``path`` (made 0700 if missing), never through a symlink."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)


def write_block(
    dir_path: str, name: str, key_bytes: bytes, index: int, data: memoryview, *, direct: bool, crc: int | None = None
) -> WriteResult:
    """Write block ``index`` of ``key_bytes`` as ``dir_path/name``, atomically (temp + rename).

    ``direct``: write with O_DIRECT (from a page-aligned buffer whose length is a page
    multiple); if the file system refuses it, the write is done through the page cache and
    ``direct_failed`` says so.
    """
    header = BlockHeader.for_block(key_bytes, index, data, crc)
    head = mmap.mmap(-1, header.data_offset, flags=mmap.MAP_PRIVATE)  # page-aligned, as O_DIRECT wants
    head[: HEADER.size] = header.pack()
    head[HEADER.size : HEADER.size + len(key_bytes)] = key_bytes
    # Unique per process and thread (see temp_name): two writes never share a temporary.
    tmp = temp_name(name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
    direct = direct and len(data) % PAGE == 0
    direct_failed = False
    dfd = _open_dir(dir_path)
    try:
        try:
            os.unlink(tmp, dir_fd=dfd)  # left by a crash of a process with our pid
        except FileNotFoundError:
            pass
        try:
            try:
                fd = os.open(tmp, flags | (os.O_DIRECT if direct else 0), 0o600, dir_fd=dfd)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                direct, direct_failed = False, True  # e.g. tmpfs: no O_DIRECT there
                try:  # the refusal may come after the file was created
                    os.unlink(tmp, dir_fd=dfd)
                except FileNotFoundError:
                    pass
                fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
            try:
                try:
                    written = os.writev(fd, [head, data])
                except OSError as exc:
                    if not direct or exc.errno != errno.EINVAL:
                        raise
                    direct, direct_failed = False, True
                    os.close(fd)
                    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | _NOFOLLOW, 0o600, dir_fd=dfd)
                    written = os.writev(fd, [head, data])
                total = header.data_offset + len(data)
                while written < total:  # a short write: finish it without O_DIRECT's rules
                    os.close(fd)
                    fd = os.open(tmp, os.O_WRONLY | _NOFOLLOW, 0o600, dir_fd=dfd)
                    os.lseek(fd, written, os.SEEK_SET)
                    if written < header.data_offset:
                        rest = memoryview(head)[written:]
                    else:
                        rest = data[written - header.data_offset :]
                    written += os.write(fd, rest)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
    finally:
        os.close(dfd)
        head.close()
    return WriteResult(header.data_offset + len(data), direct_failed)
