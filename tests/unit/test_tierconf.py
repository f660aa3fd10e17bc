"""``python -m modelfs.tierconf``: the settings it takes, the ones it refuses (one line on
stderr, exit 2) and what it renders from them."""

from __future__ import annotations

import pytest

from modelfs.tierconf.__main__ import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "", (argv, code, out[:200])
    assert err.startswith("modelfs.tierconf: ") and err.count("\n") == 1, (argv, err)
    return err


def test_origin_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    """--origin (required for s3://) is passed once, not again among the other settings."""
    code, out, err = run(
        capsys, "nginx", "--source", "s3://my-bucket", "--origin", "https://s3.us-east-1.amazonaws.com"
    )
    assert code == 0, err
    assert "server s3.us-east-1.amazonaws.com:443;" in out and "location ~ ^(/my\\-bucket/)" in out
    assert 'js_var $tier_auth "aws-sigv4";' in out
    code, out, err = run(
        capsys, "kubernetes", "--source", "https://models.example.com/llama/", "--origin", "https://10.0.0.5:8443"
    )
    assert code == 0, err
    assert "server 10.0.0.5:8443;" in out and "proxy_set_header Host 10.0.0.5:8443;" in out


@pytest.mark.parametrize(
    "argv",
    [
        ("nginx", "--source", "https://[::1/x/"),
        ("nginx", "--source", "https://host:99999/x/"),
        ("nginx", "--source", "https://host:port/x/"),
        ("nginx", "--source", "gs://b", "--origin", "https://[::1"),
        ("nginx", "--source", "gs://b", "--origin", "https://host:70000"),
        ("nginx", "--source", "gs://b", "--origin", "https://user:pw@host"),
        ("nginx", "--source", "s3://b"),
    ],
)
def test_a_malformed_url_is_one_line(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    refused(capsys, *argv)


@pytest.mark.parametrize(
    ("source", "uri_re", "raw_re"),
    [
        ("https://h/my%20models/m.bin", r"/my\x20models/", r"/my\x2520models/"),
        ("https://h/my models/", r"/my\x20models/", r"/my\x2520models/"),  # encoded as the nodes send it
        ("https://h/a%2Fb//c/", r"/a/b/c/", r"/a\x252Fb//c/"),  # nginx decodes %2F and merges slashes
        ("https://h/m%C3%BC(1)$/", r"/m\xc3\xbc\x281\x29\x24/", r"/m\x25C3\x25BC\x281\x29\x24/"),
        ("gs://my-bucket.x", r"/download/storage/v1/b/my\-bucket\.x/o/|", None),
    ],
)
def test_location_matches_the_decoded_path(source: str, uri_re: str, raw_re: str | None) -> None:
    """``location`` matches nginx's ``$uri`` (decoded, slashes merged); the raw-path check
    ``$request_uri`` (what the origin gets) the path as the nodes send it."""
    from modelfs.tierconf import render_nginx, settings_for_source

    conf = render_nginx(settings_for_source(source))
    assert conf.count(f"location ~ ^({uri_re}") == 2, conf
    if raw_re is not None:
        assert f'if ($request_uri !~ "^({raw_re})")' in conf


@pytest.mark.parametrize(
    "source", ["https://h/a/../b/", "https://h/a/%2e%2E/b/x", "https://h/./b/", "https://h/a%0Ab/"]
)
def test_a_directory_the_tier_would_refuse_is_refused_here(capsys: pytest.CaptureFixture[str], source: str) -> None:
    refused(capsys, "nginx", "--source", source)
