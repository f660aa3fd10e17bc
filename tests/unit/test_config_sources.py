"""Config for http(s):// and s3:// sources: SOURCE forms, --manifest, --ca-cert, --header
(repeatable, flags > env > file > default), --endpoint-url; header values never in messages."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from modelfs.config import Source, add_options, build_config, default_cache_dir, parse_source
from modelfs.errors import ConfigError

SECRET = "s3cr3t-value"


def config(source: str, *argv: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    add_options(parser)
    return build_config(source, None, parser.parse_args(list(argv)), environ=env or {})


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket", Source("s3", "bucket", "", "s3://bucket")),
        ("s3://my.bucket/models/llama/", Source("s3", "my.bucket", "models/llama", "s3://my.bucket/models/llama/")),
        (
            "https://host/models/m.safetensors",
            Source("https", "host", "models", "https://host/models/m.safetensors", file="m.safetensors"),
        ),
        (
            "http://127.0.0.1:8080/m.bin",
            Source("http", "127.0.0.1:8080", "", "http://127.0.0.1:8080/m.bin", file="m.bin"),
        ),
        ("https://host/models/", Source("https", "host", "models", "https://host/models/")),
        ("https://host", Source("https", "host", "", "https://host/")),
        (
            "https://host/a%20b/c%2Bd.bin",
            Source("https", "host", "a b", "https://host/a%20b/c%2Bd.bin", file="c+d.bin"),
        ),
    ],
)
def test_sources(url: str, expected: Source) -> None:
    assert parse_source(url) == expected


def test_query_is_kept_but_never_shown() -> None:
    source = parse_source(f"https://host/m.bin?X-Amz-Signature={SECRET}")
    assert source.query == f"X-Amz-Signature={SECRET}"
    assert SECRET not in source.url
    assert SECRET not in repr(source)
    # Two signatures of one object share one cache.
    assert default_cache_dir(source) == default_cache_dir(parse_source("https://host/m.bin?other=1"))


def test_object_keys_differ_by_scheme_host_and_path() -> None:
    keys = {
        parse_source("https://h/models/m.bin").object_key("m.bin"),
        parse_source("http://h/models/m.bin").object_key("m.bin"),
        parse_source("https://h2/models/m.bin").object_key("m.bin"),
        parse_source("https://h/other/m.bin").object_key("m.bin"),
        parse_source("s3://hhh/models").object_key("m.bin"),
    }
    assert len(keys) == 5
    assert parse_source("https://h/models/m.bin").object_key("m.bin") == "https://h/models/m.bin"


def test_header_repeatable_and_precedence(tmp_path: Path) -> None:
    src = "https://host/models/"
    assert config(src).header == ()
    cfg = config(src, "--header", "Authorization: Bearer abc", "--header", "X-Extra:  1 ")
    assert cfg.header == ("Authorization: Bearer abc", "X-Extra: 1")
    env = {"MODELFS_HEADER": "X-From-Env: e\nX-Two: 2"}
    assert config(src, env=env).header == ("X-From-Env: e", "X-Two: 2")
    assert config(src, "--header", "X-Flag: f", env=env).header == ("X-Flag: f",)  # flags win
    toml = tmp_path / "c.toml"
    toml.write_text('header = ["X-File: 1", "X-File2: 2"]\n')
    assert config(src, "--config", str(toml)).header == ("X-File: 1", "X-File2: 2")
    assert config(src, "--config", str(toml), env=env).header == ("X-From-Env: e", "X-Two: 2")  # env beats file


def test_header_from_file_and_hidden_in_repr(tmp_path: Path) -> None:
    headers = tmp_path / "headers"
    headers.write_text(f"# token\nAuthorization: Bearer {SECRET}\n\nX-A: b\n")
    cfg = config("https://host/m.bin", "--header", f"@{headers}")
    assert cfg.header == (f"Authorization: Bearer {SECRET}", "X-A: b")
    assert SECRET not in repr(cfg)


@pytest.mark.parametrize(
    "bad", [f"Authorization {SECRET}", f"Bad Name: {SECRET}", f"Range: {SECRET}", f"If-Match: {SECRET}"]
)
def test_bad_header_messages_never_echo_the_value(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        config("https://host/m.bin", "--header", bad)
    assert SECRET not in str(info.value)


def test_options_that_need_their_source(tmp_path: Path) -> None:
    manifest = tmp_path / "files.txt"
    manifest.write_text("a.bin\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    cfg = config("https://host/models/", "--manifest", str(manifest), "--ca-cert", str(ca))
    assert cfg.manifest == manifest and cfg.ca_cert == ca
    assert config("s3://bucket/p", "--endpoint-url", "http://127.0.0.1:9000/").endpoint_url == "http://127.0.0.1:9000"
    assert config("s3://bucket/p", "--ca-cert", str(ca)).ca_cert == ca
    bad = [
        ("https://host/models/m.bin", ["--manifest", str(manifest)]),  # a single-file URL
        ("gs://bucket/p", ["--manifest", str(manifest)]),
        ("https://host/models/", ["--manifest", str(tmp_path / "missing.txt")]),
        ("https://host/models/", ["--ca-cert", str(tmp_path / "missing.pem")]),
        ("gs://bucket/p", ["--ca-cert", str(ca)]),
        ("s3://bucket/p", ["--header", "X-A: b"]),
        ("https://host/m.bin", ["--endpoint-url", "http://127.0.0.1:9000"]),
        ("s3://bucket/p", ["--endpoint-url", "127.0.0.1:9000"]),  # no scheme
    ]
    for source, argv in bad:
        with pytest.raises(ConfigError):
            config(source, *argv)
