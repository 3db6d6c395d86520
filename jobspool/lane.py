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

A machine fault (:mod:`jobspool.faults`) never fails a job. A handler that
cannot be started leaves its job at the head, waiting at most a few seconds
between attempts. A finished job whose commit fails keeps its outcome: only
the commit is retried, no new handler starts meanwhile, and the outcome is
written into the job's pending log, so that a restart commits it
(:func:`known_outcome`) instead of running the handler again.

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
import os
import shlex
import subprocess
import threading
import time
from array import array
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any, NamedTuple

from lxml import etree

from jobspool import annotate, faults, handlers, hold, intake, joblog, names, tries
from jobspool.alerts import Alerts
from jobspool.config import DaemonSettings, Interface
from jobspool.durable import BATCH, GroupCommit
from jobspool.errors import JobspoolError
from jobspool.listing import Listing, ordered, trim_heap
from jobspool.metrics import Metrics
from jobspool.notices import Event
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
    kept: bool = False  # its outcome is durably in its pending log (a commit failed)


FOLD_FROM = 65_536  # jobs in a backlog's heap before they may join its run
SHORTEN_FROM = 4_096  # jobs taken from the front of a run before its list may be shortened


class _Either:
    """Names in any of some containers (without copying a million of them into one)."""

    def __init__(self, *containers: Container[str]) -> None:
        self.containers = containers

    def __contains__(self, name: object) -> bool:
        return any(name in c for c in self.containers)


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
    metrics: Metrics
    alerts: Alerts
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
        logger = ctx.logger.bind(interface=iface.name)
        # Each fault is one episode: a line when it starts, one when it is over.
        self.commit_fault = faults.Episode(logger, "cannot commit finished jobs; they wait")
        self.start_fault = faults.Episode(logger, "cannot start the handler; the job waits")
        self.keep_fault = faults.Episode(
            logger, "cannot keep a finished job's outcome on disk; a restart would run it again"
        )
        self.marker_fault = faults.Episode(logger, "cannot record blocked interface")
        self.other_fault = faults.Episode(logger, "processing failed; the job stays queued")
        self._commit_marked = False  # the blocked marker says commits fail
        self.aside: dict[str, int] = {}  # held jobs passed over: name -> stamp
        self._held_seen = 0.0  # when the held jobs' markers were last looked at

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
        self.offer_all([(stamp, name)])

    def offer_all(self, jobs: list[tuple[int, str]]) -> None:
        """:meth:`offer` for a batch of jobs (stamp, name): one wake-up for all of them."""
        with self.cond:
            fresh = [self.backlog.offer(stamp, name) for stamp, name in jobs]
            if any(fresh):
                self.cond.notify_all()

    def refill(self, unsettled: Container[str] = ()) -> None:
        """Add whatever the queue directory holds that the lane does not know.

        ``unsettled`` are names renamed into the queue whose acceptance is not
        yet durable (a sync failed): they are handed over once it is, never
        found here first.
        """
        # The set itself, not a copy (a million names): each membership test
        # is atomic, and a name offered or forgotten meanwhile is sorted out
        # by extend() under the lock, or skipped when its file is gone.
        known = _Either(self.backlog.known, unsettled) if unsettled else self.backlog.known
        listing = self.spool.listing(self.iface.name, known=known)
        with self.cond:
            if self.backlog.extend(listing):
                self.cond.notify_all()
        del listing  # a filtered copy's lists, before the scratch memory is given back
        if len(self.backlog.known) >= RELEASE_FROM:  # small queues leave little to give back
            trim_heap()

    def depth(self) -> int:
        with self.cond:
            return len(self.backlog.known) - len(self.aside)  # held jobs wait for no one

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
                if wait > 0 and tries.take_now(self.spool, self.iface.name):
                    self.not_before, wait = 0.0, 0.0  # jobspool retry --now
                self._release_held()
                if runnable and wait <= 0 and not self.spool.is_paused(self.iface.name):
                    item = self.backlog.pop()
                    if hold.is_held(self.spool, item[1]):
                        self.aside[item[1]] = item[0]  # known still: it keeps its place
                        continue
                    self.in_flight.add(item[1])
                    return item
                # Pause markers are files: look again every second.
                self.cond.wait(min(max(wait, 0.05), 1.0) if self.backlog else 1.0)

    def _release_held(self) -> None:
        """Held jobs whose marker is gone go back where they were (about once a second)."""
        now = time.monotonic()
        if not self.aside or now < self._held_seen + 1.0:
            return
        self._held_seen = now
        for name, stamp in list(self.aside.items()):
            if not hold.is_held(self.spool, name):
                del self.aside[name]
                self.backlog.put_back(stamp, name)

    def _work(self) -> None:
        """A worker thread: run handlers, one job after another, and hand finished ones over."""
        while (item := self._take()) is not None:
            stamp, name = item
            bound = self.ctx.logger.bind(job=name, interface=self.iface.name)
            done = None
            try:
                done = self.process(stamp, name)
            except Exception as exc:  # disk full, no descriptors, permission: it stays queued
                self._not_processed(stamp, name, exc, bound)
            else:
                self.start_fault.ok()
                self.other_fault.ok()
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
            try:
                again = self.commit(batch, renamed)
            except Exception as exc:  # whatever it was, the outcomes are kept and tried again
                self.commit_fault.failed(faults.kind(exc), detail=repr(exc))
                again = batch
            with self.cond:
                self.finished[:0] = again  # first in line when the machine recovers
                recovered = self.committing_fails and not again
                if recovered:
                    self.cond.notify_all()  # handlers may start again
                self.committing_fails = bool(again)
            if again:
                self._commit_blocked(again)
                # A bounded back-off, not a hot loop: at most MACHINE_BACKOFF_MAX seconds.
                delay = max(self.ctx.commit.retry_in(), self.commit_fault.backoff())
                faults.wait_for_room(self.spool.root, delay)  # at once when space comes back
            elif recovered:
                self.commit_fault.ok()
                if self._commit_marked:
                    self._commit_marked = False
                    self._publish_blocked(None)

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
        from_memory = held is not None  # (operators' notes since then are on disk)
        if held is None:
            # Not accepted here: retried, submitted. A retry holds the names
            # lock from its move into the queue until it has removed the job's
            # old log from joberrors; waiting for it means this run, failing
            # again, never has its new log removed by that retry.
            with spool.names_lock():
                held = self._history(name, stamp), True
            known = known_outcome(held[0])
        else:
            known = None
        log, has_pending_log = held
        if from_memory and self._notes_from_disk(log, name):
            has_pending_log = True  # to be removed once the job is done
        if known is not None:  # its handler ran before a restart; only the commit was missing
            joblog.note(log, "the handler's outcome was kept from before a restart; not run again")
            bound.info("outcome known from before a restart; committing it", outcome=known.result)
            dest = BAK if known.result == handlers.DONE else JOBERRORS
            return Finished(stamp, name, log, dest, known, has_pending_log, kept=True)
        bound.debug("started", handler=self._describe())  # not a state change
        try:
            outcome = self._run(name, path)
        except BaseException:  # not started: the history so far is kept for the next try
            if held is not None:
                self.ctx.held.hold(name, log, has_pending_log)
            raise
        with self.cond:
            self.procs.pop(name, None)
            interrupted = name in self.interrupted
            self.interrupted.discard(name)
        if interrupted:
            # The run happened and is part of the job's story: its <ran> goes
            # into the pending log, which the next run's log starts from.
            why = "interrupted by shutdown; the job stays queued and runs again"
            joblog.ran(log, outcome._replace(result=handlers.FAILED, reason=why), self._describe())
            # Its last event is not a finished run, so no restart takes it for a kept outcome.
            joblog.note(log, why)
            with contextlib.suppress(Exception):  # a full disk must not stop the shutdown
                spool.write(spool.pending_log(name), [joblog.to_bytes(log)], replace=True)
            bound.warning("interrupted by shutdown; it stays queued and runs again")
            return None
        joblog.ran(log, outcome, self._describe())
        self.ctx.metrics.count(iface.name, outcome.result)
        self.ctx.metrics.handler(iface.name, outcome.ended - outcome.started)
        if outcome.result == handlers.LATER and (gave_up := self._give_up(log, stamp)):
            because = f"{gave_up}: {outcome.reason or 'try later'}"
            joblog.note(log, because)
            outcome = outcome._replace(result=handlers.FAILED, reason=because)
            has_pending_log = True  # written at its earlier tries
        if outcome.result == handlers.LATER:
            spool.write(spool.pending_log(name), [joblog.to_bytes(log)], replace=True)
            bound.info("try later", reason=outcome.reason)
            self._back_off(stamp, name, outcome.reason or "try later")
            return None
        dest = BAK if outcome.result == handlers.DONE else JOBERRORS
        return Finished(stamp, name, log, dest, outcome, has_pending_log)

    def _run(self, name: str, path: Path) -> handlers.Outcome:
        """The handler's run on the job at ``path``."""
        iface = self.iface
        if iface.command is not None:
            return handlers.run_command(
                [*iface.command, str(path)],  # the job's path is the last argument
                handlers.job_environment(name, iface.name, self.spool.root),
                iface.timeout,
                output_limit=self.ctx.settings.output_limit,
                limits=handlers.Limits(iface.memory_limit, math.ceil(iface.cpu_limit or 0) or None)
                if iface.memory_limit or iface.cpu_limit
                else None,
                on_start=lambda proc: self._running(name, proc),
            )
        assert iface.handler is not None
        job = handlers.Job(name, iface.name, path)
        return handlers.run_python(iface.handler, job, beside=self.ctx.config_dir)

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
                self.commit_fault.failed(faults.kind(exc), job=f.name, detail=str(exc))
                again.append(f)
                with self.cond:
                    self.committing_fails = True  # at once: no handler starts meanwhile
        if not placed and not renamed:  # nothing to sync (a full disk): no syncfs per retry
            return self._keep(again)
        if not self.ctx.commit.sync():
            # The logs may not be on disk: no job may move past them. Those
            # renamed last time wait for a sync that works to be reported.
            self.commit_fault.failed("the spool does not sync")
            return self._keep(again + [f for f, *_ in placed])
        self._report(renamed)
        renamed.clear()
        for f, dest_dir, new_name, label in placed:
            if not self._owned():
                self._lost(f)
                continue
            try:
                queued = spool.dir(QUEUE, self.iface.name) / f.name
                spool.move(queued, dest_dir, new_name=new_name, sync=False)
            except Exception as exc:
                if not queued.exists():  # deleted or moved by hand meanwhile: nothing to commit
                    with contextlib.suppress(Exception):  # and no log without its job
                        spool.remove(dest_dir / names.log_name(new_name), sync=False)
                    self._forget(f.name)
                    with self.cond:
                        self.in_flight.discard(f.name)
                    continue
                self.commit_fault.failed(faults.kind(exc), job=f.name, detail=str(exc))
                again.append(f)
                continue
            renamed.append((f, label))
        return self._keep(again)

    def _keep(self, again: list[Finished]) -> list[Finished]:
        """Jobs whose commit failed: their outcome into their pending log, durably, if it can.

        Then a restart commits the outcome instead of running the handler
        again (:func:`known_outcome`). On a full disk this write fails too:
        the outcome is then kept in memory only, and a restart before the
        commit works would run the handler again (at least once).
        """
        out = []
        for f in again:
            if not f.kept:
                try:  # stamped with the job's own stamp: see _history
                    self.spool.write(
                        self.spool.pending_log(f.name),
                        [joblog.to_bytes(f.log)],
                        replace=True,
                        stamp_ns=f.stamp,
                    )
                except Exception as exc:
                    self.keep_fault.failed(faults.kind(exc), job=f.name, detail=str(exc))
                else:
                    self.keep_fault.ok()
                    f = f._replace(kept=True, has_pending_log=True)
            out.append(f)
        return out

    def _commit_blocked(self, again: list[Finished]) -> None:
        """The blocked marker while finished jobs cannot be committed (once per episode)."""
        if self.commit_fault.active and not self._commit_marked:
            self._commit_marked = True
            self._publish_blocked(
                f"{len(again)} finished job(s), first {again[0].name}, wait to be committed "
                f"since {joblog.iso(self.commit_fault.since)}: machine fault "
                f"({self.commit_fault.error}); no new handler starts until it clears"
            )

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
                # A partner's job failed: someone must look at it (journalctl -p err).
                bound.error(f.outcome.result, to=label, reason=f.outcome.reason)
                self.ctx.alerts.emit(
                    Event("job-failed", f.name, self.iface.name, reason=f.outcome.reason)
                )
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

    def _history(self, name: str, stamp: int) -> joblog.Log:
        """A queued job's pending log, or a new one; an unreadable one is a fault, not none.

        Only "there is none" and "it is damaged" start anew: an I/O error
        must not hide a kept outcome and run a handler again. A kept outcome
        (:meth:`_keep`) counts only if the pending log's mtime is the job's
        acceptance stamp: a stale one, left by a job of the same name before,
        loses its last ``ran``.
        """
        try:
            with open(self.spool.pending_log(name), "rb") as f:
                data, mtime = f.read(), os.fstat(f.fileno()).st_mtime_ns
        except FileNotFoundError:
            data, mtime = b"", 0
        if data:
            with contextlib.suppress(SyntaxError):
                log = joblog.from_bytes(data)
                if mtime != stamp and known_outcome(log) is not None:
                    log.remove(log[-1])  # not this job's outcome
                return log
        log = joblog.new(name, self.iface.name)
        joblog.received(log, "queue", at=joblog.iso(stamp / 1e9))
        return log

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

    def _give_up(self, log: joblog.Log, stamp: int) -> str | None:
        """Past ``max_tries`` or ``max_age``: why the job goes to joberrors (see tries)."""
        if self.iface.max_tries is None and self.iface.max_age is None:
            return None
        later = sum(1 for r in log.iter(f"{{{joblog.NS}}}ran") if r.get("outcome") == "later")
        return tries.give_up(later, stamp, self.iface.max_tries, self.iface.max_age)

    def _notes_from_disk(self, log: joblog.Log, name: str) -> bool:
        """An operator's notes (held, released) written while the log was held in memory."""
        try:
            pending = self.spool.pending_log(name).read_bytes()
        except OSError:
            return False
        annotate.merge_notes(log, pending)
        return True

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

    def _not_processed(self, stamp: int, name: str, exc: Exception, bound: Any) -> None:
        """The handler did not run to an outcome: the job keeps its place, and waits.

        A machine fault or a handler that cannot be started waits at most
        MACHINE_BACKOFF_MAX seconds between attempts, whatever the
        interface's back-off: it must go on by itself soon after the fault
        clears. Either is logged once per episode.
        """
        if isinstance(exc, faults.HandlerNotStarted) or faults.is_machine_fault(exc):
            self.start_fault.failed(faults.kind(exc), job=name, detail=str(exc))
            why = str(exc) if isinstance(exc, faults.HandlerNotStarted) else f"machine fault: {exc}"
            self._back_off(stamp, name, why, self.start_fault.backoff())
        else:
            self.other_fault.failed(faults.kind(exc), job=name, detail=str(exc))
            bound.debug("processing failed", error=str(exc))
            self._back_off(stamp, name)

    def _back_off(
        self, stamp: int, name: str, reason: str = "error", most: float | None = None
    ) -> None:
        cfg = self.ctx.settings
        with self.cond:
            n = self.attempts[name] = self.attempts.get(name, 0) + 1
            delay = min(cfg.backoff_initial * 2 ** (n - 1), cfg.backoff_max)
            if most is not None:
                delay = min(delay, most)
            self.not_before = time.monotonic() + delay
            self.backlog.put_back(stamp, name)  # it keeps its place at the head
            since = self.blocked_since.setdefault(name, time.time())
        self._publish_blocked(
            f"{name} blocks the queue since {joblog.iso(since)}: {reason} "
            f"(attempt {n}, next in {delay:g}s)"
        )
        self.ctx.alerts.blocking(self.iface.name, name, since, reason)

    def _publish_blocked(self, why: str | None) -> None:
        """Say in the spool which job blocks the interface; a failing write is logged once."""
        try:
            self.spool.mark_blocked(self.iface.name, why)
        except (JobspoolError, OSError) as exc:  # one line per fault, not one per attempt
            self.marker_fault.failed(faults.kind(exc), detail=str(exc))
        else:
            self.marker_fault.ok()

    def _describe(self) -> str:
        if self.iface.command is not None:
            return shlex.join(self.iface.command)
        return f"python:{self.iface.handler}"


def known_outcome(log: joblog.Log) -> handlers.Outcome | None:
    """The outcome a pending log already holds: its last event is a finished ``ran``.

    Written by :meth:`Lane._keep` when a commit failed. A retried job's
    pending log ends with its move back into the queue, and a "try later"
    run's outcome is ``later``: both run again.
    """
    last = log[-1] if len(log) else None
    if last is None or etree.QName(last).localname != "ran":
        return None
    result = last.get("outcome")
    if result not in (handlers.DONE, handlers.FAILED):
        return None
    status, sig = last.get("exit-status"), last.get("signal")
    now = time.time()
    return handlers.Outcome(
        result,
        now,
        now,
        exit_status=int(status) if status is not None else None,
        signal=int(sig) if sig is not None else None,
        timed_out=last.get("timed-out") == "true",
        reason=last.get("reason"),
    )
