"""A reader on one FUSE mount receives entries enqueued through another mount of the same
directory: there, native events never fire, so `observer="auto"` must choose polling."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import multispool
from conftest import Cog, Queue
from test_watch import bindfs_mount, ensure_bindfs

PRODUCER = """
import sys, multispool
sys.path.insert(0, {tests!r})
from conftest import Queue, Cog
sp = multispool.Spoolable(queues=Queue, metadata=Cog | None)
spool = multispool.Spool.load(sys.argv[1], sp)
print(spool.enqueue(Queue.QUEUE1, Cog(n=7), b"through m1").name, flush=True)
"""


@pytest.mark.timeout(120)
def test_reader_on_second_fuse_mount_gets_entries_from_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_bindfs()
    monkeypatch.delenv("MULTISPOOL_OBSERVER", raising=False)
    source, m1, m2 = tmp_path / "source", tmp_path / "m1", tmp_path / "m2"
    for d in (source, m1, m2):
        d.mkdir()
    sp = multispool.Spoolable(queues=Queue, metadata=Cog | None)
    multispool.Spool.create(source / "spool", sp)
    with bindfs_mount(source, m1), bindfs_mount(source, m2):
        spool2 = multispool.Spool.load(m2 / "spool", sp)
        # rescan_interval far beyond the deadline: only the observer can deliver in time.
        with spool2.reader(Queue.QUEUE1, rescan_interval=60) as reader:
            assert reader.observer == "polling", reader.observer_reason
            # The enqueue must land while the reader waits (not before its first listing).
            waiting = threading.Event()
            real_wait = reader._wait

            def signalling_wait(*args: Any) -> None:
                waiting.set()
                real_wait(*args)

            monkeypatch.setattr(reader, "_wait", signalling_wait)
            got: list[multispool.CheckedOutEntry[Any, bytes] | None] = []
            t = threading.Thread(target=lambda: got.append(reader.dequeue(timeout=20)))
            t.start()
            proc = None
            try:
                assert waiting.wait(10), "reader never started waiting"
                code = PRODUCER.format(tests=str(Path(__file__).parent))
                proc = subprocess.Popen(
                    [sys.executable, "-c", code, str(m1 / "spool")],
                    stdout=subprocess.PIPE,
                    text=True,
                    env=os.environ.copy(),
                )
                name = proc.communicate(timeout=60)[0].strip()
                assert proc.returncode == 0
                enqueued = time.monotonic()
                t.join(30)
                # Polling (0.1 s) delivers at once; a native watch would hear nothing and
                # the entry would only turn up at the dequeue's last listing (20 s).
                assert time.monotonic() - enqueued < 5.0, "not woken by the observer"
                co = got[0] if got else None
                assert co is not None, "entry enqueued through m1 never reached the reader on m2"
                assert (co.name, co.contents, co.data_file.load()) == (name, Cog(n=7), b"through m1")
                co.remove()
            finally:
                reader.close()
                t.join(30)
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
