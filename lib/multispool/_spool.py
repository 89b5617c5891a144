"""The spool: entries, enqueue, listing, checkouts, recovery.

Every transition follows the table in ``_layout``. Ownership: whoever holds the flock on
``.registry/NAME`` owns the entry's enqueue or checkout (see ``_fs.open_locked``).
"""

from __future__ import annotations

import builtins
import contextlib
import enum
import errno
import logging
import os
import secrets
import shutil
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, NoReturn, TypeAlias, TypeVar

from . import _enqueue, _fs, _lostfound, _schedule, _sharedfs
from ._errors import CorruptEntryError, EntryNotFoundError, NotASpoolError, SpoolError, _RecoveryRefused
from ._layout import CHECKOUT, KEEP_PREFIX, Layout, check_name, keep_name
from ._schedule import NOW as _DUE_NOW
from ._schedule import Backoff, Schedule
from ._spoolable import Duration, Spoolable, TimeOrderedNames, decode_naming, seconds

if TYPE_CHECKING:
    from ._reader import QueueReader

log = logging.getLogger("multispool")

M = TypeVar("M")
D = TypeVar("D")
R = TypeVar("R")

# How many name proposals reserve_name tries before giving up (a generator that always
# collides must not loop forever).
MAX_NAME_ATTEMPTS: Final = 100_000
# A registry lock that is busy while the entry still sits in its queue belongs to an
# enqueuer finishing its rename or to a claimer about to rename: both take microseconds.
BUSY_WAIT: Final = 0.05
# How long save/release retry a rename that a stale client cache made a no-op (GlusterFS
# and NFS cache names for about 1 s by default; attribute/entry timeouts are mount options).
OWNED_MOVE_PATIENCE: Final = 30.0

# Why a spool directory's name held by a file or symlink makes the spool unusable.
_NOT_A_DIR: Final = "not a directory (symlinks are not followed)"

# errnos that mean "this queue file is not a regular entry file" (planted symlink, dir...)
_NOT_A_FILE = {errno.ELOOP, errno.EISDIR, errno.ENXIO, getattr(errno, "EFTYPE", -1), errno.EMLINK}


class _Busy(Exception):
    """A claim found the registry locked while the entry still sat in its queue."""


class _NotDue(Exception):
    """A reader's claim found the entry delayed: not to be handed out before ``due``.
    ``ino`` is its queue file's inode (readers note it with the deferral)."""

    def __init__(self, name: str, due: float, ino: int) -> None:
        super().__init__(name)
        self.name = name
        self.due = due
        self.ino = ino


@dataclass(frozen=True)
class Save(Generic[M]):
    """Handler action: write ``metadata`` and move the entry into ``queue``, not to be
    handed out by a reader before ``delay`` seconds (None: due at once). Resets the
    attempt count."""

    metadata: M
    queue: enum.Enum
    delay: Duration | None = None


@dataclass(frozen=True)
class Retry(Generic[M]):
    """Handler action: back into the queue the entry came from, not to be handed out by
    a reader before ``delay`` seconds; ``metadata=None`` keeps its metadata. The attempt
    count is kept (only a Backoff policy counts failures)."""

    delay: Duration
    metadata: M | None = None


_C = TypeVar("_C", bound="_Constant")


class _Constant:
    """A class with one instance, named ``multispool.<_name>``, that pickles by name."""

    __slots__ = ()
    _name: ClassVar[str]
    _instances: ClassVar[dict[type, Any]] = {}

    def __new__(cls: type[_C]) -> _C:
        inst: _C | None = _Constant._instances.get(cls)
        if inst is None:
            inst = _Constant._instances[cls] = super().__new__(cls)
        return inst

    def __repr__(self) -> str:
        return f"multispool.{self._name}"

    def __reduce__(self) -> str:
        return self._name


class Remove(_Constant):
    """The type of ``multispool.REMOVE``, the handler action that deletes the entry.
    There is one instance; compare with ``is``."""

    __slots__ = ()
    _name = "REMOVE"


class NotFound(_Constant):
    """The type of ``multispool.NOT_FOUND``, returned by ``with_entry_if_found`` when the
    entry could not be checked out. There is one instance; compare with ``is``."""

    __slots__ = ()
    _name = "NOT_FOUND"


REMOVE: Final = Remove()
"""Action: delete the entry (data, metadata and reservation)."""
NOT_FOUND: Final = NotFound()
"""Returned by ``with_entry_if_found`` when the entry could not be checked out."""

Action: TypeAlias = Save[M] | Retry[M] | Remove
"""What a handler returns: ``Save(metadata, queue)``, ``Retry(delay)`` or ``REMOVE``."""

# Creates the per-claim mutexes on first use.
_claim_locks_lock = threading.Lock()

# Reservations made by reserve_name, locked until enqueue(use=NAME) consumes them, keyed by
# the registry file's (st_dev, st_ino) so that any Spool object of this process finds them.
_reserved: dict[tuple[int, int], int] = {}
_reserved_lock = threading.Lock()


def _forget_reserved_in_child() -> None:
    # A forked child must not think it owns its parent's reservations (_fs closes the fds),
    # and another thread of the parent may have held the table's lock at fork time.
    global _reserved_lock, _claim_locks_lock
    _reserved_lock = threading.Lock()
    _claim_locks_lock = threading.Lock()
    _reserved.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_reserved_in_child)


class _Claim:
    """The owner lock of one checkout, shared by a CheckedOutEntry and its updates."""

    __slots__ = ("_writing", "done", "fd", "generation", "path", "sched", "unsynced")

    def __init__(self, fd: int | None, sched: Schedule = _DUE_NOW) -> None:
        self.fd = fd
        self.path: str | None = None  # the registry file an enqueue created (see _fs.Holder)
        self.generation = _fs._generation  # lock_generation(), without a call: on every entry's path
        self.done = False
        self.sched = sched  # the entry's schedule record as it was claimed
        self._writing: threading.RLock | None = None
        # Durability "full": the queue dir the claim renamed the entry out of, whose fsync
        # (step 5 of a move, see _layout) the checkout's end owes.
        self.unsynced: str | None = None

    def sync_source(self, unless: str | None = None) -> None:
        """fsync the directory the claim moved the entry out of, if still owed."""
        d, self.unsynced = self.unsynced, None
        if d is not None and d != unless:
            _fs.fsync_dir(d)

    @property
    def writing(self) -> threading.RLock:
        """Held around each staged write and each end of the checkout (save, retry,
        remove, release): the owner's own threads take turns with the entry's staging
        file ``.tmp/NAME`` and with its checkout file (other processes are kept out by
        the owner lock). An end that waited for another finds the checkout ended, instead
        of moving, rewriting or deleting the entry after the other end gave it up (an
        asyncio ``save`` that timed out and goes on in its thread while ``async with``
        releases the entry: the save recreated the checkout file the release had moved
        back, and the entry was in two queues)."""
        lock = self._writing
        if lock is None:
            with _claim_locks_lock:
                lock = self._writing
                if lock is None:
                    lock = self._writing = threading.RLock()
        return lock

    def release(self) -> None:
        self.done = True
        fd = self.fd
        if fd is not None:
            _fs.unlock(fd, self.generation, self)  # forgets self.fd in the same step

    @property
    def held(self) -> bool:
        """True while this process holds the lock (not ended, not inherited by fork)."""
        return self.fd is not None and self.generation == _fs.lock_generation()

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)  # None if __init__ was interrupted
        if fd is not None:
            _fs.unlock(fd, self.generation, self)


class DataFile(Generic[D]):
    """An entry's data payload in ``.data/NAME``."""

    __slots__ = ("_claim", "name", "spool")

    def __init__(self, spool: Spool[Any, D], name: str, _claim: _Claim | None = None) -> None:
        self.spool = spool
        self.name = name
        self._claim = _claim  # the checkout this handle belongs to, if any

    @property
    def path(self) -> str:
        """Where the data is: ``SPOOL/.data/NAME``."""
        return str(self.spool._layout.data_file(self.name))

    def _at(self) -> str:
        """The data file's path, reached through the held ``.data`` directory."""
        return self.spool._layout.data_file(self.name)

    def load(self) -> D:
        """The decoded data (via the Spoolable's data codec)."""
        sp = self.spool.spoolable
        with sp.throttled():
            dec = sp._data_decode
            if dec is not None:
                path = self._at()
                return decode_naming(dec, _fs.read_file(path), str(path))  # type: ignore[no-any-return]
            return sp.data.load(self.path)  # type: ignore[no-any-return]

    def save(self, contents: D) -> None:
        """Atomically replace the data (staged in ``.tmp/NAME``, then renamed), holding
        the entry's owner lock: the checkout's when this handle belongs to one this
        process holds, else taken for the write (EntryNotFoundError if the entry is gone
        or another process owns it). A handle of a checkout that has ended (saved,
        removed or released) writes nothing: EntryNotFoundError. The lock makes its
        holder the only writer of the entry's staging file."""
        sp = self.spool.spoolable
        lay = self.spool._layout
        tmp = lay.tmp_file(self.name)
        with sp.throttled():
            claim = self._claim
            written = False
            if claim is not None and claim.held:
                with claim.writing:
                    # Checked again under the mutex: an end of the checkout in another
                    # thread of ours (a remove, a release) may have given it up while
                    # this waited; writing then would leave a data file with no entry,
                    # or write under a lock given up.
                    if claim.held:
                        self._stage(contents, tmp)
                        written = True
            if not written and claim is not None and claim.done:
                # The name is no longer this checkout's entry: given back to a queue, or
                # removed and maybe the name of a new entry by now (PrefixNames reuses
                # freed names). Taking whatever lock the name has now and writing would
                # change an entry this handle was never about.
                raise EntryNotFoundError(
                    "the checkout of this data file has ended (saved, removed or released)", self.path
                )
            if not written:
                own = self.spool._lock_entry(self.name)
                try:
                    with own.writing:
                        self._stage(contents, tmp)
                finally:
                    own.release()
            if sp.durability == "full":
                _fs.fsync_dir(lay.data)

    def _stage(self, contents: D, tmp: str) -> None:
        """Write ``contents`` at ``tmp`` and rename it over the data file; the caller
        holds the entry's owner lock and its claim's mutex."""
        sp = self.spool.spoolable
        try:
            sp.encode_data(contents, tmp, sync=sp.durability != "none")
            if _fs.same_inode(tmp, self._at()):
                # A codec that hard-links (FileData) was given a link of the data file
                # itself: rename(2) between two links of one file does nothing and would
                # leave .tmp/NAME a link of the data, which the next staged write (O_TRUNC)
                # truncates through. The data already is what was asked for: drop the link.
                _fs.unlink(tmp)
            else:
                _fs.rename(tmp, self._at())
        except BaseException:
            _fs.unlink_quiet(tmp)
            raise

    def stat(self) -> os.stat_result:
        """``os.stat_result`` of the data file (not following a symlink)."""
        with self.spool.spoolable.throttled():
            return _fs.lstat(self._at())

    def __repr__(self) -> str:
        return f"DataFile({self.path!r})"


class _Direct(Generic[M, D]):
    """Operations on a queued entry without checking it out. Reads take no lock; writes
    hold the entry's owner lock for their duration, so they never race a claim (an entry
    someone has checked out raises EntryNotFoundError instead)."""

    __slots__ = ("_entry",)

    def __init__(self, entry: Entry[M, D]) -> None:
        self._entry = entry

    def _path(self) -> str:
        e = self._entry
        return e.spool._layout.queue_file(e.spool.spoolable.dirname(e.queue), e.name)

    def contents(self) -> M:
        """The metadata in ``QUEUE/NAME``; EntryNotFoundError if it is not there."""
        path = self._path()
        sp = self._entry.spool.spoolable
        with sp.throttled():
            try:
                raw = _fs.read_file(path)
            except OSError as e:
                if _fs.gone(e):
                    raise EntryNotFoundError("no such entry", path) from None
                raise
        contents: M = sp._codec.decode(raw, path)
        return contents

    def data_file(self) -> DataFile[D]:
        """The entry's data file (its ``save`` holds the owner lock while it writes)."""
        return DataFile(self._entry.spool, self._entry.name)

    def save(self, metadata: M) -> None:
        """Atomically replace ``QUEUE/NAME`` with ``metadata``, holding the entry's owner
        lock, so that it cannot be claimed meanwhile: EntryNotFoundError if it is not in
        its queue (gone, or checked out by anyone). A ``metadata`` that does not match the
        Spoolable's type raises before anything touches disk."""
        e = self._entry
        sp = e.spool.spoolable
        raw = sp._codec.encode(metadata)
        path = self._path()
        with sp.throttled():
            claim = e.spool._lock_entry(e.name, path)
            try:
                e.spool._write_metadata(e.name, raw, path)
            finally:
                claim.release()

    def remove(self) -> None:
        """Delete the queued entry, holding its owner lock: queue file first, then data
        and registry. EntryNotFoundError if it is not in its queue (e.g. checked out)."""
        e = self._entry
        path = self._path()
        with e.spool.spoolable.throttled():
            claim = e.spool._lock_entry(e.name, path)
            try:
                e.spool._remove_files(e.name, path, "no such entry")
            finally:
                claim.release()


class Entry(Generic[M, D]):
    """The entry ``name`` in ``queue`` of ``spool``. Creating one checks the name (and
    that the queue is one of the spool's), not the disk."""

    __slots__ = ("name", "queue", "spool")

    def __init__(self, spool: Spool[M, D], queue: enum.Enum, name: str) -> None:
        spool.spoolable.dirname(queue)
        self.spool = spool
        self.queue = queue
        self.name = check_name(name)

    @classmethod
    def create(cls, spool: Spool[M, D], queue: enum.Enum, name: str) -> Entry[M, D]:
        """The same as ``Entry(spool, queue, name)``: checks the name, not the disk."""
        return cls(spool, queue, name)

    @classmethod
    def _trusted(cls, spool: Spool[M, D], queue: enum.Enum, name: str) -> Entry[M, D]:
        e = cls.__new__(cls)
        e.spool, e.queue, e.name = spool, queue, name
        return e

    def stat(self) -> os.stat_result:
        """``os.stat_result`` of ``.registry/NAME``; EntryNotFoundError if absent."""
        path = self.spool._layout.registry_file(self.name)
        with self.spool.spoolable.throttled():
            try:
                return _fs.lstat(path)
            except OSError as e:
                if _fs.gone(e):
                    raise EntryNotFoundError("no such entry", path) from None
                raise

    def _schedule(self) -> Schedule:
        path = self.spool._layout.registry_file(self.name)
        with self.spool.spoolable.throttled():
            try:
                return _schedule.read_path(path)
            except FileNotFoundError:
                raise EntryNotFoundError("no such entry", path) from None

    def due(self) -> float | None:
        """POSIX time before which no reader hands this entry out, or None if it is due
        now. EntryNotFoundError if the entry is gone."""
        due = self._schedule().due
        return due if due > time.time() else None

    def attempts(self) -> int:
        """Failures counted for this entry by a Backoff policy (0 if none)."""
        return self._schedule().attempts

    @property
    def direct(self) -> _Direct[M, D]:
        """Read and write this entry in its queue without checking it out. Reads take no
        lock; each write holds the entry's owner lock while it runs (EntryNotFoundError if
        the entry is checked out), but a read-modify-write is not atomic: for tools, tests
        and entries no reader is taking.
        """
        return _Direct(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return (self.spool.dir, self.queue, self.name) == (other.spool.dir, other.queue, other.name)

    def __hash__(self) -> int:
        return hash((self.spool.dir, self.queue, self.name))

    def __repr__(self) -> str:
        return f"Entry({self.spool.dir!r}, {self.queue}, {self.name!r})"


class CheckedOutEntry(Generic[M, D]):
    """An entry this process has claimed. Exactly one of ``save``, ``remove`` or
    ``release`` ends it; leaving a ``with`` block without one returns it unchanged."""

    __slots__ = ("_claim", "_raw", "contents", "name", "queue", "spool")

    def __init__(
        self,
        spool: Spool[M, D],
        queue: enum.Enum,
        name: str,
        contents: M,
        raw: bytes | None,
        claim: _Claim,
    ) -> None:
        self.spool = spool
        self.queue = queue
        self.name = name
        self.contents = contents
        self._raw = raw
        self._claim = claim

    @property
    def data_file(self) -> DataFile[D]:
        """The entry's data file (writes to it hold this checkout's owner lock)."""
        return DataFile(self.spool, self.name, self._claim)

    @property
    def path(self) -> str:
        """Where the metadata is while checked out: ``QUEUE/.checkout/NAME``."""
        return self.spool._layout.checkout_file(self.spool.spoolable.dirname(self.queue), self.name)

    @property
    def done(self) -> bool:
        """True once saved, removed or released."""
        return self._claim.done

    def update(self, f: Callable[[M], M]) -> CheckedOutEntry[M, D]:
        """A new handle on the same checkout, with contents ``f(contents)``."""
        return CheckedOutEntry(self.spool, self.queue, self.name, f(self.contents), self._raw, self._claim)

    def _check_live(self) -> None:
        if self._claim.done:
            raise SpoolError(f"checkout of {self.name!r} already ended (saved, removed or released)")
        if self._claim.generation != _fs._generation:  # lock_generation(), without the call
            # A forked child closed its copy of the lock: the parent still owns the entry.
            raise SpoolError(f"checkout of {self.name!r} belongs to the parent process (inherited by fork)")

    @property
    def attempts(self) -> int:
        """Failures counted for this entry by a Backoff policy (0 if none)."""
        return self._claim.sched.attempts

    def save(self, queue: enum.Enum, delay: Duration | None = None) -> None:
        """Write the contents (only if they changed) and move the entry into ``queue``,
        not to be handed out by a reader before ``delay`` seconds (None: due at once).
        The attempt count goes back to 0. If it raises before the entry moved, what it
        wrote is undone and the checkout is still held: ``release`` (or leaving the
        ``with`` block) returns the entry unchanged."""
        with self._claim.writing:
            self._check_live()
            due = 0.0 if delay is None else _schedule.due_at(delay, time.time())
            self._move(queue, self.contents, due, 0)

    def retry(self, delay: Duration, metadata: M | None = None) -> None:
        """Back into the queue it came from, not to be handed out by a reader before
        ``delay`` seconds; ``metadata=None`` keeps the contents. Attempts are kept."""
        with self._claim.writing:
            self._check_live()
            contents = self.contents if metadata is None else metadata
            due = _schedule.due_at(delay, time.time())
            self._move(self.queue, contents, due, self._claim.sched.attempts)

    def _fail(self, policy: Backoff) -> enum.Enum | None:
        """Count a failure under ``policy``: back into its queue after the policy's delay,
        or into its dead-letter queue once out of attempts (metadata and data untouched).
        Returns the dead-letter queue when it went there, else None. The caller checked
        that a dead-letter queue exists if the policy is exhausted. The metadata written
        is the bytes as claimed: a failed handler may have changed its metadata object in
        place, and a failure leaves the entry as it was (as a release does)."""
        with self._claim.writing:
            self._check_live()
            attempts = self._claim.sched.attempts
            if policy.exhausted(attempts):
                dl = policy.dead_letter
                self._move(dl, self.contents, 0.0, attempts + 1, as_claimed=True)
                return dl  # type: ignore[no-any-return]
            due = time.time() + policy.delay(attempts)
            self._move(self.queue, self.contents, due, attempts + 1, as_claimed=True)
            return None

    def _move(
        self, queue: enum.Enum, contents: Any, due: float, attempts: int, *, as_claimed: bool = False
    ) -> None:
        """Write ``contents`` (only if changed) and the schedule (only if changed), then
        rename into ``queue``: the one step every save, retry and dead-letter ends with.
        ``as_claimed``: keep the metadata bytes read at the claim (``contents`` unused)."""
        sp = self.spool.spoolable
        lay = self.spool._layout
        dst_dir = sp.dirname(queue)
        src_dirname = sp.dirname(self.queue)
        src = lay.checkout_file(src_dirname, self.name)  # self.path
        dst = lay.queue_file(dst_dir, self.name)
        raw = self._raw if as_claimed and self._raw is not None else sp._codec.encode(contents)
        full = sp.durability == "full"
        claim = self._claim
        old = claim.sched
        sched_changed = due != old.due or attempts != old.attempts
        # Readers defer a delayed entry until its due time, noting its queue file's inode.
        # If the entry goes back earlier than a due time still in the future (it was
        # checked out before it was due), a new inode tells them the deferral is stale.
        new_inode = raw != self._raw or (sched_changed and old.due > time.time() and due < old.due)
        with sp.throttled():
            rewrote = scheduled = False
            try:
                if new_inode:
                    rewrote = raw != self._raw
                    # Under "full", the move below makes the rewrite durable.
                    with claim.writing:
                        self.spool._write_metadata(self.name, raw, src, sync_dir=False)
                else:
                    # A fresh mtime in the new queue: the Monitor measures queue age from it.
                    _touch(src)
                if sched_changed:
                    # Durable before the rename publishes the move: an acknowledged retry's
                    # count never goes backwards.
                    scheduled = True
                    claim.sched = self.spool._write_schedule(claim.fd, self.name, old, due, attempts)
                keep = lay.keep_file(lay.checkout(src_dirname), self.name) if full else None
                moved = self.spool._move_owned(src, dst, keep, sync_src=False)
            except BaseException as e:
                self._undo_move(src, dst, old, rewrote, scheduled, e)
                raise
            claim.release()
            if not moved:
                raise EntryNotFoundError("checked-out entry vanished", src)
            if full:
                # Step 5 of the move, and the claim's deferred one, after the lock is
                # given up (nobody else needs to wait for them): before returning, the
                # entry is durable only in its new queue.
                _fs.fsync_dir(lay.checkout(src_dirname))
                self._claim.sync_source(unless=lay.queue(dst_dir))

    def _undo_move(
        self, src: str, dst: str, old: Schedule, rewrote: bool, scheduled: bool, exc: BaseException
    ) -> None:
        """A save, retry or dead-letter move raised ``exc``. If the entry did not move,
        undo what it wrote (the metadata, the schedule record) and keep the checkout held:
        its owner releases it unchanged into the queue it came from, or saves again. If it
        moved (an error after the rename), the checkout is over, the move finished if
        ``exc`` interrupted it (``_finish_move``). An undo that fails is logged; the
        move's own error is what the caller sees."""
        claim = self._claim
        try:
            if not _fs.lexists(src) or _fs.same_inode(src, dst):
                # Gone from the checkout dir: moved (the same inode at both names is a
                # stale client cache still showing the name it moved away from).
                try:
                    self._finish_move(_fs.parent(src), _fs.parent(dst), exc)
                finally:
                    claim.release()
                return
            if rewrote and self._raw is not None:
                with claim.writing:
                    self.spool._write_metadata(self.name, self._raw, src, sync_dir=False)
            if scheduled:
                # What is on disk is the record written (claim.sched), or, if that write
                # failed, maybe its slot or its truncation: the write below goes to the
                # same slot (or truncates), so it replaces whatever of it landed.
                basis = claim.sched
                if basis is old and old.empty:
                    basis = _schedule.Schedule(0.0, 0, 1)  # not known empty: truncate
                claim.sched = self.spool._write_schedule(claim.fd, self.name, basis, old.due, old.attempts)
        except Exception as e:
            # Its text, not the error: a handler that keeps records (pytest's, a
            # MemoryHandler) would keep its traceback, this frame, and the checkout held.
            log.warning("multispool: could not undo the failed move of %s: %s", src, str(e))

    def remove(self) -> None:
        """Delete the entry: checkout file, data, then the reservation. If it raises
        with the checkout file still there, the checkout is still held (``release``
        gives the entry back); an OSError once it is gone says the entry is removed and
        ends the checkout, its leftovers ``clean_abandoned``'s. An exception that
        interrupts it once that file is gone (a signal handler's: KeyboardInterrupt, a
        timeout) propagates once the data and the reservation are gone too."""
        claim = self._claim
        with claim.writing:
            self._check_live()
            with self.spool.spoolable.throttled():
                path = self.path
                try:
                    self.spool._remove_files(self.name, path, "checked-out entry vanished", claim)
                    claim.release()
                except BaseException as e:
                    if _interruption(e) and not claim.done and not _fs.lexists(path):
                        self._finish_remove(path)
                    raise

    def _finish_remove(self, path: str) -> None:
        """A remove was interrupted once it unlinked the checkout file ``path``: the
        entry is gone for everyone; its data and reservation go too (left, they were an
        orphan until a ``clean_abandoned`` ten minutes later), then the lock. Trouble
        doing so is logged and leaves them to ``clean_abandoned``."""
        lay = self.spool._layout
        try:
            if self.spool.spoolable.durability == "full":
                # The unlink durable before the data goes (a crash must not bring back
                # metadata without its data); the queue's fsync, still owed by the claim.
                _fs.fsync_dir(_fs.parent(path))
                self._claim.sync_source()
            _fs.unlink_quiet(lay.data_file(self.name))
            _fs.unlink_quiet(lay.registry_file(self.name))
        except Exception as e:
            log.warning("multispool: could not finish the interrupted removal of %s: %s", path, str(e))
        self._claim.release()

    def release(self) -> None:
        """Return the entry unchanged to the queue it came from. If its move fails (an
        OSError, or SpoolError: a rename that never took effect), the entry is still
        checked out and the checkout held: release again, or drop the handle (a
        recovery then puts it back). An exception that interrupts it part way (a signal
        handler's: KeyboardInterrupt, a timeout) propagates once the release is done."""
        claim = self._claim
        if claim.done or claim.generation != _fs.lock_generation():
            return  # already ended, or owned by our parent (inherited by fork)
        sp = self.spool.spoolable
        dirname = sp.dirname(self.queue)
        with claim.writing:
            if claim.done:
                return  # ended by another thread of ours meanwhile
            with sp.throttled():
                try:
                    moved = self.spool._move_back(dirname, self.name, claim, sync_src=False)
                    claim.release()
                except BaseException as e:
                    self._release_raised(dirname, e)
                    raise
        if moved and sp.durability == "full":
            with sp.throttled():
                _fs.fsync_dir(self.spool._layout.checkout(dirname))  # step 5, lock given up

    def _release_or_let_go(self) -> None:
        """``release``, for the library's own callers that hold this handle and will not
        try again (a reader's ``iter``, ``with_entry``, the command line, the asyncio
        wrappers): if the release fails, the owner lock is given up all the same, as
        dropping the handle does. The entry, still checked out, is then a dead checkout
        that a recovery puts back, instead of one locked by this live process for as
        long as anything (the caller's error, its traceback) keeps the handle. The
        release's error propagates."""
        try:
            self.release()
        except BaseException:
            claim = self._claim
            with claim.writing:
                claim.release()
            raise

    def _release_raised(self, dirname: str, exc: BaseException) -> None:
        """A release raised ``exc``. The entry must not stay in the checkout dir with its
        lock given up while we live on (hidden from every reader until some recovery
        ran): if it did not move, a failed move (OSError, SpoolError) keeps the checkout
        held, and an interruption makes the move again; if it moved, the move's last
        steps are made (``_finish_move``). Then the lock goes. Trouble doing so is logged
        and keeps the checkout held; ``exc`` is what the caller sees."""
        claim = self._claim
        lay = self.spool._layout
        src = lay.checkout_file(dirname, self.name)
        dst = lay.queue_file(dirname, self.name)
        try:
            if claim.done:
                pass  # interrupted giving up the lock, once moved: only that to finish
            elif _fs.lexists(src) and not _fs.same_inode(src, dst):
                if not _interruption(exc):
                    return
                self.spool._move_back(dirname, self.name, claim, sync_src=False)
            else:
                self._finish_move(lay.checkout(dirname), lay.queue(dirname), exc)
        except Exception as e:
            # Its text, as in _undo_move: the checkout stays held until its owner drops it.
            log.warning("multispool: could not finish the interrupted release of %s: %s", src, str(e))
            return
        claim.release()

    def _finish_move(self, src_dir: str, dst_dir: str, exc: BaseException) -> None:
        """A move of this checkout out of ``src_dir`` raised ``exc`` after its rename.
        An interruption (a signal handler's exception) is no failure of the move: under
        durability "full", its last steps are made (``dst_dir`` fsynced, then the keep
        link unlinked), so that no keep link outlives it. After a failed step (OSError)
        the keep link stays, the one copy known durable, for recovery to resolve."""
        if self.spool.spoolable.durability != "full" or not _interruption(exc):
            return
        _fs.fsync_dir(dst_dir)
        _fs.unlink_quiet(self.spool._layout.keep_file(src_dir, self.name))

    def _release_after(self, exc: BaseException, *, let_go: bool = False) -> None:
        """Give the entry back after ``exc`` ended its use (raised by the user's code in
        a ``with`` block or handler, or by a failed end of the checkout); the caller then
        re-raises ``exc``. A release that fails (OSError, SpoolError) never replaces
        ``exc``, which the user's ``except`` clauses expect (and Ctrl-C must stay
        Ctrl-C): it is logged and noted on ``exc`` (``add_note``, Python >= 3.11). An
        interruption of the release itself (a signal handler's exception) is no failure:
        it propagates, ``exc`` as its context. A checkout that could not be given back
        stays held, by its user's handle; with ``let_go`` (the library's own callers,
        which hold the handle and will not try again: ``_release_or_let_go``) its owner
        lock is given up all the same, a dead checkout for a recovery to put back."""
        try:
            self.release()
        except BaseException as e:
            if let_go:
                claim = self._claim
                with claim.writing:
                    claim.release()
            if not isinstance(e, Exception):
                raise
            state = "left for a recovery" if let_go else "it stays checked out, held"
            why = f"{self.path} could not be given back ({state}): {e}"
            # Text only: a handler that keeps records would keep the error's traceback,
            # its frames, this checkout and its owner lock.
            log.error("multispool: %s", why)
            add_note = getattr(exc, "add_note", None)  # Python >= 3.11
            if add_note is not None:
                add_note(f"multispool: {why}")

    def __enter__(self) -> CheckedOutEntry[M, D]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        """Return the entry unchanged unless saved or removed; an exception raised in the
        block propagates, even if that fails (see ``_release_after``)."""
        if exc is None:
            self.release()
        else:
            self._release_after(exc)

    def __repr__(self) -> str:
        state = "done" if self._claim.done else "held"
        return f"CheckedOutEntry({self.spool.dir!r}, {self.queue}, {self.name!r}, {state})"


def _interruption(exc: BaseException) -> bool:
    """True if ``exc``, raised by an end of a checkout, is no failure of its own steps
    (those raise OSError or SpoolError) but an exception from outside: a signal
    handler's (KeyboardInterrupt, a timeout) raised between two of them."""
    return not isinstance(exc, (OSError, SpoolError))


def _check_dst_dir(src: str, dst: str) -> None:
    """A move of ``src`` to ``dst`` said the source was gone (rename's ENOENT). If it is
    there after all, the ENOENT was about ``dst``'s directory, which is gone (removed by
    hand or by another tool): NotASpoolError naming it, never a lost race or a vanished
    entry (a reader would wait for ever beside a full queue, saying nothing)."""
    if _fs.lexists(src):
        d = _fs.parent(dst)
        if not _fs.is_real_dir(d):
            raise NotASpoolError("spool is missing directory", d)


def _check_dst_here(spool: Spool[Any, Any], dst: str) -> None:
    """Before a move out of a checkout into ``dst``'s queue directory, which the spool
    holds open (``_layout.Layout``): if its path names nothing now (the directory
    removed, or moved out of the spool), NotASpoolError naming it, the entry still
    checked out: moved into the held directory it would be where no reader looks.
    Another directory renamed there is followed (``Layout.refresh``); a symlink there
    is no spool directory (a member's swap), and the move stays in the one held. One
    lstat, by path."""
    d = _fs.parent(dst)
    held = _fs.held_ident(d)
    if held is None:
        return
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        raise NotASpoolError("spool is missing directory", d) from None
    if stat_mod.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) != held:
        spool._layout.refresh()


_UTIME_NOFOLLOW: Final = os.utime in os.supports_follow_symlinks


_CREATION_LOCK_WAIT = 10.0  # seconds; see _creation_lock


@contextlib.contextmanager
def _creation_lock(root: str, *, exclusive: bool) -> Iterator[None]:
    """Hold a flock on the spool directory: exclusive while a creator makes (and maybe
    rolls back) directories in place, shared while a load checks them. A creator that
    failed part way removes what it made; without the lock another creator (whose mkdir
    found those directories made) or a loader could have returned on them, and be left
    with a spool that lacks them for good. Best effort where directories cannot be
    locked (no flock, or one emulated with fcntl locks, which need a writable file), and
    after ``_CREATION_LOCK_WAIT`` seconds: the directory may be locked by someone else
    for long (``flock SPOOL command``, whose command inherits the lock and would
    otherwise wait for itself for ever); going on unlocked, as before the lock, is
    logged."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        # A held descriptor: a child forked meanwhile closes its copy, and does not keep
        # the lock after we let it go.
        fd = _fs._open_held(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    except OSError:
        yield  # checked and reported by the caller, which needs no lock to fail
        return
    try:
        how = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + _CREATION_LOCK_WAIT
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, how)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    if time.monotonic() < deadline:
                        time.sleep(pause)  # an in-place creation: a few mkdirs
                        pause = min(pause * 2, 0.05)
                        continue
                    log.warning(
                        "multispool: %s stays locked by another process: going on without waiting", root
                    )
                # Anything else (no flock on this filesystem: ENOSYS, EOPNOTSUPP, ENOLCK;
                # fcntl-emulated flock on a read-only descriptor: EBADF; a FUSE daemon's
                # own errors): the lock is best effort, the spool still opens.
                else:
                    log.debug("multispool: no creation lock on %s: %s", root, e)
            break
        yield
    finally:
        _fs._close_held(fd)


def _touch(path: str) -> None:
    """Set the mtime of the entry file at ``path`` to now (the Monitor's queue and
    checkout age), if it is a regular file with no other hard link: one with another
    link may be a file of anyone's outside the spool, planted by a member of a shared
    spool, whose times are not ours to change (it keeps them). Never through a symlink.
    FileNotFoundError (naming ``path``) if it is gone."""
    try:
        rel, dfd = _fs.at(path)
        st = os.lstat(rel, dir_fd=dfd)
        if not stat_mod.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return  # a symlink, FIFO...: the read that follows says what it is
        # By name, as checked an instant before: a member who swaps a hard link in
        # between (a race to win each time) can still have that file touched.
        if _UTIME_NOFOLLOW:
            os.utime(rel, dir_fd=dfd, follow_symlinks=False)
        else:  # pragma: no cover
            os.utime(rel, dir_fd=dfd)
    except OSError as e:
        if _fs.gone(e) and _fs.follow_deleted(path):
            return _touch(path)  # its directory was replaced: the claim's first step there
        raise _fs._name(e, path) from None  # utimensat(AT_SYMLINK_NOFOLLOW) gives no path


class Spool(Generic[M, D]):
    """A spool directory and what is spooled in it."""

    def __init__(self, path: str | os.PathLike[str], spoolable: Spoolable[M, D]) -> None:
        # Prefer Spool.load / Spool.create / Spool.load_unsafe.
        if not isinstance(spoolable, Spoolable):
            raise TypeError(f"spoolable must be a multispool.Spoolable, got {spoolable!r}")
        self.dir: str = os.fspath(path)
        self.spoolable: Spoolable[M, D] = spoolable
        self._layout = Layout(self.dir)
        self._facts: _sharedfs.FsFacts | None = None

    def _fs_facts(self) -> _sharedfs.FsFacts:
        """What the spool's filesystem can be trusted with (identified once, lazily)."""
        facts = self._facts
        if facts is None:
            facts = self._facts = _sharedfs.facts(self.dir)
        return facts

    def _move_owned(self, src: str, dst: str, keep: str | None = None, sync_src: bool = True) -> bool:
        """Move a checkout this process owns (save, release): True once moved, False if
        ``src`` is gone. A rename that a stale client cache turned into a no-op is retried
        until that cache expires (network filesystems keep names for about a second).
        With ``keep`` (durability "full"), the move is the durable one of ``_layout``."""
        verify = self._fs_facts().verify_renames
        _check_dst_here(self, dst)
        r = _fs.move(src, dst, keep, verify=verify, sync_src=sync_src)
        if r != _fs.NOT_MOVED:
            if r == _fs.SRC_GONE:
                _check_dst_dir(src, dst)
            return r == _fs.MOVED
        # The clock is read only here: a move that went through (nearly all) never needs it.
        delay, deadline = 0.005, time.monotonic() + OWNED_MOVE_PATIENCE
        while True:
            if time.monotonic() >= deadline:
                raise SpoolError(
                    f"rename of {src} to {dst} kept reporting success without moving it "
                    f"for {OWNED_MOVE_PATIENCE} s (a client cache that never expires?)"
                )
            time.sleep(delay)  # not synchronisation: waiting out the client's name cache
            delay = min(delay * 2, 0.2)
            r = _fs.move(src, dst, keep, verify=verify, sync_src=sync_src)
            if r == _fs.SRC_GONE:
                # The source a stale cache still showed may have moved after all: we hold
                # the lock, so if the destination is there, it is our move.
                return _fs.lexists(dst)
            if r != _fs.NOT_MOVED:
                return r == _fs.MOVED

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def load(
        cls, path: str | os.PathLike[str], spoolable: Spoolable[M, D], create_if_missing: bool = False
    ) -> Spool[M, D]:
        """Open the spool at ``path``, described by ``spoolable``, validating its layout
        (``NotASpoolError`` if it is not a spool). With ``create_if_missing``, create what
        is missing instead; a non-empty directory that is not a spool is never converted."""
        spool = cls(path, spoolable)
        with spoolable.throttled():
            spool._validate(create_if_missing)
        return spool

    @classmethod
    def create(cls, path: str | os.PathLike[str], spoolable: Spoolable[M, D]) -> Spool[M, D]:
        """``load(path, spoolable, create_if_missing=True)``: open the spool at ``path``,
        creating it (or its missing queues) first. Safe to call from many processes at once
        (idempotent); all or nothing: a new spool appears whole (built in a temporary
        sibling, then renamed into place), and a failed call leaves no directory it made."""
        return cls.load(path, spoolable, create_if_missing=True)

    @classmethod
    def load_unsafe(cls, path: str | os.PathLike[str], spoolable: Spoolable[M, D]) -> Spool[M, D]:
        """A Spool for ``path``, described by ``spoolable``, without validation or disk
        access (for hot paths that know the spool exists)."""
        return cls(path, spoolable)

    def _spool_dirs(self) -> builtins.list[str]:
        """Every directory of the spool, in the order a creation makes them: .registry
        and .tmp (what makes a directory look like a spool) last."""
        lay = self._layout
        dirs = [lay.data]
        for q in self.spoolable._queue_list:
            dirname = self.spoolable.dirname(q)
            dirs += [lay.queue(dirname), lay.checkout(dirname)]
        return [*dirs, lay.tmp, lay.registry]

    def _entry_dirs(self) -> builtins.list[str]:
        """Every directory an entry's metadata may be in: the queue and checkout dirs of
        the Spoolable's queues, then those of any other non-dot directory of the spool
        (a queue of another Spoolable sharing it, or one this application dropped): an
        entry there is an entry, never an abandoned enqueue or a name in no queue. Not the
        filesystem's ``lost+found`` (a spool at the root of one), which is no queue."""
        sp = self.spoolable
        lay = self._layout
        known = [sp.dirname(q) for q in sp._queue_list]
        other = sorted(
            n for n in _fs.listdir(lay.root)
            if n[0] != "." and n not in known and _fs.is_real_dir(lay.file_in(lay.root, n))
            and not _lostfound.is_fs_lost_found(self.dir, n)
        )
        return [d for dn in known + other for d in (lay.queue(dn), lay.checkout(dn))]

    def _validate(self, create: bool) -> None:
        root = self.dir
        if create:
            self._create()
        elif not os.path.isdir(root):
            raise NotASpoolError("spool directory does not exist", root)
        # Not while a creator builds in place: its rollback may remove a queue we would
        # otherwise find and rely on.
        with _creation_lock(root, exclusive=False):
            self._check_dirs(create)

    def _check_dirs(self, create: bool) -> None:
        lay = self._layout
        root = self.dir
        if not create and not (_fs.is_real_dir(lay.registry) and _fs.is_real_dir(lay.tmp)):
            raise NotASpoolError("directory does not look like a spool (no .registry and .tmp)", root)
        devices: dict[int, str] = {}
        for d in self._spool_dirs():
            try:
                # Opens and holds d, never through a symlink (NotASpoolError naming it):
                # the spool works in these directories whatever their paths lead to later.
                st = _fs.lstat(d)
            except FileNotFoundError:
                if d == lay.data:
                    continue  # as the OCaml library: .data is created with the spool only
                raise NotASpoolError("spool is missing directory", d) from None
            if not stat_mod.S_ISDIR(st.st_mode):
                raise NotASpoolError(_NOT_A_DIR, d)
            devices.setdefault(st.st_dev, d)
        if len(devices) > 1:
            # rename(2) cannot cross filesystems (EXDEV): every spool dir must share one.
            where = ", ".join(sorted(devices.values()))
            raise NotASpoolError(f"spool directories are on different filesystems ({where})", root)

    def _create(self) -> None:
        """Make the spool exist with all its directories: idempotent, safe against other
        processes creating the same spool at the same time, and all or nothing (a failure
        leaves no directory this call created).

        A new spool directory is built whole in a temporary sibling, then renamed into
        place: others see no spool or a whole one. An existing directory (empty, already a
        spool, or one that a concurrent creator is filling in place) gets the missing
        directories, .registry and .tmp last; a non-empty directory holding anything else
        is never turned into a spool."""
        root = self.dir
        if not os.path.lexists(root):
            parent = os.path.dirname(os.path.abspath(root))
            os.makedirs(parent, mode=self.spoolable.dir_mode, exist_ok=True)
            if self._create_by_rename(parent):
                return
        if not os.path.isdir(root):
            raise NotASpoolError("spool path exists and is not a directory", root)
        lay = self._layout
        with _creation_lock(root, exclusive=True):
            spool = _fs.is_real_dir(lay.registry) and _fs.is_real_dir(lay.tmp)
            if not spool and not self._only_spool_dirs():
                raise NotASpoolError("dir is not empty while creating new spool", root)
            self._create_missing()

    def _only_spool_dirs(self) -> bool:
        """True if the directory, not yet a spool, holds nothing but (empty) spool
        directories: an empty directory, or a spool another creator is building in
        place. A queue-named directory holding anything else (``in/readme.txt``), or a
        file where a spool directory goes, makes it a non-empty non-spool directory.
        At the root of a filesystem (a mount point), the filesystem's ``lost+found``
        does not count: mke2fs makes it in every new ext2/3/4 filesystem."""
        root = self.dir
        allowed: dict[str, set[str]] = {}
        for d in self._spool_dirs():
            parent, base = os.path.split(os.path.relpath(d, root))
            allowed.setdefault(parent, set()).add(base)
        todo = [""]
        while todo:
            rel = todo.pop()
            try:
                names = os.listdir(os.path.join(root, rel))
            except FileNotFoundError:
                continue  # removed by a concurrent creator's rollback: holds nothing
            for n in names:
                sub = os.path.join(rel, n)
                if not rel and n == _lostfound.FS_LOST_FOUND and self._fs_lost_found():
                    continue
                if n not in allowed.get(rel, ()) or not _fs.is_real_dir(os.path.join(root, sub)):
                    return False
                todo.append(sub)
        return True

    def _fs_lost_found(self) -> bool:
        """True if the spool directory is a mount point and its ``lost+found`` is the
        filesystem's (a directory without ``.checkout``, see ``_lostfound``)."""
        root = self.dir
        return (
            _fs.is_real_dir(os.path.join(root, _lostfound.FS_LOST_FOUND))
            and os.path.ismount(root)
            and _lostfound.is_fs_lost_found(root, _lostfound.FS_LOST_FOUND)
        )

    def _create_by_rename(self, parent: str) -> bool:
        """Build the spool in a temporary sibling of ``self.dir`` and rename it into place.
        False if ``self.dir`` appeared meanwhile (another creator, or anything else): the
        caller goes on with what is there. The temporary directory never survives."""
        sp = self.spoolable
        root = self.dir
        tmp_root = os.path.join(parent, f".{os.path.basename(root)}.new-{secrets.token_hex(8)}")
        os.mkdir(tmp_root, sp.dir_mode)
        try:
            tmp_spool = Spool(tmp_root, sp)
            for d in tmp_spool._spool_dirs():
                try:
                    os.mkdir(d, sp.dir_mode)
                except OSError as e:
                    # Name the directory the user asked for, not our temporary one.
                    e.filename = root + d[len(tmp_root) :]
                    raise
            if sp.durability == "full":
                for d in tmp_spool._spool_dirs():
                    _fs.fsync_dir(d)
                _fs.fsync_dir(tmp_root)
            try:
                os.rename(tmp_root, root)
            except OSError as e:
                # EEXIST/ENOTEMPTY: it exists now and is not empty (a concurrent creator
                # won); EISDIR/ENOTDIR: something else is there now.
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                    return False
                raise
            if sp.durability == "full":
                _fs.fsync_dir(parent)
            return True
        finally:
            if os.path.lexists(tmp_root):
                shutil.rmtree(tmp_root, ignore_errors=True)

    def _create_missing(self) -> None:
        """Create the spool's missing directories in place; on failure, remove those this
        call created (others' and older ones are kept: only empty dirs we made go). The
        caller holds the creation lock: no other creator or loader has seen what this
        call made, so none relies on what its rollback removes."""
        sp = self.spoolable
        sync = sp.durability == "full"
        made: list[str] = []
        try:
            for d in self._spool_dirs():
                try:
                    created = _fs.mkdir_durable(d, sp.dir_mode, sync=sync)
                except FileExistsError:
                    if os.path.lexists(d) and not _fs.is_real_dir(d):
                        # A file or symlink where the spool has a directory: the spool
                        # lacks it, as load says, and replacing it is not ours to do.
                        raise NotASpoolError(_NOT_A_DIR, d) from None
                    raise
                if created:
                    made.append(d)
        except BaseException:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            raise

    # -- names and enqueue ----------------------------------------------------------------
    def _propose(self, seed: Any, attempt: int) -> str:
        """The name generator's proposal for ``attempt``, checked (InvalidNameError).
        Called in the enqueuing thread: a generator is the user's code, and may keep
        per-thread state (see ``_enqueue.enqueue``)."""
        gen = self.spoolable.name_generator
        name = gen.next(seed, attempt)
        if not (seed is None and type(gen) is TimeOrderedNames):  # trusted: see _reserve
            check_name(name)
        return name

    def _reserve(self, seed: Any, owner: _Claim, *, sync: bool = True, first: int = 0) -> str:
        """Reserve a fresh name: ``.registry/NAME`` created locked, its descriptor handed to
        ``owner`` in the step that opens it (so an interrupted caller still releases it).
        With ``sync`` (and durability "full") the name is made durable at once; enqueue
        passes False and syncs ``.registry`` later, after its files, once per group.
        ``first``: the first attempt to ask the generator for (the earlier ones were
        found taken)."""
        sp = self.spoolable
        lay = self._layout
        gen = sp.name_generator
        # The default generator's names without a seed are digits, '-' and hex: safe by
        # construction, so not checked again on every enqueue. (As _propose, inline: this
        # loop is on every enqueue's path.)
        trusted = seed is None and type(gen) is TimeOrderedNames
        for attempt in range(first, MAX_NAME_ATTEMPTS):
            name = gen.next(seed, attempt)
            if not trusted:
                check_name(name)
            path = lay.registry_file(name)
            fd = _fs.create_locked(lay.registry, path, sp.file_mode, owner)
            if fd is None:
                continue  # taken: propose the next name
            if type(gen) is not TimeOrderedNames and self._orphan_in_the_way(name, owner):
                continue
            if sync and sp.durability == "full":
                try:
                    _fs.fsync_dir(lay.registry)
                except BaseException:
                    try:
                        _fs.unlink_quiet(path)
                    finally:
                        owner.release()
                    raise
            return name
        raise SpoolError(
            f"no free name after {MAX_NAME_ATTEMPTS} attempts in {lay.registry} "
            f"(name generator {gen!r}, seed {seed!r})"
        )
        raise AssertionError("unreachable")

    def _orphan_in_the_way(self, name: str, owner: _Claim) -> bool:
        """``name``, whose registry file ``owner`` has just created, is still the name of
        an entry file (one whose registry file was removed or lost: fsck's Orphaned): if
        so, the reservation is given up again and True returned. Using it would replace
        that entry's data and rename over its metadata. Only for generators that may
        propose a name again (PrefixNames); TimeOrderedNames never does, and its
        enqueues pay nothing."""
        try:
            # Not a keep link alone: without its registry file, it is no live entry's
            # (a remove unlinks the registry file last), the enqueue replaces nothing of
            # it, and recovery puts it aside (not restored under the reused name).
            found = self._entry_file(name, keep_links=False)
        except BaseException:
            try:
                _fs.unlink_quiet(self._layout.registry_file(name))
            finally:
                owner.release()
            raise
        if found is None:
            return False
        log.warning("multispool: name %r passed over: %s is an entry without a registry file", name, found)
        try:
            _fs.unlink_quiet(self._layout.registry_file(name))
        finally:
            fd = owner.fd
            if fd is not None:
                _fs.unlock(fd, owner.generation, owner)  # owner goes on to the next name
        return True

    def _entry_file(self, name: str, *, keep_links: bool = True) -> str | None:
        """The path of a file named ``name`` in a queue or checkout dir of the spool, also
        of queues this Spoolable does not know (another application's, or one dropped),
        or (``keep_links``) of its keep link (a move cut by a crash may have left only
        that, which recovery puts back): an entry's; None if there is none. A path
        that cannot be looked up (EIO, a dir its user may not search) may hold one: its
        error is raised, never taken for "not there"."""
        lay = self._layout
        for d in self._entry_dirs():
            p = lay.file_in(d, name)
            if _fs.lexists(p):
                return p
            if keep_links and _fs.lexists(p := lay.keep_file(d, name)):
                return p
        return None

    def reserve_name(self, seed: Any = None) -> str:
        """Reserve a fresh name (``.registry/NAME``, created with O_CREAT|O_EXCL), to be
        used by ``enqueue(..., use=NAME)``; ``seed`` is passed to the name generator. This
        process holds the reservation locked until then, so ``clean_abandoned`` never
        removes it while the process lives."""
        with self.spoolable.throttled():
            owner = _Claim(None)
            name: str | None = None
            try:
                name = self._reserve(seed, owner)
                fd = owner.fd
                assert fd is not None
                try:
                    st = os.fstat(fd)
                except OSError as e:
                    raise _fs._name(e, self._layout.registry_file(name)) from None
                with _reserved_lock:
                    # One step without a call, so no signal handler runs between: the
                    # table takes the descriptor over from the owner.
                    _reserved[(st.st_dev, st.st_ino)], owner.fd = fd, None
            except BaseException:
                if owner.fd is not None:
                    try:
                        if name is not None:
                            _fs.unlink_quiet(self._layout.registry_file(name))
                    finally:
                        owner.release()
                raise
        return name

    def _unreserve(self, name: str) -> None:
        """Give up this process's reservation ``name`` from ``reserve_name``, which nobody
        will use (the task awaiting ``AsyncSpool.reserve_name`` was cancelled): its
        registry file removed, its lock released. A name this process does not hold
        reserved is left alone."""
        path = self._layout.registry_file(name)
        with self.spoolable.throttled():
            try:
                st = _fs.lstat(path)
            except FileNotFoundError:
                return
            owner = _Claim(None)
            with _reserved_lock:
                # As in _take_reservation: the owner takes the descriptor over in one step.
                owner.fd = _reserved.pop((st.st_dev, st.st_ino), None)
            try:
                if owner.fd is not None:
                    _fs.unlink_quiet(path)
            finally:
                owner.release()

    def _take_reservation(self, name: str, owner: _Claim) -> None:
        """Hand the owner lock of reserved ``name`` to ``owner``: this process's
        reservation, or a dead reserver's (its lock is free)."""
        path = self._layout.registry_file(name)
        try:
            st = _fs.lstat(path)
        except FileNotFoundError:
            raise EntryNotFoundError("name is not reserved", path) from None
        key = (st.st_dev, st.st_ino)
        with _reserved_lock:
            if key in _reserved:
                # No call between these two steps, so no signal handler runs between:
                # the owner takes the descriptor over from the table.
                owner.fd = _reserved[key]
                owner.path = path
                del _reserved[key]
        if owner.fd is None:
            # Not reserved by this process: a name reserved elsewhere whose reserver died
            # (its lock is free). It must not be the name of an entry already spooled.
            if _fs.open_locked(path, owner) is None:
                raise EntryNotFoundError("reservation is held by another process", path)
            # An entry there (see _entry_file) is one whose data the enqueue would overwrite.
            try:
                p = self._entry_file(name)
                if p is not None:
                    raise SpoolError(f"name {name!r} is in use by a spooled entry: {p}")
            except BaseException:
                owner.release()
                raise

    def enqueue(
        self,
        queue: enum.Enum,
        metadata: M,
        data: D,
        *,
        reserve: Any = None,
        use: str | None = None,
        delay: Duration | None = None,
    ) -> Entry[M, D]:
        """Add an entry to ``queue``. ``use=NAME`` takes a name from ``reserve_name``;
        otherwise a name is reserved with seed ``reserve``. With ``delay`` (seconds), no
        reader hands it out before then. ``metadata`` that does not
        match the Spoolable's ``metadata`` type raises (``msgspec.ValidationError`` or
        ``TypeError``) before anything touches disk, and so does ``data`` its codec
        rejects. If any step fails, every file the enqueue created (the reservation
        included) is removed and the error raised (a file that cannot be removed is logged
        and left, with its reservation, for ``clean_abandoned``); an exception that comes once the entry
        is in its queue (KeyboardInterrupt) leaves the entry whole. A failure once the
        entry is in its queue (under durability "full", the sync of the queue directory)
        leaves it there, whole, for a consumer may have it already: the error raised is
        a ``SpoolError`` that is also the failure's ``OSError`` (its errno and path), says
        so in its message, and has ``published == {0: NAME}``; do not enqueue it again.
        No descriptor or lock outlives the call. Concurrent enqueues in threads of this process share their
        syncs (group commit, see ``_enqueue``); each returns once its own entry is durable."""
        sp = self.spoolable
        dirname = sp.dirname(queue)
        if use is not None:
            check_name(use)
        due = 0.0 if delay is None else _schedule.due_at(delay, time.time())
        item = self._encode_item(metadata, data)  # before touching disk: a bad value leaves nothing
        with sp.throttled():
            names = _enqueue.enqueue(
                self, dirname, [item], reserve=reserve, use=use,
                prepare=(lambda staged: self._schedule_staged(staged, due)) if due else None,
            )
        return Entry._trusted(self, queue, names[0])

    def _schedule_staged(self, staged: builtins.list[_enqueue.Staged], due: float) -> None:
        """Write the due time into each staged entry's registry file, which its enqueue
        holds locked: durable before the publishing rename, so no reader ever sees the
        entry without it."""
        for st in staged:
            self._write_schedule(st.owner.fd, st.name, _DUE_NOW, due, 0)

    def enqueue_many(
        self, queue: enum.Enum, items: Iterable[tuple[M, D]], *, reserve: Any = None
    ) -> builtins.list[Entry[M, D]]:
        """Add every ``(metadata, data)`` of ``items`` to ``queue``, in order, with as few
        syncs as the filesystem allows: all files written, synced together, each directory
        synced once, and only then every entry published (one sync of the queue dir).
        When it returns, every entry is as durable as the Spoolable's durability says.
        Every item is validated before anything touches disk; if it raises before
        publishing, nothing of the batch is left (names, tmp and data files removed, locks
        released). A rename into the queue that fails undoes the batch's earlier ones; if
        some cannot be undone (a persistent fault), or the queue directory's sync fails
        once all are published, the entries published stay queued and whole (a consumer
        may have one already), the rest is removed as before publishing, and the error
        is a ``SpoolError`` that is also the failure's ``OSError``, whose ``published``
        maps the index in ``items`` of every entry published to its name: do not
        enqueue those again. The batch holds one open descriptor per entry until it is published
        (three until its files are synced, where the limit on open files allows): where
        the process's soft limit on open files is too low for that, it is raised (up to
        the hard limit), else OSError EMFILE before anything is written."""
        sp = self.spoolable
        dirname = sp.dirname(queue)
        encoded = []
        for i, pair in enumerate(items):
            try:
                metadata, data = pair
            except (TypeError, ValueError):
                raise TypeError(f"enqueue_many: item {i} is not a (metadata, data) pair: {pair!r}") from None
            encoded.append(self._encode_item(metadata, data))
        if not encoded:
            return []
        # Each entry's owner lock stays open until publish; its two files until synced,
        # where the limit allows (synced through their descriptors, not reopened).
        keep = _fs.make_room_for_locks(len(encoded), self.dir, extra=2 * len(encoded))
        with sp.throttled():
            # syncfs reports writeback errors since its descriptor opened: before the writes.
            use_syncfs = sp.syncfs and sp.durability == "full" and len(encoded) > 1
            sfd: int | None = None
            try:
                if use_syncfs:
                    sfd = _fs.open_syncfs(self.dir)
                names = _enqueue.enqueue(self, dirname, encoded, reserve=reserve, sfd=sfd, keep_open=keep)
            finally:
                if sfd is not None:
                    os.close(sfd)
        return [Entry._trusted(self, queue, n) for n in names]

    def _encode_item(self, metadata: M, data: D) -> _enqueue.Item:
        """Validate and encode one item without touching disk: (metadata bytes, a writer of
        the data file at a path, unsynced)."""
        sp = self.spoolable
        raw = sp._codec.encode(metadata)
        return raw, sp.data_writer(data)

    def _write_schedule(
        self, fd: int | None, name: str, old: Schedule, due: float, attempts: int
    ) -> Schedule:
        """Write an entry's schedule record into its registry file, whose owner lock the
        caller holds on ``fd`` (None: a handle from list_checkouts_unsafe, which holds
        none). The caller holds the throttle."""
        path = self._layout.registry_file(name)
        sync = self.spoolable.durability != "none"
        if fd is not None:
            try:
                return _schedule.write_fd(fd, old, due, attempts, sync=sync, path=path)
            except OSError as e:
                if e.errno not in (errno.EBADF, errno.EINVAL):  # fd not open for writing
                    raise
                # A lock taken on a read-only descriptor: write through a second one (the
                # lock is on the file, whichever descriptor writes), of that file only.
        wfd = _fs.reopen_for_writing(path, fd)
        try:
            return _schedule.write_fd(wfd, old, due, attempts, sync=sync, path=path)
        finally:
            os.close(wfd)

    def _write_metadata(self, name: str, raw: bytes, path: str, *, sync_dir: bool = True) -> None:
        """Atomically replace ``path`` with encoded metadata, staged in ``.tmp/NAME``. The
        caller holds the entry's owner lock (so no other writer stages there) and the
        throttle. ``sync_dir=False`` leaves the directory's fsync to a move that follows."""
        sp = self.spoolable
        tmp = self._layout.tmp_file(name)
        try:
            _fs.write_file(tmp, raw, sync=sp.durability != "none", mode=sp.file_mode, owned=True)
            _fs.rename(tmp, path)
        except BaseException:
            _fs.unlink_quiet(tmp)
            raise
        if sync_dir and sp.durability == "full":
            _fs.fsync_dir(_fs.parent(path))

    def _move_back(self, dirname: str, name: str, claim: _Claim | None, sync_src: bool = True) -> bool:
        """Move a checked-out entry back into its queue (release, give-back); False if it
        was not checked out. Durable under "full" (the move of _layout; ``sync_src=False``
        leaves its step 5, the checkout dir's fsync, to the caller)."""
        lay = self._layout
        co_dir = lay.checkout(dirname)
        keep = lay.keep_file(co_dir, name) if self.spoolable.durability == "full" else None
        cofile, qfile = lay.checkout_file(dirname, name), lay.queue_file(dirname, name)
        moved = self._move_owned(cofile, qfile, keep, sync_src=sync_src)
        if claim is not None:
            claim.unsynced = None  # the queue dir was fsynced by the move (or nothing moved)
        return moved

    def _lock_entry(self, name: str, qfile: str | None = None) -> _Claim:
        """Take the owner lock of an entry that nobody has checked out, for one write.
        A busy lock is waited for briefly, as a claim does. With ``qfile``, the entry must
        wait in that queue file. EntryNotFoundError if it is gone or another
        process owns it. The caller holds the throttle and releases the claim."""
        reg = self._layout.registry_file(name)
        claim = _Claim(None)
        # Without a queue file to watch, a busy lock is waited for while the reservation
        # exists.
        watch = qfile or reg
        if _fs.open_locked(reg, claim) is None and self._wait_busy(reg, watch, BUSY_WAIT, claim) is None:
            raise EntryNotFoundError("entry is gone or checked out by another process", qfile or reg)
        try:
            if qfile is not None and not _fs.lexists(qfile):
                raise EntryNotFoundError("no such entry (not in its queue)", qfile)
        except BaseException:
            # Released here, not by the claim's garbage collection: the error's traceback
            # keeps the claim alive as long as the caller keeps the error.
            claim.release()
            raise
        return claim

    def _remove_files(self, name: str, meta_path: str, gone: str, claim: _Claim | None = None) -> None:
        """Delete an entry whose metadata is at ``meta_path``: that file first (the step
        that makes the entry gone; EntryNotFoundError(``gone``) if it already is), then
        its data and, last, its reservation. The caller holds the throttle. A directory
        at the data's name (planted: unlink cannot remove it) is refused first, with
        IsADirectoryError naming it: once the metadata is gone, nothing could be undone.
        A later step that fails (EACCES, EIO) raises its OSError saying that the entry
        is removed and what is left of it is ``clean_abandoned``'s; ``claim`` then ends,
        its lock free for that clean-up (the entry is gone: there is nothing to give back)."""
        data = self._layout.data_file(name)
        with contextlib.suppress(FileNotFoundError):
            if stat_mod.S_ISDIR(_fs.lstat(data).st_mode):
                raise IsADirectoryError(errno.EISDIR, "entry data is a directory: nothing removed", data)
        if not _fs.unlink_quiet(meta_path):
            raise EntryNotFoundError(gone, meta_path)
        try:
            if self.spoolable.durability == "full":
                _fs.fsync_dir(_fs.parent(meta_path))
                if claim is not None:
                    claim.sync_source()
            # The reservation last: while the data is there, its name stays taken, and
            # clean_abandoned finds the pair by it.
            _fs.unlink_quiet(data)
            _fs.unlink_quiet(self._layout.registry_file(name))
        except OSError as e:
            if claim is not None:
                claim.release()
            why = f"{e.strerror} (entry {name!r} is removed; what is left of it is for clean_abandoned)"
            raise type(e)(e.errno, why, e.filename) from e

    # -- listing ----------------------------------------------------------------------
    def _list_names(self, directory: str) -> list[str]:
        """Unsorted entry names in ``directory`` (dot-names such as .checkout skipped)."""
        with self.spoolable.throttled():
            return [n for n in _fs.listdir(directory) if n[0] != "."]

    def list(self, queue: enum.Enum) -> list[Entry[M, D]]:
        """Entries waiting in ``queue``, sorted by name (dot-names skipped)."""
        names = self._list_names(self._layout.queue(self.spoolable.dirname(queue)))
        names.sort()
        return [Entry._trusted(self, queue, n) for n in names]

    def list_checkouts_unsafe(self, queue: enum.Enum) -> builtins.list[CheckedOutEntry[M, D]]:
        """Entries checked out of ``queue`` by anyone, decoded. Handles returned here hold
        no lock: saving or removing one races with its real owner."""
        sp = self.spoolable
        dirname = sp.dirname(queue)
        co_dir = self._layout.checkout(dirname)
        names = sorted(self._list_names(co_dir))
        out: list[CheckedOutEntry[M, D]] = []
        for n in names:
            path = self._layout.checkout_file(dirname, n)
            try:
                with sp.throttled():
                    raw = _fs.read_file(path)
            except OSError as e:
                if _fs.gone(e):
                    continue  # its owner finished with it meanwhile
                # Not a regular file (FIFO, symlink...) or unreadable: that one's problem.
                log.warning("multispool: skipping checkout %s: %s", path, e)
                continue
            out.append(CheckedOutEntry(self, queue, n, sp._codec.decode(raw, path), raw, _Claim(None)))
        return out

    # -- checkouts ----------------------------------------------------------------------
    def _claim(
        self,
        queue: enum.Enum,
        name: str,
        busy_wait: float = BUSY_WAIT,
        raise_busy: bool = False,
        when_due: bool = False,
    ) -> CheckedOutEntry[M, D] | None:
        """Check out ``queue``/``name``: lock its registry file, then rename it into the
        checkout dir. None if it is gone or another process owns it. A lock that is busy
        while the entry still sits in its queue is waited for up to ``busy_wait`` seconds;
        if it is still busy then, ``raise_busy`` raises _Busy (readers retry later).
        ``when_due`` (readers): an entry whose due time is still ahead raises _NotDue and
        stays where it is."""
        sp = self.spoolable
        lay = self._layout
        dirname = sp.dirname(queue)
        reg = lay.registry_file(name)
        qfile = lay.queue_file(dirname, name)
        claim = _Claim(None)  # holds the lock from the step that opens it
        cofile = lay.checkout_file(dirname, name)
        renamed: list[None] = []  # an item as our rename is tried, two once made
        try:
            with sp.throttled():
                locked = _fs.open_locked_sized(reg, claim)
                if locked is None:
                    locked = self._wait_busy(reg, qfile, busy_wait, claim)
                    if locked is None:
                        if raise_busy and os.path.lexists(qfile) and os.path.lexists(reg):
                            raise _Busy(name)
                        return None
                fd, size = locked
                if size:  # an empty registry file (st_size from the lock's fstat) is due now
                    try:
                        claim.sched = sched = _schedule.read_fd(fd, size, reg)
                        if when_due and sched.due > time.time():
                            raise _NotDue(name, sched.due, _fs.lstat(qfile).st_ino)
                    except FileNotFoundError:
                        claim.release()
                        return None  # left its queue before we took the lock
                    except BaseException:
                        claim.release()
                        raise
                full = sp.durability == "full"
                try:
                    _touch(qfile)  # checkout age counts from now (the Monitor reads this mtime)
                    # Verified where a stale client could make rename a no-op: a claim that
                    # did not move the entry is lost, never won (it stays in its queue). Under
                    # "full" the entry stays durable in the queue (keep link) until the
                    # checkout dir's fsync; the queue's own fsync is owed by the checkout's end.
                    keep = lay.keep_file(lay.queue(dirname), name) if full else None
                    verify = self._fs_facts().verify_renames
                    moved = _fs.move(qfile, cofile, keep, verify=verify, sync_src=False, renamed=renamed)
                    if moved == _fs.MOVED and full:
                        claim.unsynced = lay.queue(dirname)
                    elif moved == _fs.SRC_GONE:
                        _check_dst_dir(qfile, cofile)
                except BaseException as e:
                    # Maybe after the rename (a failed fsync, a signal handler's exception):
                    # the caller gets no checkout, so the entry must not stay checked out.
                    # Ours if our rename was made; if an interruption came from inside the
                    # rename call, maybe: what the checkout dir holds then decides.
                    tried = len(renamed) == 1 and not isinstance(e, OSError)
                    self._undo_claim(dirname, name, cofile, claim, ours=len(renamed) > 1 or tried)
                    if isinstance(e, OSError) and _fs.gone(e):
                        return None
                    raise
                if moved != _fs.MOVED:
                    claim.release()
                    if moved == _fs.NOT_MOVED:
                        log.debug("multispool: claim of %s lost: rename moved nothing (stale cache)", qfile)
                    return None
                try:
                    raw = _fs.read_file(cofile)
                except OSError as e:
                    if _fs.gone(e):
                        # Our own client lost track of the file it just moved (ESTALE): put
                        # the entry back for a later attempt rather than fail the reader.
                        self._give_back(dirname, name, claim)
                        return None
                    if e.errno in _NOT_A_FILE:
                        why = f"not a regular file ({os.strerror(e.errno or 0)})"
                        self._corrupt(queue, name, cofile, why, claim)
                    # Unreadable for now (permissions, I/O): give it back, untouched.
                    self._give_back(dirname, name, claim)
                    raise
                except BaseException:
                    self._give_back(dirname, name, claim)
                    raise
            try:
                contents = sp._codec.decode(raw, cofile)
            except CorruptEntryError as e:
                self._corrupt(queue, name, cofile, e.reason, claim, cause=e.__cause__ or e)
            # Every end of the checkout takes this mutex (_Claim.writing): made here, where no
            # other thread can see the claim yet, rather than on first use under a global lock.
            claim._writing = threading.RLock()
            return CheckedOutEntry(self, queue, name, contents, raw, claim)
        except BaseException:
            if claim.fd is not None and not claim.done:
                # Raised where no step above undid the claim: a signal handler's
                # exception (Ctrl-C, a timeout) between two steps, as the decoder
                # returned, or leaving the throttle. Nobody gets this checkout: the entry
                # goes back if our rename moved it, and the lock goes.
                with sp.throttled():
                    self._undo_claim(dirname, name, cofile, claim, ours=len(renamed) > 1)
            raise

    def _wait_busy(
        self, reg: str, qfile: str, limit: float, holder: _Claim | None = None
    ) -> tuple[int, int] | None:
        """Retry a busy registry lock while the entry still waits in its queue: its holder
        is an enqueuer that just renamed it in, or a claimer about to rename it out, and
        both let go within microseconds (a reader woken by the rename often gets here
        first). Gives up after ``limit`` seconds (a stopped or slow holder)."""
        if limit <= 0:
            return None
        deadline = time.monotonic() + limit
        delay = 0.00002
        while os.path.lexists(qfile):
            locked = _fs.open_locked_sized(reg, holder)
            if locked is not None:
                return locked
            if time.monotonic() >= deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.002)
        return None

    def _undo_claim(self, dirname: str, name: str, cofile: str, claim: _Claim, ours: bool = True) -> None:
        """A claim raised: give the entry back if its rename happened, else just let go
        of the lock. ``ours`` False: the claim's rename was not made, so a checkout file
        there is another's, never given back: holding the lock is no proof that it is
        ours (its owner may hold it where our lock is not seen, through another mount
        of a filesystem that does not share locks; or be dead, for recovery to decide).
        An error giving it back is logged (the claim's own is what the caller sees)."""
        try:
            if ours and _fs.lexists(cofile):
                self._move_back(dirname, name, claim)
            if self.spoolable.durability == "full":
                # The claim's keep link, if the interruption left it: the entry is
                # durable in its queue again (back, or never moved).
                _fs.unlink_quiet(self._layout.keep_file(self._layout.queue(dirname), name))
        except Exception as e:
            log.warning("multispool: could not give back %s after a failed claim: %s", cofile, e)
        finally:
            claim.release()

    def _give_back(self, dirname: str, name: str, claim: _Claim) -> None:
        try:
            self._move_back(dirname, name, claim)
        finally:
            claim.release()

    def _corrupt(
        self,
        queue: enum.Enum,
        name: str,
        cofile: str,
        reason: str,
        claim: _Claim,
        cause: BaseException | None = None,
    ) -> NoReturn:
        """Undecodable metadata: quarantine it (bytes untouched) if the Spoolable says so,
        else leave it checked out; then raise CorruptEntryError naming the file."""
        sp = self.spoolable
        try:
            q = sp.quarantine
            if q is not None and q != queue:
                dst = self._layout.queue_file(sp.dirname(q), name)
                full = sp.durability == "full"
                keep = self._layout.keep_file(_fs.parent(cofile), name) if full else None
                _check_dst_here(self, dst)
                if _fs.move(cofile, dst, keep) == _fs.SRC_GONE:
                    _check_dst_dir(cofile, dst)
                claim.sync_source(unless=_fs.parent(dst))
                log.warning("multispool: quarantined %s to %s: %s", cofile, dst, reason)
                raise CorruptEntryError(cofile, reason, quarantined_to=dst) from cause
            log.warning("multispool: left %s checked out (no quarantine queue): %s", cofile, reason)
            raise CorruptEntryError(cofile, reason) from cause
        finally:
            claim.release()

    def checkout(self, entry: Entry[M, D]) -> CheckedOutEntry[M, D]:
        """Claim ``entry``; EntryNotFoundError if it is gone or another process holds it."""
        co = self._claim(entry.queue, entry.name)
        if co is None:
            raise EntryNotFoundError(
                "entry is gone or checked out by another process",
                self._layout.queue_file(self.spoolable.dirname(entry.queue), entry.name),
            )
        return co

    def checkout_if_found(self, entry: Entry[M, D]) -> CheckedOutEntry[M, D] | None:
        """Claim ``entry``, or None if it is gone or another process holds it."""
        return self._claim(entry.queue, entry.name)

    def _apply(self, co: CheckedOutEntry[M, D], f: Callable[[M, DataFile[D]], tuple[Action[M], R]]) -> R:
        try:
            action, result = f(co.contents, co.data_file)
            self._finish(co, action)
        except BaseException as e:
            co._release_after(e, let_go=True)
            raise
        return result

    @staticmethod
    def _finish(co: CheckedOutEntry[Any, Any], action: object) -> None:
        """Carry out a callback's action on its checkout."""
        if isinstance(action, Save):
            co.contents = action.metadata
            co.save(action.queue, action.delay)
        elif action is REMOVE:
            co.remove()
        elif isinstance(action, Retry):
            co.retry(action.delay, action.metadata)
        else:
            raise TypeError(
                f"expected multispool.Save(...), multispool.Retry(...) or multispool.REMOVE, got {action!r}"
            )

    def _check_policy(self, on_error: object, queue: enum.Enum) -> Backoff | None:
        """``on_error`` if it is None or a Backoff whose dead-letter queue is one of ours
        and not ``queue``, the one the reader reads (an entry out of attempts would go
        straight back, due at once, for ever)."""
        if on_error is None:
            return None
        if not isinstance(on_error, Backoff):
            raise TypeError(f"on_error must be None or a multispool.Backoff, got {on_error!r}")
        if on_error.dead_letter is not None:
            self.spoolable.dirname(on_error.dead_letter)  # ValueError if not one of our queues
            if on_error.dead_letter is queue:
                raise ValueError(
                    f"Backoff dead_letter must be another queue than the one read ({queue!r}): "
                    "an entry out of attempts would come straight back"
                )
        return on_error

    @staticmethod
    def _on_failure(co: CheckedOutEntry[Any, Any], policy: Backoff, exc: BaseException) -> bool:
        """A callback raised ``exc`` on ``co``: log it and apply ``policy`` (retry later,
        or dead-letter). False if the policy leaves it to the caller (out of attempts with
        no dead-letter queue): then nothing was done and the caller releases and raises."""
        attempts = co.attempts
        if policy.exhausted(attempts) and policy.dead_letter is None:
            return False
        try:
            dl = co._fail(policy)
        except BaseException as e:
            co._release_after(e, let_go=True)
            raise
        if dl is None:
            # One line per retry (a flaky remote would flood the log with tracebacks);
            # the final failure below carries the traceback.
            log.warning(
                "multispool: %s/%s failed (attempt %d), retrying later: %r",
                co.spool.spoolable.dirname(co.queue), co.name, attempts + 1, exc,
            )
        else:
            log.error(
                "multispool: %s/%s failed (attempt %d), moved to dead-letter queue %s: %r",
                co.spool.spoolable.dirname(co.queue), co.name, attempts + 1,
                co.spool.spoolable.dirname(dl), exc, exc_info=exc,
            )
        return True

    def with_entry(self, entry: Entry[M, D], f: Callable[[M, DataFile[D]], tuple[Action[M], R]]) -> R:
        """Check out ``entry``, run ``f(metadata, data_file) -> (action, result)``, apply
        the action, return the result. If ``f`` raises, the entry goes back unchanged."""
        return self._apply(self.checkout(entry), f)

    def with_entry_if_found(
        self, entry: Entry[M, D], f: Callable[[M, DataFile[D]], tuple[Action[M], R]]
    ) -> R | NotFound:
        """As ``with_entry``, but ``NOT_FOUND`` when the entry cannot be checked out."""
        co = self.checkout_if_found(entry)
        if co is None:
            return NOT_FOUND
        return self._apply(co, f)

    # -- crash recovery ---------------------------------------------------------------
    def recover_checkouts(
        self, queue: enum.Enum | None = None, *, dead_after: Duration | None = None
    ) -> builtins.list[Entry[M, D]]:
        """Move back to their queues the checkouts whose owner process has died (their
        registry lock is free), and return exactly those that were moved. Never touches
        the checkout of a live process. An entry whose metadata cannot be decoded is
        quarantined if the Spoolable has a quarantine queue, else left checked out for a
        person (moving it back would loop).

        ``dead_after`` (seconds): also require the checkout to be at least that old
        (checked out, or last rewritten, that long ago). It is required on filesystems
        whose locks are not shared between their mounts or clients (bindfs, sshfs, NFS
        ``nolock``...: see docs/shared-filesystems.md), where a free lock does not prove
        the owner died; there, without it, SpoolError is raised and nothing is moved."""
        run = _Recovery(self, dead_after)
        return [Entry._trusted(self, r.queue, r.name) for r in run.run(queue) if r.moved]

    def _check_locks_prove_death(self) -> None:
        """SpoolError unless a free owner lock proves its owner died on this filesystem
        (locks shared by every mount and client that can reach the spool)."""
        facts = self._fs_facts()
        if not facts.locks_shared:
            raise _RecoveryRefused(
                f"recovery refused: a free owner lock does not prove its owner died here: "
                f"{facts.reason}. Pass dead_after=SECONDS (an age no live checkout reaches), or set "
                f"{_sharedfs.TRUST_ENV}=1 if every process uses this one mount",
                facts.reason,
            )

    def _resolve_keeps(self, dirname: str) -> None:
        """Resolve the keep links (see _layout) that a crash left in queue ``dirname`` or
        its checkout dir: under the entry's owner lock, unlink one whose entry is in
        some queue or checkout dir (its move happened), else rename it back to the name
        it keeps (the move is undone). Links of live moves (lock held) are left alone."""
        sp = self.spoolable
        lay = self._layout
        by_keep: dict[str, str] | None = None
        for d in (lay.queue(dirname), lay.checkout(dirname)):
            with sp.throttled():
                keeps = [n for n in _fs.listdir(d) if n.startswith(KEEP_PREFIX)]
            for k in sorted(keeps):
                if k.startswith(KEEP_PREFIX + "#"):
                    if by_keep is None:
                        with sp.throttled():
                            by_keep = {keep_name(n): n for n in _fs.listdir(lay.registry)}
                    name = by_keep.get(k)
                    if name is None:
                        # No entry of that name now: a name with data but no
                        # registry file (left for the Monitor), or none at all.
                        with sp.throttled():
                            by_keep.update({keep_name(n): n for n in _fs.listdir(lay.data)})
                        name = by_keep.get(k)
                        if name is None:
                            with sp.throttled():
                                self._drop_stale_keep(d, k, None)
                            continue
                else:
                    name = k[len(KEEP_PREFIX) :]
                with sp.throttled():
                    try:
                        self._resolve_keep(d, k, name)
                    except OSError as e:
                        # As a dead checkout that cannot be recovered: one link in
                        # trouble does not stop the recovery of the others.
                        log.warning("multispool: cannot resolve keep link %s, left in place: %s",
                                    os.path.join(d, k), e)

    def _resolve_keep(self, d: str, keep: str, name: str) -> None:
        sp = self.spoolable
        lay = self._layout
        claim = _Claim(None)
        reg = lay.registry_file(name)
        if _fs.open_locked(reg, claim) is None:
            if not _fs.lexists(reg) and not _fs.lexists(lay.data_file(name)):
                self._drop_stale_keep(d, keep, name)
            return
        try:
            kpath = lay.file_in(d, keep)
            # A copy that cannot be looked up (EIO, a dir its user may not search) may be
            # the entry: an error, never "not placed" (restoring would queue it twice).
            placed = any(_fs.lexists(lay.file_in(ed, name)) for ed in self._entry_dirs())
            if placed:
                _fs.unlink_quiet(kpath)
                log.info("multispool: removed keep link %s of a finished move", kpath)
            elif not _fs.lexists(lay.data_file(name)):
                # Every entry has its data file from its enqueue to its removal: this is
                # the keep link of an entry removed since, its name now taken by an
                # enqueue that did not finish (or a removal cut before its registry
                # file). Restoring it would hand a removed entry out again.
                if _fs.lexists(kpath):
                    co_dir = os.path.basename(d) == CHECKOUT
                    label = _lostfound.queue_label(os.path.basename(_fs.parent(d) if co_dir else d), co_dir)
                    _lostfound.put_aside(
                        lay, name, [(kpath, label)], sync=sp.durability == "full", mode=sp.dir_mode
                    )
                    log.warning("multispool: keep link %s outlived its entry: put aside", kpath)
            else:
                _fs.rename_if_exists(kpath, lay.file_in(d, name))
                log.info("multispool: undid the interrupted move of %s (restored from %s)", name, kpath)
            if sp.durability == "full":
                _fs.fsync_dir(d)
        finally:
            claim.release()

    def _drop_stale_keep(self, d: str, keep: str, name: str | None) -> None:
        """Remove keep link ``keep`` of ``d`` whose name has neither a registry nor a
        data file: the leftover of a move cut by a crash, whose entry has since been
        handled and removed (a removal unlinks the metadata, the data, then the
        registry file). Nobody owns it: no move of an entry of that name is under way."""
        kpath = self._layout.file_in(d, keep)
        if _fs.unlink_quiet(kpath):
            log.info("multispool: removed keep link %s of an entry removed since (%s)", kpath, name)
            if self.spoolable.durability == "full":
                _fs.fsync_dir(d)

    def _recover_one(self, q: enum.Enum, dirname: str, name: str, min_age: float | None = None) -> bool:
        """Move one dead checkout back into its queue; True only if it really moved. With
        ``min_age`` None the free lock must be proof enough (SpoolError where it is not)."""
        sp = self.spoolable
        lay = self._layout
        if min_age is None:
            self._check_locks_prove_death()
        claim = _Claim(None)
        if _fs.open_locked(lay.registry_file(name), claim) is None:
            return False  # a live owner, or no registry file (an orphan for the Monitor)
        try:
            cofile = lay.checkout_file(dirname, name)
            try:
                if min_age is not None and time.time() - _fs.lstat(cofile).st_mtime < min_age:
                    return False  # too young for the stated proof of death
                sp._codec.decode(_fs.read_file(cofile), cofile)
            except OSError as e:
                if _fs.gone(e):
                    return False  # its owner finished with it before dying
                if e.errno not in _NOT_A_FILE:
                    # Transient or permission trouble: not evidence of a bad entry.
                    log.warning("multispool: cannot read checkout %s, left in place: %s", cofile, e)
                    return False
                return self._recover_undecodable(q, name, cofile, str(e), claim)
            except CorruptEntryError as e:
                return self._recover_undecodable(q, name, cofile, e.reason, claim)
            _fs.unlink_quiet(lay.tmp_file(name))  # a rewrite the dead owner left half done
            verify = self._fs_facts().verify_renames
            # Where a client's name cache can be stale (network and FUSE filesystems), a
            # queue name that another client moved away a moment ago still resolves, to
            # the very file now in our checkout dir: that is no proof of a cut move, and
            # dropping "this copy" would drop the only one. There the verified move below
            # decides (a no-op rename counts as not done, and is tried again later).
            elsewhere = [] if verify else [
                p for ed in self._entry_dirs()
                if os.path.basename(ed) != CHECKOUT and _fs.lexists(p := lay.file_in(ed, name))
            ]
            if elsewhere:
                # A move out of the checkout (save, release) or the claim itself was cut by
                # a crash: the entry is queued already; putting this copy back too would
                # hand it out twice. Drop it if it is the same, else keep it aside.
                if _lostfound.same_file(cofile, elsewhere[0]):
                    _fs.unlink_quiet(cofile)
                else:
                    _lostfound.put_aside(
                        lay, name, [(cofile, _lostfound.queue_label(dirname, checkout=True))],
                        sync=sp.durability == "full", mode=sp.dir_mode,
                    )
                if sp.durability == "full":
                    _fs.fsync_dir(lay.checkout(dirname))
                log.warning("multispool: dead checkout %s was queued as %s too", cofile, elsewhere[0])
                return False
            # Verified where a stale client could make rename a no-op: only what really
            # moved is reported (a no-op leaves it for the next recovery).
            qfile = lay.queue_file(dirname, name)
            keep = lay.keep_file(lay.checkout(dirname), name) if sp.durability == "full" else None
            moved = _fs.move(cofile, qfile, keep, verify=verify)
            if moved != _fs.MOVED:
                if moved == _fs.NOT_MOVED:
                    log.debug("multispool: recovery of %s not done: rename moved nothing", cofile)
                return False
            log.info("multispool: recovered %s/%s from a dead owner", dirname, name)
            return True
        finally:
            claim.release()

    def _recover_undecodable(
        self, q: enum.Enum, name: str, cofile: str, reason: str, claim: _Claim
    ) -> bool:
        """A dead owner's checkout that cannot be decoded: quarantine it if the Spoolable
        has a quarantine queue, else leave it checked out for a person (moving it back
        would only hand it to the next reader, and fail there again): logged, and
        CorruptEntryError raised for ``_Recovery.recover`` to report (never beyond it)."""
        if self.spoolable.quarantine is None:
            log.warning("multispool: left undecodable checkout %s for a person: %s", cofile, reason)
            raise CorruptEntryError(cofile, reason)
        with contextlib.suppress(CorruptEntryError):
            self._corrupt(q, name, cofile, reason, claim)
        return False

    def clean_abandoned(self, older_than: Duration = 600) -> builtins.list[str]:
        """Remove the registry, tmp and data files of enqueues whose process died before
        the entry reached a queue: registry older than ``older_than`` seconds, in no queue
        or checkout dir (nor kept by the keep link of an interrupted move), and not locked
        by a live process. Returns the removed names. (``fsck --repair`` does the same but
        keeps the tmp and data files in ``.lost+found``.)"""
        return self._clean_abandoned(older_than, keep_aside=False)

    def _clean_abandoned(
        self, older_than: Duration, *, keep_aside: bool, dry_run: bool = False
    ) -> builtins.list[str]:
        """``clean_abandoned``; with ``keep_aside``, the tmp and data files go to
        ``.lost+found`` instead of being deleted (repair). With ``dry_run``, the names it
        would remove, decided by the same checks (the owner lock taken for an instant),
        and nothing changed."""
        sp = self.spoolable
        lay = self._layout
        limit = seconds(older_than)
        if not _fs.HAVE_LOCKS:  # pragma: no cover - Windows
            log.warning("multispool: no owner locks on this platform: clean_abandoned does nothing")
            return []
        with sp.throttled():
            regs = _fs.listdir(lay.registry)
            present: set[str] = set()
            entry_dirs = self._entry_dirs()
            for ed in entry_dirs:
                try:
                    present.update(_fs.listdir(ed))
                except FileNotFoundError:
                    continue  # another Spoolable's queue without .checkout, or removed
        now = time.time()
        removed: list[str] = []
        for name in sorted(set(regs) - present):
            if name[0] == "." or keep_name(name) in present:
                continue  # a keep link: an interrupted move, for recover_checkouts
            reg = lay.registry_file(name)
            with sp.throttled():
                try:
                    if now - _fs.lstat(reg).st_mtime < limit:
                        continue
                except OSError as e:
                    if _fs.gone(e):
                        continue
                    raise
                gen = _fs.lock_generation()
                try:
                    fd = _fs.open_locked(reg)
                except OSError as e:
                    log.warning("multispool: cannot clean %s, left in place: %s", reg, e)
                    continue
                if fd is None:
                    continue
                try:
                    # It may have reached a queue after the listing above; with the lock
                    # held, nobody can move it into one now. A file that cannot be looked
                    # up may be the entry: left, never taken for absent.
                    try:
                        if any(
                            _fs.lexists(p)
                            for d in entry_dirs
                            for p in (lay.file_in(d, name), lay.keep_file(d, name))
                        ):
                            continue
                    except OSError as e:
                        log.warning("multispool: cannot clean %s, left in place: %s", reg, e)
                        continue
                    if dry_run:
                        removed.append(name)
                        continue
                    if keep_aside:
                        # Repair never deletes what may be an entry's data (an acknowledged
                        # enqueue whose rename a crash lost, under "file" or "none").
                        files = [(lay.tmp_file(name), "metadata"), (lay.data_file(name), "data")]
                        _lostfound.put_aside(lay, name, files, sync=sp.durability == "full", mode=sp.dir_mode)
                    else:
                        try:
                            _fs.unlink_quiet(lay.tmp_file(name))
                            _fs.unlink_quiet(lay.data_file(name))
                        except OSError as e:
                            # One that cannot go (EACCES in a sticky .data, EIO) must not stop
                            # the clean-up of every name after it, run after run. Its
                            # reservation stays: the name is taken while its files are there.
                            log.warning("multispool: cannot clean %s, left in place: %s", reg, e)
                            continue
                    _fs.unlink_quiet(reg)
                    removed.append(name)
                finally:
                    _fs.unlock(fd, gen)
        if removed and sp.durability == "full" and not dry_run:
            _fs.fsync_dir(lay.registry)
        return removed

    # -- readers ------------------------------------------------------------------------
    def reader(
        self,
        queue: enum.Enum,
        observer: str = "auto",
        rescan_interval: Duration = 5.0,
        recover: bool = False,
        poll_interval: Duration = 0.1,
    ) -> QueueReader[M, D]:
        """An event-driven reader of ``queue`` (see QueueReader); use it as a context
        manager, or ``close`` it.

        ``observer``: ``"auto"`` (native events on local filesystems, polling on network
        and FUSE ones; the ``MULTISPOOL_OBSERVER`` environment variable overrides it),
        ``"native"`` or ``"polling"``. ``rescan_interval``: while waiting, check the queue
        this often (seconds) for entries no event announced (events can be lost).
        ``recover``: first put back checkouts of dead processes and clean abandoned
        enqueues. ``poll_interval``: how often (seconds) a polling reader lists the
        queue for new entries (one directory listing per poll)."""
        from ._reader import QueueReader

        return QueueReader(
            self,
            queue,
            observer=observer,
            rescan_interval=rescan_interval,
            recover=recover,
            poll_interval=poll_interval,
        )

    def __repr__(self) -> str:
        return f"Spool({self.dir!r}, {self.spoolable!r})"


@dataclass(frozen=True)
class _Recovered:
    """What a recovery run did with one checkout (see ``_Recovery``)."""

    queue: enum.Enum
    name: str
    moved: bool  # put back into its queue
    # Could not be read or moved, or cannot be decoded (and no quarantine queue): logged,
    # left in place for a person.
    error: OSError | CorruptEntryError | None = None


class _Recovery(Generic[M, D]):
    """One run of crash recovery: the one mechanism behind ``Spool.recover_checkouts``,
    ``fsck --repair`` and the command line's ``recover`` and ``mv`` of a checked-out entry.

    Creating it is the proof-of-death check, made once: with ``dead_after`` None a free
    owner lock must prove that its owner died on the spool's filesystem, else
    ``_RecoveryRefused`` (a SpoolError) is raised and nothing has been touched; with
    ``dead_after`` (seconds), a checkout must also be at least that old. ``checkouts``
    resolves each queue's keep links, then yields its checkouts in name order;
    ``recover`` puts one back under its owner lock and reports what it did, an OSError
    (or a checkout left undecodable for a person) being logged and reported, never
    raised (one entry's trouble, a symlink or FIFO planted at its registry name or a
    permission, must not stop the others). ``run``
    is the two together, entry by entry, for a caller that shows progress."""

    def __init__(self, spool: Spool[M, D], dead_after: Duration | None = None) -> None:
        self.spool = spool
        self.min_age = None if dead_after is None else seconds(dead_after)
        if self.min_age is None and _fs.HAVE_LOCKS:
            spool._check_locks_prove_death()

    def checkouts(self, queue: enum.Enum | None = None) -> Iterator[tuple[enum.Enum, str]]:
        """``(queue, name)`` of every checkout of ``queue`` (None: every queue), each
        queue's keep links resolved first (lazily: queue by queue, as iterated)."""
        spool = self.spool
        sp = spool.spoolable
        if not _fs.HAVE_LOCKS:  # pragma: no cover - Windows
            log.warning("multispool: no owner locks on this platform: recovery does nothing")
            return
        for q in sp._queue_list if queue is None else (queue,):
            dirname = sp.dirname(q)
            spool._resolve_keeps(dirname)
            for name in sorted(spool._list_names(spool._layout.checkout(dirname))):
                yield q, name

    def recover(self, q: enum.Enum, name: str) -> _Recovered:
        """Put checkout ``name`` of queue ``q`` back if its owner is dead (see the class)."""
        sp = self.spool.spoolable
        dirname = sp.dirname(q)
        with sp.throttled():
            try:
                moved = self.spool._recover_one(q, dirname, name, self.min_age)
            except OSError as e:
                log.warning("multispool: cannot recover %s/%s, left in place: %s", dirname, name, e)
                return _Recovered(q, name, False, e)
            except CorruptEntryError as e:  # left for a person (logged)
                return _Recovered(q, name, False, e)
        return _Recovered(q, name, moved)

    def run(self, queue: enum.Enum | None = None) -> Iterator[_Recovered]:
        """``recover`` each of ``checkouts(queue)``, reporting each as it goes."""
        for q, name in self.checkouts(queue):
            yield self.recover(q, name)


__all__ = [
    "CHECKOUT",
    "NOT_FOUND",
    "REMOVE",
    "Action",
    "NotFound",
    "Remove",
    "Retry",
    "CheckedOutEntry",
    "DataFile",
    "Entry",
    "Save",
    "Spool",
]

