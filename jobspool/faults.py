"""Whose fault is a failure: the job's, the machine's, or the configuration's.

A job's own failures (an invalid document, a handler exit other than 0 or
75, a timeout, a signal) send it to ``joberrors``. The machine's (a full
disk or quota, an I/O error, a read-only file system, no descriptors, no
memory, no process slot) never do: the job keeps its place, its interface
says why and since when, and it goes on by itself once the fault clears. A
handler program that cannot be started (missing, not executable) is the
configuration's fault: said so, and the job waits like on a machine fault,
because failing every job of the interface until someone fixes a path would
hand partners errors that are not theirs.

:func:`is_machine_fault` is the one classification (used by the handlers,
the lanes and the daemon); :class:`Episode` turns a fault that lasts into
one log line when it starts and one when it ends, whatever the number of
attempts in between. This module imports nothing of jobspool's but
``errors``.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from jobspool.errors import JobspoolError

MACHINE_ERRNOS = frozenset(
    {
        errno.ENOSPC,  # no space (or no inodes) left
        errno.EDQUOT,  # quota
        errno.EIO,
        errno.EROFS,
        errno.EMFILE,  # this process's descriptors
        errno.ENFILE,  # the system's descriptors
        errno.ENOMEM,
        errno.EAGAIN,  # fork or spawn: no process slot (RLIMIT_NPROC, pid_max)
    }
)
CONFIG_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR, errno.ELOOP})

MACHINE_BACKOFF_MAX = 5.0  # seconds: a machine fault is retried at least this often
QUIET = 2.0  # seconds without a failure before an episode is over


class HandlerNotStarted(JobspoolError):
    """A handler program could not be started: the job did not run and is not failed.

    ``machine`` is true for the machine's faults (no descriptors, no process
    slot, no memory), false for a configuration error (no such program, not
    executable).
    """

    def __init__(self, message: str, machine: bool) -> None:
        super().__init__(message)
        self.machine = machine


def os_error_of(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or the one it was raised from (``os_errors``)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


def is_machine_fault(exc: BaseException) -> bool:
    """True if ``exc`` is the machine's trouble (disk, I/O, descriptors, memory, processes)."""
    if isinstance(exc, HandlerNotStarted):
        return exc.machine
    if isinstance(exc, MemoryError):
        return True
    err = os_error_of(exc)
    return err is not None and err.errno in MACHINE_ERRNOS


def kind(exc: BaseException) -> str:
    """What kind of fault ``exc`` is, without the file or job it met: one per episode."""
    if isinstance(exc, HandlerNotStarted) and not exc.machine:
        return str(exc)  # a configuration error: which program is the point
    err = os_error_of(exc)
    if err is not None and err.strerror:
        return err.strerror
    return f"{type(exc).__name__}: {exc}"


def spawn_fault(program: str, exc: OSError) -> HandlerNotStarted:
    """Why a handler program could not be started, as the fault it is."""
    if exc.errno in CONFIG_ERRNOS:
        return HandlerNotStarted(
            f"configuration error: cannot run {program}: {exc.strerror}; "
            "the job stays queued until the handler can be started",
            machine=False,
        )
    return HandlerNotStarted(f"cannot start {program}: {exc.strerror}", machine=True)


class Logger(Protocol):
    """What :class:`Episode` needs of a logger (structlog's bound loggers have it)."""

    def error(self, event: str, **kw: Any) -> Any: ...

    def info(self, event: str, **kw: Any) -> Any: ...


_alerts: list[Callable[[str], None]] = []


def on_fault(alert: Callable[[str], None]) -> None:
    """Who hears of each fault episode's start (the daemon's ``Alerts.fault``)."""
    _alerts[:] = [alert]


def fault_alert(what: str, error: str | None, **fields: Any) -> None:
    """Called once when a fault episode starts (``error``) and once when it ends (None).

    Its start goes to the notifications (:func:`on_fault`); the alerts
    themselves tell when an episode is over, after a quiet while.
    """
    if error is not None:
        for alert in _alerts:
            alert(f"{what}: {error}")


_episodes: weakref.WeakSet[Episode] = weakref.WeakSet()


def tick() -> None:
    """Let every episode whose fault has been quiet long enough say it is over.

    The daemon's main loop calls this every turn, so the line comes even
    when nothing more is tried after the last success.
    """
    for episode in list(_episodes):
        episode.settle()


class Episode:
    """A fault that may last: logged when it starts (or changes), and when it is over.

    ``failed`` may be called on every attempt; only the first, and a
    different error, make a line. ``ok`` after a failure starts the end:
    once no failure has come for :data:`QUIET` seconds (seen by ``ok`` or
    :func:`tick`), one line says it is over, with how many attempts failed
    and for how long. Intermittent faults (an I/O error now and then) are so
    one episode, not one per failure. Thread-safe.
    """

    def __init__(self, logger: Logger, what: str, **fields: Any) -> None:
        self.logger = logger
        self.what = what
        self.fields = fields
        self._lock = threading.Lock()
        self._error: str | None = None
        self._failures = 0
        self._since = 0.0
        self._last = 0.0  # monotonic time of the last failure
        self._clearing = False  # a success came after the last failure
        _episodes.add(self)

    @property
    def active(self) -> bool:
        return self._failures > 0

    @property
    def error(self) -> str | None:
        """The last failure's error, while the episode lasts."""
        return self._error

    @property
    def since(self) -> float:
        """Wall-clock time of the episode's first failure."""
        return self._since

    def failed(self, exc: BaseException | str, **fields: Any) -> bool:
        """One more failure; True if it was logged (the first, or a new kind)."""
        error = str(exc)
        with self._lock:
            self._failures += 1
            first = self._failures == 1
            if first:
                self._since = time.time()
            new = error != self._error
            self._error = error
            self._last, self._clearing = time.monotonic(), False
        if new:
            self.logger.error(self.what, error=error, **self.fields, **fields)
            if first:
                fault_alert(self.what, error, **self.fields)
        return new

    def ok(self) -> None:
        """It worked: an episode running ends once it has been quiet for a while."""
        if not self._failures:  # unlocked fast path: the common case
            return
        with self._lock:
            self._clearing = True
        self.settle()

    def settle(self) -> None:
        """Say the episode is over if it is ending and has been quiet for :data:`QUIET` s."""
        if not self._clearing:
            return
        with self._lock:
            if not self._clearing or time.monotonic() - self._last < QUIET:
                return
            failures, self._failures, self._error = self._failures, 0, None
            self._clearing = False
            since = self._since
        if failures:
            self.logger.info(
                f"over: {self.what}",
                failures=failures,
                seconds=round(time.time() - since, 3),
                **self.fields,
            )
            fault_alert(self.what, None, **self.fields)

    def backoff(self, initial: float = 0.1, most: float = MACHINE_BACKOFF_MAX) -> float:
        """Seconds before the next attempt: doubling from ``initial`` up to ``most``."""
        return float(min(initial * 2.0 ** max(self._failures - 1, 0), most))


def room(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """Free blocks and inodes of the file system at ``path`` (None if it cannot be asked)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail, st.f_favail


def wait_for_room(path: str | os.PathLike[str], seconds: float, step: float = 0.25) -> None:
    """Sleep ``seconds``, but wake up as soon as the file system at ``path`` has more room.

    A full disk clears when someone frees space: the retry then comes at
    once, not at the end of a back-off.
    """
    before = room(path)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(step, left))
        now = room(path)
        if before is not None and now is not None and (now[0] > before[0] or now[1] > before[1]):
            return
