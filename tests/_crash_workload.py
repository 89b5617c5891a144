"""The workload the crash-model checker traces (run under ``strace -f`` by _crashmodel).

    python _crash_workload.py SPOOL ACKS DURABILITY WORKERS ROUNDS

Forks WORKERS processes that each run ROUNDS rounds of every operation of the library on
their own entries (``enqueue_many`` too where the library has it, and enqueues from two
threads at once), concurrently (so one worker's fsyncs of a queue land between another's
renames). Every operation writes a ``begin`` record to ACKS before it starts and an ``end``
record after it returned, one ``write(2)`` each on an O_APPEND descriptor: the checker
reads them back from the trace, so it knows which operations were acknowledged at every
crash point. Records are JSON: ``op``, ``w`` (worker), ``id`` (the entry's id, in its
metadata), ``name``, and what the entry must look like after the operation (``queue``,
``meta``, ``data``; ``gone`` for removals).
"""

from __future__ import annotations

import enum
import json
import os
import sys
import threading
import time
from typing import Any

import multispool


class Q(enum.Enum):
    A = "a"
    B = "b"


def spoolable(durability: str) -> multispool.Spoolable[bytes]:
    return multispool.Spoolable(queues=Q, durability=durability)  # type: ignore[arg-type]


class Acks:
    def __init__(self, path: str, worker: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.w = worker

    def rec(self, phase: str, op: str, **kw: Any) -> None:
        line = json.dumps({"phase": phase, "op": op, "w": self.w, **kw}, sort_keys=True) + "\n"
        os.write(self.fd, line.encode())


def _meta(ident: str, version: int) -> dict[str, Any]:
    return {"id": ident, "v": version}


def run_worker(spool_dir: str, acks_path: str, durability: str, w: int, rounds: int) -> None:
    spool = multispool.Spool.load(spool_dir, spoolable(durability))
    acks = Acks(acks_path, w)

    def enqueue(q: Q, ident: str, data: bytes, use: str | None = None) -> multispool.Entry[bytes]:
        m = _meta(ident, 0)
        acks.rec("begin", "enqueue", id=ident, name=use, queue=q.value, meta=m, data=data.decode())
        e = spool.enqueue(q, m, data, use=use)
        acks.rec("end", "enqueue", id=ident, name=e.name, queue=q.value, meta=m, data=data.decode())
        return e

    def checkout(q: Q, e: multispool.Entry[bytes], ident: str) -> multispool.CheckedOutEntry[bytes]:
        acks.rec("begin", "checkout", id=ident, name=e.name)
        # Another worker's recover_checkouts may be moving it back right now: wait for it.
        deadline = time.monotonic() + 30
        while (co := spool.checkout_if_found(multispool.Entry(spool, q, e.name))) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cannot check out {e.name}")
        acks.rec("end", "checkout", id=ident, name=e.name)
        return co

    # The entries spooled for this worker before the trace started (durable): one saved
    # into B, one removed, so a crash may show a Save or a removal undone.
    with open(acks_path) as f:
        pre = {r["id"]: r["name"] for r in map(json.loads, f) if r["phase"] == "end" and r["w"] == w}
    p0 = multispool.Entry(spool, Q.A, pre[f"w{w}p0"])
    co = checkout(Q.A, p0, f"w{w}p0")
    m = _meta(f"w{w}p0", 1)
    acks.rec("begin", "save", id=f"w{w}p0", name=p0.name, queue="b", meta=m)
    co.contents = m
    co.save(Q.B)
    acks.rec("end", "save", id=f"w{w}p0", name=p0.name, queue="b", meta=m)
    p1 = multispool.Entry(spool, Q.A, pre[f"w{w}p1"])
    co = checkout(Q.A, p1, f"w{w}p1")
    acks.rec("begin", "remove", id=f"w{w}p1", name=p1.name)
    co.remove()
    acks.rec("end", "remove", id=f"w{w}p1", name=p1.name)

    for r in range(rounds):
        tag = f"w{w}r{r}"
        # enqueue, and enqueue with a reserved name
        x = enqueue(Q.A, f"{tag}x", f"data {tag}x".encode())
        name = spool.reserve_name()
        y = enqueue(Q.A, f"{tag}y", f"data {tag}y".encode(), use=name)

        # checkout X; while it is out, another enqueue fsyncs its queue (issue 12, case 2);
        # then update its data and save it, with new metadata, into B (case 1)
        co = checkout(Q.A, x, f"{tag}x")
        z = enqueue(Q.A, f"{tag}z", f"data {tag}z".encode())
        newdata = f"new data {tag}x".encode()
        acks.rec("begin", "data_save", id=f"{tag}x", name=x.name, data=newdata.decode())
        co.data_file.save(newdata)
        acks.rec("end", "data_save", id=f"{tag}x", name=x.name, data=newdata.decode())
        m = _meta(f"{tag}x", 1)
        acks.rec("begin", "save", id=f"{tag}x", name=x.name, queue="b", meta=m)
        co.contents = m
        co.save(Q.B)
        acks.rec("end", "save", id=f"{tag}x", name=x.name, queue="b", meta=m)

        # checkout Y and release it; then rewrite its metadata in place (direct update)
        co = checkout(Q.A, y, f"{tag}y")
        acks.rec("begin", "release", id=f"{tag}y", name=y.name)
        co.release()
        acks.rec("end", "release", id=f"{tag}y", name=y.name)
        m = _meta(f"{tag}y", 1)
        acks.rec("begin", "direct_save", id=f"{tag}y", name=y.name, meta=m)
        y.direct.save(m)
        acks.rec("end", "direct_save", id=f"{tag}y", name=y.name, meta=m)

        # checkout Y and remove it; direct remove of Z
        co = checkout(Q.A, y, f"{tag}y")
        acks.rec("begin", "remove", id=f"{tag}y", name=y.name)
        co.remove()
        acks.rec("end", "remove", id=f"{tag}y", name=y.name)
        acks.rec("begin", "remove", id=f"{tag}z", name=z.name)
        z.direct.remove()
        acks.rec("end", "remove", id=f"{tag}z", name=z.name)

        # X saved into its own queue (B -> B) with new metadata
        co = checkout(Q.B, x, f"{tag}x")
        m = _meta(f"{tag}x", 2)
        acks.rec("begin", "save", id=f"{tag}x", name=x.name, queue="b", meta=m)
        co.contents = m
        co.save(Q.B)
        acks.rec("end", "save", id=f"{tag}x", name=x.name, queue="b", meta=m)

        # a consumer killed while holding X, and a producer killed after reserving a name;
        # then recovery and clean_abandoned
        pid = os.fork()
        if pid == 0:
            checkout(Q.B, x, f"{tag}x")
            spool.reserve_name()
            os._exit(0)
        os.waitpid(pid, 0)
        acks.rec("begin", "recover", id=f"{tag}x", name=x.name)
        recovered = spool.recover_checkouts(Q.B)
        # Another worker's recovery may have moved X (then its recovery is in flight, and
        # this one is not acknowledged).
        if x in recovered:
            acks.rec("end", "recover", id=f"{tag}x", name=x.name)
        spool.clean_abandoned(older_than=0)

        # X drained: checkout and remove
        co = checkout(Q.B, x, f"{tag}x")
        acks.rec("begin", "remove", id=f"{tag}x", name=x.name)
        co.remove()
        acks.rec("end", "remove", id=f"{tag}x", name=x.name)

        # one entry left queued at the end of each round
        enqueue(Q.B, f"{tag}k", f"data {tag}k".encode())

        # concurrent enqueues from threads of one process (group commit, where there is one)
        threads = [
            threading.Thread(target=enqueue, args=(Q.A, f"{tag}t{i}", f"data {tag}t{i}".encode()))
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        # a batch, where the library has enqueue_many
        many = getattr(spool, "enqueue_many", None)
        if many is not None:
            items = [(f"{tag}m{i}", _meta(f"{tag}m{i}", 0), f"data {tag}m{i}") for i in range(2)]
            for ident, m, d in items:
                acks.rec("begin", "enqueue", id=ident, name=None, queue="a", meta=m, data=d)
            entries = many(Q.A, [(m, d.encode()) for _, m, d in items])
            for (ident, m, d), e in zip(items, entries, strict=True):
                acks.rec("end", "enqueue", id=ident, name=e.name, queue="a", meta=m, data=d)


def main(argv: list[str]) -> int:
    spool_dir, acks_path, durability, workers, rounds = argv
    pids = []
    for w in range(int(workers)):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run_worker(spool_dir, acks_path, durability, w, int(rounds))
            except BaseException as e:
                print(f"worker {w}: {type(e).__name__}: {e}", file=sys.stderr)
                code = 1
            os._exit(code)
        pids.append(pid)
    rc = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        rc |= 0 if status == 0 else 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
