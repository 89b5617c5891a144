"""A reader on one FUSE mount receives entries enqueued through another mount of the same
directory: there, native events never fire, so `observer="auto"` must choose polling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Cog, Queue
from test_watch import bindfs_mount, ensure_bindfs

import multispool

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
            code = PRODUCER.format(tests=str(Path(__file__).parent))
            proc = subprocess.Popen(
                [sys.executable, "-c", code, str(m1 / "spool")],
                stdout=subprocess.PIPE,
                text=True,
                env=os.environ.copy(),
            )
            try:
                name = proc.communicate(timeout=60)[0].strip()
                assert proc.returncode == 0
                co = reader.dequeue(timeout=15)
                assert co is not None, "entry enqueued through m1 never reached the reader on m2"
                assert (co.name, co.contents, co.data_file.load()) == (name, Cog(n=7), b"through m1")
                co.remove()
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
