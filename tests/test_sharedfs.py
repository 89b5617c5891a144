"""Shared filesystems (issue 11; docs/shared-filesystems.md): ESTALE means "the entry is
gone"; a rename that a stale client cache turned into a no-op counts as lost, never won;
recovery refuses to trust owner locks on mounts that do not share them.

The stale-client behaviours are reproduced by making the system call behave as GlusterFS
and NFS clients do (scripts/cluster-test runs the real thing on GlusterFS); the lock trust
is tested on real bindfs mounts, whose locks are per mount.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import multispool
from _paths import full, src_dst
from _procs import Worker, child_env
from conftest import Cog, Queue
from multispool import _sharedfs, cli
from multispool._spool import _Recovery
from test_watch import bindfs_mount, ensure_bindfs

REMOTE = _sharedfs.FsFacts("fuse.glusterfs", "/mnt", remote=True, locks_shared=True, reason="test")


def _estale(path: str) -> OSError:
    return OSError(errno.ESTALE, os.strerror(errno.ESTALE), path)


def _fail_on(monkeypatch: pytest.MonkeyPatch, name: str, match: Callable[[str], bool], err: int) -> list[str]:
    """Make ``os.NAME(path, ...)`` raise ``err`` for paths ``match`` accepts; returns the
    list of paths it failed."""
    real = getattr(os, name)
    failed: list[str] = []

    def fake(path: Any, *a: Any, **kw: Any) -> Any:
        p = full(path, kw.get("dir_fd", kw.get("src_dir_fd"))) if isinstance(path, (str, os.PathLike)) else ""
        if match(p):
            failed.append(p)
            raise OSError(err, os.strerror(err), p)
        return real(path, *a, **kw)

    monkeypatch.setattr(os, name, fake)
    return failed


# -- 1. ESTALE is "gone" --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "where"),
    [("open", ".registry"), ("utime", "queue1"), ("rename", "queue1"), ("fstat", None)],
)
def test_estale_during_a_claim_means_the_entry_is_gone(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch, call: str, where: str | None
) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    if call == "fstat":
        real = os.fstat
        hit: list[int] = []

        def fstat(fd: int) -> os.stat_result:
            hit.append(fd)
            raise OSError(errno.ENOENT, "gone through another client")

        monkeypatch.setattr(os, "fstat", fstat)
        assert spool.checkout_if_found(e) is None
        assert hit
        monkeypatch.setattr(os, "fstat", real)
    else:
        failed = _fail_on(monkeypatch, call, lambda p: f"/{where}/" in p, errno.ESTALE)
        assert spool.checkout_if_found(e) is None
        assert failed
        monkeypatch.undo()
    # Nothing was harmed: the entry is still there, and claimable.
    assert [x.name for x in spool.list(Queue.QUEUE1)] == [e.name]
    co = spool.checkout_if_found(e)
    assert co is not None
    co.remove()


def test_estale_reading_a_fresh_checkout_gives_it_back(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    failed = _fail_on(monkeypatch, "open", lambda p: "/.checkout/" in p, errno.ESTALE)
    assert spool.checkout_if_found(e) is None
    assert failed
    monkeypatch.undo()
    assert [x.name for x in spool.list(Queue.QUEUE1)] == [e.name]
    assert spool.list_checkouts_unsafe(Queue.QUEUE1) == []


def test_reader_survives_estale_on_every_entry(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [spool.enqueue(Queue.QUEUE1, Cog(n=1), b"%d" % i).name for i in range(4)]
    stale = {names[0], names[2]}
    _fail_on(monkeypatch, "utime", lambda p: os.path.basename(p) in stale, errno.ESTALE)
    with spool.reader(Queue.QUEUE1, observer="polling") as reader:
        got = [co.name for co in (reader.dequeue(timeout=0) for _ in range(2)) if co is not None]
        assert got == [names[1], names[3]]
    monkeypatch.undo()


def test_recovery_and_listing_treat_estale_as_gone(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    co = spool.checkout(e)
    co._claim.release()  # as if its owner died
    failed = _fail_on(monkeypatch, "open", lambda p: "/.checkout/" in p, errno.ESTALE)
    assert spool.recover_checkouts() == []
    assert spool.list_checkouts_unsafe(Queue.QUEUE1) == []
    with pytest.raises(multispool.EntryNotFoundError):
        multispool.Entry(spool, Queue.QUEUE1, e.name).direct.contents()
    assert failed
    monkeypatch.undo()
    assert spool.recover_checkouts() == [e]


# -- 2. a rename that did nothing is never a win ----------------------------------------
def _noop_renames(monkeypatch: pytest.MonkeyPatch, times: int) -> list[tuple[str, str]]:
    """The next ``times`` renames report success and move nothing, as a stale client's
    rename does when it resolves both names to one inode (a rename of a file onto
    itself): both names then lead to the entry, as that client sees it. The next real
    rename first drops the stale name (the client's cache expired)."""
    real = os.rename
    real_lexists = multispool._fs.lexists
    calls: list[tuple[str, str]] = []

    def fake(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        s, d = src_dst(src, dst, kw)
        if len(calls) < times:
            calls.append((s, d))
            if not os.path.lexists(d):
                os.link(s, d)
            return
        expire_stale_names(calls)
        real(src, dst, *a, **kw)

    def lexists(path: str) -> bool:
        # Looking the stale name up (before a rename onto it) counts as a try too: the
        # cache expires after ``times`` tries, whichever calls they were.
        stale = [c for c in calls if c[1] == path]
        if stale and real_lexists(path):
            if len(calls) < times:
                calls.append(stale[0])
            else:
                expire_stale_names(calls)
        return real_lexists(path)

    monkeypatch.setattr(os, "rename", fake)
    monkeypatch.setattr(multispool._fs, "lexists", lexists)
    return calls


def expire_stale_names(calls: list[tuple[str, str]]) -> None:
    for src, dst in calls:
        if os.path.lexists(dst) and os.path.lexists(src) and os.path.samefile(src, dst):
            os.unlink(dst)


def test_a_claim_whose_rename_did_nothing_is_lost(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    spool._facts = REMOTE
    calls = _noop_renames(monkeypatch, 1)
    assert spool.checkout_if_found(e) is None
    assert len(calls) == 1
    expire_stale_names(calls)
    assert [x.name for x in spool.list(Queue.QUEUE1)] == [e.name]
    assert spool.list_checkouts_unsafe(Queue.QUEUE1) == []
    co = spool.checkout_if_found(e)  # the cache expired: now it moves
    assert co is not None
    assert spool.list(Queue.QUEUE1) == []
    co.remove()


def test_recover_checkouts_returns_only_what_it_moved(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    spool.checkout(e)._claim.release()  # its owner died
    spool._facts = REMOTE
    calls = _noop_renames(monkeypatch, 1)
    assert spool.recover_checkouts() == []
    expire_stale_names(calls)
    assert [c.name for c in spool.list_checkouts_unsafe(Queue.QUEUE1)] == [e.name]
    assert spool.list(Queue.QUEUE1) == []
    assert spool.recover_checkouts() == [e]
    assert spool.list_checkouts_unsafe(Queue.QUEUE1) == []


@pytest.mark.parametrize("how", ["save", "release"])
def test_save_and_release_retry_a_rename_that_did_nothing(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    co = spool.checkout(e)
    spool._facts = REMOTE
    calls = _noop_renames(monkeypatch, 2)
    if how == "save":
        co.save(Queue.QUEUE2)
    else:
        co.release()
    assert len(calls) == 2
    dst = Queue.QUEUE2 if how == "save" else Queue.QUEUE1
    assert [x.name for x in spool.list(dst)] == [e.name]
    assert spool.list_checkouts_unsafe(Queue.QUEUE1) == []


def test_local_filesystems_do_not_pay_for_verification(spool: multispool.Spool[Any, bytes]) -> None:
    facts = spool._fs_facts()
    assert not facts.remote and facts.locks_shared and not facts.verify_renames, facts


# -- 3. which locks are trusted --------------------------------------------------------
@pytest.mark.parametrize(
    ("fstype", "options", "shared"),
    [
        ("ext4", "rw,relatime", True),
        ("tmpfs", "rw", True),
        ("fuse.glusterfs", "rw,user_id=0", True),
        ("nfs4", "rw,vers=4.2,local_lock=none,addr=10.0.0.1", True),
        ("nfs", "rw,vers=3,nolock,local_lock=all", False),
        ("nfs4", "rw,vers=4.2,local_lock=flock", False),
        ("nfs", "rw,vers=3,local_lock=posix", True),  # flock still goes to the server
        ("cifs", "rw,vers=3.1.1", True),
        ("cifs", "rw,nobrl", False),
        ("fuse.bindfs", "rw", False),
        ("fuse.sshfs", "rw", False),
        ("9p", "rw", False),
    ],
)
def test_which_filesystems_share_locks(fstype: str, options: str, shared: bool) -> None:
    remote = multispool._watch._is_remote(fstype)
    got, why = _sharedfs._locks_shared(fstype, frozenset(options.split(",")), remote)
    assert got is shared, why


def _mounted(tmp_path: Path, spoolable: multispool.Spoolable[bytes]) -> tuple[Path, Path, Path]:
    ensure_bindfs()
    source, m1, m2 = tmp_path / "source", tmp_path / "m1", tmp_path / "m2"
    for d in (source, m1, m2):
        d.mkdir()
    multispool.Spool.create(source / "spool", spoolable)
    return source, m1, m2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sync_path", ["aio", "threads"])
def test_durable_batch_and_group_through_a_fuse_mount(
    tmp_path: Path, spoolable: multispool.Spoolable[bytes], monkeypatch: pytest.MonkeyPatch, sync_path: str
) -> None:
    """A batch and concurrent enqueues on a FUSE mount (bindfs, as GlusterFS's client is):
    their fsyncs, through AIO or from threads, reach the filesystem and succeed, and the
    entries are whole seen through another mount."""
    from multispool import _aio

    if sync_path == "threads":
        monkeypatch.setattr(_aio, "_usable", False)
    elif not _aio._usable:
        pytest.skip("Linux AIO fsync is not available here")
    source, m1, m2 = _mounted(tmp_path, spoolable)
    with bindfs_mount(source, m1), bindfs_mount(source, m2):
        spool1 = multispool.Spool.load(m1 / "spool", spoolable)
        entries = spool1.enqueue_many(Queue.QUEUE1, [(Cog(n=i), b"d%d" % i) for i in range(40)])
        args = [(Queue.QUEUE2, Cog(n=i), b"t%d" % i) for i in range(8)]
        threads = [threading.Thread(target=spool1.enqueue, args=a) for a in args]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        spool2 = multispool.Spool.load(m2 / "spool", spoolable)
        got = [(e.direct.contents(), e.direct.data_file().load()) for e in spool2.list(Queue.QUEUE1)]
        assert got == [(Cog(n=i), b"d%d" % i) for i in range(40)]
        assert [e.name for e in spool2.list(Queue.QUEUE1)] == [e.name for e in entries]
        assert sorted(e.direct.contents().n for e in spool2.list(Queue.QUEUE2)) == list(range(8))


HOLDER = """
import sys, multispool
sys.path.insert(0, {tests!r})
from conftest import Cog, Queue
sp = multispool.Spoolable(queues=Queue)
spool = multispool.Spool.load(sys.argv[1], sp)
co = spool.checkout(spool.list(Queue.QUEUE1)[0])
print("HOLDING", co.name, flush=True)
sys.stdin.read()
"""


@pytest.mark.timeout(120)
def test_recovery_never_takes_a_live_checkout_held_through_another_mount(
    tmp_path: Path, spoolable: multispool.Spoolable[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(_sharedfs.TRUST_ENV, raising=False)
    source, m1, m2 = _mounted(tmp_path, spoolable)
    with bindfs_mount(source, m1), bindfs_mount(source, m2):
        spool1 = multispool.Spool.load(m1 / "spool", spoolable)
        spool2 = multispool.Spool.load(m2 / "spool", spoolable)
        e = spool1.enqueue(Queue.QUEUE1, Cog(n=1), b"live")
        holder = Worker(HOLDER.format(tests=str(Path(__file__).parent)), str(m1 / "spool"))
        try:
            assert holder.recv() == f"HOLDING {e.name}"
            # The lock taken through m1 is invisible through m2: the lock alone is no proof.
            with pytest.raises(multispool.SpoolError, match=r"refused.*bindfs.*dead_after"):
                spool2.recover_checkouts()
            with pytest.raises(multispool.SpoolError, match="refused"):
                spool2.reader(Queue.QUEUE1, recover=True)
            with pytest.raises(multispool.SpoolError, match="refused"):
                _Recovery(spool2)  # the run behind fsck --repair and the CLI's recover and mv
            with pytest.raises(multispool.SpoolError, match="refused"):
                spool2._recover_one(Queue.QUEUE1, "queue1", e.name)  # and its one-entry step
            # fsck through m2 does not call the live checkout dead (so --repair leaves it).
            problems = multispool.Monitor(m2 / "spool", spoolable).run_once()
            assert not [p for p in problems if isinstance(p, multispool.DeadCheckout)], problems
            # An age the user states is: a checkout younger than it stays put.
            assert spool2.recover_checkouts(dead_after=3600) == []
            assert [c.name for c in spool2.list_checkouts_unsafe(Queue.QUEUE1)] == [e.name]
            assert spool2.list(Queue.QUEUE1) == []
            # Its mtime says it is old enough (the holder is stuck for good, say).
            path = spool2.list_checkouts_unsafe(Queue.QUEUE1)[0].path
            os.utime(path, (1, 1), follow_symlinks=False)
            back = spool2.recover_checkouts(dead_after=3600)
            assert back == [multispool.Entry(spool2, Queue.QUEUE1, e.name)]
        finally:
            holder.close()


@pytest.mark.timeout(120)
def test_a_lost_claim_never_gives_back_a_checkout_held_through_another_mount(
    tmp_path: Path, spoolable: multispool.Spoolable[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim through m2 of an entry a live process checked out through m1: m1's lock
    is invisible through m2, so the claim takes the lock, and finds the queue file gone
    (the rename through m1 won). Its error path, made to give back a checkout file its
    own interrupted rename put there, moved the live checkout back into the queue: the
    entry was handed out twice. The rename is the claim: one that did not rename gives
    nothing back."""
    monkeypatch.delenv(_sharedfs.TRUST_ENV, raising=False)
    source, m1, m2 = _mounted(tmp_path, spoolable)
    with bindfs_mount(source, m1), bindfs_mount(source, m2):
        spool1 = multispool.Spool.load(m1 / "spool", spoolable)
        spool2 = multispool.Spool.load(m2 / "spool", spoolable)
        e = spool1.enqueue(Queue.QUEUE1, Cog(n=1), b"live")
        holder = Worker(HOLDER.format(tests=str(Path(__file__).parent)), str(m1 / "spool"))
        try:
            assert holder.recv() == f"HOLDING {e.name}"
            assert spool2.checkout_if_found(multispool.Entry(spool2, Queue.QUEUE1, e.name)) is None
            assert spool2.list(Queue.QUEUE1) == []
            assert [c.name for c in spool2.list_checkouts_unsafe(Queue.QUEUE1)] == [e.name]
        finally:
            holder.close()


@pytest.mark.timeout(120)
def test_trust_locks_env_restores_lock_only_recovery_on_one_mount(
    tmp_path: Path, spoolable: multispool.Spoolable[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, m1, _ = _mounted(tmp_path, spoolable)
    with bindfs_mount(source, m1):
        monkeypatch.setenv(_sharedfs.TRUST_ENV, "1")
        spool1 = multispool.Spool.load(m1 / "spool", spoolable)
        e = spool1.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
        spool1.checkout(e)._claim.release()  # its owner died
        assert spool1._fs_facts().verify_renames
        assert spool1.recover_checkouts() == [e]


# The command line drives the same recovery (issue 11 item 4): through a mount whose locks
# prove nothing, `multispool recover` refuses unless told --dead-after.
CLI_HOLDER = """
import sys, multispool
from conftest import Queue
spool = multispool.Spool.load(sys.argv[1], multispool.Spoolable(queues=Queue))
co = spool.checkout(multispool.Entry(spool, Queue.QUEUE1, sys.argv[2]))
print("HOLDING", flush=True)
sys.stdin.readline()
co.save(Queue.QUEUE2)
print("SAVED", flush=True)
sys.stdin.read()
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "multispool", *args],
        capture_output=True, text=True, env=child_env(), timeout=60, check=False,
    )


def _names(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n[0] != ".")


@pytest.mark.timeout(120)
def test_cli_recover_through_another_mount_needs_dead_after(
    tmp_path: Path, spoolable: multispool.Spoolable[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(_sharedfs.TRUST_ENV, raising=False)
    source, m1, m2 = _mounted(tmp_path, spoolable)
    checkout = source / "spool" / "queue1" / ".checkout"
    with bindfs_mount(source, m1), bindfs_mount(source, m2):
        spool1 = multispool.Spool.load(m1 / "spool", spoolable)
        live, dead = (spool1.enqueue(Queue.QUEUE1, Cog(n=i), b"x").name for i in range(2))
        holder = Worker(CLI_HOLDER, str(m1 / "spool"), live)
        killed = Worker(CLI_HOLDER, str(m1 / "spool"), dead)
        try:
            assert holder.recv() == "HOLDING" and killed.recv() == "HOLDING"
            os.kill(killed.pid, signal.SIGKILL)
            killed.proc.wait(timeout=30)
            # Without --dead-after: refused in one line naming the spool, nothing moved.
            r = _cli("recover", str(m2 / "spool"))
            assert r.returncode == 2 and r.stdout == "", r
            assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
            for needle in (str(m2 / "spool"), "refused", "--dead-after", _sharedfs.TRUST_ENV, "fuse"):
                assert needle in r.stderr, r.stderr
            assert _names(checkout) == sorted([live, dead])
            # Both checkouts are younger than --dead-after: the dead one's free lock alone
            # proves nothing here, so neither moves.
            r = _cli("recover", str(m2 / "spool"), "--dead-after", "1h", "--json")
            assert (r.returncode, json.loads(r.stdout)) == (0, {"recovered": [], "removed_abandoned": []}), r
            assert _names(checkout) == sorted([live, dead])
            # The live holder still owns its entry and finishes it.
            holder.send("save")
            assert holder.recv() == "SAVED"
            assert _names(source / "spool" / "queue2") == [live]
            # The dead holder's checkout, once older than --dead-after, goes back. (Aged
            # through m2: FUSE caches attributes per mount for a second.)
            os.utime(m2 / "spool" / "queue1" / ".checkout" / dead, (1, 1), follow_symlinks=False)
            r = _cli("recover", str(m2 / "spool"), "--dead-after", "1h", "-v")
            assert r.returncode == 0, r
            assert r.stdout.splitlines() == [
                f"recovered queue1/{dead} (its owner died) back into queue1",
                "recovered 1 dead checkouts, removed 0 abandoned enqueues",
            ]
            assert _names(checkout) == [] and _names(source / "spool" / "queue1") == [dead]
        finally:
            holder.close()
            killed.close()


@pytest.mark.timeout(120)
def test_cli_fsck_and_mv_through_another_mount_take_dead_after(
    tmp_path: Path, spoolable: multispool.Spoolable[bytes], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv(_sharedfs.TRUST_ENV, raising=False)
    source, m1, m2 = _mounted(tmp_path, spoolable)
    sp2 = str(m2 / "spool")
    checkout = source / "spool" / "queue1" / ".checkout"
    with bindfs_mount(source, m1), bindfs_mount(source, m2):
        spool1 = multispool.Spool.load(m1 / "spool", spoolable)
        live, dead, moved = (spool1.enqueue(Queue.QUEUE1, Cog(n=i), b"x").name for i in range(3))
        holder = Worker(CLI_HOLDER, str(m1 / "spool"), live)
        killed = [Worker(CLI_HOLDER, str(m1 / "spool"), n) for n in (dead, moved)]
        try:
            assert [w.recv() for w in (holder, *killed)] == ["HOLDING"] * 3
            for w in killed:
                os.kill(w.pid, signal.SIGKILL)
                w.proc.wait(timeout=30)
            # Checked out 5 minutes ago: older than --dead-after 2m, not yet too old for fsck
            # (10m). Aged through m2, whose cached attributes the commands read.
            then = time.time() - 300
            for n in (dead, moved):
                os.utime(m2 / "spool" / "queue1" / ".checkout" / n, (then, then), follow_symlinks=False)
            capsys.readouterr()
            # fsck: every checkout looks dead from here (the live one too), and is said to
            # be unproven; none is a problem.
            assert cli.main(["fsck", sp2]) == 0
            out = capsys.readouterr().out.splitlines()
            assert out[0] == "no problems"
            assert sorted(ln.split()[3] for ln in out[1:4]) == sorted(
                f"queue1/.checkout/{n}" for n in (live, dead, moved)
            )
            assert all(ln.startswith("unproven dead checkout: ") for ln in out[1:4])
            assert out[4].startswith("note: that proves nothing here: ") and "--dead-after" in out[4]
            # --repair without --dead-after leaves them all.
            assert cli.main(["fsck", sp2, "--repair", "--json"]) == 0
            assert json.loads(capsys.readouterr().out) == {"actions": [], "dry_run": False, "problems": []}
            assert _names(checkout) == sorted([live, dead, moved])
            # mv of a checked-out entry recovers it first: refused without --dead-after,
            # left while younger than it, moved once its checkout is older.
            assert cli.main(["mv", sp2, live, "--to", "queue3"]) == 2
            err = capsys.readouterr().err
            assert "refused" in err and "--dead-after" in err and err.count("\n") == 1, err
            assert cli.main(["mv", sp2, live, "--to", "queue3", "--dead-after", "2m"]) == 2
            assert "less than --dead-after ago" in capsys.readouterr().err
            assert cli.main(["mv", sp2, moved, "--to", "queue3", "--dead-after", "2m"]) == 0
            assert _names(source / "spool" / "queue3") == [moved]
            # fsck --repair --dead-after: the old dead checkout goes back, the live one stays.
            assert cli.main(["fsck", sp2, "--repair", "--dead-after", "2m", "--dry-run"]) == 0
            out = capsys.readouterr().out
            assert f"would recover dead checkout queue1/.checkout/{dead} into queue1" in out, out
            assert f"left dead checkout queue1/.checkout/{live}: younger than --dead-after" in out, out
            assert _names(checkout) == sorted([live, dead])
            assert cli.main(["fsck", sp2, "--repair", "--dead-after", "2m"]) == 0
            out = capsys.readouterr().out
            assert f"recovered dead checkout queue1/.checkout/{dead} into queue1" in out, out
            assert _names(checkout) == [live] and _names(source / "spool" / "queue1") == [dead]
            holder.send("save")
            assert holder.recv() == "SAVED"
            assert _names(source / "spool" / "queue2") == [live]
        finally:
            holder.close()
            for w in killed:
                w.close()


def test_close_of_a_registry_descriptor_saying_enoent_is_not_an_error(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # GlusterFS: close(2) of a file unlinked meanwhile (through any client) can report
    # ENOENT or ESTALE, though the descriptor is freed.
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    co = spool.checkout(e)
    real_open, real_close = os.open, os.close
    registry_fds: set[int] = set()

    def fake_open(path: Any, *a: Any, **kw: Any) -> int:
        p = full(path, kw.get("dir_fd"))
        fd = real_open(path, *a, **kw)
        if "/.registry/" in p:
            registry_fds.add(fd)
        return fd

    def fake_close(fd: int) -> None:
        real_close(fd)
        if fd in registry_fds:
            registry_fds.discard(fd)
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "close", fake_close)
    assert spool.checkout_if_found(e) is None  # held by `co`: the descriptor is closed
    registry_fds.add(co._claim.fd or -1)
    co.remove()
    monkeypatch.undo()
    assert spool.list(Queue.QUEUE1) == [] and spool.list_checkouts_unsafe(Queue.QUEUE1) == []


def test_fsck_treats_estale_as_gone(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stray file in .data (no registry file): the Monitor lstats it for its mtime, and
    # another client removed it meanwhile.
    stray = os.path.join(spool.dir, ".data", "stray")
    Path(stray).write_bytes(b"")
    monitor = multispool.Monitor(spool.dir, spool.spoolable)
    assert [type(p).__name__ for p in monitor.run_once()] == ["Orphaned"]
    failed = _fail_on(monkeypatch, "lstat", lambda p: p == stray, errno.ESTALE)
    assert monitor.run_once() == []
    assert failed


def test_save_whose_source_only_looked_stale_is_not_lost(
    spool: multispool.Spool[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rename really moved the entry, but the client still showed the source for a
    # moment: the retry finds the source gone and the destination there, which is a save.
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    co = spool.checkout(e)
    spool._facts = REMOTE
    real_lexists = multispool._fs.lexists
    shown: list[str] = []

    def stale_once(path: str) -> bool:
        if path == co.path and not shown:
            shown.append(path)
            return True
        return real_lexists(path)

    monkeypatch.setattr(multispool._fs, "lexists", stale_once)
    co.save(Queue.QUEUE2)
    assert shown
    assert [x.name for x in spool.list(Queue.QUEUE2)] == [e.name]
    assert co.done


def test_recovery_never_drops_a_checkout_whose_queue_name_only_looks_present(
    spool: multispool.Spool[Any, bytes],
) -> None:
    """A client whose name cache is stale still resolves the queue name that another
    client's claim moved away, to the file now in the checkout dir: one file under both
    names, as a move cut by a crash would leave it on a local disk. On such filesystems
    that is no proof of a cut move: recovery must neither drop the checkout as a copy nor
    rename onto the stale name, and recovers it once the cache has expired (seen on
    GlusterFS: the entry was deleted)."""
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x")
    co = spool.checkout(e)
    co._claim.release()  # its owner died
    spool._facts = REMOTE
    stale = os.path.join(spool.dir, "queue1", e.name)
    os.link(co.path, stale)  # the stale client's view: both names lead to the checkout
    assert spool.recover_checkouts() == []
    assert os.path.exists(co.path), "the only copy was dropped"
    os.unlink(stale)  # the cache expired
    assert spool.recover_checkouts() == [e]
    assert spool.checkout(e).contents == Cog(n=1)
