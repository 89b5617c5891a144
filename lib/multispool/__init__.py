"""multispool: a crash-safe multi-process queue that lives in a directory.

Producers enqueue entries into named queues; consumers wake on filesystem events, claim
an entry with an atomic rename(2), and move it to another queue or remove it.
Everything here is re-exported from private modules.
"""

from __future__ import annotations

from ._errors import CorruptEntryError as CorruptEntryError
from ._errors import EntryNotFoundError as EntryNotFoundError
from ._errors import InvalidNameError as InvalidNameError
from ._errors import NotASpoolError as NotASpoolError
from ._errors import SpoolError as SpoolError
from ._layout import Dir as Dir
from ._monitor import DeadCheckout as DeadCheckout
from ._monitor import Duplicated as Duplicated
from ._monitor import End as End
from ._monitor import FileWithMtime as FileWithMtime
from ._monitor import Limits as Limits
from ._monitor import Monitor as Monitor
from ._monitor import MonitorDaemon as MonitorDaemon
from ._monitor import Orphaned as Orphaned
from ._monitor import Start as Start
from ._monitor import TooOld as TooOld
from ._reader import QueueReader as QueueReader
from ._schedule import Backoff as Backoff
from ._spool import NOT_FOUND as NOT_FOUND
from ._spool import REMOVE as REMOVE
from ._spool import CheckedOutEntry as CheckedOutEntry
from ._spool import DataFile as DataFile
from ._spool import Entry as Entry
from ._spool import Remove as Remove
from ._spool import Retry as Retry
from ._spool import Save as Save
from ._spool import Spool as Spool
from ._spoolable import BytesData as BytesData
from ._spoolable import FileData as FileData
from ._spoolable import MsgspecData as MsgspecData
from ._spoolable import PrefixNames as PrefixNames
from ._spoolable import Spoolable as Spoolable
from ._spoolable import TimeOrderedNames as TimeOrderedNames

__version__ = "0.1.0"

__all__ = [
    "NOT_FOUND",
    "REMOVE",
    "Backoff",
    "BytesData",
    "CheckedOutEntry",
    "CorruptEntryError",
    "DataFile",
    "DeadCheckout",
    "Dir",
    "Duplicated",
    "End",
    "Entry",
    "EntryNotFoundError",
    "FileData",
    "FileWithMtime",
    "InvalidNameError",
    "Limits",
    "Monitor",
    "MonitorDaemon",
    "MsgspecData",
    "NotASpoolError",
    "Orphaned",
    "PrefixNames",
    "QueueReader",
    "Remove",
    "Retry",
    "Save",
    "Spool",
    "SpoolError",
    "Spoolable",
    "Start",
    "TimeOrderedNames",
    "TooOld",
]


def __getattr__(name: str) -> object:
    # `import multispool` then `multispool.aio` / `multispool.cli`: loaded on first use,
    # so sync users never import asyncio.
    if name in ("aio", "cli"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'multispool' has no attribute {name!r}")
