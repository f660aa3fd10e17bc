"""The safetensors header, read for the eager stream's block order: bounded and distrustful.

A safetensors file is an 8-byte little-endian header length, a JSON object mapping tensor
names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of
the header), then the tensor data. The eager stream only needs the data spans, so the
parser keeps nothing else: each tensor entry becomes one ``(begin, end)`` pair as soon as it
is parsed (``object_pairs_hook``), which keeps the objects alive during parsing to about
:data:`PARSE_OVERHEAD` times the header's size. The header is untrusted input: its length is
capped (:data:`MAX_HEADER`), entries whose offsets are not two integers with
``0 <= begin <= end <= data size`` are ignored, and anything that is not a JSON object of
such entries raises ValueError (the caller then streams the file in file order).

:func:`tensor_spans` is a pure function on a buffer nothing else touches, so the eager
stream runs it in a worker thread, off the event loop.
"""

from __future__ import annotations

import codecs
import json
import struct
from collections.abc import Iterable
from typing import Any

from modelfs.units import ceil_div

__all__ = ["MAX_HEADER", "PARSE_OVERHEAD", "block_order", "header_length", "tensor_spans"]

MAX_HEADER = 100 << 20
"""The safetensors format's own limit on the header (its reference implementation refuses more)."""

PARSE_OVERHEAD = 4
"""Bytes of Python objects alive while parsing, per header byte (the decoded text, the names
and spans of the tensors); counted in the memory budget beside the header's own buffer."""


class _Entry:
    """Marks an object that was a tensor entry; ``span`` is None when its offsets are bad."""

    __slots__ = ("span",)

    def __init__(self, span: tuple[int, int] | None) -> None:
        self.span = span


class _Spans(list[tuple[int, int]]):
    """The spans of an object holding tensor entries (not any JSON list)."""


def header_length(first: bytes | memoryview, size: int) -> int:
    """The header length from the file's first 8 bytes; ValueError if it cannot be right."""
    if size < 8 or len(first) < 8:
        raise ValueError("shorter than a safetensors length prefix")
    (length,) = struct.unpack("<Q", bytes(first[:8]))
    if length > min(size - 8, MAX_HEADER):
        raise ValueError(f"header length {length} out of range")
    return int(length)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tensor_spans(header: bytes | memoryview, data_size: int) -> list[tuple[int, int]]:
    """The ``(begin, end)`` data spans of the tensors, offsets relative to the data start.

    Entries with offsets that are not two integers within ``[0, data_size]`` in order are
    left out; a header that is not UTF-8 JSON holding an object raises ValueError.
    """

    def hook(pairs: list[tuple[str, Any]]) -> Any:
        # Called for every JSON object, innermost first: a tensor entry becomes an _Entry at
        # once, so its dtype and shape are dropped before the next entry is parsed.
        for key, value in pairs:
            if key == "data_offsets":
                if (
                    isinstance(value, list)
                    and len(value) == 2
                    and _is_int(value[0])
                    and _is_int(value[1])
                    and 0 <= value[0] <= value[1] <= data_size
                ):
                    return _Entry((value[0], value[1]))
                return _Entry(None)
        if any(isinstance(value, _Entry) for _, value in pairs):
            return _Spans(value.span for _, value in pairs if isinstance(value, _Entry) and value.span is not None)
        return None

    text = codecs.decode(header, "utf-8")  # UnicodeDecodeError is a ValueError
    parsed = json.loads(text, object_pairs_hook=hook)
    del text
    if isinstance(parsed, _Spans):
        return sorted(parsed)
    if parsed is None and text_is_object(header):
        return []  # an object with no tensors (only __metadata__, or nothing)
    raise ValueError("the header is not a JSON object of tensors")


def text_is_object(header: bytes | memoryview) -> bool:
    """Whether the header's first non-blank byte opens a JSON object."""
    stripped = bytes(header[:64]).lstrip(b" \t\r\n")
    return stripped.startswith(b"{")


def block_order(spans: Iterable[tuple[int, int]], header_len: int, block_size: int, size: int) -> list[int]:
    """Blocks of the file: the header's, then those of the tensors by data offset, then the rest."""
    blocks = ceil_div(size, block_size)
    order: list[int] = list(range(min(blocks, ceil_div(8 + header_len, block_size))))
    seen = set(order)
    data_start = 8 + header_len
    for begin, end in spans:
        if end <= begin:
            continue
        for index in range((data_start + begin) // block_size, min(blocks, ceil_div(data_start + end, block_size))):
            if index not in seen:
                seen.add(index)
                order.append(index)
    order.extend(i for i in range(blocks) if i not in seen)
    return order
