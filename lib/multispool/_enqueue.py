"""The enqueue pipeline: one entry, a batch, and concurrent enqueues of one process.

Every enqueue goes through these steps, in this order, and only here:

    validate    encode every item: nothing touches disk before all of them pass
    write       reserve each name (.registry/NAME, created locked), write .tmp/NAME and
                .data/NAME, without syncing
    sync files  fsync the tmp and data files                     (durability file, full)
    sync dirs   fsync .registry and .data, once for everything committed together  (full)
    publish     rename each .tmp/NAME into QUEUE/NAME, then release the owner locks
    sync queue  fsync each queue dir that received entries, once                   (full)

Publish is the only step that makes an entry visible, and it comes after every sync
that makes the entry's files durable: no crash leaves an entry in a queue whose data,
metadata or reservation is not on disk. Up to publish, a failure removes everything the
failed enqueue created (reservations, tmp and data files) and releases its locks. After
it (a queue dir sync that fails, a rename of a batch that fails and whose earlier ones
cannot be undone), the entries published stay, and the error raised says which
(``_errors._PublishedError``): a caller who took it for "not enqueued" would enqueue
them twice.

Why these five syncs ("full"): the tmp file's and the data file's contents, the names in
``.data`` and ``.registry`` (an entry whose reservation is lost cannot be claimed) must
be durable before the rename, and the queue dir after it, before returning. What this
module changes is how often they happen, not which: the directory syncs are shared.

Group commit ("full"): enqueues running at the same time in threads of this process
(``enqueue`` from many threads, ``AsyncSpool.enqueue`` from many tasks, ``enqueue_many``)
hand their entries to the committer. One of them, the leader, takes every entry
waiting, syncs their files and each directory once for the whole group, all in flight
at once (``_aio``; from a pool of threads where AIO is not to be had), publishes
every entry (stage one), then syncs each queue dir once (stage two) and wakes the
others. Stage one is exclusive, stage two is not: the next leader starts its own
round while this one's queue dir syncs run. An enqueue that arrives alone leads at
once: it waits for nobody. Each call still returns only when its own entries
are durable, and gets its own errors (a failed directory sync fails every enqueue
that needed that directory).

The leader also writes its followers' entries (single ``enqueue`` calls whose data is
bytes, ``_fs.BytesWriter``): an enqueue that finds a round under way hands over its
encoded item and waits, and the next leader writes every waiting entry, one after
another, taking in those that arrive meanwhile, before the group's syncs. Measured
(docs/benchmarks-batch.md), 8 threads that each wrote their own entry spent 0.6 ms
on it, taking turns for the GIL with the rest, and so joined only every other round;
one writer takes 40 us per entry, and every thread is in every round. The entry's
name is proposed by its caller, in its own thread, before it hands over: a name
generator is the user's code, which may keep per-thread state (a thread-local, a
context variable) and whose errors are its caller's. The leader only reserves that
name; one it finds taken sends the enqueue back to its caller's thread, which asks
the generator for its next attempts and writes its entry itself.

The main thread never joins a group: it syncs its own entries (through AIO when other
enqueues are under way). Python runs signal handlers there, between any two bytecodes,
and an exception one raises inside ``threading.Condition.wait`` (KeyboardInterrupt, a
handler's own) can leave the condition's lock released while its caller believes it
holds it: the committer would be broken for every thread. Nor could a leader there
tell a handler's exception, raised while it wrote a follower's entry, from that
entry's own error.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import operator
import os
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from . import _aio, _fs
from . import _spool as _spool_module  # a cycle: _spool imports this module; used at call time
from ._errors import _PublishedError
from ._fs import At
from ._spoolable import TimeOrderedNames

if TYPE_CHECKING:
    from ._spool import Spool, _Claim

log = logging.getLogger("multispool")

# Where AIO is not to be had, the syncs of a round are issued from this many threads at
# once (docs/benchmarks.md: on ext4 and xfs, concurrent fsyncs share journal commits;
# beyond a few threads the gain was flat while the cost in threads was not).
SYNC_THREADS: Final = 16
# Benchmarks switch this off to measure enqueues that each sync on their own.
GROUP_COMMIT = True
# True: the group's leader syncs every member's files together with the directories, in
# one round from the pool; False: each enqueue syncs its own files in its own thread
# before joining the group. Chosen by measurement (docs/benchmarks-batch.md).
LEADER_SYNCS_FILES = True
# True: the leader writes the entries of single enqueues of bytes (see the module
# docstring); False: every enqueue writes its own before joining a group.
LEADER_WRITES = True
# At most this many enqueues in one round: a leader that keeps taking in newcomers
# while it writes must stop some time and sync.
GROUP_MAX: Final = 128


class Staged:
    """One entry written to disk but not yet published; holds its owner lock."""

    __slots__ = (
        "abandoned", "data", "data_hold", "dst", "name", "owner", "published", "qdir", "reg", "tmp",
        "tmp_hold",
    )

    def __init__(
        self, name: str, owner: _Claim, reg: str, tmp: str, data: str, qdir: str, dst: str, hold: bool
    ) -> None:
        self.name = name
        self.owner = owner  # holds the owner lock from the step that opened it
        self.reg = reg
        self.tmp = tmp
        self.data = data
        self.qdir = qdir
        self.dst = dst
        self.published = False
        self.abandoned = False  # cleanup was attempted: never twice (its lock is released)
        # The written files' descriptors, where the writer kept them open (see write()),
        # recorded as they are opened; empty: synced by path. ``hold`` False: the files
        # are not kept open, and both share _UNHELD (no allocation per entry).
        self.tmp_hold = _fs._FileHold() if hold else _UNHELD
        self.data_hold = _fs._FileHold() if hold else _UNHELD

    def files(self) -> list[tuple[str, int | None]]:
        return [(self.tmp, self.tmp_hold.fd), (self.data, self.data_hold.fd)]

    def close_files(self) -> None:
        for hold in (self.tmp_hold, self.data_hold):
            if hold.fd is not None:
                _fs._close_held(hold.fd, hold)

    def unlock(self) -> None:
        self.owner.release()

    def abandon(self) -> None:
        """Remove what this enqueue created and release its lock (before publish). Tried
        once: if an interrupt stops it, the lock is released all the same and
        clean_abandoned removes what is left. A file that cannot be removed (EIO...) is
        logged by path, and nothing is raised for it: the caller is already raising the
        enqueue's own error, which must be the one that reaches its caller. The other
        file is removed all the same; the reservation only once both are gone, so that
        what is left is an abandoned enqueue (its name free of any lock), which
        ``clean_abandoned`` finishes, rather than a file that no name accounts for."""
        self.abandoned = True
        try:
            try:
                self.close_files()
            except OSError as e:
                log.warning("multispool: failed enqueue: cannot close %s or %s: %s", self.tmp, self.data, e)
            left = False
            for path in (self.tmp, self.data, self.reg):
                if path is self.reg and left:
                    break
                try:
                    _fs.unlink_quiet(path)
                except OSError as e:
                    left = True
                    log.warning(
                        "multispool: failed enqueue: cannot remove %s, left for clean_abandoned: %s", path, e
                    )
        finally:
            self.unlock()


class _NameTaken(Exception):
    """The name an enqueue's caller proposed was taken when its group's leader came to
    reserve it: the caller goes on in its own thread (``enqueue``)."""


# Both holds of a Staged whose files are not kept open: never given to a writer (write()
# passes None then), so its ``fd`` stays None.
_UNHELD: Final = _fs._FileHold()
_NAME: Final = operator.attrgetter("name")


# -- write ------------------------------------------------------------------------------
Item = tuple[bytes, Callable[[str, "_fs._FileHold | None", bool], None]]


def enqueue(
    spool: Spool[Any, Any],
    dirname: str,
    items: Sequence[Item],
    *,
    reserve: Any = None,
    use: str | None = None,
    sfd: int | None = None,
    prepare: Callable[[list[Staged]], None] | None = None,
    keep_open: bool = True,
) -> list[str]:
    """The whole pipeline for ``items`` (encoded metadata, writer of the data file at a
    path) into queue dir ``dirname``: write, then ``commit``. Returns the names. The
    list of staged entries lives in this frame from the start, so an exception that
    interrupts between two steps (a signal handler's) still finds everything to undo.
    ``prepare(staged)`` runs between the two, while every entry's owner lock is held
    (a delayed enqueue writes its due time there). ``keep_open``: the written files stay
    open until synced, and are synced through their descriptors (three open files
    per entry instead of one: see ``_fs.make_room_for_locks``)."""
    staged: list[Staged] = []
    # Nothing syncs the files of a "none" enqueue: no reason to keep them open.
    durable = spool.spoolable.durability != "none"
    keep_open = keep_open and durable
    try:
        if durable and _leader_writes(spool, items, sfd):
            # The name is proposed here, in the caller's thread: the generator is the
            # user's code (thread-local state, context variables, its own errors).
            proposed = None if use is not None else spool._propose(reserve, 0)
            lay = spool._layout
            job = _Job(staged, lay.registry, lay.data, files_synced=False, sfd=None)
            job.pending = functools.partial(
                _write_job, spool, staged, dirname, items, reserve, use, prepare, keep_open, proposed
            )
            try:
                _committer.commit(job)  # the leader of its round (this call, or another) writes it
            except _NameTaken:
                # Nothing was written. The generator's next attempts, and the writes, in
                # this thread; then a group commit of the written entry, as below.
                write(
                    spool, staged, dirname, items, reserve=reserve, first=1,
                    writeback=_writeback(spool, items, sfd), keep_open=keep_open,
                )
                if prepare is not None:
                    prepare(staged)
                commit(spool, staged, sfd)
            finally:
                _release(staged)
        else:
            wb = durable and _writeback(spool, items, sfd)
            write(spool, staged, dirname, items, reserve=reserve, use=use, writeback=wb, keep_open=keep_open)
            if prepare is not None:
                prepare(staged)
            commit(spool, staged, sfd)
    except BaseException as e:
        try:
            abandon(staged)  # again: what commit did not get to (published entries are kept)
        finally:
            # Again too: an interrupt may have cut commit's short (a published entry's
            # files still open, its lock still held).
            _release(staged)
        # Entries already published (the queue dir's sync failed, or a rename of the batch
        # whose undo failed too) stay: a consumer may have one. The error says so, by
        # name, lest the caller take it for "not enqueued" and enqueue them twice. Those
        # failures are OSErrors; anything else here is an interrupt (KeyboardInterrupt,
        # a signal handler's exception), raised as it is.
        published = {i: st.name for i, st in enumerate(staged) if st.published}
        if published and isinstance(e, OSError):
            raise _PublishedError.of(e, published, staged[0].qdir, len(items)) from e
        raise
    return list(map(_NAME, staged))  # no comprehension: a call fewer per enqueue


# Where Python runs signal handlers: the main thread, or in a forked child the thread
# that forked (``_reset_after_fork``). Compared by ident: one C call on every enqueue's
# path, where ``current_thread() is main_thread()`` took three Python calls.
_main_ident = threading.main_thread().ident


def _in_main_thread() -> bool:
    return threading.get_ident() == _main_ident


def _leader_writes(spool: Spool[Any, Any], items: Sequence[Item], sfd: int | None) -> bool:
    """Whether the leader of the group may write this enqueue's entry: one entry of
    bytes, synced by a group ("full", group commit on, no syncfs, not the main thread)."""
    return (
        LEADER_WRITES
        and GROUP_COMMIT
        and LEADER_SYNCS_FILES
        and sfd is None
        and len(items) == 1
        and isinstance(items[0][1], _fs.BytesWriter)
        and spool.spoolable.durability == "full"
        and not _in_main_thread()
    )


def _write_job(
    spool: Spool[Any, Any],
    staged: list[Staged],
    dirname: str,
    items: Sequence[Item],
    reserve: Any,
    use: str | None,
    prepare: Callable[[list[Staged]], None] | None,
    keep_open: bool,
    proposed: str | None,
    writeback: bool,
) -> None:
    """The write steps of ``enqueue``, run by the leader of the enqueue's group, under
    the name its caller ``proposed`` (unless it ``use``s one): _NameTaken if that is
    taken, the generator's other attempts being for the caller's thread."""
    write(
        spool, staged, dirname, items, reserve=reserve, use=use, writeback=writeback, keep_open=keep_open,
        proposed=proposed,
    )
    if prepare is not None:
        prepare(staged)


def _writeback(spool: Spool[Any, Any], items: Sequence[Item], sfd: int | None) -> bool:
    """Whether to start each file's writeback as it is written (``_fs.start_writeback``):
    where its fsyncs will be issued one after another, or from threads. There it puts
    every block allocation into one journal transaction, committed once (a lone
    enqueue: 3 commits -> 2, 1.3x). Not for what will be synced together through AIO (a
    batch, or an enqueue among others under way): the fsyncs in flight together get the
    same commit sharing without it, and the hints' calls, one by one in the writer,
    cost more than they save (batch of 100: 12.7 against 15.1 ms on ext4, 13.3 against
    16.1 ms on xfs; a journal busy with other writers makes each call wait). Nor for a
    syncfs batch: its one sweep merges the writes, which early starts would split."""
    if spool.spoolable.durability == "none" or sfd is not None:
        return False
    if not _aio._usable:
        return True
    return len(items) == 1 and _committer._active == 0


def write(
    spool: Spool[Any, Any],
    staged: list[Staged],
    dirname: str,
    items: Sequence[Item],
    *,
    reserve: Any = None,
    use: str | None = None,
    writeback: bool = False,
    keep_open: bool = False,
    proposed: str | None = None,
    first: int = 0,
) -> None:
    """Reserve a name for each item and write its metadata and data (not synced),
    recording each entry in ``staged`` as soon as its name is reserved. On failure,
    everything written so far is removed and the error raised. ``writeback``: the files
    will be fsynced; start their writeback as each is written (``_fs.start_writeback``).
    ``keep_open``: leave the files open in the entry's holders (``Staged.files``), to be
    synced through their descriptors rather than reopened by path (four system calls
    fewer per file); a writer that cannot (a codec's own ``save``) leaves its holder
    empty. ``proposed`` (one item): the name to reserve, already checked, without asking
    the generator; _NameTaken if it is taken. ``first``: the generator's first attempt."""
    sp = spool.spoolable
    lay = spool._layout
    qdir = lay.queue(dirname)

    owner: _Claim | None = None  # a reservation not yet in ``staged``
    try:
        for raw, write_data in items:
            owner = _spool_module._Claim(None)
            if use is not None:
                spool._take_reservation(use, owner)
                name = use
            elif proposed is not None:
                name = proposed
                if _fs.create_locked(lay.registry, lay.registry_file(name), sp.file_mode, owner) is None:
                    raise _NameTaken(name)
                if type(sp.name_generator) is not TimeOrderedNames and spool._orphan_in_the_way(name, owner):
                    raise _NameTaken(name)
            else:
                name = spool._reserve(reserve, owner, sync=False, first=first)
            staged.append(
                Staged(
                    name, owner, lay.registry_file(name), lay.tmp_file(name), lay.data_file(name),
                    qdir, lay.queue_file(dirname, name), keep_open,
                )
            )
            owner = None
            st = staged[-1]
            # A descriptor kept open is recorded in its holder in the step that opens it: a
            # signal handler's exception cannot lose it between a return and a store.
            _fs.write_file(
                st.tmp, raw, sync=False, mode=sp.file_mode, owned=True, writeback=writeback,
                holder=st.tmp_hold if keep_open else None,
            )
            write_data(st.data, st.data_hold if keep_open else None, writeback)
    except BaseException:
        # Interrupted between reserving a name and recording it in ``staged``: the
        # registry file is ours if the lock is (the reservation returned or created it).
        if owner is not None and (not staged or staged[-1].owner is not owner):
            try:
                if owner.fd is not None and owner.path is not None:
                    _fs.unlink_quiet(owner.path)
            finally:
                owner.release()
        abandon(staged)
        raise


def abandon(staged: Iterable[Staged]) -> None:
    """Remove every unpublished entry of ``staged`` (``Staged.abandon``); an exception
    that interrupts one (a signal handler's) is raised once every other was tried."""
    err: BaseException | None = None
    for st in staged:
        if st.published or st.abandoned:
            continue
        try:
            st.abandon()
        except BaseException as e:  # keep cleaning the others
            err = err or e
    if err is not None:
        raise err


# -- sync -------------------------------------------------------------------------------
class _SyncPool:
    """Threads that issue fsyncs at once (journalling filesystems merge concurrent fsyncs
    into shared commits). Started on demand, up to SYNC_THREADS; a thread idle for
    IDLE_EXIT seconds ends, so an idle process keeps none, while back-to-back batches
    reuse them (starting 16 threads per batch costs ~1 ms)."""

    IDLE_EXIT: Final = 0.2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: queue.SimpleQueue[tuple[Callable[[], None], concurrent.futures.Future[None]]] = (
            queue.SimpleQueue()
        )
        self._threads = 0
        # Threads waiting for a task that no submit has counted on yet. A submit counts on
        # one at once (not when it wakes): else every task queued before the idle
        # threads woke counted on the same ones, and a round ran on fewer threads.
        self._free = 0

    def submit(self, fn: Callable[[], None]) -> concurrent.futures.Future[None]:
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            self._tasks.put((fn, fut))
            if self._free > 0:
                self._free -= 1
            elif self._threads < SYNC_THREADS:
                self._threads += 1
                threading.Thread(target=self._work, name="multispool-sync", daemon=True).start()
        return fut

    def _work(self) -> None:
        while True:
            try:
                fn, fut = self._tasks.get(timeout=self.IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    # Leave only with nothing queued (a submit puts under this lock): no
                    # task can be left behind. The count may have been on us, or stale
                    # (another thread took the task a submit counted us for).
                    if self._tasks.empty():
                        self._free = max(0, self._free - 1)
                        self._threads -= 1
                        return
                continue
            try:
                fn()
            except BaseException as e:
                fut.set_exception(e)
            else:
                fut.set_result(None)
            with self._lock:
                self._free += 1


_pool = _SyncPool()


def run_all(calls: Sequence[Callable[[], None]]) -> list[BaseException | None]:
    """Run every call, from up to SYNC_THREADS threads at once, this one included; each
    thread takes every k-th call in turn, so a batch costs k - 1 thread hand-offs, not one
    per call (a hand-off is a futex wake-up, 0.1-1 ms on a virtual machine). Returns
    each call's exception, or None, in order, once every call has finished."""
    n = len(calls)
    errs: list[BaseException | None] = [None] * n
    k = min(SYNC_THREADS, n)

    def share(first: int) -> None:
        for i in range(first, n, k):
            try:
                calls[i]()
            except BaseException as e:
                errs[i] = e

    futs = [_pool.submit(functools.partial(share, i)) for i in range(1, k)]
    try:
        if k:
            share(0)
    finally:
        for f in futs:
            f.exception()  # wait: the other threads work on the caller's files
    return errs


def fsync_together(targets: Sequence[tuple[str, int | None, bool]]) -> list[BaseException | None]:
    """fsync every target (path, its open descriptor or None, whether it is a directory),
    all at once: through AIO (``_aio``), else from the sync pool's threads. Returns each
    target's error (naming its path) or None, in order, once every one has finished."""
    errs = _aio.fsync_all(targets)
    if errs is not None:
        return errs
    return run_all(
        [
            functools.partial(_fs.fsync_dir, p) if is_dir else functools.partial(_fs.fsync_file, p, fd)
            for p, fd, is_dir in targets
        ]
    )


def sync_files(staged: Sequence[Staged]) -> None:
    """fsync every staged entry's tmp and data files; the first error is raised."""
    files = [f for st in staged for f in st.files()]
    if len(files) <= 2:
        # One entry's two files: measured, a hand-off (to a thread or the kernel's
        # workers) costs a lone enqueue more than it saves (docs/benchmarks.md).
        for path, fd in files:
            _fs.fsync_file(path, fd)
        return
    err = next((e for e in fsync_together([(p, fd, False) for p, fd in files]) if e is not None), None)
    if err is not None:
        raise err


# -- publish ----------------------------------------------------------------------------
def publish(staged: Sequence[Staged]) -> None:
    """Rename every entry into its queue, then release the locks. If a rename fails,
    those already made are undone (nobody can have claimed them: we hold their locks)
    and the error is raised, the entries left unpublished: all or nothing. An interrupt
    (KeyboardInterrupt, a signal handler's exception) that arrives just after a rename
    keeps the entries renamed so far: they are whole and their files durable.

    Each entry's files are closed first, every one before the first rename: a close
    after it would be a close of a file in the queue, which inotify reports
    (``IN_CLOSE_WRITE``) and which would wake every reader of the queue a second time
    for one arrival. A close that fails (a network filesystem's EIO) leaves the whole
    batch unpublished."""
    for s in staged:
        # Checked here: a group's leader has closed them already, "none" never opens.
        if s.tmp_hold.fd is not None or s.data_hold.fd is not None:
            s.close_files()
    done: list[Staged] = []
    st = None
    try:
        for st in staged:
            tmp, dst = st.tmp, st.dst
            if type(tmp) is At and type(dst) is At:
                # Through the spool's held directories (_layout.Layout): a queue or .tmp
                # dir swapped for a symlink leads nowhere else. Inline: no Python call.
                os.rename(tmp.rel, dst.rel, src_dir_fd=tmp.home.fd, dst_dir_fd=dst.home.fd)
            else:
                os.rename(tmp, dst)
            done.append(st)  # before the flag: an interrupt between is seen below
            st.published = True
    except BaseException as e:
        if isinstance(e, OSError) and st is not None and not st.published:
            _fs._renamed(e, st.tmp, st.dst)  # named by the whole paths
        if st is not None and not st.published and not _exists(st.tmp) and _exists(st.dst):
            st.published = True  # the rename happened: an interrupt, not a failed rename
            for s in staged:
                if s.published:
                    s.owner.release()
            raise
        for st in reversed(done):
            try:
                _fs.rename(st.dst, st.tmp)
            except OSError:
                st.owner.release()  # stays published: it is in its queue, complete and durable files
                continue
            st.published = False
        raise
    for st in staged:
        st.owner.release()


def _exists(path: str) -> bool:
    """Whether ``path`` exists, as the spool reaches it (False on any error)."""
    try:
        return _fs.lexists(path)
    except OSError:
        return False


# -- commit: sync dirs, publish, sync queue ----------------------------------------------
class _Job:
    __slots__ = (
        "data_dir", "done", "error", "files_synced", "follower", "lead", "pending", "registry", "sfd",
        "staged", "taken", "wake",
    )

    def __init__(
        self, staged: Sequence[Staged], registry: str, data_dir: str, files_synced: bool, sfd: int | None
    ) -> None:
        self.staged = staged
        self.files_synced = files_synced
        self.sfd = sfd  # syncfs descriptor (opened before the writes), or None: fsync
        self.registry = registry
        self.data_dir = data_dir
        self.taken = False  # a leader has it in its group
        self.follower = False  # found a round under way: sleeps until done or woken to lead
        self.lead = False  # woken to lead the next round
        self.wake = threading.Lock()  # released once, when done or to lead
        self.wake.acquire()
        # Its entries are not written yet: the leader calls this with the writeback hint
        # (see ``_writeback``) before the round's syncs.
        self.pending: Callable[[bool], None] | None = None
        self.done = False
        self.error: BaseException | None = None


def _fsync_dir_err(path: str) -> BaseException | None:
    try:
        _fs.fsync_dir(path)
    except BaseException as e:
        return e
    return None


def _sync_round(group: Sequence[_Job], crowded: bool = False) -> None:
    """Before publishing: the files of the jobs that left them to the group, and each
    directory once (or one syncfs for a job that opted in). A bigger group issues every
    sync at once (``_aio``, else from the pool's threads), so the journal merges them
    into as few commits and cache flushes as it can. One job of one entry syncs
    serially (the lone enqueue: measured, the kernel workers' wake-ups cost it more
    than they save), unless ``crowded`` (other enqueues of this process are under way:
    its round holds up theirs, so its syncs go at once through AIO, where it is had)."""
    fsync_jobs = [j for j in group if j.sfd is None]
    files = [(j, f) for j in fsync_jobs if not j.files_synced for st in j.staged for f in st.files()]
    dirs = list({d: None for j in fsync_jobs for d in (j.registry, j.data_dir)})
    whole = [j for j in group if j.sfd is not None]
    if len(files) <= 2 and len(group) == 1 and not whole and not (crowded and _aio._usable):
        for j, (p, fd) in files:
            try:
                _fs.fsync_file(p, fd)
            except BaseException as e:
                j.error = j.error or e
                return  # the job has failed: its directories need no sync
        derrs = {d: _fsync_dir_err(d) for d in dirs}
    else:
        if whole:
            derrs = _sync_with_syncfs(files, dirs, whole)
        else:
            if _aio._usable and not _in_main_thread():
                # Every file's data written before any fsync forces the log (see there).
                # Not in the main thread: a signal handler's exception between two of its
                # closes would leave the other descriptors open. A writeback error it
                # saw is its file's: the fsync that follows would not report it again.
                werrs = _fs.write_out([f for _, f in files])
                for (j, _), err in zip(files, werrs, strict=True):
                    j.error = j.error or err
            derrs = _sync_together(files, dirs)
    for j in fsync_jobs:
        j.error = j.error or derrs[j.registry] or derrs[j.data_dir]


def _sync_together(
    files: list[tuple[_Job, tuple[str, int | None]]], dirs: list[str]
) -> dict[str, BaseException | None]:
    """A round's file and dir fsyncs all at once (``fsync_together``): each file's error
    to its job; returns each dir's."""
    errs = fsync_together([(p, fd, False) for _, (p, fd) in files] + [(d, None, True) for d in dirs])
    for (j, _), err in zip(files, errs, strict=False):
        j.error = j.error or err
    return dict(zip(dirs, errs[len(files) :], strict=True))


def _sync_with_syncfs(
    files: list[tuple[_Job, tuple[str, int | None]]], dirs: list[str], whole: list[_Job]
) -> dict[str, BaseException | None]:
    """``_sync_together`` for a round with jobs that opted into syncfs: their syncfs and
    the others' fsyncs from the sync pool's threads, at once."""
    calls: list[Callable[[], None]] = [functools.partial(_fs.fsync_file, p, fd) for _, (p, fd) in files]
    owners = [j for j, _ in files]
    for j in whole:
        assert j.sfd is not None
        calls.append(functools.partial(_fs.syncfs, j.sfd, os.path.dirname(j.registry)))
        owners.append(j)
    calls += [functools.partial(_fs.fsync_dir, d) for d in dirs]
    errs = run_all(calls)
    for j, err in zip(owners, errs[: len(owners)], strict=True):
        j.error = j.error or err
    return dict(zip(dirs, errs[len(owners) :], strict=True))


# The queue dirs a stage-one round published into, each with the jobs that need its sync.
QueueSyncs = dict[str, list[_Job]]


def _publish_group(group: Sequence[_Job], crowded: bool = False) -> QueueSyncs:
    """Stage one of a round: sync files and dirs (each dir once), then publish each job.
    Returns the queue dirs to sync (stage two). Errors go to the jobs they concern.
    ``crowded``: see ``_sync_round``."""
    _sync_round(group, crowded)
    qdirs: QueueSyncs = {}
    for j in group:
        if j.error is not None:
            continue
        try:
            # Synced: the files' descriptors have served. The leader closes them before
            # the renames, so that a close that fails (a network filesystem's EIO) fails
            # the job before it is published. (Followers closing their own as they woke
            # once held up the next leader on a descriptor lock shared by the process;
            # each thread now has its own: docs/benchmarks-batch.md.)
            for st in j.staged:
                st.close_files()
            publish(j.staged)
        except BaseException as e:
            j.error = e
            continue
        for q in {st.qdir for st in j.staged}:
            qdirs.setdefault(q, []).append(j)
    return qdirs


def _publish_lone(job: _Job, crowded: bool = False) -> QueueSyncs:
    """``_publish_group`` for a group of one job, without its bookkeeping: the path of
    every enqueue that meets no concurrent one, kept as cheap as the recipe before groups.
    ``crowded``: see ``_sync_round``."""
    if len(job.staged) != 1 or job.sfd is not None or (crowded and _aio._usable):
        return _publish_group([job], crowded)
    st = job.staged[0]
    try:
        if not job.files_synced:
            _fs.fsync_file(st.tmp, st.tmp_hold.fd)
            _fs.fsync_file(st.data, st.data_hold.fd)
        _fs.fsync_dir(job.registry)
        _fs.fsync_dir(job.data_dir)
        publish(job.staged)
    except BaseException as e:
        job.error = e
        return {}
    return {st.qdir: [job]}


def _sync_queues(qdirs: QueueSyncs) -> None:
    """Stage two of a round: sync each queue dir that received entries, once."""
    for q, jobs in qdirs.items():
        qerr = _fsync_dir_err(q)
        if qerr is not None:
            for j in jobs:
                j.error = j.error or qerr


def _run_lone(job: _Job, crowded: bool = False) -> None:
    """Both stages for one job."""
    _sync_queues(_publish_lone(job, crowded))


class _Committer:
    """Leader/follower group commit (see the module docstring), in two stages. A leader
    takes every waiting job, syncs their files and directories and publishes them
    (stage one), then syncs the queue dirs (stage two). Only stage one is exclusive: the
    next leader starts its own stage one while this one's queue dir syncs run, so a
    journalling filesystem can fold the two into one commit instead of running them
    back to back.

    A follower sleeps on a lock of its own (``_Job.wake``), released once: when its
    round has ended, or when it is to lead the next round. Sleeping on a shared
    condition, every follower woken at the end of a round queued up for the condition's
    lock, one after another: with 8 threads, 0.5 ms of a 3 ms round went by before the
    last of them was back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[_Job] = []  # not yet in a round
        self._busy = False  # a leader is in stage one, or a job has been woken to lead
        self._active = 0  # jobs in commit(), in either stage or waiting

    @property
    def _want_lead(self) -> int:
        """Followers asleep and not yet in a round (for tests and diagnostics)."""
        return sum(1 for j in self._waiting if j.follower and not j.lead)

    def _sleep(self, job: _Job) -> None:
        """Block until ``job.wake`` is released: its round has ended, or it leads."""
        job.wake.acquire()

    def _await_done(self, job: _Job) -> None:
        # The job is in a leader's round: wait until the round ends, even when interrupted
        # (the leader works on our files; the caller cleans up after it).
        err: BaseException | None = None
        while not job.done:
            try:
                self._sleep(job)
            except BaseException as e:
                err = err or e
        if err is not None:
            raise err

    def _take(self, group: list[_Job]) -> None:
        # Lock held. Move waiting jobs into this leader's round, up to GROUP_MAX.
        room = GROUP_MAX - len(group)
        for j in self._waiting[:room]:
            j.taken = True
            group.append(j)
        del self._waiting[:room]

    def _hand_off(self) -> None:
        # Lock held, stage one over: wake the first job still waiting to lead the next
        # round (it takes every waiting job); ``_busy`` stays set for it meanwhile, so
        # that a job arriving now does not lead a round of its own.
        self._busy = False
        if self._waiting:
            nxt = self._waiting[0]
            nxt.lead = True
            self._busy = True
            nxt.wake.release()

    def _write_pending(self, group: list[_Job], alone: bool) -> None:
        """Write every unwritten entry of ``group``, taking in the jobs that arrive
        meanwhile (into ``group``, which the caller marks done whatever happens). A
        write's error is its job's: it is raised in that job's own thread."""
        i = 0
        while True:
            for j in group[i:]:
                write_job, j.pending = j.pending, None
                if write_job is None:
                    continue
                # As ``_writeback``: the hint where the syncs go one by one (a lone entry)
                # or from threads.
                try:
                    write_job(not _aio._usable or (alone and len(group) == 1))
                except BaseException as e:
                    # write() removed what it had written. No signal handler runs in this
                    # thread (never the main one): the error is the write's own.
                    j.error = e
            i = len(group)
            with self._lock:
                self._take(group)
                if len(group) == i:
                    return

    def commit(self, job: _Job) -> None:
        with self._lock:  # one step: counted, queued, and told whether a round is under way
            self._active += 1
            self._waiting.append(job)
            job.follower = self._busy
            self._busy = True
        try:
            self._commit(job)
        finally:
            with self._lock:
                self._active -= 1

    def _follow(self, job: _Job) -> None:
        """Sleep until ``job`` is done (its round has ended) or is to lead. Interrupted:
        not yet in a round, it withdraws (passing the lead on if it was woken to lead);
        in a round, it waits for the round to end; then the interrupt is raised."""
        try:
            self._sleep(job)
        except BaseException:
            with self._lock:
                if not job.done and not job.taken:
                    self._waiting.remove(job)
                    if job.lead:
                        job.lead = False
                        self._hand_off()
                    raise
            self._await_done(job)
            raise

    def _commit(self, job: _Job) -> None:
        if job.follower:
            self._follow(job)
            if job.done:
                if job.error is not None:
                    raise job.error
                return
        with self._lock:
            group: list[_Job] = []
            self._take(group)
            alone = self._active == 1
        qdirs: QueueSyncs = {}
        try:
            try:
                if any(j.pending is not None for j in group):
                    self._write_pending(group, alone)
                ready = [j for j in group if j.error is None]
                if len(group) == 1 and alone:
                    qdirs = _publish_lone(job) if ready else {}
                elif ready:
                    qdirs = _publish_group(ready, True)
            finally:
                with self._lock:
                    self._hand_off()
            _sync_queues(qdirs)
        except BaseException as e:  # pragma: no cover - the stages hand errors to jobs
            for j in group:
                j.error = j.error or e
        finally:
            with self._lock:
                for j in group:
                    j.done = True
            for j in group:
                if j is not job:
                    j.wake.release()
        if job.error is not None:
            raise job.error


_committer = _Committer()


def _reset_after_fork() -> None:
    # The parent's threads (a leader among them) do not exist in a forked child, and the
    # thread that forked is its main thread (threading's own fork hook, registered
    # before this module's, has made it so).
    global _committer, _pool, _main_ident
    _committer = _Committer()
    _pool = _SyncPool()
    _main_ident = threading.main_thread().ident

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def commit(spool: Spool[Any, Any], staged: Sequence[Staged], sfd: int | None = None) -> None:
    """Make ``staged`` (files written) durable and visible: sync files, sync dirs, publish,
    sync queue dirs, as the durability asks; with ``sfd`` (from ``_fs.open_syncfs``,
    opened before the files were written), one syncfs replaces the file and dir syncs.
    Before publish, a failure abandons every entry of ``staged`` and raises; after it,
    the entries stay queued and the error of the queue dir sync is raised (``enqueue``
    turns it into a ``_PublishedError`` naming them)."""
    durability = spool.spoolable.durability
    try:
        if durability == "file" or (durability == "full" and not LEADER_SYNCS_FILES and sfd is None):
            sync_files(staged)
        if durability == "full":
            lay = spool._layout
            job = _Job(staged, lay.registry, lay.data, files_synced=not LEADER_SYNCS_FILES, sfd=sfd)
            if GROUP_COMMIT and not _in_main_thread():
                _committer.commit(job)
            else:
                # The main thread commits on its own (see the module docstring), through
                # AIO when others are under way: its round would hold theirs up.
                _run_lone(job, GROUP_COMMIT and _committer._active > 0)
                if job.error is not None:
                    raise job.error
        else:
            publish(staged)
    except BaseException:
        abandon(staged)
        raise
    finally:
        _release(staged)


def _release(staged: Sequence[Staged]) -> None:
    """Close what the writers left open, and unlock what is published (publish does,
    unless an interrupt cut its unlock loop short)."""
    for st in staged:
        # Checked here rather than in the calls: this runs for every entry, mostly to
        # find nothing left to do.
        if st.tmp_hold.fd is not None or st.data_hold.fd is not None:
            st.close_files()
        if st.published and st.owner.fd is not None:
            st.owner.release()
