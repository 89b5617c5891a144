"""Mistakes with the synchronous API that mypy --strict must report."""

from __future__ import annotations

import enum

import msgspec

import multispool


class Queue(enum.Enum):
    INCOMING = "incoming"
    DONE = "done"


class Job(msgspec.Struct):
    url: str


class Point(msgspec.Struct):
    x: int
    y: int


spoolable = multispool.Spoolable(queues=Queue, metadata=Job)
spool = multispool.Spool.create("spool", spoolable)

spool.enqueue(Queue.INCOMING, Point(x=1, y=2), b"")  # E: incompatible type "Point"; expected "Job"
spool.enqueue(Queue.INCOMING, Job("u"), "text")  # E: incompatible type "str"; expected "bytes"
spool.enqueue("incoming", Job("u"), b"")  # E: incompatible type "str"; expected "Enum"

entry = spool.enqueue(Queue.INCOMING, Job("u"), b"")
co = spool.checkout(entry)
print(co.contents.urll)  # E: "Job" has no attribute "urll"
text: str = co.data_file.load()  # E: Incompatible types in assignment (expression has type "bytes"
co.update(lambda job: Point(x=1, y=2))  # E: Point
entry.direct.save(Point(x=1, y=2))  # E: incompatible type "Point"; expected "Job"
wrong: multispool.Save[Job] = multispool.REMOVE  # E: expression has type "Remove"
multispool.Save(Job("u"), "done")  # E: incompatible type "str"; expected "Enum"


def returns_none(job: Job, data: multispool.DataFile[bytes]) -> None:
    pass


def wrong_metadata(point: Point, data: multispool.DataFile[bytes]) -> multispool.Remove:
    return multispool.REMOVE


def wrong_data(job: Job, data: multispool.DataFile[str]) -> multispool.Remove:
    return multispool.REMOVE


def saves_other_type(job: Job, data: multispool.DataFile[bytes]) -> multispool.Save[Point]:
    return multispool.Save(Point(x=1, y=2), Queue.DONE)


def typo_in_handler(job: Job, data: multispool.DataFile[bytes]) -> multispool.Remove:
    print(job.urll)  # E: "Job" has no attribute "urll"
    return multispool.REMOVE


with spool.reader(Queue.INCOMING) as reader:
    reader.iter(returns_none)  # E: Argument 1 to "iter" of "QueueReader" has incompatible type
    reader.iter(wrong_metadata)  # E: Argument 1 to "iter" of "QueueReader" has incompatible type
    reader.iter(wrong_data)  # E: Argument 1 to "iter" of "QueueReader" has incompatible type
    reader.iter(saves_other_type)  # E: Argument 1 to "iter" of "QueueReader" has incompatible type
    reader.iter_available(returns_none)  # E: Argument 1 to "iter_available" of "QueueReader"
