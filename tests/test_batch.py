"""enqueue_many, group commit of concurrent enqueues, and the order of the enqueue
pipeline's steps (write -> sync files -> sync dirs -> publish -> sync queue dir)."""

from __future__ import annotations

import asyncio
import errno
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import multispool
from _paths import full, open_fds, src_dst
from conftest import Cog, Queue
from multispool import _aio, _enqueue, _fs
from multispool.aio import AsyncSpool

# Owner locks held before each test (reservations other tests left): none may be added.
_HELD_BEFORE: set[int] = set()


@pytest.fixture(autouse=True, params=["aio", "threads"])
def sync_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs both ways a round's syncs are issued: all at once through Linux
    AIO, and from the sync pool's threads (where AIO is not to be had)."""
    if request.param == "aio":
        if not _aio._usable:
            pytest.skip("Linux AIO fsync is not available here")
    else:
        monkeypatch.setattr(_aio, "_usable", False)
    return str(request.param)


@pytest.fixture(autouse=True)
def _held_before() -> None:
    _HELD_BEFORE.clear()
    _HELD_BEFORE.update(_fs._held)


def _files(spool: multispool.Spool[Any]) -> dict[str, list[str]]:
    root = Path(spool.dir)
    return {
        d: sorted(os.listdir(root / d))
        for d in (".registry", ".tmp", ".data", "queue1", "queue1/.checkout", "queue2")
    }


def _empty(spool: multispool.Spool[Any]) -> dict[str, list[str]]:
    return {d: [] for d in _files(spool)} | {"queue1": [".checkout"], "queue2": [".checkout"]}


class _Trace:
    """Records the pipeline's disk steps, in order, across threads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, spool: multispool.Spool[Any]) -> None:
        self.ops: list[tuple[str, str]] = []
        self.root = spool.dir
        self._lock = threading.Lock()
        fsync_file, fsync_dir, rename = _fs.fsync_file, _fs.fsync_dir, os.rename

        def rec(kind: str, path: Any) -> None:
            with self._lock:
                self.ops.append((kind, os.path.relpath(os.fspath(path), self.root)))

        def t_fsync_file(p: str, fd: int | None = None) -> None:
            fsync_file(p, fd)
            rec("fsync", p)

        def t_fsync_dir(p: str) -> None:
            self.before_dir_sync(p)
            fsync_dir(p)
            rec("fsync_dir", p)

        def t_rename(a: Any, b: Any, **kw: Any) -> None:
            rename(a, b, **kw)
            rec("rename", full(b, kw.get("dst_dir_fd")))

        fsync_all = _aio.fsync_all

        def t_fsync_all(targets: Any) -> Any:
            for p, _, is_dir in targets:
                if is_dir:
                    self.before_dir_sync(p)
            errs = fsync_all(targets)
            for (p, _, is_dir), err in zip(targets, errs or [], strict=False):
                if err is None:
                    rec("fsync_dir" if is_dir else "fsync", p)
            return errs

        monkeypatch.setattr(_fs, "fsync_file", t_fsync_file)
        monkeypatch.setattr(_fs, "fsync_dir", t_fsync_dir)
        monkeypatch.setattr(_aio, "fsync_all", t_fsync_all)
        monkeypatch.setattr(os, "rename", t_rename)

    def before_dir_sync(self, path: str) -> None:
        pass

    def kinds(self) -> list[str]:
        return [k for k, _ in self.ops]


@pytest.fixture
def full_spool(tmp_path: Path) -> multispool.Spool[bytes]:
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, durability="full")
    return multispool.Spool.create(tmp_path / "spool", sp)


# -- enqueue_many -----------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["full", "file", "none"])
def test_enqueue_many_writes_every_entry_in_order(tmp_path: Path, durability: Any) -> None:
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, durability=durability)
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    entries = spool.enqueue_many(Queue.QUEUE2, ((Cog(n=i), b"d%d" % i) for i in range(25)))
    assert [e.queue for e in entries] == [Queue.QUEUE2] * 25
    assert [e.name for e in entries] == sorted(e.name for e in entries)  # creation order
    assert spool.list(Queue.QUEUE2) == entries
    assert [e.direct.contents() for e in entries] == [Cog(n=i) for i in range(25)]
    assert [e.direct.data_file().load() for e in entries] == [b"d%d" % i for i in range(25)]
    files = _files(spool)
    assert files[".tmp"] == [] and files["queue1"] == [".checkout"]
    assert files[".registry"] == files[".data"] == sorted(e.name for e in entries)
    assert _fs._held <= _HELD_BEFORE  # every owner lock it took released
    assert spool.enqueue_many(Queue.QUEUE1, []) == []


def test_enqueue_many_reserve_seed(tmp_path: Path) -> None:
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, name_generator=multispool.PrefixNames())
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    entries = spool.enqueue_many(Queue.QUEUE1, [(Cog(n=1), b""), (Cog(n=2), b"")], reserve="job_")
    assert [e.name for e in entries] == ["job_000000", "job_000001"]


def test_enqueue_many_full_syncs_each_directory_once(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The invariant, step by step: every file and directory sync of the batch comes
    before its first rename into the queue, and the queue dir is synced once, after."""
    tr = _Trace(monkeypatch, full_spool)
    entries = full_spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"x") for i in range(10)])
    kinds = tr.kinds()
    first_rename = kinds.index("rename")
    assert kinds[:first_rename].count("fsync") == 20  # 10 tmp + 10 data files
    assert sorted(p for k, p in tr.ops[:first_rename] if k == "fsync_dir") == [".data", ".registry"]
    assert kinds[first_rename:] == ["rename"] * 10 + ["fsync_dir"]
    assert tr.ops[-1] == ("fsync_dir", "queue1")
    synced = {p for k, p in tr.ops if k == "fsync"}
    assert synced == {f"{d}/{e.name}" for e in entries for d in (".tmp", ".data")}


def test_single_enqueue_needs_five_syncs_in_pipeline_order(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    tr = _Trace(monkeypatch, full_spool)
    e = full_spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    assert tr.ops == [
        ("fsync", f".tmp/{e.name}"),
        ("fsync", f".data/{e.name}"),
        ("fsync_dir", ".registry"),
        ("fsync_dir", ".data"),
        ("rename", f"queue1/{e.name}"),
        ("fsync_dir", "queue1"),
    ]


def test_enqueue_many_validates_every_item_before_touching_disk(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    tr = _Trace(monkeypatch, full_spool)
    with pytest.raises(TypeError):  # the 3rd item's data is not bytes
        full_spool.enqueue_many(Queue.QUEUE1, [(Cog(n=1), b""), (Cog(n=2), b""), (Cog(n=3), "str")])
    with pytest.raises(TypeError, match="item 1 is not a"):
        full_spool.enqueue_many(Queue.QUEUE1, [(Cog(n=1), b""), Cog(n=2)])  # type: ignore[list-item]
    with pytest.raises(TypeError):  # metadata that msgspec cannot encode
        full_spool.enqueue_many(Queue.QUEUE1, [(Cog(n=1), b""), (object(), b"")])
    assert tr.ops == []
    assert _files(full_spool) == _empty(full_spool)


class _FailingCodec:
    """Data codec whose save fails on the ``fail_at``-th call (0-based)."""

    def __init__(self, fail_at: int) -> None:
        self.calls = 0
        self.fail_at = fail_at

    def load(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def save(self, value: bytes, path: str) -> None:
        n, self.calls = self.calls, self.calls + 1
        Path(path).write_bytes(value)
        if n == self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device", path)


def _fail_on(monkeypatch: pytest.MonkeyPatch, target: Any, attr: str, when: Callable[[Any], bool]) -> None:
    orig = getattr(target, attr)

    def f(*a: Any, **kw: Any) -> Any:
        p = full(a[0], kw.get("dir_fd", kw.get("src_dir_fd")))
        if when(p):
            raise OSError(errno.EIO, "Input/output error", p)
        return orig(*a, **kw)

    monkeypatch.setattr(target, attr, f)


def _fail_sync(monkeypatch: pytest.MonkeyPatch, kind: str, when: Callable[[str], bool]) -> None:
    """fsyncs of files (``kind`` "file") or dirs ("dir") at paths ``when`` picks fail with
    EIO, whichever way they are issued (one by one, or together through AIO)."""
    _fail_on(monkeypatch, _fs, "fsync_file" if kind == "file" else "fsync_dir", when)
    fsync_all = _aio.fsync_all

    def failing(targets: Any) -> Any:
        errs = fsync_all(targets)
        if errs is None:
            return None
        return [
            OSError(errno.EIO, "Input/output error", p) if is_dir == (kind == "dir") and when(p) else err
            for (p, _, is_dir), err in zip(targets, errs, strict=True)
        ]

    monkeypatch.setattr(_aio, "fsync_all", failing)


@pytest.mark.parametrize("step", ["write", "sync_file", "sync_dir", "publish"])
def test_enqueue_many_failure_before_publishing_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Writeback errors (EIO from fsync) surface as exceptions naming the file; whatever
    step fails, nothing of the batch is left and its locks are released."""
    codec = _FailingCodec(fail_at=3 if step == "write" else -1)
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, data=codec, durability="full")
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    keep = spool.enqueue(Queue.QUEUE1, Cog(n=0), b"keep")
    renames = [0]
    if step == "sync_file":
        data_dir = spool.dir + "/.data/"
        _fail_sync(monkeypatch, "file", lambda p: p.startswith(data_dir) and keep.name not in p)
    elif step == "sync_dir":
        _fail_sync(monkeypatch, "dir", lambda p: p.endswith(".data"))
    elif step == "publish":

        def third_rename(p: Any) -> bool:
            if os.fspath(p).startswith(spool.dir + "/.tmp/"):
                renames[0] += 1
                return renames[0] == 3
            return False

        _fail_on(monkeypatch, os, "rename", third_rename)
    with pytest.raises(OSError) as ei:
        spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"%d" % i) for i in range(6)])
    assert ei.value.filename and ei.value.filename.startswith(spool.dir)
    monkeypatch.undo()
    assert spool.list(Queue.QUEUE1) == [keep]
    assert {d: f for d, f in _files(spool).items()} == _empty(spool) | {
        ".registry": [keep.name], ".data": [keep.name], "queue1": sorted([".checkout", keep.name])
    }
    assert _fs._held <= _HELD_BEFORE
    if step == "publish":
        assert renames[0] == 3


def test_enqueue_many_queue_dir_sync_failure_raises_after_publishing(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_on(monkeypatch, _fs, "fsync_dir", lambda p: p.endswith("queue1"))
    with pytest.raises(OSError) as ei:
        full_spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"") for i in range(3)])
    assert ei.value.filename.endswith("queue1")
    monkeypatch.undo()
    # Published (complete, files durable), so not removed: its queue entry may not be.
    assert len(full_spool.list(Queue.QUEUE1)) == 3
    assert _fs._held <= _HELD_BEFORE


def _published_error(err: BaseException | None, spool: multispool.Spool[bytes]) -> dict[int, str]:
    """Check ``err`` is the error of an enqueue that failed once entries were published:
    an OSError (the failure's errno and path) and a SpoolError whose message says, by
    name, what is queued and must not be enqueued again; returns its ``published``."""
    assert isinstance(err, OSError) and isinstance(err, multispool.SpoolError), repr(err)
    published: dict[int, str] = getattr(err, "published")  # noqa: B009
    assert published, "nothing published?"
    msg = str(err)
    assert all(n in msg for n in published.values()), msg
    assert "do not enqueue" in msg and os.path.join(spool.dir, "queue1") in msg, msg
    # Errors cross processes (workers): what was published survives pickling.
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert (type(again), again.errno, again.filename, again.published) == (
        type(err), err.errno, err.filename, published
    )
    return published


@pytest.mark.parametrize("where", ["main thread", "worker thread"])
def test_enqueue_whose_queue_dir_sync_fails_says_its_entry_is_published(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The entry is in its queue (a consumer may have it already) when the queue dir's
    sync fails: the error must not read as "not enqueued", which a caller retries into
    a duplicate. It says the entry was published, names it, and keeps the sync's errno
    and path."""
    _fail_on(monkeypatch, _fs, "fsync_dir", lambda p: p.endswith("queue1"))
    errs: list[BaseException] = []

    def run() -> None:
        try:
            full_spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
        except BaseException as e:
            errs.append(e)

    _run_in(where, run)
    monkeypatch.undo()
    [err] = errs
    published = _published_error(err, full_spool)
    assert isinstance(err, OSError) and err.errno == errno.EIO and err.filename.endswith("queue1")
    [entry] = full_spool.list(Queue.QUEUE1)
    assert published == {0: entry.name}
    assert entry.direct.contents() == Cog(n=1) and entry.direct.data_file().load() == b"x"
    assert _fs._held <= _HELD_BEFORE


def test_enqueue_many_whose_queue_dir_sync_fails_says_every_entry_is_published(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_on(monkeypatch, _fs, "fsync_dir", lambda p: p.endswith("queue1"))
    with pytest.raises(OSError) as ei:
        full_spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"%d" % i) for i in range(3)])
    monkeypatch.undo()
    published = _published_error(ei.value, full_spool)
    queued = full_spool.list(Queue.QUEUE1)
    assert published == {i: e.name for i, e in enumerate(queued)}
    assert [e.direct.contents() for e in queued] == [Cog(n=i) for i in range(3)]


def test_group_commit_queue_dir_sync_failure_names_each_members_own_entry(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, results = _group_of(full_spool, monkeypatch, 4, fail_queue_sync=True)
    assert isinstance(results[0], multispool.Entry)
    names = [_published_error(r, full_spool)[0] for r in results[1:]]
    assert sorted(e.name for e in full_spool.list(Queue.QUEUE1)) == sorted([results[0].name, *names])
    assert _fs._held <= _HELD_BEFORE


def test_enqueue_many_persistent_rename_fault_while_publishing(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rename fails from the third entry's on (a filesystem gone bad): the two
    published before it cannot be taken back (their renames back fail too). They stay
    queued, whole, and the error says which items they are; the rest of the batch is
    removed (no tmp, data or registry file) and every lock released."""
    rename = os.rename
    renames = [0]

    def failing(a: Any, b: Any, **kw: Any) -> None:
        src, dst = src_dst(a, b, kw)
        if src.startswith(full_spool.dir + "/.tmp/"):
            renames[0] += 1
        if renames[0] >= 3:
            raise OSError(errno.EIO, "Input/output error", src, None, dst)
        rename(a, b, **kw)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError) as ei:
        full_spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"%d" % i) for i in range(6)])
    monkeypatch.undo()
    published = _published_error(ei.value, full_spool)
    assert ei.value.errno == errno.EIO and "/.tmp/" in ei.value.filename  # the failed rename's
    assert "2 of 6" in str(ei.value), str(ei.value)
    queued = full_spool.list(Queue.QUEUE1)
    assert published == {0: queued[0].name, 1: queued[1].name}
    assert [e.direct.contents() for e in queued] == [Cog(n=0), Cog(n=1)]
    assert [e.direct.data_file().load() for e in queued] == [b"0", b"1"]
    names = sorted(published.values())
    assert _files(full_spool) == _empty(full_spool) | {
        ".registry": names, ".data": names, "queue1": sorted([".checkout", *names])
    }
    assert _fs._held <= _HELD_BEFORE


# -- group commit -------------------------------------------------------------------------


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def _group_of(
    spool: multispool.Spool[bytes],
    monkeypatch: pytest.MonkeyPatch,
    n: int,
    fail_queue_sync: bool = False,
    setup: Callable[[int], None] | None = None,
) -> tuple[_Trace, list[Any]]:
    """n threads enqueue at once; the first leader is held in its first directory sync
    until the n-1 others wait for the committer, so they form one group. ``setup(i)``
    runs first in thread i."""
    tr = _Trace(monkeypatch, spool)
    release = threading.Event()
    first = [True]
    queue_syncs = [0]

    def hold(path: str) -> None:
        if first[0]:
            first[0] = False
            release.wait(10)
        if path.endswith("queue1"):
            queue_syncs[0] += 1
            if fail_queue_sync and queue_syncs[0] == 2:  # the second group's
                raise OSError(errno.EIO, "Input/output error", path)

    tr.before_dir_sync = hold  # type: ignore[method-assign]
    results: list[Any] = [None] * n

    def worker(i: int) -> None:
        try:
            if setup is not None:
                setup(i)
            e = spool.enqueue(Queue.QUEUE1, Cog(n=i), b"%d" % i)
            # Returned: its own entry is published and its queue dir synced since.
            assert os.path.exists(os.path.join(spool.dir, "queue1", e.name))
            results[i] = e
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    try:
        threads[0].start()
        _wait_for(lambda: not first[0], "the first leader")
        for t in threads[1:]:
            t.start()
        # Each of the others waits for the committer, or has failed before it could.
        _wait_for(
            lambda: len(_enqueue._committer._waiting) + sum(r is not None for r in results[1:]) == n - 1,
            "the others to queue up",
        )
    finally:
        release.set()
        for t in threads:
            t.join(10)
    return tr, results


def test_group_commit_shares_directory_syncs(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    tr, results = _group_of(full_spool, monkeypatch, 8)
    assert all(isinstance(r, multispool.Entry) for r in results), results
    by_name: Callable[[Any], str] = lambda e: e.name  # noqa: E731
    assert sorted(full_spool.list(Queue.QUEUE1), key=by_name) == sorted(results, key=by_name)
    dir_syncs = [p for k, p in tr.ops if k == "fsync_dir"]
    # Two groups (the held leader alone, then the 7 others), three dir syncs each,
    # instead of 8 x 3 without group commit.
    assert sorted(dir_syncs) == sorted([".registry", ".data", "queue1"] * 2)
    assert [k for k, _ in tr.ops].count("fsync") == 16
    # The first group syncs its two dirs before anybody else syncs anything.
    assert dir_syncs[:2] == [".registry", ".data"]
    # Each group: its dir syncs, then its renames, then one queue sync. The second
    # group's dir syncs may run while the first syncs its queue dir (the two stages of
    # a round overlap), so the first group's queue sync is taken out before comparing.
    renames = [i for i, (k, _) in enumerate(tr.ops) if k == "rename"]
    first_q = tr.ops.index(("fsync_dir", "queue1"))
    assert renames[0] < first_q
    second = [op for i, op in enumerate(tr.ops) if i > renames[0] and i != first_q and op[0] != "fsync"]
    assert sorted(p for _, p in second[:2]) == [".data", ".registry"]
    assert [k for k, _ in second] == ["fsync_dir", "fsync_dir"] + ["rename"] * 7 + ["fsync_dir"]
    assert second[-1] == ("fsync_dir", "queue1")
    assert _fs._held <= _HELD_BEFORE


def test_group_commit_error_reaches_every_member(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, results = _group_of(full_spool, monkeypatch, 4, fail_queue_sync=True)
    assert isinstance(results[0], multispool.Entry)  # the first group synced fine
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results[1:]), results
    assert _fs._held <= _HELD_BEFORE


def test_next_group_publishes_while_a_leader_syncs_its_queue_dir(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only stage one of a round (file and dir syncs, publish) is exclusive: while one
    leader is held in its queue dir sync, another enqueue leads its own round, syncs
    its own queue dir and returns."""
    tr = _Trace(monkeypatch, full_spool)
    release = threading.Event()
    held = threading.Event()

    def hold(path: str) -> None:
        if path.endswith("queue1") and not held.is_set():
            held.set()
            release.wait(10)

    tr.before_dir_sync = hold  # type: ignore[method-assign]
    results: list[Any] = [None, None]

    def worker(i: int) -> None:
        try:
            results[i] = full_spool.enqueue(Queue.QUEUE1, Cog(n=i), b"%d" % i)
        except BaseException as e:
            results[i] = e

    first = threading.Thread(target=worker, args=(0,))
    second = threading.Thread(target=worker, args=(1,))
    try:
        first.start()
        _wait_for(held.is_set, "the first leader in its queue dir sync")
        second.start()
        # The second enqueue runs its whole round, and returns, while the first leader is
        # still held in its queue dir sync.
        _wait_for(lambda: not second.is_alive(), "the second enqueue to return")
        assert isinstance(results[1], multispool.Entry), results
        assert first.is_alive() and results[0] is None
        assert len(full_spool.list(Queue.QUEUE1)) == 2
    finally:
        release.set()
        first.join(10)
        second.join(10)
    assert all(isinstance(r, multispool.Entry) for r in results), results
    assert [p for k, p in tr.ops if k == "fsync_dir"].count("queue1") == 2
    assert _fs._held <= _HELD_BEFORE


class _Interrupt(BaseException):
    """What a signal handler's exception looks like to the committer."""


def test_interrupted_follower_woken_to_lead_passes_the_lead_on(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a leader's stage one wakes one follower to lead the next round. If an
    interrupt reaches that follower as it wakes, it withdraws its own enqueue and
    wakes another: no follower is left waiting for a leader that never comes."""
    committer = _enqueue._committer
    tr = _Trace(monkeypatch, full_spool)
    release = threading.Event()
    held = threading.Event()

    def hold(path: str) -> None:
        if not held.is_set():
            held.set()
            release.wait(10)

    tr.before_dir_sync = hold  # type: ignore[method-assign]
    interrupted: set[int] = set()
    real_sleep = committer._sleep

    def sleep(job: Any) -> None:
        real_sleep(job)  # woken: to lead, here
        if threading.get_ident() in interrupted:
            interrupted.discard(threading.get_ident())
            raise _Interrupt

    monkeypatch.setattr(committer, "_sleep", sleep)
    results: list[Any] = [None] * 3

    def worker(i: int, interrupt: bool = False) -> None:
        if interrupt:
            interrupted.add(threading.get_ident())
        try:
            results[i] = full_spool.enqueue(Queue.QUEUE1, Cog(n=i), b"%d" % i)
        except BaseException as e:
            results[i] = e

    # Daemons: a follower left waiting (the bug) must fail the test, not hang pytest.
    leader = threading.Thread(target=worker, args=(0,), daemon=True)
    first = threading.Thread(target=worker, args=(1, True), daemon=True)
    second = threading.Thread(target=worker, args=(2,), daemon=True)
    try:
        leader.start()
        _wait_for(held.is_set, "the leader in stage one")
        first.start()  # first in line: the one the leader's notify wakes
        _wait_for(lambda: committer._want_lead == 1, "the first follower waiting")
        second.start()
        _wait_for(lambda: committer._want_lead == 2, "the second follower waiting")
    finally:
        release.set()
        for t in (leader, first, second):
            t.join(10)
    assert not second.is_alive(), "the second follower was left waiting for a leader"
    assert isinstance(results[0], multispool.Entry) and isinstance(results[2], multispool.Entry), results
    assert isinstance(results[1], _Interrupt), results
    assert sorted(e.name for e in full_spool.list(Queue.QUEUE1)) == sorted(
        [results[0].name, results[2].name]
    )
    assert _files(full_spool)[".tmp"] == [] and len(_files(full_spool)[".registry"]) == 2
    assert _fs._held <= _HELD_BEFORE


def test_batch_sync_round_is_one_aio_submission(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch, sync_path: str
) -> None:
    """Where AIO is to be had, a batch's 2N file syncs and its dir syncs are all handed
    to the kernel in one call, none to the sync pool's threads."""
    if sync_path != "aio":
        pytest.skip("the AIO path")
    calls: list[list[tuple[str, bool]]] = []
    fsync_all = _aio.fsync_all

    def recording(targets: Any) -> Any:
        calls.append([(os.path.relpath(p, full_spool.dir), d) for p, _, d in targets])
        return fsync_all(targets)

    monkeypatch.setattr(_aio, "fsync_all", recording)
    monkeypatch.setattr(_enqueue._pool, "submit", None)  # any hand-off fails the batch
    entries = full_spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"x") for i in range(100)])
    assert len(calls) == 1
    assert sorted(calls[0]) == sorted(
        [(f"{d}/{e.name}", False) for e in entries for d in (".tmp", ".data")]
        + [(".registry", True), (".data", True)]
    )


def test_batch_sync_round_hands_each_pool_thread_one_share(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch, sync_path: str
) -> None:
    """From threads, a batch's 2N file syncs and its dir syncs go to at most SYNC_THREADS
    threads, the caller's included: SYNC_THREADS - 1 hand-offs, not one per file."""
    if sync_path != "threads":
        pytest.skip("the threads path")
    submits = [0]
    submit = _enqueue._pool.submit

    def counting(fn: Callable[[], None]) -> Any:
        submits[0] += 1
        return submit(fn)

    monkeypatch.setattr(_enqueue._pool, "submit", counting)
    tr = _Trace(monkeypatch, full_spool)
    full_spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"x") for i in range(100)])
    assert tr.kinds().count("fsync") == 200
    assert submits[0] == _enqueue.SYNC_THREADS - 1


def test_a_lone_enqueue_among_others_syncs_its_four_at_once(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch, sync_path: str
) -> None:
    """Alone in the process, an enqueue syncs its two files and two dirs one by one (the
    cheapest there); leading while other enqueues are under way (here one in its queue
    dir sync), it holds up their next round, so it hands all four to the kernel at once."""
    tr = _Trace(monkeypatch, full_spool)
    rounds: list[list[str]] = []
    fsync_all = _aio.fsync_all

    def recording(targets: Any) -> Any:
        rounds.append(sorted(os.path.relpath(p, full_spool.dir) for p, _, _ in targets))
        return fsync_all(targets)

    monkeypatch.setattr(_aio, "fsync_all", recording)
    first = full_spool.enqueue(Queue.QUEUE1, Cog(n=0), b"")
    assert rounds == []  # alone: one by one
    in_stage_two = threading.Event()
    release = threading.Event()

    def hold(path: str) -> None:
        if path.endswith("queue1") and not in_stage_two.is_set():
            in_stage_two.set()
            release.wait(10)

    tr.before_dir_sync = hold  # type: ignore[method-assign]
    other: list[Any] = []
    t = threading.Thread(target=lambda: other.append(full_spool.enqueue(Queue.QUEUE1, Cog(n=1), b"")))
    t.start()
    try:
        assert in_stage_two.wait(10)
        e = full_spool.enqueue(Queue.QUEUE1, Cog(n=2), b"")
    finally:
        release.set()
        t.join(10)
    assert isinstance(other[0], multispool.Entry) and first.name != e.name
    if sync_path == "aio":
        assert rounds == [sorted([f".tmp/{e.name}", f".data/{e.name}", ".registry", ".data"])]
    else:
        assert rounds == []  # without AIO, threads would cost it more than they save
        own = [op for op in tr.ops if e.name in op[1]]
        assert own[:2] == [("fsync", f".tmp/{e.name}"), ("fsync", f".data/{e.name}")]


def test_sync_pool_grows_past_threads_left_idle_by_a_smaller_round() -> None:
    """A round of SYNC_THREADS shares runs them all at once, also when a smaller round
    left only a few pool threads alive: idle threads count for one task each, not for
    every task queued before they wake."""
    assert _enqueue.run_all([lambda: None] * 3) == [None] * 3  # leaves (at least) 2 threads
    k = _enqueue.SYNC_THREADS
    together = threading.Barrier(k, timeout=10)  # broken unless k calls run at the same time
    errs = _enqueue.run_all([together.wait] * k)
    assert errs == [None] * k


def test_aio_enqueue_many_and_concurrent_enqueues(tmp_path: Path) -> None:
    async def main() -> None:
        sp = multispool.Spoolable(queues=Queue, metadata=Cog, durability="full")
        async with await AsyncSpool.create(tmp_path / "spool", sp) as spool:
            batch = await spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"") for i in range(5)])
            singles = await asyncio.gather(*(spool.enqueue(Queue.QUEUE1, Cog(n=i), b"") for i in range(20)))
            listed = await spool.list(Queue.QUEUE1)
            assert sorted(e.name for e in listed) == sorted(e.name for e in batch + list(singles))
            assert [await e.direct.contents() for e in batch] == [Cog(n=i) for i in range(5)]

    asyncio.run(main())


def test_group_commit_after_fork_is_fresh(full_spool: multispool.Spool[bytes]) -> None:
    """A child forked while a leader of the parent is mid-commit does not wait for it."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    committer = _enqueue._committer
    with committer._lock:
        committer._busy = True  # as if a leader were committing at fork time
        try:
            p = ctx.Process(target=_child_enqueue, args=(full_spool.dir,))
            p.start()
            p.join(20)
            if p.exitcode is None:
                p.kill()
                p.join()
        finally:
            committer._busy = False
    assert p.exitcode == 0
    assert len(full_spool.list(Queue.QUEUE1)) == 1


def test_the_thread_that_forks_is_the_childs_main_thread(full_spool: multispool.Spool[bytes]) -> None:
    """Signal handlers run in the main thread, which never joins a group: in a child
    forked from a worker thread, that thread is the main one (it commits on its own),
    while in the parent a worker thread is not."""
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    results: dict[str, object] = {}
    r, w = os.pipe()

    def worker() -> None:
        results["parent worker"] = _enqueue._in_main_thread()
        pid = os.fork()
        if pid == 0:  # the child: report, enqueue once, and leave without cleanup
            code = 1
            try:
                ok = _enqueue._in_main_thread()
                full_spool.enqueue(Queue.QUEUE1, Cog(n=1), b"from the child")
                os.write(w, b"1" if ok else b"0")
                code = 0
            finally:
                os._exit(code)
        results["pid"] = pid

    t = threading.Thread(target=worker)
    t.start()
    t.join(20)
    pid = results.get("pid")
    assert isinstance(pid, int)
    try:
        os.close(w)
        got = os.read(r, 1)
        deadline = time.monotonic() + 20
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the child's exit, with a deadline
        assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        os.close(r)
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert results["parent worker"] is False
    assert got == b"1"
    assert _enqueue._in_main_thread()  # pytest's main thread, here
    assert [e.direct.contents() for e in full_spool.list(Queue.QUEUE1)] == [Cog(n=1)]


class _Writers:
    """Records which thread wrote each enqueue's entry (``_enqueue.write``), by the n of
    its Cog metadata."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by_n: dict[int, int] = {}
        write = _enqueue.write

        def recording(spool: Any, staged: Any, dirname: str, items: Any, **kw: Any) -> None:
            for raw, _ in items:
                self.by_n[int(msgspec.json.decode(raw)["n"])] = threading.get_ident()
            write(spool, staged, dirname, items, **kw)

        monkeypatch.setattr(_enqueue, "write", recording)


def test_leader_writes_the_entries_of_enqueues_waiting_for_it(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enqueues that find a round under way wait with their entry unwritten; the next
    leader, one of them, writes all of them, then syncs them as one group."""
    writers = _Writers(monkeypatch)
    root = Path(full_spool.dir)
    seen_waiting: list[list[str]] = []
    real_take = _enqueue._committer._take

    def take(group: list[Any]) -> None:
        if len(_enqueue._committer._waiting) == 7:  # the second leader, before it writes
            seen_waiting.append(sorted(os.listdir(root / ".tmp")) + sorted(os.listdir(root / ".data")))
        real_take(group)

    monkeypatch.setattr(_enqueue._committer, "_take", take)
    tr, results = _group_of(full_spool, monkeypatch, 8)
    assert all(isinstance(r, multispool.Entry) for r in results), results
    # While they waited, only the first leader's entry was written (and published).
    assert seen_waiting and seen_waiting[0] == [results[0].name]
    followers = {writers.by_n[i] for i in range(1, 8)}
    assert len(followers) == 1, "one leader wrote every waiting entry"
    assert writers.by_n[0] != followers.pop()
    assert [k for k, _ in tr.ops].count("fsync_dir") == 6  # still two groups of syncs
    assert _files(full_spool)[".tmp"] == []
    assert _fs._held <= _HELD_BEFORE


class _PerThreadNames:
    """A name generator with per-thread state (as one reading a thread-local or a context
    variable would have): the name says which worker asked for it. Records the thread
    of every call."""

    def __init__(self) -> None:
        self.who = threading.local()
        self.threads: dict[int, set[int]] = {}

    def setup(self, i: int) -> None:
        self.who.i = i
        self.threads[i] = {threading.get_ident()}

    def next(self, seed: Any, attempt: int) -> str:
        i = self.who.i  # AttributeError in a thread that is no worker
        if i == 3:
            raise RuntimeError("no name for worker 3")
        self.threads[i].add(threading.get_ident())
        return f"w{i}-{attempt}"


def test_a_followers_names_are_generated_in_its_own_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader writes its followers' entries, but a NameGenerator is the user's code:
    run in the leader's thread, it saw the leader's thread-local state (the followers'
    entries got names of the leader's, after collisions), and a generator that raised
    there raised for a thread it was not called for. Each enqueue's names are proposed
    in its own thread, and its generator's error is its own."""
    names = _PerThreadNames()
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, durability="full", name_generator=names)
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    writers = _Writers(monkeypatch)
    _, results = _group_of(spool, monkeypatch, 6, setup=names.setup)
    err = results[3]
    assert isinstance(err, RuntimeError) and "worker 3" in str(err), results
    assert [r.name for i, r in enumerate(results) if i != 3] == [f"w{i}-0" for i in (0, 1, 2, 4, 5)]
    assert all(len(t) == 1 for t in names.threads.values()), "a generator ran in another thread"
    assert len({writers.by_n[i] for i in (1, 2, 4, 5)}) == 1, "one leader wrote the followers' entries"
    _assert_only_it_failed(spool, results, 3)


def test_followers_whose_proposed_names_are_taken_reserve_in_their_own_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PrefixNames with no seed proposes the same first name to every enqueue: in a group,
    all but one find it taken, and go on with the generator's next attempts in their own
    threads. Every entry is published, under a name of its own."""
    sp = multispool.Spoolable(
        queues=Queue, metadata=Cog, durability="full", name_generator=multispool.PrefixNames()
    )
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    calls: list[tuple[int, int]] = []  # (attempt, thread)
    callers: dict[int, int] = {}
    real_next = sp.name_generator.next

    def recording(seed: Any, attempt: int) -> str:
        calls.append((attempt, threading.get_ident()))
        return real_next(seed, attempt)

    monkeypatch.setattr(sp.name_generator, "next", recording)

    def setup(i: int) -> None:
        callers[i] = threading.get_ident()

    _, results = _group_of(spool, monkeypatch, 6, setup=setup)
    assert all(isinstance(r, multispool.Entry) for r in results), results
    assert sorted(r.name for r in results) == [f"None{k:06d}" for k in range(6)]
    assert sorted(e.name for e in spool.list(Queue.QUEUE1)) == sorted(r.name for r in results)
    first_proposals = [t for a, t in calls if a == 0]
    assert sorted(first_proposals) == sorted(callers.values()), "attempt 0 once per enqueue, in its thread"
    assert _files(spool)[".tmp"] == []
    assert _fs._held <= _HELD_BEFORE


def _assert_only_it_failed(spool: multispool.Spool[bytes], results: list[Any], failed: int) -> None:
    """Every enqueue of the group but ``failed`` is published, and nothing of the failed
    one's entry is left (no name, no tmp or data file, no descriptor)."""
    ok = [r for i, r in enumerate(results) if i != failed]
    assert all(isinstance(r, multispool.Entry) for r in ok), results
    names = sorted(r.name for r in ok)
    assert sorted(e.name for e in spool.list(Queue.QUEUE1)) == names
    files = _files(spool)
    assert files[".tmp"] == [] and files[".registry"] == names and files[".data"] == names
    assert _fs._held <= _HELD_BEFORE


def test_the_leader_closes_its_groups_files_before_publishing(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a group's files are synced, its leader closes them, each entry's before its
    rename: a follower woken at the end of the round closes nothing (its closes would
    contend with the next leader's opens for the descriptor guard)."""
    events: list[tuple[str, str, int]] = []  # (what, name, thread)
    close_files, publish = _enqueue.Staged.close_files, _enqueue.publish

    def closing(st: Any) -> None:
        if st.tmp_hold.fd is not None or st.data_hold.fd is not None:
            events.append(("close", st.name, threading.get_ident()))
        close_files(st)

    def publishing(staged: Any) -> None:
        for st in staged:
            events.append(("publish", st.name, threading.get_ident()))
        publish(staged)

    monkeypatch.setattr(_enqueue.Staged, "close_files", closing)
    monkeypatch.setattr(_enqueue, "publish", publishing)
    _, results = _group_of(full_spool, monkeypatch, 8)
    assert all(isinstance(r, multispool.Entry) for r in results), results
    for e in results[1:]:
        mine = [(what, thread) for what, name, thread in events if name == e.name]
        assert [what for what, _ in mine] == ["close", "publish"], (e.name, mine)
        assert mine[0][1] == mine[1][1], "closed by the thread that published it"
    leaders = {thread for what, name, thread in events if what == "publish" and name != results[0].name}
    assert len(leaders) == 1
    assert _fs._held <= _HELD_BEFORE


def test_a_close_that_fails_fails_its_enqueue_before_publishing(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network filesystem may report a write error only at close (EIO): the leader's
    close of a member's files fails that member's enqueue, naming the file, and nothing
    of its entry is left; the others of the group are published."""
    close_files = _enqueue.Staged.close_files
    bad = msgspec.json.encode(Cog(n=3))

    def closing(st: Any) -> None:
        # Its files are closed before its rename (publish closes any left open).
        doomed = st.tmp_hold.fd is not None and os.path.exists(st.tmp) and Path(st.tmp).read_bytes() == bad
        close_files(st)
        if doomed:
            raise OSError(errno.EIO, "Input/output error", st.tmp)

    monkeypatch.setattr(_enqueue.Staged, "close_files", closing)
    _, results = _group_of(full_spool, monkeypatch, 6)
    err = results[3]
    assert isinstance(err, OSError) and err.errno == errno.EIO, results
    assert err.filename and ".tmp" in err.filename
    _assert_only_it_failed(full_spool, results, 3)


def test_a_write_that_fails_in_the_leader_fails_only_its_own_enqueue(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader writes a follower's entry and the disk refuses it: that follower's call
    raises the error (naming the file), nothing of its entry is left, and the others of
    the group are published."""
    write_file = _fs.write_file

    def failing(path: str, contents: bytes, **kw: Any) -> Any:
        if contents == msgspec.json.encode(Cog(n=3)):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return write_file(path, contents, **kw)

    monkeypatch.setattr(_fs, "write_file", failing)
    writers = _Writers(monkeypatch)
    _, results = _group_of(full_spool, monkeypatch, 6)
    err = results[3]
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC, results
    assert err.filename and ".tmp" in err.filename
    assert writers.by_n[3] != writers.by_n[0]  # written (and failed) by the second leader
    _assert_only_it_failed(full_spool, results, 3)


def test_the_main_thread_commits_on_its_own(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch, sync_path: str
) -> None:
    """Signal handlers run in the main thread, and an exception one raises inside a wait
    on the committer's conditions would break them for every thread: the main thread
    never joins a group. Here it enqueues, writes and syncs its own entry, and returns,
    while another thread's leader is held in the middle of its round."""
    committer = _enqueue._committer
    writers = _Writers(monkeypatch)
    tr = _Trace(monkeypatch, full_spool)
    rounds: list[int] = []
    fsync_all = _aio.fsync_all

    def recording(targets: Any) -> Any:
        rounds.append(len(targets))
        return fsync_all(targets)

    monkeypatch.setattr(_aio, "fsync_all", recording)
    release, held = threading.Event(), threading.Event()

    def hold(path: str) -> None:
        if threading.current_thread() is not threading.main_thread() and not held.is_set():
            held.set()
            release.wait(10)

    tr.before_dir_sync = hold  # type: ignore[method-assign]
    other: list[Any] = []

    def worker() -> None:
        try:
            other.append(full_spool.enqueue(Queue.QUEUE1, Cog(n=0), b"0"))
        except BaseException as e:
            other.append(e)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        _wait_for(held.is_set, "the other thread's leader held in its round")
        assert committer._busy
        e = full_spool.enqueue(Queue.QUEUE1, Cog(n=1), b"1")
        assert not other, "the main thread waited for the other thread's round"
        assert (Path(full_spool.dir) / "queue1" / e.name).exists()
    finally:
        release.set()
        t.join(20)
    assert isinstance(other[0], multispool.Entry), other
    assert writers.by_n[1] == threading.main_thread().ident
    if sync_path == "aio":
        # Others under way: its two files and two dirs at once, as a leader would.
        assert 4 in rounds
    assert len(full_spool.list(Queue.QUEUE1)) == 2
    assert _fs._held <= _HELD_BEFORE


def test_many_threads_in_small_groups_each_enqueue_once(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 threads, rounds of at most 3: jobs left waiting when a round is full are led
    by a job woken for it, every call returns its own entry once, and nobody is left
    asleep (the threads are daemons: a hang fails the join, not pytest)."""
    monkeypatch.setattr(_enqueue, "GROUP_MAX", 3)
    sizes: list[int] = []
    publish_group = _enqueue._publish_group

    def recording(group: Any, crowded: bool = False) -> Any:
        sizes.append(len(group))
        return publish_group(group, crowded)

    monkeypatch.setattr(_enqueue, "_publish_group", recording)
    results: dict[int, Any] = {}
    start = threading.Barrier(24, timeout=10)

    def worker(i: int) -> None:
        start.wait()
        for k in range(20):
            try:
                results[i * 100 + k] = full_spool.enqueue(Queue.QUEUE1, Cog(n=i * 100 + k), b"x")
            except BaseException as e:
                results[i * 100 + k] = e

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread was left asleep"
    assert len(results) == 480 and all(isinstance(r, multispool.Entry) for r in results.values())
    names = sorted(r.name for r in results.values())
    assert len(set(names)) == 480
    assert sorted(e.name for e in full_spool.list(Queue.QUEUE1)) == names
    assert max(sizes) <= 3 and sizes.count(3) > 0  # full rounds happened, none over the cap
    committer = _enqueue._committer
    assert (committer._waiting, committer._busy, committer._want_lead, committer._active) == ([], False, 0, 0)
    assert _fs._held <= _HELD_BEFORE


def test_an_entry_whose_data_runs_user_code_is_written_by_its_own_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only bytes are written by the leader: a data codec's own save() (user code, maybe
    slow, maybe relying on its thread) runs in the enqueue's own thread."""
    savers: dict[int, int] = {}

    class Saving:
        def load(self, path: str) -> bytes:
            return Path(path).read_bytes()

        def save(self, value: bytes, path: str) -> None:
            savers[int(value)] = threading.get_ident()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, value)
            finally:
                os.close(fd)

    sp = multispool.Spoolable(queues=Queue, metadata=Cog, data=Saving(), durability="full")
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    callers: dict[int, int] = {}
    start = threading.Barrier(6, timeout=10)

    def worker(i: int) -> None:
        start.wait()
        for k in range(5):
            callers[i * 10 + k] = threading.get_ident()
            spool.enqueue(Queue.QUEUE1, Cog(n=i), b"%d" % (i * 10 + k))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert savers == callers
    assert len(spool.list(Queue.QUEUE1)) == 30


def test_leader_writes_only_single_enqueues_of_bytes_synced_by_a_group(tmp_path: Path) -> None:
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, durability="full")
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    one = [spool._encode_item(Cog(n=1), b"x")]
    assert not _enqueue._leader_writes(spool, one, None)  # the main thread joins no group
    answers: list[bool] = []

    def in_a_thread() -> None:
        answers.append(_enqueue._leader_writes(spool, one, None))
        answers.append(_enqueue._leader_writes(spool, one * 2, None))  # a batch writes its own
        answers.append(_enqueue._leader_writes(spool, one, 3))  # syncfs
        for durability in ("file", "none"):
            weaker = multispool.Spoolable(queues=Queue, metadata=Cog, durability=durability)
            answers.append(_enqueue._leader_writes(multispool.Spool.load(spool.dir, weaker), one, None))

    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join(10)
    assert answers == [True, False, False, False, False]


def test_write_out_starts_every_file_then_waits_for_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    real = _fs._write_out_range

    def recording(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((os.fstat(fd).st_ino, flags))
        return int(real(fd, offset, nbytes, flags)) if real is not None else 0

    monkeypatch.setattr(_fs, "_write_out_range", recording)
    paths = [str(tmp_path / f"f{i}") for i in range(3)]
    for p in paths:
        Path(p).write_bytes(b"x" * 100)
    before = open_fds()
    # A path not there: skipped. A file given with its descriptor: written out through it.
    mine = os.open(paths[2], os.O_RDONLY)
    try:
        files: list[tuple[str, int | None]] = [(paths[0], None), (paths[1], None), (paths[2], mine)]
        opened: list[str] = []
        open_held = _fs._open_held

        def counting(path: str, *a: Any, **kw: Any) -> int:
            opened.append(path)
            return open_held(path, *a, **kw)

        monkeypatch.setattr(_fs, "_open_held", counting)
        errs = _fs.write_out([*files, (str(tmp_path / "missing"), None)])
    finally:
        os.close(mine)
    assert errs == [None] * 4
    assert opened == [paths[0], paths[1], str(tmp_path / "missing")]
    assert open_fds() == before and _fs._held <= _HELD_BEFORE
    inos = [os.stat(p).st_ino for p in paths]
    assert calls == [(i, 2) for i in inos] + [(i, 7) for i in inos]  # all started, then each waited


def test_a_group_round_writes_out_its_files_before_the_fsyncs(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch, sync_path: str
) -> None:
    """Through AIO, a round of several files first has every file written back (so the
    first log force takes in all of them), then fsyncs them all; not in the main thread."""
    events: list[tuple[str, Any]] = []
    write_out, fsync_all = _fs.write_out, _aio.fsync_all

    def rec_write_out(files: Any) -> Any:
        events.append(("write_out", sorted(os.path.basename(p) for p, _ in files)))
        return write_out(files)

    def rec_fsync_all(targets: Any) -> Any:
        events.append(("fsync_all", sorted(os.path.basename(p) for p, _, d in targets if not d)))
        return fsync_all(targets)

    monkeypatch.setattr(_fs, "write_out", rec_write_out)
    monkeypatch.setattr(_aio, "fsync_all", rec_fsync_all)
    _, results = _group_of(full_spool, monkeypatch, 4)
    assert all(isinstance(r, multispool.Entry) for r in results), results
    if sync_path == "threads":
        assert not [e for e in events if e[0] == "write_out"]
        return
    # The second round (3 followers): written out, then synced, the same files.
    outs = [e for e in events if e[0] == "write_out"]
    assert outs, events
    i = events.index(outs[-1])
    assert events[i + 1][0] == "fsync_all" and events[i + 1][1] == outs[-1][1]
    assert len(outs[-1][1]) == 6
    events.clear()
    full_spool.enqueue_many(Queue.QUEUE1, [(Cog(n=9), b"a"), (Cog(n=10), b"b")])  # main thread
    assert [e[0] for e in events] == ["fsync_all"]


def test_a_writeback_error_seen_while_writing_out_fails_its_own_enqueue(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch, sync_path: str
) -> None:
    """The wait of ``write_out`` reports a writeback error once and marks it seen: an
    fsync through a descriptor opened afterwards would return success. So the error it
    returns is its file's: that enqueue raises it (naming the file) and leaves nothing,
    and the others of the group are published."""
    import ctypes

    if sync_path != "aio":
        pytest.skip("write-out goes with the AIO path")
    real = _fs._write_out_range
    failed: list[str] = []

    def failing(fd: int, offset: int, nbytes: int, flags: int) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if flags != 2 and not failed and path.endswith(tuple(f"/.data/{n}" for n in names)):
            failed.append(path)
            ctypes.set_errno(errno.EIO)
            return -1
        return int(real(fd, offset, nbytes, flags))

    names: list[str] = []  # proposed or reserved by the enqueuing threads

    def noting(real: Callable[..., str]) -> Callable[..., str]:
        def note(*a: Any, **kw: Any) -> str:
            name = str(real(*a, **kw))
            if threading.current_thread() is not threading.main_thread():
                names.append(name)
            return name

        return note

    monkeypatch.setattr(full_spool, "_reserve", noting(full_spool._reserve))
    monkeypatch.setattr(full_spool, "_propose", noting(full_spool._propose))
    monkeypatch.setattr(_fs, "_write_out_range", failing)
    _, results = _group_of(full_spool, monkeypatch, 4)
    assert len(failed) == 1, results
    errs = [r for r in results if isinstance(r, OSError)]
    assert len(errs) == 1 and errs[0].errno == errno.EIO and errs[0].filename == failed[0], results
    ok = sorted(r.name for r in results if isinstance(r, multispool.Entry))
    assert len(ok) == 3
    assert sorted(e.name for e in full_spool.list(Queue.QUEUE1)) == ok
    files = _files(full_spool)
    assert files[".tmp"] == [] and files[".data"] == ok and files[".registry"] == ok
    assert _fs._held <= _HELD_BEFORE


def _child_enqueue(path: str) -> None:
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, durability="full")
    multispool.Spool.load(path, sp).enqueue(Queue.QUEUE1, Cog(n=1), b"")


# -- writeback started as each file is written ----------------------------------------


class _Writeback:
    """Records, by inode, each writeback hint (``_fs._sync_file_range``) and each fsync of
    a regular file, in order, across threads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, result: int = 0) -> None:
        self.ops: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        fsync_fd = _fs.fsync_fd

        def hint(fd: int, offset: Any, nbytes: Any, flags: int) -> int:
            # The whole file (the C int64s 0, as libc is called: no argtypes to convert
            # them), SYNC_FILE_RANGE_WRITE only.
            assert (offset.value, nbytes.value, flags) == (0, 0, 2)
            self._rec("hint", fd)
            return result

        def t_fsync_fd(fd: int) -> None:
            fsync_fd(fd)
            self._rec("fsync", fd)

        fsync_all = _aio.fsync_all

        def t_fsync_all(targets: Any) -> Any:
            inos = [None if is_dir else os.stat(p).st_ino for p, _, is_dir in targets]
            errs = fsync_all(targets)
            for ino, err in zip(inos, errs or [], strict=False):
                if ino is not None and err is None:
                    with self._lock:
                        self.ops.append(("fsync", ino))
            return errs

        monkeypatch.setattr(_fs, "_sync_file_range", hint)
        monkeypatch.setattr(_fs, "fsync_fd", t_fsync_fd)
        monkeypatch.setattr(_aio, "fsync_all", t_fsync_all)

    def _rec(self, kind: str, fd: int) -> None:
        st = os.fstat(fd)
        if not os.path.isdir(f"/proc/self/fd/{fd}") and st.st_mode & 0o170000 == 0o100000:
            with self._lock:
                self.ops.append((kind, st.st_ino))

    def of(self, kind: str) -> list[int]:
        return [ino for k, ino in self.ops if k == kind]


def _inodes(spool: multispool.Spool[Any], entries: list[multispool.Entry[Any, Any]]) -> set[int]:
    """The inodes of the entries' metadata and data files (the tmp file is the metadata
    file, renamed)."""
    return {
        os.stat(os.path.join(spool.dir, d, e.name)).st_ino for e in entries for d in (e.queue.value, ".data")
    }


@pytest.mark.parametrize("durability", ["full", "file"])
@pytest.mark.parametrize("how", ["single", "batch", "threads"])
def test_files_synced_one_by_one_start_writeback_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: Any, how: str, sync_path: str
) -> None:
    """Files whose fsyncs will be issued one by one or from threads (a lone enqueue; any
    enqueue where AIO is not to be had) get their writeback started when written, before
    any fsync of the enqueue: on ext4 and xfs that puts every block allocation into one
    journal transaction, committed once. Files a batch syncs together through AIO do not
    (the hints would cost more than they save there). Every file is fsynced all the same."""
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, durability=durability)
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    wb = _Writeback(monkeypatch)
    entries: list[multispool.Entry[Any, Any]] = []
    if how == "single":
        entries.append(spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x"))
    elif how == "batch":
        entries += spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"x") for i in range(10)])
    else:
        lock = threading.Lock()

        def one(i: int) -> None:
            e = spool.enqueue(Queue.QUEUE1, Cog(n=i), b"x")
            with lock:
                entries.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    files = _inodes(spool, entries)
    assert set(wb.of("fsync")) == files  # each fsynced: the hint makes nothing durable
    hinted = set(wb.of("hint"))
    assert len(wb.of("hint")) == len(hinted) <= len(files)
    if how == "single" or sync_path == "threads":
        assert hinted == files
    elif how == "batch":
        assert hinted == set()
    # (Concurrent enqueues in AIO mode: hinted or not by whether others were under way.)
    if how != "threads" and hinted:  # concurrent enqueues interleave; each file's own order holds
        last_hint = max(i for i, (k, _) in enumerate(wb.ops) if k == "hint")
        first_fsync = min(i for i, (k, _) in enumerate(wb.ops) if k == "fsync")
        assert last_hint < first_fsync
    for ino in hinted:
        assert wb.ops.index(("hint", ino)) < wb.ops.index(("fsync", ino))


def test_no_writeback_hint_without_file_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Durability "none" syncs nothing, so it asks for no early writeback either."""
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, durability="none")
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    wb = _Writeback(monkeypatch)
    spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"x") for i in range(5)])
    assert wb.ops == []


def test_a_failed_writeback_hint_changes_nothing(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hint's result is not the check: the fsyncs that follow are."""
    wb = _Writeback(monkeypatch, result=-1)
    entries = [full_spool.enqueue(Queue.QUEUE1, Cog(n=i), b"d%d" % i) for i in range(4)]
    assert [e.direct.data_file().load() for e in entries] == [b"d%d" % i for i in range(4)]
    assert set(wb.of("fsync")) == set(wb.of("hint")) == _inodes(full_spool, entries)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_hint_is_real_on_linux(tmp_path: Path) -> None:
    """On Linux the hint is libc's sync_file_range, and it accepts a file just written."""
    assert _fs._sync_file_range is not None
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"x" * 10000)
        assert _fs._sync_file_range(fd, _fs._WHOLE, _fs._WHOLE, 2) == 0  # as the library calls it
        _fs.start_writeback(fd)
    finally:
        os.close(fd)


# -- syncfs (opt-in) ----------------------------------------------------------------------

needs_syncfs = pytest.mark.skipif(not _fs.HAVE_SYNCFS, reason="needs syncfs with errors: Linux >= 5.8")


@needs_syncfs
def test_syncfs_batch_one_syncfs_opened_before_the_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, syncfs=True)
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    tr = _Trace(monkeypatch, spool)
    open_syncfs, syncfs, write_file = _fs.open_syncfs, _fs.syncfs, _fs.write_file

    def t_open(p: str) -> int:
        tr.ops.append(("open_syncfs", os.path.relpath(p, spool.dir)))
        return open_syncfs(p)

    def t_syncfs(fd: int, p: str) -> None:
        syncfs(fd, p)
        tr.ops.append(("syncfs", os.path.relpath(p, spool.dir)))

    def t_write(p: str, *a: Any, **kw: Any) -> None:
        tr.ops.append(("write", os.path.relpath(p, spool.dir)))
        write_file(p, *a, **kw)

    monkeypatch.setattr(_fs, "open_syncfs", t_open)
    monkeypatch.setattr(_fs, "syncfs", t_syncfs)
    monkeypatch.setattr(_fs, "write_file", t_write)
    entries = spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"x") for i in range(5)])
    kinds = tr.kinds()
    assert kinds[0] == "open_syncfs"
    assert kinds[kinds.index("syncfs") + 1 :] == ["rename"] * 5 + ["fsync_dir"]
    assert "fsync" not in kinds and kinds.count("fsync_dir") == 1  # the queue dir, after
    assert [e.direct.contents() for e in entries] == [Cog(n=i) for i in range(5)]
    # A single enqueue keeps fsync: syncfs would sync the whole filesystem for one entry.
    tr.ops.clear()
    spool.enqueue(Queue.QUEUE1, Cog(n=9), b"")
    assert "syncfs" not in tr.kinds() and tr.kinds().count("fsync") == 2


@needs_syncfs
def test_syncfs_batch_starts_no_writeback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A syncfs merges the writeback of everything; early per-file writeback would split
    it. A single enqueue of the same spool (fsyncs) still starts it."""
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, syncfs=True)
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    wb = _Writeback(monkeypatch)
    spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"x") for i in range(5)])
    assert wb.of("hint") == []
    e = spool.enqueue(Queue.QUEUE1, Cog(n=9), b"")
    assert set(wb.of("hint")) == _inodes(spool, [e])


@needs_syncfs
def test_syncfs_error_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, syncfs=True)
    spool = multispool.Spool.create(tmp_path / "spool", sp)

    def failing(fd: int, p: str) -> None:
        raise OSError(errno.EIO, "Input/output error", p)

    monkeypatch.setattr(_fs, "syncfs", failing)
    with pytest.raises(OSError) as ei:
        spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"x") for i in range(3)])
    assert ei.value.errno == errno.EIO and ei.value.filename == spool.dir
    assert _files(spool) == _empty(spool)
    assert _fs._held <= _HELD_BEFORE


def test_syncfs_is_off_by_default() -> None:
    assert multispool.Spoolable(queues=Queue).syncfs is False


@pytest.mark.parametrize("n", [1, 2])
def test_interrupt_right_after_a_publishing_rename_keeps_what_was_published(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    """KeyboardInterrupt (or a signal handler's exception) just after the n-th rename
    into the queue: the n entries renamed are queued and whole (their files were synced
    before), the rest of the batch is gone, and no lock is left."""
    rename = os.rename
    count = [0]

    def interrupted(a: Any, b: Any, **kw: Any) -> None:
        dst = full(b, kw.get("dst_dir_fd"))
        rename(a, b, **kw)
        if dst.startswith(os.path.join(full_spool.dir, "queue1")):
            count[0] += 1
            if count[0] == n:
                raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        full_spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"x%d" % i) for i in range(3)])
    monkeypatch.undo()
    queued = full_spool.list(Queue.QUEUE1)
    assert [e.direct.contents() for e in queued] == [Cog(n=i) for i in range(n)]
    assert [e.direct.data_file().load() for e in queued] == [b"x%d" % i for i in range(n)]
    names = sorted(e.name for e in queued)
    assert _files(full_spool) == _empty(full_spool) | {
        ".registry": names, ".data": names, "queue1": sorted([".checkout", *names])
    }
    assert _fs._held <= _HELD_BEFORE


# -- written files synced through the writer's descriptors ------------------------------


class _Opens:
    """Counts os.open calls per path, and fsyncs per inode (through whatever descriptor)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opens: dict[str, int] = {}
        self.lock = threading.Lock()
        real_open = os.open

        def counting(path: Any, *a: Any, **kw: Any) -> int:
            p = full(path, kw.get("dir_fd"))
            with self.lock:
                self.opens[p] = self.opens.get(p, 0) + 1
            return real_open(path, *a, **kw)

        monkeypatch.setattr(os, "open", counting)


def _run_in(where: str, run: Callable[[], None]) -> None:
    """Run ``run`` in the main thread, or in a thread of its own ("worker thread"), whose
    end is waited for (30 s at most)."""
    if where == "main thread":
        run()
        return
    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the thread is still running"


@pytest.mark.parametrize("where", ["main thread", "worker thread"])
def test_written_files_are_synced_through_the_descriptors_that_wrote_them(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Each tmp and data file is opened once, to be written; its write-out and fsync go
    through that descriptor (an error of its writeback is reported there, whoever else
    saw it), which is closed once the entry is published."""
    full_spool.enqueue(Queue.QUEUE1, Cog(n=-1), b"")  # what is opened once per process
    opens = _Opens(monkeypatch)
    before = open_fds()
    out: list[Any] = []

    def run() -> None:
        try:
            out.extend(full_spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"%d" % i) for i in range(5)]))
            out.append(full_spool.enqueue(Queue.QUEUE1, Cog(n=5), b"5"))
        except BaseException as e:
            out.append(e)

    _run_in(where, run)
    assert len(out) == 6 and all(isinstance(e, multispool.Entry) for e in out), out
    root = full_spool.dir
    for e in out:
        assert opens.opens.get(os.path.join(root, ".tmp", e.name)) == 1, opens.opens
        assert opens.opens.get(os.path.join(root, ".data", e.name)) == 1, opens.opens
    assert open_fds() == before and _fs._held <= _HELD_BEFORE


def test_a_batch_whose_files_do_not_fit_the_limit_syncs_them_by_path(
    full_spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the limit on open files leaves room for a batch's locks but not for its
    files too, the files are closed once written and synced by path: durable all the
    same."""
    asked: list[tuple[int, int]] = []
    make_room = _fs.make_room_for_locks

    def no_room_for_files(n: int, where: str, extra: int = 0) -> bool:
        asked.append((n, extra))
        make_room(n, where)
        return False

    monkeypatch.setattr(_fs, "make_room_for_locks", no_room_for_files)
    opens = _Opens(monkeypatch)
    entries = full_spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"%d" % i) for i in range(4)])
    assert asked == [(4, 8)]
    for e in entries:
        # Written, then reopened for the fsync (and, through AIO in a thread, to write out).
        assert opens.opens[os.path.join(full_spool.dir, ".data", e.name)] >= 2
    assert [e.direct.contents() for e in entries] == [Cog(n=i) for i in range(4)]
    assert _fs._held <= _HELD_BEFORE


@pytest.mark.parametrize("durability", ["full", "file"])
def test_an_interrupt_between_an_entrys_closes_leaves_nothing_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """A signal handler's exception between the closes of an entry's two files, which
    come before its publishing rename: the enqueue raises it, the entry is not queued,
    nothing of it is left, its other file is closed and its lock released."""
    spool = multispool.Spool.create(
        str(tmp_path / "sp"), multispool.Spoolable(queues=Queue, metadata=Cog, durability=durability)
    )
    spool.enqueue(Queue.QUEUE1, Cog(n=-1), b"")  # what is opened once per process
    real = _enqueue.Staged.close_files
    hit: list[bool] = []

    def interrupted(self: _enqueue.Staged) -> None:
        if not hit and self.data_hold.fd is not None:
            assert not self.published and os.path.exists(self.tmp)
            hit.append(True)
            _fs._close_held(self.tmp_hold.fd, self.tmp_hold)  # type: ignore[arg-type]
            raise KeyboardInterrupt  # as the first close returns
        real(self)

    monkeypatch.setattr(_enqueue.Staged, "close_files", interrupted)
    before = open_fds()
    with pytest.raises(KeyboardInterrupt):
        spool.enqueue(Queue.QUEUE1, Cog(n=1), b"1")
    assert hit
    assert open_fds() == before and _fs._held <= _HELD_BEFORE
    assert [e.direct.contents() for e in spool.list(Queue.QUEUE1)] == [Cog(n=-1)]
    for d, left in ((".tmp", 0), (".data", 1), (".registry", 1)):
        assert len(os.listdir(tmp_path / "sp" / d)) == left, (d, os.listdir(tmp_path / "sp" / d))
    # Its lock was released with the rest: the next enqueue goes through.
    spool.enqueue(Queue.QUEUE1, Cog(n=2), b"2")


@pytest.mark.parametrize("durability", ["full", "file"])
@pytest.mark.parametrize("where", ["main thread", "worker thread"])
def test_an_entry_is_never_published_with_a_file_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str, where: str
) -> None:
    """Every path that publishes (a lone enqueue in the main thread or another, a batch,
    durability "full" or "file") has closed the entry's files before its rename: a close
    after it would be a close in the queue, a second wake of its readers."""
    spool = multispool.Spool.create(
        str(tmp_path / "sp"), multispool.Spoolable(queues=Queue, metadata=Cog, durability=durability)
    )
    qdir = os.path.join(spool.dir, Queue.QUEUE1.value)
    rename = os.rename
    published: list[str] = []
    open_at_rename: list[str] = []

    def renaming(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        s, d = src_dst(src, dst, kw)
        if os.path.dirname(d) == qdir:
            name = os.path.basename(s)
            published.append(name)
            mine = {s, os.path.join(spool.dir, ".data", name)}
            for fd in os.listdir("/proc/self/fd"):
                try:
                    target = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    continue  # closed meanwhile (the listing's own descriptor)
                if target in mine:
                    open_at_rename.append(target)
        rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", renaming)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            spool.enqueue(Queue.QUEUE1, Cog(n=0), b"0")
            spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"%d" % i) for i in range(1, 4)])
        except BaseException as e:
            errors.append(e)

    _run_in(where, run)
    assert errors == []
    assert len(published) == 4, published
    assert open_at_rename == []
    assert sorted(e.direct.contents().n for e in spool.list(Queue.QUEUE1)) == [0, 1, 2, 3]


@pytest.mark.parametrize("durability", ["full", "file"])
@pytest.mark.parametrize("how", ["enqueue", "enqueue_many"])
def test_a_close_that_fails_fails_a_lone_enqueue_before_publishing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str, how: str
) -> None:
    """Outside a group too (the main thread, durability "file", a batch): a close that
    reports a write error (a network filesystem's EIO) fails the enqueue, naming the
    file, and nothing of it is left: it is not queued, its name and files are gone, and
    no descriptor stays open."""
    spool = multispool.Spool.create(
        str(tmp_path / "sp"), multispool.Spoolable(queues=Queue, metadata=Cog, durability=durability)
    )
    spool.enqueue(Queue.QUEUE1, Cog(n=-1), b"")  # what is opened once per process
    close_files = _enqueue.Staged.close_files
    failed: list[str] = []

    def closing(st: Any) -> None:
        opened = st.tmp_hold.fd is not None
        close_files(st)
        if opened and not failed:
            failed.append(st.tmp)
            raise OSError(errno.EIO, "Input/output error", st.tmp)

    monkeypatch.setattr(_enqueue.Staged, "close_files", closing)
    before = open_fds()
    with pytest.raises(OSError) as info:
        if how == "enqueue":
            spool.enqueue(Queue.QUEUE1, Cog(n=1), b"1")
        else:
            spool.enqueue_many(Queue.QUEUE1, [(Cog(n=1), b"1"), (Cog(n=2), b"2")])
    assert info.value.errno == errno.EIO and info.value.filename == failed[0]
    assert [e.direct.contents() for e in spool.list(Queue.QUEUE1)] == [Cog(n=-1)]
    files = _files(spool)
    assert files[".tmp"] == [] and len(files[".registry"]) == 1 and len(files[".data"]) == 1
    assert open_fds() == before and _fs._held <= _HELD_BEFORE
