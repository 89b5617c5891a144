"""Wake latency that must not depend on the queue's history, and idle cost of many readers
(project issue 15, "wake latency must not depend on the queue's history"; issue 11 item 3).

Measures, in one run:
  1. wake latency on a queue directory that once held ``--history`` entries (created, then
     deleted: ext4 never shrinks a directory, so listing the empty queue stays slow): from
     another process's ``enqueue`` returning to the consumer's ``dequeue`` returning (both
     ``time.perf_counter_ns()``, CLOCK_MONOTONIC), ``--samples`` entries paced 5 ms apart;
     also the time one listing of that directory takes;
  2. idle CPU (CLOCK_PROCESS_CPUTIME_ID of the process) of ``--readers`` readers in one process, one per
     queue, each blocked in ``dequeue`` in its own thread, over ``--idle`` seconds;
  3. polling observer: idle CPU of one polling reader, and paced latency (p50 should be at
     most ``poll_interval``, 0.1 s).

    scripts/bench_wake [--history 200000] [--samples 200] [--readers 500] [--idle 20]
                       [--dir DIR] [--skip-polling]

Targets: wake p50 <= 0.5 ms whatever the history; idle CPU of 500 readers <= 0.1 % of a
core; idle polling reader <= 0.1 % of a core; polling latency p50 <= poll_interval.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import msgspec

import multispool


class Queue(enum.Enum):
    Q = "q"


class Job(msgspec.Struct):
    n: int


CTX = mp.get_context("spawn")


def spoolable() -> multispool.Spoolable[bytes]:
    return multispool.Spoolable(queues=Queue, metadata=Job, durability="none")


def cpu_seconds() -> float:
    # CLOCK_PROCESS_CPUTIME_ID: every thread, nanosecond accounting (os.times() counts
    # 10 ms ticks, too coarse for 0.1 % over a few seconds).
    return time.process_time()


def _producer(path: str, n: int, pace: float, conn: Connection) -> None:
    spool = multispool.Spool.load(path, spoolable())
    conn.recv()  # go
    stamps = []
    for k in range(n):
        spool.enqueue(Queue.Q, Job(k), b"", reserve=f"e{k:06d}_")
        stamps.append(time.perf_counter_ns())
        time.sleep(pace)  # pacing, not synchronisation: one entry at a time
    conn.send(stamps)


def _consume(
    spool: multispool.Spool[bytes], n: int, observer: str, poll: float, conn: Connection
) -> list[int]:
    """Consume n entries; returns the perf_counter_ns at which each dequeue returned."""
    got: list[int] = []
    # poll_interval is new (issue 11); leave it out where the reader predates it, so that
    # this script also measures older versions (PYTHONPATH=/old/lib scripts/bench_wake).
    extra = {"poll_interval": poll} if "poll_interval" in inspect.signature(spool.reader).parameters else {}
    with spool.reader(Queue.Q, observer=observer, rescan_interval=60.0, **extra) as reader:
        assert reader.dequeue_available() is None
        conn.send("go")
        while len(got) < n:
            co = reader.dequeue(timeout=30)
            if co is None:
                raise SystemExit("timed out waiting for an entry")
            got.append(time.perf_counter_ns())
            co.remove()
    return got


def paced_latency(path: str, n: int, observer: str, poll: float, pace: float) -> list[float]:
    spool = multispool.Spool.load(path, spoolable())
    mine, theirs = CTX.Pipe()
    proc = CTX.Process(target=_producer, args=(path, n, pace, theirs))
    proc.start()
    try:
        got = _consume(spool, n, observer, poll, mine)
        stamps = mine.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return [(g - s) / 1e6 for g, s in zip(got, stamps, strict=True)]


def percentiles(ms: list[float]) -> str:
    ms = sorted(ms)
    p = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return f"p50 {statistics.median(ms):.3f} ms  p90 {p(0.9):.3f} ms  p99 {p(0.99):.3f} ms  (n={len(ms)})"


def once_big(base: str, history: int) -> str:
    path = os.path.join(base, "wake")
    multispool.Spool.create(path, spoolable())
    qdir = os.path.join(path, "q")
    t0 = time.perf_counter()
    for k in range(history):
        os.close(os.open(os.path.join(qdir, f"h{k:07d}"), os.O_CREAT | os.O_WRONLY, 0o600))
    for k in range(history):
        os.unlink(os.path.join(qdir, f"h{k:07d}"))
    size = os.stat(qdir).st_size
    t1 = time.perf_counter()
    times = []
    for _ in range(5):
        a = time.perf_counter()
        os.listdir(qdir)
        times.append(time.perf_counter() - a)
    print(
        f"queue directory after {history:,} entries came and went: {size / 2**20:.1f} MiB, "
        f"one listing {statistics.median(times) * 1e3:.2f} ms (built in {t1 - t0:.0f} s)"
    )
    return path


def idle_readers(base: str, n: int, seconds: float, observer: str = "native") -> float:
    queues: Any = enum.Enum("Queues", {f"Q{i}": f"q{i:04d}" for i in range(n)})
    sp = multispool.Spoolable(queues=queues, metadata=Job, durability="none")
    spool = multispool.Spool.create(os.path.join(base, f"idle-{observer}-{n}"), sp)
    readers = [spool.reader(q, observer=observer) for q in queues]
    threads = [threading.Thread(target=r.dequeue, daemon=True) for r in readers]
    for t in threads:
        t.start()
    # Settle: first listings, then the first rescan checks (5 s apart), which list again
    # where the directory mtime was too recent to prove anything.
    time.sleep(12.0)
    c0, w0 = cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    c1, w1 = cpu_seconds(), time.monotonic()
    for r in readers:
        r.close()
    for t in threads:
        t.join(10)
    return (c1 - c0) / (w1 - w0) * 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", type=int, default=200_000)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--readers", type=int, default=500)
    ap.add_argument("--idle", type=float, default=20.0)
    ap.add_argument("--dir", default=None, help="where to build spools (default: a temp dir)")
    ap.add_argument("--skip-polling", action="store_true")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="bench-wake-", dir=args.dir)
    try:
        path = once_big(base, args.history)
        lat = paced_latency(path, args.samples, "native", 0.1, 0.005)
        print(f"wake latency, native, queue that held {args.history:,}: {percentiles(lat)}")
        pct = idle_readers(base, args.readers, args.idle)
        print(f"idle CPU, {args.readers} native readers in one process: {pct:.3f} % of a core")
        if not args.skip_polling:
            pct = idle_readers(base, 1, args.idle, "polling")
            print(f"idle CPU, 1 polling reader (poll_interval 0.1 s): {pct:.3f} % of a core")
            small = os.path.join(base, "poll")
            multispool.Spool.create(small, spoolable())
            lat = paced_latency(small, max(20, args.samples // 5), "polling", 0.1, 0.05)
            print(f"paced latency, polling, poll_interval 0.1 s: {percentiles(lat)}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
