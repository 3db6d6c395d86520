"""The filesystem floor: what any durable spool must do for one job, and nothing else.

A plain Python loop over jobs already in an ``incoming`` folder, doing only the
renames, writes and syncs that a spool which keeps its promises cannot avoid,
with no checking, no handler, no logging and no bookkeeping:

1. rename ``incoming/NAME`` to ``queue/NAME`` (the job is accepted);
2. write its log: a staging file in ``tmp/``, written, renamed to
   ``bak/NAME,log.xml``;
3. rename ``queue/NAME`` to ``bak/NAME`` (the job is done).

Two ways to make that durable:

* **synced per job**: fsync both directories after each rename, fsync the
  log's data before its rename and ``bak`` after it: the cost when every state
  change is reported only once it is on disk, one job at a time;
* **one sync per batch of 64**: the same steps for 64 jobs without a sync, then
  one ``syncfs`` of the file system (group commit's best case; a real one
  that keeps "log before job" needs a sync between the steps, so this floor is
  a little lower than any correct implementation can reach).

The directory file descriptors are opened once, which is cheaper than the
daemon's open-fsync-close; the floor is meant to be the floor.

With a ``work`` function the same loop also does each job's own work in
its one thread: ``work(path, name)`` checks the job where it lies and
returns its log (the throughput benchmark passes jobspool's own check and
job log, :func:`checked_log`). The daemon's CPU over that loop's is what
its threads, its bookkeeping and its log lines cost.
"""

from __future__ import annotations

import ctypes
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

BATCH = 64

# A job log of the size the daemon writes for one job (about 600 bytes).
LOG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<joblog xmlns="urn:jobspool:joblog:1" '
    b'job="NAME" interface="orders_in">\n'
    b'  <received at="2026-11-22T10:00:00.000+01:00" via="drop"/>\n'
    b'  <checked at="2026-11-22T10:00:00.001+01:00" result="valid" schema="order.xsd"/>\n'
    b'  <moved at="2026-11-22T10:00:00.002+01:00" from="incoming/orders_in" '
    b'to="queue/orders_in"/>\n'
    b'  <started at="2026-11-22T10:00:00.003+01:00" handler="python:benchhandler:handle"/>\n'
    b'  <ran at="2026-11-22T10:00:00.004+01:00" result="done" seconds="0.000"/>\n'
    b'  <moved at="2026-11-22T10:00:00.005+01:00" from="queue/orders_in" to="bak/orders_in"/>\n'
    b"</joblog>\n"
)

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "syncfs")


class Tree:
    """incoming, queue, bak and tmp folders under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming, self.queue, self.bak, self.tmp = (
            root / d for d in ("incoming", "queue", "bak", "tmp")
        )
        for d in (self.incoming, self.queue, self.bak, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def fill(self, names: list[str], data: bytes) -> None:
        """Jobs arrive in incoming (not timed); synced so the timing starts clean."""
        for name in names:
            fd = os.open(self.incoming / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    def clear(self) -> None:
        for d in (self.incoming, self.queue, self.bak, self.tmp):
            for entry in os.scandir(d):
                os.unlink(entry.path)


Work = Callable[[str, str], bytes]  # (the job's path, its name) -> its log


def checked_log(schema: Path, interface: str) -> Work:
    """Each job's own work as the daemon does it: jobspool's check, then its job log."""
    from jobspool import check, joblog

    check.use_compiled(check.compile_all({schema}))

    def work(path: str, name: str) -> bytes:
        verdict = check.check_file(path, schema, 64 << 20)
        log = joblog.new(name, interface)
        joblog.received(log, "drop")
        joblog.checked(log, verdict.problems, schema)
        joblog.moved(log, f"incoming/{interface}", f"queue/{interface}")
        joblog.moved(log, f"queue/{interface}", f"bak/{interface}")
        return joblog.to_bytes(log)

    return work


def run_jobs(tree: Tree, names: list[str], batch: int | None) -> float:
    """Seconds to take every job of ``names`` from incoming to bak (see :func:`run_jobs_cpu`)."""
    return run_jobs_cpu(tree, names, batch)[0]


def run_jobs_cpu(
    tree: Tree, names: list[str], batch: int | None, work: Work | None = None
) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system of this process, which runs nothing else)
    to take every job of ``names`` from incoming to bak, durably.

    ``batch=None`` syncs every step of every job; ``batch=64`` does 64 jobs'
    steps and then one ``syncfs``. ``work``: each job is also checked and
    its log made by it (see the module's docstring).
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    inc, que, bak = (os.open(d, flags) for d in (tree.incoming, tree.queue, tree.bak))
    per_job = batch is None
    try:
        t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        for i, name in enumerate(names, 1):
            queued = f"{tree.queue}/{name}"
            os.rename(f"{tree.incoming}/{name}", queued)
            if per_job:
                os.fsync(que)
                os.fsync(inc)
            log = LOG.replace(b"NAME", name.encode()) if work is None else work(queued, name)
            staging = f"{tree.tmp}/.{name},log.xml"
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, log)
                if per_job:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(staging, f"{tree.bak}/{name},log.xml")
            if per_job:
                os.fsync(bak)
            os.rename(queued, f"{tree.bak}/{name}")
            if per_job:
                os.fsync(bak)
                os.fsync(que)
            elif batch is not None and (i % batch == 0 or i == len(names)):
                syncfs(bak)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        return time.perf_counter() - t0, cpu
    finally:
        for fd in (inc, que, bak):
            os.close(fd)
