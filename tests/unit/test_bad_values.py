"""Hostile or mistyped option values: one line on stderr and exit 2, never a traceback or a
silently truncated value (issue 13, "Inputs")."""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import pytest

from modelfs.cli import main
from modelfs.config import MAX_CONCURRENCY, add_options, build_config, parse_size
from modelfs.errors import ConfigError

SRC = "gs://my-bucket/models"


def _exit_2_one_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["mount", SRC, "/nonexistent-mnt", *argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelfs: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ("--memory-cache", "1" * 400),  # float() of it is inf, int(inf) an OverflowError
        ("--disk-cache", "1" * 400 + "G"),
        ("--disk-cache", "0.9"),  # would be 0 bytes: the disk cache silently off
        ("--block-size", "4096.5"),
        ("--max-prefetch", "2E"),
        ("--metadata-ttl", "nan"),
        ("--metadata-ttl", "inf"),
        ("--retry-deadline", "nan"),
        ("--read-timeout", "inf"),
        ("--read-timeout=-inf",),
        ("--retry-deadline", "1" * 400),
        ("--max-concurrency", "1000000"),
        ("--max-concurrency", "1" * 400),
        ("--max-concurrency", "8.0"),
        ("--read-ahead-kb", "99999999999"),
        ("--metadata-ttl", "1e300"),
    ],
)
def test_bad_flag_values(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    line = _exit_2_one_line(capsys, *argv)
    assert argv[0].split("=")[0] in line
    assert len(line) < 300  # a 400-digit value is not echoed whole


@pytest.mark.parametrize(
    "toml",
    [
        "max-concurrency = 8.5",  # a float where an integer belongs: refused, not truncated to 8
        "max-concurrency = 8.0",
        "max-concurrency = true",  # int(True) would be 1
        "block-size = 8388608.0",
        "disk-cache = 0.9",
        "memory-cache = true",
        "metadata-ttl = nan",
        "retry-deadline = inf",
        "read-timeout = true",
        "cache-dir = 5",
        'log-file = ["a", "b"]',
        'cache-dir = "a\\u0000b"',
        "memory-cache = " + "9" * 30,  # TOML refuses integers past 64 bits itself
    ],
)
def test_bad_config_file_values(toml: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    line = _exit_2_one_line(capsys, "--config", str(path))
    assert str(path) in line


@pytest.mark.parametrize(
    "env",
    [
        {"MODELFS_DISK_CACHE": "0.9"},
        {"MODELFS_METADATA_TTL": "NaN"},
        {"MODELFS_MAX_CONCURRENCY": "1000000"},
    ],
)
def test_bad_environment_values(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _exit_2_one_line(capsys)


def test_edges_still_accepted() -> None:
    """Whole-byte fractions and the largest allowed concurrency still parse."""
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("0.5K") == 512
    assert parse_size("1.0") == 1
    with pytest.raises(ConfigError):
        parse_size(0.5)  # type: ignore[arg-type]
    parser = argparse.ArgumentParser()
    add_options(parser)
    ns = parser.parse_args(["--max-concurrency", str(MAX_CONCURRENCY), "--metadata-ttl", "-1"])
    assert build_config(SRC, None, ns, environ={}).max_concurrency == MAX_CONCURRENCY


@pytest.mark.parametrize(
    "value", ["abc\x0bSECRET-VALUE", "SECRET-VALUE\x7f", "caf\u00e9 SECRET-VALUE", "\x1b[2J SECRET-VALUE"]
)
def test_header_value_never_echoed(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An illegal byte in a header value is refused by name; h11 would quote the value."""
    assert main(["mount", "https://host/m.bin", "/nonexistent-mnt", "--header", f"X-Api-Key: {value}"]) == 2
    err = capsys.readouterr().err
    assert "SECRET-VALUE" not in err and "X-Api-Key" in err
    assert len(err.strip().splitlines()) == 1


def test_hidden_argv_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ps shows has no secret; the process gets the real argv back from its environment."""
    from modelfs import cli

    argv = [
        "mount",
        "https://h/m.bin?sig=SECRET",
        "/mnt",
        "--header",
        "A: SECRET",
        "--head=B: SECRET",
        "--header",
        "@/f",
    ]
    shown = cli._without_secrets(argv, cli._source_of(argv))
    assert not any("SECRET" in a for a in shown)
    assert shown == [
        "mount",
        "https://h/m.bin?<hidden>",
        "/mnt",
        "--header",
        "<hidden>",
        "--head=<hidden>",
        "--header",
        "@/f",
    ]
    monkeypatch.setenv(cli._ARGV_ENV, json.dumps(argv))
    assert cli._restore_argv(shown) == argv
    assert cli._ARGV_ENV not in os.environ  # not passed on to anything the daemon starts
    monkeypatch.setenv(cli._ARGV_ENV, json.dumps(argv))
    assert cli._restore_argv(["mount", "gs://other/x", "/mnt"]) == ["mount", "gs://other/x", "/mnt"]


def test_a_start_error_naming_undecodable_bytes_reaches_the_waiting_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon child says why it failed on the ready pipe: an error that names a path of
    non-UTF-8 bytes (surrogate-escaped in Python) still gets there, escaped, as one line."""
    import types

    import modelfs.cli as cli
    import modelfs.mount
    from modelfs.errors import MountError

    async def fails(config: object, ready: object, early_signals: object) -> None:
        raise MountError("cannot mount on /mnt/caf\udce9: no such directory")

    monkeypatch.setattr(modelfs.mount, "serve", fails)
    read_fd, write_fd = os.pipe()
    monkeypatch.setenv(cli._READY_FD_ENV, str(write_fd))
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        with pytest.raises(MountError):
            cli._mount_foreground(types.SimpleNamespace(mountpoint=Path("/mnt/x")), [])  # type: ignore[arg-type]
    finally:  # (once done it ignores these signals, as the daemon's last act)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        said = pipe.read()
    assert said.count(b"\n") == 1 and said.startswith(b"error: cannot mount on /mnt/caf")
    assert b"\\udce9" in said or b"\\xe9" in said


def test_a_config_file_nested_past_the_parser_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("header = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert "nested too deeply" in _exit_2_one_line(capsys, "--config", str(path))


@pytest.mark.parametrize("content", [b"Authorization: Bearer \xff\xfe\n", None])
def test_a_header_file_that_is_not_text_is_one_line(
    content: bytes | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not UTF-8 (a traceback before), or endless (/dev/zero: read without a bound before)."""
    path = tmp_path / "h.txt"
    if content is None:
        path = Path("/dev/zero")
    else:
        path.write_bytes(content)
    line = _exit_2_one_line(capsys, "--header", f"@{path}")
    assert "header file" in line and "\xff" not in line


@pytest.mark.parametrize(
    ("source", "env", "expected"),
    [
        ("s3://bkt/m", {"AWS_PROFILE": "no-such-profile"}, "ProfileNotFound"),
        ("s3://bkt/m", {"AWS_DEFAULT_REGION": "bad region!"}, "region"),
        ("gs://bkt/m", {"STORAGE_EMULATOR_HOST": "localhost:notaport"}, "cannot use gs://bkt/m"),
        ("gs://bkt/m", {"GOOGLE_APPLICATION_CREDENTIALS": "/"}, "is not a file"),
        ("gs://bkt/m", {"GOOGLE_APPLICATION_CREDENTIALS": "/dev/zero"}, "is not a file"),
        ("gs://bkt/m", {"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json"}, "No such file"),
    ],
)
def test_a_client_library_refusing_its_setup_is_one_line(
    source: str, env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An unknown AWS profile, a bad region or emulator address, a credentials file that is a
    directory or /dev/zero: a ConfigError line naming it (before: the library's traceback,
    or google-auth reading /dev/zero until memory ran out)."""
    from modelfs.backends import open_backend

    for name in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_options(parser)
    args = parser.parse_args(["--endpoint-url", "http://127.0.0.1:9"] if source.startswith("s3") else [])
    config = build_config(source, None, args, environ={})
    with pytest.raises(ConfigError) as raised:
        open_backend(config)
    assert expected in str(raised.value) and "\n" not in str(raised.value)
