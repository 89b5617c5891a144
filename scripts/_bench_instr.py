#!/usr/bin/env python3
"""Instructions per operation, multispool against the floor, counted by valgrind's
callgrind. A count is exact and repeats run after run whatever else the machine is
doing, where a rate on a shared machine moves by 10-20 % between runs: it shows a change
of 1 % in what the library itself does per operation. It says nothing of waiting (for
the disk, a lock, another thread), so it complements ``scripts/bench_core``, it does
not replace it.

    scripts/bench_instr [--dir DIR] [--ops N] [--modes none,file,full] [--threads 4]

For each durability mode, one process per implementation (scripts/_bench_core.py's
Floor, the same system calls written with bare ``os`` calls, and Lib, the public API)
runs under callgrind: a warm-up outside the counts, then ``--ops`` enqueues, as many
checkouts saved into a second queue, as many checkouts removed, and, with
``--threads``, that many threads enqueueing ``--ops`` entries in all (under "full"
the library's threads share their syncs; the floor's each sync alone). Between two
phases the child calls ``os.getppid()``, and callgrind writes what it has counted so far
(``--dump-before``), so each phase is counted on its own. Prints instructions per
operation for both, their ratio, and the difference: the library's own work. Valgrind
runs a process's threads one at a time, so the threaded counts are work, not contention.
DIR defaults to /dev/shm (tmpfs), where no count waits on a disk.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("enqueue", "checkout+save", "checkout+remove", "enqueue, threads")
WARM = 5
# Where callgrind writes its counts so far: os.getppid()'s C function in the interpreter.
MARK = "os_getppid"


def child(impl: str, mode: str, d: str, ops: int, threads: int) -> None:
    """Runs under callgrind: each phase between two os.getppid() calls."""
    sys.path.insert(0, HERE)
    import _bench_core as bc

    q = bc.IMPLS[impl](os.path.join(d, impl), mode)
    # Warm-up: first-use work (imports, caches, the filesystem's facts) stays outside.
    for i in range(WARM):
        q.enqueue({"n": -i}, bc.PAYLOAD)
    for n in q.names("a"):
        q.checkout_save(n)
    for n in q.names("b"):
        q.checkout_remove(n)
    # Each counted phase lies between two marks; the listings and set-up between
    # phases get dumps of their own, which are not reported (COUNTED).
    os.getppid()
    for i in range(ops):
        q.enqueue({"n": i}, bc.PAYLOAD)
    os.getppid()
    names = q.names("a")
    os.getppid()
    for n in names:
        q.checkout_save(n)
    os.getppid()
    names = q.names("b")
    os.getppid()
    for n in names:
        q.checkout_remove(n)
    os.getppid()
    if threads:
        # As bench_core's threads: a Floor each (their own names), or the one shared Spool.
        if impl == "floor":
            qs = [bc.IMPLS[impl](os.path.join(d, impl), mode) for _ in range(threads)]
        else:
            qs = [q] * threads
        per = ops // threads

        def work(q: Any) -> None:
            for i in range(per):
                q.enqueue({"n": i}, bc.PAYLOAD)

        ts = [threading.Thread(target=work, args=(x,)) for x in qs]
        os.getppid()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        os.getppid()


# The dump (1-based: dump k holds what ran before the k-th mark) of each phase in PHASES.
COUNTED = (2, 4, 6, 8)


def _total(path: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise SystemExit(f"no totals in {path}")


def count(impl: str, mode: str, base: str, ops: int, threads: int) -> dict[str, float]:
    """Instructions per operation of each phase, for one implementation and mode."""
    d = tempfile.mkdtemp(dir=base, prefix=f"instr-{impl}-{mode}-")
    out = os.path.join(d, "callgrind.out")
    try:
        cmd = [
            "valgrind", "--tool=callgrind", f"--dump-before={MARK}", f"--callgrind-out-file={out}",
            sys.executable, os.path.abspath(__file__), "--child", impl, mode, d, str(ops), str(threads),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{impl} {mode} failed under valgrind:\n{r.stderr[-3000:]}")
        dumps = {int(p.rsplit(".", 1)[1]): _total(p) for p in glob.glob(out + ".*")}
        per = [ops, ops, ops] + ([ops // threads * threads] if threads else [])
        return {PHASES[k]: dumps[COUNTED[k]] / n for k, n in enumerate(per)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    ap.add_argument("--ops", type=int, default=400)
    ap.add_argument("--modes", default="none,file,full")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--json", help="also write the counts to this file")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        impl, mode, d, ops, threads = a.child
        child(impl, mode, d, int(ops), int(threads))
        return 0
    if shutil.which("valgrind") is None:
        print("bench_instr: valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    modes = a.modes.split(",")
    jobs = [(impl, mode) for mode in modes for impl in ("floor", "multispool")]
    # Two at a time: the counts do not depend on it, only the time this takes.
    with ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1))) as ex:
        futs = {j: ex.submit(count, j[0], j[1], a.dir, a.ops, a.threads) for j in jobs}
        res = {j: f.result() for j, f in futs.items()}
    print(f"instructions per operation (callgrind), {a.ops} operations per phase, in {a.dir}")
    py, m = platform.python_version(), platform.machine()
    print(f"Python {py}, {m}, {platform.system()} {platform.release()}")
    print(f"{'mode':5s} {'operation':18s} {'floor':>9s} {'multispool':>11s} {'ratio':>6s} {'library':>9s}")
    for mode in modes:
        fl, ms = res[("floor", mode)], res[("multispool", mode)]
        for ph in fl:
            label = ph if ph != "enqueue, threads" else f"enqueue, {a.threads} thr"
            f, m_ = fl[ph], ms[ph]
            print(f"{mode:5s} {label:18s} {f:9,.0f} {m_:11,.0f} {m_ / f:5.2f}x {m_ - f:+9,.0f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({f"{i} {m}": v for (i, m), v in res.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
