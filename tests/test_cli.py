"""The ``multispool`` command line: every subcommand via main([...]) and as a real process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

import multispool
from multispool.cli import main, parse_duration

LIB = str(Path(__file__).resolve().parent.parent / "lib")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = LIB + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def run_cli(*args: str, stdin: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "multispool", *args],
        input=None if stdin is None else stdin.decode(),
        capture_output=True, text=True, env=env(), timeout=timeout, check=False,
    )


@pytest.fixture
def sp(tmp_path: Path) -> str:
    d = str(tmp_path / "sp")
    assert main(["init", d, "--queue", "in", "--queue", "queue-2"]) == 0
    return d


def err_one_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err
    return err


def tree(d: str) -> dict[str, float]:
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            p = os.path.join(root, n)
            out[os.path.relpath(p, d)] = os.lstat(p).st_mtime
    return out


def age(path: str, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_durations() -> None:
    assert [parse_duration(x) for x in ("90", "90s", "1.5m", "2h", "1d", ".5")] == [
        90, 90, 90, 7200, 86400, 0.5
    ]
    for bad in ("", "1w", "-3", "m", "1 2"):
        with pytest.raises(Exception, match="bad duration"):
            parse_duration(bad)


def test_init_creates_queues(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert sorted(os.listdir(sp)) == [".data", ".registry", ".tmp", "in", "queue-2"]
    assert os.path.isdir(os.path.join(sp, "queue-2", ".checkout"))
    # queue names that cannot be directories: exit 2, one line
    assert main(["init", sp, "--queue", ".bad"]) == 2
    err_one_line(capsys, "bad queue name")


def test_enqueue_ls_status(sp: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    payload = tmp_path / "payload"
    payload.write_bytes(b"hello")
    assert main(["enqueue", sp, "in", "--metadata", '{"n": 1}', "--data", str(payload)]) == 0
    name = capsys.readouterr().out.strip()
    assert os.path.exists(os.path.join(sp, "in", name))
    assert Path(sp, ".data", name).read_bytes() == b"hello"
    assert main(["enqueue", sp, "queue-2", "--metadata", "[1, 2]", "--format", "msgpack"]) == 0
    name2 = capsys.readouterr().out.strip()
    # a raw non-JSON, non-msgpack metadata file, written the way a user codec might
    spool = multispool.Spool.load(sp, multispool.cli.make_spoolable(["in", "queue-2"]))
    name3 = spool.enqueue(spool.spoolable.queues("queue-2"), b"\xc1\xff", b"").name

    assert main(["ls", sp, "in", "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert item["name"] == name and item["metadata"] == {"n": 1} and item["size"] == 5
    assert item["metadata_format"] == "json" and 0 <= item["age"] < 60
    assert main(["ls", sp, "queue-2", "--json"]) == 0
    items = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert items[name2]["metadata_format"] == "msgpack" and items[name2]["metadata"] == [1, 2]
    assert items[name3]["metadata_format"] == "bytes" and items[name3]["metadata"] == "wf8="
    assert main(["ls", sp, "in"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NAME", "AGE", "DUE", "ATTEMPTS", "SIZE", "METADATA"]
    assert '{"n":1}' in out

    e = spool.list(spool.spoolable.queues("in"))[0]
    co = spool.checkout(e)
    assert main(["ls", sp, "in", "--checkouts", "--json"]) == 0
    assert [i["name"] for i in json.loads(capsys.readouterr().out)] == [name]
    assert main(["status", sp, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["in"] == {"entries": 0, "checkouts": 1, "oldest_age": None, "delayed": 0}
    assert st["queue-2"]["entries"] == 2 and st["queue-2"]["checkouts"] == 0
    assert 0 <= st["queue-2"]["oldest_age"] < 60
    co.release()
    assert main(["status", sp]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["QUEUE", "ENTRIES", "CHECKOUTS", "DELAYED", "OLDEST"]
    assert lines[1].split()[:4] == ["in", "1", "0", "0"]


def test_enqueue_from_stdin(
    sp: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    class Stdin:
        buffer = io.BytesIO(b"from stdin")

    monkeypatch.setattr(sys, "stdin", Stdin)
    capsys.readouterr()
    assert main(["enqueue", sp, "in", "--metadata", "{}", "--data", "-"]) == 0
    name = capsys.readouterr().out.strip()
    assert Path(sp, ".data", name).read_bytes() == b"from stdin"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["status", "/nonexistent/spool"], "no such directory"),
        (["status", "{tmp}"], "not a spool"),
        (["ls", "{sp}", "nope"], "no such queue 'nope'"),
        (["enqueue", "{sp}", "in", "--metadata", "{not json"], "not valid JSON"),
        (["fsck", "{sp}", "--max-age", "in=soon"], "bad duration"),
        (["fsck", "{sp}", "--max-age", "nope=1"], "no such queue"),
        (["fsck", "{sp}", "--max-checked-out-age", "x"], "bad duration"),
        (["frobnicate"], "invalid choice"),
        (["status"], "required"),
        (["status", "{sp}", "--bogus"], "unrecognized arguments"),
        ([], "required"),
    ],
)
def test_usage_and_spool_errors_exit_2_one_line(
    sp: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    capsys.readouterr()
    argv = [a.replace("{sp}", sp).replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err_one_line(capsys, needle)


def test_spool_missing_checkout_dir_is_exit_2(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    os.rmdir(os.path.join(sp, "in", ".checkout"))
    capsys.readouterr()
    assert main(["status", sp]) == 2
    err_one_line(capsys, "missing directory")


def test_help_everywhere_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("init", "status", "ls", "enqueue", "fsck", "monitor", "recover", "watch"):
        assert main([cmd, "--help"]) == 0
        out = capsys.readouterr().out
        assert f"multispool {cmd}" in out and "example:" in out, cmd
    assert main(["--help"]) == 0
    assert "fsck" in capsys.readouterr().out


def make_problems(sp: str) -> None:
    """One of every repairable problem, all old enough to be repaired."""
    spool = multispool.Spool.load(sp, multispool.cli.make_spoolable(["in", "queue-2"]))
    q_in, q2 = spool.spoolable.queues("in"), spool.spoolable.queues("queue-2")
    Path(sp, ".tmp", "orph-tmp").touch()
    Path(sp, ".data", "orph-data").touch()
    Path(sp, "in", "orph-queue").touch()
    Path(sp, "queue-2", ".checkout", "orph-co").touch()
    for f in (".tmp/orph-tmp", ".data/orph-data", "in/orph-queue", "queue-2/.checkout/orph-co"):
        age(os.path.join(sp, f), 3600)  # orphans are removed only past --max-tmp-file-age
    Path(sp, ".registry", "abandoned").touch()
    Path(sp, ".tmp", "abandoned").touch()
    age(os.path.join(sp, ".registry", "abandoned"), 3600)
    # a duplicate: same registered name in two queues; the newer copy is kept
    e = spool.enqueue(q_in, b'{"dup": 1}', b"d")
    shutil.copy(os.path.join(sp, "in", e.name), os.path.join(sp, "queue-2", e.name))
    age(os.path.join(sp, "in", e.name), 100)
    # a dead checkout (nobody holds its lock: the handle's lock is dropped)
    dead = spool.enqueue(q2, b'{"dead": 1}', b"x")
    co = spool.checkout(dead)
    co._claim.release()  # simulate the owner dying: lock released, file stays checked out
    age(co.path, 3600)
    # a stale tmp file of a queued entry
    stale = spool.enqueue(q2, b'{"stale": 1}', b"x")
    Path(sp, ".tmp", stale.name).touch()
    age(os.path.join(sp, ".tmp", stale.name), 3600)


def test_planted_registry_symlink_spoils_no_listing(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    # A symlink planted at .registry/NAME of a queued name (never followed: nobody can
    # claim that entry) must not make status, ls or metrics fail for the whole spool.
    assert main(["enqueue", sp, "in", "--metadata", '{"n": 1}']) == 0
    good = capsys.readouterr().out.strip()
    Path(sp, "in", "junk").write_bytes(b"{}")
    os.symlink("/etc/hostname", os.path.join(sp, ".registry", "junk"))
    assert main(["status", sp, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["in"]["entries"] == 2
    assert main(["ls", sp, "in", "--json"]) == 0
    out = capsys.readouterr()
    assert good in [e["name"] for e in json.loads(out.out)]
    assert ".registry/junk" in out.err
    pytest.importorskip("prometheus_client")
    assert main(["metrics", sp]) == 0
    assert 'multispool_queue_entries{queue="in"' in capsys.readouterr().out


def test_fsck_reports_and_repairs(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["fsck", sp]) == 0
    assert capsys.readouterr().out.strip() == "no problems"
    make_problems(sp)
    assert main(["fsck", sp, "--json"]) == 1
    found = json.loads(capsys.readouterr().out)
    kinds = sorted((p["kind"], p.get("dir") or ",".join(p["dirs"]), p["file"]) for p in found)
    assert ("orphaned", ".tmp", "orph-tmp") in kinds
    assert ("orphaned", ".data", "orph-data") in kinds
    assert ("orphaned", "in", "orph-queue") in kinds
    assert ("orphaned", "queue-2/.checkout", "orph-co") in kinds
    assert ("orphaned", ".registry", "abandoned") in kinds
    assert any(k[0] == "duplicated" and k[1] == "in,queue-2" for k in kinds)
    assert sum(k[0] == "too_old" and k[1] == "queue-2/.checkout" for k in kinds) == 1
    assert sum(k[0] == "dead_checkout" and k[1] == "queue-2/.checkout" for k in kinds) == 1
    assert sum(k[0] == "too_old" and k[1] == ".tmp" for k in kinds) == 1

    before = tree(sp)
    assert main(["fsck", sp, "--repair", "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert tree(sp) == before  # nothing changed, not even an mtime
    for needle in ("would move orphan .tmp/orph-tmp to .lost+found",
                   "would remove abandoned enqueue abandoned", "would recover dead checkout",
                   "would remove duplicate in/", "would move stale .tmp/"):
        assert needle in out, out

    assert main(["fsck", sp, "--repair", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["problems"] == [] and doc["dry_run"] is False and len(doc["actions"]) >= 8
    assert main(["fsck", sp]) == 0
    # the repairs kept what must be kept
    assert sorted(os.listdir(os.path.join(sp, "queue-2"))) == sorted(
        [".checkout", *os.listdir(os.path.join(sp, ".registry"))]
    )
    assert os.listdir(os.path.join(sp, "in")) == [".checkout"]
    assert os.listdir(os.path.join(sp, ".tmp")) == []
    # ... and deleted no data: what could not go back into a queue is in .lost+found
    lf = os.path.join(sp, ".lost+found")
    for item, label in (("orph-tmp", "metadata"), ("orph-data", "data"), ("orph-queue", "in"),
                        ("orph-co", "queue-2.checkout")):
        assert os.listdir(os.path.join(lf, item)) == [label]


def test_fsck_dry_run_removes_no_abandoned_enqueue_that_repair_keeps(
    sp: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run said "would remove abandoned enqueue" for registry names that --repair
    does not remove: one whose entry a crash left as a keep link only (repair renames
    it back into its queue) and junk planted at .registry/NAME (never locked, left)."""
    from multispool._layout import keep_name

    assert main(["enqueue", sp, "in", "--metadata", '{"n": 1}']) == 0
    kept = capsys.readouterr().out.strip()
    os.rename(os.path.join(sp, "in", kept), os.path.join(sp, "in", keep_name(kept)))  # cut move
    os.symlink("/etc/hostname", os.path.join(sp, ".registry", "junk"))
    Path(sp, ".registry", "gone").write_bytes(b"")  # a real abandoned enqueue
    for n in (kept, "junk", "gone"):
        os.utime(os.path.join(sp, ".registry", n), (time.time() - 3600,) * 2, follow_symlinks=False)

    def abandoned(actions: list[str], verb: str) -> list[str]:
        head = f"{verb} abandoned enqueue "
        return sorted(a[len(head):].split(" ")[0] for a in actions if a.startswith(head))

    before = tree(sp)
    assert main(["fsck", sp, "--repair", "--dry-run", "--json"]) == 1
    would = abandoned(json.loads(capsys.readouterr().out)["actions"], "would remove")
    assert tree(sp) == before
    assert main(["fsck", sp, "--repair", "--json"]) == 1  # the junk stays a problem
    done = abandoned(json.loads(capsys.readouterr().out)["actions"], "removed")
    assert done == ["gone"]
    assert would == done
    assert os.path.exists(os.path.join(sp, "in", kept))


def test_fsck_repair_leaves_live_owner_alone(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    spool = multispool.Spool.load(sp, multispool.cli.make_spoolable(["in", "queue-2"]))
    e = spool.enqueue(spool.spoolable.queues("in"), b"{}", b"")
    co = spool.checkout(e)  # held by this (live) process
    age(co.path, 3600)
    capsys.readouterr()
    assert main(["fsck", sp, "--repair", "--max-checked-out-age", "10m"]) == 1
    out = capsys.readouterr().out
    assert "too old: in/.checkout/" in out and "recover" not in out
    assert os.path.exists(co.path)
    co.remove()


def test_fsck_repair_dead_after_requires_that_age_too(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    spool = multispool.Spool.load(sp, multispool.cli.make_spoolable(["in", "queue-2"]))
    young, old = (spool.enqueue(spool.spoolable.queues("in"), b"{}", b"").name for _ in range(2))
    for name in (young, old):
        spool.checkout(multispool.Entry(spool, spool.spoolable.queues("in"), name))._claim.release()
    age(os.path.join(sp, "in", ".checkout", old), 300)
    capsys.readouterr()
    assert main(["fsck", sp, "--dead-after", "2m"]) == 2
    err_one_line(capsys, "--dead-after applies to --repair")
    assert main(["fsck", sp, "--repair", "--dead-after", "2m"]) == 1  # the young one is left
    out = capsys.readouterr().out
    assert f"recovered dead checkout in/.checkout/{old} into in" in out
    assert f"left dead checkout in/.checkout/{young}: younger than --dead-after" in out
    assert f"dead checkout: in/.checkout/{young}" in out
    assert os.listdir(os.path.join(sp, "in", ".checkout")) == [young]
    assert main(["recover", sp, "--dead-after", "2m"]) == 0
    assert capsys.readouterr().out.strip() == "nothing to recover"
    assert main(["recover", sp]) == 0
    assert os.listdir(os.path.join(sp, "in", ".checkout")) == []


def test_fsck_dry_run_says_what_repair_does_with_an_undecodable_dead_checkout(
    sp: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run said "would recover dead checkout" for a dead checkout whose metadata file
    cannot be read (a FIFO planted in its place), which --repair leaves for a person."""
    spool = multispool.Spool.load(sp, multispool.cli.make_spoolable(["in", "queue-2"]))
    name = spool.enqueue(spool.spoolable.queues("in"), b"{}", b"").name
    spool.checkout(multispool.Entry(spool, spool.spoolable.queues("in"), name))._claim.release()
    cofile = os.path.join(sp, "in", ".checkout", name)
    os.unlink(cofile)
    os.mkfifo(cofile)
    capsys.readouterr()
    before = tree(sp)
    assert main(["fsck", sp, "--repair", "--dry-run", "--json"]) == 1
    would = json.loads(capsys.readouterr().out)["actions"]
    assert tree(sp) == before
    assert main(["fsck", sp, "--repair", "--json"]) == 1
    done = json.loads(capsys.readouterr().out)["actions"]
    assert os.listdir(os.path.join(sp, "in", ".checkout")) == [name]  # left for a person
    what = f"dead checkout in/.checkout/{name}"
    assert [a.split(":")[0] for a in done] == [f"left {what}"], done
    assert [a.split(":")[0] for a in would] == [f"would leave {what}"], would
    assert "not a regular file" in would[0] and "not a regular file" in done[0]


def test_fsck_limits(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    spool = multispool.Spool.load(sp, multispool.cli.make_spoolable(["in", "queue-2"]))
    e = spool.enqueue(spool.spoolable.queues("in"), b"{}", b"")
    age(os.path.join(sp, "in", e.name), 120)
    capsys.readouterr()
    assert main(["fsck", sp]) == 0
    assert main(["fsck", sp, "--max-age", "queue-2=1s"]) == 0
    assert main(["fsck", sp, "--max-age", "in=1m"]) == 1
    assert f"too old: in/{e.name}" in capsys.readouterr().out
    assert main(["fsck", sp, "--max-age", "in=1h"]) == 0


def test_recover(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    spool = multispool.Spool.load(sp, multispool.cli.make_spoolable(["in", "queue-2"]))
    e = spool.enqueue(spool.spoolable.queues("in"), b"{}", b"")
    co = spool.checkout(e)
    co._claim.release()  # its owner "died"
    Path(sp, ".registry", "gone").touch()
    age(os.path.join(sp, ".registry", "gone"), 3600)
    capsys.readouterr()
    assert main(["recover", sp, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "recovered": [f"in/{e.name}"], "removed_abandoned": ["gone"]
    }
    assert os.path.exists(os.path.join(sp, "in", e.name))
    assert main(["recover", sp]) == 0
    assert capsys.readouterr().out.strip() == "nothing to recover"


def test_watch_once(sp: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["enqueue", sp, "in", "--metadata", "{}"]) == 0
    capsys.readouterr()
    assert main(["watch", sp, "--once"]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["QUEUE", "ENTRIES", "CHECKOUTS", "IN/S", "OUT/S", "OLDEST"]
    assert rows[1][:3] == ["in", "1", "0"] and rows[2][:3] == ["queue-2", "0", "0"]


def test_watch_rates() -> None:
    from multispool.cli import _Rates

    r = _Rates(window=2.0)
    assert r.update({"a"}, 0.0) == (0.0, 0.0)
    assert r.update({"a", "b", "c"}, 1.0) == (1.0, 0.0)
    assert r.update({"c"}, 2.0) == (1.0, 1.0)
    assert r.update({"c"}, 4.5) == (0.0, 0.0)  # older samples leave the window


def test_raw_metadata_display() -> None:
    from multispool.cli import show_metadata

    assert show_metadata(b'{"a": [1]}') == ("json", {"a": [1]})
    assert show_metadata(msgspec.msgpack.encode({"k": b"\x00"})) == ("msgpack", {"k": "AA=="})
    assert show_metadata(b"\xc1") == ("bytes", "wQ==")


def test_queue_names_that_are_not_identifiers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "sp")
    qs = ["1st", "queue-1", "queue_1", "class", "_x_", "é"]
    argv = ["init", d]
    for q in qs:
        argv += ["--queue", q]
    assert main(argv) == 0
    for q in qs:
        assert main(["enqueue", d, q, "--metadata", "1"]) == 0
    capsys.readouterr()
    assert main(["status", d, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert sorted(st) == sorted(qs) and all(v["entries"] == 1 for v in st.values())


def test_text_output_escapes_control_characters_of_planted_names(
    sp: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name planted in the spool (anyone who may write there can) holding terminal
    escape sequences or a newline was printed as is: ``ls`` or ``fsck`` run by an
    operator cleared the screen, set the window title, or forged output lines. Text
    output shows control characters as ``\\xHH``; JSON output keeps the exact name."""
    evil = "ev\x1b]0;pwned\x07\x1b[2J\nfake  0.0s  -  0  -  {}\x9b"
    Path(sp, ".registry", evil).touch()
    Path(sp, "in", evil).touch()
    Path(sp, "queue-2", evil + "orphan").touch()
    payload = Path(sp).parent / "payload"
    payload.write_bytes(b"text\x1b[31m\nline 2\tx")
    assert main(["enqueue", sp, "in", "--metadata", "{}", "--data", str(payload)]) == 0
    good = capsys.readouterr().out.strip()
    outs = []
    for argv in (["ls", sp, "in"], ["fsck", sp], ["show", sp, "in", evil], ["show", sp, "in", good]):
        main(argv)
        captured = capsys.readouterr()
        outs.append(captured.out + captured.err)
    for out in outs:
        assert not any(c in out for c in "\x1b\x07\x9b"), out
        assert not any(line.startswith("fake") for line in out.splitlines()), out  # no forged line
    assert "ev\\x1b]0;pwned\\x07" in outs[0]
    assert "line 2\tx" in outs[3]  # a newline and a tab of the data itself are kept
    assert main(["ls", sp, "in", "--json"]) == 0
    names = [e["name"] for e in json.loads(capsys.readouterr().out)]
    assert sorted(names) == sorted([evil, good])


# -- real processes ----------------------------------------------------------------------
def test_subprocess_every_subcommand(tmp_path: Path) -> None:
    d = str(tmp_path / "sp")
    r = run_cli("init", d, "--queue", "a", "--queue", "b")
    assert r.returncode == 0, r.stderr
    r = run_cli("enqueue", d, "a", "--metadata", '{"x": 1}', "--data", "-", stdin=b"payload")
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    assert Path(d, ".data", name).read_bytes() == b"payload"
    r = run_cli("status", d, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["a"]["entries"] == 1
    r = run_cli("ls", d, "a", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["metadata"] == {"x": 1}
    r = run_cli("fsck", d)
    assert (r.returncode, r.stdout.strip()) == (0, "no problems")
    Path(d, ".data", "orphan").touch()
    r = run_cli("fsck", d, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)[0]["kind"] == "orphaned"
    r = run_cli("fsck", d, "--repair")  # a fresh orphan may be a file being written: left
    assert r.returncode == 1 and "left orphan .data/orphan: younger than" in r.stdout
    assert Path(d, ".data", "orphan").exists()
    r = run_cli("fsck", d, "--repair", "--max-tmp-file-age", "0")
    assert r.returncode == 0 and "moved orphan .data/orphan to .lost+found" in r.stdout
    r = run_cli("recover", d)
    assert (r.returncode, r.stdout.strip()) == (0, "nothing to recover")
    r = run_cli("watch", d, "--once")
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[:2] == ["a", "1"]
    r = run_cli("ls", d, "nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = run_cli("fsck", d, "--max-age")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_subprocess_monitor_prints_events_and_stops_on_signal(tmp_path: Path) -> None:
    d = str(tmp_path / "sp")
    assert main(["init", d, "--queue", "a"]) == 0
    Path(d, ".data", "orphan").touch()
    for sig in (signal.SIGINT, signal.SIGTERM):
        p = subprocess.Popen(
            [sys.executable, "-m", "multispool", "monitor", d, "--check-every", "0.05",
             "--alert-after-cycles", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
        )
        try:
            assert p.stdout is not None
            line = p.stdout.readline()  # blocks until the Start event
            ev = json.loads(line)
            assert ev["event"] == "start" and ev["problem"]["file"] == "orphan"
            assert ev["problem"]["dir"] == ".data"
            if sig == signal.SIGTERM:
                os.unlink(os.path.join(d, ".data", "orphan"))
                ev = json.loads(p.stdout.readline())
                assert ev["event"] == "end" and ev["problem"]["file"] == "orphan"
                Path(d, ".data", "orphan").touch()
            p.send_signal(sig)
            _out, err = p.communicate(timeout=20)
            assert p.returncode == 0, err
            assert "Traceback" not in err
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


# -- watch under a real terminal ---------------------------------------------------------
@pytest.fixture
def tmux() -> Iterator[str]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    session = f"mswatch-{uuid.uuid4().hex[:8]}"
    try:
        yield session
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)


def capture(session: str) -> str:
    return subprocess.run(
        ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=False
    ).stdout


def wait_screen(session: str, pred: object, what: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        screen = capture(session)
        if pred(screen):  # type: ignore[operator]
            return screen
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; screen:\n{screen}")
        time.sleep(0.05)  # polling a screen: there is no event to wait on


def test_watch_in_tmux(tmp_path: Path, tmux: str) -> None:
    d = str(tmp_path / "sp")
    assert main(["init", d, "--queue", "a", "--queue", "b"]) == 0
    rc_file = tmp_path / "rc"
    cmd = (
        f"PYTHONPATH={LIB} {sys.executable} -m multispool watch {d}; echo \"rc=$?\" > {rc_file}"
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", tmux, "-x", "120", "-y", "30", "bash", "--norc"], check=True
    )
    subprocess.run(["tmux", "send-keys", "-t", tmux, cmd, "Enter"], check=True)

    def row(screen: str, q: str) -> list[str]:
        for ln in screen.splitlines():
            parts = ln.split()
            if parts and parts[0] == q:
                return parts
        return []

    wait_screen(tmux, lambda s: row(s, "a")[1:2] == ["0"], "the empty table")
    spool = multispool.Spool.load(d, multispool.cli.make_spoolable(["a", "b"]))
    for _ in range(3):
        spool.enqueue(spool.spoolable.queues("a"), b"{}", b"")
    screen = wait_screen(tmux, lambda s: row(s, "a")[1:2] == ["3"], "depth 3")
    assert float(row(screen, "a")[3]) > 0  # in/s
    subprocess.run(["tmux", "send-keys", "-t", tmux, "C-c"], check=True)
    deadline = time.monotonic() + 20
    while not rc_file.exists() or not rc_file.read_text().strip():
        assert time.monotonic() < deadline, capture(tmux)
        time.sleep(0.05)
    assert rc_file.read_text().strip() == "rc=0"
    assert "Traceback" not in capture(tmux)
