"""A hostile member of a shared spool's group swaps one of the spool's directories (a
queue, its ``.checkout``, ``.data``, ``.tmp``, ``.registry``) for a symbolic link to a
directory of another user's own, holding files at the names the spool is about to use.
No operation may then rename over, unlink, move away or write a file of that directory:
a spool holds each of its directories open once found, and works relative to those
descriptors (a later swap leaves it in the real directory), and a directory that is a
symlink when first opened is refused by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import multispool
from conftest import Cog, Queue

# Every name PrefixNames gives for seed "guess": predictable, as time-ordered names are.
GUESS = "guess000000"


class Victim:
    """A directory of the test user's own, outside the spool, with a file at each name
    the spool may use; ``untouched`` checks it byte for byte (no file replaced, removed,
    added or changed)."""

    def __init__(self, root: Path, names: tuple[str, ...] = (GUESS,), raw: bytes | None = None) -> None:
        self.dir = root / "victim"
        self.dir.mkdir()
        self.files = {n: raw or f"the victim's own {n}: never to be touched\n".encode() for n in names}
        for n, b in self.files.items():
            (self.dir / n).write_bytes(b)
        self.inodes = {n: (self.dir / n).stat().st_ino for n in names}

    def untouched(self) -> None:
        assert sorted(os.listdir(self.dir)) == sorted(self.files)
        for n, raw in self.files.items():
            p = self.dir / n
            assert p.read_bytes() == raw
            assert p.stat().st_ino == self.inodes[n]


@pytest.fixture
def victim(tmp_path: Path) -> Victim:
    return Victim(tmp_path)


def swap(d: str | Path, victim: Victim) -> Path:
    """Replace spool directory ``d`` with a symlink to the victim's directory, as a member
    who may write its parent can: the real directory is renamed aside (same inode, and
    returned), its path now leads to the victim's."""
    d = Path(d)
    aside = d.with_name(d.name + ".aside")
    os.rename(d, aside)
    os.symlink(victim.dir, d)
    return aside


def _q1(spool: multispool.Spool[Any, bytes]) -> Path:
    return Path(spool.dir, Queue.QUEUE1.value)


def _enqueue(spool: multispool.Spool[Any, bytes]) -> multispool.Entry[Any, bytes]:
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"payload", reserve="guess")
    assert e.name == GUESS
    return e


# -- the consumer side ------------------------------------------------------------------


def test_claim_with_checkout_dir_swapped_stays_in_the_spool(
    spool: multispool.Spool[Any, bytes], victim: Victim
) -> None:
    e = _enqueue(spool)
    real = swap(_q1(spool) / ".checkout", victim)
    co = spool.checkout(e)
    victim.untouched()
    assert os.listdir(real) == [GUESS]
    assert co.contents == Cog(n=1) and co.data_file.load() == b"payload"
    co.save(Queue.QUEUE2)
    victim.untouched()
    assert [x.name for x in spool.list(Queue.QUEUE2)] == [GUESS]


@pytest.mark.parametrize("how", ["save", "retry", "release"])
def test_move_out_of_swapped_checkout_dir_never_takes_the_victims_file(
    spool: multispool.Spool[Any, bytes], victim: Victim, how: str
) -> None:
    co = spool.checkout(_enqueue(spool))
    real = swap(_q1(spool) / ".checkout", victim)
    if how == "save":
        co.save(Queue.QUEUE2)
    elif how == "retry":
        co.retry(60.0)
    else:
        co.release()
    victim.untouched()
    assert os.listdir(real) == []
    dst = Queue.QUEUE2 if how == "save" else Queue.QUEUE1
    assert [x.name for x in spool.list(dst)] == [GUESS]


def test_save_into_swapped_queue_dir_stays_in_the_spool(
    spool: multispool.Spool[Any, bytes], victim: Victim
) -> None:
    co = spool.checkout(_enqueue(spool))
    real = swap(Path(spool.dir, Queue.QUEUE2.value), victim)
    co.save(Queue.QUEUE2)
    victim.untouched()
    assert sorted(os.listdir(real)) == [".checkout", GUESS]


def test_save_rewritten_with_tmp_swapped_stays_in_the_spool(
    spool: multispool.Spool[Any, bytes], victim: Victim
) -> None:
    co = spool.checkout(_enqueue(spool))
    swap(Path(spool.dir, ".tmp"), victim)
    co.update(lambda m: Cog(n=2)).save(Queue.QUEUE2)
    victim.untouched()
    assert [x.direct.contents() for x in spool.list(Queue.QUEUE2)] == [Cog(n=2)]


@pytest.mark.parametrize("where", [".data", ".registry"])
def test_remove_with_dir_swapped_never_unlinks_the_victims_file(
    spool: multispool.Spool[Any, bytes], victim: Victim, where: str
) -> None:
    co = spool.checkout(_enqueue(spool))
    real = swap(Path(spool.dir, where), victim)
    co.remove()
    victim.untouched()
    assert os.listdir(real) == []


def test_recover_with_checkout_dir_swapped_never_takes_the_victims_file(
    spool: multispool.Spool[Any, bytes], tmp_path: Path
) -> None:
    # A file of the victim's that decodes as metadata: it would be "recovered" as is.
    victim = Victim(tmp_path, raw=b'{"type":"Cog","n":7}')
    # The member also reserves the victim's file names, so that they look like dead
    # checkouts through the link.
    Path(spool.dir, ".registry", GUESS).touch()
    swap(_q1(spool) / ".checkout", victim)
    assert spool.recover_checkouts() == []
    victim.untouched()
    assert spool.list(Queue.QUEUE1) == []


@pytest.mark.parametrize("where", [".data", ".tmp"])
def test_clean_abandoned_with_dir_swapped_never_unlinks_the_victims_file(
    spool: multispool.Spool[Any, bytes], victim: Victim, where: str
) -> None:
    reg = Path(spool.dir, ".registry", GUESS)
    reg.touch()  # an abandoned reservation (no lock held, in no queue)
    os.utime(reg, (1, 1))
    swap(Path(spool.dir, where), victim)
    assert spool.clean_abandoned(older_than=0) == [GUESS]
    victim.untouched()
    assert not reg.exists()


@pytest.mark.parametrize("where", ["queue1/.checkout", "queue1", ".data", ".tmp", ".registry"])
def test_load_refuses_a_spool_dir_that_is_a_symlink_and_touches_nothing(
    spool: multispool.Spool[Any, bytes], victim: Victim, where: str
) -> None:
    swap(Path(spool.dir, where), victim)
    with pytest.raises(multispool.NotASpoolError) as ei:
        multispool.Spool.load(spool.dir, spool.spoolable)
    # .registry and .tmp are what makes a directory look like a spool: without them it
    # is none (the message names the spool), the others are named themselves.
    named = spool.dir if where in (".registry", ".tmp") else str(Path(spool.dir, where))
    assert named in str(ei.value)
    victim.untouched()


def test_unsafe_spool_first_opening_a_swapped_dir_refuses_it_by_name(
    spool: multispool.Spool[Any, bytes], victim: Victim
) -> None:
    e = _enqueue(spool)
    swap(_q1(spool) / ".checkout", victim)
    fresh = multispool.Spool.load_unsafe(spool.dir, spool.spoolable)
    with pytest.raises(multispool.NotASpoolError) as ei:
        fresh.checkout(multispool.Entry(fresh, Queue.QUEUE1, e.name))
    assert str(_q1(spool) / ".checkout") in str(ei.value)
    victim.untouched()
    assert [x.name for x in spool.list(Queue.QUEUE1)] == [GUESS]


@pytest.mark.parametrize("mode", ["native", "polling"])
def test_reader_whose_queue_dir_is_swapped_refuses_it_by_name(
    spool: multispool.Spool[Any, bytes], victim: Victim, mode: str
) -> None:
    """A reader follows a queue directory renamed in its place (the spool's own,
    replaced), but a symlink there is no spool directory: the reader raises
    NotASpoolError naming it, and takes nothing from where it leads."""
    with spool.reader(Queue.QUEUE1, observer=mode, rescan_interval=0.2, poll_interval=0.05) as reader:
        assert reader.dequeue_available() is None
        swap(_q1(spool), victim)
        with pytest.raises(multispool.NotASpoolError) as ei:
            reader.dequeue(timeout=10)
    assert str(_q1(spool)) in str(ei.value)
    victim.untouched()


# -- the producer side ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["queue1", ".tmp", ".data", ".registry"])
@pytest.mark.parametrize("durability", ["none", "full"])
def test_enqueue_with_dir_swapped_stays_in_the_spool(
    tmp_path: Path, spoolable: multispool.Spoolable[Any, bytes], where: str, durability: str
) -> None:
    sp = multispool.Spoolable(
        queues=Queue, metadata=spoolable.metadata, name_generator=multispool.PrefixNames(),
        durability=durability,
    )
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    victim = Victim(tmp_path)
    real = swap(Path(spool.dir, where), victim)
    e = _enqueue(spool)
    victim.untouched()
    # The entry's files went through the real directory (.tmp: renamed on, into queue1).
    want = {".tmp": [], "queue1": [".checkout", GUESS]}.get(where, [GUESS])
    assert sorted(os.listdir(real)) == want
    with spool.checkout(e) as co:
        assert co.contents == Cog(n=1) and co.data_file.load() == b"payload"


@pytest.mark.parametrize("link", [True, False])
def test_file_data_enqueue_with_data_dir_swapped_stays_in_the_spool(
    tmp_path: Path, victim: Victim, link: bool
) -> None:
    """FileData links (or copies) the caller's file in as ``.data/NAME``, through the
    spool's held ``.data``: nothing is created where a symlink put there leads."""
    sp = multispool.Spoolable(
        queues=Queue, metadata=Cog, data=multispool.FileData(link=link),
        name_generator=multispool.PrefixNames(),
    )
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    src = tmp_path / "payload.bin"
    src.write_bytes(b"payload")
    real = swap(Path(spool.dir, ".data"), victim)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), src, reserve="guess")
    assert e.name == GUESS
    victim.untouched()
    assert os.listdir(real) == [GUESS]
