"""Benchmark of the event-driven QueueReader (project issue 3).

Measures, in one run:
  1. wake latency: from another process's ``enqueue`` RETURNING to the consumer's callback
     starting (both stamps are ``time.perf_counter_ns()``, CLOCK_MONOTONIC, system-wide on
     Linux), for durability "none" and "full", against the floor: a bare inotify waiter
     (ctypes inotify_init1 / inotify_add_watch IN_MOVED_TO|IN_CREATE / blocking read) on
     the same directory, receiving the same producer's renames;
  2. CPU used by a reader blocked on an empty queue (utime+stime of the process);
  3. drain rate of a pre-filled backlog with 1, 2 and 4 consumer processes;
  4. time to the first entry with a 100,000-entry backlog.

    scripts/bench_reader [--quick] [--dir DIR] [--runs N]

Targets (Linux): wake p50 <= 1 ms, p99 <= 5 ms, p50 within 2x of the inotify floor, idle
CPU <= 0.1 % of a core, 2 consumers >= 1.5x one consumer's drain rate.
"""

from __future__ import annotations

import argparse
import ctypes
import enum
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import msgspec

import multispool
from multispool import _watch


class Queue(enum.Enum):
    Q = "q"


class Job(msgspec.Struct):
    n: int


CTX = mp.get_context("spawn")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def spoolable(durability: str) -> multispool.Spoolable[bytes]:
    return multispool.Spoolable(queues=Queue, metadata=Job, durability=durability)


def open_spool(path: str, durability: str = "none") -> multispool.Spool[bytes]:
    return multispool.Spool.create(path, spoolable(durability))


def pct(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# --------------------------------------------------------------------------------------
# child processes (spawned: module-level functions, plain arguments)
# --------------------------------------------------------------------------------------


def producer(path: str, durability: str, n: int, gap: float, go: Connection, out: Connection) -> None:
    """Wait for go, then enqueue n entries ``gap`` s apart; send [(name, t_returned_ns)]."""
    spool = open_spool(path, durability)
    go.recv()
    stamps: list[tuple[str, int]] = []
    for k in range(n):
        name = spool.enqueue(Queue.Q, Job(n=k), b"x").name
        stamps.append((name, time.perf_counter_ns()))
        deadline = time.perf_counter() + gap
        while time.perf_counter() < deadline:  # a precise gap; sleep() overshoots
            time.sleep(max(0.0, (deadline - time.perf_counter()) - 0.0005))
    out.send(stamps)


def consumer(path: str, durability: str, n: int, observer: str, ready: Connection, out: Connection) -> None:
    """Reader that stamps each callback start; after n entries, send {name: t_ns}."""
    import threading

    spool = open_spool(path, durability)
    seen: dict[str, int] = {}
    stop = threading.Event()

    def f(meta: Any, data: multispool.DataFile[bytes]) -> object:
        seen[data.name] = time.perf_counter_ns()
        if len(seen) >= n:
            stop.set()
        return multispool.REMOVE

    with spool.reader(Queue.Q, observer=observer, rescan_interval=5.0) as reader:
        ready.send("ready")
        reader.iter(f, stop=stop)
    out.send(seen)


IN_CREATE = 0x100
IN_MOVED_TO = 0x80
EVENT_HDR = struct.Struct("iIII")


def bare_inotify(directory: str, n: int, ready: Connection, out: Connection, claim: bool = False) -> None:
    """The floor: a blocking read on an inotify fd; stamp each IN_MOVED_TO's read return.

    With ``claim``, the same syscalls as a consumer must make before its callback, with
    bare ``os`` calls: lock the registry file, check it, touch and rename the entry into
    ``.checkout``, read and decode its metadata; stamp; then remove it. That is the fair
    floor for "enqueue returned -> callback started" (the bare wake alone fires at the
    rename, before enqueue even returns)."""
    import fcntl

    import msgspec

    root = os.path.dirname(directory)
    dec = msgspec.json.Decoder()
    o_read = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    if libc.inotify_add_watch(fd, os.fsencode(directory), IN_MOVED_TO | IN_CREATE) < 0:
        raise OSError(ctypes.get_errno(), "inotify_add_watch", directory)
    seen: dict[str, int] = {}
    ready.send("ready")
    try:
        while len(seen) < n:
            buf = os.read(fd, 65536)
            t = time.perf_counter_ns()
            i = 0
            while i < len(buf):
                _wd, mask, _cookie, length = EVENT_HDR.unpack_from(buf, i)
                name = buf[i + EVENT_HDR.size : i + EVENT_HDR.size + length].rstrip(b"\0").decode()
                i += EVENT_HDR.size + length
                if mask & IN_MOVED_TO and name not in seen:
                    if not claim:
                        seen[name] = t
                        continue
                    reg = os.open(f"{root}/.registry/{name}", o_read)
                    fcntl.flock(reg, fcntl.LOCK_EX)  # the enqueuer lets go microseconds after its rename
                    os.fstat(reg)
                    q, co = f"{directory}/{name}", f"{directory}/.checkout/{name}"
                    os.utime(q, follow_symlinks=False)
                    os.rename(q, co)
                    mfd = os.open(co, o_read)
                    dec.decode(os.read(mfd, 65536))
                    os.close(mfd)
                    seen[name] = time.perf_counter_ns()
                    os.unlink(co)
                    os.unlink(f"{root}/.data/{name}")
                    os.unlink(f"{root}/.registry/{name}")
                    os.close(reg)
    finally:
        os.close(fd)
    out.send(seen)


def idle_reader(path: str, observer: str, ready: Connection, stop_conn: Connection) -> None:
    """A reader blocked on an empty queue until told to stop."""
    import threading

    spool = open_spool(path)
    stop = threading.Event()
    with spool.reader(Queue.Q, observer=observer) as reader:
        t = threading.Thread(target=lambda: (stop_conn.recv(), stop.set()), daemon=True)
        t.start()
        ready.send("ready")
        co = reader.dequeue(stop=stop)
        assert co is None


def idle_floor(path: str, observer: str, ready: Connection, stop_conn: Connection) -> None:
    """The floor of an idle reader, written directly with ``os``, until told to stop:
    polling, the same timed wait and one listing of the queue dir every 0.1 s; native,
    the one periodic duty of a waiting reader, a stat of the queue dir every 5 s (the
    default rescan_interval)."""
    import threading

    running = threading.Lock()
    running.acquire()
    threading.Thread(target=lambda: (stop_conn.recv(), running.release()), daemon=True).start()
    qdir = os.path.join(path, Queue.Q.value)
    ready.send("ready")
    if observer == "polling":
        while not running.acquire(timeout=0.1):
            os.listdir(qdir)
    else:
        while not running.acquire(timeout=5.0):
            os.stat(qdir)


def drainer(path: str, durability: str, ready: Connection, go: Connection, out: Connection) -> None:
    """REMOVE entries until the queue is empty; send (count, t_end_ns)."""
    spool = open_spool(path, durability)
    count = 0
    with spool.reader(Queue.Q, observer="native") as reader:
        ready.send("ready")
        go.recv()
        while True:
            co = reader.dequeue_available()
            if co is None:
                break
            co.remove()
            count += 1
    out.send((count, time.perf_counter_ns()))


# --------------------------------------------------------------------------------------
# process plumbing
# --------------------------------------------------------------------------------------


class Procs:
    """Spawned children, always terminated and joined."""

    def __init__(self) -> None:
        self.procs: list[Any] = []

    def start(self, target: Callable[..., None], *args: Any) -> Any:
        p = CTX.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.join(timeout=30 if exc[0] is None else 0.1)
            if p.is_alive():
                p.kill()
                p.join()


def recv(conn: Connection, timeout: float, what: str) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"no {what} within {timeout}s")
    return conn.recv()


# --------------------------------------------------------------------------------------
# 1. wake latency
# --------------------------------------------------------------------------------------


def latency_run(base: str, durability: str, n: int, gap: float, floor: str) -> list[float]:
    """One run; latencies in ms, first 5 entries dropped as warm-up."""
    path = tempfile.mkdtemp(dir=base)
    spool = open_spool(path, durability)
    qdir = spool._layout.queue(spool.spoolable.dirname(Queue.Q))
    ready_r, ready_w = CTX.Pipe(False)
    out_r, out_w = CTX.Pipe(False)
    go_r, go_w = CTX.Pipe(False)
    pout_r, pout_w = CTX.Pipe(False)
    try:
        with Procs() as procs:
            if floor:
                procs.start(bare_inotify, qdir, n, ready_w, out_w, floor == "claim")
            else:
                procs.start(consumer, path, durability, n, "native", ready_w, out_w)
            procs.start(producer, path, durability, n, gap, go_r, pout_w)
            recv(ready_r, 30, "ready")
            time.sleep(0.2)  # let the waiter block (not synchronisation: a benchmark warm-up)
            go_w.send("go")
            sent = dict(recv(pout_r, 120, "producer stamps"))
            got = recv(out_r, 120, "waiter stamps")
    finally:
        shutil.rmtree(path, ignore_errors=True)
    names = sorted(sent)[5:]
    return [(got[nm] - sent[nm]) / 1e6 for nm in names]


def bench_latency(base: str, runs: int, n: int, n_full: int, gap: float) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, durability, floor in (
        ("reader, durability=none", "none", ""),
        ("reader, durability=full", "full", ""),
        ("floor: inotify + os claim, durability=none", "none", "claim"),
        ("floor: inotify + os claim, durability=full", "full", "claim"),
        ("bare inotify wake (info), durability=none", "none", "wake"),
    ):
        count = n_full if durability == "full" else n
        per_run = [latency_run(base, durability, count, gap, floor) for _ in range(runs)]
        stats = {
            "p50": med([pct(r, 50) for r in per_run]),
            "p99": med([pct(r, 99) for r in per_run]),
            "max": med([max(r) for r in per_run]),
            "runs": runs,
            "n": len(per_run[0]),
        }
        out[label] = stats
        print(
            f"  {label:38s} p50 {stats['p50']:7.3f} ms  p99 {stats['p99']:7.3f} ms  "
            f"max {stats['max']:8.3f} ms   (median of {runs} runs x {stats['n']} entries; "
            f"per-run p50s {', '.join(f'{pct(r, 50):.3f}' for r in per_run)})",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------------------
# 2. idle CPU
# --------------------------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def bench_idle(base: str, seconds: float, observer: str, target: Any = idle_reader) -> float:
    path = tempfile.mkdtemp(dir=base)
    open_spool(path)
    ready_r, ready_w = CTX.Pipe(False)
    stop_r, stop_w = CTX.Pipe(False)
    try:
        with Procs() as procs:
            p = procs.start(target, path, observer, ready_w, stop_r)
            recv(ready_r, 30, "ready")
            time.sleep(0.5)  # past start-up work
            t0, c0 = time.monotonic(), cpu_ticks(p.pid)
            time.sleep(seconds)
            t1, c1 = time.monotonic(), cpu_ticks(p.pid)
            stop_w.send("stop")
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return 100.0 * (c1 - c0) / CLK_TCK / (t1 - t0)


# --------------------------------------------------------------------------------------
# 3. drain rate, 4. first entry
# --------------------------------------------------------------------------------------


def fill(spool: multispool.Spool[bytes], n: int) -> None:
    # In batches: a durable backlog fills in seconds, not one fsync round per entry.
    for k in range(0, n, 1000):
        spool.enqueue_many(Queue.Q, [(Job(n=i), b"x") for i in range(k, min(k + 1000, n))])


def drain_run(base: str, n: int, consumers: int, durability: str = "none") -> float:
    path = tempfile.mkdtemp(dir=base)
    spool = open_spool(path, durability)
    fill(spool, n)
    ready_r, ready_w = CTX.Pipe(False)
    out_r, out_w = CTX.Pipe(False)
    gos = [CTX.Pipe(False) for _ in range(consumers)]
    try:
        with Procs() as procs:
            for go_r, _ in gos:
                procs.start(drainer, path, durability, ready_w, go_r, out_w)
            for _ in range(consumers):
                recv(ready_r, 30, "ready")
            start = time.perf_counter_ns()
            for _, go_w in gos:
                go_w.send("go")
            results = [recv(out_r, 600, "drain result") for _ in range(consumers)]
        left = len(spool.list(Queue.Q))
        handled = sum(c for c, _ in results)
        if left or handled != n:
            raise RuntimeError(f"drain with {consumers} consumers: handled {handled}/{n}, {left} left")
        end = max(t for _, t in results)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return n / ((end - start) / 1e9)


def bench_drain(base: str, runs: int, n: int, durability: str = "none") -> dict[int, float]:
    rates: dict[int, float] = {}
    for consumers in (1, 2, 4):
        per_run = [drain_run(base, n, consumers, durability) for _ in range(runs)]
        rates[consumers] = med(per_run)
        print(
            f"  {consumers} consumer(s): {rates[consumers]:8.0f} entries/s  "
            f"(median of {runs} runs: {', '.join(f'{r:.0f}' for r in per_run)})",
            flush=True,
        )
    return rates


def bench_first_entry(base: str, n: int, runs: int) -> tuple[float, float]:
    """Fill n entries fast: 1 real enqueue, then hard links of one metadata file as queue
    files (a listing costs the same; the reader claims the first, real, one). Returns the
    median ms from spool.reader() to the first dequeue returning, and of the fill."""
    path = tempfile.mkdtemp(dir=base)
    try:
        spool = open_spool(path)
        spool.enqueue(Queue.Q, Job(n=0), b"x", reserve="a")
        dirname = spool.spoolable.dirname(Queue.Q)
        t = time.perf_counter()
        template = ""
        for k in range(n - 1):
            if k % 50_000 == 0:  # ext4 allows 65,000 links to one inode
                template = os.path.join(base, f"first-entry-template-{k}")
                with open(template, "wb") as f:
                    f.write(msgspec.json.encode(Job(n=1)))
            os.link(template, spool._layout.queue_file(dirname, f"b{k:07d}"))
        fill_s = time.perf_counter() - t
        times = []
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            with spool.reader(Queue.Q, observer="native") as reader:
                co = reader.dequeue(timeout=60)
                t1 = time.perf_counter_ns()
                assert co is not None
                co.release()
            times.append((t1 - t0) / 1e6)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    print(
        f"  {n} entries: first entry after {med(times):.1f} ms (median of {runs}: "
        f"{', '.join(f'{x:.1f}' for x in times)}; fill took {fill_s:.1f} s)",
        flush=True,
    )
    return med(times), fill_s


# --------------------------------------------------------------------------------------


def machine(base: str) -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor() or "?"
    try:
        found = _watch._filesystem_type(base)
        fs = f"{found[0]} (mounted at {found[1]})" if found else "?"
    except OSError as e:
        fs = f"? ({e})"
    return (
        f"CPU: {cpu}; {os.cpu_count()} cores\n"
        f"kernel: {platform.system()} {platform.release()}\n"
        f"Python: {sys.version.split()[0]} ({sys.executable}); watchdog "
        f"{__import__('watchdog.version').version.VERSION_STRING}; multispool {multispool.__version__}\n"
        f"filesystem of {base}: {fs}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller, about a minute")
    ap.add_argument("--dir", default=None, help="where the spools live (default: a temp dir)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--only", default="latency,idle,drain,first", help="comma list of latency,idle,drain,first"
    )
    ap.add_argument(
        "--drain-durability", default="none", choices=["none", "file", "full"],
        help="durability of the drain's spool (default none; full: every claim also makes a keep link)",
    )
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    base = tempfile.mkdtemp(prefix="bench-reader-", dir=args.dir)
    # durability=full costs several fsyncs per enqueue (~20 ms here): fewer in --quick.
    n_lat, n_lat_full, gap = 500, (200 if args.quick else 500), 0.003
    idle_s = 10.0 if args.quick else 60.0
    n_drain = 3000 if args.quick else 20_000
    n_first = 100_000
    print("multispool reader benchmark: " + " ".join(["scripts/bench_reader", *(argv or sys.argv[1:])]))
    print(machine(base), flush=True)
    failed: list[str] = []
    try:
        if "latency" in only:
            print(
                f"\n1. wake latency, enqueue returned -> callback started "
                f"({n_lat} entries, {n_lat_full} with durability=full, {gap * 1e3:.0f} ms apart; "
                "negative: the event came before enqueue returned, e.g. during its final fsync)"
            )
            lat = bench_latency(base, args.runs, n_lat, n_lat_full, gap)
            r = lat["reader, durability=none"]
            fl = lat["floor: inotify + os claim, durability=none"]
            ratio = r["p50"] / fl["p50"] if fl["p50"] > 0 else float("inf")
            print(f"  reader / (inotify + os claim) floor at p50 (durability=none): {ratio:.2f}x")
            if r["p50"] > 1.0:
                failed.append(f"wake p50 {r['p50']:.3f} ms > 1 ms")
            if r["p99"] > 5.0:
                failed.append(f"wake p99 {r['p99']:.3f} ms > 5 ms")
            if ratio > 2.0:
                failed.append(f"wake p50 {ratio:.2f}x the inotify+claim floor > 2x")
        if "idle" in only:
            print(f"\n2. CPU of a reader blocked {idle_s:.0f} s on an empty queue")
            # Each beside its floor, measured the same way: on a virtual machine a wake-up
            # of a process is charged the host's time to bring its memory and caches back,
            # which grows with the time asleep (milliseconds after 5 s idle), so the floor
            # says what the machine charges for the waking alone.
            cpu = bench_idle(base, idle_s, "native")
            cpu_nf = bench_idle(base, idle_s, "native", idle_floor)
            print(f"  native:  {cpu:.3f} % of a core; floor (a bare os.stat every 5 s): "
                  f"{cpu_nf:.3f} %")
            if cpu > 0.1:
                failed.append(f"idle CPU {cpu:.3f} % > 0.1 % (floor {cpu_nf:.3f} %)")
            cpu_p = bench_idle(base, idle_s, "polling")
            cpu_f = bench_idle(base, idle_s, "polling", idle_floor)
            print(f"  polling: {cpu_p:.3f} % of a core (informational: 0.1 s polling interval); "
                  f"floor (a bare os.listdir every 0.1 s): {cpu_f:.3f} %")
        if "drain" in only:
            print(f"\n3. drain rate, {n_drain} entries pre-filled (durability={args.drain_durability}), "
                  "consumers REMOVE")
            rates = bench_drain(base, args.runs, n_drain, args.drain_durability)
            ratio2 = rates[2] / rates[1]
            print(f"  2 consumers / 1 consumer: {ratio2:.2f}x; 4 / 1: {rates[4] / rates[1]:.2f}x")
            if ratio2 < 1.5:
                failed.append(f"2 consumers only {ratio2:.2f}x one consumer < 1.5x")
        if "first" in only:
            print(f"\n4. time to the first entry with a {n_first}-entry backlog")
            bench_first_entry(base, n_first, args.runs)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\ntargets: " + ("all met" if not failed else "MISSED: " + "; ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
