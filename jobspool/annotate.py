"""A line in a job's log for what an operator did to it (hold, release, retry now).

A queued job's history waits in ``state/pending/NAME,log.xml`` until it is
done; a job in joberrors or bak has its log beside it. Either way the note
is added to that file, durably, before the command reports. A daemon that
holds a fresh drop's log in memory takes the notes from the pending log
when it processes the job (:func:`merge_notes`).
"""

from __future__ import annotations

from jobspool import joblog
from jobspool.intake import log_so_far
from jobspool.spool import QUEUE, Found, Spool


def note(spool: Spool, found: Found, text: str) -> None:
    """Add ``text`` as a note to the log of ``found``; under the spool's names lock."""
    if found.place.state == QUEUE:
        path = spool.pending_log(found.name)
        assert found.place.interface is not None
        log = log_so_far(spool, found.name, found.place.interface, found.path.stat().st_mtime_ns)
    else:
        path = found.log_path
        try:
            log = joblog.from_bytes(path.read_bytes())
        except (OSError, SyntaxError):
            log = joblog.new(found.name, found.place.interface)
    joblog.note(log, text)
    spool.write(path, [joblog.to_bytes(log)], replace=True)


def merge_notes(log: joblog.Log, pending: bytes) -> None:
    """Append to ``log`` the notes of a pending log that it lacks (operators' actions)."""
    try:
        other = joblog.from_bytes(pending)
    except SyntaxError:
        return
    tag = f"{{{joblog.NS}}}note"
    have = {(n.get("time"), n.text) for n in log.iter(tag)}
    for n in other.iter(tag):
        if (n.get("time"), n.text) not in have:
            log.append(n)
