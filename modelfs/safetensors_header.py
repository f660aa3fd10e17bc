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
(:data:`MAX_HEADER`), and so is each entry's (:data:`MAX_ENTRY`: ``re`` holds the GIL for a
whole match, so a match must stay short), entries whose offsets are not two integers with
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
    "MAX_ENTRY",
    "MAX_HEADER",
    "MAX_METADATA_ENTRY",
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

MAX_ENTRY = 64 << 10
"""The longest tensor entry matched (name, its object, and the comma after): a real one is
well under 1 KiB (a name of a few hundred bytes, dtype, a shape of a few numbers, offsets).
CPython's ``re`` holds the GIL for a whole match, so one match must stay short whatever the
header: the worker thread that parses it would otherwise freeze the event loop (one entry
with a 20M-element shape in a 40 MiB header stalled every request of the mount for 2.2 s; a
100 MiB one ~10 s). A longer entry makes the header unreadable: the file streams in file
order. A 64 KiB match takes ~4 ms for the slowest shape measured (a long array)."""

MAX_METADATA_ENTRY = 1 << 20
"""The longest ``__metadata__`` entry matched: free-form strings that some tools fill with
training settings or tag counts (tens to hundreds of KiB seen), so it gets more room than a
tensor: ~6 ms for 1 MiB of string, ~60 ms for the slowest shape (a 1 MiB array)."""

_WS_CHUNK = 64 << 10  # whitespace (between entries, padding) is skipped this much per match
_WS_RUN = re.compile(_PARTS[b"WS"])
# One entry: its name and a flat object (group 1 is its opening brace, group 2 its closing
# one). The whitespace and the comma or closing brace after it are skipped apart: a header may
# be padded with any amount of whitespace, which no entry bound should count.
_ENTRY = re.compile(
    rb"%(STRING)b%(WS)b:%(WS)b(\{)%(WS)b(?:%(FIELD)b%(WS)b(?:,%(WS)b%(FIELD)b%(WS)b)*+)?+(\})" % _PARTS,
    re.DOTALL,
)
_METADATA_NAME = b'"__metadata__"'
# The offsets field of an entry the grammar accepted: a brace or comma can only be followed by
# a quote outside a string, so the first match is a field of the entry itself. At most 20
# digits (the file size is below 2**64): a longer number is a bad offset, never converted.
_OFFSETS = re.compile(
    rb'[{,]%(WS)b"data_offsets"%(WS)b:%(WS)b\[%(WS)b%(DIGITS)b%(WS)b,%(WS)b%(DIGITS)b%(WS)b\]' % _PARTS
)


def _skip_ws(header: bytes | memoryview, pos: int) -> int:
    """The first non-whitespace position from ``pos`` (or the end), in bounded matches."""
    end = len(header)
    while True:
        stop = min(end, pos + _WS_CHUNK)
        ws = _WS_RUN.match(header, pos, stop)
        assert ws is not None  # (the pattern matches the empty string)
        pos = ws.end()
        if pos < stop or stop == end:
            return pos


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
    object of flat objects, or an entry is longer than :data:`MAX_ENTRY`
    (:data:`MAX_METADATA_ENTRY` for ``__metadata__``): every regular expression call covers a
    bounded stretch of the header, so the thread that runs this releases the GIL between them."""
    size = len(header)
    pos = _skip_ws(header, 0)
    if header[pos : pos + 1] != b"{":
        raise ValueError("the header is not a JSON object")
    pos = _skip_ws(header, pos + 1)
    closing = header[pos : pos + 1] == b"}"
    while not closing:
        bound = MAX_METADATA_ENTRY if header[pos : pos + len(_METADATA_NAME)] == _METADATA_NAME else MAX_ENTRY
        entry = _ENTRY.match(header, pos, min(size, pos + bound))
        if entry is None:
            longer = f", or has an entry longer than {bound} bytes" if size - pos > bound else ""
            raise ValueError(f"the header is not a JSON object of tensors{longer} (at byte {pos})")
        offsets = _OFFSETS.search(header, entry.start(1), entry.end(2))
        if offsets is not None:
            begin, end = int(offsets.group(1)), int(offsets.group(2))
            if begin <= end <= data_size:
                yield begin, end
        pos = _skip_ws(header, entry.end())
        after = header[pos : pos + 1]
        if after == b",":
            pos = _skip_ws(header, pos + 1)
        elif after == b"}":
            closing = True
        else:
            raise ValueError(f"the header is not a JSON object of tensors (at byte {pos})")
    if _skip_ws(header, pos + 1) != size:
        raise ValueError(f"the header has more after its object (at byte {pos + 1})")


def tensor_spans(header: bytes | memoryview, data_size: int) -> list[tuple[int, int]]:
    """The spans of :func:`iter_spans`, sorted; ValueError if the header is not of that shape."""
    return sorted(iter_spans(header, data_size))


def block_order(spans: Iterable[tuple[int, int]], header_len: int, block_size: int, size: int) -> array[int]:
    """Blocks of the file: the header's, then those of the tensors by data offset, then the rest.

    Taken span by span in offset order, each block once, that is the blocks some tensor
    covers, ascending: so the spans may come in any order, and each adds one to a count
    where it starts and takes one off where it ends (O(spans + blocks), whatever the spans
    overlap: 10,000 entries each spanning a 64 GiB shard were 2.6 s of set lookups).
    An array of 4-byte ints (8-byte past 2**32 blocks), not a list: a stream keeps it for its
    whole life, outside the memory budget (a list of 65,536 ints is 2.53 MiB, this 256 KiB).
    """
    blocks = ceil_div(size, block_size)
    head = min(blocks, ceil_div(8 + header_len, block_size))
    data_start = 8 + header_len
    starts = array("q", [0]) * (blocks + 1)  # spans starting at a block minus those ending there
    for begin, end in spans:
        if end <= begin:
            continue
        first = (data_start + begin) // block_size
        last = min(blocks, ceil_div(data_start + end, block_size))
        if first < last:
            starts[first] += 1
            starts[last] -= 1
    covered = bytearray(blocks)  # (a byte per block: the counts go before the order is made)
    depth = sum(starts[:head])
    for index in range(head, blocks):
        depth += starts[index]
        if depth > 0:
            covered[index] = 1
    del starts
    order = array("I" if blocks <= 1 << 32 else "Q", [0]) * blocks  # (its whole size at once: no regrowth)
    order[:head] = array(order.typecode, range(head))
    at = head
    for wanted in (1, 0):  # the blocks tensors cover, then the rest
        for index in range(head, blocks):
            if covered[index] == wanted:
                order[at] = index
                at += 1
    return order


def safetensors_block_order(header: bytes | memoryview, header_len: int, block_size: int, size: int) -> array[int]:
    """:func:`block_order` of the header's spans, keeping none of them: a header of
    ``header_len`` bytes in a file of ``size``; ValueError if the header is bad."""
    return block_order(iter_spans(header, size - 8 - header_len), header_len, block_size, size)
