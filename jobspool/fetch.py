"""``jobspool fetch``: hand an outbound interface's jobs to whoever collects them.

Each job is copied into the target directory durably (a dot-named staging
file there, fsync, rename, fsync the directory) and only then moved to
``bak/IFACE`` with its log (first retrieval). A crash in between leaves the
job queued and its copy delivered: it is fetched again next time, never lost.
Fetchers are serialised by ``state/fetch.lock``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from jobspool import joblog, names
from jobspool.config import Config
from jobspool.durable import os_errors, write_file
from jobspool.errors import BadRequest
from jobspool.hold import is_held
from jobspool.intake import log_so_far
from jobspool.spool import BAK, QUEUE, Spool


def fetch(cfg: Config, interface: str, to: Path, jobs: tuple[str, ...] = ()) -> Iterator[str]:
    """Fetch the named queued jobs (default: all, in queue order); yield each name when done."""
    if not to.is_dir():
        raise BadRequest(f"--to {to}: not a directory")
    spool = _outbound(cfg, interface)
    with spool.locked("fetch"):
        # Held jobs (jobspool hold) wait, as they would for a handler.
        wanted = list(jobs) or [n for _, n in spool.queued(interface) if not is_held(spool, n)]
        for name in wanted:  # all or nothing: every named job must be queued, and not held
            _queued(spool, interface, name)
            if is_held(spool, name):
                raise BadRequest(f"{name} is held ('jobspool release {name}' first)")
        clashes = []
        for name in wanted:

            def deliver(data: bytes, name: str = name) -> None:
                write_file(to / name, [data], staging=to)

            try:
                _retrieve(spool, interface, name, deliver, f"fetched to {to}")
            except FileExistsError:
                clashes.append(name)  # the others are fetched all the same; it stays queued
                continue
            yield name
        if clashes:
            raise BadRequest(
                f"{', '.join(str(to / n) for n in clashes)}: already exists, so never "
                "overwritten; the job stays queued (move the file away and fetch again)"
            )


def take(cfg: Config, interface: str, name: str | None = None, by: str = "") -> tuple[str, bytes]:
    """The first retrieval of one outbound job (the HTTP download): its name and content.

    Without ``name``, the head of the queue. The job is in ``bak/IFACE`` with
    its log when this returns; ``by`` says who took it, for the log.
    """
    spool = _outbound(cfg, interface)
    with spool.locked("fetch"):
        if name is None:
            queued = spool.queued(interface)
            if not queued:
                raise BadRequest(f"no job queued on {interface}")
            free = [n for _, n in queued if not is_held(spool, n)]
            if not free:
                raise BadRequest(f"no job queued on {interface} that is not held")
            name = free[0]
        _queued(spool, interface, name)
        got: list[bytes] = []
        _retrieve(spool, interface, name, got.append, f"downloaded{' by ' + by if by else ''}")
        return name, got[0]


def take_listed(cfg: Config, interface: str, by: str = "") -> list[str]:
    """The legacy listing of an outbound queue: every job listed is moved to ``bak``.

    The original job-management API moved an ``_out`` interface's jobs on
    their first listing (the HTTP front's ``move_on_listing``). Each job is
    in ``bak/IFACE`` with its log, durably, before this returns the names in
    queue order; a listing that never reaches its client loses no job, but
    the job is no longer offered in the queue (it downloads by name).
    """
    spool = _outbound(cfg, interface)
    note = f"listed{' by ' + by if by else ''}: moved on its first listing (move_on_listing)"
    with spool.locked("fetch"):
        listed = [name for _, name in spool.queued(interface)]
        for name in listed:
            _retrieve(spool, interface, name, lambda data: None, note)
        return listed


def _outbound(cfg: Config, interface: str) -> Spool:
    if not cfg.interface(interface).outbound:
        raise BadRequest(f"{interface} is not an outbound (_out) interface: nothing to fetch")
    spool = Spool.of(cfg)
    spool.require(interface)
    return spool


def _queued(spool: Spool, interface: str, name: str) -> None:
    names.check_name(name)
    if not (spool.dir(QUEUE, interface) / name).is_file():
        found = spool.locate(name)
        where = f"it is in {found.place}" if found else "no such job"
        raise BadRequest(f"{name} is not queued on {interface} ({where})")


def _retrieve(
    spool: Spool, interface: str, name: str, deliver: Callable[[bytes], None], note: str
) -> None:
    """Hand the job over (durably, by ``deliver``), then its log and one rename into bak."""
    src = spool.dir(QUEUE, interface) / name
    with os_errors(f"cannot read {name}"):
        data = src.read_bytes()
    deliver(data)
    log = log_so_far(spool, name, interface, src.stat().st_mtime_ns)
    joblog.note(log, note)
    joblog.moved(log, f"{QUEUE}/{interface}", f"{BAK}/{interface}")
    bak = spool.dir(BAK, interface)
    spool.write(bak / names.log_name(name), [joblog.to_bytes(log)], replace=True)
    spool.move(src, bak)
    spool.remove(spool.pending_log(name))
