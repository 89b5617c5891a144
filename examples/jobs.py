"""What the example producer and consumers share: the queues and the metadata type.

Every process that opens a spool must describe it the same way, so keep this in one
module that producers and consumers import.
"""

from __future__ import annotations

import enum

import msgspec

import multispool


class Queue(enum.Enum):
    """The spool's queues; member values are the directory names."""

    INCOMING = "incoming"
    DONE = "done"
    FAILED = "failed"


class Job(msgspec.Struct):
    """An entry's metadata: small, decoded and validated on every read."""

    url: str
    number: int


SPOOLABLE = multispool.Spoolable(queues=Queue, metadata=Job, quarantine=Queue.FAILED)
