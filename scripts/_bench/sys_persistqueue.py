"""persist-queue: its file ``Queue`` (chunk files + an info file) and ``SQLiteQueue``."""

from __future__ import annotations

from typing import Any

from .common import PollingConsumer, System, WaitVariant, payload, seq_of


def _version() -> str:
    from importlib.metadata import version

    return version("persist-queue")


# -- file Queue ---------------------------------------------------------------------------
def _file_open(path: str) -> Any:
    import persistqueue

    # autosave: a get() is persisted at once (else only at task_done)
    return persistqueue.Queue(path + "/fq", autosave=True)


def file_create(path: str) -> None:
    _file_open(path)


class FileProducer:
    def __init__(self, path: str, mode: str) -> None:
        self.q = _file_open(path)

    def put(self, seq: int) -> None:
        self.q.put(payload(seq))

    def close(self) -> None:
        pass


class FileConsumer:
    def __init__(self, path: str, mode: str) -> None:
        import persistqueue

        self.q = _file_open(path)
        self._empty = persistqueue.Empty

    def get_nowait(self) -> int | None:
        try:
            raw = self.q.get_nowait()
        except self._empty:
            return None
        self.q.task_done()
        return seq_of(raw)


def file_consumer(path: str, mode: str, variant: WaitVariant) -> Any:
    c = FileConsumer(path, mode)
    return PollingConsumer(c.get_nowait, variant.interval or 0.01, lambda: None)


FILE_SYSTEM = System(
    name="pq-file",
    title="persist-queue Queue (file)",
    version=_version,
    create=file_create,
    producer=FileProducer,
    consumer=file_consumer,
    modes={"non-durable": "its only mode (autosave=True)"},
    waits=[WaitVariant("get_nowait polled every 10 ms", "poll", 0.01)],
    durability=(
        "no fsync per put (only when a chunk file fills up); the info file is rewritten "
        "by mkstemp + rename without fsync: survives a process crash, not power loss"
    ),
    multiprocess=False,
    notes=[
        "single-process by design: the head/tail state is read once when the Queue is "
        "opened, so a consumer in another process never sees later puts, and two "
        "processes consuming one queue each read every item"
    ],
)


# -- SQLiteQueue --------------------------------------------------------------------------
def _sql_open(path: str) -> Any:
    import persistqueue

    return persistqueue.SQLiteQueue(path + "/sq", auto_commit=True)


def sql_create(path: str) -> None:
    _sql_open(path)


class SqlProducer:
    def __init__(self, path: str, mode: str) -> None:
        self.q = _sql_open(path)

    def put(self, seq: int) -> None:
        self.q.put(payload(seq))

    def close(self) -> None:
        pass


class SqlConsumer:
    def __init__(self, path: str, mode: str, variant: WaitVariant) -> None:
        import persistqueue

        self.q = _sql_open(path)
        self._empty = persistqueue.Empty

    def get_nowait(self) -> int | None:
        try:
            raw = self.q.get(block=False)
        except self._empty:
            return None
        return seq_of(raw)

    def wait(self, timeout: float) -> int | None:
        try:
            raw = self.q.get(block=True, timeout=timeout)
        except self._empty:
            return None
        return seq_of(raw)

    def close(self) -> None:
        pass


def sql_consumer(path: str, mode: str, variant: WaitVariant) -> Any:
    c = SqlConsumer(path, mode, variant)
    if variant.kind == "native":
        return c
    return PollingConsumer(c.get_nowait, variant.interval or 0.01, lambda: None)


def _sql_sync() -> str:
    import sqlite3

    c = sqlite3.connect(":memory:")
    v = c.execute("PRAGMA synchronous").fetchone()[0]
    c.close()
    return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(v, str(v))


SQL_SYSTEM = System(
    name="pq-sqlite",
    title="persist-queue SQLiteQueue",
    version=_version,
    create=sql_create,
    producer=SqlProducer,
    consumer=sql_consumer,
    modes={"durable": "its only mode (auto_commit=True, WAL, SQLite's default synchronous)"},
    waits=[
        WaitVariant("blocking get (re-checks every 10 s across processes)", "native", 10.0,
                    slow=True, full_only=True),
        WaitVariant("get_nowait polled every 10 ms", "poll", 0.01),
    ],
    durability=(
        f"WAL with SQLite's default synchronous={_sql_sync()} (not changed by persist-queue): "
        "every commit fsyncs the WAL"
    ),
    notes=[
        "get() is a SELECT then a separate DELETE: two processes can both take one row",
        "a blocking get waits on an in-process Event; another process's put is seen only "
        "at the next 10 s tick (TICK_FOR_WAIT)",
    ],
)
