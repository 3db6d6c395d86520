"""``jobspool daemon``: one process that owns a spool and keeps its jobs moving.

The :class:`Daemon` is the orchestrator (as in huey's consumer): it takes the
spool's lock, cleans up after a crash, starts the watcher and one
:class:`~jobspool.lane.Lane` per inbound interface, and then runs
:meth:`Daemon.loop` on the main thread: take dropped files that are whole,
rescan on its interval, restart a dead observer, ping systemd, write metrics.
Signals only set flags: SIGTERM/SIGINT stop (running handlers get ``grace``
seconds, then their process groups are killed and their jobs stay queued),
SIGHUP reloads the configuration (a broken one is refused, the old one
kept).

Crash safety comes from the spool's discipline, not from here: every state
change is one durable rename, a job's log is in place before its final
rename, and a job still in the queue after a crash simply runs again.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import select
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobspool import (
    check,
    config,
    content,
    faults,
    intake,
    lease,
    logs,
    metrics,
    names,
    notify,
    watch,
)
from jobspool.alerts import Alerts
from jobspool.checkpool import Checked, CheckPool, Task
from jobspool.config import Config
from jobspool.durable import BATCH, GroupCommit, os_errors, remove_if_abandoned
from jobspool.errors import ConfigError, Denied, JobspoolError, TryLater
from jobspool.lane import HeldLogs, Lane, LaneContext
from jobspool.notices import Event
from jobspool.overview import overview
from jobspool.scheduler import Scheduler
from jobspool.schedules import Store
from jobspool.spool import INCOMING, JOBERRORS, QUEUE, Spool

ALERTS_GRACE = 10.0  # seconds the last notifications may take at shutdown
DEADLINE_KEEPER = 10.0  # seconds a stopping daemon waits for the lease keeper's last turn
TURN = 0.25  # seconds of taking drops before the loop serves schedules and rescans
FORGET_EVERY = 3600.0  # seconds at most between removals of expired content entries


class Daemon:
    """The daemon for one configuration file."""

    def __init__(self, config_path: str | None, once: bool = False) -> None:
        self.config_path = config_path
        self.cfg, validators = check_config(config_path)
        check.use_compiled(validators)
        self.spool = Spool.of(self.cfg)
        self.spool.sync_mode()  # fsync mode notes unsynced writes from now on
        self.once = once
        self.logger = logs.get()
        # Wakes the loop from other threads and signal handlers; waited on
        # together with the inotify descriptor.
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.stopping = False
        self.reload_requested = False
        self.lanes: dict[str, Lane] = {}
        self.hints: collections.deque[watch.Hint] = collections.deque()  # read, not yet looked at
        self.waiting: dict[Path, tuple[float, bool]] = {}  # drop -> (look again at, renamed in)
        self.reported: set[tuple[Path, float]] = set()  # unreadable drops already reported
        self.content_forgotten: dict[str, float] = {}  # interface -> monotonic start of last pass
        self.forgetter: threading.Thread | None = None
        self.held = HeldLogs()  # logs of jobs accepted here, until their lane takes them
        self.accepted: dict[str, tuple[str, intake.Taken]] = {}  # name -> this turn's, until synced
        self.retry_commit_at = 0.0  # monotonic: after a failed sync, when to try again
        self.metrics = metrics.Metrics(time.time())
        self.alerts = Alerts(self.cfg.notify, self.logger, str(self.spool.root))
        faults.on_fault(self.alerts.fault)  # every fault episode's start is a notification
        # A failed sync is tried again at least every few seconds: a machine fault clears by itself.
        self.commit = GroupCommit(
            self.spool.sync,
            self.logger,
            backoff_max=faults.MACHINE_BACKOFF_MAX,
            on_fault=self.alerts.fault,
        )
        self.checks = CheckPool(self.cfg.daemon.check_workers)
        self.checking: dict[Path, tuple[str, intake.Screened]] = {}  # drop -> its interface
        # Per interface, drops in the order they were screened: each is settled
        # only after those before it, so acceptance order is drop order.
        self.check_order: dict[str, collections.deque[Path]] = collections.defaultdict(
            collections.deque
        )
        self.checked: list[Checked] = []  # read from the workers, not yet looked at
        self.verdicts: dict[Path, Checked] = {}  # back from a worker, waiting for its turn
        self.to_check: list[Task] = []  # this turn's screened drops, for the workers
        self.watcher: watch.Watcher | None = None
        self.scheduler: Scheduler | None = None
        self._lock_fd: int | None = None
        self.ping = notify.watchdog_interval()  # seconds between WATCHDOG=1, if systemd asks
        self.next_ping = 0.0
        self._folders: dict[Path, tuple[str, str]] = {}
        # Cluster mode (docs/deployment.rst): leases instead of the daemon lock.
        self.cluster: lease.Coordinator | None = None
        self.lease_turns: collections.deque[lease.Turn] = collections.deque()  # from the keeper
        self.keeper_stop = threading.Event()
        self.keeper: threading.Thread | None = None
        # The main loop survives any error; a fault that lasts is one line, and one at its end.
        log = self.logger
        self.turn_fault = faults.Episode(log, "the main loop met a fault; it goes on")
        self.rescan_fault = faults.Episode(log, "a rescan met a fault; the next one retries")
        self.intake_fault = faults.Episode(log, "cannot take dropped files now; they wait")

    # --- life cycle -------------------------------------------------------------------

    def run(self) -> int:
        """Serve the spool until SIGTERM (or, with ``once``, until nothing is left to do)."""
        self.spool.init()
        if self.cfg.cluster is None:
            self.lock()
        else:
            self.join_cluster()
        self.checks.start()  # forked while this process has no other thread
        self.clean_up()
        self.install_signals()
        self.start_watching()
        self.rescan()
        self.start_lanes()
        self.scheduler = Scheduler(Store(self.cfg, self.spool), self.logger, self.commit)
        self.scheduler.metrics = self.metrics
        self.scheduler.alerts = self.alerts
        self.logger.info("ready", spool=str(self.spool.root), interfaces=list(self.cfg.interfaces))
        notify.notify("READY=1", f"STATUS={self.status_line()}")
        next_rescan = time.monotonic() + self.cfg.daemon.rescan
        next_metrics = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            try:
                if self.reload_requested:
                    self.reload()
                due = self.loop(time.time())
                while self.lease_turns:
                    self.cluster_turn(self.lease_turns.popleft())
                serves_schedules = self.serves(lease.SCHEDULES)
                if self.scheduler is not None and not self.once and serves_schedules:
                    next_schedule = self.scheduler.poll(time.time())
                    if next_schedule is not None:
                        due = min(due, next_schedule) if due is not None else next_schedule
                if now >= next_rescan:
                    next_rescan = now + self.cfg.daemon.rescan
                    self.guarded_rescan()
            except Exception as exc:  # an I/O error, a full disk: the loop goes on
                self.turn_fault.failed(faults.kind(exc), detail=repr(exc))
                self.keepalive()
                self.sleep(self.turn_fault.backoff())  # a fault that stays is no hot loop
                continue
            self.turn_fault.ok()
            faults.tick()  # episodes that have been quiet long enough say they are over
            self.keepalive()
            if self.cfg.daemon.metrics is not None and now >= next_metrics:
                self.write_metrics()
                next_metrics = now + self.cfg.daemon.metrics_interval
            if self.once and self.idle():
                break
            if self.hints:
                continue  # a flood: take the next slice at once
            # Sleep until the next thing is due; an event or a signal wakes us sooner.
            timeout = min(next_rescan - now, (due - time.time()) if due else 1.0, 1.0)
            if self.ping is not None:
                timeout = min(timeout, self.next_ping - now)
            self.sleep(max(timeout, 0.01))
        self.shut_down()
        return 0

    def sleep(self, timeout: float) -> None:
        """Until a file event, a wake from a thread or signal, or ``timeout`` seconds."""
        poller = select.poll()  # not select(): no limit on descriptor numbers
        poller.register(self.wake_fd, select.POLLIN)
        if self.watcher is not None and self.watcher.fileno() >= 0:
            poller.register(self.watcher.fileno(), select.POLLIN)
        for fd in self.checks.fds():  # a check worker's verdicts
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(timeout * 1000):
            if fd != self.wake_fd and (self.watcher is None or fd != self.watcher.fileno()):
                self.checked.extend(self.checks.read(fd))
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.wake_fd)

    def loop(self, now: float) -> float | None:
        """One turn: take the hinted and due drops; return when a waiting drop is due."""
        assert self.watcher is not None
        self.hints.extend(self.watcher.read())
        # A flood of drops is taken a slice at a time, so that schedules,
        # rescans and systemd's watchdog are served in between.
        until = time.monotonic() + TURN
        while self.hints:
            hint = self.hints.popleft()
            self.look_at(Path(hint.path), hint.renamed_in, now)
            self.keepalive()
            if time.monotonic() >= until:
                break
        for path, (due, renamed_in) in sorted(self.waiting.items(), key=lambda w: w[1][0]):
            if due <= now:
                self.look_at(path, renamed_in, now)
                self.keepalive()
        self.hand_over_checks()
        for fd in self.checks.fds() if self.checking else ():
            self.checked.extend(self.checks.read(fd))  # without waiting: a busy loop reads too
        for checked in self.checked:
            self.verdicts[checked.key] = checked
        self.checked.clear()
        for order in self.check_order.values():
            while order and order[0] in self.verdicts:  # in drop order, a batch at a time
                batch: list[Checked] = []
                while order and order[0] in self.verdicts and len(batch) < BATCH:
                    batch.append(self.verdicts.pop(order.popleft()))
                self.settle(batch, now)
        self.commit_accepted()
        if self.accepted:  # a failed sync: the loop must come back for them
            return now + self.commit.retry_in()
        if self.watcher.overflowed:
            self.watcher.overflowed = False
            self.logger.warning("file events were lost (inotify queue overflow); rescanning")
            self.rescan()
        if not self.watcher.healthy():
            self.logger.error("file watcher died; restarting it and rescanning")
            try:
                self.spool.init()  # a folder removed by hand is what kills an emitter
                self.watcher.restart()
            except Exception as exc:  # rescans still find everything, only later
                self.logger.error("cannot restart the file watcher", error=str(exc))
            self.rescan()
        if self.hints:
            return now  # more to take: no sleep
        return min((due for due, _ in self.waiting.values()), default=None)

    def keepalive(self) -> None:
        """Ping systemd's watchdog when due; called inside long loops too (bursts, rescans)."""
        if self.ping is not None and time.monotonic() >= self.next_ping:
            notify.notify("WATCHDOG=1", f"STATUS={self.status_line()}")
            self.next_ping = time.monotonic() + self.ping

    def idle(self) -> bool:
        """Nothing waiting, nothing queued that could run (``--once``)."""
        if self.waiting or self.hints or self.checking or self.accepted or not self.watcher:
            return False
        return all(
            lane.depth() == 0 or self.spool.is_paused(name) for name, lane in self.lanes.items()
        )

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # already woken
            os.eventfd_write(self.wake_fd, 1)

    # --- drops and queues -------------------------------------------------------------

    def look_at(self, path: Path, renamed_in: bool, now: float) -> None:
        """Take a whole drop, note a job placed in a queue; one bad file never stops the loop."""
        where = self._folders.get(path.parent)
        if where is None or path in self.checking:  # (being checked: its verdict will come)
            return
        try:
            self._look_at(path, renamed_in, now, *where)
        except Exception as exc:
            if faults.is_machine_fault(exc):  # one line per episode, not one per file
                self.intake_fault.failed(faults.kind(exc), job=path.name, detail=str(exc))
            else:
                logs.get(job=path.name, interface=where[1]).exception(
                    "cannot look at file; will try again", error=str(exc)
                )
            self.waiting[path] = (now + self.cfg.daemon.rescan, renamed_in)

    def _look_at(self, path: Path, renamed_in: bool, now: float, state: str, iface: str) -> None:
        if state == QUEUE:
            # Placed by another program, or our own accept: the lane takes note.
            if names.is_partial_upload(path.name):
                return  # still being written there
            if not names.is_valid(path.name):
                taken = intake.take_stray(self.spool, self.cfg.interfaces[iface], path.name)
                if taken is not None:
                    logs.get(job=taken.name, interface=iface).warning(
                        "rejected", to=taken.place, reason=taken.reason, placed_as=path.name
                    )
                return
            lane = self.lanes.get(iface)  # _out interfaces have none
            name = path.name
            if lane is not None and name not in self.accepted and name not in lane.known:
                # Most of these are our own accepts: one awaiting its sync is
                # handed over by commit_accepted, a known one needs no stat.
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(path)
                    if stat.S_ISREG(st.st_mode):
                        lane.offer(st.st_mtime_ns, name)
            return
        if not self._owns_interface(iface):
            # Cluster mode: its interface's owner takes it, so that acceptance
            # order is the order its one lane learns of jobs (docs/deployment.rst).
            self.waiting.pop(path, None)
            return
        ready = watch.readiness(path, renamed_in, self.cfg.daemon.settle, now)
        if isinstance(ready, float):
            self.waiting[path] = (ready, renamed_in)
        elif isinstance(ready, os.stat_result):
            self.waiting.pop(path, None)
            self.take(path, iface, now, ready)
        else:
            self.waiting.pop(path, None)  # gone

    def take(self, path: Path, iface_name: str, now: float, seen: os.stat_result) -> None:
        """Take a whole drop: screened here, checked by a worker (see :meth:`settle`)."""
        iface = self.cfg.interfaces[iface_name]
        bound = logs.get(job=path.name, interface=iface_name)
        try:
            screened = intake.screen_drop(self.spool, iface, path.name, seen)
        except (TryLater, JobspoolError) as exc:
            if faults.is_machine_fault(exc):  # a full disk, a read-only remount: one episode
                self.intake_fault.failed(faults.kind(exc), job=path.name, detail=str(exc))
                self.waiting[path] = (now + 5.0, False)
            elif isinstance(exc, Denied):
                key = (path, _mtime(path))
                if key not in self.reported:  # once per version of the file, not every rescan
                    self.reported.add(key)
                    bound.error("cannot take dropped file; left in place", error=str(exc))
            else:
                bound.error("cannot take dropped file now; will try again", error=str(exc))
                self.waiting[path] = (now + 5.0, False)
            return
        self.intake_fault.ok()
        if isinstance(screened, intake.Screened):
            self.checking[path] = (iface_name, screened)
            self.check_order[iface_name].append(path)
            schema = None if iface.schema is None else str(iface.schema)
            task = Task(
                path,
                iface_name,
                str(path),
                schema,
                iface.max_size,
                self.cfg.daemon.tree_limit,
                screened.st.st_size,
            )
            self.to_check.append(task)
        elif screened is not None:
            self.taken(screened, iface_name, path)

    def settle(self, batch: list[Checked], now: float) -> None:
        """Drops whose verdicts are back: into their queue or joberrors, or look again.

        A burst's drops are settled together (:func:`~jobspool.intake.settle_drops`).
        Whatever happens, each drop ends up settled or waiting to be looked at again.
        """
        drops, paths = [], []
        for checked in batch:
            path = checked.key
            iface_name, screened = self.checking.pop(path)
            iface = self.cfg.interfaces.get(iface_name)  # (an interface gone with a reload)
            if iface is None or checked.error is not None:  # not checked: look again
                self.waiting[path] = (now + self.cfg.daemon.settle, False)
            else:
                drops.append((iface, screened, checked.as_problems()))
                paths.append(path)
        if not drops:
            return
        # Cluster mode: asked under the lock, for each drop, just before its move.
        owned = None if self.cluster is None else self._owns_interface
        try:
            settled = intake.settle_drops(self.spool, drops, sync=False, owned=owned)
        except BaseException:
            for path in paths:  # looked at again (one it had moved is gone by then)
                self.waiting[path] = (now + self.cfg.daemon.settle, False)
            raise
        for path, (iface, _, _), (taken, error) in zip(paths, drops, settled, strict=True):
            if error is not None:
                if faults.is_machine_fault(error):  # one line per episode, not one per drop
                    self.intake_fault.failed(faults.kind(error), job=path.name, detail=str(error))
                else:
                    logs.get(job=path.name, interface=iface.name).error(
                        "cannot take dropped file now; will try again", error=str(error)
                    )
            if taken is None:  # gone, changed while it was checked, or not settled: look again
                self.waiting[path] = (now + self.cfg.daemon.settle, False)
                continue
            try:
                self.taken(taken, iface.name, path)
            except Exception as exc:  # as in look_at: one drop never stops the loop
                logs.get(job=path.name, interface=iface.name).exception(
                    "cannot report a dropped file taken", error=str(exc)
                )

    def _owns_interface(self, iface_name: str) -> bool:
        return self.serves(lease.interface_key(iface_name))

    def taken(self, taken: intake.Taken, iface_name: str, path: Path) -> None:
        """A drop went into joberrors (reported now) or its queue (reported once synced)."""
        bound = logs.get(job=taken.name, interface=iface_name)
        if taken.place == JOBERRORS:
            bound.warning("rejected", to=taken.place, reason=taken.reason, dropped_as=path.name)
            self.metrics.count(iface_name, "rejected")
            self.alerts.emit(Event("job-rejected", taken.name, iface_name, reason=taken.reason))
            return
        self.accepted[taken.name] = (iface_name, taken)
        if len(self.accepted) >= BATCH:  # a burst: hand the first ones over early
            self.commit_accepted()

    def hand_over_checks(self) -> None:
        """Send this turn's screened drops to the check workers, in one go."""
        if self.to_check:
            tasks, self.to_check = self.to_check, []
            self.checks.submit(tasks)

    def commit_accepted(self) -> None:
        """Group commit of a turn's accepts: one sync, then they are reported and queued.

        A failed sync reports nothing (see :class:`~jobspool.durable.GroupCommit`):
        the jobs are in their queue folders but not yet durably, so they are
        neither logged as accepted nor handed to their lanes; the batch waits
        for a sync that works, tried again after a back-off.
        """
        if not self.accepted or time.monotonic() < self.retry_commit_at:
            return
        if not self.commit.sync():
            self.retry_commit_at = time.monotonic() + self.commit.retry_in()
            return
        batch, self.accepted = self.accepted, {}
        offers: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
        for iface_name, taken in batch.values():
            self.logger.info("accepted", job=taken.name, interface=iface_name, to=taken.place)
            if iface_name in self.lanes:  # (_out jobs wait to be fetched)
                self.held.hold(taken.name, taken.log)
                offers[iface_name].append((taken.stamp, taken.name))
        for iface_name, jobs in offers.items():
            self.lanes[iface_name].offer_all(jobs)

    def guarded_rescan(self) -> None:
        """:meth:`rescan`; a fault is one episode of rescans, over when one works again."""
        try:
            self.rescan()
        except Exception as exc:  # the next rescan tries again
            self.rescan_fault.failed(faults.kind(exc), detail=repr(exc))
        else:
            self.rescan_fault.ok()
        self.forget_expired_content()

    def forget_expired_content(self) -> None:
        """Remove content entries past their window (``same_content``), once an hour at most.

        Or once a window, when that is shorter; for the interfaces this node
        serves. In a thread: a folder of millions of entries must not hold up
        the main loop (or systemd's watchdog). A fault is one line; the next
        pass, an hour later, tries again.
        """
        if self.forgetter is not None and self.forgetter.is_alive():
            return
        now = time.monotonic()  # a clock stepped back must not stop the passes
        due = []
        for iface in self.cfg.interfaces.values():
            if iface.same_content is None or not self._owns_interface(iface.name):
                continue
            last = self.content_forgotten.get(iface.name)
            if last is None or now >= last + min(FORGET_EVERY, iface.same_within):
                self.content_forgotten[iface.name] = now
                due.append(iface)
        if due:
            self.forgetter = threading.Thread(
                target=self._forget_expired, args=(due,), name="forget-content", daemon=True
            )
            self.forgetter.start()

    def _forget_expired(self, due: list[config.Interface]) -> None:
        for iface in due:
            bound = logs.get(interface=iface.name)
            try:
                gone = content.forget_expired(self.spool, iface, time.time())
            except Exception as exc:  # a read-only spool, an I/O error: in an hour again
                bound.error("cannot remove expired content entries; will try again", error=str(exc))
                continue
            if gone:
                bound.info("expired content entries removed", removed=gone)

    def rescan(self) -> None:
        """Look at every drop folder and queue, whatever the events said."""
        now = time.time()
        for iface in self.cfg.interfaces:
            folder = self.spool.dir(INCOMING, iface)
            for name in watch.candidates(folder):
                path = folder / name
                if path not in self.waiting:
                    self.look_at(path, False, now)
                    self.keepalive()
            # Only badly named files matter here: names, no stat, no sort.
            queue = self.spool.dir(QUEUE, iface)
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(queue):
                    if not names.is_valid(name) and not names.is_partial_upload(name):
                        self.look_at(queue / name, False, now)
        self.commit_accepted()
        for lane in self.lanes.values():
            lane.refill(self.accepted)  # (not those whose acceptance a failed sync holds)

    # --- start, stop, reload ----------------------------------------------------------

    def lock(self, name: str = "daemon.lock", what: str = "") -> None:
        """One daemon per spool (per node in cluster mode): an exclusive lock, holding our pid."""
        path = self.spool.state / name
        what = what or f"spool {self.spool.root}"
        # Read-only: a descriptor open for writing would keep the file system
        # from being remounted read-only (EBUSY), and flock needs none.
        with os_errors(f"cannot lock the spool at {self.spool.root}"):
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        # "Is a daemon running?" (jobspool interfaces, daemon-status) takes a
        # shared lock for an instant: a few tries keep that from failing a start.
        for _ in range(20):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        else:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TryLater(f"{what} is already served by jobspool daemon pid {holder}") from None
        self._lock_fd = fd
        pid = f"{os.getpid()}\n".encode()
        try:  # in place, then cut: no new block needed, so a full disk does not stop us
            wfd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(wfd, pid, 0)
                os.ftruncate(wfd, len(pid))
            finally:
                os.close(wfd)
        except OSError as exc:  # only what `jobspool` says about the holder suffers
            self.logger.warning("cannot write the pid into the lock file", error=str(exc))

    def clean_up(self) -> None:
        """After a crash: staging files nobody writes, stale markers, orphan pending logs.

        A fault here (a full disk, an I/O error) does not keep the daemon from
        starting: what is left is cleaned at the next start.
        """
        try:
            self._clean_up()
        except Exception as exc:
            self.logger.error("cannot clean up after a crash; going on", error=str(exc))

    def _clean_up(self) -> None:
        with self.spool.names_lock():
            for entry in os.scandir(self.spool.tmp):
                remove_if_abandoned(entry.path)
            for entry in os.scandir(self.spool.state / "blocked"):
                # Republished by a lane if its head still blocks.
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            pending = self.spool.state / "pending"
            for entry in os.scandir(pending):
                name = entry.name.removesuffix(",log.xml")
                found = self.spool.locate(name) if names.is_valid(name) else None
                if found is None or found.place.state != QUEUE:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def install_signals(self) -> None:
        def stop(signum: int, frame: Any) -> None:
            self.stopping = True
            self.wake()

        def reload(signum: int, frame: Any) -> None:
            self.reload_requested = True
            self.wake()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def start_watching(self) -> None:
        self._folders = {
            self.spool.dir(state, iface): (state, iface)
            for iface in self.cfg.interfaces
            for state in (INCOMING, QUEUE)
        }
        self.watcher = watch.Watcher(
            list(self._folders), self.cfg.daemon.watch == "poll", self.wake
        )
        self.watcher.start()

    def lane_context(self) -> LaneContext:
        """What every lane works with, from the running configuration."""
        return LaneContext(
            self.spool,
            self.cfg.daemon,
            self.cfg.path.parent,
            self.logger,
            self.commit,
            self.held,
            self.metrics,
            self.alerts,
            None if self.cluster is None else self.may_move,
        )

    def start_lanes(self) -> None:
        ctx = self.lane_context()
        for iface in self.cfg.interfaces.values():
            if not self._owns_interface(iface.name):
                continue  # another node's, for now (cluster mode)
            if not iface.outbound and iface.name not in self.lanes:
                lane = self.lanes[iface.name] = Lane(iface, ctx)
                try:
                    lane.refill()
                except Exception as exc:  # the next rescan fills it
                    self.logger.error("cannot list the queue", interface=iface.name, error=str(exc))
                lane.start()

    def shut_down(self) -> None:
        """Stop taking jobs; give running handlers ``grace`` seconds, then kill them."""
        notify.notify("STOPPING=1")
        self.logger.info("stopping", grace=self.cfg.daemon.grace)
        for lane in self.lanes.values():
            lane.stop()
        deadline = time.monotonic() + self.cfg.daemon.grace
        while time.monotonic() < deadline and any(lane.busy() for lane in self.lanes.values()):
            time.sleep(0.05)
        for lane in self.lanes.values():
            if lane.busy():
                lane.interrupt()
            lane.join(5.0)
        self.checks.close()  # drops being checked stay in incoming/: taken after the restart
        if self.watcher is not None:
            self.watcher.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(max(0.0, deadline - time.monotonic()))
        if self.cfg.daemon.metrics is not None:
            self.write_metrics(up=False)  # a stopped daemon, not a stale file
        if self.cluster is not None:
            self.keeper_stop.set()
            if self.keeper is not None:
                self.keeper.join(DEADLINE_KEEPER)
            self.cluster.release_all(time.time())
        self.alerts.stop(ALERTS_GRACE)
        self.logger.info("stopped")

    def reload(self) -> None:
        """SIGHUP: read the configuration again; keep the old one if the new one is broken."""
        self.reload_requested = False
        notify.reloading()
        try:
            new, validators = check_config(self.config_path)
            if new.spool != self.cfg.spool:
                raise ConfigError(f"{new.path}: spool: cannot change while running; restart")
            Spool.of(new).init()  # new interfaces' folders
        except JobspoolError as exc:  # a bad file, or folders that cannot be made
            self.logger.error("reload refused; keeping the running configuration", error=str(exc))
            notify.notify("READY=1")
            return
        self.cfg = new
        self.spool = Spool.of(new)
        self.alerts.configure(new.notify)
        check.use_compiled(validators)  # only now: a refused reload keeps the old ones
        ctx = self.lane_context()
        for name, lane in list(self.lanes.items()):
            iface = new.interfaces.get(name)
            if iface is None or iface.outbound:
                lane.stop()  # its jobs stay on disk
                del self.lanes[name]
            else:
                lane.reconfigure(iface, ctx)  # the next job runs with the new handler
        self.start_lanes()
        if self.scheduler is not None:
            self.scheduler.reconfigure(Store(new, self.spool))
        assert self.watcher is not None
        self.watcher.stop()
        self.start_watching()
        self.rescan()
        self.logger.info("reloaded", interfaces=list(new.interfaces))
        notify.notify("READY=1", f"STATUS={self.status_line()}")

    # --- cluster mode -------------------------------------------------------------------

    def join_cluster(self) -> None:
        """Cluster mode: one daemon per node (its own lock), leases for the rest."""
        assert self.cfg.cluster is not None
        node = self.cfg.cluster.node
        self.lock(f"daemon.{node}.lock", f"node {node} of spool {self.spool.root}")
        store = lease.Store(self.spool.state, self.spool.tmp)
        store.init()
        keys = [lease.interface_key(i.name) for i in self.cfg.interfaces.values()]
        keys.append(lease.SCHEDULES)
        self.cluster = lease.Coordinator(store, node, self.cfg.cluster.lease, keys)
        self.logger.info("joining the cluster", node=node, lease=self.cfg.cluster.lease)
        self.keeper = threading.Thread(target=self.keep_leases, name="lease-keeper", daemon=True)
        self.keeper.start()

    def keep_leases(self) -> None:
        """The keeper thread: renews on time however busy the main loop is."""
        assert self.cluster is not None and self.cfg.cluster is not None
        every = self.cfg.cluster.lease * lease.RENEW
        while not self.keeper_stop.is_set():
            began = time.monotonic()
            try:
                turn = self.cluster.turn(began, time.time(), self._lease_idle)
            except Exception as exc:  # never let the keeper die: the leases would run out
                self.logger.exception("cannot keep the leases", error=str(exc))
            else:
                if turn.acquired or turn.lost or turn.draining:
                    self.lease_turns.append(turn)
                    self.wake()
            self.keeper_stop.wait(max(0.0, every - (time.monotonic() - began)))

    def serves(self, key: str) -> bool:
        """Whether this daemon serves ``key`` now: always, unless in cluster mode."""
        return self.cluster is None or key in self.cluster.held

    def may_move(self, iface: str) -> bool:
        """Asked by a lane before it starts a handler and before every move it makes."""
        assert self.cluster is not None
        return self.cluster.may_move(lease.interface_key(iface), time.monotonic())

    def cluster_turn(self, turn: lease.Turn) -> None:
        """Start and stop lanes to match the leases the keeper took, lost or drains."""
        assert self.cluster is not None
        prefix = len(lease.interface_key(""))
        for key in turn.lost:
            lane = self.lanes.pop(key[prefix:], None) if key != lease.SCHEDULES else None
            if lane is not None:
                lane.stop()  # a handler still running finds its lease gone: nothing moves
            self.logger.warning("lease given up or lost", lease=key, node=self.cluster.node)
        for key in turn.draining:
            lane = self.lanes.get(key[prefix:])
            if lane is not None and not lane.stopping:
                lane.stop()  # takes no new job; released once idle
                self.logger.info("handing over", lease=key, node=self.cluster.node)
        for key in turn.acquired:
            self.logger.info("lease taken", lease=key, node=self.cluster.node)
        if turn.acquired:
            self.start_lanes()

    def _lease_idle(self, key: str) -> bool:
        lane = self.lanes.get(key[len(lease.interface_key("")) :])
        if key == lease.SCHEDULES:
            return True  # a scheduled run in progress is finished by its process
        return lane is None or (not lane.in_flight and not lane.finished)

    # --- reporting --------------------------------------------------------------------

    def status_line(self) -> str:
        return ", ".join(f"{n}: {lane.depth()} queued" for n, lane in self.lanes.items()) or "idle"

    def write_metrics(self, up: bool = True) -> None:
        """Rewrite the textfile; every interface's and schedule's series is in it, 0 or not."""
        assert self.cfg.daemon.metrics is not None
        sids = list(self.scheduler.schedules) if self.scheduler is not None else []
        try:
            fresh = [sid for sid in sids if sid not in self.metrics.last]
            if fresh:  # their last runs from before this start: read once
                metrics.seed(self.metrics, {sid: self._results(sid) for sid in fresh})
            self.metrics.know(self.cfg.interfaces, sids)
            text = self.metrics.render(overview(self.spool), time.time(), up)
            metrics.write(self.cfg.daemon.metrics, text)
        except (OSError, JobspoolError) as exc:
            self.logger.error("cannot write metrics", error=str(exc))

    def _results(self, sid: str) -> Iterator[dict[str, str]]:
        """A schedule's recorded results, newest first (unreadable ones skipped)."""
        assert self.scheduler is not None
        from jobspool.schedules import read_result

        for path in self.scheduler.store.results(sid):
            try:
                yield read_result(path)
            except Exception:  # a damaged result file: the metrics go on without it
                continue


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def check_config(config_path: str | None) -> tuple[Config, dict[Path, Any]]:
    """Everything the daemon checks before it starts or reloads (``daemon --check``).

    Returns the configuration and its schemas, compiled but not yet in use:
    a schema that does not compile is a configuration error like any other.
    """
    cfg = config.load(config_path)
    Store(cfg, Spool.of(cfg)).all()  # cron expressions, time zones, owners, template settings
    schemas = {i.schema for i in cfg.interfaces.values() if i.schema is not None}
    return cfg, check.compile_all(schemas)


def main(config_path: str | None, once: bool = False) -> int:
    """Run the daemon in the foreground."""
    logs.setup()
    return Daemon(config_path, once=once).run()
