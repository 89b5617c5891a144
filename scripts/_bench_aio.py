"""Benchmark of multispool.aio against the sync reader, in one run (project issue 6).

  1. wake latency: from another process's ``enqueue`` RETURNING to the reader's
     ``dequeue`` returning the entry. The producer (a spawned process) stamps
     ``time.perf_counter_ns()`` (CLOCK_MONOTONIC, system-wide on Linux) right after each
     enqueue returns and sends ``(name, stamp)`` over a pipe; the reader stamps on
     receipt; latencies are matched by name. Entries are paced (one every ``--gap`` ms) so
     that each one finds the reader idle. Sync reader (``QueueReader.dequeue``) and async
     reader (``AsyncQueueReader.dequeue`` under ``asyncio.run``), same producer code.
  2. drain rate of a pre-filled backlog: sync ``dequeue_available`` + ``remove``; async
     the same as coroutines; async ``iter_available`` with a sync and a coroutine callback.

    scripts/bench_aio [--entries 500] [--backlog 5000] [--dir DIR] [--json]

Target: async wake p50 within 1.5x of the sync reader's.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))  # this checkout's library

import msgspec

import multispool
from multispool.aio import AsyncSpool


class Queue(enum.Enum):
    Q = "q"


class Job(msgspec.Struct):
    n: int


CTX = mp.get_context("spawn")


def spoolable(durability: str) -> multispool.Spoolable[bytes]:
    return multispool.Spoolable(queues=Queue, metadata=Job, durability=durability)  # type: ignore[arg-type]


def producer(path: str, durability: str, n: int, gap: float, go: Connection, out: Connection) -> None:
    """Child process: wait for "go", then enqueue ``n`` entries ``gap`` s apart, sending
    ``(name, perf_counter_ns after enqueue returned)`` for each."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))
    spool = multispool.Spool.load(path, spoolable(durability))
    go.recv()
    for i in range(n):
        name = spool.enqueue(Queue.Q, Job(i), b"").name
        out.send((name, time.perf_counter_ns()))
        time.sleep(gap)
    out.send(None)


def _start_producer(path: str, args: argparse.Namespace) -> tuple[Any, Connection, Connection]:
    go_r, go_w = CTX.Pipe(duplex=False)
    out_r, out_w = CTX.Pipe(duplex=False)
    proc = CTX.Process(
        target=producer, args=(path, args.durability, args.entries, args.gap / 1000, go_r, out_w)
    )
    proc.start()
    go_r.close()
    out_w.close()
    return proc, go_w, out_r


def _latencies(received: dict[str, int], out_r: Connection) -> list[float]:
    sent: dict[str, int] = {}
    while (msg := out_r.recv()) is not None:
        sent[msg[0]] = msg[1]
    assert set(sent) == set(received), "entries lost or duplicated"
    return [(received[k] - sent[k]) / 1e6 for k in sent]  # ms


def wake_sync(path: str, args: argparse.Namespace) -> list[float]:
    spool = multispool.Spool.load(path, spoolable(args.durability))
    proc, go, out_r = _start_producer(path, args)
    received: dict[str, int] = {}
    try:
        with spool.reader(Queue.Q, rescan_interval=60) as reader:
            go.send("go")
            while len(received) < args.entries:
                co = reader.dequeue(timeout=30)
                assert co is not None, "sync reader timed out"
                received[co.name] = time.perf_counter_ns()
                co.remove()
        return _latencies(received, out_r)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()


def wake_async(path: str, args: argparse.Namespace) -> list[float]:
    proc, go, out_r = _start_producer(path, args)

    async def main() -> dict[str, int]:
        received: dict[str, int] = {}
        spool = await AsyncSpool.load(path, spoolable(args.durability))
        async with spool, spool.reader(Queue.Q, rescan_interval=60) as reader:
            go.send("go")
            while len(received) < args.entries:
                co = await reader.dequeue(timeout=30)
                assert co is not None, "async reader timed out"
                received[co.name] = time.perf_counter_ns()
                await co.remove()
        return received

    try:
        return _latencies(asyncio.run(main()), out_r)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()


def fill(path: str, n: int) -> None:
    spool = multispool.Spool.load(path, spoolable("none"))
    for i in range(n):
        spool.enqueue(Queue.Q, Job(i), b"x")


def drain_sync(path: str, n: int) -> float:
    fill(path, n)
    spool = multispool.Spool.load(path, spoolable("none"))
    t = time.perf_counter()
    with spool.reader(Queue.Q) as reader:
        count = 0
        while (co := reader.dequeue_available()) is not None:
            co.remove()
            count += 1
    assert count == n
    return n / (time.perf_counter() - t)


def drain_async(path: str, n: int, how: str) -> float:
    fill(path, n)

    async def main() -> float:
        spool = await AsyncSpool.load(path, spoolable("none"))
        count = 0

        def sync_f(meta: Any, data_file: Any) -> Any:
            nonlocal count
            count += 1
            return multispool.REMOVE

        async def async_f(meta: Any, data_file: Any) -> Any:
            nonlocal count
            count += 1
            return multispool.REMOVE

        t = time.perf_counter()
        async with spool, spool.reader(Queue.Q) as reader:
            if how == "dequeue":
                while (co := await reader.dequeue_available()) is not None:
                    await co.remove()
                    count += 1
            else:
                await reader.iter_available(sync_f if how == "iter-sync" else async_f)
        assert count == n
        return n / (time.perf_counter() - t)

    return asyncio.run(main())


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=500, help="entries per wake-latency run")
    ap.add_argument("--gap", type=float, default=2.0, help="ms between two producer enqueues")
    ap.add_argument("--backlog", type=int, default=5000, help="entries per drain run")
    ap.add_argument("--durability", default="file", choices=["none", "file", "full"])
    ap.add_argument("--dir", default=None, help="where the spools live (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    base = tempfile.mkdtemp(prefix="bench-aio-", dir=args.dir)
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "entries": args.entries,
        "backlog": args.backlog,
        "durability": args.durability,
    }
    try:
        n = 0

        def fresh() -> str:
            nonlocal n
            n += 1
            path = os.path.join(base, f"s{n}")
            multispool.Spool.create(path, spoolable("none"))
            return path

        # Interleaved, so that a change in machine load hits both readers alike.
        lat: dict[str, list[float]] = {"sync": [], "async": []}
        for _ in range(2):
            lat["sync"] += wake_sync(fresh(), args)
            lat["async"] += wake_async(fresh(), args)
        for k, xs in lat.items():
            results[f"wake_{k}_ms"] = {
                "p50": statistics.median(xs),
                "p90": pct(xs, 90),
                "p99": pct(xs, 99),
                "max": max(xs),
                "n": len(xs),
            }
        results["wake_p50_ratio"] = results["wake_async_ms"]["p50"] / results["wake_sync_ms"]["p50"]

        rates = {
            "sync dequeue_available+remove": drain_sync(fresh(), args.backlog),
            "async dequeue_available+remove": drain_async(fresh(), args.backlog, "dequeue"),
            "async iter_available(sync f)": drain_async(fresh(), args.backlog, "iter-sync"),
            "async iter_available(async f)": drain_async(fresh(), args.backlog, "iter-async"),
        }
        results["drain_per_s"] = rates
    finally:
        shutil.rmtree(base, ignore_errors=True)

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"python {results['python']} on {results['platform']}, {results['cpus']} CPUs")
    print(f"wake latency, enqueue returned -> dequeue returned ({args.durability}), ms:")
    for k in ("sync", "async"):
        r = results[f"wake_{k}_ms"]
        print(
            f"  {k:5}  p50 {r['p50']:.3f}  p90 {r['p90']:.3f}  p99 {r['p99']:.3f}  "
            f"max {r['max']:.3f}  (n={r['n']})"
        )
    ratio = results["wake_p50_ratio"]
    verdict = "OK" if ratio <= 1.5 else "MISSED"
    print(f"  async/sync p50 ratio {ratio:.2f} (target <= 1.5: {verdict})")
    print(f"drain rate, {args.backlog}-entry backlog, durability none, entries/s:")
    for k, v in rates.items():
        print(f"  {k:32} {v:9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
