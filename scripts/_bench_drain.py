"""Drain throughput of plain (never delayed) entries, in CPU time: the hot path that the
schedule record must not slow down. Compare two trees of lib/ by running this with
each, alternately (``git archive REV lib | tar -x -C /tmp/base``):

    python scripts/_bench_drain.py --lib /tmp/base/lib --n 3000 --durability none
    python scripts/_bench_drain.py --lib lib --n 3000 --durability none

Prints entries per CPU second (process_time: less sensitive to a loaded machine than
wall time). Syscalls per entry: ``strace -f -c`` around the drain phase."""

from __future__ import annotations

import argparse
import enum
import shutil
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default="lib")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--durability", default="none", choices=("full", "file", "none"))
    a = ap.parse_args()
    sys.path.insert(0, a.lib)
    import multispool

    class Q(enum.Enum):
        A = "a"

    sp = multispool.Spoolable(queues=Q, durability=a.durability)
    d = tempfile.mkdtemp()
    try:
        s = multispool.Spool.create(d + "/s", sp)
        for i in range(a.n):
            s.enqueue(Q.A, i, b"x")
        with s.reader(Q.A, observer="native") as r:
            t = time.process_time()
            while True:
                co = r.dequeue_available()
                if co is None:
                    break
                co.remove()
            cpu = time.process_time() - t
        print(f"{a.n / cpu:.0f}")
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
