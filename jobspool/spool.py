"""The spool tree: every path, every move, and where a job is (SPEC 1, 2).

The filesystem is the database. A job's state is the directory it sits in,
and every change of state is one ``rename`` that never replaces an existing
file (``renameat2(RENAME_NOREPLACE)``). New files are written into ``tmp/``,
fsynced, renamed into place, and the directory is fsynced before anyone is
told the job is there.

Queue order is acceptance order. A job's modification time *is* its
acceptance stamp: jobspool sets it when it takes the job (strictly increasing
within a process), rename keeps it, and ``ls -tr queue/IFACE`` shows the
processing order. Listing sorts by (mtime, name), so the order survives
restarts with no index to keep in step.

This module imports nothing of jobspool's but ``errors`` and ``names``, and
nothing slow: the read commands (``status``, ``queue``, ``log``) use it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import operator
import os
import re
import stat
import threading
import time
from array import array
from collections.abc import Callable, Container, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

from jobspool import names
from jobspool.errors import BadRequest, ConfigError, Denied, JobspoolError, TryLater

INCOMING, QUEUE, BAK, JOBERRORS, TMP, STATE = (
    "incoming",
    "queue",
    "bak",
    "joberrors",
    "tmp",
    "state",
)
PER_INTERFACE = (INCOMING, QUEUE, BAK)


class Place(NamedTuple):
    """Where a job is: one of the four answers of ``jobspool status``."""

    state: str
    interface: str | None = None

    def __str__(self) -> str:
        return self.state if self.interface is None else f"{self.state}/{self.interface}"


class Found(NamedTuple):
    """A job located in the spool."""

    name: str
    place: Place
    path: Path

    @property
    def log_path(self) -> Path:
        return self.path.with_name(names.log_name(self.name))


class Listing(NamedTuple):
    """A queue in processing order: each job's acceptance stamp (ns) and name, index by index.

    The stamps are an ``array('q')``, 8 bytes a job, not an int object each:
    a daemon may hold a paused queue of a million in memory.
    """

    stamps: array[int]
    names: list[str]


class Spool:
    """One spool directory tree and the interfaces it serves."""

    def __init__(self, root: Path, interfaces: Iterable[str]) -> None:
        self.root = root
        self.interfaces = tuple(interfaces)
        self.tmp = root / TMP
        self.state = root / STATE
        self.joberrors = root / JOBERRORS
        self._last_stamp = 0
        self._dirs: dict[tuple[str, str | None], Path] = {}
        self._lock_paths: dict[str, Path] = {}
        self._places: list[tuple[Place, str]] | None = None

    # --- paths ---------------------------------------------------------------

    def dir(self, state: str, interface: str | None = None) -> Path:
        """The directory of a state (``interface`` for incoming, queue and bak)."""
        key = (state, interface)
        path = self._dirs.get(key)
        if path is None:  # cached: building Paths is a tenth of a job's cost in the daemon
            path = self._dirs[key] = (
                self.root / state if interface is None else (self.root / state / interface)
            )
        return path

    def dirs(self) -> list[Path]:
        """Every directory of the tree, parents first."""
        out = [self.root / s for s in (*PER_INTERFACE, JOBERRORS, TMP, STATE)]
        out += [self.dir(s, i) for s in PER_INTERFACE for i in self.interfaces]
        out += [self.state / "paused", self.state / "pending", self.state / "blocked"]
        return out

    def pending_log(self, name: str) -> Path:
        """The log a queued job carries (retried jobs), published when it is done."""
        return self.state / "pending" / names.log_name(name)

    # --- the tree --------------------------------------------------------------

    def init(self) -> list[Path]:
        """Create whatever is missing of the tree; return what was created."""
        created = []
        with os_errors(f"cannot create the spool at {self.root}"):
            for path in [self.root, *self.dirs()]:
                try:
                    path.mkdir(parents=path == self.root)
                except FileExistsError:
                    if not path.is_dir():
                        raise ConfigError(f"{path} exists and is not a directory") from None
                    continue
                created.append(path)
                fsync_dir(path.parent)
        return created

    def require(self, interface: str | None = None) -> None:
        """Fail with a hint when the tree (or an interface's folders) has not been created."""
        if not self.state.is_dir():
            raise ConfigError(f"no spool at {self.root}: run 'jobspool init' first")
        if interface is not None and not self.dir(QUEUE, interface).is_dir():
            raise ConfigError(
                f"no folders for interface {interface} in {self.root}: "
                "run 'jobspool init' to create them"
            )

    # --- where is a job --------------------------------------------------------

    def places(self) -> Iterator[Place]:
        """Every place a job can be, in the order of its life."""
        for state in PER_INTERFACE:
            for iface in self.interfaces:
                yield Place(state, iface)
        yield Place(JOBERRORS)

    def locate(self, name: str, besides: Path | None = None) -> Found | None:
        """Find a job by name: a handful of ``stat`` calls, whatever the queue depths.

        ``besides`` is a path to look past: a dropped file asking whether its
        name is in use anywhere else.
        """
        names.check_name(name)
        if self._places is None:
            self._places = [(p, f"{self.dir(p.state, p.interface)}/") for p in self.places()]
        skip = os.fspath(besides) if besides is not None else None
        for place, folder in self._places:
            path = folder + name
            if path == skip:
                continue
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISREG(st.st_mode):
                return Found(name, place, Path(path))
        return None

    def find(self, name: str) -> Found:
        """Like :meth:`locate`, but an unknown job is a :class:`BadRequest`."""
        found = self.locate(name)
        if found is None:
            self.require()  # no spool at all is a setup problem, not an unknown job
            raise BadRequest(f"unknown job {name!r}: not in incoming, queue, bak or joberrors")
        return found

    def queued(self, interface: str) -> list[tuple[int, str]]:
        """The queue of ``interface`` in processing order, as (stamp in ns, name)."""
        return list(zip(*self.listing(interface), strict=True))

    def listing(self, interface: str, known: Container[str] = (), *, workers: int = 1) -> Listing:
        """The queue of ``interface`` in processing order: by stamp, then by name.

        Names in ``known`` are left out unread: a daemon's rescan only needs
        what it has not seen, and a ``stat`` per job is most of a listing's
        cost. ``workers`` above 1 shares those ``stat`` calls among as many
        processes (forked: a thread does not help, each ``stat`` hands the
        GIL over). Only a single-threaded process forks, such as the
        ``queue`` command; any other gets one worker.
        """
        try:
            fd = os.open(self.dir(QUEUE, interface), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.require()
            return Listing(array("q"), [])
        try:
            found = os.listdir(fd)
            if known:
                found = [name for name in found if name not in known]
            if workers > 1 and len(found) >= _FORK_FROM and threading.active_count() == 1:
                return _merged(_listed_forked(fd, found, workers))
            return _listed(fd, found)
        finally:
            os.close(fd)

    def _jobs_in(self, directory: Path) -> Iterator[tuple[int, str]]:
        try:
            entries = os.scandir(directory)
        except FileNotFoundError:
            self.require()
            return
        with entries:
            for entry in entries:
                if names.is_valid(entry.name) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):  # taken meanwhile
                        yield entry.stat(follow_symlinks=False).st_mtime_ns, entry.name

    def read_log(self, name: str) -> bytes:
        """The XML log of a job in bak or joberrors; :class:`TryLater` if it has none yet."""
        found = self.find(name)
        if found.place.state not in (BAK, JOBERRORS):
            raise TryLater(f"{name} is in {found.place}: its log is written when it is processed")
        try:  # O_NOFOLLOW: a link in place of a log must not print a file from elsewhere
            fd = os.open(found.log_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TryLater(f"{name} is in {found.place} but its log is not there yet") from None
        except PermissionError:
            raise  # the caller says who may read the spool
        except OSError as exc:
            raise JobspoolError(f"the log of {name} is not a plain file: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            return f.read()

    # --- pause -----------------------------------------------------------------

    def blocked_marker(self, interface: str) -> Path:
        """Written by the daemon while a job at the head blocks the interface."""
        return self.state / "blocked" / interface

    def pause_marker(self, interface: str) -> Path:
        return self.state / "paused" / interface

    def is_paused(self, interface: str) -> bool:
        return self.pause_marker(interface).exists()

    def pause(self, interface: str) -> None:
        """Persistently pause an interface: it accepts jobs but does not process them."""
        self.require()
        self.write(self.pause_marker(interface), [b"paused\n"], replace=True)

    def resume(self, interface: str) -> None:
        marker = self.pause_marker(interface)
        with os_errors(f"cannot resume {interface}"), contextlib.suppress(FileNotFoundError):
            marker.unlink()
            fsync_dir(marker.parent)

    # --- errors --------------------------------------------------------------

    def errors_by_interface(self) -> dict[str, int]:
        """How many jobs in joberrors came from each interface (read from their logs)."""
        counts: dict[str, int] = {}
        for _, name in self._jobs_in(self.joberrors):
            iface = self.interface_of_log(self.joberrors / names.log_name(name)) or "?"
            counts[iface] = counts.get(iface, 0) + 1
        return counts

    @staticmethod
    def interface_of_log(log: Path) -> str | None:
        """The interface a log names, read from its first bytes (no XML parser needed)."""
        try:
            with open(log, "rb") as f:
                head = f.read(1024)
        except OSError:
            return None
        match = _LOG_INTERFACE.search(head)
        return match.group(1).decode() if match else None

    # --- writing and moving ----------------------------------------------------

    def stamp(self) -> int:
        """A fresh acceptance stamp (ns), later than every stamp given before.

        The high-water mark is the mtime of ``state/names.lock`` (every
        acceptance holds that lock), so stamps keep increasing across
        processes and restarts even when the wall clock was stepped back.
        """
        try:
            fd = _lock_fd(self._lock_path("names"))
            last = os.fstat(fd).st_mtime_ns
        except OSError:
            fd, last = -1, 0
        self._last_stamp = max(time.time_ns(), last + 1, self._last_stamp + 1)
        if fd >= 0:
            with contextlib.suppress(OSError):  # not ours to touch: the in-process order holds
                os.utime(fd, ns=(self._last_stamp, self._last_stamp))
        return self._last_stamp

    def write(
        self,
        dest: Path,
        chunks: Iterable[bytes],
        *,
        replace: bool = False,
        stamp_ns: int | None = None,
        sync: bool = True,
    ) -> None:
        """Durably create ``dest`` from ``chunks``, staged in the spool's tmp/.

        Without ``replace`` an existing ``dest`` is never touched
        (:class:`FileExistsError`). ``stamp_ns`` sets the file's mtime, which
        is its place in a queue. ``sync=False`` leaves durability to a later
        :meth:`sync` of the whole batch (group commit).
        """
        write_file(dest, chunks, staging=self.tmp, replace=replace, stamp_ns=stamp_ns, sync=sync)

    def move(
        self,
        src: Path,
        dest_dir: Path,
        *,
        stamp_ns: int | None = None,
        new_name: str | None = None,
        sync: bool = True,
    ) -> Path:
        """Move a job to another state directory: one rename, then both dirs fsynced.

        ``sync=False``: the rename only; a later :meth:`sync` makes it durable.
        """
        dest = dest_dir / (new_name or src.name)
        with os_errors(lambda: f"cannot move {src.name} to {dest_dir.relative_to(self.root)}"):
            if stamp_ns is not None:
                os.utime(src, ns=(stamp_ns, stamp_ns))
            rename_noreplace(src, dest)
            if sync:
                fsync_dir(dest_dir)
                fsync_dir(src.parent)
        return dest

    def remove(self, path: Path, sync: bool = True) -> None:
        """Durably remove a file (a copy's original, a log that moved on)."""
        with os_errors(f"cannot remove {path.name}"):
            try:
                path.unlink()
            except FileNotFoundError:
                return
            if sync:
                fsync_dir(path.parent)

    def sync(self) -> None:
        """Make everything written to the spool's filesystem durable: one ``syncfs``.

        Group commit: a batch of renames and writes made with ``sync=False``
        costs one journal commit here instead of several fsyncs per job.
        Threads that ask at the same time share one: see :class:`SyncGroup`.
        """
        with os_errors("cannot sync the spool"):
            group = _sync_groups.get(self.root) or _sync_groups.setdefault(self.root, SyncGroup())
            group.sync(self._syncfs)

    def _syncfs(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    def _lock_path(self, what: str) -> Path:
        path = self._lock_paths.get(what)
        if path is None:
            path = self._lock_paths[what] = self.state / f"{what}.lock"
        return path

    def names_lock(self) -> contextlib.AbstractContextManager[None]:
        """Held while a new name enters the spool, so two entries cannot take one name."""
        return self.locked("names")

    @contextlib.contextmanager
    def locked(self, what: str) -> Iterator[None]:
        """An exclusive lock on ``state/WHAT.lock``, held for the ``with`` block.

        Across processes by ``flock``; across this process's threads by a
        thread lock (``flock`` on one open file does not exclude threads).
        """
        import fcntl

        path = self._lock_path(what)
        if path not in _lock_fds:  # once: the spool cannot vanish under an open lock
            self.require()
        with os_errors("cannot lock the spool"):
            fd = _lock_fd(path)
        with _thread_lock(path):
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)


_LOG_INTERFACE = re.compile(rb'<joblog\b[^>]*?\binterface="([A-Za-z0-9._-]{1,200})"')


# --- listing a queue in stamp order ----------------------------------------------

_FORK_FROM = 20_000  # jobs; below that a forked helper costs more than it saves
_EXACT = 2**53  # a float holds every integer below this exactly
_GONE = -(2**63)  # the stamp of a name that is no plain file (any more)


def ordered(stamps: array[int], jobs: list[str]) -> Listing:
    """Jobs in processing order (by stamp, then by name), from the two in any order.

    Each pass over a million jobs in an order other than memory's costs a
    cache miss a job (a tenth of a second or more here), so this makes as few
    as it can: the sort, then one gather each for the names and the stamps.
    """
    order = _order(stamps)
    if len(order) < 2:
        return Listing(array("q", stamps), list(jobs))
    pick = operator.itemgetter(*order)
    in_order = pick(stamps)  # new ints, made in order: the tie check reads them in memory order
    return _tie_broken(array("q", in_order), in_order, list(pick(jobs)))


def _order(stamps: array[int]) -> list[int]:
    """The indices that sort ``stamps``, equal ones in their given order.

    The keys are floats where that is exact (stamps less than 104 days
    apart): a sort compares floats about twice as fast as large integers.
    """
    if not stamps:
        return []
    low = min(stamps)
    keys: list[float] | array[int] = stamps
    if max(stamps) - low < _EXACT:
        keys = [float(s - low) for s in stamps]
    return sorted(range(len(stamps)), key=keys.__getitem__)


def _tie_broken(stamps: array[int], same: Iterable[int], jobs: list[str]) -> Listing:
    """Jobs with equal stamps (copied in with their times, coarse clocks) put in name order.

    ``same`` holds the stamps again, in the fastest form to read. Finding the
    ties is one pass in C, so a queue without any pays nothing more.
    """
    first = iter(same)
    next(first, None)
    ties = list(itertools.compress(itertools.count(), map(operator.eq, same, first)))
    start = 0
    for k, i in enumerate(ties):
        if k + 1 == len(ties) or ties[k + 1] != i + 1:  # the last of a run of equal stamps
            head = ties[start]
            jobs[head : i + 2] = sorted(jobs[head : i + 2])
            start = k + 1
    return Listing(stamps, jobs)


def _listed(fd: int, found: list[str]) -> Listing:
    """The jobs among the names ``found`` in the folder ``fd``, in processing order."""
    jobs = names.valid(found)
    stamps = _stamps(fd, jobs)
    if _GONE in stamps:  # taken meanwhile, or no plain file: rare
        keep = list(map(operator.ne, stamps, itertools.repeat(_GONE)))
        jobs = list(itertools.compress(jobs, keep))
        stamps = array("q", itertools.compress(stamps, keep))
    return ordered(stamps, jobs)


def _stamps(fd: int, jobs: list[str]) -> array[int]:
    """The stamp of each of ``jobs`` (in the folder ``fd``), or ``_GONE``."""
    stamps: array[int] = array("q")
    append, lstat, is_file = stamps.append, os.stat, stat.S_ISREG
    for name in jobs:
        try:  # relative to the folder's descriptor: no path to walk for each job
            st = lstat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:  # taken meanwhile
            append(_GONE)
        else:
            append(st.st_mtime_ns if is_file(st.st_mode) else _GONE)
    return stamps


def _merged(parts: list[Listing]) -> Listing:
    """One listing of parts each in processing order: a merge, as the sort finds the runs."""
    stamps: array[int] = array("q")
    for part in parts:
        stamps += part.stamps
    return ordered(stamps, list(itertools.chain.from_iterable(part.names for part in parts)))


def _listed_forked(fd: int, found: list[str], workers: int) -> list[Listing]:
    """:func:`_listed` of shares of ``found``, all but the first in forked children.

    Each child sorts its share too, and sends its names back as one text,
    which makes them new strings laid out in their order: the merge then
    reads memory in order instead of one cache miss a job. A child that
    cannot be forked, or fails, has its share done here.
    """
    bounds = [len(found) * k // workers for k in range(workers + 1)]
    shares = [found[bounds[k] : bounds[k + 1]] for k in range(workers)]
    children = [(share, _fork_listed(fd, share)) for share in shares[1:]]
    try:
        parts = [_listed(fd, shares[0])]
        while children:
            share, child = children.pop(0)
            got = _collect(*child) if child is not None else None
            parts.append(got if got is not None else _listed(fd, share))
        return parts
    finally:
        for _, child in children:  # only after an exception: nobody waits for them
            if child is not None:
                os.close(child[1])
                os.waitpid(child[0], 0)


def _fork_listed(fd: int, found: list[str]) -> tuple[int, int] | None:
    """Fork a child that writes the :func:`_listed` of ``found`` to a pipe: (pid, pipe)."""
    try:
        r, w = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return None
    if pid == 0:
        status = 1
        try:
            os.close(r)
            stamps, jobs = _listed(fd, found)
            with open(w, "wb") as out:
                out.write(len(stamps).to_bytes(8, "little"))
                out.write(stamps)
                out.write("\n".join(jobs).encode("ascii"))  # job names are ASCII
            status = 0
        finally:
            os._exit(status)  # nothing of the parent's: no atexit, no buffered output
    os.close(w)
    return pid, r


def _collect(pid: int, r: int) -> Listing | None:
    """What a child of :func:`_fork_listed` found; None if it failed."""
    try:
        with open(r, "rb") as f:
            data = f.read()
    finally:
        _, status = os.waitpid(pid, 0)
    count = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if status != 0 or count < 0 or len(data) < 8 + 8 * count:
        return None
    stamps: array[int] = array("q")
    stamps.frombytes(memoryview(data)[8 : 8 + 8 * count])
    jobs = data[8 + 8 * count :].decode("ascii").split("\n") if count else []
    return Listing(stamps, jobs) if len(jobs) == count else None


# --- the edges: write, fsync and rename ----------------------------------------


def write_file(
    dest: Path,
    chunks: Iterable[bytes],
    *,
    staging: Path,
    replace: bool = False,
    stamp_ns: int | None = None,
    sync: bool = True,
) -> None:
    """Write in ``staging`` (same filesystem as ``dest``), fsync, rename, fsync the dir.

    ``sync=False`` skips both fsyncs, for a caller that syncs a batch at once.
    """
    with os_errors(f"cannot write {dest.name}"):
        fd, tmp = _mkstemp(staging, dest.name)
        try:
            try:
                for chunk in chunks:  # os.write: a file object adds fstat, ioctl and lseek
                    _write_all(fd, chunk)
                if stamp_ns is not None:
                    os.utime(fd, ns=(stamp_ns, stamp_ns))
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.replace(tmp, dest)
            else:
                rename_noreplace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if sync:
            fsync_dir(dest.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_staged(staging: Path, name: str, chunks: Iterable[bytes]) -> str:
    """Write a staging file for ``name`` in ``staging``, unsynced; return its path.

    The first half of a group commit: the caller syncs its batch, and only
    then renames each file into place, so a crash never leaves an empty or
    partial file where a reader looks (ext4 can show an unsynced new file
    empty after a power cut). What a crash strands here is removed with
    :func:`remove_if_abandoned`.
    """
    with os_errors(f"cannot write {name}"):
        fd, tmp = _mkstemp(staging, name)
        try:
            for chunk in chunks:  # os.write: a file object adds fstat, ioctl and lseek
                _write_all(fd, chunk)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
    return tmp


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_syncfs: Callable[[int], int] | Literal[False] | None = None


def syncfs(fd: int) -> None:
    """Linux's ``syncfs``: flush one filesystem (``os.sync``, all of them, where it is missing)."""
    global _syncfs
    if _syncfs is None:
        import ctypes

        _syncfs = _libc("syncfs", ctypes.c_int)
    if _syncfs is False:
        os.sync()
    elif _syncfs(fd) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_malloc_trim: Callable[[int], int] | Literal[False] | None = None


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; else nothing).

    Listing a million jobs frees tens of megabytes of scratch lists that glibc
    would otherwise keep, and a daemon would carry them in its resident set
    for good.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes

        _malloc_trim = _libc("malloc_trim", ctypes.c_size_t)
    if _malloc_trim is not False:
        _malloc_trim(0)


class SyncGroup:
    """One sync for every thread that asked while none had started.

    The daemon's main loop (accepts) and its lanes (finished jobs) each sync
    their batch; under load they often ask at once. A caller returns only
    after a sync that began after its call, so what it wrote before calling
    is durable; a caller that arrives while a sync runs waits for it to end
    and then, with everyone else who arrived meanwhile, for one more, which
    the first of them performs. A failed sync fails every caller it served.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._asked = 0  # tickets handed out
        self._done = 0  # every ticket up to this one is synced
        self._running = False
        self._error: tuple[int, BaseException] | None = None  # (last ticket it served, error)

    def sync(self, do: Callable[[], None]) -> None:
        with self._cond:
            self._asked += 1
            ticket = self._asked
            while self._done < ticket:
                if self._error is not None and self._error[0] >= ticket:
                    raise self._error[1]
                if not self._running:
                    break
                self._cond.wait()
            else:
                return
            self._running, covers = True, self._asked
        error: BaseException | None = None
        try:
            do()
        except BaseException as exc:
            error = exc
            raise
        finally:
            with self._cond:
                self._running = False
                if error is None:
                    self._done = covers
                else:
                    self._error = (covers, error)
                self._cond.notify_all()


_sync_groups: dict[Path, SyncGroup] = {}
_lock_fds: dict[Path, int] = {}
_thread_locks: dict[Path, threading.Lock] = {}
_staging = itertools.count()
_pids: list[int] = []


def _pid() -> int:
    """Our pid, cached: os.getpid() is a system call each time (a fork clears the cache)."""
    if not _pids:
        _pids.append(os.getpid())
    return _pids[0]


os.register_at_fork(after_in_child=_pids.clear)


def _lock_fd(path: Path) -> int:
    """A lock file's descriptor, opened once per process (an open per job adds up)."""
    fd = _lock_fds.get(path)
    if fd is None:
        fd = _lock_fds[path] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
    return fd


def _thread_lock(path: Path) -> threading.Lock:
    return _thread_locks.setdefault(path, threading.Lock())


def _mkstemp(directory: Path, name: str) -> tuple[int, str]:
    """A new staging file, locked (``flock``) for as long as it is open.

    A leading dot: a staging file in someone's folder is an upload in
    progress. pid and a counter make the name unique without tempfile's
    random names. The lock tells a starting daemon that a writer is alive:
    every unlocked staging file is a crash's leftover (see
    :func:`remove_if_abandoned`).
    """
    import fcntl

    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        path = f"{directory}/.{name[:100]}.{_pid()}.{next(_staging)}"
        try:
            fd = os.open(path, flags, 0o640)
        except FileExistsError:  # left by a crashed process with our pid
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, path


def remove_if_abandoned(path: str) -> bool:
    """Remove a staging file unless a live writer holds its lock; True if removed."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # being written right now
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)
        return True
    finally:
        os.close(fd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2: Callable[..., int] | Literal[False] | None = None


def rename_noreplace(src: str | Path, dest: str | Path) -> None:
    """Rename ``src`` to ``dest``, failing with :class:`FileExistsError` if ``dest`` exists.

    Uses Linux's ``renameat2(RENAME_NOREPLACE)``, which checks and renames in
    one step. Where a filesystem lacks it (some NFS, FUSE), falls back to a
    check then a plain rename: still one rename, so a crash never leaves a
    job in two places; only a foreign writer racing us could be replaced.
    """
    global _renameat2
    if _renameat2 is None:
        import ctypes

        _renameat2 = _libc(
            "renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
        )
    if _renameat2 is not False:
        if (
            _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dest), _RENAME_NOREPLACE)
            == 0
        ):
            return
        import ctypes

        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dest))
    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dest))
    os.rename(src, dest)


def _libc(name: str, *argtypes: Any) -> Callable[..., int] | Literal[False]:
    """A C library function by ctypes, loaded on first use; False where libc lacks it."""
    import ctypes

    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return False
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return cast(Callable[..., int], fn)


_FULL = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextlib.contextmanager
def os_errors(what: str | Callable[[], str]) -> Iterator[None]:
    """Turn an OS error into the exit code a sysadmin can act on.

    ``what`` may be a function, for a message too costly to build on every
    call of a hot path.
    """
    try:
        yield
    except FileExistsError:
        raise
    except OSError as exc:
        what = what() if callable(what) else what
        reason = exc.strerror or str(exc)
        # A failed rename is about its target (filename2): tmp/ names mean nothing to users.
        where = exc.filename2 or exc.filename
        where = f" ({where})" if where else ""
        if exc.errno in _FULL:
            raise TryLater(f"{what}: {reason}{where}; free some space and try again") from exc
        if exc.errno in _DENIED:
            raise Denied(f"{what}: {reason}{where}") from exc
        raise JobspoolError(f"{what}: {reason}{where}") from exc
