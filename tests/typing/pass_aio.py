"""Correct asyncio programs: the async API carries the same M and D."""

from __future__ import annotations

import asyncio
import enum

import msgspec
from typing_extensions import assert_type

import multispool
from multispool.aio import AsyncCheckedOutEntry, AsyncDataFile, AsyncEntry, AsyncSpool


class Queue(enum.Enum):
    INCOMING = "incoming"
    DONE = "done"


class Job(msgspec.Struct):
    url: str


spoolable = multispool.Spoolable(queues=Queue, metadata=Job)


def handle(job: Job, data: multispool.DataFile[bytes]) -> multispool.Save[Job] | multispool.Remove:
    return multispool.Save(job, Queue.DONE)


async def ahandle(job: Job, data: AsyncDataFile[bytes]) -> multispool.Save[Job] | multispool.Remove:
    if await data.load():
        return multispool.REMOVE
    return multispool.Save(job, Queue.DONE)


async def main() -> None:
    spool = await AsyncSpool.create("spool", spoolable)
    assert_type(spool, AsyncSpool[Job, bytes])
    assert_type(await AsyncSpool.load("spool", spoolable), AsyncSpool[Job, bytes])
    entry = await spool.enqueue(Queue.INCOMING, Job("https://example.org"), b"payload")
    assert_type(entry, AsyncEntry[Job, bytes])
    assert_type(await spool.list(Queue.INCOMING), list[AsyncEntry[Job, bytes]])
    co = await spool.checkout(entry)
    assert_type(co, AsyncCheckedOutEntry[Job, bytes])
    assert_type(co.contents, Job)
    assert_type(await co.data_file.load(), bytes)
    await co.save(Queue.DONE)

    stop = asyncio.Event()
    async with spool.reader(Queue.INCOMING) as reader:
        got = await reader.dequeue(stop=stop, timeout=1.0)
        assert_type(got, AsyncCheckedOutEntry[Job, bytes] | None)
        if got is not None:
            await got.remove()
        async for checked_out in reader:
            assert_type(checked_out.contents.url, str)
            await checked_out.remove()
            break
        await reader.iter(handle, stop=stop)
        await reader.iter(ahandle, stop=stop)
        await reader.iter_available(ahandle)


asyncio.run(main())
