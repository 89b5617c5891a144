"""The syscall floor: multispool's on-disk protocol written with ``os`` directly, no
library around it. Enqueue = O_EXCL registry + flock, tmp write, data write, rename into
the queue; claim = flock + rename into .checkout; remove = unlinks. fsyncs exactly where
multispool's durability="full" puts them. Its wait is a bare inotify waiter (ctypes).

The paths are joined by hand on purpose: this is the baseline without the library.
"""

from __future__ import annotations

import fcntl
import os
import threading
from typing import Any

from . import inotify
from .common import PAD, System, WaitVariant

O_EXCL = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
O_TRUNC = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: str, data: bytes, sync: bool) -> None:
    fd = os.open(path, O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def create(path: str) -> None:
    for d in (".registry", ".tmp", ".data", "q", "q/.checkout"):
        os.makedirs(os.path.join(path, d), exist_ok=True)


class Producer:
    def __init__(self, path: str, mode: str) -> None:
        self.full = mode == "durable"
        self.reg = path + "/.registry/"
        self.tmp = path + "/.tmp/"
        self.data = path + "/.data/"
        self.q = path + "/q/"
        self.prefix = f"{os.getpid()}-{id(self)}-"

    def put(self, seq: int) -> None:
        name = self.prefix + str(seq)
        full = self.full
        fd = os.open(self.reg + name, O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if full:
            _fsync_dir(self.reg)
        _write(self.tmp + name, b'{"seq":%d}' % seq, full)
        _write(self.data + name, b"%d:" % seq + PAD, full)
        if full:
            _fsync_dir(self.data)
        os.rename(self.tmp + name, self.q + name)
        os.close(fd)
        if full:
            _fsync_dir(self.q)

    def close(self) -> None:
        pass


class BatchProducer:
    """multispool's durable enqueue recipes as they stand, with bare syscalls (``os``, and
    ``ctypes`` for what ``os`` lacks); the files and descriptors are the library's.

    Batch of 1 (``enqueue``): the registry file (created, locked), the tmp and the data
    file written, each file's writeback started as it is written (sync_file_range
    WRITE); then fsync tmp, data, .registry, .data one after another, rename, fsync the
    queue dir. Batch of N (``enqueue_many``): every entry's files written, descriptors
    kept open; every file written out (sync_file_range WRITE on all, then WAIT on
    each); every file fsync and the .registry and .data dir fsyncs in flight at once
    (Linux AIO through ``multispool._aio.fsync_all`` given the open descriptors: a thin
    wrapper over io_submit and io_getevents; else 16 threads); every rename; one fsync
    of the queue dir."""

    def __init__(self, path: str) -> None:
        self.reg = path + "/.registry/"
        self.tmp = path + "/.tmp/"
        self.data = path + "/.data/"
        self.q = path + "/q/"
        self.prefix = f"{os.getpid()}-{id(self)}-"
        self.pool: Any = None
        self.sfr = _sync_file_range()

    def _write_entry(self, seq: int, hint: bool) -> tuple[str, list[int]]:
        name = self.prefix + str(seq)
        fds = [os.open(self.reg + name, O_EXCL, 0o644)]
        fcntl.flock(fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        for path, body in ((self.tmp + name, b'{"seq":%d}' % seq), (self.data + name, b"%d:" % seq + PAD)):
            f = os.open(path, O_EXCL, 0o644)
            os.write(f, body)
            if hint and self.sfr is not None:
                self.sfr(f, WHOLE, WHOLE, 2)
            fds.append(f)
        return name, fds

    def put(self, start: int, n: int) -> None:
        if n == 1:
            name, fds = self._write_entry(start, True)
            os.fsync(fds[1])
            os.fsync(fds[2])
            _fsync_dir(self.reg)
            _fsync_dir(self.data)
            os.rename(self.tmp + name, self.q + name)
            for fd in fds:
                os.close(fd)
            _fsync_dir(self.q)
            return
        entries = [self._write_entry(seq, False) for seq in range(start, start + n)]
        self._sync_publish(entries)
        _fsync_dir(self.q)

    def _sync_publish(self, entries: list[tuple[str, list[int]]]) -> None:
        """Stage one for written entries: every file written out (start all, then wait
        for each), every fsync in flight at once, then each rename and close."""
        files = [fd for _, fds in entries for fd in fds[1:]]
        if self.sfr is not None:
            for fd in files:
                self.sfr(fd, WHOLE, WHOLE, 2)
            for fd in files:
                if self.sfr(fd, WHOLE, WHOLE, 7) != 0:
                    raise OSError("sync_file_range failed")
        self._fsync_all(files)
        for name, fds in entries:
            os.rename(self.tmp + name, self.q + name)
            for fd in fds:
                os.close(fd)

    def _fsync_all(self, files: list[int]) -> None:
        from multispool import _aio

        targets = [("", fd, False) for fd in files] + [(self.reg, None, True), (self.data, None, True)]
        errs = _aio.fsync_all(targets)
        if errs is None:
            import concurrent.futures

            if self.pool is None:
                self.pool = concurrent.futures.ThreadPoolExecutor(16)
            calls = [(os.fsync, fd) for fd in files] + [(_fsync_dir, d) for d in (self.reg, self.data)]
            list(self.pool.map(lambda c: c[0](c[1]), calls))
        elif any(errs):
            raise OSError(f"fsync: {errs}")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class GroupProducer(BatchProducer):
    """The library's group commit for single puts from many threads, with bare calls:
    a put that finds a round under way queues its entry and sleeps on a lock of its own;
    the leader writes every queued entry (taking in those that arrive meanwhile), writes
    them out, fsyncs files and the .registry and .data dirs in flight at once, renames,
    then hands the lead to the first entry queued since and fsyncs the queue dir (stage
    two, which the next round's stage one overlaps) before waking its round. What the
    layout and one process's threads allow a round of puts on this disk, with as little
    Python around the system calls as it takes."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.lock = threading.Lock()
        self.waiting: list[list[Any]] = []  # [seq, wake lock, done, error]
        self.busy = False

    def put(self, start: int, n: int) -> None:
        if n != 1:
            super().put(start, n)
            return
        wake = threading.Lock()
        wake.acquire()
        job: list[Any] = [start, wake, False, None]
        with self.lock:
            self.waiting.append(job)
            follower = self.busy
            self.busy = True
        if follower:
            wake.acquire()  # released when the round is done, or to lead the next one
            if job[2]:
                if job[3] is not None:
                    raise job[3]
                return
        group: list[list[Any]] = []
        err: BaseException | None = None
        try:
            entries: list[tuple[str, list[int]]] = []
            while len(group) < 128:
                with self.lock:
                    new = self.waiting[: 128 - len(group)]
                    del self.waiting[: len(new)]
                if not new:
                    break
                group += new
                entries += [self._write_entry(j[0], False) for j in new]
            self._sync_publish(entries)
        except BaseException as e:  # the round fails as a whole; nobody is left asleep
            err = e
        with self.lock:
            self.busy = False
            if self.waiting:
                self.busy = True
                self.waiting[0][1].release()
        if err is None:
            try:
                _fsync_dir(self.q)
            except BaseException as e:
                err = e
        for j in group:
            j[2], j[3] = True, err
            if j is not job:
                j[1].release()
        if err is not None:
            raise err


def _sync_file_range() -> Any:
    """libc's sync_file_range(fd, offset, nbytes, flags), or None off Linux."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    fn = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
    # As the library calls it: no argtypes, the offset and length given as C int64s
    # (WHOLE), which ctypes passes without converting anything.
    fn.restype = ctypes.c_int
    return fn


def _whole() -> Any:
    import ctypes

    return ctypes.c_int64(0)


WHOLE = _whole()


class Consumer:
    def __init__(self, path: str, mode: str, variant: WaitVariant) -> None:
        self.full = mode == "durable"
        self.reg = path + "/.registry/"
        self.data = path + "/.data/"
        self.q = path + "/q/"
        self.co = path + "/q/.checkout/"
        self._pending: list[str] = []
        self.busy = False
        self._watch = inotify.Watcher(self.q) if variant.kind == "native" else None
        self._interval = variant.interval or 0.01

    def _claim_remove(self, name: str) -> int | None:
        try:
            fd = os.open(self.reg + name, O_READ)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # the producer still holds it between its rename and its close (or another
                # consumer is claiming it): no further event will come, so look again soon
                self.busy = True
                return None
            if os.fstat(fd).st_nlink == 0:
                return None
            try:
                os.rename(self.q + name, self.co + name)
            except FileNotFoundError:
                return None
            rfd = os.open(self.co + name, O_READ)
            meta = os.read(rfd, 65536)
            os.close(rfd)
            os.unlink(self.co + name)
            if self.full:
                _fsync_dir(self.co)
            os.unlink(self.data + name)
            os.unlink(self.reg + name)
            return int(meta[7:-1])  # b'{"seq":N}'
        finally:
            os.close(fd)

    def get_nowait(self) -> int | None:
        for _ in range(2):
            while self._pending:
                seq = self._claim_remove(self._pending.pop())
                if seq is not None:
                    return seq
            self._pending = sorted((n for n in os.listdir(self.q) if n[0] != "."), reverse=True)
        return None

    def wait(self, timeout: float) -> int | None:
        import time

        deadline = time.monotonic() + timeout
        while True:
            if self._watch is not None:
                self._watch.drain()  # clear pending events BEFORE listing
            seq = self.get_nowait()
            if seq is not None:
                return seq
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.busy:
                self.busy = False
                time.sleep(min(0.0005, left))
            elif self._watch is not None:
                self._watch.wait(left)
            else:
                time.sleep(min(self._interval, left))

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()


def _consumer(path: str, mode: str, variant: WaitVariant) -> Any:
    return Consumer(path, mode, variant)


SYSTEM = System(
    name="floor",
    title="floor (os syscalls)",
    version=lambda: "-",
    create=create,
    producer=Producer,
    consumer=_consumer,
    modes={"durable": "fsyncs as durability=full", "non-durable": "no fsync"},
    waits=[
        WaitVariant("bare inotify (ctypes)", "native"),
        WaitVariant("listdir every 10 ms", "poll", 0.01, full_only=True),
    ],
    durability="as multispool (same syscalls)",
)
