"""``SPOOL/.lost+found/``: where repair puts what it cannot put back into a queue.

Repair never deletes data. Files of an abandoned enqueue, files with no registry file,
duplicates that differ from the copy kept, stale ``.tmp`` files: each goes, by rename(2),
into its own directory ``.lost+found/ITEM/`` (ITEM is the entry name, with ``.1``, ``.2``...
appended when taken), under a label saying what it was:

    metadata        the entry's metadata (from .tmp/NAME)
    data            the entry's data payload (from .data/NAME)
    QUEUE           metadata found in queue dir QUEUE (an orphan, or a differing duplicate);
                    QUEUE.queue for a queue named "metadata" or "data"
    QUEUE.checkout  metadata found in QUEUE/.checkout

A label already used in the item (queue "a"'s checkout dir and a queue named
"a.checkout") gets ``.1``, ``.2``... appended: nothing is renamed over another file.

A person inspects them (``multispool status``/``fsck`` count them) and puts an item back
into a queue with ``requeue`` (``multispool lost+found DIR ITEM --to QUEUE``), or deletes
the directory. Under durability "full" the move is durable before the source disappears
(the destination is fsynced first, as every move of the life-cycle table).
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import _fs
from ._errors import EntryNotFoundError, SpoolError
from ._layout import CHECKOUT, LOST_FOUND, Layout

if TYPE_CHECKING:
    from ._spool import Entry, Spool

METADATA = "metadata"
DATA = "data"
# The directory mke2fs makes at the root of an ext2/3/4 filesystem, for e2fsck: not the
# spool's .lost+found, and no queue, in a spool made at the root of a filesystem.
FS_LOST_FOUND = "lost+found"


def is_fs_lost_found(spool_dir: str, name: str) -> bool:
    """True if directory ``name`` of the spool is the filesystem's ``lost+found``, which
    is no queue: so named, and without a ``.checkout`` in it, or one its user cannot
    look into (it is root's, mode 0700). A queue named so has its ``.checkout``."""
    if name != FS_LOST_FOUND:
        return False
    try:
        st = os.lstat(os.path.join(spool_dir, name, CHECKOUT))
    except FileNotFoundError:
        return True
    except PermissionError:
        return True
    return not stat.S_ISDIR(st.st_mode)


def put_aside(
    lay: Layout, name: str, files: Sequence[tuple[str, str]], *, sync: bool, mode: int = 0o700
) -> str | None:
    """Move the existing ``files`` ((path, label) pairs) into a fresh ``.lost+found/ITEM/``
    (directories made with ``mode``, the Spoolable's ``dir_mode``); the item's path, or
    None if none of the files exists. The caller holds the entry's owner lock (or its
    registry name reserved), so nobody else moves these files."""
    present = [(p, label) for p, label in files if os.path.lexists(p)]
    if not present:
        return None
    root = lay.lost_found
    _fs.mkdir_durable(root, mode, sync=sync)
    item = _fresh_dir(root, name, mode)
    if sync:
        _fs.fsync_dir(root)
    used: set[str] = set()
    for path, label in present:
        # Never over a file already put into the item: rename(2) would replace it.
        free, k = label, 0
        while free in used:
            k += 1
            free = f"{label}.{k}"
        used.add(free)
        os.rename(path, os.path.join(item, free))
    if sync:
        _fs.fsync_dir(item)
        for d in sorted({os.path.dirname(p) for p, _ in present}):
            _fs.fsync_dir(d)
    return item


def queue_label(dirname: str, checkout: bool = False) -> str:
    """The label of metadata found in queue dir ``dirname``, or in its checkout dir."""
    if checkout:
        return f"{dirname}.checkout"
    # A queue named "metadata" or "data": its file must not pass for (or replace) the one
    # put aside from .tmp or .data.
    return f"{dirname}.queue" if dirname in (METADATA, DATA) else dirname


def same_file(a: str, b: str) -> bool:
    """True if ``a`` and ``b`` are links of one file or hold the same bytes."""
    try:
        return _fs.same_inode(a, b) or _fs.read_file(a) == _fs.read_file(b)
    except OSError:
        return False


def _fresh_dir(root: str, name: str, mode: int) -> str:
    for k in range(100_000):
        p = os.path.join(root, name if k == 0 else f"{name}.{k}")
        try:
            os.mkdir(p, mode)
        except FileExistsError:
            continue
        return p
    raise SpoolError(f"no free item name for {name!r} in {root}")


def items(spool_dir: str) -> list[str]:
    """The items in ``SPOOL/.lost+found/``, sorted (empty if it does not exist)."""
    try:
        return sorted(os.listdir(os.path.join(spool_dir, LOST_FOUND)))
    except FileNotFoundError:
        return []


def requeue(spool: Spool[Any, Any], item: str, queue: enum.Enum) -> Entry[Any, Any]:
    """Put lost+found ``item`` back into ``queue`` as a new entry (a fresh name): its
    metadata (``metadata``, else the one queue-labelled file) and its data (``data``,
    else empty) are renamed into place, then the item directory is removed. The
    metadata is not decoded: a bad one is the reader's corrupt entry, as any other."""
    from ._spool import Entry

    lay = spool._layout
    sp = spool.spoolable
    if "/" in item or "\0" in item or item in ("", ".", ".."):
        raise ValueError(f"not a lost+found item: {item!r}")
    d = os.path.join(lay.lost_found, item)
    # Never through a symlink: a planted link (as the item, or as .lost+found itself)
    # would make the renames below move files from wherever it points into the spool.
    for p in (lay.lost_found, d):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise EntryNotFoundError("no such lost+found item", d) from None
        if not stat.S_ISDIR(st.st_mode):
            raise SpoolError(f"{p}: not a lost+found directory (symlinks are not followed)")
    labels = set(os.listdir(d))
    if METADATA in labels:
        meta_label = METADATA
    else:
        others = sorted(labels - {DATA})
        if len(others) != 1:
            raise SpoolError(f"{d}: cannot tell which file is the metadata ({sorted(labels)})")
        meta_label = others[0]
    moving = [meta_label, *([DATA] if DATA in labels else [])]
    for label in moving:
        p = os.path.join(d, label)
        if not stat.S_ISREG(os.lstat(p).st_mode):
            raise SpoolError(f"{p}: not a regular file (symlinks are not followed)")
    full = sp.durability == "full"
    dirname = sp.dirname(queue)
    from ._spool import _Claim

    with sp.throttled():
        owner = _Claim(None)
        name = spool._reserve(None, owner)
        # (path in the item, where it goes): on failure, what was moved goes back.
        placed: list[tuple[str, str]] = []
        try:
            tmp = lay.tmp_file(name)
            os.rename(os.path.join(d, meta_label), tmp)
            placed.append((os.path.join(d, meta_label), tmp))
            if DATA in labels:
                os.rename(os.path.join(d, DATA), lay.data_file(name))
                placed.append((os.path.join(d, DATA), lay.data_file(name)))
            else:
                _fs.write_file(lay.data_file(name), b"", sync=full, mode=sp.file_mode)
            if full:
                _fs.fsync_dir(lay.data)
            os.rename(tmp, lay.queue_file(dirname, name))
        except BaseException:
            # Back into the item, and the name unreserved: left as an abandoned
            # enqueue, clean_abandoned would delete what repair kept aside.
            try:
                for back, now in reversed(placed):
                    os.rename(now, back)
                if DATA not in labels:
                    _fs.unlink_quiet(lay.data_file(name))
                _fs.unlink_quiet(lay.registry_file(name))
            finally:
                owner.release()
            raise
        try:
            if full:
                _fs.fsync_dir(lay.queue(dirname))
        finally:
            owner.release()
        if not os.listdir(d):
            os.rmdir(d)
        if full:
            _fs.fsync_dir(lay.lost_found)
    return Entry._trusted(spool, queue, name)
