"""What this machine charges a process for waking up, by how long it slept (Linux):

    python scripts/_bench_wake_charge.py [--intervals 0.1,1,5] [--seconds 15]

A thread sleeps ``I`` seconds, then does one ``os.stat``, again and again; printed is the
scheduler run time (``/proc/thread-self/schedstat``) charged per wake-up and as % of a
core. No library code runs: this is the floor under any idle figure of a reader (a
polling reader wakes every ``poll_interval``, any reader every ``rescan_interval``). On
a virtual machine the charge grows with the time asleep (the host brings the guest's
memory and caches back); on bare metal it is tens of microseconds.
"""

from __future__ import annotations

import argparse
import os
import time


def run_time_ns() -> int:
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--intervals", default="0.1,1,5")
    ap.add_argument("--seconds", type=float, default=15.0, help="per interval")
    a = ap.parse_args()
    for iv in (float(x) for x in a.intervals.split(",")):
        n = max(2, int(a.seconds / iv))
        r0, t0 = run_time_ns(), time.monotonic()
        for _ in range(n):
            time.sleep(iv)  # the thing measured: a timed sleep and one wake-up
            os.stat(".")
        ran, took = (run_time_ns() - r0) / 1e9, time.monotonic() - t0
        print(f"sleep {iv:g} s x {n}: {ran / n * 1e3:.3f} ms run time per wake-up, "
              f"{100 * ran / took:.3f} % of a core; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
