"""Mistakes with the asyncio API that mypy --strict must report."""

from __future__ import annotations

import enum

import msgspec

import multispool
from multispool.aio import AsyncDataFile, AsyncSpool


class Queue(enum.Enum):
    INCOMING = "incoming"
    DONE = "done"


class Job(msgspec.Struct):
    url: str


spoolable = multispool.Spoolable(queues=Queue, metadata=Job)


def returns_none(job: Job, data: multispool.DataFile[bytes]) -> None:
    pass


async def areturns_none(job: Job, data: AsyncDataFile[bytes]) -> None:
    pass


async def main() -> None:
    spool = await AsyncSpool.create("spool", spoolable)
    await spool.enqueue(Queue.INCOMING, "not a job", b"")  # E: incompatible type "str"; expected "Job"
    async with spool.reader(Queue.INCOMING) as reader:
        co = await reader.dequeue()
        if co is not None:
            print(co.contents.urll)  # E: "Job" has no attribute "urll"
        await reader.iter(returns_none)  # E: Argument 1 to "iter" of "AsyncQueueReader" has incompatible type
        await reader.iter(areturns_none)  # E: Argument 1 to "iter" of "AsyncQueueReader"
