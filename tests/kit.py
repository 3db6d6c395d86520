"""What every test kit shares: the command under test, waiting, processes, a schema.

``conftest.py`` (commands on a spool), ``daemonkit.py`` (the daemon and its
drop folders) and ``schedkit.py`` (schedules) build on these.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The console script of the environment under test, as a user runs it.
JOBSPOOL = Path(sys.executable).parent / "jobspool"
DEADLINE = 20.0  # seconds any wait may take before the test fails

ORDER_XSD = """\
<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="order">
    <xs:complexType>
      <xs:sequence>
        <xs:element name="sku" type="xs:string"/>
        <xs:element name="qty" type="xs:positiveInteger"/>
      </xs:sequence>
      <xs:attribute name="id" type="xs:string" use="required"/>
    </xs:complexType>
  </xs:element>
</xs:schema>
"""


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
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def run_jobspool(
    config: Path, *args: str, env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``jobspool -c CONFIG ARGS...`` as a sysadmin types it; ``timeout`` guards a hang."""
    return subprocess.run(
        [str(JOBSPOOL), "-c", str(config), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


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
