"""The fresh-root test's helpers that need no container: the tree it copies in and the pip
settings it carries over."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from modelfs.testing.fresh import pip_config, tree_archive


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
