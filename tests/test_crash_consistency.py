"""Crash consistency under the pessimistic POSIX model (issue 12): the strace-based
checker of tests/_crashmodel.py (its docstring states the model and the invariants), the
protocol's recovery of interrupted moves, and repair that never deletes data.

The checker traces a multi-process workload (tests/_crash_workload.py) under ``strace -f``
and checks every crash point. Default run: 2 workers x 1 round (~10 s); MULTISPOOL_SLOW=1:
3 workers x 3 rounds, and the "file" and "none" modes (whose losses docs/crash-safety.md
tabulates: ``scripts/crashcheck``).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

import multispool
from multispool import _lostfound

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _crashmodel
from _crashmodel import Call, Model
from _paths import full
from _procs import run_python

SLOW = os.environ.get("MULTISPOOL_SLOW") == "1"

needs_strace = pytest.mark.skipif(
    _crashmodel.strace_path() is None,
    reason="CRASH-CONSISTENCY CHECKER NOT RUN: strace is not installed "
    "(scripts/test installs it with apt-get when run as root; else: apt-get install strace)",
)


@needs_strace
def test_full_durability_survives_every_crash_point(tmp_path: Path) -> None:
    workers, rounds = (3, 3) if SLOW else (2, 1)
    report = _crashmodel.run(str(tmp_path), "full", workers=workers, rounds=rounds)
    print(report.summary())
    assert report.states > 50  # the trace was parsed and replayed
    assert not report.violations, "\n".join([report.summary(), *report.examples])


@needs_strace
@pytest.mark.skipif(not SLOW, reason="set MULTISPOOL_SLOW=1")
@pytest.mark.parametrize("durability", ["file", "none"])
def test_weaker_modes_lose_acknowledged_entries(tmp_path: Path, durability: str) -> None:
    # Under the pessimistic model nothing that "file" or "none" does makes a directory
    # entry durable: the checker must see it (and docs/crash-safety.md says so).
    report = _crashmodel.run(str(tmp_path), durability, workers=2, rounds=2)
    print(report.summary())
    assert report.violations["lost"] > 0


# -- the checker catches the two cases of issue 12 on the protocol before it ----------------
class _Trace:
    """Builds the calls the library made before issue 12's fix, for one process."""

    def __init__(self, spool: str, acks: str) -> None:
        self.spool, self.acks = spool, acks
        self.calls: list[Call] = []

    def _add(self, name: str, *args: Any, ret: int = 0) -> None:
        n = len(self.calls)
        self.calls.append(Call(1, name, list(args), ret, None, n, n))

    def fd(self, rel: str) -> tuple[str, int, str, bool]:
        return ("fd", 9, os.path.join(self.spool, rel), False)

    def rename(self, a: str, b: str) -> None:
        self._add("rename", os.path.join(self.spool, a).encode(), os.path.join(self.spool, b).encode())

    def fsync(self, rel: str) -> None:
        self._add("fsync", self.fd(rel))

    def write_file(self, rel: str, data: bytes) -> None:
        p = os.path.join(self.spool, rel).encode()
        self._add("openat", ("fd", -100, "/", False), p, "O_WRONLY|O_CREAT|O_TRUNC", ret=9)
        self._add("write", self.fd(rel), data, ret=len(data))
        self.fsync(rel)

    def ack(self, phase: str, op: str, **kw: Any) -> None:
        line = json.dumps({"phase": phase, "op": op, "w": 0, **kw}).encode() + b"\n"
        self._add("write", ("fd", 3, self.acks, False), line, ret=len(line))

    def enqueue(self, name: str, q: str) -> None:
        meta = {"id": name, "v": 0}
        kw = {"id": name, "queue": q, "meta": meta, "data": f"data {name}"}
        self.ack("begin", "enqueue", name=None, **kw)
        self._add("openat", ("fd", -100, "/", False), os.path.join(self.spool, ".registry", name).encode(),
                  "O_WRONLY|O_CREAT|O_EXCL", ret=9)
        self.fsync(".registry")
        self.write_file(f".tmp/{name}", json.dumps(meta).encode())
        self.write_file(f".data/{name}", f"data {name}".encode())
        self.fsync(".data")
        self.rename(f".tmp/{name}", f"{q}/{name}")
        self.fsync(q)
        self.ack("end", "enqueue", name=name, **kw)


def _old_protocol_violations(tmp_path: Path, build: Any) -> dict[str, int]:
    from _crash_workload import spoolable

    spool = str(tmp_path / "spool")
    multispool.Spool.create(spool, spoolable("full"))
    t = _Trace(spool, str(tmp_path / "acks"))
    build(t)
    report = _crashmodel.check_trace(t.calls, Model(spool), t.acks, "full", str(tmp_path))
    return dict(report.violations)


def test_checker_catches_save_left_durable_in_both_queues(tmp_path: Path) -> None:
    # enqueue X, checkout X, Save X into B returns: A was never fsynced after the claim.
    def build(t: _Trace) -> None:
        t.enqueue("x", "a")
        t.rename("a/x", "a/.checkout/x")
        t.ack("begin", "save", id="x", name="x", queue="b", meta={"id": "x", "v": 0})
        t.rename("a/.checkout/x", "b/x")
        t.fsync("b")
        t.ack("end", "save", id="x", name="x", queue="b", meta={"id": "x", "v": 0})

    assert _old_protocol_violations(tmp_path, build).get("durable in two places", 0) >= 1


def test_checker_catches_checkout_lost_by_another_enqueue(tmp_path: Path) -> None:
    # enqueue X, checkout X, enqueue Y: Y's fsync of A makes X's leaving A durable, while
    # A/.checkout was never fsynced: X is in no durable place.
    def build(t: _Trace) -> None:
        t.enqueue("x", "a")
        t.rename("a/x", "a/.checkout/x")
        t.enqueue("y", "a")

    assert _old_protocol_violations(tmp_path, build).get("lost", 0) >= 1


# -- the model's AIO fsyncs (multispool._aio), from strace lines as strace 6.1 prints them ---------
CTX = "0x7f87dd73d000"


def _hx(s: str | bytes) -> str:
    """A path or data as ``strace -xx`` prints it."""
    b = s.encode() if isinstance(s, str) else s
    return "".join(f"\\x{c:02x}" for c in b)


def _x(n: int) -> str:
    return "0" if n == 0 else hex(n)  # strace prints 0, 0x1, 0x2...


def _event(data: int, res: int = 0) -> str:
    return f"{{data={_x(data)}, obj={0x7F87DD902430 + 0x40 * data:#x}, res={res}, res2=0}}"


class _Strace:
    """A hand-written ``strace -f -qq -xx -y`` excerpt."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.lines: list[str] = []

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def fd(self, n: int, rel: str) -> str:
        return f"{n}<{_hx(self.path(rel))}>"

    def cb(self, data: int, fd: int, rel: str, op: str = "IOCB_CMD_FSYNC") -> str:
        return f"{{aio_data={_x(data)}, aio_lio_opcode={op}, aio_fildes={self.fd(fd, rel)}}}"

    def create(self, pid: int, fd: int, rel: str, data: bytes) -> None:
        self.lines.append(f'{pid}  openat(AT_FDCWD<{_hx("/")}>, "{_hx(self.path(rel))}", '
                          f"O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0600) = {self.fd(fd, rel)}")
        self.write(pid, fd, rel, data)

    def write(self, pid: int, fd: int, rel: str, data: bytes) -> None:
        self.lines.append(f'{pid}  write({self.fd(fd, rel)}, "{_hx(data)}", {len(data)}) = {len(data)}')

    def submit(self, pid: int, cbs: list[str], ret: int | None = None, split: bool = False) -> None:
        call = f"{pid}  io_submit({CTX}, {len(cbs)}, [{', '.join(cbs)}]"
        r = len(cbs) if ret is None else ret
        if split:  # as strace -f shows a call another thread's call interrupts
            self.lines += [f"{call} <unfinished ...>", f"{pid}  <... io_submit resumed>)          = {r}"]
        else:
            self.lines.append(f"{call}) = {r}")

    def getevents(self, pid: int, events: list[str], split: bool = False) -> None:
        head = f"{pid}  io_getevents({CTX}, 1, {len(events)}, "
        tail = f"[{', '.join(events)}], NULL) = {len(events)}"
        if split:
            self.lines += [f"{head} <unfinished ...>", f"{pid}  <... io_getevents resumed>{tail}"]
        else:
            self.lines.append(head + tail)

    def calls(self, tmp: Path) -> list[Call]:
        trace = tmp / "trace"
        trace.write_text("\n".join(self.lines) + "\n")
        return _crashmodel.parse_trace(str(trace))


def _durable_after_each_call(tmp: Path, t: _Strace) -> dict[int, tuple[bytes | None, list[str]]]:
    """After each call that changed the durable state: (durable data of d/f, durable names
    in d)."""
    model = Model(t.root)
    out = {}
    for m, _, index in _crashmodel.replay(t.calls(tmp), model, str(tmp / "acks")):
        d = m.dirs[t.path("d")]
        f = d.entries.get("f")
        out[index] = (f.durable if isinstance(f, _crashmodel.Inode) else None, sorted(d.durable or {}))
    return out


@pytest.fixture
def aio_trace(tmp_path: Path) -> _Strace:
    (tmp_path / "root" / "d").mkdir(parents=True)
    return _Strace(str(tmp_path / "root"))


def test_model_aio_fsync_is_durable_when_its_event_is_reaped(tmp_path: Path, aio_trace: _Strace) -> None:
    t = aio_trace
    t.create(100, 3, "d/f", b"first")
    t.submit(100, [t.cb(0, 3, "d/f"), t.cb(1, 4, "d")], split=True)  # calls 2
    t.lines.insert(-1, f"101  write({t.fd(7, 'd/f')}, \"{_hx(b'+other')}\", 6) = 6")  # call 3: in the submit
    t.write(100, 3, "d/f", b"+late")  # call 4: after the submit: in no snapshot
    t.getevents(100, [_event(1)], split=True)  # call 5: the directory
    t.getevents(100, [_event(0)])  # call 6: the file
    assert [c.name for c in t.calls(tmp_path)] == ["openat", "write", "write", "io_submit", "write",
                                                    "io_getevents", "io_getevents"]
    states = _durable_after_each_call(tmp_path, t)
    # Nothing durable before the io_getevents that reaps each request returns; then the
    # state as it was when the io_submit started ("+other" completed after that start).
    assert states == {0: (None, []), 6: (None, ["f"]), 7: (b"first", ["f"])}


def test_model_aio_fsync_that_failed_makes_nothing_durable(tmp_path: Path, aio_trace: _Strace) -> None:
    t = aio_trace
    t.create(100, 3, "d/f", b"first")
    t.submit(100, [t.cb(0, 3, "d/f"), t.cb(1, 4, "d")])
    t.getevents(100, [_event(0, res=-5), _event(1, res=-28)])
    assert _durable_after_each_call(tmp_path, t) == {0: (None, [])}


def test_model_aio_only_the_requests_io_submit_took_are_in_flight(tmp_path: Path, aio_trace: _Strace) -> None:
    t = aio_trace
    t.create(100, 3, "d/f", b"first")
    t.submit(100, [t.cb(0, 4, "d"), t.cb(1, 3, "d/f")], ret=1)
    t.getevents(100, [_event(0)])
    assert _durable_after_each_call(tmp_path, t) == {0: (None, []), 4: (None, ["f"])}
    t.getevents(100, [_event(1)])  # the refused one, reaped: the model cannot explain it
    with pytest.raises(ValueError, match="no traced io_submit of process 100 has in flight"):
        _durable_after_each_call(tmp_path, t)


def test_model_aio_completions_are_matched_within_their_process(tmp_path: Path, aio_trace: _Strace) -> None:
    # Two processes (forked workers) whose contexts have the same address and whose requests
    # the same aio_data; a thread of the second (clone3 with CLONE_THREAD) reaps its own.
    t = aio_trace
    t.create(100, 3, "d/f", b"first")
    t.lines.append("200  clone3({flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|"
                   "CLONE_SYSVSEM|CLONE_SETTLS|CLONE_PARENT_SETTID|CLONE_CHILD_CLEARTID, "
                   "child_tid=0x7f7fb3fd0990, parent_tid=0x7f7fb3fd0990, exit_signal=0, "
                   "stack=0x7f7fb37d0000, stack_size=0x7fff80, tls=0x7f7fb3fd06c0} "
                   "=> {parent_tid=[201]}, 88) = 201")
    t.submit(100, [t.cb(0, 3, "d/f")])
    t.submit(201, [t.cb(0, 5, "d")])
    t.getevents(100, [_event(0)])  # call 5: process 100's: the file only
    t.getevents(200, [_event(0)])  # call 6: process 200's: the directory
    assert _durable_after_each_call(tmp_path, t) == {0: (None, []), 6: (b"first", []), 7: (b"first", ["f"])}


@pytest.mark.parametrize("op", ["IOCB_CMD_PREAD", "IOCB_CMD_NOOP", "42 /* IOCB_CMD_??? */"])
def test_model_aio_refuses_other_requests(tmp_path: Path, aio_trace: _Strace, op: str) -> None:
    t = aio_trace
    t.create(100, 3, "d/f", b"first")
    t.submit(100, [t.cb(0, 4, "d"), t.cb(1, 3, "d/f", op=op)], ret=-1)
    with pytest.raises(NotImplementedError, match="only IOCB_CMD_FSYNC and IOCB_CMD_FDSYNC"):
        _durable_after_each_call(tmp_path, t)


def test_model_aio_fdsync_counts_and_pwrite_iocb_is_refused(tmp_path: Path, aio_trace: _Strace) -> None:
    t = aio_trace
    t.create(100, 3, "d/f", b"first")
    t.submit(100, [t.cb(7, 3, "d/f", op="IOCB_CMD_FDSYNC")])
    t.getevents(100, [_event(7)])
    assert _durable_after_each_call(tmp_path, t) == {0: (None, []), 4: (b"first", [])}
    # as strace printed a PWRITE request
    t.submit(100, [f"{{aio_data=0x9, aio_lio_opcode=IOCB_CMD_PWRITE, aio_fildes={t.fd(3, 'd/f')}, "
                   f'aio_buf="{_hx(bytes(10))}", aio_nbytes=10, aio_offset=0}}'])
    with pytest.raises(NotImplementedError, match="IOCB_CMD_PWRITE"):
        _durable_after_each_call(tmp_path, t)


def test_model_aio_fails_on_an_abbreviated_array(tmp_path: Path, aio_trace: _Strace) -> None:
    t = aio_trace
    t.submit(100, [t.cb(0, 3, "d/f"), t.cb(1, 4, "d"), "..."], ret=3)
    with pytest.raises(ValueError, match="strace abbreviated the array"):
        t.calls(tmp_path)
    t.lines = [f"100  io_getevents({CTX}, 1, 3, [{_event(0)}, {_event(1)}, ...], NULL) = 3"]
    with pytest.raises(ValueError, match="strace abbreviated the array"):
        t.calls(tmp_path)


# -- recovery of interrupted moves ------------------------------------------------------------
class Q(enum.Enum):
    A = "a"
    B = "b"


@pytest.fixture
def spool(tmp_path: Path) -> multispool.Spool[bytes]:
    return multispool.Spool.create(tmp_path / "spool", multispool.Spoolable(queues=Q))  # type: ignore[arg-type]


def _where(spool: multispool.Spool[bytes], name: str) -> list[str]:
    out = []
    for q in ("a", "b"):
        for d in (q, f"{q}/.checkout"):
            for n in os.listdir(os.path.join(spool.dir, d)):
                if n == name or n.endswith(name):
                    out.append(f"{d}/{n}")
    return sorted(out)


def test_full_mode_leaves_no_keep_link_after_each_operation(spool: multispool.Spool[bytes]) -> None:
    e = spool.enqueue(Q.A, {"k": 1}, b"d")
    co = spool.checkout(e)
    assert _where(spool, e.name) == [f"a/.checkout/{e.name}"]
    co.release()
    assert _where(spool, e.name) == [f"a/{e.name}"]
    co = spool.checkout(e)
    co.save(Q.B)
    assert _where(spool, e.name) == [f"b/{e.name}"]


def test_recover_restores_an_entry_kept_only_by_its_keep_link(spool: multispool.Spool[bytes]) -> None:
    # A crash between the claim's link and rename, where the queue's fsync recorded only
    # the keep link (the name itself not durable in the checkout dir).
    e = spool.enqueue(Q.A, {"k": 1}, b"d")
    qfile = os.path.join(spool.dir, "a", e.name)
    os.rename(qfile, os.path.join(spool.dir, "a", ".~" + e.name))
    assert spool.list(Q.A) == []
    spool.recover_checkouts()
    assert [x.name for x in spool.list(Q.A)] == [e.name]
    assert _where(spool, e.name) == [f"a/{e.name}"]
    with spool.checkout(e) as co:
        assert co.contents == {"k": 1} and co.data_file.load() == b"d"


def test_recover_drops_the_keep_link_of_a_finished_move(spool: multispool.Spool[bytes]) -> None:
    e = spool.enqueue(Q.A, {"k": 1}, b"d")
    os.link(os.path.join(spool.dir, "a", e.name), os.path.join(spool.dir, "a", ".~" + e.name))
    os.rename(os.path.join(spool.dir, "a", e.name), os.path.join(spool.dir, "a", ".checkout", e.name))
    # the owner died here (no lock held): recovery resolves the keep link, then the checkout
    assert [x.name for x in spool.recover_checkouts()] == [e.name]
    assert _where(spool, e.name) == [f"a/{e.name}"]


def test_keep_link_of_a_live_move_is_left_alone(spool: multispool.Spool[bytes]) -> None:
    e = spool.enqueue(Q.A, {"k": 1}, b"d")
    co = spool.checkout(e)  # we hold the owner lock
    keep = os.path.join(spool.dir, "a", ".checkout", ".~" + e.name)
    os.link(co.path, keep)  # as a save would, between its link and rename
    spool.recover_checkouts()
    assert os.path.exists(keep) and os.path.exists(co.path)
    os.unlink(keep)
    co.remove()


def test_clean_abandoned_spares_an_entry_kept_by_a_keep_link(spool: multispool.Spool[bytes]) -> None:
    e = spool.enqueue(Q.A, {"k": 1}, b"d")
    os.rename(os.path.join(spool.dir, "a", e.name), os.path.join(spool.dir, "a", ".~" + e.name))
    assert spool.clean_abandoned(older_than=0) == []
    spool.recover_checkouts()
    assert [x.name for x in spool.list(Q.A)] == [e.name]


def test_dead_checkout_also_queued_is_not_handed_out_twice(spool: multispool.Spool[bytes]) -> None:
    # A claim cut by a crash after its rename, before the queue's removal was durable:
    # the same file in A and A/.checkout. Recovery must not put a second copy in A.
    e = spool.enqueue(Q.A, {"k": 1}, b"d")
    os.link(os.path.join(spool.dir, "a", e.name), os.path.join(spool.dir, "a", ".checkout", e.name))
    assert spool.recover_checkouts() == []
    assert _where(spool, e.name) == [f"a/{e.name}"]


def _save_cut_after_its_rename(spool: multispool.Spool[bytes]) -> multispool.Entry[Any, bytes]:
    """A save from A into B cut by a crash after its rename: B holds the new metadata,
    and the old copy is still in A's checkout dir, its owner dead."""
    e = spool.enqueue(Q.A, {"k": 1}, b"d")
    co = spool.checkout(e)
    co.contents = {"k": 2}
    co.save(Q.B)
    Path(spool.dir, "a", ".checkout", e.name).write_bytes(b'{"k":1}')
    return e


def test_dead_checkout_differing_from_its_queued_copy_goes_to_lost_found(
    spool: multispool.Spool[bytes],
) -> None:
    # A save into B cut after its rename: B holds the new metadata; a differing old copy in
    # the checkout dir is put aside, not deleted, and not queued.
    e = _save_cut_after_its_rename(spool)
    spool.recover_checkouts()
    assert _where(spool, e.name) == [f"b/{e.name}"]
    assert _lostfound.items(spool.dir) == [e.name]
    assert Path(spool.dir, ".lost+found", e.name, "a.checkout").read_bytes() == b'{"k":1}'


def _lstat_fails_at(monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    real_lstat = os.lstat

    def lstat(path: Any, *args: Any, **kw: Any) -> os.stat_result:
        if full(path, kw.get("dir_fd")) == hidden:
            raise OSError(5, "Input/output error", hidden)
        return real_lstat(path, *args, **kw)

    monkeypatch.setattr(os, "lstat", lstat)


def _left_in_place(caplog: pytest.LogCaptureFixture, path: str) -> bool:
    return any("left in place" in r.getMessage() and path in r.getMessage() for r in caplog.records)


def test_dead_checkout_whose_queued_copy_cannot_be_looked_up_is_left_in_place(
    spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A save into B cut after its rename, and B's copy cannot be looked up (EIO, or a
    # queue dir its user may not search): not knowing is not "not there". Putting the old
    # copy back into A would hand the entry out twice.
    e = _save_cut_after_its_rename(spool)
    hidden = os.path.join(spool.dir, "b", e.name)
    _lstat_fails_at(monkeypatch, hidden)
    with caplog.at_level(logging.WARNING, logger="multispool"):
        assert spool.recover_checkouts() == []
    monkeypatch.undo()
    assert _left_in_place(caplog, hidden)
    assert _where(spool, e.name) == [f"a/.checkout/{e.name}", f"b/{e.name}"]


def test_keep_link_whose_entry_cannot_be_looked_up_is_left_in_place(
    spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A move from A to B cut by a crash after its rename, its keep link left in A; B's
    # copy cannot be looked up. Restoring the keep link would queue the entry in A too.
    e = spool.enqueue(Q.A, {"k": 1}, b"d")
    a, b = os.path.join(spool.dir, "a"), os.path.join(spool.dir, "b")
    os.link(os.path.join(a, e.name), os.path.join(a, ".~" + e.name))
    os.rename(os.path.join(a, e.name), os.path.join(b, e.name))
    _lstat_fails_at(monkeypatch, os.path.join(b, e.name))
    with caplog.at_level(logging.WARNING, logger="multispool"):
        assert spool.recover_checkouts() == []
    monkeypatch.undo()
    assert _left_in_place(caplog, os.path.join(b, e.name))
    assert _where(spool, e.name) == [f"a/.~{e.name}", f"b/{e.name}"]
    spool.recover_checkouts()  # the fault gone: the finished move's keep link goes
    assert _where(spool, e.name) == [f"b/{e.name}"]


def test_clean_abandoned_spares_an_entry_it_cannot_look_up(
    spool: multispool.Spool[bytes], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # An entry queued after clean_abandoned listed the queues, whose queue file then cannot
    # be looked up (EIO): not knowing is not "abandoned"; its data must stay.
    e = spool.enqueue(Q.A, {"k": 1}, b"d")
    a = os.path.join(spool.dir, "a")
    real_listdir = os.listdir

    def listdir(path: Any = ".") -> list[Any]:
        names = real_listdir(path)
        return [n for n in names if n != e.name] if full(path) == a else names

    monkeypatch.setattr(os, "listdir", listdir)
    _lstat_fails_at(monkeypatch, os.path.join(a, e.name))
    with caplog.at_level(logging.WARNING, logger="multispool"):
        assert spool.clean_abandoned(older_than=0) == []
    monkeypatch.undo()
    assert _left_in_place(caplog, os.path.join(a, e.name))
    assert [x.name for x in spool.list(Q.A)] == [e.name]
    with spool.checkout(e) as co:
        assert co.data_file.load() == b"d"
        co.remove()


# -- repair never deletes data ----------------------------------------------------------------
def test_abandoned_enqueue_goes_to_lost_found_and_can_be_requeued(spool: multispool.Spool[bytes]) -> None:
    # Issue 12 item 2: an acknowledged enqueue whose rename a crash lost ("file" mode):
    # metadata in .tmp, data in .data, a registry file; repair used to delete them.
    # The enqueuer is a process that reserved the name, wrote both files, and died.
    r = run_python(
        """
        import enum, sys, multispool
        Q = enum.Enum("Q", {"A": "a", "B": "b"})
        spool = multispool.Spool.load(sys.argv[1], multispool.Spoolable(queues=Q))
        name = spool.reserve_name()
        open(f"{sys.argv[1]}/.tmp/{name}", "wb").write(b'{"k":7}')
        open(f"{sys.argv[1]}/.data/{name}", "wb").write(b"payload")
        print(name)
        """,
        spool.dir,
    )
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    limits = multispool.Limits(max_tmp_file_age=0)
    mon = multispool.Monitor(spool.dir, spool.spoolable, limits)
    from multispool._monitor import repair

    actions = repair(spool, limits, mon.run_once(), dry_run=False)
    assert any("abandoned enqueue" in a for a in actions), actions
    assert os.listdir(os.path.join(spool.dir, ".registry")) == []
    assert os.listdir(os.path.join(spool.dir, ".tmp")) == []
    assert _lostfound.items(spool.dir) == [name]
    item = Path(spool.dir, ".lost+found", name)
    assert (item / "metadata").read_bytes() == b'{"k":7}' and (item / "data").read_bytes() == b"payload"

    back = _lostfound.requeue(spool, name, Q.B)
    assert _lostfound.items(spool.dir) == []
    with spool.checkout(back) as co:
        assert co.contents == {"k": 7} and co.data_file.load() == b"payload"
    assert multispool.Monitor(spool.dir, spool.spoolable).run_once() == []


def test_orphans_go_to_lost_found_with_their_origin(spool: multispool.Spool[bytes]) -> None:
    Path(spool.dir, "a", "junk").write_bytes(b"{}")
    Path(spool.dir, ".data", "junk").write_bytes(b"x")
    limits = multispool.Limits(max_tmp_file_age=0)
    mon = multispool.Monitor(spool.dir, spool.spoolable, limits)
    from multispool._monitor import repair

    repair(spool, limits, mon.run_once(), dry_run=False)
    assert sorted(os.listdir(Path(spool.dir, ".lost+found", "junk"))) == ["a", "data"]
    assert mon.run_once() == []
    # a second orphan of the same name gets its own item
    Path(spool.dir, "a", "junk").write_bytes(b"{}")
    repair(spool, limits, mon.run_once(), dry_run=False)
    assert _lostfound.items(spool.dir) == ["junk", "junk.1"]


def test_orphans_from_queues_named_data_or_metadata_are_all_kept(tmp_path: Path) -> None:
    # Queue dirs named "data" and "metadata" are valid; their orphans' lost+found labels
    # must not overwrite the files put aside from .data and .tmp (repair never deletes
    # data), and the item must still requeue with the right file as its metadata.
    QD = enum.Enum("QD", {"DATA": "data", "META": "metadata"})
    spool = multispool.Spool.create(tmp_path / "spool", multispool.Spoolable(queues=QD))
    Path(spool.dir, ".data", "junk").write_bytes(b"payload")
    Path(spool.dir, "data", "junk").write_bytes(b'{"from":"queue data"}')
    Path(spool.dir, ".tmp", "j2").write_bytes(b'{"from":"tmp"}')
    Path(spool.dir, "metadata", "j2").write_bytes(b'{"from":"queue metadata"}')
    limits = multispool.Limits(max_tmp_file_age=0)
    mon = multispool.Monitor(spool.dir, spool.spoolable, limits)
    from multispool._monitor import repair

    repair(spool, limits, mon.run_once(), dry_run=False)
    assert mon.run_once() == []
    kept = sorted(
        p.read_bytes() for item in Path(spool.dir, ".lost+found").iterdir() for p in item.iterdir()
    )
    assert kept == sorted([b"payload", b'{"from":"queue data"}', b'{"from":"tmp"}',
                           b'{"from":"queue metadata"}'])
    back = _lostfound.requeue(spool, "junk", QD.DATA)
    with spool.checkout(back) as co:
        assert co.contents == {"from": "queue data"} and co.data_file.load() == b"payload"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_lost_found_dirs_follow_the_spoolable_dir_mode(tmp_path: Path) -> None:
    # A spool shared by a group (dir_mode 0o770): what repair keeps aside must be
    # reachable by the group too, like every other directory the library creates.
    sp = multispool.Spoolable(queues=Q, dir_mode=0o770, file_mode=0o660)
    old = os.umask(0)
    try:
        spool = multispool.Spool.create(tmp_path / "spool", sp)  # type: ignore[arg-type]
        Path(spool.dir, "a", "junk").write_bytes(b"{}")
        limits = multispool.Limits(max_tmp_file_age=0)
        from multispool._monitor import repair

        repair(spool, limits, multispool.Monitor(spool.dir, sp, limits).run_once(), dry_run=False)
    finally:
        os.umask(old)
    for d in (Path(spool.dir, ".lost+found"), Path(spool.dir, ".lost+found", "junk")):
        assert d.stat().st_mode & 0o777 == 0o770, d


def test_put_aside_never_renames_over_a_file_of_the_item(spool: multispool.Spool[bytes]) -> None:
    # Two files with one label (queue "a"'s checkout dir and a queue named "a.checkout"
    # give the same one): both are kept.
    a = Path(spool.dir, "a", "x")
    b = Path(spool.dir, "b", "x")
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    from multispool._layout import Layout

    item = _lostfound.put_aside(Layout(spool.dir), "x", [(str(a), "same"), (str(b), "same")], sync=True)
    assert item is not None
    assert sorted(p.read_bytes() for p in Path(item).iterdir()) == [b"one", b"two"]


def test_requeue_refuses_an_item_without_clear_metadata(spool: multispool.Spool[bytes]) -> None:
    item = Path(spool.dir, ".lost+found", "x")
    item.mkdir(parents=True)
    (item / "data").write_bytes(b"d")
    with pytest.raises(multispool.SpoolError, match="which file is the metadata"):
        _lostfound.requeue(spool, "x", Q.A)
    with pytest.raises(multispool.EntryNotFoundError):
        _lostfound.requeue(spool, "nope", Q.A)
    assert (item / "data").read_bytes() == b"d"


def test_requeue_never_follows_a_symlinked_item(spool: multispool.Spool[bytes], tmp_path: Path) -> None:
    # A symlink planted as a lost+found item must not make requeue move files from
    # wherever it points into the spool (nor leave a half-made entry behind).
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "metadata").write_bytes(b'{"secret":1}')
    Path(spool.dir, ".lost+found").mkdir()
    os.symlink(outside, Path(spool.dir, ".lost+found", "evil"))
    with pytest.raises(multispool.SpoolError, match="evil"):
        _lostfound.requeue(spool, "evil", Q.A)
    assert (outside / "metadata").read_bytes() == b'{"secret":1}'
    for d in (".registry", ".tmp", ".data", "a"):
        assert [n for n in os.listdir(Path(spool.dir, d)) if n != ".checkout"] == [], d


def test_requeue_refuses_an_item_holding_a_directory(spool: multispool.Spool[bytes]) -> None:
    item = Path(spool.dir, ".lost+found", "x")
    (item / "metadata").mkdir(parents=True)
    with pytest.raises(multispool.SpoolError, match="metadata"):
        _lostfound.requeue(spool, "x", Q.A)
    assert (item / "metadata").is_dir()
    assert [n for n in os.listdir(Path(spool.dir, "a")) if n != ".checkout"] == []
    assert os.listdir(Path(spool.dir, ".registry")) == []


def test_failed_requeue_puts_the_item_back(spool: multispool.Spool[bytes]) -> None:
    # A requeue that fails half-way (here the queue directory vanished) must leave the
    # item as it was in .lost+found, not its files as an abandoned enqueue (which
    # clean_abandoned deletes: repair never deletes data).
    item = Path(spool.dir, ".lost+found", "x")
    item.mkdir(parents=True)
    (item / "metadata").write_bytes(b'{"k":1}')
    (item / "data").write_bytes(b"payload")
    shutil.rmtree(Path(spool.dir, "b"))
    with pytest.raises(FileNotFoundError):
        _lostfound.requeue(spool, "x", Q.B)
    assert (item / "metadata").read_bytes() == b'{"k":1}'
    assert (item / "data").read_bytes() == b"payload"
    for d in (".registry", ".tmp", ".data"):
        assert os.listdir(Path(spool.dir, d)) == [], d
    os.makedirs(Path(spool.dir, "b", ".checkout"))
    assert spool.clean_abandoned(older_than=0) == []
    back = _lostfound.requeue(spool, "x", Q.B)
    with spool.checkout(back) as co:
        assert co.contents == {"k": 1} and co.data_file.load() == b"payload"


def test_cli_shows_lost_found_and_requeues_from_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from multispool.cli import main

    d = str(tmp_path / "sp")
    assert main(["init", d, "--queue", "in"]) == 0
    Path(d, ".data", "junk").write_bytes(b"payload")
    Path(d, ".tmp", "junk").write_bytes(b'{"k": 1}')
    capsys.readouterr()
    assert main(["fsck", d, "--repair", "--max-tmp-file-age", "0"]) == 0
    out = capsys.readouterr().out
    assert "moved orphan .tmp/junk to .lost+found" in out and "1 item in .lost+found" in out
    assert main(["status", d]) == 0
    assert "1 item in .lost+found" in capsys.readouterr().out
    assert main(["lost+found", d, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"junk": {"data": 7, "metadata": 8}}
    assert main(["lost+found", d, "junk", "--to", "in"]) == 0
    assert "requeued junk into in as " in capsys.readouterr().out
    assert main(["lost+found", d]) == 0
    assert capsys.readouterr().out.strip() == "nothing in .lost+found"
    spool = multispool.Spool.load(d, multispool.cli.make_spoolable(["in"]))
    [e] = spool.list(spool.spoolable.queues("in"))
    assert e.direct.contents() == b'{"k": 1}' and e.direct.data_file().load() == b"payload"
