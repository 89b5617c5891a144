"""multispool.FileData: large payloads streamed (or hard-linked) into .data, memory bounded."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import multispool
from _paths import open_fds
from conftest import Cog, Queue
from multispool import _fs

# Owner locks held before each test (reservations other tests left): none may be added.
_HELD_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _held_before() -> None:
    _HELD_BEFORE.clear()
    _HELD_BEFORE.update(_fs._held)

LIB = str(Path(__file__).resolve().parent.parent / "lib")


def _spool(tmp_path: Path, data: multispool.FileData | None = None) -> multispool.Spool[Any]:
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, data=data or multispool.FileData())
    return multispool.Spool.create(tmp_path / "spool", sp)


def test_path_on_same_filesystem_is_hard_linked(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    src = tmp_path / "payload.bin"
    src.write_bytes(b"big" * 1000)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), str(src))
    path = e.direct.data_file().load()
    assert path == os.path.join(spool.dir, ".data", e.name)
    assert os.path.samefile(path, src)
    with spool.checkout(e) as co:
        assert Path(co.data_file.load()).read_bytes() == b"big" * 1000
        co.remove()
    assert src.read_bytes() == b"big" * 1000  # the user's file survives the entry


def test_link_false_copies_and_uses_the_spool_file_mode(tmp_path: Path) -> None:
    spool = _spool(tmp_path, multispool.FileData(link=False))
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(3 << 20))
    src.chmod(0o644)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), src)  # os.PathLike too
    path = e.direct.data_file().load()
    assert not os.path.samefile(path, src)
    assert Path(path).read_bytes() == src.read_bytes()
    assert os.stat(path).st_mode & 0o777 == 0o600


def _open_files_in(directory: str) -> list[str]:
    """What this process has open under ``directory`` (Linux: /proc/self/fd), but for
    the spool's own directories, which it holds open."""
    out = []
    for n in open_fds():
        try:
            target = os.readlink(f"/proc/self/fd/{n}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if target.startswith(directory + os.sep):
            out.append(target)
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("how", ["copied path", "raw file object", "data_file.save"])
def test_a_copied_payload_leaves_no_descriptor_open(tmp_path: Path, how: str) -> None:
    """The copy by sendfile(2) (a path not linked, a file object with a descriptor) returned
    from inside the block whose end closes the data file: every copy left it open."""
    spool = _spool(tmp_path, multispool.FileData(link=False))
    src = tmp_path / "payload.bin"
    src.write_bytes(b"payload" * 100)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=0), io.BytesIO(b"first"))  # no descriptor: no sendfile
    assert _open_files_in(spool.dir) == []
    for i in range(3):
        if how == "copied path":
            e = spool.enqueue(Queue.QUEUE1, Cog(n=i), src)
        elif how == "raw file object":
            with open(src, "rb", buffering=0) as f:
                e = spool.enqueue(Queue.QUEUE1, Cog(n=i), f)
        else:
            with spool.checkout(e) as co:
                co.data_file.save(src)
        assert Path(e.direct.data_file().load()).read_bytes() == src.read_bytes()
    assert _open_files_in(spool.dir) == []


@pytest.mark.parametrize("kind", ["raw_file", "buffered_at_offset", "bytesio", "read_only"])
def test_binary_file_objects_are_streamed_from_their_position(tmp_path: Path, kind: str) -> None:
    spool = _spool(tmp_path)
    body = os.urandom((2 << 20) + 123)
    src = tmp_path / "payload.bin"
    src.write_bytes(b"HEAD" + body)
    f: Any
    if kind == "raw_file":
        f = open(src, "rb", buffering=0)  # noqa: SIM115
    elif kind == "buffered_at_offset":
        f = open(src, "rb")  # noqa: SIM115
        f.read(1)  # the buffer is ahead of the logical position
    elif kind == "bytesio":
        f = io.BytesIO(src.read_bytes())
    else:

        class OnlyRead:
            def __init__(self, data: bytes) -> None:
                self._b = io.BytesIO(data)

            def read(self, n: int = -1) -> bytes:
                return self._b.read(min(n, 1000))

        f = OnlyRead(src.read_bytes())
    f.read(3 if kind == "buffered_at_offset" else 4)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), f)
    getattr(f, "close", lambda: None)()
    assert Path(e.direct.data_file().load()).read_bytes() == body


@pytest.mark.parametrize("module", ["gzip", "bz2", "lzma"])
def test_a_file_object_that_decodes_its_file_is_stored_as_it_reads(tmp_path: Path, module: str) -> None:
    # gzip.open(...) and its kin give fileno() of the compressed file underneath: the
    # kernel copy (sendfile) from that descriptor stored the compressed bytes, not what
    # the object reads. What is stored is what read() gives, from its position.
    import importlib

    mod: Any = importlib.import_module(module)
    spool = _spool(tmp_path)
    body = b"hello world " * 10_000
    src = tmp_path / "payload.z"
    with mod.open(src, "wb") as f:
        f.write(b"HEAD" + body)
    with mod.open(src, "rb") as f:
        assert f.read(4) == b"HEAD"
        e = spool.enqueue(Queue.QUEUE1, Cog(n=1), f)
        assert f.read() == b""  # read to its end, as the docstring says
    assert Path(e.direct.data_file().load()).read_bytes() == body


@pytest.mark.skipif(not hasattr(os, "set_blocking"), reason="POSIX pipes")
@pytest.mark.parametrize("buffering", [0, -1], ids=["raw", "buffered"])
def test_a_non_blocking_file_object_is_not_cut_short(tmp_path: Path, buffering: int) -> None:
    # A non-blocking stream with nothing to read yet gives None (not b"" or 0, its end):
    # the copy took None for the end and spooled the part read so far, silently. It
    # cannot be read to its end without waiting: the enqueue fails and leaves nothing.
    spool = _spool(tmp_path)
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        os.write(w, b"the first part, the rest is still to come")
        with open(r, "rb", buffering=buffering) as f:
            r = -1
            with pytest.raises(BlockingIOError):
                spool.enqueue(Queue.QUEUE1, Cog(n=1), f)
    finally:
        os.close(w)
        if r != -1:
            os.close(r)
    for d in (".registry", ".tmp", ".data", "queue1"):
        assert [n for n in os.listdir(os.path.join(spool.dir, d)) if n != ".checkout"] == []


class _FailingSource(io.RawIOBase):
    """A source whose read fails midway (a disk error, a dropped mount)."""

    name = "/srv/incoming/big.bin"

    def __init__(self) -> None:
        self.calls = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        self.calls += 1
        if self.calls > 1:
            raise OSError(errno.EIO, "Input/output error")
        b[:4] = b"head"
        return 4


@pytest.mark.parametrize("how", ["readinto", "read"])
def test_a_read_error_of_the_source_names_the_source(tmp_path: Path, how: str) -> None:
    # The error came from reading the caller's file, not from writing .data/NAME: it
    # must say so, and the enqueue leaves nothing.
    spool = _spool(tmp_path)
    src: Any = _FailingSource()
    if how == "read":
        inner = src

        class ReadOnly:
            name = inner.name

            def read(self, n: int = -1) -> bytes:
                buf = bytearray(n if n > 0 else 4)
                k = inner.readinto(buf)
                return bytes(buf[:k])

        src = ReadOnly()
    with pytest.raises(OSError) as ei:
        spool.enqueue(Queue.QUEUE1, Cog(n=1), src)
    assert ei.value.errno == errno.EIO
    assert ei.value.filename == _FailingSource.name, ei.value
    for d in (".registry", ".tmp", ".data", "queue1"):
        assert [n for n in os.listdir(os.path.join(spool.dir, d)) if n != ".checkout"] == []


@pytest.mark.parametrize("bad", ["missing", "directory", "not_a_file_object"])
def test_bad_values_fail_before_touching_the_spool(tmp_path: Path, bad: str) -> None:
    spool = _spool(tmp_path)
    value: Any = {"missing": str(tmp_path / "nope"), "directory": str(tmp_path), "not_a_file_object": 42}[bad]
    exc = {"missing": FileNotFoundError, "directory": ValueError, "not_a_file_object": TypeError}[bad]
    with pytest.raises(exc) as ei:
        spool.enqueue_many(Queue.QUEUE1, [(Cog(n=0), io.BytesIO(b"ok")), (Cog(n=1), value)])
    if bad != "not_a_file_object":
        assert str(value) in str(ei.value)
    for d in (".registry", ".tmp", ".data"):
        assert os.listdir(os.path.join(spool.dir, d)) == []


def test_stream_failure_leaves_nothing(tmp_path: Path) -> None:
    spool = _spool(tmp_path)

    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        spool.enqueue(Queue.QUEUE1, Cog(n=1), Broken())
    for d in (".registry", ".tmp", ".data", "queue1"):
        assert [n for n in os.listdir(os.path.join(spool.dir, d)) if n != ".checkout"] == []
    assert _fs._held <= _HELD_BEFORE


def test_data_file_save_replaces_the_payload(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), io.BytesIO(b"one"))
    with spool.checkout(e) as co:
        co.data_file.save(io.BytesIO(b"two"))  # type: ignore[arg-type]
        assert Path(co.data_file.load()).read_bytes() == b"two"


@pytest.mark.parametrize("durability", ["full", "none"])
@pytest.mark.parametrize("source", ["own path", "enqueued source"])
def test_data_file_save_of_a_link_of_the_data_file_leaves_no_tmp_and_keeps_the_data(
    tmp_path: Path, durability: str, source: str
) -> None:
    # Saving a path that is already a link of the entry's data file (the path load()
    # returned, or the source file the enqueue hard-linked) stages .tmp/NAME as one more
    # link of that inode: rename(2) of a link onto another link of the same file does
    # nothing. The staging link left behind must not survive: the next metadata rewrite
    # (O_TRUNC on .tmp/NAME) would truncate the data file through it.
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, data=multispool.FileData(),
                              durability=durability)  # type: ignore[arg-type]
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    src = tmp_path / "payload.bin"
    src.write_bytes(b"payload" * 100)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), str(src))
    co = spool.checkout(e)
    co.data_file.save(co.data_file.load() if source == "own path" else str(src))
    assert os.listdir(os.path.join(spool.dir, ".tmp")) == []
    co.update(lambda c: Cog(n=2)).save(Queue.QUEUE2)  # rewrites the metadata via .tmp/NAME
    data = os.path.join(spool.dir, ".data", e.name)
    assert Path(data).read_bytes() == b"payload" * 100
    assert src.read_bytes() == b"payload" * 100
    assert os.listdir(os.path.join(spool.dir, ".tmp")) == []
    assert spool.list(Queue.QUEUE2)[0].direct.contents() == Cog(n=2)



@pytest.mark.skipif(not hasattr(os, "symlink"), reason="symlinks")
@pytest.mark.parametrize("durability", ["none", "file", "full"])
@pytest.mark.parametrize("via", ["enqueue", "data_file.save"])
def test_a_symlink_to_the_payload_links_the_payload_not_the_symlink(
    tmp_path: Path, durability: str, via: str
) -> None:
    # link(2) does not follow a symlink: linking the path given made .data/NAME the
    # symlink itself. A relative one then pointed into .data (a dangling data file,
    # "none"), and the fsync of "file" and "full" (O_NOFOLLOW) failed the enqueue (ELOOP).
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, data=multispool.FileData(),
                              durability=durability)  # type: ignore[arg-type]
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    (tmp_path / "src").mkdir()
    target = tmp_path / "src" / "payload.bin"
    target.write_bytes(b"payload" * 100)
    os.symlink("payload.bin", tmp_path / "src" / "link")  # relative, as symlinks often are
    link = str(tmp_path / "src" / "link")
    if via == "enqueue":
        e = spool.enqueue(Queue.QUEUE1, Cog(n=1), link)
    else:
        e = spool.enqueue(Queue.QUEUE1, Cog(n=1), io.BytesIO(b"first"))
        with spool.checkout(e) as co:
            co.data_file.save(link)  # type: ignore[arg-type]
    path = e.direct.data_file().load()
    assert not os.path.islink(path)
    assert os.path.samefile(path, target)
    assert Path(path).read_bytes() == b"payload" * 100
    assert os.listdir(os.path.join(spool.dir, ".tmp")) == []


@pytest.mark.parametrize("link", [True, False])
def test_a_data_file_left_by_a_lost_entry_does_not_fail_or_leak_into_a_new_entry(
    tmp_path: Path, link: bool
) -> None:
    # A crash can leave .data/NAME without its reservation (durability "none" or "file":
    # the unlinks of a removal reach the disk in any order). A generator that reuses names
    # (PrefixNames) gives NAME again: the new entry's data must replace that file, not
    # fail on it (link(2): EEXIST) nor write through it (O_TRUNC: when it is a hard link
    # of a user's file, as FileData makes them, that file was overwritten).
    sp = multispool.Spoolable(queues=Queue, metadata=Cog, data=multispool.FileData(link=link),
                              name_generator=multispool.PrefixNames(), durability="file")
    spool = multispool.Spool.create(tmp_path / "spool", sp)
    users = tmp_path / "users.bin"
    users.write_bytes(b"the user's own file")
    lost = os.path.join(spool.dir, ".data", "n000000")
    os.link(users, lost)  # what an enqueue that hard-linked users.bin left, once lost
    src = tmp_path / "payload.bin"
    src.write_bytes(b"new payload")
    for value in (str(src), io.BytesIO(b"streamed")):
        e = spool.enqueue(Queue.QUEUE1, Cog(n=1), value, reserve="n")  # no error
        assert e.name == "n000000"
        want = b"new payload" if isinstance(value, str) else b"streamed"
        assert Path(e.direct.data_file().load()).read_bytes() == want
        assert users.read_bytes() == b"the user's own file"
        e.direct.remove()
        os.link(users, lost)


_RSS_CHILD = textwrap.dedent(
    """
    import enum, io, os, sys
    import multispool

    class Q(enum.Enum):
        A = "a"

    size = int(sys.argv[2])

    class Zeros(io.RawIOBase):  # a file object that is no file: the streaming path
        left = size
        def readable(self): return True
        def readinto(self, b):
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n

    sp = multispool.Spoolable(queues=Q, data=multispool.FileData(link=False), durability="full")
    spool = multispool.Spool.create(sys.argv[1], sp)
    src = os.path.join(sys.argv[1], "..", "src.bin")
    with open(src, "wb") as f:
        f.truncate(size)  # sparse: the copy still reads every byte
    e1 = spool.enqueue(Q.A, {"n": 1}, Zeros())
    e2 = spool.enqueue(Q.A, {"n": 2}, src)
    os.unlink(src)
    for e in (e1, e2):
        with spool.checkout(e) as co:
            path = co.data_file.load()
            assert os.path.getsize(path) == size, path
            co.remove()
    # VmHWM: this process's own peak (ru_maxrss would include the forking parent's,
    # which Linux carries over exec).
    with open("/proc/self/status") as f:
        print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) // 1024)
    """
)


_SLOW = pytest.mark.skipif(not os.environ.get("MULTISPOOL_SLOW"), reason="set MULTISPOOL_SLOW=1")


@pytest.mark.parametrize("size_mb", [64, pytest.param(1024, marks=_SLOW)])
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_large_payload_memory_is_bounded(tmp_path: Path, size_mb: int) -> None:
    """A payload far larger than the process enqueues and loads with RSS under 50 MB
    (read and written in 1 MiB pieces; 100 MB with BytesData peaked at 120 MB)."""
    r = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(tmp_path / "spool"), str(size_mb << 20)],
        env={**os.environ, "PYTHONPATH": LIB},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    peak_mb = int(r.stdout.split()[-1])
    assert peak_mb < 50, f"peak RSS {peak_mb} MB for a {size_mb} MB payload"
