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
