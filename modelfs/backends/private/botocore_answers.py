"""botocore's ``BaseClient._endpoint.http_session``: the object whose ``send`` every request
of a client goes through.

botocore reads an answer's body whole, with no bound: ``URLLib3Session.send`` does so for
every request but a streamed one (a GetObject), and the endpoint does it afterwards for a
streamed request's error answer. A lying server's 300 MB listing took 1.5 GB of RSS, outside
the memory budget. :func:`read_answers` wraps that ``send``: the request goes as streamed
(so botocore leaves the body unread) and the body is read by the caller's function, which
bounds it, except a streamed request's 2xx body (a GetObject's data, which the S3 backend
reads itself). botocore then parses what that function returned. No botocore hook comes
between the answer's headers and that read. Checked with botocore 1.x.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from modelfs.backends.private import PrivateAPIChanged

__all__ = ["read_answers", "verify"]


class _Read:
    """The raw stream botocore reads a body from once it is read (``AWSResponse.content``)."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        yield self._body


def _session(client: Any) -> Any:
    try:
        session = client._endpoint.http_session
    except AttributeError:
        raise PrivateAPIChanged("a botocore client has no _endpoint.http_session") from None
    if not callable(getattr(session, "send", None)):
        raise PrivateAPIChanged("botocore's http_session has no send()")
    return session


def read_answers(client: Any, read_body: Callable[[str, Any, int], bytes]) -> None:
    """From now on ``read_body(url, raw, status)`` reads the body of every answer ``client``
    gets (``raw``: the urllib3 response), but a streamed request's 2xx one, and botocore
    parses what it returns. Whatever it raises, the request raises."""
    from botocore.awsrequest import AWSResponse

    session = _session(client)
    send = session.send

    def bounded_send(request: Any) -> Any:
        streamed = request.stream_output
        request.stream_output = True  # botocore reads nothing: read_body does
        try:
            response = send(request)
        finally:
            request.stream_output = streamed
        if streamed and response.status_code < 300:
            return response  # the data: the backend reads it into the block's buffer
        body = read_body(request.url, response.raw, response.status_code)
        return AWSResponse(response.url, response.status_code, response.headers, _Read(body))

    session.send = bounded_send


def verify() -> None:
    """Raise PrivateAPIChanged unless botocore still reads bodies only as checked here."""
    import inspect

    import boto3
    from botocore import UNSIGNED
    from botocore.awsrequest import AWSResponse
    from botocore.config import Config
    from botocore.httpsession import URLLib3Session

    needed = (
        (URLLib3Session.send, "if not request.stream_output:"),
        (AWSResponse.content.fget, "self.raw.stream()"),
    )
    for function, text in needed:
        if text not in inspect.getsource(function):
            raise PrivateAPIChanged(f"botocore's {function.__qualname__} no longer has {text!r}")
    client = boto3.session.Session().client(
        "s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9", config=Config(signature_version=UNSIGNED)
    )
    try:
        _session(client)
        if "self.http_session.send(request)" not in inspect.getsource(type(client._endpoint)._send):
            raise PrivateAPIChanged("botocore's Endpoint._send no longer calls http_session.send")
    finally:
        client.close()
