"""Shared fixtures: every test must leave no thread running and raise no warning
(filterwarnings=error in pyproject). Multi-process helpers live in tests/_procs.py."""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import multispool


class Queue(enum.Enum):
    QUEUE1 = "queue1"
    QUEUE2 = "queue2"
    QUEUE3 = "queue3"


class Cog(msgspec.Struct, tag=True):
    n: int


class Sprocket(msgspec.Struct, tag=True):
    text: str


Widget = Cog | Sprocket


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    """Fail a test that leaves a thread running (observer threads!)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            break
        for t in extra:
            t.join(timeout=0.1)
    assert not extra, f"test leaked threads: {extra}"


@pytest.fixture
def spoolable() -> multispool.Spoolable[Any, bytes]:
    return multispool.Spoolable(
        queues=Queue, metadata=Widget, name_generator=multispool.PrefixNames()
    )


@pytest.fixture
def spool(tmp_path: Path, spoolable: multispool.Spoolable[Any, bytes]) -> multispool.Spool[Any, bytes]:
    return multispool.Spool.create(tmp_path / "spool", spoolable)
