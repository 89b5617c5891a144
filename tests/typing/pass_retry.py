"""Handlers may return Retry[M] (delays and retries); Backoff as on_error."""

from __future__ import annotations

import enum

import msgspec
from typing_extensions import assert_type

import multispool


class Queue(enum.Enum):
    INCOMING = "incoming"
    DEAD = "dead"


class Job(msgspec.Struct):
    url: str


spool = multispool.Spool.create("spool", multispool.Spoolable(queues=Queue, metadata=Job))
entry = spool.enqueue(Queue.INCOMING, Job("u"), b"", delay=30.0)
assert_type(entry.due(), float | None)
assert_type(entry.attempts(), int)
assert_type(multispool.Retry(5.0, metadata=Job("v")), multispool.Retry[Job])


Action = multispool.Save[Job] | multispool.Remove | multispool.Retry[Job]


def handle(job: Job, data: multispool.DataFile[bytes]) -> Action:
    if not data.load():
        return multispool.Retry(60.0)
    return multispool.REMOVE


policy = multispool.Backoff(first=1.0, factor=2.0, max=3600.0, max_attempts=5, dead_letter=Queue.DEAD)
with spool.reader(Queue.INCOMING) as reader:
    reader.iter(handle, on_error=policy)
