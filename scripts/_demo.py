"""multispool demo: producer and consumer processes sharing one spool.

Producers enqueue jobs into `incoming`; consumers block in `reader.iter` (woken by
filesystem events), move each job to `processed`, and a final pass removes them.
Prints what happened, the throughput, and the wake latency.

What the latency measures: from the moment an entry becomes visible in its queue to the
moment a consumer's callback starts. "Visible" is timed by the producer right before the
rename(2) that publishes the entry (the demo wraps os.rename in the producer processes to
take the timestamp), so it is a point both sides agree on: no consumer can see the entry
before it. Timing from "enqueue returned" instead is misleading with durability="full":
enqueue returns only after fsyncing the queue directory, which comes after the rename, so
a fast consumer often starts before enqueue returns (negative "latencies"). Also shown:
enqueue called -> callback, the producer-to-consumer time including the producer's own
writes and fsyncs. Both use time.perf_counter_ns (CLOCK_MONOTONIC on Linux, system-wide).
"""

from __future__ import annotations

import argparse
import enum
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

import multispool


class Queue(enum.Enum):
    INCOMING = "incoming"
    PROCESSED = "processed"


class Job(msgspec.Struct):
    producer: int
    seq: int
    handled_by: int | None = None


def spoolable(durability: str) -> multispool.Spoolable[bytes]:
    return multispool.Spoolable(queues=Queue, metadata=Job, durability=durability)  # type: ignore[arg-type]


def time_publishing_renames(queue_dir: str, visible: dict[str, int]) -> None:
    """Record, in ``visible[name]``, the time right before each rename(2) into
    ``queue_dir``: the entry becomes visible to consumers during that call."""
    real_rename = os.rename
    queue_dir = os.path.normpath(queue_dir)
    st = os.stat(queue_dir)
    queue_id = (st.st_dev, st.st_ino)

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        d = os.fsdecode(dst)
        dfd = kwargs.get("dst_dir_fd")
        if dfd is not None:  # a name in the spool's held directory (multispool._fs.At)
            held = os.fstat(dfd)
            into = os.path.sep not in d and (held.st_dev, held.st_ino) == queue_id
        else:
            into = os.path.normpath(os.path.dirname(d)) == queue_dir
        if into:
            visible[os.path.basename(d)] = time.perf_counter_ns()
        real_rename(src, dst, *args, **kwargs)

    os.rename = rename


def producer(spool_dir: str, pid: int, count: int, gap: float, durability: str, out: str, go: object) -> None:
    spool = multispool.Spool.load(spool_dir, spoolable(durability))
    visible: dict[str, int] = {}
    time_publishing_renames(os.path.join(spool_dir, Queue.INCOMING.value), visible)
    go.wait()  # type: ignore[attr-defined]
    called: dict[str, int] = {}
    for seq in range(count):
        t_call = time.perf_counter_ns()
        entry = spool.enqueue(Queue.INCOMING, Job(pid, seq), f"payload {pid}/{seq}".encode())
        called[entry.name] = t_call
        if gap:
            time.sleep(gap)  # pacing, so each entry is a fresh wake-up
    Path(out).write_text(json.dumps({"called": called, "visible": visible}))


def consumer(spool_dir: str, cid: int, durability: str, out: str, go: object, done: object) -> None:
    spool = multispool.Spool.load(spool_dir, spoolable(durability))
    stop = threading.Event()

    def wait_for_parent() -> None:
        done.wait()  # type: ignore[attr-defined]  # a process-shared Event, bridged to ours
        stop.set()

    threading.Thread(target=wait_for_parent, daemon=True).start()
    seen: list[tuple[str, int]] = []
    with spool.reader(Queue.INCOMING, rescan_interval=5.0) as reader:
        go.wait()  # type: ignore[attr-defined]

        def handle(job: Job, data: multispool.DataFile[bytes]) -> multispool.Save:
            seen.append((job.producer * 10**9 + job.seq, time.perf_counter_ns()))  # type: ignore[arg-type]
            data.load()
            return multispool.Save(msgspec.structs.replace(job, handled_by=cid), Queue.PROCESSED)

        reader.iter(handle, stop=stop)
    Path(out).write_text(json.dumps(seen))


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of sorted ``xs`` (nearest rank)."""
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument("--paced", type=int, default=300, help="entries per producer, paced (latency phase)")
    ap.add_argument("--burst", type=int, default=2000, help="entries per producer, unpaced (throughput)")
    ap.add_argument("--gap", type=float, default=0.003, help="seconds between paced enqueues")
    ap.add_argument("--durability", choices=["full", "file", "none"], default="full")
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="multispool-demo-") as tmp:
        spool_dir = os.path.join(tmp, "spool")
        spool = multispool.Spool.create(spool_dir, spoolable(args.durability))
        print(f"spool: {spool_dir}  (durability={args.durability})")
        uname = os.uname()
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {uname.sysname} {uname.release}")
        results = {}
        for phase, count, gap in (("paced", args.paced, args.gap), ("burst", args.burst, 0.0)):
            go = ctx.Event()
            done = ctx.Event()
            procs = []
            outs_c = [os.path.join(tmp, f"{phase}-c{i}.json") for i in range(args.consumers)]
            outs_p = [os.path.join(tmp, f"{phase}-p{i}.json") for i in range(args.producers)]
            try:
                for i, out in enumerate(outs_c):
                    p = ctx.Process(target=consumer, args=(spool_dir, i, args.durability, out, go, done))
                    p.start()
                    procs.append(p)
                producers = [
                    ctx.Process(target=producer, args=(spool_dir, i, count, gap, args.durability, out, go))
                    for i, out in enumerate(outs_p)
                ]
                for p in producers:
                    p.start()
                procs += producers
                time.sleep(0.5)  # let consumers subscribe; the go event starts everyone together
                t0 = time.perf_counter()
                go.set()
                total = count * args.producers
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    if len(spool.list(Queue.PROCESSED)) >= total and not any(p.is_alive() for p in producers):
                        break
                    time.sleep(0.01)
                elapsed = time.perf_counter() - t0
                done.set()
                for p in procs:
                    p.join(timeout=30)
            finally:
                for p in procs:
                    if p.is_alive():
                        p.kill()
                        p.join()
            called: dict[str, int] = {}
            visible: dict[str, int] = {}
            for out in outs_p:
                times = json.loads(Path(out).read_text())
                called.update(times["called"])
                visible.update(times["visible"])
            handled: list[tuple[int, int]] = []
            per_consumer = []
            for out in outs_c:
                rows = json.loads(Path(out).read_text())
                per_consumer.append(len(rows))
                handled += rows
            processed = spool.list(Queue.PROCESSED)
            ids = [p.producer * 10**9 + p.seq for p in (e.direct.contents() for e in processed)]
            # Latency: map each entry's name to its handling time via the job id.
            by_id = dict(handled)
            lat: list[float] = []
            lat_call: list[float] = []
            for e in processed:
                job = e.direct.contents()
                t_cb = by_id.get(job.producer * 10**9 + job.seq)
                if t_cb is None:
                    continue
                if e.name in visible:
                    lat.append((t_cb - visible[e.name]) / 1e6)
                if e.name in called:
                    lat_call.append((t_cb - called[e.name]) / 1e6)
            lat.sort()
            lat_call.sort()
            if len(lat) < len(processed):
                print(f"  note: the publishing rename was timed for {len(lat)} of {len(processed)} entries "
                      "(the library renamed some other way); latency covers those only")
            results[phase] = (total, len(processed), len(set(ids)), per_consumer, elapsed, lat)
            print(f"\n[{phase}] {args.producers} producers x {count} entries"
                  f"{f' (one every {gap*1000:.0f} ms)' if gap else ''}, {args.consumers} consumers")
            print(f"  produced {total}, consumed {len(handled)} (per consumer: {per_consumer}), "
                  f"in processed/: {len(processed)}, distinct: {len(set(ids))}")
            print(f"  end to end: {elapsed:.2f} s = {total / elapsed:,.0f} entries/s")
            for label, xs in (
                ("wake latency, entry visible -> callback" if gap else
                 "entry visible -> callback, incl. queueing behind the burst", lat),
                ("enqueue called -> callback (incl. the producer's writes and fsyncs)", lat_call),
            ):
                if xs:
                    print(f"  {label}:\n    p50 {pct(xs, 0.5):.3f} ms  p90 {pct(xs, 0.9):.3f} ms  "
                          f"p99 {pct(xs, 0.99):.3f} ms  min {xs[0]:.3f} ms  max {xs[-1]:.3f} ms")
            # Clean up this phase: remove everything through the API.
            with spool.reader(Queue.PROCESSED) as r:
                r.iter_available(lambda m, d: multispool.REMOVE)
        counts = {q.value: len(spool.list(q)) for q in Queue}
        print(f"\nfinal per-queue counts: {counts}  (everything processed and removed)")
        ok = all(r[0] == r[1] == r[2] and sum(r[3]) == r[0] for r in results.values())
        ok = ok and not any(counts.values())
        print("result:", "OK — every entry handled exactly once" if ok else "MISMATCH")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
