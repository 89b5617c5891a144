"""asyncio front end: the whole multispool API as coroutines.

One core, two fronts: every operation here runs the very code of the sync API
(``Spool``, ``CheckedOutEntry``, ``QueueReader``), off the event loop, in a small
``ThreadPoolExecutor`` owned by the ``AsyncSpool`` (the Spoolable's throttle is entered
there, by that code). Waiting for new entries uses the same shared watchdog observer as
the sync reader; its wake-up is handed to the loop with ``call_soon_threadsafe``, and a
wait on a caller's ``stop`` (an ``asyncio.Event``) wakes on either event, without polling.
While a ``dequeue`` is parked, the observer thread hands its claim to the reader's own
claimer thread (the sync reader's single hop), and the loop is woken once, with the claim
done; the parked task resumes in that very loop callback.

Callbacks (``with_entry``, ``reader.iter``...) may be plain functions or coroutine
functions. A coroutine function runs on the loop and gets an ``AsyncDataFile``; a plain
function runs in the executor (it may block on disk like any sync callback) and gets the
sync ``DataFile``; the reader then processes a backlog in batches there.

Cancellation never loses or strands an entry:

* a claim (``checkout``, ``dequeue``...) whose awaiting task is cancelled after the claim
  started in the executor is released back to its queue as soon as the claim finishes;
  one cancelled before it started never happens;
* ``save``, ``remove`` and ``release``, once called, always complete in the executor even
  if the awaiting task is cancelled (the cancellation is delivered at once); a save or
  remove that then fails releases the entry;
* ``enqueue`` cancelled before it started does not happen; once started, it completes;
* a parked ``dequeue`` whose event loop is closed (without cancelling it) claims nothing
  for it any more, and a claim already made for it goes back to its queue.

An ``AsyncSpool`` belongs to one event loop at a time. Close it (``await spool.aclose()``
or ``async with spool:``) to close its readers and stop its executor threads; closing
waits for the disk operations still running, including those of cancelled tasks, then
gives back unchanged every checkout it handed out that is still held (once closed, a
checkout's ``release`` is a no-op and its ``save``/``remove`` raise RuntimeError). Once
called, the close completes even if the awaiting task is cancelled.
``AsyncSpool.load_unsafe`` touches no disk and returns the spool directly; awaiting an
AsyncSpool gives itself, so ``await AsyncSpool.load_unsafe(...)`` works as well.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import enum
import functools
import inspect
import logging
import os
import queue as queue_mod
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from typing import Any, Final, Generic, TypeAlias, TypeVar

from ._reader import QueueReader, interval_seconds
from ._schedule import Backoff
from ._spool import NOT_FOUND, Action, CheckedOutEntry, DataFile, Entry, NotFound, Spool
from ._spoolable import Duration, Spoolable, timeout_seconds

__all__ = [
    "DEFAULT_MAX_WORKERS",
    "AsyncCheckedOutEntry",
    "AsyncDataFile",
    "AsyncEntry",
    "AsyncQueueReader",
    "AsyncSpool",
]

log = logging.getLogger("multispool")

M = TypeVar("M")
D = TypeVar("D")
R = TypeVar("R")

DEFAULT_MAX_WORKERS: Final = 4
"""Executor threads per AsyncSpool: disk operations are short; a few threads keep the
loop free without letting one spool flood the disk."""

# A sync callback processes a backlog in the executor in batches of this many seconds:
# the loop hears back (stop, close, cancellation) at least this often.
_BATCH_SECONDS: Final = 0.01


def _is_async(f: Callable[..., Any]) -> bool:
    """Whether ``f`` is a coroutine function (also through partials and ``__call__``)."""
    if inspect.iscoroutinefunction(f):
        return True
    call = getattr(f, "__call__", None)  # noqa: B004 - an instance with async __call__
    return call is not None and inspect.iscoroutinefunction(call)


class _Call:
    """One function run in the executor on behalf of an awaiting task.

    If that task is cancelled while the function runs, the task "abandons" the call;
    whichever side finishes last undoes what nobody will receive: ``undo(result)`` for a
    result (a claim to give back), ``on_error()`` for an exception nobody will see."""

    __slots__ = (
        "abandoned", "args", "collected", "failed", "fn", "handed", "lock", "on_error", "result", "undo",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        undo: Callable[[Any], None] | None,
        on_error: Callable[[], None] | None,
    ) -> None:
        self.fn = fn
        self.args = args
        self.undo = undo
        self.on_error = on_error
        self.lock = threading.Lock()
        self.abandoned = False
        self.handed = False
        # The function raised while the call was not abandoned: its exception is on its
        # way to the task, which may yet be cancelled before it sees it (see abandon).
        self.failed = False
        self.collected = False  # a claim hand-off: the loop took the result (under lock)
        self.result: Any = None

    def run(self) -> Any:
        try:
            result = self.fn(*self.args)
        except BaseException:
            with self.lock:
                abandoned = self.abandoned
                self.failed = not abandoned
            if abandoned and self.on_error is not None:
                self.on_error()
            raise
        with self.lock:
            if not self.abandoned:
                self.handed = True
                self.result = result
                return result
        if self.undo is not None and result is not None:
            self.undo(result)
        return None

    def abandon(self) -> tuple[Any, bool]:
        """Mark the call abandoned. Returns the result to undo if the function already
        returned one, and whether it already raised: its exception, set for the task, will
        not be seen either (the task was cancelled before it resumed), so ``on_error`` is
        the abandoner's to run."""
        with self.lock:
            if self.abandoned:
                return None, False  # already undone by whoever abandoned it first
            self.abandoned = True
            failed, self.failed = self.failed, False
            return (self.result if self.handed else None), failed


def _bridge(
    cf: concurrent.futures.Future[Any], loop: asyncio.AbstractEventLoop, *, outcome: bool = True
) -> asyncio.Future[Any]:
    """A loop future with ``cf``'s outcome (or just None once ``cf`` is done, when not
    ``outcome``). Unlike ``asyncio.wrap_future``, cancelling it never cancels ``cf``."""
    fut: asyncio.Future[Any] = loop.create_future()

    # ``cf`` is passed along, never captured: ``cf`` keeps its callbacks, and one that
    # closed over ``cf`` made a cycle keeping its exception, the frames of its traceback
    # and what they hold (a checkout and its owner lock) until a garbage collection.
    def copy(cf: concurrent.futures.Future[Any]) -> None:
        if fut.done():
            return
        if not outcome:
            fut.set_result(None)
            return
        if cf.cancelled():
            fut.cancel()
            return
        exc = cf.exception()
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(cf.result())

    def done(cf: concurrent.futures.Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(copy, cf)

    cf.add_done_callback(done)
    return fut


def _log_failure(cf: concurrent.futures.Future[Any]) -> None:
    if not cf.cancelled() and cf.exception() is not None:
        log.error("multispool.aio: background operation failed", exc_info=cf.exception())


def _finish_or_release(co: CheckedOutEntry[Any, Any], action: Any) -> None:
    """Apply a callback's action; if that fails, the entry goes back unchanged."""
    try:
        Spool._finish(co, action)
    except BaseException as e:
        co._release_after(e, let_go=True)
        raise


def _fail_or_release(co: CheckedOutEntry[Any, Any], policy: Backoff | None, exc: BaseException) -> bool:
    """A callback raised ``exc`` on ``co``: apply ``policy`` (True if it took the entry:
    retried later or dead-lettered), else give the entry back unchanged (False)."""
    if policy is not None and Spool._on_failure(co, policy, exc):
        return True
    co._release_after(exc, let_go=True)
    return False


def _apply_with_result(co: CheckedOutEntry[Any, Any], pair: Any) -> Any:
    """Apply a ``with_entry`` callback's ``(action, result)``; if it is not such a pair,
    or the action fails, the entry goes back unchanged (as ``Spool._apply``)."""
    try:
        action, result = pair
    except BaseException as e:
        co._release_after(e, let_go=True)
        raise
    _finish_or_release(co, action)
    return result


def _release(co: CheckedOutEntry[Any, Any] | AsyncCheckedOutEntry[Any, Any]) -> None:
    # A claim nobody received: ours to give back, or at least to let go of.
    (co.sync if isinstance(co, AsyncCheckedOutEntry) else co)._release_or_let_go()


class AsyncSpool(Generic[M, D]):
    """A spool used from asyncio; wraps a sync ``Spool`` (``.sync``) and runs its disk
    operations in a private executor of ``max_workers`` threads."""

    def __init__(self, spool: Spool[M, D], *, max_workers: int = DEFAULT_MAX_WORKERS) -> None:
        if not isinstance(spool, Spool):
            raise TypeError(f"AsyncSpool wraps a multispool.Spool, got {spool!r}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
        self.sync: Spool[M, D] = spool
        self._max_workers = max_workers
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight: set[concurrent.futures.Future[Any]] = set()
        self._inflight_lock = threading.Lock()
        self._readers: weakref.WeakSet[AsyncQueueReader[M, D]] = weakref.WeakSet()
        # The checkouts this spool handed out that hold their owner lock: those still
        # held when it closes are given back (nothing could end them afterwards).
        self._checkouts: weakref.WeakSet[AsyncCheckedOutEntry[M, D]] = weakref.WeakSet()
        self._closed = False
        self._closing: asyncio.Future[None] | None = None  # the close, once aclose is called

    # -- opening ----------------------------------------------------------------------
    @classmethod
    async def load(
        cls,
        path: str | os.PathLike[str],
        spoolable: Spoolable[M, D],
        create_if_missing: bool = False,
        *,
        max_workers: int = DEFAULT_MAX_WORKERS,
    ) -> AsyncSpool[M, D]:
        """Open the spool at ``path``, described by ``spoolable``, as ``Spool.load`` does
        (validation, and creation when ``create_if_missing``), off the loop in the new
        AsyncSpool's executor of up to ``max_workers`` threads."""
        spool = cls(Spool.load_unsafe(path, spoolable), max_workers=max_workers)
        try:
            spool.sync = await spool._run(Spool.load, path, spoolable, create_if_missing)
        except BaseException:
            await spool.aclose()
            raise
        return spool

    @classmethod
    async def create(
        cls,
        path: str | os.PathLike[str],
        spoolable: Spoolable[M, D],
        *,
        max_workers: int = DEFAULT_MAX_WORKERS,
    ) -> AsyncSpool[M, D]:
        """``load(path, spoolable, create_if_missing=True, max_workers=max_workers)``."""
        return await cls.load(path, spoolable, True, max_workers=max_workers)

    @classmethod
    def load_unsafe(
        cls,
        path: str | os.PathLike[str],
        spoolable: Spoolable[M, D],
        *,
        max_workers: int = DEFAULT_MAX_WORKERS,
    ) -> AsyncSpool[M, D]:
        """An AsyncSpool for ``path`` without validation or disk access. Returned
        directly; awaiting an AsyncSpool gives itself, so ``await load_unsafe(...)`` works
        too."""
        return cls(Spool.load_unsafe(path, spoolable), max_workers=max_workers)

    def __await__(self) -> Generator[Any, None, AsyncSpool[M, D]]:
        return self
        yield  # pragma: no cover - makes this a generator

    @property
    def dir(self) -> str:
        """The spool directory as given (``os.fspath``)."""
        return self.sync.dir

    @property
    def spoolable(self) -> Spoolable[M, D]:
        """The Spoolable describing this spool."""
        return self.sync.spoolable

    @property
    def closed(self) -> bool:
        """True once ``aclose`` was called."""
        return self._closed or self._closing is not None

    # -- running disk work off the loop ---------------------------------------------------
    def _submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        ex = self._executor
        if ex is None:
            if self._closed:
                raise RuntimeError(f"AsyncSpool for {self.dir!r} is closed")
            ex = self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._max_workers, thread_name_prefix="multispool-aio"
            )
        cf = ex.submit(fn, *args)
        with self._inflight_lock:
            self._inflight.add(cf)
        cf.add_done_callback(self._forget)
        return cf

    def _forget(self, cf: concurrent.futures.Future[Any]) -> None:
        with self._inflight_lock:
            self._inflight.discard(cf)

    def _background(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` in the executor for nobody (undoing a cancelled claim); errors are
        logged. If the executor is already gone, run it here (only in a late cancel)."""
        try:
            cf = self._submit(fn, *args)
        except RuntimeError:
            fn(*args)
            return
        cf.add_done_callback(_log_failure)

    async def _run(
        self,
        fn: Callable[..., R],
        *args: Any,
        undo: Callable[[Any], None] | None = None,
        on_error: Callable[[], None] | None = None,
        cancellable: bool = True,
    ) -> R:
        """``fn(*args)`` in the executor. If the awaiting task is cancelled: a call not yet
        started is dropped when ``cancellable``; one that started completes, and its
        result goes to ``undo`` (its exception to ``on_error``) since nobody receives it."""
        if self._closed:
            raise RuntimeError(f"AsyncSpool for {self.dir!r} is closed")
        call = _Call(fn, args, undo, on_error)
        cf = self._submit(call.run)
        try:
            return await _bridge(cf, asyncio.get_running_loop())  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            self._drop(call, cf, cancellable)
            raise
        finally:
            # An exception raised here keeps this frame in its traceback, and ``cf``
            # keeps that exception: a cycle that kept the call's checkout (and its owner
            # lock) after its owner dropped it, until a garbage collection.
            del call, cf

    def _drop(self, call: _Call, cf: concurrent.futures.Future[Any], cancellable: bool = True) -> None:
        """Nobody will receive this call's outcome: cancel it if it has not started (and
        ``cancellable``), else have its result undone."""
        if cancellable and cf.cancel():
            return
        leftover, failed = call.abandon()
        if leftover is not None and call.undo is not None:
            self._background(call.undo, leftover)
        if failed and call.on_error is not None:
            self._background(call.on_error)

    # -- closing ----------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close this spool's readers, wait for the disk operations still running (also
        those of cancelled tasks), give back unchanged the checkouts it handed out that
        are still held (nothing could end them once it is closed), and stop the executor
        threads. Once called, the close completes even if the awaiting task is cancelled
        (the cancellation is delivered at once); every call returns once it has."""
        closing = self._closing
        if closing is None or (closing.done() and (closing.cancelled() or closing.exception() is not None)):
            # The first call, or the last close failed (a step raised): start it (again).
            closing = self._closing = asyncio.ensure_future(self._close())
        # Shielded: a cancelled caller stops waiting, the close goes on. Cut short, it
        # would leave the spool closed with its checkouts held and no way left to give
        # them back (their ends refuse a closed spool), and its threads running.
        await asyncio.shield(closing)

    async def _close(self) -> None:
        """The close, in a task of its own (``aclose``). Only the loop's shutdown can
        cancel it: it then goes on to the end (every step can be run again), as the
        calls it waits for do."""
        while True:
            try:
                await self._close_steps()
            except asyncio.CancelledError:
                continue
            return

    async def _close_steps(self) -> None:
        for reader in list(self._readers):
            await reader.aclose()
        self._closed = True
        loop = asyncio.get_running_loop()
        await self._settle(loop)
        held = [co.sync for co in list(self._checkouts) if not co.sync.done]
        self._checkouts = weakref.WeakSet()
        if held:
            for co in held:
                # Nothing could end them once closed: given back, or at least let go
                # of (a dead checkout, for a recovery to put back), never kept locked.
                self._background(co._release_or_let_go)
            await self._settle(loop)
        ex, self._executor = self._executor, None
        if ex is not None:
            # Every worker is idle now: they only need to see the shutdown and exit.
            ex.shutdown(wait=True)

    async def _settle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until no call is running or queued in the executor."""
        while True:
            with self._inflight_lock:
                pending = list(self._inflight)
            if not pending:
                break
            await asyncio.wait([_bridge(cf, loop, outcome=False) for cf in pending])

    async def __aenter__(self) -> AsyncSpool[M, D]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- wrapping ---------------------------------------------------------------------
    def _entry(self, e: Entry[M, D]) -> AsyncEntry[M, D]:
        return AsyncEntry(self, e)

    def _co(self, co: CheckedOutEntry[M, D] | None) -> AsyncCheckedOutEntry[M, D] | None:
        return None if co is None else AsyncCheckedOutEntry(self, co)

    @staticmethod
    def _sync_entry(e: AsyncEntry[M, D] | Entry[M, D]) -> Entry[M, D]:
        return e.sync if isinstance(e, AsyncEntry) else e

    # -- names, enqueue, listing ------------------------------------------------------
    async def reserve_name(self, seed: Any = None) -> str:
        """``Spool.reserve_name``. Cancelled before it started, it does not happen; once
        started, the name it reserved for nobody is given up (its registry file removed)."""
        return await self._run(self.sync.reserve_name, seed, undo=self.sync._unreserve)

    async def enqueue(
        self,
        queue: enum.Enum,
        metadata: M,
        data: D,
        *,
        reserve: Any = None,
        use: str | None = None,
        delay: Duration | None = None,
    ) -> AsyncEntry[M, D]:
        """``Spool.enqueue``: add an entry to ``queue`` with ``metadata`` and ``data``
        (name from ``use``, or reserved with seed ``reserve``; not handed out by a reader
        before ``delay`` seconds). Cancelled before it started, it does not happen; once
        started, it completes."""
        fn = functools.partial(self.sync.enqueue, reserve=reserve, use=use, delay=delay)
        return self._entry(await self._run(fn, queue, metadata, data))

    async def enqueue_many(
        self, queue: enum.Enum, items: Iterable[tuple[M, D]], *, reserve: Any = None
    ) -> builtins.list[AsyncEntry[M, D]]:
        """``Spool.enqueue_many``. Cancelled before it started, it does not happen; once
        started, it completes."""
        items = builtins.list(items)  # consumed here, not in the executor thread
        fn = functools.partial(self.sync.enqueue_many, reserve=reserve)
        return [self._entry(e) for e in await self._run(fn, queue, items)]

    async def list(self, queue: enum.Enum) -> builtins.list[AsyncEntry[M, D]]:
        """Entries waiting in ``queue``, sorted by name."""
        return [self._entry(e) for e in await self._run(self.sync.list, queue)]

    async def list_checkouts_unsafe(self, queue: enum.Enum) -> builtins.list[AsyncCheckedOutEntry[M, D]]:
        """``Spool.list_checkouts_unsafe``: handles that hold no lock."""
        return [
            AsyncCheckedOutEntry(self, co) for co in await self._run(self.sync.list_checkouts_unsafe, queue)
        ]

    # -- checkouts --------------------------------------------------------------------
    async def checkout(self, entry: AsyncEntry[M, D] | Entry[M, D]) -> AsyncCheckedOutEntry[M, D]:
        """Claim ``entry``; EntryNotFoundError if it is gone or another process holds it."""
        co = await self._run(self.sync.checkout, self._sync_entry(entry), undo=_release)
        return AsyncCheckedOutEntry(self, co)

    async def checkout_if_found(
        self, entry: AsyncEntry[M, D] | Entry[M, D]
    ) -> AsyncCheckedOutEntry[M, D] | None:
        """Claim ``entry``, or None if it is gone or another process holds it."""
        return self._co(await self._run(self.sync.checkout_if_found, self._sync_entry(entry), undo=_release))

    async def _with(self, co: AsyncCheckedOutEntry[M, D], f: Callable[..., Any]) -> Any:
        # An async f runs on the loop; the action is then applied in the executor.
        try:
            pair = await f(co.contents, co.data_file)
        except BaseException as e:
            await co._release_after(e, let_go=True)
            raise
        return await self._run(_apply_with_result, co.sync, pair, cancellable=False)

    async def with_entry(self, entry: AsyncEntry[M, D] | Entry[M, D], f: WithEntryHandler[M, D, R]) -> R:
        """Check out ``entry``, run ``f(metadata, data_file) -> (action, result)``, apply
        the action, return the result; if ``f`` raises, the entry goes back unchanged.
        A coroutine function ``f`` runs on the loop and gets an AsyncDataFile; a plain
        function runs in the executor (it may block) and gets the sync DataFile."""
        e = self._sync_entry(entry)
        result: R
        if not _is_async(f):
            result = await self._run(self.sync.with_entry, e, f, cancellable=True)
        else:
            result = await self._with(await self.checkout(e), f)
        return result

    async def with_entry_if_found(
        self, entry: AsyncEntry[M, D] | Entry[M, D], f: WithEntryHandler[M, D, R]
    ) -> R | NotFound:
        """As ``with_entry``, but ``multispool.NOT_FOUND`` when it cannot be checked out."""
        e = self._sync_entry(entry)
        result: R | NotFound
        if not _is_async(f):
            result = await self._run(self.sync.with_entry_if_found, e, f, cancellable=True)
        else:
            co = await self.checkout_if_found(e)
            result = NOT_FOUND if co is None else await self._with(co, f)
        return result

    # -- recovery ---------------------------------------------------------------------
    async def recover_checkouts(
        self, queue: enum.Enum | None = None, *, dead_after: Duration | None = None
    ) -> builtins.list[AsyncEntry[M, D]]:
        """``Spool.recover_checkouts``."""
        found = await self._run(functools.partial(self.sync.recover_checkouts, queue, dead_after=dead_after))
        return [self._entry(e) for e in found]

    async def clean_abandoned(self, older_than: Duration = 600) -> builtins.list[str]:
        """``Spool.clean_abandoned``."""
        return await self._run(self.sync.clean_abandoned, older_than)

    # -- readers ------------------------------------------------------------------------
    def reader(
        self,
        queue: enum.Enum,
        observer: str = "auto",
        rescan_interval: Duration = 5.0,
        recover: bool = False,
        poll_interval: Duration = 0.1,
    ) -> AsyncQueueReader[M, D]:
        """An event-driven async reader of ``queue``; it opens (recovery, watch) on
        ``async with`` or its first use, off the loop. ``observer``, ``rescan_interval``,
        ``recover`` and ``poll_interval`` mean what they mean for ``Spool.reader``."""
        r = AsyncQueueReader(
            self,
            queue,
            observer=observer,
            rescan_interval=rescan_interval,
            recover=recover,
            poll_interval=poll_interval,
        )
        self._readers.add(r)
        return r

    def __repr__(self) -> str:
        return f"AsyncSpool({self.dir!r}, {self.spoolable!r})"


class AsyncDataFile(Generic[D]):
    """An entry's data payload; ``load``/``save``/``stat`` run off the loop."""

    __slots__ = ("_aspool", "sync")

    def __init__(self, aspool: AsyncSpool[Any, D], data_file: DataFile[D]) -> None:
        self._aspool = aspool
        self.sync = data_file

    @property
    def path(self) -> str:
        """Where the data is: ``SPOOL/.data/NAME``."""
        return self.sync.path

    async def load(self) -> D:
        """The decoded data."""
        return await self._aspool._run(self.sync.load)

    async def save(self, contents: D) -> None:
        """Atomically replace the data."""
        await self._aspool._run(self.sync.save, contents, cancellable=False)

    async def stat(self) -> os.stat_result:
        """``os.stat_result`` of the data file."""
        return await self._aspool._run(self.sync.stat)

    def __repr__(self) -> str:
        return f"AsyncDataFile({self.path!r})"


AsyncHandler: TypeAlias = (
    Callable[[M, DataFile[D]], Action[M]] | Callable[[M, AsyncDataFile[D]], Awaitable[Action[M]]]
)
"""A reader callback: a plain function (run in the executor, given the sync DataFile) or a
coroutine function (run on the loop, given an AsyncDataFile)."""
WithEntryHandler: TypeAlias = (
    Callable[[M, DataFile[D]], tuple[Action[M], R]]
    | Callable[[M, AsyncDataFile[D]], Awaitable[tuple[Action[M], R]]]
)
"""A ``with_entry`` callback: returns ``(action, result)``, sync or async as AsyncHandler."""


class _AsyncDirect(Generic[M, D]):
    """``Entry.direct`` as coroutines: no checkout, no exclusivity."""

    __slots__ = ("_entry",)

    def __init__(self, entry: AsyncEntry[M, D]) -> None:
        self._entry = entry

    async def contents(self) -> Any:
        return await self._entry.spool._run(self._entry.sync.direct.contents)

    def data_file(self) -> AsyncDataFile[D]:
        """The entry's data file (no exclusivity)."""
        return AsyncDataFile(self._entry.spool, self._entry.sync.direct.data_file())

    async def save(self, metadata: Any) -> None:
        await self._entry.spool._run(self._entry.sync.direct.save, metadata, cancellable=False)

    async def remove(self) -> None:
        await self._entry.spool._run(self._entry.sync.direct.remove, cancellable=False)


class AsyncEntry(Generic[M, D]):
    """A name in a queue (wraps a sync ``Entry``, ``.sync``)."""

    __slots__ = ("spool", "sync")

    def __init__(self, spool: AsyncSpool[M, D], entry: Entry[M, D]) -> None:
        self.spool = spool
        self.sync = entry

    @classmethod
    def create(cls, spool: AsyncSpool[M, D], queue: enum.Enum, name: str) -> AsyncEntry[M, D]:
        """No existence check (``Entry.create``)."""
        return cls(spool, Entry(spool.sync, queue, name))

    @property
    def name(self) -> str:
        """The entry's name."""
        return self.sync.name

    @property
    def queue(self) -> enum.Enum:
        """The queue the entry is in (or was in when listed)."""
        return self.sync.queue

    async def stat(self) -> os.stat_result:
        """``os.stat_result`` of ``.registry/NAME``; EntryNotFoundError if absent."""
        return await self.spool._run(self.sync.stat)

    async def due(self) -> float | None:
        """``Entry.due``: POSIX time before which no reader hands it out, or None."""
        return await self.spool._run(self.sync.due)

    async def attempts(self) -> int:
        """``Entry.attempts``: failures counted by a Backoff policy."""
        return await self.spool._run(self.sync.attempts)

    @property
    def direct(self) -> _AsyncDirect[M, D]:
        """Read and write this entry in its queue without checking it out (no exclusivity)."""
        return _AsyncDirect(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncEntry):
            return self.sync == other.sync
        if isinstance(other, Entry):
            return self.sync == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.sync)

    def __repr__(self) -> str:
        return f"AsyncEntry({self.spool.dir!r}, {self.queue}, {self.name!r})"


class AsyncCheckedOutEntry(Generic[M, D]):
    """An entry this process has claimed (wraps a sync ``CheckedOutEntry``, ``.sync``).
    Exactly one of ``save``, ``remove`` or ``release`` ends it; leaving ``async with``
    without one returns it unchanged to its queue."""

    __slots__ = ("__weakref__", "spool", "sync")

    def __init__(self, spool: AsyncSpool[M, D], co: CheckedOutEntry[M, D]) -> None:
        self.spool = spool
        self.sync = co
        if co._claim.held:  # not a list_checkouts_unsafe handle (no lock, maybe not ours)
            spool._checkouts.add(self)

    @property
    def name(self) -> str:
        """The entry's name."""
        return self.sync.name

    @property
    def queue(self) -> enum.Enum:
        """The queue it was checked out from."""
        return self.sync.queue

    @property
    def contents(self) -> M:
        """The metadata (the sync checkout's ``contents``)."""
        return self.sync.contents

    @property
    def data_file(self) -> AsyncDataFile[D]:
        """The entry's data file; its ``load``/``save`` run off the loop."""
        return AsyncDataFile(self.spool, self.sync.data_file)

    @property
    def path(self) -> str:
        """Where the metadata is while checked out: ``QUEUE/.checkout/NAME``."""
        return self.sync.path

    @property
    def done(self) -> bool:
        """True once saved, removed or released."""
        return self.sync.done

    def update(self, f: Callable[[M], M]) -> AsyncCheckedOutEntry[M, D]:
        """A new handle on the same checkout, with contents ``f(contents)``."""
        return AsyncCheckedOutEntry(self.spool, self.sync.update(f))

    @property
    def attempts(self) -> int:
        """Failures counted for this entry by a Backoff policy (0 if none)."""
        return self.sync.attempts

    async def save(self, queue: enum.Enum, delay: Duration | None = None) -> None:
        """Write the contents and move the entry into ``queue`` (not handed out before
        ``delay`` seconds). Completes even if the awaiting task is cancelled; if it then
        fails, the entry is released."""
        await self.spool._run(self.sync.save, queue, delay, cancellable=False, on_error=self.sync.release)

    async def retry(self, delay: Duration, metadata: M | None = None) -> None:
        """``CheckedOutEntry.retry``: back into its queue, not handed out before ``delay``
        seconds. Completes even if the awaiting task is cancelled."""
        await self.spool._run(self.sync.retry, delay, metadata, cancellable=False, on_error=self.sync.release)

    async def remove(self) -> None:
        """Delete the entry. Completes even if the awaiting task is cancelled."""
        await self.spool._run(self.sync.remove, cancellable=False, on_error=self.sync.release)

    async def release(self) -> None:
        """Return the entry unchanged to its queue (no-op once ended). Completes even if
        the awaiting task is cancelled."""
        if self.sync.done:
            return
        await self.spool._run(self.sync.release, cancellable=False)

    async def _release_or_let_go(self) -> None:
        """``release``, for the library's own callers that hold this handle: if it fails,
        the owner lock is given up all the same (``CheckedOutEntry._release_or_let_go``)."""
        if self.sync.done:
            return
        await self.spool._run(self.sync._release_or_let_go, cancellable=False)

    async def _release_after(self, exc: BaseException, *, let_go: bool = False) -> None:
        """``CheckedOutEntry._release_after``: give the entry back after ``exc`` ended its
        use, a failure to do so noted on ``exc``, never replacing it (``let_go``: the
        lock given up all the same). Completes even if the awaiting task is cancelled."""
        if self.sync.done:
            return
        give_back = functools.partial(self.sync._release_after, exc, let_go=let_go)
        await self.spool._run(give_back, cancellable=False)

    async def __aenter__(self) -> AsyncCheckedOutEntry[M, D]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        """Return the entry unchanged unless saved or removed; an exception raised in the
        block propagates, even if that fails."""
        if exc is None:
            await self.release()
        else:
            await self._release_after(exc)

    def __repr__(self) -> str:
        state = "done" if self.sync.done else "held"
        return f"AsyncCheckedOutEntry({self.spool.dir!r}, {self.queue}, {self.name!r}, {state})"


class _Claimer:
    """A reader's own thread for the claims the observer thread starts for a parked
    ``dequeue`` (see ``AsyncQueueReader._on_event``): the sync reader's one hop. Unlike
    the executor, it is never busy with other work when an entry lands (a wake claim
    never queues behind other disk operations), a hand-off costs less bookkeeping on the
    observer thread (no work item, no idle-thread accounting, no in-flight set), and it
    wakes the loop before completing its future. A parked dequeue occupies no thread.

    A claim handed to a loop that is closed before it collects the claim (closed before
    the hand-off, or after it but before running the wake-up) is given back: the thread
    looks at its uncollected hand-offs every HANDOFF_CHECK seconds while there are any.

    Between jobs the thread holds the reader only through such a hand-off, until that
    check: a reader dropped without ``aclose`` is collected, and its finalizer ends the
    thread (``stop_soon``)."""

    __slots__ = ("__weakref__", "_jobs", "_lock", "_stopped", "_thread")

    HANDOFF_CHECK: Final = 0.5

    def __init__(self, name: str) -> None:
        # A SimpleQueue: its put() is safe in a garbage-collection callback (stop_soon),
        # whatever lock the collecting thread holds.
        self._jobs: queue_mod.SimpleQueue[
            tuple[_Call, concurrent.futures.Future[Any], Callable[[], bool], Callable[[], bool]] | None
        ] = queue_mod.SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, call: _Call, done: Callable[[], bool], gone: Callable[[], bool]
    ) -> concurrent.futures.Future[Any]:
        """Run ``call`` on the claimer thread, then ``done()`` there (False: the loop that
        waits for it is gone). A result the loop has not collected (``call.collected``)
        once ``gone()`` is true is undone. RuntimeError once stopped."""
        cf: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._stopped:
                raise RuntimeError("claimer stopped")
            self._jobs.put((call, cf, done, gone))
        return cf

    @staticmethod
    def _settle(call: _Call, gone: Callable[[], bool]) -> bool:
        """Give back ``call``'s claim if its loop is gone before collecting it. True once
        nothing more is to be watched for this call."""
        with call.lock:
            if call.collected or call.abandoned or not call.handed or call.result is None:
                return True
            if not gone():
                return False
            call.abandoned = True
            leftover = call.result
        if call.undo is not None:
            try:
                call.undo(leftover)
            except Exception:
                log.exception("multispool.aio: giving back a claim nobody collected failed")
        return True

    def _run(self) -> None:
        watched: list[tuple[_Call, Callable[[], bool]]] = []
        while True:
            try:
                job = self._jobs.get(timeout=self.HANDOFF_CHECK if watched else None)
            except queue_mod.Empty:
                watched = [w for w in watched if not self._settle(*w)]
                continue
            watched = [w for w in watched if not self._settle(*w)]
            if job is None:
                return
            self._do(job, watched)
            # Nothing of the job stays in this frame while waiting for the next: its call
            # holds the reader, which must be collectable once dropped.
            del job

    def _do(
        self,
        job: tuple[_Call, concurrent.futures.Future[Any], Callable[[], bool], Callable[[], bool]],
        watched: list[tuple[_Call, Callable[[], bool]]],
    ) -> None:
        call, cf, done, gone = job
        if not cf.set_running_or_notify_cancel():
            return  # cancelled before it started: never happens
        try:
            result = call.run()
        except BaseException as e:  # handed to the awaiting task
            cf.set_exception(e)
            done()
        else:
            # Wake the loop first: a result for the parked dequeue is in ``call``
            # already, and completing ``cf`` overlaps with the loop waking up.
            done()
            if not self._settle(call, gone):
                watched.append((call, gone))
            cf.set_result(result)

    def stop(self) -> None:
        """Let the claim in progress (and any queued) finish, then end the thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._jobs.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join()

    def stop_soon(self) -> None:
        """End the thread once it is idle, without waiting for it or taking a lock: the
        finalizer of a reader collected without ``aclose`` (nothing submits to it any
        more), which runs wherever that collection happens."""
        self._stopped = True
        self._jobs.put(None)


def _resolve(fut: asyncio.Future[None] | _Waiter) -> None:
    if not fut.done():
        fut.set_result(None)


class _Waiter:
    """What a parked ``dequeue`` awaits: a minimal future (the duck-typed protocol asyncio
    Tasks accept) that, when resolved outside any running task (by the hand-off from the
    claimer or observer thread, the timer, or the stop watcher), resumes the awaiting
    task right there instead of scheduling it for the next loop iteration. That saves
    one pass through the selector, which releases the GIL to the threads just finishing
    the wake: measured ~40 us of the wake path. Resolved from within a task (``aclose``)
    or cancelled, it schedules the wake-up like an asyncio.Future does."""

    __slots__ = ("_asyncio_future_blocking", "_callbacks", "_cancel_msg", "_loop", "_state")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._state = 0  # 0 pending, 1 done, 2 cancelled
        self._cancel_msg: Any = None
        self._callbacks: list[tuple[Callable[[Any], object], Any]] = []
        self._asyncio_future_blocking = False

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def done(self) -> bool:
        return self._state != 0

    def cancelled(self) -> bool:
        return self._state == 2

    def result(self) -> None:
        if self._state == 2:
            raise asyncio.CancelledError(self._cancel_msg)
        if self._state == 0:
            raise asyncio.InvalidStateError("result is not ready")

    def exception(self) -> BaseException | None:
        self.result()
        return None

    def add_done_callback(self, fn: Callable[[Any], object], *, context: Any = None) -> None:
        if self._state != 0:
            self._loop.call_soon(fn, self, context=context)
        else:
            self._callbacks.append((fn, context))

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        before = len(self._callbacks)
        self._callbacks = [(f, c) for f, c in self._callbacks if f != fn]
        return before - len(self._callbacks)

    def set_result(self, _: None) -> None:
        """On the loop: done; wakes the awaiting task now if no task is running."""
        if self._state != 0:
            return
        self._state = 1
        callbacks, self._callbacks = self._callbacks, []
        now = asyncio.current_task(self._loop) is None
        for fn, ctx in callbacks:
            if now:
                if ctx is None:
                    fn(self)
                else:
                    ctx.run(fn, self)
            else:
                self._loop.call_soon(fn, self, context=ctx)

    def cancel(self, msg: Any = None) -> bool:
        if self._state != 0:
            return False
        self._state = 2
        self._cancel_msg = msg
        callbacks, self._callbacks = self._callbacks, []
        for fn, ctx in callbacks:
            self._loop.call_soon(fn, self, context=ctx)
        return True

    def __await__(self) -> Generator[Any, None, None]:
        if self._state == 0:
            self._asyncio_future_blocking = True
            yield self
        self.result()


class _LoopWake:
    """A flag set from the observer thread, read and awaited on the loop (a future, not
    an asyncio.Event and a task: the fewest loop iterations between event and claim)."""

    __slots__ = ("flag", "loop", "on_event", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[], bool] | None = None) -> None:
        self.loop = loop
        self.on_event = on_event
        self.flag = False
        self.waiter: _Waiter | None = None

    def __call__(self) -> None:
        # Observer thread: hand the wake to the loop, never touch loop objects here.
        if self.on_event is None or not self.on_event():
            self.wake_loop()

    def wake_loop(self) -> bool:
        """Any thread: have the loop run ``set``. False if the loop is closed."""
        try:
            self.loop.call_soon_threadsafe(self.set)
        except RuntimeError:  # loop closed: the reader is gone with it
            return False
        return True

    def set(self) -> None:
        """On the loop: raise the flag and wake a waiting dequeue."""
        self.flag = True
        if self.waiter is not None:
            _resolve(self.waiter)

    def clear(self) -> None:
        self.flag = False


class AsyncQueueReader(Generic[M, D]):
    """The async form of ``QueueReader``: same claims (run in the executor by a sync
    QueueReader core), waiting on filesystem events without blocking the loop. Use
    ``async with`` (or ``await reader.aclose()``); one task at a time per reader."""

    def __init__(
        self,
        spool: AsyncSpool[M, D],
        queue: enum.Enum,
        *,
        observer: str = "auto",
        rescan_interval: Duration = 5.0,
        recover: bool = False,
        poll_interval: Duration = 0.1,
    ) -> None:
        # Cheap checks now; everything touching the disk happens in _open, off the loop.
        spool.spoolable.dirname(queue)
        if observer not in ("auto", "native", "polling"):
            raise ValueError(f"observer must be 'auto', 'native' or 'polling', got {observer!r}")
        self.rescan_interval = interval_seconds("rescan_interval", rescan_interval)
        self.poll_interval = interval_seconds("poll_interval", poll_interval)
        self.spool = spool
        self.queue = queue
        self._observer_request = observer
        self._recover = recover
        self._core: QueueReader[M, D] | None = None
        self._wake: _LoopWake | None = None
        self._opening: asyncio.Future[None] | None = None
        # The core is a sync QueueReader: one thread at a time (a cancelled call may
        # still be running in the executor when the next one starts).
        self._core_lock = threading.Lock()
        self._closed = False
        self._waiting = False  # for tests: a dequeue is parked waiting for a wake
        self._pf_lock = threading.Lock()
        self._armed = False
        self._prefetched: tuple[_Call, concurrent.futures.Future[Any]] | None = None
        self._prefetches = 0  # claims submitted by the observer thread (for tests)
        self._claimer: _Claimer | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def _open_sync(self, wake: _LoopWake) -> QueueReader[M, D]:
        core = QueueReader(
            self.spool.sync,
            self.queue,
            observer=self._observer_request,
            rescan_interval=self.rescan_interval,
            recover=self._recover,
            poll_interval=self.poll_interval,
        )
        # The core's wakes (events with the names they carry, shared rescans) also wake
        # the loop; the core's own Event is not waited on.
        claimer = self._claimer = _Claimer("multispool-aio-claim")
        # Dropped without aclose (or left behind by its closed loop), the reader is
        # collected with its core, whose watch then closes as a sync reader's does: its
        # claimer thread must end with it, not wait for work forever.
        weakref.finalize(self, claimer.stop_soon)
        core._on_wake = wake
        return core

    def _close_sync(self, core: QueueReader[Any, Any]) -> None:
        core._on_wake = None
        core.close()
        claimer = self._claimer
        if claimer is not None:
            claimer.stop()  # after sub.close(): no new claim is submitted

    async def _ensure_open(self) -> QueueReader[M, D] | None:
        if self._closed:
            return None
        if self._core is not None:
            return self._core
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        # Shielded: a cancelled caller must not cancel the open others may wait on; the
        # open's own cleanup handles a reader closed meanwhile.
        await asyncio.shield(self._opening)
        return self._core

    async def _open(self) -> None:
        wake = _LoopWake(asyncio.get_running_loop(), self._on_event)
        core = await self.spool._run(self._open_sync, wake, undo=self._close_sync)
        if self._closed:
            await self.spool._run(self._close_sync, core, cancellable=False)
            return
        self._core = core
        self._wake = wake

    @property
    def closed(self) -> bool:
        """True once ``aclose`` was called (or the ``async with`` block left)."""
        return self._closed

    @property
    def observer(self) -> str | None:
        """The observer mode in use once open (``"native"`` or ``"polling"``)."""
        core = self._core
        sub = None if core is None else core._sub
        return None if sub is None else sub.mode

    async def aclose(self) -> None:
        """Stop watching; a ``dequeue`` waiting in another task returns None. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._wake is not None:
            self._wake.set()
        if self._opening is not None and not self._opening.done():
            await asyncio.wait([self._opening])
        if self._opening is not None and not self._opening.cancelled():
            self._opening.exception()  # retrieved: an open failure was already raised
        core, self._core = self._core, None
        if core is not None:
            await self.spool._run(self._close_sync, core, cancellable=False)

    close = aclose

    async def __aenter__(self) -> AsyncQueueReader[M, D]:
        await self._ensure_open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- taking entries -------------------------------------------------------------------
    def _take_sync(
        self, core: QueueReader[M, D], fresh: bool = False
    ) -> tuple[CheckedOutEntry[M, D] | None, float | None]:
        """The core's next entry (see ``QueueReader._take``); with none, the seconds until
        the core has something to retry (None: only a wake will tell)."""
        with self._core_lock:
            co = core._take(fresh=fresh)
            return co, None if co is not None else core._next_wait(time.monotonic(), None)

    @staticmethod
    def _undo_take(result: tuple[CheckedOutEntry[Any, Any] | None, float | None]) -> None:
        if result[0] is not None:
            result[0]._release_or_let_go()

    async def _take(
        self, core: QueueReader[M, D], fresh: bool
    ) -> tuple[AsyncCheckedOutEntry[M, D] | None, float | None]:
        co, wait = await self.spool._run(self._take_sync, core, fresh, undo=self._undo_take)
        return self.spool._co(co), wait

    # A dequeue parked waiting "arms" the reader: the observer thread's next wake then
    # hands the claim to the claimer thread itself, saving the loop's round trip between
    # the event and the claim (wake latency). The parked dequeue collects that call.
    def _on_event(self) -> bool:
        """Observer thread, on every wake. True if it submitted the parked dequeue's claim:
        the loop is then woken once that claim is done, not now."""
        with self._pf_lock:
            if not self._armed:
                return False
            self._armed = False
            core, wake = self._core, self._wake
            if core is None or wake is None or self._closed:
                return False
            if wake.loop.is_closed():
                return True  # nobody left to hand a claim to: claim nothing
            claimer = self._claimer
            if claimer is None:
                return False
            call = _Call(self._take_sync, (core,), self._undo_take, None)
            try:
                cf = claimer.submit(call, wake.wake_loop, wake.loop.is_closed)
            except RuntimeError:
                return False  # the reader is closing
            self._prefetched = (call, cf)
            self._prefetches += 1
        return True

    def _arm(self, armed: bool) -> None:
        with self._pf_lock:
            self._armed = armed

    def _collect_prefetched(self) -> tuple[_Call, concurrent.futures.Future[Any]] | None:
        with self._pf_lock:
            self._armed = False
            pre, self._prefetched = self._prefetched, None
        return pre

    def _drop_prefetched(self) -> None:
        pre = self._collect_prefetched()
        if pre is not None:
            self.spool._drop(*pre)

    async def dequeue_available(self) -> AsyncCheckedOutEntry[M, D] | None:
        """The next entry if one can be claimed now, else None. Never waits for one."""
        core = await self._ensure_open()
        if core is None:
            return None
        assert self._wake is not None
        self._wake.clear()
        co, _ = await self._take(core, fresh=True)
        return co

    async def dequeue(
        self, stop: asyncio.Event | None = None, timeout: Duration | None = None
    ) -> AsyncCheckedOutEntry[M, D] | None:
        """The next entry, waiting for one (filesystem events, plus a re-list every
        ``rescan_interval``). None once ``stop`` is set, ``timeout`` passes, or the
        reader is closed. Cancelling it never loses an entry: a claim that completes
        for a cancelled caller goes back to the queue."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout_seconds(timeout)
        core = await self._ensure_open()
        while True:
            if core is None or self._closed or (stop is not None and stop.is_set()):
                return None
            wake = self._wake
            assert wake is not None
            # Cleared BEFORE the core looks: an entry landing after that sets it again
            # (the wake is applied on the loop after this line).
            wake.clear()
            last = deadline is not None and loop.time() >= deadline
            co, wait = await self._take(core, fresh=last)  # one last listing at the deadline
            if co is not None or last:
                return co
            self._arm(True)
            try:
                more = await self._wait_for_more(wake, stop, deadline, wait)
            except BaseException:
                self._drop_prefetched()  # cancelled: a claim made for us goes back
                raise
            pre = self._collect_prefetched()
            if pre is not None:
                call, cf = pre
                try:
                    with call.lock:  # handed and result are set together
                        handed, result = call.handed, call.result
                        call.collected = True
                    if handed:  # usual: the loop was woken by its completion
                        raw = result[0]
                    else:
                        raw, _ = cf.result() if cf.done() else await _bridge(cf, loop)
                except asyncio.CancelledError:
                    self.spool._drop(call, cf)
                    raise
                if raw is not None:
                    co = AsyncCheckedOutEntry(self.spool, raw)
                    if self._closed:
                        await co._release_or_let_go()  # claimed as the reader was closing
                        return None
                    return co
                # Nothing (another reader was faster): look again.
            elif not more:
                return None

    async def _wait_for_more(
        self, wake: _LoopWake, stop: asyncio.Event | None, deadline: float | None, wait: float | None
    ) -> bool:
        """After the core found nothing to take: wait for a wake (events, shared rescans),
        ``stop``, or ``wait`` seconds (the core's next retry, None for none). False if
        the reader closed; True if ``deadline`` passed (the caller then looks once more)."""
        now = asyncio.get_running_loop().time()
        if deadline is not None:
            wait = deadline - now if wait is None else min(wait, deadline - now)
        if self._closed:
            return False
        await self._wait(wake, stop, wait)
        return True

    async def _wait(self, wake: _LoopWake, stop: asyncio.Event | None, timeout: float | None) -> None:
        """Until ``wake`` or ``stop`` is set, or ``timeout`` seconds pass (None: no timer)."""
        if wake.flag or (stop is not None and stop.is_set()):
            return
        loop = asyncio.get_running_loop()
        fut = _Waiter(loop)
        wake.waiter = fut
        timer = None if timeout is None else loop.call_later(max(0.0, timeout), _resolve, fut)
        stopper: asyncio.Future[Any] | None = None
        if stop is not None:
            # A caller's asyncio.Event offers no callback: one task waits on it for us.
            stopper = asyncio.ensure_future(stop.wait())
            stopper.add_done_callback(lambda _: _resolve(fut))
        self._waiting = True
        try:
            await fut
        finally:
            self._waiting = False
            wake.waiter = None
            if timer is not None:
                timer.cancel()
            if stopper is not None and not stopper.done():
                stopper.cancel()
                # Let it finish now, so that no task outlives this call.
                await asyncio.wait([stopper])

    def __aiter__(self) -> AsyncIterator[AsyncCheckedOutEntry[M, D]]:
        return self

    async def __anext__(self) -> AsyncCheckedOutEntry[M, D]:
        """The next entry, waiting; StopAsyncIteration once the reader is closed."""
        co = await self.dequeue()
        if co is None:
            raise StopAsyncIteration
        return co

    # -- processing -----------------------------------------------------------------------
    async def _process(
        self, co: AsyncCheckedOutEntry[M, D], f: Callable[..., Any], on_error: Backoff | None = None
    ) -> None:
        if not _is_async(f):
            # The sync reader's own processing (f, then the action, or a release if either
            # raises), in the executor; once started it completes even if we are cancelled.
            core = self._core
            if core is None:
                await co._release_or_let_go()
                return
            await self.spool._run(core._process, co.sync, f, on_error, cancellable=False)
            return
        try:
            action = await f(co.contents, co.data_file)
        except Exception as e:
            # The same policy step as the sync reader's, and the release when the policy
            # leaves the entry to us, in one executor call that completes even if this
            # task is cancelled meanwhile (a release left for after it would be skipped).
            if await self.spool._run(
                _fail_or_release, co.sync, on_error, e, cancellable=False, on_error=co.sync._release_or_let_go
            ):
                return
            raise
        except BaseException as e:
            await co._release_after(e, let_go=True)
            raise
        await self.spool._run(_finish_or_release, co.sync, action, cancellable=False)

    async def iter(
        self, f: AsyncHandler[M, D], stop: asyncio.Event | None = None, on_error: Backoff | None = None
    ) -> None:
        """Process entries with ``f(metadata, data_file) -> Save(...) | Retry(...) |
        REMOVE``; when none are left, wait for new ones (and for delayed ones to become
        due) until ``stop`` is set or the reader is closed. A coroutine function ``f``
        runs on the loop with an AsyncDataFile; a plain function runs in the executor
        with the sync DataFile (several entries per trip there). If ``f`` raises (or the
        task is cancelled in it): with ``on_error=None`` that entry goes back unchanged
        and the exception propagates; with a Backoff policy, as ``QueueReader.iter``."""
        policy = self.spool.sync._check_policy(on_error, self.queue)
        if _is_async(f):
            while True:
                co = await self.dequeue(stop=stop)
                if co is None:
                    return
                await self._process(co, f, policy)
        core = await self._ensure_open()
        while True:
            if core is None or self._closed or (stop is not None and stop.is_set()):
                return
            wake = self._wake
            assert wake is not None
            wake.clear()  # before the core looks, as in dequeue
            done, wait = await self.spool._run(self._batch_sync, core, f, False, stop, False, policy)
            if done:
                continue
            if not await self._wait_for_more(wake, stop, None, wait):
                return

    async def iter_available(self, f: AsyncHandler[M, D]) -> None:
        """Process the entries present in one fresh listing of the queue, then return."""
        core = await self._ensure_open()
        if core is None:
            return
        if not _is_async(f):
            first = True
            while not self._closed:
                done, _ = await self.spool._run(self._batch_sync, core, f, True, None, first)
                first = False
                if not done:
                    return
            return
        first = True
        while not self._closed:
            co = await self.spool._run(self._take_listed_sync, core, first, undo=_release)
            first = False
            if co is None:
                return
            await self._process(AsyncCheckedOutEntry(self.spool, co), f)

    def _take_listed_sync(self, core: QueueReader[M, D], relist: bool) -> CheckedOutEntry[M, D] | None:
        with self._core_lock:
            if relist:
                core._check_watch()
                core._relist()
            return core._take_pending()

    def _batch_sync(
        self,
        core: QueueReader[M, D],
        f: Callable[..., Any],
        listed_only: bool,
        stop: asyncio.Event | None,
        relist: bool = False,
        on_error: Backoff | None = None,
    ) -> tuple[int, float | None]:
        """Executor side of a sync callback: claim and process entries one after the
        other for up to _BATCH_SECONDS (each one claimed is processed to the end), so
        that a backlog costs one trip to the executor per batch, not two per entry.
        Returns (entries processed, seconds until the core has something to retry)."""
        end = time.monotonic() + _BATCH_SECONDS
        done = 0
        with self._core_lock:
            if relist:
                core._check_watch()
                core._relist()
            # stop.is_set() and _closed are plain reads of flags the loop sets: safe here.
            while not self._closed and not (stop is not None and stop.is_set()):
                co = core._take_pending() if listed_only else core._take(fresh=False)
                if co is None:
                    break
                core._process(co, f, on_error)
                done += 1
                if time.monotonic() >= end:
                    break
            wait = None if done else core._next_wait(time.monotonic(), None)
        return done, wait

    def __repr__(self) -> str:
        state = "closed" if self._closed else (self.observer or "not open")
        return f"AsyncQueueReader({self.spool.dir!r}, {self.queue}, {state})"
