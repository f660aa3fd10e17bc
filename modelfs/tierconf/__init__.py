"""The cache tier's configuration, written once and rendered for each way it is deployed.

``nginx.conf.in``, ``tier.js`` and ``modelfs-tier-fill.service.in`` are the one source:
:func:`render_nginx` fills in the settings of a deployment (origin, readable paths, slice
size, cache dir and cap), :func:`render_systemd` the unit that runs the fill stage
(:mod:`modelfs.tierconf.fill`) beside a VM's nginx, and :func:`render_kubernetes` puts the
rendered config and the script into a ConfigMap beside the StatefulSet (nginx and the fill
stage in one pod), Service and NetworkPolicy that run it. packaging/tier/ holds both rendered with
the defaults (tests/unit/test_packaging.py fails when they drift), and the fleet tests run the
same config against a real origin. ``python -m modelfs.tierconf --help`` renders them.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any
from urllib.parse import SplitResult, quote, unquote_to_bytes, urlsplit

from modelfs.errors import ConfigError

__all__ = [
    "GCS_ORIGIN",
    "TierSettings",
    "render_kubernetes",
    "render_nginx",
    "render_systemd",
    "settings_for_source",
    "tier_js",
]

GCS_ORIGIN = "https://storage.googleapis.com"
_PLACEHOLDER_RE = re.compile(r"@([A-Z_]+)@")


@dataclass(frozen=True)
class TierSettings:
    """One tier deployment. Paths are inside the tier's host or container."""

    origin: str  # scheme://host[:port] of the object store or web server
    allow: tuple[str, ...]  # raw path prefixes the tier serves; everything else is 403
    listen: str = "8080"
    slice: str = "8m"  # must equal the nodes' --block-size
    cache_dir: str = "/var/cache/modelfs-tier"
    max_size: str = "100g"
    origin_side: str = "127.0.0.1:8081"  # nginx's loopback origin side, which the fill stage GETs through
    run_dir: str = "/run/modelfs-tier"  # the fill stage's socket (fill.sock), nginx's pid and temp dirs
    js_dir: str = "/etc/modelfs-tier"
    token_file: str = (
        "/var/run/modelfs-tier-token/token"  # "Bearer <contents>" to the origin; "" or no file = anonymous
    )
    error_log: str = "stderr"
    access_log: str = "/dev/stdout"
    ca_file: str = "/etc/ssl/certs/ca-certificates.crt"
    js_module: str = "/usr/lib/nginx/modules/ngx_http_js_module.so"
    user: str = "www-data"  # the workers' user (Debian's nginx package makes it)
    origin_name: str = ""  # the name the origin's certificate must carry (default: its host)
    auth: str = "bearer"  # bearer (GCS token) | aws-sigv4 (S3 keys) | none: what token_file holds
    region: str = "us-east-1"  # aws-sigv4: the bucket's region
    # nginx's worker processes. Not "auto": in a container that counts the node's CPUs (96 on a
    # big node), and each worker costs memory under the pod's limit whatever the pod's CPUs.
    workers: str = "4"


def settings_for_source(source: str, *, origin: str | None = None, **overrides: Any) -> TierSettings:
    """Settings serving one modelfs SOURCE (``gs://bucket``, ``s3://bucket``, ``https://host/dir/``).

    Only that bucket (or that directory of the web server) is readable through the tier.
    ``origin`` is the store's endpoint (GCS's by default; required for s3://).
    """
    parts = _split(source, "source")
    if parts.scheme == "gs" and parts.netloc:
        bucket = quote(parts.netloc, safe="")
        allow: tuple[str, ...] = (f"/download/storage/v1/b/{bucket}/o/", f"/storage/v1/b/{bucket}/o/")
        origin = origin or GCS_ORIGIN
    elif parts.scheme == "s3" and parts.netloc:
        if not origin:
            raise ConfigError("an s3:// tier needs --origin (the S3 endpoint, e.g. https://s3.us-east-1.amazonaws.com)")
        allow = (f"/{quote(parts.netloc, safe='')}/",)
        overrides.setdefault("auth", "aws-sigv4")
        overrides.setdefault("token_file", "/var/run/modelfs-tier-token/aws-keys")
    elif parts.scheme in ("http", "https") and parts.netloc:
        directory = parts.path if parts.path.endswith("/") else parts.path.rpartition("/")[0] + "/"
        # As the nodes send it: the directory as the source spells it (modelfs.backends.http).
        allow = (quote(directory, safe="/:@!$&'()*+,;=~%"),)
        decoded = unquote_to_bytes(allow[0])
        if re.search(rb"(^|/)\.{1,2}(/|$)", decoded) or re.search(rb"[\x00-\x1f\x7f]", decoded):
            # The tier refuses every dot-segment (400), and nginx a control character.
            raise ConfigError(f"the source's directory has a dot-segment or a control character: {source!r}")
        origin = origin or f"{parts.scheme}://{parts.netloc}"
        overrides.setdefault("auth", "none")
    else:
        raise ConfigError(
            f"not a source the tier can serve: {source!r} (gs://BUCKET, s3://BUCKET or https://HOST/DIR/)"
        )
    return replace(TierSettings(origin=_check_origin(origin), allow=allow), **overrides)


def _split(url: str, what: str) -> SplitResult:
    """urlsplit, with the port checked: a malformed URL is a ConfigError, not a ValueError."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError as exc:
        raise ConfigError(f"not a valid URL for the {what}: {url!r} ({exc})") from None
    return parts


def _check_origin(origin: str) -> str:
    parts = _split(origin, "origin")
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
        or parts.password is not None
    ):
        raise ConfigError(f"the origin must be http(s)://HOST[:PORT], not {origin!r}")
    return f"{parts.scheme}://{parts.netloc}"


def _template(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def tier_js() -> str:
    """The tier's origin credentials (njs), installed as ``tier.js`` in the settings' ``js_dir``."""
    return _template("tier.js")


def _fill(template: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        return values[match.group(1)]

    return _PLACEHOLDER_RE.sub(one, template)


def _nginx_regex(prefix: bytes) -> str:
    """A regex matching the bytes ``prefix``, safe in nginx's config quoted or not: letters,
    digits, ``/`` and ``_`` as they are, ``.`` and ``-`` escaped, every other byte as ``\\xHH``
    (nginx's regexes match bytes, not UTF-8 characters)."""
    out = []
    for byte in prefix:
        char = chr(byte)
        if char.isascii() and (char.isalnum() or char in "/_"):
            out.append(char)
        else:
            out.append("\\" + char if char in ".-" else f"\\x{byte:02x}")
    return "".join(out)


def _uri_form(raw_path: str) -> bytes:
    """What nginx makes of the raw path ``raw_path`` in ``$uri``, which ``location`` matches:
    %-decoded (``%2F`` too) and with its slashes merged (``merge_slashes on``)."""
    return re.sub(rb"/+", b"/", unquote_to_bytes(raw_path))


_FILL_SLICES_BYTES = 256 << 20
"""What the fill stage holds in slices at once (--max-fills x the slice size), at most 32 slices."""


def _slice_bytes(text: str) -> int:
    """nginx's size syntax for ``slice`` (``8m``, ``512k``, ``1048576``) in bytes."""
    found = re.fullmatch(r"([1-9][0-9]{0,9})([kKmMgG]?)", text)
    if found is None:
        raise ConfigError(f"the slice size must be like 8m, 512k or 1048576, not {text!r}")
    return int(found.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[found.group(2).lower()]


def fill_limits(settings: TierSettings) -> tuple[int, int]:
    """(--max-fills, the fill stage's memory limit in MiB) for this slice size: the slices held
    at once cost their size each, and a large slice (it equals the nodes' --block-size, up to
    256M) must not multiply 32 of them past the container's limit."""
    slice_bytes = _slice_bytes(settings.slice)
    max_fills = max(2, min(32, _FILL_SLICES_BYTES // slice_bytes))
    return max_fills, (max_fills * slice_bytes + (256 << 20) + (1 << 20) - 1) >> 20


def render_nginx(settings: TierSettings) -> str:
    """nginx.conf for one tier replica."""
    origin = urlsplit(settings.origin)
    port = origin.port or (443 if origin.scheme == "https" else 80)
    host = origin.hostname or ""
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if settings.auth not in ("bearer", "aws-sigv4", "none"):
        raise ConfigError(f"auth must be bearer, aws-sigv4 or none, not {settings.auth!r}")
    if not re.fullmatch(r"[a-z0-9-]+", settings.region):
        raise ConfigError(f"not an AWS region: {settings.region!r}")
    _slice_bytes(settings.slice)
    if not re.fullmatch(r"[1-9][0-9]?", settings.workers):
        raise ConfigError(f"workers must be a number from 1 to 99, not {settings.workers!r}")
    if not settings.allow or any(not re.fullmatch(r"/[!-~]*", p) for p in settings.allow):
        raise ConfigError(f"readable paths must be absolute %-encoded URL paths: {settings.allow!r}")
    values = {
        "ORIGIN_URL": settings.origin,
        "ALLOW_TEXT": " ".join(settings.allow),
        # $request_uri (what the origin gets) holds the raw path; location matches $uri.
        "ALLOW_RE": "|".join(_nginx_regex(p.encode("ascii")) for p in settings.allow),
        "ALLOW_URI_RE": "|".join(_nginx_regex(_uri_form(p)) for p in settings.allow),
        "JS_MODULE": settings.js_module,
        "USER": settings.user,
        "RUN_DIR": settings.run_dir,
        "ERROR_LOG": settings.error_log,
        "ACCESS_LOG": settings.access_log,
        "CACHE_DIR": settings.cache_dir,
        "MAX_SIZE": settings.max_size,
        "JS_DIR": settings.js_dir,
        "TOKEN_FILE": f'"{settings.token_file}"',
        "ORIGIN_ADDR": addr,
        "LISTEN": settings.listen,
        "ORIGIN_SIDE": settings.origin_side,
        "SLICE": settings.slice,
        "ORIGIN_SCHEME": origin.scheme,
        "ORIGIN_HOST": origin.netloc,
        "ORIGIN_SNI": settings.origin_name or host,
        "AUTH": "" if settings.auth == "none" else settings.auth,
        "REGION": settings.region,
        "WORKERS": settings.workers,
        "SSL_VERIFY": "on" if origin.scheme == "https" else "off",
        "CA_FILE": settings.ca_file,
    }
    return _fill(_template("nginx.conf.in"), values)


def render_kubernetes(settings: TierSettings, *, replicas: int = 2, storage: str = "120Gi") -> str:
    """A ConfigMap (nginx.conf + tier.js), StatefulSet, headless Service and NetworkPolicy."""

    def block(text: str) -> str:
        return textwrap.indent(text, "    ").rstrip("\n")

    port = settings.listen.rpartition(":")[2]
    max_fills, fill_memory = fill_limits(settings)
    values = {
        "MAX_FILLS": str(max_fills),
        "FILL_MEMORY": f"{fill_memory}Mi",
        "NGINX_CONF": block(render_nginx(settings)),
        "TIER_JS": block(tier_js()),
        "REPLICAS": str(replicas),
        "STORAGE": storage,
        "PORT": port,
        "CACHE_DIR": settings.cache_dir,
        "JS_DIR": settings.js_dir,
        "RUN_DIR": settings.run_dir,
        "TOKEN_DIR": settings.token_file.rpartition("/")[0] or "/var/run/modelfs-tier-token",
        "SLICE": settings.slice,
        "ORIGIN_SIDE": settings.origin_side,
    }
    return _fill(_template("kubernetes.yaml.in"), values)


def render_systemd(settings: TierSettings) -> str:
    """A systemd unit running the fill stage (modelfs.tierconf.fill) beside a VM's nginx."""
    run_dir = settings.run_dir.rstrip("/")
    if not run_dir.startswith("/run/") or "/" in run_dir[len("/run/") :]:
        raise ConfigError(f"the systemd unit needs --run-dir /run/NAME (its RuntimeDirectory), not {run_dir!r}")
    values = {
        "RUN_DIR": run_dir,
        "RUN_DIR_NAME": run_dir[5:],
        "ORIGIN_SIDE": settings.origin_side,
        "MAX_FILLS": str(fill_limits(settings)[0]),
    }
    return _fill(_template("modelfs-tier-fill.service.in"), values)
