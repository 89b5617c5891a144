"""A spool shared by a group of users: every member may enqueue, consume and repair.

    umask 007; python examples/shared_spool.py SPOOL_DIR [--group GROUP]

Creates SPOOL_DIR owned by GROUP (default: your primary group) with the set-group-ID bit,
so every file and directory created below it belongs to GROUP whoever creates it; opens
the spool with ``file_mode=0o660, dir_mode=0o2770`` so members can read and rename each
other's entries; enqueues one entry and prints the mode and group of everything.

The process umask still applies to what the library creates: run producers and consumers
with a umask that keeps group bits (``umask 007``, or ``UMask=0007`` in a systemd unit).
"""

from __future__ import annotations

import argparse
import grp
import os
import stat

from jobs import Job, Queue

import multispool

SHARED = multispool.Spoolable(queues=Queue, metadata=Job, file_mode=0o660, dir_mode=0o2770)


def make_shared_dir(path: str, gid: int) -> None:
    """Create ``path`` (if missing) owned by ``gid``, mode 2770 (rwx for owner and group,
    set-group-ID so that what is created inside inherits the group)."""
    os.makedirs(path, mode=0o770, exist_ok=True)
    os.chown(path, -1, gid)  # allowed for the owner when the owner is a member of gid
    os.chmod(path, 0o2770)  # chmod, unlike mkdir, is not reduced by the umask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spool", help="spool directory to create or open")
    parser.add_argument("--group", help="group sharing the spool (default: your primary group)")
    args = parser.parse_args()

    umask = os.umask(0)
    os.umask(umask)  # only read it
    if umask & 0o070:
        print(f"warning: umask {umask:03o} removes group permissions; run with umask 007", flush=True)

    gid = grp.getgrnam(args.group).gr_gid if args.group else os.getgid()
    make_shared_dir(args.spool, gid)
    spool = multispool.Spool.create(args.spool, SHARED)
    spool.enqueue(Queue.INCOMING, Job(url="https://example.org/shared", number=1), b"shared payload")

    for dirpath, _dirnames, filenames in sorted(os.walk(args.spool)):
        for name in [".", *sorted(filenames)]:
            path = os.path.join(dirpath, name) if name != "." else dirpath
            st = os.lstat(path)
            rel = os.path.relpath(path, args.spool)
            print(f"{stat.filemode(st.st_mode)} {grp.getgrgid(st.st_gid).gr_name} {rel}", flush=True)


if __name__ == "__main__":
    main()
