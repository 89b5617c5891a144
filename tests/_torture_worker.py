"""Worker program of the torture test (tests/test_torture.py); not a test module.

    python tests/_torture_worker.py producer SPOOL LOGFILE
    python tests/_torture_worker.py consumer SPOOL LOGFILE STAGE      (STAGE 1 or 2)

Runs until killed (the test SIGKILLs workers at random points). Every line of LOGFILE is
written with one O_APPEND write and fsynced, so a line is either whole or absent:

    producer   "E <id>"   after enqueue RETURNED
    stage 1    "S1 <id>"  after checkout, before save;   "D1 <id>" after save(QUEUE2) returned
    stage 2    "S2 <id>"  after checkout, before remove; "D2 <id>" after remove() returned
    stage 1    "REDO <id>" the entry came back to QUEUE1 with stage-2 metadata (its
               consumer died inside save, between the metadata rewrite and the move)
    any        "BAD <id> <why>"  data or metadata not what the producer wrote

Metadata carries the unique id and a CRC of the data; consumers check both.
"""

from __future__ import annotations

import enum
import os
import random
import sys
import time
import zlib
from typing import Any

import multispool


class Queue(enum.Enum):
    QUEUE1 = "queue1"
    QUEUE2 = "queue2"
    QUEUE3 = "queue3"


# durability="none": a SIGKILL loses nothing the page cache holds (power loss is not
# simulated here), and fsyncs would only slow the interleavings down.
SPOOLABLE: multispool.Spoolable[Any, bytes] = multispool.Spoolable(queues=Queue, durability="none")
# Consumers clean abandoned enqueues older than this on start (and now and then): small,
# so the test sees it happen, but far above one enqueue's duration.
CLEAN_OLDER_THAN = 1.0
BACKLOG = 300  # producers pause while QUEUE1 holds more than this


class Log:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def line(self, *words: str) -> None:
        os.write(self.fd, (" ".join(words) + "\n").encode())
        os.fsync(self.fd)


def produce(spool: multispool.Spool[Any, bytes], log: Log) -> None:
    rng = random.Random()
    base = f"{os.getpid()}-{rng.getrandbits(32):08x}"
    qdir = os.path.join(spool.dir, Queue.QUEUE1.value)
    n = 0
    while True:
        if n % 20 == 0:
            while len(os.listdir(qdir)) > BACKLOG:
                time.sleep(0.02)
        uid = f"{base}-{n}"
        data = rng.randbytes(rng.choice((0, 10, 100, 5000)))
        spool.enqueue(Queue.QUEUE1, {"id": uid, "crc": zlib.crc32(data), "stage": 1}, data)
        log.line("E", uid)
        n += 1


def _check(meta: Any, data: bytes, stage: int) -> str | None:
    if not isinstance(meta, dict) or "id" not in meta:
        return f"metadata {meta!r}"
    if meta.get("stage") != stage:
        return f"stage {meta.get('stage')!r}, expected {stage}"
    if zlib.crc32(data) != meta.get("crc"):
        return "data crc mismatch"
    return None


def consume(spool: multispool.Spool[Any, bytes], log: Log, stage: int) -> None:
    queue = Queue.QUEUE1 if stage == 1 else Queue.QUEUE2
    last_recovery = 0.0
    while True:
        if time.monotonic() - last_recovery > 2.0:
            spool.recover_checkouts()
            spool.clean_abandoned(older_than=CLEAN_OLDER_THAN)
            last_recovery = time.monotonic()
        busy = False
        for entry in spool.list(queue):
            co = spool.checkout_if_found(entry)
            if co is None:
                continue
            busy = True
            meta = co.contents
            uid = str(meta.get("id")) if isinstance(meta, dict) else "?"
            redo = stage == 1 and isinstance(meta, dict) and meta.get("stage") == 2
            if redo:
                # A stage-1 consumer was killed inside save(QUEUE2) after the new metadata
                # replaced the checkout file but before the move: recovery put the entry
                # back in QUEUE1 carrying the new metadata. Documented; the test checks it.
                log.line("REDO", uid)
            why = _check(meta, co.data_file.load(), 2 if redo else stage)
            if why is not None:
                log.line("BAD", uid, why.replace(" ", "_"))
            log.line(f"S{stage}", uid)
            if stage == 1:
                co.contents = {**meta, "stage": 2}
                co.save(Queue.QUEUE2)
            else:
                co.remove()
            log.line(f"D{stage}", uid)
        if not busy:
            time.sleep(0.005)  # idle: nothing to claim right now


def main(argv: list[str]) -> None:
    role, spool_dir, log_path = argv[1:4]
    spool = multispool.Spool.load(spool_dir, SPOOLABLE)
    log = Log(log_path)
    if role == "producer":
        produce(spool, log)
    elif role == "consumer":
        consume(spool, log, int(argv[4]))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv)
