"""API.md §2: Spoolable validation, metadata and data codecs, name generators, throttle,
durability (which files and directories are fsynced, and in which order)."""

from __future__ import annotations

import enum
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import multispool
import multispool._fs
from _paths import full, src_dst
from _procs import broadcast, child_env, find_sort, run_python, workers
from conftest import Cog, Queue, Sprocket, Widget

# -- queues -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a/b", "/", "a\0b", ".hidden", ".", "..", 1, None, b"bytes"])
def test_bad_queue_values(bad: object) -> None:
    Bad = enum.Enum("Bad", {"OK": "ok", "BAD": bad})  # type: ignore[misc]
    with pytest.raises(ValueError):
        multispool.Spoolable(queues=Bad)


def test_queues_must_be_a_non_empty_enum() -> None:
    with pytest.raises(ValueError):
        multispool.Spoolable(queues=enum.Enum("Empty", {}))  # type: ignore[misc]
    with pytest.raises(ValueError):
        multispool.Spoolable(queues=str)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", ["file_mode", "dir_mode"])
@pytest.mark.parametrize("bad", [-1, 0o10000, 2**40, True, 1.5, "0o600", None])
def test_bad_modes_are_refused_at_construction(kw: str, bad: object) -> None:
    """An invalid file_mode or dir_mode used to be accepted: -1 made every data and
    registry file mode 7755 (setuid, setgid, executable), a str or float failed only at
    the first enqueue, after Spool.create had made the spool."""
    with pytest.raises(ValueError, match=kw):
        multispool.Spoolable(queues=Queue, **{kw: bad})  # type: ignore[arg-type]


def test_good_modes_are_kept() -> None:
    sp = multispool.Spoolable(queues=Queue, file_mode=0o660, dir_mode=0o2770)
    assert (sp.file_mode, sp.dir_mode) == (0o660, 0o2770)
    sp = multispool.Spoolable(queues=Queue, file_mode=0, dir_mode=0o7777)
    assert (sp.file_mode, sp.dir_mode) == (0, 0o7777)


def test_duplicate_queue_values_are_enum_aliases(tmp_path: Path) -> None:
    # enum.Enum makes a repeated value an alias of the first member, so a Spoolable can
    # never see two queues with one directory: the alias is the same queue.
    class Q(enum.Enum):
        A = "a"
        B = "a"

    assert Q.B is Q.A
    spool = multispool.Spool.create(tmp_path / "spool", multispool.Spoolable(queues=Q))
    e = spool.enqueue(Q.B, 1, b"x", reserve="n")
    assert [p for p in find_sort(tmp_path / "spool") if "/a" in p] == [
        "spool/a", "spool/a/.checkout", f"spool/a/{e.name}",
    ]  # fmt: skip
    assert spool.list(Q.A) == [e]


def test_queue_order_is_definition_order() -> None:
    class Q(enum.Enum):
        Z = "z"
        A = "a"
        M = "m"

    sp = multispool.Spoolable(queues=Q)
    assert list(sp.queues) == [Q.Z, Q.A, Q.M]


def test_foreign_queue_member_rejected(spool: multispool.Spool[Any, bytes]) -> None:
    class Other(enum.Enum):
        QUEUE1 = "queue1"

    before = find_sort(spool.dir)
    with pytest.raises(ValueError):
        spool.enqueue(Other.QUEUE1, Cog(n=1), b"x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        spool.list(Other.QUEUE1)  # type: ignore[arg-type]
    assert find_sort(spool.dir) == before


@pytest.mark.parametrize(
    "kw",
    [
        {"metadata_codec": "yaml"},
        {"durability": "some"},
        {"data": object()},
        {"name_generator": object()},
    ],
)
def test_bad_options(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        multispool.Spoolable(queues=Queue, **kw)


def test_defaults() -> None:
    sp = multispool.Spoolable(queues=Queue)
    assert sp.durability == "full"
    assert isinstance(sp.data, multispool.BytesData)
    assert isinstance(sp.name_generator, multispool.TimeOrderedNames)
    assert sp.throttle is None and sp.quarantine is None


# -- metadata codecs ----------------------------------------------------------------------


def _mk(tmp_path: Path, **kw: Any) -> multispool.Spool[Any, Any]:
    kw.setdefault("name_generator", multispool.PrefixNames())
    return multispool.Spool.create(tmp_path / "spool", multispool.Spoolable(queues=Queue, **kw))


def test_json_metadata_on_disk(tmp_path: Path) -> None:
    spool = _mk(tmp_path, metadata=Widget)
    e = spool.enqueue(Queue.QUEUE1, Sprocket(text="hi"), b"", reserve="a")
    raw = (Path(spool.dir) / "queue1" / e.name).read_bytes()
    assert msgspec.json.decode(raw) == {"type": "Sprocket", "text": "hi"}
    assert spool.checkout(e).contents == Sprocket(text="hi")


def test_msgpack_metadata_on_disk(tmp_path: Path) -> None:
    spool = _mk(tmp_path, metadata=Widget, metadata_codec="msgpack")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=5), b"", reserve="a")
    raw = (Path(spool.dir) / "queue1" / e.name).read_bytes()
    assert raw == msgspec.msgpack.encode(Cog(n=5))
    assert e.direct.contents() == Cog(n=5)


def test_default_metadata_type_is_any(tmp_path: Path) -> None:
    spool = _mk(tmp_path)
    e = spool.enqueue(Queue.QUEUE1, {"a": [1, 2.5, "x", None]}, b"", reserve="a")
    assert spool.checkout(e).contents == {"a": [1, 2.5, "x", None]}


class Rot13Codec:
    """A custom codec: proves the spool uses exactly its bytes, both ways."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def encode(self, obj: Any) -> bytes:
        self.calls.append("encode")
        return ("R:" + str(obj)[::-1]).encode()

    def decode(self, data: bytes) -> Any:
        self.calls.append("decode")
        text = data.decode()
        if not text.startswith("R:"):
            raise ValueError("missing R: prefix")
        return text[2:][::-1]


def test_custom_metadata_codec(tmp_path: Path) -> None:
    codec = Rot13Codec()
    spool = _mk(tmp_path, metadata_codec=codec)
    e = spool.enqueue(Queue.QUEUE1, "hello", b"", reserve="a")
    assert (Path(spool.dir) / "queue1" / e.name).read_bytes() == b"R:olleh"
    co = spool.checkout(e)
    assert co.contents == "hello"
    assert codec.calls[:2] == ["encode", "decode"]
    co.release()
    (Path(spool.dir) / "queue1" / e.name).write_bytes(b"garbage")
    with pytest.raises(multispool.CorruptEntryError, match="missing R: prefix") as ei:
        spool.checkout(e)
    assert isinstance(ei.value.__cause__, ValueError)


def test_custom_codec_encode_must_return_bytes(tmp_path: Path) -> None:
    class Bad:
        def encode(self, obj: Any) -> Any:
            return "not bytes"

        def decode(self, data: bytes) -> Any:
            return data

    spool = _mk(tmp_path, metadata_codec=Bad())
    before = find_sort(spool.dir)
    with pytest.raises(TypeError):
        spool.enqueue(Queue.QUEUE1, "x", b"", reserve="a")
    assert find_sort(spool.dir) == before


class PickleCodec:
    """A custom codec that encodes anything: it checks no type."""

    def encode(self, obj: Any) -> bytes:
        return pickle.dumps(obj)

    def decode(self, data: bytes) -> Any:
        return pickle.loads(data)


class Opaque:
    """A class msgspec cannot encode: only the custom codec knows it."""

    def __init__(self, v: int) -> None:
        self.v = v


def test_custom_codec_metadata_of_the_wrong_type_is_refused_before_touching_disk(tmp_path: Path) -> None:
    # A custom codec's encoder may accept anything: a value that is not of the declared
    # metadata type was spooled, and handed to consumers as if it were one. As with the
    # built-in codecs, it must be refused (msgspec.ValidationError) before any write.
    spool = _mk(tmp_path, metadata=Widget, metadata_codec=PickleCodec())
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x", reserve="a")
    before = find_sort(spool.dir)
    bads: list[Any] = ["not a widget", Cog(n="x"), {"type": "Cog", "n": "x"}, Opaque(1), 2**70]
    for bad in bads:
        with pytest.raises(msgspec.ValidationError):
            spool.enqueue(Queue.QUEUE1, bad, b"x", reserve="a")
        with pytest.raises(msgspec.ValidationError):
            spool.enqueue_many(Queue.QUEUE1, [(Cog(n=2), b"x"), (bad, b"y")], reserve="a")
        with pytest.raises(msgspec.ValidationError):
            e.direct.save(bad)
        with spool.checkout(e) as co, pytest.raises(msgspec.ValidationError):
            co.update(lambda _, v=bad: v).save(Queue.QUEUE2)
        assert find_sort(spool.dir) == before
    assert e.direct.contents() == Cog(n=1)
    # What the type takes the way the built-in codecs take it goes through unchanged.
    e2 = spool.enqueue(Queue.QUEUE1, Sprocket(text="ok"), b"", reserve="a")
    assert e2.direct.contents() == Sprocket(text="ok")


def test_custom_codec_types_msgspec_cannot_encode_are_checked_by_isinstance(tmp_path: Path) -> None:
    # A custom codec is often there for types msgspec does not know: their values are
    # checked by class, not refused for being unencodable.
    spool = _mk(tmp_path, metadata=Opaque, metadata_codec=PickleCodec())
    e = spool.enqueue(Queue.QUEUE1, Opaque(3), b"", reserve="a")
    assert e.direct.contents().v == 3
    lst = _mk(tmp_path / "l", metadata=list[Opaque], metadata_codec=PickleCodec())
    assert lst.enqueue(Queue.QUEUE1, [Opaque(1), Opaque(2)], b"", reserve="a").direct.contents()[1].v == 2
    before = find_sort(spool.dir)
    with pytest.raises(msgspec.ValidationError):
        spool.enqueue(Queue.QUEUE1, 3, b"", reserve="a")
    with pytest.raises(msgspec.ValidationError):
        lst.enqueue(Queue.QUEUE1, [Opaque(1), 2], b"", reserve="a")
    assert find_sort(spool.dir) == before
    # Undeclared (typing.Any): anything the codec encodes.
    anything = _mk(tmp_path / "a", metadata_codec=PickleCodec())
    assert anything.enqueue(Queue.QUEUE1, Opaque(4), b"", reserve="a").direct.contents().v == 4


# -- data codecs --------------------------------------------------------------------------


def test_bytes_data_verbatim(tmp_path: Path) -> None:
    spool = _mk(tmp_path)
    blob = bytes(range(256)) * 1000
    e = spool.enqueue(Queue.QUEUE1, 1, blob, reserve="a")
    assert (Path(spool.dir) / ".data" / e.name).read_bytes() == blob
    assert e.direct.data_file().load() == blob
    e2 = spool.enqueue(Queue.QUEUE1, 1, bytearray(b"ba"), reserve="a")
    assert e2.direct.data_file().load() == b"ba"
    e3 = spool.enqueue(Queue.QUEUE1, 1, b"", reserve="a")
    assert e3.direct.data_file().load() == b""


def test_bytes_data_direct_api(tmp_path: Path) -> None:
    p = str(tmp_path / "f")
    multispool.BytesData().save(b"\x00abc", p)
    assert Path(p).read_bytes() == b"\x00abc"
    assert multispool.BytesData().load(p) == b"\x00abc"


class Payload(msgspec.Struct):
    serial: int
    who: str


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_msgspec_data(tmp_path: Path, fmt: str) -> None:
    spool = _mk(tmp_path, data=multispool.MsgspecData(Payload, format=fmt))  # type: ignore[arg-type]
    e = spool.enqueue(Queue.QUEUE1, 1, Payload(7, "acme"), reserve="a")
    raw = (Path(spool.dir) / ".data" / e.name).read_bytes()
    mod = msgspec.json if fmt == "json" else msgspec.msgpack
    assert mod.decode(raw) == {"serial": 7, "who": "acme"}
    df = spool.checkout(e).data_file
    assert df.load() == Payload(7, "acme")
    df.save(Payload(8, "x"))
    assert df.load() == Payload(8, "x")
    # Validation on load: a payload of the wrong shape is rejected by msgspec.
    Path(df.path).write_bytes(mod.encode({"serial": "not an int", "who": 1}))
    with pytest.raises(msgspec.ValidationError):
        df.load()
    # The public load/save work on any path too.
    codec: multispool.MsgspecData[Payload] = multispool.MsgspecData(Payload, format=fmt)  # type: ignore[arg-type]
    codec.save(Payload(1, "p"), str(tmp_path / "x"))
    assert codec.load(str(tmp_path / "x")) == Payload(1, "p")


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_msgspec_data_of_the_wrong_type_is_refused_before_touching_disk(tmp_path: Path, fmt: str) -> None:
    # msgspec's encoder does not check a value against the codec's type: data that no
    # consumer can load (its load validates) was spooled, and failed every reader of it.
    # As for metadata, such a value must be refused before anything touches the disk.
    spool = _mk(tmp_path, data=multispool.MsgspecData(Payload, format=fmt))  # type: ignore[arg-type]
    bad: Any = {"serial": "not an int", "who": 1}
    before = find_sort(spool.dir)
    with pytest.raises(msgspec.ValidationError):
        spool.enqueue(Queue.QUEUE1, 1, bad, reserve="a")
    with pytest.raises(msgspec.ValidationError):
        spool.enqueue_many(Queue.QUEUE1, [(1, Payload(1, "ok")), (2, bad)], reserve="a")
    assert find_sort(spool.dir) == before
    e = spool.enqueue(Queue.QUEUE1, 1, {"serial": 2, "who": "a dict of the right shape"}, reserve="a")
    with spool.checkout(e) as co:
        assert co.data_file.load() == Payload(2, "a dict of the right shape")
        with pytest.raises(msgspec.ValidationError):
            co.data_file.save(bad)
        assert co.data_file.load() == Payload(2, "a dict of the right shape")
    with pytest.raises(msgspec.ValidationError):
        multispool.MsgspecData(Payload, format=fmt).save(bad, str(tmp_path / "x"))  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()
    # typing.Any (the default) takes whatever encodes.
    untyped = _mk(tmp_path / "any", data=multispool.MsgspecData(format=fmt))
    assert untyped.enqueue(Queue.QUEUE1, 1, bad).direct.data_file().load() == bad


def test_msgspec_data_bad_format() -> None:
    with pytest.raises(ValueError):
        multispool.MsgspecData(Payload, format="yaml")  # type: ignore[arg-type]


class TextData:
    """A user data codec with only the documented load/save."""

    def load(self, path: str) -> str:
        with open(path, encoding="utf-8") as f:
            return f.read()

    def save(self, value: str, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(value)


def test_custom_data_codec(tmp_path: Path) -> None:
    spool = _mk(tmp_path, data=TextData())
    e = spool.enqueue(Queue.QUEUE1, 1, "héllo", reserve="a")
    assert (Path(spool.dir) / ".data" / e.name).read_text(encoding="utf-8") == "héllo"
    co = spool.checkout(e)
    assert co.data_file.load() == "héllo"
    co.data_file.save("bye")
    assert co.data_file.load() == "bye"
    co.remove()
    assert os.listdir(Path(spool.dir) / ".data") == os.listdir(Path(spool.dir) / ".registry") == []


# -- name generators ----------------------------------------------------------------------


def test_prefix_names() -> None:
    g = multispool.PrefixNames()
    assert g.next("q1_co_test_", 0) == "q1_co_test_000000"
    assert g.next("q1_co_test_", 1) == "q1_co_test_000001"
    assert g.next("p", 999999) == "p999999"
    assert g.next("p", 1234567) == "p1234567"
    assert g.next("", 42) == "000042"


def test_time_ordered_names_rapid_calls_are_ordered() -> None:
    g = multispool.TimeOrderedNames()
    names = [g.next(None, 0) for _ in range(50_000)]
    assert len(set(names)) == len(names)
    assert names == sorted(names)
    seeded = [g.next("job-", a) for a in range(100)]
    assert all(s.startswith("job-") for s in seeded) and seeded == sorted(seeded)


def test_time_ordered_names_never_go_back_within_a_process_across_instances(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each Spoolable gets its own default TimeOrderedNames. The clock part was bumped past
    # the last name of the same instance only: once the wall clock stepped back (NTP, a
    # VM resumed), another instance of the process gave names that sort before names
    # made earlier, and readers (name order) took the later entries first.
    clock = iter([2_000_000_000_000_000_000, 1_000_000_000_000_000_000, 1_000_000_000_000_000_001])
    monkeypatch.setattr(multispool._spoolable.time, "time_ns", lambda: next(clock))
    a, b = multispool.TimeOrderedNames(), multispool.TimeOrderedNames()
    first = a.next(None, 0)
    second = b.next(None, 0)  # the clock has stepped back a whole second
    third = a.next(None, 0)
    assert first < second < third


def test_time_ordered_names_are_valid_entry_names(spool: multispool.Spool[Any, bytes]) -> None:
    g = multispool.TimeOrderedNames()
    for seed in (None, "x", "a-b_c."):
        multispool.Entry(spool, Queue.QUEUE1, g.next(seed, 0))


NAMES_CHILD = """
import multispool
from _procs import serve
g = multispool.TimeOrderedNames()
serve(lambda line: ",".join(g.next(None, 0) for _ in range(int(line))))
"""


def test_time_ordered_names_unique_across_processes() -> None:
    with workers(NAMES_CHILD, 4) as ws:
        replies = broadcast(ws, "5000")
    per_proc = [r.split(",") for r in replies]
    for names in per_proc:
        assert len(names) == 5000 and names == sorted(names)
    everything = [n for names in per_proc for n in names]
    assert len(set(everything)) == len(everything)


def test_time_ordered_is_default_and_enqueue_order_is_name_order(tmp_path: Path) -> None:
    sp: multispool.Spoolable[Any, bytes] = multispool.Spoolable(queues=Queue, durability="none")
    assert isinstance(sp.name_generator, multispool.TimeOrderedNames)
    spool = multispool.Spool.create(tmp_path / "s", sp)
    made = [spool.enqueue(Queue.QUEUE1, i, b"").name for i in range(200)]
    assert made == sorted(made)
    assert [e.name for e in spool.list(Queue.QUEUE1)] == made
    assert [e.direct.contents() for e in spool.list(Queue.QUEUE1)] == list(range(200))


# -- throttle -----------------------------------------------------------------------------


class CountingThrottle:
    def __init__(self) -> None:
        self.entered = 0
        self.depth = 0
        self.max_depth = 0

    def __enter__(self) -> None:
        self.entered += 1
        self.depth += 1
        self.max_depth = max(self.max_depth, self.depth)

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1


def _all_ops(spool: multispool.Spool[Any, bytes]) -> list[tuple[str, Callable[[], object]]]:
    """Every synchronous operation, each a step of one scenario."""
    st: dict[str, Any] = {}

    def enqueue() -> None:
        st["e"] = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"d", reserve="a")

    def checkout() -> None:
        st["co"] = spool.checkout(st["e"])

    def save_changed() -> None:
        st["co"].contents = Cog(n=2)
        st["co"].save(Queue.QUEUE2)
        st["e"] = multispool.Entry(spool, Queue.QUEUE2, st["e"].name)

    def with_entry() -> None:
        spool.with_entry(st["e"], lambda m, d: (multispool.Save(Cog(n=3), Queue.QUEUE2), None))

    return [
        ("load", lambda: multispool.Spool.load(spool.dir, spool.spoolable)),
        ("reserve_name", lambda: spool.reserve_name("r")),
        ("enqueue", enqueue),
        ("list", lambda: spool.list(Queue.QUEUE1)),
        ("entry.stat", lambda: st["e"].stat()),
        ("direct.contents", lambda: st["e"].direct.contents()),
        ("direct.save", lambda: st["e"].direct.save(Cog(n=9))),
        ("checkout", checkout),
        ("list_checkouts_unsafe", lambda: spool.list_checkouts_unsafe(Queue.QUEUE1)),
        ("data.load", lambda: st["co"].data_file.load()),
        ("data.save", lambda: st["co"].data_file.save(b"new")),
        ("data.stat", lambda: st["co"].data_file.stat()),
        ("release", lambda: st["co"].release()),
        ("checkout2", checkout),
        ("save_changed", save_changed),
        ("with_entry", with_entry),
        ("checkout3", checkout),
        ("remove", lambda: st["co"].remove()),
        ("direct.remove", lambda: spool.enqueue(Queue.QUEUE1, Cog(n=1), b"").direct.remove()),
    ]


def test_throttle_entered_around_every_disk_operation(tmp_path: Path) -> None:
    t = CountingThrottle()
    spool = _mk(tmp_path, metadata=Widget, throttle=t)
    for label, op in _all_ops(spool):
        before = t.entered
        op()
        assert t.entered > before, f"{label} did not enter the throttle"
        assert t.depth == 0


def test_throttle_is_never_entered_twice_at_once(tmp_path: Path) -> None:
    t = CountingThrottle()
    spool = _mk(tmp_path, metadata=Widget, throttle=t)
    for label, op in _all_ops(spool):
        op()
        assert t.max_depth == 1, f"{label} nested the throttle"


SEMAPHORE_CHILD = """
import enum, signal, sys, threading
import multispool
signal.alarm(3)  # a deadlock kills us instead of hanging the test
class Q(enum.Enum):
    A = "a"
    B = "b"
sem = threading.Semaphore(1)
spool = multispool.Spool.create(sys.argv[1], multispool.Spoolable(queues=Q, throttle=sem))
for i in range(3):
    e = spool.enqueue(Q.A, {"i": i}, b"data")
    with spool.checkout(e) as co:
        co.contents = {"i": i + 1}
        co.data_file.save(b"more")
        co.save(Q.B)
for e in spool.list(Q.B):
    spool.with_entry(e, lambda m, d: (multispool.Save({"j": 1}, Q.A), None))
for e in spool.list(Q.A):
    spool.checkout(e).remove()
print("ok", sem.acquire(blocking=False))
"""


def test_semaphore_throttle_works(tmp_path: Path) -> None:
    r = run_python(SEMAPHORE_CHILD, str(tmp_path / "spool"), timeout=30)
    assert (r.returncode, r.stdout.strip()) == (0, "ok True"), r.stderr


def test_semaphore_throttle_without_metadata_rewrite(tmp_path: Path) -> None:
    # The operations that do not rewrite metadata on save work under a Semaphore(1).
    import threading

    sem = threading.Semaphore(1)
    spool = _mk(tmp_path, throttle=sem)
    e = spool.enqueue(Queue.QUEUE1, 1, b"x", reserve="a")
    co = spool.checkout(e)
    co.data_file.save(b"y")
    co.save(Queue.QUEUE2)
    spool.checkout(spool.list(Queue.QUEUE2)[0]).remove()
    assert sem.acquire(blocking=False)


# -- durability ---------------------------------------------------------------------------

Event = tuple[str, ...]


def _record(monkeypatch: pytest.MonkeyPatch) -> list[Event]:
    """Record fsyncs (by path, through /proc/self/fd), renames and unlinks in order."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    events: list[Event] = []
    real_fsync, real_rename, real_unlink = multispool._fs.fsync_fd, os.rename, os.unlink

    def fsync_fd(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: Any, dst: Any, **kw: Any) -> None:
        events.append(("rename", *src_dst(src, dst, kw)))
        real_rename(src, dst, **kw)

    def unlink(path: Any, **kw: Any) -> None:
        events.append(("unlink", full(path, kw.get("dir_fd"))))
        real_unlink(path, **kw)

    monkeypatch.setattr(multispool._fs, "fsync_fd", fsync_fd)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "unlink", unlink)
    return events


def _idx(events: list[Event], ev: Event) -> int:
    assert ev in events, f"{ev} not in {events}"
    return events.index(ev)


def _durable_spool(tmp_path: Path, durability: str, **kw: Any) -> tuple[multispool.Spool[Any, Any], str]:
    spool = _mk(tmp_path, metadata=Widget, durability=durability, **kw)
    return spool, os.path.realpath(spool.dir)


@pytest.mark.parametrize("durability", ["full", "file", "none"])
@pytest.mark.parametrize("data", ["bytes", "custom"])
def test_enqueue_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str, data: str) -> None:
    kw = {"data": TextData()} if data == "custom" else {}
    spool, d = _durable_spool(tmp_path, durability, **kw)
    events = _record(monkeypatch)
    spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x" if data == "bytes" else "x", reserve="n")
    n = "n000000"
    publish = _idx(events, ("rename", f"{spool.dir}/.tmp/{n}", f"{spool.dir}/queue1/{n}"))
    fsyncs = [e[1] for e in events if e[0] == "fsync"]
    if durability == "none":
        assert fsyncs == []
        return
    # File contents are durable before the rename publishes the entry.
    assert _idx(events, ("fsync", f"{d}/.tmp/{n}")) < publish
    assert _idx(events, ("fsync", f"{d}/.data/{n}")) < publish
    if durability == "file":
        assert sorted(fsyncs) == sorted([f"{d}/.tmp/{n}", f"{d}/.data/{n}"])
        return
    # full: the reservation and the data file's directory entries too, before; the
    # destination queue directory after.
    assert _idx(events, ("fsync", f"{d}/.registry")) < publish
    assert _idx(events, ("fsync", f"{d}/.data")) < publish
    assert _idx(events, ("fsync", f"{d}/queue1")) > publish


@pytest.mark.parametrize("durability", ["full", "file", "none"])
def test_save_remove_and_rewrites_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    spool, d = _durable_spool(tmp_path, durability)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x", reserve="n")
    n = e.name
    events = _record(monkeypatch)
    co = spool.checkout(e)
    co.contents = Cog(n=2)
    co.save(Queue.QUEUE2)
    moved = _idx(events, ("rename", f"{spool.dir}/queue1/.checkout/{n}", f"{spool.dir}/queue2/{n}"))
    fsyncs = [i for i, ev in enumerate(events) if ev[0] == "fsync"]
    if durability == "none":
        assert fsyncs == []
    else:
        # The rewritten metadata is fsynced before any rename makes it visible.
        tmp_sync = _idx(events, ("fsync", f"{d}/.tmp/{n}"))
        first_publish = next(
            i for i, ev in enumerate(events) if ev[0] == "rename" and ev[1].endswith(f".tmp/{n}")
        )
        assert tmp_sync < first_publish
    if durability == "full":
        assert _idx(events, ("fsync", f"{d}/queue2")) > moved
    if durability == "file":
        assert all(events[i][1].startswith(f"{d}/.tmp/") for i in fsyncs)

    # DataFile.save and direct.save: temp file fsynced before its rename, dir after.
    events.clear()
    e2 = multispool.Entry(spool, Queue.QUEUE2, n)
    co = spool.checkout(e2)
    co.data_file.save(b"new data")
    co.release()
    e2.direct.save(Cog(n=3))
    renames = [i for i, ev in enumerate(events) if ev[0] == "rename" and ev[1].endswith(f".tmp/{n}")]
    assert [events[i][2] for i in renames] == [f"{spool.dir}/.data/{n}", f"{spool.dir}/queue2/{n}"]
    syncs = [i for i, ev in enumerate(events) if ev == ("fsync", f"{d}/.tmp/{n}")]
    if durability == "none":
        assert not any(ev[0] == "fsync" for ev in events)
    else:
        assert len(syncs) == 2 and syncs[0] < renames[0] < syncs[1] < renames[1]
    if durability == "full":
        assert _idx(events, ("fsync", f"{d}/.data")) > renames[0]
        assert events.index(("fsync", f"{d}/queue2"), renames[1]) > renames[1]

    # remove: the checkout directory, whose entry changed, is fsynced after the unlink,
    # then the queue the claim took it from (the claim's deferred fsync, see _layout).
    events.clear()
    co = spool.checkout(e2)
    co.remove()
    gone = _idx(events, ("unlink", f"{spool.dir}/queue2/.checkout/{n}"))
    if durability == "full":
        co_sync = events.index(("fsync", f"{d}/queue2/.checkout"), gone)
        assert events.index(("fsync", f"{d}/queue2"), co_sync) > co_sync
        assert _idx(events, ("unlink", f"{spool.dir}/.data/{n}")) > co_sync
    else:
        assert not any(ev[0] == "fsync" for ev in events)


STRACE_CHILD = """
import enum, sys
import multispool
class Q(enum.Enum):
    A = "a"
    B = "b"
spool = multispool.Spool.create(sys.argv[1], multispool.Spoolable(
    queues=Q, durability=sys.argv[2], name_generator=multispool.PrefixNames()))
e = spool.enqueue(Q.A, {"k": 1}, b"payload", reserve="n")
co = spool.checkout(e)
co.save(Q.B)
spool.checkout(multispool.Entry(spool, Q.B, e.name)).remove()
"""


def _renamed_to(ln: str) -> str | None:
    """The destination of a rename line of ``strace -y``: ``rename("A", "B")``, or
    ``renameat(3</dir>, "A", 4</dir2>, "B")`` (a name in a directory descriptor)."""
    m = re.match(r'rename\("[^"]*", "([^"]*)"\)', ln)
    if m:
        return m.group(1)
    m = re.match(r'renameat2?\(\S+, "[^"]*", -?\d+<([^>]*)>, "([^"]*)"', ln)
    return f"{m.group(1)}/{m.group(2)}" if m else None


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
@pytest.mark.parametrize("durability", ["full", "file", "none"])
def test_fsync_syscalls_under_strace(tmp_path: Path, durability: str) -> None:
    """The real syscalls, not our monkeypatched view of them."""
    root = str(tmp_path / "spool")
    log = tmp_path / "strace.log"
    cmd = [
        "strace", "-f", "-y", "-o", str(log),
        "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
        sys.executable, "-c", STRACE_CHILD, root, durability,
    ]  # fmt: skip
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0 and "PTRACE" in r.stderr.upper():
        pytest.skip(f"strace cannot trace here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr
    root = os.path.realpath(root)
    lines = [ln.split(None, 1)[1] for ln in log.read_text().splitlines() if root in ln]  # "PID  call(...)"
    fsyncs = [ln for ln in lines if ln.startswith(("fsync", "fdatasync"))]
    if durability == "none":
        assert fsyncs == []
        return
    publish = next(i for i, ln in enumerate(lines) if _renamed_to(ln) == f"{root}/a/n000000")
    assert any(f"{root}/.tmp/n000000>" in ln for ln in lines[:publish] if ln.startswith("fsync"))
    assert any(f"{root}/.data/n000000>" in ln for ln in lines[:publish] if ln.startswith("fsync"))
    # fsync(3</path>) = 0: the decorated path tells files (named n0...) from directories.
    synced = [ln.split("<", 1)[1].split(">", 1)[0] for ln in fsyncs]
    dir_syncs = [p for p in synced if not os.path.basename(p).startswith("n0")]
    if durability == "file":
        assert dir_syncs == []
    else:
        assert any(ln.startswith("fsync(") and f"<{root}/a>" in ln for ln in lines[publish:])
        assert any(f"<{root}/b>" in ln for ln in fsyncs)


def test_each_durability_round_trips(tmp_path: Path) -> None:
    for durability in ("full", "file", "none"):
        spool = multispool.Spool.create(
            tmp_path / durability, multispool.Spoolable(queues=Queue, durability=durability)  # type: ignore[arg-type]
        )
        e = spool.enqueue(Queue.QUEUE1, {"d": durability}, durability.encode())
        co = spool.checkout(e)
        assert (co.contents, co.data_file.load()) == ({"d": durability}, durability.encode())
        co.save(Queue.QUEUE3)
        co = spool.checkout(spool.list(Queue.QUEUE3)[0])
        co.remove()
        assert find_sort(tmp_path / durability)[1:] == [
            f"{durability}/{p}" for p in (".data", ".registry", ".tmp", "queue1", "queue1/.checkout",
                                          "queue2", "queue2/.checkout", "queue3", "queue3/.checkout")
        ]  # fmt: skip


# -- durations ----------------------------------------------------------------------------


def test_durations_accept_seconds_and_timedelta(spool: multispool.Spool[Any, bytes]) -> None:
    import datetime

    name = spool.reserve_name("old")  # held by us: never "abandoned"
    assert spool.clean_abandoned(older_than=datetime.timedelta(hours=1)) == []
    assert spool.clean_abandoned(older_than=3600.0) == []
    assert spool.clean_abandoned(older_than=0) == []  # still locked by this process
    assert (Path(spool.dir) / ".registry" / name).exists()
    with pytest.raises(TypeError):
        spool.clean_abandoned(older_than="10")  # type: ignore[arg-type]


def test_prefix_names_is_exactly_the_api_formula() -> None:
    g = multispool.PrefixNames()
    for seed in ("q1_co_test_", "", None, 7):
        for attempt in (0, 1, 42, 999_999):
            assert g.next(seed, attempt) == f"{seed}{attempt:06d}"


def test_only_the_spoolables_own_queue_members_name_a_queue(tmp_path: Path) -> None:
    """A queue is named by a member of the Spoolable's Enum: another Enum's member, even
    one of the same name and value, a string or a value is refused before anything
    touches disk."""

    class Other(enum.Enum):
        QUEUE1 = "queue1"

    spool = multispool.Spool.create(tmp_path / "spool", multispool.Spoolable(queues=Queue))
    tree = find_sort(spool.dir)
    for bad in (Other.QUEUE1, "queue1", "QUEUE1", Queue.QUEUE1.value, None, 1, [Queue.QUEUE1]):
        with pytest.raises(ValueError, match="not a member of Queue"):
            spool.enqueue(bad, {}, b"")  # type: ignore[arg-type]
        assert find_sort(spool.dir) == tree
    assert spool.spoolable.dirname(Queue.QUEUE2) == "queue2"
    assert [e.name for e in spool.list(Queue.QUEUE1)] == []
