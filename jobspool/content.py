"""Jobs with the same content: per interface and opt-in (``same_content: reject|flag``).

A partner's system that sends one order twice, under two names, must not
have it processed twice. With ``same_content`` set on an interface, the
SHA-256 of each job accepted there is remembered for ``same_within``
(default one day) as ``state/content/IFACE/HEX``: the file holds the
job's name, its modification time is when it was accepted. A later job of
that interface with the same content within the window is

- ``reject``: rejected into joberrors, its check saying "the same content
  as JOB, accepted at TIME";
- ``flag``: accepted and processed, its log noting the same.

Only accepted jobs are remembered, so a rejected copy never shadows a good
one. An entry older than the window is ignored (and replaced by the next
job with that content), and the daemon removes it (:func:`forget_expired`,
at most once an hour per interface): the folder holds one small file per
distinct content accepted within the window, with no schedule to set up.
The folders of an interface that no longer has ``same_content`` (or is gone)
are left as they are: turned on again, it finds its window's entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

from jobspool import joblog
from jobspool.config import Interface
from jobspool.durable import os_errors
from jobspool.errors import Problem
from jobspool.spool import STATE, Spool

FOLDER = "content"
_CHUNK = 1 << 20
_FORGET_BATCH = 256  # entries removed per hold of the names lock


def digest(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, read in chunks (a large job costs no memory)."""
    h = hashlib.sha256()
    with os_errors(f"cannot read {os.fspath(path)}"), open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _entry(spool: Spool, iface: str, hexdigest: str) -> Path:
    return spool.root / STATE / FOLDER / iface / hexdigest


def earlier(spool: Spool, iface: Interface, hexdigest: str) -> tuple[str, float] | None:
    """The job of ``iface`` accepted within the window with this content: (name, when)."""
    path = _entry(spool, iface.name, hexdigest)
    try:
        st = os.stat(path)
        name = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    accepted = st.st_mtime_ns / 1e9
    if not name or time.time() - accepted > iface.same_within:
        return None
    return name, accepted


def judge(spool: Spool, iface: Interface, hexdigest: str | None, log: joblog.Log) -> Problem | None:
    """For a job about to be accepted: the problem that rejects it, or a note if flagged."""
    if hexdigest is None or iface.same_content is None:
        return None
    seen = earlier(spool, iface, hexdigest)
    if seen is None:
        return None
    why = f"the same content as {seen[0]}, accepted at {joblog.iso(seen[1])}"
    if iface.same_content == "reject":
        return Problem(0, 0, why)
    joblog.note(log, why)
    return None


def remember(
    spool: Spool, iface: Interface, hexdigest: str | None, name: str, stamp_ns: int
) -> None:
    """Record an accepted job's content, stamped with its acceptance."""
    if hexdigest is None or iface.same_content is None:
        return
    path = _entry(spool, iface.name, hexdigest)
    path.parent.mkdir(parents=True, exist_ok=True)
    spool.write(path, [name.encode() + b"\n"], replace=True, stamp_ns=stamp_ns, sync=False)


def forget_expired(spool: Spool, iface: Interface, now: float) -> int:
    """Remove the entries of ``iface`` older than its window at ``now``; how many went.

    The folder is read as it goes (a huge one costs no memory), and what is
    found expired is removed a batch at a time under the names lock, each
    entry looked at again there: one a job renewed meanwhile stays. Not
    synced: an entry back after a power cut is past its window, so ignored,
    and removed the next time.
    """
    folder = spool.root / STATE / FOLDER / iface.name
    older = int((now - iface.same_within) * 1e9)
    try:
        entries = os.scandir(folder)
    except FileNotFoundError:
        return 0
    gone, expired = 0, []
    with entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                old = entry.stat(follow_symlinks=False).st_mtime_ns < older
                if old and entry.is_file(follow_symlinks=False):
                    expired.append(entry.path)
            if len(expired) >= _FORGET_BATCH:
                gone += _remove_expired(spool, expired, older)
                expired = []
    return gone + _remove_expired(spool, expired, older)


def _remove_expired(spool: Spool, paths: list[str], older: int) -> int:
    if not paths:
        return 0
    gone = 0
    with spool.names_lock():
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(path).st_mtime_ns < older:
                    os.unlink(path)
                    gone += 1
    return gone
