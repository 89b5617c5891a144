"""A bare inotify waiter through ctypes: the floor for wake latency and idle CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select

IN_CREATE = 0x00000100
IN_MOVED_TO = 0x00000080
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Watcher:
    """An inotify instance watching one directory for IN_CREATE | IN_MOVED_TO."""

    def __init__(self, path: str) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), "inotify_init1")
        if _libc.inotify_add_watch(fd, os.fsencode(path), IN_CREATE | IN_MOVED_TO) < 0:
            e = ctypes.get_errno()
            os.close(fd)
            raise OSError(e, os.strerror(e), path)
        self.fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def drain(self) -> None:
        """Read (discard) every pending event without blocking."""
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def wait(self, timeout: float) -> bool:
        """Block until an event is pending or ``timeout`` seconds pass."""
        return bool(self._poll.poll(max(0, int(timeout * 1000))))

    def close(self) -> None:
        os.close(self.fd)
