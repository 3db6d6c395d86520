"""Running an interface's handler on one job (docs/spec.rst, "Handlers").

A *command* gets the job's path as its last argument and the ``JOBSPOOL_*``
environment. It runs in a process group of its own, so a timeout kills it and
everything it started. Its output is captured, bounded (head and tail kept),
into the job's log. Exit 0 is done, 75 is try later, anything else, a
signal or the timeout is failed. When the handler exits, what is left of
its group is killed and its pipes are read for at most ``PIPE_GRACE``
seconds more, then closed: a background child cannot keep the daemon
waiting, nor hold its descriptors.

A command that cannot be started is no outcome at all:
:class:`~jobspool.faults.HandlerNotStarted` is raised, the machine's fault
(no descriptors, no process slot) or the configuration's (no such program),
and the job is not failed for it (:mod:`jobspool.faults`).

A *Python handler* (``module:function``) is called in-process with a
:class:`Job`; returning is done, raising :class:`jobspool.TryLater` is try
later, any other exception is failed with its traceback in the log. Python
handlers share the daemon's process: their ``timeout`` cannot be enforced
(a thread cannot be killed), so it is only reported; use a command for code
that may hang.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple, cast

from jobspool import faults
from jobspool.errors import TryLater

DONE, LATER, FAILED = "done", "later", "failed"
EX_TEMPFAIL = 75
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL of a timed-out group
PIPE_GRACE = 1.0  # seconds a handler's pipes are still read after it exited


class Job:
    """What a Python handler is given: the job's name, interface, path and parsed tree."""

    def __init__(self, name: str, interface: str, path: Path, tree: Any = None) -> None:
        self.name = name
        self.interface = interface
        self.path = path
        self._tree = tree

    @property
    def tree(self) -> Any:
        """The job's document as an lxml ElementTree, parsed with the hardened parser."""
        if self._tree is None:
            from jobspool.check import parse

            self._tree = parse(self.path.read_bytes())
        return self._tree

    def __repr__(self) -> str:
        return f"Job({self.name!r}, {self.interface!r})"


class Limits(NamedTuple):
    """Resource limits for a command, applied with setrlimit in the child."""

    memory: int | None = None  # bytes of address space
    cpu: int | None = None  # CPU seconds


class Outcome(NamedTuple):
    """What one handler run did."""

    result: str  # done | later | failed
    started: float  # wall-clock time
    ended: float
    exit_status: int | None = None
    signal: int | None = None
    timed_out: bool = False
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_dropped: int = 0
    stderr_dropped: int = 0
    traceback: str | None = None
    reason: str | None = None


_DAEMON_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def job_environment(job: str, interface: str, spool: Path) -> dict[str, str]:
    """The daemon's environment without systemd's notify variables, plus ``JOBSPOOL_*``."""
    env = {k: v for k, v in os.environ.items() if k not in _DAEMON_ONLY}
    env.update(JOBSPOOL_JOB=job, JOBSPOOL_INTERFACE=interface, JOBSPOOL_SPOOL=str(spool))
    return env


def run_command(
    argv: Sequence[str],
    env: Mapping[str, str],
    timeout: float,
    output_limit: int = 65536,
    limits: Limits | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
    user: str | None = None,
) -> Outcome:
    """Run a command and wait for it (or its timeout); ``user`` to run it as (root only)."""
    started = time.time()
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            start_new_session=True,  # its own process group: the timeout kills them all
            preexec_fn=_rlimits(limits) if limits else None,
            close_fds=True,
            user=user,
            group=_primary_group(user) if user else None,
            extra_groups=[] if user else None,
        )
    except OSError as exc:  # no descriptors, no process slot, no such program
        raise faults.spawn_fault(argv[0], exc) from exc
    if on_start is not None:
        on_start(proc)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Capture(proc.stdout, output_limit), _Capture(proc.stderr, output_limit)
    timed_out = not _wait_reading(proc, (out, err), timeout)
    status = proc.returncode
    sig = -status if status is not None and status < 0 else None
    if timed_out:
        result, reason = FAILED, f"timed out after {timeout:g}s"
    elif sig is not None:
        result, reason = FAILED, f"killed by signal {signal.Signals(sig).name}"
    elif status == 0:
        result, reason = DONE, None
    elif status == EX_TEMPFAIL:
        result, reason = LATER, "exit 75: try later"
    else:
        result, reason = FAILED, f"exit {status}"
    return Outcome(
        result,
        started,
        time.time(),
        exit_status=None if sig is not None else status,
        signal=sig,
        timed_out=timed_out,
        stdout=out.data(),
        stderr=err.data(),
        stdout_dropped=out.dropped,
        stderr_dropped=err.dropped,
        reason=reason,
    )


def _wait_reading(proc: subprocess.Popen[bytes], pipes: Sequence[_Capture], timeout: float) -> bool:
    """Read the handler's output until it exits, then end it all; False if it timed out.

    The rule (docs/spec.rst, "Handlers"): when the handler process exits,
    whatever is left of its process group is killed (SIGKILL), and its pipes
    are read for at most :data:`PIPE_GRACE` more seconds (a process that
    left the group may still hold them), then closed. One thread, no reader
    threads: nothing a handler leaves behind can hold a descriptor or a
    thread of the daemon.
    """
    poller = select.poll()
    by_fd = {capture.fd: capture for capture in pipes}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    exit_fd: int | None = None
    with contextlib.suppress(OSError):  # an old kernel, or no descriptor left: poll every 50 ms
        exit_fd = os.pidfd_open(proc.pid)
        poller.register(exit_fd, select.POLLIN)
    watching = exit_fd is not None
    exit_seen = False
    deadline = time.monotonic() + timeout
    grace_until: float | None = None  # set when the handler has exited
    timed_out = False
    try:
        while by_fd or grace_until is None:
            now = time.monotonic()
            until = deadline if grace_until is None else grace_until
            if now >= until:
                if grace_until is not None:
                    break  # the grace is over: the pipes are closed unread
                timed_out = True
                kill_group(proc)  # TERM, then KILL after a grace; reaped
                grace_until = time.monotonic() + PIPE_GRACE
                continue
            wait = until - now if watching or grace_until is not None else min(until - now, 0.05)
            for fd, _ in poller.poll(wait * 1000):
                if fd == exit_fd:
                    poller.unregister(fd)
                    os.close(fd)
                    exit_fd, exit_seen = None, True
                elif fd in by_fd and not by_fd[fd].read():
                    poller.unregister(fd)
                    by_fd.pop(fd).close()
            if grace_until is None and (exit_seen if watching else proc.poll() is not None):
                _end_group(proc)
                grace_until = time.monotonic() + PIPE_GRACE
    finally:
        if exit_fd is not None:
            os.close(exit_fd)
        for capture in by_fd.values():
            capture.close()
    return not timed_out


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """The handler has exited: kill what is left of its group, then reap the handler.

    The group is killed before the leader is reaped, so its id cannot have
    been given to anyone else yet.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _primary_group(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


def kill_group(proc: subprocess.Popen[bytes], grace: float = KILL_GRACE) -> None:
    """SIGTERM the handler's process group, then SIGKILL whatever is left after ``grace``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    # Even when the leader obeyed, members of its group may not have.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_python(ref: str, job: Job, beside: Path | None = None) -> Outcome:
    """Call a Python handler in-process (its module may sit ``beside`` the configuration)."""
    started = time.time()
    try:
        func = load_callable(ref, beside)
        func(job)
    except TryLater as exc:
        return Outcome(LATER, started, time.time(), reason=str(exc) or "TryLater raised")
    except (Exception, SystemExit) as exc:  # sys.exit() in a handler fails its job, no more
        return Outcome(
            FAILED,
            started,
            time.time(),
            traceback=traceback.format_exc(),
            reason=f"{type(exc).__name__}: {exc}",
        )
    return Outcome(DONE, started, time.time())


def load_callable(ref: str, beside: Path | None = None) -> Callable[..., object]:
    """Import ``module:function``; modules in ``beside`` (the configuration's folder) too."""
    if beside is not None and str(beside) not in sys.path:
        sys.path.insert(0, str(beside))
    module, _, name = ref.partition(":")
    func = getattr(importlib.import_module(module), name)
    if not callable(func):
        raise TypeError(f"{ref} is not callable")
    return cast(Callable[..., object], func)


def _rlimits(limits: Limits) -> Callable[[], None]:
    import resource

    def apply() -> None:  # runs in the child between fork and exec: setrlimit only
        if limits.memory:
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory, limits.memory))
        if limits.cpu:
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu, limits.cpu + 5))

    return apply


class _Capture:
    """One output pipe of a handler, read when it is readable, keeping the head and the tail
    within ``limit`` bytes."""

    def __init__(self, pipe: IO[bytes], limit: int) -> None:
        self.pipe = pipe
        self.fd = pipe.fileno()
        os.set_blocking(self.fd, False)
        self.half = max(limit // 2, 1)
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def read(self) -> bool:
        """Read what is there; False at the end of the output."""
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        room = self.half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        if len(self.tail) > self.half:
            self.dropped += len(self.tail) - self.half
            del self.tail[: len(self.tail) - self.half]
        return True

    def close(self) -> None:
        self.pipe.close()

    def data(self) -> bytes:
        if self.dropped:
            return (
                bytes(self.head)
                + f"\n[... {self.dropped} bytes dropped ...]\n".encode()
                + bytes(self.tail)
            )
        return bytes(self.head + self.tail)
