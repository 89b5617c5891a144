#!/usr/bin/env python3
"""What group commit gains with 8 threads, in the library and in the bare recipe: four
cases, each in a fresh process and a fresh directory under DIR, alternating run by run
(the machine's speed drifts; alternation spreads the drift over all four):

    floor       8 threads, the library's group commit written with bare calls
                (scripts/_bench/sys_floor.py, GroupProducer), and the same threads each
                syncing alone (BatchProducer, one entry per call)
    multispool  8 threads of ``Spool.enqueue``, group commit on, and off

Prints each case's median entries/s and its runs, the process's CPU per entry (setup
included), and the on/off ratios. The floor's ratio is what sharing syncs between one
process's threads gained on that disk at that time (docs/benchmarks-batch.md).

    .venv/bin/python scripts/_bench_group_floor.py DIR [--seconds 1.5] [--runs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = {
    "floor, group commit on": {"system": "floor", "group": True},
    "floor, group commit off": {"system": "floor", "group": False},
    "multispool, group commit on": {"system": "multispool", "group": True},
    "multispool, group commit off": {"system": "multispool", "group": False},
}
# Run in the child: one case, then its rate and the process's CPU per entry.
CHILD = """
import json, os, sys
sys.path[:0] = [sys.argv[2], os.path.join(sys.argv[2], "..", "lib")]
from _bench import batch
t0 = os.times()
r = batch.child(json.loads(sys.argv[1]))
t1 = os.times()
r["user"] = 1e6 * (t1.user - t0.user) / r["n"]
r["sys"] = 1e6 * (t1.system - t0.system) / r["n"]
print(json.dumps(r))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=8)
    a = ap.parse_args()
    res: dict[str, list[dict[str, float]]] = {k: [] for k in CASES}
    for run in range(a.runs):
        for name, case in CASES.items():
            d = tempfile.mkdtemp(dir=a.dir)
            job = {**case, "dir": d, "seconds": a.seconds, "batch": 1, "threads": a.threads}
            try:
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, json.dumps(job), HERE],
                    capture_output=True, text=True, check=True,
                ).stdout
            finally:
                shutil.rmtree(d, ignore_errors=True)
            res[name].append(json.loads(out))
        print(f"run {run + 1}/{a.runs} done", file=sys.stderr)
    med = {k: statistics.median(r["rate"] for r in v) for k, v in res.items()}
    for k, v in res.items():
        runs = " ".join(f"{r['rate']:,.0f}" for r in v)
        user, sys_ = (statistics.median(r[key] for r in v) for key in ("user", "sys"))
        cpu = f"user {user:.0f} sys {sys_:.0f} us/entry"
        print(f"{k:30s} {med[k]:7,.0f}/s  ({runs}; {cpu})")
    for who in ("floor", "multispool"):
        on, off = med[who + ", group commit on"], med[who + ", group commit off"]
        print(f"{who}: group commit on / off {on / off:.2f}x")
    lib, floor = med["multispool, group commit on"], med["floor, group commit on"]
    print(f"multispool / floor, group commit on: {lib / floor:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
