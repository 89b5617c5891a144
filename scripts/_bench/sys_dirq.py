"""python-dirq (``dirq.QueueSimple``): a directory queue; claim = link(2) to NAME.lck."""

from __future__ import annotations

from typing import Any

from .common import PollingConsumer, System, WaitVariant, payload, seq_of


def _version() -> str:
    from importlib.metadata import version

    return version("dirq")


def create(path: str) -> None:
    from dirq.QueueSimple import QueueSimple

    QueueSimple(path)


class Producer:
    def __init__(self, path: str, mode: str) -> None:
        from dirq.QueueSimple import QueueSimple

        self.q = QueueSimple(path)

    def put(self, seq: int) -> None:
        self.q.add(payload(seq))

    def close(self) -> None:
        pass


class Consumer:
    def __init__(self, path: str, mode: str) -> None:
        from dirq.QueueSimple import QueueSimple

        self.q = QueueSimple(path)

    def get_nowait(self) -> int | None:
        # iterating a QueueSimple lists its directories afresh
        for name in self.q:
            if self.q.lock(name):
                raw = self.q.get(name)
                self.q.remove(name)
                return seq_of(raw)
        return None


def consumer(path: str, mode: str, variant: WaitVariant) -> Any:
    c = Consumer(path, mode)
    return PollingConsumer(c.get_nowait, variant.interval or 0.01, lambda: None)


SYSTEM = System(
    name="dirq",
    title="python-dirq QueueSimple",
    version=_version,
    create=create,
    producer=Producer,
    consumer=consumer,
    modes={"non-durable": "its only mode (no fsync anywhere)"},
    waits=[WaitVariant("polled every 10 ms (no wait API)", "poll", 0.01)],
    durability=(
        "no fsync of files or directories anywhere (write, link(2), unlink): survives a "
        "process crash, not power loss"
    ),
)
