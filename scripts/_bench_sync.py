"""How should an enqueue make its files durable? Times candidate sync mechanisms for the
"full" guarantee on the directory given, with bare ``os`` calls (no library):

    python scripts/_bench_sync.py DIR [DIR ...] [--seconds S] [--repeat R]

One entry = a registry file, a tmp (metadata) file and a data file, as multispool's
layout; published by renaming tmp into the queue dir. Variants:

  serial5     today's recipe: fsync .registry, tmp, data, .data, rename, fsync queue
  rounds      same 5 fsyncs in 2 rounds: {tmp, data, .registry, .data} issued together
              from a small thread pool, rename, fsync queue
  fdatasync   as serial5 with fdatasync for the two files
  batch N / serial   N entries: 2N file fsyncs one after the other, each dir once
  batch N / pool K   same, file fsyncs issued from K threads at once
  batch N / syncfs   same, one syncfs(2) instead of the file and dir fsyncs (whole fs)
  batch N / hint+pool K   as "pool K", each file's writeback started (sync_file_range
                     SYNC_FILE_RANGE_WRITE) as it is written
  batch N / aio      the 2N file fsyncs and both dir fsyncs in flight at once through
                     Linux AIO (IOCB_CMD_FSYNC; multispool's _aio.fsync_all)
  batch N / hint+aio both
  batch N / aio early K   as "aio", but each K entries' file fsyncs are submitted as soon
                     as those entries are written, while the next ones are written (the
                     dir fsyncs after the last): does overlapping writes and syncs help?
  batch N / aio 2 writers   as "aio", the entries written by two threads, half each (the
                     kernel's share of the writes on both cores)

Prints entries per second, median of --repeat runs of --seconds each, the repetitions
interleaved across variants (one run of each, then the next round). With --dev NAME (a
block device under /sys/block, e.g. loop0), each cell also gives the cache flushes the
device completed and, for ext4, the journal commits (/proc/fs/jbd2/NAME-8), per step
(a batch, or one entry).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import ctypes.util
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable

O_EXCL = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
PAD = b"x" * 200

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def dsync(path: str, sync: Callable[[int], None] = os.fsync) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: str) -> None:
        self.root = root
        self.reg, self.tmp, self.data, self.q = (
            os.path.join(root, d) for d in (".registry", ".tmp", ".data", "q")
        )
        for d in (self.reg, self.tmp, self.data, self.q):
            os.makedirs(d)
        self.seq = 0
        self.pool = concurrent.futures.ThreadPoolExecutor(4)
        self.pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}

    def write(self, sync_files: Callable[[int], None] | None, hint: bool = False) -> tuple[str, list[int]]:
        self.seq += 1
        return self._write_at(self.seq, sync_files, hint)

    def _write_at(
        self, seq: int, sync_files: Callable[[int], None] | None = None, hint: bool = False
    ) -> tuple[str, list[int]]:
        name = str(seq)
        fds = [os.open(os.path.join(self.reg, name), O_EXCL, 0o600)]
        for d, body in ((self.tmp, b'{"seq":%d}' % seq), (self.data, PAD)):
            fd = os.open(os.path.join(d, name), O_EXCL, 0o600)
            os.write(fd, body)
            if sync_files is not None:
                sync_files(fd)
            if hint:
                _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_uint(2))
            fds.append(fd)
        return name, fds

    def _batch_early(self, n: int, k: int) -> int:
        from multispool import _aio

        ctx = _aio._setup()
        if ctx is None:
            raise OSError("AIO is not to be had here")
        keep: list[object] = []  # iocbs stay alive until reaped
        inflight = 0

        def submit(fds: list[int]) -> None:
            nonlocal inflight
            cbs = (_aio._Iocb * len(fds))()
            ptrs = (ctypes.POINTER(_aio._Iocb) * len(fds))()
            for i, fd in enumerate(fds):
                cbs[i].aio_lio_opcode = _aio._IOCB_CMD_FSYNC
                cbs[i].aio_fildes = fd
                ptrs[i] = ctypes.pointer(cbs[i])
            keep.append((cbs, ptrs))
            r = _aio._syscall(ctypes.c_long(_aio._NR[3]), ctypes.c_ulong(ctx), ctypes.c_long(len(fds)), ptrs)
            if r != len(fds):
                raise OSError(ctypes.get_errno(), "io_submit")
            inflight += len(fds)

        entries: list[tuple[str, list[int]]] = []
        for lo in range(0, n, k):
            part = [self.write(None) for _ in range(min(k, n - lo))]
            entries += part
            submit([fd for _, e in part for fd in e[1:]])
        dfds = [os.open(d, os.O_RDONLY | os.O_CLOEXEC) for d in (self.reg, self.data)]
        submit(dfds)
        events = (_aio._Event * _aio.CAPACITY)()
        while inflight:
            r = _aio._syscall(
                ctypes.c_long(_aio._NR[2]), ctypes.c_ulong(ctx), ctypes.c_long(1),
                ctypes.c_long(min(inflight, _aio.CAPACITY)), events, None,
            )
            if r < 0:
                raise OSError(ctypes.get_errno(), "io_getevents")
            if any(ev.res < 0 for ev in events[:r]):
                raise OSError("AIO fsync failed")
            inflight -= r
        _aio._release(ctx, True)
        for fd in dfds:
            os.close(fd)
        for name, fds in entries:
            self.publish(name, fds)
        dsync(self.q)
        return n

    def publish(self, name: str, fds: list[int]) -> None:
        os.rename(os.path.join(self.tmp, name), os.path.join(self.q, name))
        for fd in fds:
            os.close(fd)

    # -- variants: each call enqueues some entries and returns how many --
    def serial5(self, fsync: Callable[[int], None] = os.fsync) -> int:
        self.seq += 1
        name = str(self.seq)
        reg = os.open(os.path.join(self.reg, name), O_EXCL, 0o600)
        dsync(self.reg)
        fds = [reg]
        for d, body in ((self.tmp, b'{"seq":%d}' % self.seq), (self.data, PAD)):
            fd = os.open(os.path.join(d, name), O_EXCL, 0o600)
            os.write(fd, body)
            fsync(fd)
            fds.append(fd)
        dsync(self.data)
        self.publish(name, fds)
        dsync(self.q)
        return 1

    def fdatasync(self) -> int:
        return self.serial5(os.fdatasync)

    def rounds(self) -> int:
        name, fds = self.write(None)
        futs = [self.pool.submit(os.fsync, fd) for fd in fds[1:]]
        futs += [self.pool.submit(dsync, d) for d in (self.reg, self.data)]
        for f in futs:
            f.result()
        self.publish(name, fds)
        dsync(self.q)
        return 1

    def batch(self, n: int, how: str) -> int:
        hint = how.startswith("hint+")
        how = how.removeprefix("hint+")
        if how.startswith("aio early"):
            return self._batch_early(n, int(how.split()[2]))
        if how == "aio 2 writers":
            half: list[tuple[str, list[int]]] = []
            # Names from a range of their own: the two threads never race for one.
            start = self.seq + n
            helper = threading.Thread(
                target=lambda: half.extend(self._write_at(start + k) for k in range(n // 2))
            )
            helper.start()
            entries = [self.write(None) for _ in range(n - n // 2)]
            helper.join()
            self.seq = start + n
            entries += half
            how = "aio"
        else:
            entries = [self.write(None, hint) for _ in range(n)]
        if how == "aio":
            from multispool import _aio

            targets = [("", fd, False) for _, e in entries for fd in e[1:]]
            targets += [(self.reg, None, True), (self.data, None, True)]
            errs = _aio.fsync_all(targets)
            if errs is None or any(errs):
                raise OSError(f"AIO fsync: {errs}")
        elif how == "syncfs":
            fd = os.open(self.root, os.O_RDONLY | os.O_CLOEXEC)
            try:
                syncfs(fd)
            finally:
                os.close(fd)
        else:
            fds = [fd for _, e in entries for fd in e[1:]]
            if how == "serial":
                for fd in fds:
                    os.fsync(fd)
            else:
                k = int(how.split()[1])
                if k not in self.pools:
                    self.pools[k] = concurrent.futures.ThreadPoolExecutor(k)
                list(self.pools[k].map(os.fsync, fds))
            dsync(self.reg)
            dsync(self.data)
        for name, fds in entries:
            self.publish(name, fds)
        dsync(self.q)
        return n


# Roots left for the end of the run (--keep-until-end).
KEPT: list[str] = []


def run(base: str, variant: str, seconds: float, calls: list[int], keep: bool = False) -> float:
    """Entries per second of ``variant``; adds the number of its steps to ``calls[0]``.
    ``keep``: leave its files until the run ends (see --keep-until-end)."""
    root = tempfile.mkdtemp(prefix="syncbench-", dir=base)
    try:
        sp = Spool(root)
        if variant.startswith("batch"):
            _, n, how = variant.split(" ", 2)
            step: Callable[[], int] = lambda: sp.batch(int(n), how)  # noqa: E731
        else:
            step = getattr(sp, variant)
        done = 0
        t0 = time.perf_counter()
        while True:
            done += step()
            calls[0] += 1
            el = time.perf_counter() - t0
            if el >= seconds:
                return done / el
    finally:
        sp.pool.shutdown()
        for p in sp.pools.values():
            p.shutdown()
        if keep:
            KEPT.append(root)
        else:
            shutil.rmtree(root, ignore_errors=True)


VARIANTS = ["serial5", "fdatasync", "rounds"] + [
    f"batch {n} {how}"
    for n in (10, 100)
    for how in ("serial", "pool 4", "pool 16", "hint+pool 16", "aio", "hint+aio", "syncfs")
] + ["batch 100 aio early 25", "batch 100 aio early 10", "batch 100 aio 2 writers"]


class _Counters:
    """Cache flushes the device completed, and ext4's journal commits, so far."""

    def __init__(self, dev: str | None) -> None:
        self.dev = dev
        jbd = f"/proc/fs/jbd2/{dev}-8/info"
        self.jbd = jbd if dev and os.path.exists(jbd) else None

    def read(self) -> tuple[int, int]:
        if self.dev is None:
            return 0, 0
        with open(f"/sys/block/{self.dev}/stat") as f:
            flushes = int(f.read().split()[15])  # field 16: flush requests completed
        commits = 0
        if self.jbd:
            with open(self.jbd) as f:
                commits = int(f.readline().split()[0])
        return flushes, commits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--dev", default=None, help="block device of the (single) DIR, e.g. loop0")
    ap.add_argument(
        "--keep-until-end",
        action="store_true",
        help="remove the files only when the run ends: on ext4 without a journal, removing "
        "thousands of files slows the file creations of the next minutes",
    )
    a = ap.parse_args()
    try:
        _main(a)
    finally:
        for root in KEPT:
            shutil.rmtree(root, ignore_errors=True)


def _main(a: argparse.Namespace) -> None:
    counters = _Counters(a.dev)
    variants = a.only.split(",") if a.only else VARIANTS
    print(f"load average {os.getloadavg()[0]:.2f}; median of {a.repeat} x {a.seconds}s, "
          "repetitions interleaved across variants", file=sys.stderr)
    rates: dict[tuple[str, str], list[float]] = {}
    steps: dict[tuple[str, str], int] = {}
    flushes: dict[tuple[str, str], list[int]] = {}
    # Round-robin: a machine that drifts during the run (other load, a filling disk)
    # affects every variant alike, not the ones measured last.
    for _ in range(a.repeat):
        for v in variants:
            for d in a.dirs:
                before = counters.read()
                batches = [0]
                rates.setdefault((v, d), []).append(run(d, v, a.seconds, batches, a.keep_until_end))
                after = counters.read()
                steps[(v, d)] = steps.get((v, d), 0) + batches[0]
                acc = flushes.setdefault((v, d), [0, 0])
                acc[0] += after[0] - before[0]
                acc[1] += after[1] - before[1]
    print("| variant | " + " | ".join(a.dirs) + " |")
    print("|---|" + "---|" * len(a.dirs))
    for v in variants:
        cells = []
        for d in a.dirs:
            cell = f"{statistics.median(rates[(v, d)]):,.0f}/s"
            if a.dev:
                per = max(steps[(v, d)], 1)
                f, c = flushes[(v, d)]
                cell += f" ({f / per:.1f} flushes"
                cell += f", {c / per:.1f} commits)" if counters.jbd else ")"
            cells.append(cell)
        print(f"| {v} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
