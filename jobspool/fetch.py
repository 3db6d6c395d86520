"""``jobspool fetch``: hand an outbound interface's jobs to whoever collects them.

Each job is copied into the target directory durably (a dot-named staging
file there, fsync, rename, fsync the directory) and only then moved to
``bak/IFACE`` with its log (first retrieval). A crash in between leaves the
job queued and its copy delivered: it is fetched again next time, never lost.
Fetchers are serialised by ``state/fetch.lock``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from jobspool import joblog, names
from jobspool.config import Config
from jobspool.errors import BadRequest
from jobspool.intake import log_so_far
from jobspool.spool import BAK, QUEUE, Spool, os_errors, write_file


def fetch(cfg: Config, interface: str, to: Path, jobs: tuple[str, ...] = ()) -> Iterator[str]:
    """Fetch the named queued jobs (default: all, in queue order); yield each name when done."""
    iface = cfg.interface(interface)
    if not iface.outbound:
        raise BadRequest(f"{interface} is not an outbound (_out) interface: nothing to fetch")
    if not to.is_dir():
        raise BadRequest(f"--to {to}: not a directory")
    spool = Spool(cfg.spool, cfg.interfaces)
    queue = spool.dir(QUEUE, interface)
    with spool.locked("fetch"):
        if jobs:
            wanted = [names.check_name(j) for j in jobs]
            for name in wanted:
                if not (queue / name).is_file():
                    found = spool.locate(name)
                    where = f"it is in {found.place}" if found else "no such job"
                    raise BadRequest(f"{name} is not queued on {interface} ({where})")
        else:
            wanted = [name for _, name in spool.queued(interface)]
        for name in wanted:
            src = queue / name
            with os_errors(f"cannot read {name}"):
                data = src.read_bytes()
            try:
                write_file(to / name, [data], staging=to)
            except FileExistsError:
                raise BadRequest(f"{to / name} already exists; fetch into an empty "
                                 "directory or move it away first") from None  # fmt: skip
            log = log_so_far(spool, name, interface, src.stat().st_mtime_ns)
            joblog.note(log, f"fetched to {to}")
            joblog.moved(log, f"{QUEUE}/{interface}", f"{BAK}/{interface}")
            bak = spool.dir(BAK, interface)
            spool.write(bak / names.log_name(name), [joblog.to_bytes(log)], replace=True)
            spool.move(src, bak)
            spool.remove(spool.pending_log(name))
            yield name
