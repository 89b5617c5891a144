"""Event-driven queue readers.

Filesystem events are only hints: every wake re-lists the queue directory, and while
waiting the reader re-lists every ``rescan_interval`` seconds anyway, so a lost event
delays an entry by at most that interval and never loses it.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import ClassVar, Final, Generic, TypeAlias, TypeVar

from . import _watch
from ._errors import CorruptEntryError, NotASpoolError
from ._spool import Action, CheckedOutEntry, DataFile, Spool, _Busy
from ._spoolable import Duration, seconds

log = logging.getLogger("multispool")

M = TypeVar("M")
D = TypeVar("D")

# A stop relay thread checks this often whether any reader still waits on its Event.
RELAY_SLICE: Final = 0.25
# Competing readers walking the same listing trail each other and lose most claims. When
# claims keep getting lost (a running loss rate above LOSS_RATE_SKIP: one isolated loss,
# e.g. an entry held by another process, never triggers it), jump a random distance into
# the rest of the listing, up to half of it. Measured with 2 consumers on 10,000 entries:
# lost claims fell from ~1,500 to ~10 per consumer. Skipped names come back in the next
# listing, and each pass still goes in name order.
LOSS_RATE_SKIP: Final = 0.3
# A claim that finds the entry locked while still queued retries for this long (its holder
# lets go within microseconds) before leaving it for a later pass.
BUSY_SPIN: Final = 0.002
# After a claim found the entry locked while still queued (an enqueuer finishing, or a
# competing claimer about to rename), look again after this, doubling up to the cap.
BUSY_RETRY_FIRST: Final = 0.0005
BUSY_RETRY_MAX: Final = 0.1

Handler: TypeAlias = Callable[[M, DataFile[D]], Action[M]]
"""A reader callback: ``f(metadata, data_file)`` returns what to do with the entry."""


class _StopRelay:
    """Wakes every reader waiting with one stop Event as soon as it is set.

    threading cannot wait on two Events at once, and polling the caller's Event would
    cost CPU while idle; one thread per distinct stop Event (shared by all readers that
    wait with it, living only while one does) blocks on it instead and sets their wake
    flags. Notifying the Event's own condition instead would make other ``stop.wait()``
    callers return True while it is not set.
    """

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _relays: ClassVar[dict[int, _StopRelay]] = {}

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.waiters: set[threading.Event] = set()
        self.thread = threading.Thread(target=self._run, name="multispool-stop-relay", daemon=True)

    @classmethod
    def enter(cls, stop: threading.Event, wake: threading.Event) -> _StopRelay:
        with cls._lock:
            relay = cls._relays.get(id(stop))
            start = relay is None
            if relay is None:
                relay = cls._relays[id(stop)] = _StopRelay(stop)
            relay.waiters.add(wake)
        if start:
            relay.thread.start()
        return relay

    def leave(self, wake: threading.Event) -> None:
        with self._lock:
            self.waiters.discard(wake)

    def _run(self) -> None:
        while True:
            is_set = self.stop.wait(RELAY_SLICE)
            with self._lock:
                if is_set:
                    for wake in self.waiters:
                        wake.set()
                if is_set or not self.waiters:
                    if self._relays.get(id(self.stop)) is self:
                        del self._relays[id(self.stop)]
                    return


def _reset_relays_after_fork() -> None:
    # The child has none of the relay threads, and one of them may have held the lock.
    _StopRelay._lock = threading.Lock()
    _StopRelay._relays = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_relays_after_fork)


class QueueReader(Generic[M, D]):
    """Hands out the entries of one queue, each to exactly one reader among all the
    processes reading it, in name order of each directory listing; waits for new entries
    on filesystem events. Use from one thread at a time; ``close()`` from any thread."""

    def __init__(
        self,
        spool: Spool[M, D],
        queue: enum.Enum,
        *,
        observer: str = "auto",
        rescan_interval: Duration = 5.0,
        recover: bool = False,
    ) -> None:
        self.spool = spool
        self.queue = queue
        self._dirname = spool.spoolable.dirname(queue)
        self._qdir = spool._layout.queue(self._dirname)
        self.rescan_interval = seconds(rescan_interval)
        if not self.rescan_interval > 0:
            raise ValueError(f"rescan_interval must be > 0, got {rescan_interval!r}")
        self.observer, self.observer_reason = _watch.choose_observer(self._qdir, observer)
        self._wake = threading.Event()
        self._closed = False
        # Names of the last listing not yet tried, in reverse order (pop() takes the least).
        self._pending: list[str] = []
        self._busy_seen = False
        self._busy_delay = BUSY_RETRY_FIRST
        self._loss_rate = 0.0
        if recover:
            spool.recover_checkouts(queue)
            spool.clean_abandoned()
        # Subscribe before the first listing, so nothing that lands after it goes unseen.
        # departures=False: our own claims (and other readers') rename entries out of the
        # queue; waking on those would only make every reader re-list for nothing.
        try:
            self._sub: _watch.Subscription | None = _watch.subscribe(
                self._qdir, self._wake.set, self.observer, departures=False
            )
        except FileNotFoundError:
            raise NotASpoolError("queue directory does not exist", self._qdir) from None

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop watching; a ``dequeue`` waiting in another thread returns None. Idempotent."""
        self._closed = True
        self._wake.set()
        sub, self._sub = self._sub, None
        if sub is not None:
            sub.close()

    @property
    def closed(self) -> bool:
        """True once ``close`` was called (or the ``with`` block left)."""
        return self._closed

    def __enter__(self) -> QueueReader[M, D]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- taking entries -------------------------------------------------------------------
    def _relist(self) -> None:
        # The wake flag is cleared BEFORE listing: an entry that lands after the listing
        # sets it again, so the next wait returns at once instead of missing the entry.
        self._wake.clear()
        try:
            names = self.spool._list_names(self._qdir)
        except FileNotFoundError:
            raise NotASpoolError("queue directory disappeared", self._qdir) from None
        names.sort(reverse=True)
        self._pending = names

    def _take_pending(self) -> CheckedOutEntry[M, D] | None:
        pending = self._pending
        while pending and not self._closed:
            name = pending.pop()
            try:
                # Alone, a busy lock is an enqueuer finishing: worth a short spin. Among
                # competing readers it is a rival about to take the entry: move on.
                spin = BUSY_SPIN if self._loss_rate <= LOSS_RATE_SKIP else 0.0
                co = self.spool._claim(self.queue, name, busy_wait=spin, raise_busy=True)
            except _Busy:
                self._busy_seen = True
                self._skip_ahead(pending)
                continue
            except CorruptEntryError as e:
                if e.quarantined_to is None:
                    raise
                continue  # quarantined (and logged): go on with the next one
            except OSError as e:
                # This one entry's trouble (unreadable, a symlink or FIFO planted at its
                # registry name...), logged with its path: the others go on.
                log.warning("multispool: skipping %s/%s: %s", self._qdir, name, e)
                continue
            if co is not None:
                self._busy_delay = BUSY_RETRY_FIRST
                self._loss_rate = 0.0
                return co
            self._skip_ahead(pending)
        return None

    def _skip_ahead(self, pending: list[str]) -> None:
        # Another reader took (or is taking) this name.
        self._loss_rate = self._loss_rate * 0.75 + 0.25
        if self._loss_rate > LOSS_RATE_SKIP and pending:
            skip = random.randrange(len(pending) // 2 + 1)
            if skip:
                del pending[len(pending) - skip :]

    def dequeue_available(self) -> CheckedOutEntry[M, D] | None:
        """The next entry if one can be claimed now, else None. Never waits."""
        co = self._take_pending()
        if co is None and not self._closed:
            self._relist()
            co = self._take_pending()
        return co

    def dequeue(
        self, stop: threading.Event | None = None, timeout: Duration | None = None
    ) -> CheckedOutEntry[M, D] | None:
        """The next entry, waiting for one (filesystem events, plus a re-list every
        ``rescan_interval``). None once ``stop`` is set, ``timeout`` passes, or the reader
        is closed."""
        deadline = None if timeout is None else time.monotonic() + seconds(timeout)
        while True:
            if self._closed or (stop is not None and stop.is_set()):
                return None
            co = self.dequeue_available()
            if co is not None:
                return co
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            wait = self.rescan_interval
            if self._busy_seen:
                self._busy_seen = False
                wait = self._busy_delay
                self._busy_delay = min(self._busy_delay * 2, BUSY_RETRY_MAX)
            if deadline is not None:
                wait = min(wait, deadline - now)
            self._wait(wait, stop)

    def _wait(self, wait: float, stop: threading.Event | None) -> None:
        if stop is None:
            self._wake.wait(wait)
            return
        relay = _StopRelay.enter(stop, self._wake)
        try:
            if not stop.is_set():
                self._wake.wait(wait)
        finally:
            relay.leave(self._wake)

    def __iter__(self) -> Iterator[CheckedOutEntry[M, D]]:
        """Blocking iteration; ends when the reader is closed."""
        while True:
            co = self.dequeue()
            if co is None:
                return
            yield co

    # -- processing -----------------------------------------------------------------------
    def _process(self, co: CheckedOutEntry[M, D], f: Handler[M, D]) -> None:
        try:
            Spool._finish(co, f(co.contents, co.data_file))
        except BaseException:
            co.release()
            raise

    def iter(self, f: Handler[M, D], stop: threading.Event | None = None) -> None:
        """Process entries with ``f(metadata, data_file) -> Save(...) | REMOVE``; when none
        are left, wait for new ones, until ``stop`` is set (or the reader is closed). If
        ``f`` raises, that entry goes back unchanged and the exception propagates."""
        while True:
            co = self.dequeue(stop=stop)
            if co is None:
                return
            self._process(co, f)

    def iter_available(self, f: Handler[M, D]) -> None:
        """Process the entries present in one fresh listing of the queue with ``f`` (as
        ``iter`` does), then return."""
        self._relist()
        while True:
            co = self._take_pending()
            if co is None:
                return
            self._process(co, f)

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.observer
        return f"QueueReader({self.spool.dir!r}, {self.queue}, {state})"
