"""GCS JSON API answers are matched in place (gcs_scan): a lying server's listing costs a small
factor of its body, not json.loads' object tree; valid answers parse as json.loads reads them."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfs.backends.gcs import GCSBackend
from modelfs.backends.gcs_scan import NESTED, Item, error_message, parse_listing, parse_object
from modelfs.config import parse_source
from modelfs.errors import BackendError
from modelfs.testing.servers import QuietHandler, loopback_http

BODY = 4 << 20
# Peak Python allocation of a listing, its body included (read in chunks, then joined: twice
# its size), may be this many times the body plus a constant. json.loads of the shapes below
# took 12 to 25 times the body.
FACTOR = 4
CONSTANT = 8 << 20


def _repeat(head: bytes, unit: bytes, tail: bytes) -> bytes:
    return head + unit * ((BODY - len(head) - len(tail)) // len(unit)) + tail


HOSTILE = {
    "empty items": _repeat(b'{"items":[', b"{},", b"{}]}"),
    "empty objects skipped": _repeat(b'{"kind":[', b"{},", b"{}]}"),
    "tiny prefixes": _repeat(b'{"prefixes":[', b'"ab",', b'"ab"]}'),
    "tiny strings skipped": _repeat(b'{"kind":[', b'"ab",', b'"ab"]}'),
    "named items": _repeat(b'{"items":[', b'{"name":"ab","generation":"1"},', b'{"name":"a","generation":"1"}]}'),
    "deep nesting": _repeat(b'{"kind":', b"[", b"") + b"]" * 8,
    "huge string": _repeat(b'{"nextPageToken":"', b"a", b'"}'),
    "huge escaped string": _repeat(b'{"nextPageToken":"\\u00e9', b"a", b'"}'),
}


@pytest.fixture
def answering() -> Iterator[dict[str, bytes]]:
    """A JSON API whose every answer is ``answer["body"]``; STORAGE_EMULATOR_HOST names it."""
    answer = {"body": b"{}"}

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            body = answer["body"]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with loopback_http(Handler) as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", url)
        yield answer


@pytest.mark.parametrize("shape", HOSTILE)
def test_a_hostile_listing_costs_a_small_factor_of_its_body(shape: str, answering: dict[str, bytes]) -> None:
    body = answering["body"] = HOSTILE[shape]
    backend = GCSBackend(parse_source("gs://bkt"), anonymous=True)

    async def listing() -> None:
        try:
            await backend.list_dir("")
        except BackendError as exc:
            assert "\n" not in str(exc)
        finally:
            await backend.aclose()

    tracemalloc.start()
    try:
        trio.run(listing)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= FACTOR * len(body) + CONSTANT, f"{shape}: {peak / len(body):.1f} times the body"


# --- valid answers parse exactly as json.loads reads them

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
_json = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3), max_leaves=12
)
_field_values = st.one_of(_scalars, st.text(alphabet="0123456789", min_size=1, max_size=20), _json)
_item = st.fixed_dictionaries(
    {"name": st.text()},
    optional={**{f: _field_values for f in Item._fields[1:]}, "kind": st.just("storage#object"), "acl": _json},
)
_listing = st.fixed_dictionaries(
    {},
    optional={
        "kind": st.just("storage#objects"),
        "items": st.lists(_item, max_size=4),
        "prefixes": st.lists(st.text(), max_size=4),
        "nextPageToken": st.one_of(st.text(), _json),
        "unknown": _json,
    },
)


def _expected_item(doc: dict[str, Any]) -> Item:
    return Item(*(NESTED if isinstance(doc.get(f), (list, dict)) else doc.get(f) for f in Item._fields))


def _encoded(doc: object, ascii_only: bool, spaced: bool) -> bytes:
    separators = (", ", ": ") if spaced else (",", ":")
    return json.dumps(doc, ensure_ascii=ascii_only, separators=separators, indent=1 if spaced else None).encode()


@settings(max_examples=300, deadline=None)
@given(_listing, st.booleans(), st.booleans())
def test_valid_listings_parse_as_json_loads_reads_them(doc: dict[str, Any], ascii_only: bool, spaced: bool) -> None:
    body = _encoded(doc, ascii_only, spaced)
    loaded = json.loads(body)
    token = loaded.get("nextPageToken")
    expected = (
        [_expected_item(i) for i in loaded.get("items", [])],
        loaded.get("prefixes", []),
        NESTED if isinstance(token, (list, dict)) else token,
    )
    assert tuple(parse_listing(body)) == expected


@settings(max_examples=300, deadline=None)
@given(_item, st.booleans(), st.booleans())
def test_valid_objects_parse_as_json_loads_reads_them(doc: dict[str, Any], ascii_only: bool, spaced: bool) -> None:
    assert parse_object(_encoded(doc, ascii_only, spaced)) == _expected_item(doc)


@settings(max_examples=100, deadline=None)
@given(st.text(), _json, st.booleans())
def test_error_messages_parse_as_json_loads_reads_them(message: str, other: object, ascii_only: bool) -> None:
    doc = {"error": {"code": 400, "errors": [other], "message": message}, "other": other}
    assert error_message(_encoded(doc, ascii_only, False)) == message


@pytest.mark.parametrize(
    "body",
    [
        rb'{"items":[{"name":"a\u00e9\ud83d\ude00\n\"\\\/","size":"12","generation":"7"}]}',
        '{"items":[{"name":"é😀","size":"0","generation":"7"}]}'.encode(),
        rb'{"items":[{"n\u0061me":"x","generation":7}],"prefixes":["d/","\u00e9/"]}',
        b'{"items":[{"name":"x","generation":"1","name":"y"}],"items":[]}',  # repeated keys: the last counts
    ],
)
def test_escapes_surrogate_pairs_and_repeated_keys(body: bytes) -> None:
    listing = parse_listing(body)
    loaded = json.loads(body)
    assert listing.items == [_expected_item(i) for i in loaded.get("items", [])]
    assert listing.prefixes == loaded.get("prefixes", [])


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b'{"a":1,}', b'{"a":[1,]}', b'{"a":1} x', b'{"a" 1}', b'{"items":[{"name":"\x01"}]}', b'{"a":01}'],
)
def test_what_is_not_json_is_a_one_line_error(body: bytes) -> None:
    with pytest.raises(BackendError, match="not JSON"):
        parse_listing(body)


# --- errors say what the server said


@pytest.fixture
def refusing() -> Iterator[dict[str, bytes]]:
    """A JSON API answering every GET with HTTP 400 and ``answer["body"]``."""
    answer = {"body": b""}

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            body = answer["body"]
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:  # (the client read the first 64 KiB and hung up, as it should)
                pass

    with loopback_http(Handler) as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", url)
        yield answer


def _refusal() -> str:
    backend = GCSBackend(parse_source("gs://bkt/m"), anonymous=True)

    async def go() -> str:
        try:
            with pytest.raises(BackendError) as caught:
                await backend.stat("x")
            return str(caught.value)
        finally:
            await backend.aclose()

    return trio.run(go)


REQUESTER_PAYS = "Bucket is a requester pays bucket but no user project provided."


def test_a_400_says_the_servers_reason(refusing: dict[str, bytes]) -> None:
    refusing["body"] = json.dumps(
        {"error": {"code": 400, "message": REQUESTER_PAYS, "errors": [{"message": REQUESTER_PAYS}]}}
    ).encode()
    assert _refusal() == f"x: unexpected HTTP 400: {REQUESTER_PAYS}"


def test_the_reason_is_one_bounded_line(refusing: dict[str, bytes]) -> None:
    refusing["body"] = json.dumps({"error": {"message": "first\nsecond\r\x1b[31m\u2028" + "z" * 10_000}}).encode()
    error = _refusal()
    assert error.startswith("x: unexpected HTTP 400: first second [31m zzz")
    assert error.isprintable() and len(error) <= len("x: unexpected HTTP 400: ") + 200


def test_the_reason_is_read_from_the_first_64_kib_only(refusing: dict[str, bytes]) -> None:
    head = b'{"error":{"message":"the start","errors":['
    refusing["body"] = head + b'"padding",' * (1 << 20) + b'"end"]}}'
    assert _refusal().endswith(": the start")
    refusing["body"] = b'{"error":{"errors":[' + b'"padding",' * (1 << 20) + b'"end"],"message":"too far"}}'
    assert _refusal() == "x: unexpected HTTP 400"
    refusing["body"] = b"<html>\n<h1>Bad</h1>"
    assert _refusal() == "x: unexpected HTTP 400"


def test_a_refused_read_says_the_servers_reason(refusing: dict[str, bytes]) -> None:
    """The media path (a block's GET) says it too, not only the JSON API."""
    refusing["body"] = json.dumps({"error": {"code": 400, "message": REQUESTER_PAYS}}).encode()
    backend = GCSBackend(parse_source("gs://bkt/m"), anonymous=True)

    async def go() -> str:
        try:
            with pytest.raises(BackendError) as caught:
                await backend.read_range("x", "17", 0, memoryview(bytearray(10)))
            return str(caught.value)
        finally:
            await backend.aclose()

    error = trio.run(go)
    assert "HTTP 400" in error and error.endswith(f": {REQUESTER_PAYS}"), error
