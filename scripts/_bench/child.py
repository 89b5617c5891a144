"""What runs in a measured child process: ``python -m _bench child JSON``. Every
measurement gets a fresh interpreter, so no system's state or imports leak into another's.
Results go to stdout as lines (``ready``, ``got SEQ T_NS``) or one final JSON line."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from .systems import get_system


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def throughput(a: dict[str, Any]) -> dict[str, Any]:
    """For each mode: enqueue for ``seconds`` (at most ``max_entries``) into a fresh queue,
    then drain it all."""
    sys_ = get_system(a["system"])
    out: dict[str, Any] = {}
    for mode in sys_.modes:
        d = os.path.join(a["dir"], mode)
        os.makedirs(d)
        sys_.create(d)
        p = sys_.producer(d, mode)
        n = 0
        t0 = time.perf_counter()
        end = t0 + a["seconds"]
        while True:
            p.put(n)
            n += 1
            if n >= a["max_entries"] or (n % 8 == 0 and time.perf_counter() >= end):
                break
        t_enq = time.perf_counter() - t0
        p.close()
        c = sys_.consumer(d, mode, sys_.waits[-1])
        got = 0
        t0 = time.perf_counter()
        while c.get_nowait() is not None:
            got += 1
        t_drain = time.perf_counter() - t0
        c.close()
        out[mode] = {"n": n, "got": got, "enqueue": n / t_enq, "drain": got / t_drain}
    return out


def consume(a: dict[str, Any]) -> None:
    """Wait for entries the variant's way; report each as ``got SEQ T_NS`` (T_NS taken
    right after the claim + remove returned). ``count`` 0: one long idle wait."""
    sys_ = get_system(a["system"])
    variant = sys_.waits[a["variant"]]
    c = sys_.consumer(a["dir"], a["mode"], variant)
    _say("ready")
    if a["count"] == 0:
        c.wait(a["deadline"])
        return
    deadline = time.monotonic() + a["deadline"]
    got = 0
    while got < a["count"] and time.monotonic() < deadline:
        seq = c.wait(min(2.0, max(0.0, deadline - time.monotonic())))
        if seq is not None:
            _say(f"got {seq} {time.time_ns()}")
            got += 1
    c.close()


def drain_competing(a: dict[str, Any]) -> dict[str, Any]:
    """One of several competing consumers: wait for the go file, then claim + remove until
    the queue stays empty."""
    sys_ = get_system(a["system"])
    # the system's natural consumer (multispool: a reader), asked without waiting
    c = sys_.consumer(a["dir"], a["mode"], sys_.waits[a.get("variant", 0)])
    _say("ready")
    while not os.path.exists(a["go"]):
        time.sleep(0.001)
    t0 = time.time()
    seqs: list[int] = []
    errors: list[str] = []
    empty = 0
    t_last = t0
    while empty < 3:
        try:
            seq = c.get_nowait()
        except Exception as e:  # a peer failing under contention is a result, not a crash
            errors.append(f"{type(e).__name__}: {e}"[:200])
            if len(errors) > 50:
                break
            continue
        if seq is None:
            empty += 1
            time.sleep(0.005)
        else:
            empty = 0
            seqs.append(seq)
            t_last = time.time()
    return {"t0": t0, "t_end": t_last, "seqs": seqs, "errors": errors[:5], "n_errors": len(errors)}


def paired(a: dict[str, Any]) -> dict[str, Any]:
    """multispool and the floor in alternating blocks of ``block`` operations, in one
    process: both see the same moment of the machine's (shared) disk and CPU, so the
    ratio of the two is far steadier than two separate runs' rates."""
    ms, fl = get_system("multispool"), get_system("floor")
    out: dict[str, Any] = {}
    blk = a["block"]
    for mode in ("durable", "non-durable"):
        prods, cons, rates = {}, {}, {"enqueue": {}, "drain": {}}  # type: ignore[var-annotated]
        for s in (ms, fl):
            d = os.path.join(a["dir"], f"{s.name}-{mode}")
            os.makedirs(d)
            s.create(d)
            prods[s.name] = s.producer(d, mode)
            prods[s.name].put(-1)  # first use outside the timing
            cons[s.name] = s.consumer(d, mode, s.waits[-1])
            for k in rates:
                rates[k][s.name] = []
        seq = 0
        for b in range(a["blocks"]):
            for s in ((ms, fl) if b % 2 == 0 else (fl, ms)):
                t0 = time.perf_counter()
                for _ in range(blk):
                    prods[s.name].put(seq)
                    seq += 1
                rates["enqueue"][s.name].append(blk / (time.perf_counter() - t0))
        for b in range(a["blocks"]):
            for s in ((ms, fl) if b % 2 == 0 else (fl, ms)):
                t0 = time.perf_counter()
                for _ in range(blk):
                    if cons[s.name].get_nowait() is None:
                        raise RuntimeError(f"{s.name}: queue ran dry in the paired drain")
                rates["drain"][s.name].append(blk / (time.perf_counter() - t0))
        for s in (ms, fl):
            prods[s.name].close()
            cons[s.name].close()
        out[mode] = rates
    return out


AUDIT_START = b"--bench-audit-start--"
AUDIT_END = b"--bench-audit-end--"


def audit(a: dict[str, Any]) -> None:
    """Enqueue ``n`` entries between two markers written to stderr (fd 2), for strace."""
    sys_ = get_system(a["system"])
    d = a["dir"]
    sys_.create(d)
    p = sys_.producer(d, a["mode"])
    p.put(-1)  # first-use work (directories, schema) stays outside the markers
    os.write(2, AUDIT_START)
    for i in range(a["n"]):
        p.put(i)
    os.write(2, AUDIT_END)
    p.close()


def main(arg: str) -> None:
    a = json.loads(arg)
    if a.get("lib"):  # measure another snapshot of the library (runner's --baseline-ref)
        sys.path.insert(0, a["lib"])
    what = a["what"]
    if what == "throughput":
        _say(json.dumps(throughput(a)))
    elif what == "consume":
        consume(a)
    elif what == "paired":
        _say(json.dumps(paired(a)))
    elif what == "audit":
        audit(a)
    elif what == "batch":
        from .batch import child as batch_child

        _say(json.dumps(batch_child(a)))
    elif what == "drain_competing":
        _say(json.dumps(drain_competing(a)))
    else:
        raise SystemExit(f"unknown child job {what!r}")
