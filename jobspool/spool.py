"""The spool tree: every path, every move, and where a job is (docs/spec.rst, "The spool tree").

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

The ordered listing of a queue is :mod:`jobspool.listing`; the durable
writes and system calls under every move are :mod:`jobspool.durable`. This
module imports nothing of jobspool's but those, ``errors`` and ``names``, and
nothing slow: the read commands (``status``, ``queue``, ``log``) use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import threading
import time
from array import array
from collections.abc import Container, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from jobspool import listing, names
from jobspool.durable import (
    SyncGroup,
    durability_of,
    fsync_dir,
    fsync_dirty,
    fsync_file,
    note_dirty,
    os_errors,
    rename_noreplace,
    syncfs,
    track_dirty,
    write_file,
)
from jobspool.errors import BadRequest, ConfigError, JobspoolError, TryLater
from jobspool.listing import Listing

if TYPE_CHECKING:
    from jobspool.config import Config

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


class Spool:
    """One spool directory tree and the interfaces it serves."""

    @classmethod
    def of(cls, cfg: Config) -> Spool:
        """The spool a configuration names, with its interfaces."""
        return cls(cfg.spool, cfg.interfaces, cfg.daemon.durability)

    def __init__(
        self, root: Path, interfaces: Iterable[str], durability: str | None = None
    ) -> None:
        self.root = root
        self.durability = durability  # syncfs or fsync; None: chosen on first use
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
        """The queue of ``interface`` in processing order (see :func:`jobspool.listing.of`)."""
        try:
            return listing.of(self.dir(QUEUE, interface), known, workers=workers)
        except FileNotFoundError:
            self.require()
            return Listing(array("q"), [])

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
        except OSError as exc:
            raise JobspoolError(f"the log of {name} is not a plain file: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            return f.read()

    # --- pause -----------------------------------------------------------------

    def blocked_marker(self, interface: str) -> Path:
        """Written by the daemon while a job at the head blocks the interface."""
        return self.state / "blocked" / interface

    def mark_blocked(self, interface: str, why: str | None) -> None:
        """Say which job blocks ``interface`` and why (None: none does any more)."""
        path = self.blocked_marker(interface)
        if why is None:
            self.remove(path)
        else:
            self.write(path, [why.encode() + b"\n"], replace=True)

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
        """A fresh acceptance stamp (ns), later than every stamp given before."""
        return self.stamps(1)[0]

    def stamps(self, n: int) -> range:
        """``n`` fresh acceptance stamps (ns), in order, later than every stamp given before.

        The high-water mark is the mtime of ``state/names.lock`` (every
        acceptance holds that lock), so stamps keep increasing across
        processes and restarts even when the wall clock was stepped back.
        A burst takes its stamps in one go: one ``fstat`` and one ``utime``
        for all of them, the mark set to the last before any is used.
        """
        try:
            fd = _lock_fd(self._lock_path("names"))
            last = os.fstat(fd).st_mtime_ns
        except OSError:
            fd, last = -1, 0
        first = max(time.time_ns(), last + 1, self._last_stamp + 1)
        self._last_stamp = first + n - 1
        if fd >= 0:
            with contextlib.suppress(OSError):  # not ours to touch: the in-process order holds
                os.utime(fd, ns=(self._last_stamp, self._last_stamp))
        return range(first, first + n)

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

    def place(self, staged: str, dest: Path, *, stamp_ns: int | None = None) -> None:
        """Rename a durably staged file into place (never over another), then sync its folder.

        ``stamp_ns`` sets its mtime first (its place in a queue), made durable
        with the file before the rename.
        """
        with os_errors(lambda: f"cannot place {dest.name} in {dest.parent.relative_to(self.root)}"):
            if stamp_ns is not None:
                os.utime(staged, ns=(stamp_ns, stamp_ns))
                fsync_file(staged)
            rename_noreplace(staged, dest)
            fsync_dir(dest.parent)

    def remove(self, path: Path, sync: bool = True) -> None:
        """Durably remove a file (a copy's original, a log that moved on)."""
        with os_errors(f"cannot remove {path.name}"):
            try:
                path.unlink()
            except FileNotFoundError:
                return
            if sync:
                fsync_dir(path.parent)
            else:
                note_dirty(None, path.parent)

    def sync_mode(self) -> str:
        """How :meth:`sync` makes a batch durable: ``syncfs``, or ``fsync`` of what it touched.

        The ``daemon.durability`` setting, or chosen by the spool's file
        system (:func:`~jobspool.durable.durability_of`). In ``fsync`` mode,
        unsynced writes are remembered from this call on: call it before them.
        """
        if self.durability is None:
            self.durability = durability_of(self.root)
        if self.durability == "fsync":
            track_dirty()
        return self.durability

    def sync(self) -> None:
        """Make everything written to the spool's filesystem durable: one ``syncfs``.

        Group commit: a batch of renames and writes made with ``sync=False``
        costs one journal commit here instead of several fsyncs per job.
        Threads that ask at the same time share one: see :class:`SyncGroup`.
        """
        with os_errors("cannot sync the spool"):
            group = _sync_groups.get(self.root) or _sync_groups.setdefault(self.root, SyncGroup())
            group.sync(self._syncfs if self.sync_mode() == "syncfs" else fsync_dirty)

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
            # The descriptor is read-only (see _lock_fd): whoever locks means to
            # write, so a read-only spool is refused here, before anything is done.
            if os.fstatvfs(fd).f_flag & os.ST_RDONLY:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        with _thread_lock(path):
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)


_LOG_INTERFACE = re.compile(rb'<joblog\b[^>]*?\binterface="([A-Za-z0-9._-]{1,200})"')

# Process-wide, not per Spool object: flock locks belong to an open file,
# so two descriptors of one lock file in one process would exclude each other;
# several Spool objects for one root (the daemon's, a schedule store's) share these.
_sync_groups: dict[Path, SyncGroup] = {}
_lock_fds: dict[Path, int] = {}
_thread_locks: dict[Path, threading.Lock] = {}


def _lock_fd(path: Path) -> int:
    """A lock file's descriptor, opened once per process (an open per job adds up)."""
    fd = _lock_fds.get(path)
    if fd is None:
        # Read-only is enough for flock and for setting its time (as its owner), and
        # a descriptor open for writing would keep the spool from a read-only remount.
        fd = _lock_fds[path] = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o660)
    return fd


def _thread_lock(path: Path) -> threading.Lock:
    return _thread_locks.setdefault(path, threading.Lock())
