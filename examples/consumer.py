"""Consume jobs: wait for entries (filesystem events, no polling), handle each one.

    python examples/consumer.py SPOOL_DIR [--max N]

Any number of consumers may run at once, in any processes: each entry goes to exactly
one. A job is moved to the ``done`` queue once handled. The consumer stops after ``--max``
jobs, or cleanly on SIGTERM/SIGINT (what systemd sends on ``systemctl stop``): the entry
being handled is finished first, and nothing is lost. It prints one line per job.
"""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from jobs import SPOOLABLE, Job, Queue

import multispool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spool", help="spool directory (created if missing)")
    parser.add_argument("--max", type=int, default=None, help="stop after this many jobs")
    args = parser.parse_args()

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    handled = 0

    def handle(job: Job, data: multispool.DataFile[bytes]) -> multispool.Save[Job] | multispool.Remove:
        nonlocal handled
        payload = data.load()
        print(f"handled {job.number} {job.url} ({len(payload)} bytes)", flush=True)
        handled += 1
        if args.max is not None and handled >= args.max:
            stop.set()
        return multispool.Save(job, Queue.DONE)

    spool = multispool.Spool.create(args.spool, SPOOLABLE)
    # recover=True: entries held by a consumer that died are put back first.
    with spool.reader(Queue.INCOMING, recover=True) as reader:
        print("ready", flush=True)
        reader.iter(handle, stop=stop)


if __name__ == "__main__":
    main()
