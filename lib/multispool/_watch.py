# Requires watchdog>=4.0 (the project pin). The Linux native backend reads every watched
# directory through one inotify instance and one thread, whatever the watchdog version:
#   * watchdog>=7.0 (Python>=3.11): it registers callbacks on
#     watchdog.observers.inotify_c.InotifyFD, and every event -- departures included --
#     is delivered without delay. 7.1 adds the on_queue_overflow hook (7.0 drops
#     IN_Q_OVERFLOW, so lost events wake nobody and the reader's periodic re-listing has
#     to find them).
#   * watchdog 4.0 - 6.x (the only choice on Python 3.10), which has no InotifyFD: the
#     same backend on multispool._inotify.InotifyReader, a small ctypes inotify reader
#     with InotifyFD's interface and the behaviour of 7.1's that the backend relies on
#     (overflow reported). watchdog's emitters, used here before, cost two threads and an
#     inotify instance per directory, and the per-user instance limit (128 by default)
#     ran out at about 128 queues.
#   inotify_c is a public module but not a documented API: watchdog's InotifyFD is found
#   by feature detection, and an incompatible future watchdog gets ours. watchdog's
#   emitter (_WatchdogBackend) is the native backend outside Linux, and on Linux only
#   where the C library has no inotify calls.
"""Filesystem events on queue directories, turned into wake-up calls.

Events are hints only: a reader tries the names they carry, lists its directory when an
event names nothing, and checks it on a slow timer, so this module promises "a callback
soon after something may have changed" (with ``names=True``, saying which name, or None
when it cannot), never an exact account of what changed.

Why the Linux native backend does not use watchdog's ``InotifyObserver``: its
``InotifyEmitter`` passes every event through ``InotifyMoveEventGrouper``, which
holds an unmatched ``IN_MOVED_FROM`` for 0.5 s hoping to pair it with an
``IN_MOVED_TO``, and every event queued behind it waits too. A consumer's claim is
the rename ``QUEUE/NAME -> QUEUE/.checkout/NAME``; with a non-recursive watch on
``QUEUE`` that is always an unmatched moved-from, so under a steady stream every
arrival was reported ~0.25 s late on average. We register our own callbacks on
watchdog's ``InotifyFD`` instead: events reach us as the kernel delivers them, with
no grouping, no delay, and one thread per process however many directories are
watched. watchdog older than 7.0 has no ``InotifyFD``; there the same callbacks are
registered on :class:`multispool._inotify.InotifyReader`, which has its interface.
(watchdog's emitter API costs an emitter thread per watched directory plus the observer
thread, and up to watchdog 6 also an inotify instance and a reading thread per
directory; where we still use it, IN_MOVED_FROM is left out of the kernel mask so that
nothing waits in the grouper.)
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import itertools
import logging
import os
import re
import stat
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from watchdog.events import FileSystemEvent, FileSystemEventHandler, FileSystemMovedEvent

from multispool import _inotify

if TYPE_CHECKING:
    from collections.abc import Callable

    from watchdog.observers.api import BaseObserver, EventEmitter, ObservedWatch

__all__ = ["ENV_VAR", "ObserverMode", "Subscription", "choose_observer", "subscribe"]

logger = logging.getLogger(__name__)

ObserverMode = Literal["native", "polling"]

ENV_VAR: Final = "MULTISPOOL_OBSERVER"
_REQUESTS: Final = ("auto", "native", "polling")

_IS_LINUX: Final = sys.platform.startswith("linux")


# --------------------------------------------------------------------------------------
# Choosing the observer
# --------------------------------------------------------------------------------------

# Filesystems where a change made by another host, another mount of the same files, or
# a FUSE daemon raises no native event here. Names as Linux (/proc/self/mountinfo) and
# macOS (statfs f_fstypename) report them; any name containing "fuse" also counts
# (fuse, fuseblk, fuse.sshfs, fuse.bindfs, fuse.glusterfs, macfuse, osxfuse...).
_REMOTE_FS_TYPES: Final = frozenset(
    {
        "9p", "acfs", "afpfs", "afs", "beegfs", "ceph", "cifs", "coda", "cvfs", "davfs",
        "gfs", "gfs2", "glusterfs", "gpfs", "kafs", "lustre", "ncp", "ncpfs", "nfs",
        "nfs4", "ocfs2", "orangefs", "panfs", "prl_fs", "pvfs2", "smb", "smb2", "smb3",
        "smbfs", "sshfs", "vboxsf", "virtiofs", "vmhgfs", "webdav",
    }
)  # fmt: skip

# Linux statfs f_type magic numbers (linux/magic.h and the filesystems' own headers),
# used only when /proc/self/mountinfo cannot be read.
_LINUX_REMOTE_MAGIC: Final = {
    0x6969: "nfs",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
    0x01021997: "9p",
    0x00C36400: "ceph",
    0x5346414F: "afs",
    0x6B414653: "afs",
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x73757245: "coda",
    0x564C: "ncp",
    0x7461636F: "ocfs2",
    0x01161970: "gfs2",
    0xAAD7AAEA: "panfs",
    0x20030528: "orangefs",
    0x786F4256: "vboxsf",
}


def _is_remote(fstype: str) -> bool:
    name = fstype.lower()
    return name in _REMOTE_FS_TYPES or "fuse" in name or name.split(".", 1)[0] in _REMOTE_FS_TYPES


def choose_observer(path: str | os.PathLike[str], requested: str = "auto") -> tuple[ObserverMode, str]:
    """Pick the observer for watching `path`; the only place in multispool that does so.

    `requested` is ``"auto"``, ``"native"`` or ``"polling"``. An explicit ``"native"`` or
    ``"polling"`` wins. With ``"auto"``, the environment variable ``MULTISPOOL_OBSERVER``
    (``native``, ``polling`` or ``auto``; unset or empty means ``auto``) decides; if it
    too says ``auto``, the filesystem holding `path` decides: polling on network and FUSE
    filesystems (NFS, CIFS/SMB, FUSE, 9p, Ceph, Lustre...), where changes made through
    other hosts or mounts raise no native event, native otherwise. When the filesystem
    cannot be identified the answer is native, and the reason says why.

    Returns ``(mode, reason)``, the reason being a sentence for logs and error messages.
    Raises ValueError naming the allowed values for a bad `requested` or environment value.
    """
    if requested not in _REQUESTS:
        msg = f"observer must be one of {', '.join(map(repr, _REQUESTS))}, got {requested!r}"
        raise ValueError(msg)
    if requested == "native":
        return "native", "native observer requested explicitly"
    if requested == "polling":
        return "polling", "polling observer requested explicitly"

    env = os.environ.get(ENV_VAR, "").strip()
    if env and env not in _REQUESTS:
        msg = f"environment variable {ENV_VAR} must be one of {', '.join(_REQUESTS)}, got {env!r}"
        raise ValueError(msg)
    if env == "native":
        return "native", f"{ENV_VAR}=native"
    if env == "polling":
        return "polling", f"{ENV_VAR}=polling"

    where = os.fspath(path)
    try:
        found = _filesystem_type(where)
    except OSError as exc:
        reason = f"could not identify the filesystem of {where!r} ({exc}); assuming it is local"
        return "native", reason
    if found is None:
        reason = f"cannot identify filesystems on {sys.platform}; assuming {where!r} is local"
        return "native", reason
    fstype, mount_point = found
    if _is_remote(fstype):
        return "polling", (
            f"{where!r} is on a {fstype} filesystem (mounted at {mount_point!r}), where changes "
            "made through other hosts or mounts raise no native events"
        )
    return "native", f"{where!r} is on a local {fstype} filesystem (mounted at {mount_point!r})"


def _existing_ancestor(path: str) -> str:
    """The realpath of `path`, or of its nearest existing ancestor (a queue directory
    may be asked about before it is created)."""
    current = os.path.realpath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _filesystem_type(path: str) -> tuple[str, str] | None:
    """``(fstype, mount point)`` of the filesystem holding `path`; None where this
    platform offers no way to ask. Raises OSError when asking fails."""
    real = _existing_ancestor(path)
    if _IS_LINUX:
        try:
            return _linux_mountinfo_type(real)
        except OSError:
            # No /proc (some sandboxes, early boot): statfs still gives the magic number.
            return _linux_statfs_type(real)
    if sys.platform == "darwin":
        return _darwin_statfs_type(real)
    if sys.platform == "win32":
        return _windows_drive_type(real)
    return None


_OCTAL_ESCAPE: Final = re.compile(rb"\\([0-7]{3})")


def _unescape_mountinfo(field_: bytes) -> str:
    # The kernel escapes space, tab, newline and backslash in mount points as \ooo.
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field_))


def _linux_mountinfo_type(real: str) -> tuple[str, str]:
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    best: tuple[str, str] | None = None
    best_len = -1
    for line in lines:
        # "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
        before, sep, after = line.partition(b" - ")
        fields = before.split()
        if not sep or len(fields) < 5 or not after:
            continue
        mount_point = _unescape_mountinfo(fields[4])
        matches = mount_point == "/" or real == mount_point or real.startswith(mount_point + "/")
        # ">=": a later line with the same mount point is mounted on top of the earlier.
        if matches and len(mount_point) >= best_len:
            best = (os.fsdecode(after.split()[0]), mount_point)
            best_len = len(mount_point)
    if best is None:
        raise OSError(errno.ENOENT, f"no mount point in /proc/self/mountinfo contains {real!r}")
    return best


def _linux_statfs_type(real: str) -> tuple[str, str]:
    libc = ctypes.CDLL(None, use_errno=True)
    # struct statfs begins with f_type, a machine word; 512 bytes covers the whole struct.
    buf = ctypes.create_string_buffer(512)
    if libc.statfs(os.fsencode(real), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), real)
    magic = ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF
    return _LINUX_REMOTE_MAGIC.get(magic, f"0x{magic:x}"), "?"


class _DarwinStatfs(ctypes.Structure):
    # struct statfs with 64-bit inodes (<sys/mount.h>): the only layout on arm64, and
    # the one behind the statfs$INODE64 symbol on x86_64.
    _fields_ = (
        ("f_bsize", ctypes.c_uint32),
        ("f_iosize", ctypes.c_int32),
        ("f_blocks", ctypes.c_uint64),
        ("f_bfree", ctypes.c_uint64),
        ("f_bavail", ctypes.c_uint64),
        ("f_files", ctypes.c_uint64),
        ("f_ffree", ctypes.c_uint64),
        ("f_fsid", ctypes.c_int32 * 2),
        ("f_owner", ctypes.c_uint32),
        ("f_type", ctypes.c_uint32),
        ("f_flags", ctypes.c_uint32),
        ("f_fssubtype", ctypes.c_uint32),
        ("f_fstypename", ctypes.c_char * 16),
        ("f_mntonname", ctypes.c_char * 1024),
        ("f_mntfromname", ctypes.c_char * 1024),
        ("f_flags_ext", ctypes.c_uint32),
        ("f_reserved", ctypes.c_uint32 * 7),
    )


def _darwin_statfs_type(real: str) -> tuple[str, str]:
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        statfs = libc["statfs$INODE64"]
    except AttributeError:
        statfs = libc["statfs"]
    result = _DarwinStatfs()
    if statfs(os.fsencode(real), ctypes.byref(result)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), real)
    return os.fsdecode(result.f_fstypename), os.fsdecode(result.f_mntonname)


def _windows_drive_type(real: str) -> tuple[str, str]:
    # GetDriveTypeW wants the root ("C:\\", "\\\\server\\share\\"); 4 is DRIVE_REMOTE.
    root = os.path.splitdrive(real)[0] + "\\"
    kind = int(ctypes.windll.kernel32.GetDriveTypeW(root))  # type: ignore[attr-defined,unused-ignore]
    return ("smb" if kind == 4 else "local"), root


# --------------------------------------------------------------------------------------
# Subscriptions
# --------------------------------------------------------------------------------------


class Subscription:
    """A callback registered on one directory; see :func:`subscribe`."""

    __slots__ = ("_callback", "_closed", "_entry", "departures", "directory", "mode", "names")

    def __init__(
        self,
        directory: str,
        callback: Callable[..., None],
        mode: ObserverMode,
        *,
        departures: bool,
        names: bool = False,
    ) -> None:
        self.directory: Final = directory
        self.mode: Final[ObserverMode] = mode
        self.departures: Final = departures
        self.names: Final = names
        self._callback = callback
        self._closed = False
        self._entry: _Entry | None = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    @property
    def stale(self) -> bool:
        """True once this subscription can no longer report anything: closed, its
        directory deleted, moved away or unmounted, or inherited across ``fork()`` (the
        watch belongs to the parent's threads). Subscribe again to watch the path anew."""
        entry = self._entry
        return self._closed or entry is None or entry.stale or entry.backend.pid != os.getpid()

    def took(self, name: str) -> None:
        """Say that the subscriber itself moved `name` out of the directory (a consumer's
        claim). A polling watch compares the names of two listings: an entry claimed
        after one poll and back under the same name by the next (released, or a new entry
        given the freed name) leaves them alike. So a name said taken here is reported as
        an arrival if the next poll finds it there. No system call; nothing to do for a
        native watch, whose kernel reports every arrival."""
        entry = self._entry
        if entry is not None and self.mode == "polling" and not entry.stale:
            entry.taken.append(name)

    def _fire(self, name: str | None) -> None:
        if self._closed:
            return
        try:
            if self.names:
                self._callback(name)
            else:
                self._callback()
        except Exception:
            # The callback runs on the shared observer thread: letting it raise would
            # stop every subscription in the process.
            logger.exception("multispool watch callback for %r raised", self.directory)

    def close(self) -> None:
        """Stop calling the callback. Idempotent.

        The last subscription of a directory removes its watch; the last subscription
        of an observer stops and joins the observer's threads (unless called from that
        thread, which then ends on its own). The callback may still run once if an event
        was being dispatched while close() ran: wakes are hints.
        """
        try:
            self._close()
        finally:
            if _closing:
                _close_pending()

    def close_soon(self) -> None:
        """:meth:`close`, from where this thread may be holding the lock that close()
        takes: a garbage-collection callback (the subscriber was collected without
        closing this), which runs wherever the collection happens, subscribe() and
        close() included. Closes now if the lock is free, else the thread holding it
        does once it lets go."""
        _closing.append(self)
        if _state.lock.acquire(blocking=False):
            _state.lock.release()
            _close_pending()

    def _close(self) -> None:
        stop: _Backend | None = None
        with _state.lock:
            if self._closed:
                return
            self._closed = True
            entry = self._entry
            self._entry = None
            if entry is None or entry.backend.pid != os.getpid():
                # Inherited across fork(): the watch belongs to the parent's threads.
                return
            entry.subs = tuple(s for s in entry.subs if s is not self)
            backend = entry.backend
            backend.n_subs -= 1
            if not entry.subs:
                backend.drop(entry)
            if backend.n_subs == 0:
                if _state.backends.get(backend.key) is backend:
                    del _state.backends[backend.key]
                stop = backend
        if stop is not None:
            # Outside the lock: joining waits for the observer thread, which may be
            # running a callback that itself calls subscribe() or close().
            stop.shutdown()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Subscription {self.mode} {self.directory!r} {state}>"


def subscribe(
    directory: str | os.PathLike[str],
    callback: Callable[[], None] | Callable[[str | None], None],
    mode: ObserverMode,
    *,
    polling_interval: float = 0.1,
    departures: bool = True,
    names: bool = False,
) -> Subscription:
    """Call ``callback()`` whenever something may have changed in `directory`.

    With ``names=True`` the callback is called as ``callback(name)`` instead: ``name`` is
    the base name the event is about (an entry that arrived, or left if departures are
    wanted), or None when no single name describes the change (events lost by the
    kernel, the directory itself deleted, moved or unmounted): only a listing can tell
    then. A name is a hint like any wake: the entry may be gone again already.

    Changes that wake: an entry renamed in, or written and closed, the directory itself
    deleted, moved or unmounted, and events lost by the kernel (inotify queue overflow).
    With ``departures=True`` (the default) an entry deleted or renamed out also wakes; a
    consumer passes False so that its own claims (renames into ``.checkout``) do not
    wake it and every other reader of the queue. Dot-names never wake: the keep link
    that a durable move creates beside the entry for an instant is not an arrival (with
    it, every claim under durability "full" woke every reader of the queue).
    Renames into the directory are reported as fast as the kernel delivers them: no
    wake waits for a rename out to be paired (see the module docstring).

    The callback runs on the observer thread and must be cheap (set a flag or an
    Event); it should not call :func:`subscribe` or :meth:`Subscription.close`, which
    may deadlock with watchdog's observers. Exceptions it raises are logged.

    One observer per process and mode (per interval for polling) is shared by all
    subscriptions and started lazily: in polling mode, and in native mode on Linux (any
    watchdog version: watchdog's InotifyFD from 7.0, multispool's own inotify reader
    before), that is a single thread for all directories, and on Linux one inotify
    instance; watchdog's observers on macOS and Windows add one emitter thread per
    watched directory. None of these threads runs while nothing changes. Subscriptions
    to one directory share one non-recursive watch. Closing the last subscription stops
    and joins the threads.

    In polling mode no inotify instance is opened; `polling_interval` is the seconds
    between two polls, each one ``os.listdir`` of every watched directory (no stat per
    entry), compared with the previous listing. If native mode cannot start because an inotify limit is
    reached, the subscription falls back to polling, logs a warning, and its
    ``mode`` attribute says ``"polling"``.

    Raises FileNotFoundError / NotADirectoryError if `directory` is not a directory,
    ValueError for a bad `mode` or `polling_interval`, and OSError if it cannot be
    watched.
    """
    if mode not in ("native", "polling"):
        msg = f"mode must be 'native' or 'polling', got {mode!r}"
        raise ValueError(msg)
    if not polling_interval > 0:
        msg = f"polling_interval must be a positive number of seconds, got {polling_interval!r}"
        raise ValueError(msg)
    path = os.path.realpath(directory)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    if mode == "native":
        try:
            return _subscribe(path, callback, "native", polling_interval, departures, names)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.ENOSYS):
                raise
            logger.warning(
                "cannot watch %r natively (%s); polling it every %s s", path, exc, polling_interval
            )
    return _subscribe(path, callback, "polling", polling_interval, departures, names)


def _subscribe(
    path: str,
    callback: Callable[..., None],
    mode: ObserverMode,
    interval: float,
    departures: bool,
    names: bool,
) -> Subscription:
    try:
        return _subscribe_locked(path, callback, mode, interval, departures, names)
    finally:
        if _closing:
            _close_pending()


def _subscribe_locked(
    path: str,
    callback: Callable[..., None],
    mode: ObserverMode,
    interval: float,
    departures: bool,
    names: bool,
) -> Subscription:
    sub = Subscription(path, callback, mode, departures=departures, names=names)
    stop: _Backend | None = None
    error: BaseException | None = None
    with _state.lock:
        key: _BackendKey = (mode, interval if mode == "polling" else 0.0)
        backend = _state.backends.get(key)
        if backend is None:
            backend = _new_backend(key)
            _state.backends[key] = backend
        entry = backend.entries.get(path)
        if entry is not None and not entry.stale and departures and not entry.departures:
            try:
                backend.widen(entry)
            except BaseException as exc:
                error = exc
                entry = None
        elif entry is None or entry.stale:
            entry = _Entry(backend, path, departures=departures)
            try:
                backend.add(entry)
            except BaseException as exc:
                error = exc
                if backend.n_subs == 0:
                    # The failed watch may have started the observer thread.
                    del _state.backends[key]
                    stop = backend
                entry = None
        if entry is not None:
            entry.subs = (*entry.subs, sub)
            backend.n_subs += 1
            sub._entry = entry
    if stop is not None:
        stop.shutdown()
    if error is not None:
        raise error
    return sub


# --------------------------------------------------------------------------------------
# Shared state and backends
# --------------------------------------------------------------------------------------

_BackendKey = tuple[ObserverMode, float]


@dataclass(eq=False)
class _Entry:
    """One watched directory: the watch shared by every subscription to it."""

    backend: _Backend
    path: str
    # Replaced, never mutated, under _state.lock, so the observer thread can iterate
    # it without taking the lock.
    subs: tuple[Subscription, ...] = ()
    # The path no longer leads to the watched directory (deleted, moved, unmounted):
    # the next subscribe() to the path sets up a new watch.
    stale: bool = False
    # The kernel already dropped the watch; do not remove it again.
    gone: bool = False
    handle: object = None
    # Whether the watch asks for departures at all. Readers do not want them, and a
    # consumer's own claim is one: left out of the kernel mask, it wakes no thread.
    departures: bool = True
    # Names the subscribers moved out themselves since the last poll (Subscription.took);
    # appended by their threads, taken by the polling thread.
    taken: collections.deque[str] = field(default_factory=collections.deque)

    def notify(self, *, departure: bool, name: str | None = None) -> None:
        """Wake the subscribers that want this change; `name` is what it is about, None
        when unknown (see :func:`subscribe`). A dot-name wakes nobody: it is never an
        entry (``.checkout``, and the keep link ``.~NAME`` that every move out of the
        directory creates and removes under durability "full", claims included)."""
        if name is not None and name[0] == ".":
            return
        for sub in self.subs:
            if departure and not sub.departures:
                continue
            sub._fire(name)


class _Backend:
    """An observer shared by the subscriptions of one mode (and polling interval)."""

    def __init__(self, key: _BackendKey) -> None:
        self.key: Final = key
        self.pid: Final = os.getpid()
        self.entries: dict[str, _Entry] = {}
        self.n_subs = 0

    def add(self, entry: _Entry) -> None:
        """Start watching `entry.path` (under _state.lock)."""
        old = self.entries.get(entry.path)
        if old is not None:
            # A stale watch (its directory was deleted or moved away) still has
            # subscribers, but watches nothing useful: remove it now, since watchdog
            # observers key watches by path and would hand the new one the old emitter.
            self._unwatch(old)
        self._watch(entry)
        self.entries[entry.path] = entry

    def drop(self, entry: _Entry) -> None:
        """Stop watching `entry.path` (under _state.lock)."""
        if self.entries.get(entry.path) is entry:
            del self.entries[entry.path]
        self._unwatch(entry)

    def _watch(self, entry: _Entry) -> None:
        raise NotImplementedError

    def widen(self, entry: _Entry) -> None:
        """Make `entry`'s watch report departures too (under _state.lock)."""
        entry.departures = True

    def _unwatch(self, entry: _Entry) -> None:
        """Remove the watch if it is still there; idempotent."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop and join the threads (never under _state.lock)."""
        raise NotImplementedError


class _Thread(Protocol):
    """What stopping a backend needs of its thread (a threading.Thread)."""

    @property
    def ident(self) -> int | None: ...

    def join(self, timeout: float | None = None) -> None: ...


class _InotifyFD(_Thread, Protocol):
    """The part of watchdog's ``inotify_c.InotifyFD`` (watchdog 7.0+) that the native
    backend uses, which ``_inotify.InotifyReader`` also has (and used where watchdog is
    older). Declared here rather than imported, and watchdog's class looked up at run
    time (:func:`_inotify_fd_class`), because watchdog 4 - 6 have no InotifyFD, nor its
    WatchDescriptor, Mask and CallbackId types (NewTypes of int): this module must
    type-check against either watchdog major."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def add_callback(self, path: bytes, mask: int, callback: _InotifyTarget, id_: int) -> int: ...

    def remove_callbacks(self, callbacks: list[tuple[int, int]]) -> None: ...


def _close_unstarted(fd: _InotifyFD) -> None:
    """Close an _InotifyFD whose thread could not be started (RuntimeError: a pids or
    thread limit). Ours closes its descriptors itself then. watchdog's InotifyFD leaves
    them to its thread, which never ran: its inotify instance, counted against the
    user's fs.inotify.max_user_instances, would stay open for the life of the process."""
    with contextlib.suppress(Exception):
        fd.stop()  # marks it closed; watchdog's then wakes the thread that is not there
    close_resources = getattr(fd, "_close_resources", None)  # watchdog's InotifyFD
    if close_resources is not None and fd.ident is None:
        with contextlib.suppress(OSError):
            close_resources()


def _join_unless_current(thread: _Thread) -> None:
    # A callback that closes the last subscription runs on this very thread, which
    # cannot join itself; it leaves its loop once it returns from the callback.
    # (Compared by ident: _inotify.InotifyReader is not itself a Thread.)
    if thread.ident is not None and thread.ident != threading.get_ident():
        thread.join()


class _InotifyEvent(Protocol):
    """What _InotifyTarget reads of an inotify event: watchdog's
    ``inotify_c.InotifyEvent`` or ``_inotify.InotifyEvent``."""

    @property
    def mask(self) -> int: ...

    @property
    def name(self) -> bytes: ...


class _InotifyTarget:
    """Receives raw inotify events for one directory from the _InotifyFD (implements
    watchdog.observers.inotify_c.WatchCallback and _inotify.WatchCallback)."""

    __slots__ = ("entry",)

    def __init__(self, entry: _Entry) -> None:
        self.entry = entry

    def on_event(self, event: _InotifyEvent) -> None:
        mask = event.mask
        if mask & _IN_SELF:
            self.entry.stale = True
            self.entry.notify(departure=False)
        elif mask & _IN_ARRIVAL:
            self.entry.notify(departure=False, name=os.fsdecode(event.name) or None)
        elif mask & _IN_DEPARTURE:
            self.entry.notify(departure=True, name=os.fsdecode(event.name) or None)

    def on_watch_deleted(self, wd: int) -> None:
        # IN_IGNORED: the kernel removed the watch (directory deleted, unmounted).
        self.entry.stale = True
        self.entry.gone = True
        self.entry.notify(departure=False)

    def on_queue_overflow(self) -> None:
        # Events were lost; any of them might have been an arrival.
        self.entry.notify(departure=False)


# inotify(7) event bits: kernel ABI, spelled out so this module imports without
# watchdog's inotify_c (which refuses to import off Linux).
_IN_CLOSE_WRITE: Final = 0x00000008
_IN_MOVED_FROM: Final = 0x00000040
_IN_MOVED_TO: Final = 0x00000080
_IN_DELETE: Final = 0x00000200
_IN_DELETE_SELF: Final = 0x00000400
_IN_MOVE_SELF: Final = 0x00000800
_IN_UNMOUNT: Final = 0x00002000
_IN_ONLYDIR: Final = 0x01000000

# Arrivals: an entry arrives by rename (publish, save, release, recovery's rename of a
# keep link back); a file another program writes in place ends with a close after the
# write. Not IN_CREATE: in a queue directory only the keep links of durable moves
# (one per claim under durability "full") and ``.checkout`` are created, so with it
# every consumer's claim woke every reader of the queue, and `multispool watch` spent
# 12 % of a core while two consumers drained a backlog (tests/test_cli_ops.py).
_IN_ARRIVAL: Final = _IN_MOVED_TO | _IN_CLOSE_WRITE
_IN_DEPARTURE: Final = _IN_DELETE | _IN_MOVED_FROM
_IN_SELF: Final = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_UNMOUNT
# Departures are in the kernel mask only while some subscriber of the directory wants
# them (then filtered per subscription). Without IN_MOVED_FROM in a grouper nothing is
# delayed, so watching it costs only the wake, but that wake is per claim.
_IN_MASK: Final = _IN_ARRIVAL | _IN_DEPARTURE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
_IN_MASK_ARRIVALS: Final = _IN_MASK & ~_IN_DEPARTURE


class _InotifyBackend(_Backend):
    """Linux native: one _InotifyFD, watchdog's or ours (one inotify instance, one
    thread)."""

    def __init__(self, key: _BackendKey, fd_class: type[_InotifyFD]) -> None:
        super().__init__(key)
        self._fd_class = fd_class
        self._fd: _InotifyFD | None = None
        self._ids = itertools.count(1)

    def _watch(self, entry: _Entry) -> None:
        if self._fd is None:
            fd = self._fd_class()
            try:
                fd.start()
            except BaseException:
                _close_unstarted(fd)
                raise
            self._fd = fd
        target = _InotifyTarget(entry)
        id_ = next(self._ids)
        mask = _IN_MASK if entry.departures else _IN_MASK_ARRIVALS
        wd = self._fd.add_callback(os.fsencode(entry.path), mask, target, id_)
        if wd == -1:
            # watchdog 7.1 returns -1 instead of raising for EACCES (ours raises).
            self._fd.remove_callbacks([(wd, id_)])
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), entry.path)
        entry.handle = (wd, id_)

    def _unwatch(self, entry: _Entry) -> None:
        handle, entry.handle = entry.handle, None
        if self._fd is not None and not entry.gone and isinstance(handle, tuple):
            self._fd.remove_callbacks([handle])

    def widen(self, entry: _Entry) -> None:
        # inotify_add_watch on a watched directory replaces the watch's mask: register
        # the wider one first, then drop the old callback, so no event falls in a gap
        # (in between, both callbacks fire: a harmless double wake).
        old = entry.handle
        entry.departures = True
        self._watch(entry)
        if self._fd is not None and isinstance(old, tuple):
            self._fd.remove_callbacks([old])

    def shutdown(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fd.stop()
            _join_unless_current(fd)


class _Handler(FileSystemEventHandler):
    """Turns one watched directory's watchdog events into wakes."""

    def __init__(self, entry: _Entry) -> None:
        super().__init__()
        self.entry = entry

    def dispatch(self, event: FileSystemEvent) -> None:
        entry = self.entry
        src = os.fsdecode(event.src_path)
        if event.event_type in ("opened", "closed_no_write", "attrib"):
            return
        if src == entry.path:
            if event.event_type in ("deleted", "moved"):
                entry.stale = True
                entry.notify(departure=False)
            else:
                # The directory's own mtime changed: an entry came or went; an arrival
                # also raises its own created/moved event, so treat this as a departure.
                entry.notify(departure=True)
            return
        if isinstance(event, FileSystemMovedEvent):
            dest = os.fsdecode(event.dest_path)
            arrived = os.path.dirname(dest) == entry.path
            entry.notify(departure=not arrived, name=os.path.basename(dest if arrived else src))
        elif event.event_type == "deleted":
            entry.notify(departure=True, name=os.path.basename(src))
        elif event.is_directory and event.event_type == "modified":
            # A subdirectory's own content changed (QUEUE/.checkout on every claim).
            return
        else:
            # created, modified, closed, and anything a native backend may add.
            entry.notify(departure=False, name=os.path.basename(src))


class _WatchdogBackend(_Backend):
    """A watchdog BaseObserver: native outside Linux. On Linux only a fallback, for a C
    library without the inotify calls _inotify needs (which watchdog needs, too)."""

    def __init__(self, key: _BackendKey) -> None:
        super().__init__(key)
        self._observer: BaseObserver | None = None

    def _make_observer(self) -> BaseObserver:
        if _IS_LINUX:
            from watchdog.observers.api import BaseObserver

            return BaseObserver(_arrivals_emitter_class())
        from watchdog.observers import Observer

        return Observer()

    def _watch(self, entry: _Entry) -> None:
        if self._observer is None:
            observer = self._make_observer()
            observer.start()
            self._observer = observer
        entry.handle = self._observer.schedule(_Handler(entry), entry.path, recursive=False)

    def _unwatch(self, entry: _Entry) -> None:
        watch = entry.handle
        entry.handle = None
        if self._observer is not None and watch is not None:
            self._observer.unschedule(_as_watch(watch))

    def shutdown(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            _join_unless_current(observer)


class _PollingBackend(_Backend):
    """Polling anywhere: one thread lists every watched directory each interval and
    compares the names with its previous listing. One ``os.listdir`` per directory and
    poll, no stat per entry (watchdog's PollingObserver stats every entry: a 4,000-entry
    queue took longer to poll than the interval), and the names that came or went are
    reported as such."""

    def __init__(self, key: _BackendKey) -> None:
        super().__init__(key)
        self._thread: threading.Thread | None = None
        # Held until shutdown: the poll thread's timed acquire of it is its sleep. The
        # cheapest timed wait Python has (one futex; Event.wait allocates a lock and
        # takes a Condition per call), which matters at 10 wake-ups a second.
        self._running = threading.Lock()
        self._running.acquire()

    def _watch(self, entry: _Entry) -> None:
        # The first listing is taken now, in subscribe(): whatever lands after subscribe()
        # returns differs from it and is reported. The path is what is polled: a directory
        # put in place of the first one is compared with what was there before.
        entry.handle = frozenset(os.listdir(entry.path))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="multispool-poll", daemon=True)
            self._thread.start()

    def _unwatch(self, entry: _Entry) -> None:
        entry.handle = None

    def _run(self) -> None:
        interval = min(self.key[1], threading.TIMEOUT_MAX)  # acquire() refuses longer
        running = self._running
        while not running.acquire(timeout=interval):
            # Iterated without the lock: add/drop replace entries of the dict, and a
            # snapshot of its values is all one poll needs.
            for entry in list(self.entries.values()):
                self._poll(entry)

    def _poll(self, entry: _Entry) -> None:
        names = entry.handle
        if not isinstance(names, frozenset) or entry.stale:
            return
        # Names taken by subscribers, collected BEFORE the listing: one taken after it
        # waits for the next poll, whose listing then tells whether it is back.
        taken = entry.taken
        left: set[str] = set()
        while taken:
            left.add(taken.popleft())
        try:
            now_names = frozenset(os.listdir(entry.path))  # the one system call of a poll
        except OSError:
            # Deleted or unreadable: this watch is over (subscribe anew).
            entry.stale = True
            entry.notify(departure=False)
            return
        # Taken since the last listing and there again: it came back (or another entry
        # has its name), though both listings have it.
        back = left & now_names
        if now_names == names and not back:
            return
        entry.handle = now_names
        for name in sorted((now_names - names) | back):
            entry.notify(departure=False, name=name)
        if entry.departures:
            for name in sorted(names - now_names):
                entry.notify(departure=True, name=name)

    def shutdown(self) -> None:
        thread, self._thread = self._thread, None
        if self._running.locked():
            self._running.release()
        if thread is not None:
            _join_unless_current(thread)


def _arrivals_emitter_class() -> type[EventEmitter]:
    """watchdog's InotifyEmitter with IN_MOVED_FROM left out of the kernel mask, so
    that its move grouper, which delays every unmatched IN_MOVED_FROM and all events
    behind it by 0.5 s, never sees one; and which reports its directory moved away.

    Up to watchdog 6 the emitter turns IN_MOVE_SELF (and IN_UNMOUNT) into no event at
    all and goes on watching the moved directory under its old path: a reader whose
    queue directory was moved away and replaced kept watching the old one, and heard of
    nothing put in the new one until its next rescan. Every event about the directory's
    entries becomes at least one watchdog event, so a kernel event that yields none is
    about the directory itself: then, if the path no longer leads to the directory
    watched, this emitter reports it moved (the watch goes stale and readers subscribe
    anew) and stops, as watchdog's own does on IN_DELETE_SELF."""
    from watchdog.events import DirMovedEvent
    from watchdog.observers.inotify import InotifyEmitter

    class _ArrivalsInotifyEmitter(InotifyEmitter):
        _watched: tuple[int, int] | None = None
        _queued = False

        # The return type is int | None up to watchdog 6 and Mask from 7.0.
        def get_event_mask_from_filter(self) -> Any:
            return _IN_ARRIVAL | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR

        def on_thread_start(self) -> None:
            # Taken before the watch is added: a directory put in place in between costs
            # at most a needless re-subscription, never a missed replacement.
            with contextlib.suppress(OSError):
                st = os.stat(self.watch.path)
                self._watched = (st.st_dev, st.st_ino)
            super().on_thread_start()

        def queue_event(self, event: FileSystemEvent) -> None:
            self._queued = True
            super().queue_event(event)

        # Keyword-only full_events from watchdog 5.0, positional before.
        def queue_events(self, timeout: float, *args: Any, **kwargs: Any) -> None:
            self._queued = False
            super().queue_events(timeout, *args, **kwargs)
            if self._queued or not self.should_keep_running():
                return
            try:
                st = os.stat(self.watch.path)
            except OSError:
                pass
            else:
                if (st.st_dev, st.st_ino) == self._watched:
                    return
            self.queue_event(DirMovedEvent(self.watch.path, ""))
            self.stop()

    return _ArrivalsInotifyEmitter


def _as_watch(handle: object) -> ObservedWatch:
    from watchdog.observers.api import ObservedWatch

    assert isinstance(handle, ObservedWatch)
    return handle


def _inotify_fd_class() -> type[_InotifyFD] | None:
    """The class of the one inotify reader that the Linux native backend shares between
    every watched directory: watchdog's InotifyFD where the installed watchdog (7.0+)
    has its callback API, else ours (:class:`_inotify.InotifyReader`: watchdog 4 - 6, so
    every Python 3.10, or an incompatible future watchdog); None off Linux, or where the
    C library has no inotify calls."""
    if not _IS_LINUX:
        return None
    fd_class = _watchdog_inotify_fd_class()
    if fd_class is not None:
        return fd_class
    return _inotify.InotifyReader if _inotify.available() else None


def _watchdog_inotify_fd_class() -> type[_InotifyFD] | None:
    """watchdog's InotifyFD if the installed watchdog (7.0+) has its callback API."""
    try:
        from watchdog.observers import inotify_c
    except Exception:  # ImportError, or watchdog's UnsupportedLibcError (no inotify in libc)
        return None
    # Looked up, not imported by name: see _InotifyFD.
    fd_class: type[_InotifyFD] | None = getattr(inotify_c, "InotifyFD", None)
    if fd_class is None or not all(hasattr(fd_class, n) for n in ("add_callback", "remove_callbacks")):
        return None
    return fd_class


def _has_shared_inotify() -> bool:
    """Whether the native backend here reads every watch through one inotify instance
    and one thread (on Linux, with watchdog's InotifyFD or ours)."""
    return _inotify_fd_class() is not None


def _new_backend(key: _BackendKey) -> _Backend:
    if key[0] == "polling":
        return _PollingBackend(key)
    fd_class = _inotify_fd_class() if key[0] == "native" else None
    if fd_class is not None:
        return _InotifyBackend(key, fd_class)
    return _WatchdogBackend(key)


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    backends: dict[_BackendKey, _Backend] = field(default_factory=dict)


_state = _State()

# Subscriptions given to close_soon() while _state.lock was taken: closed by whoever
# holds it, once released (every subscribe() and close() looks here on its way out).
_closing: collections.deque[Subscription] = collections.deque()


def _close_pending() -> None:
    while True:
        try:
            sub = _closing.popleft()
        except IndexError:
            return
        try:
            sub.close()
        except Exception:
            logger.exception("multispool: closing the watch of %r failed", sub.directory)


def _reset_after_fork() -> None:
    # The child has none of the parent's threads, and the lock may have been held by
    # one of them at fork time. Forget everything; subscriptions inherited from the
    # parent become inert (their close() checks the pid). The inherited descriptors of
    # watchdog's InotifyFD are left open: closing them through watchdog would remove the
    # watches of the inotify instance the parent still shares. (_inotify closes the
    # child's copies of its own, without touching the watches.)
    _state.lock = threading.Lock()
    _state.backends = {}
    _closing.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
