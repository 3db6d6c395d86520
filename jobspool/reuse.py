"""A dropped file whose name is in use: a derived name that keeps the original visible.

A partner who sends ``orders.xml`` every day must have every one checked and
processed, not the first only. When a drop's name is already a job's (in
incoming, a queue, bak or joberrors), the new job is named after the
original with the UTC time of its acceptance, to the millisecond, before
the extension::

    orders.xml  ->  orders.20261203T061500.123.xml
    orders      ->  orders.20261203T061500.123

Such a name is a valid job name, sorts in the order the files came, and
``ls`` next to the original shows where it came from. Should two fall into
one millisecond, the later one takes the next free millisecond.

``state/reused/ORIGINAL`` holds the newest derived name of each reused
original, so that ``jobspool status ORIGINAL`` answers for the newest job
of that name with one read and a handful of ``stat`` calls. Only the
standard library and :mod:`jobspool.spool`: ``status`` imports this.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from jobspool import names
from jobspool.spool import STATE, Found, Spool

FOLDER = "reused"
_MAX_EXT = 10  # a longer "extension" is part of the name


def derive(original: str, stamp_ns: int) -> str:
    """The derived name of ``original`` for a job accepted at ``stamp_ns`` (always valid)."""
    stem, ext = _split(original)
    ms = stamp_ns // 1_000_000
    when = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}"
    room = names.MAX_LEN - len(when) - 1 - len(ext)
    return f"{stem[:room]}.{when}{ext}"


def free_name(original: str, stamp_ns: int, in_use: Callable[[str], bool]) -> str:
    """A derived name no job has; called under the names lock."""
    ns = stamp_ns
    while True:
        name = derive(original, ns)
        if not in_use(name):
            return name
        ns += 1_000_000  # the next millisecond: later, so the order still holds


def remember(spool: Spool, original: str, derived: str, *, sync: bool = True) -> None:
    """Record ``derived`` as the newest job dropped as ``original`` (under the names lock)."""
    folder = spool.root / STATE / FOLDER
    try:
        folder.mkdir(exist_ok=True)
    except FileNotFoundError:
        spool.require()
        raise
    spool.write(folder / original, [derived.encode() + b"\n"], replace=True, sync=sync)


def newest(spool: Spool, original: str) -> Found | None:
    """The newest job dropped as ``original``, if that is one under a derived name.

    None when no file dropped as ``original`` was renamed, when the newest
    such job is gone, or when the job named ``original`` itself is newer.
    """
    names.check_name(original)
    try:
        with open(os.path.join(spool.root, STATE, FOLDER, original), encoding="ascii") as f:
            derived = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not names.is_valid(derived):
        return None
    found = spool.locate(derived)
    own = spool.locate(original)
    if found is None or own is None:
        return found
    # The name was free again when a later file came (the old job purged):
    # the newest is whichever was accepted last (a job's mtime is its stamp).
    try:
        if os.lstat(own.path).st_mtime_ns > os.lstat(found.path).st_mtime_ns:
            return None
    except OSError:
        pass
    return found


def _split(name: str) -> tuple[str, str]:
    stem, dot, ext = name.rpartition(".")
    if dot and stem and 0 < len(ext) <= _MAX_EXT and ext.isalnum():
        return stem, "." + ext
    return name, ""
