"""Deleting a job by hand (``postsuper -d``): never silently, never without its log.

``jobspool delete JOB`` moves a queued, failed or archived job into
``state/deleted/`` with its log beside it, as in bak: the log ends with
``deleted by USER`` and a move from its place to ``deleted``. Nothing is
removed: ``rm state/deleted/*`` (or a purge schedule) is the sysadmin's
decision. A job still in ``incoming/`` has not been taken yet and cannot be
deleted (remove the file, it is not a job yet). Its name is free again
once deleted; a second deletion of one name keeps both, the later one under
a derived name (:mod:`jobspool.reuse`).
"""

from __future__ import annotations

from pathlib import Path

from jobspool import hold, joblog, names, reuse
from jobspool.errors import BadRequest
from jobspool.intake import log_so_far
from jobspool.spool import INCOMING, QUEUE, STATE, Spool

FOLDER = "deleted"


def folder(spool: Spool) -> Path:
    """Where deleted jobs and their logs are kept."""
    return spool.root / STATE / FOLDER


def delete(spool: Spool, name: str, who: str) -> tuple[str, Path]:
    """Move job ``name`` with its log into ``state/deleted/``; (where it was, where it is)."""
    with spool.names_lock():
        found = spool.find(name)
        if found.place.state == INCOMING:
            raise BadRequest(f"{name} is in {found.place}: not taken yet, so not a job to delete")
        dest = folder(spool)
        dest.mkdir(exist_ok=True)
        if found.place.state == QUEUE:
            assert found.place.interface is not None
            stamp = found.path.stat().st_mtime_ns
            log = log_so_far(spool, name, found.place.interface, stamp)
            old_log = spool.pending_log(name)
        else:
            old_log = found.log_path
            try:
                log = joblog.from_bytes(old_log.read_bytes())
            except (OSError, SyntaxError):
                log = joblog.new(name, found.place.interface)
        new_name = name
        if (dest / name).exists():
            new_name = reuse.free_name(name, spool.stamp(), lambda n: (dest / n).exists())
            joblog.note(log, f"an earlier {name} was deleted too; this one is {new_name}")
        joblog.note(log, f"deleted by {who}")
        joblog.moved(log, str(found.place), FOLDER)
        spool.write(dest / names.log_name(new_name), [joblog.to_bytes(log)], replace=True)
        spool.move(found.path, dest, new_name=new_name)
        spool.remove(old_log)
        hold.drop_marker(spool, name)
    return str(found.place), dest / new_name
