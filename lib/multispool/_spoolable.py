"""What is spooled: queues, metadata codec, data codec, names, durability."""

from __future__ import annotations

import builtins
import contextlib
import datetime
import enum
import os
import secrets
import threading
import time
import typing
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Final, Generic, Literal, Protocol, TypeVar, overload, runtime_checkable

import msgspec

from ._errors import CorruptEntryError
from ._fs import fsync_path, read_file, write_file
from ._layout import check_queue_dirname

T = TypeVar("T")
M = TypeVar("M")
D = TypeVar("D")
Durability = Literal["full", "file", "none"]
Duration = typing.Union[float, int, datetime.timedelta]  # noqa: UP007 - runtime alias on 3.9-style


def seconds(d: Duration) -> float:
    """A duration as float seconds (float, int or datetime.timedelta)."""
    if isinstance(d, datetime.timedelta):
        return d.total_seconds()
    if isinstance(d, bool) or not isinstance(d, (int, float)):
        raise TypeError(f"expected seconds as float or a datetime.timedelta, got {d!r}")
    return float(d)


@runtime_checkable
class MetadataCodec(Protocol):
    """Turns metadata into bytes and back."""

    def encode(self, obj: Any) -> bytes: ...
    def decode(self, data: bytes) -> Any: ...


@runtime_checkable
class DataCodec(Protocol[T]):
    """Loads and saves an entry's data payload at a path."""

    def load(self, path: str) -> T: ...
    def save(self, value: T, path: str) -> None: ...


@runtime_checkable
class NameGenerator(Protocol):
    """Proposes entry names; ``attempt`` counts up while proposals collide."""

    def next(self, seed: Any, attempt: int) -> str: ...


class BytesData:
    """Data stored verbatim: ``bytes`` in, ``bytes`` out."""

    def load(self, path: str) -> bytes:
        """The bytes stored at ``path``, verbatim."""
        return read_file(path)

    def save(self, value: bytes, path: str) -> None:
        """Store ``value`` (bytes-like) at ``path`` verbatim, mode 0600."""
        write_file(path, bytes(value), sync=False, mode=0o600)

    # Fast path used by the spool: encode without touching disk, so the spool can write
    # with its own durable recipe and file mode.
    def _encode(self, value: bytes) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"BytesData stores bytes, got {type(value).__name__}")
        return bytes(value)

    def _decode(self, raw: bytes) -> bytes:
        return raw

    def __repr__(self) -> str:
        return "BytesData()"


class MsgspecData(Generic[T]):
    """Data encoded with msgspec as JSON or MessagePack, decoded (and validated) as ``type``."""

    @overload
    def __init__(
        self: MsgspecData[T], type: builtins.type[T], format: Literal["json", "msgpack"] = ...
    ) -> None: ...
    @overload
    def __init__(
        self: MsgspecData[Any], type: object = ..., format: Literal["json", "msgpack"] = ...
    ) -> None: ...

    def __init__(self, type: Any = Any, format: Literal["json", "msgpack"] = "json") -> None:
        """``type``: what ``load`` decodes into (validated); ``format``: "json" or "msgpack"."""
        if format == "json":
            self._enc: Any = msgspec.json.Encoder()
            self._dec: Any = msgspec.json.Decoder(type)
        elif format == "msgpack":
            self._enc = msgspec.msgpack.Encoder()
            self._dec = msgspec.msgpack.Decoder(type)
        else:
            raise ValueError(f"format must be 'json' or 'msgpack', got {format!r}")
        self.type = type
        self.format = format

    def load(self, path: str) -> T:
        """Decode the file at ``path``, validated against ``type``."""
        return typing.cast(T, self._dec.decode(read_file(path)))

    def save(self, value: T, path: str) -> None:
        """Encode ``value`` to ``path`` in this codec's format, mode 0600."""
        write_file(path, self._enc.encode(value), sync=False, mode=0o600)

    def _encode(self, value: T) -> bytes:
        return typing.cast(bytes, self._enc.encode(value))

    def _decode(self, raw: bytes) -> T:
        return typing.cast(T, self._dec.decode(raw))

    def __repr__(self) -> str:
        return f"MsgspecData({self.type!r}, format={self.format!r})"


class PrefixNames:
    """``next(seed, attempt) == f"{seed}{attempt:06d}"`` (the OCaml test generator)."""

    def next(self, seed: Any, attempt: int) -> str:
        """``f"{seed}{attempt:06d}"``: ``seed`` then the attempt number on six digits."""
        # Exactly API.md's formula, also for seed=None ("None000000"): give a seed.
        return f"{seed}{attempt:06d}"

    def __repr__(self) -> str:
        return "PrefixNames()"


# Random per process, drawn anew in a forked child (cheaper than comparing getpid() on
# every name).
_process_token = secrets.token_hex(8)


def _new_process_token() -> None:
    global _process_token, _names_lock
    _process_token = secrets.token_hex(8)
    _names_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_process_token)


# Serialises the clock bump of every TimeOrderedNames. Module-level, so that a forked
# child can replace it: another thread of the parent may have held it at fork time.
_names_lock = threading.Lock()


class TimeOrderedNames:
    """Names unique across hosts and processes, whose lexicographic order is their
    creation order within one process: ``[seed]<ns since epoch, 19 digits>-<random 64 bits>``.

    The clock part never goes backwards within a process (it is bumped past the last name
    given out), and the random part is drawn anew in every process (also after fork).
    """

    def __init__(self) -> None:
        self._last = 0

    def next(self, seed: Any, attempt: int) -> str:
        """A new name, unique across hosts and processes, ordered by creation time within
        this process; ``seed`` (any value, or None) and ``attempt`` do not change it.
        """
        with _names_lock:
            now = max(time.time_ns(), self._last + 1)
            self._last = now
        return f"{'' if seed is None else seed}{now:019d}-{_process_token}"

    def __repr__(self) -> str:
        return "TimeOrderedNames()"


_NULL_CM: Final = contextlib.nullcontext()  # reusable: holds no state


class _Codec:
    """msgspec encoder/decoder pair built once per Spoolable (not per call)."""

    def __init__(self, kind: Any, metadata_type: Any) -> None:
        self._custom: MetadataCodec | None = None
        # With a declared type, what is written is decoded back through it first (a
        # msgspec encoder does not check field types: {"url": 1} for url: str would be
        # written, then fail every consumer). typing.Any accepts whatever encodes.
        self._check = metadata_type is not Any
        if kind == "json":
            self._enc: Any = msgspec.json.Encoder()
            self._dec: Any = msgspec.json.Decoder(metadata_type)
        elif kind == "msgpack":
            self._enc = msgspec.msgpack.Encoder()
            self._dec = msgspec.msgpack.Decoder(metadata_type)
        elif isinstance(kind, MetadataCodec):
            self._custom = kind
        else:
            raise ValueError(
                "metadata_codec must be 'json', 'msgpack' or an object with "
                f"encode(obj)->bytes and decode(bytes)->obj, got {kind!r}"
            )

    def encode(self, obj: Any) -> bytes:
        if self._custom is not None:
            out = self._custom.encode(obj)
            if not isinstance(out, (bytes, bytearray, memoryview)):
                raise TypeError(f"metadata codec encode() returned {type(out).__name__}, not bytes")
            return bytes(out)
        raw = typing.cast(bytes, self._enc.encode(obj))
        if self._check:
            # msgspec.ValidationError (a value of the wrong type) before any disk access.
            self._dec.decode(raw)
        return raw

    def decode(self, raw: bytes, path: str) -> Any:
        """Decode metadata read from ``path``; CorruptEntryError naming it on failure."""
        try:
            if self._custom is not None:
                return self._custom.decode(raw)
            return self._dec.decode(raw)
        except Exception as e:  # any decoder failure means the file is unusable as metadata
            raise CorruptEntryError(path, f"{type(e).__name__}: {e}") from e


class Spoolable(Generic[M, D]):
    """Describes what is spooled. Immutable after construction; every process that opens
    a spool must describe it the same way.

    :param queues: an ``enum.Enum`` whose member values are the queue directory names
        (non-empty strings without ``/`` or NUL, not starting with ``.``, unique); the
        member order is the queue order.
    :param metadata: the type metadata is decoded into and validated against (any type
        msgspec handles: a ``msgspec.Struct``, a dataclass, ``dict``...); default
        ``typing.Any`` (no validation).
    :param metadata_codec: ``"json"`` (default), ``"msgpack"``, or an object with
        ``encode(obj) -> bytes`` and ``decode(bytes) -> obj``.
    :param data: the data codec, an object with ``load(path)`` and ``save(value, path)``:
        ``BytesData()`` (default), ``MsgspecData(type)``, or your own.
    :param name_generator: an object with ``next(seed, attempt) -> str``;
        default ``TimeOrderedNames()``.
    :param throttle: an optional context manager entered around every disk operation
        (e.g. a semaphore limiting concurrent I/O).
    :param durability: ``"full"`` (default: fsync files and directories, so what returned
        survives power loss), ``"file"`` (fsync file contents only) or ``"none"``.
    :param quarantine: a queue member where a reader moves entries whose metadata cannot
        be decoded (bytes untouched); ``None`` raises ``CorruptEntryError`` instead.
    :param file_mode: permissions of created files (default ``0o600``), minus the umask.
    :param dir_mode: permissions of created directories (default ``0o700``), minus the
        umask; e.g. ``0o2770`` with ``file_mode=0o660`` for a spool shared by a group.

    Invalid values raise ``ValueError``. ``M`` is the metadata type (``metadata=``), ``D``
    the data codec's value type (``data=``; ``bytes`` for the default ``BytesData``); a
    type checker infers both.
    """

    # Overloads only type the constructor: M from ``metadata`` when it is a class, else
    # Any; D from the data codec, bytes when it is left out.
    @overload
    def __init__(
        self: Spoolable[M, bytes],
        queues: type[enum.Enum],
        metadata: type[M],
        metadata_codec: Any = ...,
        data: None = ...,
        name_generator: NameGenerator | None = ...,
        throttle: Any = ...,
        durability: Durability = ...,
        quarantine: enum.Enum | None = ...,
        *,
        file_mode: int = ...,
        dir_mode: int = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: Spoolable[M, D],
        queues: type[enum.Enum],
        metadata: type[M],
        metadata_codec: Any = ...,
        data: DataCodec[D] = ...,
        name_generator: NameGenerator | None = ...,
        throttle: Any = ...,
        durability: Durability = ...,
        quarantine: enum.Enum | None = ...,
        *,
        file_mode: int = ...,
        dir_mode: int = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: Spoolable[Any, bytes],
        queues: type[enum.Enum],
        metadata: object = ...,
        metadata_codec: Any = ...,
        data: None = ...,
        name_generator: NameGenerator | None = ...,
        throttle: Any = ...,
        durability: Durability = ...,
        quarantine: enum.Enum | None = ...,
        *,
        file_mode: int = ...,
        dir_mode: int = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: Spoolable[Any, D],
        queues: type[enum.Enum],
        metadata: object = ...,
        metadata_codec: Any = ...,
        data: DataCodec[D] = ...,
        name_generator: NameGenerator | None = ...,
        throttle: Any = ...,
        durability: Durability = ...,
        quarantine: enum.Enum | None = ...,
        *,
        file_mode: int = ...,
        dir_mode: int = ...,
    ) -> None: ...

    def __init__(
        self,
        queues: type[enum.Enum],
        metadata: Any = Any,
        metadata_codec: Any = "json",
        data: Any = None,
        name_generator: NameGenerator | None = None,
        throttle: Any = None,
        durability: Durability = "full",
        quarantine: enum.Enum | None = None,
        *,
        file_mode: int = 0o600,
        dir_mode: int = 0o700,
    ) -> None:
        if not (isinstance(queues, type) and issubclass(queues, enum.Enum)):
            raise ValueError(f"queues must be an enum.Enum subclass, got {queues!r}")
        members = list(queues)
        if not members:
            raise ValueError(f"queues enum {queues.__name__} has no members")
        seen: set[str] = set()
        for m in members:
            dirname = check_queue_dirname(m.value)
            if dirname in seen:
                raise ValueError(f"queue value {dirname!r} is used twice")
            seen.add(dirname)
        if durability not in ("full", "file", "none"):
            raise ValueError(f"durability must be 'full', 'file' or 'none', got {durability!r}")
        if quarantine is not None and quarantine not in members:
            raise ValueError(f"quarantine must be a member of {queues.__name__}, got {quarantine!r}")
        data = BytesData() if data is None else data
        if not (callable(getattr(data, "load", None)) and callable(getattr(data, "save", None))):
            raise ValueError(f"data must have load(path) and save(value, path), got {data!r}")
        name_generator = TimeOrderedNames() if name_generator is None else name_generator
        if not callable(getattr(name_generator, "next", None)):
            raise ValueError(f"name_generator must have next(seed, attempt), got {name_generator!r}")
        if throttle is not None and not (
            hasattr(throttle, "__enter__") or callable(throttle)
        ):
            raise ValueError(f"throttle must be a context manager, got {throttle!r}")
        self.queues = queues
        self.metadata = metadata
        self.metadata_codec = metadata_codec
        self.data = data
        self.name_generator = name_generator
        self.throttle = throttle
        self.durability: Durability = durability
        self.quarantine = quarantine
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self._codec = _Codec(metadata_codec, metadata)
        # Resolved once: these sit on every operation's path.
        self._throttle_cm: AbstractContextManager[Any] | None = (
            _NULL_CM if throttle is None else throttle if hasattr(throttle, "__enter__") else None
        )
        self._data_encode: Callable[[Any], bytes] | None = getattr(data, "_encode", None)
        self._data_decode: Callable[[bytes], Any] | None = getattr(data, "_decode", None)
        self._queue_list: tuple[enum.Enum, ...] = tuple(members)
        self._dirnames: dict[enum.Enum, str] = {m: str(m.value) for m in members}

    # -- helpers used by the spool ----------------------------------------------------
    def dirname(self, queue: enum.Enum) -> str:
        """The directory name of ``queue``; ValueError if it is not one of our queues."""
        try:
            return self._dirnames[queue]
        except (KeyError, TypeError):
            raise ValueError(f"{queue!r} is not a member of {self.queues.__name__}") from None

    def throttled(self) -> AbstractContextManager[Any]:
        """The context to enter around one disk operation."""
        cm = self._throttle_cm
        if cm is not None:
            return cm
        return typing.cast(AbstractContextManager[Any], self.throttle())

    def encode_data(self, value: Any, path: str, *, sync: bool) -> None:
        """Write data ``value`` at ``path`` with the data codec, durably if ``sync``. The
        spool calls it for files of entries whose owner lock it holds (see write_file's
        ``owned``)."""
        enc = self._data_encode
        if enc is not None:
            write_file(path, enc(value), sync=sync, mode=self.file_mode, owned=True)
        else:
            self.data.save(value, path)
            if sync:
                fsync_path(path)

    def __repr__(self) -> str:
        return (
            f"Spoolable(queues={self.queues.__name__}, metadata={self.metadata!r}, "
            f"metadata_codec={self.metadata_codec!r}, data={self.data!r}, "
            f"durability={self.durability!r}, quarantine={self.quarantine!r})"
        )
