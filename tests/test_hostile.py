"""A hostile local user who can write into the spool (a spool shared by a group): links
planted at the paths the library writes must never make it write, truncate or lock
anything outside the spool. The planted links point at a file the test user owns
outside the spool (Linux's fs.protected_hardlinks allows that link whatever its
setting), and every test asserts that file is untouched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import multispool
from _paths import full
from conftest import Cog, Queue

SECRET = b"the victim's own file: never to be written, truncated or locked by the spool\n"

# Every name PrefixNames gives for seed "guess": predictable, as time-ordered names are.
GUESS = "guess000000"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file of the user's own, outside the spool."""
    p = tmp_path / "home" / "precious"
    p.parent.mkdir()
    p.write_bytes(SECRET)
    return p


def _untouched(victim: Path) -> None:
    assert victim.read_bytes() == SECRET
    assert victim.stat().st_nlink <= 2  # its own name and, at most, the planted link


def _hard_link(victim: Path, at: Path) -> None:
    try:
        os.link(victim, at)
    except PermissionError:  # pragma: no cover - a hardened kernel refusing even our own file
        pytest.skip("hard links refused here")


@pytest.mark.parametrize("where", [".tmp", ".data"])
def test_enqueue_never_writes_through_a_hard_link_planted_at_its_files(
    spool: multispool.Spool[Any, bytes], victim: Path, where: str
) -> None:
    planted = Path(spool.dir, where, GUESS)
    _hard_link(victim, planted)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"payload", reserve="guess")
    assert e.name == GUESS
    _untouched(victim)
    co = spool.checkout(e)
    assert co.contents == Cog(n=1) and co.data_file.load() == b"payload"
    co.remove()
    _untouched(victim)


def _save_checkout(spool: multispool.Spool[Any, bytes], e: multispool.Entry[Any, bytes]) -> None:
    spool.checkout(e).update(lambda m: Cog(n=2)).save(Queue.QUEUE2)


def _save_data(spool: multispool.Spool[Any, bytes], e: multispool.Entry[Any, bytes]) -> None:
    co = spool.checkout(e)
    co.data_file.save(b"new payload")
    co.save(Queue.QUEUE2)


def _save_direct(spool: multispool.Spool[Any, bytes], e: multispool.Entry[Any, bytes]) -> None:
    e.direct.save(Cog(n=2))


@pytest.mark.parametrize("op", [_save_checkout, _save_data, _save_direct])
def test_rewrites_never_write_through_a_hard_link_planted_at_the_staging_file(
    spool: multispool.Spool[Any, bytes],
    victim: Path,
    op: Callable[[multispool.Spool[Any, bytes], multispool.Entry[Any, bytes]], None],
) -> None:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"payload", reserve="guess")
    _hard_link(victim, Path(spool.dir, ".tmp", e.name))  # planted once the entry is queued
    op(spool, e)
    _untouched(victim)
    assert not os.path.lexists(Path(spool.dir, ".tmp", e.name))


def _plant_registry_link(spool: multispool.Spool[Any, bytes], victim: Path, name: str) -> Path:
    """An entry whose reservation is a hard link of the victim's file: its registry
    file replaced by the link (a member can also craft a whole entry so)."""
    reg = Path(spool.dir, ".registry", name)
    reg.unlink()
    _hard_link(victim, reg)
    return reg


def test_a_registry_file_planted_as_a_hard_link_is_refused_not_written(
    spool: multispool.Spool[Any, bytes], victim: Path
) -> None:
    bad = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"", reserve="bad")
    good = spool.enqueue(Queue.QUEUE1, Cog(n=2), b"", reserve="good")
    reg = _plant_registry_link(spool, victim, bad.name)
    # A delayed save writes the schedule record into the registry file, under its lock.
    with pytest.raises(OSError) as ei:
        spool.checkout(bad).save(Queue.QUEUE1, delay=3600)
    assert ei.value.filename == str(reg)
    with pytest.raises(OSError):
        bad.direct.save(Cog(n=3))
    _untouched(victim)
    # A reader skips it (logged) and goes on.
    done = []

    def handler(m: Any, d: Any) -> multispool.Remove:
        done.append(m)
        return multispool.REMOVE

    with spool.reader(Queue.QUEUE1) as r:
        r.iter_available(handler)
    assert done == [Cog(n=2)]
    assert [e.name for e in spool.list(Queue.QUEUE1)] == [bad.name]  # nothing moved or lost
    assert good.name not in os.listdir(Path(spool.dir, ".registry"))
    _untouched(victim)


def test_a_schedule_written_through_a_second_descriptor_goes_to_the_locked_file_only(
    spool: multispool.Spool[Any, bytes], victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner lock taken on a read-only descriptor (no write access to the registry
    file) writes the schedule record through a second descriptor, opened by path: a
    member who has meanwhile replaced the path with a hard link of a user's file must
    not get the record written into that file."""
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"", reserve="e")
    real_open = os.open

    def read_only_registry(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        p = full(path, kw.get("dir_fd"))
        if ".registry" in p and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", p)  # as a non-owner sees it
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", read_only_registry)
    co = spool.checkout(e)
    monkeypatch.undo()
    reg = Path(spool.dir, ".registry", e.name)
    reg.rename(Path(spool.dir, "moved-away"))  # the locked inode, kept for the test
    _hard_link(victim, reg)
    with pytest.raises(OSError) as ei:
        co.save(Queue.QUEUE1, delay=3600)
    assert ei.value.filename == str(reg)
    _untouched(victim)


def test_an_unlocked_handle_never_writes_its_schedule_into_a_planted_hard_link(
    spool: multispool.Spool[Any, bytes], victim: Path
) -> None:
    """A handle from list_checkouts_unsafe holds no lock and writes the schedule record
    through a descriptor opened by path."""
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"", reserve="e")
    co = spool.checkout(e)
    (unsafe,) = spool.list_checkouts_unsafe(Queue.QUEUE1)
    reg = Path(spool.dir, ".registry", e.name)
    reg.rename(Path(spool.dir, "moved-away"))
    _hard_link(victim, reg)
    with pytest.raises(OSError) as ei:
        unsafe.save(Queue.QUEUE1, delay=3600)
    assert ei.value.filename == str(reg)
    _untouched(victim)
    co.release()


def test_claim_and_save_never_touch_the_times_of_a_file_planted_as_a_hard_link(
    spool: multispool.Spool[Any, bytes], tmp_path: Path
) -> None:
    """A member crafts an entry whose metadata file is a hard link of a user's file
    (one that decodes as metadata). Claiming it, and saving it unchanged, set the
    file's mtime to now (the Monitor's checkout and queue age): a file outside the
    spool had its times changed through the link. Only a file with no other link is
    touched; the user's file keeps its bytes and its mtime."""
    victim = tmp_path / "home" / "settings.json"
    victim.parent.mkdir()
    victim.write_bytes(b'{"type": "Cog", "n": 7}')
    old = 1_000_000_000
    os.utime(victim, (old, old))
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"payload", reserve="guess")
    qfile = Path(spool.dir, "queue1", e.name)
    qfile.unlink()
    _hard_link(victim, qfile)
    co = spool.checkout(e)
    assert co.contents == Cog(n=7)
    assert victim.stat().st_mtime == old
    co.save(Queue.QUEUE2)  # unchanged: no rewrite, just the new queue's age
    assert victim.stat().st_mtime == old
    assert victim.read_bytes() == b'{"type": "Cog", "n": 7}'
    # The entry's own files are still touched: checkout age counts from the claim.
    e2 = spool.enqueue(Queue.QUEUE1, Cog(n=2), b"", reserve="own")
    own = Path(spool.dir, "queue1", e2.name)
    os.utime(own, (old, old))
    co2 = spool.checkout(e2)
    assert Path(co2.path).stat().st_mtime > old
    co2.release()
