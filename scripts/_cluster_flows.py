"""Multi-process flows across two client mounts of one shared volume (run by
scripts/cluster-test; usable on any pair of mounts of one shared directory):

    python scripts/_cluster_flows.py --a MOUNT_A --b MOUNT_B [--label NAME] [--n N]

Every flow uses durability "full", prints one line of counts, and fails (exit 1) on a
correctness violation: an entry processed twice or never, a reader exception, anything
left in a queue or a .checkout, recover_checkouts reporting what it did not move or
moving a live owner's entry, `multispool status/fsck` failing on the other client.

Workers (started by the flows, always killed by PID and reaped):
    produce SPOOL TAG COUNT
    consume SPOOL OUT STOP [--save] [--hold K]
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import multispool


class Q(enum.Enum):
    WORK = "work"
    DONE = "done"


SP = multispool.Spoolable(queues=Q, metadata=dict, durability="full")
HERE = os.path.abspath(__file__)
DEADLINE = 120.0  # per flow: a healthy run takes well under a minute


# -- workers ------------------------------------------------------------------------------
T = TypeVar("T")


def _through_hiccups(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, tried again (up to 10 times, 0.3 s apart) when the volume briefly cannot
    find a path that is there: a GlusterFS client of the distributed volume, now and
    then, both failing to reopen a file just written through it and not seeing the
    spool directory from the other client, at the same moment. A failed enqueue leaves
    nothing behind (its contract), so trying it again is what an application does;
    each retry is printed to stderr, and duplicates or losses still fail the flow."""
    for attempt in range(10):
        try:
            return fn()
        except (FileNotFoundError, multispool.NotASpoolError) as e:
            if attempt == 9:
                raise
            print(f"RETRY {what} after: {e}", file=sys.stderr, flush=True)
            time.sleep(0.3)  # backing off from the volume's hiccup, not synchronising
    raise AssertionError("unreachable")


def produce(spool_dir: str, tag: str, count: int, pace: float = 0.0) -> None:
    """Enqueue ``count`` entries; with ``pace``, one every ``pace`` seconds, each
    carrying the wall-clock time of its enqueue (for latency, on one machine's clock)."""
    spool = _through_hiccups("load", lambda: multispool.Spool.load(spool_dir, SP))
    start = time.monotonic()
    for i in range(count):
        if pace:
            time.sleep(max(0.0, start + i * pace - time.monotonic()))  # pacing, not sync
        meta, data = {"id": f"{tag}-{i}", "t": time.time()}, f"{tag}-{i}".encode()
        _through_hiccups("enqueue", lambda: spool.enqueue(Q.WORK, meta, data))  # noqa: B023
    print("PRODUCED", count, flush=True)


def barepoll(directory: str, interval: float) -> None:
    """The floor of an idle polling reader: the same wait and the same one listing per
    interval, written directly with ``os``, until stdin ends."""
    running = threading.Lock()
    running.acquire()
    threading.Thread(target=lambda: (sys.stdin.read(), running.release()), daemon=True).start()
    while not running.acquire(timeout=interval):
        os.listdir(directory)


def consume(spool_dir: str, out_path: str, stop: str, save: bool, hold: int) -> None:
    """Take entries until ``stop`` exists and the queue gives nothing more; write one
    line per event to ``out_path``: DONE id, EXC error, HELD id. With ``hold``, claim
    that many entries, keep them, say HOLDING and wait to be killed (or, on a line on
    stdin, remove them and say FINISHED)."""
    spool = _through_hiccups("load", lambda: multispool.Spool.load(spool_dir, SP))
    stale = _count_stale_renames()
    held: list[tuple[str, multispool.CheckedOutEntry[Any, bytes]]] = []
    stopped = threading.Event()

    def watch_stop() -> None:
        if stop == "-":
            # Stop at the end of stdin: a blocked read costs nothing, so a reader whose
            # idle CPU is measured is charged for its own waiting only.
            sys.stdin.read()
        else:  # the parent's stop signal is a file (it may be on any host)
            while not os.path.exists(stop):
                time.sleep(0.2)
        stopped.set()

    threading.Thread(target=watch_stop, daemon=True).start()
    with open(out_path, "a", buffering=1) as out, spool.reader(Q.WORK) as reader:
        while True:
            try:
                co = reader.dequeue(stop=stopped)
            except Exception:  # counted: the target is none
                out.write(f"EXC {_where()}\n")
                continue
            if co is None:  # stopped, and nothing more came
                out.write(f"STALE {stale[0]}\n")
                return
            try:
                ident = co.data_file.load().decode()
                if isinstance(co.contents, dict) and "t" in co.contents:
                    out.write(f"LAT {time.time() - co.contents['t']:.6f}\n")
                if hold:
                    held.append((ident, co))
                    out.write(f"HELD {ident} {co.name}\n")
                    if len(held) >= hold:
                        break
                    continue
                if save:
                    co.save(Q.DONE)
                else:
                    co.remove()
                out.write(f"DONE {ident}\nAT {time.monotonic():.6f}\n")  # CLOCK_MONOTONIC: system-wide
            except Exception:
                out.write(f"EXC {_where()}\n")
    print("HOLDING", len(held), flush=True)
    sys.stdin.readline()
    with open(out_path, "a", buffering=1) as out:
        for ident, co in held:
            co.remove()
            out.write(f"DONE {ident}\n")
    print("FINISHED", flush=True)


def _count_stale_renames() -> list[int]:
    """Count the claims and recoveries that the library found to have moved nothing (a
    stale client's rename): they were lost, not won. Returns a one-item list."""
    counter = [0]

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "moved nothing" in record.getMessage():
                counter[0] += 1

    log = logging.getLogger("multispool")
    log.addHandler(Handler(logging.DEBUG))
    log.setLevel(logging.DEBUG)
    log.propagate = False
    return counter


def _where() -> str:
    """The exception being handled and where it came from, on one line."""
    tb = traceback.format_exc().strip().splitlines()
    frames = [ln.strip() for ln in tb if ln.strip().startswith("File ")][-4:]
    return f"{tb[-1]} at " + " <- ".join(reversed(frames))


# -- the parent's side --------------------------------------------------------------------
class Fail(Exception):
    pass


class Procs:
    """Children of one flow; every one is killed by PID and reaped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self, *args: str, stdin: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, HERE, *args],
            env=None if env is None else {**os.environ, **env},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        return p

    def cli(self, *args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-m", "multispool", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
            p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()


def wait_for(cond: Callable[[], bool], what: str, limit: float = DEADLINE) -> None:
    deadline = time.monotonic() + limit
    delay = 0.01
    while not cond():
        if time.monotonic() > deadline:
            raise Fail(f"timed out after {limit} s waiting for {what}")
        time.sleep(delay)  # polling a condition with a deadline, not synchronisation
        delay = min(delay * 2, 0.2)


def read_outs(outs: list[str]) -> tuple[Counter[str], list[str], list[str]]:
    done: Counter[str] = Counter()
    excs: list[str] = []
    held: list[str] = []
    for path in outs:
        with contextlib.suppress(FileNotFoundError), open(path) as f:
            for line in f:
                kind, _, rest = line.rstrip("\n").partition(" ")
                if kind == "DONE":
                    done[rest] += 1
                elif kind == "EXC":
                    excs.append(rest)
                elif kind == "HELD":
                    held.append(rest)
    return done, excs, held


def stale_claims(outs: list[str]) -> int:
    n = 0
    for path in outs:
        with contextlib.suppress(FileNotFoundError), open(path) as f:
            n += sum(int(line.split()[1]) for line in f if line.startswith("STALE "))
    return n


def leftovers(spool_dir: str) -> dict[str, int]:
    """What a direct listing (no library) finds left in the work queue and checkouts."""

    def names(d: str) -> int:
        return sum(1 for n in os.listdir(os.path.join(spool_dir, d)) if not n.startswith("."))

    return {"queued": names("work"), "checkout": names("work/.checkout")}


class Flow:
    def __init__(self, args: argparse.Namespace, name: str) -> None:
        self.name = name
        self.label = args.label
        self.n: int = args.n
        sub = f"{name}-{uuid.uuid4().hex[:8]}"
        self.a = os.path.join(args.a, sub)
        self.b = os.path.join(args.b, sub)
        self.tmp = tempfile.mkdtemp(prefix=f"cluster-{name}-")
        self.stop = os.path.join(self.tmp, "stop")
        self.procs = Procs()
        self.counts: dict[str, Any] = {}
        multispool.Spool.create(self.a, SP)
        wait_for(lambda: os.path.isdir(os.path.join(self.b, "work", ".checkout")), "the spool on B", 10)

    def out(self, i: str) -> str:
        return os.path.join(self.tmp, f"out-{i}")

    def producers(self, *sides: str, per: int) -> list[subprocess.Popen[str]]:
        return [self.procs.start("produce", side, f"p{i}", str(per)) for i, side in enumerate(sides)]

    def consumers(
        self, sides: list[str], save: bool = False, tag: str = "c", env: dict[str, str] | None = None
    ) -> list[str]:
        outs = []
        for i, side in enumerate(sides):
            o = self.out(f"{tag}{i}")
            outs.append(o)
            self.procs.start("consume", side, o, self.stop, *(["--save"] if save else []), env=env)
        return outs

    def finish_consumers(self, outs: list[str], expect: int) -> Counter[str]:
        wait_for(lambda: sum(read_outs(outs)[0].values()) >= expect, f"{expect} entries done")
        Path(self.stop).touch()
        for p in self.procs.procs:
            if p.args[2] == "consume":  # type: ignore[index]
                p.wait(DEADLINE)
        self.counts["claims_lost_to_noop_renames"] = stale_claims(outs)
        return read_outs(outs)[0]

    def check(self, done: Counter[str], excs: list[str], expected: set[str], spool_dir: str) -> None:
        dups = sum(c - 1 for c in done.values() if c > 1)
        lost = len(expected - set(done))
        left = leftovers(spool_dir)
        self.counts.update(
            produced=len(expected), done=sum(done.values()), duplicates=dups, lost=lost,
            reader_exceptions=len(excs), **{f"left_{k}": v for k, v in left.items()},
        )  # fmt: skip
        problems = []
        if dups:
            problems.append(f"{dups} duplicates: {[k for k, c in done.items() if c > 1][:5]}")
        if lost:
            problems.append(f"{lost} lost: {sorted(expected - set(done))[:5]}")
        if excs:
            problems.append(f"{len(excs)} reader exceptions: {excs[:3]}")
        if any(left.values()):
            problems.append(f"left behind: {left}")
        if problems:
            raise Fail("; ".join(problems))

    def report(self, ok: bool, why: str = "") -> None:
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items())
        status = "ok" if ok else f"FAILED: {why}"
        print(f"[{self.label}] {self.name}: {counts} -> {status}", flush=True)

    def close(self) -> None:
        self.procs.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(self.a, ignore_errors=True)


def ids(tags: list[str], per: int) -> set[str]:
    return {f"{t}-{i}" for t in tags for i in range(per)}


def flow_producers_a_consumers_b(f: Flow) -> None:
    per = f.n // 2
    outs = f.consumers([f.b, f.b])
    f.producers(f.a, f.a, per=per)
    done = f.finish_consumers(outs, 2 * per)
    f.check(done, read_outs(outs)[1], ids(["p0", "p1"], per), f.a)


def flow_consumers_on_both(f: Flow) -> None:
    """Producers and consumers on both clients, saving into DONE; `multispool watch` runs
    on B and `multispool status` is asked on B meanwhile; `fsck` on B at the end."""
    per = f.n // 2
    watch = f.procs.cli("watch", f.b)
    outs = f.consumers([f.a, f.b, f.a, f.b], save=True)
    f.producers(f.a, f.b, per=per)
    statuses = 0
    deadline = time.monotonic() + DEADLINE
    while sum(read_outs(outs)[0].values()) < 2 * per and time.monotonic() < deadline:
        st = subprocess.run([sys.executable, "-m", "multispool", "status", "--json", f.b],
                            capture_output=True, text=True, check=False)  # fmt: skip
        if st.returncode != 0:
            raise Fail(f"multispool status on B failed: {st.stderr.strip()[-300:]}")
        json.loads(st.stdout)
        statuses += 1
    done = f.finish_consumers(outs, 2 * per)
    if watch.poll() is not None:
        raise Fail(f"multispool watch on B exited early ({watch.returncode})")
    fsck = subprocess.run(
        [sys.executable, "-m", "multispool", "fsck", f.b], capture_output=True, text=True, check=False
    )
    in_done = len([n for n in os.listdir(os.path.join(f.a, "done")) if not n.startswith(".")])
    f.counts.update(statuses_on_b=statuses, in_done_queue=in_done, fsck_on_b=fsck.returncode)
    f.check(done, read_outs(outs)[1], ids(["p0", "p1"], per), f.a)
    if fsck.returncode != 0:
        raise Fail(f"multispool fsck on B exited {fsck.returncode}: {fsck.stdout.strip()[-300:]}")
    if in_done != 2 * per:
        raise Fail(f"{in_done} entries in the done queue, expected {2 * per}")


def _hold(f: Flow, side: str, k: int, tag: str) -> tuple[subprocess.Popen[str], str]:
    out = f.out(tag)
    p = f.procs.start("consume", side, out, f.stop, "--hold", str(k), stdin=True)
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != f"HOLDING {k}":
        raise Fail(f"holder on {side} said {line!r}")
    return p, out


def _checkout_names(spool_dir: str) -> set[str]:
    return {n for n in os.listdir(os.path.join(spool_dir, "work", ".checkout")) if not n.startswith(".")}


def flow_killed_and_recovered(f: Flow) -> None:
    """Consumers holding entries are SIGKILLed on one client and recovered through the
    other (both directions, twice each); then consumers on both clients drain. Each
    recovery must return exactly what it moved."""
    per = f.n
    for p in f.producers(f.a, per=per):
        p.wait(DEADLINE)
    k = max(1, f.n // 20)
    recovered_total = 0
    noop_recoveries = _count_stale_renames()
    for rnd, (dies, recovers) in enumerate([(f.b, f.a), (f.a, f.b), (f.b, f.a), (f.a, f.b)]):
        holder, out = _hold(f, dies, k, f"h{rnd}")
        held_names = {h.split()[1] for h in read_outs([out])[2]}
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        spool = multispool.Spool.load(recovers, SP)
        got: set[str] = set()
        deadline = time.monotonic() + DEADLINE
        # The kernel drops the dead owner's locks at once; the lock server hears of it
        # within milliseconds: recover until every held entry is back.
        while got != held_names and time.monotonic() < deadline:
            back = spool.recover_checkouts()
            names = {e.name for e in back}
            if names & got:
                raise Fail(f"recovered twice: {names & got}")
            still = _checkout_names(recovers)
            if names & still:
                raise Fail(
                    f"recover_checkouts reported {sorted(names & still)} but they are still checked out"
                )
            got |= names
        if got != held_names:
            raise Fail(f"round {rnd}: recovered {len(got)} of {len(held_names)} held entries")
        recovered_total += len(got)
    outs = f.consumers([f.b, f.a, f.b], tag="c")
    done = f.finish_consumers(outs, per)
    f.counts.update(
        killed_holding=4 * k, recovered=recovered_total, recoveries_not_reported_noop=noop_recoveries[0]
    )
    f.check(done, read_outs(outs)[1], ids(["p0"], per), f.a)


def flow_live_holders(f: Flow) -> None:
    """Live holders on A while recovery, status and fsck run on B: nothing of theirs moves;
    then they finish and consumers on B drain the rest."""
    per = f.n
    for p in f.producers(f.a, per=per):
        p.wait(DEADLINE)
    k = max(1, f.n // 20)
    holders = [_hold(f, f.a, k, f"h{i}") for i in range(2)]
    held = {h.split()[1] for _, out in holders for h in read_outs([out])[2]}
    spool_b = multispool.Spool.load(f.b, SP)
    passes = moved = 0
    deadline = time.monotonic() + 3.0  # beyond GlusterFS's 1 s entry/attribute caches
    while time.monotonic() < deadline:
        moved += len(spool_b.recover_checkouts())
        passes += 1
    still = _checkout_names(f.a)
    st = subprocess.run([sys.executable, "-m", "multispool", "status", "--json", f.b],
                        capture_output=True, text=True, check=False)  # fmt: skip
    checkouts_seen = json.loads(st.stdout)["work"]["checkouts"] if st.returncode == 0 else -1
    fsck = subprocess.run(
        [sys.executable, "-m", "multispool", "fsck", f.b], capture_output=True, text=True, check=False
    )
    f.counts.update(live_held=len(held), recovery_passes_on_b=passes, moved_from_live=moved,
                    status_checkouts_on_b=checkouts_seen, fsck_on_b=fsck.returncode)  # fmt: skip
    if moved or not held <= still:
        raise Fail(f"recovery on B moved {moved} live checkouts ({sorted(held - still)[:5]} gone)")
    if checkouts_seen != len(held):
        raise Fail(f"status on B saw {checkouts_seen} checkouts, {len(held)} are held: {st.stderr[-300:]}")
    if fsck.returncode != 0:
        raise Fail(
            f"multispool fsck on B exited {fsck.returncode} with live holders: {fsck.stdout.strip()[-300:]}"
        )
    for p, _ in holders:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write("finish\n")
        p.stdin.flush()
        if p.stdout.readline().strip() != "FINISHED":
            raise Fail("a holder did not finish")
        p.wait(DEADLINE)
    outs = f.consumers([f.b, f.b]) + [out for _, out in holders]
    done = f.finish_consumers(outs, per)
    f.check(done, read_outs(outs)[1], ids(["p0"], per), f.a)


def _all_done(outs: list[str], n: int) -> bool:
    return sum(read_outs(outs)[0].values()) >= n


def _last_stamp(outs: list[str]) -> float:
    """The latest ``AT`` stamp (time.monotonic() just after an entry was done) in ``outs``."""
    last = 0.0
    for path in outs:
        with open(path) as f:
            for line in f:
                if line.startswith("AT "):
                    last = max(last, float(line[3:]))
    return last


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flow_polling_costs(f: Flow) -> None:
    """Not correctness (never fails the run): the issue's polling targets, printed with
    their counts. Drain of a pre-filled queue by 2 consumers on B with the observer "auto"
    picks (polling) against the same with native forced (ratio >= 0.8 wanted); paced
    delivery latency A -> B (p50 <= the poll interval, 0.1 s); an idle polling reader's CPU
    (<= 0.1 % of a core), beside its floor: a bare ``os.listdir`` of the queue dir every
    0.1 s through the same client, measured in the same window."""
    per = f.n
    times: dict[str, float] = {}
    expected: set[str] = set()
    done: Counter[str] = Counter()
    excs: list[str] = []
    for mode, env in (("native", {"MULTISPOOL_OBSERVER": "native"}), ("polling", None)):
        tag = f"d{mode}"
        p = f.procs.start("produce", f.a, tag, str(per))
        p.wait(DEADLINE)
        expected |= ids([tag], per)
        stop = f"{f.stop}-{mode}"
        outs = []
        consumers = []
        started = time.monotonic()
        for i in range(2):
            o = f.out(f"{mode}{i}")
            outs.append(o)
            consumers.append(f.procs.start("consume", f.b, o, stop, env=env))
        wait_for(functools.partial(_all_done, outs, per), f"{per} entries drained ({mode})")
        # From the consumers' own stamps: wait_for's polling steps would round the time.
        times[mode] = _last_stamp(outs) - started
        Path(stop).touch()
        # Gone before the next phase puts entries in the same queue: a drain consumer
        # still running (slow to see its stop file on a loaded machine) would take some
        # of them, and the phase would wait for entries its own reader never gets.
        for p in consumers:
            p.wait(DEADLINE)
        d, e, _ = read_outs(outs)
        done.update(d)
        excs += e
    # Paced latency, then the same reader left idle, beside its floor (a bare poller of
    # the same queue dir through the same client, measured over the same window).
    out = f.out("lat")
    reader = f.procs.start("consume", f.b, out, "-", stdin=True)
    floor = f.procs.start("barepoll", os.path.join(f.b, Q.WORK.value), "0.1", stdin=True)
    paced = f.procs.start("produce", f.a, "lat", "40", "0.05")
    paced.wait(DEADLINE)
    expected |= ids(["lat"], 40)
    wait_for(lambda: sum(read_outs([out])[0].values()) >= 40, "40 paced entries")
    with open(out) as fh:
        lat = sorted(float(x.split()[1]) for x in fh if x.startswith("LAT "))
    cpu0, fcpu0, t0 = _cpu_seconds(reader.pid), _cpu_seconds(floor.pid), time.monotonic()
    time.sleep(5.0)  # measuring an idle reader over a fixed window
    t1 = time.monotonic()
    idle = (_cpu_seconds(reader.pid) - cpu0) / (t1 - t0)
    idle_floor = (_cpu_seconds(floor.pid) - fcpu0) / (t1 - t0)
    for p in (reader, floor):
        assert p.stdin is not None
        p.stdin.close()  # stop
    floor.wait(DEADLINE)
    reader.wait(DEADLINE)
    d, e, _ = read_outs([out])
    done.update(d)
    excs += e
    ratio = times["polling"] and times["native"] / times["polling"]
    f.counts.update(
        drain_native_s=round(times["native"], 2),
        drain_polling_s=round(times["polling"], 2),
        drain_ratio=round(ratio, 2),
        latency_p50_ms=round(lat[len(lat) // 2] * 1e3, 1),
        latency_p90_ms=round(lat[int(len(lat) * 0.9)] * 1e3, 1),
        idle_reader_cpu_pct=round(idle * 100, 3),
        idle_floor_cpu_pct=round(idle_floor * 100, 3),
    )
    below = []
    if ratio < 0.8:
        below.append("drain ratio < 0.8")
    if lat[len(lat) // 2] > 0.1:
        below.append("latency p50 > 0.1 s")
    if idle > 0.001:
        below.append("idle CPU > 0.1 %" + (" (so is its floor)" if idle_floor > 0.001 else ""))
    if below:
        f.counts["below_target"] = ",".join(below).replace(" ", "")
    f.check(done, excs, expected, f.a)


FLOWS = {
    "producers-A-consumers-B": flow_producers_a_consumers_b,
    "consumers-on-both+watch": flow_consumers_on_both,
    "killed-and-recovered": flow_killed_and_recovered,
    "live-holders-vs-recovery": flow_live_holders,
    "polling-costs": flow_polling_costs,
}


@contextlib.contextmanager
def flow(args: argparse.Namespace, name: str) -> Iterator[Flow]:
    f = Flow(args, name)
    try:
        yield f
    finally:
        f.close()


def main(argv: list[str]) -> int:
    if argv and argv[0] == "produce":
        produce(argv[1], argv[2], int(argv[3]), float(argv[4]) if len(argv) > 4 else 0.0)
        return 0
    if argv and argv[0] == "barepoll":
        barepoll(argv[1], float(argv[2]))
        return 0
    if argv and argv[0] == "consume":
        ap = argparse.ArgumentParser()
        ap.add_argument("spool")
        ap.add_argument("out")
        ap.add_argument("stop")
        ap.add_argument("--save", action="store_true")
        ap.add_argument("--hold", type=int, default=0)
        a = ap.parse_args(argv[1:])
        consume(a.spool, a.out, a.stop, a.save, a.hold)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="the shared directory through client A")
    ap.add_argument("--b", required=True, help="the same directory through client B")
    ap.add_argument("--label", default="volume")
    ap.add_argument("--n", type=int, default=200, help="entries per flow")
    ap.add_argument("--only", action="append", choices=sorted(FLOWS))
    args = ap.parse_args(argv)
    failed = 0
    for name, fn in FLOWS.items():
        if args.only and name not in args.only:
            continue
        started = time.monotonic()
        with flow(args, name) as f:
            try:
                fn(f)
            except Fail as e:
                failed += 1
                f.counts["seconds"] = round(time.monotonic() - started, 1)
                f.report(False, str(e))
            else:
                f.counts["seconds"] = round(time.monotonic() - started, 1)
                f.report(True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
