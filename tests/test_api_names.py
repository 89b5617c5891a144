"""The public names: ``multispool.__all__`` is sorted, holds every name API.md §1-5 and §7
promise, and nothing API.md does not mention."""

from __future__ import annotations

import builtins
import re
from pathlib import Path

import pytest

import multispool

API_CANDIDATES = [
    Path(__file__).resolve().parent.parent / "API.md",
    Path(__file__).resolve().parent.parent / "docs" / "API.md",
    Path("/work/shared/API.md"),
]


def _api_text() -> str:
    for p in API_CANDIDATES:
        if p.is_file():
            return p.read_text(encoding="utf-8")
    pytest.skip("API.md not found")


def _sections(text: str) -> dict[int, str]:
    """API.md's numbered '## N. Title' sections by number."""
    out: dict[int, str] = {}
    for m in re.finditer(r"^## (\d+)\.[^\n]*\n(.*?)(?=^## |\Z)", text, re.M | re.S):
        out[int(m.group(1))] = m.group(2)
    return out


def _qualified(text: str) -> set[str]:
    return set(re.findall(r"\bmultispool\.([A-Za-z_][A-Za-z0-9_]*)", text))


# Named in §4/§5 as the types operations return, without a "multispool." prefix.
CORE_TYPES = {"CheckedOutEntry", "DataFile"}


def test_required_core_names_are_exported() -> None:
    sections = _sections(_api_text())
    assert set(range(1, 8)) <= set(sections), "API.md sections 1-7 not found"
    core = "".join(sections[i] for i in (1, 2, 3, 4, 5, 7))
    required = _qualified(core) | CORE_TYPES
    # §7 names the error classes in backticks.
    # §7 names the error classes in backticks (PermissionError there is the builtin's).
    required |= set(re.findall(r"`([A-Z][A-Za-z]*Error)`", sections[7])) - set(vars(builtins))
    expected = {
        "Spoolable", "BytesData", "MsgspecData", "PrefixNames", "TimeOrderedNames", "Spool",
        "Entry", "CheckedOutEntry", "DataFile", "Save", "REMOVE", "NOT_FOUND", "SpoolError",
        "NotASpoolError", "EntryNotFoundError", "CorruptEntryError", "InvalidNameError",
    }  # fmt: skip
    assert expected <= required  # the parser still finds what it should
    missing = sorted(required - set(multispool.__all__))
    assert not missing, f"API.md §1-5/§7 names missing from __all__: {missing}"
    for name in required:
        assert getattr(multispool, name) is not None


def test_exports_are_a_subset_of_api_names() -> None:
    text = _api_text()
    documented = _qualified(text) | set(re.findall(r"\b[A-Z][A-Za-z0-9_]*\b", text))
    extra = sorted(set(multispool.__all__) - documented)
    assert not extra, f"exported but not in API.md: {extra}"


def _isort_key(name: str) -> tuple[int, str]:
    # ruff RUF022 "isort-style": SCREAMING_CASE constants, then CamelCase, then the rest.
    if name.isupper() or re.fullmatch(r"[A-Z0-9_]+", name):
        return (0, name)
    if name[0].isupper():
        return (1, name)
    return (2, name)


def test_all_is_sorted_unique_and_resolvable() -> None:
    names = list(multispool.__all__)
    assert len(names) == len(set(names)), "duplicates in __all__"
    assert names == sorted(names, key=_isort_key), "__all__ is not sorted (isort-style)"
    for n in names:
        assert hasattr(multispool, n), n
        assert not n.startswith("_") or n == "__version__"


def test_star_import_gives_exactly_all() -> None:
    ns: dict[str, object] = {}
    exec("from multispool import *", ns)
    assert set(ns) - {"__builtins__"} == set(multispool.__all__)


def test_exported_classes_live_in_private_modules_but_are_the_same_objects() -> None:
    import multispool._errors as errors
    import multispool._spool as spool_mod
    import multispool._spoolable as spoolable_mod

    assert multispool.Spool is spool_mod.Spool
    assert multispool.Spoolable is spoolable_mod.Spoolable
    assert multispool.CorruptEntryError is errors.CorruptEntryError


def test_submodules_are_attributes_loaded_on_first_use() -> None:
    """`multispool.aio` (API.md §10) works after a plain `import multispool`, and sync
    users do not pay for importing asyncio support until they touch it."""
    import subprocess
    import sys

    code = (
        "import sys, multispool\n"
        "assert 'multispool.aio' not in sys.modules\n"
        "assert multispool.aio.AsyncSpool.__name__ == 'AsyncSpool'\n"
        "assert callable(multispool.cli.main)\n"
        "try:\n    multispool.nope\nexcept AttributeError:\n    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
