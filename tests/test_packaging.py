"""The sdist carries its own test suite and runs it; its metadata is complete."""

from __future__ import annotations

import email.parser
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist built from this tree (no isolated build env: no network needed)."""
    pytest.importorskip("build", reason="building the sdist needs `build` (the dev extra)")
    pytest.importorskip("setuptools", reason="building the sdist needs setuptools (the dev extra)")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tarball,) = out.glob("multispool-*.tar.gz")
    return tarball


def _members(tarball: Path) -> set[str]:
    with tarfile.open(tarball) as tar:
        return {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}


def test_sdist_holds_every_test_and_example(sdist: Path) -> None:
    members = _members(sdist)
    wanted = {
        str(p.relative_to(ROOT)).replace(os.sep, "/")
        for top in ("tests", "examples")
        for p in (ROOT / top).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    }
    assert {"tests/conftest.py", "tests/_procs.py", "tests/_torture_worker.py"} <= wanted
    assert wanted - members == set()
    assert {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "tox.ini"} <= members


def test_sdist_metadata(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        f = tar.extractfile(f"{sdist.name.removesuffix('.tar.gz')}/PKG-INFO")
        assert f is not None
        meta = email.parser.BytesParser().parse(f)
    assert meta["License-Expression"] == "MIT"
    assert "LICENSE" in meta.get_all("License-File", [])
    assert meta["Author"]
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL", []))
    assert {"Homepage", "Documentation", "Source", "Changelog"} <= set(urls)
    classifiers = meta.get_all("Classifier", [])
    for v in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {v}" in classifiers
    assert "Typing :: Typed" in classifiers


def test_sdist_runs_its_own_tests(sdist: Path, tmp_path: Path) -> None:
    """Unpacked, the sdist's tests run against the sdist's own library (a fast sample:
    the whole suite is what a packager would run)."""
    with tarfile.open(sdist) as tar:
        if sys.version_info >= (3, 12):
            tar.extractall(tmp_path, filter="data")
        else:
            tar.extractall(tmp_path)
    (src,) = tmp_path.glob("multispool-*")
    env = dict(os.environ, PYTHONPATH=str(src / "lib"), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_layout.py",
         "tests/test_typing.py::test_readme_example_is_verbatim"],
        cwd=src, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
    assert str(src / "lib") in subprocess.run(
        [sys.executable, "-c", "import multispool; print(multispool.__file__)"],
        env=env, capture_output=True, text=True, timeout=60,
    ).stdout
