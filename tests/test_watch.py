"""Tests for multispool._watch: wake-up callbacks from filesystem events.

No sleep is used to synchronise: tests wait on threading.Event with a timeout. Child
processes are always reaped in a finally block.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _paths import open_fds
from _procs import in_forked_child
from multispool import _inotify, _watch
from multispool._watch import ObserverMode, choose_observer, subscribe

pytestmark = pytest.mark.timeout(60)

IS_LINUX = sys.platform.startswith("linux")
MODES: list[ObserverMode] = ["native", "polling"]
POLL = 0.02  # polling interval for tests: fast, so that polling tests finish quickly
WAIT = 10.0  # generous deadline for an expected callback


class Recorder:
    """A callback that records when it was called and wakes waiters."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.event = threading.Event()

    def __call__(self) -> None:
        self.times.append(time.monotonic())
        self.event.set()

    def wait(self, timeout: float = WAIT) -> bool:
        ok = self.event.wait(timeout)
        self.event.clear()
        return ok


def inotify_instances() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                count += 1
    return count


def new_threads(baseline: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in baseline and t.is_alive()]


def join_new_threads(baseline: set[threading.Thread], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    for t in new_threads(baseline):
        t.join(max(0.0, deadline - time.monotonic()))


@pytest.fixture
def queue(tmp_path: Path) -> Path:
    q = tmp_path / "queue"
    (q / ".checkout").mkdir(parents=True)
    return q


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "tmp"
    d.mkdir()
    return d


def drop_in(outside: Path, queue: Path, name: str, content: str = "") -> None:
    """Producer-style: write elsewhere, rename into the queue."""
    src = outside / name
    src.write_text(content)
    os.rename(src, queue / name)


# ---------------------------------------------------------------------------- basics


@pytest.mark.parametrize("mode", MODES)
def test_callback_on_create(queue: Path, mode: ObserverMode) -> None:
    rec = Recorder()
    with subscribe(queue, rec, mode, polling_interval=POLL):
        (queue / "made-here").write_text("x")
        assert rec.wait()


@pytest.mark.parametrize("mode", MODES)
def test_callback_on_rename_in(queue: Path, outside: Path, mode: ObserverMode) -> None:
    rec = Recorder()
    with subscribe(queue, rec, mode, polling_interval=POLL):
        drop_in(outside, queue, "e1")
        assert rec.wait()
        drop_in(outside, queue, "e2")
        assert rec.wait()


@pytest.mark.parametrize("mode", MODES)
def test_callback_on_rename_in_from_another_process(queue: Path, outside: Path, mode: ObserverMode) -> None:
    rec = Recorder()
    src = outside / "from-child"
    src.write_text("x")
    code = "import os, sys; os.rename(sys.argv[1], sys.argv[2])"
    with subscribe(queue, rec, mode, polling_interval=POLL):
        proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(queue / "e")])
        try:
            assert rec.wait()
            assert proc.wait(WAIT) == 0
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("mode", MODES)
def test_two_subscribers_share_a_watch_and_close_independently(
    queue: Path, outside: Path, mode: ObserverMode
) -> None:
    baseline = set(threading.enumerate())
    a, b = Recorder(), Recorder()
    sub_a = subscribe(queue, a, mode, polling_interval=POLL)
    threads_with_one = len(new_threads(baseline))
    sub_b = subscribe(queue, b, mode, polling_interval=POLL)
    try:
        # One shared observer and one shared watch: no thread per subscriber.
        assert len(new_threads(baseline)) == threads_with_one
        drop_in(outside, queue, "e1")
        assert a.wait()
        assert b.wait()
        sub_a.close()
        sub_a.close()  # idempotent
        assert sub_a.closed
        calls_a = len(a.times)
        drop_in(outside, queue, "e2")
        assert b.wait()
        assert len(a.times) == calls_a
    finally:
        sub_a.close()
        sub_b.close()
    assert new_threads(baseline) == []


@pytest.mark.parametrize("mode", MODES)
def test_closing_every_subscription_stops_the_observer(tmp_path: Path, mode: ObserverMode) -> None:
    baseline = set(threading.enumerate())
    dirs = [tmp_path / f"q{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    subs = [subscribe(d, Recorder(), mode, polling_interval=POLL) for d in dirs for _ in range(2)]
    assert new_threads(baseline)
    for sub in subs:
        sub.close()
    # close() joins the observer threads before it returns.
    assert new_threads(baseline) == []
    # And a new subscription starts a fresh observer that works.
    rec = Recorder()
    with subscribe(dirs[0], rec, mode, polling_interval=POLL):
        (dirs[0] / "x").write_text("x")
        assert rec.wait()
    assert new_threads(baseline) == []


def test_native_linux_uses_one_thread_and_one_inotify_for_many_directories(
    tmp_path: Path,
) -> None:
    if not IS_LINUX:
        pytest.skip("one inotify instance: Linux (watchdog's InotifyFD from 7.0, ours before)")
    assert _watch._has_shared_inotify()
    baseline = set(threading.enumerate())
    before = inotify_instances()
    dirs = [tmp_path / f"q{i}" for i in range(5)]
    subs = []
    try:
        for d in dirs:
            d.mkdir()
            subs.append(subscribe(d, Recorder(), "native"))
        assert len(new_threads(baseline)) == 1
        assert inotify_instances() == before + 1
    finally:
        for sub in subs:
            sub.close()
    assert new_threads(baseline) == []
    assert inotify_instances() == before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_polling_opens_no_inotify_instance(queue: Path, outside: Path) -> None:
    before = inotify_instances()
    rec = Recorder()
    with subscribe(queue, rec, "polling", polling_interval=POLL):
        assert inotify_instances() == before
        drop_in(outside, queue, "e")
        assert rec.wait()
        assert inotify_instances() == before
    assert inotify_instances() == before


@pytest.mark.parametrize("mode", MODES)
def test_departures_flag(queue: Path, outside: Path, mode: ObserverMode) -> None:
    (queue / "old1").write_text("x")
    (queue / "old2").write_text("x")
    with_departures, without = Recorder(), Recorder()
    with (
        subscribe(queue, with_departures, mode, polling_interval=POLL),
        subscribe(queue, without, mode, polling_interval=POLL, departures=False),
    ):
        (queue / "old1").unlink()
        assert with_departures.wait()
        if mode == "native" and not IS_LINUX:
            return  # other native backends report departures their own way
        # Events arrive in order: once the arrival has woken `without`, the departure
        # would have woken it already if it were going to.
        drop_in(outside, queue, "new")
        assert without.wait()
        assert len(without.times) == 1
        assert with_departures.wait()  # the arrival, too
        # Not by watchdog's emitter (IN_MOVED_FROM stays out of its mask), which is now
        # only used off Linux.
        rename_out_reported = mode == "polling" or IS_LINUX
        if rename_out_reported:
            n = len(with_departures.times)
            os.rename(queue / "old2", queue / ".checkout" / "old2")
            assert with_departures.wait()
            assert len(with_departures.times) > n


@pytest.mark.parametrize("mode", MODES)
def test_directory_deleted_wakes_and_path_can_be_watched_again(
    queue: Path, outside: Path, mode: ObserverMode
) -> None:
    rec = Recorder()
    first = subscribe(queue, rec, mode, polling_interval=POLL)
    try:
        shutil.rmtree(queue)
        assert rec.wait()
        queue.mkdir()
        # The stale watch is not reused for the new directory at the same path.
        rec2 = Recorder()
        with subscribe(queue, rec2, mode, polling_interval=POLL):
            drop_in(outside, queue, "e")
            assert rec2.wait()
    finally:
        first.close()


@pytest.fixture(scope="module")
def watchdog_process_threads() -> None:
    """watchdog 7's own InotifyEmitter reads through one InotifyFD thread that it shares
    process-wide, starts once and never stops. Module-scoped, so started before a test's
    thread-leak check looks (watchdog < 7 has no such thread)."""
    if IS_LINUX:
        from watchdog.observers import inotify_c

        fd_class = getattr(inotify_c, "InotifyFD", None)
        if fd_class is not None and hasattr(fd_class, "get_instance"):
            fd_class.get_instance()


@pytest.mark.parametrize("backend", ["native", "native-emitter", "polling"])
@pytest.mark.usefixtures("watchdog_process_threads")
def test_directory_moved_away_and_replaced(
    queue: Path, outside: Path, tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A native watch follows the directory, not the path: once the directory is moved
    away it says so at once (a wake, and stale), so that its subscribers watch the one
    put in its place. Polling lists the path, so it simply goes on."""
    mode: ObserverMode = "polling" if backend == "polling" else "native"
    if mode == "native" and not IS_LINUX:
        pytest.skip("the other native backends are not known to report their directory moved")
    if backend == "native-emitter":
        # The watchdog emitter backend, the only native one with watchdog < 7 (Python
        # 3.10), whatever watchdog is installed.
        monkeypatch.setattr(_watch, "_inotify_fd_class", lambda: None)
    rec = Recorder()
    first = subscribe(queue, rec, mode, polling_interval=POLL)
    try:
        if backend == "native-emitter":
            assert first._entry is not None and isinstance(first._entry.backend, _watch._WatchdogBackend)
        os.rename(queue, tmp_path / "moved-away")
        (queue / ".checkout").mkdir(parents=True)
        if mode == "native":
            assert rec.wait()
            assert first.stale
        rec2 = Recorder()
        with subscribe(queue, rec2, mode, polling_interval=POLL) as second:
            assert not second.stale
            drop_in(outside, queue, "e")
            assert rec2.wait()
    finally:
        first.close()


def test_missing_directory_or_file_is_an_error(tmp_path: Path) -> None:
    baseline = set(threading.enumerate())
    for mode in MODES:
        with pytest.raises(FileNotFoundError):
            subscribe(tmp_path / "nope", Recorder(), mode)
        (tmp_path / "file").write_text("x")
        with pytest.raises(NotADirectoryError):
            subscribe(tmp_path / "file", Recorder(), mode)
    with pytest.raises(ValueError, match="'native' or 'polling'"):
        subscribe(tmp_path, Recorder(), "auto")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="polling_interval"):
        subscribe(tmp_path, Recorder(), "polling", polling_interval=0)
    assert new_threads(baseline) == []


@pytest.mark.parametrize("mode", MODES)
def test_raising_callback_is_logged_and_others_still_called(
    queue: Path, outside: Path, mode: ObserverMode, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise RuntimeError("boom")

    rec = Recorder()
    with (
        caplog.at_level(logging.ERROR, logger="multispool._watch"),
        subscribe(queue, boom, mode, polling_interval=POLL),
        subscribe(queue, rec, mode, polling_interval=POLL),
    ):
        drop_in(outside, queue, "e1")
        assert rec.wait()
        drop_in(outside, queue, "e2")
        assert rec.wait()
    assert "boom" in caplog.text


@pytest.mark.parametrize("mode", MODES)
def test_callback_may_close_the_last_subscription(queue: Path, outside: Path, mode: ObserverMode) -> None:
    baseline = set(threading.enumerate())
    done = threading.Event()
    holder: list[_watch.Subscription] = []

    def close_self() -> None:
        holder[0].close()
        done.set()

    holder.append(subscribe(queue, close_self, mode, polling_interval=POLL))
    drop_in(outside, queue, "e")
    assert done.wait(WAIT)
    assert holder[0].closed
    # The observer thread cannot join itself; it ends once the callback returns.
    join_new_threads(baseline)
    assert new_threads(baseline) == []


def test_native_falls_back_to_polling_when_inotify_is_exhausted(
    queue: Path, outside: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if not IS_LINUX:
        pytest.skip("exercises the Linux inotify backend")

    def exhausted(self: object, entry: object) -> None:
        raise OSError(errno.EMFILE, "inotify instance limit reached")

    monkeypatch.setattr(_watch._InotifyBackend, "_watch", exhausted)
    baseline = set(threading.enumerate())
    rec = Recorder()
    with (
        caplog.at_level(logging.WARNING, logger="multispool._watch"),
        subscribe(queue, rec, "native", polling_interval=POLL) as sub,
    ):
        assert sub.mode == "polling"
        drop_in(outside, queue, "e")
        assert rec.wait()
    assert "polling it every" in caplog.text
    assert new_threads(baseline) == []


def test_concurrent_subscribe_and_close(tmp_path: Path) -> None:
    baseline = set(threading.enumerate())
    dirs = [tmp_path / f"q{i}" for i in range(4)]
    for d in dirs:
        d.mkdir()
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            start.wait(WAIT)
            for j in range(30):
                mode: ObserverMode = MODES[(i + j) % 2]
                with subscribe(dirs[(i + j) % len(dirs)], Recorder(), mode, polling_interval=POLL):
                    pass
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(WAIT * 3)
    assert errors == []
    assert new_threads(baseline) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_child_gets_a_fresh_observer(queue: Path, outside: Path, tmp_path: Path) -> None:
    rec = Recorder()
    other = tmp_path / "child-queue"
    other.mkdir()
    with subscribe(queue, rec, "native"):

        def child() -> bool:
            child_rec = Recorder()
            with subscribe(other, child_rec, "native"):
                (other / "x").write_text("x")
                return bool(child_rec.wait())

        in_forked_child(child)
        # The parent's observer still works.
        drop_in(outside, queue, "e")
        assert rec.wait()


# --------------------------------------------------------------------------- latency


CHILD_PRODUCER = """
import os, sys, time
queue, outside, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    src = os.path.join(outside, "e%05d" % i)
    with open(src, "w") as f:
        pass
    t = time.monotonic()
    os.rename(src, os.path.join(queue, "e%05d" % i))
    with open(os.path.join(outside, "times"), "a") as f:
        f.write("%r\\n" % t)
    time.sleep(0.002)  # pacing, not synchronisation: a steady stream of arrivals
"""


@pytest.mark.skipif(not IS_LINUX, reason="CLOCK_MONOTONIC shared across processes: Linux")
@pytest.mark.parametrize("departures", [True, False])
def test_native_wake_latency_with_consumer_claims(queue: Path, outside: Path, departures: bool) -> None:
    """A producer process renames entries in while this consumer claims each one into
    .checkout, as readers do. Each claim is a rename out of the watched directory (an
    unmatched IN_MOVED_FROM); watchdog's move grouper would hold it, and every event
    behind it, for 0.5 s, putting the median wake latency near 250 ms."""
    n = 200
    rec = Recorder()
    claimed = 0
    with subscribe(queue, rec, "native", departures=departures):
        proc = subprocess.Popen([sys.executable, "-c", CHILD_PRODUCER, str(queue), str(outside), str(n)])
        try:
            while claimed < n:
                assert rec.wait(), f"no wake after {claimed} claims"
                for entry in os.scandir(queue):
                    if entry.name.startswith("e"):
                        os.rename(entry.path, queue / ".checkout" / entry.name)
                        claimed += 1
            assert proc.wait(WAIT) == 0
        finally:
            proc.kill()
            proc.wait()
    renames = [float(line) for line in (outside / "times").read_text().split()]
    wakes = sorted(rec.times)
    latencies = []
    for t in renames:
        i = bisect.bisect_left(wakes, t)
        assert i < len(wakes), "an arrival woke nobody"
        latencies.append(wakes[i] - t)
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p90 = latencies[len(latencies) * 9 // 10]
    print(f"native wake latency: p50 {p50 * 1e3:.3f} ms, p90 {p90 * 1e3:.3f} ms")
    assert p50 < 0.050, f"p50 wake latency {p50 * 1e3:.1f} ms"


# ------------------------------------------------------------------- choose_observer


def test_choose_observer_explicit_argument_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTISPOOL_OBSERVER", "polling")
    assert choose_observer(tmp_path, "native")[0] == "native"
    monkeypatch.setenv("MULTISPOOL_OBSERVER", "native")
    assert choose_observer(tmp_path, "polling")[0] == "polling"


@pytest.mark.parametrize("env", ["native", "polling"])
def test_choose_observer_env_overrides_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str
) -> None:
    monkeypatch.setenv("MULTISPOOL_OBSERVER", env)
    mode, reason = choose_observer(tmp_path)
    assert mode == env
    assert "MULTISPOOL_OBSERVER" in reason


@pytest.mark.parametrize("env", [None, "", "auto"])
def test_choose_observer_auto_on_local_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str | None
) -> None:
    if env is None:
        monkeypatch.delenv("MULTISPOOL_OBSERVER", raising=False)
    else:
        monkeypatch.setenv("MULTISPOOL_OBSERVER", env)
    fstype = _watch._filesystem_type(str(tmp_path))
    if fstype is not None and _watch._is_remote(fstype[0]):
        pytest.skip(f"the test's temporary directory is itself on {fstype[0]}")
    mode, reason = choose_observer(tmp_path)
    assert mode == "native"
    assert reason
    # A queue directory that does not exist yet is judged by its nearest ancestor.
    assert choose_observer(tmp_path / "not" / "yet")[0] == "native"


def test_choose_observer_bad_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MULTISPOOL_OBSERVER", raising=False)
    with pytest.raises(ValueError, match="'auto', 'native', 'polling'"):
        choose_observer(tmp_path, "inotify")
    monkeypatch.setenv("MULTISPOOL_OBSERVER", "fast")
    with pytest.raises(ValueError, match=r"MULTISPOOL_OBSERVER.*auto, native, polling"):
        choose_observer(tmp_path)
    # An explicit argument does not even look at the environment.
    assert choose_observer(tmp_path, "polling")[0] == "polling"


def test_choose_observer_falls_back_to_native_when_detection_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: str) -> tuple[str, str]:
        raise OSError(errno.EIO, "no can do")

    monkeypatch.delenv("MULTISPOOL_OBSERVER", raising=False)
    monkeypatch.setattr(_watch, "_filesystem_type", broken)
    mode, reason = choose_observer(tmp_path)
    assert mode == "native"
    assert "no can do" in reason


@pytest.mark.parametrize(
    ("fstype", "remote"),
    [
        ("nfs", True),
        ("nfs4", True),
        ("cifs", True),
        ("smb3", True),
        ("smbfs", True),
        ("9p", True),
        ("ceph", True),
        ("lustre", True),
        ("gpfs", True),
        ("afs", True),
        ("fuse", True),
        ("fuseblk", True),
        ("fuse.sshfs", True),
        ("fuse.bindfs", True),
        ("fuse.glusterfs", True),
        ("macfuse", True),
        ("ext4", False),
        ("xfs", False),
        ("btrfs", False),
        ("tmpfs", False),
        ("overlay", False),
        ("apfs", False),
        ("0xef53", False),
    ],
)
def test_remote_filesystem_names(fstype: str, remote: bool) -> None:
    assert _watch._is_remote(fstype) is remote


@pytest.mark.skipif(not IS_LINUX, reason="Linux mountinfo")
def test_mountinfo_picks_longest_and_topmost_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "mountinfo"
    info.write_bytes(
        b"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        b"2 1 0:40 / /mnt/share rw shared:5 - nfs4 srv:/x rw\n"
        b"3 1 0:41 / /mnt/share\\040two rw - fuse.sshfs u@h: rw\n"
        b"4 2 0:42 / /mnt/share rw - tmpfs tmpfs rw\n"
    )
    real_open = open

    def fake_open(path: object, *args: object, **kwargs: object) -> object:
        if path == "/proc/self/mountinfo":
            return real_open(info, "rb")
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", fake_open)
    assert _watch._linux_mountinfo_type("/mnt/share/q") == ("tmpfs", "/mnt/share")
    assert _watch._linux_mountinfo_type("/mnt/share two/q") == ("fuse.sshfs", "/mnt/share two")
    assert _watch._linux_mountinfo_type("/mnt/sharex") == ("ext4", "/")


@pytest.mark.skipif(not IS_LINUX, reason="Linux statfs")
def test_statfs_fallback_reports_a_type(tmp_path: Path) -> None:
    fstype, _ = _watch._linux_statfs_type(str(tmp_path))
    assert fstype


# ------------------------------------------------------------------------------ FUSE


@contextlib.contextmanager
def bindfs_mount(source: Path, target: Path) -> Iterator[None]:
    """Mount `source` on `target` with bindfs in the foreground (so the daemon is our
    child and is reaped), and always unmount."""
    proc = subprocess.Popen(
        ["bindfs", "-f", str(source), str(target)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        mounted = wait_until(lambda: os.path.ismount(target) or proc.poll() is not None)
        if not mounted or proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            pytest.skip(f"bindfs could not mount (FUSE unusable here?): {err.strip()}")
        yield
    finally:
        patience = WAIT
        if os.path.ismount(target):
            umount = shutil.which("fusermount3") or shutil.which("fusermount")
            cmd = [umount, "-u", str(target)] if umount else ["umount", str(target)]
            if subprocess.run(cmd, check=False, capture_output=True).returncode != 0:
                # Busy (a watch or an open file still pins it: a Spool the test still
                # holds keeps its directories open): detach lazily rather than leave a
                # dead mount behind for every later pytest run to trip over. The daemon
                # then serves those descriptors until they are closed, which may be
                # never in this test: it is not waited for.
                lazy = [umount, "-u", "-z", str(target)] if umount else ["umount", "-l", str(target)]
                subprocess.run(lazy, check=False, capture_output=True)
                patience = 0.5
        try:
            proc.wait(patience)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Wait for a condition nothing can signal (a mount appearing), with a deadline."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.01)
    return True


def ensure_bindfs() -> None:
    if not IS_LINUX:
        pytest.skip("bindfs test needs Linux")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: no FUSE in this sandbox")
    if shutil.which("bindfs"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("bindfs is not installed (and cannot apt-get it without root)")
    result = subprocess.run(["apt-get", "install", "-y", "-q", "bindfs"], capture_output=True, timeout=50)
    if result.returncode != 0 or not shutil.which("bindfs"):
        pytest.skip(f"apt-get install bindfs failed: {result.stderr.decode()[-300:]}")


@pytest.mark.timeout(120)
def test_fuse_mount_is_polled_and_sees_changes_made_through_another_mount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_bindfs()
    monkeypatch.delenv("MULTISPOOL_OBSERVER", raising=False)
    source, m1, m2 = tmp_path / "source", tmp_path / "m1", tmp_path / "m2"
    for d in (source / "queue", m1, m2, tmp_path / "out"):
        d.mkdir(parents=True)
    with bindfs_mount(source, m1), bindfs_mount(source, m2):
        mode, reason = choose_observer(m2 / "queue", "auto")
        assert mode == "polling", reason
        assert "fuse" in reason
        # The proof that polling is needed: a native watch on m2 hears nothing of m1.
        rec = Recorder()
        with subscribe(m2 / "queue", rec, mode, polling_interval=0.05):
            src = m1 / "queue" / "incoming.tmp"
            src.write_text("x")
            os.rename(src, m1 / "queue" / "entry")
            assert rec.wait(), "no wake for an entry renamed in through the other mount"


def inotify_masks() -> list[int]:
    """The kernel masks of every inotify watch this process holds (from fdinfo)."""
    masks = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("inotify wd:"):
                            field = next(x for x in line.split() if x.startswith("mask:"))
                            masks.append(int(field[5:], 16))
    return masks


@pytest.mark.skipif(not IS_LINUX, reason="inotify masks are Linux-only")
def test_departures_stay_out_of_the_kernel_mask_until_a_subscriber_wants_them(
    queue: Path, outside: Path
) -> None:
    """A consumer's own claims (renames out of the queue) must not wake the observer
    thread at all when no subscriber asks for departures; one that asks widens the watch
    and then hears them."""
    moved_from, deleted = 0x40, 0x200
    (queue / "a").write_text("x")
    (queue / "b").write_text("x")
    readers, watcher = Recorder(), Recorder()
    with subscribe(queue, readers, "native", departures=False):
        (mask,) = inotify_masks()
        assert mask & (moved_from | deleted) == 0
        with subscribe(queue, watcher, "native", departures=True):
            (mask,) = inotify_masks()
            assert mask & moved_from and mask & deleted
            os.rename(queue / "a", queue / ".checkout" / "a")
            assert watcher.wait()
            drop_in(outside, queue, "new")  # both hear arrivals, on the widened watch
            assert readers.wait()
            assert watcher.wait()
            assert len(readers.times) == 1  # the departure did not wake the reader
        os.rename(queue / "b", queue / ".checkout" / "b")
        drop_in(outside, queue, "new2")
        assert readers.wait()
    assert inotify_masks() == []


class Names:
    """A ``names=True`` callback that records every name and wakes a waiter once a
    given name has been heard."""

    def __init__(self) -> None:
        self.names: list[str | None] = []
        self.cond = threading.Condition()

    def __call__(self, name: str | None) -> None:
        with self.cond:
            self.names.append(name)
            self.cond.notify_all()

    def wait_for(self, name: str, times: int = 1, timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.names.count(name) >= times, timeout)


@pytest.mark.parametrize("mode", MODES)
def test_dot_names_wake_nobody(queue: Path, outside: Path, mode: ObserverMode) -> None:
    """A dot-name is never an entry (``.checkout``, the keep link ``.~NAME`` of a durable
    move): written, created, deleted or renamed, it wakes no subscriber, with or without
    departures."""
    readers, watcher = Names(), Names()
    with (
        subscribe(queue, readers, mode, polling_interval=POLL, departures=False, names=True),
        subscribe(queue, watcher, mode, polling_interval=POLL, departures=True, names=True),
    ):
        (queue / ".~written").write_text("x")
        os.link(queue / ".~written", queue / ".~linked")
        (outside / "x").write_text("x")
        os.rename(outside / "x", queue / ".~renamed")
        drop_in(outside, queue, "seen")  # an entry: heard by both, after the above
        assert readers.wait_for("seen") and watcher.wait_for("seen")
        for n in (".~written", ".~linked", ".~renamed"):
            os.unlink(queue / n)
        os.rename(queue / "seen", queue / ".checkout" / "seen")
        assert watcher.wait_for("seen", times=2)  # its departure
        drop_in(outside, queue, "last")
        assert readers.wait_for("last") and watcher.wait_for("last")
    # (A poll reports what it found in one listing arrivals first: order aside.)
    assert sorted(readers.names, key=str) == ["last", "seen"]
    assert sorted(watcher.names, key=str) == ["last", "seen", "seen"]


@pytest.mark.skipif(not IS_LINUX, reason="inotify masks are Linux-only")
def test_a_durable_claim_reaches_no_reader_of_its_queue(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under durability "full" every claim creates a keep link beside the entry and
    removes it (the move protocol): no event of it may reach the observer thread of a
    subscriber without departures (every reader of the queue woke on every claim when
    IN_CREATE was in the mask). An arrival still does."""
    import enum

    import multispool

    class Q(enum.Enum):
        A = "a"
        B = "b"

    spool = multispool.Spool.create(str(tmp_path / "sp"), multispool.Spoolable(queues=Q, durability="full"))
    entries = [spool.enqueue(Q.A, {"i": i}, b"x") for i in range(5)]
    raw: list[str] = []  # every event the observer thread handed to the queue's watch
    on_event = _watch._InotifyTarget.on_event

    def record(self: _watch._InotifyTarget, event: object) -> None:
        raw.append(os.fsdecode(getattr(event, "name", b"")))
        on_event(self, event)  # type: ignore[arg-type]

    monkeypatch.setattr(_watch._InotifyTarget, "on_event", record)
    heard = Names()
    qdir = tmp_path / "sp" / "a"
    with subscribe(qdir, heard, "native", departures=False, names=True):
        (mask,) = inotify_masks()
        assert mask & 0x100 == 0  # IN_CREATE
        for e in entries:
            co = spool.checkout(e)
            co.save(Q.B)
        marker = spool.enqueue(Q.A, {"i": -1}, b"x")
        drop_in(outside, qdir, "end")  # events come in order: all before it are in
        assert heard.wait_for("end")
    # Nothing of the claims reached the thread, and the marker came once.
    assert heard.names == [marker.name, "end"]
    assert raw == [marker.name, "end"]


@pytest.mark.skipif(not IS_LINUX, reason="inotify event kinds are Linux-only")
@pytest.mark.parametrize("durability", ["full", "file"])
def test_a_durable_enqueue_is_one_event_in_its_queue(tmp_path: Path, outside: Path, durability: str) -> None:
    """A durable enqueue keeps its files open until they are synced; they are closed
    before the publishing rename, not after it, when the tmp file is the queue file and
    its close would wake every reader a second time (IN_CLOSE_WRITE)."""
    import enum

    import multispool

    class Q(enum.Enum):
        A = "a"

    sp = multispool.Spoolable(queues=Q, durability=durability)
    spool = multispool.Spool.create(str(tmp_path / "sp"), sp)
    qdir = tmp_path / "sp" / "a"
    heard = Names()
    names: list[str] = []
    with subscribe(qdir, heard, "native", departures=False, names=True):
        names.append(spool.enqueue(Q.A, {"i": 0}, b"x").name)  # this (main) thread
        t = threading.Thread(target=lambda: names.append(spool.enqueue(Q.A, {"i": 1}, b"x").name))
        t.start()
        t.join(WAIT)
        names += [e.name for e in spool.enqueue_many(Q.A, [({"i": 2}, b"x"), ({"i": 3}, b"x")])]
        drop_in(outside, qdir, "end")  # events come in order: all before it are in
        assert heard.wait_for("end")
    assert heard.names == [*names, "end"]


@pytest.mark.parametrize("mode", MODES)
def test_close_soon_with_the_lock_held_closes_once_it_is_released(queue: Path, mode: ObserverMode) -> None:
    """close_soon() is what a garbage-collection callback calls (a reader collected
    without closing its subscription), and such a callback may run in a thread that is
    inside subscribe() or close(), holding the lock close() takes: it must not wait for
    it, and the holder closes the subscription on its way out."""
    baseline = set(threading.enumerate())
    sub = subscribe(queue, Recorder(), mode, polling_interval=POLL)
    other = subscribe(queue, Recorder(), mode, polling_interval=POLL)
    with _watch._state.lock:  # as in subscribe() or close(), on this thread
        sub.close_soon()
        assert not sub.closed
    other.close()
    assert sub.closed
    assert _watch._state.backends == {}
    assert new_threads(baseline) == []
    # With the lock free, at once.
    sub = subscribe(queue, Recorder(), mode, polling_interval=POLL)
    sub.close_soon()
    assert sub.closed
    assert new_threads(baseline) == []


def _inotify_fd_classes() -> list[Any]:
    classes: list[Any] = [_inotify.InotifyReader]
    watchdog_fd = _watch._watchdog_inotify_fd_class()
    if watchdog_fd is not None:
        classes.append(watchdog_fd)
    return classes


@pytest.mark.skipif(not IS_LINUX, reason="the Linux inotify backend")
@pytest.mark.parametrize("fd_class", _inotify_fd_classes(), ids=lambda c: c.__module__)
def test_an_observer_thread_that_cannot_start_leaks_no_inotify_instance(
    queue: Path, monkeypatch: pytest.MonkeyPatch, fd_class: Any
) -> None:
    """subscribe() raises when no thread can be started (a pids limit), and leaves
    nothing open: watchdog's InotifyFD, made before its thread is started, kept its
    inotify instance (counted against the user's fs.inotify.max_user_instances, shared
    by all of the user's programs) and its two pipe descriptors, for each attempt."""
    monkeypatch.setattr(_watch, "_inotify_fd_class", lambda: fd_class)
    fds = fd_count()
    start = threading.Thread.start

    def cannot_start(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", cannot_start)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="can't start"):
            subscribe(queue, Recorder(), "native")
    monkeypatch.setattr(threading.Thread, "start", start)
    assert fd_count() == fds
    assert _watch._state.backends == {}
    rec = Recorder()
    with subscribe(queue, rec, "native") as sub:
        assert sub.mode == "native"
        (queue / "e").write_text("x")
        assert rec.wait()


def fd_count() -> int:
    return len(open_fds())
