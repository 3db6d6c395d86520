"""A queue in processing order: acceptance stamp (the file's mtime), then name.

A listing is one ``listdir`` and one ``stat`` per job, relative to the
folder's descriptor; a queue of a million shares the ``stat`` calls among
forked helpers (a thread does not help: each ``stat`` hands the GIL over).
The result is two parallel arrays, 8 bytes a stamp, because a daemon may hold
a paused queue of a million in memory.

Imports nothing of jobspool's but ``names`` and ``durable``: the ``queue``
command uses it.
"""

from __future__ import annotations

import itertools
import operator
import os
import stat
import threading
from array import array
from collections.abc import Callable, Container, Iterable
from typing import Literal, NamedTuple

from jobspool import names
from jobspool.durable import libc_function


def of(folder: str | os.PathLike[str], known: Container[str] = (), *, workers: int = 1) -> Listing:
    """The jobs in ``folder`` in processing order: by stamp, then by name.

    Names in ``known`` are left out unread: a daemon's rescan only needs
    what it has not seen, and a ``stat`` per job is most of a listing's
    cost. ``workers`` above 1 shares those ``stat`` calls among as many
    processes (forked: a thread does not help, each ``stat`` hands the
    GIL over). Only a single-threaded process forks, such as the
    ``queue`` command; any other gets one worker. A missing folder raises
    :class:`FileNotFoundError`.
    """
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        found = os.listdir(fd)
        if known:
            found = [name for name in found if name not in known]
        if workers > 1 and len(found) >= _FORK_FROM and threading.active_count() == 1:
            return _merged(_listed_forked(fd, found, workers))
        return _listed(fd, found)
    finally:
        os.close(fd)


class Listing(NamedTuple):
    """A queue in processing order: each job's acceptance stamp (ns) and name, index by index.

    The stamps are an ``array('q')``, 8 bytes a job, not an int object each:
    a daemon may hold a paused queue of a million in memory.
    """

    stamps: array[int]
    names: list[str]


_FORK_FROM = 20_000  # jobs; below that a forked helper costs more than it saves
_EXACT = 2**53  # a float holds every integer below this exactly
_GONE = -(2**63)  # the stamp of a name that is no plain file (any more)


def ordered(stamps: array[int], jobs: list[str]) -> Listing:
    """Jobs in processing order (by stamp, then by name), from the two in any order.

    Each pass over a million jobs in an order other than memory's costs a
    cache miss a job (a tenth of a second or more here), so this makes as few
    as it can: the sort, then one gather each for the names and the stamps.
    """
    order = _order(stamps)
    if len(order) < 2:
        return Listing(array("q", stamps), list(jobs))
    pick = operator.itemgetter(*order)
    in_order = pick(stamps)  # new ints, made in order: the tie check reads them in memory order
    return _tie_broken(array("q", in_order), in_order, list(pick(jobs)))


def _order(stamps: array[int]) -> list[int]:
    """The indices that sort ``stamps``, equal ones in their given order.

    The keys are floats where that is exact (stamps less than 104 days
    apart): a sort compares floats about twice as fast as large integers.
    """
    if not stamps:
        return []
    low = min(stamps)
    keys: list[float] | array[int] = stamps
    if max(stamps) - low < _EXACT:
        keys = [float(s - low) for s in stamps]
    return sorted(range(len(stamps)), key=keys.__getitem__)


def _tie_broken(stamps: array[int], same: Iterable[int], jobs: list[str]) -> Listing:
    """Jobs with equal stamps (copied in with their times, coarse clocks) put in name order.

    ``same`` holds the stamps again, in the fastest form to read. Finding the
    ties is one pass in C, so a queue without any pays nothing more.
    """
    first = iter(same)
    next(first, None)
    ties = list(itertools.compress(itertools.count(), map(operator.eq, same, first)))
    start = 0
    for k, i in enumerate(ties):
        if k + 1 == len(ties) or ties[k + 1] != i + 1:  # the last of a run of equal stamps
            head = ties[start]
            jobs[head : i + 2] = sorted(jobs[head : i + 2])
            start = k + 1
    return Listing(stamps, jobs)


def _listed(fd: int, found: list[str]) -> Listing:
    """The jobs among the names ``found`` in the folder ``fd``, in processing order."""
    jobs = names.valid(found)
    stamps = _stamps(fd, jobs)
    if _GONE in stamps:  # taken meanwhile, or no plain file: rare
        keep = list(map(operator.ne, stamps, itertools.repeat(_GONE)))
        jobs = list(itertools.compress(jobs, keep))
        stamps = array("q", itertools.compress(stamps, keep))
    return ordered(stamps, jobs)


def _stamps(fd: int, jobs: list[str]) -> array[int]:
    """The stamp of each of ``jobs`` (in the folder ``fd``), or ``_GONE``."""
    stamps: array[int] = array("q")
    append, lstat, is_file = stamps.append, os.stat, stat.S_ISREG
    for name in jobs:
        try:  # relative to the folder's descriptor: no path to walk for each job
            st = lstat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:  # taken meanwhile
            append(_GONE)
        else:
            append(st.st_mtime_ns if is_file(st.st_mode) else _GONE)
    return stamps


def _merged(parts: list[Listing]) -> Listing:
    """One listing of parts each in processing order: a merge, as the sort finds the runs."""
    stamps: array[int] = array("q")
    for part in parts:
        stamps += part.stamps
    return ordered(stamps, list(itertools.chain.from_iterable(part.names for part in parts)))


def _listed_forked(fd: int, found: list[str], workers: int) -> list[Listing]:
    """:func:`_listed` of shares of ``found``, all but the first in forked children.

    Each child sorts its share too, and sends its names back as one text,
    which makes them new strings laid out in their order: the merge then
    reads memory in order instead of one cache miss a job. A child that
    cannot be forked, or fails, has its share done here.
    """
    bounds = [len(found) * k // workers for k in range(workers + 1)]
    shares = [found[bounds[k] : bounds[k + 1]] for k in range(workers)]
    children = [(share, _fork_listed(fd, share)) for share in shares[1:]]
    try:
        parts = [_listed(fd, shares[0])]
        while children:
            share, child = children.pop(0)
            got = _collect(*child) if child is not None else None
            parts.append(got if got is not None else _listed(fd, share))
        return parts
    finally:
        for _, child in children:  # only after an exception: nobody waits for them
            if child is not None:
                os.close(child[1])
                os.waitpid(child[0], 0)


def _fork_listed(fd: int, found: list[str]) -> tuple[int, int] | None:
    """Fork a child that writes the :func:`_listed` of ``found`` to a pipe: (pid, pipe)."""
    try:
        r, w = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return None
    if pid == 0:
        status = 1
        try:
            os.close(r)
            stamps, jobs = _listed(fd, found)
            with open(w, "wb") as out:
                out.write(len(stamps).to_bytes(8, "little"))
                out.write(stamps)
                out.write("\n".join(jobs).encode("ascii"))  # job names are ASCII
            status = 0
        finally:
            os._exit(status)  # nothing of the parent's: no atexit, no buffered output
    os.close(w)
    return pid, r


def _collect(pid: int, r: int) -> Listing | None:
    """What a child of :func:`_fork_listed` found; None if it failed."""
    try:
        with open(r, "rb") as f:
            data = f.read()
    finally:
        _, status = os.waitpid(pid, 0)
    count = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if status != 0 or count < 0 or len(data) < 8 + 8 * count:
        return None
    stamps: array[int] = array("q")
    stamps.frombytes(memoryview(data)[8 : 8 + 8 * count])
    jobs = data[8 + 8 * count :].decode("ascii").split("\n") if count else []
    return Listing(stamps, jobs) if len(jobs) == count else None


_malloc_trim: Callable[[int], int] | Literal[False] | None = None


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; else nothing).

    Listing a million jobs frees tens of megabytes of scratch lists that glibc
    would otherwise keep, and a daemon would carry them in its resident set
    for good.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes

        _malloc_trim = libc_function("malloc_trim", ctypes.c_size_t)
    if _malloc_trim is not False:
        _malloc_trim(0)
