"""Crash recovery (API.md §8): recover_checkouts and clean_abandoned against real processes
killed with SIGKILL at known points, and against live owners that must never be touched.

Every child is a real process (``python -c``) that does its work, prints ``READY ...`` on
stdout, then blocks reading stdin until it is killed; tests always kill and reap children
by PID in ``finally`` (the ``procs`` fixture).
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import multispool
from _procs import child_env, unprivileged
from conftest import Cog, Queue, Widget

LIB = str(Path(__file__).resolve().parent.parent / "lib")

# Run by every child before its own code: the same queues as conftest.Queue, metadata
# decoded as Any (the tagged Cog JSON decodes fine), PrefixNames as the tests' spools.
PRELUDE = """
import enum, json, os, sys, time
import multispool

class Queue(enum.Enum):
    QUEUE1 = "queue1"
    QUEUE2 = "queue2"
    QUEUE3 = "queue3"

class BlockingData:
    # A data codec whose save writes part of the payload, says READY, then blocks on
    # stdin: the test kills the process exactly in the middle of a data write.
    def load(self, path):
        with open(path, "rb") as f:
            return f.read()
    def save(self, value, path):
        with open(path, "wb") as f:
            f.write(value[: len(value) // 2])
            f.flush()
        print("READY", os.path.basename(path), flush=True)
        sys.stdin.read()

def ready(*words):
    print("READY", *words, flush=True)

def block():
    sys.stdin.read()

sp = multispool.Spoolable(queues=Queue, name_generator=multispool.PrefixNames(),
                          data=BlockingData() if os.environ.get("BLOCKING_DATA") else None,
                          durability=os.environ.get("DURABILITY", "full"))
spool = multispool.Spool.load(sys.argv[1], sp)
"""


class Procs:
    """Children of one test; every one is killed and reaped at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.extra_pids: list[int] = []

    def start(self, code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        full_env = dict(os.environ, PYTHONPATH=LIB + os.pathsep + os.environ.get("PYTHONPATH", ""))
        full_env.update(env or {})
        p = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self.procs.append(p)
        return p

    @staticmethod
    def ready(p: subprocess.Popen[str]) -> list[str]:
        """Wait for the child's READY line (EOF means it died: fail with its exit code)."""
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line.startswith("READY"):
            p.wait(10)
            raise AssertionError(f"child exited {p.returncode} before READY (got {line!r})")
        return line.split()[1:]

    @staticmethod
    def kill9(p: subprocess.Popen[str]) -> None:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        assert p.returncode == -signal.SIGKILL

    def close(self) -> None:
        for pid in self.extra_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()


@pytest.fixture
def procs() -> Iterator[Procs]:
    ps = Procs()
    try:
        yield ps
    finally:
        ps.close()


# Check out the named entries of QUEUE1 (argv[2:]; "q2:NAME" means QUEUE2), then block.
HOLD = """
held = []
for arg in sys.argv[2:]:
    q, name = (Queue.QUEUE2, arg[3:]) if arg.startswith("q2:") else (Queue.QUEUE1, arg)
    held.append(spool.checkout(multispool.Entry(spool, q, name)))
ready(*[co.name for co in held])
block()
"""


def _names(entries: list[multispool.Entry[Any, bytes]]) -> list[tuple[str, str]]:
    return sorted((e.queue.value, e.name) for e in entries)


def _fill(
    spool: multispool.Spool[Any, bytes], n: int, queue: enum.Enum = Queue.QUEUE1, seed: str = "e"
) -> list[str]:
    return [spool.enqueue(queue, Cog(n=i), b"data%d" % i, reserve=seed).name for i in range(n)]


def _tree(spool: multispool.Spool[Any, bytes]) -> list[str]:
    root = Path(spool.dir)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _layout_problems(spool: multispool.Spool[Any, bytes]) -> list[str]:
    """Every registry file has exactly one queue/checkout file and vice versa; no tmp."""
    root = Path(spool.dir)
    regs = {p.name for p in (root / ".registry").iterdir()}
    places: dict[str, list[str]] = {}
    for q in Queue:
        for d in (root / q.value, root / q.value / ".checkout"):
            for p in d.iterdir():
                if p.name != ".checkout":
                    places.setdefault(p.name, []).append(str(d.relative_to(root)))
    problems = [f"{n}: in {ds}" for n, ds in places.items() if len(ds) != 1]
    problems += [f"{n}: no registry" for n in places if n not in regs]
    problems += [f"{n}: registry only" for n in regs if n not in places]
    problems += [f"{n}: tmp file" for n in os.listdir(root / ".tmp")]
    problems += [f"{n}: data without registry" for n in os.listdir(root / ".data") if n not in regs]
    return problems


def _wait_for(cond: object, what: str, timeout: float = 10.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------
# recover_checkouts
# ---------------------------------------------------------------------------------------


def test_recover_brings_back_exactly_the_dead_holders_checkouts(
    spool: multispool.Spool[Any, bytes], spoolable: multispool.Spoolable[Any, bytes], procs: Procs
) -> None:
    names = _fill(spool, 6)
    q2 = _fill(spool, 1, Queue.QUEUE2, seed="z")[0]
    dead = procs.start(HOLD, spool.dir, names[0], names[1], "q2:" + q2)
    alive = procs.start(HOLD, spool.dir, names[2], names[3])
    assert procs.ready(dead) == [names[0], names[1], q2]
    assert procs.ready(alive) == [names[2], names[3]]
    # A live holder in this very process, on another Spool object of the same spool.
    other = multispool.Spool.load(spool.dir, spoolable)
    mine = other.checkout(multispool.Entry(other, Queue.QUEUE1, names[4]))

    assert spool.recover_checkouts() == []  # everybody alive: nothing moves
    procs.kill9(dead)
    recovered = spool.recover_checkouts()

    assert all(type(e) is multispool.Entry for e in recovered)
    assert _names(recovered) == sorted([("queue1", names[0]), ("queue1", names[1]), ("queue2", q2)])
    assert [e.name for e in spool.list(Queue.QUEUE1)] == [names[0], names[1], names[5]]
    assert [e.name for e in spool.list(Queue.QUEUE2)] == [q2]
    assert sorted(os.listdir(Path(spool.dir, "queue1", ".checkout"))) == names[2:5]
    # Recovered entries are whole and usable again.
    co = spool.checkout(multispool.Entry(spool, Queue.QUEUE1, names[0]))
    assert co.contents == Cog(n=0) and co.data_file.load() == b"data0"
    co.release()
    # The live same-process holder still owns its entry and can finish it.
    assert spool.recover_checkouts() == []
    mine.save(Queue.QUEUE2)
    assert sorted(e.name for e in spool.list(Queue.QUEUE2)) == sorted([q2, names[4]])
    # ...and once the other holder dies, its entries come back too.
    procs.kill9(alive)
    assert _names(spool.recover_checkouts(Queue.QUEUE1)) == [("queue1", names[2]), ("queue1", names[3])]
    assert _layout_problems(spool) == []


def test_recover_with_queue_argument_only_touches_that_queue(
    spool: multispool.Spool[Any, bytes], procs: Procs
) -> None:
    a = _fill(spool, 1)[0]
    b = _fill(spool, 1, Queue.QUEUE2, seed="z")[0]
    p = procs.start(HOLD, spool.dir, a, "q2:" + b)
    procs.ready(p)
    procs.kill9(p)
    assert _names(spool.recover_checkouts(Queue.QUEUE2)) == [("queue2", b)]
    assert os.listdir(Path(spool.dir, "queue1", ".checkout")) == [a]
    assert _names(spool.recover_checkouts()) == [("queue1", a)]


# N processes call recover_checkouts at once (released together through their stdin).
RECOVER_RACE = """
ready()
sys.stdin.readline()
print(json.dumps([e.name for e in spool.recover_checkouts()]), flush=True)
"""


def test_concurrent_recover_from_several_processes_never_duplicates(
    spool: multispool.Spool[Any, bytes], procs: Procs
) -> None:
    names = _fill(spool, 60)
    holder = procs.start(HOLD, spool.dir, *names)
    procs.ready(holder)
    procs.kill9(holder)
    racers = [procs.start(RECOVER_RACE, spool.dir) for _ in range(4)]
    for r in racers:
        procs.ready(r)
    for r in racers:
        assert r.stdin is not None
        r.stdin.write("go\n")
        r.stdin.flush()
    results: list[list[str]] = []
    for r in racers:
        assert r.stdout is not None
        results.append(json.loads(r.stdout.readline()))
        assert r.wait(30) == 0
    flat = [n for res in results for n in res]
    assert sorted(flat) == names, "each entry recovered by exactly one process"
    assert [e.name for e in spool.list(Queue.QUEUE1)] == names
    assert _layout_problems(spool) == []


# Check out one entry, start rewriting its data through the blocking codec: killed there.
HOLD_AND_REWRITE = """
co = spool.checkout(multispool.Entry(spool, Queue.QUEUE1, sys.argv[2]))
co.data_file.save(b"new data, never finished")
"""


def test_recover_removes_stale_tmp_of_dead_owner(spool: multispool.Spool[Any, bytes], procs: Procs) -> None:
    name = _fill(spool, 1)[0]
    p = procs.start(HOLD_AND_REWRITE, spool.dir, name, env={"BLOCKING_DATA": "1"})
    assert procs.ready(p) == [name]  # the codec was writing .tmp/NAME
    tmp = Path(spool.dir, ".tmp", name)
    assert tmp.exists()
    procs.kill9(p)
    assert _names(spool.recover_checkouts()) == [("queue1", name)]
    assert not tmp.exists()
    co = spool.checkout(multispool.Entry(spool, Queue.QUEUE1, name))
    assert co.data_file.load() == b"data0"  # the half-done rewrite never reached .data
    co.remove()
    assert _tree(spool) == sorted([".data", ".registry", ".tmp", *_queue_dirs()])


def _queue_dirs() -> list[str]:
    return [d for q in Queue for d in (q.value, f"{q.value}/.checkout")]


@pytest.mark.parametrize("quarantine", [False, True])
def test_recover_undecodable_checkout(
    tmp_path: Path, procs: Procs, quarantine: bool, caplog: pytest.LogCaptureFixture
) -> None:
    sp = multispool.Spoolable(
        queues=Queue,
        metadata=Widget,
        name_generator=multispool.PrefixNames(),
        quarantine=Queue.QUEUE3 if quarantine else None,
    )
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    bad, good = _fill(spool, 2)
    p = procs.start(HOLD, spool.dir, bad, good)
    procs.ready(p)
    procs.kill9(p)
    garbage = b"\xff\x00 not json {"
    cofile = Path(spool.dir, "queue1", ".checkout", bad)
    cofile.write_bytes(garbage)  # the disk rotted while it was checked out

    recovered = spool.recover_checkouts()

    assert _names(recovered) == [("queue1", good)]
    assert Path(spool.dir, ".registry", bad).exists()
    assert Path(spool.dir, ".data", bad).read_bytes() == b"data0"
    if quarantine:
        assert not cofile.exists()
        assert Path(spool.dir, "queue3", bad).read_bytes() == garbage
        assert [e.name for e in spool.list(Queue.QUEUE3)] == [bad]
    else:
        assert cofile.read_bytes() == garbage  # left for a person, untouched
        assert bad in caplog.text
        assert spool.recover_checkouts() == []  # and it stays there: no loop
        assert cofile.read_bytes() == garbage


FORK_HOLD = """
co = spool.checkout(multispool.Entry(spool, Queue.QUEUE1, sys.argv[2]))
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    # A long-lived forked helper (a worker pool, a daemonised child...) that knows
    # nothing of the checkout. fork() returns here after the at-fork handlers ran.
    os.write(w, b"x")
    while True:
        time.sleep(60)
os.read(r, 1)  # the child is past fork(): the owner's death alone must now free the entry
ready(str(pid))
block()
"""


def test_recover_after_owner_dies_while_its_forked_child_lives(
    spool: multispool.Spool[Any, bytes], procs: Procs
) -> None:
    name = _fill(spool, 1)[0]
    p = procs.start(FORK_HOLD, spool.dir, name)
    child = int(procs.ready(p)[0])
    procs.extra_pids.append(child)
    procs.kill9(p)
    assert _names(spool.recover_checkouts()) == [("queue1", name)]


# ---------------------------------------------------------------------------------------
# clean_abandoned
# ---------------------------------------------------------------------------------------

# Enqueue through the blocking data codec: READY comes while .data/NAME is half written.
ENQUEUE_BLOCKED = """
spool.enqueue(Queue.QUEUE1, {"n": 1}, b"0123456789", reserve="ab")
"""
RESERVE_AND_HOLD = """
ready(spool.reserve_name("rv"))
block()
"""


def _age(spool: multispool.Spool[Any, bytes], name: str, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(Path(spool.dir, ".registry", name), (t, t))


def test_clean_abandoned_removes_enqueues_of_dead_producers(
    spool: multispool.Spool[Any, bytes], procs: Procs
) -> None:
    kept = _fill(spool, 2)
    p = procs.start(ENQUEUE_BLOCKED, spool.dir, env={"BLOCKING_DATA": "1"})
    name = procs.ready(p)[0]
    files = [Path(spool.dir, d, name) for d in (".registry", ".tmp", ".data")]
    assert all(f.exists() for f in files)
    assert Path(spool.dir, ".data", name).read_bytes() == b"01234"

    assert spool.clean_abandoned(older_than=0) == []  # live enqueue: its lock is held
    assert all(f.exists() for f in files)

    procs.kill9(p)
    assert spool.clean_abandoned(older_than=600) == []  # too young
    assert all(f.exists() for f in files)
    _age(spool, name, 700)
    assert spool.clean_abandoned(older_than=600) == [name]
    assert not any(f.exists() for f in files)
    assert [e.name for e in spool.list(Queue.QUEUE1)] == kept
    assert _layout_problems(spool) == []


def test_clean_abandoned_older_than_zero_and_timedelta(
    spool: multispool.Spool[Any, bytes], procs: Procs
) -> None:
    import datetime

    dead = []
    for _ in range(3):
        p = procs.start(ENQUEUE_BLOCKED, spool.dir, env={"BLOCKING_DATA": "1"})
        dead.append(procs.ready(p)[0])
        procs.kill9(p)
    _age(spool, dead[0], 120)
    assert spool.clean_abandoned(older_than=datetime.timedelta(seconds=60)) == [dead[0]]
    assert spool.clean_abandoned(older_than=0) == sorted(dead[1:])
    assert os.listdir(Path(spool.dir, ".registry")) == []
    assert os.listdir(Path(spool.dir, ".tmp")) == []
    assert os.listdir(Path(spool.dir, ".data")) == []


def test_clean_abandoned_spares_live_reservations_and_entries(
    spool: multispool.Spool[Any, bytes], spoolable: multispool.Spoolable[Any, bytes], procs: Procs
) -> None:
    names = _fill(spool, 5)
    live_res = procs.start(RESERVE_AND_HOLD, spool.dir)
    reserved = procs.ready(live_res)[0]
    dead_res = procs.start(RESERVE_AND_HOLD, spool.dir)
    dead_reserved = procs.ready(dead_res)[0]
    procs.kill9(dead_res)
    live_holder = procs.start(HOLD, spool.dir, names[0])
    procs.ready(live_holder)
    dead_holder = procs.start(HOLD, spool.dir, names[1])
    procs.ready(dead_holder)
    procs.kill9(dead_holder)
    # A reservation of this process, made through another Spool object.
    other = multispool.Spool.load(spool.dir, spoolable)
    mine = other.reserve_name("mine")
    for n in [*names, reserved, dead_reserved, mine]:
        _age(spool, n, 10_000)

    assert spool.clean_abandoned(older_than=0) == [dead_reserved]

    # Queued entries, checkouts (live or dead) and live reservations are all untouched.
    assert [e.name for e in spool.list(Queue.QUEUE1)] == names[2:]
    assert sorted(os.listdir(Path(spool.dir, "queue1", ".checkout"))) == names[:2]
    assert _names(spool.recover_checkouts()) == [("queue1", names[1])]
    e = other.enqueue(Queue.QUEUE2, Cog(n=9), b"nine", use=mine)
    assert e.name == mine
    assert spool.checkout(multispool.Entry(spool, Queue.QUEUE2, mine)).data_file.load() == b"nine"
    procs.kill9(live_res)
    assert spool.clean_abandoned(older_than=0) == [reserved]


def test_name_reuse_after_remove_is_not_confused_with_the_old_owner(
    spool: multispool.Spool[Any, bytes], procs: Procs
) -> None:
    """PrefixNames reuses a name once its entry is removed; a stale registry inode of the
    old entry must never be mistaken for the new entry's owner lock (or vice versa)."""
    name = _fill(spool, 1)[0]
    co = spool.checkout(multispool.Entry(spool, Queue.QUEUE1, name))
    co.remove()
    again = _fill(spool, 1)[0]
    assert again == name
    p = procs.start(HOLD, spool.dir, name)
    procs.ready(p)
    assert spool.recover_checkouts() == []
    assert spool.clean_abandoned(older_than=0) == []
    procs.kill9(p)
    assert _names(spool.recover_checkouts()) == [("queue1", name)]


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "O_EXCL"])
def test_clean_abandoned_during_reservation_window(
    spool: multispool.Spool[Any, bytes], procs: Procs, monkeypatch: pytest.MonkeyPatch, tmpfile: bool
) -> None:
    """Adversarial interleaving, made deterministic: another process runs
    clean_abandoned(older_than=0) after our enqueue created its registry file but before
    it took the lock on it (on the O_EXCL path; with O_TMPFILE the file is not linked in
    yet). The enqueue must still end with a whole, claimable entry."""
    from multispool import _fs

    if not tmpfile:
        monkeypatch.setattr(_fs, "_TMPFILE_OK", False)
    real = _fs.try_lock
    calls = {"n": 0}
    cleaned: list[str] = []

    def interleaved(fd: int) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            cleaner = procs.start("ready(*spool.clean_abandoned(older_than=0))", spool.dir)
            cleaned.extend(procs.ready(cleaner))
            cleaner.wait(10)
        return real(fd)

    monkeypatch.setattr(_fs, "try_lock", interleaved)
    try:
        entry = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"payload", reserve="w")
    finally:
        monkeypatch.undo()
    assert calls["n"] >= 1
    if not tmpfile:
        # The window was really hit: the cleaner took the unlocked file, the enqueue moved on.
        assert cleaned == ["w000000"] and entry.name == "w000001"
    else:
        assert cleaned == [] and entry.name == "w000000"
    # The entry enqueue returned must be a whole, claimable entry.
    assert _layout_problems(spool) == []
    co = spool.checkout_if_found(entry)
    assert co is not None and co.data_file.load() == b"payload"



# Producers: enqueue N entries to QUEUE1, print each returned name.
PRODUCER = """
n = int(sys.argv[2])
ready()
for i in range(n):
    e = spool.enqueue(Queue.QUEUE1, {"i": i}, b"x" * (i % 50), reserve=f"p{os.getpid()}_")
    print(e.name, flush=True)
print("END", flush=True)
"""
# Consumers: remove what they can claim until told to stop (stdin closes); print names.
CONSUMER = """
import threading
stopped = threading.Event()
def watch():
    sys.stdin.read()
    stopped.set()
threading.Thread(target=watch, daemon=True).start()
ready()
while True:
    last = stopped.is_set()
    for e in spool.list(Queue.QUEUE1):
        co = spool.checkout_if_found(e)
        if co is not None:
            name = co.name
            co.remove()
            print(name, flush=True)
    if last:
        break
print("END", flush=True)
"""
CLEANER = """
import threading
stopped = threading.Event()
def watch():
    sys.stdin.read()
    stopped.set()
threading.Thread(target=watch, daemon=True).start()
ready()
rounds = 0
while not stopped.is_set():
    for name in spool.clean_abandoned(older_than=0):
        print(name, flush=True)
    spool.recover_checkouts()
    rounds += 1
print("END", rounds, flush=True)
"""


def _lines_until_end(p: subprocess.Popen[str]) -> list[str]:
    assert p.stdout is not None
    out = []
    for line in p.stdout:
        if line.startswith("END"):
            out.append(line.strip())
            break
        out.append(line.strip())
    return out


def test_clean_abandoned_loop_is_safe_with_live_producers_and_consumers(
    spool: multispool.Spool[Any, bytes], procs: Procs
) -> None:
    n = 120
    # Full durability: its fsyncs widen the windows between steps, which is the point.
    env = {"DURABILITY": "full"}
    cleaners = [procs.start(CLEANER, spool.dir, env=env) for _ in range(2)]
    producers = [procs.start(PRODUCER, spool.dir, str(n), env=env) for _ in range(2)]
    consumers = [procs.start(CONSUMER, spool.dir, env=env) for _ in range(2)]
    for p in [*cleaners, *producers, *consumers]:
        procs.ready(p)
    produced: list[str] = []
    for p in producers:
        lines = _lines_until_end(p)
        assert lines[-1] == "END", "a producer died: an enqueue failed"
        assert p.wait(30) == 0
        produced += lines[:-1]
    for p in [*consumers, *cleaners]:
        assert p.stdin is not None
        p.stdin.close()
    consumed: list[str] = []
    for p in consumers:
        lines = _lines_until_end(p)
        assert lines[-1] == "END"
        assert p.wait(30) == 0
        consumed += lines[:-1]
    for p in cleaners:
        lines = _lines_until_end(p)
        assert lines[-1].startswith("END")
        assert p.wait(30) == 0
        assert int(lines[-1].split()[1]) > 0
    # Names are reused (PrefixNames, per-producer seed), which makes the interleavings
    # dense; a cleaner may remove a registry file an enqueue created but had not locked
    # yet only if that enqueue then moves on to another name: checked by the counts below.
    left = [e.name for e in spool.list(Queue.QUEUE1)]
    assert len(produced) == 2 * n
    assert sorted(consumed + left) == sorted(produced), "no entry lost, none handled twice"
    assert _layout_problems(spool) == []


# ---------------------------------------------------------------------------------------
# reader(recover=True)
# ---------------------------------------------------------------------------------------


def test_reader_recover_true_runs_recovery_on_start(
    spool: multispool.Spool[Any, bytes], procs: Procs
) -> None:
    names = _fill(spool, 2)
    holder = procs.start(HOLD, spool.dir, names[0])
    procs.ready(holder)
    producer = procs.start(ENQUEUE_BLOCKED, spool.dir, env={"BLOCKING_DATA": "1"})
    abandoned = procs.ready(producer)[0]
    procs.kill9(holder)
    procs.kill9(producer)
    _age(spool, abandoned, 100_000)
    try:
        reader_cm = spool.reader(Queue.QUEUE1, observer="polling", recover=True)
    except ImportError as e:  # pragma: no cover - until lib/multispool/_reader.py lands
        pytest.skip(f"spool.reader is not available yet: {e}")
    with reader_cm as reader:
        got = []
        while (co := reader.dequeue_available()) is not None:
            got.append(co.name)
            co.remove()
    assert got == names, "the dead holder's checkout was recovered and handed out"
    assert not Path(spool.dir, ".registry", abandoned).exists()
    assert _layout_problems(spool) == []


def test_reader_recover_false_leaves_dead_checkouts(
    spool: multispool.Spool[Any, bytes], procs: Procs
) -> None:
    names = _fill(spool, 2)
    holder = procs.start(HOLD, spool.dir, names[0])
    procs.ready(holder)
    procs.kill9(holder)
    try:
        reader_cm = spool.reader(Queue.QUEUE1, observer="polling")
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"spool.reader is not available yet: {e}")
    with reader_cm as reader:
        co = reader.dequeue_available()
        assert co is not None and co.name == names[1]
        co.release()
        co = reader.dequeue_available()
        assert co is not None and co.name == names[1]
        co.remove()
        assert reader.dequeue_available() is None
    assert os.listdir(Path(spool.dir, "queue1", ".checkout")) == [names[0]]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # 3.12+, if threads linger
def test_checkout_inherited_by_fork_is_not_usable_in_the_child(spool: multispool.Spool[Any, bytes]) -> None:
    """A forked child closes its copy of the lock: it must neither remove nor give back
    (via `with co:`) the parent's checkout; the parent still can."""
    entry = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x", reserve="f")
    co = spool.checkout(entry)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            with co:
                try:
                    co.remove()
                except multispool.SpoolError:
                    code = 0
        finally:
            os._exit(code)
    status = None
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        if status is None:  # interrupted before the child was reaped
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The child's `with` exit did not move it back: it is still our checkout.
    assert [c.name for c in spool.list_checkouts_unsafe(Queue.QUEUE1)] == [entry.name]
    assert spool.recover_checkouts() == []  # we still hold its lock
    co.remove()
    assert spool.list(Queue.QUEUE1) == []


# -- a spool shared with a Spoolable that has more queues --------------------------------------


class _Both(enum.Enum):
    MINE = "mine"
    THEIRS = "theirs"


class _Mine(enum.Enum):
    MINE = "mine"


def test_entries_of_queues_another_spoolable_owns_are_not_abandoned(tmp_path: Path) -> None:
    """A Spoolable that knows only some of a spool's queues (an application that dropped
    a queue, or two sharing one spool) took every entry of the other queues for an
    abandoned enqueue: clean_abandoned (run by reader(recover=True) and fsck --repair)
    deleted their registry and data files, leaving theirs/NAME an orphan, and the
    Monitor reported them as Orphaned registry names."""
    d = str(tmp_path / "sp")
    both = multispool.Spool.create(d, multispool.Spoolable(queues=_Both))
    waiting = both.enqueue(_Both.THEIRS, {"n": 1}, b"precious")
    co = both.checkout(both.enqueue(_Both.THEIRS, {"n": 2}, b"held"))
    mine = multispool.Spool.load(d, multispool.Spoolable(queues=_Mine))
    old = time.time() - 3600
    for e in (waiting.name, co.name):
        os.utime(os.path.join(d, ".registry", e), (old, old))
    try:
        m = multispool.Monitor(d, mine.spoolable)
        assert m.run_once() == []
        assert mine.clean_abandoned(older_than=0) == []
        from multispool._monitor import repair

        assert repair(mine, m.limits, m.run_once(), dry_run=False) == []
        for e in (waiting.name, co.name):
            assert os.path.exists(os.path.join(d, ".registry", e))
            assert os.path.exists(os.path.join(d, ".data", e))
        assert both.checkout(waiting).data_file.load() == b"precious"
    finally:
        co.release()


def test_keep_link_of_a_move_into_a_queue_another_spoolable_owns_is_dropped(tmp_path: Path) -> None:
    """A crash after a move from mine/ into theirs/ (by a process that knows both) left
    the keep link mine/.~NAME; recovery by a Spoolable that knows only mine/ saw the
    entry in no queue and renamed the link back: the entry was then in both queues."""
    from multispool._layout import keep_name

    d = str(tmp_path / "sp")
    both = multispool.Spool.create(d, multispool.Spoolable(queues=_Both))
    e = both.enqueue(_Both.THEIRS, {"n": 1}, b"x")
    os.link(os.path.join(d, "theirs", e.name), os.path.join(d, "mine", keep_name(e.name)))
    mine = multispool.Spool.load(d, multispool.Spoolable(queues=_Mine))
    assert mine.recover_checkouts() == []
    assert sorted(os.listdir(os.path.join(d, "mine"))) == [".checkout"]
    assert [x.name for x in both.list(_Both.THEIRS)] == [e.name]


CLEAN_AS_USER = """
print(json.dumps(spool.clean_abandoned(older_than=0)))
with spool.reader(Queue.QUEUE1, recover=True) as reader:
    co = reader.dequeue_available()
    print(json.dumps(co and co.name))
    co.release()
"""


def test_clean_abandoned_passes_over_the_filesystems_lost_and_found(tmp_path: Path) -> None:
    """A spool at the root of an ext2/3/4 filesystem holds the filesystem's lost+found,
    root's and unreadable to the spool's user. clean_abandoned listed it (and its
    .checkout) as a queue another Spoolable might share, and failed with
    PermissionError: so did every reader started with recover=True."""
    prefix = unprivileged()
    if isinstance(prefix, str):
        pytest.skip(prefix)
    spool = multispool.Spool.create(tmp_path / "spool", multispool.Spoolable(queues=Queue, metadata=Widget))
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    gone = Path(spool.dir, ".registry", "gone")
    gone.touch()  # an enqueue whose process died
    os.utime(gone, (1, 1))
    lf = Path(spool.dir, "lost+found")
    lf.mkdir()
    lf.chmod(0)
    try:
        r = subprocess.run(
            [*prefix, sys.executable, "-c", PRELUDE + CLEAN_AS_USER, spool.dir],
            capture_output=True, text=True, timeout=60, env=child_env(), check=False,
        )
        assert r.returncode == 0, r.stderr
        assert [json.loads(line) for line in r.stdout.splitlines()] == [["gone"], e.name]
    finally:
        lf.chmod(0o700)


def test_clean_abandoned_goes_on_past_a_leftover_it_cannot_unlink(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two removals left their data and reservations (a data unlink that failed: EACCES in
    a sticky ``.data``, the file another user's). The first leftover's data still cannot
    be unlinked: clean_abandoned raised that PermissionError and stopped, so no leftover
    after it was ever cleaned, by any run. It now logs that one, naming the file, leaves
    its reservation (the name stays taken while its data is there) and goes on."""
    import multispool._fs as fs

    a = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"a", reserve="a")
    b = spool.enqueue(Queue.QUEUE1, Cog(n=2), b"b", reserve="b")
    for e in (a, b):
        os.unlink(Path(spool.dir, "queue1", e.name))  # what a remove does first
    stuck = os.path.join(spool.dir, ".data", a.name)
    real_unlink = fs.unlink_quiet

    def unlink(path: str) -> bool:
        if path == stuck:
            raise PermissionError(13, "Permission denied", path)
        return real_unlink(path)

    monkeypatch.setattr(fs, "unlink_quiet", unlink)
    with caplog.at_level("WARNING", logger="multispool"):
        assert spool.clean_abandoned(older_than=0) == [b.name]
    assert [stuck in r.getMessage() for r in caplog.records] == [True]
    assert os.path.exists(stuck) and os.path.exists(Path(spool.dir, ".registry", a.name))
    assert not os.path.exists(Path(spool.dir, ".registry", b.name))
    monkeypatch.undo()
    assert spool.clean_abandoned(older_than=0) == [a.name]
