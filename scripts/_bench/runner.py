"""Runs the whole benchmark: every system on the same disk, repetitions interleaved
between systems (the order rotates each repetition), each measurement in fresh child
processes; then writes the report (and plots, when matplotlib is there)."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from .common import System, proc_cpu_seconds
from .systems import NAMES, load_all

# findings of the run that are not numbers (a consumer that missed a wake, ...)
NOTES: list[str] = []
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Settings:
    quick: bool
    reps: int
    throughput_seconds: float  # per mode, per repetition
    wake_samples: int  # per wait variant, over all repetitions
    slow_wake_budget: float  # seconds per repetition for variants with slow default polling
    idle_seconds: float
    competing_entries: int
    max_entries: int  # per throughput cell: bounds the time a slow drain can take
    paired_blocks: int  # multispool/floor alternating blocks of 20 operations, per mode
    competing_consumers: int = 4


def _child_cmd(job: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "_bench", "child", json.dumps(job)]


# set by --git-ref: a snapshot of lib/ taken from git, ahead of the editable install
LIB_OVERRIDE: str | None = None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [os.path.join(ROOT, "scripts")]
    if LIB_OVERRIDE:
        paths.insert(0, LIB_OVERRIDE)
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _snapshot_lib(ref: str, base: str) -> str:
    """lib/ as of git ``ref``, extracted under ``base``: other people may be editing the
    working tree while the benchmark runs; a snapshot keeps every measurement on one code."""
    out = os.path.join(base, "lib-snapshot")
    os.makedirs(out)
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "lib"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    return os.path.join(out, "lib")


def _run_child(job: dict[str, Any], timeout: float) -> Any:
    r = subprocess.run(_child_cmd(job), env=_env(), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"child {job['what']} of {job.get('system')} failed: {r.stderr.strip()[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


class Child:
    """A child process whose stdout lines we read with a deadline."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.p = subprocess.Popen(
            _child_cmd(job), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._buf = b""

    def readline(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        assert self.p.stdout is not None
        fd = self.p.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def expect_ready(self, timeout: float = 30) -> None:
        line = self.readline(timeout)
        if line != "ready":
            self.kill()
            err = self.p.stderr.read().decode() if self.p.stderr else ""
            raise RuntimeError(f"child did not get ready: {line!r} {err.strip()[-800:]}")

    def kill(self) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait()
        for f in (self.p.stdout, self.p.stderr):
            if f is not None:
                f.close()


def _fresh_dir(base: str, label: str) -> str:
    return tempfile.mkdtemp(prefix=label + "-", dir=base)


# -- the measurements ---------------------------------------------------------------------
def run_throughput(sys_: System, base: str, st: Settings) -> dict[str, Any]:
    d = _fresh_dir(base, sys_.name)
    try:
        r: dict[str, Any] = _run_child(
            {"what": "throughput", "system": sys_.name, "dir": d, "seconds": st.throughput_seconds,
             "max_entries": st.max_entries},
            timeout=120,
        )
        return r
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _wake_mode(sys_: System) -> str:
    return "non-durable" if "non-durable" in sys_.modes else next(iter(sys_.modes))


def run_wake(sys_: System, vi: int, base: str, n: int, budget: float) -> list[float]:
    """``n`` wake samples (fewer if ``budget`` seconds run out): this process enqueues,
    a consumer child waits; latency = consumer's time after claim+remove minus the time
    the enqueue returned here (both time.time_ns(), one host)."""
    variant = sys_.waits[vi]
    mode = _wake_mode(sys_)
    d = _fresh_dir(base, sys_.name)
    sys_.create(d)
    child = Child({"what": "consume", "system": sys_.name, "dir": d, "mode": mode,
                   "variant": vi, "count": n, "deadline": budget + 60})
    lat: list[float] = []
    prod = None
    try:
        child.expect_ready()
        prod = sys_.producer(d, mode)
        # a consumer that polls must be in its sleep, not just starting: let it settle
        time.sleep(0.05)
        end = time.monotonic() + budget
        per_sample = (variant.interval or 0.01) * 3 + 5 if variant.slow else 5.0
        for i in range(n):
            if time.monotonic() >= end:
                break
            prod.put(i)
            t_ret = time.time_ns()
            wait = per_sample
            if variant.slow:  # do not overrun the budget by more than one polling period
                wait = min(wait, max(1.0, end - time.monotonic() + (variant.interval or 0)))
            line = child.readline(wait)
            if line is None:
                # budget exceeded (slow polling); what was measured stands. A fast variant
                # that misses is a finding: it is reported with the results.
                if not variant.slow:
                    NOTES.append(f"{sys_.name}, {variant.label}: entry {i} not reported within "
                                 f"{per_sample:.0f} s; this run stopped after {len(lat)} samples")
                break
            _, seq, t_ns = line.split()
            if int(seq) != i:
                raise RuntimeError(f"{sys_.name}: expected entry {i}, got {seq}")
            lat.append((int(t_ns) - t_ret) / 1e9)
            # a gap, random over a whole polling period so that a poller's phase varies
            # (else every entry lands just after an empty poll): each one is a fresh wake
            time.sleep(random.uniform(0.001, 0.004) + random.uniform(0, variant.interval or 0))
    finally:
        if prod is not None:
            prod.close()
        child.kill()
        shutil.rmtree(d, ignore_errors=True)
    return lat


def run_idle(systems: list[System], base: str, seconds: float, quick: bool) -> dict[str, dict[str, float]]:
    """All systems' consumers blocked in their wait at once (they are idle: they do not
    compete); CPU from /proc/PID/stat utime+stime over ``seconds``."""
    children: list[tuple[System, int, Child, str]] = []
    out: dict[str, dict[str, float]] = {}
    try:
        for s in systems:
            for vi, v in enumerate(s.waits):
                if not s.multiprocess or (quick and v.full_only):
                    continue
                d = _fresh_dir(base, s.name)
                s.create(d)
                c = Child({"what": "consume", "system": s.name, "dir": d, "mode": _wake_mode(s),
                           "variant": vi, "count": 0, "deadline": seconds + 120})
                children.append((s, vi, c, d))
        for _, _, c, _ in children:
            c.expect_ready()
        time.sleep(1.0)  # past start-up (imports, observer threads starting)
        t0 = time.monotonic()
        cpu0 = [proc_cpu_seconds(c.p.pid) for _, _, c, _ in children]
        time.sleep(seconds)
        cpu1 = [proc_cpu_seconds(c.p.pid) for _, _, c, _ in children]
        wall = time.monotonic() - t0
        for (s, vi, _, _), a, b in zip(children, cpu0, cpu1, strict=True):
            out.setdefault(s.name, {})[s.waits[vi].label] = 100 * (b - a) / wall
    finally:
        for _, _, c, d in children:
            c.kill()
            shutil.rmtree(d, ignore_errors=True)
    return out


def run_competing(sys_: System, base: str, st: Settings, variant: int = 0) -> dict[str, Any]:
    mode = _wake_mode(sys_)
    d = _fresh_dir(base, sys_.name)
    go = os.path.join(base, f"go-{sys_.name}-{os.getpid()}-{random.random()}")
    kids: list[Child] = []
    try:
        sys_.create(d)
        p = sys_.producer(d, mode)
        n = st.competing_entries
        for i in range(n):
            p.put(i)
        p.close()
        for _ in range(st.competing_consumers):
            kids.append(Child({"what": "drain_competing", "system": sys_.name, "dir": d,
                               "mode": mode, "go": go, "variant": variant}))
        for k in kids:
            k.expect_ready()
        open(go, "w").close()
        results = []
        for k in kids:
            line = k.readline(120)
            if line is None:
                raise RuntimeError(f"{sys_.name}: a competing consumer did not finish")
            results.append(json.loads(line))
        seqs = [s for r in results for s in r["seqs"]]
        unique = set(seqs)
        t0 = min(r["t0"] for r in results)
        t1 = max(r["t_end"] for r in results)
        return {
            "n": n,
            "handled": len(seqs),
            "duplicates": len(seqs) - len(unique),
            "losses": len(set(range(n)) - unique),
            "rate": len(unique) / max(t1 - t0, 1e-9),
            "per_consumer": [len(r["seqs"]) for r in results],
            "errors": sum(r["n_errors"] for r in results),
            "error_samples": sorted({e for r in results for e in r["errors"]})[:3],
        }
    finally:
        for k in kids:
            k.kill()
        if os.path.exists(go):
            os.unlink(go)
        shutil.rmtree(d, ignore_errors=True)


def run_paired(base: str, st: Settings) -> dict[str, Any]:
    d = _fresh_dir(base, "paired")
    try:
        r: dict[str, Any] = _run_child(
            {"what": "paired", "dir": d, "block": 20, "blocks": st.paired_blocks}, timeout=300)
        return r
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_audit(sys_: System, mode: str, base: str, n: int = 20) -> dict[str, Any]:
    """fsync/fdatasync calls of ``n`` enqueues, seen by ``strace -f -y``: per-entry files
    (each fsynced once) apart from directories and shared files (fsynced every time)."""
    d = _fresh_dir(base, sys_.name)
    log = os.path.join(base, f"strace-{sys_.name}-{mode}.txt")
    try:
        cmd = ["strace", "-f", "-y", "-e", "trace=fsync,fdatasync,sync_file_range,msync,write",
               "-o", log, *_child_cmd({"what": "audit", "system": sys_.name, "dir": d,
                                       "mode": mode, "n": n})]
        subprocess.run(cmd, env=_env(), capture_output=True, timeout=120, check=True)
        with open(log, errors="replace") as f:
            text = f.read()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    start = text.find("--bench-audit-start--")
    end = text.find("--bench-audit-end--")
    per_path: dict[str, int] = {}
    for line in text[start:end].splitlines():
        m = re.search(r"\b(fsync|fdatasync|sync_file_range|msync)\(\d+<([^>]*)>", line)
        if m:
            path = os.path.relpath(m.group(2), d) if m.group(2).startswith(d) else m.group(2)
            per_path[path] = per_path.get(path, 0) + 1
    shared = {p: c / n for p, c in per_path.items() if c >= n}
    per_entry = sum(c for c in per_path.values() if c < n) / n
    return {"per_entry_files": per_entry, "shared": shared,
            "total": sum(per_path.values()) / n}


# -- orchestration ------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a run under 2 minutes")
    ap.add_argument("--dir", default=ROOT, help="where queues are created (default: the checkout)")
    ap.add_argument("--systems", nargs="*", choices=NAMES, help="only these systems")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"), help="where the report goes")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--git-ref", help="benchmark lib/ as of this git commit (e.g. HEAD) instead "
                    "of the working tree")
    ap.add_argument("--audit", action="store_true",
                    help="also count fsyncs per enqueue with strace in --quick (always in full)")
    ap.add_argument("--batch", action="store_true",
                    help="only the durable batch / group-commit cases; writes docs/benchmarks-batch.md")
    ap.add_argument("--label", help="--batch: the section title (default: the filesystem of --dir)")
    ap.add_argument("--baseline-ref", help="--batch: also run multispool's 1- and 8-thread cases on "
                    "lib/ as of this git commit")
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)  # like --out: a fresh place to measure in
    if args.batch:
        return _main_batch(args, argv)
    st = (
        Settings(True, 3, 0.2, 201, 1.5, 10.0, 200, 500, 10)
        if args.quick
        else Settings(False, 5, 1.0, 500, 12.0, 60.0, 2000, 5000, 60)
    )
    started = time.time()
    load_before = os.getloadavg()
    base = tempfile.mkdtemp(prefix=".bench-", dir=args.dir)
    global LIB_OVERRIDE
    if args.git_ref:
        if "multispool" in sys.modules:
            raise SystemExit("--git-ref: multispool was imported before the snapshot")
        LIB_OVERRIDE = _snapshot_lib(args.git_ref, base)
        sys.path.insert(0, LIB_OVERRIDE)
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", args.git_ref],
                             capture_output=True, text=True, check=True).stdout.strip()
        _log(f"benchmarking lib/ of {args.git_ref} ({rev}) from {LIB_OVERRIDE}")
        args.git_ref = rev  # the report names this commit even if HEAD moves meanwhile
    systems, skipped = load_all(args.systems)
    fail_file = os.path.join(sys.prefix, ".bench-install-failures")
    if os.path.exists(fail_file):
        with open(fail_file) as f:
            for line in f:
                if line.strip():
                    skipped.setdefault(line.split(":")[0], line.strip())
    res: dict[str, Any] = {"throughput": {}, "wake": {}, "idle": {}, "competing": {}, "failed": {}}

    def attempt(what: str, name: str, f: Any) -> Any:
        try:
            return f()
        except Exception as e:
            _log(f"{name}: {what} failed: {e}")
            res["failed"].setdefault(name, []).append(f"{what}: {e}"[:400])
            return None

    try:
        for rep in range(st.reps):
            order = systems[rep % len(systems):] + systems[: rep % len(systems)]
            _log(f"repetition {rep + 1}/{st.reps}: throughput")
            for s in order:
                r = attempt("throughput", s.name, lambda s=s: run_throughput(s, base, st))
                if r is not None:
                    res["throughput"].setdefault(s.name, []).append(r)
            _log(f"repetition {rep + 1}/{st.reps}: wake latency")
            per_rep = -(-st.wake_samples // st.reps)
            for s in order:
                for vi, v in enumerate(s.waits):
                    if not s.multiprocess or (st.quick and v.full_only):
                        continue
                    budget = st.slow_wake_budget if v.slow else 60.0
                    lat = attempt(f"wake {v.label}", s.name,
                                  lambda s=s, vi=vi, b=budget, n=per_rep: run_wake(s, vi, base, n, b))
                    if lat is not None:
                        res["wake"].setdefault(s.name, {}).setdefault(v.label, []).extend(lat)
            _log(f"repetition {rep + 1}/{st.reps}: {st.competing_consumers} competing consumers")
            for s in order:
                r = attempt("competing", s.name, lambda s=s: run_competing(s, base, st))
                if r is not None:
                    res["competing"].setdefault(s.name, []).append(r)
        names = {s.name for s in systems}
        if {"multispool", "floor"} <= names:
            _log("multispool and the floor, paired")
            res["paired"] = attempt("paired", "multispool", lambda: run_paired(base, st))
        if shutil.which("strace") and (not st.quick or args.audit):
            _log("fsync audit (strace)")
            for s in systems:
                for mode in s.modes:
                    r = attempt(f"audit {mode}", s.name, lambda s=s, m=mode: run_audit(s, m, base))
                    if r is not None:
                        res.setdefault("audit", {}).setdefault(s.name, {})[mode] = r
        _log(f"idle CPU over {st.idle_seconds:.0f} s")
        idle = attempt("idle", "all", lambda: run_idle(systems, base, st.idle_seconds, st.quick))
        res["idle"] = idle or {}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    res["notes"] = NOTES
    elapsed = time.time() - started
    _log(f"measured in {elapsed:.0f} s; writing the report")
    from . import report

    cmd = "scripts/bench" + "".join(f" {a}" for a in argv)
    meta = report.machine(args.dir, args.git_ref)
    meta.update({"load": (load_before[0], os.getloadavg()[0]), "command": cmd, "elapsed": elapsed,
                 "settings": st.__dict__, "skipped": skipped})
    raw = os.path.join(sys.prefix, "last-results.json")
    with open(raw, "w") as f:
        json.dump({"meta": meta, "results": res,
                   "systems": {s.name: _describe(s) for s in systems}}, f, indent=1)
    report.write(args.out, meta, res, systems, plots=not args.no_plots)
    _log(f"wrote {os.path.join(args.out, 'benchmarks.md')} (raw results: {raw})")
    return 0


def _main_batch(args: Any, argv: list[str]) -> int:
    from . import batch

    reps, seconds = (3, 1.0) if args.quick else (5, 3.0)
    # --out is a directory: refused now, not after the whole run has been measured.
    os.makedirs(args.out, exist_ok=True)
    load_before = os.getloadavg()
    base = tempfile.mkdtemp(prefix=".bench-batch-", dir=args.dir)
    global LIB_OVERRIDE
    try:
        if args.git_ref:  # measure a snapshot: the working tree may change during the run
            LIB_OVERRIDE = _snapshot_lib(args.git_ref, os.path.join(base, "current"))
        baseline = _snapshot_lib(args.baseline_ref, base) if args.baseline_ref else None
        res = batch.run(lambda job, t: _run_child(job, t), _fresh_dir, base, reps, seconds, baseline, _log)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", args.git_ref or "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    if args.baseline_ref:
        rev += f" (baseline: {args.baseline_ref})"
    fs = batch._fstype(args.dir)
    meta = {"dir_fs": f"`{args.dir}`: {fs}", "cpus": os.cpu_count(),
            "load": (load_before[0], os.getloadavg()[0]),
            "reps": reps, "seconds": seconds, "command": "scripts/bench" + "".join(f" {a}" for a in argv),
            "rev": rev, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    batch.report(os.path.join(args.out, "benchmarks-batch.md"), args.label or fs, res, meta)
    return 0


def _describe(s: System) -> dict[str, Any]:
    return {"title": s.title, "modes": s.modes, "durability": s.durability,
            "waits": [w.label for w in s.waits], "notes": s.notes}
