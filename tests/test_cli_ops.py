"""The operator verbs of the command line (issue 14 items 8-12): show, mv, rm, purge,
--version, streaming ls, recover's summary, progress bars, watch off a terminal,
metrics, and the small things that misled (orphans counted as entries, DIR a file,
init on an existing spool, JSON for names that are not UTF-8)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import multispool
from _procs import child_env, unprivileged
from multispool import cli
from multispool.cli import main


@pytest.fixture
def sp(tmp_path: Path) -> str:
    d = str(tmp_path / "sp")
    assert main(["init", d, "--queue", "in", "--queue", "queue-2", "--queue", "quarantine"]) == 0
    return d


def spool_of(sp: str) -> multispool.Spool[Any, bytes]:
    return multispool.Spool.load(sp, cli.make_spoolable(["in", "quarantine", "queue-2"]))


def q(spool: multispool.Spool[Any, bytes], name: str) -> Any:
    return spool.spoolable.queues(name)


def out_err(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    c = capsys.readouterr()
    return c.out, c.err


def popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "multispool", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=child_env(),
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.communicate(timeout=30)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"multispool {multispool.__version__}"


def test_what_the_cli_creates_in_a_shared_spool_keeps_its_modes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A spool shared by a group (file_mode=0o660, dir_mode=0o770) got 0o600 files and
    0o700 directories from the command line (its Spoolable's defaults): an entry
    enqueued, a queue added or an item put aside by an operator could not be read by
    the group's consumers. The command line now uses the spool's own modes."""
    import enum as enum_

    old_umask = os.umask(0o007)
    try:
        Q = enum_.Enum("Q", {"IN": "in"})
        shared = multispool.Spoolable(queues=Q, file_mode=0o660, dir_mode=0o770)
        d = str(tmp_path / "shared")
        multispool.Spool.create(d, shared)
        assert main(["enqueue", d, "in", "--metadata", "{}"]) == 0
        name = capsys.readouterr().out.strip()
        assert main(["init", d, "--queue", "in", "--queue", "added"]) == 0
        with open(os.path.join(d, "in", "orphan"), "wb") as f:
            f.write(b"{}")
        os.utime(os.path.join(d, "in", "orphan"), (time.time() - 3600,) * 2)
        assert main(["fsck", d, "--repair"]) == 0
    finally:
        os.umask(old_umask)

    def mode(*p: str) -> int:
        return os.stat(os.path.join(d, *p)).st_mode & 0o7777

    assert [mode(".registry", name), mode("in", name), mode(".data", name)] == [0o660] * 3
    assert [mode("added"), mode("added", ".checkout")] == [0o770] * 2
    assert [mode(".lost+found"), mode(".lost+found", "orphan")] == [0o770] * 2


@pytest.mark.parametrize("port", ["65536", "99999", "-1"])
def test_monitor_metrics_port_out_of_range_is_a_usage_error(
    sp: str, capsys: pytest.CaptureFixture[str], port: str
) -> None:
    """--metrics-port 99999 reached socket.bind, whose OverflowError main() does not
    catch: a traceback and exit 1 instead of exit 2 with one line."""
    assert main(["monitor", sp, "--metrics-port", port]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "--metrics-port" in err, err


def test_deeply_nested_metadata_is_shown_as_bytes(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Metadata nested deeper than Python's recursion limit (a corrupt or hostile entry)
    made msgspec raise RecursionError, which nothing caught: ls, ls --json and show died
    with a traceback (exit 1) at that entry. It is shown as base64 bytes, as any
    metadata that does not decode."""
    spool = spool_of(sp)
    deep = {}
    for depth in (100_000, 950):
        e = spool.enqueue(q(spool, "in"), b"{}", b"")
        Path(sp, "in", e.name).write_bytes(b"[" * depth + b"]" * depth)
        deep[e.name] = depth
    ok = spool.enqueue(q(spool, "in"), b'{"n": 1}', b"")
    capsys.readouterr()
    assert main(["ls", sp, "in", "--json"]) == 0
    items = {x["name"]: x for x in json.loads(capsys.readouterr().out)}
    assert items[ok.name]["metadata"] == {"n": 1}
    for name in deep:
        assert items[name]["metadata_format"] == "bytes"
    assert main(["ls", sp, "in"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    for name in deep:
        assert main(["show", sp, "in", name, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["metadata_format"] == "bytes"


def test_show(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    spool = spool_of(sp)
    e = spool.enqueue(q(spool, "in"), b'{"url": "x"}', b"hello")
    capsys.readouterr()
    assert main(["show", sp, "in", e.name, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"name": e.name, "queue": "in", "state": "waiting", "metadata_format": "json",
                   "metadata": {"url": "x"}, "size": 5, "data": "hello", "data_encoding": "utf-8"}
    assert main(["show", sp, "in", e.name]) == 0
    out = capsys.readouterr().out
    assert '{"url":"x"}' in out and "hello" in out and "5 bytes" in out
    with spool.checkout(e) as co:  # a live checkout is shown, not touched
        # Reading may update the access time (relatime); anything else would be a touch.
        def _written(st: os.stat_result) -> tuple[int, ...]:
            return (st.st_ino, st.st_mode, st.st_nlink, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

        before = _written(os.lstat(co.path))
        assert main(["show", sp, "in", e.name, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "checked out"
        assert _written(os.lstat(co.path)) == before
    r = subprocess.run([sys.executable, "-m", "multispool", "show", sp, "in", e.name, "--data-only"],
                       capture_output=True, env=child_env(), timeout=30, check=False)
    assert (r.returncode, r.stdout) == (0, b"hello")
    e2 = spool.enqueue(q(spool, "in"), b"\x00\x01", b"\xff\x00")
    assert main(["show", sp, "in", e2.name, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["metadata_format"], doc["data"], doc["data_encoding"]) == ("bytes", "/wA=", "base64")
    assert main(["show", sp, "queue-2", e.name]) == 2
    assert "no entry" in capsys.readouterr().err


def test_mv_requeues_under_the_owner_lock(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    spool = spool_of(sp)
    e = spool.enqueue(q(spool, "quarantine"), b"{}", b"d")
    assert main(["mv", sp, e.name, "--to", "in"]) == 0
    assert f"moved quarantine/{e.name} to in" in capsys.readouterr().out
    assert [x.name for x in spool.list(q(spool, "in"))] == [e.name]
    assert spool.list(q(spool, "quarantine")) == []
    assert Path(sp, ".data", e.name).read_bytes() == b"d"
    # a live checkout is left alone (exit 2, one line), and so is a name being claimed
    co = spool.checkout(multispool.Entry(spool, q(spool, "in"), e.name))
    assert main(["mv", sp, e.name, "--to", "queue-2"]) == 2
    _, err = out_err(capsys)
    assert "live process" in err and err.count("\n") == 1
    assert os.path.exists(co.path)
    # once its owner is dead, mv may move it (recovered first, then moved)
    co._claim.release()
    assert main(["mv", sp, e.name, "--to", "queue-2", "--from", "in"]) == 0
    assert [x.name for x in spool.list(q(spool, "queue-2"))] == [e.name]
    assert main(["mv", sp, e.name, "--to", "queue-2"]) == 0
    assert "already in queue-2" in capsys.readouterr().out
    assert main(["mv", sp, "nope", "--to", "in"]) == 2
    Path(sp, "in", "orphan").touch()
    capsys.readouterr()
    assert main(["mv", sp, "orphan", "--to", "queue-2"]) == 2
    assert "no registry file" in capsys.readouterr().err
    os.unlink(os.path.join(sp, "in", "orphan"))
    assert main(["mv", sp, "../x", "--to", "in"]) == 2
    assert main(["fsck", sp]) == 0


def test_rm_and_purge(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    spool = spool_of(sp)
    es = [spool.enqueue(q(spool, "in"), b"{}", b"") for _ in range(5)]
    assert main(["rm", sp, "in", es[0].name, "missing", es[1].name]) == 1
    out, err = out_err(capsys)
    assert out.splitlines() == [f"removed in/{es[0].name}", f"removed in/{es[1].name}"]
    assert "missing" in err and err.count("\n") == 1
    for e in es[:2]:
        assert not os.path.exists(os.path.join(sp, ".registry", e.name))
    live = spool.checkout(es[2])
    assert main(["rm", sp, "in", es[2].name]) == 1  # checked out by a live process: left
    assert os.path.exists(live.path)
    capsys.readouterr()
    assert main(["purge", sp, "in"]) == 2  # no --yes: nothing happens
    assert "--yes" in capsys.readouterr().err
    assert len(spool.list(q(spool, "in"))) == 2
    assert main(["purge", sp, "in", "--yes"]) == 0
    assert capsys.readouterr().out.strip() == "purged 2 entries from in"
    assert spool.list(q(spool, "in")) == [] and os.path.exists(live.path)
    live.remove()
    assert sorted(os.listdir(os.path.join(sp, ".registry"))) == []
    assert main(["fsck", sp]) == 0


def test_rm_with_an_invalid_name_is_a_usage_error_and_removes_nothing(
    sp: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rm DIR Q good ../x`` removed ``good``, then counted ``../x`` as an entry it could
    not remove (exit 1): an invalid name is a usage error (exit 2, one line), found
    before anything is removed."""
    spool = spool_of(sp)
    e = spool.enqueue(q(spool, "in"), b"{}", b"")
    for bad in ("../x", "a/b", ".checkout", ""):
        assert main(["rm", sp, "in", e.name, bad]) == 2, bad
        out, err = out_err(capsys)
        assert out == "" and err.count("\n") == 1 and "error" in err, (bad, err)
    assert [x.name for x in spool.list(q(spool, "in"))] == [e.name]


@pytest.mark.parametrize("verb", ["purge", "rm"])
def test_rm_or_purge_reports_an_entry_it_cannot_remove_and_goes_on(
    sp: str, capsys: pytest.CaptureFixture[str], verb: str
) -> None:
    """A directory planted at an entry's ``.data/NAME`` or ``.registry/NAME``: purge and
    rm stopped there (exit 2) with the entries after it neither removed nor reported,
    and the entry with a data directory lost its metadata while its registry file
    stayed. Each such entry is now reported on stderr naming the path and left whole;
    the others are removed; the exit code is 1."""
    spool = spool_of(sp)
    names = sorted(spool.enqueue(q(spool, "in"), b"{}", b"x").name for _ in range(4))
    bad_data = Path(sp, ".data", names[1])
    bad_reg = Path(sp, ".registry", names[2])
    for p in (bad_data, bad_reg):
        p.unlink()
        (p / "junk").mkdir(parents=True)
    capsys.readouterr()
    args = ["purge", sp, "in", "--yes"] if verb == "purge" else ["rm", sp, "in", *names]
    assert main(args) == 1
    out, err = out_err(capsys)
    if verb == "purge":
        assert out.startswith("purged 2 entries from in (2 left"), out
    else:
        assert out.splitlines() == [f"removed in/{names[0]}", f"removed in/{names[3]}"]
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert any(str(bad_data) in ln and "directory" in ln for ln in lines), err
    assert any(str(bad_reg) in ln and "directory" in ln for ln in lines), err
    assert sorted(e.name for e in spool.list(q(spool, "in"))) == names[1:3]
    assert sorted(os.listdir(Path(sp, "in", ".checkout"))) == []
    assert sorted(os.listdir(Path(sp, ".registry"))) == names[1:3]
    assert sorted(os.listdir(Path(sp, ".data"))) == names[1:3]


@pytest.mark.parametrize("verb", ["purge", "rm"])
def test_ctrl_c_in_rm_or_purge_leaves_no_entry_checked_out(
    sp: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    """Ctrl-C landing after an entry was claimed and before its removal began used to
    leave that entry in in/.checkout (a dead checkout: fsck exit 1, a reader never sees
    it until someone runs recover). It goes back into its queue."""
    spool = spool_of(sp)
    names = sorted(spool.enqueue(q(spool, "in"), b"{}", b"x").name for _ in range(5))
    real_remove = multispool.CheckedOutEntry.remove
    calls: list[str] = []

    def remove(self: multispool.CheckedOutEntry[Any, bytes]) -> None:
        calls.append(self.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the signal arrives as the third removal starts
        real_remove(self)

    monkeypatch.setattr(multispool.CheckedOutEntry, "remove", remove)
    args = ["purge", sp, "in", "--yes"] if verb == "purge" else ["rm", sp, "in", *names]
    assert main(args) == 130
    assert [n for n in os.listdir(os.path.join(sp, "in", ".checkout")) if n[0] != "."] == []
    left = [e.name for e in spool.list(q(spool, "in"))]
    assert len(left) == 3 and calls[2] in left
    capsys.readouterr()
    assert main(["fsck", sp]) == 0, capsys.readouterr().out


def test_ls_streams_and_limits(
    sp: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = spool_of(sp)
    names = sorted(spool.enqueue(q(spool, "in"), b'{"n": %d}' % i, b"x").name for i in range(30))
    capsys.readouterr()
    assert main(["ls", sp, "in", "--limit", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "AGE", "DUE", "ATTEMPTS", "SIZE", "METADATA"]
    assert [ln.split()[0] for ln in lines[1:]] == names[:3]
    assert main(["ls", sp, "in", "--json"]) == 0
    assert [x["name"] for x in json.loads(capsys.readouterr().out)] == names
    assert main(["ls", sp, "queue-2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["ls", sp, "in", "--unsorted", "--limit", "4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4

    # Each line is written before the next entry is read: at the first entry line, one
    # metadata file has been read (the old ls read them all first).
    reads: list[str] = []
    real_read = cli._fs.read_file
    monkeypatch.setattr(cli._fs, "read_file", lambda p: reads.append(p) or real_read(p))
    at_first: list[int] = []

    class Watcher(io.StringIO):
        def write(self, s: str) -> int:
            if not at_first and s.split()[:1] == [names[0]]:
                at_first.append(len(reads))
            return super().write(s)

    monkeypatch.setattr(sys, "stdout", Watcher())
    assert main(["ls", sp, "in"]) == 0
    assert at_first == [1] and len(reads) == 30


def test_recover_prints_a_summary(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    spool = spool_of(sp)
    for _ in range(3):
        co = spool.checkout(spool.enqueue(q(spool, "in"), b"{}", b""))
        co._claim.release()  # its owner "died"
    capsys.readouterr()
    assert main(["recover", sp]) == 0
    summary = "recovered 3 dead checkouts, removed 0 abandoned enqueues"
    assert capsys.readouterr().out.splitlines() == [summary]
    for e in spool.list(q(spool, "in")):
        spool.checkout(e)._claim.release()
    assert main(["recover", sp, "-v"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("recovered 3 dead checkouts")
    assert all(ln.startswith("recovered in/") for ln in lines[:3])


def test_recover_resolves_keep_links_as_the_library_does(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`multispool recover` runs the library's recovery, keep links included: a move cut
    by a crash between its link and its rename is undone (the entry was only reachable
    through its keep link), and the keep link of a move that finished is dropped."""
    spool = spool_of(sp)
    cut = spool.enqueue(q(spool, "in"), b"{}", b"cut").name
    os.rename(Path(sp, "in", cut), Path(sp, "in", ".~" + cut))  # the claim's link, then the crash
    done = spool.enqueue(q(spool, "in"), b"{}", b"done").name
    os.link(Path(sp, "in", done), Path(sp, "in", ".~" + done))
    os.rename(Path(sp, "in", done), Path(sp, "in", ".checkout", done))  # claimed; owner died
    capsys.readouterr()
    assert main(["recover", sp, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"recovered": [f"in/{done}"], "removed_abandoned": []}
    assert sorted(os.listdir(Path(sp, "in"))) == sorted([".checkout", cut, done])
    assert os.listdir(Path(sp, "in", ".checkout")) == []
    assert main(["fsck", sp]) == 0


def test_recover_goes_on_past_an_entry_it_cannot_read(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    # A symlink planted at one dead checkout's registry name (ELOOP under the lock): that
    # entry is left and reported (exit 1), the others are still recovered.
    spool = spool_of(sp)
    names = sorted(spool.enqueue(q(spool, "in"), b"{}", b"").name for _ in range(2))
    for n in names:
        spool.checkout(multispool.Entry(spool, q(spool, "in"), n))._claim.release()  # owner "died"
    bad, good = names
    os.unlink(Path(sp, ".registry", bad))
    os.symlink(Path(sp, ".registry", good), Path(sp, ".registry", bad))
    capsys.readouterr()
    assert main(["recover", sp]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "recovered 1 dead checkouts, removed 0 abandoned enqueues; 1 could not be recovered "
        "(see the warnings above)"
    ]
    assert os.listdir(Path(sp, "in", ".checkout")) == [bad]
    assert [e.name for e in spool.list(q(spool, "in"))] == [good]


def test_dead_checkout_that_cannot_be_read_is_reported_as_such(
    sp: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A dead owner's checkout that is no regular file (a FIFO here): recovery leaves it
    # for a person. recover must say so in its exit code (1), and mv must not blame a
    # live process that does not exist.
    os.mkfifo(Path(sp, "in", ".checkout", "stuck"))
    Path(sp, ".registry", "stuck").touch()  # nobody holds its lock: the owner died
    capsys.readouterr()
    assert main(["recover", sp]) == 1
    assert "1 could not be recovered" in capsys.readouterr().out
    assert main(["mv", sp, "stuck", "--to", "queue-2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "live process" not in err and "in/.checkout/stuck" in err and "not a regular file" in err
    assert main(["fsck", sp, "--repair"]) == 1
    out = capsys.readouterr().out
    assert "left dead checkout in/.checkout/stuck" in out and "not a regular file" in out
    assert os.path.exists(Path(sp, "in", ".checkout", "stuck"))  # nothing lost


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal_and_after_a_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = io.StringIO()
    with cli.Progress("x", 10, stream=quiet) as bar:
        monkeypatch.setattr(cli.Progress, "DELAY", 0.0)
        for _ in range(10):
            bar.advance()
    assert quiet.getvalue() == ""  # not a terminal: nothing drawn
    tty = _Tty()
    monkeypatch.setattr(cli.Progress, "DELAY", 3600.0)
    with cli.Progress("x", 10, stream=tty) as bar:
        bar.advance()
    assert tty.getvalue() == ""  # a short run on a terminal: nothing drawn
    monkeypatch.setattr(cli.Progress, "DELAY", 0.0)
    with cli.Progress("purging in", 10, stream=tty) as bar:
        bar.advance(7)
    assert "purging in" in tty.getvalue() and "7/10" in tty.getvalue()


def test_watch_prints_plain_lines_off_a_terminal(sp: str, procs: list[subprocess.Popen[str]]) -> None:
    p = popen("watch", sp)
    procs.append(p)
    assert p.stdout is not None
    first = [p.stdout.readline() for _ in range(3)]
    assert [ln.split()[1] for ln in first] == ["in", "quarantine", "queue-2"]
    assert all("entries=0 checkouts=0 oldest=-" in ln for ln in first), first
    spool = spool_of(sp)
    for _ in range(3):
        spool.enqueue(q(spool, "in"), b"{}", b"")
    deadline = time.monotonic() + 20
    while True:  # each line is a change; readline blocks until the next one
        line = p.stdout.readline()
        assert line and time.monotonic() < deadline
        if "entries=3" in line:
            break
    assert line.split()[1] == "in" and "oldest=" in line
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "\x1b" not in "".join(first) + line + out


@pytest.mark.parametrize("option", ["--interval", "--min-interval"])
def test_watch_with_an_interval_longer_than_a_wait_can_take(
    sp: str, procs: list[subprocess.Popen[str]], option: str
) -> None:
    """A finite duration beyond threading.TIMEOUT_MAX (about 292 years) used to end
    watch with an OverflowError traceback right after its first table (no arrival
    comes, so the wait is really entered); now it waits until told to stop."""
    other = ["--min-interval", "0"] if option == "--interval" else ["--interval", "0.001"]
    p = popen("watch", sp, option, "200000d", *other)
    procs.append(p)
    assert p.stdout is not None
    first = [p.stdout.readline() for _ in range(3)]
    assert [ln.split()[1] for ln in first] == ["in", "quarantine", "queue-2"], first
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=1.0)  # the crash came within a few ms; still running a second later
    p.send_signal(signal.SIGTERM)
    _out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and err == "", err


def test_queue_view_counts_rates_and_oldest(sp: str) -> None:
    """watch's per-queue view: one listing per refresh, an lstat only for arrivals."""
    spool = spool_of(sp)
    es = [spool.enqueue(q(spool, "in"), b"{}", b"") for _ in range(4)]
    old = time.time() - 120
    os.utime(os.path.join(sp, "in", es[0].name), (old, old))
    v = cli.QueueView(spool, q(spool, "in"), window=10.0)
    row = v.refresh(1000.0)
    assert (row["entries"], row["checkouts"], row["in_per_s"], row["out_per_s"]) == (4, 0, 0.0, 0.0)
    assert 119 < row["oldest_age"] < 200
    co = spool.checkout(es[0])
    spool.checkout(es[1]).remove()
    spool.enqueue(q(spool, "in"), b"{}", b"")
    stats: list[str] = []
    real_lstat = os.lstat
    mp = pytest.MonkeyPatch()
    mp.setattr(os, "lstat", lambda p, *a, **k: stats.append(p) or real_lstat(p, *a, **k))
    try:
        row = v.refresh(1001.0)
    finally:
        mp.undo()
    assert len(stats) == 1  # only the one arrival was stat'ed
    assert (row["entries"], row["checkouts"], row["in_per_s"], row["out_per_s"]) == (3, 1, 0.1, 0.2)
    assert row["oldest_age"] < 60  # the old entry left the queue
    co.release()


def test_activity_spinner_only_on_a_terminal_after_a_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = io.StringIO()
    with cli.Activity("checking", stream=quiet):
        pass
    assert quiet.getvalue() == ""
    monkeypatch.setattr(cli.Progress, "DELAY", 0.0)
    tty = _Tty()
    with cli.Activity("checking /sp", stream=tty):
        deadline = time.monotonic() + 20
        while "checking /sp" not in tty.getvalue():
            assert time.monotonic() < deadline
            time.sleep(0.01)


def _families(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "spool"))
            out.setdefault(s.name, {})[labels] = s.value
    return out


def test_metrics(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    spool = spool_of(sp)
    e = spool.enqueue(q(spool, "in"), b"{}", b"")
    spool.enqueue(q(spool, "in"), b"{}", b"")
    co = spool.checkout(e)
    co._claim.release()  # a dead checkout: one open problem
    capsys.readouterr()
    assert main(["metrics", sp]) == 0
    m = _families(capsys.readouterr().out)
    assert m["multispool_queue_entries"][(("queue", "in"),)] == 1
    assert m["multispool_queue_entries"][(("queue", "queue-2"),)] == 0
    assert m["multispool_queue_checkouts"][(("queue", "in"),)] == 1
    assert m["multispool_queue_delayed"][(("queue", "in"),)] == 0
    assert m["multispool_queue_oldest_age_seconds"][(("queue", "in"),)] >= 0
    probs = m["multispool_problems"]
    assert probs[(("kind", "dead_checkout"), ("queue", "in"))] == 1
    assert sum(probs.values()) == 1


def test_monitor_serves_metrics(sp: str, procs: list[subprocess.Popen[str]]) -> None:
    spool = spool_of(sp)
    spool.enqueue(q(spool, "queue-2"), b"{}", b"")
    p = popen("monitor", sp, "--metrics-port", "0", "--check-every", "0.2")
    procs.append(p)
    assert p.stderr is not None
    line = p.stderr.readline()
    assert "serving metrics on http://127.0.0.1:" in line, line
    url = line.split()[-1]
    deadline = time.monotonic() + 20
    while True:
        with urllib.request.urlopen(url, timeout=10) as r:
            m = _families(r.read().decode())
        if "multispool_problems" in m:
            break
        assert time.monotonic() < deadline
    assert m["multispool_queue_entries"][(("queue", "queue-2"),)] == 1
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)
    assert p.returncode == 0


def test_small_things(sp: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spool = spool_of(sp)
    spool.enqueue(q(spool, "in"), b"{}", b"")
    Path(sp, "in", "orphan").touch()  # no registry file: not an entry
    capsys.readouterr()
    assert main(["status", sp, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["in"]["entries"] == 1
    f = tmp_path / "afile"
    f.touch()
    assert main(["status", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["init", sp, "--queue", "new"]) == 0
    assert capsys.readouterr().out.strip().endswith("queues: in, new, quarantine, queue-2 (added: new)")
    # a stale orphaned tmp file is one problem, not two
    Path(sp, ".tmp", "stale").touch()
    t = time.time() - 3600
    os.utime(os.path.join(sp, ".tmp", "stale"), (t, t))
    assert main(["fsck", sp, "--max-tmp-file-age", "1m", "--json"]) == 1
    found = [(p["kind"], p["file"]) for p in json.loads(capsys.readouterr().out)]
    assert sorted(found) == [("orphaned", "orphan"), ("orphaned", "stale")]


@pytest.mark.skipif(sys.platform == "darwin", reason="APFS refuses names that are not UTF-8")
def test_json_of_names_that_are_not_utf8(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = os.fsdecode(b"caf\xe9")
    Path(sp, "in", bad).touch()
    Path(sp, ".registry", bad).touch()
    capsys.readouterr()
    for args in (["ls", sp, "in", "--json"], ["fsck", sp, "--json", "--max-age", "in=0"]):
        main(args)
        raw = capsys.readouterr().out
        raw.encode("utf-8")  # no lone surrogate: valid UTF-8
        assert "caf\\\\xe9" in raw  # the documented escape: backslash, x, two hex digits
        doc = json.loads(raw)
        assert any(x.get("name", x.get("file")) == "caf\\xe9" for x in doc), doc
    assert main(["ls", sp, "in"]) == 0
    assert "caf\\xe9" in capsys.readouterr().out
    assert main(["show", sp, "in", bad, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "caf\\xe9"


SLOW = pytest.mark.skipif(not os.environ.get("MULTISPOOL_SLOW"), reason="set MULTISPOOL_SLOW=1")

FILL = """
import os, sys
from multispool import cli
d, n = sys.argv[1], int(sys.argv[2])
# Entries laid out directly (as an enqueue leaves them), to build a deep backlog fast.
for i in range(n):
    name = f"e{i:09d}"
    for sub in (".registry", "in"):
        os.close(os.open(os.path.join(d, sub, name), os.O_WRONLY | os.O_CREAT, 0o600))
print("ok")
"""

DRAIN = """
import sys
import multispool
from multispool import cli
spool = multispool.Spool.load(sys.argv[1], cli.make_spoolable(["in"]))
q = spool.spoolable.queues("in")
with spool.reader(q) as r:
    while (co := r.dequeue_available()) is not None:
        co.remove()
print("drained")
"""


@SLOW
@pytest.mark.timeout(3600)
def test_watch_cpu_while_a_deep_backlog_drains(tmp_path: Path) -> None:
    """Issue 14 item 10: watch costs at most 5 % of a core while a big backlog drains
    (MULTISPOOL_WATCH_BACKLOG entries, default 200,000; 2 consumer processes)."""
    n = int(os.environ.get("MULTISPOOL_WATCH_BACKLOG", "200000"))
    d = str(tmp_path / "sp")
    assert main(["init", d, "--queue", "in"]) == 0
    fill = subprocess.run([sys.executable, "-c", FILL, d, str(n)], env=child_env(), capture_output=True,
                          text=True, timeout=1800, check=False)
    assert fill.stdout.strip() == "ok", fill.stderr
    lines = tmp_path / "watch.out"
    with open(lines, "w") as out:
        watch = subprocess.Popen([sys.executable, "-m", "multispool", "watch", d], stdout=out,
                                 stderr=subprocess.DEVNULL, env=child_env())
    consumers: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 120
        while not lines.read_text():  # its first refresh (the full listing) is done
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        cpu0 = _cpu_seconds(watch.pid)
        consumers = [subprocess.Popen([sys.executable, "-c", DRAIN, d], env=child_env(),
                                      stdout=subprocess.DEVNULL) for _ in range(2)]
        for c in consumers:
            c.wait(timeout=1800)
        wall = time.monotonic() - t0
        cpu = _cpu_seconds(watch.pid) - cpu0
        while "entries=0" not in lines.read_text().splitlines()[-1]:  # it saw the end
            assert time.monotonic() < deadline + wall
            time.sleep(0.05)
    finally:
        for p in [watch, *consumers]:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=60)
    share = cpu / wall
    sys.stderr.write(f"watch: {cpu:.2f} s CPU over a {wall:.1f} s drain of {n} entries: {share:.1%}\n")
    assert os.listdir(os.path.join(d, "in")) == [".checkout"]
    assert share <= 0.05


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- a spool at the root of a filesystem ------------------------------------------------
# Runs each command line of argv[2] (JSON) in turn, printing [exit code, stdout, stderr]
# as a JSON line each, then the monitor until it is signalled: one interpreter for all.
_COMMANDS = """
import contextlib, io, json, sys
from multispool.cli import main
for args in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    print(json.dumps([rc, out.getvalue(), err.getvalue()]), flush=True)
sys.exit(main(["monitor", sys.argv[1], "--check-every", "0.05", "--alert-after-cycles", "0"]))
"""


@pytest.mark.parametrize("mode", [0o000, 0o700])
def test_the_filesystems_lost_and_found_is_no_queue(
    sp: str, procs: list[subprocess.Popen[str]], mode: int
) -> None:
    """A spool at the root of an ext2/3/4 filesystem shares it with the filesystem's
    lost+found: a directory without .checkout, usually root's and unreadable to the
    spool's user. The command line took every non-dot directory for a queue: every
    command failed on lost+found/.checkout (exit 2), and the library's clean_abandoned
    (recover, fsck --repair) on listing lost+found."""
    prefix = unprivileged()
    if isinstance(prefix, str):
        pytest.skip(prefix)
    spool = spool_of(sp)
    name = spool.enqueue(q(spool, "in"), b'{"n": 1}', b"x").name
    # An abandoned enqueue, for fsck --repair to find and clean.
    Path(sp, ".registry", "abandoned").touch()
    os.utime(Path(sp, ".registry", "abandoned"), (1, 1))
    Path(sp, ".data", "orphan").touch()  # a problem for the monitor to report
    commands = [
        ["ls", sp, "in"], ["status", sp, "--json"], ["watch", sp, "--once"], ["metrics", sp],
        ["fsck", sp, "--dry-run", "--repair"], ["fsck", sp, "--repair"], ["recover", sp],
    ]
    lf = Path(sp, "lost+found")
    lf.mkdir()
    lf.chmod(mode)
    try:
        p = subprocess.Popen(
            [*prefix, sys.executable, "-c", _COMMANDS, sp, json.dumps(commands)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        )
        procs.append(p)
        assert p.stdout is not None
        results = {}
        for args in commands:
            line = p.stdout.readline()  # "" if it died
            assert line, p.communicate(timeout=30)[1]
            results[" ".join(args[:1] + args[2:])] = json.loads(line)
        for what, (rc, out, err) in results.items():
            # The spool's own .lost+found may be named (repair puts files aside there).
            assert "lost+found" not in (out + err).replace(".lost+found", ""), (what, out, err)
            # fsck: 1, the problems found (the orphan stays: it is younger than the limit).
            assert rc == (1 if what.startswith("fsck") else 0), (what, out, err)
        assert name in results["ls in"][1]
        assert sorted(json.loads(results["status --json"][1])) == ["in", "quarantine", "queue-2"]
        assert "queue-2" in results["watch --once"][1] and 'queue="in"' in results["metrics"][1]
        assert "abandoned" in results["fsck --dry-run --repair"][1]
        assert "abandoned" in results["fsck --repair"][1]
        line = p.stdout.readline()  # the monitor's Start event
        assert line, p.communicate(timeout=30)[1]
        assert json.loads(line)["problem"]["file"] == "orphan"
        assert not Path(sp, ".registry", "abandoned").exists()
        assert [e.name for e in spool.list(q(spool, "in"))] == [name]
        assert lf.is_dir()
    finally:
        lf.chmod(0o700)
