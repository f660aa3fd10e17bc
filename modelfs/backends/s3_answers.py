"""How much of an S3 answer that is not object data modelfs reads, and what of it botocore may parse.

botocore reads a listing, a HEAD's or an error's body whole and parses the XML into dicts
(private/botocore_answers.py hands that read to :func:`read_answer`). A ListObjectsV2 page
holds at most 1,000 entries; with botocore's ``EncodingType=url`` a 1,024-byte key is at most
3 KiB, so a page is at most ~3.5 MiB (~5.5 MiB from a store that ignores the encoding type
and escapes ``&`` as ``&amp;``). :data:`MAX_ANSWER` leaves room beyond that; a larger answer
is not one to that request. The parse costs ~90-160 bytes per element on top of the text
(measured with tracemalloc: 16 MiB of ``<Contents/>`` peaked at 235 MiB), so the number of
tags is bounded too (:data:`MAX_TAGS`), and a DTD (whose entities expat may expand 100-fold)
is refused: S3 never sends one. An error answer (a 403, a 500) is a few hundred bytes of a
dozen elements; past :data:`MAX_ERROR` bytes or :data:`MAX_ERROR_TAGS` tags it is dropped
unparsed and its status alone says what went wrong (64 KiB of ``<a/>`` took botocore's parse
~1.3 MiB). Its body is optional (answers.begin_optional): charged all it may cost before it
is read, and not read when a data GET, which may not wait for room, finds none free.
"""

from __future__ import annotations

import xml.parsers.expat
from typing import Any
from urllib.parse import urlsplit

from modelfs.backends import answers
from modelfs.errors import BackendError, TransientError

__all__ = ["MAX_ANSWER", "MAX_ERROR", "MAX_ERROR_TAGS", "MAX_TAGS", "read_answer"]

MAX_ANSWER = 16 << 20
"""Bytes of a 2xx answer (a listing page) read at most."""

MAX_TAGS = 1 << 16
"""Tags (``<``) a 2xx answer may hold: a page of 1,000 entries with every optional field
(owner, checksum, restore status) has ~26,000; the parse of this many stays under ~10 MiB."""

MAX_ERROR = 64 << 10
"""Bytes of an error answer read at most (S3's are a few hundred)."""

MAX_ERROR_TAGS = 256
"""Tags an error answer botocore parses may hold (S3's have ~15, a SignatureDoesNotMatch with
its canonical request ~30)."""


def _discard(raw: Any) -> None:
    """Close the connection under ``raw`` (its unread rest must not meet the next request)
    and give its place back to the pool (urllib3 reconnects a closed one)."""
    raw.close()
    raw.release_conn()


def _body(raw: Any, limit: int) -> bytes:
    """At most ``limit + 1`` body bytes; one receive at a time (each counted by the
    connection's progress rule: private/httpclient_progress.py)."""
    return answers.read_charged(raw.read1, lambda: raw.length_remaining, limit)


def _malformed(body: bytes) -> str | None:
    """Why ``body`` is not well-formed XML (None: it is). botocore makes a 2xx answer it cannot
    parse a "500 Internal Server Error" of its own (its check for S3's errors inside a 200),
    which said the store had sent a 500: the real status is said here instead. expat alone,
    no tree (botocore builds its own); a DTD was refused before."""
    parser = xml.parsers.expat.ParserCreate()
    try:
        parser.Parse(body, True)
    except xml.parsers.expat.ExpatError as exc:
        return str(exc)
    return None


def _refused(body: bytes, tags: int) -> str | None:
    """Why botocore may not parse ``body`` of ``tags`` tags (None: it may)."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        return "a DTD (S3 never sends one)"
    if tags > MAX_TAGS:
        return f"{tags} tags, more than the {MAX_TAGS} a page of 1,000 entries has room for"
    return None


def read_answer(url: str, raw: Any, status: int) -> bytes:
    """The body of a non-data answer of ``raw`` (a streamed urllib3 response), bounded.

    A 2xx answer larger than MAX_ANSWER, or one botocore may not parse, is a BackendError; an
    error answer larger than MAX_ERROR (or unparseable) is read no further and is empty."""
    error = status >= 300
    limit = MAX_ERROR if error else MAX_ANSWER
    where = urlsplit(url)._replace(query="").geturl()
    try:
        known = raw.length_remaining
        if not error and known is not None and known > limit:
            raise BackendError(
                f"{where}: the store's answer is larger than {limit >> 20} MiB (a listing page is a few)"
            )
        # Charged to the memory budget from here until botocore's parse and the backend are
        # done with it (modelfs.backends.answers): a 2xx at its length if known, else as it
        # grows; an error all it may cost at once, or not read (its status says enough).
        if not error:
            answers.begin(limit + 1, known)
        elif not answers.begin_optional(limit + 1 if known is None else min(limit + 1, known), MAX_ERROR_TAGS):
            _discard(raw)
            return b""
        body = _body(raw, limit)
    except BaseException:
        _discard(raw)
        raise
    if len(body) > limit:
        _discard(raw)
        if error:
            return b""
        raise BackendError(f"{where}: the store's answer is larger than {limit >> 20} MiB (a listing page is a few)")
    if raw.length_remaining:  # http.client ends a body cut short without a word
        _discard(raw)
        raise EOFError(f"{where}: the store's answer ended {raw.length_remaining} bytes early")
    raw.release_conn()
    tags = body.count(b"<")
    why = _refused(body, tags)
    if error:  # (charged already, for MAX_ERROR_TAGS tags of parse)
        return body if why is None and tags <= MAX_ERROR_TAGS else b""
    if why is not None:
        raise BackendError(f"{where}: the store's answer has {why}")
    answers.grow(len(body), entries=tags)  # what botocore's parse makes: charged before it
    malformed = _malformed(body) if body else None  # (a HEAD's answer has no body)
    if malformed is not None:  # cut short by a proxy, say: worth another try
        raise TransientError(f"{where}: the store sent a malformed answer (HTTP {status}): {malformed}")
    return body
