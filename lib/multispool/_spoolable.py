"""What is spooled: queues, metadata codec, data codec, names, durability."""

from __future__ import annotations

import builtins
import contextlib
import datetime
import enum
import errno
import io
import os
import secrets
import stat as stat_mod
import threading
import time
import typing
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Final, Generic, Literal, Protocol, TypeVar, overload, runtime_checkable

import msgspec

from . import _fs
from ._errors import CorruptEntryError
from ._fs import O_CREATE_EXCL, BytesWriter, _FileHold, fsync_file, read_file, unlink_quiet, write_file
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


def timeout_seconds(timeout: Duration) -> float:
    """A wait's ``timeout`` as float seconds; ValueError for NaN, which no clock ever
    reaches (a wait would never end)."""
    t = seconds(timeout)
    if t != t:
        raise ValueError(f"timeout must be a number of seconds, got {timeout!r}")
    return t


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


def decode_naming(decode: Callable[[bytes], Any], raw: bytes, path: str) -> Any:
    """``decode(raw)``; a msgspec error it raises is raised again, of the same type, with
    ``path`` in its message (msgspec's own says what and where in the document, not in
    which file), the original as its cause."""
    try:
        return decode(raw)
    except msgspec.DecodeError as e:
        raise type(e)(f"{e} - in {path}") from e


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
        # As the metadata codec (_Codec): msgspec's encoder does not check a value against
        # ``type``, so what is written is decoded back through it first; else a value no
        # ``load`` accepts would be spooled, and fail every consumer. Any takes anything.
        self._check = type is not Any

    def load(self, path: str) -> T:
        """Decode the file at ``path``, validated against ``type``; msgspec's
        ``DecodeError`` (or ``ValidationError``) naming ``path`` if it cannot."""
        return typing.cast(T, decode_naming(self._dec.decode, read_file(path), path))

    def save(self, value: T, path: str) -> None:
        """Encode ``value`` to ``path`` in this codec's format, mode 0600; a value that
        does not match ``type`` raises (``msgspec.ValidationError``) before any write."""
        write_file(path, self._encode(value), sync=False, mode=0o600)

    def _encode(self, value: T) -> bytes:
        raw = typing.cast(bytes, self._enc.encode(value))
        if self._check:
            self._dec.decode(raw)  # msgspec.ValidationError before any disk access
        return raw

    def _decode(self, raw: bytes) -> T:
        return typing.cast(T, self._dec.decode(raw))

    def __repr__(self) -> str:
        return f"MsgspecData({self.type!r}, format={self.format!r})"


_COPY_CHUNK: Final = 1 << 20  # FileData streams in pieces of this size: memory stays bounded
# errnos of link(2) that mean "cannot hard-link here", so FileData copies instead
_NO_LINK: Final = {
    errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS,
}


class FileData:
    """Large payloads as files. ``save`` takes a path (str or os.PathLike) or a binary file
    object (anything with ``read``) and streams it into the entry's data file in pieces
    of 1 MiB, so memory stays bounded whatever the size; a path on the spool's filesystem
    is hard-linked instead of copied when ``link`` is true (the entry then shares the
    file: do not modify it afterwards). ``load`` returns the data file's path.

    A path is checked (it must exist and be a regular file) before anything touches
    the spool; a file object is read from its current position to its end.

    :param link: hard-link a path on the spool's filesystem instead of copying it
        (default ``True``); ``False`` always copies (the entry then owns its copy, with
        the Spoolable's ``file_mode``). A link keeps the source's permissions.
    """

    def __init__(self, link: bool = True) -> None:
        self.link = link

    def load(self, path: str) -> str:
        """The path of the data file (nothing is read)."""
        return path

    def save(self, value: str | os.PathLike[str] | typing.BinaryIO, path: str) -> None:
        """Stream (or hard-link) ``value`` into a new file at ``path`` (mode 0o600)."""
        self._check(value)
        self._write(value, path, 0o600)

    def _check(self, value: Any) -> None:
        if isinstance(value, (str, os.PathLike)):
            st = os.stat(value)  # FileNotFoundError names the path
            if not stat_mod.S_ISREG(st.st_mode):
                raise ValueError(f"FileData: not a regular file: {os.fspath(value)!r}")
        elif not callable(getattr(value, "read", None)):
            raise TypeError(f"FileData stores a path or a binary file object, got {type(value).__name__}")

    def _write(self, value: Any, path: str, mode: int) -> None:
        """Write ``value`` at ``path`` (not synced); on failure nothing is left at ``path``.

        ``path`` is a file of the caller's own (an entry's data or staging file, under
        its owner lock): a file already there is what a lost entry left (a crash can
        leave ``.data/NAME`` without its reservation, and a generator that reuses names
        gives NAME again). It is replaced, never written through: it may be a hard link
        of a user's file."""
        if isinstance(value, (str, os.PathLike)):
            src = os.fspath(value)
            if self.link:
                try:
                    try:
                        _link_followed(src, path)
                    except FileExistsError:
                        unlink_quiet(path)
                        _link_followed(src, path)
                    return
                except OSError as e:
                    if e.errno not in _NO_LINK:
                        raise
            with open(src, "rb") as f:
                self._stream(f, path, mode)
        else:
            self._stream(value, path, mode)

    @staticmethod
    def _stream(f: Any, path: str, mode: int) -> None:
        # Through the spool's held .data (_layout.Layout), as every spool path.
        rel, dfd = _fs.at(path)
        try:
            try:
                fd = os.open(rel, O_CREATE_EXCL, mode, dir_fd=dfd)
            except FileExistsError:  # a lost entry's file (see _write): replaced, not truncated
                unlink_quiet(path)
                fd = os.open(rel, O_CREATE_EXCL, mode, dir_fd=dfd)
        except OSError as e:
            raise _fs._renamed(e, path) from None
        # The copy is a call of its own: a return from inside this block (the sendfile
        # path once returned here) would skip the close below and leave ``fd`` open.
        try:
            FileData._copy(f, fd)
        except OSError as e:
            os.close(fd)
            unlink_quiet(path)
            if e.filename is None:
                e.filename = path
            raise
        except BaseException:
            os.close(fd)
            unlink_quiet(path)
            raise
        os.close(fd)

    @staticmethod
    def _copy(f: Any, fd: int) -> None:
        """Copy the caller's file object ``f`` from its position to its end at ``fd``."""
        src_fd = _fileno(f)
        if src_fd is not None and _sendfile_all(src_fd, fd, f):
            return
        readinto = getattr(f, "readinto", None)
        if readinto is not None:
            buf = bytearray(_COPY_CHUNK)
            view = memoryview(buf)
            while n := _read_source(readinto, buf, f):
                _fs._write_all(fd, view[:n])
            if n is None:
                raise _would_block(f)
        else:
            while chunk := _read_source(f.read, _COPY_CHUNK, f):
                if not isinstance(chunk, (bytes, bytearray, memoryview)):
                    raise TypeError(f"FileData: file object gave {type(chunk).__name__}, not bytes")
                _fs._write_all(fd, chunk)
            if chunk is None:
                raise _would_block(f)

    def __repr__(self) -> str:
        return f"FileData(link={self.link!r})"


# link(2) links a symlink itself, not the file it points to, and os.link calls it unless
# given a directory descriptor: linkat(AT_SYMLINK_FOLLOW) then, from the root directory.
_LINKAT_FOLLOW: Final = os.link in os.supports_dir_fd and os.link in os.supports_follow_symlinks


def _clear_for_codec(path: str) -> None:
    """Make way at ``path`` (an entry's data or staging file, under its owner lock) for
    a codec's own ``save``, which opens it as it likes (``open(path, "wb")`` follows a
    symlink and writes through a hard link): what is there is a lost entry's leftover,
    or was planted. As ``_fs.replace_stale``: a symlink is refused (ELOOP naming
    ``path``), anything else unlinked, never opened."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat_mod.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
    unlink_quiet(path)


def _link_followed(src: str, dst: str) -> None:
    """Hard-link the file ``src`` names, following a symlink there, at ``dst``: a link of
    the symlink would be a data file that is a symlink (dangling if it is relative)."""
    if _LINKAT_FOLLOW:
        if not os.path.isabs(src):
            src = os.path.join(os.getcwd(), src)
        root = _fs._root_fd()
        rel, dfd = _fs.at(dst)  # through the spool's held .data (_layout.Layout)
        try:
            os.link(src, rel, src_dir_fd=root, dst_dir_fd=root if dfd is None else dfd, follow_symlinks=True)
        except OSError as e:
            raise _fs._renamed(e, src, dst) from None
    else:  # pragma: no cover - without linkat
        os.link(os.path.realpath(src), dst)


def _read_source(read: Callable[[Any], Any], arg: Any, f: Any) -> Any:
    """``read(arg)`` on the caller's file object ``f``: an OSError it raises without a
    file name is given ``f``'s (its ``name``, or its repr), so that it is not taken for
    an error of the spool's file that the copy writes."""
    try:
        return read(arg)
    except OSError as e:
        if e.filename is None:
            name = getattr(f, "name", None)
            e.filename = name if isinstance(name, str) else repr(f)
        raise


def _would_block(f: Any) -> BlockingIOError:
    """A non-blocking stream gave None (nothing to read now), not its end (b"" or 0):
    what was read so far is not all of it, and storing it would cut the payload short."""
    return BlockingIOError(
        errno.EAGAIN,
        f"FileData: {f!r} is non-blocking and has nothing to read now: it cannot be read to its end",
    )


def _fileno(f: Any) -> int | None:
    """The descriptor whose bytes ``f`` reads, for a kernel copy: only a plain binary file
    (``open(path, "rb")``, buffered or not). Other objects may give the descriptor of a
    file they decode (``gzip.open``, ``bz2``, ``lzma``: the compressed file), whose bytes
    are not what they read; they are read through their own ``readinto``/``read``."""
    t = type(f)
    if t is not io.FileIO and not (
        t in (io.BufferedReader, io.BufferedRandom) and type(getattr(f, "raw", None)) is io.FileIO
    ):
        return None
    try:
        fd = f.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    return fd if isinstance(fd, int) else None


def _sendfile_all(src_fd: int, dst_fd: int, f: Any) -> bool:
    """Copy the rest of regular file ``src_fd`` in the kernel; False (nothing copied) if
    it is not a regular file or the OS cannot."""
    sendfile = getattr(os, "sendfile", None)
    if sendfile is None or not stat_mod.S_ISREG(os.fstat(src_fd).st_mode):
        return False
    with contextlib.suppress(AttributeError, OSError, ValueError):
        f.flush()  # a buffered writer's pending bytes belong to the file
    try:
        offset = f.tell()  # honour the position; a buffered reader may be ahead of it
    except (AttributeError, OSError, ValueError):
        offset = os.lseek(src_fd, 0, os.SEEK_CUR)
    start = offset
    while True:
        try:
            n = sendfile(dst_fd, src_fd, offset, _COPY_CHUNK * 8)
        except OSError as e:
            if offset == start and e.errno in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
                return False
            raise
        if n == 0:
            break
        offset += n
    with contextlib.suppress(AttributeError, OSError, ValueError):
        f.seek(offset)
    return True


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
# The clock part of the last name any TimeOrderedNames of this process gave out: the
# next one is bumped past it. Shared by every instance (each Spoolable makes its own),
# so that names of one process keep their order when the wall clock steps back.
_last_ns = 0


class TimeOrderedNames:
    """Names unique across hosts and processes, whose lexicographic order is their
    creation order within one process: ``[seed]<ns since epoch, 19 digits>-<random 64 bits>``.

    The clock part never goes backwards within a process (it is bumped past the last name
    any instance gave out), and the random part is drawn anew in every process (also after fork).
    """

    def next(self, seed: Any, attempt: int) -> str:
        """A new name, unique across hosts and processes, ordered by creation time within
        this process; ``seed`` (any value, or None) and ``attempt`` do not change it.
        """
        global _last_ns
        with _names_lock:
            now = _last_ns = max(time.time_ns(), _last_ns + 1)
        return f"{'' if seed is None else seed}{now:019d}-{_process_token}"

    def __repr__(self) -> str:
        return "TimeOrderedNames()"


_NULL_CM: Final = contextlib.nullcontext()  # reusable: holds no state


def _type_checker(metadata_type: Any) -> Callable[[Any], None]:
    """What checks a value against ``metadata_type`` for a custom metadata codec, the way
    the built-in codecs do: msgspec.ValidationError if it is not of that type.

    A custom codec may encode anything, so the check cannot be its encoder: the value
    goes through msgspec (MessagePack, which loses no type a JSON round trip keeps) and
    is decoded as ``metadata_type``, which checks a Struct's fields too. A value msgspec
    cannot encode (a class only the custom codec knows) is checked by msgspec.convert
    instead: by class for such types. A type msgspec cannot check at all (TypeError:
    a Protocol...) lets every value through, as before."""
    enc = msgspec.msgpack.Encoder()
    try:
        dec: Any = msgspec.msgpack.Decoder(metadata_type)
    except TypeError:
        dec = None

    def check(obj: Any) -> None:
        try:
            if dec is not None:
                try:
                    raw = enc.encode(obj)
                except (TypeError, ValueError, OverflowError):
                    pass
                else:
                    dec.decode(raw)
                    return
            msgspec.convert(obj, metadata_type)
        except TypeError:  # the type, not the value: msgspec cannot tell
            pass

    return check


class _Codec:
    """msgspec encoder/decoder pair built once per Spoolable (not per call)."""

    def __init__(self, kind: Any, metadata_type: Any) -> None:
        self._custom: MetadataCodec | None = None
        self._type_check: Callable[[Any], None] | None = None
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
            self._type_check = _type_checker(metadata_type) if self._check else None
        else:
            raise ValueError(
                "metadata_codec must be 'json', 'msgpack' or an object with "
                f"encode(obj)->bytes and decode(bytes)->obj, got {kind!r}"
            )

    def encode(self, obj: Any) -> bytes:
        if self._custom is not None:
            if self._type_check is not None:
                self._type_check(obj)  # msgspec.ValidationError before any disk access
            out = self._custom.encode(obj)
            if not isinstance(out, (bytes, bytearray, memoryview)):
                raise TypeError(f"metadata codec encode() returned {type(out).__name__}, not bytes")
            return bytes(out)
        raw: bytes = self._enc.encode(obj)
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
        ``encode(obj) -> bytes`` and ``decode(bytes) -> obj``. Whatever the codec, a
        value that is not of the ``metadata`` type is refused before it is encoded.
    :param data: the data codec, an object with ``load(path)`` and ``save(value, path)``:
        ``BytesData()`` (default), ``MsgspecData(type)``, or your own. Your own ``save``
        is given a path with nothing at it (a file left there is removed first; a
        symlink planted there fails the write with ``ELOOP``), to create the file.
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
    :param syncfs: opt-in (default ``False``): a ``"full"`` ``enqueue_many`` of several
        entries makes its files and directories durable with one ``syncfs(2)`` of the
        spool's filesystem instead of an fsync per file. That writes back every dirty file
        of the filesystem, other programs' too: a large gain on a filesystem of its own,
        a loss on a busy shared one. Writeback errors still raise (Linux >= 5.8 only;
        elsewhere, and for single enqueues, fsync is used).

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
        syncfs: bool = ...,
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
        syncfs: bool = ...,
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
        syncfs: bool = ...,
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
        syncfs: bool = ...,
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
        syncfs: bool = False,
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
        for kw, mode in (("file_mode", file_mode), ("dir_mode", dir_mode)):
            # Permission bits only (0o7777): os.open and os.mkdir pass any int through,
            # so -1 would create files with every bit set (setuid, setgid, executable).
            if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
                raise ValueError(f"{kw} must be an int of permission bits (0 to 0o7777), got {mode!r}")
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
        # Opt-in: a batch (enqueue_many) with durability "full" makes its files and
        # directories durable with one syncfs(2) of the spool's filesystem instead of an
        # fsync per file. It writes back every dirty file of that filesystem, other
        # programs' too: fast on a filesystem of its own, slow on a busy shared one.
        # Used only where syncfs reports writeback errors (Linux >= 5.8); elsewhere
        # fsync is used as without it.
        self.syncfs = bool(syncfs) and _fs.HAVE_SYNCFS
        self._codec = _Codec(metadata_codec, metadata)
        # Resolved once: these sit on every operation's path.
        self._throttle_cm: AbstractContextManager[Any] | None = (
            _NULL_CM if throttle is None else throttle if hasattr(throttle, "__enter__") else None
        )
        self._data_encode: Callable[[Any], bytes] | None = getattr(data, "_encode", None)
        self._data_decode: Callable[[bytes], Any] | None = getattr(data, "_decode", None)
        self._queue_list: tuple[enum.Enum, ...] = tuple(members)
        # By member name, not by member: an Enum's __hash__ is Python code, one call more
        # on every operation's path (dirname is called up to three times per save).
        self._dirnames: dict[str, tuple[enum.Enum, str]] = {m._name_: (m, str(m.value)) for m in members}

    # -- helpers used by the spool ----------------------------------------------------
    def dirname(self, queue: enum.Enum) -> str:
        """The directory name of ``queue``; ValueError if it is not one of our queues."""
        try:
            member, name = self._dirnames[queue._name_]
            if member is queue:  # not another Enum's member of the same name
                return name
        except (KeyError, AttributeError, TypeError):
            pass
        raise ValueError(f"{queue!r} is not a member of {self.queues.__name__}")

    def throttled(self) -> AbstractContextManager[Any]:
        """The context to enter around one disk operation."""
        cm = self._throttle_cm
        if cm is not None:
            return cm
        return typing.cast(AbstractContextManager[Any], self.throttle())

    def data_writer(self, value: Any) -> Callable[[str, _FileHold | None, bool], None]:
        """Validate data ``value`` now (nothing touches disk) and return what writes it,
        unsynced, at a path: the codec's bytes written with the spool's file mode, or its
        own ``save``. The writer's second argument, if given, is where it may leave the
        file's descriptor open (``_fs.write_file``'s ``holder``; left empty, the file is
        synced by path); the third says the file will be fsynced soon (see
        ``_fs.start_writeback``)."""
        enc = self._data_encode
        if enc is not None:
            return BytesWriter(enc(value), self.file_mode)
        write = getattr(self.data, "_write", None)
        if write is not None:  # a codec that streams (FileData): checked now, written later
            check = getattr(self.data, "_check", None)
            if check is not None:
                check(value)
            mode = self.file_mode

            def write_stream(path: str, hold: _FileHold | None, writeback: bool) -> None:
                write(value, path, mode)

            return write_stream
        save = self.data.save

        def write_own(path: str, hold: _FileHold | None, writeback: bool) -> None:
            _clear_for_codec(path)
            save(value, path)

        return write_own

    def encode_data(self, value: Any, path: str, *, sync: bool) -> None:
        """Write data ``value`` at ``path`` with the data codec, durably if ``sync``. The
        spool calls it for files of entries whose owner lock it holds (see write_file's
        ``owned``)."""
        enc = self._data_encode
        if enc is not None:
            write_file(path, enc(value), sync=sync, mode=self.file_mode, owned=True)
        elif hasattr(self.data, "_write"):
            self.data_writer(value)(path, None, False)
            if sync:
                fsync_file(path)
        else:
            _clear_for_codec(path)
            self.data.save(value, path)
            if sync:
                fsync_file(path)

    def __repr__(self) -> str:
        return (
            f"Spoolable(queues={self.queues.__name__}, metadata={self.metadata!r}, "
            f"metadata_codec={self.metadata_codec!r}, data={self.data!r}, "
            f"durability={self.durability!r}, quarantine={self.quarantine!r})"
        )
