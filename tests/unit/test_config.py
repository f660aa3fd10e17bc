"""Config: sizes, sources, precedence flags > env > file > default, file keys, validation."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from modelfs.config import OPTIONS, Config, add_options, build_config, default_cache_dir, parse_size, parse_source
from modelfs.errors import ConfigError

SRC = "gs://my-bucket/models/llama"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser)
    return parser.parse_args(list(argv))


def config(*argv: str, env: dict[str, str] | None = None, source: str = SRC) -> Config:
    return build_config(source, None, parse(*argv), environ=env or {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8M", 8 << 20),
        ("1G", 1 << 30),
        ("512K", 512 << 10),
        ("100", 100),
        ("0", 0),
        ("8m", 8 << 20),
        ("8MiB", 8 << 20),
        ("8MB", 8 << 20),
        (" 2T ", 2 << 40),
        ("1.5G", 3 << 29),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    """Suffixes are powers of 1024, case-insensitive, with optional B/iB; ints pass through."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "8X", "-1", "M", "8 M B x", "1e3", -1, True])
def test_parse_size_rejects_bad_input(text: object) -> None:
    """Anything that is not a non-negative size is a ConfigError."""
    with pytest.raises(ConfigError):
        parse_size(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("gs://my-bucket/models/llama", "my-bucket", "models/llama"),
        ("gs://my-bucket/models/llama/", "my-bucket", "models/llama"),
        ("gs://my-bucket/models/llama///", "my-bucket", "models/llama"),
        ("gs://my-bucket", "my-bucket", ""),
        ("gs://my-bucket/", "my-bucket", ""),
        ("gs://my.bucket_1/x", "my.bucket_1", "x"),
    ],
)
def test_parse_source_gs(url: str, bucket: str, prefix: str) -> None:
    """gs:// URLs split into bucket and a prefix without leading or trailing slashes."""
    source = parse_source(url)
    assert (source.scheme, source.bucket, source.prefix, source.url) == ("gs", bucket, prefix, url)


def test_parse_source_file_and_object_key() -> None:
    """file:// takes an absolute path (normalized); object keys name scheme, bucket and prefix."""
    source = parse_source("file:///data/models/")
    assert (source.scheme, source.bucket, source.prefix) == ("file", "/data/models", "")
    assert parse_source("gs://b-1/p/q/").object_key("a/b.bin") == "gs://b-1/p/q/a/b.bin"
    assert parse_source("gs://b-1").object_key("a.bin") == "gs://b-1/a.bin"


@pytest.mark.parametrize(
    "url",
    [
        "gs://Bad_Bucket/x",  # upper case
        "gs://ab",  # too short
        "gs://",  # no bucket
        "gs://-bucket/x",  # must start with a letter or digit
        "gs://bucket-/x",
        "gs://my-bucket/a//b",  # empty prefix component
        "s3://ab/prefix",  # S3 bucket too short
        "s3://bucket/a//b",
        "https://",  # no host
        "https://user:secret@host/m.bin",  # credentials in the URL would be logged
        "https://host/a/../m.bin",
        "https://host/models/?sig=x",  # a query string only on a single-file URL
        "ftp://host/m.bin",
        "bucket/prefix",
        "file://relative/dir",
        "file://",
    ],
)
def test_parse_source_rejects(url: str) -> None:
    """Bad bucket names, unsupported schemes and relative file paths are ConfigErrors."""
    with pytest.raises(ConfigError):
        parse_source(url)


def test_defaults() -> None:
    """With no flags, env or file, every option has its table default."""
    cfg = config("--cache-dir", "/tmp/c")
    for opt in OPTIONS:
        if opt.attr not in ("cache_dir", "log_file"):
            assert getattr(cfg, opt.attr) == opt.default, opt.name
    assert cfg.memory_cache == 256 << 20 and cfg.block_size == 8 << 20
    assert cfg.cache_dir == Path("/tmp/c")
    assert cfg.source.bucket == "my-bucket"


def test_default_cache_dir_is_per_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without --cache-dir, each source gets its own dir under $XDG_CACHE_HOME/modelfs."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = config()
    b = config(source="gs://other-bucket/x")
    assert a.cache_dir.parent == tmp_path / "modelfs"
    assert a.cache_dir != b.cache_dir
    assert a.cache_dir == default_cache_dir(parse_source(SRC + "/"))  # a trailing '/' is the same source


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "modelfs.toml"
    path.write_text(text)
    return str(path)


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    """Each layer overrides the ones below it, option by option."""
    cfg_file = write_toml(tmp_path, 'memory-cache = "64M"\nblock-size = "1M"\nmax-concurrency = 3\nmetadata-ttl = 5\n')
    env = {"MODELFS_MEMORY_CACHE": "128M", "MODELFS_BLOCK_SIZE": "2M"}
    cfg = config("--config", cfg_file, "--memory-cache", "512M", env=env)
    assert cfg.memory_cache == 512 << 20  # flag beats env and file
    assert cfg.block_size == 2 << 20  # env beats file
    assert cfg.max_concurrency == 3  # file beats default
    assert cfg.metadata_ttl == 5.0
    assert cfg.retry_deadline == 60.0  # default
    # Take the flag away: env wins; take env away: file wins.
    assert config("--config", cfg_file, env=env).memory_cache == 128 << 20
    assert config("--config", cfg_file).memory_cache == 64 << 20
    assert config().memory_cache == 256 << 20


def test_config_file_from_env_and_underscore_keys(tmp_path: Path) -> None:
    """MODELFS_CONFIG names the file; keys may use '_' as well as '-'."""
    cfg_file = write_toml(tmp_path, "max_concurrency = 5\nanonymous = true\n")
    cfg = config(env={"MODELFS_CONFIG": cfg_file})
    assert cfg.max_concurrency == 5 and cfg.anonymous is True


def test_boolean_flags_beat_env(tmp_path: Path) -> None:
    """--no-X overrides MODELFS_X=true; env booleans accept 1/yes/true."""
    env = {"MODELFS_ANONYMOUS": "true", "MODELFS_FOREGROUND": "1"}
    cfg = config("--no-anonymous", env=env)
    assert cfg.anonymous is False and cfg.foreground is True
    assert config("-f").foreground is True
    with pytest.raises(ConfigError, match="MODELFS_ALLOW_OTHER"):
        config(env={"MODELFS_ALLOW_OTHER": "maybe"})


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    """A typo in the config file is reported, not ignored."""
    cfg_file = write_toml(tmp_path, 'memory-cach = "64M"\n')
    with pytest.raises(ConfigError, match="memory-cach"):
        config("--config", cfg_file)


def test_bad_file_and_bad_values_name_their_origin(tmp_path: Path) -> None:
    """Missing/invalid files and bad values fail with a message naming where the value came from."""
    with pytest.raises(ConfigError, match="not found"):
        config("--config", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="cannot read"):
        config("--config", write_toml(tmp_path, "memory-cache = \n"))
    with pytest.raises(ConfigError, match="in "):
        config("--config", write_toml(tmp_path, 'memory-cache = "lots"\n'))
    with pytest.raises(ConfigError, match="MODELFS_MAX_CONCURRENCY"):
        config(env={"MODELFS_MAX_CONCURRENCY": "many"})
    with pytest.raises(ConfigError, match="--log-level"):
        config("--log-level", "loud")


@pytest.mark.parametrize(
    "argv",
    [
        ("--memory-cache", "8M", "--block-size", "8M"),  # fewer than two blocks
        ("--memory-cache", "15M", "--block-size", "8M"),
        ("--block-size", "1K"),
        ("--block-size", "512M", "--memory-cache", "2G"),
        ("--max-concurrency", "0"),
        ("--metadata-ttl", "-2"),
        ("--retry-deadline", "-1"),
        ("--read-timeout", "0"),
    ],
)
def test_validation_errors(argv: tuple[str, ...]) -> None:
    """Values that cannot work are refused before anything is built."""
    with pytest.raises(ConfigError):
        config(*argv)


def test_validation_accepts_edges() -> None:
    """Exactly two blocks of memory and a TTL of -1 (never) are valid."""
    cfg = config("--memory-cache", "16M", "--block-size", "8M", "--metadata-ttl", "-1")
    assert cfg.memory_cache == 2 * cfg.block_size and cfg.metadata_ttl == -1


def test_mountpoint_and_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative mountpoint, cache dir and log file become absolute paths."""
    monkeypatch.chdir(tmp_path)
    cfg = build_config(SRC, "mnt", parse("--cache-dir", "c", "--log-file", "l.log"), environ={})
    assert cfg.mountpoint == tmp_path / "mnt"
    assert cfg.cache_dir == tmp_path / "c"
    assert cfg.log_file == tmp_path / "l.log"
    assert dataclasses.replace(cfg, max_concurrency=2).max_concurrency == 2


def test_an_empty_mountpoint_and_port_0_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="MOUNTPOINT is empty"):
        build_config(SRC, "", parse(), environ={})
    with pytest.raises(ConfigError, match="port 0"):
        config(source="https://127.0.0.1:0/models/")


@pytest.mark.parametrize(
    ("content", "why"), [(b"\xff\xfememory-cache = 1", "not UTF-8 text"), (None, "larger than 1 MiB")]
)
def test_a_config_file_that_is_not_text_or_too_large_is_refused(
    tmp_path: Path, content: bytes | None, why: str
) -> None:
    path = "/dev/zero" if content is None else str(tmp_path / "c.toml")  # /dev/zero: never ends
    if content is not None:
        Path(path).write_bytes(content)
    with pytest.raises(ConfigError, match=why):
        config("--config", path)


def test_suffixes_that_are_not_strings_are_a_config_error(tmp_path: Path) -> None:
    """``eager-suffixes = [1, 2]`` in a config file ended in an AttributeError traceback."""
    with pytest.raises(ConfigError, match="suffixes must be strings"):
        config("--config", write_toml(tmp_path, "eager-suffixes = [1, 2]\n"))
    good = write_toml(tmp_path, 'eager-suffixes = [".safetensors", " .bin "]\n')
    assert config("--config", good).eager_suffixes == ".safetensors,.bin"


def test_the_daemons_files_must_not_be_under_its_mountpoint(tmp_path: Path) -> None:
    """A --cache-dir in the (empty) mountpoint was created there first, and the mount then
    failed with "mountpoint ... is not empty", the next mount too."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    src = f"file://{tmp_path / 'src'}"
    for option in ("--cache-dir", "--log-file"):
        with pytest.raises(ConfigError, match=f"{option} .* is inside the mountpoint"):
            build_config(src, str(mnt), parse(option, str(mnt / "cache" / "x.log")), {})
        with pytest.raises(ConfigError, match="inside the mountpoint"):
            build_config(src, str(mnt), parse(option, str(mnt)), {})
    assert not any(mnt.iterdir())
    fine = build_config(src, str(mnt), parse("--cache-dir", str(tmp_path / "mnt-cache")), {})
    assert fine.cache_dir == tmp_path / "mnt-cache"


def test_a_mountpoint_inside_its_own_file_source_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mount file://SRC SRC/mnt`` was accepted: the mount listed itself without end
    (mnt/mnt/mnt...) and --eager-model walked it for ever at 100% CPU. A source inside the
    mountpoint (hidden by the mount) is refused too, through a symlink or a relative path as well."""
    src = tmp_path / "src"
    (src / "mnt").mkdir(parents=True)
    (tmp_path / "link").symlink_to(src)
    monkeypatch.chdir(tmp_path)
    for mountpoint in (str(src / "mnt"), str(src), "src/mnt", str(tmp_path / "link" / "mnt")):
        with pytest.raises(ConfigError, match=r"^MOUNTPOINT .* is inside the file:// source .*: the mount would list"):
            build_config(f"file://{src}", mountpoint, parse(), {})
    for mountpoint in (str(tmp_path), "link/.."):
        with pytest.raises(ConfigError, match=r"^the file:// source .* is inside MOUNTPOINT"):
            build_config(f"file://{src / 'mnt'}", mountpoint, parse(), {})
    (tmp_path / "mnt").mkdir()
    beside = build_config(f"file://{src}", str(tmp_path / "mnt"), parse(), {})
    assert beside.mountpoint == tmp_path / "mnt"
    # (Not a prefix test on strings: /x/src-mnt is not inside /x/src.)
    assert build_config(f"file://{src}", str(tmp_path / "src-mnt"), parse(), {}).mountpoint == tmp_path / "src-mnt"
    # Another scheme's "bucket" is no directory of this machine.
    assert build_config("gs://tmp", str(tmp_path / "mnt"), parse(), {}).mountpoint == tmp_path / "mnt"


def test_log_file_expands_a_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``log-file = "~/modelfs.log"`` became ``<cwd>/~/modelfs.log`` (a directory named ``~``),
    while every other path option expanded ``~``."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = build_config(SRC, None, parse(), environ={"MODELFS_LOG_FILE": "~/logs/modelfs.log"})
    assert cfg.log_file == tmp_path / "home" / "logs" / "modelfs.log"
    assert config("--log-file", "~/m.log").log_file == tmp_path / "home" / "m.log"


def test_an_inline_comment_in_an_environment_value_is_named() -> None:
    """systemd's EnvironmentFile keeps ``256M  # comment`` whole: the error says why it failed."""
    with pytest.raises(ConfigError, match=r"^MODELFS_MEMORY_CACHE: not a size: .*put it on its own line\)$"):
        config(env={"MODELFS_MEMORY_CACHE": "256M          # the budget"})
    with pytest.raises(ConfigError) as plain:
        config(env={"MODELFS_MEMORY_CACHE": "lots"})
    assert "comment" not in str(plain.value)
