"""Crash-consistency checker in the spirit of ALICE (Pillai et al., "All File Systems Are
Not Created Equal", OSDI 2014): trace a multi-process workload with ``strace -f``, replay
its file system calls through a pessimistic crash model, and check, for every crash point,
what recovery makes of the state that may survive.

The crash model (what a power cut after a given system call may leave on disk):

* **File data** survives only as it was at the last ``fsync``/``fdatasync`` of that file
  (through any descriptor or name of the inode). A file never fsynced survives empty.
* **A directory's entries** survive only as they were at the last ``fsync`` of that
  directory: names created, renamed in, linked in, unlinked or renamed away since then are
  rolled back, each directory independently. So:
    - ``rename(A/x, B/y)`` removes ``x`` from A (durable at the next fsync of A) and adds
      ``y`` to B (durable at the next fsync of B): after a crash the inode may be in A
      only, B only, both, or neither.
    - ``link(A/x, B/y)`` adds ``y`` (durable at the next fsync of B); the inode is shared.
    - ``unlink(A/x)`` removes ``x`` (durable at the next fsync of A).
    - ``O_TMPFILE`` + ``linkat`` creates an inode and adds its name (durable at the fsync
      of its directory).
  Directories created during the workload exist after a crash only if their parent's
  fsync recorded them. The whole spool as it was before the workload is durable.
* An fsync records the state at the moment it **starts** (it may miss a concurrent
  change); other calls take effect when they **complete** (strace's order of completion).
* ``sync``/``syncfs`` make everything durable. Writes append to the file (the library
  writes files sequentially after ``O_TRUNC``/``O_CREAT``); ``pwrite`` writes at its offset.
* **Linux AIO fsyncs** (``IOCB_CMD_FSYNC``/``IOCB_CMD_FDSYNC`` iocbs, ``multispool._aio``)
  are fsyncs split over two calls. Each request's snapshot of its file or directory is
  taken when the ``io_submit`` that carries it **starts** (the kernel may run the fsync at
  any moment after that; the start is the earliest, as for ``fsync``), and it becomes
  durable when the ``io_getevents`` that reports its completion **returns**, matched by
  (process, context, ``aio_data``): contexts belong to a process, shared by its threads
  (thread ids are mapped to processes through the traced ``clone``/``clone3``). Only the
  first ``n`` iocbs of an ``io_submit`` that returned ``n`` are in flight; an event with
  ``res < 0`` makes nothing durable, nor does a request still in flight at the crash or
  when its context is destroyed (``io_destroy`` waits for it, but nobody learns whether
  it succeeded). Any other opcode, an event that matches no request in flight, or an
  array strace abbreviated is an error of the checker, never ignored.

This is the most pessimistic single state per crash point (everything not fsynced is
lost); a real file system may also keep any subset of what was not fsynced. Crash points
where nothing durable changed and no acknowledgement was written give the same state, so
each distinct (durable state, acknowledgements) is checked once.

The invariants checked after ``Spool.load``, ``recover_checkouts()`` and the Monitor's
repair (``fsck --repair`` with ``--max-tmp-file-age 0``) on the crash state:

1. ``load``, ``recover_checkouts`` and repair succeed.
2. Every acknowledged enqueue whose removal was not acknowledged is present exactly once
   in the spool's queues (no checkouts are left: every owner is dead).
3. Its queue, metadata and data are those its last acknowledged operation left, or those
   of the operation in flight at the crash (a Save in flight may also leave the new
   metadata in the old queue; a remove in flight may leave it in place or not).
4. An acknowledged removal is not undone: the entry is in no queue or checkout.
5. After an acknowledged Save the entry is in the destination queue only (implied by 2, 3).
6. An enqueue not acknowledged is absent or present once with its metadata and data.
7. Nothing else is in a queue, and the Monitor finds no Orphaned or Duplicated problem
   after the repair (the repair leaves a consistent spool).
8. Whatever repair moved to ``.lost+found`` is counted (not a violation: a person decides).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOAD = os.path.join(HERE, "_crash_workload.py")

SYSCALLS = (
    "open,openat,write,pwrite64,writev,fsync,fdatasync,rename,renameat,renameat2,link,linkat,"
    "unlink,unlinkat,mkdir,mkdirat,rmdir,ftruncate,sync,syncfs,"
    "io_submit,io_getevents,io_destroy,clone,clone3"
)
# The AIO requests that are fsyncs; io_submit of anything else is refused (see _iocb_fsyncs).
AIO_FSYNC_OPCODES = ("IOCB_CMD_FSYNC", "IOCB_CMD_FDSYNC")


def strace_path() -> str | None:
    return shutil.which("strace")


# -- trace parsing ---------------------------------------------------------------------------
_HEX = r"(?:\\x[0-9a-f]{2})*"
_STR = re.compile(r'"(' + _HEX + r')"(\.\.\.)?')
_FD = re.compile(r"(-?\d+|AT_FDCWD)(?:<(" + _HEX + r")>(\(deleted\))?)?")
_LINE = re.compile(r"^(\d+) +(.*)$")
_CALL = re.compile(r"^([a-z0-9_]+)\((.*)\) += (-?\d+)(?:<(" + _HEX + r")>(\(deleted\))?)?(.*)$")


def _unhex(h: str) -> bytes:
    return bytes.fromhex(h.replace("\\x", ""))


def _path(h: str) -> str:
    return _unhex(h).decode("utf-8", "surrogateescape")


@dataclasses.dataclass
class Call:
    pid: int
    name: str
    args: list[Any]  # str (decoded path or data as bytes for write), ("fd", n, path), or raw
    ret: int
    ret_path: str | None
    started: int  # index of the line where the call started (fsync snapshot point)
    line: int  # index of the line where it completed


def _split_args(s: str) -> list[str]:
    # Arguments are separated by ", " outside strings and <...> annotations; hex escaping
    # means strings and annotations never contain '"', '<' or '>' themselves.
    out, depth, cur, i = [], 0, [], 0
    in_str = False
    while i < len(s):
        c = s[i]
        if c == '"':
            in_str = not in_str
        elif not in_str and c in "<{[":
            depth += 1
        elif not in_str and c in ">}]":
            depth -= 1
        if not in_str and depth == 0 and s.startswith(", ", i):
            out.append("".join(cur))
            cur = []
            i += 2
            continue
        cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def _arg(a: str) -> Any:
    m = _STR.fullmatch(a)
    if m:
        if m.group(2):
            raise ValueError("strace truncated a string: raise -s")
        return _unhex(m.group(1))
    m = _FD.fullmatch(a)
    if m:
        p = _path(m.group(2)) if m.group(2) is not None else None
        n = -100 if m.group(1) == "AT_FDCWD" else int(m.group(1))
        return ("fd", n, p, bool(m.group(3)))
    return a


@dataclasses.dataclass(frozen=True)
class Iocb:
    """One request of an ``io_submit``, as strace printed it."""

    data: int  # aio_data
    opcode: str  # "IOCB_CMD_FSYNC", ..., or strace's text for an unknown one ("42 /* IOCB_CMD_??? */")
    fd: Any  # ("fd", n, path, deleted), as _arg gives it


@dataclasses.dataclass(frozen=True)
class IoEvent:
    """One completion reported by ``io_getevents``."""

    data: int
    res: int


def _array(s: str, what: str) -> list[str]:
    """The elements of an array strace printed in full; an abbreviated one (strace stops
    after ``-s`` elements and prints ``...``) or anything else is an error."""
    if not (s.startswith("[") and s.endswith("]")):
        raise ValueError(f"crash model: {what}: expected an array, strace printed {s[:200]!r}")
    inner = s[1:-1]
    elems = _split_args(inner) if inner else []
    if "..." in elems:
        raise ValueError(f"crash model: {what}: strace abbreviated the array (raise -s)")
    return elems


def _struct(s: str, what: str) -> dict[str, str]:
    if not (s.startswith("{") and s.endswith("}")):
        raise ValueError(f"crash model: {what}: expected a structure, strace printed {s[:200]!r}")
    out = {}
    for field in _split_args(s[1:-1]):
        k, eq, v = field.partition("=")
        if not eq or field == "...":
            raise ValueError(f"crash model: {what}: cannot read {field[:200]!r} of {s[:200]!r}")
        out[k] = v
    return out


def _iocb(s: str) -> Iocb:
    f = _struct(s, "io_submit iocb")
    try:
        fd = _arg(f["aio_fildes"])
        cb = Iocb(int(f["aio_data"], 0), f["aio_lio_opcode"], fd)
    except (KeyError, ValueError) as e:
        raise ValueError(f"crash model: cannot read the iocb {s[:300]!r}: {e!r}") from None
    if not (isinstance(fd, tuple) and fd[0] == "fd"):
        raise ValueError(f"crash model: cannot read the descriptor of the iocb {s[:300]!r}")
    return cb


def _io_event(s: str) -> IoEvent:
    f = _struct(s, "io_getevents event")
    try:
        return IoEvent(int(f["data"], 0), int(f["res"], 0))
    except (KeyError, ValueError) as e:
        raise ValueError(f"crash model: cannot read the io_event {s[:300]!r}: {e!r}") from None


def _aio_args(name: str, argstr: str, ret: int) -> list[Any]:
    """io_submit: [ctx, nr, [Iocb, ...]]; io_getevents: [ctx, min_nr, nr, [IoEvent, ...]]
    (the events only when it returned some); io_destroy: [ctx]."""
    a = _split_args(argstr)
    try:
        if name == "io_submit" and len(a) == 3:
            return [int(a[0], 0), int(a[1], 0), [_iocb(e) for e in _array(a[2], "io_submit")]]
        if name == "io_getevents" and len(a) == 5:
            evs = [_io_event(e) for e in _array(a[3], "io_getevents")] if ret > 0 else []
            return [int(a[0], 0), int(a[1], 0), int(a[2], 0), evs]
        if name == "io_destroy" and len(a) == 1:
            return [int(a[0], 0)]
    except ValueError as e:
        if str(e).startswith("crash model:"):
            raise
        raise ValueError(f"crash model: cannot read {name}({argstr[:300]}): {e}") from None
    raise ValueError(f"crash model: unexpected arguments {name}({argstr[:300]})")


_AIO_CALLS = ("io_submit", "io_getevents", "io_destroy")


def parse_trace(path: str) -> list[Call]:
    """The completed calls of a ``strace -f -xx -y`` output, in order of completion."""
    pending: dict[int, tuple[str, int]] = {}
    calls: list[Call] = []
    with open(path, encoding="ascii", errors="replace") as f:
        lines = f.read().splitlines()
    for idx, raw in enumerate(lines):
        m = _LINE.match(raw)
        if not m:
            continue
        pid, rest = int(m.group(1)), m.group(2)
        if rest.endswith("<unfinished ...>"):
            # Keep a trailing ", ": a call cut after its input arguments (io_getevents)
            # resumes with the next argument.
            before = rest[: -len("<unfinished ...>")].rstrip()
            pending[pid] = (before + " " if before.endswith(",") else before, idx)
            continue
        start = idx
        if rest.startswith("<... "):
            _, _, tail = rest.partition(" resumed>")
            before, start = pending.pop(pid, ("", idx))
            rest = before + tail
        if rest.startswith(("+++", "---")):
            continue
        cm = _CALL.match(rest)
        if not cm:
            continue
        name, argstr, ret = cm.group(1), cm.group(2), int(cm.group(3))
        if name in _AIO_CALLS:
            args = _aio_args(name, argstr, ret)
        elif name in ("clone", "clone3"):
            args = [argstr]  # only its flags are read (CLONE_THREAD)
        else:
            args = [_arg(a) for a in _split_args(argstr)] if argstr else []
        ret_path = _path(cm.group(4)) if cm.group(4) is not None else None
        if cm.group(5):
            ret_path = (ret_path or "") + "(deleted)"
        calls.append(Call(pid, name, args, ret, ret_path, start, idx))
    return calls


# -- the model ----------------------------------------------------------------------------------
class Inode:
    __slots__ = ("data", "durable", "durable_at", "ino")
    _next = 0

    def __init__(self, data: bytes = b"", durable: bytes | None = None) -> None:
        self.data = bytearray(data)
        self.durable = durable
        self.durable_at = -1
        Inode._next += 1
        self.ino = Inode._next


class DirNode:
    __slots__ = ("durable", "durable_at", "entries", "path")

    def __init__(self, path: str, entries: dict[str, Any] | None = None, durable: bool = False) -> None:
        self.path = path
        self.entries: dict[str, Inode | DirNode] = entries or {}
        self.durable: dict[str, Inode | DirNode] | None = dict(self.entries) if durable else {}
        self.durable_at = -1


class Model:
    """The volatile file tree under ``root`` and what of it is durable."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.dirs: dict[str, DirNode] = {}
        self.tmpfiles: dict[tuple[int, int], Inode] = {}
        self._load(root)

    def _load(self, path: str) -> DirNode:
        node = DirNode(path)
        self.dirs[path] = node
        by_ino: dict[int, Inode] = {}
        for name in sorted(os.listdir(path)):
            p = os.path.join(path, name)
            st = os.lstat(p)
            if os.path.isdir(p) and not os.path.islink(p):
                node.entries[name] = self._load(p)
            else:
                ino = by_ino.get(st.st_ino)
                if ino is None:
                    with open(p, "rb") as f:
                        data = f.read()
                    ino = by_ino[st.st_ino] = Inode(data, data)
                node.entries[name] = ino
        node.durable = dict(node.entries)
        return node

    def inside(self, p: str | None) -> bool:
        return p is not None and (p == self.root or p.startswith(self.root + "/"))

    def lookup(self, p: str) -> Inode | DirNode | None:
        if p in self.dirs:
            return self.dirs[p]
        d = self.dirs.get(os.path.dirname(p))
        return None if d is None else d.entries.get(os.path.basename(p))

    def _parent(self, p: str) -> tuple[DirNode, str]:
        d = self.dirs.get(os.path.dirname(p))
        if d is None:
            raise KeyError(f"crash model: no directory for {p}")
        return d, os.path.basename(p)

    # operations (volatile) ---------------------------------------------------------------
    def create(self, p: str, trunc: bool) -> Inode:
        d, n = self._parent(p)
        node = d.entries.get(n)
        if isinstance(node, Inode):
            if trunc:
                node.data = bytearray()
            return node
        ino = Inode()
        d.entries[n] = ino
        return ino

    def rename(self, a: str, b: str) -> None:
        da, na = self._parent(a)
        db, nb = self._parent(b)
        node = da.entries[na]
        if isinstance(node, DirNode):
            raise NotImplementedError(f"crash model: directory rename {a} -> {b}")
        if db.entries.get(nb) is node:
            return  # POSIX: renaming a link onto another link of the same file does nothing
        del da.entries[na]
        db.entries[nb] = node

    def link(self, node: Inode, b: str) -> None:
        db, nb = self._parent(b)
        db.entries[nb] = node

    def unlink(self, p: str) -> None:
        d, n = self._parent(p)
        node = d.entries.pop(n)
        if isinstance(node, DirNode):
            del self.dirs[p]

    def mkdir(self, p: str) -> None:
        d, n = self._parent(p)
        node = DirNode(p)
        d.entries[n] = node
        self.dirs[p] = node

    # durability ------------------------------------------------------------------------
    def fsync(self, node: Inode | DirNode, snapshot: Any, started: int) -> None:
        # Of two fsyncs that overlap, the one that started last recorded the newer state,
        # whichever completes first.
        if started >= node.durable_at:
            node.durable = snapshot
            node.durable_at = started

    def snapshot(self, node: Inode | DirNode) -> Any:
        return dict(node.entries) if isinstance(node, DirNode) else bytes(node.data)

    def sync_all(self) -> None:
        for d in self.dirs.values():
            d.durable = dict(d.entries)
            for n in d.entries.values():
                if isinstance(n, Inode):
                    n.durable = bytes(n.data)

    def durable_key(self) -> tuple[Any, ...]:
        """A value equal for equal durable states."""
        out: list[Any] = []

        def walk(d: DirNode, prefix: str) -> None:
            for name, node in sorted((d.durable or {}).items()):
                if isinstance(node, DirNode):
                    out.append((prefix + name + "/",))
                    walk(node, prefix + name + "/")
                else:
                    out.append((prefix + name, node.ino, node.durable))

        walk(self.dirs[self.root], "")
        return tuple(out)

    def materialize(self, dest: str) -> None:
        """Build the durable state under ``dest`` (hard links kept)."""
        first: dict[int, str] = {}

        def walk(d: DirNode, path: str) -> None:
            for name, node in sorted((d.durable or {}).items()):
                p = os.path.join(path, name)
                if isinstance(node, DirNode):
                    os.mkdir(p, 0o700)
                    walk(node, p)
                elif node.ino in first:
                    os.link(first[node.ino], p)
                else:
                    with open(p, "wb") as f:
                        f.write(node.durable or b"")
                    os.chmod(p, 0o600)
                    first[node.ino] = p

        walk(self.dirs[self.root], dest)


# -- replay ---------------------------------------------------------------------------------
@dataclasses.dataclass
class CrashPoint:
    index: int  # number of calls replayed
    key: tuple[Any, ...]
    acks: list[dict[str, Any]]


def _abs(dirfd: Any, p: bytes) -> str:
    s = p.decode("utf-8", "surrogateescape")
    if s.startswith("/"):
        return os.path.normpath(s)
    base = dirfd[2] if isinstance(dirfd, tuple) and dirfd[2] else os.getcwd()
    return os.path.normpath(os.path.join(base, s))


def replay(
    calls: list[Call], model: Model, acks_path: str, initial_acks: list[dict[str, Any]] | None = None
) -> Iterator[tuple[Model, list[dict[str, Any]], int]]:
    """Yield (model, acknowledgement records so far, number of calls replayed) at the
    start and after every call that changed the durable state or wrote an
    acknowledgement. An fsync records the state when it started: its snapshot is taken
    before the first call that completed after its start (for an AIO fsync: the start of
    its io_submit; it is applied when the io_getevents that reaps it completes)."""
    acks: list[dict[str, Any]] = list(initial_acks or [])
    # The snapshots to take, by the line where their call started: (index of an fsync,
    # None) or (index of an io_submit, index of its iocb).
    starts: dict[int, list[tuple[int, int | None]]] = collections.defaultdict(list)
    for i, c in enumerate(calls):
        if c.name in ("fsync", "fdatasync"):
            starts[c.started].append((i, None))
        elif c.name == "io_submit":
            starts[c.started] += [(i, k) for k in _iocb_fsyncs(c)]
    start_order = sorted(starts)
    process = _processes(calls)
    aio = _Aio()
    snap: dict[tuple[int, int | None], Any] = {}
    si = 0
    yield model, list(acks), 0
    for i, c in enumerate(calls):
        while si < len(start_order) and start_order[si] <= c.line:
            for j, k in starts[start_order[si]]:
                fd = calls[j].args[0] if k is None else calls[j].args[2][k].fd
                node = _fd_node(model, fd, calls[j].pid)
                if node is not None:
                    snap[(j, k)] = (node, model.snapshot(node), calls[j].started)
            si += 1
        if c.name in _AIO_CALLS:
            changed = aio.apply(model, c, process.get(c.pid, c.pid), snap, i)
        else:
            changed = _apply(model, c, acks, acks_path, snap.pop((i, None), None))
        if changed:
            yield model, list(acks), i + 1


def _iocb_fsyncs(c: Call) -> range:
    """The indexes of an io_submit's iocbs (all of them: each must be an fsync)."""
    for cb in c.args[2]:
        if cb.opcode not in AIO_FSYNC_OPCODES:
            raise NotImplementedError(
                f"crash model: io_submit of {cb.opcode} (aio_data={cb.data:#x}, trace line "
                f"{c.started + 1}): only {' and '.join(AIO_FSYNC_OPCODES)} are modelled"
            )
    return range(len(c.args[2]))


def _processes(calls: list[Call]) -> dict[int, int]:
    """The process (thread group) of every thread a traced clone/clone3 created with
    CLONE_THREAD; a thread id not in it is its own process's (its main thread, or a
    process made by fork)."""
    creator: dict[int, int] = {}
    created: set[int] = set()
    for c in calls:
        if c.name in ("clone", "clone3") and c.ret > 0:
            if c.ret in created:
                raise ValueError(f"crash model: thread id {c.ret} created twice: cannot tell processes apart")
            created.add(c.ret)
            if "CLONE_THREAD" in c.args[0]:
                creator[c.ret] = c.pid
    out = {}
    for t in creator:
        p = t
        while p in creator:
            p = creator[p]
        out[t] = p
    return out


class _Aio:
    """The AIO fsyncs in flight: submitted (io_submit returned), not yet reaped."""

    def __init__(self) -> None:
        # (process, context, aio_data) -> (node, snapshot, started), or None for a file the
        # model does not follow (outside the spool)
        self.inflight: dict[tuple[int, int, int], Any] = {}

    def apply(
        self, model: Model, c: Call, proc: int, snap: dict[tuple[int, int | None], Any], i: int
    ) -> bool:
        """Apply one completed io_submit, io_getevents or io_destroy (``i`` its index);
        True if the durable state changed."""
        if c.name == "io_submit":
            ctx, _, cbs = c.args
            taken = [snap.pop((i, k), None) for k in range(len(cbs))]
            if c.ret > len(cbs):
                raise ValueError(f"crash model: io_submit of {len(cbs)} iocbs returned {c.ret} "
                                 f"(line {c.line + 1})")
            for k in range(max(c.ret, 0)):  # the kernel took the first c.ret, in order
                key = (proc, ctx, cbs[k].data)
                if key in self.inflight:
                    raise ValueError(
                        f"crash model: two requests with aio_data={cbs[k].data:#x} in flight in context "
                        f"{ctx:#x} of process {proc} (line {c.line + 1}): cannot tell their completions apart"
                    )
                self.inflight[key] = taken[k]
            return False
        if c.name == "io_getevents":
            ctx, events = c.args[0], c.args[3]
            if c.ret <= 0:
                return False
            if len(events) != c.ret:
                raise ValueError(f"crash model: io_getevents returned {c.ret} but shows {len(events)} events "
                                 f"(line {c.line + 1})")
            changed = False
            for ev in events:
                key = (proc, ctx, ev.data)
                if key not in self.inflight:
                    raise ValueError(
                        f"crash model: io_getevents (line {c.line + 1}) reports data={ev.data:#x} of context "
                        f"{ctx:#x}, which no traced io_submit of process {proc} has in flight"
                    )
                s = self.inflight.pop(key)
                if ev.res < 0 or s is None:
                    continue  # failed: nothing made durable; or not a file of the model
                model.fsync(*s)
                changed = True
            return changed
        if c.name == "io_destroy" and c.ret == 0:
            # It waits for the requests in flight, but their results are lost: none counts.
            ctx = c.args[0]
            for key in [k for k in self.inflight if k[:2] == (proc, ctx)]:
                del self.inflight[key]
        return False


def _fd_node(model: Model, fd: Any, pid: int) -> Inode | DirNode | None:
    if not (isinstance(fd, tuple) and fd[0] == "fd"):
        return None
    p = fd[2]
    if p is None:
        return None
    if fd[3]:  # (deleted): an O_TMPFILE inode not yet linked, or an unlinked file
        return model.tmpfiles.get((pid, fd[1]))
    if not model.inside(p):
        return None
    return model.lookup(p)


def _apply(model: Model, c: Call, acks: list[dict[str, Any]], acks_path: str, snap: Any) -> bool:
    """Apply one completed call; True if the durable state or the acks changed."""
    a = c.args
    if c.ret < 0:
        return False
    n = c.name
    if n in ("write", "pwrite64", "writev"):
        fd = a[0]
        if isinstance(fd, tuple) and fd[2] == acks_path:
            for line in a[1].decode().splitlines():
                acks.append(json.loads(line))
            return True
        node = _fd_node(model, fd, c.pid)
        if isinstance(node, Inode):
            if n == "writev":
                raise NotImplementedError("crash model: writev")
            data = a[1][: c.ret]
            if n == "pwrite64":
                off = int(a[3])
                node.data[off : off + len(data)] = data
            else:
                node.data += data
        return False
    if n in ("fsync", "fdatasync"):
        if snap is None:
            return False
        node, value, started = snap
        model.fsync(node, value, started)
        return True
    if n in ("sync", "syncfs"):
        model.sync_all()
        return True
    if n in ("openat", "open"):
        dirfd, p, flags = (a[0], a[1], a[2]) if n == "openat" else (("fd", -100, None, False), a[0], a[1])
        path = _abs(dirfd, p)
        if not model.inside(path):
            return False
        if "O_TMPFILE" in flags:
            model.tmpfiles[(c.pid, c.ret)] = Inode()
            return False
        if "O_CREAT" in flags or "O_TRUNC" in flags:
            node = model.lookup(path)
            if node is None or isinstance(node, Inode):
                model.create(path, "O_TRUNC" in flags)
        return False
    if n == "ftruncate":
        node = _fd_node(model, a[0], c.pid)
        if isinstance(node, Inode):
            del node.data[int(a[1]) :]
        return False
    if n in ("rename", "renameat", "renameat2"):
        if n == "rename":
            src, dst = _abs(None, a[0]), _abs(None, a[1])
        else:
            src, dst = _abs(a[0], a[1]), _abs(a[2], a[3])
            if n == "renameat2" and "RENAME_EXCHANGE" in str(a[4]):
                raise NotImplementedError("crash model: RENAME_EXCHANGE")
        if model.inside(src) or model.inside(dst):
            model.rename(src, dst)
        return False
    if n in ("link", "linkat"):
        if n == "link":
            src, dst = _abs(None, a[0]), _abs(None, a[1])
        else:
            src, dst = _abs(a[0], a[1]), _abs(a[2], a[3])
        if not model.inside(dst):
            return False
        m = re.fullmatch(r"/proc/self/fd/(\d+)", src)
        if m:
            node = model.tmpfiles.pop((c.pid, int(m.group(1))), None) or Inode()
        else:
            found = model.lookup(src)
            if not isinstance(found, Inode):
                raise KeyError(f"crash model: link from unknown {src}")
            node = found
        model.link(node, dst)
        return False
    if n in ("unlink", "unlinkat", "rmdir"):
        path = _abs(None, a[0]) if n in ("unlink", "rmdir") else _abs(a[0], a[1])
        if model.inside(path):
            model.unlink(path)
        return False
    if n in ("mkdir", "mkdirat"):
        path = _abs(None, a[0]) if n == "mkdir" else _abs(a[0], a[1])
        if model.inside(path):
            model.mkdir(path)
        return False
    return False


# -- expectations ---------------------------------------------------------------------------
GONE = ("<gone>",)


def _after(state: tuple[Any, ...], op: dict[str, Any], partial: bool) -> set[tuple[Any, ...]]:
    if state == GONE:
        return {GONE}
    q, meta, data = state
    kind = op["op"]
    if kind == "save":
        m = json.dumps(op["meta"], sort_keys=True)
        out = {(op["queue"], m, data)}
        if partial:
            out.add((q, m, data))  # rewritten, not yet moved (recovered into the old queue)
        return out
    if kind == "remove":
        return {GONE}
    if kind == "direct_save":
        return {(q, json.dumps(op["meta"], sort_keys=True), data)}
    if kind == "data_save":
        return {(q, meta, op["data"])}
    return {state}  # release, recover: no change in what the entry is


@dataclasses.dataclass
class Expect:
    allowed: set[tuple[Any, ...]]  # (queue, metadata json, data) or GONE
    acked: bool  # its enqueue was acknowledged
    quiet: bool  # its last operation was acknowledged, and was not a checkout


def expectations(acks: list[dict[str, Any]]) -> dict[str, Expect]:
    """For each entry id: the states allowed after a crash here. An operation in flight
    (begun, not acknowledged) allows the states before and after it; a checkout whose
    owner died never ends, and changes nothing."""
    ops: dict[str, list[tuple[dict[str, Any], bool]]] = collections.defaultdict(list)
    open_: dict[tuple[int, str, str], int] = {}
    for r in acks:
        key = (r["w"], r["op"], r["id"])
        if r["phase"] == "begin":
            open_[key] = len(ops[r["id"]])
            ops[r["id"]].append((r, False))
        else:
            i = open_.pop(key)
            ops[r["id"]][i] = (r, True)
    out: dict[str, Expect] = {}
    for ident, lst in ops.items():
        first, done = lst[0]
        st = (first["queue"], json.dumps(first["meta"], sort_keys=True), first["data"])
        if not done:
            out[ident] = Expect({GONE, st}, False, False)
            continue
        states = {st}
        for r, done in lst[1:]:
            nxt: set[tuple[Any, ...]] = set()
            for s in states:
                nxt |= _after(s, r, partial=not done)
            states = nxt if done else states | nxt
        last, last_done = lst[-1]
        out[ident] = Expect(states, True, last_done and last["op"] != "checkout")
    return out


# -- checking one crash state --------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    violations: list[str]
    lost_found: int


def check_state(spool_dir: str, durability: str, acks: list[dict[str, Any]]) -> Outcome:
    import multispool
    from _crash_workload import Q, spoolable

    sp = spoolable(durability)
    v: list[str] = []
    exp = expectations(acks)
    # Before any recovery: an entry whose last operation was acknowledged (and is not a
    # checkout) is durable in exactly one queue or checkout dir.
    before = _scan(spool_dir, Q)
    for ident, e in exp.items():
        copies = [g[0] for g in before.get(ident, [])]
        if e.quiet and len(copies) > 1:
            v.append(f"durable in two places: {ident} in {copies}")
    try:
        spool = multispool.Spool.load(spool_dir, sp)
        spool.recover_checkouts()
        limits = multispool.Limits(max_tmp_file_age=0)
        mon = multispool.Monitor(spool_dir, sp, limits)
        from multispool._monitor import repair

        repair(spool, limits, mon.run_once(), dry_run=False)
        left = [p for p in mon.run_once() if not isinstance(p, multispool.TooOld)]
        if left:
            v.append(f"inconsistent after repair: {left}")
    except Exception as e:  # any failure of recovery is a violation to report
        return Outcome([f"error: {type(e).__name__}: {e}"], 0)
    found = _scan(spool_dir, Q, v)
    lf = os.path.join(spool_dir, ".lost+found")
    lost_found = len(os.listdir(lf)) if os.path.isdir(lf) else 0
    for ident, e in exp.items():
        allowed = e.allowed
        got = found.pop(ident, [])
        if len(got) > 1:
            v.append(f"duplicated: {ident} in {[g[0] for g in got]}")
            continue
        if not got:
            if GONE not in allowed:
                v.append(f"lost: {ident} (allowed {sorted(map(str, allowed))})")
            continue
        state = got[0][:3]
        if state in allowed:
            continue
        if allowed == {GONE}:
            v.append(f"removal undone: {ident} in {state[0]}")
        elif state[0] not in {s[0] for s in allowed if s != GONE}:
            v.append(f"wrong queue: {ident} in {state[0]}, allowed {sorted(map(str, allowed))}")
        else:
            v.append(f"corrupt: {ident} is {state}, allowed {sorted(map(str, allowed))}")
    for ident, got in found.items():
        v.append(f"unknown entry {ident} in {[g[0] for g in got]}")
    return Outcome(v, lost_found)


def _scan(spool_dir: str, queues: Any, v: list[str] | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """Entries by id: (dir, metadata json, data, name) of every non-dot file in a queue or
    checkout dir. Undecodable metadata is a violation when ``v`` is given."""
    found: dict[str, list[tuple[Any, ...]]] = collections.defaultdict(list)
    for q in queues:
        for sub in (q.value, os.path.join(q.value, ".checkout")):
            d = os.path.join(spool_dir, sub)
            for name in sorted(os.listdir(d)):
                if name.startswith("."):
                    continue
                try:
                    with open(os.path.join(d, name), "rb") as f:
                        meta = json.loads(f.read())
                    ident = meta["id"]
                    meta_s = json.dumps(meta, sort_keys=True)
                except Exception:
                    if v is not None:
                        v.append(f"undecodable metadata: {sub}/{name}")
                    continue
                try:
                    with open(os.path.join(spool_dir, ".data", name), "rb") as f:
                        data: str | None = f.read().decode()
                except FileNotFoundError:
                    data = None
                found[ident].append((sub, meta_s, data, name))
    return found


# -- the whole run ------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    durability: str
    calls: int
    crash_points: int
    states: int
    violations: collections.Counter[str]
    examples: list[str]
    lost_found_states: int
    entries: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # kind -> entry ids
    acked: int = 0  # entries whose enqueue was acknowledged by the end of the workload

    def summary(self) -> str:
        kinds = ", ".join(
            f"{k}: {n} (of {len(self.entries.get(k, ()))}/{self.acked} entries)"
            for k, n in sorted(self.violations.items())
        ) or "none"
        return (
            f"durability={self.durability}: {self.calls} calls traced, {self.crash_points} crash "
            f"points, {self.states} distinct crash states checked; violations: {kinds}; "
            f"states with something in .lost+found: {self.lost_found_states}"
        )


def run(
    work: str, durability: str, workers: int = 2, rounds: int = 1, env: dict[str, str] | None = None
) -> Report:
    """Create a spool in ``work``, trace the workload on it, check every crash point."""
    import multispool
    from _crash_workload import spoolable

    strace = strace_path()
    if strace is None:
        raise RuntimeError("strace not found")
    spool_dir = os.path.realpath(os.path.join(work, "spool"))
    spool = multispool.Spool.create(spool_dir, spoolable(durability))
    acks = os.path.realpath(os.path.join(work, "acks"))
    # Entries spooled before the workload (durable: the model starts from them), which the
    # workload saves and removes: what a crash may undo.
    initial = prepopulate(spool, acks, workers)
    trace = os.path.join(work, "trace")
    cmd = [
        strace, "-f", "-qq", "-xx", "-y", "-s", "1048576", "-o", trace, "-e", f"trace={SYSCALLS}",
        sys.executable, WORKLOAD, spool_dir, acks, durability, str(workers), str(rounds),
    ]
    try:
        subprocess.run([strace, "--seccomp-bpf", "-e", "trace=none", "true"], check=True,
                       capture_output=True, timeout=30)
        cmd.insert(1, "--seccomp-bpf")
    except (subprocess.SubprocessError, OSError):
        pass
    # The model starts from the spool as it is before the workload, all of it durable.
    model = Model(spool_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"workload failed ({proc.returncode}): {proc.stderr[-2000:]}")
    calls = parse_trace(trace)
    return check_trace(calls, model, acks, durability, work, initial)


def prepopulate(spool: Any, acks_path: str, workers: int) -> list[dict[str, Any]]:
    """Enqueue two entries per worker (``wNp0``, ``wNp1``) into queue a and record their
    acknowledged enqueues in ``acks_path`` (read back by the workload); the records."""
    from _crash_workload import Q

    recs: list[dict[str, Any]] = []
    for w in range(workers):
        for k in range(2):
            ident = f"w{w}p{k}"
            meta = {"id": ident, "v": 0}
            e = spool.enqueue(Q.A, meta, f"data {ident}".encode())
            recs.append({"phase": "begin", "op": "enqueue", "w": w, "id": ident, "name": None,
                         "queue": "a", "meta": meta, "data": f"data {ident}"})
            recs.append({**recs[-1], "phase": "end", "name": e.name})
    with open(acks_path, "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in recs)
    return recs


def check_trace(
    calls: list[Call],
    model: Model,
    acks_path: str,
    durability: str,
    work: str,
    initial_acks: list[dict[str, Any]] | None = None,
) -> Report:
    seen: set[Any] = set()
    counts: collections.Counter[str] = collections.Counter()
    examples: list[str] = []
    points = states = lf_states = 0
    entries: dict[str, set[str]] = {}
    final: list[dict[str, Any]] = []
    for m, acks, index in replay(calls, model, acks_path, initial_acks):
        final = acks
        points += 1
        key = (m.durable_key(), len(acks))
        if key in seen:
            continue
        seen.add(key)
        states += 1
        dest = tempfile.mkdtemp(dir=work, prefix="crash-")
        try:
            m.materialize(dest)
            out = check_state(dest, durability, acks)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        if out.lost_found:
            lf_states += 1
        for msg in out.violations:
            kind, _, rest = msg.partition(":")
            counts[kind] += 1
            entries.setdefault(kind, set()).add(rest.split()[0] if rest.split() else "")
            if len(examples) < 20:
                examples.append(f"after call {index}: {msg}")
    acked = sum(1 for e in expectations(final).values() if e.acked)
    return Report(durability, len(calls), points, states, counts, examples, lf_states, entries, acked)
