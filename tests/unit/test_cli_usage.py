"""The command's process: usage errors are one line ``modelfs: ...`` on stderr and exit 2, like
every other error (README, docs/configuration.md), while ``--help`` still prints the whole
usage; and a serving process leaves its working directory without losing a relative path."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfs import cli


@pytest.mark.parametrize(
    ("argv", "message", "command"),
    [
        (["mount", "file:///tmp"], "the following arguments are required: MOUNTPOINT", "modelfs mount"),
        ([], "the following arguments are required: COMMAND", "modelfs"),
        (["bogus"], "argument COMMAND: invalid choice: 'bogus'", "modelfs"),
        (["mount", "a", "b", "--memory-cachee", "1"], "unrecognized arguments: --memory-cachee 1", "modelfs mount"),
        (["stats", "/x", "--jsn"], "unrecognized arguments: --jsn", "modelfs stats"),
        (["warm"], "the following arguments are required: SOURCE", "modelfs warm"),
        (["mount", "a", "b", "--foreground=x"], "argument --foreground", "modelfs mount"),
        (["unmount", "a", "b\x1b[2J"], "unrecognized arguments: b\\x1b[2J", "modelfs unmount"),
    ],
)
def test_a_usage_error_is_one_line_and_exit_2(
    argv: list[str], message: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 27-line usage block came first, then ``modelfs mount: error: ...``."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"modelfs: {message}"), err
    assert err.endswith(f" (see {command} --help)\n"), err
    assert "usage:" not in err


def test_help_still_prints_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["mount", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: modelfs mount [-h]") and "--memory-cache" in out and "MOUNTPOINT" in out


def test_leaving_the_working_directory_keeps_relative_paths_of_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The serving process chdirs to /; a credentials file the client libraries read later by
    a relative path in the environment must still be the one meant."""
    import os

    monkeypatch.chdir(tmp_path)  # (restored after the test)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "keys/sa.json")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token")
    monkeypatch.setenv("SSL_CERT_DIR", "certs")
    cli._leave_working_directory()
    assert os.getcwd() == "/"
    assert os.environ["GOOGLE_APPLICATION_CREDENTIALS"] == str(tmp_path / "keys" / "sa.json")
    assert os.environ["AWS_WEB_IDENTITY_TOKEN_FILE"] == "/var/run/token"
    assert os.environ["SSL_CERT_DIR"] == str(tmp_path / "certs")


def test_a_relative_xdg_cache_home_gives_an_absolute_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from modelfs.config import add_options, build_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", "xdg")
    parser = argparse.ArgumentParser()
    add_options(parser)
    config = build_config("gs://bkt/m", None, parser.parse_args([]), environ={})
    assert config.cache_dir.is_absolute() and config.cache_dir.is_relative_to(tmp_path / "xdg" / "modelfs")
