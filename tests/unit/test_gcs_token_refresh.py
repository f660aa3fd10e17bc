"""A token refresh against a token endpoint that never answers: requests holding a still-valid
token go on signing with it, requests without one wait at most the read timeout and fail
with one line (before: every GCS request queued behind one lock for up to 120 s)."""

from __future__ import annotations

import datetime
import socket
import threading
from collections.abc import Iterator

import pytest
import trio

from modelfs.backends.gcs import GCSBackend
from modelfs.backends.gcs_auth import HttpRequest, Signer
from modelfs.config import parse_source
from modelfs.errors import TransientError

SAFETY = 20.0  # only ends a test whose client never gives up (the bug); no pass waits for it


class Blackhole:
    """A token endpoint that reads requests and never answers. ``arrived``: a request came;
    ``hung_up``: a client closed its end first (gave up waiting)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/token"
        self.arrived = threading.Event()
        self.hung_up = threading.Event()
        self.closing = False
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        conn.settimeout(SAFETY)
        with conn:
            try:
                while conn.recv(65536):
                    self.arrived.set()
            except OSError:
                return
            if not self.closing:
                self.hung_up.set()

    def close(self) -> None:
        self.closing = True
        self.sock.close()
        for conn in self.held:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    try:
        yield hole
    finally:
        hole.close()


def _credentials(hole: Blackhole, token: str | None, expires_in: float) -> object:
    from google.oauth2.credentials import Credentials

    expiry = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) + datetime.timedelta(seconds=expires_in)
    return Credentials(  # type: ignore[no-untyped-call]
        token=token, expiry=expiry, refresh_token="r", token_uri=hole.url, client_id="c", client_secret="s"
    )


def test_a_still_valid_token_signs_while_its_refresh_hangs(blackhole: Blackhole) -> None:
    # 60 s left: past google-auth's refresh threshold (3 min 45 s), so it is refreshed ahead.
    signer = Signer(_credentials(blackhole, "old", 60), HttpRequest(SAFETY))
    first: dict[str, str] = {}
    refreshing = threading.Thread(target=signer.sign, args=("GET", "http://x/o", first))
    refreshing.start()
    assert blackhole.arrived.wait(SAFETY)  # the refresh is in flight, and will stay so
    others: list[dict[str, str]] = [{} for _ in range(3)]
    signing = [threading.Thread(target=signer.sign, args=("GET", "http://x/o", h)) for h in others]
    for thread in signing:
        thread.start()
    for thread in signing:
        thread.join(SAFETY)
    done = [not thread.is_alive() for thread in signing]
    assert not blackhole.hung_up.is_set()  # (still refreshing: they did not wait for it)
    blackhole.close()  # the refresh fails now: the first request keeps the valid token too
    refreshing.join(SAFETY)
    assert done == [True] * 3
    assert [h.get("authorization") for h in [*others, first]] == ["Bearer old"] * 4


def test_without_a_valid_token_a_request_waits_the_read_timeout_and_fails_in_one_line(
    blackhole: Blackhole, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # (never reached: nothing is signed)
    monkeypatch.setattr("modelfs.backends.gcs.load_credentials", lambda anonymous: _credentials(blackhole, None, -1))
    backend = GCSBackend(parse_source("gs://bkt/m"), anonymous=False, read_timeout=0.5)

    async def stat() -> str:
        try:
            with pytest.raises(TransientError) as caught:
                await backend.stat("x")
            return str(caught.value)
        finally:
            await backend.aclose()

    message = trio.run(stat)
    # The client gave up (at the read timeout), not the endpoint; the endpoint's thread sees
    # the hang-up when it next runs.
    assert blackhole.hung_up.wait(SAFETY)
    assert message == "x: getting an access token failed: timed out"
