"""Delays, retries, Backoff and the dead-letter queue (API.md §12): the schedule record in
``.registry/NAME``, readers that skip entries not due and wake by a timer when the
earliest is due, crash safety of a retry, asyncio parity."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import multispool
from _procs import Worker, find_sort, workers
from conftest import Cog, Queue
from multispool import _schedule

WAIT = 10.0
SLOW = os.environ.get("MULTISPOOL_SLOW") == "1"


def wait_for(cond: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def reg_size(spool: multispool.Spool[Any], name: str) -> int:
    return os.path.getsize(os.path.join(spool.dir, ".registry", name))


# -- the record -------------------------------------------------------------------------


def test_record_round_trip_and_torn_write_keeps_previous() -> None:
    a = _schedule.encode_slot(1000.5, 2, 1)
    raw = bytes(_schedule.SLOT_SIZE) + a  # seq 1 lives in slot 1
    assert _schedule.decode(raw) == _schedule.Schedule(1000.5, 2, 1)
    b = _schedule.encode_slot(2000.0, 3, 2)
    both = b + a
    assert _schedule.decode(both) == _schedule.Schedule(2000.0, 3, 2)
    # A write of seq 2 torn by a crash: slot 0 half new, half old bytes. The record read
    # is the last complete one, never an older count or garbage.
    for cut in range(1, _schedule.SLOT_SIZE):
        torn = b[:cut] + bytes(_schedule.SLOT_SIZE - cut) + a
        assert _schedule.decode(torn) == _schedule.Schedule(1000.5, 2, 1)
    assert _schedule.decode(b"") == _schedule.NOW


def test_record_sequence_number_wraps_around(spool: multispool.Spool[Any, bytes]) -> None:
    """The slot sequence number is 32 bits on disk: the write after seq 0xFFFFFFFF stores
    seq 0 (in the other slot, as always). That record must win over 0xFFFFFFFF, or every
    later write is lost: the due time and the attempt count stop changing for good (an
    entry failing under a Backoff policy would never reach max_attempts)."""
    top = 0xFFFFFFFF
    e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="w")
    reg = os.path.join(spool.dir, ".registry", e.name)
    with open(reg, "wb") as f:  # seq top - 1 in slot 0, seq top in slot 1
        f.write(_schedule.encode_slot(0.0, 6, top - 1) + _schedule.encode_slot(0.0, 7, top))
    assert e.attempts() == 7 and e.due() is None
    co = spool.checkout(e)
    co.retry(3600)
    due = e.due()
    assert due is not None and due > time.time() + 3000, "the retry's due time was lost"
    assert e.attempts() == 7
    co = spool.checkout(e)
    co.retry(0)  # seq 1, in slot 1 again
    assert e.due() is None and e.attempts() == 7
    # Plain serial-number order around the wrap, either slot first.
    a, b = _schedule.encode_slot(1.0, 1, top), _schedule.encode_slot(2.0, 2, 0)
    assert _schedule.decode(b + a) == _schedule.Schedule(2.0, 2, 0)
    assert _schedule.decode(_schedule.encode_slot(3.0, 3, 1) + b) == _schedule.Schedule(3.0, 3, 1)


def test_a_record_due_at_infinity_counts_as_damaged(
    spool: multispool.Spool[Any, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    """No version writes a due time of infinity now, but older ones did (an infinite
    delay was accepted): such a slot would park the entry for ever and print as
    ``Infinity`` in ``ls --json`` (not JSON). It is read as a damaged slot: the other
    slot is the record, or, with none, the entry is due now."""
    inf = float("inf")
    earlier = _schedule.encode_slot(0.0, 1, 1)
    assert _schedule.decode(earlier + _schedule.encode_slot(inf, 2, 2)) == _schedule.Schedule(0.0, 1, 1)
    assert _schedule.decode(_schedule.encode_slot(inf, 2, 2) + bytes(_schedule.SLOT_SIZE)) == _schedule.NOW
    e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="inf")
    with open(os.path.join(spool.dir, ".registry", e.name), "wb") as f:
        f.write(earlier + _schedule.encode_slot(inf, 2, 2))
    assert e.due() is None and e.attempts() == 1
    with spool.reader(Queue.QUEUE1) as r:
        co = r.dequeue_available()
        assert co is not None and co.name == e.name
        co.release()
    from multispool.cli import main

    assert main(["ls", spool.dir, "queue1", "--json"]) == 0
    out = capsys.readouterr().out
    assert "Infinity" not in out
    [row] = json.loads(out)
    assert (row["name"], row["due"], row["attempts"]) == (e.name, None, 1)


def test_unreadable_record_is_due_now_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="multispool"):
        assert _schedule.decode(b"garbage", "/x/.registry/n") == _schedule.NOW
    assert "/x/.registry/n" in caplog.text


# -- enqueue, due(), attempts(), layout -------------------------------------------------


def test_plain_entries_keep_the_ocaml_layout(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="p")
    assert reg_size(spool, e.name) == 0
    assert e.due() is None and e.attempts() == 0
    co = spool.checkout(e)
    co.save(Queue.QUEUE2)
    assert reg_size(spool, e.name) == 0


def test_delayed_enqueue(spool: multispool.Spool[Any, bytes]) -> None:
    before = find_sort(spool.dir)
    t = time.time()
    e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="d", delay=60)
    due = e.due()
    assert due is not None and t + 60 <= due <= time.time() + 60
    assert e.attempts() == 0
    assert spool.list(Queue.QUEUE1) == [e]  # in its queue: list shows it
    assert reg_size(spool, e.name) == _schedule.RECORD_SIZE
    # Same tree as any entry: the schedule lives inside the registry file.
    assert len(find_sort(spool.dir)) == len(before) + 3
    # delay 0 / None: a plain entry
    z = spool.enqueue(Queue.QUEUE1, Cog(2), b"x", reserve="z", delay=0)
    assert reg_size(spool, z.name) == 0 and z.due() is None
    with pytest.raises(ValueError, match="delay"):
        spool.enqueue(Queue.QUEUE1, Cog(3), b"x", reserve="n", delay=-1)
    with pytest.raises(TypeError):
        spool.enqueue(Queue.QUEUE1, Cog(3), b"x", reserve="n", delay="soon")  # type: ignore[arg-type]
    assert [x.name for x in spool.list(Queue.QUEUE1)] == [e.name, z.name]
    with pytest.raises(multispool.EntryNotFoundError):
        multispool.Entry(spool, Queue.QUEUE1, "nope").due()


def test_infinite_delay_is_refused_before_touching_disk(
    spool: multispool.Spool[Any, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    # An infinite due time is no time: a record holding it is shown by ls --json as
    # Infinity (not JSON). Refused like a negative delay, everywhere a delay is taken.
    before = find_sort(spool.dir)
    with pytest.raises(ValueError, match="delay"):
        spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="i", delay=float("inf"))
    assert find_sort(spool.dir) == before
    e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="e")
    with spool.checkout(e) as co:
        with pytest.raises(ValueError, match="delay"):
            co.save(Queue.QUEUE2, delay=float("inf"))
        with pytest.raises(ValueError, match="delay"):
            co.retry(float("inf"))
    assert e.due() is None and spool.list(Queue.QUEUE1) == [e]
    # the command line: --delay of many digits parses to inf
    from multispool.cli import main

    assert main(["enqueue", spool.dir, "queue1", "--metadata", "{}", "--delay", "9" * 400]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "delay" in err
    assert [x.name for x in spool.list(Queue.QUEUE1)] == [e.name]


def test_save_with_delay_then_plain_save_restores_the_layout(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="p")
    co = spool.checkout(e)
    co.save(Queue.QUEUE2, delay=30)
    e2 = multispool.Entry(spool, Queue.QUEUE2, e.name)
    due = e2.due()
    assert due is not None and due > time.time() + 25
    # A direct checkout ignores the due time (operators, tools); a plain save clears it.
    spool.checkout(e2).save(Queue.QUEUE1)
    assert reg_size(spool, e.name) == 0 and e.due() is None
    # Save as a handler action, with a timedelta.
    import datetime

    later = datetime.timedelta(seconds=5)
    spool.with_entry(e, lambda m, d: (multispool.Save(m, Queue.QUEUE1, delay=later), None))
    assert (e.due() or 0) > time.time() + 4


def test_retry_action_keeps_queue_and_attempts(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="r")
    spool.with_entry(e, lambda m, d: (multispool.Retry(20), None))
    assert spool.list(Queue.QUEUE1) == [e]
    assert e.direct.contents() == Cog(1) and e.attempts() == 0
    assert (e.due() or 0) > time.time() + 15
    spool.with_entry(e, lambda m, d: (multispool.Retry(0, metadata=Cog(2)), None))
    assert e.direct.contents() == Cog(2) and e.due() is None


# -- readers ----------------------------------------------------------------------------


def test_reader_skips_entries_not_due(spool: multispool.Spool[Any, bytes]) -> None:
    d = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="a", delay=60)
    p = spool.enqueue(Queue.QUEUE1, Cog(2), b"x", reserve="b")
    with spool.reader(Queue.QUEUE1) as r:
        co = r.dequeue_available()
        assert co is not None and co.name == p.name
        co.remove()
        assert r.dequeue_available() is None
        assert r.dequeue(timeout=0.2) is None
        got: list[str] = []
        r.iter_available(lambda m, df: got.append(m) or multispool.REMOVE)
        assert got == []
    assert spool.list(Queue.QUEUE1) == [d]
    assert spool.list_checkouts_unsafe(Queue.QUEUE1) == []


def test_reader_wakes_at_due_time(tmp_path: Path) -> None:
    """Wake by a timer at the due time, not by rescans: rescan_interval is far longer.
    Durability "none": what is timed is the wake, not the claim's fsyncs (several ms each
    on a shared disk)."""
    spool = multispool.Spool.create(
        tmp_path / "spool",
        multispool.Spoolable(
            queues=Queue, metadata=Cog, durability="none", name_generator=multispool.PrefixNames()
        ),
    )
    lateness = []
    with spool.reader(Queue.QUEUE1, rescan_interval=60) as r:
        assert r.dequeue_available() is None
        for i, delay in enumerate((0.3, 0.2, 0.25, 0.15, 0.2)):
            e = spool.enqueue(Queue.QUEUE1, Cog(i), b"x", reserve=f"w{i}", delay=delay)
            due = e.due()
            assert due is not None
            co = r.dequeue(timeout=WAIT)
            now = time.time()
            assert co is not None and co.name == e.name
            assert now >= due  # never early
            lateness.append(now - due)
            co.remove()
    # Within 10 ms of the due time (on 2 shared, loaded cores: judged on the median;
    # a rescan, not a timer, would be up to rescan_interval late).
    assert statistics.median(lateness) < 0.010, lateness
    assert max(lateness) < 0.25, lateness


def test_earlier_due_time_is_noticed(spool: multispool.Spool[Any, bytes]) -> None:
    """A reader caches a due time an hour ahead; the entry is checked out directly and
    saved due now: the reader hands it out at once (no hour-long wait)."""
    e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="e", delay=3600)
    with spool.reader(Queue.QUEUE1, rescan_interval=60) as r:
        assert r.dequeue_available() is None
        assert r.dequeue_available() is None  # cached: no claim attempt
        spool.checkout(e).save(Queue.QUEUE1)
        co = r.dequeue(timeout=WAIT)
        assert co is not None and co.name == e.name
        co.remove()


@pytest.mark.parametrize("how", ["dequeue_available", "dequeue"])
def test_earlier_due_time_is_noticed_by_a_listing(spool: multispool.Spool[Any, bytes], how: str) -> None:
    """As above, with no event naming the entry: a polling reader (whose polls compare
    names, and the name stayed) and a fresh listing. The entry is due now and in its
    queue: dequeue_available hands it out, dequeue does not wait for the cached hour."""
    e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="e", delay=3600)
    with spool.reader(Queue.QUEUE1, observer="polling", poll_interval=60, rescan_interval=0.1) as r:
        assert r.dequeue_available() is None
        spool.checkout(e).save(Queue.QUEUE1)
        assert e.due() is None
        co = r.dequeue_available() if how == "dequeue_available" else r.dequeue(timeout=2)
        assert co is not None and co.name == e.name
        co.remove()


def test_many_delayed_entries_cost_no_cpu_and_wake_on_time(spool: multispool.Spool[Any, bytes]) -> None:
    """10,000 delayed entries, nothing due: the waiting reader stays under 0.1 % of a core
    (deferred names are not claimed again; rescans do not list an unchanged directory);
    then the earliest wakes it within 10 ms of its due time."""
    n = 10_000 if SLOW else 1_000
    lay = spool._layout
    far = time.time() + 3600
    record = bytes(_schedule.SLOT_SIZE) + _schedule.encode_slot(far, 0, 1)
    # Written directly (the enqueue path is tested elsewhere): keeps this test fast.
    for i in range(n):
        name = f"m{i:06d}"
        with open(lay.registry_file(name), "wb") as f:
            f.write(record)
        open(lay.queue_file("queue1", name), "wb").close()
    # A directory changed seconds ago proves nothing to the reader's rescans (coarse
    # timestamps): date it back, as if the entries had been there for a while.
    old = time.time() - 60
    os.utime(lay.queue("queue1"), (old, old))
    with spool.reader(Queue.QUEUE1, rescan_interval=1.0) as r:
        assert r.dequeue_available() is None  # the one pass that reads every record
        assert r.dequeue_available() is None  # deferred: no lock, no read
        # Ended by ``stop``, not a timeout: a dequeue that times out makes one last
        # listing, which is not what is measured here.
        stop = threading.Event()
        timer = threading.Timer(3.0, stop.set)
        # What the waiting thread does, where listings and claims would run: one wait
        # for the whole time, no listing, no claim. (Counted, not timed: on this
        # project's VMs a single futex wake-up is charged 0.5-5 ms of thread CPU.)
        calls: collections.Counter[str] = collections.Counter()
        lib = os.path.dirname(multispool.__file__)

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "call" and frame.f_code.co_filename.startswith(lib):
                calls[frame.f_code.co_name] += 1

        timer.start()
        sys.setprofile(profile)  # this thread only
        try:
            assert r.dequeue(stop=stop) is None  # 3 rescans of an unchanged directory
        finally:
            sys.setprofile(None)
            timer.cancel()
            timer.join()
        assert calls["_wait"] == 1, dict(calls)
        assert calls["_relist"] == 0 and calls["_claim"] == 0 and calls["read_file"] == 0, dict(calls)
        lateness = []
        for i in range(3):
            e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve=f"soon{i}", delay=0.3)
            due = e.due()
            assert due is not None
            co = r.dequeue(timeout=WAIT)
            lateness.append(time.time() - due)
            assert co is not None and co.name == e.name
            co.remove()
        assert min(lateness) >= 0 and statistics.median(lateness) < 0.010, lateness
        assert max(lateness) < 0.25, lateness


ORDER_CHILD = """
import enum, sys, time
import multispool
from conftest import Queue, Widget
sp = multispool.Spoolable(queues=Queue, metadata=Widget, name_generator=multispool.PrefixNames())
spool = multispool.Spool.load(sys.argv[1], sp)
from conftest import Cog
from _procs import serve
def handle(line):
    name, delay = line.split()
    spool.enqueue(Queue.QUEUE1, Cog(0), b"x", reserve=name, delay=float(delay))
    return "ok"
serve(handle)
"""


def test_due_order_across_processes(spool: multispool.Spool[Any, bytes]) -> None:
    """Another process enqueues entries whose name order is the reverse of their due
    order; a reader here hands them out in due order, each not before it is due."""
    with workers(ORDER_CHILD, 1, spool.dir) as (w,), spool.reader(Queue.QUEUE1, rescan_interval=60) as r:
        for name, delay in (("a", 0.9), ("b", 0.6), ("c", 0.3)):
            w.send(f"{name} {delay}")
            assert w.recv() == "ok"
        got = []
        for _ in range(3):
            co = r.dequeue(timeout=WAIT)
            assert co is not None
            due = multispool.Entry(spool, Queue.QUEUE1, co.name).due()
            assert due is None  # handed out only once due
            got.append(co.name[0])
            co.remove()
        assert got == ["c", "b", "a"]


# -- Monitor ----------------------------------------------------------------------------


def test_monitor_counts_queue_age_from_due_time(spool: multispool.Spool[Any, bytes]) -> None:
    """A delayed entry is not TooOld before it is due; once due, its age counts from then."""
    d = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="d", delay=3600)
    p = spool.enqueue(Queue.QUEUE1, Cog(2), b"x", reserve="p")
    past = time.time() - 100
    for e in (d, p):
        q = spool._layout.queue_file("queue1", e.name)
        os.utime(q, (past, past))
    limits = multispool.Limits(max_queue_ages={Queue.QUEUE1: 10})
    problems = multispool.Monitor(spool.dir, spool.spoolable, limits).run_once()
    assert [(type(x).__name__, x.file.filename) for x in problems] == [("TooOld", p.name)]
    # Due 50 s ago (after its mtime): 50 s old, over a 10 s limit, under a 60 s one.
    with spool.checkout(d) as co:
        co._move(Queue.QUEUE1, co.contents, time.time() - 50, 0)
    os.utime(spool._layout.queue_file("queue1", d.name), (past, past))
    problems = multispool.Monitor(spool.dir, spool.spoolable, limits).run_once()
    assert sorted(x.file.filename for x in problems) == [d.name, p.name]
    limits = multispool.Limits(max_queue_ages={Queue.QUEUE1: 60})
    problems = multispool.Monitor(spool.dir, spool.spoolable, limits).run_once()
    assert [x.file.filename for x in problems] == [p.name]


# -- command line -----------------------------------------------------------------------


def test_cli_due_attempts_and_delayed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from multispool.cli import main, make_spoolable

    d = str(tmp_path / "sp")
    assert main(["init", d, "--queue", "in", "--queue", "dead"]) == 0
    assert main(["enqueue", d, "in", "--metadata", "1", "--delay", "1h"]) == 0
    assert main(["enqueue", d, "in", "--metadata", "2"]) == 0
    capsys.readouterr()
    spool = multispool.Spool.load(d, make_spoolable(["in", "dead"]))
    q_in = spool.spoolable.queues("in")
    delayed, plain = spool.list(q_in)
    with spool.checkout(plain) as co:  # two counted failures, due now again
        co._move(q_in, co.contents, 0.0, 2)
    assert main(["ls", d, "in", "--json"]) == 0
    items = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert 3500 < items[delayed.name]["due"] - time.time() <= 3600
    assert items[delayed.name]["attempts"] == 0
    assert items[plain.name]["due"] is None and items[plain.name]["attempts"] == 2
    assert main(["ls", d, "in"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "AGE", "DUE", "ATTEMPTS"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert rows[delayed.name][2:5] == ["in", "60.0m", "0"] or rows[delayed.name][2:5] == ["in", "59.9m", "0"]
    assert rows[plain.name][2:4] == ["-", "2"]
    assert main(["status", d, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["in"]["delayed"] == 1 and st["in"]["entries"] == 2 and st["dead"]["delayed"] == 0


# -- Backoff ------------------------------------------------------------------------------


def test_backoff_schedule_and_jitter_bounds() -> None:
    b = multispool.Backoff(first=1.0, factor=2.0, max=10.0, jitter=0.0)
    assert [b.delay(a) for a in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.delay(10_000) == 10.0  # no overflow
    j = multispool.Backoff(first=2.0, factor=3.0, max=3600.0, jitter=0.25)
    for a in range(4):
        base = 2.0 * 3.0**a
        xs = [j.delay(a) for _ in range(2000)]
        assert all(base * 0.75 <= x <= base * 1.25 for x in xs)
        assert max(xs) > base * 1.2 and min(xs) < base * 0.8  # jitter is used
    d = multispool.Backoff()
    defaults = (d.first, d.factor, d.max, d.jitter, d.max_attempts, d.dead_letter)
    assert defaults == (1.0, 2.0, 3600.0, 0.1, None, None)
    for bad in (
        {"first": -1},
        {"factor": 0.5},
        {"jitter": 1.0},
        {"jitter": -0.1},
        {"max_attempts": 0},
        {"max": -1},
        # Not finite: a delay of infinity parks the entry for ever, and NaN never compares.
        {"max": float("inf")},
        {"first": float("inf")},
        {"factor": float("inf")},
        {"max": float("nan")},
        {"first": float("nan")},
        {"factor": float("nan")},
    ):
        with pytest.raises(ValueError):
            multispool.Backoff(**bad)


def test_backoff_delays_stay_finite_however_many_attempts() -> None:
    # Near the largest float: the exponential overflows and the cap holds it, then the
    # jitter raises the cap past the largest float about half the time.
    b = multispool.Backoff(first=1e300, factor=1e300, max=1.7e308, jitter=0.9)
    for a in (0, 1, 2, 10, 10_000):
        for _ in range(200):
            assert math.isfinite(b.delay(a)), a


def _failing(calls: list[tuple[str, float]]) -> Callable[[Any, Any], Any]:
    def f(m: Any, df: multispool.DataFile[Any]) -> Any:
        calls.append((os.path.basename(df.path), time.time()))
        raise RuntimeError("remote host down")

    return f


def test_backoff_retries_then_dead_letters(
    spool: multispool.Spool[Any, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(7), b"payload", reserve="f")
    ok = spool.enqueue(Queue.QUEUE1, Cog(8), b"fine", reserve="g")
    calls: list[tuple[str, float]] = []
    fail = _failing(calls)
    done: list[str] = []

    def f(m: Any, df: multispool.DataFile[Any]) -> Any:
        if os.path.basename(df.path) == ok.name:
            done.append(ok.name)
            return multispool.REMOVE
        return fail(m, df)

    policy = multispool.Backoff(first=0.05, factor=2.0, jitter=0.0, max_attempts=4, dead_letter=Queue.QUEUE3)
    stop = threading.Event()
    with (
        caplog.at_level(logging.WARNING, logger="multispool"),
        spool.reader(Queue.QUEUE1, rescan_interval=60) as r,
    ):
        t = threading.Thread(target=r.iter, args=(f,), kwargs={"stop": stop, "on_error": policy})
        t.start()
        try:
            wait_for(lambda: bool(spool.list(Queue.QUEUE3)), what="dead letter")
        finally:
            stop.set()
            t.join(WAIT)
    assert not t.is_alive()
    assert done == [ok.name]  # iter went on after the failures
    assert [c[0] for c in calls] == [e.name] * 4
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(calls)]
    for gap, want in zip(gaps, (0.05, 0.1, 0.2), strict=True):
        assert gap >= want - 0.002, gaps  # never before due
    dl = multispool.Entry(spool, Queue.QUEUE3, e.name)
    assert spool.list(Queue.QUEUE3) == [dl] and spool.list(Queue.QUEUE1) == []
    assert dl.attempts() == 4 and dl.due() is None
    assert dl.direct.contents() == Cog(7) and dl.direct.data_file().load() == b"payload"
    assert e.name in caplog.text and "remote host down" in caplog.text


@pytest.mark.parametrize("kind", ["sync", "aio-sync-f", "aio-async-f"])
@pytest.mark.parametrize("dead_letter", [Queue.QUEUE3, None], ids=["dead-letter", "retry"])
def test_policy_keeps_metadata_a_failing_handler_mutated_in_place(
    spool: multispool.Spool[Any, bytes], kind: str, dead_letter: Any
) -> None:
    """A handler changes its metadata object in place (msgspec Structs are mutable), then
    raises. Without a policy the entry goes back unchanged; with one it must too: the
    dead-letter queue gets it "with its metadata and data untouched" (API.md §12), and
    a retry tries again the entry as it was, not a half-done edit."""
    e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="m")
    policy = multispool.Backoff(first=3600, max_attempts=1 if dead_letter else None, dead_letter=dead_letter)

    def f(m: Any, df: Any) -> Any:
        m.n = 99
        raise RuntimeError("half done")

    async def af(m: Any, df: Any) -> Any:
        return f(m, df)

    if kind == "sync":
        with spool.reader(Queue.QUEUE1) as r:
            co = r.dequeue_available()
            assert co is not None
            r._process(co, f, policy)
    else:
        from multispool import aio

        async def main() -> None:
            async with aio.AsyncSpool(spool) as aspool, aspool.reader(Queue.QUEUE1) as r:
                co = await r.dequeue_available()
                assert co is not None
                await r._process(co, f if kind == "aio-sync-f" else af, policy)

        asyncio.run(main())
    q = dead_letter or Queue.QUEUE1
    got = multispool.Entry(spool, q, e.name)
    assert spool.list(q) == [got] and got.attempts() == 1
    assert got.direct.contents() == Cog(1)


def test_attempts_count_up_and_reset_on_save(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="c")
    policy = multispool.Backoff(first=0.0, jitter=0.0)
    with spool.reader(Queue.QUEUE1) as r:
        for want in (1, 2):
            co = r.dequeue_available()
            assert co is not None and co.attempts == want - 1
            r._process(co, _failing([]), policy)
            assert e.attempts() == want
        co = r.dequeue_available()
        assert co is not None
        co.save(Queue.QUEUE2)
    assert reg_size(spool, e.name) == 0  # back to the OCaml layout


def test_no_policy_or_no_dead_letter_propagates(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="n")
    with spool.reader(Queue.QUEUE1) as r:
        with pytest.raises(RuntimeError):
            r.iter(_failing([]))
        assert e.attempts() == 0 and e.due() is None and spool.list(Queue.QUEUE1) == [e]
        # Out of attempts with nowhere to put it: as without a policy, nothing lost.
        with pytest.raises(RuntimeError):
            r.iter(_failing([]), on_error=multispool.Backoff(max_attempts=1))
        assert e.attempts() == 0 and spool.list(Queue.QUEUE1) == [e]
        with pytest.raises(TypeError):
            r.iter(_failing([]), on_error="retry")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            r.iter(_failing([]), on_error=multispool.Backoff(dead_letter="elsewhere"))
        # Its own queue as the dead-letter queue: once out of attempts, every failure
        # would put the entry straight back, due at once, for ever.
        with pytest.raises(ValueError, match="dead_letter"):
            r.iter(_failing([]), on_error=multispool.Backoff(max_attempts=1, dead_letter=Queue.QUEUE1))
        assert e.attempts() == 0 and spool.list(Queue.QUEUE1) == [e]


async def _aio_iter_own_dead_letter(spool: multispool.Spool[Any, bytes]) -> None:
    import multispool.aio

    async with multispool.aio.AsyncSpool(spool) as aspool:
        r = aspool.reader(Queue.QUEUE1)
        try:
            own = multispool.Backoff(max_attempts=1, dead_letter=Queue.QUEUE1)
            with pytest.raises(ValueError, match="dead_letter"):
                await r.iter(_failing([]), on_error=own)
        finally:
            await r.aclose()


def test_own_queue_as_dead_letter_is_refused_by_the_async_reader(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="n")
    asyncio.run(_aio_iter_own_dead_letter(spool))
    assert e.attempts() == 0 and spool.list(Queue.QUEUE1) == [e]


# -- crash safety -----------------------------------------------------------------------

KILL_CHILD = """
import os, sys, time
import multispool
from multispool import _schedule, _spool
from _paths import src_dst
from conftest import Queue, Widget
sp = multispool.Spoolable(queues=Queue, metadata=Widget, name_generator=multispool.PrefixNames())
spool = multispool.Spool.load(sys.argv[1], sp)
where = sys.argv[2]
real_write, real_rename = _schedule.write_fd, os.rename
def hang(*a, **k):
    print("hung", flush=True)
    time.sleep(3600)
if where == "before-record":
    _spool._schedule.write_fd = hang
else:
    def rename(src, dst, **k):
        if ".checkout" in src_dst(src, dst, k)[0] and where == "before-rename":
            hang()
        return real_rename(src, dst, **k)
    _spool.os.rename = rename
with spool.reader(Queue.QUEUE1) as r:
    co = r.dequeue_available()
    print("attempts", co.attempts, flush=True)
    r._process(co, lambda m, d: 1 / 0, multispool.Backoff(first=30, jitter=0))
"""


@pytest.mark.parametrize("where", ["before-record", "before-rename"])
def test_kill9_in_the_middle_of_a_retry(spool: multispool.Spool[Any, bytes], where: str) -> None:
    """A consumer killed while retrying leaves the entry recoverable, and its attempt
    count is never below the last acknowledged one."""
    e = spool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="k")
    with spool.checkout(e) as co:  # one acknowledged failure first: attempts 1
        co._fail(multispool.Backoff(first=0, jitter=0))
    assert e.attempts() == 1
    w = Worker(KILL_CHILD, spool.dir, where)
    try:
        assert w.recv() == "attempts 1"
        assert w.recv() == "hung"
        w.close()  # SIGKILL
        assert w.proc.returncode == -9
    finally:
        w.close()
    assert spool.recover_checkouts() == [e]
    want = 1 if where == "before-record" else 2
    assert e.attempts() == want
    assert spool.list(Queue.QUEUE1) == [e]
    if where == "before-rename":
        assert (e.due() or 0) > time.time() + 20  # the retry decided was kept
    assert e.direct.contents() == Cog(1)


# -- asyncio ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_aio_delay_backoff_and_dead_letter(
    tmp_path: Path, spoolable: multispool.Spoolable[bytes], kind: str
) -> None:
    from multispool import aio

    async def main() -> None:
        async with await aio.AsyncSpool.create(tmp_path / "s", spoolable) as aspool:
            d = await aspool.enqueue(Queue.QUEUE1, Cog(1), b"x", reserve="d", delay=0.3)
            due = await d.due()
            assert due is not None and await d.attempts() == 0
            async with aspool.reader(Queue.QUEUE1, rescan_interval=60) as r:
                assert await r.dequeue_available() is None
                co = await r.dequeue(timeout=WAIT)
                assert co is not None and time.time() >= due
                assert time.time() - due < 0.1
                await co.retry(0.1)
                co = await r.dequeue(timeout=WAIT)
                assert co is not None
                await co.save(Queue.QUEUE1, delay=0.05)
                calls: list[tuple[str, float]] = []
                policy = multispool.Backoff(first=0.05, jitter=0.0, max_attempts=3, dead_letter=Queue.QUEUE3)
                stop = asyncio.Event()
                if kind == "sync":
                    f: Any = _failing(calls)
                else:
                    sync_f = _failing(calls)

                    async def f(m: Any, df: Any) -> Any:
                        return sync_f(m, df)

                async def watch() -> None:
                    while not await aspool.list(Queue.QUEUE3):
                        await asyncio.sleep(0.01)
                    stop.set()

                watcher = asyncio.ensure_future(watch())
                await asyncio.wait_for(r.iter(f, stop=stop, on_error=policy), WAIT)
                await watcher
                assert len(calls) == 3
                dl = (await aspool.list(Queue.QUEUE3))[0]
                assert await dl.attempts() == 3

    asyncio.run(main())


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip("owner locks")
