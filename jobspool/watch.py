"""Watching the drop folders and queues, and deciding when a dropped file is whole.

Events are only hints: "look at this file now". The directories stay the
truth, and the daemon rescans them fully at start and every ``rescan``
seconds, so an inotify overflow, a missed event, a dead observer or a network
filesystem loses nothing; it only delays.

A dropped file is taken when it is whole (docs/spec.rst, "Jobs"):

- names of uploads in progress (``.NAME``, ``.part``, ``.filepart``, ``.tmp``,
  ``~``, rsync's ``.NAME.XXXXXX``) are never taken;
- a file renamed into the folder is whole at once: that is how careful
  clients (WinSCP, rsync, scripts) finish an upload;
- a file written in place (OpenSSH's sftp ``put``, scp) is whole only once its
  writer has closed it. A read lease (``F_SETLEASE``/``F_RDLCK``) fails while
  anyone holds the file open for writing, so it tells us; the lease needs
  the file's owner or ``CAP_LEASE``, which the systemd unit grants. Where
  leases are not possible (no capability, NFS), only "unchanged for
  ``settle`` seconds" is left, which a stalled upload can fool: the
  deployment guide says so.
- either way a written-in-place file waits ``settle`` seconds after its last
  change, for clients that close and reopen.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import queue
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from jobspool import names

GONE = "gone"


class Hint(NamedTuple):
    """An event's message: look at ``path``; ``renamed_in`` when it arrived by rename."""

    path: str
    renamed_in: bool


def readiness(
    path: Path, renamed_in: bool, settle: float, now: float
) -> os.stat_result | str | float:
    """The drop's ``lstat`` when it is whole, GONE (nothing to take), or when to look again.

    The ``lstat`` is handed on, so that taking the drop needs no second one.
    """
    if names.is_partial_upload(path.name):
        return GONE
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return GONE
    if not stat.S_ISREG(st.st_mode):
        return st if not stat.S_ISDIR(st.st_mode) else GONE  # odd files go to joberrors
    if renamed_in:
        return st
    writing = writer_open(path)
    if writing:
        return now + max(settle, 1.0)  # its close wakes us sooner
    # "Unchanged for settle seconds" by the inode's ctime: a client may set
    # the mtime to anything (sftp put -p, rsync -t), but any write or utime
    # sets the ctime to now. One in the future means the clock went back:
    # count from now then, or such a file would wait for ever.
    changed = st.st_ctime if st.st_ctime <= now else now - settle
    due = changed + settle
    return st if now >= due else due


def writer_open(path: Path) -> bool | None:
    """Is the file open for writing by anyone? None when the kernel will not say."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # unreadable: taking it will report that
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return True
        return None  # EACCES/EPERM (not the owner, no CAP_LEASE), EINVAL (NFS)
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def candidates(directory: Path) -> list[str]:
    """Names in a folder worth a look, oldest first: files and odd ones, not uploads in progress.

    Oldest first (by mtime, then name), so that files found by a rescan are
    taken in the order they arrived.
    """
    found = []
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            if names.is_partial_upload(entry.name) or entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError):
                found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
    return [name for _, name in sorted(found)]


class Watcher:
    """Turns file-system events in some directories into :class:`Hint` s.

    With inotify there is no thread: the daemon's loop waits on
    :meth:`fileno` and calls :meth:`read`, which reads every event queued
    so far at once (a burst of drops is one read, not one thread hand-off
    per file). It uses watchdog's inotify binding but not its observer:
    that passes every event through three threads and two queues, which
    cost as much of the GIL as the lane running the handlers, and it holds a
    lone ``IN_MOVED_FROM`` for half a second to pair it (docs/benchmarks.rst
    has the profiles). Polling (``watch: poll``, for network filesystems)
    uses watchdog's polling observer in its own thread, which calls
    ``wake``.

    :meth:`healthy` is False once a watched folder has gone (removed or
    moved by hand) or the polling thread has died; the daemon then starts a
    new watcher and rescans. ``overflowed`` is set when the kernel dropped
    events; the daemon rescans at once.
    """

    def __init__(self, directories: list[Path], poll: bool, wake: Any) -> None:
        self.directories = directories
        self.poll = poll
        self.wake = wake  # called by the polling thread after each hint
        self.overflowed = False
        self._queue: queue.SimpleQueue[Hint] = queue.SimpleQueue()  # polling's hints
        self._observer: Any = None
        self._fd = -1
        self._folders: dict[int, str] = {}  # watch descriptor -> "folder/"
        self._broken = False

    def start(self) -> None:
        self._broken = False
        if self.poll:
            self._start_polling()
            return
        from watchdog.observers.inotify_c import InotifyConstants as C
        from watchdog.observers.inotify_c import inotify_add_watch, inotify_init

        # A file renamed in (whole at once), created, or closed after
        # writing; and the watched folder itself going away.
        mask = (C.IN_MOVED_TO | C.IN_CREATE | C.IN_CLOSE_WRITE | C.IN_DELETE_SELF
                | C.IN_MOVE_SELF | C.IN_ONLYDIR)  # fmt: skip
        fd = inotify_init()
        if fd < 0:
            raise OSError(ctypes_errno(), "cannot start inotify (fs.inotify.max_user_instances?)")
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        try:
            for directory in self.directories:
                wd = inotify_add_watch(fd, os.fsencode(directory), mask)
                if wd < 0:
                    err = ctypes_errno()
                    raise OSError(err, f"cannot watch {directory}: {os.strerror(err)}")
                self._folders[wd] = f"{directory}/"
        except BaseException:
            os.close(fd)
            self._folders = {}
            raise
        self._fd = fd

    def fileno(self) -> int:
        """The inotify descriptor to wait on (-1 when polling)."""
        return self._fd

    def read(self) -> list[Hint]:
        """Every hint available now, oldest first; never blocks."""
        hints = []
        with contextlib.suppress(queue.Empty):
            while True:
                hints.append(self._queue.get_nowait())
        if self._fd < 0:
            return hints
        from watchdog.observers.inotify_c import InotifyConstants as C

        gone = C.IN_DELETE_SELF | C.IN_MOVE_SELF | C.IN_IGNORED
        folders = self._folders
        while True:
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                return hints
            for wd, mask, name in _events(buf):
                if mask & C.IN_Q_OVERFLOW:  # the kernel dropped events
                    self.overflowed = True
                elif mask & gone:
                    self._broken = True
                elif name and (folder := folders.get(wd)) is not None:
                    hints.append(Hint(folder + os.fsdecode(name), bool(mask & C.IN_MOVED_TO)))

    def _start_polling(self) -> None:
        from watchdog.events import FileCreatedEvent, FileMovedEvent, FileSystemEventHandler
        from watchdog.observers.polling import PollingObserver

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                try:
                    if isinstance(event, FileMovedEvent):
                        path, renamed_in = event.dest_path, True
                    elif isinstance(event, FileCreatedEvent):
                        path, renamed_in = event.src_path, False
                    else:
                        return
                    watcher._queue.put(Hint(os.fsdecode(path), renamed_in))
                    watcher.wake()
                except Exception:  # never let the observer thread die
                    pass

        observer = PollingObserver(timeout=1.0)
        handler = Handler()
        for directory in self.directories:
            observer.schedule(handler, str(directory), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def healthy(self) -> bool:
        """False when a watched folder has gone or the polling thread has died."""
        if self._observer is not None:
            obs = self._observer
            return bool(obs.is_alive() and all(e.is_alive() for e in obs.emitters))
        return self._fd >= 0 and not self._broken

    def stop(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._folders = {}
        if self._observer is not None:
            with contextlib.suppress(Exception):
                self._observer.stop()
                self._observer.join(5)
            self._observer = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _events(buf: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(watch descriptor, mask, name) of each ``struct inotify_event`` in a read."""
    i, end = 0, len(buf)
    while i + 16 <= end:
        wd, mask, _cookie, length = _EVENT.unpack_from(buf, i)
        yield wd, mask, buf[i + 16 : i + 16 + length].rstrip(b"\0")
        i += 16 + length


_EVENT = struct.Struct("iIII")


def ctypes_errno() -> int:
    import ctypes

    return ctypes.get_errno()
