"""Held jobs: queued, in their place, but skipped until released (``postsuper -h/-H``).

``jobspool hold JOB`` writes ``state/held/JOB`` (its content: the
interface); the daemon's lane passes over a held job and runs the jobs
behind it, and looks at its held jobs again about once a second, so a
``release`` (which removes the marker) lets the job run within a second or
two, still in its place by acceptance stamp. ``jobspool status`` keeps
answering ``queue/IFACE`` for a held job; ``--json`` says ``"held": true``.
Only the standard library and :mod:`jobspool.spool`: ``status`` imports this.
"""

from __future__ import annotations

import os
from pathlib import Path

from jobspool.errors import BadRequest
from jobspool.spool import QUEUE, STATE, Found, Spool

FOLDER = "held"


def marker(spool: Spool, name: str) -> Path:
    """The file that says ``name`` is held."""
    return spool.root / STATE / FOLDER / name


def is_held(spool: Spool, name: str) -> bool:
    """True while ``name`` has a hold marker."""
    return os.path.exists(os.path.join(spool.root, STATE, FOLDER, name))


def held(spool: Spool) -> list[str]:
    """Every held job's name, sorted."""
    try:
        return sorted(os.listdir(spool.root / STATE / FOLDER))
    except FileNotFoundError:
        return []


def hold(spool: Spool, name: str, who: str) -> Found:
    """Hold a queued job; a job elsewhere, or held already, is a :class:`BadRequest`."""
    from jobspool import annotate

    with spool.names_lock():
        found = _queued(spool, name, "hold")
        path = marker(spool, name)
        if path.exists():
            raise BadRequest(f"{name} is held already ('jobspool release {name}' lets it run)")
        path.parent.mkdir(exist_ok=True)
        annotate.note(spool, found, f"held by {who}")
        spool.write(path, [f"{found.place.interface}\n".encode()], replace=True)
    return found


def release(spool: Spool, name: str, who: str) -> Found:
    """Let a held job run again, in its place; a job not held is a :class:`BadRequest`."""
    from jobspool import annotate

    with spool.names_lock():
        found = _queued(spool, name, "release")
        path = marker(spool, name)
        if not path.exists():
            raise BadRequest(f"{name} is not held: nothing to release")
        annotate.note(spool, found, f"released by {who}")
        spool.remove(path)
    return found


def drop_marker(spool: Spool, name: str) -> None:
    """A held job that left its queue (deleted, fetched) is held no more."""
    spool.remove(marker(spool, name))


def _queued(spool: Spool, name: str, what: str) -> Found:
    found = spool.find(name)
    if found.place.state != QUEUE:
        raise BadRequest(f"cannot {what} {name}: it is in {found.place}, not queued")
    return found
