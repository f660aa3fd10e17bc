"""The safetensors header, read for the eager stream's block order: bounded and distrustful.

A safetensors file is an 8-byte little-endian header length, a JSON object mapping tensor
names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of
the header), then the tensor data. The eager stream only needs the data spans, so the header
is not handed to a JSON parser (``json.loads`` builds every value of the input before anything
can be dropped: ``{"x":[[],[],...]}`` costs 72 bytes of objects per 3 bytes of header). It is
matched in place, one entry at a time, by regular expressions of the format's own shape: a
JSON object whose values are flat objects (the tensor entries, and ``__metadata__``) whose
values are strings, numbers, ``true``/``false``/``null`` or arrays of those. Every repetition
is possessive, so the matcher keeps no backtracking state, and each entry yields one
``(begin, end)`` pair: nothing grows with the header but the pairs a caller keeps
(:data:`PARSE_OVERHEAD`). The header is untrusted input: its length is capped
(:data:`MAX_HEADER`), entries whose offsets are not two integers with
``0 <= begin <= end <= data size`` are ignored, and anything else (another shape, nested
deeper, not JSON) raises ValueError (the caller then streams the file in file order).

:func:`tensor_spans` is a pure function on a buffer nothing else touches, so the eager
stream runs it in a worker thread, off the event loop.
"""

from __future__ import annotations

import re
import struct
from array import array
from collections.abc import Iterable, Iterator

from modelfs.jsonscan import PARTS as _PARTS
from modelfs.units import ceil_div

__all__ = [
    "MAX_HEADER",
    "PARSE_OVERHEAD",
    "block_order",
    "header_length",
    "iter_spans",
    "safetensors_block_order",
    "tensor_spans",
]

MAX_HEADER = 100 << 20
"""The safetensors format's own limit on the header (its reference implementation refuses more)."""

PARSE_OVERHEAD = 5
"""Bytes of Python objects alive while parsing, per header byte; counted in the memory budget
beside the header's own buffer. The matcher itself holds a few small objects whatever the
header; what grows is the list of spans :func:`tensor_spans` returns and sorts, one pair of
integers per entry. The smallest entry with a span of integers that are not cached,
``"":{"data_offsets":[257,258]},``, is 30 bytes for 120 bytes of tuple, integers and list slots
(4.0x measured with tracemalloc, with the sort's copy; checked in tests/unit/test_budget.py
for this and every other shape)."""

_OPEN = re.compile(rb"%(WS)b\{%(WS)b(\}%(WS)b\Z)?+" % _PARTS)
# One entry: its name, a flat object (group 1 is its opening brace, group 2 its closing one),
# and the comma or closing brace after it (group 3).
_ENTRY = re.compile(
    rb"%(STRING)b%(WS)b:%(WS)b(\{)%(WS)b(?:%(FIELD)b%(WS)b(?:,%(WS)b%(FIELD)b%(WS)b)*+)?+(\})%(WS)b([,}])%(WS)b"
    % _PARTS,
    re.DOTALL,
)
# The offsets field of an entry the grammar accepted: a brace or comma can only be followed by
# a quote outside a string, so the first match is a field of the entry itself. At most 20
# digits (the file size is below 2**64): a longer number is a bad offset, never converted.
_OFFSETS = re.compile(
    rb'[{,]%(WS)b"data_offsets"%(WS)b:%(WS)b\[%(WS)b%(DIGITS)b%(WS)b,%(WS)b%(DIGITS)b%(WS)b\]' % _PARTS
)
_END = re.compile(rb"%(WS)b\Z" % _PARTS)


def header_length(first: bytes | memoryview, size: int) -> int:
    """The header length from the file's first 8 bytes; ValueError if it cannot be right."""
    if size < 8 or len(first) < 8:
        raise ValueError("shorter than a safetensors length prefix")
    (length,) = struct.unpack("<Q", bytes(first[:8]))
    if length > min(size - 8, MAX_HEADER):
        raise ValueError(f"header length {length} out of range")
    return int(length)


def iter_spans(header: bytes | memoryview, data_size: int) -> Iterator[tuple[int, int]]:
    """The ``(begin, end)`` data spans of the tensors in header order, offsets relative to the
    data start; entries whose offsets are not two integers within ``[0, data_size]`` in order
    are left out. ValueError (when the iteration reaches it) if the header is not a JSON
    object of flat objects."""
    opened = _OPEN.match(header)
    if opened is None:
        raise ValueError("the header is not a JSON object")
    if opened.group(1) is not None:
        return  # {}
    pos = opened.end()
    while True:
        entry = _ENTRY.match(header, pos)
        if entry is None:
            raise ValueError(f"the header is not a JSON object of tensors (at byte {pos})")
        offsets = _OFFSETS.search(header, entry.start(1), entry.end(2))
        if offsets is not None:
            begin, end = int(offsets.group(1)), int(offsets.group(2))
            if begin <= end <= data_size:
                yield begin, end
        pos = entry.end()
        if entry.group(3) == b"}":
            if _END.match(header, pos) is None:
                raise ValueError(f"the header has more after its object (at byte {pos})")
            return


def tensor_spans(header: bytes | memoryview, data_size: int) -> list[tuple[int, int]]:
    """The spans of :func:`iter_spans`, sorted; ValueError if the header is not of that shape."""
    return sorted(iter_spans(header, data_size))


def block_order(spans: Iterable[tuple[int, int]], header_len: int, block_size: int, size: int) -> list[int]:
    """Blocks of the file: the header's, then those of the tensors by data offset, then the rest.

    Taken span by span in offset order, each block once, that is the blocks some tensor
    covers, ascending: so the spans may come in any order, and each adds one to a count
    where it starts and takes one off where it ends (O(spans + blocks), whatever the spans
    overlap: 10,000 entries each spanning a 64 GiB shard were 2.6 s of set lookups).
    """
    blocks = ceil_div(size, block_size)
    head = min(blocks, ceil_div(8 + header_len, block_size))
    data_start = 8 + header_len
    starts = array("q", bytes(8 * (blocks + 1)))  # spans starting at a block minus those ending there
    for begin, end in spans:
        if end <= begin:
            continue
        first = (data_start + begin) // block_size
        last = min(blocks, ceil_div(data_start + end, block_size))
        if first < last:
            starts[first] += 1
            starts[last] -= 1
    order: list[int] = list(range(head))
    rest: list[int] = []
    depth = sum(starts[:head])
    for index in range(head, blocks):
        depth += starts[index]
        (order if depth > 0 else rest).append(index)
    order.extend(rest)
    return order


def safetensors_block_order(header: bytes | memoryview, header_len: int, block_size: int, size: int) -> list[int]:
    """:func:`block_order` of the header's spans, keeping none of them: a header of
    ``header_len`` bytes in a file of ``size``; ValueError if the header is bad."""
    return block_order(iter_spans(header, size - 8 - header_len), header_len, block_size, size)
