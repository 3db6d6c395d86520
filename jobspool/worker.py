"""Processing one interface's queue: in acceptance order, one job at a time by default.

A :class:`Lane` holds the interface's queue in memory (:class:`Pending`,
in acceptance order), filled by the daemon's scans, its events and its own
accepts; the directory stays the truth, so a job that vanished is simply
skipped. Its worker threads take the head, run the handler, and finish the
job:

- done: the log is written into ``bak/IFACE``, then the job is renamed
  beside it;
- failed: the same into ``joberrors``;

Finished jobs are committed in groups (up to 64, or fewer as soon as nothing
else is runnable, so a lone job waits for nobody): every log written, one
``syncfs``, every job's rename; the next batch's ``syncfs`` (or, when the
lane has nothing else to run, one of its own) makes those renames durable,
and only then are the jobs reported done. That keeps "the log is durable
before the job's final rename" at one sync per batch in a burst, two for a
lone job, instead of six fsyncs per job.
- try later: the job keeps its place at the head, its log so far is kept in
  ``state/pending``, and the lane waits, doubling the wait each time (from
  ``backoff_initial`` up to ``backoff_max``). ``state/blocked/IFACE`` says
  which job blocks the lane and since when, for ``jobspool interfaces``.

A handler that the daemon itself interrupts (shutdown after the grace period)
leaves its job in the queue: it runs again after the restart. Handlers run at
least once.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import operator
import shlex
import subprocess
import threading
import time
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from jobspool import handlers, joblog, logs, names
from jobspool.alerts import Event
from jobspool.config import Interface
from jobspool.spool import BAK, JOBERRORS, QUEUE, Listing, Spool, ordered, trim_heap

if TYPE_CHECKING:
    from jobspool.daemon import Daemon


TRIM_FROM = 100_000  # queued jobs from which a refill hands its scratch memory back
BATCH = 64  # jobs per group commit (accepts in the daemon, finished jobs in a lane)


class Finished(NamedTuple):
    """A job whose handler is done (or failed), waiting for its batch's commit."""

    stamp: int
    name: str
    log: joblog.Log
    dest: str
    outcome: handlers.Outcome
    pending: bool  # state/pending may hold an older copy of its log


FOLD_FROM = 65_536  # jobs in a Pending's heap before they may join its run
TRIM_FROM = 4_096  # jobs taken from the front of a run before its list may be shortened


class Pending:
    """A lane's queued jobs, in acceptance order (stamp, then name), and every name it knows.

    A paused interface can hold a million jobs, all of them here. The bulk
    is a *run* sorted once: the names in a list, the stamps in an
    ``array('q')`` (8 bytes a job instead of a tuple and an int, some 90),
    taken from the front by an index. Jobs that arrive one at a time, and a
    job put back, go to a small heap; a heap grown as large as what is left
    of the run is folded into it. ``known`` holds every name that is queued
    or being processed, the same string objects as the run's.

    Not thread-safe: the lane's condition guards it.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.stamps: array[int] = array("q")
        self.head = 0  # the run's next job
        self.heap: list[tuple[int, str]] = []
        self.known: set[str] = set()

    def __len__(self) -> int:
        """How many jobs wait to be taken (not those being processed)."""
        return len(self.names) - self.head + len(self.heap)

    def offer(self, stamp: int, name: str) -> bool:
        """Queue a job unless it is known; True if it was not."""
        if name in self.known:
            return False
        self.known.add(name)
        heapq.heappush(self.heap, (stamp, name))
        if len(self.heap) > max(FOLD_FROM, len(self.names) - self.head):
            self._fold(array("q"), [])
        return True

    def extend(self, listing: Listing) -> int:
        """Queue the jobs of a listing (in processing order) that are not known; how many."""
        stamps, jobs = listing
        fresh = list(map(operator.not_, map(self.known.__contains__, jobs))) if self.known else []
        if not all(fresh):  # offered since the folder was read
            jobs = list(itertools.compress(jobs, fresh))
            stamps = array("q", itertools.compress(stamps, fresh))
        self.known.update(jobs)
        if self.head == len(self.names):  # the first refill, or the run is used up
            self.names, self.stamps, self.head = jobs, stamps, 0
        elif len(jobs) > max(FOLD_FROM, len(self.names) - self.head):
            self._fold(stamps, jobs)
        else:
            for job in zip(stamps, jobs, strict=True):
                heapq.heappush(self.heap, job)
        return len(jobs)

    def put_back(self, stamp: int, name: str) -> None:
        """A known job taken but not done goes back where it was: at the head, as a rule."""
        heapq.heappush(self.heap, (stamp, name))

    def pop(self) -> tuple[int, str]:
        """Take the first job; only when there is one (``len(self)``)."""
        head = self.head
        if head < len(self.names):
            first = (self.stamps[head], self.names[head])
            if not self.heap or first < self.heap[0]:
                self.head = head + 1
                if self.head >= TRIM_FROM and 2 * self.head >= len(self.names):
                    # Taken jobs' names go as the run shortens; amortized, a copy per job.
                    del self.names[: self.head], self.stamps[: self.head]
                    self.head = 0
                return first
        return heapq.heappop(self.heap)

    def forget(self, name: str) -> None:
        """The job is done (or gone): a later offer of its name queues it again."""
        self.known.discard(name)

    def _fold(self, stamps: array[int], jobs: list[str]) -> None:
        """One run of what is left of the run, the heap and ``stamps``/``jobs``."""
        stamps = self.stamps[self.head :] + stamps + array("q", [s for s, _ in self.heap])
        jobs = self.names[self.head :] + jobs + [n for _, n in self.heap]
        self.stamps, self.names = ordered(stamps, jobs)
        self.head = 0
        self.heap = []


class Lane:
    """One interface's queue and the threads that work through it."""

    def __init__(self, daemon: Daemon, iface: Interface) -> None:
        self.daemon = daemon
        self.iface = iface
        self.pending = Pending()
        self.in_flight: set[str] = set()
        self.cond = threading.Condition()
        self.not_before = 0.0  # monotonic time before which the lane waits (try later)
        self.attempts: dict[str, int] = {}
        self.blocked_since: dict[str, float] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.interrupted: set[str] = set()
        self.stopping = False
        self.threads: list[threading.Thread] = []

    @property
    def spool(self) -> Spool:
        return self.daemon.spool

    @property
    def known(self) -> set[str]:
        """Every job name the lane has queued or is processing.

        The same set for the lane's life: a membership test needs no lock,
        as a hint (the daemon skips the ``stat`` of a queue event for a job
        the lane knows); :meth:`offer` decides under the lock.
        """
        return self.pending.known

    # --- the queue in memory -------------------------------------------------------

    def offer(self, stamp: int, name: str) -> None:
        """A job is in the queue directory (again); the lane takes note once."""
        with self.cond:
            if self.pending.offer(stamp, name):
                self.cond.notify()

    def refill(self) -> None:
        """Add whatever the queue directory holds that the lane does not know."""
        # The set itself, not a copy (a million names): each membership test
        # is atomic, and a name offered or forgotten meanwhile is sorted out
        # by extend() under the lock, or skipped when its file is gone.
        listing = self.spool.listing(self.iface.name, known=self.pending.known)
        with self.cond:
            if self.pending.extend(listing):
                self.cond.notify_all()
        del listing  # a filtered copy's lists, before the scratch memory is given back
        if len(self.pending.known) >= TRIM_FROM:  # small queues leave little to give back
            trim_heap()

    def depth(self) -> int:
        with self.cond:
            return len(self.pending.known)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    # --- threads -----------------------------------------------------------------------

    def start(self) -> None:
        for i in range(self.iface.concurrency):
            t = threading.Thread(target=self._work, name=f"lane-{self.iface.name}-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        """Take no new job; running ones finish (see :meth:`interrupt`)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def busy(self) -> bool:
        return any(t.is_alive() for t in self.threads) and bool(self.in_flight)

    def interrupt(self) -> None:
        """Kill running commands' process groups; their jobs stay queued."""
        with self.cond:
            procs = dict(self.procs)
            self.interrupted.update(procs)
        for proc in procs.values():
            handlers.kill_group(proc, grace=2.0)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _take(self, block: bool) -> tuple[int, str] | bool | None:
        """The next runnable job, None when stopping, False when none is runnable now.

        False only comes when ``block`` is off: the caller then commits its
        batch before it waits.
        """
        with self.cond:
            while True:
                if self.stopping:
                    return None
                wait = self.not_before - time.monotonic()
                if self.pending and wait <= 0 and not self.spool.is_paused(self.iface.name):
                    item = self.pending.pop()
                    self.in_flight.add(item[1])
                    return item
                if not block:
                    return False
                # Pause markers are files: look again every second.
                self.cond.wait(min(max(wait, 0.05), 1.0) if self.pending else 1.0)

    def _work(self) -> None:
        batch: list[Finished] = []
        renamed: list[tuple[Finished, str]] = []  # this thread's, in bak/joberrors, not synced
        while (item := self._take(block=not (batch or renamed))) is not None:
            if item is False:  # nothing more to run now: make the batch durable first
                self.commit(batch, renamed)
                continue
            assert isinstance(item, tuple)
            stamp, name = item
            bound = logs.get(job=name, interface=self.iface.name)
            done = None
            try:
                done = self.process(stamp, name)
            except Exception as exc:  # disk full, permission: the job stays queued
                bound.error("processing failed; the job stays queued", error=str(exc))
                self.daemon.alerts.fault(f"{name}: processing failed: {exc}")
                self._back_off(stamp, name)
            if done is None:
                with self.cond:
                    self.in_flight.discard(name)
            else:
                batch.append(done)
                if len(batch) >= BATCH:
                    self.commit(batch, renamed)
        self.commit(batch, renamed)
        self.commit(batch, renamed)  # the last renames, synced and reported

    # --- one job -------------------------------------------------------------------------

    def process(self, stamp: int, name: str) -> Finished | None:
        """Run the handler; a done or failed job comes back to be committed with its batch."""
        iface, spool = self.iface, self.spool
        path = spool.dir(QUEUE, iface.name) / name
        bound = logs.get(job=name, interface=iface.name)
        if not path.is_file():
            self._forget(name)  # fetched, or moved by hand: nothing to do
            return None
        log, pending = self.daemon.take_log(name, stamp, iface.name)
        bound.debug("started", handler=self._describe())  # not a state change
        if iface.command is not None:
            outcome = handlers.run_command(
                [*iface.command, str(path)],  # the job's path is the last argument
                handlers.job_environment(name, iface.name, spool.root),
                iface.timeout,
                output_limit=self.daemon.cfg.daemon.output_limit,
                limits=handlers.Limits(iface.memory_limit, math.ceil(iface.cpu_limit or 0) or None)
                if iface.memory_limit or iface.cpu_limit
                else None,
                on_start=lambda proc: self._running(name, proc),
            )
        else:
            assert iface.handler is not None
            job = handlers.Job(name, iface.name, path)
            outcome = handlers.run_python(iface.handler, job, beside=self.daemon.cfg.path.parent)
        with self.cond:
            self.procs.pop(name, None)
            interrupted = name in self.interrupted
            self.interrupted.discard(name)
        if interrupted:
            bound.warning("interrupted by shutdown; it stays queued and runs again")
            return None
        joblog.ran(log, outcome, self._describe())
        self.daemon.count(iface.name, outcome)
        if outcome.result == handlers.LATER:
            spool.write(spool.pending_log(name), [joblog.to_bytes(log)], replace=True)
            bound.info("try later", reason=outcome.reason)
            self._back_off(stamp, name, outcome.reason or "try later")
            return None
        dest = BAK if outcome.result == handlers.DONE else JOBERRORS
        return Finished(stamp, name, log, dest, outcome, pending)

    def commit(self, batch: list[Finished], renamed: list[tuple[Finished, str]]) -> None:
        """Group commit: every log in place, one sync, then every job's one rename.

        The sync makes this batch's logs durable before its jobs' final
        renames (the contract), and the previous batch's renames durable, so
        a burst costs one sync per batch, not two. Only after a job's rename
        is synced is it reported done: when nothing else is runnable,
        :meth:`_work` commits an empty batch for that. A crash before that
        sync leaves some jobs in the queue with their handler run: they run
        again (at least once). ``renamed`` is the calling thread's list of
        jobs renamed but not yet synced.
        """
        if not batch and not renamed:
            return
        spool = self.spool
        placed = []
        for f in batch:
            try:
                placed.append((f, *self._place_log(f)))
            except Exception as exc:
                logs.get(job=f.name, interface=self.iface.name).error(
                    "cannot write the log; the job stays queued", error=str(exc)
                )
                self.daemon.keep_log(f.name, f.log)  # its history so far, for the next run
                self._back_off(f.stamp, f.name)
        if not self._sync():
            # The logs may not be on disk: no job may move past them. Those
            # renamed last time wait for a sync that works to be reported.
            for f, *_ in placed:
                self.daemon.keep_log(f.name, f.log)
                self._back_off(f.stamp, f.name)
            with self.cond:
                self.in_flight.difference_update(f.name for f in batch)
            batch.clear()
            time.sleep(min(self.daemon.cfg.daemon.backoff_initial, 1.0))  # not a hot loop
            return
        self._report(renamed)
        renamed.clear()
        for f, dest_dir, new_name, label in placed:
            try:
                spool.move(spool.dir(QUEUE, self.iface.name) / f.name, dest_dir,
                           new_name=new_name, sync=False)  # fmt: skip
            except Exception as exc:
                logs.get(job=f.name, interface=self.iface.name).error(
                    "cannot move the job; it stays queued", error=str(exc)
                )
                self._back_off(f.stamp, f.name)
                continue
            renamed.append((f, label))
        staying = {f.name for f in batch} - {f.name for f, _ in renamed}
        with self.cond:
            self.in_flight.difference_update(staying)
        batch.clear()

    def _report(self, renamed: list[tuple[Finished, str]]) -> None:
        """Jobs whose final rename is durable: done (or failed), and forgotten."""
        spool = self.spool
        for f, label in renamed:
            if f.pending:
                with contextlib.suppress(Exception):  # a stale one is cleaned at start
                    spool.remove(spool.pending_log(f.name), sync=False)
            self._forget(f.name)
            bound = logs.get(job=f.name, interface=self.iface.name)
            if f.dest == BAK:
                bound.info(f.outcome.result, to=label)
            else:  # a partner's job failed: someone must look at it (journalctl -p err)
                bound.error(f.outcome.result, to=label, reason=f.outcome.reason)
                event = Event("job-failed", f.name, self.iface.name, reason=f.outcome.reason)
                self.daemon.alerts.emit(event)
        with self.cond:
            self.in_flight.difference_update(f.name for f, _ in renamed)

    def _place_log(self, f: Finished) -> tuple[Path, str, str]:
        """Write a finished job's log beside where it goes; (folder, name, place) for the move."""
        spool, iface = self.spool, self.iface
        dest_dir = spool.dir(BAK, iface.name) if f.dest == BAK else spool.joberrors
        label = f"{BAK}/{iface.name}" if f.dest == BAK else JOBERRORS
        new_name = f.name
        if (dest_dir / f.name).exists():  # only if someone put a file there by hand
            from jobspool.intake import safe_name

            with spool.names_lock():  # stamps come from one sequence, the intake's too
                new_name = safe_name(f.name, spool.stamp())
            f.log.set("job", new_name)
            joblog.note(f.log, f"{f.name} was already in {label}; this job was renamed {new_name}")
        # The final move is in the file, not in f.log: should this fail, f.log
        # stays the history so far, for the next run.
        moved = joblog.moved(f.log, f"{QUEUE}/{iface.name}", label)
        try:
            final = joblog.to_bytes(f.log)
        finally:
            f.log.remove(moved)
        spool.write(dest_dir / names.log_name(new_name), [final], replace=True, sync=False)
        return dest_dir, new_name, label

    def _sync(self) -> bool:
        try:
            self.spool.sync()
        except Exception as exc:
            self.daemon.log.error("cannot sync the spool", error=str(exc))
            self.daemon.alerts.fault(f"cannot sync the spool: {exc}")
            return False
        return True

    # --- bookkeeping -----------------------------------------------------------------------

    def _running(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        with self.cond:
            self.procs[name] = proc

    def _forget(self, name: str) -> None:
        with self.cond:
            self.pending.forget(name)
            self.attempts.pop(name, None)
            if self.blocked_since.pop(name, None) is not None:
                self.daemon.publish_blocked(self.iface.name, None)

    def _back_off(self, stamp: int, name: str, reason: str = "error") -> None:
        cfg = self.daemon.cfg.daemon
        with self.cond:
            n = self.attempts[name] = self.attempts.get(name, 0) + 1
            delay = min(cfg.backoff_initial * 2 ** (n - 1), cfg.backoff_max)
            self.not_before = time.monotonic() + delay
            self.pending.put_back(stamp, name)  # it keeps its place at the head
            since = self.blocked_since.setdefault(name, time.time())
        self.daemon.publish_blocked(
            self.iface.name,
            f"{name} blocks the queue since {joblog.iso(since)}: {reason} "
            f"(attempt {n}, next in {delay:g}s)",
        )
        self.daemon.alerts.blocking(self.iface.name, name, since, reason)

    def _describe(self) -> str:
        if self.iface.command is not None:
            return shlex.join(self.iface.command)
        return f"python:{self.iface.handler}"
