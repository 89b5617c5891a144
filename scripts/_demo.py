"""multispool demo: producer and consumer processes sharing one spool.

Producers enqueue jobs into `incoming`; consumers block in `reader.iter` (woken by
filesystem events), move each job to `processed`, and a final pass removes them.
Prints what happened, the throughput, and the wake latency: the time from a producer's
enqueue returning to a consumer's callback starting (CLOCK_MONOTONIC is system-wide).
"""

from __future__ import annotations

import argparse
import enum
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

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


def producer(spool_dir: str, pid: int, count: int, gap: float, durability: str, out: str, go: object) -> None:
    spool = multispool.Spool.load(spool_dir, spoolable(durability))
    go.wait()  # type: ignore[attr-defined]
    returned: list[tuple[str, int]] = []
    for seq in range(count):
        entry = spool.enqueue(Queue.INCOMING, Job(pid, seq), f"payload {pid}/{seq}".encode())
        returned.append((entry.name, time.perf_counter_ns()))
        if gap:
            time.sleep(gap)  # pacing, so each entry is a fresh wake-up
    Path(out).write_text(json.dumps(returned))


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
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {os.uname().sysname} {os.uname().release}")
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
            returned = {}
            for out in outs_p:
                returned.update(dict(json.loads(Path(out).read_text())))
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
            lat = []
            for e in processed:
                job = e.direct.contents()
                t_ret = returned.get(e.name)
                t_cb = by_id.get(job.producer * 10**9 + job.seq)
                if t_ret is not None and t_cb is not None:
                    lat.append((t_cb - t_ret) / 1e6)
            lat.sort()
            results[phase] = (total, len(processed), len(set(ids)), per_consumer, elapsed, lat)
            print(f"\n[{phase}] {args.producers} producers x {count} entries"
                  f"{f' (one every {gap*1000:.0f} ms)' if gap else ''}, {args.consumers} consumers")
            print(f"  produced {total}, consumed {len(handled)} (per consumer: {per_consumer}), "
                  f"in processed/: {len(processed)}, distinct: {len(set(ids))}")
            print(f"  end to end: {elapsed:.2f} s = {total / elapsed:,.0f} entries/s")
            if lat:
                p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
                label = "wake latency" if gap else "enqueue->callback incl. queueing"
                print(f"  {label} (enqueue returned -> callback): p50 {p(0.5):.3f} ms  "
                      f"p90 {p(0.9):.3f} ms  p99 {p(0.99):.3f} ms  max {lat[-1]:.3f} ms")
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
