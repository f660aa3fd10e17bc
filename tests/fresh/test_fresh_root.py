"""The README's two commands, exactly as written there, on a bare Debian root.

The root is the container tests' ``debootstrap --variant=minbase`` base run as a privileged
podman container (modelfs.testing.fresh): no make, python3, gcc or curl; the committed tree
(``git archive HEAD``) is copied in, and only what reaches the package registries is bound in.
The demo command must load every tensor with the right bytes; the test command must pass the
whole suite there (container tests under nested podman included) with nothing skipped; running
the demo command again repairs a venv left without pip. The wall time of each command is
shown in the run's summary and kept in ``/var/tmp/modelfs-fresh/last.json``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from modelfs.testing.container import ContainerError, Podman
from modelfs.testing.fresh import (
    WALL_TIMES,
    FreshRoot,
    Result,
    collection_counts,
    fresh_root,
    readme_commands,
    tree_archive,
)

pytestmark = [
    pytest.mark.fresh,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
]

ROOT = Path(__file__).resolve().parents[2]
RECORD = Path("/var/tmp/modelfs-fresh/last.json")


def _report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Straight to the terminal, passing or not (lost on an xdist worker: the wall times go
    into the run's summary instead)."""
    with capsys.disabled():
        print(line, flush=True)


def _check(result: Result, what: str) -> None:
    if result.returncode != 0:
        pytest.fail(
            f"{what} `{result.command}` exited {result.returncode} after {result.seconds:.0f} s "
            f"(whole log: {result.log}):\n{result.tail()}",
            pytrace=False,
        )


def _pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's closing line (``== 480 passed, 1 deselected in 300.00s ==``)."""
    closing = [line for line in output.splitlines() if re.match(r"^=+ .* in [\d.]+s", line)]
    assert closing, "no pytest summary line in the test command's output"
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", closing[-1])}


def test_readme_commands_on_a_bare_debian_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], record_property: Callable[[str, object], None]
) -> None:
    demo, tests = readme_commands(ROOT / "README.md")
    tree, how = tree_archive(ROOT)
    podman = Podman(tmp_path / "podman")
    work = tmp_path / "work"
    work.mkdir()
    times: dict[str, float] = {}
    try:
        with fresh_root(podman, tree, work) as root:
            _report(capsys, f"\nfresh root: {how} at /root/modelfs; `{demo}` ...")
            first = root.sh(demo, timeout=2400, log_name="demo.log")
            times["demo"] = first.seconds
            _check(first, "the demo command")
            _check_demo(first)
            _report(capsys, f"fresh root: `{demo}` {first.seconds:.0f} s; `{tests}` ...")

            second = root.sh(tests, timeout=3600, log_name="test.log")
            times["test"] = second.seconds
            _check(second, "the test command")
            counts = _pytest_counts(second.output)
            assert counts.get("passed", 0) > 100, counts
            not_passed = {k: n for k, n in counts.items() if k not in ("passed", "deselected")}
            assert not not_passed, f"the suite in the fresh root did not only pass: {counts}\n{second.tail()}"
            # The command runs pytest on xdist workers, whose closing line does not count the
            # deselected: a collection there says how many tests the run had to pass.
            listing = root.sh(
                ".venv/bin/python -m pytest --collect-only -q -p no:cacheprovider", timeout=600, log_name="collect.log"
            )
            _check(listing, "collecting the suite")
            selected, deselected = collection_counts(listing.output)
            assert deselected == 1, f"only the fresh-root test itself is left out: {listing.tail(3)}"
            assert counts["passed"] == selected, f"{counts} of {selected} collected"
            _report(capsys, f"fresh root: `{tests}` {second.seconds:.0f} s ({counts})")

            times["repair"] = _check_repair(root, demo)
    except ContainerError as exc:
        pytest.fail(f"the fresh root could not be set up: {exc}", pytrace=False)
    finally:
        if times:
            RECORD.parent.mkdir(parents=True, exist_ok=True)
            RECORD.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **times}))
            # Shown in the run's summary (tests/conftest.py), also from an xdist worker.
            record_property(WALL_TIMES, ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))


def _check_demo(result: Result) -> None:
    output = result.output
    loaded = re.search(r"^loaded (\d+) tensors", output, re.MULTILINE)
    match = re.search(r"^all (\d+) tensors match the source bytes\.$", output, re.MULTILINE)
    assert loaded and match, f"the demo did not report a full, correct load:\n{result.tail()}"
    assert loaded.group(1) == match.group(1)
    assert int(match.group(1)) > 10
    assert "WRONG BYTES" not in output
    # setup says where modelfs is, and it is there.
    where = re.search(r"^setup: done: modelfs is (\S+)$", output, re.MULTILINE)
    assert where and where.group(1) == "/root/modelfs/.venv/bin/modelfs", output[-2000:]


def _check_repair(root: FreshRoot, demo: str) -> float:
    """A venv left without pip (as when ensurepip was missing) is made anew by the same command."""
    broken = root.sh(
        "rm -rf .venv/lib/python3*/site-packages/pip .venv/bin/pip*; ! .venv/bin/python -m pip --version",
        timeout=120,
        log_name="break.log",
    )
    _check(broken, "breaking the venv")
    again = root.sh(demo, timeout=2400, log_name="demo-again.log")
    _check(again, "the demo command on a broken venv")
    assert "is broken" in again.output, again.tail()
    _check_demo(again)
    return again.seconds
