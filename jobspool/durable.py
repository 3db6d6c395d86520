"""Durable writes and the system calls under them: the edges of the program.

Everything jobspool writes reaches the disk the same way: a staging file in
the spool's ``tmp/`` (same file system as its target), ``fsync``, one
``rename`` into place, ``fsync`` of the directory; nothing is reported before
that has returned. A batch may instead share one ``syncfs`` of the whole file
system (:class:`GroupCommit`), with one failure policy wherever it is used: a
failed sync makes nothing durable, so nothing of its batch is reported.

This module imports nothing of jobspool's but ``errors``, and nothing slow:
the read commands load it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from jobspool.errors import Denied, JobspoolError, TryLater


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
        else:
            note_dirty(dest, dest.parent)


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
    note_dirty(tmp)
    return tmp


class Staging:
    """A staging file written piece by piece as its bytes arrive (an HTTP upload).

    Locked while open, like every staging file (:func:`remove_if_abandoned`).
    :meth:`finish` makes it durable and gives its path; :meth:`discard`
    removes it.
    """

    def __init__(self, directory: Path, name: str) -> None:
        with os_errors(f"cannot write {name}"):
            self.fd, self.path = _mkstemp(directory, name)
        self.name = name
        self.size = 0

    def write(self, data: bytes) -> None:
        with os_errors(f"cannot write {self.name}"):
            _write_all(self.fd, data)
        self.size += len(data)

    def finish(self) -> str:
        """Sync and close it; its path, for the caller to rename into place or remove."""
        with os_errors(f"cannot write {self.name}"):
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
        return self.path

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Make a file's data and metadata durable (its name is its directory's business)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

        _syncfs = libc_function("syncfs", ctypes.c_int)
    if _syncfs is False:
        os.sync()
    elif _syncfs(fd) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


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


BATCH = 64  # items per group commit: accepts, finished jobs, schedule results


class Logger(Protocol):
    """What :class:`GroupCommit` needs of a logger (structlog's bound loggers have it)."""

    def error(self, event: str, **kw: Any) -> Any: ...

    def info(self, event: str, **kw: Any) -> Any: ...


class GroupCommit:
    """One sync for a batch, and one failure policy wherever batches are committed.

    The daemon's accepts, a lane's finished jobs and the scheduler's results
    are written unsynced, then made durable together by :meth:`sync` (the
    spool's one ``syncfs``, shared with every thread that asks at the same
    moment: :class:`SyncGroup`). The policy is the same for all three:

    - a failed sync makes nothing of its batch durable, so the caller reports
      none of it, keeps the batch, and tries again after :meth:`retry_in`
      seconds (doubling from 0.1 s to ``backoff_max``);
    - the failure is logged once when it starts and once when a sync works
      again, not once per batch: a full disk is one episode, not a thousand lines.
    """

    def __init__(
        self,
        sync: Callable[[], None],
        logger: Logger,
        backoff_max: float = 30.0,
        on_fault: Callable[[str], None] | None = None,
    ) -> None:
        self._sync = sync
        self.logger = logger
        self.on_fault = on_fault  # told once when an episode starts (a notification)
        self.backoff_max = backoff_max
        self._lock = threading.Lock()
        self._failures = 0  # consecutive failed syncs
        self._since = 0.0  # wall-clock time of the first of them

    def sync(self) -> bool:
        """Sync; True if everything written before this call is now durable."""
        try:
            self._sync()
        except (OSError, JobspoolError) as exc:
            with self._lock:
                self._failures += 1
                first = self._failures == 1
                if first:
                    self._since = time.time()
            if first:
                self.logger.error(
                    "cannot sync the spool; nothing more is reported until a sync works",
                    error=str(exc),
                )
                if self.on_fault is not None:
                    self.on_fault(f"cannot sync the spool: {exc}")
            return False
        with self._lock:
            failures, self._failures = self._failures, 0
        if failures:
            self.logger.info(
                "the spool syncs again",
                failed_syncs=failures,
                seconds=round(time.time() - self._since, 3),
            )
        return True

    @property
    def failing(self) -> bool:
        """The last sync failed."""
        return self._failures > 0

    def retry_in(self) -> float:
        """Seconds to wait before trying a failed batch again."""
        return min(0.1 * 2.0 ** max(self._failures - 1, 0), self.backoff_max)


_staging = itertools.count()
_pids: list[int] = []


def _pid() -> int:
    """Our pid, cached: os.getpid() is a system call each time (a fork clears the cache)."""
    if not _pids:
        _pids.append(os.getpid())
    return _pids[0]


os.register_at_fork(after_in_child=_pids.clear)


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

        _renameat2 = libc_function(
            "renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
        )
    if _renameat2 is not False:
        if (
            _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dest), _RENAME_NOREPLACE)
            == 0
        ):
            note_dirty(dest, os.path.dirname(src) or ".", os.path.dirname(dest) or ".")
            return
        import ctypes

        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dest))
    _link_move(src, dest)


def _link_move(src: str | Path, dest: str | Path) -> None:
    """Without ``RENAME_NOREPLACE`` (FUSE, some NFS): ``link`` then ``unlink``.

    ``link`` fails with EEXIST if ``dest`` exists, in one step on the file
    system's server, so a job another host put at ``dest`` is never replaced
    (a check then a plain ``rename`` could replace one placed in between).
    A crash between the two calls leaves the file under both names, never
    under none; the spool's readers find the job by the first. Directories
    cannot be linked: they keep the check and the rename.
    """
    try:
        os.link(src, dest, follow_symlinks=False)
    except FileExistsError:
        raise FileExistsError(
            errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dest)
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
            raise
        if os.path.lexists(dest):  # no hard links here (a directory, vfat): check and rename
            raise FileExistsError(
                errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dest)
            ) from None
        os.rename(src, dest)
    else:
        os.unlink(src)
    note_dirty(dest, os.path.dirname(src) or ".", os.path.dirname(dest) or ".")


# --- durability by fsync, where syncfs does not reach the file system's server ------

NETWORK_FILE_SYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "ceph", "9p", "glusterfs", "lustre")
_dirty_lock = threading.Lock()
_dirty_files: set[str] = set()
_dirty_dirs: set[str] = set()
_tracking: list[bool] = []  # [True] once a spool syncs by fsync in this process


def durability_of(path: Path) -> str:
    """``fsync`` for a spool on FUSE or a network file system, ``syncfs`` otherwise.

    On FUSE (GlusterFS, ceph-fuse) ``syncfs`` returns 0 without reaching the
    file system's server, and a network file system's client may not pass it
    on either: only ``fsync`` of each file and directory is known to.
    """
    best, fstype = "", ""
    real = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 3:
                continue
            point = fields[1].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, fstype = point, fields[2]
    if fstype.startswith("fuse") or fstype in NETWORK_FILE_SYSTEMS:
        return "fsync"
    return "syncfs"


def track_dirty() -> None:
    """From now on, remember what unsynced writes touch, for :func:`fsync_dirty`."""
    _tracking[:] = [True]


def note_dirty(file: str | Path | None, *dirs: str | Path) -> None:
    """An unsynced write touched ``file`` (its data) and ``dirs`` (their entries)."""
    if _tracking:
        with _dirty_lock:
            if file is not None:
                _dirty_files.add(os.fspath(file))
            _dirty_dirs.update(os.fspath(d) for d in dirs)


def fsync_dirty() -> None:
    """fsync every file, then every directory, that unsynced writes touched since the last.

    A file gone since (moved on: its new name is noted too) needs nothing;
    a failed fsync keeps everything for the next try, which the caller's
    group commit makes.
    """
    with _dirty_lock:
        files, dirs = set(_dirty_files), set(_dirty_dirs)
        _dirty_files.clear()
        _dirty_dirs.clear()
    try:
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                fsync_file(path)
        for path in dirs:
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(Path(path))
    except BaseException:
        with _dirty_lock:
            _dirty_files.update(files)
            _dirty_dirs.update(dirs)
        raise


def libc_function(name: str, *argtypes: Any) -> Callable[..., int] | Literal[False]:
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
