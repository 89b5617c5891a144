"""Event-driven queue readers.

How a reader finds entries, cheaply whatever the queue's history:

* Events carry names. The watch (``_watch.subscribe(names=True)``) hands over the name of
  each arrival; the reader tries those names directly, with no directory listing. ext4
  never shrinks a directory, so after a large backlog an empty queue directory can take
  milliseconds to list: listings stay off the per-entry path.
* A listing happens when only a listing can tell: the first pass, an event that names
  nothing (inotify overflow, the directory itself replaced), ``dequeue_available`` and
  ``iter_available`` finding nothing they already know of, a re-subscription, and the
  safety-net rescan.
* Safety-net rescans are shared by every reader of the process (``_RescanClock``): one
  thread stats each reader's queue directory once per ``rescan_interval`` (readers'
  schedules are rounded to a common grid so they share the thread's wake-ups) and asks
  the reader for a listing only when the directory changed since its last listing (or
  its mtime is too recent to prove anything). Idle readers cost one stat each per
  interval, in one thread, whatever their number, and wait without a timeout.
* A "not before" map (``NotBefore``, ``reader._not_before``) holds the names a reader
  must not try yet, with the time from which it may: failed entries, busy names, and
  (API.md §12) entries not due yet. A waiting reader's timer is the map's earliest time,
  never a faster rescan. See that class.
* A watch that dies (the queue directory replaced, a reader carried across ``fork()``)
  is noticed (event, rescan, or the pid) and re-established, followed by a listing.
"""

from __future__ import annotations

import collections
import enum
import heapq
import logging
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Final, Generic, TypeAlias, TypeVar

from . import _fs, _watch
from ._errors import CorruptEntryError, NotASpoolError
from ._schedule import Backoff
from ._spool import Action, CheckedOutEntry, DataFile, Spool, _Busy, _NotDue
from ._spoolable import Duration, seconds, timeout_seconds

log = logging.getLogger("multispool")

M = TypeVar("M")
D = TypeVar("D")

# A stop relay thread checks whether any reader still waits on its Event after
# RELAY_SLICE, then at intervals doubling up to RELAY_SLICE_MAX: a reader idle for hours
# costs a wake-up every RELAY_SLICE_MAX (each one is charged milliseconds on a virtual
# machine), and a relay outlives its last waiter by at most as long as it has served.
RELAY_SLICE = 1.0
RELAY_SLICE_MAX = 32.0
# Competing readers walking the same listing trail each other and lose most claims. When
# claims keep getting lost (a running loss rate above LOSS_RATE_SKIP: one isolated loss,
# e.g. an entry held by another process, never triggers it), jump a random distance into
# the rest of the listing, up to half of it. Measured with 2 consumers on 10,000 entries:
# lost claims fell from ~1,500 to ~10 per consumer. Skipped names come back in the next
# listing, and each pass still goes in name order.
LOSS_RATE_SKIP: Final = 0.3
# A claim that finds the entry locked while still queued retries for this long (its holder
# lets go within microseconds) before leaving it for later.
BUSY_SPIN: Final = 0.002
# After a claim found the entry locked while still queued (an enqueuer finishing, or a
# competing claimer about to rename), try that name again after this, doubling up to the
# cap while entries keep being found busy.
BUSY_RETRY_FIRST: Final = 0.0005
BUSY_RETRY_MAX: Final = 0.1
# Names announced by events and not yet tried are kept up to this many; past it (a
# reader nobody dequeues from while producers keep enqueuing), they are dropped for one
# listing, which finds them all.
MAX_HINTS: Final = 10_000
# A directory mtime this close to the time it was read proves nothing: another change
# may follow within the same timestamp granule (coarse clocks, 1-2 s on some
# filesystems) without changing it. Such a listing is followed by one more rescan.
RACY_MTIME: Final = 2.5
# Rescan schedules are rounded up to multiples of this fraction of their interval (at
# most RESCAN_GRID_MAX s) so that many readers share one wake-up of the rescan thread.
RESCAN_GRID: Final = 0.2
RESCAN_GRID_MAX: Final = 1.0
# A delayed entry is deferred until its due time, but at most this long: then it is
# looked at again (one lock and read), in case a tool re-queued it earlier without an
# event naming it (every path in this library announces such a move: it renames the
# entry into its queue, and with a new inode, see CheckedOutEntry._move).
DUE_RECHECK: Final = 3600.0


# The longest a thread can block in one wait (Event.wait, Condition.wait and
# Lock.acquire raise OverflowError beyond it): longer waits are cut to it (and resumed).
MAX_WAIT: Final = threading.TIMEOUT_MAX


def interval_seconds(what: str, value: Duration) -> float:
    """A reader's ``rescan_interval`` or ``poll_interval`` as float seconds: finite and
    > 0, else ValueError (an infinite one can be neither scheduled nor waited for)."""
    s = seconds(value)
    if not 0 < s < math.inf:
        raise ValueError(f"{what} must be a finite number of seconds > 0, got {value!r}")
    return s


class NotBefore:
    """The names a reader must not try before a given time (``time.monotonic()``).

    One small structure for every "not yet" of a reader:

    * an entry that failed in this reader (unreadable, an error on that one entry) is
      not tried again before one ``rescan_interval`` has passed: giving it back is
      itself an arrival event, and without this the reader would spin on it;
    * a name whose lock was busy is tried again after the busy back-off;
    * an entry not due yet (API.md §12: delays and retries) waits for its due time.
      Due times are POSIX times on disk; convert with
      ``time.monotonic() + (due - time.time())``.

    The reader skips names for which :meth:`blocks` is true, wakes from a wait no later
    than :meth:`earliest`, and then tries the names :meth:`pop_ready` returns. Deferring
    a name again replaces its time. Used by one thread at a time.
    """

    __slots__ = ("_heap", "_until")

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # may hold outdated pairs, skipped lazily

    def defer(self, name: str, until: float) -> None:
        """Do not try ``name`` before monotonic time ``until``."""
        self._until[name] = until
        heapq.heappush(self._heap, (until, name))

    def discard(self, name: str) -> None:
        """Forget ``name`` (it may be tried at once)."""
        self._until.pop(name, None)

    def blocks(self, name: str, now: float) -> bool:
        """Whether ``name`` must not be tried at monotonic time ``now``."""
        until = self._until.get(name)
        return until is not None and now < until

    def pop_ready(self, now: float) -> list[str]:
        """The names whose time has come (forgotten here), earliest first."""
        ready: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            until, name = heapq.heappop(heap)
            if self._until.get(name) == until:
                del self._until[name]
                ready.append(name)
        return ready

    def earliest(self) -> float | None:
        """The earliest time a deferred name may be tried again, or None if none is."""
        heap = self._heap
        while heap and self._until.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, name: object) -> bool:
        return name in self._until


Handler: TypeAlias = Callable[[M, DataFile[D]], Action[M]]
"""A reader callback: ``f(metadata, data_file)`` returns what to do with the entry."""


class _StopRelay:
    """Wakes every reader waiting with one stop Event as soon as it is set.

    threading cannot wait on two Events at once, and polling the caller's Event would
    cost CPU while idle; one thread per distinct stop Event (shared by all readers that
    wait with it, living while one does, and at most as long again after) blocks on it
    instead and sets their wake flags. Notifying the Event's own condition instead would
    make other ``stop.wait()`` callers return True while it is not set.
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
        wait = RELAY_SLICE
        while True:
            is_set = self.stop.wait(wait)
            with self._lock:
                if is_set:
                    for wake in self.waiters:
                        wake.set()
                if is_set or not self.waiters:
                    if self._relays.get(id(self.stop)) is self:
                        del self._relays[id(self.stop)]
                    return
            wait = min(wait * 2, RELAY_SLICE_MAX)


def _reset_relays_after_fork() -> None:
    # The child has none of the relay threads, and their lock may have been held by one.
    _StopRelay._lock = threading.Lock()
    _StopRelay._relays = {}


class _RescanClock:
    """The safety-net rescans of every reader in the process, from one thread.

    Each registered reader's queue directory is stat'ed once per its
    ``rescan_interval``; a reader is asked for a listing (``_rescan_wanted``) only when
    the directory is not as its last listing saw it. Schedules are rounded up to a grid
    (RESCAN_GRID of the interval), so readers sharing an interval share wake-ups: idle
    cost is one stat per reader and interval, and a thread wake-up per grid step at most.
    The thread starts when a reader is made (``attach``), not in its first ``dequeue``,
    and ends once no reader is left.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.heap: list[tuple[float, int, weakref.ref[QueueReader[Any, Any]]]] = []
        self.users: weakref.WeakSet[QueueReader[Any, Any]] = weakref.WeakSet()
        self.seq = 0
        self.thread: threading.Thread | None = None

    def _start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="multispool-rescan", daemon=True)
            self.thread.start()

    def attach(self, reader: QueueReader[Any, Any]) -> None:
        """Keep the thread running for ``reader`` until ``remove``."""
        with self.cond:
            if not reader._closed:
                self.users.add(reader)
                self._start()

    @staticmethod
    def _next_due(now: float, interval: float) -> float:
        grid = min(interval * RESCAN_GRID, RESCAN_GRID_MAX)
        return math.ceil((now + interval) / grid) * grid

    def add(self, reader: QueueReader[Any, Any], now: float) -> None:
        """Schedule ``reader``'s checks (unless it is closed); its ``_clock_token`` keeps
        them going."""
        with self.cond:
            if reader._closed:
                return
            self.seq += 1
            token = reader._clock_token = self.seq
            due = self._next_due(now, reader.rescan_interval)
            heapq.heappush(self.heap, (due, token, weakref.ref(reader)))
            self.users.add(reader)
            if self.thread is None:
                self._start()
            elif self.heap[0][1] == token:
                self.cond.notify()

    def remove(self, reader: QueueReader[Any, Any]) -> None:
        """Stop checking ``reader``; the thread ends once no reader is left."""
        with self.cond:
            self.users.discard(reader)
            token, reader._clock_token = reader._clock_token, 0
            if token:
                self.heap = [item for item in self.heap if item[1] != token]
                heapq.heapify(self.heap)
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                now = time.monotonic()
                while not (self.heap and self.heap[0][0] <= now):
                    if not self.heap and not self.users:
                        self.thread = None
                        return
                    # No schedule yet (readers made, not yet listed): look again now
                    # and then, in case they are dropped without close().
                    self.cond.wait(min(self.heap[0][0] - now, MAX_WAIT) if self.heap else 1.0)
                    now = time.monotonic()
                due: list[tuple[int, weakref.ref[QueueReader[Any, Any]]]] = []
                while self.heap and self.heap[0][0] <= now:
                    _, token, ref = heapq.heappop(self.heap)
                    due.append((token, ref))
            for token, ref in due:
                self._check(token, ref, now)

    def _check(self, token: int, ref: weakref.ref[QueueReader[Any, Any]], now: float) -> None:
        """One reader's check, and its next one scheduled. A function of its own: the
        reader is held only while it runs, not by ``_run``'s frame while it waits for the
        next check (a reader dropped without close() must be collected)."""
        reader = ref()
        if reader is None or reader._clock_token != token:
            return  # closed, collected, or registered anew
        try:
            reader._safety_check()
        except Exception:
            log.exception("multispool: rescan check of %s failed", reader._qdir)
        with self.cond:
            if reader._clock_token == token:  # not removed meanwhile
                heapq.heappush(self.heap, (self._next_due(now, reader.rescan_interval), token, ref))


_clock = _RescanClock()


def _reset_clock_after_fork() -> None:
    # The child has no rescan thread: readers used in the child register anew (they
    # notice the pid), with a fresh clock.
    global _clock
    _clock = _RescanClock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_relays_after_fork)
    os.register_at_fork(after_in_child=_reset_clock_after_fork)


class _WeakWake:
    """A reader's subscription callback. It holds the reader weakly: a subscription is
    held by the observer for as long as it is open, and a reader dropped without
    ``close()`` must still be collected; its subscription is then closed (watch removed,
    observer threads stopped once no other subscription is left)."""

    __slots__ = ("ref", "sub")

    def __init__(self, reader: QueueReader[Any, Any]) -> None:
        self.sub: _watch.Subscription | None = None
        self.ref = weakref.ref(reader, self._collected)

    def __call__(self, name: str | None = None) -> None:
        reader = self.ref()
        if reader is not None:
            reader._on_event(name)

    def _collected(self, _ref: object) -> None:
        # Runs wherever the reader was collected, maybe inside subscribe() or close().
        sub = self.sub
        if sub is not None:
            sub.close_soon()


class _RootWake(_WeakWake):
    """The callback of a reader's watch on the spool directory (see ``_subscribe``):
    its queue directory deleted or renamed (away, or another one there), or the spool
    directory itself moved, has the reader list its queue, which follows a directory
    renamed there (``_follow``)."""

    __slots__ = ("dirname",)

    def __init__(self, reader: QueueReader[Any, Any], dirname: str) -> None:
        super().__init__(reader)
        self.dirname = dirname

    def __call__(self, name: str | None = None) -> None:
        if name is None:
            # Maybe the spool directory's own move (the watch is stale then): checked by
            # the reader's next take, which has no system call to spend on it otherwise.
            reader = self.ref()
            if reader is not None:
                reader._root_check = True
        if name is None or name == self.dirname:
            super().__call__(None)


class QueueReader(Generic[M, D]):
    """Hands out the entries of one queue, each to exactly one reader among all the
    processes reading it, in name order of each directory listing (entries announced by
    events in name order of each batch); waits for new entries on filesystem events.
    Use from one thread at a time; ``close()`` from any thread."""

    def __init__(
        self,
        spool: Spool[M, D],
        queue: enum.Enum,
        *,
        observer: str = "auto",
        rescan_interval: Duration = 5.0,
        recover: bool = False,
        poll_interval: Duration = 0.1,
    ) -> None:
        self.spool = spool
        self.queue = queue
        self._dirname = spool.spoolable.dirname(queue)
        self._qdir = spool._layout.queue(self._dirname)
        self.rescan_interval = interval_seconds("rescan_interval", rescan_interval)
        self.poll_interval = interval_seconds("poll_interval", poll_interval)
        self.observer, self.observer_reason = _watch.choose_observer(self._qdir, observer)
        self._wake = threading.Event()
        # Called (from the observer or rescan thread) after every wake; the aio reader
        # wakes its event loop through it.
        self._on_wake: Callable[[], None] | None = None
        self._closed = False
        # Names of the current pass not yet tried, in reverse order (pop() takes the least).
        self._pending: list[str] = []
        self._pending_listed = False  # the pass comes from a listing (not from events)
        # Names from events (None: "list"), appended by the observer thread.
        self._hints: collections.deque[str | None] = collections.deque()
        self._hinted: set[str] = set()  # drained from _hints, for the next pass
        self._must_list = True
        self._rescan_due = False
        self._not_before = NotBefore()
        # Names deferred because not due yet -> their queue file's inode then: a name
        # announced again with another inode was re-queued, maybe earlier (see _take_pending).
        self._due_ino: dict[str, int] = {}
        self._busy_seen = False
        self._busy_delay = BUSY_RETRY_FIRST
        self._loss_rate = 0.0
        # (st_dev, st_ino, st_mtime_ns) of the queue directory at the last listing, and
        # whether that mtime was too recent to prove the next one unchanged.
        self._listed: tuple[tuple[int, int, int], bool] | None = None
        self._watched: tuple[int, int] | None = None  # (st_dev, st_ino) of the watched dir
        self._pid = os.getpid()
        self._clock_token = 0
        self._sub: _watch.Subscription | None = None
        # Native watches only: the watch on the spool directory (see _subscribe), and
        # whether it may have gone stale since the last take.
        self._root_sub: _watch.Subscription | None = None
        self._root_check = False
        if recover:
            spool.recover_checkouts(queue)
            spool.clean_abandoned()
        # Subscribe before the first listing, so nothing that lands after it goes unseen.
        self._subscribe()
        _clock.attach(self)

    # -- watching -------------------------------------------------------------------------
    def _subscribe(self) -> None:
        # departures=False: our own claims (and other readers') rename entries out of the
        # queue; waking on those would only make every reader look for nothing.
        wake = _WeakWake(self)
        try:
            self._sub = wake.sub = _watch.subscribe(
                self._qdir,
                wake,
                self.observer,
                polling_interval=self.poll_interval,
                departures=False,
                names=True,
            )
            st = os.stat(self._qdir)
        except FileNotFoundError:
            sub, self._sub = self._sub, None
            if sub is not None:
                sub.close()
            raise NotASpoolError("queue directory does not exist", self._qdir) from None
        self._watched = (st.st_dev, st.st_ino)
        self._must_list = True
        self._subscribe_root()
        if self._closed:
            # close() ran meanwhile in another thread: it sets _closed before it takes
            # _sub, so either it closed this subscription or we see it closed here.
            sub, self._sub = self._sub, None
            if sub is not None:
                sub.close()

    def _subscribe_root(self) -> None:
        """The spool holds its directories open (``_layout.Layout``), and so keeps a
        queue directory deleted or renamed over alive: the kernel then reports no
        IN_DELETE_SELF on its native watch, and the reader would wait on a directory
        that left the spool. The spool directory's own watch reports both (an entry of
        it, named as the queue dir, deleted or renamed) and its own move; it sees no
        entry traffic (the spool directory holds only directories). A polling watch
        lists by path: the reader checks the directory when a named entry is not there
        (``_take_pending``)."""
        root_sub = self._root_sub
        if root_sub is not None and not getattr(root_sub, "stale", False):
            return
        sub = self._sub
        if sub is None or getattr(sub, "mode", None) == "polling" or getattr(self._qdir, "fd", None) is None:
            return
        self._root_sub = None
        if root_sub is not None:
            root_sub.close()
        wake = _RootWake(self, self._dirname)
        try:
            self._root_sub = wake.sub = _watch.subscribe(
                self.spool._layout.root, wake, "native", departures=True, names=True
            )
        except FileNotFoundError:
            raise NotASpoolError("spool directory does not exist", self.spool.dir) from None
        if self._closed:
            # As in _subscribe: close() ran meanwhile, maybe before the store.
            root_sub, self._root_sub = self._root_sub, None
            if root_sub is not None:
                root_sub.close()

    def _on_event(self, name: str | None = None) -> None:
        # Observer thread. The hint goes in before the wake, so a reader that cleared
        # its wake flag and then drains the hints never misses one. (Dot-names never
        # get here: the watch hands them to no subscriber.)
        hints = self._hints
        if len(hints) >= MAX_HINTS:
            hints.clear()
            name = None
        hints.append(name)
        self._wake.set()
        if self._on_wake is not None:
            self._on_wake()

    def _rescan_wanted(self) -> None:
        """Any thread: have the reader list its queue once its current pass is done."""
        self._rescan_due = True
        self._wake.set()
        if self._on_wake is not None:
            self._on_wake()

    def _safety_check(self) -> None:
        """Rescan thread: ask for a listing if the queue directory may hold something
        events did not announce, or if the watch died."""
        if self._closed:
            return
        sub = self._sub
        listed = self._listed
        try:
            st = os.stat(self._qdir)
        except OSError:
            self._rescan_wanted()  # the reader's listing says what is wrong
            return
        if (
            listed is None
            or listed[1]
            or listed[0] != (st.st_dev, st.st_ino, st.st_mtime_ns)
            or sub is None
            or getattr(sub, "stale", False)
            # Polled directories are on filesystems whose attributes may be cached or
            # stamped by another host's clock: an unchanged mtime proves nothing there.
            or getattr(sub, "mode", None) == "polling"
        ):
            self._rescan_wanted()

    def _check_watch(self) -> None:
        """Re-establish a watch that died: the directory replaced or deleted (then this
        raises NotASpoolError), or this reader carried into a forked child."""
        if self._closed:
            return
        sub = self._sub  # None here: a re-subscription failed (the directory was missing)
        forked = self._pid != os.getpid()
        if sub is not None and not forked and not getattr(sub, "stale", False):
            if self._root_check:
                self._root_check = False
                root_sub = self._root_sub
                if root_sub is not None and getattr(root_sub, "stale", False):
                    self._subscribe_root()  # the spool directory moved: watch what is there now
                    self._must_list = True
            return
        if forked:
            # The parent's threads may have held the Event's lock at fork time.
            self._wake = threading.Event()
            self._pid = os.getpid()
        if sub is not None:
            sub.close()  # inert for a subscription inherited across fork
            self._sub = None
        if forked:
            root_sub, self._root_sub = self._root_sub, None
            if root_sub is not None:
                root_sub.close()
        self._subscribe()
        if forked:
            self._clock_token = 0  # scheduled with the child's clock at the next listing
            _clock.attach(self)

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop watching; a ``dequeue`` waiting in another thread returns None. Idempotent."""
        self._closed = True
        _clock.remove(self)
        self._wake.set()
        sub, self._sub = self._sub, None
        if sub is not None:
            sub.close()
        root_sub, self._root_sub = self._root_sub, None
        if root_sub is not None:
            root_sub.close()

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
        """A fresh pass over the whole queue directory (replaces the current one)."""
        self._must_list = False
        self._rescan_due = False
        self._drain_hints()
        self._hinted.clear()  # announced before this listing: the listing has them
        try:
            st = os.stat(self._qdir)
            self._follow(st)
            if self._due_ino:
                # Names deferred as not due: the listing's inode numbers (free, d_ino)
                # tell which were moved back into the queue since, maybe due earlier.
                inodes = self._list_inodes()
                names = list(inodes)
            else:
                names = self.spool._list_names(self._qdir)
        except FileNotFoundError:
            raise NotASpoolError("queue directory disappeared", self._qdir) from None
        if self._watched is not None and self._watched != (st.st_dev, st.st_ino):
            # Replaced by another directory: watch the new one, and list it then.
            sub = self._sub
            if sub is not None:
                sub.close()
            self._subscribe()
            self._relist()
            return
        if self._clock_token == 0:
            _clock.add(self, time.monotonic())  # rescans are scheduled from the first listing on
        racy = time.time() - st.st_mtime < RACY_MTIME
        self._listed = ((st.st_dev, st.st_ino, st.st_mtime_ns), racy)
        if self._due_ino:
            self._forget_requeued(inodes)
        names.sort(reverse=True)
        self._pending = names
        self._pending_listed = True

    def _follow(self, st: os.stat_result) -> None:
        """The spool works in the directories it holds open (``_layout.Layout``): if the
        queue directory's path (``st``) names another directory now, renamed there (as
        the spool's, or the spool itself, replaced), the spool follows it, and every
        directory of the spool renamed meanwhile; a symlink found there is refused
        (NotASpoolError naming it)."""
        held = _fs.held_ident(self._qdir)
        if held is not None and held != (st.st_dev, st.st_ino):
            self.spool._layout.refresh()

    def _list_inodes(self) -> dict[str, int]:
        """The queue's entry names (dot-names skipped) with their inode numbers as the
        directory listing gives them (no stat per entry)."""
        with self.spool.spoolable.throttled(), os.scandir(self._qdir) as it:
            return {e.name: e.inode() for e in it if e.name[0] != "."}

    def _forget_requeued(self, inodes: dict[str, int]) -> None:
        """After a listing: drop the not-due deferral of every name whose queue file is
        another inode now (moved back into the queue, possibly due earlier, with no
        event naming it: a polling reader compares names, an event may be lost), and
        forget the names no longer in the queue."""
        for name, ino in list(self._due_ino.items()):
            now_ino = inodes.get(name)
            if now_ino is None:
                del self._due_ino[name]
            elif now_ino != ino:
                self._requeued(name, listed=True)  # confirmed by lstat (d_ino may differ)

    def _drain_hints(self) -> None:
        hints = self._hints
        while True:
            try:
                name = hints.popleft()
            except IndexError:
                return
            if name is None:
                self._must_list = True
            else:
                self._hinted.add(name)
        if len(self._hinted) > MAX_HINTS:
            # A long pass while entries keep coming: one listing after it finds them all.
            self._hinted.clear()
            self._rescan_due = True

    def _take(self, *, fresh: bool) -> CheckedOutEntry[M, D] | None:
        """The next entry this reader can claim now from what it knows: the current
        pass; then, once it is done, a listing if one was asked for (an event naming
        nothing, the rescan: it also covers every name announced so far, and a steady
        stream of events cannot put it off), else the names from events and the deferred
        names now ready, else a listing if ``fresh`` and none was made in this call.
        None if there is nothing to take."""
        self._check_watch()
        listed = False
        while not self._closed:
            self._drain_hints()
            if self._must_list:
                self._relist()
                listed = True
            if not self._pending:
                ready = self._not_before.pop_ready(time.monotonic()) if self._not_before else []
                if ready:
                    # Deferred names whose time came (a delayed entry now due, a busy one
                    # to retry) go before a requested listing, which can take milliseconds
                    # in a large directory: the timer was set for them. Each deferral
                    # comes back once, so this never puts the listing off for long.
                    self._hinted.update(ready)
                elif self._rescan_due:
                    self._relist()
                    listed = True
                    continue
                if self._hinted:
                    self._pending = sorted(self._hinted, reverse=True)
                    self._pending_listed = False
                    self._hinted.clear()
                elif fresh and not listed:
                    self._relist()
                    listed = True
                    continue
                else:
                    return None
            co = self._take_pending()
            if co is not None:
                return co
        return None

    def _take_pending(self) -> CheckedOutEntry[M, D] | None:
        pending = self._pending
        not_before = self._not_before
        while pending and not self._closed:
            name = pending.pop()
            if not_before and not_before.blocks(name, time.monotonic()) and not self._requeued(name):
                continue  # comes back through pop_ready() when its time comes
            try:
                # Alone, a busy lock is an enqueuer finishing: worth a short spin. Among
                # competing readers it is a rival about to take the entry: move on.
                spin = BUSY_SPIN if self._loss_rate <= LOSS_RATE_SKIP else 0.0
                co = self.spool._claim(self.queue, name, busy_wait=spin, raise_busy=True, when_due=True)
            except _NotDue as e:
                # Not due yet: not tried again (no lock, no read) before its due time.
                wait = min(e.due - time.time(), DUE_RECHECK)
                not_before.defer(name, time.monotonic() + wait)
                self._due_ino[name] = e.ino
                continue
            except _Busy:
                self._busy_seen = True
                not_before.defer(name, time.monotonic() + self._busy_delay)
                self._skip_ahead(pending)
                continue
            except CorruptEntryError as e:
                if e.quarantined_to is None:
                    raise
                continue  # quarantined (and logged): go on with the next one
            except OSError as e:
                # This one entry's trouble (unreadable, a symlink or FIFO planted at its
                # registry name...), logged with its path: the others go on. Giving it
                # back is itself an arrival event: without the deferral this reader
                # would retry it at once, forever.
                retry = self.rescan_interval
                log.warning("multispool: skipping %s/%s for %g s: %s", self._qdir, name, retry, e)
                not_before.defer(name, time.monotonic() + retry)
                continue
            if co is not None:
                self._busy_delay = BUSY_RETRY_FIRST
                self._loss_rate = 0.0
                sub = self._sub
                if sub is not None and getattr(sub, "mode", None) == "polling":
                    # A polling watch cannot tell this name leaving and coming back
                    # between two polls from its staying: it must know we took it.
                    sub.took(name)
                return co
            if self._pending_listed:
                self._skip_ahead(pending)
            else:
                # An event's name that is gone already (taken by another reader, or
                # announced twice): not a sign of readers trailing each other in a
                # listing. A polling watch lists the path: it may have seen a directory
                # renamed there, which the spool does not hold yet.
                sub = self._sub
                if sub is not None and getattr(sub, "mode", None) == "polling" and self._moved():
                    self._must_list = True
                    return None
        return None

    def _moved(self) -> bool:
        """True if the queue directory's path names another directory than the spool
        holds (or none)."""
        try:
            st = os.stat(self._qdir)
        except OSError:
            return True  # the listing says what is wrong
        held = _fs.held_ident(self._qdir)
        return held is not None and held != (st.st_dev, st.st_ino)
        return None

    def _requeued(self, name: str, listed: bool = False) -> bool:
        """For a name deferred as not due, announced by an event (or whose inode changed
        in a listing, ``listed``): True (and the deferral dropped) if its queue file is
        another inode now: it was moved back into the queue, possibly due earlier. One
        lstat, only for such names."""
        ino = self._due_ino.get(name)
        if ino is None or (self._pending_listed and not listed):
            return False
        try:
            now_ino = os.lstat(self.spool._layout.queue_file(self._dirname, name)).st_ino
        except OSError:
            return False
        if now_ino == ino:
            return False
        del self._due_ino[name]
        self._not_before.discard(name)
        return True

    def _skip_ahead(self, pending: list[str]) -> None:
        # Another reader took (or is taking) this name.
        self._loss_rate = self._loss_rate * 0.75 + 0.25
        if self._loss_rate > LOSS_RATE_SKIP and pending and self._pending_listed:
            skip = random.randrange(len(pending) // 2 + 1)
            if skip:
                del pending[len(pending) - skip :]

    def _next_wait(self, now: float, deadline: float | None) -> float | None:
        """Seconds a waiting reader may block before it has something to do (a deferred
        name becomes ready, ``deadline``); None: until woken."""
        wait: float | None = None
        earliest = self._not_before.earliest() if self._not_before else None
        if earliest is not None:
            wait = max(0.0, earliest - now)
            if self._busy_seen:
                self._busy_seen = False
                self._busy_delay = min(self._busy_delay * 2, BUSY_RETRY_MAX)
        if deadline is not None:
            wait = deadline - now if wait is None else min(wait, deadline - now)
        # A deadline beyond what a thread can wait for (timeout=math.inf): wait in parts.
        return wait if wait is None or wait <= MAX_WAIT else MAX_WAIT

    def dequeue_available(self) -> CheckedOutEntry[M, D] | None:
        """The next entry that is due and can be claimed now, else None. Never waits."""
        return self._take(fresh=True)

    def dequeue(
        self, stop: threading.Event | None = None, timeout: Duration | None = None
    ) -> CheckedOutEntry[M, D] | None:
        """The next entry, waiting for one (filesystem events, plus a rescan every
        ``rescan_interval`` if the directory changed unseen). None once ``stop`` is set,
        ``timeout`` passes, or the reader is closed."""
        deadline = None if timeout is None else time.monotonic() + timeout_seconds(timeout)
        while True:
            if self._closed or (stop is not None and stop.is_set()):
                return None
            # Cleared BEFORE looking: a wake after this (a hint, a rescan request) makes
            # the wait below return at once.
            self._wake.clear()
            now = time.monotonic()
            last = deadline is not None and now >= deadline
            co = self._take(fresh=last)  # one last listing at the deadline
            if co is not None or last:
                return co
            # The time after looking: a due time is waited for from now, not from before
            # the pass (which may have taken a while).
            self._wait(self._next_wait(time.monotonic(), deadline), stop)

    def _wait(self, wait: float | None, stop: threading.Event | None) -> None:
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
    def _process(self, co: CheckedOutEntry[M, D], f: Handler[M, D], on_error: Backoff | None = None) -> None:
        try:
            action = f(co.contents, co.data_file)
        except Exception as e:
            if on_error is not None and Spool._on_failure(co, on_error, e):
                return
            co._release_after(e, let_go=True)
            raise
        except BaseException as e:
            co._release_after(e, let_go=True)
            raise
        try:
            Spool._finish(co, action)
        except BaseException as e:
            co._release_after(e, let_go=True)
            raise

    def iter(
        self, f: Handler[M, D], stop: threading.Event | None = None, on_error: Backoff | None = None
    ) -> None:
        """Process entries with ``f(metadata, data_file) -> Save(...) | Retry(...) |
        REMOVE``; when none are left, wait for new ones (and for delayed ones to become
        due), until ``stop`` is set (or the reader is closed). If ``f`` raises: with
        ``on_error=None`` that entry goes back unchanged and the exception propagates;
        with a Backoff policy the exception is logged, the entry retried later or
        dead-lettered by the policy, and ``iter`` goes on."""
        policy = self.spool._check_policy(on_error, self.queue)
        while True:
            co = self.dequeue(stop=stop)
            if co is None:
                return
            self._process(co, f, policy)

    def iter_available(self, f: Handler[M, D]) -> None:
        """Process the entries present in one fresh listing of the queue with ``f`` (as
        ``iter`` does), then return."""
        self._check_watch()
        self._relist()
        while True:
            co = self._take_pending()
            if co is None:
                return
            self._process(co, f)

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.observer
        return f"QueueReader({self.spool.dir!r}, {self.queue}, {state})"
