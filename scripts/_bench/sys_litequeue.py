"""litequeue: a queue table in SQLite (WAL). pop() marks a row LOCKED in an IMMEDIATE
transaction; done() marks it DONE."""

from __future__ import annotations

from typing import Any

from .common import PollingConsumer, System, WaitVariant, payload, seq_of


def _version() -> str:
    from importlib.metadata import version

    return version("litequeue")


def _open(path: str, mode: str) -> Any:
    from litequeue import LiteQueue

    q = LiteQueue(path + "/queue.sqlite3")
    if mode == "durable":
        # litequeue sets synchronous=NORMAL (WAL not fsynced per commit); FULL fsyncs the
        # WAL on every commit, which is what "durable" means here.
        q.conn.execute("PRAGMA synchronous = FULL;")
    return q


def create(path: str) -> None:
    _open(path, "non-durable").close()


class Producer:
    def __init__(self, path: str, mode: str) -> None:
        self.q = _open(path, mode)

    def put(self, seq: int) -> None:
        self.q.put(payload(seq).decode())

    def close(self) -> None:
        self.q.close()


class Consumer:
    def __init__(self, path: str, mode: str) -> None:
        self.q = _open(path, mode)

    def get_nowait(self) -> int | None:
        m = self.q.pop()
        if m is None:
            return None
        self.q.done(m.message_id)
        return seq_of(m.data)


def consumer(path: str, mode: str, variant: WaitVariant) -> Any:
    c = Consumer(path, mode)
    return PollingConsumer(c.get_nowait, variant.interval or 0.01, c.q.close)


SYSTEM = System(
    name="litequeue",
    title="litequeue",
    version=_version,
    create=create,
    producer=Producer,
    consumer=consumer,
    modes={
        "durable": "PRAGMA synchronous=FULL set by the harness",
        "non-durable": "its default: WAL, synchronous=NORMAL",
    },
    waits=[WaitVariant("polled every 10 ms (no wait API)", "poll", 0.01)],
    durability=(
        "default WAL + synchronous=NORMAL: a commit is not fsynced (the WAL is fsynced at "
        "checkpoints), so the last commits can be lost on power loss; with "
        "synchronous=FULL every commit fsyncs the WAL"
    ),
    notes=["done() only marks a row DONE; rows stay in the table until prune()"],
)
