"""Watching the drop folders and queues, and deciding when a dropped file is whole.

Events are only hints: "look at this file now". The directories stay the
truth, and the daemon rescans them fully at start and every ``rescan``
seconds, so an inotify overflow, a missed event, a dead observer or a network
filesystem loses nothing; it only delays.

A dropped file is taken when it is whole (SPEC 2):

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
import logging
import os
import queue
import stat
from pathlib import Path
from typing import Any, NamedTuple

from jobspool import names

READY = "ready"
GONE = "gone"


class Hint(NamedTuple):
    """An event's message: look at ``path``; ``renamed_in`` when it arrived by rename."""

    path: str
    renamed_in: bool


def readiness(path: Path, renamed_in: bool, settle: float, now: float) -> str | float:
    """READY, GONE (nothing to take), or the wall-clock time to look again."""
    if names.is_partial_upload(path.name):
        return GONE
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return GONE
    if not stat.S_ISREG(st.st_mode):
        return READY if not stat.S_ISDIR(st.st_mode) else GONE  # odd files go to joberrors
    if renamed_in:
        return READY
    writing = writer_open(path)
    if writing:
        return now + max(settle, 1.0)  # its close wakes us sooner
    # "Unchanged for settle seconds" by the inode's ctime: a client may set
    # the mtime to anything (sftp put -p, rsync -t), but any write or utime
    # sets the ctime to now. One in the future means the clock went back:
    # count from now then, or such a file would wait for ever.
    changed = st.st_ctime if st.st_ctime <= now else now - settle
    due = changed + settle
    return READY if now >= due else due


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


def _no_move_pairing_delay() -> None:
    """Stop watchdog holding every rename's IN_MOVED_FROM for half a second.

    watchdog pairs IN_MOVED_FROM with IN_MOVED_TO and, to do so, delays an
    unpaired IN_MOVED_FROM at the head of its queue by 0.5 s: every upload
    finished by a rename (.NAME.part -> NAME) waited that long. We never need
    the pair, only "NAME arrived by rename", which a lone IN_MOVED_TO gives
    too. The attribute is watchdog's (6 and 7); if it goes, nothing breaks.
    """
    with contextlib.suppress(ImportError, AttributeError):
        from watchdog.observers import inotify_move_event_grouper as grouper

        grouper.InotifyMoveEventGrouper.delay = 0


class Watcher:
    """watchdog observers on some directories, turning events into :class:`Hint` s.

    The observer runs handlers in its own thread and dies silently if one
    raises; ours only puts a hint on a queue, and :meth:`healthy` lets the
    daemon notice a dead observer and start a new one.
    """

    def __init__(self, directories: list[Path], poll: bool, wake: Any) -> None:
        self.directories = directories
        self.poll = poll
        self.wake = wake  # called after each hint, to wake the daemon's loop
        self.hints: queue.SimpleQueue[Hint] = queue.SimpleQueue()
        self.observer: Any = None

    def start(self) -> None:
        from watchdog.events import (
            FileClosedEvent,
            FileCreatedEvent,
            FileMovedEvent,
            FileSystemEventHandler,
        )

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                try:
                    if isinstance(event, FileMovedEvent):
                        watcher._hint(event.dest_path, renamed_in=True)
                    elif isinstance(event, (FileCreatedEvent, FileClosedEvent)):
                        watcher._hint(event.src_path, renamed_in=False)
                except Exception:  # never let the observer thread die
                    pass

        if self.poll:
            from watchdog.observers.polling import PollingObserver

            observer: Any = PollingObserver(timeout=1.0)
        else:
            from watchdog.observers.inotify import InotifyObserver

            _no_move_pairing_delay()
            # Full events: a file moved in from an unwatched directory comes
            # as a move (renamed in, whole), not as a create.
            observer = InotifyObserver(generate_full_events=True)
        handler = Handler()
        for directory in self.directories:
            observer.schedule(
                handler,
                str(directory),
                recursive=False,
                event_filter=[FileCreatedEvent, FileMovedEvent, FileClosedEvent],
            )
        observer.daemon = True
        observer.start()
        self.observer = observer

    def _hint(self, path: str | bytes, renamed_in: bool) -> None:
        if path:
            self.hints.put(Hint(os.fsdecode(path), renamed_in))
            self.wake()

    def healthy(self) -> bool:
        """False when the observer or one of its emitter threads has died."""
        obs = self.observer
        return obs is not None and obs.is_alive() and all(e.is_alive() for e in obs.emitters)

    def stop(self) -> None:
        if self.observer is not None:
            # watchdog logs a spurious error when an emitter stops mid-read.
            quiet = logging.getLogger("watchdog.observers.inotify")
            level = quiet.level
            quiet.setLevel(logging.CRITICAL)
            try:
                with contextlib.suppress(Exception):
                    self.observer.stop()
                    self.observer.join(5)
            finally:
                quiet.setLevel(level)
            self.observer = None

    def restart(self) -> None:
        self.stop()
        self.start()
