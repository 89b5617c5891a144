"""Correct synchronous programs: what mypy --strict infers for the generic API."""

from __future__ import annotations

import enum
import threading
from typing import Any

import msgspec
from typing_extensions import assert_type

import multispool


class Queue(enum.Enum):
    INCOMING = "incoming"
    DONE = "done"


class Job(msgspec.Struct):
    url: str
    tries: int = 0


class Point(msgspec.Struct):
    x: int
    y: int


# M from metadata=, D from the data codec (BytesData by default).
spoolable = multispool.Spoolable(queues=Queue, metadata=Job)
assert_type(spoolable, multispool.Spoolable[Job, bytes])
assert_type(multispool.Spoolable(queues=Queue), multispool.Spoolable[Any, bytes])
points = multispool.Spoolable(queues=Queue, metadata=Job, data=multispool.MsgspecData(Point))
assert_type(points, multispool.Spoolable[Job, Point])

spool = multispool.Spool.create("spool", spoolable)
assert_type(spool, multispool.Spool[Job, bytes])
assert_type(multispool.Spool.load("spool", spoolable), multispool.Spool[Job, bytes])
assert_type(multispool.Spool.load_unsafe("spool", spoolable), multispool.Spool[Job, bytes])
assert_type(spool.dir, str)
assert_type(spool.spoolable, multispool.Spoolable[Job, bytes])

entry = spool.enqueue(Queue.INCOMING, Job("https://example.org"), b"payload")
assert_type(entry, multispool.Entry[Job, bytes])
reserved = spool.enqueue(Queue.INCOMING, Job("u"), b"", use=spool.reserve_name())
assert_type(reserved, multispool.Entry[Job, bytes])
assert_type(spool.list(Queue.INCOMING), list[multispool.Entry[Job, bytes]])
assert_type(entry.name, str)
assert_type(entry.direct.contents(), Job)
assert_type(entry.direct.data_file(), multispool.DataFile[bytes])
entry.direct.save(Job("https://example.org/2"))

co = spool.checkout(entry)
assert_type(co, multispool.CheckedOutEntry[Job, bytes])
assert_type(co.contents, Job)
assert_type(co.contents.url, str)
assert_type(co.data_file, multispool.DataFile[bytes])
assert_type(co.data_file.load(), bytes)
assert_type(co.data_file.path, str)
co2 = co.update(lambda job: Job(job.url, job.tries + 1))
assert_type(co2, multispool.CheckedOutEntry[Job, bytes])
co2.save(Queue.DONE)
assert_type(spool.checkout_if_found(entry), multispool.CheckedOutEntry[Job, bytes] | None)
assert_type(spool.list_checkouts_unsafe(Queue.INCOMING), list[multispool.CheckedOutEntry[Job, bytes]])

point_spool = multispool.Spool.create("points", points)
point_entry = point_spool.enqueue(Queue.INCOMING, Job("u"), Point(x=1, y=2))
with point_spool.checkout(point_entry) as pco:
    assert_type(pco.data_file.load(), Point)
    assert_type(pco.data_file.load().x, int)

assert_type(multispool.REMOVE, multispool.Remove)
assert_type(multispool.Save(Job("u"), Queue.DONE), multispool.Save[Job])


def handle(job: Job, data: multispool.DataFile[bytes]) -> multispool.Save[Job] | multispool.Remove:
    if data.load():
        return multispool.Save(Job(job.url, job.tries + 1), Queue.DONE)
    return multispool.REMOVE


def measure(job: Job, data: multispool.DataFile[bytes]) -> tuple[multispool.Remove, int]:
    return multispool.REMOVE, len(data.load())


assert_type(spool.with_entry(entry, measure), int)

stop = threading.Event()
with spool.reader(Queue.INCOMING, recover=True) as reader:
    reader.iter(handle, stop=stop)
    reader.iter_available(handle)
    reader.iter(lambda job, data: multispool.REMOVE)
    assert_type(reader.dequeue(stop=stop, timeout=1.0), multispool.CheckedOutEntry[Job, bytes] | None)
    assert_type(reader.dequeue_available(), multispool.CheckedOutEntry[Job, bytes] | None)
    for checked_out in reader:
        assert_type(checked_out, multispool.CheckedOutEntry[Job, bytes])
        assert_type(checked_out.contents.tries, int)
        checked_out.remove()
        break
