"""The ``multispool`` command line: inspect, check, repair and watch any spool.

It needs no user code: the queues are the spool's non-dot directories (in sorted order)
and metadata is handled as raw bytes, shown as JSON when it parses as JSON, else as
MessagePack when it decodes as such, else as base64 bytes.

Exit codes: 0 ok, 1 problems found (fsck), 2 usage or spool error (one line on stderr).
"""

from __future__ import annotations

import argparse
import base64
import enum
import json
import keyword
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn, TextIO

import msgspec

from . import _fs
from ._errors import SpoolError
from ._layout import REGISTRY, TMP, Dir, Layout, check_queue_dirname
from ._monitor import (
    Duplicated,
    End,
    Limits,
    Monitor,
    MonitorDaemon,
    Orphaned,
    Problem,
    Start,
    TooOld,
    repair,
)
from ._spool import Spool
from ._spoolable import BytesData, Spoolable

PROG = "multispool"


class UsageError(Exception):
    """A bad command line or a spool that cannot be used: exit 2, one line on stderr."""


# -- durations ----------------------------------------------------------------------------
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``1.5m``, ``2h``, ``1d``."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (examples: 90, 90s, 10m, 2h, 1d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


# -- a Spoolable for any spool --------------------------------------------------------------
class RawCodec:
    """Metadata as raw bytes both ways (the CLI never interprets what it stores)."""

    def encode(self, obj: Any) -> bytes:
        if not isinstance(obj, bytes):
            raise TypeError(f"raw codec stores bytes, got {type(obj).__name__}")
        return obj

    def decode(self, data: bytes) -> bytes:
        return data


def _member_name(dirname: str, used: set[str]) -> str:
    # Enum member names must be identifiers (and not _sunder_/dunder); values keep the dirname.
    base = re.sub(r"\W", "_", dirname).upper().strip("_") or "QUEUE"
    if not base[0].isalpha() or keyword.iskeyword(base):
        base = "Q_" + base
    name, i = base, 2
    while name in used:
        name, i = f"{base}_{i}", i + 1
    used.add(name)
    return name


def queue_enum(dirnames: Sequence[str]) -> type[enum.Enum]:
    """An Enum whose members' values are ``dirnames`` (in that order)."""
    used: set[str] = set()
    return enum.Enum("Queue", [(_member_name(d, used), d) for d in dirnames])  # type: ignore[return-value]


def make_spoolable(dirnames: Sequence[str]) -> Spoolable[Any, bytes]:
    return Spoolable(queues=queue_enum(dirnames), metadata_codec=RawCodec(), data=BytesData())


def open_spool(spool_dir: str) -> Spool[Any, bytes]:
    """Load the spool at ``spool_dir`` with its non-dot directories as queues."""
    if not os.path.isdir(spool_dir):
        raise UsageError(f"{spool_dir}: no such directory")
    lay = Layout(spool_dir)
    if not (_fs.is_real_dir(lay.registry) and _fs.is_real_dir(lay.tmp)):
        raise UsageError(f"{spool_dir}: not a spool (no {REGISTRY} and {TMP})")
    with os.scandir(spool_dir) as it:
        queues = sorted(e.name for e in it if e.name[0] != "." and e.is_dir(follow_symlinks=False))
    if not queues:
        raise UsageError(f"{spool_dir}: spool has no queue directories")
    return Spool.load(spool_dir, make_spoolable(queues))


def find_queue(spool: Spool[Any, bytes], name: str) -> enum.Enum:
    for q in spool.spoolable.queues:
        if q.value == name:
            return q
    names = ", ".join(str(q.value) for q in spool.spoolable.queues)
    raise UsageError(f"{spool.dir}: no such queue {name!r} (queues: {names})")


def show_metadata(raw: bytes) -> tuple[str, Any]:
    """(format, JSON-able value): JSON if it parses, else MessagePack, else base64 bytes."""
    try:
        return "json", msgspec.json.decode(raw)
    except msgspec.DecodeError:
        pass
    try:
        value = msgspec.msgpack.decode(raw)
        return "msgpack", msgspec.json.decode(msgspec.json.encode(value))  # bytes -> base64 str
    except (msgspec.DecodeError, TypeError, msgspec.EncodeError):
        pass
    return "bytes", base64.b64encode(raw).decode("ascii")


def _metadata_text(fmt: str, value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text if fmt == "json" else f"{fmt}:{text}"


def _age(now: float, mtime: float) -> float:
    return round(max(0.0, now - mtime), 3)


def _fmt_age(age: float | None) -> str:
    if age is None:
        return "-"
    if age < 120:
        return f"{age:.1f}s"
    if age < 7200:
        return f"{age / 60:.1f}m"
    if age < 172800:
        return f"{age / 3600:.1f}h"
    return f"{age / 86400:.1f}d"


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _scan(path: str, with_mtime: bool) -> dict[str, float]:
    """Non-dot names in ``path`` -> mtime (0.0 when not asked); vanished files skipped."""
    out: dict[str, float] = {}
    with os.scandir(path) as it:
        for e in it:
            if e.name[0] == ".":
                continue
            if not with_mtime:
                out[e.name] = 0.0
                continue
            try:
                out[e.name] = e.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
    return out


# -- subcommands ---------------------------------------------------------------------------
def cmd_init(a: argparse.Namespace) -> int:
    queues = list(dict.fromkeys(a.queue))
    for q in queues:
        try:
            check_queue_dirname(q)
        except ValueError as e:
            raise UsageError(f"bad queue name: {e}") from None
    spool = Spool.create(a.dir, make_spoolable(queues))
    print(f"spool {spool.dir} ready with queues: {', '.join(queues)}")
    return 0


def queue_status(spool: Spool[Any, bytes]) -> dict[str, dict[str, Any]]:
    """Per queue: waiting entries, checkouts, age of the oldest waiting entry (None if empty)."""
    lay = Layout(spool.dir)
    now = time.time()
    out: dict[str, dict[str, Any]] = {}
    for q in spool.spoolable.queues:
        dn = str(q.value)
        waiting = _scan(lay.queue(dn), with_mtime=True)
        checkouts = _scan(lay.checkout(dn), with_mtime=False)
        oldest = _age(now, min(waiting.values())) if waiting else None
        out[dn] = {"entries": len(waiting), "checkouts": len(checkouts), "oldest_age": oldest}
    return out


def cmd_status(a: argparse.Namespace) -> int:
    st = queue_status(open_spool(a.dir))
    if a.json:
        print(json.dumps(st))
        return 0
    rows = [["QUEUE", "ENTRIES", "CHECKOUTS", "OLDEST"]]
    for dn, s in st.items():
        rows.append([dn, str(s["entries"]), str(s["checkouts"]), _fmt_age(s["oldest_age"])])
    _table(rows, sys.stdout)
    return 0


def cmd_ls(a: argparse.Namespace) -> int:
    spool = open_spool(a.dir)
    q = find_queue(spool, a.queue)
    lay = Layout(spool.dir)
    dn = str(q.value)
    now = time.time()
    where = lay.checkout(dn) if a.checkouts else lay.queue(dn)
    items: list[dict[str, Any]] = []
    for name, mtime in sorted(_scan(where, with_mtime=True).items()):
        try:
            raw = _fs.read_file(os.path.join(where, name))
        except FileNotFoundError:
            continue  # claimed, moved or removed since the listing
        try:
            size: int | None = os.lstat(lay.data_file(name)).st_size
        except FileNotFoundError:
            size = None
        fmt, value = show_metadata(raw)
        items.append(
            {"name": name, "age": _age(now, mtime), "size": size, "metadata_format": fmt, "metadata": value}
        )
    if a.json:
        print(json.dumps(items))
        return 0
    rows = [["NAME", "AGE", "SIZE", "METADATA"]]
    for it in items:
        size_s = "-" if it["size"] is None else str(it["size"])
        rows.append(
            [it["name"], _fmt_age(it["age"]), size_s, _metadata_text(it["metadata_format"], it["metadata"])]
        )
    _table(rows, sys.stdout)
    return 0


def cmd_enqueue(a: argparse.Namespace) -> int:
    spool = open_spool(a.dir)
    q = find_queue(spool, a.queue)
    try:
        value = msgspec.json.decode(a.metadata.encode("utf-8"))
    except msgspec.DecodeError as e:
        raise UsageError(f"--metadata is not valid JSON: {e}") from None
    raw = msgspec.msgpack.encode(value) if a.format == "msgpack" else a.metadata.encode("utf-8")
    if a.data is None:
        data = b""
    elif a.data == "-":
        data = sys.stdin.buffer.read()
    else:
        with open(a.data, "rb") as f:
            data = f.read()
    entry = spool.enqueue(q, raw, data)
    print(entry.name)
    return 0


def _limits(a: argparse.Namespace, spool: Spool[Any, bytes]) -> Limits:
    ages: dict[enum.Enum, float] = {}
    for item in a.max_age:
        qname, sep, dur = item.rpartition("=")
        if not sep or not qname:
            raise UsageError(f"--max-age wants QUEUE=DURATION, got {item!r}")
        try:
            ages[find_queue(spool, qname)] = parse_duration(dur)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--max-age {item}: {e}") from None
    return Limits(a.max_checked_out_age, a.max_tmp_file_age, ages)


def problem_json(p: Problem, now: float | None = None) -> dict[str, Any]:
    kind = {TooOld: "too_old", Orphaned: "orphaned", Duplicated: "duplicated"}[type(p)]
    out: dict[str, Any] = {"kind": kind, "file": p.file.filename, "mtime": p.file.mtime}
    if now is not None:
        out["age"] = _age(now, p.file.mtime)
    if isinstance(p, Duplicated):
        out["dirs"] = [d.name_on_disk for d in p.dirs]
    else:
        out["dir"] = p.dir.name_on_disk
    return out


def problem_text(p: Problem, now: float) -> str:
    age = _fmt_age(_age(now, p.file.mtime))
    if isinstance(p, TooOld):
        return f"too old: {p.dir.name_on_disk}/{p.file.filename} (age {age})"
    if isinstance(p, Orphaned):
        if p.dir == Dir.REGISTRY:
            return f"orphaned: {REGISTRY}/{p.file.filename} is in no queue (age {age})"
        return f"orphaned: {p.dir.name_on_disk}/{p.file.filename} has no registry file (age {age})"
    dirs = ", ".join(d.name_on_disk for d in p.dirs)
    return f"duplicated: {p.file.filename} is in {dirs}"


def cmd_fsck(a: argparse.Namespace) -> int:
    spool = open_spool(a.dir)
    monitor = Monitor(spool.dir, spool.spoolable, _limits(a, spool))
    problems = monitor.run_once()
    actions: list[str] = []
    if a.repair or a.dry_run:
        actions = repair(spool, monitor.limits, problems, dry_run=a.dry_run)
        if not a.dry_run:
            problems = monitor.run_once()
    now = time.time()
    if a.json:
        doc: Any = [problem_json(p, now) for p in problems]
        if a.repair or a.dry_run:
            doc = {"actions": actions, "dry_run": a.dry_run, "problems": doc}
        print(json.dumps(doc))
    else:
        for line in actions:
            print(line)
        for p in problems:
            print(problem_text(p, now))
        if not problems:
            print("no problems" if not actions or a.dry_run else "no problems left")
    return 1 if problems else 0


def cmd_recover(a: argparse.Namespace) -> int:
    spool = open_spool(a.dir)
    recovered = spool.recover_checkouts()
    removed = spool.clean_abandoned(older_than=a.older_than)
    if a.json:
        print(json.dumps({
            "recovered": [f"{e.queue.value}/{e.name}" for e in recovered],
            "removed_abandoned": removed,
        }))
        return 0
    for e in recovered:
        print(f"recovered {e.queue.value}/{e.name} (its owner died) back into {e.queue.value}")
    for name in removed:
        print(f"removed abandoned enqueue {name}")
    if not recovered and not removed:
        print("nothing to recover")
    return 0


def _stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """Set ``stop`` on SIGINT/SIGTERM; returns a function restoring the old handlers."""
    old: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, handler)

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


def event_json(ev: Start | End) -> dict[str, Any]:
    kind = "start" if isinstance(ev, Start) else "end"
    return {"event": kind, "time": ev.time, "problem": problem_json(ev.problem)}


def cmd_monitor(a: argparse.Namespace) -> int:
    spool = open_spool(a.dir)
    monitor = Monitor(spool.dir, spool.spoolable, _limits(a, spool))
    lock = threading.Lock()

    def emit(ev: Start | End) -> None:
        with lock:
            sys.stdout.write(json.dumps(event_json(ev)) + "\n")
            sys.stdout.flush()

    stop = threading.Event()
    restore = _stop_on_signals(stop)
    try:
        t = MonitorDaemon(a.check_every, a.alert_after_cycles).start(monitor, emit, stop)
        while t.is_alive():
            t.join(0.2)  # short joins: the main thread must run the signal handlers
    finally:
        stop.set()
        restore()
    return 0


class _Rates:
    """Arrivals and departures of names in one directory over a sliding window."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.names: set[str] | None = None
        self.samples: deque[tuple[float, int, int]] = deque()

    def update(self, names: set[str], now: float) -> tuple[float, float]:
        if self.names is not None:
            self.samples.append((now, len(names - self.names), len(self.names - names)))
        self.names = names
        while self.samples and self.samples[0][0] < now - self.window:
            self.samples.popleft()
        arrived = sum(s[1] for s in self.samples)
        left = sum(s[2] for s in self.samples)
        return arrived / self.window, left / self.window


def watch_table(spool: Spool[Any, bytes], rates: dict[str, _Rates], now: float) -> list[str]:
    lay = Layout(spool.dir)
    rows = [["QUEUE", "ENTRIES", "CHECKOUTS", "IN/S", "OUT/S"]]
    for q in spool.spoolable.queues:
        dn = str(q.value)
        try:
            names = set(_scan(lay.queue(dn), with_mtime=False))
            checkouts = len(_scan(lay.checkout(dn), with_mtime=False))
        except FileNotFoundError:
            rows.append([dn, "gone", "-", "-", "-"])
            continue
        r = rates.setdefault(dn, _Rates(rates["."].window))
        enq, deq = r.update(names, now)
        rows.append([dn, str(len(names)), str(checkouts), f"{enq:.1f}", f"{deq:.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]


def cmd_watch(a: argparse.Namespace) -> int:
    """Redraw the table in place on every filesystem event (at most 10 times a second) and
    at least once a second (rates decay); Ctrl-C or SIGTERM ends it with exit 0."""
    from ._watch import choose_observer, subscribe

    spool = open_spool(a.dir)
    if not a.window > 0:
        raise UsageError("--window must be positive")
    rates: dict[str, _Rates] = {".": _Rates(a.window)}
    out = sys.stdout
    if a.once:
        out.write("\n".join(watch_table(spool, rates, time.time())) + "\n")
        return 0
    lay = Layout(spool.dir)
    mode, reason = choose_observer(spool.dir, a.observer)
    wake = threading.Event()
    stop = threading.Event()
    restore = _stop_on_signals(stop)
    subs = []
    try:
        for q in spool.spoolable.queues:
            for d in (lay.queue(str(q.value)), lay.checkout(str(q.value))):
                subs.append(subscribe(d, wake.set, mode))
        out.write("\x1b[?25l")  # hide the cursor while redrawing
        while not stop.is_set():
            wake.clear()  # before listing: a change during the listing wakes us again
            lines = watch_table(spool, rates, time.time())
            header = f"multispool watch {spool.dir}  ({mode} observer; Ctrl-C to quit)"
            out.write("\x1b[H" + "".join(f"{x}\x1b[K\n" for x in [header, "", *lines]) + "\x1b[J")
            out.flush()
            wake.wait(1.0)
            stop.wait(0.1)  # at most 10 redraws a second however busy the spool is
    finally:
        for s in subs:
            s.close()
        restore()
        out.write("\x1b[?25h\n")
        out.flush()
    del reason
    return 0


# -- argument parsing ----------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _add_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-checked-out-age", type=parse_duration, default=600.0, metavar="DURATION",
                   help="a checkout older than this is a problem (default 10m)")
    p.add_argument("--max-tmp-file-age", type=parse_duration, default=600.0, metavar="DURATION",
                   help="a .tmp file older than this is a problem (default 10m)")
    p.add_argument("--max-age", action="append", default=[], metavar="QUEUE=DURATION",
                   help="an entry waiting in QUEUE longer than this is a problem (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, description="Inspect, check, repair and watch a multispool spool.",
                     formatter_class=fmt,
                     epilog="Durations: 90, 90s, 10m, 2h, 1d. Exit codes: 0 ok, 1 problems found, "
                            "2 usage or spool error.\nexample: multispool status /var/spool/app")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help_: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=fmt,
                           epilog=f"example:\n  {example}")
        p.add_argument("dir", metavar="DIR", help="the spool directory")
        return p

    p = add("init", "create a spool (or add queues to one)", "multispool init /tmp/sp --queue in --queue out")
    p.add_argument("--queue", action="append", required=True, help="a queue name (repeatable)")
    p.set_defaults(func=cmd_init)

    p = add("status", "entries, checkouts and oldest entry age per queue", "multispool status /tmp/sp --json")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = add("ls", "list the entries of a queue", "multispool ls /tmp/sp in --checkouts")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("--checkouts", action="store_true", help="list the queue's checked-out entries")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_ls)

    p = add("enqueue", "add an entry; prints its name",
            """multispool enqueue /tmp/sp in --metadata '{"n": 1}' --data payload.bin""")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("--metadata", required=True, metavar="JSON", help="the entry's metadata, as JSON")
    p.add_argument("--format", choices=("json", "msgpack"), default="json",
                   help="store the metadata as JSON (default) or MessagePack")
    p.add_argument("--data", metavar="FILE", help="data payload from FILE ('-': stdin); default empty")
    p.set_defaults(func=cmd_enqueue)

    p = add("fsck", "check a spool; exit 1 if there are problems",
            "multispool fsck /tmp/sp --max-age in=1h --repair --dry-run")
    _add_limits(p)
    p.add_argument("--repair", action="store_true",
                   help="fix what is safe to fix (dead checkouts, orphans, abandoned enqueues, "
                        "stale tmp files, duplicates), then check again")
    p.add_argument("--dry-run", action="store_true", help="say what --repair would do; change nothing")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_fsck)

    p = add("monitor", "check periodically; print problem start/end events as JSON lines",
            "multispool monitor /tmp/sp --check-every 5s --alert-after-cycles 2")
    _add_limits(p)
    p.add_argument("--check-every", type=parse_duration, default=15.0, metavar="DURATION",
                   help="time between checks (default 15s)")
    p.add_argument("--alert-after-cycles", type=int, default=2, metavar="N",
                   help="report a problem once seen in more than N consecutive checks (default 2)")
    p.set_defaults(func=cmd_monitor)

    p = add("recover", "return dead checkouts to their queues and remove abandoned enqueues",
            "multispool recover /tmp/sp --older-than 10m")
    p.add_argument("--older-than", type=parse_duration, default=600.0, metavar="DURATION",
                   help="only remove abandoned enqueues older than this (default 10m)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_recover)

    p = add("watch", "live view of queue depths and rates (Ctrl-C to quit)", "multispool watch /tmp/sp")
    p.add_argument("--once", action="store_true", help="print the table once and exit")
    p.add_argument("--observer", choices=("auto", "native", "polling"), default="auto",
                   help="how to watch for changes (default auto)")
    p.add_argument("--window", type=parse_duration, default=5.0, metavar="DURATION",
                   help="rates are averaged over this window (default 5s)")
    p.set_defaults(func=cmd_watch)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 problems, 2 error)."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 0
        return int(args.func(args))
    except UsageError as e:
        return _fail(str(e))
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
    except (SpoolError, OSError, ValueError) as e:
        return _fail(str(e))


def _fail(message: str) -> int:
    line = " ".join(message.split())  # one line, whatever the error's text holds
    if not line.startswith(PROG):
        line = f"{PROG}: error: {line}"
    sys.stderr.write(line + "\n")
    return 2


def run() -> NoReturn:
    """Console-script entry point."""
    sys.exit(main())
