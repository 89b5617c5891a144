"""Monitor (fsck) of a spool, and the daemon that turns its findings into alerts.

The checks are those of the OCaml ``Multispool.Monitor``: tmp files older than a limit,
queue entries older than their queue's limit, checkouts older than a limit, files with no
registry file (``Orphaned`` in their dir), registry files with no queue or checkout file
(``Orphaned`` in ``Dir.REGISTRY``) or with more than one (``Duplicated``). Beyond the
OCaml monitor: a checkout whose owner lock is free (``DeadCheckout``: its process died).

Under load (enqueues, claims and saves running), a listing is a blur of moments: a name
seen in no queue or in two may just be moving. Every candidate is therefore re-checked
under its owner lock before it is reported: a name whose lock is held by another process
is in progress (an enqueue, a checkout, a removal), never a problem; with the lock taken
briefly, nobody can move the entry, so where it is then is the truth. ``fsck`` on a healthy
spool thus reports nothing however busy it is.

Cost: one ``os.scandir`` pass per spool directory; a file is stat'ed only when its mtime
is needed (every tmp and checkout file, the files of queues that have an age limit, and
candidate problems). Candidates are re-checked on disk before they are reported, so an
entry that moves between two listings (an enqueue, a claim, a save) is not reported.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Final, Union

from . import _fs, _lostfound, _schedule
from ._errors import CorruptEntryError
from ._layout import CHECKOUT, KEEP_PREFIX, LOST_FOUND, REGISTRY, TMP, Dir, Layout
from ._spool import _NOT_A_FILE, Spool, _Recovery
from ._spoolable import Duration, Spoolable, seconds

log = logging.getLogger("multispool")

__all__ = [
    "DeadCheckout",
    "Duplicated",
    "End",
    "Event",
    "FileWithMtime",
    "Limits",
    "Monitor",
    "MonitorDaemon",
    "Orphaned",
    "Problem",
    "Start",
    "TooOld",
]


@dataclass(frozen=True, order=True)
class FileWithMtime:
    """A file in one spool directory: its ``filename`` (the entry name) and its ``mtime``
    (float seconds since the epoch)."""

    filename: str
    mtime: float


class _Ordered:
    """Total order across the kinds of a sum type: first by kind (``_RANK``, the order of
    the OCaml variant), then by the fields."""

    _RANK: ClassVar[int]

    def _key(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def _cmp_key(self, other: object) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
        if not isinstance(other, _Ordered) or _family(self) is not _family(other):
            return None
        return (self._RANK, *self._key()), (other._RANK, *other._key())

    def __lt__(self, other: object) -> bool:
        k = self._cmp_key(other)
        return NotImplemented if k is None else k[0] < k[1]

    def __le__(self, other: object) -> bool:
        k = self._cmp_key(other)
        return NotImplemented if k is None else k[0] <= k[1]

    def __gt__(self, other: object) -> bool:
        k = self._cmp_key(other)
        return NotImplemented if k is None else k[0] > k[1]

    def __ge__(self, other: object) -> bool:
        k = self._cmp_key(other)
        return NotImplemented if k is None else k[0] >= k[1]


def _family(x: _Ordered) -> type:
    return _ProblemBase if isinstance(x, _ProblemBase) else _EventBase


class _ProblemBase(_Ordered):
    __slots__ = ()


class _EventBase(_Ordered):
    __slots__ = ()


@dataclass(frozen=True, eq=True)
class TooOld(_ProblemBase):
    """A ``file`` in directory ``dir`` older than that directory's limit (a waiting entry
    past its queue's ``max_queue_ages``, a checkout past ``max_checked_out_age``, a tmp
    file past ``max_tmp_file_age``)."""

    file: FileWithMtime
    dir: Dir
    _RANK: ClassVar[int] = 0

    def _key(self) -> tuple[Any, ...]:
        return (self.file, self.dir)


@dataclass(frozen=True, eq=True)
class Orphaned(_ProblemBase):
    """A ``file`` in directory ``dir`` with no registry file, or (when ``dir`` is
    ``Dir.REGISTRY``) a registry file with no queue or checkout file."""

    file: FileWithMtime
    dir: Dir
    _RANK: ClassVar[int] = 1

    def _key(self) -> tuple[Any, ...]:
        return (self.file, self.dir)


@dataclass(frozen=True, eq=True)
class Duplicated(_ProblemBase):
    """A registered name (``file``) present in more than one queue or checkout dir
    (``dirs`` in queue order, each queue's dir before its checkout dir)."""

    file: FileWithMtime
    dirs: tuple[Dir, ...]
    _RANK: ClassVar[int] = 2

    def _key(self) -> tuple[Any, ...]:
        return (self.file, self.dirs)


@dataclass(frozen=True, eq=True)
class DeadCheckout(_ProblemBase):
    """A checked-out ``file`` in checkout directory ``dir`` whose owner lock is free: the
    process that checked it out died, so nobody will ever finish it (``fsck --repair`` /
    ``Spool.recover_checkouts`` puts it back into its queue). Reported at once, whatever
    its age."""

    file: FileWithMtime
    dir: Dir
    _RANK: ClassVar[int] = 3

    def _key(self) -> tuple[Any, ...]:
        return (self.file, self.dir)


Problem = Union[TooOld, Orphaned, Duplicated, DeadCheckout]  # noqa: UP007 - a runtime alias on 3.10


@dataclass(frozen=True, eq=True)
class Start(_EventBase):
    """``problem`` has been seen in more than ``alert_after_cycles`` consecutive checks;
    ``time`` is when that was noticed (seconds since the epoch)."""

    time: float
    problem: Problem
    _RANK: ClassVar[int] = 0

    def _key(self) -> tuple[Any, ...]:
        return (self.time, self.problem)


@dataclass(frozen=True, eq=True)
class End(_EventBase):
    """A ``problem`` that was alerted (``Start``) is no longer seen, as of ``time``
    (seconds since the epoch)."""

    time: float
    problem: Problem
    _RANK: ClassVar[int] = 1

    def _key(self) -> tuple[Any, ...]:
        return (self.time, self.problem)


Event = Union[Start, End]  # noqa: UP007


@dataclass(frozen=True)
class Limits:
    """Age limits for the Monitor, in seconds (float, int or timedelta accepted).

    ``max_checked_out_age``: a checkout held longer is reported (``TooOld``).
    ``max_tmp_file_age``: a file in ``.tmp`` older than this is reported.
    ``max_queue_ages`` maps a queue member to how long an entry may wait in it; queues
    without one have no age limit."""

    max_checked_out_age: float = 600.0
    max_tmp_file_age: float = 600.0
    max_queue_ages: Mapping[enum.Enum, float] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )

    def __init__(
        self,
        max_checked_out_age: Duration = 600,
        max_tmp_file_age: Duration = 600,
        max_queue_ages: Mapping[enum.Enum, Duration] | None = None,
    ) -> None:
        ages = {q: seconds(a) for q, a in (max_queue_ages or {}).items()}
        object.__setattr__(self, "max_checked_out_age", seconds(max_checked_out_age))
        object.__setattr__(self, "max_tmp_file_age", seconds(max_tmp_file_age))
        object.__setattr__(self, "max_queue_ages", MappingProxyType(ages))


def _due(registry_file: str) -> float:
    """The due time in an entry's schedule record (0.0: due now, or unreadable)."""
    try:
        return _schedule.read_path(registry_file).due
    except OSError:
        return 0.0


def _lstat_mtime(path: str) -> float | None:
    try:
        return os.lstat(path).st_mtime
    except OSError as e:
        if _fs.gone(e):  # ESTALE: removed through another client of a shared filesystem
            return None
        raise


class _Listing:
    """One pass over a directory, dot-names skipped. With ``stat``, an ``os.scandir``
    pass keeping the DirEntry objects (their ``stat`` gives the mtimes); without, a plain
    ``os.listdir`` (the same getdents calls, but 2-3x faster in Python: no DirEntry
    objects) for directories where only names matter."""

    __slots__ = ("entries", "names")

    def __init__(self, path: str, *, stat: bool) -> None:
        self.entries: dict[str, os.DirEntry[str]] = {}
        self.names: set[str] = set()
        try:
            if stat:
                with os.scandir(path) as it:
                    self.entries = {e.name: e for e in it if e.name[0] != "."}
                self.names = set(self.entries)
            else:
                self.names = {n for n in os.listdir(path) if n[0] != "."}
        except FileNotFoundError:
            pass  # .data may be absent in an OCaml-made spool; a vanished dir is empty

    @staticmethod
    def regular(e: os.DirEntry[str]) -> bool:
        """Whether the entry is a regular file (a symlink is not followed); True if it
        vanished since the listing (nothing to report)."""
        try:
            return e.is_file(follow_symlinks=False)
        except OSError:
            return True

    @staticmethod
    def mtime(e: os.DirEntry[str]) -> float | None:
        """The entry's mtime, None if it vanished since the listing."""
        try:
            return e.stat(follow_symlinks=False).st_mtime
        except OSError as err:
            if _fs.gone(err):
                return None
            raise


# What ``_owner_lock`` yields for a registry name that is no regular file (a symlink,
# FIFO or directory planted there): nobody can ever hold its lock, so nobody owns the
# entry, and the check treats it as an entry whose lock it holds (never by descriptor).
UNLOCKABLE: Final = -1


@contextlib.contextmanager
def _owner_lock(path: str) -> Iterator[int | None]:
    """Hold the owner lock of registry file ``path`` for the block: the descriptor, or None
    if another process holds it or the file is gone, or ``UNLOCKABLE`` if it is no
    regular file (a symlink is never followed). The lock is taken and released
    through ``_fs`` (which tracks held lock descriptors for fork safety), never by a bare
    ``os.close``."""
    gen = _fs.lock_generation()
    try:
        fd = _fs.open_locked(path)
    except OSError as e:
        if e.errno not in _NOT_A_FILE:
            raise
        fd = None
        unlockable = True
    else:
        unlockable = False
    if unlockable:
        yield UNLOCKABLE
        return
    try:
        yield fd
    finally:
        if fd is not None:
            _fs.unlock(fd, gen)


def _where(paths: Iterable[tuple[Dir, str]], name: str) -> list[Dir]:
    return [d for d, path in paths if os.path.lexists(os.path.join(path, name))]


class Monitor:
    """Checks a spool for problems: entries, checkouts and tmp files older than their
    ``limits``, orphaned files, names in more than one place.

    ``spool_dir`` is the spool, described by ``spoolable``; ``limits`` (default:
    ``Limits()``) sets the ages. Construction loads the spool with validation
    (``Spool.load``) and never creates anything; a missing or malformed spool raises
    ``NotASpoolError``.
    """

    def __init__(
        self, spool_dir: str | os.PathLike[str], spoolable: Spoolable[Any, Any], limits: Limits | None = None
    ) -> None:
        limits = Limits() if limits is None else limits
        for q in limits.max_queue_ages:
            spoolable.dirname(q)  # ValueError if q is not one of the spoolable's queues
        self.spool: Spool[Any, Any] = Spool.load(spool_dir, spoolable)
        self.limits = limits
        self._layout = Layout(self.spool.dir)
        # The last check's checkouts whose owner lock was free here on a filesystem where
        # that proves nothing (see _dead_checkouts): no problems, shown by fsck as unproven.
        self._unproven: list[DeadCheckout] = []

    def run_once(self) -> list[Problem]:
        """Check the spool now; the problems found, sorted."""
        now = time.time()
        sp = self.spool.spoolable
        lay = self._layout
        lim = self.limits
        problems: list[Problem] = []
        unproven: list[DeadCheckout] = []
        # Listing order: queue files before the registry, so that a registry file removed
        # after its queue file (the order of every removal) is rarely a false orphan;
        # candidates are re-checked on disk anyway.
        queue_dirs: list[tuple[Dir, str, _Listing]] = []
        for q in sp._queue_list:
            dn = sp.dirname(q)
            limited = q in lim.max_queue_ages
            queue_dirs.append((Dir.queue(q), lay.queue(dn), _Listing(lay.queue(dn), stat=limited)))
            queue_dirs.append((Dir.checkout(q), lay.checkout(dn), _Listing(lay.checkout(dn), stat=True)))
        tmp = _Listing(lay.tmp, stat=True)
        data = _Listing(lay.data, stat=False)
        registry = _Listing(lay.registry, stat=True)
        reg = registry.names
        # Junk at a registry name (a symlink, FIFO or directory planted there, told by
        # the listing's file type, no stat) registers nothing: nobody can lock it.
        junk = {n for n, e in registry.entries.items() if not _Listing.regular(e)}

        reg_dir_of = [(d, path) for d, path, _ in queue_dirs]
        counts: dict[str, int] = {}
        for _, _, listing in queue_dirs:
            for name in listing.names & reg:
                counts[name] = counts.get(name, 0) + 1
        # A file with no registry file is reported once, as Orphaned (not also TooOld).
        tmp_orphans = self._orphans(tmp, Dir.TMP, lay.tmp, reg, problems)
        for name, e in tmp.entries.items():
            m = _Listing.mtime(e)
            if name not in tmp_orphans and m is not None and now - m > lim.max_tmp_file_age:
                problems.append(TooOld(FileWithMtime(name, m), Dir.TMP))
        self._orphans(data, Dir.DATA, lay.data, reg, problems)
        for d, path, listing in queue_dirs:
            is_checkout = d == Dir.checkout(d.queue_member)
            limit = lim.max_checked_out_age if is_checkout else lim.max_queue_ages.get(d.queue_member)
            orphans = self._orphans(listing, d, path, reg, problems)
            if not is_checkout and junk:
                # A waiting entry nobody can claim. (A checkout with junk there is one
                # nobody holds: DeadCheckout, below.)
                orphans |= self._junk_registered(listing.names & junk, d, path, problems)
            if limit is not None:
                for name, e in listing.entries.items():
                    m = _Listing.mtime(e)
                    if name not in orphans and m is not None and now - m > limit:
                        # A delayed entry waits on purpose: its age in the queue counts
                        # from its due time (read only for entries that look too old).
                        if not is_checkout and now - max(m, _due(lay.registry_file(name))) <= limit:
                            continue
                        problems.append(TooOld(FileWithMtime(name, m), d))
            if is_checkout:
                # A name seen in several dirs is reported once, as Duplicated (below).
                once = {n for n in listing.names if counts.get(n) == 1}
                self._dead_checkouts(once, d, path, problems, unproven)

        # Registry files in no queue/checkout dir, or in several.
        for name in reg - {n for n, c in counts.items() if c == 1}:
            # Re-check where it is now, first without the lock (cheap: most candidates
            # were just moving between two of our listings), then under it.
            if len(_where(reg_dir_of, name)) == 1:
                continue
            with _owner_lock(lay.registry_file(name)) as fd:
                if fd is None and _fs.HAVE_LOCKS:
                    continue  # an enqueue, checkout or removal in progress; or gone
                where = _where(reg_dir_of, name)
                if len(where) == 1:
                    continue
                if not where and any(
                    os.path.lexists(os.path.join(d, name)) for d in self.spool._entry_dirs()
                ):
                    continue  # in a queue of another Spoolable sharing the spool
                m = _lstat_mtime(lay.registry_file(name))
            if m is None:
                continue  # removed meanwhile
            fwm = FileWithMtime(name, m)
            problems.append(Orphaned(fwm, Dir.REGISTRY) if not where else Duplicated(fwm, tuple(where)))
        problems.sort()
        self._unproven = sorted(unproven)
        return problems

    def _orphans(
        self, listing: _Listing, d: Dir, dir_path: str, reg: set[str], problems: list[Problem]
    ) -> set[str]:
        """Report the files of ``listing`` with no registry file; their names."""
        found: set[str] = set()
        for name in listing.names - reg:
            # Re-check: an enqueue may have registered the name after our listing. Once
            # more after the file is seen: a name freed by a removal may be taken again
            # between the two looks (registry file, then the file), so the file seen may
            # be a new entry's, whose registry file came just after the first look.
            reg_file = self._layout.registry_file(name)
            if os.path.lexists(reg_file):
                continue
            m = _lstat_mtime(os.path.join(dir_path, name))
            if m is not None and not os.path.lexists(reg_file):
                problems.append(Orphaned(FileWithMtime(name, m), d))
                found.add(name)
        return found

    def _junk_registered(self, names: set[str], d: Dir, dir_path: str, problems: list[Problem]) -> set[str]:
        """Report the files of ``names`` in ``dir_path`` whose registry name is still no
        regular file (checked again: never opened) as ``Orphaned``: no registry file
        registers them. Their names."""
        found: set[str] = set()
        for name in names:
            try:
                st = os.lstat(self._layout.registry_file(name))
            except OSError as e:
                if _fs.gone(e):
                    continue
                raise
            if stat_mod.S_ISREG(st.st_mode):
                continue  # replaced by a real registration meanwhile
            m = _lstat_mtime(os.path.join(dir_path, name))
            if m is not None:
                problems.append(Orphaned(FileWithMtime(name, m), d))
                found.add(name)
        return found

    def _dead_checkouts(
        self, names: set[str], d: Dir, dir_path: str, problems: list[Problem], unproven: list[DeadCheckout]
    ) -> None:
        """Report the checkouts whose owner lock is free (checked with the lock taken for
        an instant: a live owner holds it, so only a dead one's checkout is reported).
        Where the filesystem does not share locks between its mounts or clients, a lock
        free here may be held through another mount: no proof of death, so such a
        checkout goes to ``unproven`` instead, never to ``problems``."""
        if not _fs.HAVE_LOCKS:  # pragma: no cover - Windows: no owner locks to ask
            return
        found = problems if self.spool._fs_facts().locks_shared else unproven
        for name in names:
            with _owner_lock(self._layout.registry_file(name)) as fd:
                if fd is None:
                    continue  # a live owner (or removed meanwhile)
                m = _lstat_mtime(os.path.join(dir_path, name))
            if m is not None:
                found.append(DeadCheckout(FileWithMtime(name, m), d))


class _Alerter:
    """The alerting state machine of MonitorDaemon, apart from threads and clocks:
    counts consecutive sightings of each problem and emits Start/End events."""

    def __init__(self, alert_after_cycles: int) -> None:
        self.alert_after_cycles = alert_after_cycles
        self._seen: dict[Problem, int] = {}
        self._public: set[Problem] = set()

    def update(self, problems: Iterable[Problem], now: float) -> list[Event]:
        """Feed one check's problems; the events it causes, ends first (as OCaml)."""
        seen = {p: self._seen.get(p, 0) + 1 for p in problems}
        self._seen = seen
        public = {p for p, n in seen.items() if n > self.alert_after_cycles}
        ends: list[Event] = [End(now, p) for p in sorted(self._public - public)]
        starts: list[Event] = [Start(now, p) for p in sorted(public - self._public)]
        self._public = public
        return ends + starts


class MonitorDaemon:
    """Runs a Monitor every ``check_every`` seconds and reports problems that persist:
    a problem is alerted once seen in more than ``alert_after_cycles`` consecutive checks
    (so a transient state, such as an enqueue in progress, raises no alert)."""

    def __init__(self, check_every: Duration = 15, alert_after_cycles: int = 2) -> None:
        self.check_every = seconds(check_every)
        if not self.check_every > 0:
            raise ValueError(f"check_every must be positive, got {check_every!r}")
        if isinstance(alert_after_cycles, bool) or not isinstance(alert_after_cycles, int):
            raise TypeError(f"alert_after_cycles must be an int, got {alert_after_cycles!r}")
        if alert_after_cycles < 0:
            raise ValueError(f"alert_after_cycles must be >= 0, got {alert_after_cycles}")
        self.alert_after_cycles = alert_after_cycles

    def start(
        self,
        monitor: Monitor,
        callback: Callable[[Event], object],
        stop: threading.Event | None = None,
    ) -> threading.Thread:
        """Start a daemon thread that runs ``monitor`` at once, then every ``check_every`` seconds,
        calling ``callback(Start(...))`` when a problem has been seen in more than
        ``alert_after_cycles`` consecutive checks and ``callback(End(...))`` when an
        alerted problem is no longer seen. It runs until ``stop`` is set (forever if None).
        A check or callback that raises is logged; the daemon goes on."""
        stop_event = threading.Event() if stop is None else stop
        alerter = _Alerter(self.alert_after_cycles)
        every = self.check_every

        def loop() -> None:
            while not stop_event.is_set():
                started = time.monotonic()
                try:
                    events = alerter.update(monitor.run_once(), time.time())
                except Exception:
                    log.exception("multispool monitor: check of %s failed", monitor.spool.dir)
                    events = []
                for ev in events:
                    try:
                        callback(ev)
                    except Exception:
                        log.exception("multispool monitor: callback raised on %r", ev)
                # Keep a steady period whatever the check cost. A wait longer than
                # threading.TIMEOUT_MAX (about 292 years; an infinite period) raises
                # OverflowError: clamped, the daemon then waits that long, as asked.
                left = every - (time.monotonic() - started)
                stop_event.wait(min(max(0.0, left), threading.TIMEOUT_MAX))

        t = threading.Thread(target=loop, name=f"multispool-monitor {monitor.spool.dir}", daemon=True)
        t.start()
        return t


# -- repair ---------------------------------------------------------------------------------
class _Repair:
    """One ``repair`` run: the spool, the limits, dry-run or not, and the actions said.
    Each kind of repair is one method (a step), run in the order of ``repair``."""

    def __init__(
        self,
        spool: Spool[Any, Any],
        limits: Limits,
        dry_run: bool,
        dead_after: float | None = None,
        unproven: Iterable[DeadCheckout] = (),
    ) -> None:
        self.spool = spool
        self.lay = Layout(spool.dir)
        self.limits = limits
        self.dry_run = dry_run
        self.dead_after = dead_after
        self.unproven = sorted(unproven)
        self.done: list[str] = []

    def say(self, verb: str, past: str, rest: str) -> None:
        """Record one action: ``would VERB rest`` in a dry run, else ``PAST rest``."""
        self.done.append(f"would {verb} {rest}" if self.dry_run else f"{past} {rest}")

    def path(self, d: Dir, name: str) -> str:
        return os.path.join(self.lay.dir, d.name_on_disk, name)

    @property
    def full(self) -> bool:
        return self.spool.spoolable.durability == "full"

    def put_aside(self, name: str, files: list[tuple[Dir, str]]) -> list[Dir]:
        """Move the files (dir, name) of ``name`` into one ``.lost+found`` item; the dirs
        whose file was there (all of them in a dry run)."""
        present = [d for d, _ in files if os.path.lexists(self.path(d, name))]
        if not self.dry_run:
            _lostfound.put_aside(
                self.lay, name, [(self.path(d, n), _label(d)) for d, n in files], sync=self.full,
                mode=self.spool.spoolable.dir_mode,
            )
        return present

    def keep_links(self, problems: list[Problem]) -> None:
        """Keep links of moves a crash interrupted (see ``_layout``): under the owner
        lock, dropped if the entry is in place, else renamed back (the move undone)."""
        sp = self.spool.spoolable
        for q in sp._queue_list:
            dn = sp.dirname(q)
            for d in (self.lay.queue(dn), self.lay.checkout(dn)):
                try:
                    keeps = sorted(n for n in os.listdir(d) if n.startswith(KEEP_PREFIX))
                except FileNotFoundError:
                    continue
                for k in keeps:
                    rel = f"{os.path.relpath(d, self.lay.dir)}/{k}"
                    self.say("resolve", "resolved", f"keep link {rel} of an interrupted move")
            if not self.dry_run:
                self.spool._resolve_keeps(dn)

    def duplicates(self, problems: list[Problem]) -> None:
        """Under the owner lock, keep the copy with the newest mtime (the last transition
        written: claims and saves set it), ties to the one latest in queue order; the other
        copies go if they are the same file or bytes, else to ``.lost+found``."""
        for p in problems:
            if not isinstance(p, Duplicated):
                continue
            name = p.file.filename
            with _owner_lock(self.lay.registry_file(name)) as fd:
                if fd is None:
                    self.done.append(f"left duplicated {name}: held by a live process")
                    continue
                copies = [
                    (m, i, d)
                    for i, d in enumerate(p.dirs)
                    if (m := _lstat_mtime(self.path(d, name))) is not None
                ]
                if len(copies) < 2:
                    continue
                keep = max(copies)[2]
                kept = f"{keep.name_on_disk}/{name}"
                for _, _, d in copies:
                    if d == keep:
                        continue
                    what = f"duplicate {d.name_on_disk}/{name}"
                    if _lostfound.same_file(self.path(d, name), self.path(keep, name)):
                        if not self.dry_run:
                            _fs.unlink_quiet(self.path(d, name))
                            if self.full:
                                _fs.fsync_dir(os.path.dirname(self.path(d, name)))
                        self.say("remove", "removed", f"{what} (kept {kept})")
                    else:
                        # Never delete data: a copy that differs is kept aside.
                        self.put_aside(name, [(d, name)])
                        self.say("move", "moved", f"differing {what} to {LOST_FOUND} (kept {kept})")

    def dead_checkouts(self, problems: list[Problem]) -> None:
        """Put each dead checkout back into its queue through the recovery run of
        ``Spool.recover_checkouts`` (under its owner lock); an undecodable one is
        quarantined or left. With ``dead_after``, only checkouts at least that old, and
        then also those whose free lock proves nothing on this filesystem (``unproven``,
        which are left alone without it)."""
        sp = self.spool.spoolable
        found = [p for p in problems if isinstance(p, DeadCheckout)]
        if self.dead_after is not None:
            found = sorted(found + self.unproven)
        if not found:
            return
        run = None if self.dry_run else _Recovery(self.spool, self.dead_after)
        now = time.time()
        for p in found:
            q = p.dir.queue_member
            dn = sp.dirname(q)
            name = p.file.filename
            what = f"dead checkout {dn}/{CHECKOUT}/{name}"
            if self.dead_after is not None and now - p.file.mtime < self.dead_after:
                self.done.append(f"left {what}: younger than --dead-after")
                continue
            if run is None:
                self._predict_dead_checkout(q, name, what)
                continue
            r = run.recover(q, name)
            if r.moved:
                self.say("recover", "recovered", f"{what} into {dn}")
            elif r.error is not None:
                self.done.append(f"left {what}: {r.error}")
            elif os.path.lexists(self.lay.checkout_file(dn, name)):
                self.done.append(f"left {what}: its owner is alive again or its metadata "
                                 "cannot be read (see the log)")
            elif sp.quarantine is not None and os.path.lexists(
                self.lay.queue_file(sp.dirname(sp.quarantine), name)
            ):
                self.say("quarantine", "quarantined", f"{what} into {sp.dirname(sp.quarantine)}")

    def _predict_dead_checkout(self, q: enum.Enum, name: str, what: str) -> None:
        """A dry run's word on dead checkout ``name``: what the recovery run would do,
        which depends on whether its metadata can be decoded (read here, nothing
        changed): put back, quarantined, or left for a person."""
        sp = self.spool.spoolable
        dn = sp.dirname(q)
        cofile = self.lay.checkout_file(dn, name)
        try:
            sp._codec.decode(_fs.read_file(cofile), cofile)
        except CorruptEntryError as e:
            why: str | None = e.reason
        except OSError as e:
            if _fs.gone(e):
                return  # its owner finished with it
            if e.errno not in _NOT_A_FILE:
                self.say("leave", "left", f"{what}: {e}")
                return
            why = str(e)
        else:
            why = None
        if why is None:
            self.say("recover", "recovered", f"{what} into {dn}")
        elif sp.quarantine is not None:
            self.say("quarantine", "quarantined", f"{what} into {sp.dirname(sp.quarantine)}")
        else:
            self.say("leave", "left", f"{what}: {CorruptEntryError(cofile, why)}")

    def orphans(self, problems: list[Problem]) -> None:
        """Files in .tmp, .data, a queue or checkout dir with no registry file, older than
        ``max_tmp_file_age``: the name is reserved first (``.registry/NAME`` created and
        locked, so nobody can start using the name meanwhile), the files are moved to
        ``.lost+found`` (never deleted), then the reservation is removed."""
        now = time.time()
        by_name: dict[str, list[Orphaned]] = {}
        for p in problems:
            if isinstance(p, Orphaned) and p.dir != Dir.REGISTRY:
                by_name.setdefault(p.file.filename, []).append(p)
        for name, ps in by_name.items():
            old = [p for p in ps if now - p.file.mtime >= self.limits.max_tmp_file_age]
            for p in ps:
                if p not in old:
                    self.done.append(f"left orphan {p.dir.name_on_disk}/{name}: younger than "
                                     "--max-tmp-file-age")
            if not old:
                continue
            reg = self.lay.registry_file(name)
            if self.dry_run:
                if not os.path.lexists(reg):
                    for p in old:
                        self.say("move", "moved", f"orphan {p.dir.name_on_disk}/{name} to {LOST_FOUND}")
                continue
            gen = _fs.lock_generation()
            fd = _fs.create_locked(self.lay.registry, reg, self.spool.spoolable.file_mode)
            if fd is None:
                continue  # registered meanwhile: no longer an orphan
            try:
                for d in self.put_aside(name, [(p.dir, name) for p in old]):
                    self.say("move", "moved", f"orphan {d.name_on_disk}/{name} to {LOST_FOUND}")
            finally:
                _fs.unlink_quiet(reg)
                _fs.unlock(fd, gen)

    def abandoned(self, problems: list[Problem]) -> None:
        """Orphaned registry files (abandoned enqueues) older than ``max_tmp_file_age`` and
        not locked: ``Spool.clean_abandoned`` removes them, their tmp and data files going
        to ``.lost+found``."""
        limit = self.limits.max_tmp_file_age
        if not self.dry_run:
            for name in self.spool._clean_abandoned(limit, keep_aside=True):
                self.say("remove", "removed", f"abandoned enqueue {name} (files, if any, to {LOST_FOUND})")
            return
        # What the run would remove, decided by its own checks (an entry a crash left as
        # a keep link only goes back into its queue, junk at a registry name is left).
        would = set(self.spool._clean_abandoned(limit, keep_aside=True, dry_run=True))
        now = time.time()
        for p in problems:
            if isinstance(p, Orphaned) and p.dir == Dir.REGISTRY:
                name = p.file.filename
                if name in would:
                    self.say("remove", "removed", f"abandoned enqueue {name}")
                    would.discard(name)
                elif now - p.file.mtime < limit:
                    self.done.append(f"left {REGISTRY}/{name}: younger than --max-tmp-file-age")
                else:
                    with _owner_lock(self.lay.registry_file(name)) as fd:
                        if fd is None:
                            self.done.append(f"left {REGISTRY}/{name}: held by a live process")
        for name in sorted(would):  # abandoned since the check
            self.say("remove", "removed", f"abandoned enqueue {name}")

    def stale_tmp(self, problems: list[Problem]) -> None:
        """TooOld tmp files of a registered entry: moved to ``.lost+found`` under its
        owner lock."""
        for p in problems:
            if not (isinstance(p, TooOld) and p.dir == Dir.TMP):
                continue
            name = p.file.filename
            tmp = self.lay.tmp_file(name)
            with _owner_lock(self.lay.registry_file(name)) as fd:
                if fd is None:
                    continue  # a live owner's (or no longer registered)
                m = _lstat_mtime(tmp)
                if m is None or time.time() - m <= self.limits.max_tmp_file_age:
                    continue
                if self.put_aside(name, [(Dir.TMP, name)]):
                    self.say("move", "moved", f"stale {TMP}/{name} to {LOST_FOUND}")


def _label(d: Dir) -> str:
    """The ``.lost+found`` label of a file from spool dir ``d`` (see ``_lostfound``)."""
    if d == Dir.TMP:
        return _lostfound.METADATA
    if d == Dir.DATA:
        return _lostfound.DATA
    if d.queue_member is not None:
        return _lostfound.queue_label(str(d.queue_member.value), checkout=d == Dir.checkout(d.queue_member))
    return d.name_on_disk.replace("/", "")


def repair(
    spool: Spool[Any, Any],
    limits: Limits,
    problems: Iterable[Problem],
    *,
    dry_run: bool,
    dead_after: float | None = None,
    unproven: Iterable[DeadCheckout] = (),
) -> list[str]:
    """Fix what is safe to fix among ``problems`` (as found by a Monitor with ``limits``);
    the actions taken (or, with ``dry_run``, that would be taken: then nothing changes),
    one sentence each ("removed ..." / "would remove ...", "left ...: why").

    Never touches an entry a live process owns (its registry lock is held), and never
    deletes data: what cannot go back into a queue goes to ``.lost+found/`` (see
    ``_lostfound``). The steps, in order, are the methods of ``_Repair``: keep links of
    interrupted moves, duplicates, dead checkouts, orphaned files, abandoned enqueues,
    stale tmp files. Entries that are merely too old in a queue or a live checkout are
    left alone.

    ``dead_after`` (seconds) is ``recover_checkouts``' proof of death by age: dead
    checkouts younger than it are left, and the ``unproven`` ones (``Monitor._unproven``:
    free locks on a filesystem where that proves nothing) older than it are recovered.
    """
    ps = sorted(problems)
    r = _Repair(spool, limits, dry_run, dead_after, unproven)
    for step in (r.keep_links, r.duplicates, r.dead_checkouts, r.orphans, r.abandoned, r.stale_tmp):
        step(ps)
    return r.done
