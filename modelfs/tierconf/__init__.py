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

import ipaddress
import re
import textwrap
from dataclasses import dataclass, replace
from decimal import Decimal
from importlib import resources
from typing import Any
from urllib.parse import SplitResult, quote, unquote_to_bytes, urlsplit

from modelfs.errors import ConfigError

__all__ = [
    "GCS_ORIGIN",
    "TierSettings",
    "check_settings",
    "max_size_for",
    "min_free",
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
    # Free space nginx's cache manager keeps on the cache's file system by evicting (checked
    # every 10 s at most); "auto": what the fill stage's slices in flight take (32 x 8m).
    min_free: str = "auto"
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
        or parts.port == 0
    ):
        raise ConfigError(f"the origin must be http(s)://HOST[:PORT], not {origin!r}")
    _check_host("the origin", parts.hostname)
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


_UNSAFE_PATH_RE = re.compile(r"[^!-~]|[\"'`;{}$\\#]")
"""What a path may not hold: it is pasted into nginx.conf, the unit and the manifests as it is
(whitespace, quotes, ``;{}`` and ``#`` end or break a directive, ``$`` is a variable in
access_log, ``\\`` an escape)."""
_HOST_RE = re.compile(
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")


def _check_path(what: str, value: str, *, also: tuple[str, ...] = ()) -> None:
    if value in also:
        return
    if not value.startswith("/") or _UNSAFE_PATH_RE.search(value):
        allowed = "".join(f"{word}, " for word in also if word)
        raise ConfigError(
            f"{what} must be {allowed}an absolute path of printable ASCII without whitespace, quotes,"
            f" ;{{}}, #, $ or \\, not {value!r}"
        )


def _check_host(what: str, host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_RE.fullmatch(host) or len(host) > 253:
            raise ConfigError(f"{what}: not a host name or IP address: {host!r}") from None


def _listen_address(what: str, value: str, *, loopback: bool = False) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT`` (HOST required when ``loopback``) → (host, port)."""
    found = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]:|([^:\[\]]+):)?([0-9]{1,5})", value)
    port = int(found.group(3)) if found else 0
    if found is None or not 0 < port < 65536:
        raise ConfigError(f"{what} must be PORT, HOST:PORT or [IPV6]:PORT, not {value!r}")
    host = found.group(1) or found.group(2) or ""
    if found.group(1) is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{what}: not an IPv6 address: {value!r}") from None
    elif host:
        _check_host(what, host)
    if loopback:
        try:
            is_loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            is_loopback = False
        if not is_loopback:
            # It adds the tier's credentials to whatever reaches it.
            raise ConfigError(f"{what} must be a loopback address and port (127.0.0.1:PORT), not {value!r}")
    return host, port


def _nginx_size(what: str, text: str) -> int:
    """nginx's size syntax (``100g``, ``8m``, ``512k``, ``1048576``) in bytes."""
    found = re.fullmatch(r"([1-9][0-9]{0,14})([kKmMgG]?)", text)
    if found is None:
        raise ConfigError(f"{what} must be like 100g, 8m, 512k or 1048576, not {text!r}")
    return int(found.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[found.group(2).lower()]


_QUANTITY_SCALE = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY_SCALE.update({"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60})


def _quantity_bytes(what: str, text: str) -> int:
    """A Kubernetes storage quantity (``120Gi``, ``500G``, ``1.5Ti``) in bytes."""
    found = re.fullmatch(r"([0-9]{1,15})(?:\.([0-9]{1,9}))?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?", text)
    if found is None:
        raise ConfigError(f"{what} must be a Kubernetes quantity like 120Gi or 500G, not {text!r}")
    whole, fraction, unit = found.group(1), found.group(2) or "", found.group(3) or ""
    return int(Decimal(f"{whole}.{fraction or 0}") * _QUANTITY_SCALE[unit])


CACHE_PERCENT = 90
"""--max-size is at most this percentage of the cache volume (--storage). Not all of it: nginx's cap
is approximate (the cache manager evicts once it is passed; the slices being written are not
counted) and ext4 keeps 5% for root, which nginx's workers cannot use. A cache bigger than its
volume fails its writes (ENOSPC), and nodes then read from the origin: more origin GETs than no
tier at all (until the cache manager has evicted down to min_free, which it checks every 10 s at
most)."""


def max_size_for(storage: str) -> str:
    """The cache cap for a volume of ``storage``: the default (100g), or less on a volume too small."""
    default = TierSettings.max_size
    fits = _quantity_bytes("the cache volume (--storage)", storage) * CACHE_PERCENT // 100
    if fits >= _nginx_size("max_size", default):
        return default
    if fits < 1 << 20:
        raise ConfigError(f"the cache volume (--storage) is too small for a cache: {storage!r}")
    return f"{fits >> 30}g" if fits >= 10 << 30 else f"{fits >> 20}m"


def check_settings(settings: TierSettings) -> None:
    """Raise ConfigError for a setting that is not what it must be: each is pasted into the
    rendered files as it is, so none may carry a character that ends or adds a directive."""
    _check_origin(settings.origin)
    if not settings.allow or any(not re.fullmatch(r"/[!-~]*", p) for p in settings.allow):
        raise ConfigError(f"readable paths must be absolute %-encoded URL paths: {settings.allow!r}")
    _listen_address("--listen", settings.listen)
    _listen_address("--origin-side", settings.origin_side, loopback=True)
    _slice_bytes(settings.slice)
    _nginx_size("--max-size", settings.max_size)
    if settings.min_free != "auto":
        _nginx_size("--min-free", settings.min_free)
    for what, path in (
        ("--cache-dir", settings.cache_dir),
        ("--run-dir", settings.run_dir),
        ("--js-dir", settings.js_dir),
        ("--ca-file", settings.ca_file),
        ("--js-module", settings.js_module),
    ):
        _check_path(what, path)
    _check_path("--token-file", settings.token_file, also=("",))  # "": anonymous
    _check_path("--error-log", settings.error_log, also=("stderr",))
    _check_path("--access-log", settings.access_log, also=("off",))
    if not _USER_RE.fullmatch(settings.user):
        raise ConfigError(f"--user must be a user name, not {settings.user!r}")
    if settings.origin_name:
        _check_host("--origin-name", settings.origin_name)
    if settings.auth not in ("bearer", "aws-sigv4", "none"):
        raise ConfigError(f"auth must be bearer, aws-sigv4 or none, not {settings.auth!r}")
    if not re.fullmatch(r"[a-z0-9-]+", settings.region):
        raise ConfigError(f"not an AWS region: {settings.region!r}")
    if not re.fullmatch(r"[1-9][0-9]?", settings.workers):
        raise ConfigError(f"workers must be a number from 1 to 99, not {settings.workers!r}")


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


def min_free(settings: TierSettings) -> str:
    """nginx's ``min_free``: as set, or ("auto") room for every slice the fill stage may be
    handing nginx at once, each written to the cache as it arrives."""
    if settings.min_free != "auto":
        return settings.min_free
    max_fills, _ = fill_limits(settings)
    return f"{(max_fills * _slice_bytes(settings.slice) + (1 << 20) - 1) >> 20}m"


def render_nginx(settings: TierSettings) -> str:
    """nginx.conf for one tier replica."""
    check_settings(settings)
    origin = urlsplit(settings.origin)
    port = origin.port or (443 if origin.scheme == "https" else 80)
    host = origin.hostname or ""
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
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
        "MIN_FREE": min_free(settings),
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

    check_settings(settings)
    _, port = _listen_address("--listen", settings.listen)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 0 < replicas <= 1000:
        raise ConfigError(f"--replicas must be a number from 1 to 1000, not {replicas!r}")
    volume = _quantity_bytes("the cache volume (--storage)", storage)
    if _nginx_size("--max-size", settings.max_size) > volume * CACHE_PERCENT // 100:
        raise ConfigError(
            f"--max-size {settings.max_size} does not fit the cache volume (--storage {storage}): it must be"
            f" at most {CACHE_PERCENT}% of it, {max_size_for(storage)} (nginx's cap is approximate and"
            " ext4 keeps 5% for root); leave out --max-size to have it follow --storage"
        )
    mounts = {"--cache-dir": settings.cache_dir, "--js-dir": settings.js_dir, "--run-dir": settings.run_dir}
    if len({p.rstrip("/") for p in mounts.values()}) < len(mounts):
        raise ConfigError(f"--cache-dir, --js-dir and --run-dir are separate volumes: {mounts!r}")
    max_fills, fill_memory = fill_limits(settings)
    values = {
        "MAX_FILLS": str(max_fills),
        "FILL_MEMORY": f"{fill_memory}Mi",
        "NGINX_CONF": block(render_nginx(settings)),
        "TIER_JS": block(tier_js()),
        "REPLICAS": str(replicas),
        "STORAGE": storage,
        "PORT": str(port),
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
    check_settings(settings)
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
