"""Core benchmark: multispool against "the floor", the same on-disk protocol written with
bare ``os`` calls, for each durability mode, on one disk, in one run.

    scripts/bench_core [--quick] [--dir DIR] [--repeats N] [--ops N] [--no-strace] [--profile]

Measures enqueue throughput and checkout+remove throughput (ops/s), and enqueue
throughput with 8 threads enqueueing at once into one spool (the floor: 8 threads with
the same bare calls, each syncing on its own; multispool: one Spool shared by the
threads, which under "full" share their syncs). Every measurement is
repeated (interleaved: floor and multispool alternate, modes rotate) and reported as
median and min-max; "ratio" is multispool median / floor median, "paired" the median of
the per-repeat ratios (each pair ran interleaved, under the same load): the target
(>= 0.8) applies to "paired".
With strace available, it also counts the syscalls per operation of both sides; when a
ratio is below target (or with --profile) it profiles multispool with cProfile.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import enum
import fcntl
import io
import os
import platform
import pstats
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))
import multispool  # noqa: E402

MODES = ("full", "file", "none")
TARGET = 0.8
PAYLOAD = b"x" * 100
MARK_BEGIN = "/multispool-bench-mark-begin"
MARK_END = "/multispool-bench-mark-end"


class Q(enum.Enum):
    A = "a"
    B = "b"


# -- the floor ------------------------------------------------------------------------------

O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
O_TRUNC = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
LOCK = fcntl.LOCK_EX | fcntl.LOCK_NB


def _fsync_dir(path: str) -> None:
    fd = os.open(path, O_DIR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: str, data: bytes, sync: bool) -> None:
    fd = os.open(path, O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


ROOT_FD = os.open("/", os.O_RDONLY | os.O_CLOEXEC)
HAVE_TMPFILE = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


class Floor:
    """The multispool protocol, hand-written with bare ``os`` calls: the same syscalls as
    multispool issues (strace counts match), so the ratio is the library's overhead.
    Those are: the registry file born locked (O_TMPFILE + flock + linkat, Linux), the
    stale-lock check (fstat st_nlink) and the checkout mtime (utimensat) at checkout.
    With ``minimal=True`` (``--minimal-floor``) it leaves those three out: the simplest
    protocol that still locks, shown for what multispool's safety features cost."""

    minimal = False

    def __init__(self, d: str, mode: str) -> None:
        self.d = d
        self.sync = mode != "none"
        self.full = mode == "full"
        self.enc = msgspec.json.Encoder()
        self.dec = msgspec.json.Decoder()
        self.token = secrets.token_hex(8)
        self.last = 0
        for sub in (".registry", ".tmp", ".data", "a", "a/.checkout", "b", "b/.checkout"):
            os.makedirs(os.path.join(d, sub), mode=0o700, exist_ok=True)

    def enqueue(self, meta: Any, data: bytes) -> str:
        d = self.d
        now = max(time.time_ns(), self.last + 1)
        self.last = now
        name = f"{now:019d}-{self.token}"
        reg = f"{d}/.registry/{name}"
        if HAVE_TMPFILE and not self.minimal:
            fd = os.open(f"{d}/.registry", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, LOCK)
            os.link(f"/proc/self/fd/{fd}", reg, src_dir_fd=ROOT_FD, follow_symlinks=True)
        else:
            fd = os.open(reg, O_NEW, 0o600)
            fcntl.flock(fd, LOCK)
        try:
            if self.full:
                _fsync_dir(f"{d}/.registry")
            tmp = f"{d}/.tmp/{name}"
            _write(tmp, self.enc.encode(meta), self.sync)
            _write(f"{d}/.data/{name}", data, self.sync)
            if self.full:
                _fsync_dir(f"{d}/.data")
            os.rename(tmp, f"{d}/a/{name}")
        finally:
            os.close(fd)
        if self.full:
            _fsync_dir(f"{d}/a")
        return name

    def _move(self, src: str, dst: str, sync_src: bool = True) -> None:
        """A move of the life-cycle table: under "full", keep link in the source dir until
        the destination dir is fsynced, then the source dir (see multispool._layout)."""
        if not self.full:
            os.rename(src, dst)
            return
        sdir, name = os.path.split(src)
        keep = f"{sdir}/.~{name}"
        os.link(src, keep, follow_symlinks=False)
        os.rename(src, dst)
        _fsync_dir(os.path.dirname(dst))
        os.unlink(keep)
        if sync_src:
            _fsync_dir(sdir)

    def _claim(self, name: str, q: str) -> tuple[int, Any]:
        d = self.d
        fd = os.open(f"{d}/.registry/{name}", O_READ)
        try:
            fcntl.flock(fd, LOCK)
            co = f"{d}/{q}/.checkout/{name}"
            if not self.minimal:
                os.fstat(fd)
                os.utime(f"{d}/{q}/{name}", follow_symlinks=False)
            self._move(f"{d}/{q}/{name}", co, sync_src=False)  # the queue's fsync is owed
            mfd = os.open(co, O_READ)
            try:
                meta = self.dec.decode(os.read(mfd, 65536))
            finally:
                os.close(mfd)
        except BaseException:
            os.close(fd)
            raise
        return fd, meta

    def checkout_save(self, name: str) -> Any:
        """Checkout from a, save (metadata unchanged) into b."""
        d = self.d
        fd, meta = self._claim(name, "a")
        try:
            co = f"{d}/a/.checkout/{name}"
            os.utime(co, follow_symlinks=False)
            self._move(co, f"{d}/b/{name}")
            if self.full:
                _fsync_dir(f"{d}/a")  # the claim's owed fsync
        finally:
            os.close(fd)
        return meta

    def checkout_remove(self, name: str) -> Any:
        """Checkout from b and remove."""
        d = self.d
        fd, meta = self._claim(name, "b")
        try:
            os.unlink(f"{d}/b/.checkout/{name}")
            if self.full:
                _fsync_dir(f"{d}/b/.checkout")
                _fsync_dir(f"{d}/b")  # the claim's owed fsync
            os.unlink(f"{d}/.data/{name}")
            os.unlink(f"{d}/.registry/{name}")
        finally:
            os.close(fd)
        return meta

    def names(self, q: str = "a") -> list[str]:
        return sorted(n for n in os.listdir(f"{self.d}/{q}") if n[0] != ".")


class Lib:
    """The same two operations through the public multispool API."""

    def __init__(self, d: str, mode: str) -> None:
        self.spool: multispool.Spool[bytes] = multispool.Spool.create(
            d, multispool.Spoolable(queues=Q, durability=mode)  # type: ignore[arg-type]
        )

    def enqueue(self, meta: Any, data: bytes) -> Any:
        return self.spool.enqueue(Q.A, meta, data)

    def checkout_save(self, entry: Any) -> Any:
        co = self.spool.checkout(entry)
        meta = co.contents
        co.save(Q.B)
        return meta

    def checkout_remove(self, entry: Any) -> Any:
        co = self.spool.checkout(entry)
        meta = co.contents
        co.remove()
        return meta

    def names(self, q: str = "a") -> list[Any]:
        return self.spool.list(Q(q))


class MinimalFloor(Floor):
    minimal = True


IMPLS: dict[str, Callable[[str, str], Any]] = {"floor": Floor, "multispool": Lib}


def run_paired(mode: str, base: str, ops: int, chunk: int = 10) -> dict[str, tuple[float, float, float]]:
    """{impl: (enqueue ops/s, checkout+save ops/s, checkout+remove ops/s)}: enqueue into
    a, save every entry from a into b, drain b. Each impl in a fresh spool under
    ``base``. The two implementations alternate in chunks of ``chunk`` operations, so
    both see the same background load (other processes on the disk); each side's rate is
    its operations over the sum of its own chunk times."""
    d = tempfile.mkdtemp(dir=base, prefix=f"{mode}-")
    try:
        qs = {impl: cls(os.path.join(d, impl), mode) for impl, cls in IMPLS.items()}
        impls = list(qs)
        spent = {impl: [0.0, 0.0, 0.0] for impl in impls}
        for k, start in enumerate(range(0, ops, chunk)):
            for impl in impls if k % 2 == 0 else impls[::-1]:
                q = qs[impl]
                t0 = time.perf_counter()
                for i in range(start, min(start + chunk, ops)):
                    q.enqueue({"n": i}, PAYLOAD)
                spent[impl][0] += time.perf_counter() - t0
        names = {impl: qs[impl].names() for impl in impls}
        for impl in impls:
            assert len(names[impl]) == ops, (impl, len(names[impl]))
        for phase, op, where in ((1, "checkout_save", "a"), (2, "checkout_remove", "b")):
            names = {impl: qs[impl].names(where) for impl in impls}
            for impl in impls:
                assert len(names[impl]) == ops, (impl, where, len(names[impl]))
            for k, start in enumerate(range(0, ops, chunk)):
                for impl in impls if k % 2 == 0 else impls[::-1]:
                    f = getattr(qs[impl], op)
                    t0 = time.perf_counter()
                    for n in names[impl][start : start + chunk]:
                        f(n)
                    spent[impl][phase] += time.perf_counter() - t0
        for impl in impls:
            assert not qs[impl].names("a") and not qs[impl].names("b")
        return {impl: (ops / spent[impl][0], ops / spent[impl][1], ops / spent[impl][2]) for impl in impls}
    finally:
        shutil.rmtree(d, ignore_errors=True)


THREADS = 8


def run_threads(mode: str, base: str, ops: int, order: list[str]) -> dict[str, float]:
    """{impl: enqueue ops/s} with THREADS threads enqueueing ``ops`` entries in all at
    once into one fresh spool, the implementations one after the other in ``order``
    (the caller alternates it). Floor threads have a Floor each (their own names); the
    library's share one Spool, as an application's threads would."""
    d = tempfile.mkdtemp(dir=base, prefix=f"{mode}-threads-")
    per = max(1, ops // THREADS)
    rates: dict[str, float] = {}
    try:
        for impl in order:
            path = os.path.join(d, impl)
            if impl == "floor":
                qs = [IMPLS[impl](path, mode) for _ in range(THREADS)]
            else:
                qs = [IMPLS[impl](path, mode)] * THREADS
            start = threading.Barrier(THREADS + 1)

            def work(q: Any, start: threading.Barrier = start) -> None:
                start.wait()
                for i in range(per):
                    q.enqueue({"n": i}, PAYLOAD)

            ts = [threading.Thread(target=work, args=(q,)) for q in qs]
            for t in ts:
                t.start()
            start.wait()
            t0 = time.perf_counter()
            for t in ts:
                t.join()
            rates[impl] = per * THREADS / (time.perf_counter() - t0)
            assert len(qs[0].names()) == per * THREADS, (impl, len(qs[0].names()))
        return rates
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- syscall counts ---------------------------------------------------------------------------


def strace_child(impl: str, mode: str, base: str, ops: int) -> None:
    """Runs under strace: marks the enqueue and checkout+remove phases with stat() calls
    on marker paths, which the parent finds in the trace."""
    d = tempfile.mkdtemp(dir=base, prefix=f"strace-{impl}-{mode}-")
    try:
        q = IMPLS[impl](os.path.join(d, "spool"), mode)
        q.enqueue({"n": -1}, PAYLOAD)  # warm up imports and caches outside the marks
        q.checkout_save(q.names()[0])
        q.checkout_remove(q.names("b")[0])
        _mark(MARK_BEGIN + "-enqueue")
        for i in range(ops):
            q.enqueue({"n": i}, PAYLOAD)
        _mark(MARK_END + "-enqueue")
        names = q.names()
        _mark(MARK_BEGIN + "-save")
        for n in names:
            q.checkout_save(n)
        _mark(MARK_END + "-save")
        names = q.names("b")
        _mark(MARK_BEGIN + "-checkout")
        for n in names:
            q.checkout_remove(n)
        _mark(MARK_END + "-checkout")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _mark(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.stat(path)


def syscalls_per_op(impl: str, mode: str, base: str, ops: int) -> dict[str, Counter[str]] | None:
    if not shutil.which("strace"):
        return None
    with tempfile.NamedTemporaryFile(prefix="bench-strace-", suffix=".log", dir=base) as log:
        cmd = [
            "strace", "-f", "-qq", "-o", log.name,
            sys.executable, __file__, "--strace-child", impl, mode, base, str(ops),
        ]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            print(f"  (strace failed: {r.stderr.strip()[:200]})")
            return None
        out: dict[str, Counter[str]] = {}
        phase: str | None = None
        for line in Path(log.name).read_text().splitlines():
            m = re.match(r"^\d+\s+(\w+)\((.*)", line)
            if not m:
                continue
            call, rest = m.groups()
            if MARK_BEGIN in rest:
                phase = rest.split(MARK_BEGIN + "-", 1)[1].split('"', 1)[0]
                out[phase] = Counter()
                continue
            if MARK_END in rest:
                phase = None
                continue
            if phase is not None:
                out[phase][call] += 1
        return {p: Counter({k: v / ops for k, v in c.items()}) for p, c in out.items()}  # type: ignore[misc]


# -- profile ----------------------------------------------------------------------------------


def profile(mode: str, base: str, ops: int) -> str:
    """cProfile of multispool's enqueue phase and checkout+remove phase, separately."""
    d = tempfile.mkdtemp(dir=base, prefix=f"profile-{mode}-")
    out = io.StringIO()
    try:
        q = Lib(os.path.join(d, "spool"), mode)
        for phase in ("enqueue", "checkout+save", "checkout+remove"):
            prof = cProfile.Profile()
            if phase == "enqueue":
                prof.enable()
                for i in range(ops):
                    q.enqueue({"n": i}, PAYLOAD)
                prof.disable()
            else:
                save = phase == "checkout+save"
                entries = q.names("a" if save else "b")
                f = q.checkout_save if save else q.checkout_remove
                prof.enable()
                for e in entries:
                    f(e)
                prof.disable()
            out.write(f"-- {phase} --\n")
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return out.getvalue()


# -- report -----------------------------------------------------------------------------------


def machine(base: str) -> list[str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "?"
    fs = "?"
    try:
        df = subprocess.run(["df", "-T", base], capture_output=True, text=True, check=True)
        fs = " ".join(df.stdout.splitlines()[1].split()[:2])
        mount = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "-T", base], capture_output=True, text=True
        )
        if mount.returncode == 0:
            fs += f" ({' '.join(mount.stdout.splitlines()[0].split())})" if mount.stdout else ""
    except (OSError, subprocess.CalledProcessError, IndexError):
        pass
    return [
        f"CPU: {cpu}, {os.cpu_count()} cores",
        f"Kernel: {platform.system()} {platform.release()}",
        f"Python: {platform.python_implementation()} {platform.python_version()}, "
        f"msgspec {msgspec.__version__}",
        f"Filesystem of {base}: {fs}",
    ]


PHASES = (("enqueue", "enqueue"), ("save", "checkout+save"), ("checkout", "checkout+remove"))


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):9.0f}  ({min(xs):7.0f}-{max(xs):7.0f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (fewer ops, 5 repeats)")
    ap.add_argument("--dir", help="where the spools live (default: a temp dir under the repo)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--ops", type=int, default=None, help="operations per measurement (non-full modes)")
    ap.add_argument("--no-strace", action="store_true")
    ap.add_argument("--profile", action="store_true", help="always profile multispool")
    ap.add_argument(
        "--minimal-floor",
        action="store_true",
        help="compare with the minimal protocol (no born-locked registry, no nlink check, no "
        "checkout mtime) instead of the same syscalls: what those safety features cost",
    )
    ap.add_argument(
        "--strace-child", nargs=4, metavar=("IMPL", "MODE", "BASE", "OPS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.minimal_floor:
        IMPLS["floor"] = MinimalFloor
    if args.strace_child:
        impl, mode, base, ops = args.strace_child
        strace_child(impl, mode, base, int(ops))
        return 0

    repeats = args.repeats or 5
    ops = args.ops or (400 if args.quick else 2000)
    ops_for = {"full": max(50, ops // 4), "file": max(50, ops // 2), "none": ops}
    made_base = args.dir is None
    base = tempfile.mkdtemp(prefix=".bench-core-", dir=ROOT) if made_base else args.dir
    os.makedirs(base, exist_ok=True)
    try:
        print("multispool core benchmark: multispool vs the floor (bare os calls, same protocol)")
        for line in machine(base):
            print("  " + line)
        print(f"  ops per measurement: {ops_for}; repeats: {repeats} (interleaved); payload {len(PAYLOAD)} B")
        print()
        res: dict[tuple[str, str], dict[str, list[float]]] = {
            (impl, mode): {"enqueue": [], "save": [], "checkout": []} for impl in IMPLS for mode in MODES
        }
        for mode in MODES:
            run_paired(mode, base, 20)  # warm up imports, caches and the directories' code paths
        threaded: dict[tuple[str, str], list[float]] = {(impl, mode): [] for impl in IMPLS for mode in MODES}
        for rep in range(repeats):
            for mode in MODES[rep % 3 :] + MODES[: rep % 3]:
                for impl, (enq, save, co) in run_paired(mode, base, ops_for[mode]).items():
                    res[impl, mode]["enqueue"].append(enq)
                    res[impl, mode]["save"].append(save)
                    res[impl, mode]["checkout"].append(co)
                order = list(IMPLS) if rep % 2 == 0 else list(IMPLS)[::-1]
                for impl, rate in run_threads(mode, base, 2 * ops_for[mode], order).items():
                    threaded[impl, mode].append(rate)
            print(f"  repeat {rep + 1}/{repeats} done", file=sys.stderr)
        print(
            f"{'mode':5} {'operation':16} {'floor ops/s (min-max)':>27} "
            f"{'multispool ops/s (min-max)':>30} {'ratio':>6} {'paired':>7}"
        )
        below: list[str] = []
        for mode in MODES:
            for op, label in PHASES:
                f = res["floor", mode][op]
                m = res["multispool", mode][op]
                ratio = statistics.median(m) / statistics.median(f)
                # Median of the per-repeat ratios: each pair ran under the same load.
                paired = statistics.median([x / y for x, y in zip(m, f, strict=True)])
                flag = "" if paired >= TARGET else "  < target"
                if paired < TARGET:
                    below.append(mode)
                print(f"{mode:5} {label:16} {fmt(f):>27} {fmt(m):>30} {ratio:6.2f} {paired:7.2f}{flag}")
        for mode in MODES:
            f, m = threaded["floor", mode], threaded["multispool", mode]
            ratio = statistics.median(m) / statistics.median(f)
            paired = statistics.median([x / y for x, y in zip(m, f, strict=True)])
            flag = "" if paired >= TARGET else "  < target"
            if paired < TARGET:
                below.append(mode)
            label = f"enqueue {THREADS} thr"
            print(f"{mode:5} {label:16} {fmt(f):>27} {fmt(m):>30} {ratio:6.2f} {paired:7.2f}{flag}")
        print(
            f"  ({THREADS} thr: {THREADS} threads enqueueing into one spool at once; the floor's each "
            "sync on their own, multispool's share one Spool and, under full, their syncs)"
        )
        print()
        if not args.no_strace:
            sops = 100
            print(f"syscalls per operation (strace -f, {sops} ops, between markers):")
            for mode in MODES:
                counts = {impl: syscalls_per_op(impl, mode, base, sops) for impl in IMPLS}
                if any(c is None for c in counts.values()):
                    print("  strace not available")
                    break
                for phase, label in PHASES:
                    fl = counts["floor"][phase]  # type: ignore[index]
                    ms = counts["multispool"][phase]  # type: ignore[index]
                    calls = sorted(set(fl) | set(ms), key=lambda c: (-ms.get(c, 0), c))
                    detail = ", ".join(
                        f"{c} {ms.get(c, 0):g}"
                        + (f"/{fl.get(c, 0):g}" if ms.get(c, 0) != fl.get(c, 0) else "")
                        for c in calls
                    )
                    total = f"multispool {sum(ms.values()):5.1f} vs floor {sum(fl.values()):5.1f}"
                    print(f"  {mode:5} {label:16} {total}: {detail}")
            print("  (per call: multispool count, /floor count where they differ)")
            print()
        for mode in sorted(set(below)) or (["none"] if args.profile else []):
            print(f"cProfile of multispool, durability={mode} ({ops_for[mode]} enqueues + checkout/removes):")
            print(profile(mode, base, ops_for[mode]))
        if below:
            print(f"BELOW TARGET ({TARGET}x) in: {', '.join(sorted(set(below)))}")
            return 1
        print(f"all ratios >= {TARGET}x")
        return 0
    finally:
        if made_base:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
