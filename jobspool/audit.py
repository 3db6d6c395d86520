"""The audit log: who changed what in the spool, one JSON line per action.

``state/audit.log`` holds one line per action taken through the operator
console and the command line (``jobspool audit`` lists them): when, who, what, on which target,
and details such as the outcome. Each line is appended under an exclusive
``flock`` on the file and fsynced before :func:`record` returns; a new file's
directory is fsynced too. A line torn by a crash is skipped when reading,
and the next line starts on a fresh line.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobspool.durable import fsync_dir, os_errors
from jobspool.spool import STATE

FILE = "audit.log"
_lock = threading.Lock()  # flock on one open file description does not exclude threads


def invoker() -> str:
    """Who runs this command: the user of our uid, and who became it with sudo.

    ``alice`` for alice; ``root (sudo by alice)`` for ``sudo jobspool ...``.
    """
    import pwd

    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid {uid}"
    sudo = os.environ.get("SUDO_USER")
    return f"{user} (sudo by {sudo})" if sudo and sudo != user else user


def path_of(spool_root: Path) -> Path:
    """Where the audit log of the spool at ``spool_root`` is."""
    return spool_root / STATE / FILE


def record(
    spool_root: Path,
    who: str,
    action: str,
    target: str,
    detail: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Append one entry durably and return it (``time`` is local ISO 8601 with offset)."""
    from jobspool.joblog import iso

    now = time.time()
    entry: dict[str, Any] = {"time": iso(now), "who": who, "action": action, "target": target}
    if detail:
        entry["detail"] = dict(detail)
    line = json.dumps(entry, ensure_ascii=False, sort_keys=False, default=str) + "\n"
    path = path_of(spool_root)
    with _lock, os_errors(f"cannot write the audit log {path}"):
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            created = False
        except FileNotFoundError:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            created = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = line.encode()
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # after a torn line: start afresh
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the flock
        if created:
            fsync_dir(path.parent)
    return entry


def entries(spool_root: Path) -> list[dict[str, Any]]:
    """Every entry, oldest first; torn or foreign lines are left out."""
    try:
        data = path_of(spool_root).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        with os_errors(f"cannot read the audit log {path_of(spool_root)}"):
            raise exc from None
    out = []
    for raw in data.splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict) and {"time", "who", "action", "target"} <= entry.keys():
            out.append(entry)
    return out
