"""What a checkout's operations leave behind when they fail, or run concurrently: the
entry goes back unchanged to the queue it came from, is never left checked out by
nobody, and is handed out once."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import multispool
import multispool.aio
from _paths import full, src_dst
from conftest import Cog, Queue, Widget
from multispool import _fs

DURABILITIES = ["none", "full"]


def _spool(tmp_path: Path, durability: str, **kw: Any) -> multispool.Spool[Any, bytes]:
    sp = multispool.Spoolable(
        queues=Queue, metadata=Widget, name_generator=multispool.PrefixNames(), durability=durability, **kw
    )
    return multispool.Spool.create(tmp_path / "spool", sp)


def _plant_dir(spool: multispool.Spool[Any, bytes], queue: Queue, name: str) -> Path:
    """A non-empty directory at QUEUE/NAME: renaming a file there fails (EISDIR)."""
    d = Path(spool.dir, queue.value, name)
    (d / "junk").mkdir(parents=True)
    return d


def _checkouts(spool: multispool.Spool[Any, bytes], queue: Queue) -> list[str]:
    return sorted(n for n in os.listdir(Path(spool.dir, queue.value, ".checkout")) if n[0] != ".")


# -- a save whose move fails ---------------------------------------------------------------


@pytest.mark.parametrize("durability", DURABILITIES)
def test_failed_save_in_with_block_returns_the_entry_unchanged(tmp_path: Path, durability: str) -> None:
    spool = _spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    _plant_dir(spool, Queue.QUEUE2, e.name)
    with pytest.raises(OSError) as ei, spool.checkout(e) as co:
        co.contents = Cog(n=2)
        co.save(Queue.QUEUE2, delay=3600)
    assert ei.value.errno == errno.EISDIR
    # Back in its queue as it was claimed: metadata, due now, not left checked out.
    assert spool.list(Queue.QUEUE1) == [e]
    assert _checkouts(spool, Queue.QUEUE1) == []
    assert e.direct.contents() == Cog(n=1)
    assert e.due() is None and e.attempts() == 0
    assert os.listdir(Path(spool.dir, ".tmp")) == []
    assert [n for n in os.listdir(Path(spool.dir, "queue1", ".checkout"))] == []  # no keep link


@pytest.mark.parametrize("durability", DURABILITIES)
def test_failed_save_keeps_the_checkout_held(tmp_path: Path, durability: str) -> None:
    """Until it is released, a checkout whose save failed is still its owner's: no
    recovery takes it, and a second save (once the way is clear) moves it."""
    spool = _spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    planted = _plant_dir(spool, Queue.QUEUE2, e.name)
    co = spool.checkout(e)
    with pytest.raises(OSError):
        co.save(Queue.QUEUE2)
    assert not co.done
    assert spool.recover_checkouts() == []
    assert spool.checkout_if_found(e) is None
    (planted / "junk").rmdir()
    planted.rmdir()
    co.contents = Cog(n=3)
    co.save(Queue.QUEUE2)
    assert co.done
    (e2,) = spool.list(Queue.QUEUE2)
    assert e2.direct.contents() == Cog(n=3)
    assert _checkouts(spool, Queue.QUEUE1) == []


@pytest.mark.parametrize("durability", DURABILITIES)
def test_with_entry_whose_save_fails_puts_the_entry_back_unchanged(tmp_path: Path, durability: str) -> None:
    spool = _spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    _plant_dir(spool, Queue.QUEUE2, e.name)
    with pytest.raises(OSError):
        spool.with_entry(e, lambda m, d: (multispool.Save(Cog(n=9), Queue.QUEUE2, delay=60), None))
    assert spool.list(Queue.QUEUE1) == [e]
    assert e.direct.contents() == Cog(n=1)
    assert e.due() is None


@pytest.mark.parametrize("durability", DURABILITIES)
def test_failed_dead_letter_move_keeps_the_attempt_count(tmp_path: Path, durability: str) -> None:
    """A Backoff failure whose move fails: the entry goes back as it was claimed (its
    count not raised by a failure that was not recorded)."""
    spool = _spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    _plant_dir(spool, Queue.QUEUE2, e.name)
    policy = multispool.Backoff(first=0, jitter=0, max_attempts=1, dead_letter=Queue.QUEUE2)

    stop = threading.Event()

    def boom(m: Any, d: Any) -> Any:
        stop.set()
        raise ValueError("handler failed")

    with spool.reader(Queue.QUEUE1, observer="polling") as r, pytest.raises(OSError):
        r.iter(boom, stop=stop, on_error=policy)
    assert spool.list(Queue.QUEUE1) == [e]
    assert e.attempts() == 0
    assert _checkouts(spool, Queue.QUEUE1) == []


@pytest.mark.parametrize("durability", DURABILITIES)
def test_failed_retry_of_a_delayed_entry_restores_its_schedule(tmp_path: Path, durability: str) -> None:
    """A retry whose rename fails leaves the schedule record as claimed (here: a record
    with attempts), whichever way the failed write went."""
    spool = _spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    co = spool.checkout(e)
    co._fail(multispool.Backoff(first=0, jitter=0))  # attempts 1, due now
    assert e.attempts() == 1
    real_rename = os.rename

    def failing(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        s, d = src_dst(src, dst, kw)
        if "/.checkout/" in s and d.endswith(f"/queue1/{e.name}"):
            raise OSError(errno.EIO, "Input/output error", s)
        real_rename(src, dst, *a, **kw)

    co = spool.checkout(e)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "rename", failing)
        with pytest.raises(OSError):
            co.retry(3600)
    co.release()
    assert spool.list(Queue.QUEUE1) == [e]
    assert e.attempts() == 1 and e.due() is None


def test_aio_failed_save_returns_the_entry(tmp_path: Path) -> None:
    spool = _spool(tmp_path, "none")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    _plant_dir(spool, Queue.QUEUE2, e.name)

    async def main() -> None:
        async with multispool.aio.AsyncSpool(spool) as aspool:
            co = await aspool.checkout(e)
            with pytest.raises(OSError):
                async with co:
                    await co.update(lambda m: Cog(n=5)).save(Queue.QUEUE2)

    asyncio.run(main())
    assert spool.list(Queue.QUEUE1) == [e]
    assert e.direct.contents() == Cog(n=1)


def _lock_free(spool: multispool.Spool[Any, bytes], name: str) -> bool:
    """Whether no process (this one included) holds ``name``'s owner lock."""
    fd = _fs.open_locked(os.path.join(spool.dir, ".registry", name))
    if fd is None:
        return False
    _fs.unlock(fd, _fs.lock_generation())
    return True


def test_aio_failed_save_frees_the_lock_once_its_handle_is_dropped(tmp_path: Path) -> None:
    """A checkout whose aio save failed is held until its owner releases it or drops the
    handle (a recovery then puts it back). Dropped, with the exception, it was still held:
    the executor's future kept the exception, whose traceback kept the frames awaiting
    that future, which kept the future (cycles), and the handle with them, until a
    garbage collection ran."""
    spool = _spool(tmp_path, "none")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    planted = _plant_dir(spool, Queue.QUEUE2, e.name)
    aspool = multispool.aio.AsyncSpool(spool)

    async def fail() -> None:
        co = await aspool.checkout(e)
        try:
            await co.save(Queue.QUEUE2)
        except OSError as err:
            assert err.errno == errno.EISDIR
        else:
            raise AssertionError("the save did not fail")
        assert not co.done and not _lock_free(spool, e.name)

    gc.collect()
    gc.disable()  # only reference counting frees the handle, as the program's own would
    try:
        asyncio.run(fail())  # the handle and the exception dropped
        # The executor's thread lets go of the call a moment after the loop resumed.
        deadline = time.monotonic() + 2.0
        while (held := not _lock_free(spool, e.name)) and time.monotonic() < deadline:
            time.sleep(0.001)
        (planted / "junk").rmdir()
        planted.rmdir()
        recovered = spool.recover_checkouts()
    finally:
        gc.enable()
        asyncio.run(aspool.aclose())
    assert not held
    assert recovered == [e]
    assert spool.list(Queue.QUEUE1) == [e]


@pytest.mark.parametrize("attempts", [0, 1])
def test_retry_whose_schedule_write_fails_leaves_the_record_as_claimed(tmp_path: Path, attempts: int) -> None:
    """The record's fsync fails after its slot was written: the undo must replace that
    slot (or truncate the file) although the write did not return a record."""
    spool = _spool(tmp_path, "file")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    if attempts:
        spool.checkout(e)._fail(multispool.Backoff(first=0, jitter=0))
    assert e.attempts() == attempts
    co = spool.checkout(e)
    real = multispool._fs.fsync_fd
    calls: list[int] = []

    def fsync_fails_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multispool._fs, "fsync_fd", fsync_fails_once)
        with pytest.raises(OSError):
            co.retry(3600)
    assert not co.done
    co.release()
    assert spool.list(Queue.QUEUE1) == [e]
    assert e.due() is None and e.attempts() == attempts


# -- a claim interrupted once its rename is done ------------------------------------------------


@pytest.mark.parametrize(
    ("durability", "call"),
    [("none", "rename"), ("full", "rename"), ("full", "unlink"), ("full", "fsync_dir")],
)
def test_claim_interrupted_after_its_rename_gives_the_entry_back(
    tmp_path: Path, durability: str, call: str
) -> None:
    """A signal handler's exception (Ctrl-C, a SIGALRM timeout) raised just after the
    claim's rename: the caller gets no checkout, so the entry must not stay in the
    checkout dir owned by nobody while the process lives on (only a recovery would
    bring it back)."""
    spool = _spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    co_dir = os.path.join(spool.dir, "queue1", ".checkout")
    hit: list[bool] = []
    target: Any = multispool._fs if call == "fsync_dir" else os
    real = getattr(target, call)

    def interrupted(*a: Any, **kw: Any) -> Any:
        r = real(*a, **kw)
        moved_in = os.path.exists(os.path.join(co_dir, e.name))
        if moved_in and not hit:
            hit.append(True)
            raise KeyboardInterrupt  # as the call returns
        return r

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(target, call, interrupted)
        with pytest.raises(KeyboardInterrupt):
            spool.checkout(e)
    assert hit
    assert spool.list(Queue.QUEUE1) == [e]
    assert _checkouts(spool, Queue.QUEUE1) == []
    assert sorted(os.listdir(os.path.join(spool.dir, "queue1"))) == [".checkout", e.name]  # no keep link
    with spool.checkout(e) as co:
        assert co.contents == Cog(n=1)
    assert spool.recover_checkouts() == []


@pytest.mark.parametrize("durability", DURABILITIES)
def test_claim_interrupted_while_decoding_gives_the_entry_back(tmp_path: Path, durability: str) -> None:
    spool = _spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    codec = spool.spoolable._codec
    real = codec.decode

    def interrupted(raw: bytes, path: str) -> Any:
        real(raw, path)
        raise KeyboardInterrupt  # a signal handler's, as the decoder returns

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codec, "decode", interrupted)
        with pytest.raises(KeyboardInterrupt):
            spool.checkout(e)
    assert spool.list(Queue.QUEUE1) == [e]
    assert _checkouts(spool, Queue.QUEUE1) == []
    with spool.checkout(e) as co:
        assert co.contents == Cog(n=1)


# -- the keep link of a move cut by a crash, outliving its entry ---------------------------------

_SAVE_KILLED_AT_KEEP_UNLINK = """
import os, signal, sys
import multispool
from conftest import Cog, Queue, Widget
sp = multispool.Spoolable(
    queues=Queue, metadata=Widget, name_generator=multispool.PrefixNames(), durability="full"
)
spool = multispool.Spool.load(sys.argv[1], sp)
co = spool.checkout(multispool.Entry(spool, Queue.QUEUE1, sys.argv[2]))
real_unlink = os.unlink

def unlink(path, *a, **kw):
    if os.path.basename(str(path)).startswith(".~"):
        os.kill(os.getpid(), signal.SIGKILL)  # the crash: after the rename, before step 4
    return real_unlink(path, *a, **kw)

os.unlink = unlink
co.save(Queue.QUEUE2)
print("not killed")
"""


def _keep_links(spool: multispool.Spool[Any, bytes]) -> list[str]:
    out = []
    for root, _dirs, files in os.walk(spool.dir):
        out += [os.path.relpath(os.path.join(root, f), spool.dir) for f in files if f.startswith(".~")]
    return sorted(out)


# A producer that reserves the next free name and exits (its lock goes with it).
_RESERVE_NAME_AND_EXIT = (
    "import sys, multispool\n"
    "from conftest import Queue, Widget\n"
    "sp = multispool.Spoolable(queues=Queue, metadata=Widget, name_generator=multispool.PrefixNames())\n"
    "print(multispool.Spool.load(sys.argv[1], sp).reserve_name())\n"
)


def test_keep_link_of_an_entry_removed_since_is_dropped_by_recovery(tmp_path: Path) -> None:
    """A save killed between its rename and the unlink of its keep link; the entry is
    then handled in its new queue and removed, before any recovery ran. The keep link
    (the old metadata) must not outlive the entry: recovery drops it. Left, it stayed
    for good, and once the name was reserved again by a producer that died (a
    PrefixNames generator reuses a free name), recovery "restored" it as a checkout
    and put it back in the queue: the removed entry handed out a second time."""
    from _procs import run_python

    spool = _spool(tmp_path, "full")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    r = run_python(_SAVE_KILLED_AT_KEEP_UNLINK, spool.dir, e.name)
    assert r.returncode == -9, (r.stdout, r.stderr)
    assert _keep_links(spool) == [f"queue1/.checkout/.~{e.name}"]
    moved = multispool.Entry(spool, Queue.QUEUE2, e.name)
    spool.checkout(moved).remove()  # handled in its new queue, done with
    spool.recover_checkouts()
    assert _keep_links(spool) == []
    # A producer reserving the freed name and dying: nothing comes back.
    r = run_python(_RESERVE_NAME_AND_EXIT, spool.dir)
    assert r.stdout.strip() == e.name, r.stderr
    assert spool.recover_checkouts() == []
    for q in Queue:
        assert spool.list(q) == [] and _checkouts(spool, q) == []
    assert spool.clean_abandoned(older_than=0) == [e.name]


def test_keep_link_of_a_removed_entry_is_not_restored_under_a_reused_name(tmp_path: Path) -> None:
    """As above, but the freed name is reserved again by a producer that dies before any
    recovery ran: the keep link is not the new name's entry (there is no data file), so
    it is put aside, not restored and handed out."""
    from _procs import run_python

    spool = _spool(tmp_path, "full")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    r = run_python(_SAVE_KILLED_AT_KEEP_UNLINK, spool.dir, e.name)
    assert r.returncode == -9, (r.stdout, r.stderr)
    spool.checkout(multispool.Entry(spool, Queue.QUEUE2, e.name)).remove()
    r = run_python(_RESERVE_NAME_AND_EXIT, spool.dir)
    assert r.stdout.strip() == e.name, r.stderr
    assert spool.recover_checkouts() == []
    for q in Queue:
        assert spool.list(q) == [] and _checkouts(spool, q) == []
    assert _keep_links(spool) == []
    assert sorted(os.listdir(Path(spool.dir, ".lost+found", e.name))) == ["queue1.checkout"]
    assert spool.clean_abandoned(older_than=0) == [e.name]


# -- an end of a checkout interrupted part way -------------------------------------------------

# (durability, patched call, whether the interruption comes before the call or as it returns)
_RELEASE_STEPS = [
    ("none", "rename", "before"),
    ("none", "rename", "after"),
    ("full", "link", "before"),
    ("full", "link", "after"),
    ("full", "rename", "before"),
    ("full", "rename", "after"),
    ("full", "fsync_dir", "after"),
    ("full", "unlink", "before"),
    ("full", "unlink", "after"),
]


def _interrupt_once(mp: pytest.MonkeyPatch, call: str, when: str, name: str, nth: int = 1) -> list[bool]:
    """Patch ``call`` (of ``os``, or ``_fs`` for fsync_dir) to raise KeyboardInterrupt (as a
    signal handler would) once, before it runs or as it returns, at its ``nth`` call about
    ``name`` (or its keep link); returns the list that records the hit."""
    target: Any = multispool._fs if call == "fsync_dir" else os
    real = getattr(target, call)
    hit: list[bool] = []
    seen: list[bool] = []

    def interrupted(*a: Any, **kw: Any) -> Any:
        ours = not hit and (call == "fsync_dir" or any(str(p).endswith(name) for p in a[:2]))
        if ours:
            seen.append(True)
            ours = len(seen) == nth
        if ours and when == "before":
            hit.append(True)
            raise KeyboardInterrupt
        r = real(*a, **kw)
        if ours:
            hit.append(True)
            raise KeyboardInterrupt
        return r

    mp.setattr(target, call, interrupted)
    return hit


@pytest.mark.parametrize(("durability", "call", "when"), _RELEASE_STEPS)
def test_release_interrupted_part_way_still_gives_the_entry_back(
    tmp_path: Path, durability: str, call: str, when: str
) -> None:
    """Ctrl-C (or a SIGALRM timeout's exception) at any step of a release, as a ``with``
    block is left: the release is finished before the exception propagates. It left the
    entry in the checkout dir with its lock given up while the process lived on (hidden
    from every reader until some recovery ran), or left its keep link behind."""
    spool = _spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    co = spool.checkout(e)
    with pytest.MonkeyPatch.context() as mp:
        hit = _interrupt_once(mp, call, when, e.name)
        with pytest.raises(KeyboardInterrupt):
            co.release()
    assert hit
    assert co.done
    assert spool.list(Queue.QUEUE1) == [e]
    assert _checkouts(spool, Queue.QUEUE1) == []
    assert _keep_links(spool) == []
    with spool.checkout(e) as co2:  # its lock is free
        assert co2.contents == Cog(n=1)
    assert spool.recover_checkouts() == []


@pytest.mark.parametrize("durability", DURABILITIES)
def test_failed_release_keeps_the_checkout_held(tmp_path: Path, durability: str) -> None:
    """A release whose rename fails (EIO) leaves the entry checked out, and said so by
    giving up its lock and marking the checkout ended: a second release did nothing, and
    the entry stayed in the checkout dir while its owner lived on. As a failed save, it
    keeps the checkout held (no recovery takes it), and a second release moves it."""
    spool = _spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    co = spool.checkout(e)
    real_rename = os.rename
    failed: list[bool] = []

    def failing(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        s, d = src_dst(src, dst, kw)
        if not failed and d.endswith(f"/queue1/{e.name}"):
            failed.append(True)
            raise OSError(errno.EIO, "Input/output error", s)
        real_rename(src, dst, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "rename", failing)
        with pytest.raises(OSError):
            co.release()
    assert failed
    assert not co.done
    assert spool.recover_checkouts() == []
    assert spool.checkout_if_found(e) is None
    assert _keep_links(spool) == []
    co.release()
    assert co.done
    assert spool.list(Queue.QUEUE1) == [e]
    assert _checkouts(spool, Queue.QUEUE1) == []
    assert e.direct.contents() == Cog(n=1)


@pytest.mark.parametrize("end", ["save", "release"])
def test_failed_end_whose_undo_is_logged_frees_the_lock_once_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, end: str
) -> None:
    """A save or release whose move fails, and whose clean-up then fails too (EIO at the
    checkout file at every step), logs the clean-up's error and keeps the checkout held
    until its owner drops the handle (a recovery then puts it back). Dropped, it stayed
    held for as long as a logging handler kept the record (pytest's does, as does a
    MemoryHandler): the record kept the error object, its traceback the library's frame,
    and that frame the handle."""
    spool = _spool(tmp_path, "none")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    co = spool.checkout(e)
    cofile = co.path
    real_rename, real_lstat = os.rename, os.lstat

    def rename(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        s, _ = src_dst(src, dst, kw)
        if s == cofile:
            raise OSError(errno.EIO, "Input/output error", s)
        real_rename(src, dst, *a, **kw)

    def lstat(path: Any, *a: Any, **kw: Any) -> os.stat_result:
        p = full(path, kw.get("dir_fd"))
        if p == cofile:
            raise OSError(errno.EIO, "Input/output error", p)
        return real_lstat(path, *a, **kw)

    with caplog.at_level(logging.WARNING, logger="multispool"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "rename", rename)
        mp.setattr(os, "lstat", lstat)
        try:
            co.save(Queue.QUEUE2) if end == "save" else co.release()
        except OSError as err:
            assert err.errno == errno.EIO and cofile in str(err)
        else:
            raise AssertionError(f"the {end} did not fail")
    assert f"could not {'undo' if end == 'save' else 'finish'}" in caplog.text
    assert not co.done and not _lock_free(spool, e.name)
    del co  # dropped by its owner, with the error: a dead checkout
    assert _lock_free(spool, e.name)
    assert spool.recover_checkouts() == [e]
    assert spool.list(Queue.QUEUE1) == [e]


def _failing_release(mp: pytest.MonkeyPatch, spool: multispool.Spool[Any, bytes], name: str) -> None:
    """Make every move of ``name`` back into queue1 (a release) fail with EIO."""
    real_rename = os.rename
    back = os.path.join(spool.dir, "queue1", name)

    def rename(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        s, d = src_dst(src, dst, kw)
        if d == back:
            raise OSError(errno.EIO, "Input/output error", s, None, d)
        real_rename(src, dst, *a, **kw)

    mp.setattr(os, "rename", rename)


async def _aio_save_action(
    spool: multispool.Spool[Any, bytes], e: multispool.Entry[Any, bytes], save: Any, reader: bool
) -> None:
    """``save`` applied by asyncio's ``with_entry`` or reader (the async callback path)."""
    async def asave(m: Any, d: Any) -> Any:
        return save(m, d)

    async def apair(m: Any, d: Any) -> Any:
        return save(m, d), None

    async with multispool.aio.AsyncSpool(spool) as aspool:
        if reader:
            async with aspool.reader(Queue.QUEUE1, observer="polling") as r:
                await r.iter_available(asave)
        else:
            await aspool.with_entry(e, apair)


@pytest.mark.parametrize("how", ["iter_available", "with_entry", "aio with_entry", "aio reader"])
def test_library_held_checkout_whose_end_fails_is_let_go(tmp_path: Path, how: str) -> None:
    """A checkout the library itself holds (a reader's, ``with_entry``'s) whose action
    and then release fail: the error propagates, and the checkout must not stay locked
    by this live process. It stayed held for as long as the caller kept the error (its
    traceback keeps the library's frame and the handle), out of every recovery's reach;
    only a user who holds a handle can release it again, so the library lets go of the
    lock (as dropping the handle does) and a recovery puts the entry back."""
    spool = _spool(tmp_path, "none")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    planted = _plant_dir(spool, Queue.QUEUE2, e.name)  # the save fails (EISDIR)

    def save(m: Any, d: Any) -> Any:
        return multispool.Save(Cog(n=2), Queue.QUEUE2)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(OSError) as info:
        _failing_release(mp, spool, e.name)
        if how == "iter_available":
            with spool.reader(Queue.QUEUE1, observer="polling") as r:
                r.iter_available(save)
        elif how == "with_entry":
            spool.with_entry(e, lambda m, d: (save(m, d), None))
        else:
            asyncio.run(_aio_save_action(spool, e, save, reader=how == "aio reader"))
    # The save's error, the one that ended the checkout; the failed give-back noted on it.
    assert info.value.errno == errno.EISDIR
    if sys.version_info >= (3, 11):
        assert any("could not be given back (left for a recovery)" in n for n in info.value.__notes__)
    assert _checkouts(spool, Queue.QUEUE1) == [e.name]
    # The caller still holds the error (and its traceback): the lock is free all the same.
    assert _lock_free(spool, e.name)
    (planted / "junk").rmdir()
    planted.rmdir()
    assert spool.recover_checkouts() == [e]
    assert e.direct.contents() == Cog(n=1)
    del info


@pytest.mark.parametrize("rewrite", [True, False], ids=["rewrite", "same"])
@pytest.mark.parametrize(("durability", "call", "when"), _RELEASE_STEPS)
def test_save_interrupted_part_way_is_undone_or_finished(
    tmp_path: Path, durability: str, call: str, when: str, rewrite: bool
) -> None:
    """Ctrl-C at any step of a save's move: before its rename, the checkout is still
    held and unchanged (a release gives the entry back); after it, the move is finished
    (no keep link is left behind in the checkout dir). With new metadata, the first
    rename is the rewrite's (``.tmp/NAME`` over the checkout file)."""
    spool = _spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    co = spool.checkout(e)
    co.contents = Cog(n=2) if rewrite else Cog(n=1)
    with pytest.MonkeyPatch.context() as mp:
        hit = _interrupt_once(mp, call, when, e.name)
        with pytest.raises(KeyboardInterrupt):
            co.save(Queue.QUEUE2)
    assert hit
    co.release()
    assert co.done
    (where,) = [q for q in Queue if spool.list(q)]
    assert _checkouts(spool, Queue.QUEUE1) == []
    assert _keep_links(spool) == []
    assert os.listdir(Path(spool.dir, ".tmp")) == []
    entry = multispool.Entry(spool, where, e.name)
    assert entry.direct.contents() == (Cog(n=2) if where is Queue.QUEUE2 and rewrite else Cog(n=1))
    with spool.checkout(entry):  # its lock is free
        pass
    assert spool.recover_checkouts() == []


@pytest.mark.parametrize(
    ("durability", "call", "when", "nth"),
    [
        ("none", "unlink", "before", 1),
        ("none", "unlink", "after", 1),
        ("none", "unlink", "after", 2),
        ("full", "fsync_dir", "after", 1),
        ("full", "unlink", "before", 2),
        ("full", "unlink", "after", 2),
        ("full", "unlink", "before", 3),
    ],
)
def test_remove_interrupted_part_way_is_finished_or_not_begun(
    tmp_path: Path, durability: str, call: str, when: str, nth: int
) -> None:
    """Ctrl-C at any step of a remove in a ``with`` block: the entry is either whole in
    its queue again or gone whole. Interrupted once its metadata was unlinked, the remove
    left the data and registry files behind (Orphaned for the Monitor, until a
    clean_abandoned ten minutes later)."""
    spool = _spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    co = spool.checkout(e)
    with pytest.MonkeyPatch.context() as mp:
        hit = _interrupt_once(mp, call, when, e.name, nth)
        with pytest.raises(KeyboardInterrupt), co:
            co.remove()
    assert hit
    assert co.done
    assert _checkouts(spool, Queue.QUEUE1) == []
    assert _keep_links(spool) == []
    if spool.list(Queue.QUEUE1):
        assert e.direct.contents() == Cog(n=1)
        assert e.direct.data_file().load() == b"data"
        with spool.checkout(e):  # its lock is free
            pass
    else:
        assert os.listdir(Path(spool.dir, ".data")) == []
        assert os.listdir(Path(spool.dir, ".registry")) == []
    assert spool.recover_checkouts() == []


# -- a checkout's data file once the checkout ended ------------------------------------------


@pytest.mark.parametrize("end", ["remove", "release", "save"])
def test_data_file_of_an_ended_checkout_writes_nothing(tmp_path: Path, end: str) -> None:
    """A checkout's data_file handle outlives the checkout (kept by the handler, or a
    data save that timed out in an asyncio executor thread and runs after the end).
    Once the checkout ended, its save took the owner lock of whatever entry had the name
    by then and wrote through: after a remove, the data of a new entry given the freed
    name (PrefixNames hands it out again); after a release or save, the data of an entry
    back in a queue, under no checkout of ours. It must refuse, writing nothing."""
    spool = _spool(tmp_path, "none")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"one")
    co = spool.checkout(e)
    df = co.data_file
    if end == "remove":
        co.remove()
        e = spool.enqueue(Queue.QUEUE1, Cog(n=2), b"new entry")
        assert e.name == co.name  # the freed name, reused
    elif end == "release":
        co.release()
    else:
        co.save(Queue.QUEUE2)
        e = multispool.Entry(spool, Queue.QUEUE2, e.name)
    before = e.direct.data_file().load()
    with pytest.raises(multispool.EntryNotFoundError) as ei:
        df.save(b"stale write")
    assert co.name in str(ei.value)
    assert e.direct.data_file().load() == before
    assert os.listdir(Path(spool.dir, ".tmp")) == []


class _InterruptingThrottle:
    """A throttle whose exit raises KeyboardInterrupt once, the first time it is left
    with the entry ``name`` in the checkout dir ``co_dir`` (armed by ``arm``)."""

    def __init__(self) -> None:
        self.where: tuple[str, str] | None = None
        self.hit = False

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        if self.where is not None and not self.hit and os.path.exists(os.path.join(*self.where)):
            self.hit = True
            raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["throttle exit", "mutex", "handle"])
def test_claim_interrupted_as_it_hands_the_checkout_over_gives_the_entry_back(
    tmp_path: Path, where: str
) -> None:
    """Ctrl-C in the last steps of a claim, after its metadata was read: leaving the
    throttle, making the checkout's mutex, making the CheckedOutEntry. The caller gets
    no checkout, and the entry stayed in the checkout dir, its lock given up when the
    claim was collected."""
    throttle = _InterruptingThrottle()
    spool = _spool(tmp_path, "none", throttle=throttle)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    with pytest.MonkeyPatch.context() as mp:
        if where == "throttle exit":
            throttle.where = (spool.dir, "queue1", ".checkout", e.name)
        elif where == "mutex":
            real_rlock = threading.RLock

            def rlock() -> Any:
                real_rlock()
                raise KeyboardInterrupt  # as it returns

            mp.setattr(multispool._spool.threading, "RLock", rlock)
        else:
            real_init = multispool.CheckedOutEntry.__init__

            def init(self: Any, *a: Any) -> None:
                real_init(self, *a)
                raise KeyboardInterrupt

            mp.setattr(multispool.CheckedOutEntry, "__init__", init)
        with pytest.raises(KeyboardInterrupt):
            spool.checkout(e)
    assert spool.list(Queue.QUEUE1) == [e]
    assert _checkouts(spool, Queue.QUEUE1) == []
    with spool.checkout(e) as co:
        assert co.contents == Cog(n=1)


# -- an exception that ends a checkout, and a give-back that fails too ----------------------


class _HandlerError(Exception):
    pass


def _ended_by(kind: str) -> BaseException:
    return KeyboardInterrupt() if kind == "ctrl-c" else _HandlerError("handler failed")


def _notes(exc: BaseException) -> str:
    return "\n".join(getattr(exc, "__notes__", []))


def _end_with_failing_give_back(
    spool: multispool.Spool[Any, bytes], e: Any, how: str, exc: BaseException
) -> None:
    """Check ``e`` out and end its use with ``exc`` (raised by the user's code) the way
    ``how`` says, while a directory planted at its queue name makes giving it back fail."""

    def f(m: Any, df: Any) -> Any:
        _plant_dir(spool, Queue.QUEUE1, e.name)
        raise exc

    if how == "with":
        with spool.checkout(e):
            f(None, None)
    elif how == "with_entry":
        spool.with_entry(e, f)
    elif how == "reader":
        with spool.reader(Queue.QUEUE1, observer="polling") as r:
            r.iter_available(f)
    else:

        async def main() -> None:
            async with multispool.aio.AsyncSpool(spool) as aspool:
                co = await aspool.checkout(e)
                async with co:
                    f(None, None)

        asyncio.run(main())


@pytest.mark.parametrize("kind", ["error", "ctrl-c"])
@pytest.mark.parametrize("how", ["with", "with_entry", "reader", "aio"])
def test_failed_give_back_never_replaces_the_exception_that_ended_the_checkout(
    tmp_path: Path, how: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The user's code raised inside ``with co:`` (or a handler of ``with_entry``, a
    reader's ``iter``, ``async with co``), and giving the entry back failed too (EISDIR:
    a directory planted at its queue name). The release's OSError replaced the user's
    exception: an ``except`` for it was skipped, and Ctrl-C became an OSError. The
    user's exception propagates; the failed give-back is noted on it and logged, and the
    entry stays checked out, held, nothing lost."""
    spool = _spool(tmp_path, "full")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    exc = _ended_by(kind)
    with pytest.raises(type(exc)) as ei:
        _end_with_failing_give_back(spool, e, how, exc)
    assert ei.value is exc
    logged = [r.getMessage() for r in caplog.records if "could not be given back" in r.getMessage()]
    assert len(logged) == 1 and e.name in logged[0] and "Is a directory" in logged[0], logged
    if sys.version_info >= (3, 11):
        assert _notes(exc) == f"multispool: {logged[0].removeprefix('multispool: ')}"
    # Still checked out, and held by this process: no recovery takes it.
    assert _checkouts(spool, Queue.QUEUE1) == [e.name]
    assert spool.recover_checkouts() == []
    planted = Path(spool.dir, "queue1", e.name)
    (planted / "junk").rmdir()
    planted.rmdir()


def test_interrupted_give_back_still_propagates(tmp_path: Path) -> None:
    """Ctrl-C during the give-back that follows a handler's error is no failure of the
    release: it propagates (the handler's error as its context), and the release is
    finished first."""
    spool = _spool(tmp_path, "none")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    real_rename = os.rename

    def interrupted(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        _, d = src_dst(src, dst, kw)
        real_rename(src, dst, *a, **kw)
        if d.endswith(f"/queue1/{e.name}"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as ei, pytest.MonkeyPatch.context() as mp, spool.checkout(e):
        mp.setattr(os, "rename", interrupted)
        raise _HandlerError("handler failed")
    assert isinstance(ei.value.__context__, _HandlerError)
    assert spool.list(Queue.QUEUE1) == [e]
    assert _checkouts(spool, Queue.QUEUE1) == []


@pytest.mark.parametrize("op", ["claim", "save", "release"])
def test_keep_link_name_taken_again_and_again_is_a_clear_error_and_loses_nothing(
    tmp_path: Path, op: str
) -> None:
    """A durable move links its file at the keep name (``.~NAME``); a file found there
    (a crash's leftover) was unlinked and the move started over, by recursion, with no
    limit: a member planting a file at the keep name every time made it recurse until
    RecursionError. After a few tries it is now an OSError (EEXIST) naming the keep
    link, and the entry stays where it was: in its queue, or checked out and held."""
    spool = _spool(tmp_path, "full")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    real_link = os.link
    planted: list[str] = []

    def planting(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        _, d = src_dst(src, dst, kw)
        if os.path.basename(d) == f".~{e.name}":
            Path(d).write_bytes(b"planted")  # the member is there first, every time
            planted.append(d)
        real_link(src, dst, *a, **kw)

    co = None if op == "claim" else spool.checkout(e)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "link", planting)
        with pytest.raises(FileExistsError) as ei:
            if co is None:
                spool.checkout(e)
            elif op == "save":
                co.save(Queue.QUEUE2)
            else:
                co.release()
    assert 1 < len(planted) <= 10
    assert ei.value.filename == planted[0]
    if co is None:
        assert spool.list(Queue.QUEUE1) == [e]
        assert _checkouts(spool, Queue.QUEUE1) == []
    else:
        assert not co.done and _checkouts(spool, Queue.QUEUE1) == [e.name]
        co.release()
        assert spool.list(Queue.QUEUE1) == [e]
    assert e.direct.contents() == Cog(n=1) and e.direct.data_file().load() == b"data"


@pytest.mark.parametrize("durability", DURABILITIES)
@pytest.mark.parametrize("how", ["checkout", "direct"])
def test_remove_of_an_entry_whose_data_is_a_directory_removes_nothing(
    tmp_path: Path, durability: str, how: str
) -> None:
    """A directory planted at ``.data/NAME``: a remove unlinked the metadata (the entry
    was gone), then failed on the directory (EISDIR), leaving a registry file in no
    queue. It is now refused before anything goes, naming the directory: the entry
    stays in its queue, whole."""
    spool = _spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    data = Path(spool.dir, ".data", e.name)
    data.unlink()
    (data / "junk").mkdir(parents=True)
    with pytest.raises(IsADirectoryError) as ei:
        if how == "direct":
            e.direct.remove()
        else:
            with spool.checkout(e) as co:
                co.remove()
    assert ei.value.filename == str(data)
    assert spool.list(Queue.QUEUE1) == [e]
    assert _checkouts(spool, Queue.QUEUE1) == []
    assert e.direct.contents() == Cog(n=1)
    assert os.path.exists(Path(spool.dir, ".registry", e.name))
    assert spool.checkout(e).contents == Cog(n=1)  # its lock is free


@pytest.mark.parametrize("durability", DURABILITIES)
def test_claim_into_a_missing_checkout_dir_is_an_error_not_a_lost_race(
    tmp_path: Path, durability: str
) -> None:
    """With QUEUE/.checkout gone (removed by hand, or by another tool), the claim's
    rename failed with ENOENT, taken for the entry having left its queue (a lost race):
    ``checkout`` said the entry was gone, and a reader returned nothing and waited on,
    for ever, the queue full, nothing logged. It is NotASpoolError naming the directory
    (as a reader's queue directory that disappeared is), and the entry stays queued."""
    spool = _spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    co_dir = Path(spool.dir, "queue1", ".checkout")
    co_dir.rmdir()
    with pytest.raises(multispool.NotASpoolError) as ei:
        spool.checkout(e)
    assert ei.value.path == str(co_dir)
    with spool.reader(Queue.QUEUE1, observer="polling") as r, pytest.raises(multispool.NotASpoolError):
        r.dequeue_available()
    assert spool.list(Queue.QUEUE1) == [e]
    assert [n for n in os.listdir(Path(spool.dir, "queue1")) if n[0] == "."] == []  # no keep link
    co_dir.mkdir()
    with spool.checkout(e) as co:
        assert co.contents == Cog(n=1)


@pytest.mark.parametrize("durability", DURABILITIES)
def test_save_into_a_missing_queue_dir_keeps_the_checkout(tmp_path: Path, durability: str) -> None:
    """A save whose destination queue directory is gone failed with ENOENT, taken for
    the checkout file having vanished: EntryNotFoundError, and the checkout was given
    up, the entry left in the checkout dir with its lock free. It is NotASpoolError
    naming the directory; the checkout is still held, and a later save moves it."""
    spool = _spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    co = spool.checkout(e)
    q2, aside = Path(spool.dir, "queue2"), tmp_path / "queue2-aside"
    q2.rename(aside)
    with pytest.raises(multispool.NotASpoolError) as ei:
        co.save(Queue.QUEUE2)
    assert ei.value.path == str(q2)
    assert not co.done and _checkouts(spool, Queue.QUEUE1) == [e.name]
    assert spool.recover_checkouts(Queue.QUEUE1) == []  # still held
    aside.rename(q2)
    co.save(Queue.QUEUE2)
    assert [x.name for x in spool.list(Queue.QUEUE2)] == [e.name]
    assert _checkouts(spool, Queue.QUEUE1) == []


def test_quarantine_into_a_missing_queue_dir_is_an_error_not_a_quarantine(tmp_path: Path) -> None:
    """Undecodable metadata, and the quarantine queue's directory gone: the move's
    ENOENT was ignored, and CorruptEntryError said the entry was quarantined while it
    stayed in the checkout dir. It is NotASpoolError naming the directory."""
    spool = _spool(tmp_path, "none", quarantine=Queue.QUEUE3)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    Path(spool.dir, "queue1", e.name).write_bytes(b"not json")
    q3 = Path(spool.dir, "queue3")
    q3.rename(tmp_path / "queue3-aside")
    with pytest.raises(multispool.NotASpoolError) as ei:
        spool.checkout(e)
    assert ei.value.path == str(q3)
    assert _checkouts(spool, Queue.QUEUE1) == [e.name]  # left checked out, as without quarantine


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO])
@pytest.mark.parametrize("how", ["checkout", "direct", "with_entry"])
def test_remove_whose_data_unlink_fails_says_the_entry_is_gone_and_leaves_the_rest_to_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, how: str, code: int
) -> None:
    """The data unlink of a remove fails (EACCES in a sticky ``.data`` the file is not
    ours in, EIO) once the metadata is gone: the entry is removed for everyone, and its
    data and reservation are left. The error said only ``Permission denied`` (as if
    nothing had happened), a checkout stayed held (its leftovers locked away from
    ``clean_abandoned`` by this live process) and ``with_entry`` then tried to give back
    the vanished entry, logging a failure. Now the error names the data file and says
    the entry is removed and its leftovers are ``clean_abandoned``'s, the checkout is
    over, and ``clean_abandoned`` removes them."""
    spool = _spool(tmp_path, "full")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data")
    data = os.path.join(spool.dir, ".data", e.name)
    real_unlink = _fs.unlink_quiet

    def unlink(path: str) -> bool:
        if path == data:
            raise OSError(code, os.strerror(code), path)
        return real_unlink(path)

    monkeypatch.setattr(_fs, "unlink_quiet", unlink)
    co: multispool.CheckedOutEntry[Any, bytes] | None = None
    with caplog.at_level(logging.WARNING, logger="multispool"), pytest.raises(OSError) as ei:
        if how == "direct":
            e.direct.remove()
        elif how == "checkout":
            co = spool.checkout(e)
            co.remove()
        else:
            spool.with_entry(e, lambda m, d: (multispool.REMOVE, None))
    err = ei.value
    assert err.errno == code and err.filename == data
    assert "removed" in str(err) and "clean_abandoned" in str(err)
    assert caplog.records == []
    if co is not None:
        assert co.done
    assert spool.list(Queue.QUEUE1) == [] and _checkouts(spool, Queue.QUEUE1) == []
    assert os.path.exists(data)  # left, not lost: clean_abandoned's
    monkeypatch.undo()
    assert spool.clean_abandoned(older_than=0) == [e.name]
    assert not os.path.exists(data)
    assert not os.path.exists(os.path.join(spool.dir, ".registry", e.name))
