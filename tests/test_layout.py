"""API.md §1 and §3: the on-disk layout (the exact `find | sort` trees of the OCaml
"File Behavior" and "Spool Creation Fails" expect tests), opening spools, file modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import msgspec
import pytest

import multispool
from _procs import find_sort
from conftest import Cog, Queue, Sprocket, Widget

EMPTY_TREE = [
    "spool",
    "spool/.data",
    "spool/.registry",
    "spool/.tmp",
    "spool/queue1",
    "spool/queue1/.checkout",
    "spool/queue2",
    "spool/queue2/.checkout",
    "spool/queue3",
    "spool/queue3/.checkout",
]


class WidgetData(msgspec.Struct):
    serial_number: int
    customer: str


def widget_spoolable() -> multispool.Spoolable[Any, WidgetData]:
    return multispool.Spoolable(
        queues=Queue,
        metadata=Widget,
        data=multispool.MsgspecData(WidgetData),
        name_generator=multispool.PrefixNames(),
    )


def with_entries(base: list[str], *extra: str) -> list[str]:
    return sorted([*base, *extra], key=lambda s: s.encode())


# -- "Spool Creation Fails" ---------------------------------------------------------------


def test_create_on_non_empty_non_spool_dir_fails_and_creates_nothing(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    d.mkdir()
    (d / "some_file").write_bytes(b"")
    before = find_sort(d)
    with pytest.raises(multispool.NotASpoolError) as ei:
        multispool.Spool.create(d, widget_spoolable())
    assert "dir is not empty while creating new spool" in str(ei.value)
    assert str(d) in str(ei.value)
    assert find_sort(d) == before == ["spool", "spool/some_file"]


def test_load_create_if_missing_same_as_create(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    d.mkdir()
    (d / "x").mkdir()
    with pytest.raises(multispool.NotASpoolError, match="dir is not empty while creating new spool"):
        multispool.Spool.load(d, widget_spoolable(), create_if_missing=True)
    assert find_sort(d) == ["spool", "spool/x"]


@pytest.mark.parametrize(
    "content",
    [["queue1/readme.txt"], ["queue1/.checkout/x"], [".data/payload"], ["queue2/sub/"], ["queue1"]],
)
def test_create_on_dir_with_only_queue_named_content_fails_and_creates_nothing(
    tmp_path: Path, content: list[str]
) -> None:
    """A directory whose only entries bear spool names (a user's ``queue1/`` holding
    files, a file named ``queue1``) is a non-empty non-spool directory: create used to
    turn it into a spool (its files then orphans that fsck --repair moves away), or fail
    with FileExistsError instead of NotASpoolError."""
    d = tmp_path / "spool"
    d.mkdir()
    for c in content:
        p = d / c
        if c.endswith("/"):
            p.mkdir(parents=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
    before = find_sort(d)
    with pytest.raises(multispool.NotASpoolError, match="dir is not empty while creating new spool"):
        multispool.Spool.create(d, widget_spoolable())
    assert find_sort(d) == before


def test_create_completes_a_spool_built_in_place(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    (d / "queue1" / ".checkout").mkdir(parents=True)  # another creator, midway
    (d / ".data").mkdir()
    multispool.Spool.create(d, widget_spoolable())
    assert find_sort(d) == EMPTY_TREE


# -- "File Behavior" ----------------------------------------------------------------------


def test_file_behavior(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = multispool.Spool.create(root, widget_spoolable())
    assert find_sort(root) == EMPTY_TREE

    # Enqueue one entry, follow its files through checkout and remove.
    entry = spool.enqueue(
        Queue.QUEUE1, Cog(n=1), WidgetData(12345, "Acme Incorporated"), reserve="q1_co_test_"
    )
    assert entry.name == "q1_co_test_000000"
    n = "q1_co_test_000000"
    assert find_sort(root) == with_entries(
        EMPTY_TREE, f"spool/.data/{n}", f"spool/.registry/{n}", f"spool/queue1/{n}"
    )
    co = spool.checkout(entry)
    assert find_sort(root) == with_entries(
        EMPTY_TREE, f"spool/.data/{n}", f"spool/.registry/{n}", f"spool/queue1/.checkout/{n}"
    )
    assert [c.name for c in spool.list_checkouts_unsafe(Queue.QUEUE2)] == []
    assert [c.name for c in spool.list_checkouts_unsafe(Queue.QUEUE1)] == [n]
    co.remove()
    assert find_sort(root) == EMPTY_TREE

    # Several enqueues: PrefixNames numbers per seed.
    for queue, prefix, text, sn, cust in [
        (Queue.QUEUE1, "q1prefix1_", "Hello, world 1! q1prefix1_000000", 1000000, "Acme Corporation"),
        (Queue.QUEUE1, "q1prefix1_", "Hello, world 2! q1prefix1_000001", 1000001, "Acme Corporation"),
        (Queue.QUEUE1, "q1prefix2_", "Hello, world 3! q1prefix2_000000", 1000002, "Amalgamated Consolidated"),
        (Queue.QUEUE2, "q2prefix1_", "Hello, world 4! q2prefix1_000000", 2000001, "Consolidated Amalgamated"),
        (Queue.QUEUE2, "q2prefix2_", "Hello, world 5! q2prefix2_000000", 2000002, "ABC Co."),
        (Queue.QUEUE2, "q2prefix1_", "Hello, world 6! q2prefix1_000001", 4444444, "XYZ Co."),
    ]:
        spool.enqueue(queue, Sprocket(text=text), WidgetData(sn, cust), reserve=prefix)
    q1 = ["q1prefix1_000000", "q1prefix1_000001", "q1prefix2_000000"]
    q2 = ["q2prefix1_000000", "q2prefix1_000001", "q2prefix2_000000"]
    tree = with_entries(
        EMPTY_TREE,
        *(f"spool/.data/{x}" for x in q1 + q2),
        *(f"spool/.registry/{x}" for x in q1 + q2),
        *(f"spool/queue1/{x}" for x in q1),
        *(f"spool/queue2/{x}" for x in q2),
    )
    assert find_sort(root) == tree

    # List files.
    assert [e.name for e in spool.list(Queue.QUEUE1)] == q1
    assert [e.name for e in spool.list(Queue.QUEUE2)] == q2

    # Check out a file and move it to a different queue.
    co = spool.checkout(multispool.Entry(spool, Queue.QUEUE1, "q1prefix1_000000"))
    co.save(Queue.QUEUE2)
    tree.remove("spool/queue1/q1prefix1_000000")
    tree = with_entries(tree, "spool/queue2/q1prefix1_000000")
    assert find_sort(root) == tree

    # Visit each entry of queue2 in turn (direct operations: list + with_entry).
    seen: list[tuple[object, WidgetData]] = []

    def visit(meta: object, df: multispool.DataFile[WidgetData]) -> tuple[multispool.Save, None]:
        seen.append((meta, df.load()))
        return multispool.Save(meta, Queue.QUEUE2), None

    for e in spool.list(Queue.QUEUE2):
        spool.with_entry(e, visit)
    assert seen == [
        (Sprocket(text="Hello, world 1! q1prefix1_000000"), WidgetData(1000000, "Acme Corporation")),
        (Sprocket(text="Hello, world 4! q2prefix1_000000"), WidgetData(2000001, "Consolidated Amalgamated")),
        (Sprocket(text="Hello, world 6! q2prefix1_000001"), WidgetData(4444444, "XYZ Co.")),
        (Sprocket(text="Hello, world 5! q2prefix2_000000"), WidgetData(2000002, "ABC Co.")),
    ]
    assert find_sort(root) == tree

    # Update a Sprocket with with_entry, then list again.
    replaced: list[object] = []

    def replace(meta: object, _df: object) -> tuple[multispool.Save, str]:
        replaced.append(meta)
        return multispool.Save(Cog(n=42), Queue.QUEUE2), "done"

    assert spool.with_entry(multispool.Entry(spool, Queue.QUEUE2, "q2prefix1_000000"), replace) == "done"
    assert replaced == [Sprocket(text="Hello, world 4! q2prefix1_000000")]
    assert [e.direct.contents() for e in spool.list(Queue.QUEUE2)] == [
        Sprocket(text="Hello, world 1! q1prefix1_000000"),
        Cog(n=42),
        Sprocket(text="Hello, world 6! q2prefix1_000001"),
        Sprocket(text="Hello, world 5! q2prefix2_000000"),
    ]
    assert find_sort(root) == tree


# -- opening ------------------------------------------------------------------------------


def test_load_missing_dir(tmp_path: Path, spoolable: multispool.Spoolable[Any, bytes]) -> None:
    with pytest.raises(multispool.NotASpoolError) as ei:
        multispool.Spool.load(tmp_path / "nope", spoolable)
    assert str(tmp_path / "nope") in str(ei.value)
    assert not (tmp_path / "nope").exists()


def test_load_non_spool_dir(tmp_path: Path, spoolable: multispool.Spoolable[Any, bytes]) -> None:
    d = tmp_path / "plain"
    d.mkdir()
    with pytest.raises(multispool.NotASpoolError):
        multispool.Spool.load(d, spoolable)
    (d / ".registry").mkdir()  # .tmp still missing: still not a spool
    with pytest.raises(multispool.NotASpoolError):
        multispool.Spool.load(d, spoolable)
    assert find_sort(d) == ["plain", "plain/.registry"]


@pytest.mark.parametrize("missing", ["queue2", "queue2/.checkout", ".registry", ".tmp"])
def test_load_missing_part(tmp_path: Path, spoolable: multispool.Spoolable[Any, bytes], missing: str) -> None:
    root = tmp_path / "spool"
    multispool.Spool.create(root, spoolable)
    if missing == "queue2":
        os.rmdir(root / "queue2/.checkout")
    os.rmdir(root / missing)
    before = find_sort(root)
    with pytest.raises(multispool.NotASpoolError):
        multispool.Spool.load(root, spoolable)
    assert find_sort(root) == before
    if missing in ("queue2", "queue2/.checkout"):
        # create_if_missing completes a spool whose enum gained a queue.
        multispool.Spool.load(root, spoolable, create_if_missing=True)
        assert find_sort(root) == EMPTY_TREE


def test_create_is_idempotent_and_keeps_entries(spool: multispool.Spool[Any, bytes]) -> None:
    spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x", reserve="a")
    before = find_sort(spool.dir)
    again = multispool.Spool.create(spool.dir, spool.spoolable)
    assert find_sort(spool.dir) == before
    assert [e.name for e in again.list(Queue.QUEUE1)] == ["a000000"]
    multispool.Spool.load(spool.dir, spool.spoolable)


def test_create_in_empty_existing_dir(tmp_path: Path, spoolable: multispool.Spoolable[Any, bytes]) -> None:
    (tmp_path / "spool").mkdir()
    multispool.Spool.create(tmp_path / "spool", spoolable)
    assert find_sort(tmp_path / "spool") == EMPTY_TREE


def test_dir_is_fspath_and_spoolable_kept(
    tmp_path: Path, spoolable: multispool.Spoolable[Any, bytes]
) -> None:
    p = tmp_path / "spool"
    s = multispool.Spool.create(p, spoolable)
    assert s.dir == os.fspath(p) and type(s.dir) is str
    assert s.spoolable is spoolable
    rel = multispool.Spool.load_unsafe("some/relative/dir", spoolable)
    assert rel.dir == "some/relative/dir"


def test_load_unsafe_touches_no_disk(
    tmp_path: Path, spoolable: multispool.Spoolable[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError(f"disk access {a}")

    for fn in ("stat", "lstat", "listdir", "mkdir", "makedirs", "open", "scandir", "access"):
        monkeypatch.setattr(os, fn, boom)
    s = multispool.Spool.load_unsafe(tmp_path / "missing", spoolable)
    monkeypatch.undo()
    assert s.dir == str(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


# -- modes --------------------------------------------------------------------------------


def _umask() -> int:
    # Read without changing the process-wide umask.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    pytest.skip("cannot read the umask without changing it")


def _modes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.lstat(p).st_mode)
    out["."] = stat.S_IMODE(os.lstat(root).st_mode)
    return out


@pytest.mark.parametrize(("file_mode", "dir_mode"), [(None, None), (0o640, 0o750)])
def test_new_files_and_dirs_modes(tmp_path: Path, file_mode: int | None, dir_mode: int | None) -> None:
    kw = {} if file_mode is None else {"file_mode": file_mode, "dir_mode": dir_mode}
    sp: multispool.Spoolable[Any, bytes] = multispool.Spoolable(
        queues=Queue, metadata=Widget, name_generator=multispool.PrefixNames(), **kw  # type: ignore[arg-type]
    )
    fm = 0o600 if file_mode is None else file_mode
    dm = 0o700 if dir_mode is None else dir_mode
    if _umask() & (fm | dm):
        pytest.skip("the umask masks the modes under test")
    root = tmp_path / "spool"
    spool = multispool.Spool.create(root, sp)
    spool.enqueue(Queue.QUEUE1, Cog(n=1), b"data", reserve="a")
    spool.reserve_name("r")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=2), b"data", reserve="b")
    co = spool.checkout(e)
    co.contents = Cog(n=3)  # forces a metadata rewrite through .tmp
    co.data_file.save(b"new data")
    co.save(Queue.QUEUE2)
    modes = _modes(root)
    files = {k: v for k, v in modes.items() if os.path.isfile(root / k)}
    dirs = {k: v for k, v in modes.items() if os.path.isdir(root / k)}
    assert len(files) == 7  # 2 entries x (registry, data, queue file) + r's reservation
    assert set(files.values()) == {fm}, files
    assert set(dirs.values()) == {dm}, dirs


# -- security: names and symlinks ---------------------------------------------------------


def test_planted_symlink_in_queue_is_not_followed(
    tmp_path: Path, spool: multispool.Spool[Any, bytes]
) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b'{"type":"Cog","n":7}')
    os.chmod(outside, 0o644)
    st = os.stat(outside)
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"d", reserve="x")
    qfile = Path(spool.dir) / "queue1" / e.name
    qfile.unlink()
    qfile.symlink_to(outside)
    with pytest.raises(multispool.CorruptEntryError) as ei:
        spool.checkout(e)
    assert e.name in str(ei.value)
    # Left where it is (checked out), a symlink still, the outside file untouched.
    assert os.path.islink(Path(spool.dir) / "queue1" / ".checkout" / e.name)
    assert outside.read_bytes() == b'{"type":"Cog","n":7}'
    st2 = os.stat(outside)
    assert (st2.st_mtime_ns, st2.st_mode) == (st.st_mtime_ns, st.st_mode)


def test_planted_symlink_direct_contents(tmp_path: Path, spool: multispool.Spool[Any, bytes]) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b'{"type":"Cog","n":7}')
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"d", reserve="x")
    qfile = Path(spool.dir) / "queue1" / e.name
    qfile.unlink()
    qfile.symlink_to(outside)
    with pytest.raises((multispool.CorruptEntryError, OSError)):
        e.direct.contents()
    e.direct.save(Cog(n=2))  # replaces the link, never writes through it
    assert not qfile.is_symlink()
    assert outside.read_bytes() == b'{"type":"Cog","n":7}'


def test_planted_symlink_as_data_is_not_followed(tmp_path: Path, spool: multispool.Spool[Any, bytes]) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"d", reserve="x")
    dfile = Path(spool.dir) / ".data" / e.name
    dfile.unlink()
    dfile.symlink_to(outside)
    co = spool.checkout(e)
    with pytest.raises(OSError):
        co.data_file.load()
    assert stat.S_ISLNK(co.data_file.stat().st_mode)  # stat does not follow either
    co.data_file.save(b"replaced")  # atomically replaces the link itself
    assert not dfile.is_symlink() and dfile.read_bytes() == b"replaced"
    co.remove()
    assert outside.read_bytes() == b"secret"
    assert find_sort(spool.dir) == EMPTY_TREE


def test_planted_symlink_data_removed_not_target(tmp_path: Path, spool: multispool.Spool[Any, bytes]) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret")
    e = spool.enqueue(Queue.QUEUE1, Cog(n=1), b"d", reserve="x")
    dfile = Path(spool.dir) / ".data" / e.name
    dfile.unlink()
    dfile.symlink_to(outside)
    spool.checkout(e).remove()
    assert outside.read_bytes() == b"secret"
    assert find_sort(spool.dir) == EMPTY_TREE


@pytest.mark.parametrize("bad", ["../escape", "..", "a/../../b", "/etc/passwd"])
def test_names_cannot_escape(tmp_path: Path, spool: multispool.Spool[Any, bytes], bad: str) -> None:
    before = find_sort(tmp_path)
    with pytest.raises(multispool.InvalidNameError):
        multispool.Entry(spool, Queue.QUEUE1, bad)
    with pytest.raises(multispool.InvalidNameError):
        spool.enqueue(Queue.QUEUE1, Cog(n=1), b"x", use=bad)
    assert find_sort(tmp_path) == before


# -- path helpers on every entry's path ----------------------------------------------------
from multispool import _fs, _layout  # noqa: E402


def _keep_name_reference(name: str) -> str:
    """keep_name as defined: verbatim behind the prefix if that fits in 255 bytes."""
    n = len(name.encode("utf-8", "surrogateescape"))
    if n <= _layout.MAX_NAME_BYTES - len(_layout.KEEP_PREFIX):
        return _layout.KEEP_PREFIX + name
    return _layout.keep_name(name)  # hashed: checked for length below


@pytest.mark.parametrize("char", ["a", "é", "€", "😀", "\udcff"])
@pytest.mark.parametrize("length", [1, 62, 63, 64, 84, 85, 126, 127, 253, 254, 255])
def test_keep_name_fits_a_directory_entry(char: str, length: int) -> None:
    _check_keep_name(char * length)


@pytest.mark.parametrize(
    "name",
    # Just past what a name's length in characters alone vouches for (63): 254 and 255
    # bytes in 64 characters, and the longest that still fits behind the prefix.
    ["😀" * 63 + "€", "😀" * 63 + "é", "😀" * 63 + "a", "😀" * 62 + "€" + "é"],
)
def test_keep_name_of_long_multibyte_names(name: str) -> None:
    _check_keep_name(name)


def _check_keep_name(name: str) -> None:
    if len(name.encode("utf-8", "surrogateescape")) > _layout.MAX_NAME_BYTES:
        return  # not a valid entry name
    kn = _layout.keep_name(name)
    assert len(kn.encode("utf-8", "surrogateescape")) <= _layout.MAX_NAME_BYTES
    assert kn.startswith(_layout.KEEP_PREFIX)
    if len(name.encode("utf-8", "surrogateescape")) <= _layout.MAX_NAME_BYTES - len(_layout.KEEP_PREFIX):
        assert kn == _layout.KEEP_PREFIX + name
    else:
        assert kn.startswith(_layout.KEEP_PREFIX + "#") and kn != _keep_name_reference(name + "x")


@pytest.mark.parametrize("root", ["/", "/srv/spool", "/srv//spool/", "rel", "rel/dir/", ".", "./s"])
def test_layout_paths_parent_and_keep_file(root: str) -> None:
    lay = _layout.Layout(root)
    for q in ("q1", "queue-2"):
        for path, directory in (
            (lay.queue_file(q, "n1"), lay.queue(q)),
            (lay.checkout_file(q, "n1"), lay.checkout(q)),
            (lay.registry_file("n1"), lay.registry),
            (lay.tmp_file("n1"), lay.tmp),
            (lay.data_file("n1"), lay.data),
        ):
            # The same directory as os.path.dirname gives (one C call instead).
            assert _fs.parent(path) == os.path.dirname(path)
            assert os.path.normpath(_fs.parent(path)) == os.path.normpath(directory)
            for d in (directory, directory + os.sep, _fs.parent(path)):
                assert lay.keep_file(d, "n1") == os.path.join(d, _layout.keep_name("n1"))
        assert lay.checkout(q) == os.path.join(root, q, _layout.CHECKOUT)  # cached: same answer twice
        assert lay.checkout(q) == os.path.join(root, q, _layout.CHECKOUT)


@pytest.mark.parametrize(
    "path", ["/name", "name", "", "/a/b", "a//b", "/a/b/"],
)
def test_parent_is_dirname_or_the_same_directory(path: str) -> None:
    got = _fs.parent(path)
    want = os.path.dirname(path)
    assert got == want or os.path.normpath(got) == os.path.normpath(want)
