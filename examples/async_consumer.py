"""Consume jobs from asyncio: the event loop never blocks on disk or on waiting.

    python examples/async_consumer.py SPOOL_DIR [--max N]

Same behaviour as consumer.py (moves each job to ``done``; stops after ``--max`` jobs or
on SIGTERM/SIGINT), with an ``async def`` handler.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from jobs import SPOOLABLE, Job, Queue

import multispool
from multispool.aio import AsyncDataFile, AsyncSpool


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spool", help="spool directory (created if missing)")
    parser.add_argument("--max", type=int, default=None, help="stop after this many jobs")
    args = parser.parse_args()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    handled = 0

    async def handle(job: Job, data: AsyncDataFile[bytes]) -> multispool.Save[Job] | multispool.Remove:
        nonlocal handled
        payload = await data.load()
        await asyncio.sleep(0)  # stands for real async work (an HTTP call, a database write...)
        print(f"handled {job.number} {job.url} ({len(payload)} bytes)", flush=True)
        handled += 1
        if args.max is not None and handled >= args.max:
            stop.set()
        return multispool.Save(job, Queue.DONE)

    spool = await AsyncSpool.create(args.spool, SPOOLABLE)
    try:
        async with spool.reader(Queue.INCOMING, recover=True) as reader:
            print("ready", flush=True)
            await reader.iter(handle, stop=stop)
    finally:
        await spool.aclose()


if __name__ == "__main__":
    asyncio.run(main())
