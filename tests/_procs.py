"""Helpers for tests that need real processes (and real `find`).

- ``Worker``: a Python child running a script, driven line by line over pipes. Children
  block reading stdin, so sending one command to several workers back to back is the
  barrier: they all start within microseconds of each other.
- ``workers(code, n)``: a context manager that starts ``n`` workers and always reaps them
  (SIGKILL by PID, then wait) in ``finally``.
- ``serve(handler)``: the loop a worker script runs: print ``ready``, then for each stdin
  line print ``handler(line)`` (or ``ERR <ExceptionType>: <message>``).
- ``run_python(code, ...)``: run a one-shot script to completion (killed on timeout).
- ``find_sort(dir)``: ``find NAME | env -i sort`` run from the parent of ``dir``, as the
  OCaml expect tests print spool trees.
- ``unprivileged()``: the command prefix that runs a child unable to read what its user
  may not (root without the capabilities that bypass file permissions).

Children get the parent's multispool (normally ``lib/``) and ``tests/`` on PYTHONPATH, so a
script can ``import multispool`` and ``from _procs import serve``.

Example::

    CODE = '''
    from _procs import serve
    serve(lambda line: line.upper())
    '''
    with workers(CODE, 2) as ws:
        assert broadcast(ws, "go") == ["GO", "GO"]
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

LIB = str(Path(__file__).resolve().parent.parent / "lib")
TESTS = str(Path(__file__).resolve().parent)
DEFAULT_TIMEOUT = 30.0


def _multispool_root() -> str:
    # Children must run the multispool the tests imported (lib/, or a copy under test).
    spec = importlib.util.find_spec("multispool")
    if spec is not None and spec.origin:
        return os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
    return LIB


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a Python child: ours, with the multispool this process
    imports (normally lib/) and tests/ first on PYTHONPATH."""
    env = dict(os.environ)
    paths = [_multispool_root(), TESTS] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if extra:
        env.update(extra)
    return env


class Worker:
    """A Python child running ``code`` (dedented) with ``args`` in ``sys.argv[1:]``.

    ``send(line)`` writes one line to its stdin; ``recv(timeout)`` returns its next stdout
    line, raising TimeoutError after ``timeout`` seconds or EOFError (with the child's
    stderr) if it exited. ``close()`` kills it by PID if still running and reaps it.
    """

    def __init__(self, code: str, *args: str, env: dict[str, str] | None = None) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=child_env(env),
            bufsize=0,
        )
        self.pid = self.proc.pid
        self._buf = b""

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        # Our own buffer over os.read: a buffered reader could hide a line from select().
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"worker {self.pid} sent no line within {timeout}s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError(f"worker {self.pid} exited: {self.stderr()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def close(self) -> None:
        """Kill (by PID) if still running, then reap. Safe to call twice."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=DEFAULT_TIMEOUT)
        finally:
            for f in (self.proc.stdin, self.proc.stdout):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
            self._stderr.close()


@contextlib.contextmanager
def workers(code: str, n: int, *args: str, env: dict[str, str] | None = None) -> Iterator[list[Worker]]:
    """Start ``n`` workers running ``code`` and wait until each printed ``ready`` (the
    first line ``serve`` prints); always kill and reap them on exit."""
    started: list[Worker] = []
    try:
        for _ in range(n):
            started.append(Worker(code, *args, env=env))
        for w in started:
            line = w.recv()
            assert line == "ready", f"worker {w.pid} said {line!r}: {w.stderr()}"
        yield started
    finally:
        for w in started:
            w.close()


def broadcast(ws: Sequence[Worker], line: str, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Send ``line`` to every worker (back to back: the barrier), then collect one reply
    from each, in worker order."""
    for w in ws:
        w.send(line)
    return [w.recv(timeout) for w in ws]


def serve(handler: Callable[[str], str]) -> None:
    """Worker side: print ``ready``, then answer each stdin line with ``handler(line)``
    on one stdout line; an exception answers ``ERR <type>: <message>``. Ends at EOF."""
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for raw in sys.stdin:
        line = raw.rstrip("\n")
        try:
            reply = handler(line)
        except Exception as e:  # reported to the parent, which decides
            reply = f"ERR {type(e).__name__}: {e}".replace("\n", " ")
        out.write(reply + "\n")
        out.flush()


def in_forked_child(body: Callable[[], bool]) -> None:
    """fork() (with threads running, on purpose: its warning is silenced), run ``body``
    in the child, which exits 0 if it returned True and never returns into pytest;
    in the parent, wait for the child (killing it if the wait is interrupted) and
    assert that it exited 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = False
        try:
            ok = bool(body())
        finally:
            os._exit(0 if ok else 1)
    try:
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child failed"


def run_python(
    code: str,
    *args: str,
    timeout: float = DEFAULT_TIMEOUT,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter to completion (killed if it exceeds
    ``timeout``); returns its exit code, stdout and stderr as text."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(env),
        check=False,
    )


def find_sort(path: str | os.PathLike[str]) -> list[str]:
    """Lines of ``find NAME | env -i sort`` run in the parent directory of ``path``
    (NAME is its last component): the spool tree the OCaml expect tests print."""
    p = Path(path)
    out = subprocess.run(
        f"find {p.name} | env -i sort",
        shell=True,
        cwd=p.parent,
        capture_output=True,
        text=True,
        check=True,
        timeout=DEFAULT_TIMEOUT,
    ).stdout
    return out.splitlines()


_NO_DAC = "-dac_override,-dac_read_search"


@functools.cache
def unprivileged() -> tuple[str, ...] | str:
    """The prefix that runs a command without the power to read what its user may not
    (a directory of mode 0o000): nothing for a user that is not root; for root, setpriv
    without the capabilities that override file permissions (root stays root: the
    interpreter may live where only root's own permissions reach). A str: why there is
    no such prefix here (the test skips)."""
    if os.geteuid() != 0:
        return ()
    prefix = ("setpriv", f"--inh-caps={_NO_DAC}", f"--bounding-set={_NO_DAC}", "--")
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=DEFAULT_TIMEOUT, check=False)
    except FileNotFoundError:
        return "root, and no setpriv to drop the capabilities that bypass file permissions"
    if probe.returncode != 0:
        return f"setpriv cannot drop capabilities here: {probe.stderr!r}"
    return prefix
