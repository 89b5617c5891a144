"""Mistakes with retries that mypy --strict must report."""

from __future__ import annotations

import enum

import msgspec

import multispool


class Queue(enum.Enum):
    INCOMING = "incoming"


class Job(msgspec.Struct):
    url: str


class Point(msgspec.Struct):
    x: int


spool = multispool.Spool.create("spool", multispool.Spoolable(queues=Queue, metadata=Job))


def retries_other_type(job: Job, data: multispool.DataFile[bytes]) -> multispool.Retry[Point]:
    return multispool.Retry(1.0, metadata=Point(x=1))


with spool.reader(Queue.INCOMING) as reader:
    reader.iter(retries_other_type)  # E: Argument 1 to "iter" of "QueueReader" has incompatible type
multispool.Retry("soon")  # E: incompatible type "str"
