"""scripts/slowdisk, the loop disk whose cache flush costs a chosen delay (the slow-flush
figures in docs/benchmarks-batch.md come from it): its refusals always; building a real
one, checking that an fsync there really costs the delay, and tearing it down without a
trace, with MULTISPOOL_SLOW=1 where root, FUSE, loop devices and libfuse3 are at hand."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slowdisk"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_names_every_command() -> None:
    p = _run("--help")
    assert p.returncode == 0, p.stderr
    for cmd in ("up", "check", "down"):
        assert cmd in p.stdout


def test_check_of_a_disk_not_up_says_so_and_makes_nothing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    p = _run("check", str(work))
    assert p.returncode == 2
    assert f"{work}/mnt is not up" in p.stderr
    assert not work.exists()
    assert _run("down", str(work)).returncode == 0  # nothing to take down: fine


def _can_build() -> str | None:
    if os.environ.get("MULTISPOOL_SLOW") != "1":
        return "set MULTISPOOL_SLOW=1"
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root on Linux"
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        return "needs /dev/fuse and loop devices"
    for tool in ("gcc", "pkg-config", "losetup", "mkfs.ext4", "fusermount3"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if subprocess.run(["pkg-config", "--exists", "fuse3"]).returncode != 0:
        return "needs libfuse3-dev"
    return None


@pytest.mark.timeout(300)
def test_an_fsync_on_the_slow_disk_costs_the_delay(tmp_path: Path) -> None:
    why = _can_build()
    if why:
        pytest.skip(why)
    work = tmp_path / "work"
    try:
        up = _run("up", str(work), "--fs", "ext4", "--delay-ms", "5", "--size", "256M")
        assert up.returncode == 0, up.stderr
        mnt = up.stdout.strip()
        assert mnt == str(work / "mnt") and os.path.ismount(mnt)
        check = _run("check", str(work), "--samples", "10")
        assert check.returncode == 0, check.stderr
        medians = [float(m) for m in re.findall(r"median fsync ([0-9.]+) ms", check.stdout)]
        assert len(medians) == 2, check.stdout  # the slow disk, then /tmp
        # A journal commit asks for two flushes of the image (a flush, then one for FUA).
        assert medians[0] >= 10, check.stdout
    finally:
        down = _run("down", str(work))
    assert down.returncode == 0, down.stderr
    assert not os.path.ismount(work / "mnt")
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(work) not in loops
    assert str(work) not in Path("/proc/self/mounts").read_text()
