"""How a spool stands: per interface what ``jobspool interfaces`` shows, and its daemon.

Read from the tree alone, so any member of the spool's group can ask, and
the daemon's metrics say the same as the command. Nothing here is slow to
import: ``interfaces`` and ``daemon-status`` are read commands.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from typing import NamedTuple

from jobspool import names
from jobspool.spool import INCOMING, Spool

LOCK = "daemon.lock"  # in state/: the daemon holds an flock on it, its pid inside


class Overview(NamedTuple):
    """How one interface stands: what ``jobspool interfaces`` shows."""

    interface: str
    queued: int
    oldest_seconds: float | None
    paused: bool
    errors: int
    blocked: str | None  # why the head of the queue does not move (from the daemon)
    incoming: int = 0  # files in its drop folder, waiting to be taken


def overview(spool: Spool) -> list[Overview]:
    """Drop folder, queue depth, age of the oldest job, pause and errors, per interface."""
    spool.require()
    errors = spool.errors_by_interface()
    now = time.time_ns()
    out = []
    for iface in spool.interfaces:
        jobs = spool.listing(iface)  # no (stamp, name) pairs for a count and a head
        oldest = round((now - jobs.stamps[0]) / 1e9, 3) if jobs.names else None
        try:
            blocked: str | None = spool.blocked_marker(iface).read_text().strip()
        except OSError:
            blocked = None
        paused = spool.is_paused(iface)
        out.append(
            Overview(
                iface,
                len(jobs.names),
                oldest,
                paused,
                errors.get(iface, 0),
                blocked,
                incoming(spool, iface),
            )
        )
    return out


def incoming(spool: Spool, iface: str) -> int:
    """Files in ``incoming/IFACE`` the daemon would take (uploads in progress left out)."""
    count = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(spool.dir(INCOMING, iface)) as it:
        for entry in it:
            if not names.is_partial_upload(entry.name) and entry.is_file(follow_symlinks=False):
                count += 1
    return count


def daemon_pid(spool: Spool) -> int | None:
    """The pid of the daemon serving ``spool``, or None when none does (OSError if unreadable).

    The daemon holds an exclusive ``flock`` on ``state/daemon.lock`` for its
    whole life, with its pid written inside. A shared lock we can take means
    nobody holds it: then no daemon runs, whatever pid the file still holds
    (the kernel frees the lock when its holder dies, even by SIGKILL). The
    daemon retries its own lock for a moment, so this brief look never keeps
    one from starting.
    """
    import fcntl

    path = spool.state / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        spool.require()  # no spool at all is a setup problem, not "not running"
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0  # held while the daemon writes its pid
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
