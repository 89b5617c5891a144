"""API.md §7: the error hierarchy, invalid names (rejected before any disk access),
corrupt metadata, pickling, OS errors with their path."""

from __future__ import annotations

import os
import pickle
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import multispool
from _procs import find_sort, run_python
from conftest import Cog, Queue

BAD_NAMES = [
    pytest.param("", id="empty"),
    pytest.param(".", id="dot"),
    pytest.param("..", id="dotdot"),
    pytest.param("a/b", id="slash"),
    pytest.param("/abs", id="leading-slash"),
    pytest.param("a\0b", id="nul"),
    pytest.param(".hidden", id="leading-dot"),
    pytest.param(".checkout", id="checkout-dir"),
    pytest.param("x" * 256, id="256-ascii"),
    pytest.param("é" * 128, id="256-bytes-utf8"),
]


def test_hierarchy() -> None:
    for cls in (
        multispool.NotASpoolError,
        multispool.EntryNotFoundError,
        multispool.CorruptEntryError,
        multispool.InvalidNameError,
    ):
        assert issubclass(cls, multispool.SpoolError)
    assert issubclass(multispool.SpoolError, Exception)


def _forbid_disk(mp: pytest.MonkeyPatch) -> None:
    """Make every file system call fail loudly: proves an error came first."""

    def boom(*a: object, **k: object) -> None:
        raise AssertionError(f"touched the disk: {a}")

    for fn in ("open", "stat", "lstat", "listdir", "mkdir", "rename", "unlink", "utime", "scandir", "link"):
        mp.setattr(os, fn, boom)


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_name_entry(spool: multispool.Spool[Any, bytes], bad: str) -> None:
    with pytest.MonkeyPatch.context() as mp:
        _forbid_disk(mp)
        with pytest.raises(multispool.InvalidNameError) as ei:
            multispool.Entry(spool, Queue.QUEUE1, bad)
        assert ei.value.name == bad
        with pytest.raises(multispool.InvalidNameError):
            multispool.Entry.create(spool, Queue.QUEUE1, bad)


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_name_enqueue_use(spool: multispool.Spool[Any, bytes], bad: str) -> None:
    before = find_sort(spool.dir)
    with pytest.MonkeyPatch.context() as mp:
        _forbid_disk(mp)
        with pytest.raises(multispool.InvalidNameError):
            spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x", use=bad)
    assert find_sort(spool.dir) == before


class Fixed:
    def __init__(self, name: str) -> None:
        self.name = name

    def next(self, seed: Any, attempt: int) -> str:
        return self.name


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_name_from_generator(tmp_path: Path, bad: str) -> None:
    spool = multispool.Spool.create(
        tmp_path / "spool", multispool.Spoolable(queues=Queue, name_generator=Fixed(bad))
    )
    before = find_sort(tmp_path)
    with pytest.raises(multispool.InvalidNameError):
        spool.reserve_name()
    with pytest.raises(multispool.InvalidNameError):
        spool.enqueue(Queue.QUEUE1, {"a": 1}, b"x")
    assert find_sort(tmp_path) == before


def test_invalid_name_untouched_tree(spool: multispool.Spool[Any, bytes]) -> None:
    before = find_sort(Path(spool.dir).parent)
    for p in BAD_NAMES:
        with pytest.raises(multispool.InvalidNameError):
            spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x", use=p.values[0])  # type: ignore[arg-type]
    assert find_sort(Path(spool.dir).parent) == before


def test_longest_valid_names_work_on_disk(tmp_path: Path) -> None:
    sp = multispool.Spoolable(queues=Queue, name_generator=multispool.PrefixNames())
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    e = spool.enqueue(Queue.QUEUE1, 1, b"x", reserve="a" * 249)  # + 6 digits = 255 bytes
    assert len(e.name.encode()) == 255
    e2 = spool.enqueue(Queue.QUEUE1, 1, b"y", use=spool.reserve_name("é" * 124 + "a"))  # 255 bytes
    assert len(e2.name.encode()) == 255
    assert {x.name for x in spool.list(Queue.QUEUE1)} == {e.name, e2.name}
    multispool.Entry(spool, Queue.QUEUE1, e.name)
    before = find_sort(tmp_path)
    with pytest.raises(multispool.InvalidNameError):
        spool.enqueue(Queue.QUEUE1, 1, b"x", reserve="a" * 250)
    assert find_sort(tmp_path) == before


# -- corrupt metadata ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "cause"),
    [
        (b"{not json", msgspec.DecodeError),
        (b'{"type":"Cog","n":"not an int"}', msgspec.ValidationError),
        (b'{"type":"Gear","n":1}', msgspec.ValidationError),
        (b"", msgspec.DecodeError),
    ],
)
def test_corrupt_metadata(spool: multispool.Spool[Any, bytes], raw: bytes, cause: type[Exception]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data", reserve="c")
    qfile = Path(spool.dir) / "queue1" / e.name
    qfile.write_bytes(raw)
    with pytest.raises(multispool.CorruptEntryError) as di:
        e.direct.contents()
    assert str(qfile) in str(di.value) and di.value.path == str(qfile)
    assert isinstance(di.value.__cause__, cause)  # raised from the decoder's error
    assert str(di.value.__cause__) in str(di.value)
    with pytest.raises(multispool.CorruptEntryError) as ei:
        spool.checkout(e)
    err = ei.value
    assert str(di.value.__cause__) in str(err) and str(di.value.__cause__) in err.reason
    cofile = Path(spool.dir) / "queue1" / ".checkout" / e.name
    assert err.path == str(cofile) and str(cofile) in str(err)
    # Nothing deleted: the metadata (left checked out), its data and its reservation.
    assert cofile.read_bytes() == raw
    assert (Path(spool.dir) / ".data" / e.name).read_bytes() == b"data"
    assert (Path(spool.dir) / ".registry" / e.name).exists()
    with pytest.raises(multispool.CorruptEntryError):
        spool.list_checkouts_unsafe(Queue.QUEUE1)
    assert cofile.read_bytes() == raw


def test_corrupt_checkout_raised_from_decoder_error(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data", reserve="c")
    (Path(spool.dir) / "queue1" / e.name).write_bytes(b"{")
    with pytest.raises(multispool.CorruptEntryError) as ei:
        spool.checkout(e)
    assert isinstance(ei.value.__cause__, msgspec.DecodeError)


def test_corrupt_with_entry_does_not_call_f(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data", reserve="c")
    (Path(spool.dir) / "queue1" / e.name).write_bytes(b"\xff")
    called: list[int] = []
    with pytest.raises(multispool.CorruptEntryError):
        spool.with_entry(e, lambda m, d: (called.append(1), None))  # type: ignore[arg-type, return-value]
    assert called == []
    assert (Path(spool.dir) / "queue1" / ".checkout" / e.name).read_bytes() == b"\xff"


# -- pickling -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "err",
    [
        multispool.SpoolError("plain"),
        multispool.NotASpoolError("dir is not empty while creating new spool", "/x/spool"),
        multispool.EntryNotFoundError("no such entry", "/x/spool/q/n"),
        multispool.EntryNotFoundError("no such entry"),
        multispool.CorruptEntryError("/x/spool/q/.checkout/n", "DecodeError: bad"),
        multispool.CorruptEntryError("/x/q/.checkout/n", "bad", quarantined_to="/x/bad/n"),
        multispool.InvalidNameError("../x", "contains a path separator"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_pickle(err: multispool.SpoolError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert back.args == err.args and str(back) == str(err)
    for attr in ("path", "reason", "name", "quarantined_to"):
        if hasattr(err, attr):
            assert getattr(back, attr) == getattr(err, attr)


def test_raised_errors_pickle(spool: multispool.Spool[Any, bytes], tmp_path: Path) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data", reserve="c")
    (Path(spool.dir) / "queue1" / e.name).write_bytes(b"{")
    raised: list[BaseException] = []
    for op in (
        lambda: spool.checkout(e),
        lambda: spool.checkout(multispool.Entry(spool, Queue.QUEUE2, "nope")),
        lambda: multispool.Entry(spool, Queue.QUEUE1, "a/b"),
        lambda: multispool.Spool.load(tmp_path / "missing", spool.spoolable),
    ):
        with pytest.raises(multispool.SpoolError) as ei:
            op()
        raised.append(ei.value)
    for err in raised:
        back = pickle.loads(pickle.dumps(err))
        assert (type(back), back.args, str(back)) == (type(err), err.args, str(err))


# -- OS errors keep their path --------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged user can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="multispool-perm-"))
    try:
        os.chmod(d, 0o755)
        yield d
    finally:
        shutil.rmtree(d)


PERM_CHILD = """
import enum, json, os, sys
import multispool
class Q(enum.Enum):
    QUEUE1 = "queue1"
    QUEUE2 = "queue2"
    QUEUE3 = "queue3"
os.setgid(65534)
os.setuid(65534)
sp = multispool.Spoolable(queues=Q)
out = {}
def attempt(label, f):
    try:
        f()
        out[label] = ["ok"]
    except Exception as e:
        out[label] = [type(e).__name__, str(e), getattr(e, "filename", None)]
spool_dir = sys.argv[1]
attempt("load", lambda: multispool.Spool.load(spool_dir, sp))
spool = multispool.Spool.load_unsafe(spool_dir, sp)
attempt("enqueue", lambda: spool.enqueue(Q.QUEUE1, 1, b"x"))
attempt("checkout", lambda: spool.checkout(multispool.Entry(spool, Q.QUEUE1, sys.argv[2])))
print(json.dumps(out))
"""


def _as_nobody(spool_dir: str, name: str) -> dict[str, list[Any]]:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges to nobody")
    r = run_python(PERM_CHILD, spool_dir, name)
    assert r.returncode == 0, r.stderr
    return msgspec.json.decode(r.stdout)  # type: ignore[no-any-return]


def _read_only_spool(shared_dir: Path) -> tuple[multispool.Spool[Any, bytes], Path, str]:
    # Readable by everyone, writable by root only: a read-only spool for "nobody".
    sp: multispool.Spoolable[Any, bytes] = multispool.Spoolable(
        queues=Queue, file_mode=0o644, dir_mode=0o755, name_generator=multispool.PrefixNames()
    )
    root = shared_dir / "spool"
    spool = multispool.Spool.create(root, sp)
    return spool, root, spool.enqueue(Queue.QUEUE1, 1, b"x", reserve="n").name


def test_permission_error_on_enqueue_keeps_its_path(shared_dir: Path) -> None:
    spool, root, name = _read_only_spool(shared_dir)
    before = find_sort(root)
    out = _as_nobody(str(root), name)
    assert out["load"] == ["ok"]
    kind, msg, filename = out["enqueue"]
    assert kind == "PermissionError" and filename and filename.startswith(str(root)), out
    assert str(root) in msg
    assert out["checkout"][0] == "PermissionError", out
    assert find_sort(root) == before  # nothing created, the entry still queued
    # The failed checkout released its lock: we can still check it out.
    spool.checkout(multispool.Entry(spool, Queue.QUEUE1, name)).remove()


def test_permission_error_on_checkout_keeps_its_path(shared_dir: Path) -> None:
    _spool, root, name = _read_only_spool(shared_dir)
    out = _as_nobody(str(root), name)
    kind, msg, filename = out["checkout"]
    assert kind == "PermissionError" and str(root / "queue1") in msg, out
    assert filename and filename.startswith(str(root / "queue1")), out



def test_unreadable_spool_is_a_permission_error_not_missing(shared_dir: Path) -> None:
    root = shared_dir / "spool"
    multispool.Spool.create(root, multispool.Spoolable(queues=Queue))  # 0700, owned by root
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    out = _as_nobody(str(root), "n")
    kind, msg, _ = out["load"]
    assert kind == "PermissionError" and str(root) in msg, out


@pytest.mark.parametrize("seed", ["../up", "a/b", "\0", ".hidden"])
def test_default_generator_checks_a_seeded_name(tmp_path: Path, seed: str) -> None:
    # The default generator's own names are not checked again on each enqueue; a seed
    # puts the caller's text into the name, which must be.
    spool = multispool.Spool.create(tmp_path / "spool", multispool.Spoolable(queues=Queue))
    before = find_sort(tmp_path)
    with pytest.raises(multispool.InvalidNameError):
        spool.enqueue(Queue.QUEUE1, {"a": 1}, b"x", reserve=seed)
    assert find_sort(tmp_path) == before


class BadTimeOrdered(multispool.TimeOrderedNames):
    def next(self, seed: Any, attempt: int) -> str:
        return "../" + super().next(seed, attempt)


def test_a_subclass_of_the_default_generator_is_checked(tmp_path: Path) -> None:
    spool = multispool.Spool.create(
        tmp_path / "spool", multispool.Spoolable(queues=Queue, name_generator=BadTimeOrdered())
    )
    before = find_sort(tmp_path)
    with pytest.raises(multispool.InvalidNameError):
        spool.enqueue(Queue.QUEUE1, {"a": 1}, b"x")
    assert find_sort(tmp_path) == before
