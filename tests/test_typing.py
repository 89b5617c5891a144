"""The typing set (tests/typing/): one ``mypy --strict`` run over the directory, compared
with the ``# E: TEXT`` comments in the files (see tests/typing/README.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import multispool

ROOT = Path(__file__).resolve().parent.parent
TYPING = Path(__file__).resolve().parent / "typing"
FILES = sorted(TYPING.glob("*.py"))
EXPECT = re.compile(r"#\s*E:\s*(.*?)\s*(?=#\s*E:|$)")
ERROR = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+): error: (?P<msg>.*)$")
# One cache per interpreter: tox envs running side by side must not share one.
MYPY_CACHE = ROOT / ".mypy_cache" / f"typing-py{sys.version_info[0]}{sys.version_info[1]}"
XFAIL = re.compile(r"^#\s*xfail:\s*(.+)$")
NEEDS = re.compile(r"^#\s*xfail-unless-exported:\s*(.+)$")

pytest.importorskip("mypy", reason="the typing set needs mypy (the dev extra)")


@pytest.fixture(scope="module")
def mypy_errors() -> dict[tuple[str, int], list[str]]:
    """``{(file name, line): [message [code], ...]}`` from one mypy run over every file."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "pyproject.toml"),
            "--show-error-codes", "--no-pretty", "--no-error-summary", "--hide-error-context",
            "--show-absolute-path", "--cache-dir", str(MYPY_CACHE),
            *map(str, FILES),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    if proc.returncode not in (0, 1) or proc.stderr.strip():
        pytest.fail(f"mypy did not run (exit {proc.returncode}):\n{proc.stderr}{proc.stdout}")
    errors: dict[tuple[str, int], list[str]] = defaultdict(list)
    for line in proc.stdout.splitlines():
        m = ERROR.match(line)
        if m:
            path = Path(m["path"]).resolve()
            key = path.name if path.parent == TYPING else str(path)
            errors[(key, int(m["line"]))].append(m["msg"])
    return dict(errors)


def _expected(path: Path) -> dict[int, list[str]]:
    expected: dict[int, list[str]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if "# E:" in line:
            expected[n] = EXPECT.findall(line[line.index("# E:"):])
    return expected


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_typing_file(
    path: Path, mypy_errors: dict[tuple[str, int], list[str]], request: pytest.FixtureRequest
) -> None:
    """Every ``# E:`` line gets its error, and no other line of the file gets one."""
    head = path.read_text().splitlines()[:5]
    needs = [n for line in head if (m := NEEDS.match(line)) for n in m[1].replace(",", " ").split()]
    for line in head:
        m = XFAIL.match(line)
        if m and not all(hasattr(multispool, n) for n in needs):
            request.applymarker(pytest.mark.xfail(reason=m[1], strict=True))
    expected = _expected(path)
    actual = {line: msgs for (name, line), msgs in mypy_errors.items() if name == path.name}
    problems = []
    for line in sorted(set(expected) | set(actual)):
        wants, msgs = expected.get(line, []), actual.get(line, [])
        # mypy may word one mistake as one or two errors (e.g. a lambda's return type):
        # each wanted text must be reported, and each report must be wanted.
        missing = [want for want in wants if not any(want in msg for msg in msgs)]
        extra = [msg for msg in msgs if not any(want in msg for want in wants)]
        problems += [f"{path.name}:{line}: expected error not reported: {want}" for want in missing]
        problems += [f"{path.name}:{line}: unexpected error: {msg}" for msg in extra]
    assert not problems, "\n".join(problems)


def test_typing_set_touches_nothing_else(mypy_errors: dict[tuple[str, int], list[str]]) -> None:
    """Errors outside tests/typing (in the library itself) would hide behind the per-file checks."""
    outside = {k: v for k, v in mypy_errors.items() if "/" in k[0] or "\\" in k[0]}
    assert not outside


def test_readme_example_is_verbatim() -> None:
    """tests/typing/readme_example.py is exactly the README's first Python example."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S)
    assert block is not None
    assert (TYPING / "readme_example.py").read_text() == block[1]
