"""_aio.fsync_all: many fsyncs in flight at once through Linux AIO, each with its own
result, and a clean way out wherever the kernel refuses or a wait is interrupted."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Any

import pytest

import multispool
from _paths import open_fds as _open_fds
from _procs import in_forked_child
from conftest import Cog, Queue
from multispool import _aio, _fs

pytestmark = pytest.mark.skipif(not _aio._usable, reason="Linux AIO fsync is not available here")


def _files(tmp_path: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * i)
        paths.append(str(p))
    return paths


class _Kernel:
    """Wraps the real syscalls of ``_aio``: records them, and alters what a test asks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.setup_errno = 0
        self.submit_limit: int | None = None  # take at most this many per io_submit
        self.submit_errno_after: int | None = None  # refuse once this many were taken
        self.fail_data: dict[int, int] = {}  # aio_data -> negative result to report
        self.interrupt_wait = False
        self.interrupt_after_setup = False  # as a signal handler would, as io_setup returns
        self.setups: list[int] = []  # ids of the contexts io_setup made
        self.destroyed: list[int] = []
        self.taken = 0
        self.waits: list[tuple[int, int]] = []  # io_getevents: (min_nr, nr)
        real = _aio._syscall
        names = dict(zip(_aio._NR, ("io_setup", "io_destroy", "io_getevents", "io_submit"), strict=True))

        def syscall(nr: Any, *args: Any) -> int:
            name = names[nr.value]
            self.calls.append(name)
            if name == "io_setup" and self.setup_errno:
                ctypes.set_errno(self.setup_errno)
                return -1
            if name == "io_submit":
                if self.submit_errno_after is not None and self.taken >= self.submit_errno_after:
                    ctypes.set_errno(errno.EINVAL)
                    return -1
                if self.submit_limit is not None:
                    args = (args[0], ctypes.c_long(min(args[1].value, self.submit_limit)), args[2])
                r = int(real(nr, *args))
                self.taken += max(r, 0)
                return r
            if name == "io_getevents":
                self.waits.append((args[1].value, args[2].value))
                if self.interrupt_wait:
                    raise KeyboardInterrupt
            r = int(real(nr, *args))
            if name == "io_setup" and r == 0:
                self.setups.append(int(args[1]._obj.value))
                if self.interrupt_after_setup:
                    raise KeyboardInterrupt
            if name == "io_destroy":
                self.destroyed.append(int(args[0].value))
            if name == "io_getevents" and r > 0:
                for ev in args[3][:r]:
                    if ev.data in self.fail_data:
                        ev.res = self.fail_data[ev.data]
            return r

        monkeypatch.setattr(_aio, "_syscall", syscall)


def test_every_target_synced_with_its_own_result(tmp_path: Path) -> None:
    paths = _files(tmp_path, 5)
    (tmp_path / "d").mkdir()
    fd = os.open(paths[0], os.O_RDONLY)
    try:
        targets = [(paths[0], fd, False)] + [(p, None, False) for p in paths[1:]]
        targets += [(str(tmp_path / "d"), None, True), (str(tmp_path / "missing"), None, False)]
        before = _open_fds()
        errs = _aio.fsync_all(targets)
        assert _open_fds() == before  # what it opened it closed; the caller's fd stays open
        os.fstat(fd)
    finally:
        os.close(fd)
    assert errs is not None and errs[:6] == [None] * 6
    assert isinstance(errs[6], FileNotFoundError) and errs[6].filename == str(tmp_path / "missing")
    assert _aio.fsync_all([]) == []


def test_symlinks_and_fifos_are_refused_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.write_bytes(b"x")
    (tmp_path / "link").symlink_to(target)
    os.mkfifo(tmp_path / "fifo")
    errs = _aio.fsync_all([(str(tmp_path / "link"), None, False), (str(tmp_path / "fifo"), None, False)])
    assert errs is not None
    assert isinstance(errs[0], OSError) and errs[0].errno == errno.ELOOP
    assert isinstance(errs[1], OSError) and errs[1].filename == str(tmp_path / "fifo")
    assert "not a regular file" in str(errs[1])


def test_more_targets_than_a_context_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = _Kernel(monkeypatch)
    paths = _files(tmp_path, _aio.CAPACITY + 44)
    errs = _aio.fsync_all([(p, None, False) for p in paths])
    assert errs == [None] * len(paths)
    assert kernel.taken == len(paths) and kernel.calls.count("io_submit") >= 2


def test_once_every_request_is_in_flight_one_wait_takes_all_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wake-up per completion costs CPU the kernel's fsync workers need: once nothing
    is left to submit, the wait asks for every request in flight. Before that (more
    targets than a context holds), it asks for one, to refill the context at once."""
    kernel = _Kernel(monkeypatch)
    paths = _files(tmp_path, 40)
    assert _aio.fsync_all([(p, None, False) for p in paths]) == [None] * 40
    assert kernel.waits == [(40, 40)]
    kernel.waits.clear()
    kernel.calls.clear()
    paths = _files(tmp_path, _aio.CAPACITY + 44)
    assert _aio.fsync_all([(p, None, False) for p in paths]) == [None] * len(paths)
    assert kernel.waits[0] == (1, _aio.CAPACITY)
    # Every wait before the last submission asks for one; the first after it, for all.
    calls = [c for c in kernel.calls if c in ("io_submit", "io_getevents")]
    first_after = calls.count("io_getevents") - calls[::-1].index("io_submit")
    assert {want for want, _ in kernel.waits[:first_after]} == {1}
    want, nr = kernel.waits[first_after]
    assert want == nr > 1


def test_a_failed_fsync_is_reported_for_its_file_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = _Kernel(monkeypatch)
    kernel.fail_data = {2: -errno.EIO}
    paths = _files(tmp_path, 4)
    errs = _aio.fsync_all([(p, None, False) for p in paths])
    assert errs is not None and [e is None for e in errs] == [True, True, False, True]
    err = errs[2]
    assert isinstance(err, OSError) and err.errno == errno.EIO and err.filename == paths[2]


def test_a_refused_setup_turns_aio_off_and_enqueues_sync_from_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel or sandbox without AIO (ENOSYS): nothing is done, the caller is told, AIO
    is not tried again, and a batch is synced from threads, durable all the same."""
    monkeypatch.setattr(_aio, "_contexts", [])
    monkeypatch.setattr(_aio, "_usable", True)
    kernel = _Kernel(monkeypatch)
    kernel.setup_errno = errno.ENOSYS
    paths = _files(tmp_path, 3)
    assert _aio.fsync_all([(p, None, False) for p in paths]) is None
    assert _aio._usable is False
    fsyncs: list[str] = []
    fsync_file = _fs.fsync_file

    def counting(p: str, fd: int | None = None) -> None:
        fsyncs.append(p)
        fsync_file(p, fd)

    monkeypatch.setattr(_fs, "fsync_file", counting)
    spool = multispool.Spool.create(tmp_path / "spool", multispool.Spoolable(queues=Queue, metadata=Cog))
    entries = spool.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"x") for i in range(3)])
    assert len(fsyncs) == 6 and [e.direct.contents() for e in entries] == [Cog(n=i) for i in range(3)]
    assert kernel.calls.count("io_setup") == 1


def test_aio_max_nr_used_up_is_only_for_now(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_aio, "_contexts", [])
    kernel = _Kernel(monkeypatch)
    kernel.setup_errno = errno.EAGAIN
    assert _aio.fsync_all([(p, None, False) for p in _files(tmp_path, 2)]) is None
    assert _aio._usable is True
    kernel.setup_errno = 0
    assert _aio.fsync_all([(p, None, False) for p in _files(tmp_path, 2)]) == [None, None]


def test_refused_mid_way_the_rest_is_synced_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = _Kernel(monkeypatch)
    kernel.submit_limit = 2
    kernel.submit_errno_after = 2
    synced: list[int] = []
    fsync_fd = _fs.fsync_fd

    def counting(fd: int) -> None:
        synced.append(fd)
        fsync_fd(fd)

    monkeypatch.setattr(_fs, "fsync_fd", counting)
    paths = _files(tmp_path, 5)
    errs = _aio.fsync_all([(p, None, False) for p in paths])
    assert errs == [None] * 5
    assert kernel.taken == 2 and len(synced) == 3
    assert _aio._usable is True  # refused for these files, not for good


def _interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> tuple[_Kernel, list[str]]:
    """fsync_all of 3 files, no context idle, with the kernel's ``where`` flag set (a
    signal handler's exception at that point): it raises KeyboardInterrupt, and every
    descriptor it opened is closed. Returns the kernel and the files."""
    monkeypatch.setattr(_aio, "_contexts", [])
    kernel = _Kernel(monkeypatch)
    setattr(kernel, where, True)
    paths = _files(tmp_path, 3)
    before = _open_fds()
    with pytest.raises(KeyboardInterrupt):
        _aio.fsync_all([(p, None, False) for p in paths])
    assert _open_fds() == before
    return kernel, paths


def test_an_interrupted_wait_destroys_its_context_and_closes_what_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal handler's exception while fsyncs are in flight: the context is destroyed
    (which waits for them), never reused; every descriptor it opened is closed."""
    kernel, paths = _interrupted(tmp_path, monkeypatch, "interrupt_wait")
    assert kernel.calls[-1] == "io_destroy" and _aio._contexts == []
    kernel.interrupt_wait = False
    assert _aio.fsync_all([(p, None, False) for p in paths]) == [None] * 3
    assert len(_aio._contexts) == 1  # a clean run gives its context back for reuse


def test_an_interrupt_as_a_context_is_made_loses_no_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal handler's exception right as io_setup returns: the new context is
    destroyed all the same (each one holds part of the system's fs.aio-max-nr until it
    is), and nothing is left open."""
    kernel, paths = _interrupted(tmp_path, monkeypatch, "interrupt_after_setup")
    assert len(kernel.setups) == 1
    assert kernel.destroyed == kernel.setups or _aio._contexts == kernel.setups, "the context was lost"
    kernel.interrupt_after_setup = False
    assert _aio.fsync_all([(p, None, False) for p in paths]) == [None] * 3


def test_one_idle_context_is_kept_at_most(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Contexts count against the system's fs.aio-max-nr: concurrent callers each get
    one, and all but one are destroyed when they are done."""
    monkeypatch.setattr(_aio, "_contexts", [])
    kernel = _Kernel(monkeypatch)
    paths = _files(tmp_path, 4)
    ctxs = [_aio._setup() for _ in range(3)]  # three callers at once
    assert None not in ctxs and len(set(ctxs)) == 3
    for c in ctxs:
        assert c is not None
        _aio._release(c, idle=True)
    assert _aio._contexts == [ctxs[0]] and kernel.calls.count("io_destroy") == 2
    assert _aio.fsync_all([(p, None, False) for p in paths]) == [None] * 4
    assert _aio._contexts == [ctxs[0]] and kernel.calls.count("io_setup") == 3


def test_a_forked_child_gets_contexts_of_its_own(tmp_path: Path) -> None:
    paths = _files(tmp_path, 3)
    assert _aio.fsync_all([(p, None, False) for p in paths]) == [None] * 3
    assert _aio._contexts  # the parent keeps one
    in_forked_child(
        lambda: not _aio._contexts and _aio.fsync_all([(p, None, False) for p in paths]) == [None] * 3
    )
