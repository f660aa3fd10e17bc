"""The fields modelfs uses of the GCS JSON API's answers, matched in place (modelfs.jsonscan).

``json.loads`` of a 16 MiB listing ``{"items":[{},{},...]}`` built ~400 MiB of dicts before
modelfs could look at one, far outside the memory budget. These functions walk the answer
with possessive regular expressions and decode only what the backend reads: an object's
name, size, generation, updated, crc32c and md5Hash, a listing's prefixes and
nextPageToken, an error's message. Everything else (fake-gcs-server ignores ``fields=`` and
sends ACLs, a lying server anything) is matched and skipped without a Python object made.
A page holds at most :data:`MAX_PAGE_ENTRIES` items and prefixes, so what is kept costs a
constant plus the decoded text of the kept strings, whatever shape the body has.

A valid answer parses to the values ``json.loads`` gives those fields (strings, numbers,
true/false/null as themselves; an array or object as :data:`NESTED`, which no field accepts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import NamedTuple

from modelfs.errors import BackendError
from modelfs.jsonscan import PARTS as _LOOSE

__all__ = [
    "Item",
    "Listing",
    "MAX_PAGE_ENTRIES",
    "Malformed",
    "NESTED",
    "NotJson",
    "error_message",
    "parse_listing",
    "parse_object",
]

# GCS sends at most 1,000 entries (items and prefixes together) a page, whatever maxResults
# asks; ten times that leaves room for servers that page differently, and bounds the objects
# a page can make (~100 bytes each beside their text) to a few MiB whatever the body holds.
MAX_PAGE_ENTRIES = 10_000
# GCS's answers are four levels deep; a value nested deeper than this is not one of them.
MAX_DEPTH = 64


class NotJson(BackendError):
    """The answer is not a JSON object (or nests deeper than any answer of the API)."""


class Malformed(BackendError):
    """The answer is JSON but not a listing: the backend names its source in front of it."""


class _Nested:
    """The value of a kept field that is an array or an object (never a valid one)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<nested>"


NESTED = _Nested()


class Item(NamedTuple):
    """The fields of one object (None where absent)."""

    name: object = None
    size: object = None
    generation: object = None
    updated: object = None
    crc32c: object = None
    md5Hash: object = None  # noqa: N815 (the API's spelling)


class Listing(NamedTuple):
    items: list[Item]
    prefixes: list[str] | None  # None: present but not a list of strings
    next_token: object


# Strict JSON strings (json.loads refuses raw control characters and unknown escapes), so a
# kept string the pattern accepts decodes; skipped values may use jsonscan's looser form.
_P = dict(_LOOSE)
_P[b"STRING"] = rb'"[^"\\\x00-\x1f]*+(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*+)*+"'
_P[b"SCALAR"] = rb"(?>%(STRING)b|%(NUMBER)b|true|false|null)" % _P


def _nested_pattern(depth: int) -> bytes:
    """A JSON value at most ``depth`` containers deep (each level names the one below twice,
    so the pattern doubles per level: deeper values are walked level by level in Python)."""
    value = _LOOSE[b"SCALAR"]
    for _ in range(depth):
        parts = {**_LOOSE, b"V": value}
        array = rb"\[%(WS)b(?:%(V)b%(WS)b(?:,%(WS)b%(V)b%(WS)b)*+)?+\]" % parts
        obj = (
            rb"\{%(WS)b(?:%(STRING)b%(WS)b:%(WS)b%(V)b%(WS)b(?:,%(WS)b%(STRING)b%(WS)b:%(WS)b%(V)b%(WS)b)*+)?+\}"
            % parts
        )
        value = rb"(?>%(SCALAR)b|%(A)b|%(O)b)" % {**parts, b"A": array, b"O": obj}
    return value


_SKIP = re.compile(_nested_pattern(4))
_WS = re.compile(_LOOSE[b"WS"])
_KEY = re.compile(rb"(%(STRING)b)%(WS)b:%(WS)b" % _LOOSE)
_AFTER = re.compile(rb"%(WS)b([,}\]])%(WS)b" % _LOOSE)
_STRING = re.compile(_P[b"STRING"])
_SCALAR = re.compile(_P[b"SCALAR"])

_ITEM_KEYS = {f'"{k}"'.encode(): i for i, k in enumerate(Item._fields)}
_NOT_JSON = "the JSON API's answer is not JSON"


def _key(token: bytes) -> bytes:
    """A key token as its plain spelling: one written with escapes ("n\\u0061me") decoded."""
    if b"\\" not in token or len(token) > 128:  # (no kept key is longer than 13 escaped characters)
        return token
    return ('"' + _decode(token, 0, len(token)) + '"').encode("utf-8", "surrogatepass")


def _decode(body: bytes, start: int, end: int) -> str:
    """The text of the strict string token at ``body[start:end]``."""
    if body.find(b"\\", start, end) < 0:  # (the pattern let no quote nor control character in)
        return str(memoryview(body)[start + 1 : end - 1], "utf-8")  # (decoded in place, no copy)
    value = json.loads(body[start:end])
    assert isinstance(value, str)
    return value


def _skip(body: bytes, pos: int, depth: int) -> int:
    """The end of the value at ``pos``, no object made of it."""
    found = _SKIP.match(body, pos)
    if found is not None:
        return found.end()
    if depth >= MAX_DEPTH:
        raise NotJson(f"{_NOT_JSON} (nested deeper than {MAX_DEPTH} levels)")
    opener = body[pos : pos + 1]
    if opener == b"[":
        return _elements(body, pos, lambda at: _skip(body, at, depth + 1))
    if opener == b"{":
        return _members(body, pos, lambda key, at: _skip(body, at, depth + 1))
    raise NotJson(_NOT_JSON)


def _elements(body: bytes, pos: int, element: Callable[[int], int]) -> int:
    """Walks the array at ``pos``, ``element(start)`` giving each element's end; its end."""
    pos = _WS.match(body, pos + 1).end()  # type: ignore[union-attr]
    if body[pos : pos + 1] == b"]":
        return pos + 1
    while True:
        after = _AFTER.match(body, element(pos))
        if after is None:
            raise NotJson(_NOT_JSON)
        pos = after.end()
        if after.group(1) == b"]":
            return pos
        if after.group(1) != b",":
            raise NotJson(_NOT_JSON)


def _members(body: bytes, pos: int, member: Callable[[bytes, int], int]) -> int:
    """Walks the object at ``pos``, ``member(key, start)`` giving each value's end; its end."""
    pos = _WS.match(body, pos + 1).end()  # type: ignore[union-attr]
    if body[pos : pos + 1] == b"}":
        return pos + 1
    while True:
        key = _KEY.match(body, pos)
        if key is None:
            raise NotJson(_NOT_JSON)
        after = _AFTER.match(body, member(_key(key.group(1)), key.end()))
        if after is None:
            raise NotJson(_NOT_JSON)
        pos = after.end()
        if after.group(1) == b"}":
            return pos
        if after.group(1) != b",":
            raise NotJson(_NOT_JSON)


def _scalar(body: bytes, pos: int) -> tuple[object, int]:
    """The value at ``pos`` as json.loads gives a scalar (NESTED for a container), and its end."""
    found = _SCALAR.match(body, pos)
    if found is None:
        if body[pos : pos + 1] == b'"':  # (a raw control character or an unknown escape)
            raise NotJson(_NOT_JSON)
        return NESTED, _skip(body, pos, 1)
    if body[pos : pos + 1] == b'"':
        return _decode(body, pos, found.end()), found.end()
    return json.loads(found.group()), found.end()


def _document(body: bytes, member: Callable[[bytes, int], int]) -> None:
    """Walks the one JSON object ``body`` holds; NotJson if it holds anything else."""
    pos = _WS.match(body).end()  # type: ignore[union-attr]
    if body[pos : pos + 1] != b"{":
        # (valid JSON that is no object is another error than no JSON)
        if _WS.match(body, _skip(body, pos, 0)).end() == len(body):  # type: ignore[union-attr]
            raise NotJson("the JSON API's answer is not a JSON object")
        raise NotJson(_NOT_JSON)
    end = _members(body, pos, member)
    if _WS.match(body, end).end() != len(body):  # type: ignore[union-attr]
        raise NotJson(_NOT_JSON)


def _guard(parse: Callable[[], None]) -> None:
    try:
        parse()
    except (ValueError, RecursionError):  # a kept token that is not UTF-8, an int too long to convert
        raise NotJson(_NOT_JSON) from None


def _item_at(body: bytes, pos: int) -> tuple[Item, int]:
    fields: list[object] = [None] * len(Item._fields)

    def member(key: bytes, at: int) -> int:
        index = _ITEM_KEYS.get(key)
        if index is None:
            return _skip(body, at, 2)
        fields[index], end = _scalar(body, at)
        return end

    end = _members(body, pos, member)
    return Item(*fields), end


def parse_object(body: bytes) -> Item:
    """The fields of an object-metadata answer."""
    found: list[Item] = []

    def member(key: bytes, at: int) -> int:
        if not found:
            found.append(Item())
        index = _ITEM_KEYS.get(key)
        if index is None:
            return _skip(body, at, 1)
        value, end = _scalar(body, at)
        found[0] = found[0]._replace(**{Item._fields[index]: value})
        return end

    _guard(lambda: _document(body, member))
    return found[0] if found else Item()


def parse_listing(body: bytes) -> Listing:
    """The items, prefixes and nextPageToken of a listing page.

    Malformed (a BackendError) for items that are not objects with a string name (the
    backend refuses those anyway), or more than MAX_PAGE_ENTRIES entries.
    """
    items: list[Item] = []
    prefixes: list[str] | None = []
    token: list[object] = [None]
    entries = [0]

    def count() -> None:
        entries[0] += 1
        if entries[0] > MAX_PAGE_ENTRIES:
            raise Malformed(f"the JSON API sent more than {MAX_PAGE_ENTRIES} entries in one page")

    def item(at: int) -> int:
        if body[at : at + 1] != b"{":
            _skip(body, at, 2)
            raise Malformed("the JSON API sent a malformed listing")
        count()
        found, end = _item_at(body, at)
        if not isinstance(found.name, str):
            raise Malformed("the JSON API sent an object without a name")
        items.append(found)
        return end

    def prefix(at: int) -> int:
        nonlocal prefixes
        value, end = _scalar(body, at)
        if isinstance(value, str) and prefixes is not None:
            count()
            prefixes.append(value)
        else:
            prefixes = None
        return end

    def member(key: bytes, at: int) -> int:
        nonlocal prefixes
        if key == b'"items"':
            if body[at : at + 1] != b"[":
                _skip(body, at, 1)
                raise Malformed("the JSON API sent a malformed listing")
            items.clear()  # (a repeated key: the last one counts, as json.loads has it)
            return _elements(body, at, item)
        if key == b'"prefixes"':
            if body[at : at + 1] != b"[":
                prefixes = None
                return _skip(body, at, 1)
            prefixes = []
            return _elements(body, at, prefix)
        if key == b'"nextPageToken"':
            token[0], end = _scalar(body, at)
            return end
        return _skip(body, at, 1)

    _guard(lambda: _document(body, member))
    return Listing(items, prefixes, token[0])


def error_message(body: bytes) -> str | None:
    """``error.message`` of an error answer (also of its start, when cut short), None if it has none."""
    found: list[str] = []

    def inner(key: bytes, at: int) -> int:
        if key != b'"message"':
            return _skip(body, at, 2)
        value, end = _scalar(body, at)
        if isinstance(value, str):
            found[:] = [value]
        return end

    def member(key: bytes, at: int) -> int:
        if key == b'"error"' and body[at : at + 1] == b"{":
            return _members(body, at, inner)
        return _skip(body, at, 1)

    try:
        _guard(lambda: _document(body, member))
    except BackendError:  # (the body cut at MAX_ERROR_BODY: a message before the cut still says it)
        pass
    return found[0] if found else None
