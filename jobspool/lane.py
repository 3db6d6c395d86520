"""Processing one interface's queue: in acceptance order, one job at a time by default.

A :class:`Lane` holds the interface's queue in memory (its :class:`Backlog`,
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
- try later: the job keeps its place at the head, its log so far is kept as
  its pending log (``state/pending/NAME,log.xml``), and the lane waits,
  doubling the wait each time (from
  ``backoff_initial`` up to ``backoff_max``). ``state/blocked/IFACE`` says
  which job blocks the lane and since when, for ``jobspool interfaces``.

A handler that the daemon itself interrupts (shutdown after the grace period)
leaves its job in the queue: it runs again after the restart. Handlers run at
least once.

A lane is built from what it needs, never from the daemon: the interface and
a :class:`LaneContext` (the spool, the daemon's settings, a logger, the group
commit, the logs held in memory, the counters). A reload hands it a new
interface and a new context (:meth:`Lane.reconfigure`).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from jobspool import handlers, intake, joblog, names
from jobspool.config import DaemonSettings, Interface
from jobspool.durable import BATCH, GroupCommit
from jobspool.errors import JobspoolError
from jobspool.listing import Listing, ordered, trim_heap
from jobspool.metrics import Counters
from jobspool.spool import BAK, JOBERRORS, QUEUE, Spool

RELEASE_FROM = 100_000  # queued jobs from which a refill hands its scratch memory back


class Finished(NamedTuple):
    """A job whose handler is done (or failed), waiting for its batch's commit."""

    stamp: int
    name: str
    log: joblog.Log
    dest: str
    outcome: handlers.Outcome
    has_pending_log: bool  # state/pending may hold an older copy of its log


FOLD_FROM = 65_536  # jobs in a backlog's heap before they may join its run
SHORTEN_FROM = 4_096  # jobs taken from the front of a run before its list may be shortened


class HeldLogs:
    """Logs of queued jobs that this process holds in memory, by job name.

    An accepted drop's log so far is held from its accept until its lane
    takes the job; a finished job whose commit failed has its history held
    for the next try. A job not held here (accepted by an earlier daemon,
    retried, placed by hand) starts from its pending log on disk.
    Thread-safe: the main loop holds, the lanes take.
    """

    def __init__(self) -> None:
        self._logs: dict[str, tuple[joblog.Log, bool]] = {}
        self._lock = threading.Lock()

    def hold(self, name: str, log: joblog.Log, has_pending_log: bool = False) -> None:
        """Hold ``log`` for job ``name``; ``has_pending_log``: an older copy may be on disk."""
        with self._lock:
            self._logs[name] = (log, has_pending_log)

    def take(self, name: str) -> tuple[joblog.Log, bool] | None:
        """The held log of ``name`` and whether a pending log may be on disk; None if none."""
        with self._lock:
            return self._logs.pop(name, None)


class LaneContext(NamedTuple):
    """What a lane works with; the daemon makes one, and a new one at each reload."""

    spool: Spool
    settings: DaemonSettings
    config_dir: Path  # where a Python handler's module may sit
    logger: Any
    commit: GroupCommit
    held: HeldLogs
    counters: Counters
    # Cluster mode: asked before a handler starts and before every move; False:
    # this node's lease on the interface is lost, nothing more moves.
    may_move: Callable[[str], bool] | None = None


class Backlog:
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
                if self.head >= SHORTEN_FROM and 2 * self.head >= len(self.names):
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

    def __init__(self, iface: Interface, ctx: LaneContext) -> None:
        self.iface = iface
        self.ctx = ctx
        self.backlog = Backlog()
        self.in_flight: set[str] = set()
        self.cond = threading.Condition()
        self.not_before = 0.0  # monotonic time before which the lane waits (try later)
        self.attempts: dict[str, int] = {}
        self.blocked_since: dict[str, float] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.interrupted: set[str] = set()
        self.stopping = False
        self.threads: list[threading.Thread] = []
        self.finished: list[Finished] = []  # handlers ended, not yet committed
        self.committer: threading.Thread | None = None
        self.workers_done = False  # joined: no job will finish any more
        self.committing_fails = False  # the last commit failed: start no new handler
        self._trouble_seen: str | None = None  # the last commit error logged
        self._marker_error: str | None = None  # the blocked marker's last write error

    @property
    def spool(self) -> Spool:
        return self.ctx.spool

    def reconfigure(self, iface: Interface, ctx: LaneContext) -> None:
        """A reload: the next job runs with the new interface settings and context."""
        with self.cond:
            self.iface, self.ctx = iface, ctx

    @property
    def known(self) -> set[str]:
        """Every job name the lane has queued or is processing.

        The same set for the lane's life: a membership test needs no lock,
        as a hint (the daemon skips the ``stat`` of a queue event for a job
        the lane knows); :meth:`offer` decides under the lock.
        """
        return self.backlog.known

    # --- the queue in memory -------------------------------------------------------

    def offer(self, stamp: int, name: str) -> None:
        """A job is in the queue directory (again); the lane takes note once."""
        with self.cond:
            if self.backlog.offer(stamp, name):
                self.cond.notify()

    def refill(self) -> None:
        """Add whatever the queue directory holds that the lane does not know."""
        # The set itself, not a copy (a million names): each membership test
        # is atomic, and a name offered or forgotten meanwhile is sorted out
        # by extend() under the lock, or skipped when its file is gone.
        listing = self.spool.listing(self.iface.name, known=self.backlog.known)
        with self.cond:
            if self.backlog.extend(listing):
                self.cond.notify_all()
        del listing  # a filtered copy's lists, before the scratch memory is given back
        if len(self.backlog.known) >= RELEASE_FROM:  # small queues leave little to give back
            trim_heap()

    def depth(self) -> int:
        with self.cond:
            return len(self.backlog.known)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    # --- threads -----------------------------------------------------------------------

    def start(self) -> None:
        for i in range(self.iface.concurrency):
            t = threading.Thread(target=self._work, name=f"lane-{self.iface.name}-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        self.committer = threading.Thread(
            target=self._commit_finished, name=f"commit-{self.iface.name}", daemon=True
        )
        self.committer.start()

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
        with self.cond:
            self.workers_done = True  # nothing more will finish: commit what has, then end
            self.cond.notify_all()
        if self.committer is not None:
            self.committer.join(max(0.0, deadline - time.monotonic()))

    def _take(self) -> tuple[int, str] | None:
        """The next runnable job; None when stopping."""
        with self.cond:
            while True:
                if self.stopping:
                    return None
                wait = self.not_before - time.monotonic()
                # While finished jobs cannot be committed (a machine fault), no
                # new handler starts: its outcome could not be kept either.
                runnable = self.backlog and not self.committing_fails and self._owned()
                if runnable and wait <= 0 and not self.spool.is_paused(self.iface.name):
                    item = self.backlog.pop()
                    self.in_flight.add(item[1])
                    return item
                # Pause markers are files: look again every second.
                self.cond.wait(min(max(wait, 0.05), 1.0) if self.backlog else 1.0)

    def _work(self) -> None:
        """A worker thread: run handlers, one job after another, and hand finished ones over."""
        while (item := self._take()) is not None:
            stamp, name = item
            bound = self.ctx.logger.bind(job=name, interface=self.iface.name)
            done = None
            try:
                done = self.process(stamp, name)
            except Exception as exc:  # disk full, permission: the job stays queued
                bound.error("processing failed; the job stays queued", error=str(exc))
                self._back_off(stamp, name)
            with self.cond:
                if done is None:
                    self.in_flight.discard(name)
                else:  # committed by the lane's committer, while this thread runs the next
                    self.finished.append(done)
                    self.cond.notify_all()

    def _commit_finished(self) -> None:
        """The committer thread: finished jobs reach bak/joberrors within a sync or two.

        It takes whatever has finished (up to a batch), commits it, and syncs
        again at once for the last renames when nothing more has finished, so
        a job is reported done milliseconds after its handler ended, whatever
        the next handler does; a burst still costs one sync per batch.
        """
        renamed: list[tuple[Finished, str]] = []  # in bak/joberrors, not yet synced
        while True:
            with self.cond:
                while not (self.finished or renamed or self.workers_done):
                    self.cond.wait()
                if self.workers_done and not (self.finished or renamed):
                    return
                batch, self.finished = self.finished[:BATCH], self.finished[BATCH:]
            again = self.commit(batch, renamed)
            with self.cond:
                self.finished[:0] = again  # first in line when the machine recovers
                if self.committing_fails and not again:
                    self.cond.notify_all()  # handlers may start again
                self.committing_fails = bool(again)
            if again:
                time.sleep(self.ctx.commit.retry_in())  # bounded back-off, not a hot loop

    # --- one job -------------------------------------------------------------------------

    def process(self, stamp: int, name: str) -> Finished | None:
        """Run the handler; a done or failed job comes back to be committed with its batch."""
        iface, spool = self.iface, self.spool
        path = spool.dir(QUEUE, iface.name) / name
        bound = self.ctx.logger.bind(job=name, interface=iface.name)
        if not path.is_file():
            self._forget(name)  # fetched, or moved by hand: nothing to do
            return None
        held = self.ctx.held.take(name)
        log, has_pending_log = held or (intake.log_so_far(spool, name, iface.name, stamp), True)
        bound.debug("started", handler=self._describe())  # not a state change
        if iface.command is not None:
            outcome = handlers.run_command(
                [*iface.command, str(path)],  # the job's path is the last argument
                handlers.job_environment(name, iface.name, spool.root),
                iface.timeout,
                output_limit=self.ctx.settings.output_limit,
                limits=handlers.Limits(iface.memory_limit, math.ceil(iface.cpu_limit or 0) or None)
                if iface.memory_limit or iface.cpu_limit
                else None,
                on_start=lambda proc: self._running(name, proc),
            )
        else:
            assert iface.handler is not None
            job = handlers.Job(name, iface.name, path)
            outcome = handlers.run_python(iface.handler, job, beside=self.ctx.config_dir)
        with self.cond:
            self.procs.pop(name, None)
            interrupted = name in self.interrupted
            self.interrupted.discard(name)
        if interrupted:
            bound.warning("interrupted by shutdown; it stays queued and runs again")
            return None
        joblog.ran(log, outcome, self._describe())
        self.ctx.counters.count(iface.name, outcome)
        if outcome.result == handlers.LATER:
            spool.write(spool.pending_log(name), [joblog.to_bytes(log)], replace=True)
            bound.info("try later", reason=outcome.reason)
            self._back_off(stamp, name, outcome.reason or "try later")
            return None
        dest = BAK if outcome.result == handlers.DONE else JOBERRORS
        return Finished(stamp, name, log, dest, outcome, has_pending_log)

    def commit(self, batch: list[Finished], renamed: list[tuple[Finished, str]]) -> list[Finished]:
        """Group commit: every log in place, one sync, then every job's one rename.

        The sync makes this batch's logs durable before its jobs' final
        renames (the contract), and the previous batch's renames durable, so
        a burst costs one sync per batch, not two. Only after a job's rename
        is synced is it reported done: the committer commits an empty batch
        for that when nothing else has finished. A crash before that sync
        leaves some jobs in the queue with their handler run: they run again
        (at least once). ``renamed`` is the committer's list of jobs renamed
        but not yet synced.

        Returns the jobs whose commit failed (a full disk, an I/O error): their
        outcome is known, so they are committed again later, never run again.
        """
        if not batch and not renamed:
            return []
        spool = self.spool
        placed, again = [], []
        for f in batch:
            try:
                placed.append((f, *self._place_log(f)))
            except Exception as exc:
                self._trouble(f, "cannot write the log; the job waits to be committed", exc)
                again.append(f)
        if not self.ctx.commit.sync():
            # The logs may not be on disk: no job may move past them. Those
            # renamed last time wait for a sync that works to be reported.
            return again + [f for f, *_ in placed]
        self._report(renamed)
        renamed.clear()
        for f, dest_dir, new_name, label in placed:
            if not self._owned():
                self._lost(f)
                continue
            try:
                queued = spool.dir(QUEUE, self.iface.name) / f.name
                spool.move(queued, dest_dir, new_name=new_name, sync=False)
            except FileNotFoundError:  # moved by hand meanwhile: nothing more to commit
                with self.cond:
                    self.in_flight.discard(f.name)
                continue
            except Exception as exc:
                self._trouble(f, "cannot move the job; it waits to be committed", exc)
                again.append(f)
                continue
            renamed.append((f, label))
        if not again:
            self._trouble_seen = None
        return again

    def _owned(self) -> bool:
        """Cluster mode: this node still holds the interface's lease (always, otherwise)."""
        return self.ctx.may_move is None or self.ctx.may_move(self.iface.name)

    def _lost(self, f: Finished) -> None:
        """The lease went while the job ran: it stays queued, for the node that took over."""
        self.ctx.logger.bind(job=f.name, interface=self.iface.name).warning(
            "lease lost; the job stays queued and runs again on the node that took over",
            result=f.outcome.result,
        )
        with self.cond:
            self.in_flight.discard(f.name)
            self.backlog.forget(f.name)

    def _trouble(self, f: Finished, what: str, exc: Exception) -> None:
        """Log a failed commit once per kind of fault, not once per job and attempt."""
        if str(exc) != self._trouble_seen:
            self._trouble_seen = str(exc)
            self.ctx.logger.bind(job=f.name, interface=self.iface.name).error(what, error=str(exc))

    def _report(self, renamed: list[tuple[Finished, str]]) -> None:
        """Jobs whose final rename is durable: done (or failed), and forgotten."""
        spool = self.spool
        for f, label in renamed:
            if f.has_pending_log:
                with contextlib.suppress(Exception):  # a stale one is cleaned at start
                    spool.remove(spool.pending_log(f.name), sync=False)
            self._forget(f.name)
            bound = self.ctx.logger.bind(job=f.name, interface=self.iface.name)
            if f.dest == BAK:
                bound.info(f.outcome.result, to=label)
            else:
                bound.warning(f.outcome.result, to=label, reason=f.outcome.reason)
        with self.cond:
            self.in_flight.difference_update(f.name for f, _ in renamed)

    def _place_log(self, f: Finished) -> tuple[Path, str, str]:
        """Write a finished job's log beside where it goes; (folder, name, place) for the move."""
        spool, iface = self.spool, self.iface
        dest_dir = spool.dir(BAK, iface.name) if f.dest == BAK else spool.joberrors
        label = f"{BAK}/{iface.name}" if f.dest == BAK else JOBERRORS
        new_name = f.name
        if (dest_dir / f.name).exists():  # only if someone put a file there by hand
            with spool.names_lock():  # stamps come from one sequence, the intake's too
                new_name = intake.safe_name(f.name, spool.stamp())
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

    # --- bookkeeping -----------------------------------------------------------------------

    def _running(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        with self.cond:
            self.procs[name] = proc

    def _forget(self, name: str) -> None:
        with self.cond:
            self.backlog.forget(name)
            self.attempts.pop(name, None)
            unblocked = self.blocked_since.pop(name, None) is not None
        if unblocked:
            self._publish_blocked(None)

    def _back_off(self, stamp: int, name: str, reason: str = "error") -> None:
        cfg = self.ctx.settings
        with self.cond:
            n = self.attempts[name] = self.attempts.get(name, 0) + 1
            delay = min(cfg.backoff_initial * 2 ** (n - 1), cfg.backoff_max)
            self.not_before = time.monotonic() + delay
            self.backlog.put_back(stamp, name)  # it keeps its place at the head
            since = self.blocked_since.setdefault(name, time.time())
        self._publish_blocked(
            f"{name} blocks the queue since {joblog.iso(since)}: {reason} "
            f"(attempt {n}, next in {delay:g}s)"
        )

    def _publish_blocked(self, why: str | None) -> None:
        """Say in the spool which job blocks the interface; a failing write is logged once."""
        try:
            self.spool.mark_blocked(self.iface.name, why)
        except JobspoolError as exc:
            if str(exc) != self._marker_error:  # one line per fault, not one per attempt
                self._marker_error = str(exc)
                self.ctx.logger.error(
                    "cannot record blocked interface", interface=self.iface.name, error=str(exc)
                )
        else:
            self._marker_error = None

    def _describe(self) -> str:
        if self.iface.command is not None:
            return shlex.join(self.iface.command)
        return f"python:{self.iface.handler}"
