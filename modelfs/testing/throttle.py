"""Slow stores for tests and benchmarks: a source behind nginx that sends each answer at most
``rate`` bytes/s per connection, so GETs last and many are in flight at once.

:func:`slow_source` serves files as ``gs://`` (fake-gcs-server behind the throttle), ``https://``
(nginx itself, over TLS with its own CA) or ``s3://`` (moto behind the throttle; its GetObject
answers come from the same files, served by nginx with moto's ETag: moto reads a whole object
for every GET, which at hundreds of GETs in flight would take gigabytes). Each yields the
SOURCE, the mount options and the environment a mount needs.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from modelfs.testing.fakegcs import free_port
from modelfs.testing.nginx import http_common, make_ca, nginx_binary
from modelfs.testing.processes import stop_process

__all__ = ["SlowSource", "slow_source", "throttle"]

_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    {common}
    keepalive_requests 100000;
    keepalive_timeout 120s;
    {http}
    server {{
        listen 127.0.0.1:{port} {ssl};
        {tls}
        {limit}
        {what}
    }}
}}
"""

_PROXY = (
    'proxy_set_header Host $http_host; proxy_http_version 1.1; proxy_set_header Connection ""; '
    "proxy_max_temp_file_size 0; proxy_buffers 64 64k; proxy_read_timeout 600s;"
)


@contextmanager
def throttle(
    rate: int,
    *,
    upstream: str | None = None,
    root: Path | None = None,
    tls: bool = False,
    s3_etags: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, Path | None]]:
    """nginx sending every answer at most ``rate`` bytes/s per connection (0: no limit).

    It serves ``root`` (with a JSON autoindex), or proxies ``upstream`` (the Host header kept,
    so S3 signatures hold); with ``s3_etags`` (path -> the store's ETag) as well, an S3
    GetObject (a GET without a query) is answered from ``root`` with that ETag and the rest
    (listings, HEAD) by ``upstream``. Over TLS with a CA of its own if ``tls``. Yields its URL
    and that CA certificate (None without TLS)."""
    work = Path(tempfile.mkdtemp(prefix="modelfs-throttle-"))
    (work / "tmp").mkdir()
    port = free_port()
    ca: Path | None = None
    tls_conf = ""
    if tls:
        ca, cert, key = make_ca(work / "tls")
        tls_conf = f"ssl_certificate {cert}; ssl_certificate_key {key};"
    http = ""
    if s3_etags is not None:
        assert upstream is not None and root is not None
        static = free_port()
        store = upstream.split("://", 1)[1]
        etags = " ".join(f"\"{path}\" '{etag}';" for path, etag in s3_etags.items())
        # GetObject from the files (If-Match dropped: nginx would compare its own ETag), the rest from the store.
        http = (
            f'map "$request_method:$args" $s3_up {{ "GET:" 127.0.0.1:{static}; default {store}; }}\n'
            f'    map "$request_method:$args" $s3_if_match {{ "GET:" ""; default $http_if_match; }}\n'
            f"    map $uri $s3_etag {{ {etags} }}\n"
            f"    server {{ listen 127.0.0.1:{static}; root {root}; etag off; add_header ETag $s3_etag always; }}"
        )
        what = f"location / {{ proxy_pass http://$s3_up; proxy_set_header If-Match $s3_if_match; {_PROXY} }}"
    elif upstream is not None:
        what = f"location / {{ proxy_pass {upstream}; {_PROXY} }}"
    else:
        assert root is not None
        what = f"root {root}; autoindex on; autoindex_format json;"
    conf = work / "nginx.conf"
    conf.write_text(
        _CONF.format(
            # As root, workers would switch to 'nobody' and could not read a 0700 temp dir.
            user="user root root;" if os.geteuid() == 0 else "",
            work=work,
            common=http_common(work),
            http=http,
            port=port,
            ssl="ssl" if tls else "",
            tls=tls_conf,
            limit=f"limit_rate {rate};" if rate else "",
            what=what,
        )
    )
    process = subprocess.Popen(
        [nginx_binary(), "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=5, context=context).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = work / "error.log"
                    raise RuntimeError(
                        f"nginx did not start: {log.read_text() if log.exists() else ''}".strip()
                    ) from None
                time.sleep(0.05)
        yield url, ca
    finally:
        stop_process(process)
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class SlowSource:
    """What a mount of the slow store needs: ``modelfs mount SOURCE MNT *options`` with ``env``."""

    source: str
    options: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@contextmanager
def slow_source(kind: str, files: Sequence[Path], work: Path, rate: int) -> Iterator[SlowSource]:
    """``files`` as ``m/f0.safetensors``, ``m/f1.safetensors``... of a ``kind`` store (``gcs``,
    ``https``, ``s3``) mounted at ``m``, each answer sent at most ``rate`` bytes/s per
    connection. ``work`` holds the store's files (hard links of ``files``)."""
    if kind == "gcs":
        from modelfs.testing.fakegcs import fake_gcs
        from modelfs.testing.workload import seed_object

        root = work / "gcs"
        shutil.rmtree(root, ignore_errors=True)
        (root / "slow").mkdir(parents=True)
        for i, src in enumerate(files):
            seed_object(root, "slow", f"m/f{i}.safetensors", None, 1 + i, path=src)
        with fake_gcs(backend="filesystem", root=root) as gcs, throttle(rate, upstream=gcs.url) as (url, _):
            yield SlowSource("gs://slow/m", ["--anonymous"], {**gcs.env(), "STORAGE_EMULATOR_HOST": url})
        return
    if kind not in ("https", "s3"):
        raise ValueError(f"unknown store kind {kind!r}")
    root = work / "www"
    shutil.rmtree(root, ignore_errors=True)
    top = root / "slow" if kind == "s3" else root
    (top / "m").mkdir(parents=True)
    for i, src in enumerate(files):
        os.link(src, top / "m" / f"f{i}.safetensors")
    if kind == "https":
        with throttle(rate, root=root, tls=True) as (url, ca):
            yield SlowSource(f"{url}/m/", ["--ca-cert", str(ca)], dict(os.environ))
        return
    from modelfs.testing.s3server import s3_server

    with s3_server() as s3:
        s3.create_bucket("slow")
        client = s3.client()
        etags = {}
        for i, src in enumerate(files):
            key = f"m/f{i}.safetensors"
            client.upload_file(str(src), "slow", key)
            etags[f"/slow/{key}"] = client.head_object(Bucket="slow", Key=key)["ETag"]
        with throttle(rate, upstream=s3.url, root=root, s3_etags=etags) as (url, _):
            yield SlowSource("s3://slow/m", ["--endpoint-url", url], s3.env())
