"""A walk (modelfs warm, --eager-model) of a GCS listing whose continuation tokens go round a
cycle longer than the guard's window of tokens (modelfs/pages.py) ends with one error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import trio

from modelfs.backends.gcs import GCSBackend
from modelfs.config import parse_source
from modelfs.errors import BackendError
from modelfs.pages import RECENT_TOKENS
from modelfs.testing.servers import QuietHandler, loopback_http
from modelfs.walk import walk_objects

CYCLE = 2 * RECENT_TOKENS  # longer than the window of tokens the guard remembers


def _item(name: str) -> dict[str, str]:
    return {"name": name, "size": "1", "generation": "1", "updated": "2026-01-01T00:00:00Z"}


@pytest.fixture
def cycling() -> Iterator[dict[str, object]]:
    """A JSON API whose listing pages go round CYCLE tokens for ever; ``state["names"]`` says
    what page i lists ('rising': f{i}, back to f0 after the cycle; 'same': one name on every page)."""
    state: dict[str, object] = {"names": "rising", "pages": 0}

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            token = parse_qs(urlsplit(self.path).query).get("pageToken", ["t0"])[0]
            i = int(token[1:])
            state["pages"] = int(str(state["pages"])) + 1
            name = f"f{i:05d}" if state["names"] == "rising" else "same"
            body = json.dumps({"items": [_item(name)], "nextPageToken": f"t{(i + 1) % CYCLE}"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with loopback_http(Handler) as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", url)
        yield state


@pytest.mark.parametrize("names", ["rising", "same"])
def test_a_token_cycle_longer_than_the_window_ends_the_walk(names: str, cycling: dict[str, object]) -> None:
    cycling["names"] = names
    backend = GCSBackend(parse_source("gs://bkt"), anonymous=True)

    async def walk() -> str:
        try:
            with pytest.raises(BackendError) as caught:
                async for _info in walk_objects(backend, retry_deadline=1):
                    assert int(str(cycling["pages"])) <= 3 * CYCLE, "the walk would never end"
            return str(caught.value)
        finally:
            await backend.aclose()

    message = trio.run(walk)
    assert "a listing without end" in message and "\n" not in message
    assert int(str(cycling["pages"])) <= (CYCLE + 1 if names == "rising" else 1001)
