"""The on-disk layout of a spool: the one module that builds spool paths.

    SPOOL/.registry/NAME        name reservation; lives for the entry's whole life; its
                                flock is the owner lock of an enqueue or a checkout;
                                empty (the OCaml layout: due now, 0 attempts) unless the
                                entry was delayed or retried: then it holds the schedule
                                record (due time, attempts; see _schedule)
    SPOOL/.tmp/NAME             metadata (or data) being written, before its atomic rename;
                                only the holder of the entry's owner lock writes it
    SPOOL/.data/NAME            the entry's data payload
    SPOOL/QUEUE/NAME            metadata of an entry waiting in QUEUE
    SPOOL/QUEUE/.checkout/NAME  metadata of an entry some process has checked out
    SPOOL/QUEUE/.~NAME          (durability "full", transient) keep link of a move out
    SPOOL/QUEUE/.checkout/.~NAME  of that dir (see below; never seen after a return)
    SPOOL/.lost+found/NAME/     what repair could not put back into a queue (created on need)

An entry's life, and the single rename or unlink that makes each step (every other module
follows this table):

    reserve      create .registry/NAME (O_EXCL)                         -> reserved
    enqueue      .tmp/NAME + .data/NAME, rename .tmp/NAME -> Q/NAME     -> queued in Q
    checkout     lock registry, rename Q/NAME -> Q/.checkout/NAME       -> checked out of Q
    save(Q2)     [rewrite via .tmp], rename Q/.checkout/NAME -> Q2/NAME -> queued in Q2
    direct save  lock registry, check Q/NAME, rename .tmp/NAME -> Q/NAME -> queued in Q
    release      rename Q/.checkout/NAME -> Q/NAME                      -> queued in Q
    remove       unlink Q/.checkout/NAME, .data/NAME, .registry/NAME    -> gone
    recover      (owner dead) rename Q/.checkout/NAME -> Q/NAME         -> queued in Q
    abandon      (enqueuer dead) unlink .tmp/NAME, .data/NAME, .registry/NAME -> gone
                 (fsck --repair: .tmp/NAME, .data/NAME -> .lost+found/NAME/ instead)

Durability "full" (crash-consistent under the pessimistic model of docs/crash-safety.md:
file data survives only once the file is fsynced, a directory's entries only as they were
at its last fsync). Every step above is made durable before it returns, in this order:

    enqueue      reserve: fsync .registry; write+fsync .tmp/NAME and .data/NAME, fsync .data;
                 rename into Q; fsync Q.
    move         (checkout, save, release, recover, quarantine: every rename of a queued
                 or checked-out entry from SRC/NAME to DST/NAME)
                   1. link SRC/NAME -> SRC/KEEP        KEEP = keep_name(NAME), a dot-name
                   2. rename SRC/NAME -> DST/NAME      the step itself (the claim, for a
                                                       checkout: still one rename(2))
                   3. fsync DST                        the entry is durable in DST
                   4. unlink SRC/KEEP
                   5. fsync SRC                        it is durable only in DST
                 A fsync of SRC by anyone records NAME (before 2) or KEEP (after 1, until
                 4), so SRC's durable state holds the entry until DST's does: the entry is
                 never in no durable place, whoever fsyncs what and when. A checkout
                 defers step 5 to the save, remove or quarantine that ends it (a release
                 needs none: DST is SRC); a metadata rewrite before a save is renamed
                 over SRC/NAME without a directory fsync (the move makes it durable).
    remove       unlink Q/.checkout/NAME; fsync Q/.checkout; fsync Q (the checkout's
                 deferred step 5); then unlink .data/NAME and .registry/NAME.
    direct ops   rewrite or unlink Q/NAME; fsync Q.

After a crash, these states exist only where an operation was interrupted, and recovery
(``recover_checkouts``, run by ``fsck --repair``) resolves them under the owner lock:
    SRC/KEEP and NAME in some queue or checkout dir   -> unlink KEEP (the move happened)
    SRC/KEEP only                                     -> rename KEEP back to SRC/NAME
    SRC/KEEP, no .data/NAME (the entry was removed    -> unlink KEEP if NAME has no
      after its cut move was done)                       registry file, else put it aside
                                                         (the name is another entry's now)
    NAME in two dirs (a move cut between 2 and 5)     -> a dead checkout already queued
                                                         is not moved back (dropped, or
                                                         kept aside if it differs); else
                                                         the Monitor's Duplicated: repair
                                                         keeps one copy
What repair cannot put back into a queue (orphaned files, abandoned enqueues, duplicates
that differ) goes to ``.lost+found/NAME/`` (see ``_lostfound``): repair never deletes data.

Delays and retries add no step and no file: they change the schedule record in
``.registry/NAME``, always under the owner lock and made durable before the rename that
publishes the move (so a crash after the rename never shows an older record):

    enqueue(delay)   record written into the locked registry file before
                     rename .tmp/NAME -> Q/NAME                         -> queued, delayed
    checkout         readers only: a record whose due time is ahead     -> stays queued
                     (lock released, no rename; st_size 0 = due now)
    save(Q2, delay)  record (due, attempts 0), then the save rename     -> queued in Q2
    retry(delay)     record (due, same attempts), rename -> Q/NAME      -> queued in Q, delayed
    fail (Backoff)   record (due, attempts + 1), rename -> Q/NAME       -> queued in Q, delayed
    dead-letter      record (due now, attempts + 1), rename -> DL/NAME  -> queued in DL
    recover          record untouched: a retry decided before the crash stands

A move that makes a due time still in the future earlier also rewrites Q/NAME (a new
inode): a reader that deferred it until its old due time drops that on the arrival event.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from ._errors import InvalidNameError, NotASpoolError
from ._fs import At, Dirs, SpoolDir, spool_dir

REGISTRY: Final = ".registry"
TMP: Final = ".tmp"
DATA: Final = ".data"
CHECKOUT: Final = ".checkout"

MAX_NAME_BYTES: Final = 255
LOST_FOUND: Final = ".lost+found"
KEEP_PREFIX: Final = ".~"


_KEEP_MAX: Final = MAX_NAME_BYTES - len(KEEP_PREFIX)
_KEEP_SURE: Final = _KEEP_MAX // 4


def keep_name(name: str) -> str:
    """The dot-name of the hard link a durable move leaves in its source directory (see
    the life-cycle table): ``.~NAME``, or ``.~#`` and a hash where that would be too long."""
    # At most 4 bytes a character in UTF-8 (1 for a surrogate escape): a name of up to 63
    # characters fits whatever they are, without encoding it.
    if len(name) <= _KEEP_SURE or len(name.encode("utf-8", "surrogateescape")) <= _KEEP_MAX:
        return KEEP_PREFIX + name
    import hashlib

    return KEEP_PREFIX + "#" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()


def check_name(name: object) -> str:
    """Return ``name`` if it is a safe entry name, else raise InvalidNameError.

    Safe: a non-empty str, not starting with '.', without '/' or NUL (or '\\' on Windows,
    where it is a separator), at most 255 bytes in UTF-8.
    """
    if not isinstance(name, str):
        raise InvalidNameError(name, "not a str")
    if not name:
        raise InvalidNameError(name, "empty")
    if name[0] == ".":
        raise InvalidNameError(name, "starts with '.' (names '.', '..' and dot-names are reserved)")
    if "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise InvalidNameError(name, "contains a path separator")
    if "\0" in name:
        raise InvalidNameError(name, "contains NUL")
    try:
        n = len(name.encode("utf-8", "surrogateescape"))
    except UnicodeError as e:
        raise InvalidNameError(name, f"cannot be encoded: {e}") from None
    if n > MAX_NAME_BYTES:
        raise InvalidNameError(name, f"longer than {MAX_NAME_BYTES} bytes ({n})")
    return name


def check_queue_dirname(value: object) -> str:
    """Return ``value`` if it can name a queue directory, else raise ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"queue value must be a non-empty str, got {value!r}")
    if value.startswith("."):
        raise ValueError(f"queue value must not start with '.': {value!r}")
    if "/" in value or "\0" in value or os.sep in value or (os.altsep and os.altsep in value):
        raise ValueError(f"queue value must not contain '/' or NUL: {value!r}")
    if value in (".", ".."):
        raise ValueError(f"queue value {value!r} is reserved")
    return value


# Whether this platform reaches files through directory descriptors (not Windows): where
# not, a Layout's paths are plain strs, used by path as before.
HOLD_DIRS: Final = {os.open, os.rename, os.link, os.unlink, os.stat} <= os.supports_dir_fd


class Layout:
    """Paths of one spool. Builds strs and touches nothing, but for the descriptors of the
    spool's directories (``_fs.Dirs``): the paths it gives (``_fs.SpoolDir``,
    ``_fs.At``) are reached through them, each directory opened (never through a
    symlink: NotASpoolError naming it) the first time a path in it is used, then held
    until the Layout is collected. A directory swapped for a symlink, or moved, once
    held changes nothing: operations stay in the directory that was there, until
    ``refresh`` (a reader that found its queue directory replaced). A pickled Layout is
    opened afresh."""

    __slots__ = ("_dirs", "_files", "_qfiles", "_root", "data", "dir", "fds", "registry", "root", "tmp")

    def __init__(self, spool_dir: str) -> None:
        self.dir = spool_dir
        # Entry names and queue dirnames are checked to hold no separator, so a plain
        # concatenation is what os.path.join would return, at a fraction of its cost.
        self._root = os.path.join(spool_dir, "")
        self.fds = Dirs(spool_dir, NotASpoolError)
        self._dirs: dict[str, str] = {}
        # Per directory path: the prefix of its files' paths, and the directory; per
        # queue dirname, the same for its queue dir. Built once, as these are on every
        # entry's path.
        self._files: dict[str, tuple[str, str]] = {}
        self._qfiles: dict[str, tuple[str, str]] = {}
        self.root = self._dir("")
        self.registry = self._dir(REGISTRY)
        self.tmp = self._dir(TMP)
        self.data = self._dir(DATA)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Layout, (self.dir,))  # descriptors mean nothing in another process

    def _dir(self, key: str) -> str:
        d = self._dirs.get(key)
        if d is None:
            if len(self._dirs) >= 1024:  # only a spool's dirs come here; a bound all the same
                self._dirs.clear()
                self._files.clear()
                self._qfiles.clear()
            path = self._root + key if key else self.dir
            d = self._dirs[key] = spool_dir(path, self.fds, key) if HOLD_DIRS else path
        return d

    def refresh(self) -> None:
        """Follow the spool's directories renamed since they were opened (``Dirs.refresh``)."""
        self.fds.refresh()

    def _in(self, directory: str, name: str) -> str:
        """The path of ``name`` in ``directory`` (one of this Layout's)."""
        f = self._files.get(directory)
        if f is None:
            f = self._files[directory] = (os.path.join(directory, ""), directory)
        if type(f[1]) is SpoolDir:
            # At(str) is built in C, its attributes stored: no Python call.
            a = At(f[0] + name)
            a.home = f[1]
            a.rel = name
            return a
        return f[0] + name

    def queue(self, dirname: str) -> str:
        d = self._dirs.get(dirname)  # inline: on every enqueue's path
        return self._dir(dirname) if d is None else d

    def checkout(self, dirname: str) -> str:
        return self._dir(dirname + "/" + CHECKOUT)

    # The entry-path methods inline _in: they are on every entry's path.
    def registry_file(self, name: str) -> str:
        d = self.registry
        if type(d) is SpoolDir:
            a = At(d + "/" + name)
            a.home = d
            a.rel = name
            return a
        return os.path.join(d, name)

    def tmp_file(self, name: str) -> str:
        d = self.tmp
        if type(d) is SpoolDir:
            a = At(d + "/" + name)
            a.home = d
            a.rel = name
            return a
        return os.path.join(d, name)

    def data_file(self, name: str) -> str:
        d = self.data
        if type(d) is SpoolDir:
            a = At(d + "/" + name)
            a.home = d
            a.rel = name
            return a
        return os.path.join(d, name)

    def queue_file(self, dirname: str, name: str) -> str:
        f = self._qfiles.get(dirname)
        if f is None:
            d = self._dir(dirname)
            f = self._qfiles[dirname] = (os.path.join(d, ""), d)
        d = f[1]
        if type(d) is SpoolDir:
            a = At(f[0] + name)
            a.home = d
            a.rel = name
            return a
        return f[0] + name

    def checkout_file(self, dirname: str, name: str) -> str:
        return self._in(self._dir(dirname + "/" + CHECKOUT), name)

    def file_in(self, directory: str, name: str) -> str:
        """The path of ``name`` in ``directory`` (a queue or checkout dir path)."""
        return self._in(directory, name)

    def keep_file(self, directory: str, name: str) -> str:
        """The keep link of ``name`` in ``directory`` (a queue or checkout dir path)."""
        return self._in(directory, keep_name(name))

    @property
    def lost_found(self) -> str:
        return self._root + LOST_FOUND

    def fixed_dirs(self) -> tuple[str, str, str]:
        return (self.registry, self.tmp, self.data)


class _Kind(enum.IntEnum):
    # Order matters: it is the sort order of Dir values, as in the OCaml Monitor.
    REGISTRY = 0
    TMP = 1
    DATA = 2
    QUEUE = 3
    CHECKOUT = 4


@dataclass(frozen=True, eq=True)
class Dir:
    """A directory of the spool, as the Monitor reports it.

    ``Dir.REGISTRY``, ``Dir.TMP``, ``Dir.DATA``, ``Dir.queue(q)``, ``Dir.checkout(q)``.
    Values are frozen, hashable and ordered: registry < tmp < data < queues (in queue
    definition order, each queue's dir before its checkout dir).
    """

    kind: _Kind
    queue_member: Any = None

    REGISTRY: ClassVar[Dir]  # assigned below: a class cannot hold instances of itself yet
    TMP: ClassVar[Dir]
    DATA: ClassVar[Dir]

    @staticmethod
    def queue(q: enum.Enum) -> Dir:
        """The directory of queue ``q``, where its waiting entries are."""
        return Dir(_Kind.QUEUE, q)

    @staticmethod
    def checkout(q: enum.Enum) -> Dir:
        """The checkout directory of queue ``q``, where its checked-out entries are."""
        return Dir(_Kind.CHECKOUT, q)

    @property
    def name_on_disk(self) -> str:
        """The directory's path relative to the spool: ``".registry"``, ``"queue1/.checkout"``..."""
        if self.kind is _Kind.REGISTRY:
            return REGISTRY
        if self.kind is _Kind.TMP:
            return TMP
        if self.kind is _Kind.DATA:
            return DATA
        dirname = str(self.queue_member.value)
        return dirname if self.kind is _Kind.QUEUE else f"{dirname}/{CHECKOUT}"

    def _sort_key(self) -> tuple[int, int, int]:
        if self.queue_member is None:
            return (int(self.kind), 0, 0)
        members: list[Any] = list(type(self.queue_member).__members__.values())
        is_co = 1 if self.kind is _Kind.CHECKOUT else 0
        return (int(_Kind.QUEUE), members.index(self.queue_member), is_co)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Dir):
            return NotImplemented
        return self._sort_key() < other._sort_key()

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Dir):
            return NotImplemented
        return self._sort_key() <= other._sort_key()

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Dir):
            return NotImplemented
        return self._sort_key() > other._sort_key()

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Dir):
            return NotImplemented
        return self._sort_key() >= other._sort_key()

    def __repr__(self) -> str:
        if self.queue_member is None:
            return f"Dir.{self.kind.name}"
        fn = "queue" if self.kind is _Kind.QUEUE else "checkout"
        return f"Dir.{fn}({self.queue_member!r})"


Dir.REGISTRY = Dir(_Kind.REGISTRY)
Dir.TMP = Dir(_Kind.TMP)
Dir.DATA = Dir(_Kind.DATA)
