"""Every example in examples/ runs as documented, as real processes (always reaped)."""

from __future__ import annotations

import configparser
import contextlib
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import multispool
from _procs import child_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# One mypy cache per interpreter: tox envs running side by side must not share one.
MYPY_CACHE = EXAMPLES.parent / ".mypy_cache" / f"examples-py{sys.version_info[0]}{sys.version_info[1]}"
TIMEOUT = 30.0
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX signals and groups")


class Example:
    """One example script as a child process, read line by line from its stdout."""

    def __init__(self, script: str, *args: str, umask: int = -1) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), umask=umask,
        )
        assert self.proc.stdout is not None
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)

    def line(self, timeout: float = TIMEOUT) -> str:
        """The next stdout line; fails with the child's stderr if it exits or stays silent."""
        assert self.proc.stdout is not None
        if not self._sel.select(timeout):
            pytest.fail(f"no output within {timeout} s from {self.proc.args}")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(TIMEOUT)
            pytest.fail(f"{self.proc.args} exited {self.proc.returncode}: {self.stderr()}")
        return line.rstrip("\n")

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read() if self.proc.poll() is not None else ""

    def finish(self) -> tuple[int, list[str]]:
        """Wait for exit: (exit code, remaining stdout lines)."""
        out, err = self.proc.communicate(timeout=TIMEOUT)
        assert self.proc.returncode == 0, err
        return self.proc.returncode, out.splitlines()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(TIMEOUT)
        self._sel.close()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@contextlib.contextmanager
def example(script: str, *args: str, umask: int = -1) -> Iterator[Example]:
    ex = Example(script, *args, umask=umask)
    try:
        yield ex
    finally:
        ex.close()


def run(script: str, *args: str, umask: int = -1) -> list[str]:
    with example(script, *args, umask=umask) as ex:
        return ex.finish()[1]


def queue_names(spool: Path, queue: str) -> list[str]:
    return sorted(n for n in os.listdir(spool / queue) if not n.startswith("."))


@pytest.mark.parametrize("consumer", ["consumer.py", "async_consumer.py"])
def test_consumer_waits_then_handles_what_producer_enqueues(tmp_path: Path, consumer: str) -> None:
    """The consumer starts first and waits; a producer process enqueues; every job is
    handled exactly once and ends in the done queue."""
    spool = tmp_path / "spool"
    with example(consumer, str(spool), "--max", "5") as c:
        assert c.line() == "ready"
        names = run("producer.py", str(spool), "--count", "5")
        assert len(names) == 5
        handled = [c.line() for _ in range(5)]
        c.finish()
    assert sorted(int(h.split()[1]) for h in handled) == list(range(5))
    assert all(h.startswith("handled ") and h.endswith("(9 bytes)") for h in handled)
    assert queue_names(spool, "done") == sorted(names)
    assert queue_names(spool, "incoming") == []


def test_backlog_is_drained(tmp_path: Path) -> None:
    """Entries enqueued before any consumer runs are handled when one starts."""
    spool = tmp_path / "spool"
    names = run("producer.py", str(spool), "--count", "3")
    with example("consumer.py", str(spool), "--max", "3") as c:
        assert c.line() == "ready"
        assert len([c.line() for _ in range(3)]) == 3
        c.finish()
    assert queue_names(spool, "done") == sorted(names)


@posix_only
@pytest.mark.parametrize("consumer", ["consumer.py", "async_consumer.py"])
def test_consumer_stops_cleanly_on_sigterm(tmp_path: Path, consumer: str) -> None:
    """What ``systemctl stop`` does to the service in jobs-consumer.service: exit 0."""
    with example(consumer, str(tmp_path / "spool")) as c:
        assert c.line() == "ready"
        c.proc.send_signal(signal.SIGTERM)
        c.finish()


def test_systemd_unit_runs_the_consumer() -> None:
    """The unit starts consumer.py, stops it with SIGTERM (handled above) and keeps
    group permissions (UMask) as shared_spool.py needs."""
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read(EXAMPLES / "jobs-consumer.service")
    service = unit["Service"]
    exec_start = service["ExecStart"].split()
    assert Path(exec_start[1]).name == "consumer.py" and (EXAMPLES / "consumer.py").exists()
    assert service["KillSignal"] == "SIGTERM"
    assert service["UMask"] == "0007"
    assert exec_start[2] in service["ReadWritePaths"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@posix_only
def test_shared_spool_is_group_writable_and_setgid(tmp_path: Path) -> None:
    """With umask 007, every directory is 2770 and every file 0660, all in one group."""
    lines = run("shared_spool.py", str(tmp_path / "shared"), umask=0o007)
    assert not [line for line in lines if line.startswith("warning")]
    modes = {line.split()[2]: (line.split()[0], line.split()[1]) for line in lines}
    assert {"incoming", ".registry", ".data", "incoming/.checkout"} <= set(modes)
    assert len({group for _, group in modes.values()}) == 1
    for rel, (mode, _) in modes.items():
        want = "drwxrws---" if os.path.isdir(tmp_path / "shared" / rel) else "-rw-rw----"
        assert mode == want, rel
    files = [rel for rel, (mode, _) in modes.items() if mode.startswith("-")]
    assert len(files) == 3  # registry, data, queue file of the one entry


@posix_only
def test_shared_spool_warns_about_a_masking_umask(tmp_path: Path) -> None:
    lines = run("shared_spool.py", str(tmp_path / "shared"), umask=0o077)
    assert lines[0].startswith("warning: umask 077")


@pytest.mark.xfail(
    not hasattr(multispool, "Remove"),
    reason="the generic API (Save[M], Remove) is not in this multispool yet",
    strict=True,
)
def test_examples_type_check_cleanly() -> None:
    """The examples are code users copy: mypy --strict must accept them."""
    pytest.importorskip("mypy")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--config-file",
         str(EXAMPLES.parent / "pyproject.toml"), "--cache-dir", str(MYPY_CACHE),
         *sorted(str(p) for p in EXAMPLES.glob("*.py"))],
        cwd=EXAMPLES, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_retry_consumer_delivers_after_retries_and_dead_letters() -> None:
    lines = run("retry_consumer.py")
    assert any(ln.endswith("/flaky") and "delivered" in ln for ln in lines), lines
    assert any(ln.startswith("dead-lettered ") and "/down after 4 attempts" in ln for ln in lines), lines
    assert lines[-1] == "server saw: {'/flaky': 3, '/down': 4}"
