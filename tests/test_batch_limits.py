"""A batch and the process's limit on open files (RLIMIT_NOFILE, often 1,024 by default):
a batch holds one owner lock per entry until it is published, and its syncs must not
open a descriptor per file on top of that."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from _procs import run_python
from multispool import _aio, _fs

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no RLIMIT_NOFILE")

# The child: soft (and maybe hard) limit set first, then a batch from the main thread and
# one from a worker thread (only there does a round write every file out before its
# fsyncs); prints what it saw as JSON.
_CHILD = """
import enum, json, os, resource, sys, threading
import multispool
from multispool import _aio

soft, hard, n, aio = (int(a) for a in sys.argv[1:5])
root = sys.argv[5]
if not aio:
    _aio._usable = False
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

class Q(enum.Enum):
    Q = "q"

sp = multispool.Spoolable(queues=Q, metadata_codec="json", data=multispool.BytesData(), durability="full")
spool = multispool.Spool.create(root, sp)
out = {}

def batch(key):
    try:
        names = spool.enqueue_many(Q.Q, [({"i": i}, b"x" * 100) for i in range(n)])
        out[key] = len(names)
    except OSError as e:
        out[key] = {"errno": e.errno, "filename": e.filename, "text": str(e)}

batch("main")
t = threading.Thread(target=batch, args=("thread",))
t.start()
t.join()
out["soft"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
out["queued"] = len([f for f in os.listdir(os.path.join(root, "q")) if not f.startswith(".")])
out["left"] = {d: sorted(os.listdir(os.path.join(root, d))) for d in (".registry", ".tmp", ".data")}
print(json.dumps(out))
"""


def _run(tmp_path: Path, soft: int, hard: int, n: int, aio: bool) -> dict[str, Any]:
    root = str(tmp_path / "spool")
    p = run_python(_CHILD, str(soft), str(hard), str(n), str(int(aio)), root)
    assert p.returncode == 0, p.stderr
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def _hard() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "threads"])
def test_a_batch_bigger_than_the_soft_limit_raises_it_and_goes_through(tmp_path: Path, aio: bool) -> None:
    """Soft limit 256, batches of 600: each holds 600 owner locks, and the soft limit is
    raised (not above the hard one) so that they fit; every entry is published."""
    if aio and not _aio._usable:
        pytest.skip("Linux AIO fsync is not available here")
    n = 600
    if _hard() < n + _fs.SPARE_FDS + 64:
        pytest.skip("the hard limit on open files is too low here")
    out = _run(tmp_path, 256, _hard(), n, aio)
    assert out["main"] == n and out["thread"] == n
    assert out["queued"] == 2 * n
    assert n + _fs.SPARE_FDS <= out["soft"] <= _hard()
    assert out["left"][".tmp"] == [] and len(out["left"][".data"]) == 2 * n


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "threads"])
def test_a_batch_the_hard_limit_cannot_hold_fails_before_writing_anything(tmp_path: Path, aio: bool) -> None:
    if aio and not _aio._usable:
        pytest.skip("Linux AIO fsync is not available here")
    out = _run(tmp_path, 512, 512, 400, aio)
    for key in ("main", "thread"):
        err = out[key]
        assert err["errno"] == errno.EMFILE
        assert err["filename"] == str(tmp_path / "spool")
        assert "400 entries" in err["text"] and "512" in err["text"]
    assert out["queued"] == 0 and out["soft"] == 512
    assert out["left"] == {".registry": [], ".tmp": [], ".data": []}


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "threads"])
def test_a_batch_whose_locks_fit_is_not_refused_for_its_syncs(tmp_path: Path, aio: bool) -> None:
    """Soft and hard limit 1,024, batches of 600: the locks fit with room to spare; the
    round's syncs must not open a descriptor per file on top of them (1,800 in all)."""
    if aio and not _aio._usable:
        pytest.skip("Linux AIO fsync is not available here")
    out = _run(tmp_path, 1024, 1024, 600, aio)
    assert out["main"] == 600 and out["thread"] == 600 and out["queued"] == 1200


class _Counting:
    """Counts the descriptors ``_fs._open_held`` has open at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = 0
        self.most = 0
        open_held, close_held = _fs._open_held, _fs._close_held

        def counting_open(*a: Any, **k: Any) -> int:
            fd = open_held(*a, **k)
            self.open += 1
            self.most = max(self.most, self.open)
            return fd

        def counting_close(*a: Any, **k: Any) -> None:
            self.open -= 1
            close_held(*a, **k)

        monkeypatch.setattr(_fs, "_open_held", counting_open)
        monkeypatch.setattr(_fs, "_close_held", counting_close)


def _files(tmp_path: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * (i % 7))
        paths.append(str(p))
    return paths


@pytest.mark.skipif(not _aio._usable, reason="Linux AIO fsync is not available here")
def test_aio_holds_at_most_its_capacity_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _Counting(monkeypatch)
    paths = _files(tmp_path, 2 * _aio.CAPACITY + 50)
    assert _aio.fsync_all([(p, None, False) for p in paths]) == [None] * len(paths)
    assert _aio.CAPACITY // 2 < counting.most <= _aio.CAPACITY and counting.open == 0


@pytest.mark.skipif(_fs._write_out_range is None, reason="no sync_file_range here")
def test_write_out_holds_at_most_its_window_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _Counting(monkeypatch)
    paths = _files(tmp_path, 2 * _fs.WRITE_OUT_WINDOW + 50)
    assert _fs.write_out([(p, None) for p in paths]) == [None] * len(paths)
    assert counting.most == _fs.WRITE_OUT_WINDOW and counting.open == 0
    assert os.path.getsize(paths[-1]) == (len(paths) - 1) % 7
