"""multispool itself: enqueue by the core API, consume with the event-driven reader
(``spool.reader(...).dequeue``) and, for comparison, by polling the core API."""

from __future__ import annotations

import enum
import threading
from typing import Any, cast

from .common import PollingConsumer, System, WaitVariant, payload


class Q(enum.Enum):
    Q = "q"


_DURABILITY = {"durable": "full", "non-durable": "none"}


def _spoolable(mode: str) -> Any:
    import multispool

    return multispool.Spoolable(
        queues=Q,
        metadata_codec="json",
        data=multispool.BytesData(),
        durability=cast(Any, _DURABILITY.get(mode, mode)),
    )


def _has_reader() -> bool:
    import multispool

    return hasattr(multispool.Spool, "reader")


def create(path: str) -> None:
    import multispool

    multispool.Spool.create(path, _spoolable("full"))


class Producer:
    def __init__(self, path: str, mode: str) -> None:
        import multispool

        self.spool = multispool.Spool.load_unsafe(path, _spoolable(mode))

    def put(self, seq: int) -> None:
        # the sequence number travels in the metadata; the data file holds the payload
        self.spool.enqueue(Q.Q, {"seq": seq}, payload(seq))

    def close(self) -> None:
        pass


class CoreConsumer:
    """Claims with list() + checkout_if_found(), as any reader must (no reader needed)."""

    def __init__(self, path: str, mode: str) -> None:
        import multispool

        self.spool = multispool.Spool.load_unsafe(path, _spoolable(mode))
        self._pending: list[Any] = []

    def get_nowait(self) -> int | None:
        for _ in range(2):
            while self._pending:
                co = self.spool.checkout_if_found(self._pending.pop())
                if co is not None:
                    seq = int(co.contents["seq"])
                    co.remove()
                    return seq
            self._pending = self.spool.list(Q.Q)[::-1]
        return None


class ReaderConsumer:
    def __init__(self, path: str, mode: str, variant: WaitVariant) -> None:
        import multispool

        self.spool = multispool.Spool.load_unsafe(path, _spoolable(mode))
        self.reader = self.spool.reader(Q.Q)
        self._stop = threading.Event() if variant.kind == "native-stop" else None

    def _take(self, co: Any) -> int | None:
        if co is None:
            return None
        seq = int(co.contents["seq"])
        co.remove()
        return seq

    def get_nowait(self) -> int | None:
        return self._take(self.reader.dequeue_available())

    def wait(self, timeout: float) -> int | None:
        return self._take(self.reader.dequeue(stop=self._stop, timeout=timeout))

    def close(self) -> None:
        self.reader.close()


def consumer(path: str, mode: str, variant: WaitVariant) -> Any:
    if variant.kind.startswith("native"):
        return ReaderConsumer(path, mode, variant)
    core = CoreConsumer(path, mode)
    return PollingConsumer(core.get_nowait, variant.interval or 0.01, lambda: None)


def _version() -> str:
    import multispool

    return f"{multispool.__version__} (this checkout)"


def _waits() -> list[WaitVariant]:
    out = [WaitVariant("core API polled every 10 ms", "poll", 0.01, full_only=True)]
    if _has_reader():
        out[:0] = [
            WaitVariant("reader.dequeue (inotify)", "native"),
            WaitVariant("reader.dequeue(stop=Event)", "native-stop"),
        ]
    return out


SYSTEM = System(
    name="multispool",
    title="multispool",
    version=_version,
    create=create,
    producer=Producer,
    consumer=consumer,
    modes={"durable": 'durability="full"', "non-durable": 'durability="none"'},
    waits=_waits(),
    durability=(
        'full: fsyncs the registry dir, tmp file, data file, data dir and queue dir per '
        'enqueue, and the checkout dir per remove (survives power loss); none: no fsync '
        '(survives a process crash, not power loss)'
    ),
)
