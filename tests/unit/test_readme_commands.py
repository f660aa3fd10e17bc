"""The README's two commands: what they are, that CI runs the second, and that the scripts
behind them are plain POSIX sh (a bare Debian root has no bash-only guarantees, no make)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from modelfs.testing.fresh import readme_commands

ROOT = Path(__file__).resolve().parents[2]


def test_readme_has_the_demo_and_test_commands() -> None:
    demo, tests = readme_commands(ROOT / "README.md")
    assert demo == "sh run.sh demo"
    assert tests == "sh run.sh test"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    _, tests = readme_commands(ROOT / "README.md")
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#") and line not in ("set -eu",)]
    assert commands[-1] == tests, commands
    assert not any("pytest" in c or "make" in c for c in commands), commands


@pytest.mark.parametrize("script", ["run.sh", "scripts/setup.sh", ".ci/run"])
def test_scripts_are_posix_sh(script: str) -> None:
    path = ROOT / script
    assert path.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(path)], check=True, timeout=30)
    # The first thing the commands need on a bare root: nothing but sh, dpkg and apt.
    code = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not any(line.split()[:1] == ["make"] for line in code)


def test_readme_lists_every_package_setup_installs() -> None:
    """The README says what the commands install on the machine."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    packages = {p for value in re.findall(r'PACKAGES="(?:\$PACKAGES )?([^"$]*)"', setup) for p in value.split()}
    packages |= {p for value in re.findall(r'PACKAGES="\$PACKAGES ([^"]*)"', setup) for p in value.split()}
    assert {"python3", "gcc", "python3-dev", "fuse3", "nginx", "podman"} <= packages, packages
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Two commands") : readme.index("## Usage")]
    missing = sorted(p for p in packages if not re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", section))
    assert not missing, f"installed by scripts/setup.sh but not named in the README: {missing}"


def test_readme_commands_parser_rejects_a_drifted_readme(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Two commands\n\n```sh\nsh run.sh demo   # one\n```\n")
    with pytest.raises(ValueError, match="expected two commands"):
        readme_commands(readme)
    readme.write_text("# x\n\nno such section\n")
    with pytest.raises(ValueError, match="no ```sh block"):
        readme_commands(readme)


def test_setup_rejects_an_unknown_level() -> None:
    result = subprocess.run(
        ["sh", str(ROOT / "scripts" / "setup.sh"), "everything"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "usage" in result.stderr
