"""Google credentials for tests and benchmarks, without Google: an OAuth token endpoint on
loopback and a service-account key file that names it.

A daemon given the key file (``GOOGLE_APPLICATION_CREDENTIALS``) and an endpoint that is not
an emulator (``API_ENDPOINT_OVERRIDE``; ``STORAGE_EMULATOR_HOST`` would mean anonymous) signs
a JWT with the key, trades it for an access token here and sends that token with every
request, as it does against GCS. fake-gcs-server ignores the token.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelfs.testing.servers import serving

__all__ = ["TokenServer", "credentials_env", "service_account_key", "token_server"]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: TokenServer

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        with self.server.lock:
            self.server.grants.append(form.get("grant_type", [""])[0])
            self.server.assertions.append(form.get("assertion", [""])[0])
            count = len(self.server.grants)
        body = json.dumps({"access_token": f"tok-{count}", "expires_in": 3600, "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TokenServer(http.server.ThreadingHTTPServer):
    """Answers every POST with a new access token; records each grant type and JWT assertion."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.grants: list[str] = []
        self.assertions: list[str] = []

    @property
    def token_uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/token"

    def claims(self, index: int = 0) -> dict[str, object]:
        """The claims of the ``index``-th JWT assertion received."""
        payload = self.assertions[index].split(".")[1]
        claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return claims


@contextmanager
def token_server() -> Iterator[TokenServer]:
    with serving(TokenServer()) as server:
        yield server


def service_account_key(token_uri: str) -> dict[str, str]:
    """A service-account key file's contents: a fresh RSA key, tokens from ``token_uri``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "reader@test-project.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }


def credentials_env(endpoint: str, tokens: TokenServer, key_path: Path) -> dict[str, str]:
    """The environment of a daemon that reaches ``endpoint`` (an emulator's URL) with
    service-account credentials from ``tokens``: the key is written to ``key_path``."""
    key_path.write_text(json.dumps(service_account_key(tokens.token_uri)))
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}
    env |= {"API_ENDPOINT_OVERRIDE": endpoint, "GOOGLE_APPLICATION_CREDENTIALS": str(key_path)}
    return env
