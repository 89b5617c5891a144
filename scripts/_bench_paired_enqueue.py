"""Single durable enqueue, this checkout's lib/ against lib/ of a git ref, paired:

    python scripts/_bench_paired_enqueue.py DIR [--blocks N] [--ref REF] [--threads T]

Both libraries are loaded in one process (the ref's as package ``multispool_base``) and
alternate blocks of 20 ``enqueue`` calls (durability "full") on DIR's filesystem, so both
see the same load; prints the medians of the per-block rates and of the per-pair ratios.
With ``--threads T`` (> 1) a block is T threads calling ``enqueue`` for 0.5 s (group
commit). Default ref: 80e0c42, main before group commit (issue 15).
"""

from __future__ import annotations

import argparse
import enum
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Q(enum.Enum):
    Q = "q"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--ref", default="80e0c42")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    work = tempfile.mkdtemp(dir=a.dir)
    try:
        snap = os.path.join(work, "snap")
        os.makedirs(snap)
        tar = subprocess.run(["git", "-C", ROOT, "archive", a.ref, "lib/multispool"], capture_output=True,
                             check=True).stdout
        subprocess.run(["tar", "-x", "-C", snap], input=tar, check=True)
        os.rename(os.path.join(snap, "lib", "multispool"), os.path.join(snap, "multispool_base"))
        sys.path[:0] = [os.path.join(ROOT, "lib"), snap]
        import multispool_base  # the package uses relative imports only

        import multispool

        new = multispool.Spool.create(os.path.join(work, "new"), multispool.Spoolable(queues=Q))
        old = multispool_base.Spool.create(os.path.join(work, "old"), multispool_base.Spoolable(queues=Q))
        rates: dict[str, list[float]] = {"new": [], "old": []}
        for b in range(a.blocks):
            pair = [("new", new), ("old", old)]
            for label, sp in pair if b % 2 == 0 else pair[::-1]:
                if a.threads > 1:
                    rates[label].append(_threaded_block(sp, a.threads, 0.5))
                    continue
                t = time.perf_counter()
                for i in range(20):
                    sp.enqueue(Q.Q, {"seq": i}, b"x" * 100)
                rates[label].append(20 / (time.perf_counter() - t))
        mn, mo = statistics.median(rates["new"]), statistics.median(rates["old"])
        ratio = statistics.median(n / o for n, o in zip(rates["new"], rates["old"], strict=True))
        what = f"{a.threads} threads x 0.5 s of" if a.threads > 1 else "20"
        print(f"{a.dir}: {a.blocks} paired blocks of {what} durable enqueues: this lib {mn:.0f}/s, {a.ref} "
              f"{mo:.0f}/s; median per-pair ratio {ratio:.2f}x; load {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _threaded_block(spool: Any, threads: int, seconds: float) -> float:
    """Entries per second that ``threads`` threads of single enqueues put in ``seconds``."""
    counts = [0] * threads
    stop = threading.Event()

    def work(k: int) -> None:
        while not stop.is_set():
            spool.enqueue(Q.Q, {"seq": k}, b"x" * 100)
            counts[k] += 1

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    t = time.perf_counter()
    for th in ts:
        th.start()
    stop.wait(seconds)  # the block's length, not synchronisation
    stop.set()
    for th in ts:
        th.join()
    return sum(counts) / (time.perf_counter() - t)


if __name__ == "__main__":
    main()
