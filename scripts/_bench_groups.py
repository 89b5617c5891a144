#!/usr/bin/env python3
"""How concurrent durable enqueues of one process form groups: N threads call
``Spool.enqueue`` for a few seconds; prints entries/s, the process's CPU, the number of
rounds, the mean group size, and the median time of a round's two stages (stage one: the
file and directory syncs and the renames; stage two: the queue directory's sync) and of
writing one entry.

    PYTHONPATH=lib .venv/bin/python scripts/_bench_groups.py DIR [--threads 8] [--seconds 2]
        [--repeat 3] [--callers-write]

``--callers-write``: every enqueue writes its own entry before joining a group (as before
the leader wrote its followers' entries), for comparison in the same run. The spool is
created in a fresh directory under DIR and removed afterwards.
"""

from __future__ import annotations

import argparse
import enum
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from typing import Any

import multispool
from multispool import _enqueue


class Q(enum.Enum):
    Q = "q"


def run(base: str, threads: int, seconds: float) -> str:
    stats: dict[str, list[float]] = defaultdict(list)
    publish_group, sync_queues, write = _enqueue._publish_group, _enqueue._sync_queues, _enqueue.write

    def timed_publish_group(group: Any, crowded: bool = False) -> Any:
        t = time.perf_counter()
        r = publish_group(group, crowded)
        stats["stage one"].append(time.perf_counter() - t)
        stats["group"].append(sum(len(j.staged) for j in group))
        return r

    def timed_sync_queues(qdirs: Any) -> None:
        t = time.perf_counter()
        sync_queues(qdirs)
        stats["stage two"].append(time.perf_counter() - t)

    def timed_write(*a: Any, **kw: Any) -> None:
        t = time.perf_counter()
        write(*a, **kw)
        stats["write"].append(time.perf_counter() - t)

    _enqueue._publish_group, _enqueue._sync_queues, _enqueue.write = (  # type: ignore[assignment]
        timed_publish_group, timed_sync_queues, timed_write,
    )
    d = tempfile.mkdtemp(prefix="groups-", dir=base)
    try:
        sp = multispool.Spoolable(
            queues=Q, metadata_codec="json", data=multispool.BytesData(), durability="full"
        )
        spool = multispool.Spool.create(os.path.join(d, "spool"), sp)
        spool.enqueue(Q.Q, {"seq": -1}, b"x" * 200)  # first-use work outside the measurement
        stats.clear()
        stop = threading.Event()
        counts = [0] * threads
        start = threading.Barrier(threads + 1)

        def worker(k: int) -> None:
            start.wait()
            while not stop.is_set():
                spool.enqueue(Q.Q, {"seq": counts[k]}, b"x" * 200)
                counts[k] += 1

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        start.wait()
        c0, t0 = os.times(), time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for t in ts:
            t.join()
        el, c1 = time.perf_counter() - t0, os.times()
    finally:
        _enqueue._publish_group, _enqueue._sync_queues, _enqueue.write = publish_group, sync_queues, write
        shutil.rmtree(d, ignore_errors=True)
    cpu = (c1.user - c0.user + c1.system - c0.system) / el
    med = {k: 1000 * statistics.median(v) for k, v in stats.items() if v}
    return (
        f"{sum(counts) / el:,.0f}/s  cpu {100 * cpu:.0f}%  rounds {len(stats['stage one'])}  "
        f"group mean {statistics.mean(stats['group'] or [0]):.2f}  "
        f"stage one p50 {med.get('stage one', 0):.2f} ms  "
        f"stage two p50 {med.get('stage two', 0):.2f} ms  write p50 {med.get('write', 0):.3f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--callers-write", action="store_true", help="also measure callers writing their own entries"
    )
    a = ap.parse_args()
    modes = [("leader writes", True)] + ([("callers write", False)] if a.callers_write else [])
    print(f"{a.threads} threads, {a.seconds} s per run, load average {os.getloadavg()[0]:.2f}")
    for _ in range(a.repeat):  # alternate the modes: a noisy machine hits both alike
        for label, leader in modes:
            _enqueue.LEADER_WRITES = leader
            print(f"{label:14} {run(a.dir, a.threads, a.seconds)}", flush=True)


if __name__ == "__main__":
    main()
