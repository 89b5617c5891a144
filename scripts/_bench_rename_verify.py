"""What verifying a claim's rename (one lstat of the source, see _fs.rename_verified) would
cost on a local disk, where multispool skips it: claim+remove with and without it, paired
in alternating chunks so that machine load affects both alike.

    .venv/bin/python scripts/_bench_rename_verify.py [--dir DIR] [--rounds 40] [--chunk 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import statistics
import tempfile
import time

import multispool


class Q(enum.Enum):
    WORK = "work"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--durability", default="none", choices=["none", "file", "full"])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        sp = multispool.Spoolable(queues=Q, metadata=int, durability=a.durability)
        spool = multispool.Spool.create(f"{d}/spool", sp)
        base = spool._fs_facts()
        per: dict[bool, list[float]] = {False: [], True: []}
        for r in range(a.rounds):
            for verify in (False, True) if r % 2 else (True, False):
                spool._facts = dataclasses.replace(base, remote=verify)
                entries = [spool.enqueue(Q.WORK, i, b"x") for i in range(a.chunk)]
                t = time.perf_counter()
                for e in entries:
                    co = spool.checkout_if_found(e)
                    assert co is not None
                    co.remove()
                per[verify].append((time.perf_counter() - t) / a.chunk * 1e6)
        off, on = statistics.median(per[False]), statistics.median(per[True])
        diffs = [b - x for x, b in zip(per[False], per[True], strict=True)]
        print(f"{base.reason}; durability={a.durability}, {a.rounds} rounds x {a.chunk} claims")
        print(f"claim+remove median: {off:.1f} us unverified, {on:.1f} us verified")
        diff = statistics.median(diffs)
        print(f"paired difference median: {diff:+.1f} us ({diff / off:+.1%})")


if __name__ == "__main__":
    main()
