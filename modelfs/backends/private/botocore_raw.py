"""botocore's ``StreamingBody._raw_stream``: the urllib3 response under a GetObject body.

StreamingBody only offers ``read()`` (a new bytes object per call); the urllib3 response
beneath it lets the S3 backend read the body straight into the block's buffer (through
:mod:`modelfs.backends.private.urllib3_fp`). Checked with botocore 1.x.
"""

from __future__ import annotations

from modelfs.backends.private import PrivateAPIChanged

__all__ = ["raw_stream", "verify"]


def raw_stream(body: object) -> object:
    """The urllib3 response a botocore StreamingBody reads from."""
    try:
        return body._raw_stream  # type: ignore[attr-defined]
    except AttributeError:
        raise PrivateAPIChanged("botocore's StreamingBody has no _raw_stream") from None


def verify() -> None:
    """Raise PrivateAPIChanged unless a StreamingBody still keeps its stream in ``_raw_stream``."""
    import io

    from botocore.response import StreamingBody

    stream = io.BytesIO(b"x")
    if getattr(StreamingBody(stream, 1), "_raw_stream", None) is not stream:
        raise PrivateAPIChanged("botocore's StreamingBody no longer keeps its stream in _raw_stream")
