"""The fresh-root test's helpers that need no container: the tree it copies in, the pip
settings it carries over and the count of the tests its run had to pass."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from modelfs.testing.fresh import collection_counts, pip_config, tree_archive


def test_tree_without_git_metadata_is_copied_without_venvs_and_caches(tmp_path: Path) -> None:
    for name in ("run.sh", "modelfs/cli.py", ".venv/bin/python", "modelfs/__pycache__/cli.pyc", "x.egg-info/PKG"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    data, how = tree_archive(tmp_path)
    assert "no git metadata" in how
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        files = {m.name for m in tar.getmembers() if m.isfile()}
        assert tar.extractfile("run.sh").read() == b"run.sh"  # type: ignore[union-attr]
    assert files == {"run.sh", "modelfs/cli.py"}


def test_pip_settings_keep_what_reaches_an_index_and_drop_local_paths() -> None:
    listing = "\n".join(
        [
            ":env:.cert='/etc/ssl/certs/ca-certificates.crt'",
            ":env:.default-timeout='180'",
            ":env:.find-links='/opt/wheels'",
            "global.cert='/somewhere/else.pem'",
            "global.constraint='/etc/xdg/pip/constraints.txt'",
            "global.extra-index-url='file:///opt/pypi/simple https://mirror.example/simple'",
            "global.find-links='/opt/wheels'",
            "install.trusted-host='mirror.example'",
        ]
    )
    text = pip_config(listing)
    assert text == (
        "[global]\n"
        "cert = /etc/ssl/certs/ca-certificates.crt\n"
        "extra-index-url = https://mirror.example/simple\n"
        "default-timeout = 180\n"
        "[install]\n"
        "trusted-host = mirror.example\n"
    )
    assert pip_config("") == ""


def test_collection_counts_read_pytest_collect_only_closing_line() -> None:
    listing = "tests/unit/test_x.py::test_a\n\n1064/1065 tests collected (1 deselected) in 2.50s\n"
    assert collection_counts(listing) == (1064, 1)
    assert collection_counts("1 test collected in 0.01s") == (1, 0)
    assert collection_counts("23 tests collected in 0.01s\n") == (23, 0)
    with pytest.raises(ValueError, match="no collection count"):
        collection_counts("ERROR: file or directory not found: x\n")
