"""``pip install .`` / ``pipx install .``: the sdist and the wheel built from it hold all of
modelfs, and the installed CLI works outside the repository: ``--version``, and a real
``file://`` mount read back byte for byte.

No network: the build runs without isolation (setuptools and build are test extras), the wheel
goes into a fresh venv with ``--no-deps``, and the venv finds the dependencies (not modelfs)
in this venv's site-packages through a ``.pth`` line.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from modelfs.testing.mounts import force_unmount

ROOT = Path(__file__).resolve().parents[2]
IGNORED = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".*_cache", ".bench")


def _run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))}: exit {result.returncode}\n{result.stdout}{result.stderr}"
    )
    return result


def _modules(root: Path) -> set[str]:
    """Every file of the package: its modules and the data they read (the cache tier's templates)."""
    return {
        str(p.relative_to(root))
        for p in (root / "modelfs").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build`` of a copy of the checkout: the sdist, and the wheel built from it."""
    work = tmp_path_factory.mktemp("build")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=IGNORED, symlinks=True)
    out = work / "dist"
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, source, cwd=work)
    return out


def test_sdist_and_wheel_hold_all_of_modelfs(dist: Path) -> None:
    sdists, wheels = sorted(dist.glob("modelfs-*.tar.gz")), sorted(dist.glob("modelfs-*-py3-none-any.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    modules = _modules(ROOT)
    with tarfile.open(sdists[0]) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.removeprefix(top + "/") for n in tar.getnames()}
    assert {"README.md", "pyproject.toml"} <= names
    assert modules <= names, sorted(modules - names)
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
        metadata = wheel.read(f"{info}/METADATA").decode()
    assert modules <= names, sorted(modules - names)
    assert "modelfs = modelfs.cli:main" in entry_points
    assert "modelfs-demo = modelfs.testing.demo:main" in entry_points
    for requirement in ("pyfuse3", "trio", "google-auth", "httpx", "boto3"):
        assert f"Requires-Dist: {requirement}" in metadata, requirement
    assert "Provides-Extra: demo" in metadata


def test_installed_wheel_mounts_outside_the_repo(dist: Path, tmp_path: Path) -> None:
    wheel = next(dist.glob("modelfs-*.whl"))
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(
        sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path
    )
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).stdout.strip()
    )
    (site / "zz-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")

    where = _run(python, "-c", "import modelfs; print(modelfs.__file__)", cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(site), f"modelfs imported from {where}, not from the wheel"
    version = _run(venv / "bin" / "modelfs", "--version", cwd=tmp_path).stdout
    assert version.startswith("modelfs 0.1.0"), version
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("mounting needs root and /dev/fuse")

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    payload = os.urandom(3 << 20)
    (data / "sub" / "w.bin").write_bytes(payload)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    modelfs = venv / "bin" / "modelfs"
    try:
        _run(modelfs, "mount", f"file://{data}", mnt, "--cache-dir", tmp_path / "cache", cwd=tmp_path, timeout=120)
        read = (mnt / "sub" / "w.bin").read_bytes()
        assert hashlib.sha256(read).hexdigest() == hashlib.sha256(payload).hexdigest()
        _run(modelfs, "unmount", mnt, cwd=tmp_path, timeout=120)
        assert not os.path.ismount(mnt)
    finally:
        force_unmount(mnt)
