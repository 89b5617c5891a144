"""The GitHub Actions workflow is valid and runs what it claims (every OS x Python,
tox environments that exist)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def test_workflow_matches_githubs_schema() -> None:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which(
        "check-jsonschema"
    )
    if exe is None:
        pytest.skip("check-jsonschema is not installed (the dev extra has it)")
    proc = subprocess.run(
        [exe, "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _workflow() -> dict[str, Any]:
    yaml = pytest.importorskip("ruamel.yaml", reason="ruamel.yaml comes with check-jsonschema")
    data: dict[str, Any] = yaml.YAML(typ="safe").load(WORKFLOW.read_text())
    return data


def test_matrix_is_every_os_and_python() -> None:
    matrix = _workflow()["jobs"]["test"]["strategy"]["matrix"]
    assert set(matrix["os"]) == {"ubuntu-latest", "macos-latest", "windows-latest"}
    assert matrix["python"] == ["3.10", "3.11", "3.12", "3.13"]


def test_workflow_runs_tox_envs_that_exist() -> None:
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    envs = {s.split(":", 1)[1] for s in tox.sections() if s.startswith("testenv:")}
    jobs = _workflow()["jobs"]
    assert set(jobs["checks"]["strategy"]["matrix"]["env"]) <= envs
    assert {"docs", "package", "workflow", "lint", "type"} <= envs
    runs = [step.get("run", "") for job in jobs.values() for step in job["steps"]]
    assert "tox -e py" in runs
