"""What every system adapter provides, and small measuring helpers.

An adapter module defines ``SYSTEM``: a ``System`` that creates a queue in a directory,
opens producers and consumers on it, and says which durability modes and wait variants
it has. All payloads carry a sequence number so that consumers can report what they got.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

PAD = b"x" * 100  # every entry carries ~100 bytes of payload besides its sequence number


def payload(seq: int) -> bytes:
    return b"%d:" % seq + PAD


def seq_of(raw: bytes | str) -> int:
    if isinstance(raw, str):
        raw = raw.encode()
    return int(raw.split(b":", 1)[0])


class Producer(Protocol):
    def put(self, seq: int) -> None: ...
    def close(self) -> None: ...


class Consumer(Protocol):
    def get_nowait(self) -> int | None:
        """Claim and remove one entry; its sequence number, or None if none is there."""

    def wait(self, timeout: float) -> int | None:
        """Wait (the variant's way) for one entry, claim and remove it; None on timeout."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class WaitVariant:
    """How a consumer waits: ``kind`` "native" (the system's own blocking wait) or
    "poll" (get_nowait then sleep ``interval``); ``label`` is what reports show."""

    label: str
    kind: str
    interval: float | None = None
    # the system's default polling is so slow that samples are capped by a time budget
    slow: bool = False
    # measured in full mode only (not the system's natural wait, or too slow for --quick)
    full_only: bool = False


@dataclass
class System:
    name: str  # short id used on the command line and in results
    title: str  # what reports show
    version: Callable[[], str]
    create: Callable[[str], None]
    producer: Callable[[str, str], Producer]  # (dir, mode) -> Producer
    consumer: Callable[[str, str, WaitVariant], Consumer]  # (dir, mode, variant)
    modes: dict[str, str]  # mode -> what it does ("durable"/"non-durable" keys)
    waits: list[WaitVariant]
    durability: str  # what it really gives, from reading its source (and strace)
    multiprocess: bool = True  # False: a consumer in another process cannot see puts
    notes: list[str] = field(default_factory=list)


class PollingConsumer:
    """Adds a sleep-and-retry wait to anything with get_nowait."""

    def __init__(self, get_nowait: Callable[[], int | None], interval: float, close: Callable[[], Any]):
        self.get_nowait = get_nowait
        self._interval = interval
        self._close = close

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while True:
            seq = self.get_nowait()
            if seq is not None:
                return seq
            if time.monotonic() >= deadline:
                return None
            time.sleep(self._interval)

    def close(self) -> None:
        self._close()


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # the command name (field 2) may contain spaces: split after its closing parenthesis
    fields = stat[stat.rindex(b")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]
