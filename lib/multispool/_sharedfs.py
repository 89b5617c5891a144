"""What the filesystem holding a spool can be trusted with, for the decisions that differ
on shared (network, FUSE) filesystems:

* ``verify_renames``: a client whose name cache is stale may resolve an old name to the
  inode now at the rename's destination; the kernel then sees a rename of a file onto
  itself and returns success without moving anything. Where that can happen, a rename
  that matters (a claim, a recovery, a save) is checked afterwards: its source must be
  gone.
* ``locks_shared``: whether an owner lock taken through this mount is seen by every
  process that can reach the spool (through other mounts or hosts), so that a free lock
  proves the owner died. Only then may ``recover_checkouts`` trust the lock alone.

See docs/shared-filesystems.md for which filesystems are trusted and why.
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass
from typing import Final

from . import _watch

TRUST_ENV: Final = "MULTISPOOL_TRUST_LOCKS"

# Network filesystems whose Linux client forwards flock to a server that arbitrates every
# client, unless a mount option keeps locks local (checked in _locks_shared).
_SHARED_LOCK_TYPES: Final = frozenset({"glusterfs", "fuse.glusterfs", "nfs", "nfs4", "cifs", "smb3", "ceph"})


@dataclass(frozen=True)
class FsFacts:
    fstype: str
    mount_point: str
    remote: bool
    locks_shared: bool
    reason: str

    @property
    def verify_renames(self) -> bool:
        return self.remote


def facts(path: str) -> FsFacts:
    """What the filesystem holding ``path`` is and can be trusted with (see module doc).
    A filesystem that cannot be identified is taken for a local one, as the observer
    choice does."""
    try:
        found = _mount(path)
    except OSError as e:
        return FsFacts("?", "?", False, True, f"could not identify the filesystem of {path!r} ({e})")
    if found is None:
        return FsFacts("?", "?", False, True, f"cannot identify filesystems on {sys.platform}")
    fstype, mount_point, options = found
    remote = _watch._is_remote(fstype)
    shared, why = _locks_shared(fstype, options, remote)
    where = f"{path!r} is on {fstype} (mounted at {mount_point!r})"
    if os.environ.get(TRUST_ENV, "").strip() == "1" and not shared:
        shared, why = True, f"{TRUST_ENV}=1 says every process uses this one mount ({why})"
    return FsFacts(fstype, mount_point, remote, shared, f"{where}: {why}")


def _locks_shared(fstype: str, options: frozenset[str], remote: bool) -> tuple[bool, str]:
    if not remote:
        return True, "a local filesystem, where one kernel holds every lock"
    name = fstype.lower()
    if name not in _SHARED_LOCK_TYPES:
        return False, (
            "locks on this filesystem are not known to be shared between its mounts or clients "
            "(FUSE pass-throughs such as bindfs and sshfs, 9p, virtiofs... lock in the local kernel)"
        )
    if name.startswith("nfs"):
        local = [o for o in options if o == "nolock" or o in ("local_lock=all", "local_lock=flock")]
        if local:
            return False, f"NFS mounted with {','.join(sorted(local))}: locks stay on this client"
        return True, "NFS with network locks (NLM or NFSv4): the server arbitrates every client"
    if name in ("cifs", "smb3") and "nobrl" in options:
        return False, "CIFS mounted with nobrl: locks stay on this client"
    return True, f"{fstype} forwards locks to its server, which arbitrates every client"


def _mount(path: str) -> tuple[str, str, frozenset[str]] | None:
    """``(fstype, mount point, mount and superblock options)`` for ``path``; None where the
    platform offers no way to ask. Falls back to the observer's identification (no
    options) off Linux or without /proc."""
    real = _watch._existing_ancestor(path)
    if sys.platform.startswith("linux"):
        try:
            return _linux_mountinfo(real)
        except OSError:
            pass
    found = _watch._filesystem_type(path)
    if found is None:
        return None
    return found[0], found[1], frozenset()


def _linux_mountinfo(real: str) -> tuple[str, str, frozenset[str]]:
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    best: tuple[str, str, frozenset[str]] | None = None
    best_len = -1
    for line in lines:
        # "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - nfs host:/x rw,vers=3,nolock"
        before, sep, after = line.partition(b" - ")
        fields = before.split()
        rest = after.split()
        if not sep or len(fields) < 6 or not rest:
            continue
        mount_point = _watch._unescape_mountinfo(fields[4])
        matches = mount_point == "/" or real == mount_point or real.startswith(mount_point + "/")
        if matches and len(mount_point) >= best_len:
            opts = fields[5].split(b",") + (rest[2].split(b",") if len(rest) > 2 else [])
            best = (os.fsdecode(rest[0]), mount_point, frozenset(os.fsdecode(o) for o in opts))
            best_len = len(mount_point)
    if best is None:
        raise OSError(errno.ENOENT, f"no mount point in /proc/self/mountinfo contains {real!r}")
    return best
