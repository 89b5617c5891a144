"""scripts/powerloss (the LazyFS power-cut run, issue 12) skips cleanly where it cannot run:
the test suite never has a built LazyFS, so only the skip paths are checked here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "powerloss"


def _run(env_lazyfs: str | None, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LAZYFS"}
    if env_lazyfs is not None:
        env["LAZYFS"] = env_lazyfs
    env["POWERLOSS_WORK"] = str(tmp_path / "work")
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60)


def test_powerloss_skips_when_lazyfs_is_unset(tmp_path: Path) -> None:
    p = _run(None, tmp_path)
    assert p.returncode == 0, p.stderr
    assert "powerloss SKIPPED: LAZYFS is not set" in p.stdout
    assert not (tmp_path / "work").exists()  # nothing made, nothing mounted


def test_powerloss_skips_when_lazyfs_is_not_a_build(tmp_path: Path) -> None:
    p = _run(str(tmp_path / "no-such-lazyfs"), tmp_path)
    assert p.returncode == 0, p.stderr
    assert "powerloss SKIPPED" in p.stdout
    assert "is not a LazyFS binary" in p.stdout
    assert not (tmp_path / "work").exists()
