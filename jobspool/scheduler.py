"""When schedules run, and the loop that fires them (SPEC 6).

Timing is a pure function, :func:`next_run`, pinned by tests with fixed
clocks:

- ``cron:`` is evaluated by croniter on the schedule's local wall clock
  (five fields, optionally a sixth for seconds, ``L`` for the last day of
  the month), and each wall-clock time is then mapped to an instant: a time
  that happens twice (autumn) counts once, at its first occurrence; a time
  that does not exist (spring) fires when the gap ends. So a daily 02:30 run
  fires exactly once on both change days. croniter's own time-zone handling
  fires it twice in autumn, which is why it only ever sees naive times here.
- ``every: h:m:s`` keeps to a grid counted from the epoch: runs never drift
  with how long they take, and a restart keeps the grid.
- ``at:`` runs once, at a local date and time.

:class:`Scheduler` is the daemon's loop for them, in the manner of huey's
consumer: ``loop(now)`` is given the time, hands what is due to a bounded
pool of run threads, and returns when it next needs to be called. Results
are group committed (one sync for many) by a thread of their own.
"""

from __future__ import annotations

import functools
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from jobspool import schedules
from jobspool.config import Schedule, parse_every
from jobspool.errors import JobspoolError
from jobspool.schedules import STILL_GOING, Result

if TYPE_CHECKING:
    from jobspool.schedules import Staged, Store


def zone(s: Schedule) -> tzinfo:
    """The schedule's time zone; by default the system's ($TZ, else /etc/localtime)."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = s.timezone or os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            if s.timezone:
                raise ValueError(f"unknown time zone {s.timezone!r}") from None
    return _system_zone()


@functools.cache
def _system_zone() -> tzinfo:
    # A zone file, not the fixed offset astimezone() gives: that knows no DST.
    from zoneinfo import ZoneInfo

    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return UTC


def next_run(s: Schedule, after: float) -> float | None:
    """The first run strictly after ``after`` (a POSIX time), or None if there is none."""
    if s.timing == "every":
        step = _step(s.when)
        return (after // step + 1) * step
    tz = zone(s)
    if s.timing == "at":
        when = _parse_at(s.when, tz)
        return when if when > after else None
    return _next_cron(s.when, tz, after)


# Parsed once per text: the daemon asks for every tick of every schedule.
_step = functools.lru_cache(maxsize=1024)(parse_every)


def preview(s: Schedule, after: float, count: int = 5) -> list[float]:
    """The next ``count`` run times after ``after``."""
    out: list[float] = []
    t = next_run(s, after)
    while t is not None and len(out) < count:
        out.append(t)
        t = next_run(s, t)
    return out


def _next_cron(expr: str, tz: tzinfo, after: float) -> float:
    from croniter import croniter

    if not croniter.is_valid(expr):
        raise ValueError(f"not a valid cron expression: {expr!r}")
    wall = datetime.fromtimestamp(after, tz).replace(tzinfo=None)
    it = croniter(expr, wall)
    while True:
        candidate = it.get_next(datetime)
        instant = _instant(candidate, tz)
        if instant > after:
            return instant


def _instant(wall: datetime, tz: tzinfo) -> float:
    """A local wall-clock time as a POSIX time: first occurrence; end of a DST gap."""
    first = wall.replace(tzinfo=tz, fold=0)
    if first.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall:
        return first.timestamp()
    # In a gap: the clock jumped over this time. Fire when the gap ends, the
    # first instant whose offset is the later one (found to the second).
    lo = wall.replace(tzinfo=tz, fold=1).timestamp()
    hi = first.timestamp()
    later = datetime.fromtimestamp(hi, tz).utcoffset()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).utcoffset() == later:
            hi = mid
        else:
            lo = mid
    return hi


def _parse_at(text: str, tz: tzinfo) -> float:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a date and time like 2026-12-24 18:00: {text!r}") from None
    if when.tzinfo is None:
        return _instant(when, tz)
    return when.timestamp()


STILL_WAITING = "the previous run was still waiting for a free run thread"
NEVER_STARTED = "the daemon stopped before a run thread was free"
_RUNNING, _WAITING = "running", "waiting"
_T = TypeVar("_T")


class Tick(NamedTuple):
    """One fired tick of a schedule, on its way to a run thread."""

    schedule: Schedule
    trigger: str
    due: float


class Scheduler:
    """Fires the daemon's schedules: on time, never overlapping, one catch-up after downtime.

    Runs go to a bounded pool of threads (``daemon.schedule_concurrency``);
    a tick that finds every thread busy waits in line, in the order it fell
    due, and its result's ``start`` shows how late it began. Results are
    group committed by one thread (:class:`_Recorder`); a run counts as
    recorded, and is logged, only once its result is durable.
    """

    def __init__(self, store: Store, log: Any) -> None:
        self.store = store
        self.log = log
        self.schedules: dict[str, Schedule] = {}
        self.next: dict[str, float | None] = {}
        self.trigger: dict[str, str] = {}
        self.signature: tuple[tuple[str, int], ...] | None = None
        self.last_now: float | None = None
        self.answer: float | None = None  # what the last loop() returned
        self.look_again = 0.0  # when poll() next calls loop()
        # Per schedule with a tick fired and not yet run to its end: running,
        # or waiting for a thread. The no-overlap rule within the daemon.
        self.busy: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # running commands, to stop them
        self.fired: dict[str, float] = {}  # the last tick fired, ahead of its record on disk
        self.ticks: list[tuple[str, float]] = []  # this turn's, for the recorder to write
        self.cond = threading.Condition()
        self.pool = _Pool(store.cfg.daemon.schedule_concurrency, "schedule", self._run)
        self.recorder = _Recorder(self)

    def loop(self, now: float) -> float | None:
        """Fire what is due at ``now``; return when the next run is due."""
        if self.last_now is not None and now < self.last_now - 1:
            self.log.warning("the clock went back; computing next runs anew")
            # Repeating sometimes beats waiting as long as the clock went back,
            # except for at:, which runs once, ever.
            self.next = {
                sid: self._after_clock_went_back(s, now) for sid, s in self.schedules.items()
            }
        self.last_now = now
        self.refresh(now)
        for sid, s in self.schedules.items():
            due = self.next.get(sid)
            if due is None or due > now or not s.enabled:
                continue
            self.fire(s, self.trigger.pop(sid, "time"), due)
            self.remember(sid, due)
            # From now, not from the tick: a clock that jumped forward gives
            # one run, not one for every tick it jumped over.
            self.next[sid] = next_run(s, now)
        if self.ticks:
            # Written by the recorder: a file write per tick here would give
            # the GIL to the run threads a thousand times a turn, and the main
            # loop (which also takes in the jobs) would wait for it each time.
            self.recorder.add_ticks(self.ticks)
            self.ticks = []
        pending = [
            t for sid, t in self.next.items() if t is not None and self.schedules[sid].enabled
        ]
        return min(pending, default=None)

    def poll(self, now: float) -> float | None:
        """:meth:`loop` when a run is due or a second has passed; else its last answer.

        For a caller that turns often, as the daemon does while jobs come
        in: looking at every settings file each turn costs a system call per
        schedule, and once a second is what the documentation promises.
        """
        again = self.signature is None or self.last_now is None or now < self.last_now
        if again or now >= self.look_again:  # (no signature: just reloaded)
            self.answer = self.loop(now)
            self.look_again = now + 1.0 if self.answer is None else min(self.answer, now + 1.0)
        return self.answer

    def fire(self, s: Schedule, trigger: str, due: float) -> None:
        """Hand a tick to the run threads, or record it as skipped if ``s`` is still busy."""
        with self.cond:
            state = self.busy.get(s.id)
            if state is None:
                self.busy[s.id] = _WAITING
        if state is not None:
            message = STILL_GOING if state == _RUNNING else STILL_WAITING
            self.recorder.add(s, schedules.skipped(s.id, trigger, due, message))
            return
        if self.pool.submit(Tick(s, trigger, due)):
            with self.cond:
                # (unless that thread has already run it to its end)
                if self.busy.get(s.id) == _WAITING:
                    self.busy[s.id] = _RUNNING

    def remember(self, sid: str, tick: float) -> None:
        """Note ``tick`` as the last one fired, for catch-up after a restart (written soon)."""
        self.fired[sid] = tick
        self.ticks.append((sid, tick))

    def _run(self, tick: Tick) -> None:
        """One run, on a run thread; its result goes to the recorder before the schedule is free."""
        s = tick.schedule
        with self.cond:
            self.busy[s.id] = _RUNNING

        def started(proc: subprocess.Popen[bytes]) -> None:
            with self.cond:
                self.procs[s.id] = proc

        def record(s: Schedule, result: Result) -> None:
            # Staged here, so that run threads write in parallel; placed by the recorder.
            self.recorder.add(s, result, self.store.stage(s, result))

        try:
            schedules.execute(self.store, s, tick.trigger, tick.due, on_start=started,
                              record=record)  # fmt: skip
        except BaseException as exc:  # sys.exit() in a handler too: the thread serves on
            self.log.exception("schedule run crashed", schedule=s.id, error=str(exc))
        finally:
            with self.cond:
                self.procs.pop(s.id, None)
                self.busy.pop(s.id, None)
                idle = not self.busy
                self.cond.notify_all()
            if idle:  # no more results coming: the recorder need not wait for them
                self.recorder.wake()

    def drain(self, timeout: float) -> bool:
        """Until every tick fired so far has run and its result is durable; False on timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            if not self.cond.wait_for(lambda: not self.busy, timeout):
                return False
        return self.recorder.wait(max(0.0, deadline - time.monotonic()))

    def refresh(self, now: float) -> None:
        """(Re)load the effective schedules when the configuration or a settings file changed."""
        signature = self.store.signature()
        if signature == self.signature:
            return
        self.signature = signature
        try:
            fresh = self.store.all()
        except Exception as exc:
            self.log.error("schedules not reloaded; keeping the running ones", error=str(exc))
            return
        self.pool.resize(self.store.cfg.daemon.schedule_concurrency)
        first = not self.schedules
        for sid, s in fresh.items():
            old = self.schedules.get(sid)
            if old is None and first:
                self.next[sid] = self._after_downtime(s, now)
            elif (
                old is None
                or (old.timing, old.when, old.timezone) != (s.timing, s.when, s.timezone)
                or (s.enabled and not old.enabled)
            ):
                # Counted from now, and remembered: no catch-up after a restart
                # for ticks before the change, or while it was disabled.
                self.next[sid] = next_run(s, now)
                self.remember(sid, now)
        for sid in set(self.schedules) - set(fresh):
            self.next.pop(sid, None)
        self.schedules = fresh

    def _after_clock_went_back(self, s: Schedule, now: float) -> float | None:
        if s.timing == "at":
            last = self.fired.get(s.id) or self.store.last_tick(s.id)
            return next_run(s, max(now, last or now))
        return next_run(s, now)

    def _after_downtime(self, s: Schedule, now: float) -> float | None:
        last = self.store.last_tick(s.id)
        if last is None:
            self.remember(s.id, now)
            return next_run(s, now)
        missed = next_run(s, last)
        if missed is not None and missed <= now and s.enabled and s.catchup == "once":
            self.trigger[s.id] = "catch-up"
            return now
        return next_run(s, now)

    def shutdown(self, timeout: float) -> None:
        """Let running runs finish within ``timeout``, then kill their process groups.

        Ticks still waiting for a run thread are recorded as skipped. A
        killed run is recorded as failed before the daemon exits; a Python
        handler or template cannot be killed and is left to finish or die
        with the process. Every result recorded by then is made durable.
        """
        from jobspool.handlers import kill_group

        deadline = time.monotonic() + timeout
        for tick in self.pool.close():
            with self.cond:
                self.busy.pop(tick.schedule.id, None)
            skip = schedules.skipped(tick.schedule.id, tick.trigger, tick.due, NEVER_STARTED)
            self.recorder.add(tick.schedule, skip)
        with self.cond:
            self.cond.wait_for(lambda: not self.busy, max(0.0, deadline - time.monotonic()))
            procs = {sid: p for sid, p in self.procs.items() if sid in self.busy}
        for sid, proc in procs.items():
            if proc.poll() is None:
                self.log.warning("stopping: killing a scheduled run", schedule=sid)
                kill_group(proc, grace=2.0)
        with self.cond:
            # Killed runs record their results; in-process ones may never end.
            self.cond.wait_for(lambda: not set(procs) & set(self.busy), 5.0)
        self.recorder.stop(_FINAL_COMMIT)


_FINAL_COMMIT = 30.0  # seconds the last results may take to be synced at shutdown
BATCH = 64  # results that make a batch worth committing at once
GATHER = 0.02  # seconds a batch waits for more results while runs are going


class _Pool(Generic[_T]):
    """Up to ``size`` threads calling ``work`` on items, in the order they were submitted.

    Threads are made as they are needed and then kept. When every one is
    busy, items wait in line: nothing is dropped, and nothing overtakes.
    """

    def __init__(self, size: int, name: str, work: Callable[[_T], None]) -> None:
        self.size = size
        self.name = name
        self.work = work
        self.cond = threading.Condition()
        self.queue: deque[_T] = deque()
        self.threads: list[threading.Thread] = []
        self.free = 0  # threads that will take an item without finishing another first
        self.closed = False

    def submit(self, item: _T) -> bool:
        """Queue ``item``; True if a thread is free for it now, False if it waits for one."""
        with self.cond:
            self.queue.append(item)
            if self.free < len(self.queue) and len(self.threads) < self.size:
                thread = threading.Thread(target=self._serve, daemon=True,
                                          name=f"{self.name}-{len(self.threads)}")  # fmt: skip
                self.threads.append(thread)
                self.free += 1
                thread.start()
            else:
                self.cond.notify()
            return self.free >= len(self.queue)

    def resize(self, size: int) -> None:
        """A new bound: more threads are made as needed; surplus ones are kept, not stopped."""
        with self.cond:
            self.size = size

    def close(self) -> list[_T]:
        """Stop taking items; return the ones that never got a thread."""
        with self.cond:
            self.closed = True
            left = list(self.queue)
            self.queue.clear()
            self.cond.notify_all()
        return left

    def _serve(self) -> None:
        while True:
            with self.cond:
                while not self.queue:
                    if self.closed:
                        return
                    self.cond.wait()
                item = self.queue.popleft()
                self.free -= 1
            try:
                self.work(item)
            finally:
                with self.cond:
                    self.free += 1


class _Recorder:
    """Group commit of run results, on a thread of its own.

    Each batch is what arrived while the previous one was being committed
    (and, while runs are going, for up to ``GATHER`` more): its results
    (staged by the run threads, unsynced), one ``syncfs``, every
    result renamed into place, one ``syncfs``; only then is each run logged
    and its schedule's history pruned. A crash therefore loses at most the
    results not yet renamed into place, and never leaves a partial or empty
    result file behind (each appears by one rename, after its data is durable).
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.cond = threading.Condition()
        self.items: list[tuple[Schedule, Result, Staged | None]] = []
        self.ticks: list[tuple[str, float]] = []
        self.working = False  # a batch taken and not yet done
        self.thread: threading.Thread | None = None
        self.stopping = False

    def add(self, s: Schedule, result: Result, staged: Staged | None = None) -> None:
        """Commit a result of ``s``: ``staged`` already, or staged here."""
        with self.cond:
            self.items.append((s, result, staged))
            self._start()
            # Only what the recorder waits for: waking it for every result of
            # a burst would cost a context switch each.
            if len(self.items) in (1, BATCH):
                self.cond.notify_all()

    def add_ticks(self, ticks: list[tuple[str, float]]) -> None:
        """Write these (schedule, tick) as the schedules' last ticks, in this order."""
        with self.cond:
            self.ticks += ticks
            self._start()
            self.cond.notify_all()

    def wake(self) -> None:
        """Commit now what has been handed over, without waiting for more."""
        with self.cond:
            self.cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """Until everything handed over is written; False on timeout."""
        with self.cond:
            return self.cond.wait_for(
                lambda: not (self.items or self.ticks or self.working), timeout
            )

    def _start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._serve, name="recorder", daemon=True)
            self.thread.start()

    def stop(self, timeout: float) -> None:
        """Commit what was handed over, then end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            thread = self.thread
        if thread is not None:
            thread.join(timeout)

    def _serve(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.items or self.ticks or self.stopping)
                if not (self.items or self.ticks):
                    return
                if 0 < len(self.items) < BATCH and self.scheduler.busy and not self.stopping:
                    # Runs are going: let their results join this batch. Each
                    # sync flushes the whole filesystem; a burst of a thousand
                    # runs then takes tens of syncs, not hundreds.
                    self.cond.wait(GATHER)
                batch, self.items = self.items, []
                ticks, self.ticks = self.ticks, []
                self.working = True
            try:
                self.write_ticks(ticks)
                if batch:
                    self.commit(batch)
            except Exception as exc:  # a bug: what comes after must still get in
                self.scheduler.log.exception("cannot record results", error=str(exc))
            finally:
                with self.cond:
                    self.working = False
                    self.cond.notify_all()

    def write_ticks(self, ticks: list[tuple[str, float]]) -> None:
        """Each schedule's newest tick of ``ticks`` into its ``last``; one error line at most."""
        failed = []
        for sid, tick in dict(ticks).items():
            try:
                self.scheduler.store.record_tick(sid, tick)
            except OSError as exc:
                failed.append(f"{sid}: {exc.strerror}")
        if failed:  # each tick of every schedule would be one line a second
            self.scheduler.log.error("cannot record the last ticks", failed=len(failed),
                                     first=failed[0])  # fmt: skip

    def commit(self, batch: list[tuple[Schedule, Result, Staged | None]]) -> None:
        """Stage what is not yet, sync, place every result, sync, then report and prune."""
        store, log = self.scheduler.store, self.scheduler.log
        staged = []
        for s, result, st in batch:
            try:
                staged.append(st or store.stage(s, result))
            except Exception as exc:
                log.error("cannot record a result", schedule=s.id, error=str(exc))
        self._sync()
        placed = []
        stems: dict[str, list[int]] = {}  # per schedule, listed once a batch
        for st in staged:
            sid = st.schedule.id
            try:
                if sid not in stems:
                    stems[sid] = store.result_stems(sid)
                store.place(st, stems[sid])
            except Exception as exc:
                log.error("cannot record a result", schedule=sid, error=str(exc))
            else:
                placed.append(st)
        if not placed:
            return
        self._sync()
        for sid, names in stems.items():
            try:
                store.prune(sid, names)
            except OSError as exc:
                log.error("cannot prune the results", schedule=sid, error=str(exc))
        for st in placed:
            r = st.result
            if r.outcome == "skipped":
                log.warning("schedule skipped", schedule=r.schedule, trigger=r.trigger,
                            reason=r.message)  # fmt: skip
            else:
                level = log.info if r.outcome == "ok" else log.warning
                level("schedule ran", schedule=r.schedule, trigger=r.trigger, outcome=r.outcome,
                      message=r.message)  # fmt: skip

    def _sync(self) -> None:
        """Sync until it works: no result is placed or reported on a failed sync.

        This thread only records; results and ticks handed over meanwhile wait.
        """
        delay = 0.1
        while True:
            try:
                self.scheduler.store.spool.sync()
                return
            except JobspoolError as exc:
                self.scheduler.log.error("cannot sync the spool; results wait", error=str(exc))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
