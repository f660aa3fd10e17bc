"""The one place options are defined and parsed.

Each option is declared once, as a field of :class:`Config` (type, parser, default, help);
:data:`OPTIONS` is derived from those fields, and the command line, ``MODELFS_*`` environment
variables and a TOML config file all read that table, with the precedence
flags > environment > file > default. The result is a frozen :class:`Config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from modelfs.errors import ConfigError

__all__ = [
    "Config",
    "Option",
    "OPTIONS",
    "Source",
    "parse_size",
    "parse_source",
    "add_options",
    "build_config",
    "default_cache_dir",
    "MAX_CONCURRENCY",
    "MAX_SIZE",
]

_SIZE_RE = re.compile(r"^\s*(\d{1,30}(?:\.\d{1,30})?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MAX_SIZE = 1 << 60  # 1 EiB: far above any real cache, far below what C and struct fields hold
_INT_RE = re.compile(r"^\s*[+-]?\d{1,18}\s*$")


def _shown(value: object) -> str:
    """A value for an error message: repr (no raw control characters), cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_size(text: str | int) -> int:
    """Bytes from ``"256M"``-style text (K/M/G/T are powers of 1024); ints pass through.

    A fraction must come out as whole bytes (``1.5G`` is fine, ``0.9`` is not: it would
    silently become 0, which turns the disk cache off). Floats (a TOML ``0.9``) are refused.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ConfigError(f"not a size: {_shown(text)} (use a whole number of bytes, or text like '256M')")
    if isinstance(text, int):
        value = text
        if value < 0:
            raise ConfigError(f"size must not be negative: {_shown(text)}")
    else:
        match = _SIZE_RE.match(text)
        if not match:
            raise ConfigError(f"not a size: {_shown(text)} (use a number with an optional K, M, G or T suffix)")
        exact = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        if exact.denominator != 1:
            raise ConfigError(f"not a whole number of bytes: {_shown(text)}")
        value = int(exact)
    if value > MAX_SIZE:
        raise ConfigError(f"size too large: {_shown(text)} (at most {MAX_SIZE >> 40}T)")
    return value


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"not a boolean: {_shown(text)}")


def _parse_float(text: str | float) -> float:
    """A finite number of seconds; ``nan`` and ``inf`` would pass every range check."""
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        raise ConfigError(f"not a number: {_shown(text)}")
    try:
        value = float(text)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"not a number: {_shown(text)}") from None
    if not math.isfinite(value):
        raise ConfigError(f"not a finite number: {_shown(text)}")
    return value


def _parse_int(text: str | int) -> int:
    """A whole number; a TOML float (``8.5`` or ``8.0``) or boolean is refused, not truncated."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ConfigError(f"not a whole number: {_shown(text)}")
    if isinstance(text, str) and not _INT_RE.match(text):
        raise ConfigError(f"not a whole number: {_shown(text)}")
    value = int(text)
    if abs(value) > MAX_SIZE:
        raise ConfigError(f"number too large: {_shown(text)}")
    return value


def _parse_str(text: Any) -> str:
    if not isinstance(text, str):
        raise ConfigError(f"expected a string, not {_shown(text)}")
    if "\0" in text:
        raise ConfigError("a NUL character is not allowed")
    return text


def _parse_log_level(text: Any) -> str:
    value = str(text).strip().lower()
    if value not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log level must be debug, info, warning or error, not {text!r}")
    return value


def _parse_suffixes(text: Any) -> str:
    items = text if isinstance(text, list) else str(text).split(",")
    if not all(isinstance(item, str) for item in items):
        raise ConfigError(f'suffixes must be strings (like ".safetensors"), not {text!r}')
    return ",".join(item.strip() for item in items if item.strip())


_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HEADER_VALUE_RE = re.compile(r"^[\t\x20-\x7e]*$")
_MAX_HEADER_BYTES = 16 << 10
# Headers modelfs sets itself on every ranged GET; a user value would break reads or pinning.
_RESERVED_HEADERS = {
    "range",
    "if-match",
    "if-none-match",
    "if-range",
    "if-modified-since",
    "if-unmodified-since",
    "accept-encoding",
    "content-length",
    "transfer-encoding",
    "connection",
}


def _parse_cache_urls(items: Any) -> tuple[str, ...]:
    """``--cache-url http://HOST[:PORT]`` (repeatable; the environment variable: one a line or
    comma-separated): each a cache tier replica, checked and normalized, no duplicates."""
    from urllib.parse import urlsplit

    if isinstance(items, str):
        items = items.replace(",", "\n").split()
    if not isinstance(items, (list, tuple)):
        raise ConfigError("--cache-url: expected a list of http://HOST[:PORT] URLs")
    out: list[str] = []
    for item in items:
        text = str(item).strip().rstrip("/")
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise ConfigError(f"--cache-url: not a URL: {text!r}") from None
        if parts.scheme != "http" or not parts.hostname or parts.path or parts.query or parts.fragment:
            raise ConfigError(f"--cache-url must be http://HOST[:PORT], not {text!r}")
        if parts.username is not None or parts.password is not None:
            raise ConfigError("--cache-url must not carry credentials")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        url = f"http://{host}:{port or 80}"
        if url in out:
            raise ConfigError(f"--cache-url: {url} is given twice")
        out.append(url)
    return tuple(out)


def _parse_headers(items: Any) -> tuple[str, ...]:
    """``Name: value`` lines (``--header``, repeatable); ``@FILE`` reads one header per line from
    FILE, which keeps tokens out of the process list. Errors never echo a header's value."""
    if isinstance(items, str):
        items = items.splitlines()  # the environment variable: one header per line
    if not isinstance(items, (list, tuple)):
        raise ConfigError("expected a list of 'Name: value' strings")
    lines: list[str] = []
    for item in items:
        item = str(item).strip()
        if item.startswith("@"):
            try:
                with Path(item[1:]).expanduser().open("rb") as f:
                    raw = f.read(_MAX_CONFIG_FILE + 1)
                if len(raw) > _MAX_CONFIG_FILE:
                    raise ConfigError(f"header file {item[1:]} is larger than {_MAX_CONFIG_FILE >> 20} MiB")
                text = raw.decode("utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read header file {item[1:]}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"cannot read header file {item[1:]}: not UTF-8 text") from None
            lines += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        elif item:
            lines.append(item)
    out: list[str] = []
    for number, line in enumerate(lines, 1):
        name, sep, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not _HEADER_NAME_RE.match(name):
            raise ConfigError(f"header #{number} is not of the form 'Name: value'")
        # RFC 9110 field values, restricted to ASCII: anything else is refused here, by name
        # only, before an HTTP library refuses it with a message that quotes the value.
        if not _HEADER_VALUE_RE.match(value):
            raise ConfigError(f"header {name!r} has a character not allowed in a header value (printable ASCII only)")
        if len(line) > _MAX_HEADER_BYTES:
            raise ConfigError(f"header {name!r} is longer than {_MAX_HEADER_BYTES} bytes")
        if name.lower() in _RESERVED_HEADERS:
            raise ConfigError(f"header {name!r} is set by modelfs itself and cannot be given")
        out.append(f"{name}: {value}")
    return tuple(out)


def _parse_endpoint_url(text: Any) -> str:
    value = str(text).strip().rstrip("/")
    if not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", value):
        raise ConfigError(f"not an http(s):// URL: {text!r}")
    return value


_PROJECT_RE = re.compile(r"^[a-z0-9][a-z0-9.:-]{0,62}$")


def _parse_project(text: Any) -> str:
    value = _parse_str(text).strip()
    if not _PROJECT_RE.match(value):
        raise ConfigError(f"not a Google Cloud project ID or number: {value[:80]!r}")
    return value


def _parse_log_format(text: Any) -> str:
    value = str(text).strip().lower()
    if value not in ("text", "json"):
        raise ConfigError(f"log format must be text or json, not {text!r}")
    return value


def _parse_addr(text: Any) -> str:
    from modelfs.metrics import parse_addr

    try:
        parse_addr(str(text))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return str(text)


_AUTO = "auto"


def _parse_memory_cache(text: str | int) -> int | str:
    if isinstance(text, str) and text.strip().lower() == _AUTO:
        return _AUTO
    return parse_size(text)


@dataclass(frozen=True)
class Option:
    """One option: its long name (``--memory-cache``), parser, default and help."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    short: str | None = None
    flag: bool = False  # a switch: --name / --no-name
    multiple: bool = False  # repeatable: parse gets every value (a list; a TOML list; env: one per line)

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "MODELFS_" + self.attr.upper()


@dataclass(frozen=True)
class Source:
    """Where objects come from: ``gs://bucket/prefix``, ``s3://bucket/prefix``, ``file:///dir``,
    or ``http(s)://host/path`` (bucket is host[:port]; prefix the directory path, decoded)."""

    scheme: str
    bucket: str  # bucket name, the directory for file://, host[:port] for http(s)
    prefix: str  # no leading or trailing slash; "" for the whole bucket
    url: str  # for http(s) without its query string (which may be a signature): safe to log
    file: str = ""  # http(s): the one file a URL not ending in '/' names (decoded); else ""
    query: str = dataclasses.field(default="", repr=False)  # http(s) single-file URL: sent, never shown

    def object_key(self, name: str) -> str:
        """A stable, backend-unique key of an object, used to name cache entries."""
        return f"{self.scheme}://{self.bucket}/{self.prefix + '/' if self.prefix else ''}{name}"


_GCS_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_S3_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")


def _parse_http_source(url: str) -> Source:
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid URL {url!r}: {exc}") from None
    if port == 0:  # (urlsplit accepts it; a connection would go to the scheme's default port)
        raise ConfigError(f"invalid URL {url!r}: port 0")
    if not parts.hostname:
        raise ConfigError(f"no host in {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            "credentials in the URL are not accepted (they would show in logs): "
            "pass --header 'Authorization: ...' instead"
        )
    path = unquote(parts.path or "/")
    if "\0" in path or any(part in (".", "..") for part in path.split("/")):
        raise ConfigError(f"invalid path in {parts.scheme}://{parts.netloc}{parts.path}")
    clean = f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"
    if path.endswith("/"):
        if parts.query:
            raise ConfigError("a query string is only accepted on the URL of a single file")
        return Source(parts.scheme, parts.netloc, path.strip("/"), clean)
    directory, _, name = path.rpartition("/")
    return Source(parts.scheme, parts.netloc, directory.strip("/"), clean, file=name, query=parts.query)


def parse_source(url: str) -> Source:
    """Validate a SOURCE argument; a bad one raises ConfigError with the accepted forms."""
    accepted = "expected gs://BUCKET[/PREFIX], s3://BUCKET[/PREFIX], https://HOST/PATH or file:///DIR"
    if url.startswith("gs://"):
        rest = url[len("gs://") :]
        bucket, _, prefix = rest.partition("/")
        if not _GCS_BUCKET_RE.match(bucket):
            raise ConfigError(f"invalid GCS bucket name {bucket!r} in {url!r}")
        prefix = prefix.strip("/")
        if "//" in prefix or "\0" in prefix:
            raise ConfigError(f"invalid prefix in {url!r}")
        return Source("gs", bucket, prefix, url)
    if url.startswith("file://"):
        path = url[len("file://") :]
        if not path.startswith("/"):
            raise ConfigError(f"file:// source needs an absolute path: {url!r} ({accepted})")
        return Source("file", os.path.normpath(path), "", url)
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not _S3_BUCKET_RE.match(bucket) or ".." in bucket:
            raise ConfigError(f"invalid S3 bucket name {bucket!r} in {url!r}")
        prefix = prefix.strip("/")
        if "//" in prefix or "\0" in prefix:
            raise ConfigError(f"invalid prefix in {url!r}")
        return Source("s3", bucket, prefix, url)
    if url.startswith(("https://", "http://")):
        return _parse_http_source(url)
    raise ConfigError(f"unsupported source {url!r}: {accepted}")


def default_cache_dir(source: Source) -> Path:
    """Per-source cache dir under ``$XDG_CACHE_HOME/modelfs`` so mounts of different sources never share."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(source.url.rstrip("/").encode()).hexdigest()[:16]
    return Path(base) / "modelfs" / digest


def _option(
    parse: Callable[[Any], Any],
    default: Any,
    help: str,
    *,
    short: str | None = None,
    flag: bool = False,
    multiple: bool = False,
    repr: bool = True,
) -> Any:
    """A :class:`Config` field that is an option: its long name is the field's, with dashes."""
    spec = Option("", parse, default, help, short=short, flag=flag, multiple=multiple)
    return dataclasses.field(default=default, repr=repr, metadata={"option": spec})


@dataclass(frozen=True)
class Config:
    """Everything a mount needs, validated. Sizes in bytes, times in seconds.

    Every field after ``mountpoint`` is an option, declared here once with its parser,
    default and help; :data:`OPTIONS` (flags, ``MODELFS_*`` variables, config-file keys) is
    derived from these fields, in this order.
    """

    source: Source
    mountpoint: Path | None
    foreground: bool = _option(
        _parse_bool, False, "stay in the foreground (default: daemonize once mounted)", short="-f", flag=True
    )
    # None in the table: build_config puts the per-source default here.
    cache_dir: Path = _option(_parse_str, None, "disk cache directory (default: ~/.cache/modelfs/<source hash>)")
    # 'auto' in the table: build_config resolves it from the cgroup memory limit.
    memory_cache: int = _option(
        _parse_memory_cache,
        256 << 20,
        "memory budget of every data buffer, e.g. 256M; 'auto': the cgroup memory limit minus the daemon's overhead",
    )
    disk_cache: int = _option(parse_size, 10 << 30, "disk cache size cap, e.g. 10G; 0 disables the disk cache")
    block_size: int = _option(parse_size, 8 << 20, "size of one cached block and of one ranged GET")
    metadata_ttl: float = _option(_parse_float, 60.0, "seconds a listing and attributes stay valid; -1 = never expire")
    metadata_cache: int = _option(
        parse_size, 8 << 20, "memory for cached directory listings and attributes (estimated bytes), e.g. 16M"
    )
    max_prefetch: int = _option(parse_size, 256 << 20, "largest read-ahead window per sequential reader")
    max_concurrency: int = _option(
        _parse_int, 8, "ranged GETs in flight at once, over all files (each beyond 8 adds 128K to the overhead)"
    )
    prefetch_get_size: int = _option(
        parse_size,
        32 << 20,
        "largest ranged GET of sequential read-ahead: it joins neighbouring blocks up to this size (GCS, S3, HTTP); "
        "the block size turns joining off",
    )
    random_read_size: int = _option(
        parse_size, 1 << 20, "GET size for reads that look random (after 2 seeks); 0 = whole blocks"
    )
    eager: bool = _option(
        _parse_bool,
        True,
        "once a reader of a weight file reads at random (two seeks among its last 64 reads), stream all of it "
        "into the disk cache in the background; a reader walking forward is left to read-ahead",
        flag=True,
    )
    eager_model: bool = _option(
        _parse_bool, False, "at mount time, stream every weight file into the disk cache", flag=True
    )
    eager_suffixes: str = _option(
        _parse_suffixes, ".safetensors,.gguf,.bin,.pt,.pth,.onnx", "comma-separated name endings that mark weight files"
    )
    read_ahead_kb: int = _option(_parse_int, 1024, "kernel read-ahead of the mount (root only); 0 leaves it alone")
    retry_deadline: float = _option(_parse_float, 60.0, "seconds a failing read is retried before it fails with EIO")
    read_timeout: float = _option(_parse_float, 30.0, "seconds without a byte before a response counts as stalled")
    anonymous: bool = _option(_parse_bool, False, "use no credentials (public buckets, emulators)", flag=True)
    allow_other: bool = _option(_parse_bool, False, "let users other than the mounting one read the mount", flag=True)
    log_level: str = _option(_parse_log_level, "info", "debug, info, warning or error")
    log_file: Path | None = _option(
        _parse_str, None, "log file of a daemonized mount (default: <cache-dir>/modelfs.log)"
    )
    log_format: str = _option(_parse_log_format, "text", "text (human-readable) or json (one object per line)")
    metrics_addr: str | None = _option(_parse_addr, None, "serve Prometheus metrics on HOST:PORT (default: off)")
    manifest: Path | None = _option(
        _parse_str, None, "http(s) directory URL: a file listing relative paths (optionally 'path size'), one a line"
    )
    ca_cert: Path | None = _option(
        _parse_str, None, "PEM file of extra CA certificates trusted for https:// (and an https S3 endpoint)"
    )
    header: tuple[str, ...] = _option(
        _parse_headers,
        (),
        "http(s): 'Name: value' sent with every request (repeatable; @FILE reads them from FILE); never logged",
        multiple=True,
        repr=False,  # may hold tokens: never shown
    )
    billing_project: str | None = _option(
        _parse_project,
        None,
        "gs: the project billed for the requests (a Requester Pays bucket; sent as userProject)",
    )
    requester_pays: bool = _option(
        _parse_bool,
        False,
        "s3: accept the request charges of a Requester Pays bucket (x-amz-request-payer: requester)",
        flag=True,
    )
    endpoint_url: str | None = _option(
        _parse_endpoint_url, None, "s3: the S3-compatible endpoint, e.g. http://127.0.0.1:9000 (default: AWS)"
    )
    cache_url: tuple[str, ...] = _option(
        _parse_cache_urls,
        (),
        "a shared cache tier replica, http://HOST:PORT, for block reads (repeatable; docs/operations.md)",
        multiple=True,
    )
    persist_weak_versions: bool = _option(
        _parse_bool,
        False,
        "keep disk-cache blocks of weakly versioned files (http(s) without a strong ETag, file://) across "
        "restarts; a replacement with the same size and dates would then read stale",
        flag=True,
    )
    allow_cross_origin_redirects: bool = _option(
        _parse_bool,
        False,
        "http(s): follow a redirect to another host or port (a presigned-URL store), sending it no --header",
        flag=True,
    )


OPTIONS: tuple[Option, ...] = tuple(
    dataclasses.replace(f.metadata["option"], name=f.name.replace("_", "-"))
    for f in dataclasses.fields(Config)
    if "option" in f.metadata
)


def add_options(parser: argparse.ArgumentParser, names: set[str] | None = None) -> None:
    """Add the table's options to a subcommand parser; defaults stay None so precedence can tell."""
    parser.add_argument("--config", metavar="FILE", help="TOML file whose keys are the long option names")
    for opt in OPTIONS:
        if names is not None and opt.name not in names:
            continue
        flags = [f"--{opt.name}"] + ([opt.short] if opt.short else [])
        if opt.flag:
            parser.add_argument(
                *flags, dest=opt.attr, action=argparse.BooleanOptionalAction, default=None, help=opt.help
            )
        elif opt.multiple:
            parser.add_argument(
                *flags, dest=opt.attr, action="append", default=None, metavar=opt.attr.upper(), help=opt.help
            )
        else:
            parser.add_argument(*flags, dest=opt.attr, default=None, metavar=opt.attr.upper(), help=opt.help)


_MAX_CONFIG_FILE = 1 << 20  # a config file is a few lines; /dev/zero is not one


def _read_config_file(path: str) -> Mapping[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_CONFIG_FILE + 1)
        if len(raw) > _MAX_CONFIG_FILE:
            raise ConfigError(f"config file {path} is larger than {_MAX_CONFIG_FILE >> 20} MiB")
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read config file {path}: not UTF-8 text") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except RecursionError:  # (nested deeper than the parser goes)
        raise ConfigError(f"cannot read config file {path}: nested too deeply") from None
    unknown = sorted(set(data) - {opt.name for opt in OPTIONS} - {opt.attr for opt in OPTIONS})
    if unknown:
        raise ConfigError(f"unknown key(s) in {path}: {', '.join(unknown)}")
    return {key.replace("_", "-"): value for key, value in data.items()}


def resolve_options(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """Each option's value by precedence flags > MODELFS_* env > config file > default."""
    config_path = getattr(args, "config", None) or environ.get("MODELFS_CONFIG")
    from_file = _read_config_file(config_path) if config_path else {}
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw: Any = getattr(args, opt.attr, None)
        origin = f"--{opt.name}"
        if raw is None and opt.env in environ:
            raw, origin = environ[opt.env], opt.env
        if raw is None and opt.name in from_file:
            raw, origin = from_file[opt.name], f"{opt.name} in {config_path}"
        if raw is None:
            values[opt.attr] = opt.default
            continue
        try:
            values[opt.attr] = opt.parse(raw)
        except ConfigError as exc:
            hint = ""
            if origin == opt.env and re.search(r"\s#", raw):
                hint = " (systemd's EnvironmentFile keeps a '# comment' after a value in it: put it on its own line)"
            raise ConfigError(f"{origin}: {exc}{hint}") from None
    return values


# Upper bounds: a value past them is a typo or an attack on the daemon, never a tuning.
MAX_CONCURRENCY = 256  # GETs in flight; each holds a block buffer, a connection and maybe a thread
_MAX_TTL = 365 * 24 * 3600.0  # a year; -1 means forever
_MAX_RETRY_DEADLINE = 24 * 3600.0
_MAX_READ_TIMEOUT = 3600.0
_MAX_READ_AHEAD_KB = 1 << 20


def build_config(
    source_url: str, mountpoint: str | None, args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Config:
    """Validate everything a command needs into one frozen Config (raises ConfigError)."""
    environ = os.environ if environ is None else environ
    source = parse_source(source_url)
    values = resolve_options(args, environ)
    if values["block_size"] < 4096 or values["block_size"] > (256 << 20):
        raise ConfigError("--block-size must be between 4K and 256M")
    if values["block_size"] % 4096:  # (whole pages: what a block's buffer takes, and O_DIRECT's unit)
        raise ConfigError("--block-size must be a multiple of 4K")
    if not (4 << 10) <= values["prefetch_get_size"] <= (1 << 30):
        raise ConfigError("--prefetch-get-size must be between 4K and 1G")
    if not 1 <= values["max_concurrency"] <= MAX_CONCURRENCY:
        raise ConfigError(f"--max-concurrency must be between 1 and {MAX_CONCURRENCY}")
    if not (0 <= values["metadata_ttl"] <= _MAX_TTL or values["metadata_ttl"] == -1):
        raise ConfigError(f"--metadata-ttl must be between 0 and {_MAX_TTL:.0f} seconds, or -1 for never")
    if not 0 <= values["retry_deadline"] <= _MAX_RETRY_DEADLINE:
        raise ConfigError(f"--retry-deadline must be between 0 and {_MAX_RETRY_DEADLINE:.0f} seconds")
    if not 0 < values["read_timeout"] <= _MAX_READ_TIMEOUT:
        raise ConfigError(f"--read-timeout must be more than 0 and at most {_MAX_READ_TIMEOUT:.0f} seconds")
    if not 0 <= values["read_ahead_kb"] <= _MAX_READ_AHEAD_KB:
        raise ConfigError(f"--read-ahead-kb must be between 0 and {_MAX_READ_AHEAD_KB}")
    if not (64 << 10) <= values["metadata_cache"] <= (1 << 40):
        raise ConfigError("--metadata-cache must be between 64K and 1T")
    if mountpoint is not None and not mountpoint:
        raise ConfigError("MOUNTPOINT is empty")
    _check_memory(values, mount=mountpoint is not None)
    cache_dir_value = values.pop("cache_dir")
    cache_dir = (Path(cache_dir_value) if cache_dir_value else default_cache_dir(source)).expanduser().absolute()
    log_value = values.pop("log_file")
    log_file = Path(log_value).expanduser().absolute() if log_value else None
    _check_source_options(source, values)
    mount_path = Path(mountpoint).absolute() if mountpoint else None
    if mount_path is not None:
        _check_outside_mountpoint(mount_path, {"--cache-dir": cache_dir, "--log-file": log_file})
        if source.scheme == "file":
            _check_apart_from_source(mount_path, source)
    return Config(source=source, mountpoint=mount_path, cache_dir=cache_dir, log_file=log_file, **values)


def _check_outside_mountpoint(mountpoint: Path, paths: Mapping[str, Path | None]) -> None:
    """The daemon's own files must not be under its mountpoint: the mount would hide them, and
    creating them would make the (empty) mountpoint non-empty before the mount."""
    where = Path(os.path.realpath(mountpoint))
    for option, path in paths.items():
        if path is not None and Path(os.path.realpath(path)).is_relative_to(where):
            raise ConfigError(f"{option} {path} is inside the mountpoint {mountpoint}: put it outside")


def _check_apart_from_source(mountpoint: Path, source: Source) -> None:
    """A mountpoint inside its own file:// source makes the mount list itself without end
    (mnt/mnt/mnt...: a walk, --eager-model or warm never ends); a source inside the mountpoint
    is hidden by the mount, and every listing of it would then ask the mount itself."""
    where = Path(os.path.realpath(mountpoint))
    directory = Path(os.path.realpath(source.bucket))
    if where.is_relative_to(directory):
        raise ConfigError(
            f"MOUNTPOINT {mountpoint} is inside the file:// source {source.bucket}: the mount would "
            "list itself without end; put it outside"
        )
    if directory.is_relative_to(where):
        raise ConfigError(
            f"the file:// source {source.bucket} is inside MOUNTPOINT {mountpoint}: the mount would hide it; "
            "put it outside"
        )


def _check_memory(values: dict[str, Any], *, mount: bool) -> None:
    """--memory-cache: 'auto' resolved from the cgroup limit; the budget must hold two blocks and
    one FUSE read beside a block; a mount must fit in its cgroup's memory limit with the
    daemon's fixed overhead (see modelfs.memlimit)."""
    from modelfs.memlimit import (
        CONCURRENCY_INCLUDED,
        DISK_BLOCKS_INCLUDED,
        MAX_REQUEST,
        auto_budget,
        cgroup_memory_limit,
        describe,
        overhead,
    )

    block = values["block_size"]
    least = max(2 * block, block + MAX_REQUEST)
    limit = cgroup_memory_limit()
    disk_blocks = values["disk_cache"] // block  # the disk index's entries at most
    if values["memory_cache"] == _AUTO:
        if limit is None:
            raise ConfigError("--memory-cache auto needs a cgroup memory limit, and this process has none")
        values["memory_cache"] = auto_budget(
            limit, block, values["metadata_cache"], disk_blocks, max_concurrency=values["max_concurrency"]
        )
        if values["memory_cache"] < least:
            raise ConfigError(
                f"--memory-cache auto: the cgroup memory limit {describe(limit)} leaves "
                f"{describe(values['memory_cache'])} after the daemon's overhead, less than the "
                f"{describe(least)} a --block-size of {describe(block)} needs"
            )
    if values["memory_cache"] < least:
        raise ConfigError(
            f"--memory-cache must hold two blocks and a 1M read beside a block: at least {describe(least)} "
            f"with --block-size {describe(block)}"
        )
    extra = overhead(values["metadata_cache"], disk_blocks, values["memory_cache"] // block, values["max_concurrency"])
    if mount and limit is not None and values["memory_cache"] + extra > limit:
        parts, hints = "", []
        if disk_blocks > DISK_BLOCKS_INCLUDED:
            parts += " and the disk cache's index of its blocks"
            hints.append(" a larger --block-size, or a smaller --disk-cache")
        if values["max_concurrency"] > CONCURRENCY_INCLUDED:  # each GET in flight: a thread, a connection
            parts += f" with {values['max_concurrency']} GETs in flight"
            hints.append(" a smaller --max-concurrency")
        raise ConfigError(
            f"--memory-cache {describe(values['memory_cache'])} plus the daemon's overhead{parts} "
            f"({describe(extra)}) exceeds the cgroup memory limit {describe(limit)}: "
            f"use --memory-cache auto or at most {describe(max(0, limit - extra))}"
            + (f" (or{', or'.join(hints)})" if hints else "")
        )


def _check_source_options(source: Source, values: dict[str, Any]) -> None:
    """Options that only some sources take; file paths become absolute Paths that exist."""
    http = source.scheme in ("http", "https")
    if values["manifest"] is not None:
        if not http or source.file:
            raise ConfigError("--manifest needs an http(s):// SOURCE that ends in '/'")
        values["manifest"] = Path(values["manifest"]).expanduser().absolute()
        if not values["manifest"].is_file():
            raise ConfigError(f"--manifest: no such file: {values['manifest']}")
    if values["ca_cert"] is not None:
        if not http and source.scheme != "s3":
            raise ConfigError("--ca-cert applies to https:// and s3:// sources")
        values["ca_cert"] = Path(values["ca_cert"]).expanduser().absolute()
        if not values["ca_cert"].is_file():
            raise ConfigError(f"--ca-cert: no such file: {values['ca_cert']}")
    if values["header"] and not http:
        raise ConfigError("--header applies to http(s):// sources")
    if values["billing_project"] is not None and source.scheme != "gs":
        raise ConfigError("--billing-project applies to gs:// sources")
    if values["requester_pays"] and source.scheme != "s3":
        raise ConfigError("--requester-pays applies to s3:// sources")
    if values["endpoint_url"] is not None and source.scheme != "s3":
        raise ConfigError("--endpoint-url applies to s3:// sources")
    if values["cache_url"] and source.scheme == "file":
        raise ConfigError("--cache-url applies to gs://, s3:// and http(s):// sources")
