"""The documentation site covers the whole public API, keeps every page linked, and
points users at nothing internal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import multispool
import multispool.aio

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _nav_pages() -> set[str]:
    return set(re.findall(r":\s*([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))


def test_api_reference_lists_every_public_name() -> None:
    reference = (DOCS / "reference" / "api.md").read_text()
    documented = set(re.findall(r"^::: multispool\.(\w+)\s*$", reference, re.M))
    assert set(multispool.__all__) - documented == set()
    assert documented - set(multispool.__all__) == set()
    assert "::: multispool.aio" in (DOCS / "reference" / "aio.md").read_text()


def test_every_page_is_in_the_nav() -> None:
    pages = {str(p.relative_to(DOCS)).replace(os.sep, "/") for p in DOCS.rglob("*.md")}
    assert pages - _nav_pages() == set()
    assert _nav_pages() - pages == set()


def test_user_facing_text_does_not_point_at_the_internal_contract() -> None:
    texts = [ROOT / "README.md", *DOCS.rglob("*.md"), *(ROOT / "examples").glob("*")]
    offenders = [str(p.relative_to(ROOT)) for p in texts if p.is_file() and "API.md" in p.read_text()]
    docstrings = [
        f"{mod.__name__}.{name}" for mod in (multispool, multispool.aio)
        for name in ["", *mod.__all__]
        if "API.md" in ((getattr(mod, name) if name else mod).__doc__ or "")
    ]
    assert offenders + docstrings == []


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MULTISPOOL_SLOW"), reason="MULTISPOOL_SLOW=1 builds the site")
def test_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
    )
    assert proc.returncode == 0, proc.stderr
    cli_page = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert cli_page.count("usage: multispool") >= 2
