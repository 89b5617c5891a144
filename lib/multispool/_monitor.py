"""Monitor (fsck) of a spool, and the daemon that turns its findings into alerts.

The checks are those of the OCaml ``Multispool.Monitor``: tmp files older than a limit,
queue entries older than their queue's limit, checkouts older than a limit, files with no
registry file (``Orphaned`` in their dir), registry files with no queue or checkout file
(``Orphaned`` in ``Dir.REGISTRY``) or with more than one (``Duplicated``).

Cost: one ``os.scandir`` pass per spool directory; a file is stat'ed only when its mtime
is needed (every tmp and checkout file, the files of queues that have an age limit, and
candidate problems). Candidates are re-checked on disk before they are reported, so an
entry that moves between two listings (an enqueue, a claim, a save) is not reported.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Union

from . import _fs, _lostfound
from ._layout import CHECKOUT, LOST_FOUND, REGISTRY, TMP, Dir, Layout
from ._spool import Spool
from ._spoolable import Duration, Spoolable, seconds

log = logging.getLogger("multispool")

__all__ = [
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
    """A file name in one spool directory and its mtime (float seconds since the epoch)."""

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
    """A file older than its directory's limit."""

    file: FileWithMtime
    dir: Dir
    _RANK: ClassVar[int] = 0

    def _key(self) -> tuple[Any, ...]:
        return (self.file, self.dir)


@dataclass(frozen=True, eq=True)
class Orphaned(_ProblemBase):
    """A file with no registry file, or (in ``Dir.REGISTRY``) a registry file with no
    queue or checkout file."""

    file: FileWithMtime
    dir: Dir
    _RANK: ClassVar[int] = 1

    def _key(self) -> tuple[Any, ...]:
        return (self.file, self.dir)


@dataclass(frozen=True, eq=True)
class Duplicated(_ProblemBase):
    """A registered name present in more than one queue or checkout dir (``dirs`` in
    queue order, each queue's dir before its checkout dir)."""

    file: FileWithMtime
    dirs: tuple[Dir, ...]
    _RANK: ClassVar[int] = 2

    def _key(self) -> tuple[Any, ...]:
        return (self.file, self.dirs)


Problem = Union[TooOld, Orphaned, Duplicated]  # noqa: UP007 - a runtime alias on 3.10


@dataclass(frozen=True, eq=True)
class Start(_EventBase):
    """``problem`` has been seen in more than ``alert_after_cycles`` consecutive checks."""

    time: float
    problem: Problem
    _RANK: ClassVar[int] = 0

    def _key(self) -> tuple[Any, ...]:
        return (self.time, self.problem)


@dataclass(frozen=True, eq=True)
class End(_EventBase):
    """A problem that was alerted (``Start``) is no longer seen."""

    time: float
    problem: Problem
    _RANK: ClassVar[int] = 1

    def _key(self) -> tuple[Any, ...]:
        return (self.time, self.problem)


Event = Union[Start, End]  # noqa: UP007


@dataclass(frozen=True)
class Limits:
    """Age limits in seconds (float, int or timedelta accepted). ``max_queue_ages`` maps a
    queue member to its limit; queues without one have no age limit."""

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


def _lstat_mtime(path: str) -> float | None:
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return None


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
    def mtime(e: os.DirEntry[str]) -> float | None:
        """The entry's mtime, None if it vanished since the listing."""
        try:
            return e.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return None


class Monitor:
    """Checks a spool for the problems listed in the module docstring.

    Construction loads the spool with validation (``Spool.load``) and never creates
    anything; a missing or malformed spool raises ``NotASpoolError``.
    """

    def __init__(
        self, spool_dir: str | os.PathLike[str], spoolable: Spoolable[Any], limits: Limits | None = None
    ) -> None:
        limits = Limits() if limits is None else limits
        for q in limits.max_queue_ages:
            spoolable.dirname(q)  # ValueError if q is not one of the spoolable's queues
        self.spool: Spool[Any] = Spool.load(spool_dir, spoolable)
        self.limits = limits
        self._layout = Layout(self.spool.dir)

    def run_once(self) -> list[Problem]:
        """Check the spool now; the problems found, sorted."""
        now = time.time()
        sp = self.spool.spoolable
        lay = self._layout
        lim = self.limits
        problems: list[Problem] = []
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
        reg = _Listing(lay.registry, stat=False).names

        def too_old(listing: _Listing, d: Dir, limit: float) -> None:
            for name, e in listing.entries.items():
                m = listing.mtime(e)
                if m is not None and now - m > limit:
                    problems.append(TooOld(FileWithMtime(name, m), d))

        def orphans(listing: _Listing, d: Dir, dir_path: str) -> None:
            for name in listing.names - reg:
                # Re-check: an enqueue may have registered the name after our listing.
                if os.path.lexists(lay.registry_file(name)):
                    continue
                m = _lstat_mtime(os.path.join(dir_path, name))
                if m is not None:
                    problems.append(Orphaned(FileWithMtime(name, m), d))

        too_old(tmp, Dir.TMP, lim.max_tmp_file_age)
        orphans(tmp, Dir.TMP, lay.tmp)
        orphans(data, Dir.DATA, lay.data)
        for d, path, listing in queue_dirs:
            if d == Dir.checkout(d.queue_member):
                too_old(listing, d, lim.max_checked_out_age)
            else:
                limit = lim.max_queue_ages.get(d.queue_member)
                if limit is not None:
                    too_old(listing, d, limit)
            orphans(listing, d, path)

        # Registry files in no queue/checkout dir, or in several.
        counts: dict[str, int] = {}
        for _, _, listing in queue_dirs:
            for name in listing.names & reg:
                counts[name] = counts.get(name, 0) + 1
        for name in reg - {n for n, c in counts.items() if c == 1}:
            # Re-check where it is now: it may have moved between two of our listings.
            where = [d for d, path, _ in queue_dirs if os.path.lexists(os.path.join(path, name))]
            if len(where) == 1:
                continue
            m = _lstat_mtime(lay.registry_file(name))
            if m is None:
                continue  # removed meanwhile
            fwm = FileWithMtime(name, m)
            problems.append(Orphaned(fwm, Dir.REGISTRY) if not where else Duplicated(fwm, tuple(where)))
        problems.sort()
        return problems


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
    """Runs a Monitor every ``check_every`` seconds and reports problems that persist."""

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
        """Start a daemon thread that checks at once, then every ``check_every`` seconds,
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
                # Keep a steady period whatever the check cost.
                stop_event.wait(max(0.0, every - (time.monotonic() - started)))

        t = threading.Thread(target=loop, name=f"multispool-monitor {monitor.spool.dir}", daemon=True)
        t.start()
        return t


# -- repair ---------------------------------------------------------------------------------
def _reserve_locked(path: str) -> int | None:
    """Create registry file ``path`` (O_EXCL) and lock it: while we hold it, nobody can
    reserve, enqueue under, or claim that name. None if it exists already."""
    try:
        fd = os.open(path, _fs.O_READ | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    _fs.try_lock(fd)  # a file we just created: nobody else holds it
    return fd


def sp_full(spool: Spool[Any]) -> bool:
    return spool.spoolable.durability == "full"


def _label(d: Dir) -> str:
    """The lost+found label of a file from spool dir ``d``."""
    if d == Dir.TMP:
        return _lostfound.METADATA
    if d == Dir.DATA:
        return _lostfound.DATA
    return d.name_on_disk.replace("/", "")


def repair(spool: Spool[Any], limits: Limits, problems: Iterable[Problem], *, dry_run: bool) -> list[str]:
    """Fix what is safe to fix among ``problems`` (as found by a Monitor with ``limits``);
    the actions taken (or, with ``dry_run``, that would be taken: then nothing changes),
    one sentence each.

    Never touches an entry a live process owns (its registry lock is held), and never
    deletes data: what cannot go back into a queue is moved to ``.lost+found/`` (see
    ``_lostfound``).
      * Duplicated (a move cut short by a crash): under the registry lock, keep the copy
        with the newest mtime (the last transition written: claims and saves set it),
        ties to the one latest in queue order; unlink the other copies that are the same
        file or hold the same bytes, move the others to ``.lost+found``.
      * dead checkouts go back to their queues, and keep links of interrupted moves are
        resolved (``Spool.recover_checkouts``).
      * Orphaned files in .tmp, .data, a queue or checkout dir: the name is reserved first
        (``.registry/NAME`` created with O_EXCL and locked, so nobody can start using the
        name meanwhile), the files are moved to ``.lost+found``, then the reservation is
        removed.
      * Orphaned registry files (abandoned enqueues) older than ``max_tmp_file_age`` and
        not locked: ``Spool.clean_abandoned`` moves their tmp and data files to
        ``.lost+found`` and removes the registry file.
      * TooOld tmp files of a registered entry: moved to ``.lost+found`` under the lock.
    Entries that are merely too old in a queue or a live checkout are left alone.
    """
    full = sp_full(spool)
    lay = Layout(spool.dir)
    sp = spool.spoolable
    problems = sorted(problems)
    done: list[str] = []

    def verb(s: str) -> str:
        return "would " + s if dry_run else s

    def where(d: Dir, name: str) -> str:
        return os.path.join(lay.dir, d.name_on_disk, name)

    # 1. duplicates
    for p in problems:
        if not isinstance(p, Duplicated):
            continue
        name = p.file.filename
        fd = _fs.open_locked(lay.registry_file(name))
        if fd is None:
            done.append(f"left duplicated {name}: held by a live process")
            continue
        try:
            copies = [
                (m, i, d) for i, d in enumerate(p.dirs) if (m := _lstat_mtime(where(d, name))) is not None
            ]
            if len(copies) < 2:
                continue
            keep = max(copies)[2]
            kept = f"{keep.name_on_disk}/{name}"
            for _, _, d in copies:
                if d == keep:
                    continue
                if _lostfound.same_file(where(d, name), where(keep, name)):
                    if not dry_run:
                        _fs.unlink_quiet(where(d, name))
                        if full:
                            _fs.fsync_dir(os.path.dirname(where(d, name)))
                    done.append(verb(f"remove duplicate {d.name_on_disk}/{name} (keeping {kept})"))
                else:
                    if not dry_run:
                        _lostfound.put_aside(lay, name, [(where(d, name), _label(d))], sync=full)
                    what = f"differing duplicate {d.name_on_disk}/{name}"
                    done.append(verb(f"move {what} to {LOST_FOUND} (keeping {kept})"))
        finally:
            os.close(fd)

    # 2. dead checkouts
    if dry_run:
        for q in sp._queue_list:
            dn = sp.dirname(q)
            for name in sorted(_Listing(lay.checkout(dn), stat=False).names):
                fd = _fs.open_locked(lay.registry_file(name))
                if fd is not None:
                    os.close(fd)
                    done.append(verb(f"recover dead checkout {dn}/{CHECKOUT}/{name} into {dn}"))
    else:
        for e in spool.recover_checkouts():
            dn = sp.dirname(e.queue)
            done.append(f"recovered dead checkout {dn}/{CHECKOUT}/{e.name} into {dn}")

    # 3. orphaned files (no registry file)
    orphans: dict[str, list[Dir]] = {}
    for p in problems:
        if isinstance(p, Orphaned) and p.dir != Dir.REGISTRY:
            orphans.setdefault(p.file.filename, []).append(p.dir)
    for name, dirs in orphans.items():
        reg = lay.registry_file(name)
        if dry_run:
            if not os.path.lexists(reg):
                done.extend(verb(f"move orphan {d.name_on_disk}/{name} to {LOST_FOUND}") for d in dirs)
            continue
        fd = _reserve_locked(reg)
        if fd is None:
            continue  # registered meanwhile: no longer an orphan
        try:
            files = [(where(d, name), _label(d)) for d in dirs]
            present = [d for d in dirs if os.path.lexists(where(d, name))]
            if _lostfound.put_aside(lay, name, files, sync=full) is not None:
                done.extend(f"moved orphan {d.name_on_disk}/{name} to {LOST_FOUND}" for d in present)
        finally:
            _fs.unlink_quiet(reg)
            os.close(fd)

    # 4. abandoned enqueues
    if dry_run:
        now = time.time()
        for p in problems:
            if isinstance(p, Orphaned) and p.dir == Dir.REGISTRY:
                name = p.file.filename
                if now - p.file.mtime < limits.max_tmp_file_age:
                    done.append(f"left {REGISTRY}/{name}: younger than --max-tmp-file-age")
                    continue
                fd = _fs.open_locked(lay.registry_file(name))
                if fd is None:
                    done.append(f"left {REGISTRY}/{name}: held by a live process")
                    continue
                os.close(fd)
                done.append(verb(f"remove abandoned enqueue {name}"))
    else:
        for name in spool.clean_abandoned(older_than=limits.max_tmp_file_age):
            done.append(f"removed abandoned enqueue {name} (its files, if any, to {LOST_FOUND})")

    # 5. stale tmp files of registered entries
    for p in problems:
        if not (isinstance(p, TooOld) and p.dir == Dir.TMP):
            continue
        name = p.file.filename
        fd = _fs.open_locked(lay.registry_file(name))
        if fd is None:
            continue  # an orphan (handled above) or a live owner's
        try:
            m = _lstat_mtime(lay.tmp_file(name))
            if m is None or time.time() - m <= limits.max_tmp_file_age:
                continue
            if dry_run or _lostfound.put_aside(lay, name, [(lay.tmp_file(name), "metadata")], sync=full):
                done.append(verb(f"move stale {TMP}/{name} to {LOST_FOUND}"))
        finally:
            os.close(fd)
    return done
