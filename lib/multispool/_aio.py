"""Many fsyncs in flight at once, without a thread for each: Linux AIO's IOCB_CMD_FSYNC.

Why: an fsync that finds its journal transaction already committed still asks the disk
for a cache flush of its own, and flushes only merge when they are pending together. A
batch's file syncs issued from 16 threads, each taking its files in turn, reached the
disk in about 60 flushes for 100 entries (ext4 loop image); all submitted at once they
join one commit and about 8 flushes, and the batch takes 11 ms instead of 18 (23.6
instead of 55.8 ms on a disk whose flush costs 1 ms more; docs/benchmarks-batch.md).

The kernel (Linux >= 4.18) runs each request as ``vfs_fsync`` in a kernel worker: the same
call fsync(2) makes, with the same durability and the same writeback error reporting,
one result per file. Where AIO cannot be used (not Linux on x86-64, arm64 or riscv64, a
kernel or a sandbox that refuses it), ``fsync_all`` says so and the caller syncs from
threads instead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import sys
import threading
from collections.abc import Sequence
from typing import Any, Final

from . import _fs

# (io_setup, io_destroy, io_getevents, io_submit), little-endian 64-bit ABIs only: the
# iocb below is laid out for them.
_SYSCALLS: Final = {
    "x86_64": (206, 207, 208, 209),
    "aarch64": (0, 1, 4, 2),
    "riscv64": (0, 1, 4, 2),
}
_IOCB_CMD_FSYNC: Final = 2
# Requests in flight per context: more are submitted as these complete.
CAPACITY: Final = 256


class _Iocb(ctypes.Structure):
    """The kernel's struct iocb. ``_run`` fills an array of them as 64-bit words
    (``_IOCB_WORDS`` each): word 0 is ``aio_data``, word 2 holds ``aio_lio_opcode`` in
    its low 16 bits and ``aio_fildes`` in its high 32 (little-endian); the rest stays 0.
    Two stores into a ctypes array per request, where setting three fields of a
    Structure and making a pointer to it cost 8,000 instructions a request."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


_IOCB_WORDS: Final = ctypes.sizeof(_Iocb) // 8


class _Event(ctypes.Structure):
    """The kernel's struct io_event; ``_reap`` reads them as 64-bit words
    (``_EVENT_WORDS`` each): word 0 is ``data``, word 2 ``res``."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


_EVENT_WORDS: Final = ctypes.sizeof(_Event) // 8


def _syscall_function() -> Any:
    if not sys.platform.startswith("linux") or platform.machine() not in _SYSCALLS:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    return fn


_syscall: Final = _syscall_function()
_NR: Final = _SYSCALLS.get(platform.machine(), (0, 0, 0, 0))

_lock = threading.Lock()
_contexts: list[int] = []  # set up and idle, each for one caller at a time
_usable = _syscall is not None  # False once the kernel refused AIO for good


def _setup() -> int | None:
    """A context from the idle ones, or a new one; None where AIO is not to be had."""
    box: list[int] = []
    cell = ctypes.c_ulong(0)
    if not _setup_into(box, cell):
        return None
    return box[0] if box else cell.value


def _setup_into(box: list[int], cell: ctypes.c_ulong) -> bool:
    """Get a context into ``box`` (an idle one) or ``cell`` (a new one), each stored in
    the step that gets it: a signal handler's exception that interrupts the caller
    afterwards still finds it there, to give back (``_had``). Each context holds about
    2 x CAPACITY of the system's ``fs.aio-max-nr`` until it is destroyed, so one lost
    to an interrupt is lost to every program on the machine for as long as this
    process lives. False where AIO is not to be had."""
    global _usable
    with _lock:
        if not _usable:
            return False
        if _contexts:
            box.extend(map(list.pop, (_contexts,)))  # popped and stored in one C call
            return True
    # io_setup writes the new context's id into ``cell`` itself.
    if _syscall(ctypes.c_long(_NR[0]), ctypes.c_uint(CAPACITY), ctypes.byref(cell)) != 0:
        err = ctypes.get_errno()
        cell.value = 0
        if err != errno.EAGAIN:  # EAGAIN: the system's aio-max-nr is used up, for now
            with _lock:
                _usable = False
        return False
    return True


def _had(box: list[int], cell: ctypes.c_ulong) -> int:
    """The context ``_setup_into`` got into ``box`` or ``cell``, or 0 if none."""
    return box[0] if box else int(cell.value)


def _release(ctx: int, idle: bool) -> None:
    """Give back a context: kept for reuse if ``idle`` (nothing in flight) and no other
    is kept, else destroyed (which waits for what is still in flight). One at most is
    kept: each holds about 2 x CAPACITY of the system's ``fs.aio-max-nr`` (65536 by
    default), which other programs on the machine may need."""
    if idle:
        with _lock:
            if not _contexts:
                _contexts.append(ctx)
                return
    _syscall(ctypes.c_long(_NR[1]), ctypes.c_ulong(ctx))


def _reset_after_fork() -> None:
    # Contexts belong to the parent's address space: a child has none of them.
    global _lock
    _lock = threading.Lock()
    _contexts.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def fsync_all(targets: Sequence[tuple[str, int | None, bool]]) -> list[BaseException | None] | None:
    """fsync every target (path, its open descriptor or None, whether it is a directory),
    all in flight at once, up to CAPACITY at a time. Returns each target's error (an
    OSError naming its path) or None, in order, once every one has finished; or None,
    having done nothing, where AIO cannot be used here. A file is opened without
    following a symlink and must be a regular file, as ``_fs.fsync_file`` requires. It
    is opened just before its request is submitted and closed as soon as that request
    completes: a batch of thousands of files holds at most CAPACITY of them open, not
    one descriptor each (the process's limit on open files is often 1,024)."""
    if not targets:
        return []
    errs: list[BaseException | None] = [None] * len(targets)
    # A holder for each target this call opens, made by ``_open`` before it opens (None
    # for a descriptor the caller gave).
    holds: list[_fs._FileHold | None] = [None] * len(targets)
    box: list[int] = []
    cell = ctypes.c_ulong(0)
    idle = True
    try:
        if not _setup_into(box, cell):
            return None
        idle = False
        serial = _run(_had(box, cell), targets, errs, holds)
        idle = True
        for i in serial:  # refused by the kernel mid-way: synced here, one by one
            path, fd, is_dir = targets[i]
            h = holds[i]
            fd = h.fd if h is not None and h.fd is not None else fd
            try:
                if fd is not None:
                    _fs.fsync_fd(fd)
                elif is_dir:
                    _fs.fsync_dir(path)
                else:
                    _fs.fsync_file(path)
            except OSError as e:
                errs[i] = _fs._name(e, path)
    finally:
        # The descriptors first: the kernel holds its own references to the files of
        # requests still in flight, and an interrupt in the context's release (after it
        # is back among the idle ones) would otherwise leave them open.
        try:
            for h in holds:
                if h is not None and h.fd is not None:
                    _fs._close_held(h.fd, h)
        finally:
            ctx = _had(box, cell)
            if ctx:
                _release(ctx, idle)
    return errs


def _open(
    i: int, targets: Sequence[tuple[str, int | None, bool]], errs: list[BaseException | None],
    holds: list[_fs._FileHold | None],
) -> int | None:
    """Target ``i``'s descriptor (one the caller gave is taken without this call), opened
    into a new ``holds[i]``; None, with its error in ``errs[i]``, if it cannot be opened
    or is not a regular file or dir."""
    path, fd, is_dir = targets[i]
    if fd is not None:
        return fd
    # In the list before the open: what the open stores in it is found by whoever cleans up.
    hold = holds[i] = _fs._FileHold()
    try:
        flags = _fs._DIR_FLAGS if is_dir else _fs.O_READ
        own = _fs._open_held(path, flags, 0o777, hold)
        if not is_dir and not stat.S_ISREG(os.fstat(own).st_mode):
            raise _fs.not_regular(path)
    except OSError as e:
        errs[i] = _fs._name(e, path)
        return None
    return own


def _run(
    ctx: int,
    targets: Sequence[tuple[str, int | None, bool]],
    errs: list[BaseException | None],
    holds: list[_fs._FileHold | None],
) -> list[int]:
    """Open (``_open``) and submit an fsync for each target, at most CAPACITY opened or in
    flight, and reap every one, closing what it opened as each completes. Returns the
    indexes the kernel refused to take (to sync otherwise). Interrupted (a signal
    handler's exception), it raises with requests still in flight: the caller then
    destroys the context, which waits for them, and closes what is still open."""
    global _usable
    n = len(targets)
    # The requests (struct iocb, as words: see _Iocb), and the array of their addresses
    # that io_submit takes.
    cbs = (ctypes.c_uint64 * (_IOCB_WORDS * n))()
    ptrs = (ctypes.c_uint64 * n)()
    base, size = ctypes.addressof(cbs), ctypes.sizeof(_Iocb)
    events = (_Event * CAPACITY)()
    # The same memory as words (see _Event): _reap reads the events in place.
    words = (ctypes.c_int64 * (_EVENT_WORDS * CAPACITY)).from_buffer(events)
    ptr_size = ctypes.sizeof(ctypes.c_void_p)
    opened = prepared = submitted = inflight = 0
    while opened < n or submitted < prepared or inflight:
        while opened < n and prepared - submitted + inflight < CAPACITY:
            i = opened
            opened += 1
            fd = targets[i][1]
            if fd is None:
                fd = _open(i, targets, errs, holds)
                if fd is None:
                    continue
            w = _IOCB_WORDS * prepared
            cbs[w] = i  # aio_data
            cbs[w + 2] = _IOCB_CMD_FSYNC | fd << 32  # aio_lio_opcode, aio_fildes
            ptrs[prepared] = base + size * prepared
            prepared += 1
        room = prepared - submitted
        if room:
            r = _syscall(
                ctypes.c_long(_NR[3]), ctypes.c_ulong(ctx), ctypes.c_long(room),
                ctypes.byref(ptrs, submitted * ptr_size),
            )
            if r > 0:
                submitted += r
                inflight += r
                continue
            err = ctypes.get_errno()
            if not (err == errno.EINTR or (err == errno.EAGAIN and inflight)):
                # Not to be had for these files (EINVAL: a kernel before 4.18 or a file
                # without fsync; ENOSYS, EPERM: a sandbox; EAGAIN: no resources): what
                # was not taken is synced otherwise, and AIO is not tried again where
                # the kernel refuses it as such.
                if err in (errno.ENOSYS, errno.EPERM) or (err == errno.EINVAL and submitted == 0):
                    with _lock:
                        _usable = False
                while inflight:
                    inflight -= _reap(ctx, inflight, events, words, targets, errs, holds)
                return [cbs[_IOCB_WORDS * k] for k in range(submitted, prepared)] + list(range(opened, n))
            if not inflight:
                continue  # interrupted before anything was taken: submit again
        if inflight:
            # Everything submitted: one wait for all of it, not a wake-up per few requests
            # (a batch of 100 woke 35 times, taking CPU from the kernel's fsync workers:
            # docs/benchmarks-batch.md). Before that, as soon as one is done, to refill.
            want = inflight if opened == n and submitted == prepared else 1
            inflight -= _reap(ctx, inflight, events, words, targets, errs, holds, want)
    return []


def _reap(
    ctx: int, inflight: int, events: Any, words: Any, targets: Sequence[tuple[str, int | None, bool]],
    errs: list[BaseException | None], holds: list[_fs._FileHold | None], want: int = 1,
) -> int:
    """Wait for at least ``want`` requests in flight to finish into ``events`` (``words``:
    the same memory as 64-bit words); record the results of all that have, and close the
    descriptors ``_open`` opened for them. Returns how many."""
    r = _syscall(
        ctypes.c_long(_NR[2]), ctypes.c_ulong(ctx), ctypes.c_long(want), ctypes.c_long(inflight),
        events, None,
    )
    if r < 0:
        err = ctypes.get_errno()
        if err == errno.EINTR:
            return 0
        raise OSError(err, f"io_getevents: {os.strerror(err)}")
    # Read in place: no Structure made per event.
    for w in range(0, _EVENT_WORDS * r, _EVENT_WORDS):
        i = words[w]  # data: the target's index
        res = words[w + 2]
        if res < 0:
            errs[i] = OSError(-res, os.strerror(-res), targets[i][0])
        h = holds[i]
        if h is not None and h.fd is not None:
            _fs._close_held(h.fd, h)
    return int(r)
