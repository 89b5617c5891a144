"""API.md, claim by claim: a small test for each concrete claim of the contract that no
other test pins through the public names (defaults, attribute names, error types,
on-disk names). Tests are named after the API.md section (``test_sN_...``) and use only
what API.md names, plus the file system to look at the spool."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

import multispool
from _procs import find_sort

# -- §3 Opening a spool -------------------------------------------------------------------


@pytest.mark.parametrize("part", ["queue2", "queue2/.checkout", ".data"])
@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_s3_create_on_a_spool_with_a_non_directory_part_is_not_a_spool(
    tmp_path: Path, spoolable: multispool.Spoolable[Any, bytes], part: str, kind: str
) -> None:
    """A spool whose queue, checkout or data directory is a file (or a symlink) lacks
    that directory: ``load`` says NotASpoolError, and so must ``create``, which cannot
    create what is missing (it raised FileExistsError, no SpoolError), naming the path
    and changing nothing."""
    root = tmp_path / "spool"
    multispool.Spool.create(root, spoolable)
    p = root / part
    shutil.rmtree(p)
    if kind == "file":
        p.write_bytes(b"")
    else:
        (tmp_path / "elsewhere").mkdir()
        p.symlink_to(tmp_path / "elsewhere")
    before = find_sort(root)
    for op in (
        lambda: multispool.Spool.load(root, spoolable),
        lambda: multispool.Spool.create(root, spoolable),
        lambda: multispool.Spool.load(root, spoolable, create_if_missing=True),
    ):
        with pytest.raises(multispool.NotASpoolError) as ei:
            op()
        assert str(p) in str(ei.value)
    assert find_sort(root) == before
