"""Running the real ``jobspool`` command, waiting for things, and watching processes.

:func:`run` is the one way the tests run a ``jobspool`` command: the installed
console script in a subprocess, as a sysadmin types it, with the environment
of :func:`clean_environ` (never the caller's ``$JOBSPOOL_CONFIG`` or systemd's
``$NOTIFY_SOCKET``). :func:`measured` runs any command and also learns its
wall time and peak memory.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The console script of the environment under test, as a user runs it.
JOBSPOOL = Path(sys.executable).parent / "jobspool"
COMMAND = [str(JOBSPOOL)] if JOBSPOOL.exists() else [sys.executable, "-m", "jobspool"]

DEADLINE = 20.0  # seconds any wait may take before the test fails

# What a test's jobspool processes never inherit from the caller: a
# configuration of the caller's, or systemd's notify socket and watchdog.
NOT_INHERITED = ("JOBSPOOL_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC")


def clean_environ() -> dict[str, str]:
    """This process's environment without :data:`NOT_INHERITED`."""
    return {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}


def run(
    *args: str,
    input: bytes | str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
    **popen: Any,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``jobspool ARGS...``; ``env`` adds to (not replaces) :func:`clean_environ`.

    ``timeout`` guards against a hang; it is not a performance assertion.
    """
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run(
        [*COMMAND, *args],
        input=data,
        stdin=subprocess.DEVNULL if data is None else None,
        capture_output=True,
        env={**clean_environ(), **(env or {})},
        cwd=cwd,
        timeout=timeout,
        check=False,
        **popen,
    )
    return subprocess.CompletedProcess(
        proc.args,
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )


def assert_fails(result: subprocess.CompletedProcess[str], code: int) -> str:
    """``result`` exited ``code`` with one line on stderr starting ``jobspool: ``; return it."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("jobspool: "), result.stderr
    return lines[0]


def assert_ok(result: subprocess.CompletedProcess[str]) -> str:
    """``result`` exited 0 and said nothing on stderr; return its stdout."""
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def read_table(text: str) -> list[dict[str, str]]:
    """A table as the commands print it (columns two spaces apart), one dict per row.

    The table ends at the first empty line (``interfaces`` says below it who serves the spool).
    """
    header, *rows = text.split("\n\n")[0].splitlines()
    titles = [(m.group(), m.start()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    ends = [start for _, start in titles[1:]] + [None]
    return [
        {title: row[start:end].strip() for (title, start), end in zip(titles, ends, strict=True)}
        for row in rows
    ]


# --- waiting and processes -------------------------------------------------------


def wait_for(
    condition: Callable[[], Any],
    what: str,
    timeout: float = DEADLINE,
    interval: float = 0.03,
    show: Callable[[], str] | None = None,
) -> Any:
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{show()}" if show is not None else ""
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """Is a process running (a zombie, dead but not yet reaped, counts as gone)?"""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return text.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def vm_hwm(pid: int) -> int:
    """The peak resident set size of a running process, in kB (``VmHWM`` in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


@contextlib.contextmanager
def reachable_by_others(path: Path) -> Iterator[None]:
    """Let other users reach ``path`` (a daemon run as nobody starts our venv's jobspool).

    A checkout cloned into ``mktemp -d`` (mode 700) is closed to them: its
    folders that lack it get o+x for the ``with`` block, and their modes back after.
    """
    changed = []
    for folder in reversed(path.resolve().parents):
        mode = stat.S_IMODE(os.stat(folder).st_mode)
        if not mode & stat.S_IXOTH:
            os.chmod(folder, mode | stat.S_IXOTH)
            changed.append((folder, mode))
    try:
        yield
    finally:
        for folder, mode in reversed(changed):
            with contextlib.suppress(OSError):
                os.chmod(folder, mode)


# --- running a command and measuring it ------------------------------------------


@dataclass
class Measured:
    """A finished command: what ``subprocess.run`` gives, plus its time and peak memory."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    maxrss_kb: int

    def as_completed(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, self.returncode, self.stdout, self.stderr)


def measured(
    argv: list[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60.0,
) -> Measured:
    """Run ``argv`` to its end; its own ``ru_maxrss`` comes from ``wait4``, not from the
    cumulative figure ``getrusage(RUSAGE_CHILDREN)`` gives."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd
        )
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise AssertionError(f"{argv} still running after {timeout:g}s")
            time.sleep(0.005)
        seconds = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: tell Popen
        out.seek(0)
        err.seek(0)
        return Measured(
            proc.returncode,
            out.read().decode("utf-8", "replace"),
            err.read().decode("utf-8", "replace"),
            seconds,
            usage.ru_maxrss,
        )
