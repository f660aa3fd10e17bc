"""Run Debian's nginx on 127.0.0.1 as a plain static file server, over HTTP and HTTPS.

Everything nginx writes (pid, temp dirs, logs) lives in one work dir, it runs ``daemon off``
as our child, and its error log is given with ``-e`` so it never touches /var/log/nginx or
/run/nginx.pid: a system nginx on the same machine is left alone. TLS uses a throwaway CA
made with ``openssl`` (:func:`make_ca`), so clients verify with ``--ca-cert``.

The document root serves:

- everything with Range, ETag/If-Match and a JSON directory index (``autoindex_format json``);
- ``/private/``: 401 unless the request carries ``Authorization: Bearer <token>``;
- ``/noranges/``: ``max_ranges 0``, a server that ignores Range and sends the whole file;
- ``/html/``: the whole root again with an HTML index (for clients such as rclone's http remote).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from modelfs.testing.fakegcs import free_port
from modelfs.testing.processes import stop_process

__all__ = ["Nginx", "nginx", "make_ca", "nginx_binary", "TOKEN"]

TOKEN = "t0ken-that-must-never-be-logged"


def nginx_binary() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("nginx not found: install the Debian package 'nginx' (scripts/setup.sh does)")


def make_ca(directory: Path, *, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate it signed for ``host`` (and localhost).

    Returns (ca.pem, server.pem, server.key). EC keys: quick to make, and what servers use.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_pem = directory / "ca.key", directory / "ca.pem"
    key, csr, pem = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text(
        f"subjectAltName=IP:{host},DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        str(ca_key),
        "-out",
        str(ca_pem),
        "-days",
        "3",
        "-subj",
        "/CN=modelfs test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-addext",
        "subjectKeyIdentifier=hash",
    )
    openssl("req", "-new", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={host}")
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_pem),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(pem),
        "-days",
        "3",
        "-extfile",
        str(ext),
    )
    return ca_pem, pem, key


def http_common(work: Path | str) -> str:
    """The ``http`` block's lines every test nginx shares: its temp dirs under ``work``, no
    MIME types, sendfile."""
    return (
        f"client_body_temp_path {work}/tmp/client;\n    proxy_temp_path {work}/tmp/proxy;\n"
        f"    fastcgi_temp_path {work}/tmp/fastcgi;\n    uwsgi_temp_path {work}/tmp/uwsgi;\n"
        f"    scgi_temp_path {work}/tmp/scgi;\n    default_type application/octet-stream;\n"
        "    types { }\n    sendfile on;"
    )


_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
{user}
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {access_log};
    {common}
    tcp_nopush on;
    keepalive_requests 100000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
        autoindex on;
        autoindex_format json;
        location /private/ {{
            if ($http_authorization != "Bearer {token}") {{ return 401; }}
        }}
        location /signed/ {{
            if ($arg_sig != "{token}") {{ return 403; }}
            if ($http_x_api_key != "{token}") {{ return 401; }}
        }}
        location /weak/ {{
            etag off;
        }}
        # The same files without Last-Modified: nginx's ETag ("MTIME-SIZE") is then not
        # recognizably made of the mtime, and stands as a strong one (a server whose ETags
        # change with the bytes, for the cache tier's https tests).
        location /strong/ {{
            proxy_pass http://127.0.0.1:{port}/;
            proxy_hide_header Last-Modified;
        }}
        location /same/ {{
            absolute_redirect off;
            rewrite ^/same/(.*)$ /private/$1 redirect;
        }}
        location /downgrade/ {{
            rewrite ^/downgrade/(.*)$ http://127.0.0.1:{port}/plain/$1 redirect;
        }}
        location /noapikey/ {{
            if ($http_x_api_key) {{ return 403; }}
        }}
        location /noranges/ {{
            max_ranges 0;
        }}
        location /html/ {{
            alias {root}/;
            autoindex_format html;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    """A running nginx: files under ``root`` are served at ``url(path)``."""

    root: Path
    work: Path
    port: int
    tls_port: int
    ca_cert: Path
    process: subprocess.Popen[bytes]

    def url(self, path: str = "", *, tls: bool = False) -> str:
        """``http(s)://127.0.0.1:PORT/path``."""
        base = f"https://127.0.0.1:{self.tls_port}" if tls else f"http://127.0.0.1:{self.port}"
        return f"{base}/{path.lstrip('/')}"

    def put(self, path: str, data: bytes, *, mtime: float | None = None) -> Path:
        """Create or atomically replace a file. nginx's ETag is mtime (seconds) and size, so a
        replacement gets an mtime that differs from the old one's by whole seconds."""
        dest = self.root / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        old_mtime = dest.stat().st_mtime if dest.exists() else None
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_bytes(data)
        if mtime is None:
            mtime = time.time()
            if old_mtime is not None and int(mtime) == int(old_mtime):
                mtime = old_mtime + 2
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, dest)
        return dest

    @property
    def error_log(self) -> Path:
        return self.work / "error.log"

    def stop(self) -> None:
        stop_process(self.process)  # SIGTERM: a fast shutdown of master and workers


@contextmanager
def nginx(root: Path | None = None, *, workers: int = 1, access_log: bool = False) -> Iterator[Nginx]:
    """Start nginx serving ``root`` (default: a new temp dir) on free loopback ports; stop it on exit."""
    binary = nginx_binary()
    work = Path(tempfile.mkdtemp(prefix="modelfs-nginx-"))
    owned_root = root is None
    root = work / "www" if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    (work / "tmp").mkdir()
    ca_cert, cert, key = make_ca(work / "tls")
    port, tls_port = free_port(), free_port()
    while tls_port == port:
        tls_port = free_port()
    conf = work / "nginx.conf"
    # As root, workers would switch to 'nobody' and could not read a 0700 temp dir.
    user = "user root root;" if os.geteuid() == 0 else ""
    conf.write_text(
        _CONF.format(
            workers=workers,
            user=user,
            work=work,
            common=http_common(work),
            port=port,
            tls_port=tls_port,
            cert=cert,
            key=key,
            root=root,
            token=TOKEN,
            access_log=f"{work}/access.log" if access_log else "off",
        )
    )
    process = subprocess.Popen(
        [binary, "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = Nginx(root, work, port, tls_port, ca_cert, process)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(server.url("/"), timeout=5).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except (urllib.error.URLError, ConnectionError, OSError):
                if process.poll() is not None:
                    err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                    raise RuntimeError(f"nginx did not start: {err.strip()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start in time") from None
                time.sleep(0.05)
        yield server
    finally:
        server.stop()
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(work, ignore_errors=True)
        if owned_root:
            shutil.rmtree(root, ignore_errors=True)
