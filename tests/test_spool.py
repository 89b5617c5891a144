"""API.md §4 and §5: names, enqueue (and its cleanup on failure), listing, entries, direct
operations, data files, checkouts, with_entry; two real processes racing for one entry."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest

import multispool
import multispool._fs
import multispool._spool
from _paths import full
from _procs import Worker, broadcast, find_sort, workers
from conftest import Cog, Queue, Sprocket

N = "n000000"  # the first name PrefixNames gives for seed "n"


def _snapshot(root: str) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


# -- names --------------------------------------------------------------------------------


def test_reserve_name_creates_only_the_registry_file(spool: multispool.Spool[Any, bytes]) -> None:
    before = find_sort(spool.dir)
    name = spool.reserve_name("r")
    assert name == "r000000"
    assert find_sort(spool.dir) == sorted([*before, "spool/.registry/r000000"])
    assert (Path(spool.dir) / ".registry" / name).read_bytes() == b""
    assert spool.reserve_name("r") == "r000001"


def test_reserve_name_retries_on_collision(spool: multispool.Spool[Any, bytes]) -> None:
    reg = Path(spool.dir) / ".registry"
    for n in ("r000000", "r000001"):
        (reg / n).write_bytes(b"someone else's")
    assert spool.reserve_name("r") == "r000002"
    assert (reg / "r000000").read_bytes() == b"someone else's"
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"", reserve="r")
    assert e.name == "r000003"


def test_reserve_name_gives_up_on_a_generator_that_always_collides(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Same:
        def next(self, seed: Any, attempt: int) -> str:
            return "same"

    monkeypatch.setattr(multispool._spool, "MAX_NAME_ATTEMPTS", 20)
    spool.spoolable.name_generator = Same()
    spool.reserve_name()
    before = find_sort(spool.dir)
    with pytest.raises(multispool.SpoolError):
        spool.reserve_name()
    assert find_sort(spool.dir) == before


def test_reserve_name_then_enqueue_use(spool: multispool.Spool[Any, bytes]) -> None:
    name = spool.reserve_name("u")
    e = spool.enqueue(Queue.QUEUE2, Cog(n=5), b"payload", use=name)
    assert (e.name, e.queue) == (name, Queue.QUEUE2)
    assert "spool/queue2/u000000" in find_sort(spool.dir)
    assert e.direct.contents() == Cog(n=5)
    assert e.direct.data_file().load() == b"payload"


def test_enqueue_use_a_name_already_in_use(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE2, Cog(n=5), b"payload", reserve="u")
    before = _snapshot(spool.dir)
    with pytest.raises(multispool.SpoolError):
        spool.enqueue(Queue.QUEUE1, Cog(n=6), b"other", use=e.name)
    assert _snapshot(spool.dir) == before



@pytest.mark.parametrize("durability", ["none", "full"])
@pytest.mark.parametrize("how", ["enqueue", "reserve_name", "enqueue_many"])
@pytest.mark.parametrize("where", ["queue", "checkout"])
def test_a_fresh_name_never_replaces_an_orphaned_entry_file(
    tmp_path: Path, durability: str, how: str, where: str
) -> None:
    """An entry whose registry file was removed by hand (or lost) is still in its queue
    (fsck: Orphaned), data and all. PrefixNames proposes its name again (the registry
    name is free): the enqueue replaced the orphan's data and renamed over its metadata,
    destroying both. A name whose queue or checkout file is there is now passed over."""
    sp = multispool.Spoolable(queues=Queue, name_generator=multispool.PrefixNames(), durability=durability)
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    orphan = spool.enqueue(Queue.QUEUE1, {"n": 1}, b"orphan's data", reserve="n")
    assert orphan.name == N
    os.unlink(os.path.join(spool.dir, ".registry", N))
    if where == "checkout":
        q1 = os.path.join(spool.dir, "queue1")
        os.rename(os.path.join(q1, N), os.path.join(q1, ".checkout", N))
    before = _snapshot(spool.dir)
    if how == "enqueue":
        names = [spool.enqueue(Queue.QUEUE1, {"n": 2}, b"new", reserve="n").name]
    elif how == "enqueue_many":
        names = [e.name for e in spool.enqueue_many(Queue.QUEUE1, [({"n": 2}, b"new")], reserve="n")]
    else:
        names = [spool.enqueue(Queue.QUEUE1, {"n": 2}, b"new", use=spool.reserve_name("n")).name]
    assert names == ["n000001"]
    after = _snapshot(spool.dir)
    assert {k: v for k, v in after.items() if N in k} == {k: v for k, v in before.items() if N in k}


@pytest.mark.parametrize("where", ["queue", "checkout"])
def test_enqueue_use_the_name_of_an_entry_in_a_queue_this_spoolable_does_not_know(
    spool: multispool.Spool[Any, bytes], where: str
) -> None:
    # A spool shared with another application (or a queue this one dropped) holds entries
    # in queues the Spoolable at hand does not list. use= of such an entry's name (its
    # lock is free while it waits) was taken for a dead reserver's name: the enqueue
    # wrote over that entry's data and published it into a second queue.
    import enum

    class Theirs(enum.Enum):
        THEIRS = "theirs"

    other = multispool.Spool.create(
        spool.dir, multispool.Spoolable(queues=Theirs, name_generator=multispool.PrefixNames())
    )
    e = other.enqueue(Theirs.THEIRS, {"n": 1}, b"their data", reserve="t")
    if where == "checkout":
        theirs = os.path.join(spool.dir, "theirs")
        os.rename(os.path.join(theirs, e.name), os.path.join(theirs, ".checkout", e.name))  # its owner died
    before = _snapshot(spool.dir)
    with pytest.raises(multispool.SpoolError, match="in use by a spooled entry"):
        spool.enqueue(Queue.QUEUE1, Cog(n=6), b"mine", use=e.name)
    assert _snapshot(spool.dir) == before


def test_enqueue_use_a_name_whose_queue_file_cannot_be_looked_up(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # use= of a spooled entry's name (its lock is free while it waits) must be refused.
    # The lookup of QUEUE/NAME used os.path.lexists, which says False for any error (EIO,
    # a queue dir its user may not search): the name passed for a dead reserver's, and
    # the enqueue wrote over the entry's data and published it a second time.
    e = spool.enqueue(Queue.QUEUE2, Cog(n=5), b"payload", reserve="u")
    qfile = os.path.join(spool.dir, "queue2", e.name)
    lstat = os.lstat

    def failing(path: Any, *a: Any, **kw: Any) -> os.stat_result:
        if full(path, kw.get("dir_fd")) == qfile:
            raise OSError(errno.EIO, "Input/output error", qfile)
        return lstat(path, *a, **kw)

    before = _snapshot(spool.dir)
    monkeypatch.setattr(os, "lstat", failing)
    with pytest.raises(OSError) as ei:
        spool.enqueue(Queue.QUEUE1, Cog(n=6), b"other", use=e.name)
    monkeypatch.undo()
    assert ei.value.errno == errno.EIO and ei.value.filename == qfile
    assert _snapshot(spool.dir) == before
    # Its owner lock was let go: a claim can take it.
    co = spool.checkout(e)
    assert co.data_file.load() == b"payload"
    co.release()


@pytest.mark.parametrize("where", ["queue2", "queue2/.checkout"])
def test_enqueue_use_the_name_of_an_entry_kept_only_by_its_keep_link(
    spool: multispool.Spool[Any, bytes], where: str
) -> None:
    # A durable move cut by a power loss may leave the entry only as the keep link in
    # its source dir (_layout: "SRC/KEEP only", which recovery renames back). The name
    # is an entry's, as clean_abandoned knows: use= of it must not write over its data.
    e = spool.enqueue(Queue.QUEUE2, Cog(n=5), b"payload", reserve="u")
    src = os.path.join(spool.dir, where, e.name)
    if where != "queue2":
        os.rename(os.path.join(spool.dir, "queue2", e.name), src)
    os.rename(src, spool._layout.keep_file(os.path.dirname(src), e.name))
    before = _snapshot(spool.dir)
    with pytest.raises(multispool.SpoolError, match="in use by a spooled entry"):
        spool.enqueue(Queue.QUEUE1, Cog(n=6), b"other", use=e.name)
    assert _snapshot(spool.dir) == before
    spool.recover_checkouts()  # puts it back whole
    assert spool.list(Queue.QUEUE2) == [e]
    assert e.direct.data_file().load() == b"payload"


def test_enqueue_use_unreserved_name(spool: multispool.Spool[Any, bytes]) -> None:
    before = find_sort(spool.dir)
    with pytest.raises(multispool.EntryNotFoundError):
        spool.enqueue(Queue.QUEUE1, Cog(n=1), b"", use="never_reserved")
    assert find_sort(spool.dir) == before


RESERVE_CHILD = """
import sys, enum, multispool
from _procs import serve
class Q(enum.Enum):
    QUEUE1 = "queue1"
    QUEUE2 = "queue2"
    QUEUE3 = "queue3"
spool = multispool.Spool.load(sys.argv[1], multispool.Spoolable(
    queues=Q, name_generator=multispool.PrefixNames()))
serve(lambda line: spool.reserve_name(line))
"""


def test_enqueue_use_name_reserved_by_a_live_process(spool: multispool.Spool[Any, bytes]) -> None:
    w = Worker(RESERVE_CHILD, spool.dir)
    try:
        assert w.recv() == "ready"
        w.send("theirs")
        name = w.recv()
        assert name == "theirs000000"
        with pytest.raises(multispool.EntryNotFoundError):
            spool.enqueue(Queue.QUEUE1, Cog(n=1), b"", use=name)
        assert spool.list(Queue.QUEUE1) == []
    finally:
        w.close()
    # Its process is gone, so is its lock: the reservation can be used now.
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"", use=name)
    assert spool.list(Queue.QUEUE1) == [e]


def test_enqueue_reserve_seed(spool: multispool.Spool[Any, bytes]) -> None:
    names = [spool.enqueue(Queue.QUEUE1, Cog(n=i), b"", reserve="s_").name for i in range(3)]
    assert names == ["s_000000", "s_000001", "s_000002"]
    assert spool.enqueue(Queue.QUEUE1, Cog(n=1), b"").name == "None000000"  # API: f"{seed}{attempt:06d}"


# -- enqueue cleanup ----------------------------------------------------------------------


class FailingData:
    """Writes part of the file, then fails (as a full disk or a buggy codec would)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.armed = False

    def load(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def save(self, value: bytes, path: str) -> None:
        if not self.armed:
            Path(path).write_bytes(value)
            return
        Path(path).write_bytes(value[:1])
        raise self.exc


def _cleanup_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, durability: str, how: str
) -> tuple[multispool.Spool[Any, Any], Any, type[BaseException], str | None]:
    data: Any = None
    payload: Any = b"payload"
    meta: Any = Cog(n=1)
    exc: type[BaseException] = OSError
    if case == "codec_raises":
        data, exc = FailingData(OSError(errno.ENOSPC, "No space left on device")), OSError
    elif case == "codec_interrupted":
        data, exc = FailingData(KeyboardInterrupt()), KeyboardInterrupt
    elif case == "not_bytes":
        payload, exc = "a str", TypeError
    elif case == "bad_metadata":
        meta, exc = object(), TypeError
    sp = multispool.Spoolable(
        queues=Queue, data=data, name_generator=multispool.PrefixNames(), durability=durability  # type: ignore[arg-type]
    )
    spool: multispool.Spool[Any, Any] = multispool.Spool.create(tmp_path / "spool", sp)
    spool.enqueue(Queue.QUEUE1, Cog(n=0), b"existing", reserve="keep")
    if isinstance(data, FailingData):
        data.armed = True
    use = spool.reserve_name("u") if how == "use" else None
    if case == "rename_fails":

        def rename(src: Any, dst: Any, **kw: Any) -> None:
            raise OSError(errno.EIO, "Input/output error", src)

        monkeypatch.setattr(os, "rename", rename)
    elif case == "fsync_fails":

        def fsync_fd(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(multispool._fs, "fsync_fd", fsync_fd)
    return spool, (meta, payload), exc, use


@pytest.mark.parametrize(
    "case",
    ["codec_raises", "codec_interrupted", "not_bytes", "bad_metadata", "rename_fails", "fsync_fails"],
)
@pytest.mark.parametrize("how", ["reserve", "use"])
def test_enqueue_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, how: str
) -> None:
    durability = "full" if case == "fsync_fails" else "none"
    spool, (meta, payload), exc, use = _cleanup_case(tmp_path, monkeypatch, case, durability, how)
    before = _snapshot(spool.dir)
    with pytest.raises(exc):
        spool.enqueue(Queue.QUEUE1, meta, payload, reserve="n", use=use)
    monkeypatch.undo()
    after = _snapshot(spool.dir)
    if how == "use" and case in ("bad_metadata", "not_bytes"):
        # Data is validated with the metadata, before anything touches disk: the
        # reservation stays.
        assert after == before
    else:
        # Everything the enqueue created is gone; with use=, the reservation it consumed too.
        before.pop(f".registry/{use}", None)
        assert after == before
    assert [e.name for e in spool.list(Queue.QUEUE1)] == ["keep000000"]


@pytest.mark.parametrize("durability", ["none", "full"])
@pytest.mark.parametrize("stuck", ["data", "tmp"])
def test_enqueue_failure_whose_cleanup_fails_raises_its_own_error_and_leaves_an_abandoned_enqueue(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    durability: str,
    stuck: str,
) -> None:
    # The codec fails (ENOSPC) and one of the files the enqueue wrote cannot be removed
    # (EIO): the caller gets the codec's error, not the cleanup's; the other file is
    # removed, the one left is logged by path and stays with its reservation (unlocked),
    # an abandoned enqueue that clean_abandoned removes once it can.
    data = FailingData(OSError(errno.ENOSPC, "No space left on device"))
    sp = multispool.Spoolable(
        queues=Queue, data=data, name_generator=multispool.PrefixNames(), durability=durability  # type: ignore[arg-type]
    )
    spool: multispool.Spool[Any, Any] = multispool.Spool.create(tmp_path / "spool", sp)
    before = _snapshot(spool.dir)
    data.armed = True
    left = os.path.join(spool.dir, ".data" if stuck == "data" else ".tmp", "n000000")
    real_unlink = os.unlink

    def unlink(path: Any, *a: Any, **kw: Any) -> None:
        p = full(path, kw.get("dir_fd"))
        if p == left:
            raise OSError(errno.EIO, "Input/output error", p)
        real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    with caplog.at_level("WARNING", logger="multispool"), pytest.raises(OSError) as info:
        spool.enqueue(Queue.QUEUE1, Cog(n=1), b"payload", reserve="n")
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    after = _snapshot(spool.dir)
    assert set(after) - set(before) == {os.path.relpath(left, spool.dir), ".registry/n000000"}
    assert any(left in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert spool.list(Queue.QUEUE1) == []
    assert spool.clean_abandoned(older_than=0) == ["n000000"]
    assert _snapshot(spool.dir) == before


# -- listing ------------------------------------------------------------------------------


def test_list_sorted_skips_dot_names_and_checkouts(spool: multispool.Spool[Any, bytes]) -> None:
    for n in ("b", "a", "c", "ab"):
        spool.enqueue(Queue.QUEUE1, Cog(n=1), b"", use=spool.reserve_name(n))
    (Path(spool.dir) / "queue1" / ".hidden").write_bytes(b"")
    co = spool.checkout(multispool.Entry(spool, Queue.QUEUE1, "c000000"))
    listed = spool.list(Queue.QUEUE1)
    assert [e.name for e in listed] == ["a000000", "ab000000", "b000000"]
    assert all(isinstance(e, multispool.Entry) and e.queue is Queue.QUEUE1 for e in listed)
    assert all(e.spool is spool for e in listed)
    assert spool.list(Queue.QUEUE2) == []
    assert [c.name for c in spool.list_checkouts_unsafe(Queue.QUEUE1)] == ["c000000"]
    co.release()


def test_list_is_bytewise_sorted(spool: multispool.Spool[Any, bytes]) -> None:
    for n in ("Z", "a", "_", "0", "é"):
        spool.enqueue(Queue.QUEUE1, Cog(n=1), b"", use=spool.reserve_name(n))
    assert [e.name[0] for e in spool.list(Queue.QUEUE1)] == ["0", "Z", "_", "a", "é"]


# -- entries ------------------------------------------------------------------------------


def test_entry_does_not_check_existence(spool: multispool.Spool[Any, bytes]) -> None:
    before = find_sort(spool.dir)
    e = multispool.Entry(spool, Queue.QUEUE2, "ghost")
    assert (e.spool, e.queue, e.name) == (spool, Queue.QUEUE2, "ghost")
    assert multispool.Entry.create(spool, Queue.QUEUE2, "ghost") == e
    assert find_sort(spool.dir) == before
    with pytest.raises(multispool.EntryNotFoundError):
        e.stat()
    with pytest.raises(multispool.EntryNotFoundError):
        e.direct.contents()
    assert spool.checkout_if_found(e) is None
    assert find_sort(spool.dir) == before


def test_entry_stat_is_registry_stat(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"xyz", reserve="n")
    st = e.stat()
    reg = os.stat(Path(spool.dir) / ".registry" / N)
    assert (st.st_ino, st.st_dev, st.st_size) == (reg.st_ino, reg.st_dev, 0)
    spool.checkout(e).remove()
    with pytest.raises(multispool.EntryNotFoundError) as ei:
        e.stat()
    assert N in str(ei.value)


def test_direct_operations(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"xyz", reserve="n")
    assert e.direct.contents() == Cog(n=1)
    df = e.direct.data_file()
    assert isinstance(df, multispool.DataFile)
    assert df.path == os.path.join(spool.dir, ".data", N)
    assert df.load() == b"xyz"
    df.save(b"new data")
    assert (Path(spool.dir) / ".data" / N).read_bytes() == b"new data"
    assert df.stat().st_size == len(b"new data")
    ino = os.stat(Path(spool.dir) / "queue1" / N).st_ino
    e.direct.save(Sprocket(text="replaced"))
    assert e.direct.contents() == Sprocket(text="replaced")
    # Atomically replaced: a new inode, no temp file left.
    assert os.stat(Path(spool.dir) / "queue1" / N).st_ino != ino
    assert os.listdir(Path(spool.dir) / ".tmp") == []
    before = find_sort(spool.dir)
    e.direct.remove()
    assert find_sort(spool.dir) == [p for p in before if not p.endswith(N)]
    with pytest.raises(multispool.EntryNotFoundError):
        e.direct.remove()
    with pytest.raises(multispool.EntryNotFoundError):
        e.direct.save(Cog(n=2))
    assert find_sort(spool.dir) == [p for p in before if not p.endswith(N)]


def test_direct_ops_do_not_touch_a_checked_out_entry(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"xyz", reserve="n")
    co = spool.checkout(e)
    before = _snapshot(spool.dir)
    with pytest.raises(multispool.EntryNotFoundError):
        e.direct.remove()
    with pytest.raises(multispool.EntryNotFoundError):
        e.direct.save(Cog(n=9))
    with pytest.raises(multispool.EntryNotFoundError):
        e.direct.contents()
    assert _snapshot(spool.dir) == before
    co.release()


# -- checkouts ----------------------------------------------------------------------------


def test_checkout_and_checkout_if_found(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"xyz", reserve="n")
    co = spool.checkout(e)
    assert isinstance(co, multispool.CheckedOutEntry)
    assert (co.name, co.queue, co.contents) == (N, Queue.QUEUE1, Cog(n=1))
    assert co.data_file.path == os.path.join(spool.dir, ".data", N)
    assert co.data_file.load() == b"xyz"
    # Taken: a second claim fails, by exception or by None.
    with pytest.raises(multispool.EntryNotFoundError) as ei:
        spool.checkout(e)
    assert N in str(ei.value)
    assert spool.checkout_if_found(e) is None
    co.remove()
    with pytest.raises(multispool.EntryNotFoundError):
        spool.checkout(e)
    assert spool.checkout_if_found(e) is None


def test_update_returns_a_new_entry(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"", reserve="n")
    co = spool.checkout(e)
    co2 = co.update(lambda m: Cog(n=m.n + 41))
    assert co2 is not co
    assert (co.contents, co2.contents) == (Cog(n=1), Cog(n=42))
    assert (co2.name, co2.queue) == (co.name, co.queue)
    co2.save(Queue.QUEUE3)
    assert multispool.Entry(spool, Queue.QUEUE3, N).direct.contents() == Cog(n=42)
    assert "spool/queue1/.checkout/" + N not in find_sort(spool.dir)


def test_save_to_same_queue_and_to_another(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"d", reserve="n")
    spool.checkout(e).save(Queue.QUEUE1)
    assert spool.list(Queue.QUEUE1) == [e]
    co = spool.checkout(e)
    co.save(Queue.QUEUE2)
    assert spool.list(Queue.QUEUE1) == [] and [x.name for x in spool.list(Queue.QUEUE2)] == [N]
    with pytest.raises(multispool.SpoolError):
        co.save(Queue.QUEUE3)  # already ended


def test_checked_out_remove(spool: multispool.Spool[Any, bytes]) -> None:
    before = find_sort(spool.dir)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"d", reserve="n")
    spool.checkout(e).remove()
    assert find_sort(spool.dir) == before


@pytest.mark.parametrize("raise_inside", [False, True])
def test_context_manager_returns_entry_unchanged(
    spool: multispool.Spool[Any, bytes], raise_inside: bool
) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"d", reserve="n")
    before = _snapshot(spool.dir)

    class Boom(Exception):
        pass

    try:
        with spool.checkout(e) as co:
            assert "queue1/.checkout/" + N in _snapshot(spool.dir)
            co.contents = Cog(n=99)  # not saved: must not reach the disk
            if raise_inside:
                raise Boom
    except Boom:
        assert raise_inside
    assert _snapshot(spool.dir) == before
    assert spool.checkout(e).contents == Cog(n=1)


def test_context_manager_after_save_or_remove_does_nothing(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"d", reserve="n")
    with spool.checkout(e) as co:
        co.save(Queue.QUEUE2)
    assert [x.name for x in spool.list(Queue.QUEUE2)] == [N] and spool.list(Queue.QUEUE1) == []
    with spool.checkout(multispool.Entry(spool, Queue.QUEUE2, N)) as co:
        co.remove()
    assert spool.list(Queue.QUEUE2) == []


def test_with_entry_save_and_result(spool: multispool.Spool[Any, bytes]) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"d", reserve="n")

    def f(meta: Any, df: multispool.DataFile[bytes]) -> tuple[multispool.Save, str]:
        df.save(df.load() + b"!")
        return multispool.Save(Cog(n=meta.n + 1), Queue.QUEUE2), "result"

    assert spool.with_entry(e, f) == "result"
    e2 = multispool.Entry(spool, Queue.QUEUE2, N)
    assert e2.direct.contents() == Cog(n=2)
    assert e2.direct.data_file().load() == b"d!"
    assert spool.with_entry_if_found(e2, lambda m, d: (multispool.REMOVE, 7)) == 7
    assert spool.list(Queue.QUEUE2) == []
    assert "spool/.registry/" + N not in find_sort(spool.dir)


def test_with_entry_not_found(spool: multispool.Spool[Any, bytes]) -> None:
    ghost = multispool.Entry(spool, Queue.QUEUE1, "ghost")
    called = []
    with pytest.raises(multispool.EntryNotFoundError):
        spool.with_entry(ghost, lambda m, d: called.append(1))  # type: ignore[arg-type, func-returns-value]
    assert spool.with_entry_if_found(ghost, lambda m, d: called.append(1)) is multispool.NOT_FOUND  # type: ignore[arg-type, func-returns-value]
    assert called == []
    # Held by someone: also not found.
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"d", reserve="n")
    co = spool.checkout(e)
    assert spool.with_entry_if_found(e, lambda m, d: (multispool.REMOVE, 1)) is multispool.NOT_FOUND
    co.release()


@pytest.mark.parametrize("bad_action", [False, True])
def test_with_entry_exception_puts_entry_back_unchanged(
    spool: multispool.Spool[Any, bytes], bad_action: bool
) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"d", reserve="n")
    before = _snapshot(spool.dir)

    class Boom(Exception):
        pass

    def f(meta: Any, df: Any) -> Any:
        assert "queue1/.checkout/" + N in _snapshot(spool.dir)
        if bad_action:
            return "not an action", None
        raise Boom

    with pytest.raises(TypeError if bad_action else Boom):
        spool.with_entry(e, f)
    assert _snapshot(spool.dir) == before
    assert spool.with_entry(e, lambda m, d: (multispool.REMOVE, m)) == Cog(n=1)


def test_save_action_and_remove_are_exported_values() -> None:
    s = multispool.Save(Cog(n=1), Queue.QUEUE2)
    assert (s.metadata, s.queue) == (Cog(n=1), Queue.QUEUE2)
    assert s == multispool.Save(Cog(n=1), Queue.QUEUE2)
    assert multispool.REMOVE is not multispool.NOT_FOUND


def test_list_checkouts_unsafe_decodes(spool: multispool.Spool[Any, bytes]) -> None:
    a = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"", reserve="a")
    b = spool.enqueue(Queue.QUEUE1, Sprocket(text="s"), b"", reserve="b")
    cos = [spool.checkout(b), spool.checkout(a)]
    listed = spool.list_checkouts_unsafe(Queue.QUEUE1)
    assert [(c.name, c.queue, c.contents) for c in listed] == [
        ("a000000", Queue.QUEUE1, Cog(n=1)),
        ("b000000", Queue.QUEUE1, Sprocket(text="s")),
    ]
    for c in cos:
        c.release()
    assert spool.list_checkouts_unsafe(Queue.QUEUE1) == []


# -- two processes racing for one entry ----------------------------------------------------

RACE_CHILD = """
import sys, enum, multispool
from _procs import serve
class Q(enum.Enum):
    QUEUE1 = "queue1"
    QUEUE2 = "queue2"
    QUEUE3 = "queue3"
spool = multispool.Spool.load(sys.argv[1], multispool.Spoolable(queues=Q))
held = []
def handle(line):
    how, name = line.split()
    e = multispool.Entry(spool, Q.QUEUE1, name)
    if how == "if_found":
        co = spool.checkout_if_found(e)
    else:
        try:
            co = spool.checkout(e)
        except multispool.EntryNotFoundError:
            co = None
    if co is None:
        return "lost"
    held.append(co)  # keep it until told: the loser must not see it come back
    return "won " + co.contents["who"]
def serve_line(line):
    if line == "finish":
        for co in held:
            co.remove()
        held.clear()
        return "done"
    return handle(line)
serve(serve_line)
"""


def test_two_processes_race_for_one_entry(spool: multispool.Spool[Any, bytes]) -> None:
    rounds = int(os.environ.get("MULTISPOOL_RACE_ROUNDS", "50"))
    # Untyped metadata, as the children read it (the fixture's type would refuse it).
    spool = multispool.Spool.load(spool.dir, multispool.Spoolable(queues=Queue))
    with workers(RACE_CHILD, 2, spool.dir) as ws:
        wins = [0, 0]
        for r in range(rounds):
            e = spool.enqueue(Queue.QUEUE1, {"who": f"r{r}"}, b"data", reserve=f"race{r}_")
            how = "if_found" if r % 2 else "checkout"
            replies = broadcast(ws, f"{how} {e.name}")
            winners = [i for i, rep in enumerate(replies) if rep.startswith("won")]
            assert len(winners) == 1, f"round {r}: {replies}"
            assert replies[winners[0]] == f"won r{r}"
            assert replies[1 - winners[0]] == "lost", replies
            wins[winners[0]] += 1
            assert broadcast(ws, "finish") == ["done", "done"]
        assert spool.list(Queue.QUEUE1) == []
    assert find_sort(spool.dir)[1:3] == ["spool/.data", "spool/.registry"]
    assert os.listdir(Path(spool.dir) / ".registry") == []


@pytest.mark.parametrize("durability", ["none", "file", "full"])
def test_an_enqueue_runs_no_import_machinery(tmp_path: Path, durability: str) -> None:
    """The per-entry path imports nothing: a ``from ... import`` inside a function
    runs importlib's code on every call (2 us of 50 for a non-durable enqueue), and
    with 8 threads enqueueing its bookkeeping made them queue up (1.4x throughput
    once gone, tmpfs)."""
    import sys

    spool = multispool.Spool.create(
        tmp_path / "spool", multispool.Spoolable(queues=Queue, durability=durability)  # type: ignore[arg-type]
    )
    spool.enqueue(Queue.QUEUE1, {"n": 0}, b"warm")  # what runs once per process
    seen: set[str] = set()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            seen.add(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        e = spool.enqueue(Queue.QUEUE1, {"n": 1}, b"data")
    finally:
        sys.setprofile(None)
    assert e.name in [x.name for x in spool.list(Queue.QUEUE1)]
    assert any(f.endswith("_enqueue.py") for f in seen)  # the profile saw the pipeline
    assert not [f for f in seen if "importlib" in f], sorted(seen)


def test_a_non_durable_enqueue_stays_within_its_budget_of_python_calls(tmp_path: Path) -> None:
    """The pipeline's Python is most of a non-durable enqueue's cost, and threads on one
    GIL multiply it (8 threads, tmpfs: 4,661/s at 53 Python calls per enqueue, 6,430/s
    at 37; 80e0c42 made 25). A deterministic count instead of a timing: a step added to
    every entry's path shows here, on any machine."""
    import sys

    spool = multispool.Spool.create(
        tmp_path / "spool", multispool.Spoolable(queues=Queue, durability="none")
    )
    spool.enqueue(Queue.QUEUE1, {"n": 0}, b"warm")
    calls: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            calls.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        spool.enqueue(Queue.QUEUE1, {"n": 1}, b"data")
    finally:
        sys.setprofile(None)
    assert any(c.endswith("_enqueue.py:publish") for c in calls)  # the profile saw the path
    assert len(calls) <= 40, "\n".join(calls)


@pytest.mark.parametrize("format", ["json", "msgpack"])
def test_undecodable_data_error_names_the_file(tmp_path: Path, format: Literal["json", "msgpack"]) -> None:
    """A data file that MsgspecData cannot decode raised msgspec's bare error ("JSON is
    malformed"), naming no file; it names the data file, keeps msgspec's error type (a
    handler may catch it), and the entry stays where it was."""
    sp = multispool.Spoolable(queues=Queue, data=multispool.MsgspecData(dict[str, int], format=format))
    spool = multispool.Spool.create(str(tmp_path / "sp"), sp)
    e = spool.enqueue(Queue.QUEUE1, {"n": 1}, {"a": 1})
    wrong_type = sp.data._enc.encode({"a": "x"})
    for garbage, err in ((b"\xc1{", msgspec.DecodeError), (wrong_type, msgspec.ValidationError)):
        Path(e.direct.data_file().path).write_bytes(garbage)
        with spool.checkout(e) as co:
            with pytest.raises(err) as info:
                co.data_file.load()
            assert co.data_file.path in str(info.value)
        with pytest.raises(err, match=re.escape(e.direct.data_file().path)):
            sp.data.load(e.direct.data_file().path)
    assert [x.name for x in spool.list(Queue.QUEUE1)] == [e.name]
