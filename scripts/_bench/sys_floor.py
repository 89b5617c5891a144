"""The syscall floor: multispool's on-disk protocol written with ``os`` directly, no
library around it. Enqueue = O_EXCL registry + flock, tmp write, data write, rename into
the queue; claim = flock + rename into .checkout; remove = unlinks. fsyncs exactly where
multispool's durability="full" puts them. Its wait is a bare inotify waiter (ctypes).

The paths are joined by hand on purpose: this is the baseline without the library.
"""

from __future__ import annotations

import fcntl
import os
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
