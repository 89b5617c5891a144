"""A small inotify(7) reader: one inotify instance and one thread for many directories.

Used by the native Linux backend of :mod:`multispool._watch` only where watchdog has no
``watchdog.observers.inotify_c.InotifyFD`` (watchdog older than 7.0, which is all that
Python 3.10 gets): watchdog's emitters cost an inotify instance and two threads per
watched directory there, and the per-user limit on inotify instances
(``fs.inotify.max_user_instances``, 128 by default) ran out at about 128 queues.

:class:`InotifyReader` has the interface and the behaviour of watchdog 7.1's
``InotifyFD`` that the backend relies on (the ``_InotifyFD`` Protocol in ``_watch``):

* ``add_callback(path, mask, callback, id_)`` adds a watch with ``inotify_add_watch``
  and returns its watch descriptor. The kernel hands out one descriptor per inode, so a
  second call for the same directory returns the same descriptor and *replaces* the
  watch's mask (no ``IN_MASK_ADD``); the callbacks of a descriptor are kept by ``id_``,
  and a repeated ``id_`` replaces the earlier callback with a RuntimeWarning.
* ``remove_callbacks([(wd, id_), ...])`` drops callbacks; the last one of a descriptor
  removes the watch (``inotify_rm_watch``; EINVAL, a watch the kernel already dropped,
  is ignored). An unknown descriptor is ignored; an unknown ``id_`` of a known one warns.
* Every event of a descriptor goes to ``on_event(event)`` of each of its callbacks,
  called on the reading thread, outside the lock (a callback may add or remove
  callbacks). ``IN_IGNORED`` (the kernel dropped the watch: directory deleted,
  unmounted) forgets the descriptor and calls ``on_watch_deleted(wd)`` instead.
  ``IN_Q_OVERFLOW`` (events lost) calls ``on_queue_overflow()`` once for each distinct
  callback of every watch, and logs a warning. Other events with descriptor -1 are
  dropped.
* ``stop()`` removes every watch, calls ``on_watch_deleted(wd)`` for the callbacks that
  were still registered, and wakes the reading thread, which closes the descriptors and
  ends; ``join()`` waits for that. The thread is a daemon thread.

Where it differs from InotifyFD, on purpose: ``add_callback`` raises an OSError naming
the path for every failure (InotifyFD returns -1 for EACCES, which the backend turns
into PermissionError anyway); the descriptors are close-on-exec; a callback that raises
is logged instead of ending the thread; and a child process forked from this one closes
its inherited copies of the descriptors at once (the parent's watches, threads and
instance are untouched: closing a copy only drops the child's reference), instead of
keeping the parent's inotify instance alive for as long as the child lives.

The reading thread blocks in ``poll(2)`` on the inotify descriptor and a pipe that
``stop()`` writes to, without a timeout: while nothing changes it never runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import struct
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["InotifyEvent", "InotifyReader", "WatchCallback"]

logger = logging.getLogger(__name__)

# inotify(7) kernel ABI.
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
# inotify_init1's flags are O_CLOEXEC and O_NONBLOCK (whose values differ on a few
# architectures); the fallbacks are x86's and arm's, for type checkers off Linux.
_IN_CLOEXEC: Final[int] = getattr(os, "O_CLOEXEC", 0o2000000)
_IN_NONBLOCK: Final[int] = getattr(os, "O_NONBLOCK", 0o4000)

# struct inotify_event { int wd; uint32_t mask, cookie, len; char name[len]; }
_HEADER: Final = struct.Struct("iIII")
# Room for a few hundred events per read(); one event takes at most
# _HEADER.size + NAME_MAX + 1 bytes, and a smaller buffer makes read() fail with EINVAL.
_BUFFER_SIZE: Final = 64 * 1024


class _Libc:
    """The three inotify calls of the C library, through ctypes (errno kept)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        # AttributeError here when the C library has no inotify (not Linux).
        self._init1 = libc.inotify_init1
        self._init1.argtypes = (ctypes.c_int,)
        self._init1.restype = ctypes.c_int
        self._add_watch = libc.inotify_add_watch
        self._add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self._add_watch.restype = ctypes.c_int
        self._rm_watch = libc.inotify_rm_watch
        self._rm_watch.argtypes = (ctypes.c_int, ctypes.c_int)
        self._rm_watch.restype = ctypes.c_int

    def init1(self, flags: int) -> int:
        return int(self._init1(flags))

    def add_watch(self, fd: int, path: bytes, mask: int) -> int:
        return int(self._add_watch(fd, path, mask))

    def rm_watch(self, fd: int, wd: int) -> int:
        return int(self._rm_watch(fd, wd))


_libc: _Libc | None = None
_libc_lock = threading.Lock()


def _get_libc() -> _Libc:
    global _libc
    with _libc_lock:
        if _libc is None:
            _libc = _Libc()
        return _libc


def available() -> bool:
    """Whether the C library has the inotify calls (it does on Linux, glibc and musl)."""
    try:
        _get_libc()
    except (AttributeError, OSError):
        return False
    return True


@dataclass(frozen=True)
class InotifyEvent:
    """One ``struct inotify_event``: ``name`` is the entry's base name, b"" when the
    event is about the watched directory itself (or about nothing: IN_Q_OVERFLOW)."""

    __slots__ = ("cookie", "mask", "name", "wd")

    wd: int
    mask: int
    cookie: int
    name: bytes


class WatchCallback(Protocol):
    """What :meth:`InotifyReader.add_callback` calls (watchdog's ``WatchCallback``)."""

    def on_event(self, event: InotifyEvent) -> None: ...

    def on_watch_deleted(self, wd: int) -> None: ...

    def on_queue_overflow(self) -> None: ...


def parse_events(buffer: bytes) -> Iterator[InotifyEvent]:
    """The events in what one ``read()`` of an inotify descriptor returned."""
    header = _HEADER
    offset = 0
    end = len(buffer)
    while offset + header.size <= end:
        wd, mask, cookie, length = header.unpack_from(buffer, offset)
        offset += header.size
        # The kernel pads the name with NULs to an aligned length.
        name = buffer[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        yield InotifyEvent(wd, mask, cookie, name)


def _error(err: int, what: str, path: bytes | None = None) -> OSError:
    detail = os.strerror(err)
    if err == errno.ENOSPC and what == "inotify_add_watch":
        detail = "inotify watch limit reached (fs.inotify.max_user_watches)"
    elif err == errno.EMFILE and what == "inotify_init1":
        detail = "inotify instance limit reached (fs.inotify.max_user_instances) or too many open files"
    if path is None:
        return OSError(err, f"{detail} [{what}]")
    # OSError picks the subclass from errno: FileNotFoundError, PermissionError...
    return OSError(err, f"{detail} [{what}]", os.fsdecode(path))


# Readers whose descriptors a forked child must close (see _close_in_child).
_live: weakref.WeakSet[InotifyReader] = weakref.WeakSet()


class InotifyReader:
    """One inotify instance and the daemon thread that reads it; see the module
    docstring for the behaviour (watchdog 7.1's ``InotifyFD``'s, which it stands in for).
    Raises OSError if the instance cannot be created (EMFILE: the per-user instance
    limit, or the process's open-file limit)."""

    def __init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="multispool-inotify", daemon=True)
        self._libc = _get_libc()
        fd = self._libc.init1(_IN_CLOEXEC | _IN_NONBLOCK)
        if fd < 0:
            raise _error(ctypes.get_errno(), "inotify_init1")
        try:
            # The pipe stop() writes its one byte to (os.pipe: close-on-exec, PEP 446).
            self._wake, self._wake_w = os.pipe()
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._pid = os.getpid()
        self._lock = threading.Lock()
        # wd -> {id_: callback}
        self._watches: dict[int, dict[int, WatchCallback]] = {}
        # Set by stop(); read by the thread without the lock (a bool is atomic).
        self._stopping = False
        # Whether the descriptors are (being) closed, and by whom: the thread once
        # started, stop() if it never was.
        self._started = False
        self._closed = False
        _live.add(self)

    # ----------------------------------------------------------------- control

    @property
    def thread(self) -> threading.Thread:
        """The reading thread."""
        return self._thread

    @property
    def ident(self) -> int | None:
        """The reading thread's ident; None until it is started."""
        return self._thread.ident

    def join(self, timeout: float | None = None) -> None:
        """Wait for the reading thread to end (after :meth:`stop`)."""
        self._thread.join(timeout)

    def start(self) -> None:
        """Start the reading thread (once)."""
        with self._lock:
            if self._stopping:
                msg = "InotifyReader was stopped before it started"
                raise RuntimeError(msg)
            self._started = True
        try:
            self._thread.start()
        except BaseException:
            with self._lock:
                self._started = False
                self._stopping = True
            self._close_fds()
            raise

    def stop(self) -> None:
        """Remove every watch and make the thread close the instance and end. Idempotent;
        does nothing in a process forked from the one that created this reader."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            watches, self._watches = self._watches, {}
            for wd in watches:
                # Not needed to free them once the descriptor is closed, but a forked
                # child may still hold a copy of it.
                self._libc.rm_watch(self._fd, wd)
            close_here = not self._started
            if not close_here:
                os.write(self._wake_w, b"!")
        if close_here:
            self._close_fds()
        for wd, callbacks in watches.items():
            for callback in callbacks.values():
                self._call(callback.on_watch_deleted, wd)

    # ----------------------------------------------------------------- watches

    def add_callback(self, path: bytes, mask: int, callback: WatchCallback, id_: int) -> int:
        """Watch `path` for the events in `mask` (replacing the mask of an existing
        watch of the same directory), call `callback` for them, and return the watch
        descriptor. Raises OSError naming the path if the kernel refuses the watch
        (ENOENT, ENOTDIR with IN_ONLYDIR, EACCES, ENOSPC: the watch limit)."""
        with self._lock:
            if self._stopping or os.getpid() != self._pid:
                raise OSError(errno.EBADF, "inotify reader is stopped", os.fsdecode(path))
            wd = self._libc.add_watch(self._fd, path, mask)
            if wd < 0:
                raise _error(ctypes.get_errno(), "inotify_add_watch", path)
            callbacks = self._watches.setdefault(wd, {})
            if id_ in callbacks:
                warnings.warn(
                    f"inotify callback id {id_} already registered on watch {wd}; replaced",
                    RuntimeWarning,
                    stacklevel=2,
                )
            callbacks[id_] = callback
            return wd

    def remove_callbacks(self, callbacks: list[tuple[int, int]]) -> None:
        """Drop the callbacks ``(wd, id_)``; the last one of a watch removes the watch."""
        with self._lock:
            if self._stopping or os.getpid() != self._pid:
                return
            for wd, id_ in callbacks:
                registered = self._watches.get(wd)
                if registered is None:
                    # The kernel dropped the watch already (IN_IGNORED was handled).
                    continue
                if registered.pop(id_, None) is None:
                    warnings.warn(
                        f"no inotify callback id {id_} on watch {wd} to remove",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                if registered:
                    continue
                del self._watches[wd]
                if self._libc.rm_watch(self._fd, wd) != 0:
                    err = ctypes.get_errno()
                    # EINVAL: the kernel dropped it already; its IN_IGNORED is queued.
                    if err != errno.EINVAL:
                        raise _error(err, "inotify_rm_watch")

    # ----------------------------------------------------------------- the thread

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            logger.exception("multispool inotify reader failed; its watches report nothing more")
        finally:
            with self._lock:
                self._stopping = True
            self._close_fds()

    def _loop(self) -> None:
        if sys.platform == "win32":  # for type checkers: no poll() there, nor inotify
            raise OSError(errno.ENOSYS, "inotify is Linux's")
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        while not self._stopping:
            ready = poller.poll()  # no timeout: an idle reader never runs
            if self._stopping or any(fd == self._wake for fd, _ in ready):
                return
            try:
                buffer = os.read(self._fd, _BUFFER_SIZE)
            except BlockingIOError:
                continue
            for event in parse_events(buffer):
                if self._stopping:
                    return
                self._dispatch(event)

    def _dispatch(self, event: InotifyEvent) -> None:
        mask = event.mask
        if mask & IN_Q_OVERFLOW:
            with self._lock:
                targets = {id(cb): cb for cbs in self._watches.values() for cb in cbs.values()}
            logger.warning("inotify queue overflowed; filesystem events were lost")
            for callback in targets.values():
                self._call(callback.on_queue_overflow)
            return
        if event.wd == -1:
            return
        callbacks: tuple[WatchCallback, ...] = ()
        deleted: dict[int, WatchCallback] | None = None
        with self._lock:
            if mask & IN_IGNORED:
                deleted = self._watches.pop(event.wd, None)
            else:
                registered = self._watches.get(event.wd)
                if registered:
                    callbacks = tuple(registered.values())
        for callback in callbacks:
            self._call(callback.on_event, event)
        if deleted:
            for callback in deleted.values():
                self._call(callback.on_watch_deleted, event.wd)

    @staticmethod
    def _call(method: Callable[..., None], *args: object) -> None:
        try:
            method(*args)
        except Exception:
            logger.exception("inotify callback %r raised", method)

    def _close_fds(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # Out of _live first: a fork() from here on must not have the child close these
        # numbers, which another thread may have opened anew by then.
        _live.discard(self)
        for fd in (self._fd, self._wake, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _close_in_child() -> None:
    # A forked child has none of its parent's threads: nothing reads its copies of the
    # descriptors. Close them (no inotify_rm_watch: the instance is the parent's too),
    # so the child does not keep the parent's instance, and the watches in it, alive.
    # No lock is taken: one may have been held by a thread of the parent.
    for reader in list(_live):
        reader._stopping = True
        reader._closed = True
        for fd in (reader._fd, reader._wake, reader._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)
