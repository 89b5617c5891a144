"""API.md, claim by claim: a small test for each concrete claim of the contract that no
other test pins through the public names (defaults, attribute names, error types,
on-disk names). Tests are named after the API.md section (``test_sN_...``) and use only
what API.md names, plus the file system to look at the spool."""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import multispool
from _procs import child_env, find_sort
from conftest import Cog, Queue

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0  # deadline for something that must happen
NO_RESCAN = 30.0  # a rescan interval no test waits for
DAY = 86400.0


def wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def age(path: Path, seconds: float) -> None:
    """Make ``path`` look ``seconds`` old (mtime; the Monitor and clean_abandoned go by it)."""
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


# -- §1 On-disk layout --------------------------------------------------------------------


def test_s1_the_reservation_lives_for_the_whole_life_and_claims_are_renames(
    spool: multispool.Spool[Any, bytes],
) -> None:
    """``.registry/NAME`` is one empty file from reserve_name to remove; a checkout and
    its release move the queue file itself (rename keeps the inode; a copy would not)."""
    root = Path(spool.dir)
    name = spool.reserve_name("life_")
    reg = root / ".registry" / name
    first = os.stat(reg)
    assert first.st_size == 0

    def same_reservation() -> bool:
        st = os.stat(reg)
        return (st.st_ino, st.st_size) == (first.st_ino, 0)

    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x", use=name)
    assert same_reservation()
    qfile = root / "queue1" / name
    ino = os.stat(qfile).st_ino
    co = spool.checkout(e)
    assert not qfile.exists()
    assert os.stat(root / "queue1" / ".checkout" / name).st_ino == ino
    assert same_reservation()
    with co:
        pass  # released unchanged: renamed back
    assert os.stat(qfile).st_ino == ino and same_reservation()
    spool.checkout(e).save(Queue.QUEUE2)
    assert same_reservation()
    spool.checkout(multispool.Entry(spool, Queue.QUEUE2, name)).remove()
    assert not reg.exists()


# -- §2 Describing what is spooled --------------------------------------------------------


def test_s2_remove_is_the_type_of_REMOVE() -> None:
    assert type(multispool.REMOVE) is multispool.Remove
    assert isinstance(multispool.REMOVE, multispool.Remove)
    assert multispool.Remove() is multispool.REMOVE  # one instance: compare with `is`


def test_s2_msgspec_data_stores_json_by_default(tmp_path: Path) -> None:
    class Payload(msgspec.Struct):
        x: int

    sp = multispool.Spoolable(queues=Queue, data=multispool.MsgspecData(Payload))
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    e = spool.enqueue(Queue.QUEUE1, None, Payload(x=3))
    assert msgspec.json.decode((tmp_path / "spool" / ".data" / e.name).read_bytes()) == {"x": 3}
    assert e.direct.data_file().load() == Payload(x=3)


def test_s2_durations_accept_timedelta_everywhere(spool: multispool.Spool[Any, bytes]) -> None:
    """Every duration argument takes a datetime.timedelta as well as float seconds."""
    td = datetime.timedelta

    def due_in(e: multispool.Entry[Any, bytes]) -> float:
        due = e.due()
        assert due is not None
        return due - time.time()

    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"", delay=td(seconds=30))
    assert 20 < due_in(e) <= 30
    spool.checkout(e).save(Queue.QUEUE1, delay=td(seconds=40))
    assert 30 < due_in(e) <= 40

    r2 = spool.enqueue(Queue.QUEUE2, Cog(n=2), b"")
    with spool.reader(Queue.QUEUE2, rescan_interval=td(seconds=30), poll_interval=td(milliseconds=50)) as r:
        r.iter_available(lambda m, d: multispool.Retry(td(seconds=50)))
        assert 40 < due_in(r2) <= 50
        t0 = time.monotonic()
        assert r.dequeue(timeout=td(milliseconds=50)) is None  # its only entry is not due
        assert time.monotonic() - t0 >= 0.045

    r3 = spool.enqueue(Queue.QUEUE3, Cog(n=3), b"")
    stop = threading.Event()

    def fail(m: Any, d: Any) -> Any:
        stop.set()
        raise RuntimeError("handler failed")

    policy = multispool.Backoff(first=td(seconds=60), max=td(hours=1), jitter=0.0)
    with spool.reader(Queue.QUEUE3, rescan_interval=NO_RESCAN) as r:
        r.iter(fail, stop=stop, on_error=policy)
    assert 50 < due_in(r3) <= 60 and r3.attempts() == 1

    old = spool.enqueue(Queue.QUEUE1, Cog(n=4), b"", reserve="old_")
    age(Path(spool.dir) / "queue1" / old.name, 10)
    lim = multispool.Limits(
        max_checked_out_age=td(minutes=10), max_tmp_file_age=td(minutes=10),
        max_queue_ages={Queue.QUEUE1: td(seconds=1)},
    )  # fmt: skip
    problems = multispool.Monitor(spool.dir, spool.spoolable, limits=lim).run_once()
    assert [(type(p), p.file.filename) for p in problems] == [(multispool.TooOld, old.name)]
    multispool.MonitorDaemon(check_every=td(seconds=1))  # accepted (see the §9 daemon test)


# -- §3 Opening a spool -------------------------------------------------------------------


@pytest.mark.parametrize("part", ["queue2", "queue2/.checkout", ".data"])
@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_s3_create_on_a_spool_with_a_non_directory_part_is_not_a_spool(
    tmp_path: Path, spoolable: multispool.Spoolable[Any, bytes], part: str, kind: str
) -> None:
    """A spool whose queue, checkout or data directory is a file (or a symlink) lacks
    that directory: ``load`` says NotASpoolError, and so must ``create``, which cannot
    create what is missing (it raised FileExistsError, no SpoolError), naming the path
    and changing nothing."""
    root = tmp_path / "spool"
    multispool.Spool.create(root, spoolable)
    p = root / part
    shutil.rmtree(p)
    if kind == "file":
        p.write_bytes(b"")
    else:
        (tmp_path / "elsewhere").mkdir()
        p.symlink_to(tmp_path / "elsewhere")
    before = find_sort(root)
    for op in (
        lambda: multispool.Spool.load(root, spoolable),
        lambda: multispool.Spool.create(root, spoolable),
        lambda: multispool.Spool.load(root, spoolable, create_if_missing=True),
    ):
        with pytest.raises(multispool.NotASpoolError) as ei:
            op()
        assert str(p) in str(ei.value)
    assert find_sort(root) == before


# -- §6 Reading a queue -------------------------------------------------------------------


def _inotify_instances() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                n += 1
    return n


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts inotify instances")
def test_s6_default_observer_is_auto_native_on_a_local_filesystem(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MULTISPOOL_OBSERVER", raising=False)
    fs = subprocess.run(["stat", "-f", "-c", "%T", spool.dir], capture_output=True, text=True).stdout.strip()
    if fs in ("nfs", "fuseblk", "fuse", "cifs", "smb2", "v9fs", "9p"):
        pytest.skip("the test spool is on a network or FUSE filesystem")
    before = _inotify_instances()
    with spool.reader(Queue.QUEUE1) as r:
        assert _inotify_instances() == before + 1
        e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"")
        co = r.dequeue(timeout=WAIT)
        assert co is not None and co.name == e.name
        co.remove()
    assert _inotify_instances() == before


# -- §8 Crash recovery --------------------------------------------------------------------


def test_s8_clean_abandoned_default_age_is_600_seconds(spool: multispool.Spool[Any, bytes]) -> None:
    """An abandoned enqueue (registry, tmp and data files, no queue file, no owner) is
    removed by ``clean_abandoned()`` once older than 600 s, not before."""
    root = Path(spool.dir)
    files = [root / d / "gone_1" for d in (".registry", ".tmp", ".data")]
    for f in files:
        f.write_bytes(b"")
    age(files[0], 590)
    assert spool.clean_abandoned() == []
    assert all(f.exists() for f in files)
    age(files[0], 610)
    assert spool.clean_abandoned() == ["gone_1"]
    assert not any(f.exists() for f in files)


# -- §9 Monitor ---------------------------------------------------------------------------


def test_s9_dir_names_on_disk() -> None:
    D = multispool.Dir
    got = [D.REGISTRY, D.TMP, D.DATA, D.queue(Queue.QUEUE1), D.checkout(Queue.QUEUE1)]
    assert [d.name_on_disk for d in got] == [".registry", ".tmp", ".data", "queue1", "queue1/.checkout"]


def test_s9_default_limits_are_600_seconds_and_no_queue_age(spool: multispool.Spool[Any, bytes]) -> None:
    """``Limits()`` (and ``Monitor`` without ``limits``): tmp files and checkouts are
    TooOld past 600 s; an entry waiting in a queue is never TooOld (no queue limit)."""
    root = Path(spool.dir)
    waiting = spool.enqueue(Queue.QUEUE2, Cog(n=1), b"", reserve="w")
    age(root / "queue2" / waiting.name, 30 * DAY)
    co = spool.checkout(spool.enqueue(Queue.QUEUE1, Cog(n=2), b"", reserve="c"))  # owner alive
    co_file = root / "queue1" / ".checkout" / co.name
    staging = spool.reserve_name("t")  # an enqueue in progress: its owner lock is held
    tmp_file = root / ".tmp" / staging
    tmp_file.write_bytes(b"{}")
    monitors = [
        multispool.Monitor(spool.dir, spool.spoolable),
        multispool.Monitor(spool.dir, spool.spoolable, limits=multispool.Limits()),
    ]
    age(co_file, 590)
    age(tmp_file, 590)
    for m in monitors:
        assert m.run_once() == []
    age(co_file, 610)
    age(tmp_file, 610)
    for m in monitors:
        got = sorted((type(p).__name__, p.file.filename, p.dir.name_on_disk) for p in m.run_once())
        assert got == [("TooOld", co.name, "queue1/.checkout"), ("TooOld", staging, ".tmp")]
    co.remove()


def test_s9_daemon_alerts_after_more_than_two_checks_by_default(spool: multispool.Spool[Any, bytes]) -> None:
    problem = multispool.Orphaned(multispool.FileWithMtime("x", 1.0), multispool.Dir.TMP)

    class Stub(multispool.Monitor):
        calls = 0

        def run_once(self) -> list[Any]:
            self.calls += 1
            return [problem] if self.calls <= 5 else []

    mon = Stub(spool.dir, spool.spoolable)
    events: list[tuple[Any, int]] = []
    stop = threading.Event()
    t = multispool.MonitorDaemon(check_every=datetime.timedelta(milliseconds=5)).start(
        mon, lambda ev: events.append((ev, mon.calls)), stop
    )
    try:
        wait_for(lambda: len(events) >= 2, "start and end")
    finally:
        stop.set()
        t.join(WAIT)
    assert not t.is_alive()
    (start, n_start), (end, n_end) = events[:2]
    assert isinstance(start, multispool.Start) and start.problem == problem and n_start == 3
    assert isinstance(end, multispool.End) and end.problem == problem and n_end == 6
    assert isinstance(start.time, float) and end.time >= start.time


# -- §11 Command line ---------------------------------------------------------------------


def test_s11_the_multispool_command_is_the_cli(tmp_path: Path) -> None:
    """The ``multispool`` console script of the package runs the same CLI as
    ``python -m multispool``."""
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    module, func = scripts["multispool"].split(":")
    # What the generated script does: import the target and exit with what it returns.
    code = f"import sys; from {module} import {func} as f; sys.argv[0] = 'multispool'; sys.exit(f())"

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, *argv]
        return subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=60)

    for args, rc in ((["--version"], 0), (["status", str(tmp_path / "nope")], 2)):
        script = run("-c", code, *args)
        module_run = run("-m", "multispool", *args)
        assert (script.returncode, script.stdout, script.stderr) == (
            module_run.returncode, module_run.stdout, module_run.stderr,
        )  # fmt: skip
        assert script.returncode == rc
    assert script.stderr.count("\n") == 1 and "Traceback" not in script.stderr


# -- Defaults of every documented signature (§2-§12) --------------------------------------


def _aio() -> Any:
    import multispool.aio

    return multispool.aio


DEFAULTS: list[tuple[str, Callable[[], Any], dict[str, Any]]] = [
    ("s2-Spoolable", lambda: multispool.Spoolable, {
        "metadata": Any, "metadata_codec": "json", "throttle": None, "durability": "full",
        "quarantine": None,
    }),
    ("s2-MsgspecData", lambda: multispool.MsgspecData, {"format": "json"}),
    ("s3-Spool.load", lambda: multispool.Spool.load, {"create_if_missing": False}),
    ("s4-reserve_name", lambda: multispool.Spool.reserve_name, {"seed": None}),
    ("s4-enqueue", lambda: multispool.Spool.enqueue, {"reserve": None, "use": None, "delay": None}),
    ("s6-reader", lambda: multispool.Spool.reader, {
        "observer": "auto", "rescan_interval": 5.0, "recover": False, "poll_interval": 0.1,
    }),
    ("s6-iter", lambda: multispool.QueueReader.iter, {"stop": None, "on_error": None}),
    ("s6-dequeue", lambda: multispool.QueueReader.dequeue, {"stop": None, "timeout": None}),
    ("s8-recover_checkouts", lambda: multispool.Spool.recover_checkouts, {"queue": None}),
    ("s8-clean_abandoned", lambda: multispool.Spool.clean_abandoned, {"older_than": 600}),
    ("s9-Limits", lambda: multispool.Limits, {
        "max_checked_out_age": 600, "max_tmp_file_age": 600, "max_queue_ages": None,
    }),
    ("s9-Monitor", lambda: multispool.Monitor, {"limits": None}),
    ("s9-MonitorDaemon", lambda: multispool.MonitorDaemon, {"check_every": 15, "alert_after_cycles": 2}),
    ("s9-MonitorDaemon.start", lambda: multispool.MonitorDaemon.start, {"stop": None}),
    ("s10-AsyncSpool.load", lambda: _aio().AsyncSpool.load, {"create_if_missing": False}),
    ("s12-Save", lambda: multispool.Save, {"delay": None}),
    ("s12-co.save", lambda: multispool.CheckedOutEntry.save, {"delay": None}),
    ("s12-Retry", lambda: multispool.Retry, {"metadata": None}),
    ("s12-Backoff", lambda: multispool.Backoff, {
        "first": 1.0, "factor": 2.0, "max": 3600.0, "jitter": 0.1, "max_attempts": None,
        "dead_letter": None,
    }),
    ("s12-AsyncSpool.enqueue", lambda: _aio().AsyncSpool.enqueue, {
        "reserve": None, "use": None, "delay": None,
    }),
    ("s12-AsyncQueueReader.iter", lambda: _aio().AsyncQueueReader.iter, {"stop": None, "on_error": None}),
]  # fmt: skip


@pytest.mark.parametrize(("obj", "defaults"), [p[1:] for p in DEFAULTS], ids=[p[0] for p in DEFAULTS])
def test_documented_defaults(obj: Callable[[], Any], defaults: dict[str, Any]) -> None:
    """The defaults API.md writes in its signatures (behaviour of the ones that matter
    most is tested above: §8, §9)."""
    params = inspect.signature(obj()).parameters
    got = {k: params[k].default for k in defaults if k in params}
    assert got == defaults
