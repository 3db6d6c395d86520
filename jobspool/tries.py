"""How long a job may say "try later": ``max_tries`` and ``max_age``, and "retry now".

A job whose handler says "try later" keeps its place at the head of its
queue and blocks it, with a growing back-off (``daemon.backoff_*``).
Postfix gives up after ``maximal_queue_lifetime``; an interface here may
set ``max_tries`` (handler runs that said "try later", counted from the
job's log, so a restart does not reset them) and ``max_age`` (time since
the job was accepted). Past either, the job goes to joberrors with the
reason in its log, and the jobs behind it run.

``jobspool retry --now JOB`` (``postqueue -i``) ends the back-off of the
job blocking its interface at once: it writes ``state/now/IFACE``, which
the lane looks for while it waits (at least once a second) and removes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from jobspool import annotate
from jobspool.errors import BadRequest
from jobspool.spool import QUEUE, STATE, Spool

FOLDER = "now"
LATER_RUN = 'outcome="later"'


def give_up(
    later_runs: int, stamp_ns: int, max_tries: int | None, max_age: float | None
) -> str | None:
    """Why a job that said "try later" again goes to joberrors now; None: it waits."""
    if max_tries is not None and later_runs >= max_tries:
        return f"gave up after {later_runs} tries (max_tries {max_tries})"
    age = time.time() - stamp_ns / 1e9
    if max_age is not None and age >= max_age:
        return f"gave up after {age:.0f}s in the queue (max_age {max_age:g}s)"
    return None


def now_marker(spool: Spool, interface: str) -> Path:
    """The file that tells ``interface``'s lane to end its back-off."""
    return spool.root / STATE / FOLDER / interface


def take_now(spool: Spool, interface: str) -> bool:
    """True (once) if someone asked ``interface``'s lane to retry at once."""
    try:
        os.unlink(now_marker(spool, interface))
    except FileNotFoundError:
        return False
    return True


def retry_now(spool: Spool, name: str, by: str) -> str:
    """Ask the lane of a queued job to try again now; its interface."""
    found = spool.find(name)
    if found.place.state != QUEUE or found.place.interface is None:
        raise BadRequest(f"{name} is in {found.place}, not queued: nothing to retry now "
                         "(a job in joberrors: 'jobspool retry JOB')")  # fmt: skip
    iface = found.place.interface
    try:
        blocking = spool.blocked_marker(iface).read_text()
    except OSError:
        blocking = ""
    if not blocking.startswith(f"{name} "):
        raise BadRequest(f"{name} is not waiting to try again: it does not block {iface}")
    path = now_marker(spool, iface)
    path.parent.mkdir(exist_ok=True)
    with spool.names_lock():
        annotate.note(spool, found, f"retry now asked by {by}")
    spool.write(path, [name.encode() + b"\n"], replace=True)
    return iface
