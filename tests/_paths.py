"""The whole path a system call reached, for tests that watch or fault-inject ``os``
calls: the library reaches a spool's files through the descriptors of its directories
(``os.rename(name, name2, src_dir_fd=fd, dst_dir_fd=fd2)``, ``os.open(name, flags,
dir_fd=fd)``), so a fake that matches paths resolves them here first. The fault it
injects, and the call it injects it at, stay what they were."""

from __future__ import annotations

import os
from typing import Any


def full(path: Any, dir_fd: int | None = None) -> str:
    """The path ``path`` names, relative to directory descriptor ``dir_fd`` (None: the
    cwd, as ``os``'s calls); a descriptor given as ``path`` is resolved too."""
    if isinstance(path, int):
        return os.readlink(f"/proc/self/fd/{path}")
    p = os.fsdecode(os.fspath(path))
    if p.startswith("/proc/self/fd/"):
        # A spool directory listed through its held descriptor: the directory itself.
        fd, _, rest = p[len("/proc/self/fd/") :].partition("/")
        if fd.isdigit():
            d = os.readlink(f"/proc/self/fd/{fd}")
            return os.path.join(d, rest) if rest else d
    if dir_fd is None or os.path.isabs(p):
        return p
    d = os.readlink(f"/proc/self/fd/{dir_fd}")
    return d if p == "." else os.path.join(d, p)


def src_dst(src: Any, dst: Any, kw: dict[str, Any]) -> tuple[str, str]:
    """The whole paths of an ``os.rename``/``os.replace``/``os.link`` call's two paths."""
    return full(src, kw.get("src_dir_fd")), full(dst, kw.get("dst_dir_fd"))


def open_fds() -> set[int]:
    """The descriptors this process has open, but for those spools hold for their
    directories (``_fs._dir_fds``: opened on first use, closed when the spool is
    collected, which may be in the middle of a test). A descriptor that leaks shows
    here, even at the number of a directory closed meanwhile."""
    from multispool import _fs

    # Less the listing's own descriptor (closed once it returns), whose number is the
    # lowest free one: a spool directory opened meanwhile moves it.
    # The held ones left out first: a process may hold hundreds (spools not yet
    # collected), and a look at each would make this the slowest step of a test.
    fds = {int(n) for n in os.listdir("/proc/self/fd")} - _fs._dir_fds
    return {fd for fd in fds if os.path.lexists(f"/proc/self/fd/{fd}")}
