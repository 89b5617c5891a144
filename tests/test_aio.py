"""multispool.aio: the API as coroutines over the sync core (API.md §10).

Every test runs its own ``asyncio.run`` through ``run()``, which also fails the test if
a task outlives the test's coroutine; the autouse fixture checks threads.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import pytest

import multispool
from _procs import Worker
from conftest import Cog, Queue, Sprocket, Widget
from multispool import _fs, _watch
from multispool.aio import AsyncCheckedOutEntry, AsyncDataFile, AsyncEntry, AsyncQueueReader, AsyncSpool

SLOW = os.environ.get("MULTISPOOL_SLOW") == "1"
NO_RESCAN = 60.0  # rescan_interval for tests that must be woken by events, not re-listing


def run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """asyncio.run(main()), failing if any other task is still alive when main returns."""

    async def wrapper() -> Any:
        result = await main()
        others = asyncio.all_tasks() - {asyncio.current_task()}
        assert not others, f"tasks left running: {others}"
        return result

    return asyncio.run(wrapper())


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait (yielding to the loop) until ``cond()`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"condition not met within {timeout}s"
        await asyncio.sleep(0.001)


class Gate:
    """A throttle that records the thread of every disk operation and, when armed with
    ``block_at=k``, holds the k-th operation after arming until ``open()``."""

    def __init__(self) -> None:
        self.threads: set[int] = set()
        self._lock = threading.Lock()
        self._count = 0
        self._block_at: int | None = None
        self.entered = threading.Event()
        self._go = threading.Event()

    def arm(self, block_at: int) -> None:
        with self._lock:
            self._count = 0
            self._block_at = block_at
            self.entered.clear()
            self._go.clear()

    def open(self) -> None:
        with self._lock:
            self._block_at = None
        self._go.set()

    def __enter__(self) -> None:
        self.threads.add(threading.get_ident())
        with self._lock:
            self._count += 1
            block = self._count == self._block_at
        if block:
            self.entered.set()
            assert self._go.wait(30), "gate never opened"

    def __exit__(self, *exc: object) -> None:
        pass


def make_spoolable(throttle: Any = None, durability: str = "full") -> multispool.Spoolable[Any, bytes]:
    return multispool.Spoolable(
        queues=Queue,
        metadata=Widget,
        name_generator=multispool.PrefixNames(),
        throttle=throttle,
        durability=durability,  # type: ignore[arg-type]
    )


def check_settled(path: Path, spoolable: multispool.Spoolable[Any, bytes]) -> dict[str, set[str]]:
    """Assert nothing is checked out, no .tmp file is left, no registry lock is held, and
    every reserved name is in exactly one queue; return {queue dir: names}."""
    spool = multispool.Spool.load(path, spoolable)
    lay = spool._layout
    where: dict[str, set[str]] = {}
    for q in Queue:
        d = q.value
        assert os.listdir(lay.checkout(d)) == [], f"stranded in {d}/.checkout"
        where[d] = {n for n in os.listdir(lay.queue(d)) if not n.startswith(".")}
    assert os.listdir(lay.tmp) == []
    regs = set(os.listdir(lay.registry))
    queued = [n for names in where.values() for n in names]
    assert sorted(queued) == sorted(regs), (queued, regs)
    for name in regs:
        fd = _fs.open_locked(lay.registry_file(name))
        assert fd is not None, f"registry lock of {name} still held"
        os.close(fd)
    return where


# -- the API --------------------------------------------------------------------------------


def test_spool_operations_round_trip(tmp_path: Path) -> None:
    sp = make_spoolable()
    path = tmp_path / "spool"

    async def main() -> None:
        with pytest.raises(multispool.NotASpoolError):
            await AsyncSpool.load(path, sp)
        spool = await AsyncSpool.create(path, sp)
        async with spool:
            assert spool.dir == str(path) and spool.spoolable is sp
            assert isinstance(spool.sync, multispool.Spool)
            again = await AsyncSpool.load(path, sp)
            await again.aclose()
            unsafe = AsyncSpool.load_unsafe(path, sp)
            assert (await unsafe) is unsafe  # API.md writes `await AsyncSpool.load_unsafe(...)`
            await unsafe.aclose()

            e1 = await spool.enqueue(Queue.QUEUE1, Cog(1), b"one")
            name = await spool.reserve_name()
            e2 = await spool.enqueue(Queue.QUEUE1, Sprocket("two"), b"two", use=name)
            assert isinstance(e1, AsyncEntry) and e2.name == name
            assert await spool.list(Queue.QUEUE1) == [e1, e2]
            assert (await e1.stat()).st_size == 0
            assert await e1.direct.contents() == Cog(1)
            await e1.direct.save(Cog(11))
            assert await e1.direct.data_file().load() == b"one"

            co = await spool.checkout(e1)
            assert isinstance(co, AsyncCheckedOutEntry)
            assert (co.name, co.queue, co.contents) == (e1.name, Queue.QUEUE1, Cog(11))
            assert await spool.checkout_if_found(e1) is None
            with pytest.raises(multispool.EntryNotFoundError):
                await spool.checkout(e1)
            [unsafe_co] = await spool.list_checkouts_unsafe(Queue.QUEUE1)
            assert unsafe_co.name == e1.name
            df = co.data_file
            assert isinstance(df, AsyncDataFile) and df.path.endswith(e1.name)
            await df.save(b"ONE")
            assert await df.load() == b"ONE" and (await df.stat()).st_size == 3
            co2 = co.update(lambda c: Cog(c.n + 1))
            await co2.save(Queue.QUEUE2)
            assert co.done and [e.name for e in await spool.list(Queue.QUEUE2)] == [e1.name]

            # async with: back unchanged when left without save/remove, also on error.
            co = await spool.checkout(e2)
            async with co as same:
                assert same is co
            assert not os.path.exists(co.path) and await spool.list(Queue.QUEUE1) == [e2]
            with pytest.raises(KeyError):
                async with await spool.checkout(e2):
                    raise KeyError("boom")
            assert await spool.list(Queue.QUEUE1) == [e2]

            # with_entry: sync callbacks (run in the executor) and async ones.
            def sync_f(meta: Any, data_file: multispool.DataFile[bytes]) -> Any:
                assert isinstance(data_file, multispool.DataFile)
                return multispool.Save(Sprocket(meta.text + "!"), Queue.QUEUE3), data_file.load()

            assert await spool.with_entry(e2, sync_f) == b"two"
            e3 = AsyncEntry.create(spool, Queue.QUEUE3, e2.name)

            async def async_f(meta: Any, data_file: AsyncDataFile[bytes]) -> Any:
                return multispool.REMOVE, (meta, await data_file.load())

            assert await spool.with_entry_if_found(e3, async_f) == (Sprocket("two!"), b"two")
            assert await spool.with_entry_if_found(e3, async_f) is multispool.NOT_FOUND
            with pytest.raises(multispool.EntryNotFoundError):
                await spool.with_entry(e3, sync_f)

            async def failing(meta: Any, data_file: Any) -> Any:
                raise ValueError("no")

            e4 = AsyncEntry.create(spool, Queue.QUEUE2, e1.name)
            with pytest.raises(ValueError):
                await spool.with_entry(e4, failing)
            assert await spool.list(Queue.QUEUE2) == [e4]

            co = await spool.checkout(e4)
            await co.remove()
            assert await spool.recover_checkouts() == []
            assert await spool.clean_abandoned(older_than=0) == []
        assert spool.closed
        with pytest.raises(RuntimeError, match="closed"):
            await spool.list(Queue.QUEUE1)

    run(main)
    assert check_settled(path, sp) == {"queue1": set(), "queue2": set(), "queue3": set()}


def test_reader_wakes_on_events_and_delivers_in_order(tmp_path: Path) -> None:
    sp = make_spoolable(durability="none")

    async def main() -> None:
        async with await AsyncSpool.create(tmp_path / "s", sp) as spool:
            for i in range(3):
                await spool.enqueue(Queue.QUEUE1, Cog(i), b"")
            async with spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
                assert isinstance(reader, AsyncQueueReader)
                got = []
                for _ in range(3):
                    co = await reader.dequeue()
                    assert co is not None
                    got.append(co.contents.n)
                    await co.remove()
                assert got == [0, 1, 2]
                assert await reader.dequeue_available() is None
                # Nothing there: dequeue parks on the wake; an enqueue must wake it long
                # before the 60 s re-list.
                task = asyncio.ensure_future(reader.dequeue(timeout=20))
                await until(lambda: reader._waiting)
                t0 = time.monotonic()
                await spool.enqueue(Queue.QUEUE1, Cog(7), b"")
                co = await task
                assert co is not None and co.contents == Cog(7)
                assert time.monotonic() - t0 < 5
                await co.release()

    run(main)


def test_stop_timeout_and_close_end_waits_promptly(tmp_path: Path) -> None:
    sp = make_spoolable()

    async def main() -> None:
        async with await AsyncSpool.create(tmp_path / "s", sp) as spool:
            async with spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
                t0 = time.monotonic()
                assert await reader.dequeue(timeout=0.05) is None
                assert 0.05 <= time.monotonic() - t0 < 5

                stop = asyncio.Event()
                task = asyncio.ensure_future(reader.dequeue(stop=stop))
                await until(lambda: reader._waiting)
                t0 = time.monotonic()
                stop.set()
                assert await task is None
                assert time.monotonic() - t0 < 1
                assert await reader.dequeue(stop=stop) is None  # already set: no wait

                seen = []

                async def consume() -> None:
                    async for co in reader:
                        seen.append(co)

                task = asyncio.ensure_future(consume())
                await until(lambda: reader._waiting)
                await reader.close()
                await asyncio.wait_for(task, 5)
                assert seen == [] and reader.closed
                assert await reader.dequeue() is None

            # A reader left open is closed with its spool.
            r2 = spool.reader(Queue.QUEUE2)
            assert await r2.dequeue_available() is None and r2.observer in ("native", "polling")
        assert r2.closed

    run(main)


def test_dequeue_refuses_a_nan_timeout(tmp_path: Path) -> None:
    # A NaN deadline is never reached: the dequeue would spin the loop forever.
    async def main() -> None:
        async with await AsyncSpool.create(tmp_path / "s", make_spoolable()) as spool:
            reader = spool.reader(Queue.QUEUE1)
            async with reader:
                with pytest.raises(ValueError, match="timeout"):
                    await asyncio.wait_for(reader.dequeue(timeout=float("nan")), 5)

    run(main)


def test_iter_with_sync_and_async_callbacks(tmp_path: Path) -> None:
    sp = make_spoolable(durability="none")
    path = tmp_path / "s"

    async def main() -> None:
        async with await AsyncSpool.create(path, sp) as spool:
            for i in range(4):
                await spool.enqueue(Queue.QUEUE1, Cog(i), str(i).encode())
            loop_thread = threading.get_ident()
            where: list[str] = []

            def sync_f(meta: Any, data_file: multispool.DataFile[bytes]) -> Any:
                where.append("loop" if threading.get_ident() == loop_thread else "executor")
                assert data_file.load() == str(meta.n).encode()
                return multispool.Save(Cog(meta.n * 10), Queue.QUEUE2)

            async def async_f(meta: Any, data_file: AsyncDataFile[bytes]) -> Any:
                where.append("loop" if threading.get_ident() == loop_thread else "executor")
                if meta.n == 30:
                    return multispool.REMOVE
                return multispool.Save(meta, Queue.QUEUE3)

            async with spool.reader(Queue.QUEUE1) as r1:
                await r1.iter_available(sync_f)
            assert where == ["executor"] * 4
            assert [e.name for e in await spool.list(Queue.QUEUE2)] == [f"None{i:06d}" for i in range(4)]

            stop = asyncio.Event()
            async with spool.reader(Queue.QUEUE2, rescan_interval=NO_RESCAN) as r2:
                task = asyncio.ensure_future(r2.iter(async_f, stop=stop))
                await until(lambda: len(where) == 8 and r2._waiting)
                stop.set()
                await asyncio.wait_for(task, 5)
            assert where[4:] == ["loop"] * 4
            names3 = [e.name for e in await spool.list(Queue.QUEUE3)]
            assert names3 == ["None000000", "None000001", "None000002"]

            # iter with a sync callback waits for events too, and stops on `stop`.
            stop = asyncio.Event()
            async with spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as r1:
                task = asyncio.ensure_future(r1.iter(sync_f, stop=stop))
                await until(lambda: r1._waiting)
                await spool.enqueue(Queue.QUEUE1, Cog(5), b"5", reserve="late")
                await until(lambda: len(where) == 9 and r1._waiting)
                stop.set()
                await asyncio.wait_for(task, 5)
            assert where[8] == "executor"
            late = AsyncEntry.create(spool, Queue.QUEUE2, "late000000")
            assert await late.direct.contents() == Cog(50)
            await late.direct.remove()

            # A callback that raises: the entry goes back unchanged, the error propagates.
            async def bad(meta: Any, data_file: Any) -> Any:
                raise ZeroDivisionError

            async with spool.reader(Queue.QUEUE3) as r3:
                with pytest.raises(ZeroDivisionError):
                    await r3.iter(bad)
                with pytest.raises(ZeroDivisionError):
                    await r3.iter_available(lambda m, d: 1 / 0)
                with pytest.raises(TypeError):
                    await r3.iter_available(lambda m, d: "not an action")
            assert [e.name for e in await spool.list(Queue.QUEUE3)] == names3

    run(main)
    check_settled(path, sp)


# -- the loop stays free -------------------------------------------------------------------


def _fill(spool: multispool.Spool[Any, bytes], queue: Queue, n: int) -> None:
    """``n`` entries written straight in the on-disk format (registry, data, queue file):
    what ``enqueue`` leaves, made fast enough for a default test."""
    lay = spool._layout
    raw = msgspec.json.encode(Cog(0))
    for i in range(n):
        name = f"e{i:06d}"
        for path, body in (
            (lay.registry_file(name), b""),
            (lay.data_file(name), b""),
            (lay.queue_file(queue.value, name), raw),
        ):
            with open(path, "wb") as f:
                f.write(body)


def test_loop_stays_responsive_while_draining(tmp_path: Path) -> None:
    """A 1 ms heartbeat task stays on time while the reader drains the queue: 10,000
    entries with MULTISPOOL_SLOW=1, 3,000 by default (~1 s of sync draining)."""
    gate = Gate()
    sp = make_spoolable(throttle=gate, durability="none")
    path = tmp_path / "s"
    n = 10_000 if SLOW else 3_000
    _fill(multispool.Spool.create(path, sp), Queue.QUEUE1, n)
    gate.threads.clear()

    async def main() -> tuple[list[float], list[float], int]:
        loop_thread = threading.get_ident()
        done = asyncio.Event()
        wall: list[float] = []  # how late each 1 ms heartbeat was
        cpu: list[float] = []  # CPU time the loop thread itself spent in that interval

        async def heartbeat() -> None:
            while not done.is_set():
                t, c = time.perf_counter(), time.thread_time()
                await asyncio.sleep(0.001)
                wall.append(time.perf_counter() - t - 0.001)
                cpu.append(time.thread_time() - c)

        hb = asyncio.ensure_future(heartbeat())
        count = 0
        spool = await AsyncSpool.create(path, sp)
        async with spool, spool.reader(Queue.QUEUE1) as reader:
            while (co := await reader.dequeue_available()) is not None:
                await co.remove()
                count += 1
        done.set()
        await hb
        assert loop_thread not in gate.threads, "a disk operation ran on the event loop"
        return wall, cpu, count

    # A full collection walks pytest's whole heap (~20 ms) on whichever thread triggers
    # it: the interpreter's pause, not the library's. Freeze what exists before the run.
    gc.collect()
    gc.freeze()
    try:
        wall, cpu, count = run(main)
    finally:
        gc.unfreeze()
    assert count == n and len(wall) > 100
    wall.sort()
    p99 = wall[int(0.99 * (len(wall) - 1))]
    report = f"heartbeat lag p99 {p99 * 1e3:.1f} ms, max {wall[-1] * 1e3:.1f} ms; "
    report += f"loop CPU max {max(cpu) * 1e3:.1f} ms"
    # The loop thread never computes for 10 ms between two heartbeats (a disk operation
    # run on it, such as listing the 10,000 names, would). Its wall-clock lateness also
    # counts time the OS gave other processes (a loaded 2-core CI box: 100 ms outliers),
    # so that is asserted at the 99th percentile; executor threads hold the GIL only
    # between system calls and hand it over within sys.getswitchinterval() (5 ms).
    assert max(cpu) < 0.010, report
    assert p99 < 0.010, report


# -- cancellation ---------------------------------------------------------------------------


async def _cancel_when_gated(task: asyncio.Future[Any], gate: Gate) -> None:
    """Cancel ``task`` while the gate holds its disk operation, then let that finish."""
    await until(gate.entered.is_set)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.open()


@pytest.mark.parametrize("block_at", [1, 2], ids=["while-listing", "while-claiming"])
def test_cancel_dequeue_in_executor_gives_entry_back(tmp_path: Path, block_at: int) -> None:
    gate = Gate()
    sp = make_spoolable(throttle=gate)
    path = tmp_path / "s"

    async def main() -> None:
        async with await AsyncSpool.create(path, sp) as spool:
            await spool.enqueue(Queue.QUEUE1, Cog(1), b"")
            async with spool.reader(Queue.QUEUE1) as reader:
                gate.arm(block_at)  # the listing is operation 1, the claim operation 2
                task = asyncio.ensure_future(reader.dequeue())
                await _cancel_when_gated(task, gate)
                # The claim went ahead in the executor for nobody: it is given back, and
                # the next dequeue gets it.
                co = await reader.dequeue(timeout=10)
                assert co is not None and co.contents == Cog(1)
                await co.release()

    run(main)
    assert check_settled(path, sp)["queue1"] == {"None000000"}


def test_cancel_after_claim_finished_but_before_task_resumed(tmp_path: Path) -> None:
    sp = make_spoolable()
    path = tmp_path / "s"

    async def main() -> None:
        async with await AsyncSpool.create(path, sp) as spool:
            e = await spool.enqueue(Queue.QUEUE1, Cog(1), b"")
            task = asyncio.ensure_future(spool.checkout(e))
            await asyncio.sleep(0)  # the task submits the claim and parks on its result
            assert not task.done()
            # Hold the loop (on purpose) until the executor finished the claim: its result
            # is then queued for the task, which we cancel before it can run.
            deadline = time.monotonic() + 10
            while spool._inflight:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            checkout_dir = spool.sync._layout.checkout("queue1")
            assert os.listdir(checkout_dir) == [e.name]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main)
    assert check_settled(path, sp)["queue1"] == {"None000000"}


def test_cancel_while_waiting_claims_nothing(tmp_path: Path) -> None:
    sp = make_spoolable()
    path = tmp_path / "s"

    async def main() -> None:
        spool = await AsyncSpool.create(path, sp)
        async with spool, spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
            task = asyncio.ensure_future(reader.dequeue(stop=asyncio.Event()))
            await until(lambda: reader._waiting)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await spool.enqueue(Queue.QUEUE1, Cog(1), b"")
            co = await reader.dequeue(timeout=10)
            assert co is not None
            await co.release()

    run(main)
    assert check_settled(path, sp)["queue1"] == {"None000000"}


@pytest.mark.parametrize(
    ("listing", "block_at"),
    [(False, 1), (True, 1), (True, 2)],
    ids=["while-claiming", "while-listing", "while-claiming-after-listing"],
)
def test_cancel_parked_dequeue_while_its_wake_claim_runs(
    tmp_path: Path, listing: bool, block_at: int
) -> None:
    """A parked dequeue has the observer thread submit its claim straight to the executor;
    cancelling the dequeue while that claim runs gives the entry back. The wake's claim
    takes the name the event carries (no listing) unless the core must list first."""
    gate = Gate()
    sp = make_spoolable(throttle=gate)
    path = tmp_path / "s"

    async def main() -> None:
        spool = await AsyncSpool.create(path, sp)
        producer = multispool.Spool.load(path, make_spoolable())  # not gated
        async with spool, spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
            task = asyncio.ensure_future(reader.dequeue())
            await until(lambda: reader._waiting)
            assert reader._core is not None
            reader._core._must_list = listing  # as after an event naming nothing
            gate.arm(block_at)
            producer.enqueue(Queue.QUEUE1, Cog(1), b"")
            await until(gate.entered.is_set)
            assert reader._prefetches == 1  # the claim came from the observer thread
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gate.open()
            co = await reader.dequeue(timeout=10)
            assert co is not None and co.contents == Cog(1)
            await co.release()

    run(main)
    assert check_settled(path, sp)["queue1"] == {"None000000"}


def test_parked_dequeue_wake_claim_needs_no_executor_thread(tmp_path: Path) -> None:
    """The observer thread hands a parked dequeue's claim to the reader's own claimer
    thread: it completes while every executor thread is busy with something else."""
    sp = make_spoolable()
    path = tmp_path / "s"
    release = threading.Event()

    async def main() -> None:
        spool = await AsyncSpool.create(path, sp, max_workers=1)
        producer = multispool.Spool.load(path, sp)
        async with spool, spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
            try:
                task = asyncio.ensure_future(reader.dequeue(timeout=10))
                await until(lambda: reader._waiting)
                busy = spool._submit(release.wait, 30)  # the only executor thread
                producer.enqueue(Queue.QUEUE1, Cog(1), b"")
                co = await asyncio.wait_for(task, 10)
                assert co is not None and co.contents == Cog(1)
                assert not busy.done() and reader._prefetches == 1
            finally:
                release.set()
            await co.release()

    run(main)
    assert check_settled(path, sp)["queue1"] == {"None000000"}


def test_wake_from_a_handle_resumes_parked_dequeue_in_the_same_loop_pass(tmp_path: Path) -> None:
    """The hand-off from the observer/claimer threads is a loop handle; the parked dequeue
    resumes inside it, not one selector pass later (wake latency)."""
    sp = make_spoolable()

    async def main() -> None:
        spool = await AsyncSpool.create(tmp_path / "s", sp)
        async with spool, spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
            task = asyncio.ensure_future(reader.dequeue(timeout=10))
            await until(lambda: reader._waiting)
            seen: list[bool] = []

            def poke() -> None:
                assert reader._wake is not None
                reader._wake.set()
                seen.append(reader._waiting)  # already resumed: no longer parked

            asyncio.get_running_loop().call_soon(poke)
            await until(lambda: bool(seen))
            assert seen == [False]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main)


def test_cancel_checkout_in_executor(tmp_path: Path) -> None:
    gate = Gate()
    sp = make_spoolable(throttle=gate)
    path = tmp_path / "s"

    async def main() -> None:
        async with await AsyncSpool.create(path, sp) as spool:
            e = await spool.enqueue(Queue.QUEUE1, Cog(1), b"")
            gate.arm(1)
            await _cancel_when_gated(asyncio.ensure_future(spool.checkout(e)), gate)

    run(main)
    assert check_settled(path, sp)["queue1"] == {"None000000"}


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_cancel_inside_iter_callback(tmp_path: Path, kind: str) -> None:
    sp = make_spoolable()
    path = tmp_path / "s"
    in_sync_f = threading.Event()
    finish_sync_f = threading.Event()

    async def main() -> None:
        async with await AsyncSpool.create(path, sp) as spool:
            await spool.enqueue(Queue.QUEUE1, Cog(1), b"")
            started = asyncio.Event()

            async def async_f(meta: Any, data_file: Any) -> Any:
                started.set()
                await asyncio.Event().wait()  # until cancelled

            def sync_f(meta: Any, data_file: Any) -> Any:
                in_sync_f.set()
                assert finish_sync_f.wait(30)
                return multispool.Save(meta, Queue.QUEUE2)

            async with spool.reader(Queue.QUEUE1) as reader:
                task = asyncio.ensure_future(reader.iter(async_f if kind == "async" else sync_f))
                await until(started.is_set if kind == "async" else in_sync_f.is_set)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                finish_sync_f.set()

    run(main)
    # A cancelled async callback gives the entry back; a sync one, already running in the
    # executor, completes and its action is applied.
    where = check_settled(path, sp)
    assert where["queue1" if kind == "async" else "queue2"] == {"None000000"}


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("returned", ["action-only", "three-tuple", "none"])
def test_with_entry_callback_not_returning_a_pair_gives_entry_back(
    tmp_path: Path, kind: str, returned: str
) -> None:
    """As the sync ``with_entry``: a callback whose return value is not an
    ``(action, result)`` pair raises, and the entry goes back unchanged."""
    sp = make_spoolable()
    path = tmp_path / "s"
    value: Any = {"action-only": multispool.REMOVE, "three-tuple": (multispool.REMOVE, 1, 2), "none": None}
    value = value[returned]

    async def main() -> None:
        async with await AsyncSpool.create(path, sp) as spool:
            e = await spool.enqueue(Queue.QUEUE1, Cog(1), b"")

            def sync_f(meta: Any, data_file: Any) -> Any:
                return value

            async def async_f(meta: Any, data_file: Any) -> Any:
                return value

            with pytest.raises((TypeError, ValueError)):
                await spool.with_entry(e, sync_f if kind == "sync" else async_f)
            with pytest.raises((TypeError, ValueError)):
                await spool.with_entry_if_found(e, sync_f if kind == "sync" else async_f)

    run(main)
    assert check_settled(path, sp)["queue1"] == {"None000000"}


@pytest.mark.parametrize("dead_letter", [None, Queue.QUEUE3], ids=["exhausted-no-dead-letter", "dead-letter"])
def test_cancel_while_on_error_policy_runs_never_strands_the_entry(tmp_path: Path, dead_letter: Any) -> None:
    """An async callback raises; the task is cancelled while the Backoff policy's step
    runs in the executor. Whatever the policy decides (dead-letter it, or leave it to the
    caller because attempts ran out with no dead-letter queue), the entry must end up in
    a queue, never left checked out by this live process."""
    sp = make_spoolable()
    path = tmp_path / "s"

    async def main() -> None:
        async with await AsyncSpool.create(path, sp) as spool:
            await spool.enqueue(Queue.QUEUE1, Cog(1), b"")
            policy = multispool.Backoff(max_attempts=1, dead_letter=dead_letter)
            tasks: list[asyncio.Future[Any]] = []

            async def f(meta: Any, data_file: Any) -> Any:
                # Cancelled at the task's next await: the policy step in the executor.
                asyncio.get_running_loop().call_soon(tasks[0].cancel)
                raise RuntimeError("boom")

            async with spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:
                tasks.append(asyncio.ensure_future(reader.iter(f, on_error=policy)))
                with pytest.raises(asyncio.CancelledError):
                    await tasks[0]

    run(main)
    where = check_settled(path, sp)
    assert where["queue1" if dead_letter is None else "queue3"] == {"None000000"}


@pytest.mark.parametrize("op", ["save", "remove", "release", "enqueue"])
def test_cancelled_save_remove_release_enqueue_complete(tmp_path: Path, op: str) -> None:
    gate = Gate()
    sp = make_spoolable(throttle=gate)
    path = tmp_path / "s"

    async def main() -> None:
        async with await AsyncSpool.create(path, sp) as spool:
            e = await spool.enqueue(Queue.QUEUE1, Cog(1), b"")
            co = await spool.checkout(e)
            coro: Coroutine[Any, Any, Any]
            if op == "save":
                coro = co.save(Queue.QUEUE2)
            elif op == "remove":
                coro = co.remove()
            elif op == "release":
                coro = co.release()
            else:
                await co.release()
                coro = spool.enqueue(Queue.QUEUE3, Cog(2), b"")
            gate.arm(1)
            await _cancel_when_gated(asyncio.ensure_future(coro), gate)
        # aclose waited for the operation the cancelled task left running.

    run(main)
    where = check_settled(path, sp)
    expected = {
        "save": {"queue2": {"None000000"}},
        "remove": {},
        "release": {"queue1": {"None000000"}},
        "enqueue": {"queue1": {"None000000"}, "queue3": {"None000001"}},
    }[op]
    assert {q: names for q, names in where.items() if names} == expected


@pytest.mark.parametrize("when", ["while reserving", "once reserved"])
def test_cancelled_reserve_name_leaves_no_reservation(tmp_path: Path, when: str) -> None:
    """A reserve_name whose task is cancelled once it started in the executor goes on
    there, for nobody: the name it reserved, held locked by this process until an
    enqueue(use=) that can never come, stayed in .registry with an open descriptor for
    the life of the process (every timed-out reserve_name one more; clean_abandoned
    cannot remove a live process's reservation). It is given up instead."""
    gate = Gate()
    sp = make_spoolable(throttle=gate)
    path = tmp_path / "s"

    async def main() -> None:
        async with await AsyncSpool.create(path, sp, max_workers=1) as spool:
            held = set(_fs._held)
            if when == "while reserving":
                gate.arm(1)
                await _cancel_when_gated(asyncio.ensure_future(spool.reserve_name("r")), gate)
            else:
                # The reservation is made, its result on its way to the loop: the task
                # is cancelled before it resumes (the loop is held up meanwhile).
                task = asyncio.ensure_future(spool.reserve_name("r"))
                await asyncio.sleep(0)  # submitted
                deadline = time.monotonic() + 10
                while not os.listdir(path / ".registry"):
                    assert time.monotonic() < deadline
                    time.sleep(0.001)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            # One executor thread: this runs once the cancelled call (and the undoing of
            # its reservation) is over. The name is free again: it takes it.
            assert await spool.reserve_name("r") == "r000000"
            assert os.listdir(path / ".registry") == ["r000000"]
            assert len(_fs._held - held) == 1  # this reservation's lock, no other

    run(main)


def test_save_cancelled_while_queued_behind_other_work_still_happens(tmp_path: Path) -> None:
    gate = Gate()
    sp = make_spoolable(throttle=gate)
    path = tmp_path / "s"

    async def main() -> None:
        spool = await AsyncSpool.create(path, sp, max_workers=1)
        async with spool:
            e = await spool.enqueue(Queue.QUEUE1, Cog(1), b"")
            co = await spool.checkout(e)
            gate.arm(1)
            busy = asyncio.ensure_future(spool.list(Queue.QUEUE2))  # holds the only thread
            await until(gate.entered.is_set)
            save = asyncio.ensure_future(co.save(Queue.QUEUE2))
            await asyncio.sleep(0)  # submitted, queued behind the held listing
            save.cancel()
            with pytest.raises(asyncio.CancelledError):
                await save
            gate.open()
            assert await busy == []

    run(main)
    assert check_settled(path, sp)["queue2"] == {"None000000"}


# -- another process ------------------------------------------------------------------------

PRODUCER = """
import sys, enum
import multispool
from conftest import Cog, Queue, Widget
from _procs import serve

spool = multispool.Spool.load(sys.argv[1], multispool.Spoolable(queues=Queue, metadata=Widget))

def handle(line):
    n = int(line)
    return ",".join(spool.enqueue(Queue.QUEUE1, Cog(1000 + i), b"ext").name for i in range(n))

serve(handle)
"""


def test_round_trip_with_sync_producer_in_another_process(tmp_path: Path) -> None:
    sp = multispool.Spoolable(queues=Queue, metadata=Widget)
    path = tmp_path / "s"
    multispool.Spool.create(path, sp)
    worker = Worker(PRODUCER, str(path))
    try:
        assert worker.recv() == "ready"

        async def main() -> tuple[list[str], set[str], set[str]]:
            got: list[str] = []
            spool = await AsyncSpool.load(path, sp)
            async with spool, spool.reader(Queue.QUEUE1, rescan_interval=NO_RESCAN) as reader:

                async def produce() -> set[str]:
                    return {(await spool.enqueue(Queue.QUEUE1, Cog(i), b"in")).name for i in range(20)}

                async def consume(stop: asyncio.Event) -> None:
                    async def f(meta: Any, data_file: AsyncDataFile[bytes]) -> Any:
                        got.append(data_file.path.rsplit("/", 1)[1])
                        return multispool.REMOVE

                    await reader.iter(f, stop=stop)

                stop = asyncio.Event()
                consumer = asyncio.ensure_future(consume(stop))
                mine = await produce()
                await until(lambda: len(got) == 20 and reader._waiting)
                # The reader now waits on events only (no re-list for 60 s): the
                # other process's enqueues must wake it.
                worker.send("30")
                await until(lambda: len(got) == 50, timeout=20)
                stop.set()
                await asyncio.wait_for(consumer, 5)
            theirs = set(worker.recv().split(","))
            return got, mine, theirs

        got, mine, theirs = run(main)
    finally:
        worker.close()
    assert len(theirs) == 30 and not mine & theirs
    assert sorted(got) == sorted(mine | theirs)  # each exactly once
    assert check_settled(path, sp)["queue1"] == set()


@pytest.mark.parametrize("op", ["save", "retry", "remove"])
def test_end_that_failed_then_cancelled_before_task_resumed_gives_entry_back(
    tmp_path: Path, op: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save/retry/remove fail in the executor (the checkout stays held, as the sync API
    leaves it); the task is cancelled after that, before it resumed to see the error. The
    exception is then seen by nobody, as when it is cancelled while the call runs: the
    entry must be released, not left checked out by this live process."""
    sp = make_spoolable()
    path = tmp_path / "s"

    async def main() -> None:
        async with await AsyncSpool.create(path, sp) as spool:
            e = await spool.enqueue(Queue.QUEUE1, Cog(1), b"")
            co = await spool.checkout(e)
            fired = threading.Event()

            def once(real: Callable[..., Any]) -> Callable[..., Any]:
                def fail_once(*args: Any, **kwargs: Any) -> Any:
                    if fired.is_set():
                        return real(*args, **kwargs)
                    fired.set()  # only the end's own move or removal fails
                    raise OSError(5, "injected")

                return fail_once

            monkeypatch.setattr(spool.sync, "_move_owned", once(spool.sync._move_owned))
            monkeypatch.setattr(spool.sync, "_remove_files", once(spool.sync._remove_files))
            ends = {"save": lambda: co.save(Queue.QUEUE2), "retry": lambda: co.retry(0), "remove": co.remove}
            task = asyncio.ensure_future(ends[op]())
            await asyncio.sleep(0)  # submitted
            # Hold the loop until the executor is done with the failed call: its error is
            # queued for the task, which we cancel before it can run.
            deadline = time.monotonic() + 10
            while spool._inflight:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            assert fired.is_set()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main)
    assert check_settled(path, sp)["queue1"] == {"None000000"}


def test_checkout_that_outlives_aclose_is_given_back(tmp_path: Path) -> None:
    """A checkout still held when its AsyncSpool is closed could no longer be ended:
    every end (release, save, ``async with``) raised "closed", and the entry stayed in
    QUEUE/.checkout, locked by this live process, where no reader and no recovery takes
    it. aclose gives it back; ending it afterwards is a no-op (release) or a clear error.
    Handles from list_checkouts_unsafe hold no lock and are not this spool's: left alone."""
    sp = make_spoolable()
    path = tmp_path / "s"

    async def main() -> None:
        spool = await AsyncSpool.create(path, sp)
        other = multispool.Spool.load(path, sp)
        theirs = other.checkout(other.enqueue(Queue.QUEUE2, Cog(0), b""))
        e1 = await spool.enqueue(Queue.QUEUE1, Cog(1), b"")
        await spool.enqueue(Queue.QUEUE1, Cog(2), b"")
        co = await spool.checkout(e1)
        updated = co.update(lambda m: Cog(10))
        async with spool.reader(Queue.QUEUE1) as reader:
            co2 = await reader.dequeue(timeout=10)
        assert co2 is not None and co2.contents == Cog(2)
        [unsafe] = await spool.list_checkouts_unsafe(Queue.QUEUE2)
        await spool.aclose()
        assert co.done and updated.done and co2.done and not unsafe.done
        await co.release()  # already given back: nothing to do
        async with co2:
            pass
        with pytest.raises(RuntimeError, match="closed"):
            await updated.save(Queue.QUEUE3)
        assert os.listdir(path / "queue2" / ".checkout") == [theirs.name]
        theirs.release()

    run(main)
    where = check_settled(path, sp)
    assert where["queue1"] == {"None000001", "None000002"} and where["queue2"] == {"None000000"}


class _ContendedLock:
    """An RLock that calls ``on_contended()`` when a second thread comes to take it."""

    def __init__(self, on_contended: Callable[[], None]) -> None:
        self._lock = threading.RLock()
        self._first: int | None = None
        self._on_contended = on_contended

    def __enter__(self) -> None:
        me = threading.get_ident()
        if self._first is None:
            self._first = me
        elif me != self._first:
            self._on_contended()
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_release_while_a_timed_out_save_still_runs_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``async with co: await asyncio.wait_for(co.save(q), t)``: the save times out (slow
    disk) and goes on in its executor thread, as promised, while leaving the block
    releases the entry in another thread. The release moved the entry back to its queue;
    the save then wrote its new metadata at the checkout path (recreating it) and moved
    that into QUEUE2: the entry was in two queues, to be handed out twice. The release
    must wait for the save, then find the checkout ended."""
    gate = Gate()
    sp = make_spoolable(throttle=gate)
    path = tmp_path / "s"
    real_release = multispool.CheckedOutEntry.release

    def release(self: Any) -> None:
        try:
            real_release(self)
        finally:
            gate.open()  # the release is over: let the save go on

    async def main() -> None:
        async with await AsyncSpool.create(path, sp) as spool:
            e = await spool.enqueue(Queue.QUEUE1, Cog(1), b"")
            co = (await spool.checkout(e)).update(lambda m: Cog(2))
            # Or, once the release waits for the save, let the save go on.
            co.sync._claim._writing = _ContendedLock(gate.open)  # type: ignore[assignment]
            monkeypatch.setattr(multispool.CheckedOutEntry, "release", release)
            gate.arm(1)
            with pytest.raises(asyncio.CancelledError):
                async with co:
                    task = asyncio.ensure_future(co.save(Queue.QUEUE2))
                    await until(gate.entered.is_set)  # the save is under way
                    task.cancel()  # as wait_for does on its timeout
                    await task

    run(main)
    where = check_settled(path, sp)
    assert where == {"queue1": set(), "queue2": {"None000000"}, "queue3": set()}


def test_aclose_waiting_for_a_running_call_logs_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """aclose waits for calls still running through loop futures that only say "done";
    each one set its future twice (InvalidStateError), which asyncio logged as an
    "Exception in callback" error on every close that had to wait."""
    gate = Gate()
    sp = make_spoolable(throttle=gate)
    path = tmp_path / "s"

    async def main() -> None:
        spool = await AsyncSpool.create(path, sp)
        gate.arm(1)
        task = asyncio.ensure_future(spool.enqueue(Queue.QUEUE1, Cog(1), b""))
        await until(gate.entered.is_set)
        closing = asyncio.ensure_future(spool.aclose())
        await asyncio.sleep(0)  # aclose is waiting for the enqueue
        assert spool.closed and not closing.done()
        gate.open()
        await closing
        assert (await task).name == "None000000"

    with caplog.at_level(logging.ERROR):
        run(main)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert check_settled(path, sp)["queue1"] == {"None000000"}


def test_data_save_that_waited_for_a_remove_does_not_write_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout's ``data_file.save`` and its ``remove`` run in two executor threads (a
    data save that timed out goes on). The data save found the checkout held, waited
    for the remove to finish, then wrote ``.data/NAME`` anyway: a data file with no
    entry left behind (the Monitor's Orphaned), or written under a lock given up. It
    must see that the checkout ended while it waited."""
    gate = Gate()
    sp = make_spoolable(throttle=gate)
    path = tmp_path / "s"

    async def main() -> None:
        async with await AsyncSpool.create(path, sp) as spool:
            e = await spool.enqueue(Queue.QUEUE1, Cog(1), b"old")
            co = await spool.checkout(e)
            # Once the data save waits for the remove, let the remove go on.
            co.sync._claim._writing = _ContendedLock(gate.open)  # type: ignore[assignment]
            gate.arm(1)
            removing = asyncio.ensure_future(co.remove())
            await until(gate.entered.is_set)  # the remove is under way, holding the mutex
            with pytest.raises(multispool.EntryNotFoundError):
                await co.data_file.save(b"new")
            await removing

    run(main)
    assert os.listdir(path / ".data") == []
    assert check_settled(path, sp) == {"queue1": set(), "queue2": set(), "queue3": set()}


# -- lifecycle ------------------------------------------------------------------------------


def _alive(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


async def _collected(ref: weakref.ref[Any], timeout: float = 5.0) -> bool:
    """Whether ``ref``'s object is collected within ``timeout``, the loop running meanwhile
    (a wake it has yet to run holds a reader, and a claimer thread holds its last claim's
    call for up to _Claimer.HANDOFF_CHECK)."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        if ref() is None:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("how", ["dropped", "loop-closed"])
def test_a_reader_dropped_without_aclose_leaves_no_thread_nor_watch(tmp_path: Path, how: str) -> None:
    """An opened AsyncQueueReader dropped without ``aclose`` (or left parked in a dequeue
    when its event loop was closed) is collected, like a sync reader: its watch is
    removed and its claimer thread ends. The claimer thread waited for work forever, one
    more per such reader, for the life of the process (and the last claim it made for a
    parked dequeue kept the reader itself alive)."""
    sp = make_spoolable()
    path = tmp_path / "s"
    refs: list[weakref.ref[AsyncQueueReader[Any, bytes]]] = []

    async def open_one(spool: AsyncSpool[Any, bytes]) -> AsyncQueueReader[Any, bytes]:
        # A short rescan_interval: the shared rescan thread outlives a collected reader
        # by up to one interval (as for a sync reader).
        reader = spool.reader(Queue.QUEUE1, rescan_interval=0.2)
        # A claim made on the claimer thread for a parked dequeue.
        task = asyncio.ensure_future(reader.dequeue(timeout=10))
        await until(lambda: reader._waiting)
        multispool.Spool.load(path, sp).enqueue(Queue.QUEUE1, Cog(1), b"")
        co = await task
        assert co is not None and reader._prefetches == 1
        await co.remove()
        assert _alive("multispool-aio-claim")
        refs.append(weakref.ref(reader))
        return reader

    async def main() -> None:
        async with await AsyncSpool.create(path, sp) as spool:
            for _ in range(3):
                await open_one(spool)
                assert await _collected(refs[-1]), "the reader was not collected"
                assert _watch._state.backends == {}, "its watch is still there"
                await until(lambda: not _alive("multispool-aio-claim"))

    if how == "dropped":
        run(main)
        return

    async def leave_parked() -> tuple[AsyncSpool[Any, bytes], asyncio.Task[Any]]:
        spool = await AsyncSpool.create(path, sp)
        reader = await open_one(spool)
        task = asyncio.ensure_future(reader.dequeue())
        await until(lambda: reader._waiting)
        return spool, task

    loop = asyncio.new_event_loop()
    spool, task = loop.run_until_complete(leave_parked())
    loop.close()  # the parked dequeue is never resumed nor cancelled
    task._log_destroy_pending = False  # type: ignore[attr-defined]
    del spool, task, loop
    assert asyncio.run(_collected(refs[-1])), "the reader was not collected"
    assert _watch._state.backends == {}, "its watch is still there"
    deadline = time.monotonic() + 10
    while _alive("multispool-aio-claim"):
        assert time.monotonic() < deadline, "the claimer thread is still there"
        time.sleep(0.005)


@pytest.mark.parametrize("cancelled", ["caller", "close-task"])
def test_aclose_cancelled_while_it_waits_still_closes(tmp_path: Path, cancelled: str) -> None:
    """``aclose`` cancelled while it waits for a disk operation still running (a timeout
    around ``async with spool:``, a second cancellation of a task on its way out): the
    spool was marked closed, but the rest of the close never ran. A checkout it had handed
    out stayed in QUEUE/.checkout, locked by this live process, and could not be given
    back any more (every end raised "closed"); the executor threads stayed. The close
    must complete anyway, and a later ``aclose`` return once it has. (The close's own
    task is cancelled only by the loop's shutdown, ``asyncio.run`` on its way out: it
    goes on too.)"""
    gate = Gate()
    sp = make_spoolable(throttle=gate)
    path = tmp_path / "s"

    async def main() -> None:
        spool = await AsyncSpool.create(path, sp)
        co = await spool.checkout(await spool.enqueue(Queue.QUEUE1, Cog(1), b""))
        gate.arm(1)
        slow = asyncio.ensure_future(spool.enqueue(Queue.QUEUE2, Cog(2), b""))
        await until(gate.entered.is_set)
        closing = asyncio.ensure_future(spool.aclose())
        await until(lambda: spool._closed)  # the close is waiting for the enqueue
        if cancelled == "caller":
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
        else:
            assert spool._closing is not None
            spool._closing.cancel()
        gate.open()
        assert (await slow).name == "None000001"
        await until(lambda: co.done)  # given back by the close, which went on
        await until(lambda: not _alive("multispool-aio_0"))
        await spool.aclose()
        await co.release()  # a no-op, as after any close
        if cancelled == "close-task":
            await closing

    run(main)
    assert check_settled(path, sp) == {"queue1": {"None000000"}, "queue2": {"None000001"}, "queue3": set()}
