"""Enqueue jobs into a spool (creating it if needed).

    python examples/producer.py SPOOL_DIR [--count N]

Prints the name of each entry it enqueued. Run several at once: names never collide.
"""

from __future__ import annotations

import argparse

from jobs import SPOOLABLE, Job, Queue

import multispool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spool", help="spool directory (created if missing)")
    parser.add_argument("--count", type=int, default=10, help="how many jobs to enqueue")
    args = parser.parse_args()

    spool = multispool.Spool.create(args.spool, SPOOLABLE)
    for n in range(args.count):
        job = Job(url=f"https://example.org/item/{n}", number=n)
        entry = spool.enqueue(Queue.INCOMING, job, f"payload {n}".encode())
        print(entry.name, flush=True)


if __name__ == "__main__":
    main()
