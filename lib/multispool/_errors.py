"""The exceptions multispool raises for spool conditions.

Every error keeps its context in ``args`` so that it survives pickling (workers send
errors across processes) and exposes it as read-only properties.
"""

from __future__ import annotations

__all__ = [
    "CorruptEntryError",
    "EntryNotFoundError",
    "InvalidNameError",
    "NotASpoolError",
    "SpoolError",
]


class SpoolError(Exception):
    """Base of every error multispool raises for a spool condition."""


class NotASpoolError(SpoolError):
    """The directory is missing, is not a spool, or cannot be turned into one."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message, path)

    @property
    def path(self) -> str:
        """The directory in question."""
        return str(self.args[1])

    def __str__(self) -> str:
        return f"{self.args[0]}: {self.args[1]}"


class EntryNotFoundError(SpoolError, LookupError):
    """The entry is gone, or another process holds it."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message, path)

    @property
    def path(self) -> str | None:
        """The file that was looked for, when known."""
        p = self.args[1]
        return None if p is None else str(p)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args[1] is None else f"{self.args[0]}: {self.args[1]}"


class CorruptEntryError(SpoolError, ValueError):
    """Metadata that cannot be decoded. The file named by ``path`` is left in place."""

    def __init__(self, path: str, reason: str, *, quarantined_to: str | None = None) -> None:
        super().__init__(path, reason, quarantined_to)

    @property
    def path(self) -> str:
        """The metadata file that could not be decoded (left where it is, unless quarantined)."""
        return str(self.args[0])

    @property
    def reason(self) -> str:
        """What the decoder said."""
        return str(self.args[1])

    @property
    def quarantined_to(self) -> str | None:
        """Where the entry was moved when the Spoolable has a quarantine queue."""
        q = self.args[2]
        return None if q is None else str(q)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_corrupt, self.args)

    def __str__(self) -> str:
        msg = f"corrupt metadata in {self.args[0]}: {self.args[1]}"
        if self.args[2] is not None:
            msg += f" (moved to {self.args[2]})"
        return msg


def _rebuild_corrupt(path: str, reason: str, quarantined_to: str | None) -> CorruptEntryError:
    return CorruptEntryError(path, reason, quarantined_to=quarantined_to)


class InvalidNameError(SpoolError, ValueError):
    """An entry name that could escape or confuse the spool layout."""

    def __init__(self, name: object, reason: str) -> None:
        super().__init__(name, reason)

    @property
    def name(self) -> object:
        """The rejected name, as given."""
        return self.args[0]

    @property
    def reason(self) -> str:
        """Why it was rejected."""
        return str(self.args[1])

    def __str__(self) -> str:
        return f"invalid entry name {self.args[0]!r}: {self.args[1]}"


class _PublishedError(SpoolError, OSError):
    """An enqueue failed after some of its entries were published: they are in their
    queue (a consumer may have one already) and must not be enqueued again; their
    durability is unknown. ``published`` maps the index of each such item (0 for
    ``enqueue``) to its entry name. An ``OSError`` too, with the errno, message and
    paths of the failure (an OSError), so that a handler of the failure's kind still
    sees it; its ``__cause__`` is the failure. Private (API.md
    fixes the public names): users catch ``SpoolError`` or ``OSError`` and read
    ``published``."""

    published: dict[int, str]
    queue_dir: str
    total: int

    @classmethod
    def of(cls, exc: OSError, published: dict[int, str], queue_dir: str, total: int) -> _PublishedError:
        """The error for ``exc``, which came once the items ``published`` (of ``total``)
        were in ``queue_dir``."""
        if exc.errno is None:  # an OSError made without one (its args are its message)
            err = cls(*exc.args)
        else:
            err = cls(exc.errno, exc.strerror, exc.filename, None, exc.filename2)
        # Instance attributes: pickled with the error (BaseException keeps __dict__).
        err.published, err.queue_dir, err.total = published, queue_dir, total
        return err

    def __str__(self) -> str:
        names = list(self.published.values())
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        cause = OSError.__str__(self)
        if self.total == 1:
            return (
                f"entry {shown} is published in {self.queue_dir}, but the enqueue failed: {cause}. "
                f"A consumer may have it already and its durability is unknown: do not enqueue it again"
            )
        rest = self.total - len(names)
        tail = f"; the other {rest} were not enqueued" if rest else ""
        return (
            f"{len(names)} of {self.total} entries are published in {self.queue_dir} ({shown}), but "
            f"the enqueue failed: {cause}. A consumer may have them already and their durability "
            f"is unknown: do not enqueue them again{tail}"
        )


class _RecoveryRefused(SpoolError):
    """Recovery without ``dead_after`` on a filesystem where a free owner lock does not
    prove that its owner died (locks not shared between its mounts or clients); nothing
    was touched. ``reason`` says which filesystem and why. Private: the command line
    catches it to word the remedy in its own options."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message, reason)

    @property
    def reason(self) -> str:
        """The filesystem and why its locks prove nothing (``_sharedfs.FsFacts.reason``)."""
        return str(self.args[1])

    def __str__(self) -> str:
        return str(self.args[0])
