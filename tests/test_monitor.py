"""Monitor (fsck) and MonitorDaemon: the OCaml "Monitor: ..." expect tests, ported, plus
ordering, hashing, races and the daemon's start/end cycle."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import multispool
from conftest import Cog, Queue
from multispool import (
    DeadCheckout,
    Dir,
    Duplicated,
    End,
    FileWithMtime,
    Limits,
    Monitor,
    Orphaned,
    Start,
    TooOld,
    _fs,
)
from multispool._monitor import _Alerter

DAY = 86400.0


def make(spool: multispool.Spool[Any, bytes], **limits: object) -> Monitor:
    lim = Limits(
        max_checked_out_age=limits.pop("max_checked_out_age", DAY),  # type: ignore[arg-type]
        max_tmp_file_age=limits.pop("max_tmp_file_age", DAY),  # type: ignore[arg-type]
        max_queue_ages=limits.pop("max_queue_ages", None),  # type: ignore[arg-type]
    )
    assert not limits
    return Monitor(spool.dir, spool.spoolable, lim)


def touch(spool: multispool.Spool[Any, bytes], d: Dir, name: str, age: float = 0.0) -> None:
    path = os.path.join(spool.dir, d.name_on_disk, name)
    Path(path).touch()
    if age:
        t = time.time() - age
        os.utime(path, (t, t))


def rm(spool: multispool.Spool[Any, bytes], d: Dir, name: str) -> None:
    os.unlink(os.path.join(spool.dir, d.name_on_disk, name))


@contextlib.contextmanager
def owner(spool: multispool.Spool[bytes], name: str) -> Iterator[None]:
    """Hold ``name``'s owner lock, as a live process holding a checkout does."""
    gen = _fs.lock_generation()
    fd = _fs.open_locked(os.path.join(spool.dir, ".registry", name))
    assert fd is not None
    try:
        yield
    finally:
        _fs.unlock(fd, gen)


def shape(problems: list[multispool._monitor.Problem]) -> list[tuple[object, ...]]:
    """Problems without mtimes (the OCaml tests print ``mtime <omitted>``)."""
    out: list[tuple[object, ...]] = []
    for p in problems:
        where = p.dirs if isinstance(p, Duplicated) else p.dir
        out.append((type(p).__name__, p.file.filename, where))
    return out


Q1, Q2 = Dir.queue(Queue.QUEUE1), Dir.queue(Queue.QUEUE2)
CO1 = Dir.checkout(Queue.QUEUE1)


def test_empty(spool: multispool.Spool[Any, bytes]) -> None:
    assert make(spool).run_once() == []


@pytest.mark.parametrize("where", [Q1, CO1], ids=["queue", "checkout"])
def test_registered_entry_no_issues(spool: multispool.Spool[Any, bytes], where: Dir) -> None:
    touch(spool, Dir.REGISTRY, "foo")
    touch(spool, where, "foo")
    with owner(spool, "foo"):  # a checkout is only healthy while its owner lives
        assert make(spool).run_once() == []


def test_queue_entry_with_tmp_file_no_issues(spool: multispool.Spool[Any, bytes]) -> None:
    touch(spool, Dir.REGISTRY, "foo")
    touch(spool, Q1, "foo")
    touch(spool, Dir.TMP, "foo")
    assert make(spool).run_once() == []


def test_no_entries_for_registered_file(spool: multispool.Spool[Any, bytes]) -> None:
    m = make(spool)
    touch(spool, Dir.REGISTRY, "foo")
    problems = m.run_once()
    assert shape(problems) == [("Orphaned", "foo", Dir.REGISTRY)]
    st = os.lstat(os.path.join(spool.dir, ".registry", "foo"))
    assert problems[0].file == FileWithMtime("foo", st.st_mtime)
    rm(spool, Dir.REGISTRY, "foo")
    assert m.run_once() == []


def test_duplicate_entries_for_registered_file(spool: multispool.Spool[Any, bytes]) -> None:
    m = make(spool)
    touch(spool, Dir.REGISTRY, "foo")
    touch(spool, Q2, "foo")
    touch(spool, Q1, "foo")
    touch(spool, CO1, "foo")
    # dirs in queue order, each queue dir before its checkout dir, whatever the creation order
    assert shape(m.run_once()) == [("Duplicated", "foo", (Q1, CO1, Q2))]
    rm(spool, Q2, "foo")
    rm(spool, CO1, "foo")
    assert m.run_once() == []


@pytest.mark.parametrize("where", [Dir.TMP, Dir.DATA, Q1, CO1], ids=["tmp", "data", "queue", "checkout"])
def test_file_not_registered(spool: multispool.Spool[Any, bytes], where: Dir) -> None:
    m = make(spool)
    touch(spool, where, "foo")
    assert shape(m.run_once()) == [("Orphaned", "foo", where)]
    rm(spool, where, "foo")
    assert m.run_once() == []


def _plant(path: str, kind: str) -> None:
    if kind == "symlink":
        os.symlink("/dev/null", path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.mkdir(path)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dir"])
def test_registry_name_that_is_no_regular_file_is_reported_not_raised(
    spool: multispool.Spool[Any, bytes], kind: str
) -> None:
    # Something planted in .registry can be locked by nobody (a symlink is never
    # followed): in no queue, it is an orphaned registry name; with a checkout file,
    # a checkout nobody holds. The check reports them and goes on with the others.
    _plant(os.path.join(spool.dir, ".registry", "junk"), kind)
    _plant(os.path.join(spool.dir, ".registry", "held"), kind)
    touch(spool, CO1, "held")
    touch(spool, Q1, "orphan")
    m = make(spool)
    problems = m.run_once()
    assert shape(problems) == [
        ("Orphaned", "junk", Dir.REGISTRY), ("Orphaned", "orphan", Q1), ("DeadCheckout", "held", CO1),
    ]
    from multispool._monitor import repair

    repair(spool, m.limits, problems, dry_run=False)  # raises nothing; touches no junk
    assert os.path.lexists(os.path.join(spool.dir, ".registry", "junk"))


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dir"])
def test_waiting_entry_whose_registry_name_is_no_regular_file_is_reported(
    spool: multispool.Spool[Any, bytes], kind: str
) -> None:
    """An entry waiting in its queue whose ``.registry/NAME`` is no regular file can be
    claimed by nobody (a reader skips it, logged, every rescan): the check said nothing
    about it. As a queue file with no registry file it is ``Orphaned`` in its queue,
    once (not also TooOld), and a FIFO there is never opened blocking."""
    _plant(os.path.join(spool.dir, ".registry", "waiting"), kind)
    touch(spool, Q1, "waiting", age=10)
    ok = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"")
    assert shape(make(spool).run_once()) == [("Orphaned", "waiting", Q1)]
    m = make(spool, max_queue_ages={Queue.QUEUE1: 5})
    problems = m.run_once()
    assert shape(problems) == [("Orphaned", "waiting", Q1)]
    from multispool._monitor import repair

    repair(spool, m.limits, problems, dry_run=False)  # raises nothing; touches no junk
    assert os.path.lexists(os.path.join(spool.dir, ".registry", "waiting"))
    assert [e.name for e in spool.list(Queue.QUEUE1)] == sorted([ok.name, "waiting"])


def test_checked_out_entry_too_old(spool: multispool.Spool[Any, bytes]) -> None:
    touch(spool, Dir.REGISTRY, "foo")
    touch(spool, CO1, "foo", age=2)
    with owner(spool, "foo"):
        assert shape(make(spool, max_checked_out_age=1).run_once()) == [("TooOld", "foo", CO1)]
        # the same file under a limit it does not exceed: no problem
        assert make(spool, max_checked_out_age=60).run_once() == []


def test_dead_checkout_is_reported_at_once(spool: multispool.Spool[bytes]) -> None:
    """Issue 10 item 12: a checkout whose owner lock is free is a problem whatever its age
    (it was ignored until older than max_checked_out_age)."""
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    co = spool.checkout(e)
    m = make(spool)  # limits of a day: only the free lock can make it a problem
    assert m.run_once() == []
    co._claim.release()  # the owner "dies": the kernel would drop its lock
    problems = m.run_once()
    assert shape(problems) == [("DeadCheckout", e.name, CO1)]
    assert problems[0].file == FileWithMtime(e.name, os.lstat(co.path).st_mtime)
    assert problems[0] == DeadCheckout(FileWithMtime(e.name, os.lstat(co.path).st_mtime), CO1)
    # old and dead: both facts
    touch(spool, CO1, e.name, age=10)
    assert shape(make(spool, max_checked_out_age=1).run_once()) == [
        ("TooOld", e.name, CO1), ("DeadCheckout", e.name, CO1)
    ]
    assert [x.name for x in spool.recover_checkouts()] == [e.name]
    assert m.run_once() == []


def test_tmp_file_too_old(spool: multispool.Spool[Any, bytes]) -> None:
    touch(spool, Dir.REGISTRY, "foo")
    touch(spool, Q1, "foo")
    touch(spool, Dir.TMP, "foo", age=2)
    m = make(spool, max_tmp_file_age=datetime.timedelta(seconds=1))
    assert shape(m.run_once()) == [("TooOld", "foo", Dir.TMP)]
    assert make(spool, max_tmp_file_age=60).run_once() == []


def test_queue_entry_too_old(spool: multispool.Spool[Any, bytes]) -> None:
    touch(spool, Dir.REGISTRY, "foo")
    touch(spool, Q1, "foo", age=2)
    assert shape(make(spool, max_queue_ages={Queue.QUEUE1: 1}).run_once()) == [("TooOld", "foo", Q1)]
    # only the queue that has a limit is checked
    assert make(spool, max_queue_ages={Queue.QUEUE2: 1}).run_once() == []
    assert make(spool).run_once() == []


def test_zero_limits_flag_fresh_files(spool: multispool.Spool[Any, bytes]) -> None:
    # The OCaml tests use limits of 0 s on just-touched files: age > 0 as soon as time moves.
    touch(spool, Dir.REGISTRY, "foo")
    touch(spool, CO1, "foo", age=0.01)
    with owner(spool, "foo"):
        assert shape(make(spool, max_checked_out_age=0).run_once()) == [("TooOld", "foo", CO1)]


def test_real_entries_are_clean_and_problems_sorted(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    spool.enqueue(Queue.QUEUE2, Cog(n=2), b"y")
    co = spool.checkout(e)
    m = make(spool)
    assert m.run_once() == []
    touch(spool, Dir.DATA, "zz")
    touch(spool, Dir.TMP, "aa")
    touch(spool, Dir.REGISTRY, "mm")
    touch(spool, Dir.TMP, "old", age=5)
    touch(spool, Dir.REGISTRY, "old")
    touch(spool, Q1, "old")
    got = make(spool, max_tmp_file_age=1).run_once()
    assert got == sorted(got)
    assert shape(got) == [
        ("TooOld", "old", Dir.TMP),
        ("Orphaned", "aa", Dir.TMP),
        ("Orphaned", "mm", Dir.REGISTRY),
        ("Orphaned", "zz", Dir.DATA),
    ]
    co.remove()


def test_dot_names_and_missing_data_dir_are_ignored(spool: multispool.Spool[Any, bytes]) -> None:
    touch(spool, Q1, ".hidden")
    touch(spool, Dir.REGISTRY, ".lock")
    os.rmdir(os.path.join(spool.dir, ".data"))  # OCaml-made spools may lack .data
    assert make(spool).run_once() == []


def test_monitor_never_creates(tmp_path: Path, spoolable: multispool.Spoolable[Any, bytes]) -> None:
    with pytest.raises(multispool.NotASpoolError):
        Monitor(tmp_path / "nope", spoolable)
    assert not (tmp_path / "nope").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(multispool.NotASpoolError):
        Monitor(tmp_path / "empty", spoolable)
    assert list((tmp_path / "empty").iterdir()) == []


def test_limits_accept_timedelta_and_reject_unknown_queue(spool: multispool.Spool[Any, bytes]) -> None:
    lim = Limits(max_checked_out_age=datetime.timedelta(minutes=1), max_queue_ages={Queue.QUEUE1: 5})
    assert lim.max_checked_out_age == 60.0 and lim.max_tmp_file_age == 600.0
    assert lim.max_queue_ages == {Queue.QUEUE1: 5.0}
    assert Limits().max_queue_ages == {}
    import enum

    class Other(enum.Enum):
        X = "x"

    with pytest.raises(ValueError, match="not a member"):
        Monitor(spool.dir, spool.spoolable, Limits(max_queue_ages={Other.X: 1}))


def test_problem_values_are_ordered_hashable_frozen() -> None:
    f1, f2 = FileWithMtime("a", 1.0), FileWithMtime("a", 2.0)
    too_old = TooOld(f2, Dir.TMP)
    orphan_reg = Orphaned(f1, Dir.REGISTRY)
    orphan_q = Orphaned(f1, Dir.queue(Queue.QUEUE2))
    dup = Duplicated(f1, (Q1, CO1))
    dead = DeadCheckout(f1, CO1)
    # variant order first (TooOld < Orphaned < Duplicated < DeadCheckout), then file, then dir
    assert sorted([dead, dup, orphan_q, orphan_reg, too_old]) == [too_old, orphan_reg, orphan_q, dup, dead]
    assert dead == DeadCheckout(FileWithMtime("a", 1.0), CO1) and len({dead, dup, dead}) == 2
    assert too_old < orphan_reg and orphan_reg <= orphan_reg and dup > orphan_q and dup >= dup
    assert Orphaned(f1, Dir.TMP) != TooOld(f1, Dir.TMP)
    assert len({too_old, TooOld(FileWithMtime("a", 2.0), Dir.TMP), orphan_reg}) == 2
    with pytest.raises(AttributeError):
        too_old.dir = Dir.DATA  # type: ignore[misc]
    assert Start(5.0, dup) < End(1.0, too_old)  # Start before End, then time
    assert End(1.0, too_old) < End(1.0, dup) < End(2.0, too_old)
    assert hash(Start(1.0, dup)) == hash(Start(1.0, Duplicated(f1, (Q1, CO1))))
    with pytest.raises(TypeError):
        _ = too_old < Start(1.0, too_old)  # problems and events do not compare


@pytest.mark.parametrize("limited", [False, True], ids=["listdir", "scandir"])
def test_moving_entry_is_not_reported(spool: multispool.Spool[Any, bytes], limited: bool) -> None:
    """Candidates are re-checked: an entry that moves while the Monitor lists the queues
    (here: between the listing of queue1 and queue2) is not a Duplicated/Orphaned."""
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    m = make(spool, max_queue_ages={Queue.QUEUE1: DAY} if limited else None)
    real_scandir, real_listdir = os.scandir, os.listdir
    q1 = os.path.normpath(os.path.join(spool.dir, "queue1"))
    moved = []

    def move() -> None:
        co = spool.checkout(e)
        co.save(Queue.QUEUE2)  # now in queue2, after queue1 was listed: no false problem
        moved.append(True)

    def scandir_then_move(path: str) -> object:
        it = real_scandir(path)
        if os.path.normpath(path) != q1:
            return it
        listed = list(it)
        it.close()
        move()
        return _ListIt(listed)

    def listdir_then_move(path: str) -> list[str]:
        names = real_listdir(path)
        if os.path.normpath(path) == q1:
            move()
        return names

    mp = pytest.MonkeyPatch()
    mp.setattr(os, "scandir", scandir_then_move)
    mp.setattr(os, "listdir", listdir_then_move)
    try:
        assert m.run_once() == []
    finally:
        mp.undo()
    assert moved and [x.name for x in spool.list(Queue.QUEUE2)] == [e.name]


class _ListIt:
    def __init__(self, items: list[os.DirEntry[str]]) -> None:
        self.items = items

    def __enter__(self) -> list[os.DirEntry[str]]:
        return self.items

    def __exit__(self, *a: object) -> None:
        pass


def test_vanishing_files_are_skipped(spool: multispool.Spool[Any, bytes]) -> None:
    touch(spool, Dir.TMP, "gone", age=100)
    m = make(spool, max_tmp_file_age=1)
    real_scandir = os.scandir
    tmp = os.path.join(spool.dir, ".tmp")

    def scandir_then_delete(path: str) -> object:
        it = real_scandir(path)
        if os.path.normpath(path) == os.path.normpath(tmp):
            listed = list(it)
            it.close()
            os.unlink(os.path.join(tmp, "gone"))
            return _ListIt(listed)
        return it

    mp = pytest.MonkeyPatch()
    mp.setattr(os, "scandir", scandir_then_delete)
    try:
        assert m.run_once() == []
    finally:
        mp.undo()


def test_alerter_start_after_more_than_n_cycles_and_end() -> None:
    a = _Alerter(alert_after_cycles=2)
    p = Orphaned(FileWithMtime("foo", 1.0), Dir.TMP)
    q = Orphaned(FileWithMtime("bar", 1.0), Dir.DATA)
    assert a.update([p], 1.0) == []
    assert a.update([p], 2.0) == []
    assert a.update([p, q], 3.0) == [Start(3.0, p)]  # seen 3 > 2 times
    assert a.update([p, q], 4.0) == []
    assert a.update([q], 5.0) == [End(5.0, p), Start(5.0, q)]  # ends first, then starts
    assert a.update([], 6.0) == [End(6.0, q)]
    # a gap resets the count
    assert a.update([p], 7.0) == [] and a.update([], 8.0) == [] and a.update([p], 9.0) == []
    assert a.update([p], 10.0) == [] and a.update([p], 11.0) == [Start(11.0, p)]
    b = _Alerter(alert_after_cycles=0)
    assert b.update([p], 1.0) == [Start(1.0, p)]


def test_daemon_start_and_end(spool: multispool.Spool[Any, bytes]) -> None:
    m = make(spool)
    events: list[Start | End] = []
    cond = threading.Condition()

    def callback(ev: Start | End) -> None:
        with cond:
            events.append(ev)
            cond.notify_all()

    def wait_for(pred: object, what: str) -> None:
        deadline = time.monotonic() + 10
        with cond:
            while not pred():  # type: ignore[operator]
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}; events: {events}"
                cond.wait(left)

    stop = threading.Event()
    touch(spool, Dir.DATA, "foo")
    t = multispool.MonitorDaemon(check_every=0.02, alert_after_cycles=2).start(m, callback, stop)
    try:
        assert t.daemon
        wait_for(lambda: len(events) >= 1, "Start")
        (start,) = events
        assert isinstance(start, Start) and shape([start.problem]) == [("Orphaned", "foo", Dir.DATA)]
        rm(spool, Dir.DATA, "foo")
        wait_for(lambda: len(events) >= 2, "End")
        assert events[1] == End(events[1].time, start.problem)
        assert events[1].time >= start.time
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()
    assert len(events) == 2


def test_daemon_survives_failing_check(
    spool: multispool.Spool[Any, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    m = make(spool)
    calls = threading.Semaphore(0)
    real = m.run_once

    def flaky() -> list[TooOld | Orphaned | Duplicated]:
        calls.release()
        if not hasattr(flaky, "failed"):
            flaky.failed = True  # type: ignore[attr-defined]
            raise OSError("disk on fire")
        return real()

    m.run_once = flaky  # type: ignore[method-assign]
    stop = threading.Event()
    t = multispool.MonitorDaemon(check_every=0.01).start(m, lambda ev: None, stop)
    try:
        assert calls.acquire(timeout=10) and calls.acquire(timeout=10)  # it went on
    finally:
        stop.set()
        t.join(5)
    assert "disk on fire" in caplog.text


@pytest.mark.parametrize("every", [1e10, 1e300, float("inf")])
def test_daemon_with_a_period_longer_than_a_wait_can_take(
    spool: multispool.Spool[Any, bytes], every: float
) -> None:
    """A check_every beyond threading.TIMEOUT_MAX (about 292 years) used to kill the
    daemon's thread with OverflowError right after its first check: the wait is clamped."""
    m = make(spool)
    checked = threading.Event()
    real = m.run_once

    def once() -> list[Any]:
        try:
            return real()
        finally:
            checked.set()

    m.run_once = once  # type: ignore[method-assign]
    died: list[BaseException | None] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: died.append(args.exc_value)
    stop = threading.Event()
    try:
        t = multispool.MonitorDaemon(check_every=every).start(m, lambda ev: None, stop)
        assert checked.wait(10)
    finally:
        stop.set()
        t.join(10)
        threading.excepthook = old_hook
    assert not t.is_alive()
    assert died == []


def test_daemon_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        multispool.MonitorDaemon(check_every=0)
    with pytest.raises(ValueError):
        multispool.MonitorDaemon(alert_after_cycles=-1)


LOAD_WORKER = """
import sys, time
import multispool
from _procs import serve
from conftest import Cog, Queue

spool = multispool.Spool.load(sys.argv[1], multispool.Spoolable(
    queues=Queue, metadata=Cog, name_generator=multispool.PrefixNames()))

def produce(until):
    n = 0
    while time.monotonic() < until:
        if n % 4 == 3:  # a reservation first, used later: held locked all the while
            spool.enqueue(Queue.QUEUE1, Cog(n=n), b"x", use=spool.reserve_name())
        else:
            spool.enqueue(Queue.QUEUE1, Cog(n=n), b"x")
        n += 1
    return n

def consume(until):
    n = 0
    while time.monotonic() < until:
        for q in (Queue.QUEUE1, Queue.QUEUE2):
            for e in spool.list(q)[:20]:
                n += 1
                try:
                    if q is Queue.QUEUE2 and n % 5 == 0:  # writes to queued entries
                        e.direct.save(Cog(n=-n))
                        continue
                    if q is Queue.QUEUE2 and n % 5 == 1:
                        e.direct.remove()
                        continue
                except multispool.EntryNotFoundError:
                    continue  # another consumer has it
                co = spool.checkout_if_found(e)
                if co is None:
                    continue
                if q is Queue.QUEUE2 or n % 3 == 0:
                    co.remove()
                elif n % 3 == 1:
                    co.save(Queue.QUEUE2)
                else:
                    co.release()
    return n

def handle(line):
    role, seconds = line.split()
    until = time.monotonic() + float(seconds)
    return str(produce(until) if role == "produce" else consume(until))

serve(handle)
"""


def test_fsck_is_clean_under_load(spool: multispool.Spool[bytes], capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 10 item 13: with real producers and consumers running (enqueues in progress,
    reservations, claims, saves into another queue, removals, releases, direct rewrites
    and removals of queued entries), the Monitor and ``multispool
    fsck`` report nothing on this healthy spool, in every run."""
    from _procs import workers
    from multispool.cli import main

    m = make(spool)
    seconds = 2.0
    with workers(LOAD_WORKER, 4, spool.dir) as ws:
        for i, w in enumerate(ws):
            w.send(f"{'produce' if i < 2 else 'consume'} {seconds}")
        deadline = time.monotonic() + seconds
        runs, found = 0, []
        while time.monotonic() < deadline:
            found.extend(m.run_once())
            if runs % 4 == 0:
                capsys.readouterr()
                assert main(["fsck", spool.dir]) == 0, capsys.readouterr().out
            runs += 1
        counts = [int(w.recv()) for w in ws]
    assert found == []
    assert runs >= 5 and min(counts) > 0, (runs, counts)
    assert make(spool).run_once() == []


def test_repair_releases_locks_through_fs(spool: multispool.Spool[bytes]) -> None:
    """Issue 10 item 14: repair took registry locks through _fs (which records them, for
    fork safety) but closed them with a bare os.close, leaving stale numbers recorded; a
    forked child then closed unrelated descriptors reusing them (its own pipe: EBADF)."""
    from multispool._monitor import repair

    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    Path(spool.dir, "queue2", e.name).touch()  # a duplicate: repaired under the owner lock
    age_s = 2 * DAY
    touch(spool, Dir.TMP, e.name, age=age_s)  # a stale tmp file: removed under the lock
    co = spool.checkout(spool.enqueue(Queue.QUEUE1, Cog(n=2), b"y"))
    co._claim.release()  # a dead checkout
    held_before = set(_fs._held)
    m = make(spool, max_tmp_file_age=DAY)
    problems = m.run_once()
    assert {type(p).__name__ for p in problems} == {"Duplicated", "TooOld", "DeadCheckout"}
    actions = repair(spool, m.limits, problems, dry_run=False)
    assert len(actions) == 3, actions
    assert set(_fs._held) == held_before
    r, w = os.pipe()  # takes the lowest free numbers: those repair used
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.write(w, b"ok")
        except OSError:
            code = 1
        os._exit(code)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.read(r, 2) == b"ok"
    finally:
        os.close(r)
        os.close(w)
    assert m.run_once() == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds the file by /proc/self/fd")
def test_probe_of_a_fresh_reservation_leaves_no_orphan(
    spool: multispool.Spool[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsck takes a registry lock for an instant to tell an enqueue in progress from an
    abandoned one. Where a registry file is created with O_EXCL and then locked (no
    O_TMPFILE: macOS, FUSE, NFS), a probe landing between the two made the enqueuer give
    up a name it had just created, leaving an orphaned registry file for fsck to report.
    The creator now waits that instant out."""
    reg_dir = os.path.join(spool.dir, ".registry")
    monkeypatch.setattr(_fs, "_no_tmpfile", {reg_dir})  # the portable O_EXCL path
    real_try_lock = _fs.try_lock
    probes: list[int] = []

    def probed_once(fd: int) -> bool:
        if not probes:  # a Monitor holds the fresh file's lock at the first attempt
            probes.append(fd)
            path = os.readlink(f"/proc/self/fd/{fd}")
            with contextlib.ExitStack() as st:
                other = os.open(path, os.O_RDONLY)
                st.callback(os.close, other)
                assert real_try_lock(other)
                return real_try_lock(fd)  # False: held by the "probe"
        return real_try_lock(fd)

    monkeypatch.setattr(_fs, "try_lock", probed_once)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    assert probes
    assert sorted(os.listdir(reg_dir)) == [e.name]  # no abandoned name left behind
    assert make(spool).run_once() == []


def test_a_name_taken_again_between_the_two_looks_is_no_orphan(
    spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data file whose registry file is missing is checked again; a name freed by a
    removal can be taken by a new enqueue between the look at the registry file and the
    look at the data file (names that are reused, like PrefixNames'). The data file then
    seen is the new entry's: no orphan (found by test_fsck_is_clean_under_load, about
    one run in 25 on a loaded machine)."""
    import multispool._monitor as monitor_mod

    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    reg = Path(spool.dir, ".registry", e.name)
    reg.unlink()  # the old entry's removal has got this far: its name is free
    Path(spool.dir, "queue1", e.name).unlink()
    real = monitor_mod._lstat_mtime

    def lstat_as_the_name_is_taken_again(path: str) -> float | None:
        if path == str(Path(spool.dir, ".data", e.name)) and not reg.exists():
            reg.touch()  # a new enqueue registers the name, then writes its data
        return real(path)

    monkeypatch.setattr(monitor_mod, "_lstat_mtime", lstat_as_the_name_is_taken_again)
    assert make(spool).run_once() == []
    assert reg.exists()  # the race did happen


@pytest.mark.parametrize("quarantine", [None, Queue.QUEUE3])
def test_repair_dry_run_predicts_what_becomes_of_an_undecodable_dead_checkout(
    tmp_path: Path, quarantine: Queue | None
) -> None:
    """A dry run said it would put back a dead checkout whose metadata cannot be decoded;
    the real run quarantines it, or leaves it for a person without a quarantine queue.
    A decodable one beside it is put back in both."""
    from multispool._monitor import repair

    sp = multispool.Spoolable(queues=Queue, metadata=Cog, quarantine=quarantine)
    spool = multispool.Spool.create(str(tmp_path / "sp"), sp)
    bad, good = (spool.checkout(spool.enqueue(Queue.QUEUE1, Cog(n=i), b"x")) for i in range(2))
    for co in (bad, good):
        co._claim.release()  # dead checkouts
    Path(bad.path).write_bytes(b"not json")
    m = make(spool)

    def said(dry_run: bool) -> list[str]:
        """Each action as "VERB NAME" (the verb without a dry run's "would")."""
        actions = repair(spool, m.limits, m.run_once(), dry_run=dry_run)
        pattern = r"(?:would )?(\w+) dead checkout queue1/\.checkout/([^: ]+)[: ].*"
        found = [re.fullmatch(pattern, a) for a in actions]
        assert all(found), actions
        return sorted(f"{f[1]} {f[2]}" for f in found if f)

    predicted = said(True)
    verb = "left" if quarantine is None else "quarantined"
    pred_verb = "leave" if quarantine is None else "quarantine"
    assert predicted == sorted([f"{pred_verb} {bad.name}", f"recover {good.name}"])
    assert said(False) == sorted([f"{verb} {bad.name}", f"recovered {good.name}"])
