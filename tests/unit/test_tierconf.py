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
