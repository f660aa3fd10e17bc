"""``modelfs-demo``: the demo run (every tensor checked), and ``serve``, whose printed
``STORAGE_EMULATOR_HOST=... modelfs mount gs://...`` line, pasted into a shell, mounts the
demo model from the local emulator."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from modelfs.testing.models import tensor_digests
from modelfs.testing.mounts import force_unmount


def _demo(*args: str) -> list[str]:
    return [sys.executable, "-m", "modelfs.testing.demo", *args]


def test_demo_run_checks_every_tensor(tmp_path: Path) -> None:
    result = subprocess.run(
        _demo("--size", "4M", "--workdir", str(tmp_path)), capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tensors match the source bytes." in result.stdout
    assert "daemon peak RSS" in result.stdout


def test_demo_rejects_a_bad_size() -> None:
    result = subprocess.run(_demo("--size", "lots"), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "--size" in result.stderr and "Traceback" not in result.stderr


def test_serve_prints_a_mount_line_that_works(tmp_path: Path) -> None:
    work, mnt = tmp_path / "work", tmp_path / "mnt"
    serve = subprocess.Popen(
        _demo("serve", "--size", "4M", "--workdir", str(work), "--mountpoint", str(mnt)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert serve.stdout is not None
        printed: list[str] = []
        deadline = time.monotonic() + 120
        while not printed or "Ctrl-C" not in printed[-1]:
            line = serve.stdout.readline()
            assert line and time.monotonic() < deadline, "serve ended early:\n" + "".join(printed)
            printed.append(line)
        commands = [line.strip() for line in printed if line.startswith("  ")]
        mount = next(c for c in commands if " mount --anonymous gs://demo-bucket/" in c)
        assert mount.startswith("STORAGE_EMULATOR_HOST=http://127.0.0.1:")
        for command in commands:
            if command.startswith("ls "):
                continue
            if " unmount " in command:
                assert tensor_digests(mnt) == tensor_digests(work / "model")
            done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
        assert not mnt.is_mount()
        serve.send_signal(signal.SIGINT)
        out, _ = serve.communicate(timeout=60)
        assert serve.returncode == 0, out
        assert out.strip().endswith("stopped.")
    finally:
        force_unmount(mnt)
        if serve.poll() is None:
            serve.kill()
            serve.wait()
