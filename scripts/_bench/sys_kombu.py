"""kombu's filesystem transport through ``SimpleQueue``: a message is a file written in
place under its final name; a consumer lists the folder and shutil.move()s a file to the
system temp dir, reads it and deletes it (before the message is acked)."""

from __future__ import annotations

from typing import Any

from .common import System, WaitVariant, seq_of


def _version() -> str:
    from importlib.metadata import version

    return version("kombu")


def _open(path: str, polling_interval: float = 1.0) -> tuple[Any, Any]:
    from kombu import Connection

    conn = Connection(
        transport="filesystem",
        transport_options={
            "data_folder_in": path,
            "data_folder_out": path,
            "polling_interval": polling_interval,
        },
    )
    return conn, conn.SimpleQueue("bench")


def create(path: str) -> None:
    conn, q = _open(path)
    q.close()
    conn.release()


class Producer:
    def __init__(self, path: str, mode: str) -> None:
        self.conn, self.q = _open(path)

    def put(self, seq: int) -> None:
        self.q.put(f"{seq}:" + "x" * 100)

    def close(self) -> None:
        self.q.close()
        self.conn.release()


class Consumer:
    def __init__(self, path: str, mode: str, variant: WaitVariant) -> None:
        self.conn, self.q = _open(path, variant.interval or 1.0)

    def _take(self, m: Any) -> int:
        m.ack()
        return seq_of(m.payload)

    def get_nowait(self) -> int | None:
        try:
            return self._take(self.q.get_nowait())
        except self.q.Empty:
            return None

    def wait(self, timeout: float) -> int | None:
        try:
            return self._take(self.q.get(block=True, timeout=timeout))
        except self.q.Empty:
            return None

    def close(self) -> None:
        self.q.close()
        self.conn.release()


SYSTEM = System(
    name="kombu",
    title="kombu filesystem transport",
    version=_version,
    create=create,
    producer=Producer,
    consumer=Consumer,
    modes={"non-durable": "its only mode (no fsync anywhere)"},
    waits=[
        WaitVariant("get(block=True), polling_interval=1 s (default)", "native", 1.0, slow=True),
        WaitVariant("get(block=True), polling_interval=10 ms", "native", 0.01),
    ],
    durability=(
        "no fsync; the message is written in place under its final name (a reader can "
        "see a partial file) and deleted before it is acked"
    ),
)
