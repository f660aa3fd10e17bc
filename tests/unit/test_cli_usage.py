"""Usage errors are one line ``modelfs: ...`` on stderr and exit 2, like every other error
(README, docs/configuration.md); ``--help`` still prints the whole usage."""

from __future__ import annotations

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
