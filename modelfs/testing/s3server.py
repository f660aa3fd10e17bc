"""Run moto's S3 server (``moto[server]`` from PyPI) on 127.0.0.1, with real authentication.

moto is a correct S3 (Range, ETag, ``If-Match`` → 412, 416, ListObjectsV2) but reads a whole
object for every GET: keep objects small (a few MiB at most).

At start, while moto still lets anything through, two IAM users are made: ``admin`` (may do
anything; seeds and replaces objects) and ``reader`` (may read and list everything except
objects whose key has a ``denied/`` component). Then authentication is switched on, so
unsigned requests and unknown keys get 403, and ``reader`` gets AccessDenied under
``denied/``: the contract tests' denial case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelfs.testing.fakegcs import free_port
from modelfs.testing.processes import stop_process

__all__ = ["S3Server", "s3_server", "Credentials"]

REGION = "us-east-1"


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        """Variables that make boto3 use exactly these keys, whatever ~/.aws holds."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }


_ENV_DROP = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


@dataclass
class S3Server:
    """A running moto S3 server; ``url`` is what ``--endpoint-url`` takes."""

    port: int
    process: subprocess.Popen[bytes]
    admin: Credentials
    reader: Credentials
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, credentials: Credentials | None = None) -> dict[str, str]:
        """os.environ for a subprocess (e.g. a mount) that signs with ``credentials`` (default: reader)."""
        env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
        env.update((credentials or self.reader).env())
        return env

    def client(self, credentials: Credentials | None = None) -> Any:
        """A boto3 S3 client (default: admin)."""
        import boto3
        from botocore.config import Config

        creds = credentials or self.admin
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=creds.access_key,
            aws_secret_access_key=creds.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 3}),
        )

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass

    def put(self, bucket: str, key: str, data: bytes) -> str:
        """Create or replace an object; returns its ETag."""
        return str(self.client().put_object(Bucket=bucket, Key=key, Body=data)["ETag"])

    def delete(self, bucket: str, key: str) -> None:
        self.client().delete_object(Bucket=bucket, Key=key)

    def stop(self) -> None:
        stop_process(self.process)


def _policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start ``python -m moto.server`` on a free loopback port with auth on; stop it on exit."""
    import boto3
    from botocore.config import Config

    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="modelfs-moto-"))
    log_path = workdir / "moto.log"
    log = open(log_path, "wb")
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=env,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    server: S3Server | None = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start; see {log_path}") from None
                time.sleep(0.1)
        # Before auth is on, any keys do: make the two users.
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            region_name=REGION,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
            config=Config(retries={"total_max_attempts": 3}),
        )
        users: dict[str, Credentials] = {}
        policies = {
            "admin": _policy({"Effect": "Allow", "Action": "*", "Resource": "*"}),
            "reader": _policy(
                {
                    "Effect": "Allow",
                    "Action": ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"],
                    "Resource": "*",
                },
                {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::*/denied/*"},
            ),
        }
        for user, policy in policies.items():
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName=f"{user}-policy", PolicyDocument=policy)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            users[user] = Credentials(key["AccessKeyId"], key["SecretAccessKey"])
        request = urllib.request.Request(
            url + "/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        urllib.request.urlopen(request, timeout=10).close()
        server = S3Server(port, process, users["admin"], users["reader"], log_path)
        yield server
    finally:
        if server is not None:
            server.stop()
        elif process.poll() is None:
            process.kill()
            process.wait()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
