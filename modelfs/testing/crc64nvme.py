"""A plain Python CRC-64/NVME, for tests: what S3's CRC64NVME is, computed without awscrt
(which ``modelfs warm`` uses), so a test does not only check awscrt against itself.

The CRC catalogue's parameters: poly 0xad93d23594c93659, reflected in and out, init and xorout
all ones; check value (the CRC of b"123456789") 0xae8b14860a799888. A byte at a time through a
256-entry table, a few MB/s: for test objects of a few MiB at most.
"""

from __future__ import annotations

import base64

__all__ = ["POLY", "CHECK", "crc64nvme", "crc64nvme_b64"]

POLY = 0xAD93D23594C93659
CHECK = 0xAE8B14860A799888
_MASK = (1 << 64) - 1
REFLECTED = int(f"{POLY:064b}"[::-1], 2)  # the poly bit-reversed, for the reflected (LSB-first) form


def _table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _table()


def crc64nvme(data: bytes) -> int:
    crc = _MASK
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ _MASK


def crc64nvme_b64(data: bytes) -> str:
    """As S3 spells it (x-amz-checksum-crc64nvme): base64 of the big-endian 8 bytes."""
    return base64.b64encode(crc64nvme(data).to_bytes(8, "big")).decode()
