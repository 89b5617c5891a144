"""Atomic, durable and symlink-safe file primitives. Every disk write of the spool goes
through here, so the durable-write recipe and the platform details live in one place.

Durability levels (see Spoolable.durability):
    "full"  fsync written files and every directory whose entries changed
    "file"  fsync file contents only (what the OCaml library does)
    "none"  fsync nothing
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import os
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

# O_NOFOLLOW: a symlink planted at an entry's path must never be followed; O_CLOEXEC: lock
# descriptors must not leak into exec'd children (they would keep checkouts locked);
# O_NONBLOCK: a FIFO (or device) planted at an entry's path must never block an open or a
# read (it is refused as "not a regular file" instead). On regular files it changes nothing.
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
_BINARY: Final = getattr(os, "O_BINARY", 0)
_DIRECTORY: Final = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK: Final = getattr(os, "O_NONBLOCK", 0)
_DIR_FLAGS: Final = os.O_RDONLY | _DIRECTORY | _CLOEXEC
O_READ: Final = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _BINARY | _NONBLOCK
# Files are only ever created, never opened to be truncated or rewritten: O_NOFOLLOW
# refuses a symlink planted at the path, but a hard link planted there (a user's file
# linked at a name the spool is about to write: names are predictable) is that user's
# file itself. A file found at such a path is unlinked and the name created anew
# (``write_file``).
O_CREATE_EXCL: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY | _NONBLOCK
# Registry files are opened read-write: where flock is emulated with fcntl locks (NFS,
# CIFS), an exclusive lock needs a descriptor open for writing.
O_LOCK: Final = os.O_RDWR | _NOFOLLOW | _CLOEXEC | _BINARY | _NONBLOCK
O_LOCK_RO: Final = O_READ

# A stand-in errno for "not a regular file" (a FIFO, socket or device planted at an entry's
# path): BSDs have EFTYPE; elsewhere ENXIO, which is also what opening a socket gives.
ENOTREG: Final = getattr(errno, "EFTYPE", errno.ENXIO)


# -- paths held through directory descriptors -----------------------------------------
# A member of a shared spool's group may replace one of its directories (a queue, its
# .checkout, .data, .tmp, .registry) with a symlink to a directory elsewhere: an operation
# by path would then rename over, or unlink, a file there with the caller's rights. So a
# spool opens each of its directories once (O_NOFOLLOW, relative to its parent's
# descriptor: ``_layout.Layout``) and every primitive here reaches a spool path through
# its directory's descriptor (openat, renameat, linkat, unlinkat, fstatat): once a
# directory is held, swapping its path changes nothing. The paths stay strs (messages and
# errors name the whole path); the primitives also take plain paths (a spool's parent,
# a user's file), reached as before.


class Dirs:
    """The descriptors of one spool's directories, by key ("" the spool, ".registry",
    "QUEUE", "QUEUE/.checkout"): each opened on first use, relative to its parent's and
    never through a symlink (NotASpoolError naming it; the spool's own path, as given,
    may be one: a user's choice), then held until this object is collected. A forked
    child keeps them (they hold no lock). ``refresh`` follows directories replaced
    since (by rename: real directories) without changing a descriptor's number, so a
    number read by another thread never names another file."""

    def __init__(self, root: str, not_a_spool: Callable[[str, str], Exception]) -> None:
        self.root = root
        self._prefix = os.path.join(root, "")
        self._not_a_spool = not_a_spool
        # Each descriptor in a list that the call opening it fills (the descriptor box,
        # below): an interrupting exception cannot lose it between the open and the store.
        self.fds: dict[str, list[int]] = {}
        # (st_dev, st_ino) of each held directory, taken as it is opened: what a reader
        # compares its queue directory's path with, at no system call (see refresh).
        self.idents: dict[str, tuple[int, int]] = {}
        self._lock = threading.RLock()
        weakref.finalize(self, _close_dirs, self.fds)

    def path(self, key: str) -> str:
        return self._prefix + key if key else self.root

    def _open(self, key: str, held: set[int]) -> int:
        """A new descriptor of directory ``key`` (its parent's held one, opened if need
        be), added to ``held`` as soon as it is opened (closed again if an exception
        comes in between)."""
        parent, _, base = key.rpartition("/")
        if key:
            pfd: int | None = self.fd(parent)
            flags = _DIR_NOFOLLOW
        else:
            pfd, base, flags = None, self.root, _DIR_FLAGS
        box: list[int] = []
        try:
            box.extend(map(functools.partial(os.open, dir_fd=pfd), (base,), (flags,)))
            held.add(box[0])
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR) and key:
                raise self._not_a_spool(_NOT_A_DIR, self.path(key)) from None
            e.filename = self.path(key)
            raise
        except BaseException:
            for fd in box:
                held.discard(fd)
            _DISCARD.extend(map(os.close, box))
            raise
        return box[0]

    def fd(self, key: str) -> int:
        """The held descriptor of directory ``key``, opened on first use."""
        box = self.fds.get(key)
        if box:
            return box[0]
        with self._lock:
            box = self.fds.get(key)
            if box:
                return box[0]
            box = self.fds[key] = []
            try:
                # In _dir_fds from its open on: _close_unheld, run by another thread's
                # interrupted open, must never take it for lost.
                box.append(self._open(key, _dir_fds))
            finally:
                if not box:
                    del self.fds[key]
            st = os.fstat(box[0])
            self.idents[key] = (st.st_dev, st.st_ino)
            return box[0]

    def refresh(self) -> None:
        """Hold what each held directory's path names now, parents first: a directory
        renamed there is followed, a symlink refused (NotASpoolError naming it). A path
        that names nothing now keeps its directory (nothing else is taken for it). Each
        new directory takes the number of the old (dup2), which it closes."""
        with self._lock:
            for key in sorted(self.fds, key=lambda k: (k.count("/"), k != "", k)):
                if not self.fds[key]:
                    continue
                try:
                    new = self._open(key, _dir_fds)
                except FileNotFoundError:
                    continue
                try:
                    st = os.fstat(new)
                    os.dup2(new, self.fds[key][0], inheritable=False)
                    self.idents[key] = (st.st_dev, st.st_ino)
                finally:
                    _dir_fds.discard(new)
                    os.close(new)


def _close_dirs(fds: dict[str, list[int]]) -> None:
    for box in fds.values():
        for fd in box:
            _dir_fds.discard(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
    fds.clear()


_DIR_NOFOLLOW: Final = (
    os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)
_NOT_A_DIR: Final = "not a directory (symlinks are not followed)"


class SpoolDir(str):
    """A directory of a spool, as a str its path; ``fd`` is its descriptor (``Dirs``),
    looked up on first use, then a plain attribute. Reached as "." in itself."""

    rel = "."
    _dirs: Dirs
    _key: str
    fd: int

    def __getattr__(self, name: str) -> Any:
        # Only a missing attribute comes here: ``fd`` before its first use.
        if name != "fd":
            raise AttributeError(name)
        fd = self.fd = self._dirs.fd(self._key)
        return fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, (str(self),))  # a descriptor means nothing in another process


def held_ident(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the directory a spool holds for ``path`` (a SpoolDir; opened
    if need be), None for a path reached by path."""
    if type(path) is not SpoolDir:
        return None
    path.fd  # noqa: B018 - opened (and its identity taken) on first use
    return path._dirs.idents[path._key]


def spool_dir(path: str, dirs: Dirs, key: str) -> SpoolDir:
    d = SpoolDir(path)
    d._dirs = dirs
    d._key = key
    return d


class At(str):
    """A file of a spool, as a str its whole path: ``rel``, its name in directory
    ``home`` (a SpoolDir), through whose descriptor it is reached. Built by the Layout
    with ``At(path)`` and two attribute stores: no Python call on an entry's path."""

    home: SpoolDir
    rel: str

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, (str(self),))


def at(path: str) -> tuple[str, int | None]:
    """Where a system call reaches ``path``: its name and directory descriptor for a
    spool path (SpoolDir, At), the path itself and None (the cwd) for any other."""
    t = type(path)
    if t is At:
        return path.rel, path.home.fd  # type: ignore[attr-defined]
    if t is SpoolDir:
        return ".", path.fd  # type: ignore[attr-defined]
    return path, None


def _renamed(e: OSError, path: str, path2: str | None = None) -> OSError:
    """``e`` from a call given ``at(path)`` (and ``at(path2)``): named by the whole paths,
    not the names relative to a directory descriptor."""
    if e.filename is None or (type(path) is not str and e.filename == getattr(path, "rel", None)):
        e.filename = str(path)
    if path2 is not None and (
        e.filename2 is None or (type(path2) is not str and e.filename2 == getattr(path2, "rel", None))
    ):
        e.filename2 = str(path2)
    return e


def not_regular(path: str) -> OSError:
    """The error for a path that is not a regular file (never opened blocking)."""
    return OSError(ENOTREG, "not a regular file", path)


def other_links(path: str) -> OSError:
    """The error for a registry file with other hard links: the spool makes each with one
    link, so it was planted (a user's file linked there), and the schedule record its
    owner writes into it would be written into that file. EMLINK, as FreeBSD's
    O_NOFOLLOW gives for a symlink: callers refuse both alike."""
    return OSError(errno.EMLINK, "registry file has other hard links (not made by the spool)", path)
# An existing file opened for writing in place (a registry file's schedule record,
# when its lock was taken on a read-only descriptor).
O_WRITE_EXISTING: Final = os.O_WRONLY | _NOFOLLOW | _CLOEXEC | _BINARY | _NONBLOCK

if sys.platform == "darwin":  # pragma: no cover - macOS only
    import fcntl

    def fsync_fd(fd: int) -> None:
        """Flush a file to stable storage (F_FULLFSYNC: plain fsync on macOS does not)."""
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
        except OSError:
            os.fsync(fd)
else:
    # os.fsync itself: a Python function around it was a frame more on every sync's path.
    fsync_fd = os.fsync


if os.name == "nt":  # pragma: no cover - Windows only

    def fsync_dir(path: str) -> None:
        """Directories cannot be opened for fsync on Windows; NTFS journals metadata."""

else:

    def fsync_dir(path: str) -> None:
        """Make the entries of directory ``path`` durable (a spool's own directory through
        the descriptor it holds: no open or close)."""
        if type(path) is SpoolDir:
            try:
                fsync_fd(path.fd)
            except OSError as e:
                raise _renamed(e, path) from None
            return
        box: list[int] = []  # the descriptor box (below)
        close = functools.partial(_DISCARD.extend, map(os.close, box))
        try:
            box.extend(map(os.open, (path,), (_DIR_FLAGS,)))
            fsync_fd(box[0])
        except OSError as e:
            raise _name(e, path) from None
        finally:
            close()



# The descriptor box, for a descriptor opened by path and closed in the same call
# (fsync_dir, read_file):
#
#     box: list[int] = []
#     close = functools.partial(_DISCARD.extend, map(os.close, box))
#     try:
#         box.extend(map(os.open, (path,), (flags,)))
#         ... box[0] ...
#     finally:
#         close()
#
# The open runs and its descriptor is stored inside one C call (list.extend drives the
# map), and the close in the ``finally`` is one C call too, made ready before the
# ``try``: no signal handler runs inside either. ``fd = os.open(...)`` loses the number
# to an exception raised as the call returns (a handler runs there), and ``try: ...
# finally: os.close(fd)`` can be cut short before its close. Measured with a SIGALRM
# storm every 70 us (100,000 opens): 2,321-3,285 descriptors lost the plain way on
# Python 3.10 to 3.13, 0 this way on 3.11 to 3.13, 508 on 3.10 (which also runs
# handlers between other bytecodes). The lines are written where they run, not in a
# helper: these run several times per durable operation, and a call is a frame more.

# Takes os.close's results and keeps none: extend of a deque of maxlen 0 only drives its
# iterator, touching nothing of the deque, so every thread can share it.
_DISCARD: Final[collections.deque[None]] = collections.deque(maxlen=0)


def _libc_function(name: str, argtypes: list[Any] | None) -> Any:
    """libc's function ``name`` on Linux, typed (``argtypes`` None: its callers pass
    every argument as its C type), or None where it is not to be had."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    if argtypes is not None:
        fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


def _syncfs_function() -> Any:
    """libc's syncfs where it reports writeback errors (Linux >= 5.8), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) < (5, 8):
        return None  # older kernels return 0 from syncfs even when writeback failed
    import ctypes

    return _libc_function("syncfs", [ctypes.c_int])


_syncfs: Final = _syncfs_function()
HAVE_SYNCFS: Final = _syncfs is not None


# No argtypes: every call passes the descriptor and the flags as Python ints (a C int
# each) and the offset and length as ``_WHOLE``, a c_int64, which ctypes then takes as
# they are. Converting through argtypes made a call 8,800 instructions against 4,900
# (callgrind; an ``os.fsync`` is 1,350), and this runs two to four times per durable
# entry. Any other caller must pass the same types.
_sync_file_range: Final = _libc_function("sync_file_range", None)
_SYNC_FILE_RANGE_WRITE: Final = 2  # <linux/fs.h>: start writeback, wait for nothing


def _whole_file() -> Any:
    """sync_file_range's offset and length for a whole file (both 0), as the c_int64 its
    C prototype wants (see ``_sync_file_range``), made once."""
    if _sync_file_range is None:
        return 0
    import ctypes

    return ctypes.c_int64(0)


_WHOLE: Final = _whole_file()


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing back the file's dirty pages now (Linux; a no-op
    elsewhere), for a file that will be fsynced soon. A hint only: it makes nothing
    durable and reports nothing; the fsync that must follow does both (a writeback
    error is kept for every open descriptor of the file and reported by its next fsync,
    whoever started the write).

    Why: on ext4 and xfs a new file's blocks are allocated when its writeback starts.
    Files written one after another and then fsynced together (a batch, a group, an
    entry's two files) each allocated at their own fsync, and each allocation landed in
    a later journal transaction that the next fsync had to commit again (28 commits for
    a batch of 100 on ext4). Started as each file is written, the allocations join the
    running transaction, the first fsync commits them all, and the others wait only for
    their data and a cache flush (docs/benchmarks-batch.md)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, _WHOLE, _WHOLE, _SYNC_FILE_RANGE_WRITE)  # failure: the fsync reports it


# The same function, for write_out only: tests that watch the hints above patch the name
# ``_sync_file_range`` and must not see these calls.
_write_out_range: Final = _sync_file_range
_SYNC_FILE_RANGE_WAIT: Final = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER


def write_out(files: Sequence[tuple[str, int | None]]) -> list[OSError | None]:
    """Start writing back every regular file of ``files`` (path, its open descriptor or
    None), then wait until all of them are written (Linux; a no-op elsewhere), for files
    about to be fsynced together; ``WRITE_OUT_WINDOW`` files at a time, each window
    started, then waited for.
    Returns, for each path, the writeback error its wait reported, or None: the caller
    must take it as that file's fsync error. The wait reports an error once and marks it
    seen, so an fsync through a descriptor opened afterwards would not report it again.
    Otherwise a hint, like ``start_writeback``: it makes nothing durable, and a path
    that cannot be opened gives None (its fsync reports why).

    Why: each file's fsync first waits for its own data, and the filesystem logs what
    the write changed (xfs: the new file size, at I/O completion) only then. Fsyncs in
    flight together force the log at different times, each for what had arrived by
    then. With every file's data already written, the first log force takes in all of
    it. Eight threads in group commit: 1.12-1.20x on an xfs loop image
    (docs/benchmarks-batch.md). The files are the spool's own (their owner lock is
    held), opened like ``fsync_file`` opens them."""
    errs: list[OSError | None] = [None] * len(files)
    if _write_out_range is None:
        return errs
    # Window by window: every file of a window is open from its start to its wait, and a
    # batch of thousands must not run the process out of descriptors.
    for lo in range(0, len(files), WRITE_OUT_WINDOW):
        _write_out_window(files, lo, min(lo + WRITE_OUT_WINDOW, len(files)), errs)
    return errs


# Files ``write_out`` holds open at once.
WRITE_OUT_WINDOW: Final = 256


def _write_out_window(
    files: Sequence[tuple[str, int | None]], lo: int, hi: int, errs: list[OSError | None]
) -> None:
    """``write_out`` for ``files[lo:hi]``: start them all, then wait for each."""
    holds: list[_FileHold] = []
    fds: list[int | None] = []  # one per file, in order: errs[lo + k] is fds[k]'s
    try:
        for path, given in files[lo:hi]:
            fd = given
            if fd is None:
                hold = _FileHold()
                holds.append(hold)
                with contextlib.suppress(OSError):  # its fsync reports why
                    fd = _open_held(path, O_READ, 0o777, hold)
            fds.append(fd)
            if fd is not None:
                _write_out_range(fd, _WHOLE, _WHOLE, _SYNC_FILE_RANGE_WRITE)
        for k, fd in enumerate(fds):
            if fd is not None and _write_out_range(fd, _WHOLE, _WHOLE, _SYNC_FILE_RANGE_WAIT) != 0:
                import ctypes

                err = ctypes.get_errno()
                errs[lo + k] = OSError(err, os.strerror(err), files[lo + k][0])
    finally:
        for hold in holds:
            if hold.fd is not None:
                _close_held(hold.fd, hold)


# Descriptors a batch may hold beyond one lock per entry: ``write_out``'s window (Linux; AIO's
# is no larger; elsewhere the sync pool's 16 threads hold one each), the directories, and
# some for the rest of the process.
SPARE_FDS: Final = (WRITE_OUT_WINDOW if _write_out_range is not None else 16) + 64


def _open_fd_count() -> int | None:
    for d in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(d))
        except OSError:
            continue
    return None


def make_room_for_locks(n: int, where: str, extra: int = 0) -> bool:
    """Make sure this process may open ``n`` more files (the owner locks of a batch, each
    held until the batch is published) and ``SPARE_FDS`` besides; then try to make room
    for ``extra`` more as well (its written files, kept open until published): returns
    whether it did. If the soft limit on open files (RLIMIT_NOFILE, often 1,024) is too
    low, it is raised as far as needed, never above the hard limit (Go's runtime raises
    it to the hard limit at start); if even the locks do not fit, OSError EMFILE naming
    ``where``, before anything is written. No such limit (Windows): True."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return True
    if _room(resource, n + extra)[0]:
        return True
    fits, need, in_use, hard = _room(resource, n)
    if not fits:
        raise OSError(
            errno.EMFILE,
            f"a batch of {n} entries keeps an open file per entry until it is published: it "
            f"needs about {need} open files, and this process may open {hard} (RLIMIT_NOFILE; "
            f"{'?' if in_use is None else in_use} open now): enqueue fewer at a time",
            where,
        )
    return False


def _room(resource: Any, n: int) -> tuple[bool, int, int | None, int]:
    """Whether ``n`` more files and ``SPARE_FDS`` fit under the soft limit, raised if need
    be (see ``make_room_for_locks``); with the count needed, the count open (None:
    unknown) and the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    if soft == inf or n + SPARE_FDS <= soft // 2:
        return True, n + SPARE_FDS, None, hard  # the common case, without counting what is open
    in_use = _open_fd_count()
    need = (soft // 2 if in_use is None else in_use) + n + SPARE_FDS
    if need <= soft:
        return True, need, in_use, hard
    if hard == inf or need <= hard:
        want = need if hard == inf else min(hard, max(need, 2 * soft))
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return True, need, in_use, hard
        except (OSError, ValueError):  # macOS: above kern.maxfilesperproc
            pass
    return False, need, in_use, hard


def open_syncfs(path: str) -> int:
    """A descriptor for ``syncfs``: open it BEFORE writing what it must make durable, as
    syncfs reports the writeback errors of the filesystem since the descriptor opened."""
    try:
        rel, dfd = at(path)
        return os.open(rel, _DIR_FLAGS, dir_fd=dfd)
    except OSError as e:
        raise _renamed(e, path) from None


def syncfs(fd: int, path: str) -> None:
    """syncfs(2): write back the whole filesystem of ``fd``; OSError naming ``path`` on
    a writeback error since ``fd`` was opened."""
    if _syncfs(fd) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def _name(e: OSError, path: str) -> OSError:
    """Errors from calls on a descriptor (write, fsync, read, utimensat) carry no path;
    give them the file's, so every error says where."""
    return _renamed(e, path)


def write_file(
    path: str,
    contents: bytes,
    *,
    sync: bool,
    mode: int,
    exclusive: bool = False,
    owned: bool = False,
    writeback: bool = False,
    holder: _FileHold | None = None,
) -> None:
    """Write ``contents`` to ``path`` as a new file, fsync it when ``sync``. On failure the
    partly written file is removed. A file already at ``path`` is replaced, never
    written through (``replace_stale``: it may be a hard link of a user's file), or
    with ``exclusive``, FileExistsError. ``owned``:
    nothing else in this process has ``path`` open (a file of an entry whose owner lock
    the caller holds), so a descriptor an interrupting exception lost can be found by
    its path and closed. With ``holder``, the descriptor stays open in it,
    recorded in the step that opens it (``_open_held``: no interrupting exception can
    lose it), for the caller to sync through and close (``_close_held``).
    ``writeback``: the caller will fsync the file later; start its writeback now
    (``start_writeback``)."""
    flags = O_CREATE_EXCL
    if holder is not None:
        _write_held(path, contents, exclusive, mode, holder, sync, writeback)
        return
    # Nothing runs between the open and the try that closes its descriptor, and the close
    # is inside it: Python 3.10 runs signal handlers at a jump, and an exception raised
    # at a jump outside it lost the descriptor. ``closed`` is set just before
    # the close (no handler runs between the two): an exception raised as the close
    # returns must not close the number again (another file may have it by then).
    closed = False
    try:
        if type(path) is At:  # inline (no call): every entry's files come here
            fd = os.open(path.rel, flags, mode, dir_fd=path.home.fd)
        else:
            fd = os.open(path, flags, mode)
    except FileExistsError as e:
        if exclusive:
            raise _renamed(e, path) from None
        fd = replace_stale(path, functools.partial(_open_owned, path, flags, mode, owned))
    except OSError as e:
        raise _renamed(e, path) from None
    except BaseException:
        if owned:
            _close_lost(path, flags)
        raise
    try:
        n = os.write(fd, contents)  # all of it, but for a rare short write
        if n < len(contents):
            _write_rest(fd, contents, n)
        if sync:
            fsync_fd(fd)
        elif writeback:
            start_writeback(fd)
        closed = True
        os.close(fd)
    except OSError as e:
        if not closed:
            os.close(fd)
        unlink_quiet(path)
        raise _name(e, path) from None
    except BaseException:
        if not closed:
            os.close(fd)
        unlink_quiet(path)
        raise


def _open_owned(path: str, flags: int, mode: int, owned: bool) -> int:
    """``os.open`` for ``write_file``'s replacing open: a descriptor an interrupting
    exception lost is closed as its first open's is."""
    try:
        rel, dfd = at(path)
        return os.open(rel, flags, mode, dir_fd=dfd)
    except OSError as e:
        raise _renamed(e, path) from None
    except BaseException:
        if owned:
            _close_lost(path, flags)
        raise


# How many times a file found at a path the spool creates is unlinked before giving up:
# one that is back at once, time after time, is being planted there.
_REPLACE_TRIES: Final = 3


def replace_stale(path: str, create: Callable[[], int]) -> int:
    """``create()`` (an O_EXCL open of ``path``) once the file in the way is gone.
    ``path`` is a name of the caller's own (an entry's staging or data file, under the
    entry's owner lock or reservation): what is there is a lost entry's leftover, or
    was planted. It is unlinked, never opened: it may be a hard link of a user's
    file, which a truncating open would destroy. A symlink there is refused (ELOOP
    naming ``path``), as an open without following it refuses it; so is a file that
    keeps coming back (FileExistsError)."""
    for _ in range(_REPLACE_TRIES):
        try:
            rel, dfd = at(path)
            st = os.lstat(rel, dir_fd=dfd)
        except OSError as e:
            if not gone(e):
                raise _renamed(e, path) from None
        else:
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            unlink_quiet(path)
        try:
            return create()
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "a file keeps reappearing where the spool creates one", path)


def _write_all(fd: int, contents: bytes | bytearray | memoryview) -> None:
    """Write all of ``contents`` at ``fd``'s offset, however many writes it takes."""
    n = os.write(fd, contents)
    if n < len(contents):  # rare: a short write (signal, huge buffer)
        _write_rest(fd, contents, n)


def _write_rest(fd: int, contents: bytes | bytearray | memoryview, n: int) -> None:
    """Write ``contents`` after its first ``n`` bytes (a short write wrote those). The
    entry files' writers make the first write themselves: a call fewer per file."""
    view = memoryview(contents)[n:]
    while view:
        view = view[os.write(fd, view) :]


def _write_held(
    path: str, contents: bytes, exclusive: bool, mode: int, holder: _FileHold, sync: bool, writeback: bool
) -> None:
    """``write_file`` with a ``holder``: on success the descriptor stays in it; on
    failure it is closed and the partly written file removed."""
    try:
        fd = _open_held(path, O_CREATE_EXCL, mode, holder)
    except FileExistsError as e:
        if exclusive:
            raise _renamed(e, path) from None
        fd = replace_stale(path, functools.partial(_open_held, path, O_CREATE_EXCL, mode, holder))
    try:
        n = os.write(fd, contents)  # all of it, but for a rare short write
        if n < len(contents):
            _write_rest(fd, contents, n)
        if sync:
            fsync_fd(fd)
        elif writeback:
            start_writeback(fd)
    except BaseException as e:
        try:
            if holder.fd is not None:
                _close_held(holder.fd, holder)
        finally:
            unlink_quiet(path)
        if isinstance(e, OSError):
            raise _name(e, path) from None
        raise


class BytesWriter:
    """A data writer (see ``Spoolable.data_writer``) that writes given bytes as a new
    file: library code that runs no user code, so any thread may run it for another
    (the leader of a group commit writes its followers' entries, ``_enqueue``)."""

    __slots__ = ("mode", "raw")

    def __init__(self, raw: bytes, mode: int) -> None:
        self.raw = raw
        self.mode = mode

    def __call__(self, path: str, hold: _FileHold | None, writeback: bool) -> None:
        write_file(path, self.raw, sync=False, mode=self.mode, owned=True, writeback=writeback, holder=hold)


class _FileHold:
    """A Holder for a descriptor that is not a lock (see _open_held)."""

    __slots__ = ("fd", "path")

    def __init__(self) -> None:
        self.fd: int | None = None
        self.path: str | None = None


def fsync_file(path: str, fd: int | None = None) -> None:
    """fsync the file at ``path`` (a regular file, not followed through a symlink),
    through ``fd`` if the caller has it open; errors name ``path``. Opened by path, the
    descriptor never outlives the call, also when a signal handler's exception
    interrupts it (a writeback error is reported to a descriptor opened after it all
    the same, as long as nobody else has seen it)."""
    if fd is not None:
        try:
            fsync_fd(fd)
        except OSError as e:
            raise _name(e, path) from None
        return
    hold = _FileHold()
    try:
        own = _open_held(path, O_READ, 0o777, hold)
        if not stat.S_ISREG(os.fstat(own).st_mode):
            raise not_regular(path)
        fsync_fd(own)
    except OSError as e:
        raise _name(e, path) from None
    finally:
        if hold.fd is not None:
            _close_held(hold.fd, hold)


def read_file(path: str) -> bytes:
    """Read a whole regular file without following a symlink at ``path`` and without ever
    blocking on a FIFO or device there (OSError ``not_regular`` instead)."""
    box: list[int] = []  # the descriptor box (above)
    close = functools.partial(_DISCARD.extend, map(os.close, box))
    try:
        rel, dfd = at(path)
        box.extend(map(functools.partial(os.open, dir_fd=dfd), (rel,), (O_READ,)))
        fd = box[0]
        # Metadata files are small: one read usually returns all of it, and a short read
        # of a regular file means end of file, so no fstat is needed to size the buffer.
        # Only an empty or a long read can come from something else (a FIFO reads empty
        # or EAGAIN, a device endlessly): those, rare for metadata, pay one fstat.
        try:
            chunk = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            raise not_regular(path) from None
        if 0 < len(chunk) < _READ_CHUNK:
            return chunk
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise not_regular(path)
        if not chunk:
            return chunk
        chunks = [chunk]
        while chunk:
            chunk = os.read(fd, _READ_CHUNK)
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise _name(e, path) from None
    finally:
        close()


_READ_CHUNK: Final = 1 << 16


# errnos that mean "that file is gone". ESTALE is what NFS, GlusterFS and other network
# filesystems return when a file removed or renamed through another client is reached
# through a name or handle this client still had cached; fstat then may say ENOENT too.
_GONE: Final = frozenset({errno.ENOENT, errno.ESTALE})


def reopen_for_writing(path: str, fd: int | None) -> int:
    """A descriptor open for writing of registry file ``path``: with ``fd`` (its owner
    lock, taken read-only), a second one of that very file. OSError naming ``path`` if
    ``path`` names another file now (replaced meanwhile, maybe by a hard link of a
    user's file: that file must not be written), one with other hard links (planted
    so), or no regular file."""
    try:
        rel, dfd = at(path)
        wfd = os.open(rel, O_WRITE_EXISTING, dir_fd=dfd)
    except OSError as e:
        raise _renamed(e, path) from None
    try:
        a = os.fstat(wfd)
        if not stat.S_ISREG(a.st_mode):
            raise not_regular(path)
        if a.st_nlink > 1:
            raise other_links(path)
        b = a if fd is None else os.fstat(fd)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            raise OSError(errno.EMLINK, "registry file was replaced while its owner lock was held", path)
    except BaseException:
        os.close(wfd)
        raise
    return wfd


def gone(e: OSError) -> bool:
    """True if ``e`` says the file it was about no longer exists (ENOENT, or ESTALE)."""
    return e.errno in _GONE


def lexists(path: str) -> bool:
    """True if ``path`` exists (not following a symlink); False if it is gone, ESTALE
    included. Other errors propagate."""
    try:
        rel, dfd = at(path)
        os.lstat(rel, dir_fd=dfd)
    except OSError as e:
        if gone(e):
            return False
        raise _renamed(e, path) from None
    return True


def unlink_quiet(path: str) -> bool:
    """Unlink ``path``; False if it was already gone. Other errors propagate."""
    try:
        rel, dfd = at(path)
        os.unlink(rel, dir_fd=dfd)
    except OSError as e:
        if gone(e):
            return False
        raise _renamed(e, path) from None
    return True


def rename_if_exists(src: str, dst: str) -> bool:
    """rename(2) ``src`` to ``dst``; False if ``src`` does not exist."""
    try:
        rename(src, dst)
    except OSError as e:
        if gone(e):
            return False
        raise
    return True


def rename(src: str, dst: str) -> None:
    """rename(2) ``src`` to ``dst``, each reached as ``at`` says (once more if a held
    directory was found deleted: ``follow_deleted``)."""
    try:
        s, sfd = at(src)
        d, dfd = at(dst)
        os.rename(s, d, src_dir_fd=sfd, dst_dir_fd=dfd)
    except OSError as e:
        if gone(e) and follow_deleted(src, dst):
            return rename(src, dst)
        raise _renamed(e, src, dst) from None


def listdir(path: str) -> list[str]:
    """``os.listdir`` of directory ``path``; a spool's own directory is listed through a
    new descriptor of the one it holds (the held one's offset is every thread's)."""
    if type(path) is not SpoolDir:
        return os.listdir(path)
    if _PROC_FDS:
        # The /proc link leads to the open directory itself, whatever its path names
        # now: the system calls of a listing by path (os.listdir of a descriptor dups it).
        try:
            return os.listdir(f"/proc/self/fd/{path.fd}")
        except OSError as e:
            e.filename = str(path)
            raise
    try:
        fd = os.open(".", _DIR_FLAGS, dir_fd=path.fd)
    except OSError as e:
        raise _renamed(e, path) from None
    try:
        return os.listdir(fd)
    except OSError as e:
        raise _renamed(e, path) from None
    finally:
        os.close(fd)


def unlink(path: str) -> None:
    """``os.unlink``, reaching ``path`` as ``at`` says."""
    try:
        rel, dfd = at(path)
        os.unlink(rel, dir_fd=dfd)
    except OSError as e:
        raise _renamed(e, path) from None


def lstat(path: str) -> os.stat_result:
    """``os.lstat``, reaching ``path`` as ``at`` says."""
    try:
        rel, dfd = at(path)
        return os.lstat(rel, dir_fd=dfd)
    except OSError as e:
        raise _renamed(e, path) from None


def parent(path: str) -> str:
    """The directory of ``path``, for the paths a spool's Layout builds (a directory, a
    separator, a name): ``os.path.dirname`` as one C call. Where a path has doubled
    separators before its name, the result keeps one ("a//b" -> "a/"): the same
    directory."""
    if type(path) is At:
        return path.home
    head = path.rpartition(os.sep)[0]
    return head if head else os.path.dirname(path)


MOVED: Final = 1
SRC_GONE: Final = 0
NOT_MOVED: Final = -1


def rename_verified(
    src: str, dst: str, *, verify: bool, dst_checked: bool = False, renamed: list[None] | None = None
) -> int:
    """rename(2) ``src`` to ``dst`` for a caller holding the entry's owner lock (so nobody
    else moves either name meanwhile). MOVED, SRC_GONE if ``src`` does not exist, or,
    when ``verify``, NOT_MOVED if ``dst`` already resolves (nothing is renamed over it) or
    if rename said yes but ``src`` is still there: a client with a stale name cache
    resolves a name another client just moved away to the file now at the other name,
    and the kernel's rename of a file onto itself succeeds without doing anything.
    ``renamed`` gets an item as rename(2) is tried, and a second once it succeeded, in
    the call that makes it: an exception raised as it returns (a signal handler's)
    still finds it recorded."""
    if verify and not dst_checked and lexists(dst):
        return _stale_or_gone(src)
    n = 0 if renamed is None else len(renamed)
    try:
        s, sfd = at(src)
        d, dfd = at(dst)
        if renamed is None:
            os.rename(s, d, src_dir_fd=sfd, dst_dir_fd=dfd)
        else:
            renamed.append(None)
            # As the descriptor box.
            renamed.extend(map(functools.partial(os.rename, src_dir_fd=sfd, dst_dir_fd=dfd), (s,), (d,)))
    except OSError as e:
        if gone(e):
            if follow_deleted(src, dst):
                if renamed is not None:
                    del renamed[n:]  # not tried: the retry records its own
                return rename_verified(src, dst, verify=verify, dst_checked=dst_checked, renamed=renamed)
            return SRC_GONE
        raise _renamed(e, src, dst) from None
    if verify and lexists(src):
        return NOT_MOVED
    return MOVED


def follow_deleted(*paths: str) -> bool:
    """After ENOENT (or ESTALE) through a held directory of the spool: if one of the
    directories of ``paths`` was deleted since it was opened (no link left, as a
    directory removed, or renamed over by another), the spool's directories are opened
    again from their paths (``Dirs.refresh``: a directory renamed there is followed, a
    symlink refused) and True returned: the caller tries once more. A directory merely
    moved away keeps a link: the spool stays in it (a symlink put at its path is no
    spool directory)."""
    for p in paths:
        if isinstance(p, At):
            d = p.home
        elif isinstance(p, SpoolDir):
            d = p
        else:
            continue
        try:
            if os.fstat(d.fd).st_nlink != 0:
                continue
        except OSError:
            continue
        before = os.fstat(d.fd)
        d._dirs.refresh()
        after = os.fstat(d.fd)
        return (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino)
    return False


def _stale_or_gone(src: str) -> int:
    """The destination resolves before the move: NOT_MOVED (a stale name, or a file that
    must not be renamed over), or SRC_GONE if the source is not there either (an earlier
    move of ours went through after all: the caller decides)."""
    return NOT_MOVED if lexists(src) else SRC_GONE


# errnos of link(2) on file systems without hard links (some FUSE, CIFS, AFS mounts).
_NO_LINKS: Final = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


def move(
    src: str,
    dst: str,
    keep: str | None,
    *,
    verify: bool = False,
    sync_src: bool = True,
    renamed: list[None] | None = None,
) -> int:
    """rename(2) ``src`` to ``dst`` (as ``rename_verified``: MOVED, SRC_GONE or NOT_MOVED)
    for a caller holding the entry's owner lock.

    With ``keep`` (durability "full": a dot-name path in ``src``'s directory), the move is
    durable and never leaves the file in no durable place (the protocol in ``_layout``):
    link ``src`` to ``keep``, rename, fsync ``dst``'s directory, unlink ``keep``, then
    fsync ``src``'s directory when ``sync_src`` (a checkout defers that step). Where the
    file system has no hard links, the keep link is skipped (a plain rename and fsyncs).
    ``renamed``: as for ``rename_verified``."""
    if keep is None:
        return rename_verified(src, dst, verify=verify, renamed=renamed)
    if verify and lexists(dst):
        # Before the keep link: linking touches the file, and a stale client then keeps
        # resolving the moved-away name to it for as long as we retry.
        return _stale_or_gone(src)
    linked = True
    for _ in range(_REPLACE_TRIES):
        try:
            s, sfd = at(src)
            k, kfd = at(keep)
            os.link(s, k, src_dir_fd=sfd, dst_dir_fd=kfd, follow_symlinks=False)
        except FileExistsError:
            # A keep link left by a crash (recovery removes them; we hold the owner
            # lock): ours replaces it. One back at once, time after time, is planted.
            unlink_quiet(keep)
            continue
        except OSError as e:
            if gone(e):
                if follow_deleted(src, keep):
                    return move(src, dst, keep, verify=verify, sync_src=sync_src, renamed=renamed)
                return SRC_GONE
            if e.errno not in _NO_LINKS:
                raise _renamed(e, src, keep) from None
            linked = False
        break
    else:
        raise FileExistsError(
            errno.EEXIST, f"a file keeps reappearing at the keep link name; {src} not moved", keep
        )
    try:
        r = rename_verified(src, dst, verify=verify, dst_checked=True, renamed=renamed)
    except BaseException:
        if linked:
            unlink_quiet(keep)
        raise
    if r != MOVED:
        if linked:
            unlink_quiet(keep)
        return r
    fsync_dir(parent(dst))
    if linked:
        # Quiet: recovery drops a keep link whose name has no entry; one of a brand-new
        # entry of a reused name, made an instant after recovery looked, may go with it.
        unlink_quiet(keep)
    if sync_src:
        fsync_dir(parent(src))
    return MOVED


def is_real_dir(path: str) -> bool:
    """True if ``path`` is a directory and not a symlink to one (a spool's own directory,
    held open: one not deleted since)."""
    try:
        st = lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and not (type(path) is SpoolDir and st.st_nlink == 0)


def mkdir_durable(path: str, mode: int, *, sync: bool) -> bool:
    """Create directory ``path``; True if created, False if it already was a directory."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not is_real_dir(path):
            raise
        return False
    if sync:
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    return True


# -- owner locks ------------------------------------------------------------------------
# A checkout (or an enqueue in progress) is owned by whoever holds an exclusive flock on
# the entry's registry file. flock locks belong to the open file description, so two
# descriptors in one process exclude each other too, and the kernel drops the lock when
# the owning process dies: that is what recover_checkouts and clean_abandoned rely on.

try:
    import fcntl as _fcntl

    HAVE_LOCKS: Final = True

    def try_lock(fd: int) -> bool:
        """Take an exclusive lock on ``fd`` without waiting; False if another holds it."""
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

except ImportError:  # pragma: no cover - Windows: no owner locks, recovery is disabled
    HAVE_LOCKS = False  # type: ignore[misc]

    def try_lock(fd: int) -> bool:
        return True


# Every lock descriptor this process holds. A forked child inherits them, and flock locks
# live as long as any descriptor of the open file: the child closes its copies at once,
# so that an owner's death still frees its entries while the child lives on.
#
# A descriptor is recorded in _held in the same guarded step that opens it, before it is
# locked, and leaves _held in the same guarded step that closes it; fork() waits until no
# thread is inside such a step (register_at_fork), so a child never inherits a lock
# descriptor that is not in _held, nor closes a number that its parent had already
# closed and reused.
#
# Each thread guards its steps with a lock of its own, and fork() takes every thread's
# (_acquire_all): a reader-writer lock whose readers never meet. One lock for the whole
# process held each open and close for the length of its system call, so threads
# opening files waited for each other's system calls (8 threads enqueueing on tmpfs:
# +22 % entries/s once each had its own; more where a create is slow). A thread's guard
# is reentrant: a _Claim's __del__ may run (garbage collection) inside a guarded step.
# _held itself is a set changed only by single operations (add, discard), which the
# GIL makes atomic.
_held: set[int] = set()
_generation = 0
# The descriptors spools hold for their directories (Dirs): never a lost descriptor
# that _close_unheld may close (an interrupted open of a spool directory, to fsync it,
# names the same directory).
_dir_fds: set[int] = set()


class _Guard:
    """One thread's guard (see above); dropped from ``_guards`` when its thread ends."""

    __slots__ = ("__weakref__", "lock")

    def __init__(self) -> None:
        self.lock = threading.RLock()


_guards: weakref.WeakSet[_Guard] = weakref.WeakSet()
_guards_lock = threading.Lock()  # held while a guard joins _guards, and by _acquire_all
_local = threading.local()


def _thread_guard() -> threading.RLock:
    """This thread's guard, made on first use."""
    try:
        return _local.guard.lock  # type: ignore[no-any-return]
    except AttributeError:
        pass
    g = _Guard()
    # This thread's before it is registered: a _Claim's __del__ that garbage collection
    # runs inside the registration below finds it, instead of registering another and
    # waiting for the _guards_lock this thread holds.
    _local.guard = g
    with _guards_lock:  # not while _acquire_all holds it: fork must see every guard in use
        _guards.add(g)
    return g.lock


def _acquire_all() -> list[_Guard]:
    """Wait until no thread is inside a guarded step, and keep every thread out of one
    (a thread may re-enter its own) until ``_release_all``. The caller must not hold
    its own guard: another thread's wait for ``_guards_lock`` would then deadlock."""
    _guards_lock.acquire()
    taken: list[_Guard] = []
    try:
        for g in list(_guards):
            g.lock.acquire()
            taken.append(g)
    except BaseException:
        _release_all(taken)
        raise
    return taken


def _release_all(taken: list[_Guard]) -> None:
    for g in reversed(taken):
        g.lock.release()
    _guards_lock.release()


_forking: list[_Guard] = []


def _before_fork() -> None:
    _forking[:] = _acquire_all()


def _after_fork_in_parent() -> None:
    taken = _forking[:]
    _forking.clear()
    _release_all(taken)


def _close_inherited_locks() -> None:
    global _generation, _guards, _guards_lock, _local, _root_lock
    # The parent's guards and their holds mean nothing in the child: start afresh.
    _forking.clear()
    _root_lock = threading.Lock()  # maybe held by another thread of the parent at fork
    _guards = weakref.WeakSet()
    _guards_lock = threading.Lock()
    _local = threading.local()
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()
    _generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_close_inherited_locks
    )


def lock_generation() -> int:
    """Changes in a forked child: locks taken before it are no longer this process's."""
    return _generation


class Holder(Protocol):
    """Receives a lock descriptor in the step that opens it (``fd``), and loses it in the
    step that closes it: the owner of a lock, such as a checkout. ``create_locked`` also
    sets ``path`` once the file it created has its name, so an interrupted caller knows
    which file is its own to remove."""

    fd: int | None
    path: str | None


def _open_held(path: str, flags: int, mode: int = 0o777, holder: Holder | None = None) -> int:
    """os.open, with the descriptor recorded in _held (and handed to ``holder``) in the
    same guarded step. An exception that interrupts a caller (KeyboardInterrupt, one
    raised by a signal handler) after this step leaves the descriptor with ``holder``,
    whose owner releases it, rather than lost; one that interrupts this call closes
    what it opened."""
    box: list[int] = []
    try:
        guard = _local.guard.lock
    except AttributeError:
        guard = _thread_guard()
    try:
        with guard:
            # Opened and stored from C (as in the descriptor box): no handler runs between the two.
            if type(path) is str:
                box.extend(map(os.open, (path,), (flags,), (mode,)))
            elif type(path) is SpoolDir:  # O_TMPFILE in it; inline (no call), as below
                opener = functools.partial(os.open, dir_fd=path.fd)
                box.extend(map(opener, (".",), (flags,), (mode,)))
            elif type(path) is At:  # inline (no call): every entry's registry file comes here
                opener = functools.partial(os.open, dir_fd=path.home.fd)
                box.extend(map(opener, (path.rel,), (flags,), (mode,)))
            else:
                rel, dfd = at(path)
                box.extend(map(functools.partial(os.open, dir_fd=dfd), (rel,), (flags,), (mode,)))
            fd = box[0]
            _held.add(fd)
            # The holder last: storing an attribute calls nothing, so no signal handler
            # runs between the store and the end of the step; from then on it owns fd.
            if holder is not None:
                holder.fd = fd
        return fd
    except BaseException as e:
        if box:
            if holder is None or holder.fd != box[0]:
                _close_held(box[0])  # not handed over: ours to close
        elif isinstance(e, OSError):
            _renamed(e, path)
        elif not isinstance(e, OSError):
            # An exception from inside the open (a handler run while it retried after
            # EINTR opened nothing); should one come once it opened, the number is lost:
            # look for it by its path.
            _close_lost(path, flags)
        raise


def _close_lost(path: str, flags: int) -> None:
    """Close the descriptor an interrupted ``_open_held(path, flags)`` opened and lost:
    one of ``path`` (an unnamed file in it, with O_TMPFILE) that is not a held lock.
    Registry files are opened only by _open_held, and this runs while no thread is
    inside a guarded step (``_acquire_all``), so such a descriptor is nobody else's.
    Where /proc/self/fd is missing, it stays open until the process exits (it holds no
    lock: flock comes after the open). The caller must not hold its own guard."""
    if not _PROC_FDS:
        return
    taken = _acquire_all()
    try:
        _close_unheld(path, flags)
    finally:
        _release_all(taken)


def _close_unheld(path: str, flags: int) -> None:
    # As the kernel names it: absolute, with the directory's symlinks resolved.
    want = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
    tmpfile = bool(_O_TMPFILE) and flags & _O_TMPFILE == _O_TMPFILE
    with contextlib.suppress(OSError):
        for n in os.listdir("/proc/self/fd"):
            fd = int(n)
            if fd in _held or fd in _dir_fds:
                continue
            try:
                target = os.readlink(f"/proc/self/fd/{n}")
            except OSError:
                continue
            # An O_TMPFILE open gives an unnamed file in the directory, never the directory
            # itself: another thread's descriptor of the directory (a directory fsync in
            # flight) is not ours to close.
            unnamed = tmpfile and target.startswith(want + "/#") and target.endswith(" (deleted)")
            if unnamed or (not tmpfile and target == want):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _close_held(fd: int, holder: Holder | None = None) -> None:
    """Close a descriptor from _open_held and forget it (also in ``holder``), in one
    guarded step."""
    try:
        guard = _local.guard.lock
    except AttributeError:
        guard = _thread_guard()
    with guard:
        # Forgotten before the close: once closed, the number is free, and another thread's
        # open (under its own guard) may take it and record it at once; a discard after
        # the close would then forget that thread's live descriptor, which the search for
        # a lost one (_close_lost) may close. An exception between the two leaves the
        # descriptor open with its holder, which closes it (only _open_held's own error
        # path passes none: that takes a second exception, and leaks, never closes twice).
        _held.discard(fd)
        # os.close is called directly: an interrupting exception (signal handler) can only
        # come after it returned, and the holder forgets the number all the same, first
        # thing in the finally (no call in between), so it never closes it twice.
        try:
            os.close(fd)
        except OSError as e:
            if not gone(e):  # GlusterFS: ENOENT/ESTALE for a file unlinked meanwhile
                raise
        finally:
            if holder is not None and holder.fd == fd:
                holder.fd = None


def unlock(fd: int, generation: int, holder: Holder | None = None) -> None:
    """Release a lock from create_locked/open_locked taken in ``generation``."""
    if generation == _generation:
        _close_held(fd, holder)
    elif holder is not None and holder.fd == fd:
        holder.fd = None


_PROC_FDS: Final = os.path.isdir("/proc/self/fd")
_O_TMPFILE: Final = getattr(os, "O_TMPFILE", 0)
_TMPFILE_OK: Final = bool(_O_TMPFILE) and _PROC_FDS
# Directories whose filesystem refused O_TMPFILE (FUSE, NFS...): use the portable path.
_no_tmpfile: set[str] = set()


# A descriptor of "/", opened on first use and kept for the life of the process: given as
# a directory descriptor, it makes os.link call linkat(AT_SYMLINK_FOLLOW); with absolute
# paths the kernel uses it for nothing else, so a spool replaced or moved changes nothing.
# Held in a list, stored by the call that opens it (the descriptor box, above): a signal
# handler's exception cannot lose it between the two.
_root_box: list[int] = []
# Threads making their first reservation at once: one opens, the others wait for it (each
# opened its own, and all but one were lost).
_root_lock = threading.Lock()


def _root_fd() -> int:
    """The descriptor of "/" (see ``_root_box``), opened once per process."""
    if not _root_box:
        with _root_lock:
            if not _root_box:
                _root_box.extend(map(os.open, ("/",), (_DIR_FLAGS,)))
    return _root_box[0]


def create_locked(parent: str, path: str, mode: int, holder: Holder | None = None) -> int | None:
    """Create ``path`` (in directory ``parent``, and which must not exist) and return a
    descriptor holding its lock;
    None if the name is taken. Where the OS allows (Linux O_TMPFILE), the file is created
    unnamed, locked, then linked in, so nobody ever sees it unlocked; elsewhere it is
    created with O_EXCL and locked at once, and a lock lost in between counts as taken.
    On any failure no descriptor is left open. ``holder`` gets the descriptor as soon as
    it exists (see _open_held)."""
    if _TMPFILE_OK and parent not in _no_tmpfile:
        try:
            fd = _open_held(parent, _O_TMPFILE | os.O_RDWR | _CLOEXEC, mode, holder)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            _no_tmpfile.add(str(parent))
        else:
            try:
                try_lock(fd)
                # os.link calls linkat(AT_SYMLINK_FOLLOW), which resolves the /proc magic
                # link to the unnamed file, only when given a dir fd (ignored: both paths
                # are absolute or relative to the cwd either way).
                root = _root_box[0] if _root_box else _root_fd()
                if type(path) is At:
                    os.link(
                        f"/proc/self/fd/{fd}", path.rel, src_dir_fd=root,
                        dst_dir_fd=path.home.fd, follow_symlinks=True,
                    )
                else:
                    os.link(
                        f"/proc/self/fd/{fd}", path, src_dir_fd=root, dst_dir_fd=root, follow_symlinks=True
                    )
                if holder is not None:
                    holder.path = path
            except FileExistsError:
                _close_held(fd, holder)
                return None
            except BaseException as e:
                # Interrupted (a signal handler's exception) maybe after the link: a name
                # that is our file goes with the descriptor.
                try:
                    if _is_file(path, fd):
                        unlink_quiet(path)
                finally:
                    _close_held(fd, holder)
                if isinstance(e, OSError):
                    if e.filename2 is not None and e.filename2 == getattr(path, "rel", None):
                        e.filename2 = str(path)  # linkat's, named relative to the dir
                    raise _name(e, path) from None  # flock gives no path
                raise
            return fd
    try:
        fd = _open_held(path, O_CREATE_EXCL, mode, holder)
    except FileExistsError:
        return None
    try:
        # A prober (fsck telling an enqueue in progress from an abandoned one) may hold the
        # new file's lock for an instant: wait that out, rather than give up a name we
        # created and leave its registry file behind as an orphan.
        _await_lock(fd)
        # Someone may have locked (and even unlinked) it before us: then it is not ours.
        return _keep_if_locked(fd, path, holder)
    except BaseException as e:
        unlink_quiet(path)
        if isinstance(e, OSError):
            raise _name(e, path) from None  # flock gives no path
        raise


def same_inode(a: str, b: str) -> bool:
    """True if ``a`` and ``b`` are links of one file (not following symlinks); False if
    either is absent."""
    try:
        sa, sb = lstat(a), lstat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _is_file(path: str, fd: int) -> bool:
    """True if ``path`` names the file open as ``fd``."""
    try:
        a, b = lstat(path), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# How long a creator waits for a lock that a prober holds (probers hold it for microseconds).
_PROBE_WAIT: Final = 0.05


def _await_lock(fd: int) -> None:
    """Try to lock ``fd`` until it succeeds or ``_PROBE_WAIT`` has passed."""
    deadline = time.monotonic() + _PROBE_WAIT
    delay = 0.00005
    while not try_lock(fd) and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.005)


def open_locked(path: str, holder: Holder | None = None) -> int | None:
    """Open an existing registry file and lock it. None if it does not exist, another
    process holds it, or it was unlinked while we took the lock (a stale inode). Never
    blocks and never follows a symlink: OSError naming ``path`` if it is a symlink
    (ELOOP), a directory (EISDIR), otherwise not a regular file (``not_regular``), or a
    file with other hard links (``other_links``): never locked for, nor written as, an entry.
    ``holder`` gets the descriptor as soon as it exists (see _open_held)."""
    r = open_locked_sized(path, holder)
    return None if r is None else r[0]


def open_locked_sized(path: str, holder: Holder | None = None) -> tuple[int, int] | None:
    """As ``open_locked``, also giving the file's size from the fstat that checks the
    inode is still linked (the size says whether a schedule record is there)."""
    try:
        try:
            fd = _open_held(path, O_LOCK, holder=holder)
        except OSError as e:
            # No write access (a read-only mount, a file we may not write): flock works on
            # a read-only descriptor too, except where it is emulated with fcntl locks.
            if e.errno not in (errno.EACCES, errno.EROFS):
                raise
            fd = _open_held(path, O_LOCK_RO, holder=holder)
    except OSError as e:
        if gone(e):
            return None
        raise _name(e, path) from None
    size = _keep_if_locked_sized(fd, path, holder)
    return None if size is None else (fd, size)


def _keep_if_locked(fd: int, path: str, holder: Holder | None = None) -> int | None:
    """Lock ``fd`` (recorded in _held) without waiting and keep it; None (and ``fd``
    closed) if another process holds the lock or the file was unlinked meanwhile (a stale
    inode); OSError ``not_regular`` if it is not a regular file, ``other_links`` if it
    has other hard links."""
    return None if _keep_if_locked_sized(fd, path, holder) is None else fd


def _keep_if_locked_sized(fd: int, path: str, holder: Holder | None = None) -> int | None:
    """As ``_keep_if_locked``, returning the file's size (from the same fstat) instead of
    ``fd`` when it keeps it."""
    keep = False
    size = 0
    try:
        if try_lock(fd):
            # One fstat serves both checks: a FIFO or device is not a registry file, and a
            # file unlinked while we locked it is not the name's reservation any more.
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise not_regular(path)
            if st.st_nlink > 1:
                raise other_links(path)
            keep = not (HAVE_LOCKS and st.st_nlink == 0)
            size = st.st_size
    except OSError as e:
        if not gone(e):  # unlinked through another client: ESTALE, or ENOENT from fstat
            raise _name(e, path) from None  # flock and fstat give no path
    finally:
        if not keep:
            _close_held(fd, holder)
    return size if keep else None
