"""Due times and attempt counts: the schedule record kept in ``.registry/NAME``.

An entry never delayed nor retried has an empty registry file, exactly as in the OCaml
layout, and an empty file means "due now, 0 attempts": a claim already opens, locks and
fstats the registry file, so ``st_size == 0`` answers "is it due?" with no extra system
call. Otherwise the file holds two fixed-size slots::

    offset 0   slot A   b"MSR1" | due: float64 | attempts: uint32 | seq: uint32 | crc32
    offset 24  slot B   (same)

little-endian, the crc32 covering the 20 bytes before it. ``due`` is a POSIX time (0.0:
due now); the valid slot with the later ``seq`` is the record (serial-number order: seq
wraps from 0xFFFFFFFF to 0). A write goes to the
other slot (``seq + 1``), so a write torn by a crash damages only the slot being
written and the previous record stays readable: an acknowledged count never goes
backwards. Going back to "due now, 0 attempts" truncates the file to empty (the OCaml
layout again). Records are written only by the owner of the entry's lock, fsynced
(durability "full" and "file") before the rename that publishes the move.
"""

from __future__ import annotations

import logging
import math
import os
import random
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Final

from . import _fs
from ._spoolable import Duration, seconds

log = logging.getLogger("multispool")

_MAGIC: Final = b"MSR1"
_BODY: Final = struct.Struct("<4sdII")
_CRC: Final = struct.Struct("<I")
SLOT_SIZE: Final = _BODY.size + _CRC.size  # 24
RECORD_SIZE: Final = 2 * SLOT_SIZE
_MAX_ATTEMPTS: Final = 0xFFFFFFFF
_SEQ_MASK: Final = 0xFFFFFFFF  # seq is stored in 32 bits, and wraps


@dataclass(frozen=True)
class Schedule:
    """One entry's schedule: ``due`` (POSIX time, 0.0 = due now), ``attempts``, and the
    sequence number of the slot it was read from (0 for an empty record)."""

    due: float = 0.0
    attempts: int = 0
    seq: int = 0

    @property
    def empty(self) -> bool:
        return self.due <= 0.0 and self.attempts == 0


NOW: Final = Schedule()


def _slot(raw: bytes, at: int) -> Schedule | None:
    chunk = raw[at : at + SLOT_SIZE]
    if len(chunk) < SLOT_SIZE:
        return None
    body = chunk[: _BODY.size]
    (crc,) = _CRC.unpack_from(chunk, _BODY.size)
    if zlib.crc32(body) != crc:
        return None
    magic, due, attempts, seq = _BODY.unpack(body)
    # NaN is never written, nor infinity any more (older versions took an infinite
    # delay): a slot holding either is damaged, rather than an entry parked for ever.
    if magic != _MAGIC or not due < math.inf:
        return None
    return Schedule(max(due, 0.0), attempts, seq)


def decode(raw: bytes, path: str = "?") -> Schedule:
    """The record in ``raw`` (the registry file's bytes). Empty: due now, 0 attempts.
    Bytes with no valid slot are logged and read as due now (the entry is never lost or
    held back for a damaged record)."""
    if not raw:
        return NOW
    a = _slot(raw, 0)
    b = _slot(raw, SLOT_SIZE)
    if a is None and b is None:
        log.warning("multispool: unreadable schedule record in %s (%d bytes): due now", path, len(raw))
        return NOW
    if a is None or (b is not None and _newer(b.seq, a.seq)):
        assert b is not None
        return b
    return a


def _newer(x: int, y: int) -> bool:
    """Whether sequence number ``x`` comes after ``y``. They are 32 bits on disk and wrap
    (the write after 0xFFFFFFFF stores 0), so compared as serial numbers (RFC 1982):
    two valid slots' numbers differ by one."""
    return 0 < (x - y) & _SEQ_MASK < 0x80000000


def encode_slot(due: float, attempts: int, seq: int) -> bytes:
    body = _BODY.pack(_MAGIC, due, min(attempts, _MAX_ATTEMPTS), seq & _SEQ_MASK)
    return body + _CRC.pack(zlib.crc32(body))


def _pread(fd: int, n: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - Windows
    return os.read(fd, n)  # pragma: no cover


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    if hasattr(os, "pwrite"):
        n = os.pwrite(fd, data, offset)
    else:  # pragma: no cover - Windows
        os.lseek(fd, offset, os.SEEK_SET)
        n = os.write(fd, data)
    if n != len(data):  # a 24-byte write to a regular file is never short but for ENOSPC
        raise OSError(f"short write of schedule record ({n} of {len(data)} bytes)")


def read_fd(fd: int, size: int, path: str) -> Schedule:
    """The record of a registry file open (readable) on ``fd`` whose size is ``size``."""
    if size == 0:
        return NOW
    try:
        return decode(_pread(fd, RECORD_SIZE, 0), path)
    except OSError as e:
        raise _fs._name(e, path) from None


def read_path(path: str) -> Schedule:
    """The record of the registry file at ``path``, read without its lock (a concurrent
    write touches only the other slot). FileNotFoundError if absent."""
    return decode(_fs.read_file(path), path)


def write_fd(fd: int, old: Schedule, due: float, attempts: int, *, sync: bool, path: str) -> Schedule:
    """Replace the record ``old`` of the registry file on ``fd`` (held under its owner
    lock) by (``due``, ``attempts``); fsync it when ``sync``. Returns the new record."""
    new_empty = due <= 0.0 and attempts == 0
    try:
        if new_empty:
            if old.seq == 0 and old.empty:
                return NOW
            os.ftruncate(fd, 0)
            new = NOW
        else:
            seq = old.seq + 1
            _pwrite(fd, encode_slot(due, attempts, seq), (seq % 2) * SLOT_SIZE)
            new = Schedule(max(due, 0.0), attempts, seq)
        if sync:
            _fs.fsync_fd(fd)
    except OSError as e:
        raise _fs._name(e, path) from None
    return new


def due_at(delay: Duration | None, now: float) -> float:
    """The POSIX due time for ``delay`` seconds from ``now`` (0.0: due now)."""
    if delay is None:
        return 0.0
    d = seconds(delay)
    if not 0 <= d < math.inf:
        raise ValueError(f"delay must be a finite number of seconds >= 0, got {delay!r}")
    return now + d if d > 0 else 0.0


class Backoff:
    """Retry policy for ``reader.iter(f, on_error=Backoff(...))``.

    When ``f`` raises, the entry goes back to its queue due after
    ``min(first * factor**attempts, max)`` seconds, scaled by a random factor in
    ``[1 - jitter, 1 + jitter]``, and its attempt count goes up by one. The failure that
    brings the count to ``max_attempts`` moves it into ``dead_letter`` instead (metadata
    and data untouched); with ``dead_letter=None`` that failure is handled as without a
    policy (the entry goes back unchanged and the exception propagates).
    """

    __slots__ = ("dead_letter", "factor", "first", "jitter", "max", "max_attempts")

    def __init__(
        self,
        first: Duration = 1.0,
        factor: float = 2.0,
        max: Duration = 3600.0,
        jitter: float = 0.1,
        max_attempts: int | None = None,
        dead_letter: Any = None,
    ) -> None:
        self.first = seconds(first)
        self.max = seconds(max)
        # Finite, all three: an infinite delay parks an entry for ever (and NaN compares
        # with nothing), which a retry policy must never do silently.
        if not 0 <= self.first < math.inf:
            raise ValueError(f"first must be a finite number of seconds >= 0, got {first!r}")
        if not 0 <= self.max < math.inf:
            raise ValueError(f"max must be a finite number of seconds >= 0, got {max!r}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 <= factor < math.inf:
            raise ValueError(f"factor must be a finite number >= 1, got {factor!r}")
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter < 1:
            raise ValueError(f"jitter must be a fraction in [0, 1), got {jitter!r}")
        if max_attempts is not None and (
            isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
        ):
            raise ValueError(f"max_attempts must be None or an int >= 1, got {max_attempts!r}")
        self.factor = float(factor)
        self.jitter = float(jitter)
        self.max_attempts = max_attempts
        self.dead_letter = dead_letter

    def base_delay(self, attempts: int) -> float:
        """The delay before jitter after ``attempts`` earlier failures."""
        try:
            d = self.first * self.factor**attempts
        except OverflowError:
            return self.max
        return d if d < self.max else self.max

    def delay(self, attempts: int) -> float:
        """The delay for a failure after ``attempts`` earlier failures, jitter included."""
        d = self.base_delay(attempts)
        if self.jitter:
            d *= 1.0 + random.uniform(-self.jitter, self.jitter)
            if d == math.inf:  # a cap near the largest float, raised by the jitter
                d = sys.float_info.max
        return d

    def exhausted(self, attempts: int) -> bool:
        """True if a failure after ``attempts`` earlier ones is the last allowed."""
        return self.max_attempts is not None and attempts + 1 >= self.max_attempts

    def __repr__(self) -> str:
        return (
            f"Backoff(first={self.first!r}, factor={self.factor!r}, max={self.max!r}, "
            f"jitter={self.jitter!r}, max_attempts={self.max_attempts!r}, dead_letter={self.dead_letter!r})"
        )
