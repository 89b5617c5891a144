"""Tests for the event-driven QueueReader (API.md §6).

Synchronisation is never a sleep: tests wait on Events or poll a condition with a
deadline. To know that a reader is really *blocked* (not still listing), tests wrap the
reader's ``_wait`` so that it reports when it starts waiting. Child processes are
always killed (by PID) and reaped in ``finally``. Long variants run with MULTISPOOL_SLOW=1.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import multispool
from conftest import Cog, Queue, Sprocket
from multispool import _watch
from multispool._reader import QueueReader

pytestmark = pytest.mark.timeout(120)

IS_LINUX = sys.platform.startswith("linux")
SLOW = os.environ.get("MULTISPOOL_SLOW") == "1"
MODES = ["native", "polling"]
# Children import the same multispool as this process.
LIB = str(Path(multispool.__file__).resolve().parent.parent)
WAIT = 10.0  # generous deadline for something that must happen
NO_RESCAN = 30.0  # a rescan interval no test waits for: only events can deliver in time

# Prepended to every child script: the same queues and metadata types as conftest.
PRELUDE = """
import enum, os, sys, threading, time
import msgspec, multispool

class Queue(enum.Enum):
    QUEUE1 = "queue1"
    QUEUE2 = "queue2"
    QUEUE3 = "queue3"

class Cog(msgspec.Struct, tag=True):
    n: int

class Sprocket(msgspec.Struct, tag=True):
    text: str

def open_spool(path, durability="full"):
    sp = multispool.Spoolable(queues=Queue, metadata=Cog | Sprocket,
                              name_generator=multispool.PrefixNames(), durability=durability)
    return multispool.Spool.load(path, sp)
"""

# argv: spool, seed, n. Enqueues n entries with seeds f"{seed}{k:05d}_" into queue1.
ENQUEUE = """
spool = open_spool(sys.argv[1])
for k in range(int(sys.argv[3])):
    spool.enqueue(Queue.QUEUE1, Cog(n=k), b"data", reserve=f"{sys.argv[2]}{k:05d}_")
"""


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


class Child:
    """A Python child process running PRELUDE + ``code``, driven over stdin/stdout lines.
    ``close()`` kills it by PID if still running and reaps it."""

    def __init__(self, code: str, *args: str, env: dict[str, str] | None = None) -> None:
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = LIB + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=full_env,
            bufsize=0,
        )
        self._buf = b""

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def recv(self, timeout: float = WAIT) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"child {self.proc.pid} sent no line in {timeout}s: {self.stderr()}")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError(f"child {self.proc.pid} exited: {self.stderr()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def wait(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(WAIT)
        finally:
            for f in (self.proc.stdin, self.proc.stdout):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
            self._err.close()


@contextlib.contextmanager
def children(*specs: tuple[str, tuple[str, ...]]) -> Iterator[list[Child]]:
    started: list[Child] = []
    try:
        for code, args in specs:
            started.append(Child(code, *args))
        yield started
    finally:
        for c in started:
            c.close()


def run_child(code: str, *args: str, env: dict[str, str] | None = None) -> None:
    """Run a child to completion; fail with its stderr if it fails."""
    c = Child(code, *args, env=env)
    try:
        rc = c.wait(60)
        assert rc == 0, c.stderr()
    finally:
        c.close()


def enqueue_in_child(spool: multispool.Spool[Any, Any], seed: str, n: int = 1) -> None:
    run_child(ENQUEUE, spool.dir, seed, str(n))


def wait_for(cond: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def hook_waits(reader: QueueReader[Any, Any]) -> threading.Event:
    """An Event set each time ``reader`` starts to block (after its listing found nothing)."""
    waiting = threading.Event()
    orig = reader._wait

    def _wait(wait: float, stop: threading.Event | None) -> None:
        waiting.set()
        orig(wait, stop)

    reader._wait = _wait  # type: ignore[method-assign]
    return waiting


def count_listings(monkeypatch: pytest.MonkeyPatch, spool: multispool.Spool[Any, Any]) -> list[float]:
    """Record the monotonic time of every directory listing ``spool`` makes."""
    calls: list[float] = []
    orig = spool._list_names

    def _list_names(directory: str) -> list[str]:
        calls.append(time.monotonic())
        return orig(directory)

    monkeypatch.setattr(spool, "_list_names", _list_names)
    return calls


class BgThread(threading.Thread):
    """Runs ``target()``, keeping its result or exception for the test thread."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._target_fn = target
        self.result: Any = None
        self.error: BaseException | None = None
        self.done_at: float | None = None

    def run(self) -> None:
        try:
            self.result = self._target_fn()
        except BaseException as e:
            self.error = e
        finally:
            self.done_at = time.monotonic()

    def finish(self, timeout: float = WAIT) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "background call did not return"
        if self.error is not None:
            raise self.error
        return self.result


def enqueue(spool: multispool.Spool[Any, Any], seed: str, n: int = 0, queue: enum.Enum = Queue.QUEUE1) -> str:
    return spool.enqueue(queue, Cog(n=n), b"data-" + seed.encode(), reserve=seed).name


def tree_files(spool: multispool.Spool[Any, Any]) -> list[str]:
    """Every non-directory under the spool (an empty list for a drained spool)."""
    out = []
    for root, _dirs, files in os.walk(spool.dir):
        out += [os.path.join(root, f) for f in files]
    return sorted(out)


def threads_besides(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


def inotify_instances() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                n += 1
    return n


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def qdir(spool: multispool.Spool[Any, Any], q: enum.Enum = Queue.QUEUE1) -> str:
    return spool._layout.queue(spool.spoolable.dirname(q))


# --------------------------------------------------------------------------------------
# lifecycle
# --------------------------------------------------------------------------------------


def test_context_manager_closes_and_leaves_no_thread(spool: multispool.Spool[Any, bytes], mode: str) -> None:
    before = set(threading.enumerate())
    enqueue(spool, "a")
    with spool.reader(Queue.QUEUE1, observer=mode, rescan_interval=NO_RESCAN) as reader:
        assert isinstance(reader, multispool.QueueReader)
        assert reader.observer == mode
        assert not reader.closed
        co = reader.dequeue(timeout=WAIT)
        assert co is not None and co.name == "a000000"
        co.remove()
    assert reader.closed
    wait_for(lambda: not threads_besides(before), what="observer threads to end")
    # Closed: nothing is handed out any more, nothing waits.
    enqueue(spool, "b")
    assert reader.dequeue_available() is None
    assert reader.dequeue(timeout=5) is None
    assert [e.name for e in spool.list(Queue.QUEUE1)] == ["b000000"]


def test_close_is_idempotent_and_leaves_no_thread(spool: multispool.Spool[Any, bytes], mode: str) -> None:
    before = set(threading.enumerate())
    reader = spool.reader(Queue.QUEUE1, observer=mode, rescan_interval=NO_RESCAN)
    try:
        assert threads_besides(before), "a reader watches its queue with an observer thread"
        assert reader.dequeue_available() is None
    finally:
        reader.close()
    reader.close()
    assert reader.closed
    wait_for(lambda: not threads_besides(before), what="observer threads to end")


def test_recover_moves_back_dead_checkouts(spool: multispool.Spool[Any, bytes]) -> None:
    name = enqueue(spool, "a")
    # A checkout whose owner died: the file is in .checkout and nobody holds the lock.
    dirname = spool.spoolable.dirname(Queue.QUEUE1)
    os.rename(spool._layout.queue_file(dirname, name), spool._layout.checkout_file(dirname, name))
    with spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
        assert reader.dequeue_available() is None
    with spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN, recover=True) as reader:
        co = reader.dequeue_available()
        assert co is not None and co.name == name
        co.remove()


def test_bad_arguments(spool: multispool.Spool[Any, bytes]) -> None:
    with pytest.raises(ValueError, match="rescan_interval"):
        spool.reader(Queue.QUEUE1, rescan_interval=0)
    with pytest.raises(ValueError, match="observer"):
        spool.reader(Queue.QUEUE1, observer="bogus")


@pytest.mark.parametrize("timeout", [float("inf"), 1e300], ids=["inf", "huge"])
def test_dequeue_with_an_infinite_timeout_waits_until_stopped(
    spool: multispool.Spool[Any, bytes], timeout: float
) -> None:
    """timeout=math.inf (or any timeout beyond what the OS can wait) means "no timeout",
    as in the aio reader: it waits for an entry or stop; it does not raise OverflowError."""
    stop = threading.Event()
    outcome: list[object] = []
    with spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
        waits = hook_waits(reader)

        def call() -> None:
            try:
                outcome.append(reader.dequeue(stop=stop, timeout=timeout))
            except BaseException as e:
                outcome.append(e)

        t = threading.Thread(target=call)
        t.start()
        try:
            deadline = time.monotonic() + 5
            while not waits.is_set() and t.is_alive():
                assert time.monotonic() < deadline, "dequeue neither waited nor returned"
                waits.wait(0.01)
            stop.set()
            t.join(5)
            assert not t.is_alive(), "dequeue did not return once stopped"
        finally:
            stop.set()
            reader.close()
            t.join(5)
    assert outcome == [None], outcome


@pytest.mark.parametrize("setting", ["rescan_interval", "poll_interval"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_reader_refuses_non_finite_intervals(
    spool: multispool.Spool[Any, bytes], setting: str, value: float
) -> None:
    """An infinite rescan_interval made the first listing raise OverflowError; an
    infinite poll_interval killed the polling thread. Both are refused, in the sync and
    the aio reader alike, like a zero or negative one."""
    with pytest.raises(ValueError, match=setting):
        spool.reader(Queue.QUEUE1, observer="polling", **{setting: value})
    from multispool.aio import AsyncSpool

    aspool = AsyncSpool(spool)
    with pytest.raises(ValueError, match=setting):
        aspool.reader(Queue.QUEUE1, observer="polling", **{setting: value})


def test_dequeue_refuses_a_nan_timeout(spool: multispool.Spool[Any, bytes]) -> None:
    # A NaN deadline is never reached (every comparison with it is false): the call
    # would wait forever. It is refused at once instead.
    outcome: list[BaseException | None] = []
    with spool.reader(Queue.QUEUE1) as reader:

        def call() -> None:
            try:
                reader.dequeue(timeout=float("nan"))
                outcome.append(None)
            except BaseException as e:
                outcome.append(e)

        t = threading.Thread(target=call)
        t.start()
        try:
            t.join(5)
            assert not t.is_alive(), "dequeue(timeout=nan) did not return"
        finally:
            reader.close()  # ends the wait if it is still waiting
            t.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], ValueError), outcome


# --------------------------------------------------------------------------------------
# iter / iter_available / dequeue / dequeue_available / __iter__
# --------------------------------------------------------------------------------------


def test_iter_processes_then_waits_and_wakes_on_other_process_enqueue(
    spool: multispool.Spool[Any, bytes], mode: str
) -> None:
    enqueue(spool, "a")
    enqueue(spool, "b")
    seen: list[str] = []
    stop = threading.Event()
    with spool.reader(Queue.QUEUE1, observer=mode, rescan_interval=NO_RESCAN) as reader:
        waiting = hook_waits(reader)

        def f(meta: Any, data: multispool.DataFile[bytes]) -> object:
            seen.append(data.name)
            return multispool.REMOVE

        t = BgThread(lambda: reader.iter(f, stop=stop))
        t.start()
        try:
            assert waiting.wait(WAIT), "iter never started waiting"
            assert seen == ["a000000", "b000000"]
            waiting.clear()
            start = time.monotonic()
            enqueue_in_child(spool, "c")
            wait_for(lambda: len(seen) == 3, what="the entry enqueued by another process")
            # Only an event can deliver it this fast: the rescan is NO_RESCAN seconds away.
            assert time.monotonic() - start < NO_RESCAN / 3
            assert seen[2] == "c00000_000000"
            assert waiting.wait(WAIT)
            stopped = time.monotonic()
            stop.set()
            t.join(WAIT)
            assert t.done_at is not None
            assert t.done_at - stopped < 0.1, f"iter took {t.done_at - stopped:.3f}s to stop"
        finally:
            stop.set()
            t.finish()
    assert tree_files(spool) == []


def test_iter_available_processes_what_is_there_and_returns(
    spool: multispool.Spool[Any, bytes], mode: str
) -> None:
    for s in ("b", "a", "c"):
        enqueue(spool, s)
    seen: list[str] = []

    def f(meta: Any, data: multispool.DataFile[bytes]) -> object:
        seen.append(data.name)
        return multispool.REMOVE

    with spool.reader(Queue.QUEUE1, observer=mode, rescan_interval=NO_RESCAN) as reader:
        start = time.monotonic()
        reader.iter_available(f)
        assert seen == ["a000000", "b000000", "c000000"]
        reader.iter_available(f)  # empty: returns at once
        assert time.monotonic() - start < 2.0
    assert tree_files(spool) == []


def test_dequeue_timeout_and_stop(spool: multispool.Spool[Any, bytes], mode: str) -> None:
    with spool.reader(Queue.QUEUE1, observer=mode, rescan_interval=NO_RESCAN) as reader:
        start = time.monotonic()
        assert reader.dequeue(timeout=0.3) is None
        elapsed = time.monotonic() - start
        assert 0.3 <= elapsed < 0.8, elapsed

        start = time.monotonic()
        assert reader.dequeue_available() is None
        assert time.monotonic() - start < 0.5

        stop = threading.Event()
        waiting = hook_waits(reader)
        t = BgThread(lambda: reader.dequeue(stop=stop, timeout=WAIT * 3))
        t.start()
        try:
            assert waiting.wait(WAIT)
            stopped = time.monotonic()
            stop.set()
            assert t.finish() is None
            assert t.done_at is not None and t.done_at - stopped < 0.1
        finally:
            stop.set()
            t.join(WAIT)
        # An already-set stop returns at once, even with an entry waiting.
        enqueue(spool, "a")
        assert reader.dequeue(stop=stop) is None
        co = reader.dequeue(timeout=WAIT)
        assert co is not None
        co.remove()


def test_iterating_a_reader_ends_when_it_is_closed_from_another_thread(
    spool: multispool.Spool[Any, bytes], mode: str
) -> None:
    enqueue(spool, "a")
    got: list[str] = []
    reader = spool.reader(Queue.QUEUE1, observer=mode, rescan_interval=NO_RESCAN)
    try:
        waiting = hook_waits(reader)

        def consume() -> None:
            for co in reader:
                got.append(co.name)
                co.remove()

        t = BgThread(consume)
        t.start()
        try:
            # The first wait comes only after "a" was handled.
            assert waiting.wait(WAIT)
            assert got == ["a000000"]
            enqueue(spool, "b")
            wait_for(lambda: len(got) == 2, what="an entry enqueued while the iterator blocked")
            closed = time.monotonic()
            reader.close()
            t.finish()
            assert t.done_at is not None and t.done_at - closed < 1.0
        finally:
            reader.close()
            t.join(WAIT)
    finally:
        reader.close()
    assert got == ["a000000", "b000000"]


@pytest.mark.parametrize("how", ["iter", "iter_available"])
def test_callback_actions(spool: multispool.Spool[Any, bytes], how: str) -> None:
    # Name order: drop, move, keep. The failing one comes last, so one pass does all three.
    drop = enqueue(spool, "a_drop", n=1)
    move = enqueue(spool, "b_move", n=2)
    keep = enqueue(spool, "c_keep", n=3)
    dirname = spool.spoolable.dirname(Queue.QUEUE1)
    before_keep = Path(spool._layout.queue_file(dirname, keep)).read_bytes()

    def f(meta: Any, data: multispool.DataFile[bytes]) -> object:
        if data.name == move:
            return multispool.Save(Sprocket(text=f"moved {meta.n}"), Queue.QUEUE2)
        if data.name == drop:
            return multispool.REMOVE
        raise KeyError("boom")

    stop = threading.Event()
    with (
        spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader,
        pytest.raises(KeyError, match="boom"),
    ):
        if how == "iter":
            reader.iter(f, stop=stop)
        else:
            reader.iter_available(f)
    # keep: back in its queue, byte for byte, not checked out, lock free, data intact.
    assert [e.name for e in spool.list(Queue.QUEUE1)] == [keep]
    assert Path(spool._layout.queue_file(dirname, keep)).read_bytes() == before_keep
    assert spool.list_checkouts_unsafe(Queue.QUEUE1) == []
    assert multispool.Entry(spool, Queue.QUEUE1, keep).direct.data_file().load() == b"data-c_keep"
    co = spool.checkout_if_found(multispool.Entry(spool, Queue.QUEUE1, keep))
    assert co is not None
    co.release()
    # move: saved into queue2 with its new metadata, data untouched.
    assert [e.name for e in spool.list(Queue.QUEUE2)] == [move]
    assert multispool.Entry(spool, Queue.QUEUE2, move).direct.contents() == Sprocket(text="moved 2")
    assert multispool.Entry(spool, Queue.QUEUE2, move).direct.data_file().load() == b"data-b_move"
    # drop: gone entirely (registry, data, queue and checkout files).
    assert not any(drop in p for p in tree_files(spool))


def test_callback_save_with_new_metadata(spool: multispool.Spool[Any, bytes]) -> None:
    name = enqueue(spool, "m", n=5)
    with spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
        reader.iter_available(lambda m, d: multispool.Save(Sprocket(text=f"n={m.n}"), Queue.QUEUE2))
    assert multispool.Entry(spool, Queue.QUEUE2, name).direct.contents() == Sprocket(text="n=5")
    assert spool.list(Queue.QUEUE1) == []


# --------------------------------------------------------------------------------------
# order, and entries taken by others
# --------------------------------------------------------------------------------------

HOLD = """
spool = open_spool(sys.argv[1])
co = spool.checkout(multispool.Entry(spool, Queue.QUEUE1, sys.argv[2]))
print("held", flush=True)
sys.stdin.readline()
co.release()
print("released", flush=True)
"""


def test_name_order_and_entries_taken_by_another_process_are_skipped(
    spool: multispool.Spool[Any, bytes],
) -> None:
    for s in ("d", "b", "a", "c", "e"):
        enqueue(spool, s)
    with spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
        co = reader.dequeue_available()  # lists a..e, claims a
        assert co is not None and co.name == "a000000"
        co.remove()
        # After the listing: another process takes c and holds it; we enqueue f.
        with children((HOLD, (spool.dir, "c000000"))) as (holder,):
            assert holder.recv() == "held"
            enqueue(spool, "0")  # sorts first, but lands after the listing: a later pass
            names = []
            while (co := reader.dequeue_available()) is not None:
                names.append(co.name)
                co.remove()
            assert names == ["b000000", "d000000", "e000000", "0000000"]
            holder.send("go")
            assert holder.recv() == "released"
            assert holder.wait() == 0
        co = reader.dequeue_available()
        assert co is not None and co.name == "c000000"
        co.remove()
    assert tree_files(spool) == []


# --------------------------------------------------------------------------------------
# waking across processes
# --------------------------------------------------------------------------------------

BLOCKED_READER = """
spool = open_spool(sys.argv[1])
with spool.reader(Queue.QUEUE1, observer=sys.argv[2], rescan_interval=float(sys.argv[3])) as r:
    orig = r._wait
    def _wait(wait, stop):
        print("waiting", flush=True)
        orig(wait, stop)
    r._wait = _wait
    for _ in sys.stdin:
        co = r.dequeue(timeout=60)
        t = time.perf_counter_ns()
        if co is None:
            print("none", flush=True)
            continue
        co.remove()
        print(co.name, t, flush=True)
"""


def test_blocked_reader_in_another_process_wakes_on_enqueue(
    spool: multispool.Spool[Any, bytes], mode: str
) -> None:
    with children((BLOCKED_READER, (spool.dir, mode, str(NO_RESCAN)))) as (child,):
        latencies = []
        for i in range(3):
            child.send("next")
            assert child.recv() == "waiting"
            name = enqueue(spool, f"w{i}")
            sent = time.perf_counter_ns()  # CLOCK_MONOTONIC: comparable across processes
            got, t = child.recv(timeout=NO_RESCAN / 2).split()
            assert got == name
            latencies.append((int(t) - sent) / 1e9)
        # Events, not the rescan (NO_RESCAN s): typically a few ms (polling: < 0.1 s); the
        # bound is loose so that a loaded 2-core CI machine does not make it flaky.
        assert max(latencies) < NO_RESCAN / 10, latencies


# --------------------------------------------------------------------------------------
# competing consumers
# --------------------------------------------------------------------------------------

CONSUMER = """
spool = open_spool(sys.argv[1], "none")
log = open(sys.argv[3], "a", buffering=1)
stop = threading.Event()
def watch_stdin():
    sys.stdin.read()
    stop.set()
threading.Thread(target=watch_stdin, daemon=True).start()
def f(meta, data):
    log.write(data.name + "\\n")
    return multispool.REMOVE
with spool.reader(Queue.QUEUE1, observer=sys.argv[2], rescan_interval=5.0) as r:
    print("ready", flush=True)
    r.iter(f, stop=stop)
print("done", flush=True)
"""

PRODUCER = """
spool = open_spool(sys.argv[1], "none")
print("ready", flush=True)
sys.stdin.readline()
for k in range(int(sys.argv[3])):
    spool.enqueue(Queue.QUEUE1, Cog(n=k), b"x", reserve=f"p{sys.argv[2]}_{k:05d}_")
print("done", flush=True)
"""


def _competing(spool: multispool.Spool[Any, bytes], tmp_path: Path, mode: str, per_producer: int) -> None:
    n_cons, n_prod = 3, 2
    logs = [tmp_path / f"consumer{i}.log" for i in range(n_cons)]
    specs = [(CONSUMER, (spool.dir, mode, str(log))) for log in logs]
    specs += [(PRODUCER, (spool.dir, str(i), str(per_producer))) for i in range(n_prod)]
    total = n_prod * per_producer

    def handled() -> list[str]:
        return [n for log in logs if log.exists() for n in log.read_text().splitlines()]

    with children(*specs) as procs:
        consumers, producers = procs[:n_cons], procs[n_cons:]
        for c in procs:
            assert c.recv(30) == "ready"
        for p in producers:  # the start barrier
            p.send("go")
        for p in producers:
            assert p.recv(120) == "done"
            assert p.wait() == 0
        wait_for(lambda: len(handled()) >= total, timeout=120, what=f"{total} entries handled")
        for c in consumers:
            c.close_stdin()
        for c in consumers:
            assert c.recv() == "done"
            assert c.wait() == 0, c.stderr()
        per_consumer = [len(log.read_text().splitlines()) for log in logs if log.exists()]
    names = handled()
    counts = collections.Counter(names)
    assert [n for n, k in counts.items() if k > 1] == [], "an entry was handled twice"
    expected = {f"p{i}_{k:05d}_000000" for i in range(n_prod) for k in range(per_producer)}
    assert set(names) == expected
    assert len(names) == total
    assert tree_files(spool) == [], "entries left behind"
    assert sum(per_consumer) == total


def test_competing_consumers_handle_each_entry_exactly_once(
    spool: multispool.Spool[Any, bytes], tmp_path: Path, mode: str
) -> None:
    _competing(spool, tmp_path, mode, per_producer=1000)


@pytest.mark.skipif(not SLOW, reason="set MULTISPOOL_SLOW=1")
def test_competing_consumers_long(spool: multispool.Spool[Any, bytes], tmp_path: Path, mode: str) -> None:
    _competing(spool, tmp_path, mode, per_producer=20_000)


# --------------------------------------------------------------------------------------
# lost events, observer choice
# --------------------------------------------------------------------------------------


class _DeafSubscription:
    def close(self) -> None:
        pass


def _deaf_subscribe(*args: Any, **kwargs: Any) -> _DeafSubscription:
    return _DeafSubscription()  # never calls back: every event is lost


@pytest.mark.parametrize("rescan", [0.2, NO_RESCAN])
def test_lost_events_are_made_up_by_the_rescan(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch, rescan: float
) -> None:
    monkeypatch.setattr(_watch, "subscribe", _deaf_subscribe)
    listings = count_listings(monkeypatch, spool)
    with spool.reader(Queue.QUEUE1, observer="native", rescan_interval=rescan) as reader:
        waiting = hook_waits(reader)
        t = BgThread(lambda: reader.dequeue(timeout=1.5))
        t.start()
        try:
            assert waiting.wait(WAIT)
            first_listing = listings[0]
            enqueue_in_child(spool, "late")
            name = "late00000_000000"
            co = t.finish()
        finally:
            t.join(WAIT)
        assert co is not None and co.name == name
        assert t.done_at is not None
        if rescan == NO_RESCAN:
            # Control: with no event and no rescan, nothing delivers it before dequeue's
            # deadline (where it lists one last time before giving up).
            assert t.done_at - first_listing >= 1.5 * 0.95
            assert len(listings) == 2
        else:
            # Delivered by a rescan: not before one could happen, and soon after.
            assert rescan * 0.9 <= t.done_at - first_listing < 1.0 + rescan
            assert len(listings) >= 2
        co.remove()


def test_env_var_polling_opens_no_inotify_and_still_delivers(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MULTISPOOL_OBSERVER", "polling")
    before = inotify_instances() if IS_LINUX else 0
    with spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
        assert reader.observer == "polling"
        waiting = hook_waits(reader)
        t = BgThread(lambda: reader.dequeue(timeout=WAIT))
        t.start()
        try:
            assert waiting.wait(WAIT)
            enqueue_in_child(spool, "p")
            co = t.finish()
        finally:
            t.join(WAIT)
        assert co is not None and co.name == "p00000_000000"
        co.remove()
        if IS_LINUX:
            assert inotify_instances() == before


@pytest.mark.skipif(not IS_LINUX or not os.path.isdir("/proc/self/fd"), reason="Linux /proc only")
def test_inotify_count_sees_native_readers(spool: multispool.Spool[Any, bytes]) -> None:
    # Guards the test above: the fd count does notice an inotify instance.
    before = inotify_instances()
    with spool.reader(Queue.QUEUE1, observer="native", rescan_interval=NO_RESCAN):
        assert inotify_instances() == before + 1
    assert inotify_instances() == before


def test_env_var_native_and_explicit_argument_wins(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MULTISPOOL_OBSERVER", "native")
    with spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
        assert reader.observer == "native"
    with spool.reader(Queue.QUEUE1, observer="polling", rescan_interval=NO_RESCAN) as reader:
        assert reader.observer == "polling"


# --------------------------------------------------------------------------------------
# large backlogs
# --------------------------------------------------------------------------------------


def _backlog_spool(
    spool: multispool.Spool[Any, bytes], tmp_path: Path, n: int, full: int
) -> multispool.Spool[Any, bytes]:
    """Fill queue1 with ``n`` entries, quickly: the first ``full`` (in name order) are real
    enqueues; the rest are hard links of one metadata file straight into the queue
    directory (no registry or data file: a reader that reached one would skip it)."""
    fast = multispool.Spool.load(
        spool.dir,
        multispool.Spoolable(
            queues=Queue,
            metadata=Cog | Sprocket,
            name_generator=multispool.PrefixNames(),
            durability="none",
        ),
    )
    for k in range(full):
        fast.enqueue(Queue.QUEUE1, Cog(n=k), b"", reserve=f"b{k:06d}_")
    dirname = fast.spoolable.dirname(Queue.QUEUE1)
    template = tmp_path / "metadata"
    for k in range(n - full):
        if k % 50_000 == 0:  # ext4 allows 65,000 links to one inode
            template = tmp_path / f"metadata{k}"
            template.write_bytes(msgspec.json.encode(Cog(n=-1)))
        os.link(template, fast._layout.queue_file(dirname, f"c{k:06d}"))
    return fast


@pytest.mark.parametrize(
    "backlog",
    [20_000, pytest.param(100_000, marks=pytest.mark.skipif(not SLOW, reason="set MULTISPOOL_SLOW=1"))],
)
def test_backlog_is_listed_once_not_per_dequeue(
    spool: multispool.Spool[Any, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backlog: int
) -> None:
    fast = _backlog_spool(spool, tmp_path, backlog, full=1000)
    assert len(os.listdir(qdir(fast))) == backlog + 1  # + .checkout
    listings = count_listings(monkeypatch, fast)
    with fast.reader(Queue.QUEUE1, observer="native", rescan_interval=NO_RESCAN) as reader:
        for k in range(1000):
            co = reader.dequeue() if k % 2 else reader.dequeue_available()
            assert co is not None and co.name == f"b{k:06d}_000000"
            co.remove()
    assert len(listings) == 1


# --------------------------------------------------------------------------------------
# failures
# --------------------------------------------------------------------------------------


def test_queue_directory_deleted_while_waiting(spool: multispool.Spool[Any, bytes], mode: str) -> None:
    with spool.reader(Queue.QUEUE1, observer=mode, rescan_interval=NO_RESCAN) as reader:
        waiting = hook_waits(reader)
        t = BgThread(lambda: reader.dequeue(timeout=NO_RESCAN * 2))
        t.start()
        try:
            assert waiting.wait(WAIT)
            shutil.rmtree(qdir(spool))
            t.join(WAIT)
            assert not t.is_alive(), "dequeue hangs after its queue directory was deleted"
            assert isinstance(t.error, multispool.NotASpoolError), t.error
            assert t.error.path == qdir(spool)
            assert qdir(spool) in str(t.error)
        finally:
            t.join(WAIT)


def _corrupt_first(spool: multispool.Spool[Any, bytes]) -> tuple[str, str, bytes]:
    bad = enqueue(spool, "a")
    good = enqueue(spool, "b")
    path = spool._layout.queue_file(spool.spoolable.dirname(Queue.QUEUE1), bad)
    junk = b"\x00 not json {"
    Path(path).write_bytes(junk)
    return bad, good, junk


@pytest.mark.parametrize("how", ["dequeue", "dequeue_available", "iter_available"])
def test_corrupt_entry_is_quarantined_and_reader_goes_on(tmp_path: Path, how: str) -> None:
    sp = multispool.Spoolable(
        queues=Queue,
        metadata=Cog | Sprocket,
        name_generator=multispool.PrefixNames(),
        quarantine=Queue.QUEUE3,
    )
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    bad, good, junk = _corrupt_first(spool)
    with spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
        if how == "iter_available":
            seen: list[str] = []
            reader.iter_available(lambda m, d: seen.append(d.name) or multispool.REMOVE)
            assert seen == [good]
        else:
            co = reader.dequeue(timeout=WAIT) if how == "dequeue" else reader.dequeue_available()
            assert co is not None and co.name == good
            co.remove()
    q3 = spool._layout.queue_file(sp.dirname(Queue.QUEUE3), bad)
    assert Path(q3).read_bytes() == junk
    assert spool.list(Queue.QUEUE1) == []
    assert os.listdir(spool._layout.checkout(sp.dirname(Queue.QUEUE1))) == []


@pytest.mark.parametrize("how", ["dequeue", "dequeue_available", "iter_available"])
def test_corrupt_entry_without_quarantine_raises_and_stays_checked_out(
    spool: multispool.Spool[Any, bytes], how: str
) -> None:
    bad, good, junk = _corrupt_first(spool)
    dirname = spool.spoolable.dirname(Queue.QUEUE1)
    cofile = spool._layout.checkout_file(dirname, bad)
    with spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
        with pytest.raises(multispool.CorruptEntryError) as info:
            if how == "dequeue":
                reader.dequeue(timeout=WAIT)
            elif how == "dequeue_available":
                reader.dequeue_available()
            else:
                reader.iter_available(lambda m, d: multispool.REMOVE)
        assert info.value.path == cofile
        assert cofile in str(info.value)
        assert Path(cofile).read_bytes() == junk
        assert [e.name for e in spool.list(Queue.QUEUE1)] == [good]
        # The reader goes on with the next entry.
        co = reader.dequeue(timeout=WAIT)
        assert co is not None and co.name == good
        co.remove()
    assert Path(cofile).read_bytes() == junk


# --------------------------------------------------------------------------------------
# idle cost
# --------------------------------------------------------------------------------------


class _CountingEvent(threading.Event):
    """A stop Event that counts the waits made on it (the stop relay's wake-ups)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


def _runtimes() -> dict[int, float]:
    """CPU seconds used so far by each thread of this process, by native id (Linux)."""
    out: dict[int, float] = {}
    for t in threading.enumerate():
        with contextlib.suppress(OSError, TypeError), open(f"/proc/self/task/{t.native_id}/schedstat") as f:
            out[t.native_id or 0] = int(f.read().split()[0]) / 1e9
    return out


def _blocked(
    reader: QueueReader[Any, Any], stop: _CountingEvent | None, seconds: float
) -> tuple[collections.Counter[str], float, int]:
    """A dequeue blocked ``seconds`` on an empty queue: the library functions the calling
    thread ran meanwhile (by name); the CPU seconds the library's other threads used
    (observer and rescan threads), the stop relay excepted; and how often the relay woke.

    Wake-ups are counted rather than timed where they are expected: on this project's
    VMs one futex wake-up is charged 0.5-5 ms of thread CPU (the hypervisor's time, not
    the library's; a bare ``threading.Event().wait(1)`` shows it), so a thread that wakes
    once a second would look like it spins. The calling thread is checked exactly: one
    wait for the whole time, one listing at the end. A short blocked dequeue first pays
    the one-off costs (first listing, lazy imports, the stop relay's start)."""
    calls: collections.Counter[str] = collections.Counter()
    lib = os.path.dirname(multispool.__file__)

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(lib):
            calls[frame.f_code.co_name] += 1

    assert reader.dequeue(stop=stop, timeout=0.05) is None
    waits0 = stop.waits if stop is not None else 0
    before = _runtimes()
    sys.setprofile(profile)  # this thread only
    try:
        assert reader.dequeue(stop=stop, timeout=seconds) is None
    finally:
        sys.setprofile(None)
    after = _runtimes()
    skip = {threading.get_native_id()} | {
        t.native_id or 0 for t in threading.enumerate() if t.name == "multispool-stop-relay"
    }
    others = sum(after[i] - before.get(i, 0.0) for i in after if i not in skip)
    return calls, others, (stop.waits - waits0 if stop is not None else 0)


def _assert_idle(calls: collections.Counter[str], others: float, relay_waits: int, seconds: float) -> None:
    assert calls["_wait"] == 1, f"the blocked dequeue woke up to look again: {dict(calls)}"
    assert calls["_relist"] <= 1, f"listed more than once (at the deadline): {dict(calls)}"
    assert others < 0.002, f"{others * 1e3:.1f} ms of CPU in other threads in 2 s (target: <= 0.1 %)"
    # Each relay wake-up is a few Python lines (microseconds): at most two a second.
    assert relay_waits <= 2 * seconds, f"the stop relay woke {relay_waits} times in {seconds} s"


def test_stop_relay_wakes_less_often_the_longer_a_reader_waits(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay checks on its waiters at doubling intervals: a reader idle for long
    costs a wake-up per RELAY_SLICE_MAX, not one per RELAY_SLICE; a stop set late still
    ends the wait at once."""
    from multispool import _reader

    monkeypatch.setattr(_reader, "RELAY_SLICE", 0.01)
    monkeypatch.setattr(_reader, "RELAY_SLICE_MAX", 0.16)
    stop = _CountingEvent()
    with spool.reader(Queue.QUEUE1, observer="native", rescan_interval=NO_RESCAN) as reader:
        t = threading.Timer(1.5, stop.set)
        t.start()
        try:
            t0 = time.monotonic()
            assert reader.dequeue(stop=stop, timeout=30) is None
            took = time.monotonic() - t0
        finally:
            t.cancel()
    assert 1.5 <= took < 5.0
    # 0.01, 0.02, 0.04, 0.08, then every 0.16 s: about 13 waits in 1.5 s (150 without
    # the doubling). A loaded machine only makes the waits longer, so fewer.
    assert stop.waits <= 16, f"the relay woke {stop.waits} times in 1.5 s"


def test_blocked_dequeue_without_stop_uses_no_cpu(spool: multispool.Spool[Any, bytes]) -> None:
    with spool.reader(Queue.QUEUE1, observer="native", rescan_interval=NO_RESCAN) as reader:
        _assert_idle(*_blocked(reader, None, 2.0), 2.0)


def test_blocked_dequeue_with_stop_uses_no_cpu(spool: multispool.Spool[Any, bytes]) -> None:
    with spool.reader(Queue.QUEUE1, observer="native", rescan_interval=NO_RESCAN) as reader:
        _assert_idle(*_blocked(reader, _CountingEvent(), 2.0), 2.0)


def test_a_waiting_reader_outlives_every_repair_the_library_makes(
    spool: multispool.Spool[Any, bytes], mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing the library does to repair a spool (``fsck --repair``, recovery,
    ``clean_abandoned``, lost+found and its requeue) removes, replaces or re-creates a
    queue or checkout directory: a reader waiting meanwhile never meets a missing
    directory (NotASpoolError), and gets the entries they put back."""
    from multispool.cli import main

    dead = enqueue(spool, "dead")
    spool.checkout(multispool.Entry(spool, Queue.QUEUE1, dead))._claim.release()  # its owner died
    old = time.time() - 3600
    for d in (".registry", ".tmp", ".data"):  # an enqueue abandoned an hour ago
        p = Path(spool.dir, d, "abandoned000000")
        p.write_bytes(b'{"type": "Cog", "n": 9}' if d == ".tmp" else b"")
        os.utime(p, (old, old))
    with spool.reader(Queue.QUEUE1, observer=mode, rescan_interval=NO_RESCAN) as reader:
        waiting = hook_waits(reader)
        t = BgThread(lambda: [reader.dequeue(timeout=WAIT) for _ in range(2)])
        t.start()
        try:
            assert waiting.wait(WAIT)
            assert main(["fsck", spool.dir, "--repair"]) == 0, capsys.readouterr().out
            assert spool.recover_checkouts() == [] and spool.clean_abandoned(older_than=0) == []
            (item,) = os.listdir(Path(spool.dir, ".lost+found"))
            assert main(["lost+found", spool.dir, item, "--to", Queue.QUEUE1.value]) == 0
            cos = t.finish()
        finally:
            t.join(WAIT)
    assert all(co is not None for co in cos), cos
    assert sorted(co.contents.n for co in cos) == [0, 9]
    assert dead in [co.name for co in cos]
    for co in cos:
        co.remove()
