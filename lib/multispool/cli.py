"""The ``multispool`` command line: inspect, check, repair and watch any spool.

It needs no user code: the queues are the spool's non-dot directories (in sorted order;
not the filesystem's ``lost+found`` of a spool at its root, see ``_queue_dirs``) and
metadata is handled as raw bytes, shown as JSON when it parses as JSON, else as
MessagePack when it decodes as such, else as base64 bytes.

Exit codes: 0 ok, 1 problems found (fsck; rm of a name it could not remove), 2 usage or
spool error (one line on stderr).

Names that are not valid UTF-8 (possible on POSIX filesystems) are shown, in text and in
JSON alike, with each undecodable byte written as the four characters ``\\xHH`` (Python's
``backslashreplace``), so JSON output is always valid UTF-8 (never a lone surrogate).
Command-line arguments take names as the filesystem holds them (the shell passes bytes).

Optional extras: ``multispool[metrics]`` (prometheus_client) for ``metrics`` and
``monitor --metrics-port``; ``multispool[progress]`` (rich) for progress bars on a terminal.
"""

from __future__ import annotations

import argparse
import base64
import enum
import heapq
import json
import keyword
import math
import os
import re
import signal
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import FrameType
from typing import Any, NoReturn, TextIO

import msgspec

from . import __version__, _fs, _lostfound, _schedule
from ._errors import SpoolError, _RecoveryRefused
from ._layout import CHECKOUT, REGISTRY, TMP, Dir, Layout, check_name, check_queue_dirname
from ._monitor import (
    DeadCheckout,
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
from ._sharedfs import TRUST_ENV
from ._spool import CheckedOutEntry, Spool, _Recovery
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
    d = float(m.group(1)) * _UNITS[m.group(2)] if m else math.inf
    if d == math.inf:  # no match, or too many digits for a float
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (examples: 90, 90s, 10m, 2h, 1d)")
    return d


def parse_port(text: str) -> int:
    """A TCP port number, 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"bad port {text!r} (0 to 65535; 0: any free port)")
    return port


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


def make_spoolable(
    dirnames: Sequence[str], file_mode: int = 0o600, dir_mode: int = 0o700
) -> Spoolable[Any, bytes]:
    return Spoolable(queues=queue_enum(dirnames), metadata_codec=RawCodec(), data=BytesData(),
                     file_mode=file_mode, dir_mode=dir_mode)


def spool_modes(spool_dir: str) -> tuple[int, int]:
    """(file_mode, dir_mode) for what the command line creates in an existing spool: the
    permissions of its ``.registry`` directory, and those without the execute and
    special bits for files. A spool its users share (``dir_mode=0o2770``,
    ``file_mode=0o660``) stays shared: an entry enqueued, a queue added, an item put
    aside by the command line is readable by them, not the operator's alone."""
    mode = stat.S_IMODE(os.stat(os.path.join(spool_dir, REGISTRY)).st_mode)
    return mode & 0o666, mode


def open_spool(spool_dir: str) -> Spool[Any, bytes]:
    """Load the spool at ``spool_dir`` with its queue directories (``_queue_dirs``) as queues."""
    if not os.path.isdir(spool_dir):
        if os.path.lexists(spool_dir):
            raise UsageError(f"{spool_dir}: not a directory")
        raise UsageError(f"{spool_dir}: no such directory")
    lay = Layout(spool_dir)
    if not (_fs.is_real_dir(lay.registry) and _fs.is_real_dir(lay.tmp)):
        raise UsageError(f"{spool_dir}: not a spool (no {REGISTRY} and {TMP})")
    queues = _queue_dirs(spool_dir)
    if not queues:
        raise UsageError(f"{spool_dir}: spool has no queue directories")
    return Spool.load(spool_dir, make_spoolable(queues, *spool_modes(spool_dir)))


def find_queue(spool: Spool[Any, bytes], name: str) -> enum.Enum:
    for q in spool.spoolable.queues:
        if q.value == name:
            return q
    names = ", ".join(str(q.value) for q in spool.spoolable.queues)
    raise UsageError(f"{spool.dir}: no such queue {name!r} (queues: {names})")


# Metadata nested deeper than this is shown as bytes: rendering it (``_clean``, JSON
# encoding) recurses once per level, and must stay far below the recursion limit.
MAX_NESTING = 200


def _nesting(value: Any) -> int:
    """How deeply lists and dicts nest in ``value`` (iteratively: no recursion)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            depth += 1
            deepest = max(deepest, depth)
            todo.extend((x, depth) for x in v)
    return deepest


def show_metadata(raw: bytes) -> tuple[str, Any]:
    """(format, JSON-able value): JSON if it parses, else MessagePack, else base64 bytes.
    Metadata nested too deeply to decode or render (a corrupt or hostile entry: the
    decoders raise RecursionError) is shown as bytes."""
    try:
        value = msgspec.json.decode(raw)
        if _nesting(value) <= MAX_NESTING:
            return "json", value
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        value = msgspec.msgpack.decode(raw)
        value = msgspec.json.decode(msgspec.json.encode(value))  # bytes -> base64 str
        if _nesting(value) <= MAX_NESTING:
            return "msgpack", value
    except (msgspec.DecodeError, TypeError, msgspec.EncodeError, RecursionError):
        pass
    return "bytes", base64.b64encode(raw).decode("ascii")


def _metadata_text(fmt: str, value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text if fmt == "json" else f"{fmt}:{text}"


def _utf8(name: str) -> str:
    """``name`` as valid UTF-8: undecodable bytes (held as lone surrogates by Python's
    filesystem decoding) become ``\\xHH``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return name


# C0 and C1 controls and DEL. Names come from a directory anyone with write access to the
# spool can fill: printed as they are, an escape sequence drives the operator's terminal
# and a newline forges output lines.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _escape(m: re.Match[str]) -> str:
    return f"\\x{ord(m.group()):02x}"


def disp(name: str, *, lines: bool = False) -> str:
    """``name`` safe to print on a terminal: valid UTF-8 (see ``_utf8``), and every
    control character shown as ``\\xHH``, newlines and tabs too unless ``lines`` (for a
    text that is meant to span lines, such as an entry's data)."""
    return (_CONTROL_BUT_LINES if lines else _CONTROL).sub(_escape, _utf8(name))


def _clean(obj: Any) -> Any:
    """``obj`` with every str made valid UTF-8 (keys included); JSON escapes the rest."""
    if isinstance(obj, str):
        return _utf8(obj)
    if isinstance(obj, dict):
        return {_utf8(k) if isinstance(k, str) else k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """JSON text of ``obj``, always valid UTF-8 (see ``_utf8``)."""
    return json.dumps(_clean(obj))


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
    rows = [[disp(c) for c in r] for r in rows]
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


# -- progress on a terminal -------------------------------------------------------------
class Progress:
    """A progress bar on stderr for an operation over ``total`` items, drawn with rich
    (the optional ``progress`` extra) only when stderr is a terminal and only once the
    operation has run for a second: short runs and pipes stay silent. Without rich, a
    plain one-line counter is redrawn on the terminal instead.

    rich because it is well kept, draws correctly on every terminal (and Windows'),
    handles resizes, and its Progress is a few lines to drive; it stays optional so
    that the library never depends on it."""

    DELAY = 1.0

    def __init__(self, description: str, total: int | None, stream: TextIO | None = None) -> None:
        self.description = description
        self.total = total
        self.done = 0
        self._stream = sys.stderr if stream is None else stream
        self._tty = _isatty(self._stream)
        self._started = time.monotonic()
        self._last = 0.0
        self._rich: Any = None
        self._task: Any = None
        self._plain = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self._tty:
            return
        now = time.monotonic()
        if now - self._started < self.DELAY or now - self._last < 0.1:
            return
        self._last = now
        if self._rich is None and not self._plain:
            self._start()
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done)
        else:
            of = f"/{self.total}" if self.total is not None else ""
            self._stream.write(f"\r{self.description}: {self.done}{of}\x1b[K")
            self._stream.flush()

    def _start(self) -> None:
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        except ImportError:
            self._plain = True
            return
        self._rich = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=Console(file=self._stream), transient=True,
        )
        self._rich.start()
        self._task = self._rich.add_task(self.description, total=self.total, completed=self.done)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        elif self._plain:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._plain = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# -- subcommands ---------------------------------------------------------------------------
def _queue_dirs(spool_dir: str) -> list[str]:
    """The spool's queues: its non-dot directories, but for the filesystem's lost+found
    (a spool at the root of a filesystem), which is none."""
    with os.scandir(spool_dir) as it:
        return sorted(
            e.name for e in it
            if e.name[0] != "." and e.is_dir(follow_symlinks=False)
            and not _lostfound.is_fs_lost_found(spool_dir, e.name)
        )


def cmd_init(a: argparse.Namespace) -> int:
    queues = list(dict.fromkeys(a.queue))
    for q in queues:
        try:
            check_queue_dirname(q)
        except ValueError as e:
            raise UsageError(f"bad queue name: {e}") from None
    existed = set(_queue_dirs(a.dir)) if os.path.isdir(a.dir) else set()
    modes = spool_modes(a.dir) if _fs.is_real_dir(os.path.join(a.dir, REGISTRY)) else ()
    spool = Spool.create(a.dir, make_spoolable(queues, *modes))
    every = _queue_dirs(spool.dir)
    added = [q for q in queues if q not in existed]
    if existed:
        note = f" (added: {', '.join(added)})" if added else " (nothing added)"
        print(f"spool {disp(spool.dir)} ready with queues: {', '.join(map(disp, every))}{note}")
    else:
        print(f"spool {disp(spool.dir)} ready with queues: {', '.join(map(disp, every))}")
    return 0


def queue_status(spool: Spool[Any, bytes]) -> dict[str, dict[str, Any]]:
    """Per queue: waiting entries, checkouts, delayed entries, age of the oldest waiting
    entry (None if empty). Only registered names count: a file with no registry file is
    an orphan (``fsck`` reports it), not an entry."""
    lay = Layout(spool.dir)
    now = time.time()
    registered = set(_scan(lay.registry, with_mtime=False))
    out: dict[str, dict[str, Any]] = {}
    for q in spool.spoolable.queues:
        dn = str(q.value)
        waiting = {n: m for n, m in _scan(lay.queue(dn), with_mtime=True).items() if n in registered}
        checkouts = [n for n in _scan(lay.checkout(dn), with_mtime=False) if n in registered]
        oldest = _age(now, min(waiting.values())) if waiting else None
        out[dn] = {
            "entries": len(waiting),
            "checkouts": len(checkouts),
            "delayed": count_delayed(spool, q, waiting, now),
            "oldest_age": oldest,
        }
    return out


def count_delayed(spool: Spool[Any, bytes], queue: enum.Enum, names: Iterable[str], now: float) -> int:
    """How many of ``names`` (waiting in ``queue``) are not due yet: a registry file's
    size (one lstat) says whether it holds a schedule record, read only then."""
    del queue
    lay = Layout(spool.dir)
    n = 0
    for name in names:
        reg = lay.registry_file(name)
        try:
            st = os.lstat(reg)
            # Only a regular file holds a record: junk planted there (a symlink, never
            # followed, a FIFO, a directory) is nobody's schedule.
            if stat.S_ISREG(st.st_mode) and st.st_size and _schedule.read_path(reg).due > now:
                n += 1
        except FileNotFoundError:
            continue  # gone since the listing
    return n


def _fmt_due(now: float, due: float | None) -> str:
    return "-" if due is None else "in " + _fmt_age(due - now)


def cmd_status(a: argparse.Namespace) -> int:
    st = queue_status(open_spool(a.dir))
    if a.json:
        print(dumps(st))
        return 0
    rows = [["QUEUE", "ENTRIES", "CHECKOUTS", "DELAYED", "OLDEST"]]
    for dn, s in st.items():
        counts = [str(s["entries"]), str(s["checkouts"]), str(s["delayed"])]
        rows.append([dn, *counts, _fmt_age(s["oldest_age"])])
    _table(rows, sys.stdout)
    _print_lost_found_note(a.dir)
    return 0


def _print_lost_found_note(spool_dir: str) -> None:
    """One line when repair has put something aside in ``.lost+found`` (never data lost:
    a person decides; see ``multispool lost+found``)."""
    n = len(_lostfound.items(spool_dir))
    if n:
        print(f"{n} item{'s' if n != 1 else ''} in .lost+found (repair kept them aside: "
              f"multispool lost+found {disp(spool_dir)})")


def cmd_lost_found(a: argparse.Namespace) -> int:
    """List ``.lost+found`` items (their files and sizes), or put one back into a queue
    as a new entry with ``ITEM --to QUEUE``."""
    spool = open_spool(a.dir)
    if a.item is not None:
        if a.to is None:
            raise UsageError(f"{PROG} lost+found: ITEM needs --to QUEUE")
        e = _lostfound.requeue(spool, a.item, find_queue(spool, a.to))
        print(f"requeued {disp(a.item)} into {disp(str(e.queue.value))} as {disp(e.name)}")
        return 0
    root = os.path.join(spool.dir, ".lost+found")
    items = {}
    for item in _lostfound.items(spool.dir):
        d = os.path.join(root, item)
        try:
            files = {f: os.lstat(os.path.join(d, f)).st_size for f in sorted(os.listdir(d))}
        except OSError:
            continue
        items[item] = files
    if a.json:
        print(dumps(items))
        return 0
    for item, files in items.items():
        print(f"{disp(item)}: " + ", ".join(f"{disp(f)} ({n} bytes)" for f, n in files.items()))
    if not items:
        print("nothing in .lost+found")
    return 0


def _ls_names(where: str, a: argparse.Namespace) -> Iterator[str]:
    """Entry names of ``where``: sorted (one getdents pass, no stat, before the first
    line), or with ``--unsorted`` in directory order, streamed as the kernel lists them."""
    if a.unsorted:
        with os.scandir(where) as it:
            for e in it:
                if e.name[0] != ".":
                    yield e.name
        return
    names = [n for n in os.listdir(where) if n[0] != "."]
    if a.limit is not None and a.limit < len(names) // 8:
        yield from heapq.nsmallest(a.limit, names)
    else:
        names.sort()
        yield from names


def ls_items(spool: Spool[Any, bytes], queue: enum.Enum, a: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The entries of ``queue`` (or its checkouts), one dict each, read one at a time."""
    lay = Layout(spool.dir)
    dn = str(queue.value)
    where = lay.checkout(dn) if a.checkouts else lay.queue(dn)
    n = 0
    for name in _ls_names(where, a):
        if a.limit is not None and n >= a.limit:
            return
        path = os.path.join(where, name)
        try:
            st = os.lstat(path)
            raw = _fs.read_file(path)
        except FileNotFoundError:
            continue  # claimed, moved or removed since the listing
        except OSError as e:
            sys.stderr.write(f"{PROG}: warning: {disp(path)}: {e.strerror}\n")
            continue
        try:
            size: int | None = os.lstat(lay.data_file(name)).st_size
        except FileNotFoundError:
            size = None
        sched = _schedule.NOW
        reg = lay.registry_file(name)
        try:
            reg_st = os.lstat(reg)
            if not stat.S_ISREG(reg_st.st_mode):
                # A symlink (never followed), FIFO or directory planted there: no record,
                # and no reader can ever claim this entry.
                sys.stderr.write(f"{PROG}: warning: {disp(reg)}: not a regular file\n")
            elif reg_st.st_size:  # empty: never delayed nor retried, nothing to read
                sched = _schedule.read_path(reg)
        except FileNotFoundError:
            pass
        fmt, value = show_metadata(raw)
        now = time.time()
        n += 1
        yield {"name": name, "age": _age(now, st.st_mtime), "due": sched.due if sched.due > now else None,
               "attempts": sched.attempts, "size": size, "metadata_format": fmt, "metadata": value}


def cmd_ls(a: argparse.Namespace) -> int:
    """Stream: each entry is printed as soon as it is read, so ``ls | head`` returns at
    once whatever the queue's size (``--unsorted`` also skips the sort of the names)."""
    spool = open_spool(a.dir)
    q = find_queue(spool, a.queue)
    if a.limit is not None and a.limit < 0:
        raise UsageError("--limit must be >= 0")
    out = sys.stdout
    items = ls_items(spool, q, a)
    if a.json:
        sep = "[\n"
        for it in items:
            out.write(sep + dumps(it))
            out.flush()
            sep = ",\n"
        out.write("[]\n" if sep == "[\n" else "\n]\n")
        return 0
    out.write("NAME  AGE  DUE  ATTEMPTS  SIZE  METADATA\n")
    for it in items:
        size_s = "-" if it["size"] is None else str(it["size"])
        meta = _metadata_text(it["metadata_format"], it["metadata"])
        sched = f"{_fmt_due(time.time(), it['due'])}  {it['attempts']}"
        out.write(f"{disp(it['name'])}  {_fmt_age(it['age'])}  {sched}  {size_s}  {disp(meta)}\n")
        out.flush()
    return 0


def _find_entry(spool: Spool[Any, bytes], name: str, queue: enum.Enum | None) -> tuple[enum.Enum, bool]:
    """Where ``name`` is: (queue, checked_out), searching ``queue`` or every queue."""
    lay = Layout(spool.dir)
    queues = list(spool.spoolable.queues) if queue is None else [queue]
    for q in queues:
        if os.path.lexists(lay.queue_file(str(q.value), name)):
            return q, False
    for q in queues:
        if os.path.lexists(lay.checkout_file(str(q.value), name)):
            return q, True
    where = "any queue" if queue is None else f"queue {queue.value!r}"
    raise UsageError(f"{disp(spool.dir)}: no entry {disp(name)!r} in {where}")


def _name_arg(name: str) -> str:
    try:
        return check_name(name)
    except SpoolError as e:
        raise UsageError(str(e)) from None


def cmd_show(a: argparse.Namespace) -> int:
    """Read-only: the metadata and data of one entry, waiting or checked out (reading a
    live checkout changes nothing, so no lock is taken)."""
    spool = open_spool(a.dir)
    q = find_queue(spool, a.queue)
    name = _name_arg(a.name)
    lay = Layout(spool.dir)
    dn = str(q.value)
    raw = None
    state = ""
    for where, path in (("waiting", lay.queue_file(dn, name)), ("checked out", lay.checkout_file(dn, name))):
        try:
            raw = _fs.read_file(path)
        except FileNotFoundError:
            continue
        state = where
        break
    if raw is None:
        raise UsageError(f"{disp(spool.dir)}: no entry {disp(name)!r} in queue {disp(dn)!r}")
    data_path = lay.data_file(name)
    if a.data_only:
        try:
            fd = os.open(data_path, _fs.O_READ)
        except FileNotFoundError:
            raise UsageError(f"{disp(data_path)}: entry has no data file") from None
        try:
            out = sys.stdout.buffer
            while chunk := os.read(fd, 1 << 20):
                out.write(chunk)
            out.flush()
        finally:
            os.close(fd)
        return 0
    try:
        data: bytes | None = _fs.read_file(data_path)
    except FileNotFoundError:
        data = None
    fmt, value = show_metadata(raw)
    doc: dict[str, Any] = {"name": name, "queue": dn, "state": state, "metadata_format": fmt,
                           "metadata": value, "size": None if data is None else len(data)}
    if data is not None:
        try:
            doc["data"], doc["data_encoding"] = data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            doc["data"], doc["data_encoding"] = base64.b64encode(data).decode("ascii"), "base64"
    if a.json:
        print(dumps(doc))
        return 0
    print(f"name:     {disp(name)}\nqueue:    {disp(dn)} ({state})")
    print(f"metadata: {disp(_metadata_text(fmt, value))}")
    if data is None:
        print("data:     (no data file)")
    else:
        print(f"data:     {len(data)} bytes, {doc['data_encoding']} (--data-only for the raw bytes)")
        print(disp(doc["data"], lines=True))
    return 0


def _claim(
    spool: Spool[Any, bytes], q: enum.Enum, name: str, checked_out: bool, dead_after: float | None = None
) -> CheckedOutEntry[Any, bytes]:
    """Check ``name`` out of ``q`` the way the library does (its owner lock held until
    the caller saves or removes it). A dead process's checkout is first put back into
    its queue by the library's recovery (``dead_after`` as for ``recover``); a live
    one's is never touched."""
    dn = str(q.value)
    lay = Layout(spool.dir)
    if checked_out:
        r = _recovery(spool, dead_after).recover(q, name)
        where = f"{disp(dn)}/{CHECKOUT}/{disp(name)}"
        if r.error is not None:
            raise UsageError(f"{where}: cannot recover it: {r.error}")
        if os.path.lexists(lay.checkout_file(dn, name)):
            younger = "" if dead_after is None else " (or was checked out less than --dead-after ago)"
            raise UsageError(f"{where} is checked out by a live process{younger}: left alone")
    co = spool._claim(q, name)
    if co is None:
        present = any(map(os.path.lexists, (lay.checkout_file(dn, name), lay.queue_file(dn, name))))
        if present and not os.path.lexists(lay.registry_file(name)):
            raise UsageError(f"{disp(dn)}/{disp(name)} has no registry file (an orphan, see fsck): left")
        if present:
            raise UsageError(f"{disp(dn)}/{disp(name)} is held by a live process: left alone")
        raise UsageError(f"{disp(spool.dir)}: no entry {disp(name)!r} in queue {disp(dn)!r}")
    return co


def cmd_mv(a: argparse.Namespace) -> int:
    """Move any entry (quarantined or dead-lettered included) into ``--to``, under its
    owner lock: checked out, then saved into the new queue, as a consumer would."""
    spool = open_spool(a.dir)
    dst = find_queue(spool, a.to)
    name = _name_arg(a.name)
    src = None if a.queue is None else find_queue(spool, a.queue)
    q, checked_out = _find_entry(spool, name, src)
    if q == dst and not checked_out:
        print(f"{disp(name)} is already in {disp(str(dst.value))}")
        return 0
    co = _claim(spool, q, name, checked_out, a.dead_after)
    try:
        co.save(dst)
    except BaseException as e:
        co._release_after(e, let_go=True)
        raise
    print(f"moved {disp(str(q.value))}/{disp(name)} to {disp(str(dst.value))}")
    return 0


def _remove(co: CheckedOutEntry[Any, bytes]) -> None:
    """``co.remove()``; if it raises before the entry is gone (Ctrl-C between the claim
    and the removal included), the entry goes back unchanged into its queue instead of
    staying checked out by a process about to exit (a dead checkout)."""
    try:
        co.remove()
    except BaseException as e:
        co._release_after(e, let_go=True)  # nothing if the removal ended; else back into its queue
        raise


def cmd_rm(a: argparse.Namespace) -> int:
    """Remove entries of QUEUE under their owner locks; a name that cannot be removed
    (absent, held by a live process, or an error on its files: a directory planted at
    its data or registry name...) is reported on stderr, is left whole, and makes the
    exit code 1; the other names are removed. A name that cannot be an entry's is a
    usage error, before anything is removed."""
    spool = open_spool(a.dir)
    q = find_queue(spool, a.queue)
    dn = str(q.value)
    names = [_name_arg(n) for n in a.names]  # a name that is no name: nothing removed
    failed = 0
    for name in names:
        try:
            _remove(_claim(spool, q, name, checked_out=False))
        except (UsageError, SpoolError, OSError) as e:
            failed += 1
            sys.stderr.write(f"{PROG}: {disp(' '.join(str(e).split()))}\n")
            continue
        print(f"removed {disp(dn)}/{disp(name)}")
    return 1 if failed else 0


def cmd_purge(a: argparse.Namespace) -> int:
    """Remove every waiting entry of QUEUE (``--yes`` required), each under its owner
    lock; entries held by a live process (checked out or being claimed) are left. An
    entry that cannot be removed for an error (unreadable, a directory planted at its
    data or registry name...) is reported on stderr naming the file, and left whole;
    purge goes on with the others and exits 1."""
    spool = open_spool(a.dir)
    q = find_queue(spool, a.queue)
    dn = str(q.value)
    lay = Layout(spool.dir)
    names = [n for n in os.listdir(lay.queue(dn)) if n[0] != "."]
    if not a.yes:
        raise UsageError(f"purge removes the {len(names)} entries of {disp(dn)}: add --yes to confirm")
    removed = skipped = failed = 0
    with Progress(f"purging {disp(dn)}", len(names)) as bar:
        for name in names:
            try:
                co = spool._claim(q, name)
                if co is None:
                    if os.path.lexists(lay.queue_file(dn, name)):
                        skipped += 1
                    continue
                _remove(co)
                removed += 1
            except (SpoolError, OSError) as e:
                # This entry's trouble (it is left whole): the others are still purged.
                skipped += 1
                failed += 1
                sys.stderr.write(f"{PROG}: warning: {disp(' '.join(str(e).split()))}\n")
            finally:
                bar.advance()
    if a.json:
        print(dumps({"removed": removed, "skipped": skipped}))
    else:
        tail = f" ({skipped} left: held by a live process or unreadable)" if skipped else ""
        print(f"purged {removed} entries from {disp(dn)}{tail}")
    return 1 if failed else 0


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
    entry = spool.enqueue(q, raw, data, delay=a.delay)
    print(disp(entry.name))
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
    kinds = {TooOld: "too_old", Orphaned: "orphaned", Duplicated: "duplicated", DeadCheckout: "dead_checkout"}
    out: dict[str, Any] = {"kind": kinds[type(p)], "file": p.file.filename, "mtime": p.file.mtime}
    if now is not None:
        out["age"] = _age(now, p.file.mtime)
    if isinstance(p, Duplicated):
        out["dirs"] = [d.name_on_disk for d in p.dirs]
    else:
        out["dir"] = p.dir.name_on_disk
    return out


def problem_text(p: Problem, now: float) -> str:
    age = _fmt_age(_age(now, p.file.mtime))
    f = disp(p.file.filename)
    if isinstance(p, TooOld):
        return f"too old: {p.dir.name_on_disk}/{f} (age {age})"
    if isinstance(p, Orphaned):
        if p.dir == Dir.REGISTRY:
            return f"orphaned: {REGISTRY}/{f} is in no queue (age {age})"
        return f"orphaned: {p.dir.name_on_disk}/{f} has no registry file (age {age})"
    if isinstance(p, DeadCheckout):
        return (f"dead checkout: {p.dir.name_on_disk}/{f} (its owner died; --repair or recover puts it back "
                "if its metadata can be decoded)")
    dirs = ", ".join(d.name_on_disk for d in p.dirs)
    return f"duplicated: {f} is in {dirs}"


class Activity:
    """A spinner on stderr for a step whose length is unknown (a whole-spool check),
    shown only on a terminal and only once the step has run for a second. rich (the
    optional ``progress`` extra) draws it; without rich, one plain line is shown."""

    def __init__(self, description: str, stream: TextIO | None = None) -> None:
        self.description = description
        self._stream = sys.stderr if stream is None else stream
        self._lock = threading.Lock()
        self._shown: Any = None
        self._closed = False
        self._timer: threading.Timer | None = None
        if _isatty(self._stream):
            self._timer = threading.Timer(Progress.DELAY, self._show)
            self._timer.daemon = True

    def __enter__(self) -> Activity:
        if self._timer is not None:
            self._timer.start()
        return self

    def _show(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                from rich.console import Console
            except ImportError:
                self._stream.write(f"{self.description} ...")
                self._stream.flush()
                self._shown = True
                return
            self._shown = Console(file=self._stream).status(self.description)
            self._shown.start()

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        with self._lock:
            self._closed = True
            if self._shown is True:
                self._stream.write("\r\x1b[K")
                self._stream.flush()
            elif self._shown is not None:
                self._shown.stop()


def cmd_fsck(a: argparse.Namespace) -> int:
    if a.dead_after is not None and not (a.repair or a.dry_run):
        raise UsageError(f"{PROG} fsck: --dead-after applies to --repair (or --dry-run) only")
    spool = open_spool(a.dir)
    monitor = Monitor(spool.dir, spool.spoolable, _limits(a, spool))
    with Activity(f"checking {disp(spool.dir)}"):
        problems = monitor.run_once()
    actions: list[str] = []
    if a.repair or a.dry_run:
        with Activity(f"repairing {len(problems)} problems"):
            actions = repair(spool, monitor.limits, problems, dry_run=a.dry_run,
                             dead_after=a.dead_after, unproven=monitor._unproven)
            if not a.dry_run:
                problems = monitor.run_once()
    now = time.time()
    if a.json:
        doc: Any = [problem_json(p, now) for p in problems]
        if a.repair or a.dry_run:
            doc = {"actions": actions, "dry_run": a.dry_run, "problems": doc}
        print(dumps(doc))
    else:
        for line in actions:
            print(disp(line))
        for p in problems:
            print(problem_text(p, now))
        if not problems:
            print("no problems" if not actions or a.dry_run else "no problems left")
        _print_unproven(spool, monitor._unproven, now)
        _print_lost_found_note(spool.dir)
    return 1 if problems else 0


def _print_unproven(spool: Spool[Any, bytes], unproven: list[DeadCheckout], now: float) -> None:
    """Checkouts whose owner lock is free through this mount, on a filesystem where that
    does not prove their owner died. Not problems (exit 0): a checkout held through
    another mount or client looks just the same from here."""
    for p in unproven:
        print(f"unproven dead checkout: {p.dir.name_on_disk}/{disp(p.file.filename)} "
              f"(age {_fmt_age(_age(now, p.file.mtime))}): its owner lock is free through this mount")
    if unproven:
        print(f"note: that proves nothing here: {spool._fs_facts().reason}; "
              "recover --dead-after DURATION (or fsck --repair --dead-after DURATION) puts back "
              "the checkouts older than DURATION")


def _recovery(spool: Spool[Any, bytes], dead_after: float | None) -> _Recovery[Any, bytes]:
    """The library's recovery run (see ``_spool._Recovery``); where the spool's filesystem
    does not let a free owner lock prove its owner died and no ``--dead-after`` was given,
    a UsageError naming the spool and the remedies, before anything is touched."""
    try:
        return _Recovery(spool, dead_after)
    except _RecoveryRefused as e:
        raise UsageError(
            f"{disp(spool.dir)}: recovery refused, nothing moved: {e.reason}, so a free owner lock "
            f"does not prove that its owner died; pass --dead-after DURATION (an age no live checkout "
            f"reaches) or set {TRUST_ENV}=1 if every process uses this one mount"
        ) from None


def cmd_recover(a: argparse.Namespace) -> int:
    """One summary line; with ``-v`` also one line per entry. The checkouts are
    recovered one by one (each under its owner lock) by the library's recovery run, with
    a progress bar on a terminal. An entry that could not be read or moved is logged,
    left in place, and makes the exit code 1."""
    spool = open_spool(a.dir)
    run = _recovery(spool, a.dead_after)
    todo = list(run.checkouts())
    recovered: list[str] = []
    failed = 0
    verbose = a.verbose and not a.json
    with Progress("recovering dead checkouts", len(todo)) as bar:
        for q, name in todo:
            r = run.recover(q, name)
            dn = str(q.value)
            if r.moved:
                recovered.append(f"{dn}/{name}")
                if verbose:
                    print(f"recovered {disp(dn)}/{disp(name)} (its owner died) back into {disp(dn)}")
            elif r.error is not None:
                failed += 1
            bar.advance()
    with Activity("removing abandoned enqueues"):
        removed = spool.clean_abandoned(older_than=a.older_than)
    if a.json:
        print(dumps({"recovered": recovered, "removed_abandoned": removed}))
        return 1 if failed else 0
    if verbose:
        for name in removed:
            print(f"removed abandoned enqueue {disp(name)}")
    tail = f"; {failed} could not be recovered (see the warnings above)" if failed else ""
    if not recovered and not removed:
        print(f"nothing to recover{tail}")
    else:
        print(f"recovered {len(recovered)} dead checkouts, removed {len(removed)} abandoned enqueues{tail}")
    return 1 if failed else 0


def _stop_on_signals(stop: threading.Event, *also: threading.Event) -> Callable[[], None]:
    """Set ``stop`` (and the events ``also``, to end a wait at once) on SIGINT/SIGTERM;
    returns a function restoring the old handlers."""
    old: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()
        for ev in also:
            ev.set()

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


class _LatestMonitor(Monitor):
    """A Monitor that keeps its last check's problems (for the metrics endpoint)."""

    latest: list[Problem] = []  # noqa: RUF012 - replaced, never mutated

    def run_once(self) -> list[Problem]:
        problems = super().run_once()
        self.latest = problems
        return problems


def cmd_monitor(a: argparse.Namespace) -> int:
    spool = open_spool(a.dir)
    monitor = _LatestMonitor(spool.dir, spool.spoolable, _limits(a, spool))
    lock = threading.Lock()
    server: Any = None
    server_thread: threading.Thread | None = None
    if a.metrics_port is not None:
        prom = _prometheus()
        registry = prom.CollectorRegistry(auto_describe=False)
        registry.register(SpoolCollector(spool, lambda: monitor.latest))
        server, server_thread = prom.start_http_server(a.metrics_port, addr=a.metrics_addr, registry=registry)
        host, port = server.server_address[:2]
        sys.stderr.write(f"{PROG}: serving metrics on http://{host}:{port}/metrics\n")
        sys.stderr.flush()

    def emit(ev: Start | End) -> None:
        with lock:
            sys.stdout.write(dumps(event_json(ev)) + "\n")
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
        if server is not None:
            server.shutdown()
            server.server_close()
            if server_thread is not None:
                server_thread.join()
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
        return self.rates(now)

    def add(self, now: float, arrived: int, left: int) -> tuple[float, float]:
        self.samples.append((now, arrived, left))
        return self.rates(now)

    def rates(self, now: float) -> tuple[float, float]:
        while self.samples and self.samples[0][0] < now - self.window:
            self.samples.popleft()
        arrived = sum(s[1] for s in self.samples)
        left = sum(s[2] for s in self.samples)
        return arrived / self.window, left / self.window


class QueueView:
    """A running view of one queue: one listing per refresh (names only), an lstat only
    for names that arrived since the last one (their mtimes give OLDEST), rates from the
    difference of two listings. A refresh costs one getdents pass over the queue."""

    def __init__(self, spool: Spool[Any, bytes], queue: enum.Enum, window: float) -> None:
        lay = Layout(spool.dir)
        self.name = str(queue.value)
        self.path = lay.queue(self.name)
        self.checkout_path = lay.checkout(self.name)
        self.names: set[str] | None = None
        self.mtimes: dict[str, float] = {}
        self.rates = _Rates(window)
        self.row: dict[str, Any] = {}

    def refresh(self, now: float) -> dict[str, Any]:
        try:
            names = {n for n in os.listdir(self.path) if n[0] != "."}
            checkouts = sum(1 for n in os.listdir(self.checkout_path) if n[0] != ".")
        except FileNotFoundError:
            self.row = {"queue": self.name, "gone": True}
            return self.row
        old = self.names if self.names is not None else set()
        arrived = names - old
        left = old - names
        for n in left:
            self.mtimes.pop(n, None)
        for n in arrived:
            try:
                self.mtimes[n] = os.lstat(os.path.join(self.path, n)).st_mtime
            except FileNotFoundError:
                names.discard(n)
        first = self.names is None
        self.names = names
        enq, deq = self.rates.rates(now) if first else self.rates.add(now, len(arrived), len(left))
        oldest = _age(time.time(), min(self.mtimes.values())) if self.mtimes else None
        self.row = {"queue": self.name, "entries": len(names), "checkouts": checkouts,
                    "oldest_age": oldest, "in_per_s": round(enq, 1), "out_per_s": round(deq, 1)}
        return self.row


def watch_rows(views: list[QueueView]) -> list[list[str]]:
    rows = [["QUEUE", "ENTRIES", "CHECKOUTS", "IN/S", "OUT/S", "OLDEST"]]
    for v in views:
        r = v.row
        if r.get("gone"):
            rows.append([disp(v.name), "gone", "-", "-", "-", "-"])
        else:
            rows.append([disp(v.name), str(r["entries"]), str(r["checkouts"]), f"{r['in_per_s']:.1f}",
                         f"{r['out_per_s']:.1f}", _fmt_age(r["oldest_age"])])
    return rows


def watch_table(spool: Spool[Any, bytes], rates: dict[str, _Rates], now: float) -> list[str]:
    """The table once (``watch --once``)."""
    views = [QueueView(spool, q, rates["."].window) for q in spool.spoolable.queues]
    for v in views:
        v.refresh(now)
    return _aligned(watch_rows(views))


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]


# A refresh may use at most this share of one core (its own CPU time decides when the
# next one may run), so a deep queue is re-listed less often rather than costing more.
WATCH_CPU_BUDGET = 0.02


def cmd_watch(a: argparse.Namespace) -> int:
    """Refresh on filesystem events (arrivals in a queue) and at least every
    ``--interval`` (departures, checkouts), never more often than the CPU budget allows:
    a refresh that cost c seconds of CPU is followed by a pause of at least c / 2 %.
    On a terminal the table is redrawn in place; otherwise a plain line per queue is
    printed whenever its numbers change. Ctrl-C or SIGTERM ends it with exit 0."""
    from ._watch import choose_observer, subscribe

    spool = open_spool(a.dir)
    if not a.window > 0:
        raise UsageError("--window must be positive")
    if not a.interval > 0:
        raise UsageError("--interval must be positive")
    out = sys.stdout
    if a.once:
        rates: dict[str, _Rates] = {".": _Rates(a.window)}
        out.write("\n".join(watch_table(spool, rates, time.time())) + "\n")
        return 0
    tty = _isatty(out)
    views = [QueueView(spool, q, a.window) for q in spool.spoolable.queues]
    mode, _ = choose_observer(spool.dir, a.observer)
    wake = threading.Event()
    stop = threading.Event()
    restore = _stop_on_signals(stop, wake)
    subs = []
    printed: dict[str, tuple[Any, ...]] = {}
    try:
        # Arrivals only: a consumer's claims (renames out) would wake us thousands of
        # times a second while a backlog drains; departures are seen at the next refresh.
        for v in views:
            subs.append(subscribe(v.path, wake.set, mode, departures=False))
        if tty:
            out.write("\x1b[?25l")  # hide the cursor while redrawing
        while not stop.is_set():
            wake.clear()  # before listing: a change during the listing wakes us again
            cpu = time.thread_time()
            now = time.time()
            for v in views:
                v.refresh(now)
            cost = time.thread_time() - cpu
            if tty:
                header = f"multispool watch {disp(spool.dir)}  ({mode} observer; Ctrl-C to quit)"
                lines = [header, "", *_aligned(watch_rows(views))]
                out.write("\x1b[H" + "".join(f"{x}\x1b[K\n" for x in lines) + "\x1b[J")
            else:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
                for v in views:
                    r = v.row
                    key = (r.get("entries"), r.get("checkouts"), r.get("gone"))
                    if printed.get(v.name) == key:
                        continue
                    printed[v.name] = key
                    if r.get("gone"):
                        out.write(f"{stamp} {disp(v.name)} gone\n")
                    else:
                        out.write(f"{stamp} {disp(v.name)} entries={r['entries']} checkouts={r['checkouts']} "
                                  f"oldest={_fmt_age(r['oldest_age'])} in/s={r['in_per_s']:.1f} "
                                  f"out/s={r['out_per_s']:.1f}\n")
            out.flush()
            # Waits clamped to threading.TIMEOUT_MAX (about 292 years): a longer one
            # raises OverflowError.
            if stop.wait(min(max(a.min_interval, cost / WATCH_CPU_BUDGET), threading.TIMEOUT_MAX)):
                break
            wake.wait(min(a.interval, threading.TIMEOUT_MAX))
    finally:
        for sub in subs:
            sub.close()
        restore()
        if tty:
            out.write("\x1b[?25h\n")
            out.flush()
    return 0


# -- metrics ---------------------------------------------------------------------------------
def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise UsageError("metrics need prometheus_client: pip install 'multispool[metrics]'") from None
    return prometheus_client


_KIND = {TooOld: "too_old", Orphaned: "orphaned", Duplicated: "duplicated", DeadCheckout: "dead_checkout"}


class SpoolCollector:
    """A prometheus_client collector of one spool: per queue, the waiting entries,
    checkouts, delayed entries, age of the oldest entry, and the open fsck problems by
    kind (``queue=""`` for problems in .tmp, .data and .registry)."""

    def __init__(self, spool: Spool[Any, bytes], problems: Callable[[], list[Problem]]) -> None:
        self.spool = spool
        self.problems = problems

    def describe(self) -> list[Any]:
        return []  # no scrape at registration time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        st = queue_status(self.spool)
        lb = ["spool", "queue"]
        fams = {
            "entries": GaugeMetricFamily("multispool_queue_entries", "Entries waiting.", labels=lb),
            "checkouts": GaugeMetricFamily("multispool_queue_checkouts", "Checked out.", labels=lb),
            "delayed": GaugeMetricFamily("multispool_queue_delayed", "Not due yet.", labels=lb),
            "oldest_age": GaugeMetricFamily("multispool_queue_oldest_age_seconds",
                                            "Age of the oldest waiting entry (0 when empty).", labels=lb),
        }
        d = disp(self.spool.dir)
        for dn, row in st.items():
            for key, fam in fams.items():
                fam.add_metric([d, disp(dn)], float(row[key] or 0))
        yield from fams.values()
        counts: dict[tuple[str, str], int] = {(disp(dn), k): 0 for dn in st for k in _KIND.values()}
        for k in _KIND.values():
            counts[("", k)] = 0
        for p in self.problems():
            dirs = p.dirs if isinstance(p, Duplicated) else (p.dir,)
            q = dirs[0].queue_member if dirs[0].queue_member is not None else None
            where = ("" if q is None else disp(str(q.value)), _KIND[type(p)])
            counts[where] = counts.get(where, 0) + 1
        fam = GaugeMetricFamily("multispool_problems", "Open fsck problems by kind and queue.",
                                labels=["spool", "queue", "kind"])
        for (q_, k), n in sorted(counts.items()):
            fam.add_metric([d, q_, k], float(n))
        yield fam


def cmd_metrics(a: argparse.Namespace) -> int:
    """Print the metrics once, in the Prometheus text format (for node_exporter's
    textfile collector: write to a temporary file and rename it into place)."""
    prom = _prometheus()
    spool = open_spool(a.dir)
    monitor = Monitor(spool.dir, spool.spoolable, _limits(a, spool))
    registry = prom.CollectorRegistry(auto_describe=False)
    registry.register(SpoolCollector(spool, monitor.run_once))
    sys.stdout.write(prom.generate_latest(registry).decode("utf-8"))
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


def _add_dead_after(p: argparse.ArgumentParser, lead: str, unshared: str) -> None:
    p.add_argument("--dead-after", type=parse_duration, default=None, metavar="DURATION",
                   help=f"{lead}take a checkout's owner for dead only if its lock is free and the "
                        "checkout is at least this old (checked out or last rewritten that long "
                        "ago); where the filesystem does not share locks between mounts or clients "
                        f"(bindfs, sshfs, NFS nolock...), {unshared} without it, unless {TRUST_ENV}=1")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, description="Inspect, check, repair and watch a multispool spool.",
                     formatter_class=fmt,
                     epilog="Durations: 90, 90s, 10m, 2h, 1d. Exit codes: 0 ok, 1 problems found, "
                            "2 usage or spool error.\nexample: multispool status /var/spool/app")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
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
    p.add_argument("--limit", type=int, metavar="N", help="print at most N entries")
    p.add_argument("--unsorted", action="store_true",
                   help="directory order instead of name order: the first line comes before the "
                        "whole queue is listed")
    p.add_argument("--json", action="store_true", help="print JSON (an array, streamed)")
    p.set_defaults(func=cmd_ls)

    p = add("show", "metadata and data of one entry (waiting or checked out)",
            "multispool show /tmp/sp in NAME --data-only > payload.bin")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--data-only", action="store_true", help="write the raw data bytes to stdout")
    p.add_argument("--json", action="store_true", help="print JSON (data as UTF-8 text or base64)")
    p.set_defaults(func=cmd_show)

    p = add("mv", "move an entry to another queue under its owner lock (requeue from quarantine "
                  "or a dead-letter queue)", "multispool mv /tmp/sp NAME --to in")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--to", required=True, metavar="QUEUE", help="the destination queue")
    p.add_argument("--from", dest="queue", metavar="QUEUE",
                   help="where NAME is (default: search every queue)")
    _add_dead_after(p, "for a checked-out NAME: ", "mv refuses")
    p.set_defaults(func=cmd_mv)

    p = add("lost+found", "list what repair kept aside in SPOOL/.lost+found, or requeue an item "
            "(a new entry) with ITEM --to QUEUE", "multispool lost+found /tmp/sp NAME --to in")
    p.add_argument("item", metavar="ITEM", nargs="?")
    p.add_argument("--to", metavar="QUEUE", help="the queue to put ITEM back into")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_lost_found)

    p = add("rm", "remove entries of a queue under their owner locks (exit 1 if some could not be)",
            "multispool rm /tmp/sp in NAME1 NAME2")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("names", metavar="NAME", nargs="+")
    p.set_defaults(func=cmd_rm)

    p = add("purge", "remove every waiting entry of a queue (checked-out entries are left)",
            "multispool purge /tmp/sp in --yes")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("--yes", action="store_true", help="really remove them")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_purge)

    p = add("enqueue", "add an entry; prints its name",
            """multispool enqueue /tmp/sp in --metadata '{"n": 1}' --data payload.bin""")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("--metadata", required=True, metavar="JSON", help="the entry's metadata, as JSON")
    p.add_argument("--format", choices=("json", "msgpack"), default="json",
                   help="store the metadata as JSON (default) or MessagePack")
    p.add_argument("--data", metavar="FILE", help="data payload from FILE ('-': stdin); default empty")
    p.add_argument("--delay", type=parse_duration, default=None, metavar="DURATION",
                   help="no reader hands the entry out before this (e.g. 30s, 5m)")
    p.set_defaults(func=cmd_enqueue)

    p = add("fsck", "check a spool; exit 1 if there are problems",
            "multispool fsck /tmp/sp --max-age in=1h --repair --dry-run")
    _add_limits(p)
    p.add_argument("--repair", action="store_true",
                   help="fix what is safe to fix (dead checkouts, orphans, abandoned enqueues, "
                        "stale tmp files, duplicates), then check again")
    p.add_argument("--dry-run", action="store_true", help="say what --repair would do; change nothing")
    _add_dead_after(p, "with --repair: ", "dead-looking checkouts are left")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_fsck)

    p = add("monitor", "check periodically; print problem start/end events as JSON lines",
            "multispool monitor /tmp/sp --check-every 5s --alert-after-cycles 2")
    _add_limits(p)
    p.add_argument("--check-every", type=parse_duration, default=15.0, metavar="DURATION",
                   help="time between checks (default 15s)")
    p.add_argument("--alert-after-cycles", type=int, default=2, metavar="N",
                   help="report a problem once seen in more than N consecutive checks (default 2)")
    p.add_argument("--metrics-port", type=parse_port, metavar="PORT",
                   help="serve the metrics (as 'multispool metrics' prints them) over HTTP on PORT "
                        "(0: any free port, printed on stderr); needs multispool[metrics]")
    p.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                   help="address to serve the metrics on (default 127.0.0.1)")
    p.set_defaults(func=cmd_monitor)

    p = add("metrics", "print queue depths, checkouts, delayed entries, oldest ages and fsck problems "
                       "in the Prometheus text format (needs multispool[metrics])",
            "multispool metrics /tmp/sp > /var/lib/node_exporter/multispool.prom.tmp")
    _add_limits(p)
    p.set_defaults(func=cmd_metrics)

    p = add("recover", "return dead checkouts to their queues and remove abandoned enqueues",
            "multispool recover /tmp/sp --older-than 10m\n"
            "  multispool recover /mnt/bindfs/sp --dead-after 1h")
    p.add_argument("--older-than", type=parse_duration, default=600.0, metavar="DURATION",
                   help="only remove abandoned enqueues older than this (default 10m)")
    _add_dead_after(p, "", "recover refuses to run")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per entry, then the summary")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_recover)

    p = add("watch", "live view of queue depths and rates (Ctrl-C to quit)", "multispool watch /tmp/sp")
    p.add_argument("--once", action="store_true", help="print the table once and exit")
    p.add_argument("--observer", choices=("auto", "native", "polling"), default="auto",
                   help="how to watch for changes (default auto)")
    p.add_argument("--window", type=parse_duration, default=5.0, metavar="DURATION",
                   help="rates are averaged over this window (default 5s)")
    p.add_argument("--interval", type=parse_duration, default=1.0, metavar="DURATION",
                   help="refresh at least this often (default 1s); arrivals refresh sooner")
    p.add_argument("--min-interval", type=parse_duration, default=0.2, metavar="DURATION",
                   help="never refresh more often than this (default 0.2s); deep queues are "
                        "refreshed less often, to keep watch under 2%% of a core")
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
    line = disp(" ".join(message.split()))  # one line, whatever the error's text holds
    if not line.startswith(PROG):
        line = f"{PROG}: error: {line}"
    sys.stderr.write(line + "\n")
    return 2


def run() -> NoReturn:
    """Console-script entry point."""
    sys.exit(main())
