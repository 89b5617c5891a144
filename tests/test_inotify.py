"""Tests for multispool._inotify, the inotify reader used where watchdog has no
InotifyFD (watchdog < 7, all of Python 3.10), and for the native backend running on it.

They run under every Python: where watchdog 7 is installed, the backend is made to use
our reader. No sleep is used to synchronise: events are waited for with deadlines, and
the reader's thread is known to be blocked when the callbacks it was running returned.
Only the idle checks watch the clock, over a window in which nothing may happen.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _procs import in_forked_child
from multispool import _inotify, _watch
from multispool._watch import subscribe
from test_reader_wake import context_switches
from test_watch import Recorder, drop_in, inotify_instances, inotify_masks, new_threads

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's"),
]

WAIT = 10.0

IN_CLOSE_WRITE = 0x08
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_ONLYDIR = 0x01000000
ARRIVALS = IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE
DEPARTURES = IN_DELETE | IN_MOVED_FROM
MASK = ARRIVALS | DEPARTURES | IN_DELETE_SELF | IN_ONLYDIR
EVENT_BITS = 0x0FFF  # the events of a mask, without IN_ONLYDIR and such


class Target:
    """A WatchCallback recording what it is told, in order, from the reader's thread."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[str, int, str]] = queue.Queue()
        self.threads: set[int] = set()

    def on_event(self, event: _inotify.InotifyEvent) -> None:
        self.threads.add(threading.get_ident())
        self.calls.put(("event", event.mask, os.fsdecode(event.name)))

    def on_watch_deleted(self, wd: int) -> None:
        self.calls.put(("deleted", wd, ""))

    def on_queue_overflow(self) -> None:
        self.calls.put(("overflow", 0, ""))

    def next(self, timeout: float = WAIT) -> tuple[str, int, str]:
        return self.calls.get(timeout=timeout)

    def until(self, name: str, bit: int) -> list[tuple[int, str]]:
        """The (event bits, name) of every event up to and including the first one
        about `name` with `bit` set."""
        seen = []
        while True:
            kind, mask, got = self.next()
            assert kind == "event", (kind, mask, got)
            seen.append((mask & EVENT_BITS, got))
            if got == name and mask & bit:
                return seen

    def empty(self) -> bool:
        return self.calls.empty()


@pytest.fixture
def reader() -> Iterator[_inotify.InotifyReader]:
    r = _inotify.InotifyReader()
    r.start()
    try:
        yield r
    finally:
        r.stop()
        r.join(WAIT)


def mkdirs(base: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        (base / name).mkdir()
        out.append(base / name)
    return out


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------- the reader itself


def test_arrivals_and_departures_by_name(reader: _inotify.InotifyReader, tmp_path: Path) -> None:
    (d,) = mkdirs(tmp_path, "q")
    (tmp_path / "out").mkdir()
    t = Target()
    wd = reader.add_callback(os.fsencode(d), MASK, t, 1)
    assert wd >= 1
    (d / "made").write_text("x")
    assert t.until("made", IN_CLOSE_WRITE) == [(IN_CREATE, "made"), (IN_CLOSE_WRITE, "made")]
    drop_in(tmp_path / "out", d, "moved-in")
    assert t.until("moved-in", IN_MOVED_TO) == [(IN_MOVED_TO, "moved-in")]
    (d / "made").unlink()
    assert t.until("made", IN_DELETE) == [(IN_DELETE, "made")]
    os.rename(d / "moved-in", tmp_path / "out" / "moved-out")
    assert t.until("moved-in", IN_MOVED_FROM) == [(IN_MOVED_FROM, "moved-in")]
    assert t.threads == {reader.ident}
    assert reader.thread.name == "multispool-inotify" and reader.thread.daemon


def test_several_directories_share_one_instance_and_one_thread(tmp_path: Path) -> None:
    before_ino, before_threads = inotify_instances(), set(threading.enumerate())
    r = _inotify.InotifyReader()
    r.start()
    try:
        dirs = mkdirs(tmp_path, *(f"q{i}" for i in range(5)))
        targets = [Target() for _ in dirs]
        wds = [
            r.add_callback(os.fsencode(d), MASK, t, i)
            for i, (d, t) in enumerate(zip(dirs, targets, strict=True))
        ]
        assert len(set(wds)) == len(dirs)
        assert inotify_instances() == before_ino + 1
        assert new_threads(before_threads) == [r.thread]
        for d in reversed(dirs):
            (d / f"in-{d.name}").touch()
        for d, t in zip(dirs, targets, strict=True):
            # Each directory's events reach its own callback, and only them.
            assert t.until(f"in-{d.name}", IN_CLOSE_WRITE) == [
                (IN_CREATE, f"in-{d.name}"),
                (IN_CLOSE_WRITE, f"in-{d.name}"),
            ]
            assert t.empty()
    finally:
        r.stop()
        r.join(WAIT)
    assert inotify_instances() == before_ino


def test_removing_one_watch_leaves_the_others(
    reader: _inotify.InotifyReader, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """watchdog 6's own multi-watch Inotify raised KeyError for events after a removal."""
    a, b, c = mkdirs(tmp_path, "a", "b", "c")
    ta, tb, tc = Target(), Target(), Target()
    wd_a = reader.add_callback(os.fsencode(a), ARRIVALS, ta, 1)
    wd_b = reader.add_callback(os.fsencode(b), ARRIVALS, tb, 1)
    wd_c = reader.add_callback(os.fsencode(c), ARRIVALS, tc, 1)
    assert len({wd_a, wd_b, wd_c}) == 3
    # Something is queued for b while its watch goes away.
    (b / "queued").touch()
    with caplog.at_level(logging.DEBUG, logger="multispool._inotify"):
        reader.remove_callbacks([(wd_b, 1)])
        assert len(inotify_masks()) == 2
        for round_ in range(3):
            (b / f"b{round_}").touch()
            (a / f"a{round_}").touch()
            (c / f"c{round_}").touch()
            assert ta.until(f"a{round_}", IN_CLOSE_WRITE)[-1] == (IN_CLOSE_WRITE, f"a{round_}")
            # One queue, in order: c's event comes after b's, which reached nobody.
            assert tc.until(f"c{round_}", IN_CLOSE_WRITE)[-1] == (IN_CLOSE_WRITE, f"c{round_}")
        # Removing it again (or a watch never known) is quietly nothing.
        reader.remove_callbacks([(wd_b, 1), (12345, 1)])
    while not tb.empty():
        # At most what was read before the removal; nothing after it.
        assert tb.next()[2] == "queued"
    assert reader.thread.is_alive()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_callbacks_sharing_a_directory(reader: _inotify.InotifyReader, tmp_path: Path) -> None:
    """As watchdog's InotifyFD: one watch per directory (the kernel gives its descriptor
    again), a second add replaces the watch's mask, callbacks are kept by id, and the
    watch lasts until its last callback is removed."""
    (d,) = mkdirs(tmp_path, "q")
    t1, t2 = Target(), Target()
    wd = reader.add_callback(os.fsencode(d), ARRIVALS | IN_ONLYDIR, t1, 1)
    (mask,) = inotify_masks()
    assert mask & DEPARTURES == 0
    assert reader.add_callback(os.fsencode(d), MASK, t2, 2) == wd
    (mask,) = inotify_masks()
    assert mask & EVENT_BITS == MASK & EVENT_BITS
    (d / "x").touch()
    for t in (t1, t2):
        assert t.until("x", IN_CLOSE_WRITE)[-1] == (IN_CLOSE_WRITE, "x")
    reader.remove_callbacks([(wd, 1)])
    assert len(inotify_masks()) == 1  # t2 still has it
    (d / "x").unlink()
    assert t2.until("x", IN_DELETE) == [(IN_DELETE, "x")]
    assert t1.empty()
    with pytest.warns(RuntimeWarning, match="already registered"):
        reader.add_callback(os.fsencode(d), MASK, t1, 2)  # replaces t2
    (d / "y").touch()
    assert t1.until("y", IN_CLOSE_WRITE)[-1] == (IN_CLOSE_WRITE, "y")
    assert t2.empty()
    with pytest.warns(RuntimeWarning, match="no inotify callback id 7"):
        reader.remove_callbacks([(wd, 7)])
    reader.remove_callbacks([(wd, 2)])
    assert inotify_masks() == []


def test_a_second_add_replaces_the_mask(reader: _inotify.InotifyReader, tmp_path: Path) -> None:
    """Replaced, not added to (no IN_MASK_ADD), as InotifyFD does: the native backend
    only ever widens a watch (first the wider callback, then the old one removed)."""
    (d,) = mkdirs(tmp_path, "q")
    wd = reader.add_callback(os.fsencode(d), MASK, Target(), 1)
    assert reader.add_callback(os.fsencode(d), ARRIVALS | IN_ONLYDIR, Target(), 2) == wd
    (mask,) = inotify_masks()
    assert mask & EVENT_BITS == ARRIVALS
    assert reader.add_callback(os.fsencode(d), MASK, Target(), 3) == wd
    (mask,) = inotify_masks()
    assert mask & EVENT_BITS == MASK & EVENT_BITS
    reader.remove_callbacks([(wd, 1), (wd, 2), (wd, 3)])
    assert inotify_masks() == []


def test_deleted_directory_reports_its_watch_deleted(reader: _inotify.InotifyReader, tmp_path: Path) -> None:
    gone, stays = mkdirs(tmp_path, "gone", "stays")
    t, t_other = Target(), Target()
    wd = reader.add_callback(os.fsencode(gone), MASK, t, 1)
    reader.add_callback(os.fsencode(stays), MASK, t_other, 1)
    shutil.rmtree(gone)
    kind, mask, _ = t.next()
    assert kind == "event" and mask & IN_DELETE_SELF
    # IN_IGNORED is not an event for the callback: it says the watch is gone.
    assert t.next() == ("deleted", wd, "")
    assert len(inotify_masks()) == 1
    reader.remove_callbacks([(wd, 1)])  # already forgotten: nothing, no warning
    (stays / "x").touch()
    assert t_other.until("x", IN_CLOSE_WRITE)[-1] == (IN_CLOSE_WRITE, "x")
    assert t.empty()


def test_errors_name_the_path(reader: _inotify.InotifyReader, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        reader.add_callback(os.fsencode(tmp_path / "nope"), MASK, Target(), 1)
    assert missing.value.filename == str(tmp_path / "nope")
    (tmp_path / "file").touch()
    with pytest.raises(NotADirectoryError) as not_dir:
        reader.add_callback(os.fsencode(tmp_path / "file"), MASK, Target(), 1)
    assert not_dir.value.filename == str(tmp_path / "file")
    assert inotify_masks() == []
    assert reader.thread.is_alive()


def test_queue_overflow_reaches_every_callback_once(
    reader: _inotify.InotifyReader, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with open("/proc/sys/fs/inotify/max_queued_events") as f:
        limit = int(f.read())
    if limit > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many events to overflow it")
    a, b = mkdirs(tmp_path, "a", "b")
    blocked, release = threading.Event(), threading.Event()

    class Blocking(Target):
        def on_event(self, event: _inotify.InotifyEvent) -> None:
            super().on_event(event)
            if not release.is_set():
                blocked.set()
                release.wait(WAIT)

    ta, tb = Blocking(), Target()
    reader.add_callback(os.fsencode(a), IN_CREATE | IN_DELETE, ta, 1)
    reader.add_callback(os.fsencode(b), IN_CREATE | IN_DELETE, tb, 1)
    reader.add_callback(os.fsencode(b), IN_CREATE | IN_DELETE, ta, 2)  # ta twice: called once
    (a / "first").touch()
    assert blocked.wait(WAIT)  # the reader's thread is held in a callback
    # Alternate names: the kernel merges an event identical to the one queued before it.
    for i in range(limit // 2 + 10):
        p = b / ("x" if i % 2 else "y")
        p.touch()
        p.unlink()
    with caplog.at_level(logging.WARNING, logger="multispool._inotify"):
        release.set()
        for t in (ta, tb):
            while (call := t.next())[0] != "overflow":
                assert call[0] == "event"
    assert "overflowed" in caplog.text
    # Nothing is queued behind the overflow: it is the kernel's last event.
    (a / "after").touch()
    assert ta.until("after", IN_CREATE)[-1] == (IN_CREATE, "after")
    assert not [c for c in list(ta.calls.queue) + list(tb.calls.queue) if c[0] == "overflow"]


def test_stop_joins_promptly_and_closes_everything(tmp_path: Path) -> None:
    fds, before_threads = fd_count(), set(threading.enumerate())
    r = _inotify.InotifyReader()
    r.start()
    dirs = mkdirs(tmp_path, "a", "b")
    t = Target()
    wds = sorted(r.add_callback(os.fsencode(d), MASK, t, 1) for d in dirs)
    (dirs[0] / "x").touch()
    t.until("x", IN_CLOSE_WRITE)
    started = time.monotonic()
    r.stop()
    r.join(WAIT)
    took = time.monotonic() - started
    assert not r.thread.is_alive()
    assert took < 1.0, f"stop() and join() took {took:.3f} s"
    # As InotifyFD's close(): the callbacks still registered hear their watch is gone.
    assert sorted(t.next()[1] for _ in wds) == wds
    assert fd_count() == fds
    assert new_threads(before_threads) == []
    r.stop()  # idempotent
    with pytest.raises(OSError, match="stopped"):
        r.add_callback(os.fsencode(dirs[0]), MASK, t, 2)


def test_stop_from_a_callback_ends_the_thread(tmp_path: Path) -> None:
    fds = fd_count()
    r = _inotify.InotifyReader()
    r.start()
    (d,) = mkdirs(tmp_path, "q")
    done = threading.Event()

    class Stopper(Target):
        def on_event(self, event: _inotify.InotifyEvent) -> None:
            r.stop()
            done.set()

    r.add_callback(os.fsencode(d), MASK, Stopper(), 1)
    (d / "x").touch()
    assert done.wait(WAIT)
    r.join(WAIT)
    assert not r.thread.is_alive()
    assert fd_count() == fds


def test_stop_before_start_closes_everything() -> None:
    fds = fd_count()
    r = _inotify.InotifyReader()
    assert fd_count() == fds + 3
    r.stop()
    assert fd_count() == fds
    with pytest.raises(RuntimeError):
        r.start()


def test_idle_reader_never_wakes(reader: _inotify.InotifyReader, tmp_path: Path) -> None:
    dirs = mkdirs(tmp_path, *(f"q{i}" for i in range(20)))
    elsewhere = tmp_path / "unwatched"
    elsewhere.mkdir()
    t = Target()
    for i, d in enumerate(dirs):
        (d / "old").touch()
        reader.add_callback(os.fsencode(d), ARRIVALS | IN_ONLYDIR, t, i)
    (dirs[3] / "x").touch()
    t.until("x", IN_CLOSE_WRITE)  # the thread ran, and is back in poll() or nearly
    switches = settled(reader.thread)
    # Changes it was not asked about: entries leaving, another directory.
    os.rename(dirs[5] / "old", elsewhere / "old")
    (dirs[6] / "old").unlink()
    (elsewhere / "new").touch()
    threading.Event().wait(1.0)  # the idle window (nothing to wait for)
    assert context_switches([reader.thread]) == switches, "the reader's thread ran while idle"
    assert t.empty()


def settled(thread: threading.Thread) -> dict[str, int] | None:
    """The thread's context-switch count once it stopped changing (it blocked)."""
    switches = context_switches([thread])
    deadline = time.monotonic() + WAIT
    while True:
        threading.Event().wait(0.2)
        now = context_switches([thread])
        if now == switches or time.monotonic() > deadline:
            return now
        switches = now


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_closes_its_copies_and_parent_keeps_watching(
    reader: _inotify.InotifyReader, tmp_path: Path
) -> None:
    (d,) = mkdirs(tmp_path, "q")
    t = Target()
    wd = reader.add_callback(os.fsencode(d), MASK, t, 1)
    # (watchdog 7's shared InotifyFD, started by test_watch, may be open too.)
    instances = inotify_instances()

    def child() -> bool:
        # No thread reads the inherited instance: its descriptors are closed, the
        # parent's watches left alone, and the reader is inert here.
        ok = inotify_instances() == instances - 1
        reader.stop()
        reader.remove_callbacks([(wd, 1)])
        with contextlib.suppress(OSError):
            reader.add_callback(os.fsencode(d), MASK, t, 2)
            ok = False
        # A new reader in the child works.
        fresh = _inotify.InotifyReader()
        fresh.start()
        ct = Target()
        fresh.add_callback(os.fsencode(d), MASK, ct, 1)
        (d / "from-child").touch()
        ok = ok and ct.until("from-child", IN_CLOSE_WRITE)[-1] == (IN_CLOSE_WRITE, "from-child")
        fresh.stop()
        fresh.join(WAIT)
        return ok

    in_forked_child(child)
    # The parent's watch survived the child's stop() and remove_callbacks().
    assert t.until("from-child", IN_CLOSE_WRITE)[-1] == (IN_CLOSE_WRITE, "from-child")
    (d / "from-parent").touch()
    assert t.until("from-parent", IN_CLOSE_WRITE)[-1] == (IN_CLOSE_WRITE, "from-parent")
    assert len(inotify_masks()) == 1


# --------------------------------------------------------- the native backend on it


@pytest.fixture
def ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """The native backend on our reader, even where watchdog 7's InotifyFD is there."""
    monkeypatch.setattr(_watch, "_inotify_fd_class", lambda: _inotify.InotifyReader)


def _backend_fd(sub: _watch.Subscription) -> object:
    assert sub._entry is not None
    backend = sub._entry.backend
    assert isinstance(backend, _watch._InotifyBackend)
    return backend._fd


@pytest.mark.usefixtures("ours")
def test_backend_on_our_reader_one_thread_one_instance(tmp_path: Path) -> None:
    baseline, before = set(threading.enumerate()), inotify_instances()
    dirs = mkdirs(tmp_path, *(f"q{i}" for i in range(6)))
    (tmp_path / "out").mkdir()
    recs = [Recorder() for _ in dirs]
    subs = [subscribe(d, r, "native", departures=False) for d, r in zip(dirs, recs, strict=True)]
    try:
        assert all(isinstance(_backend_fd(s), _inotify.InotifyReader) for s in subs)
        assert [t.name for t in new_threads(baseline)] == ["multispool-inotify"]
        assert inotify_instances() == before + 1
        for d, r in zip(dirs, recs, strict=True):
            drop_in(tmp_path / "out", d, "e")
            assert r.wait()
    finally:
        for s in subs:
            s.close()
    assert new_threads(baseline) == []
    assert inotify_instances() == before


@pytest.mark.usefixtures("ours")
def test_backend_on_our_reader_names_departures_and_widening(tmp_path: Path) -> None:
    q, out = mkdirs(tmp_path, "q", "out")
    (q / ".checkout").mkdir()
    (q / "a").touch()
    names: queue.Queue[str | None] = queue.Queue()
    reader = Recorder()
    with subscribe(q, reader, "native", departures=False):
        (mask,) = inotify_masks()
        assert mask & DEPARTURES == 0
        with subscribe(q, names.put, "native", names=True):
            (mask,) = inotify_masks()
            assert mask & DEPARTURES == DEPARTURES
            os.rename(q / "a", q / ".checkout" / "a")
            assert names.get(timeout=WAIT) == "a"
            drop_in(out, q, "b")
            assert names.get(timeout=WAIT) == "b"
            assert reader.wait()
            assert len(reader.times) == 1  # the departure did not wake it


@pytest.mark.usefixtures("ours")
def test_backend_on_our_reader_overflow_wakes_without_a_name(tmp_path: Path) -> None:
    (q,) = mkdirs(tmp_path, "q")
    names: queue.Queue[str | None] = queue.Queue()
    with subscribe(q, names.put, "native", names=True) as sub:
        fd = _backend_fd(sub)
        assert isinstance(fd, _inotify.InotifyReader)
        # As the thread would on reading the kernel's IN_Q_OVERFLOW (wd -1).
        fd._dispatch(_inotify.InotifyEvent(-1, _inotify.IN_Q_OVERFLOW, 0, b""))
        assert names.get(timeout=WAIT) is None
        assert not sub.stale


@pytest.mark.usefixtures("ours")
@pytest.mark.parametrize("how", ["deleted", "moved"])
def test_backend_on_our_reader_directory_gone_and_replaced(tmp_path: Path, how: str) -> None:
    (q,) = mkdirs(tmp_path, "q")
    (tmp_path / "out").mkdir()
    rec = Recorder()
    first = subscribe(q, rec, "native")
    try:
        if how == "deleted":
            shutil.rmtree(q)
        else:
            os.rename(q, tmp_path / "moved-away")
        assert rec.wait()
        assert first.stale
        q.mkdir()
        rec2 = Recorder()
        with subscribe(q, rec2, "native") as second:
            assert not second.stale
            drop_in(tmp_path / "out", q, "e")
            assert rec2.wait()
    finally:
        first.close()
    assert inotify_masks() == []


@pytest.mark.usefixtures("ours")
def test_backend_on_our_reader_callback_closes_the_last_subscription(tmp_path: Path) -> None:
    baseline = set(threading.enumerate())
    (q,) = mkdirs(tmp_path, "q")
    done = threading.Event()
    holder: list[_watch.Subscription] = []

    def close_self() -> None:
        holder[0].close()
        done.set()

    holder.append(subscribe(q, close_self, "native"))
    (q / "x").touch()
    assert done.wait(WAIT)
    for t in new_threads(baseline):
        t.join(WAIT)
    assert new_threads(baseline) == []


@pytest.mark.usefixtures("ours")
def test_backend_on_our_reader_falls_back_to_polling_without_an_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """inotify_init1 failing with EMFILE (fs.inotify.max_user_instances reached) is an
    OSError that subscribe() answers by polling, as with watchdog's InotifyFD."""
    libc = _inotify._get_libc()

    class Exhausted:
        def init1(self, flags: int) -> int:
            ctypes.set_errno(errno.EMFILE)
            return -1

        add_watch = libc.add_watch
        rm_watch = libc.rm_watch

    monkeypatch.setattr(_inotify, "_get_libc", Exhausted)
    with pytest.raises(OSError, match="max_user_instances") as exc:
        _inotify.InotifyReader()
    assert exc.value.errno == errno.EMFILE
    q, out = mkdirs(tmp_path, "q", "out")
    rec = Recorder()
    with (
        caplog.at_level(logging.WARNING, logger="multispool._watch"),
        subscribe(q, rec, "native", polling_interval=0.02) as sub,
    ):
        assert sub.mode == "polling"
        drop_in(out, q, "e")
        assert rec.wait()
    assert "polling it every" in caplog.text
