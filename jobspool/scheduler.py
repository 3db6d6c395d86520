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
consumer: ``loop(now)`` is given the time, fires what is due in threads of
its own, and returns when it next needs to be called.
"""

from __future__ import annotations

import functools
import os
import subprocess
import threading
import time
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any

from jobspool.config import Schedule, parse_every

if TYPE_CHECKING:
    from jobspool.schedules import Store


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
        step = parse_every(s.when)
        return (after // step + 1) * step
    tz = zone(s)
    if s.timing == "at":
        when = _parse_at(s.when, tz)
        return when if when > after else None
    return _next_cron(s.when, tz, after)


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


class Scheduler:
    """Fires the daemon's schedules: on time, never overlapping, one catch-up after downtime."""

    def __init__(self, store: Store, log: Any) -> None:
        self.store = store
        self.log = log
        self.schedules: dict[str, Schedule] = {}
        self.next: dict[str, float | None] = {}
        self.trigger: dict[str, str] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.signature: tuple[tuple[str, int], ...] | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # running commands, to stop them
        self.last_now: float | None = None

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
            trigger = self.trigger.pop(sid, "time")
            self.fire(s, trigger, due)
            self.store.record_tick(sid, due)
            # From now, not from the tick: a clock that jumped forward gives
            # one run, not one for every tick it jumped over.
            self.next[sid] = next_run(s, now)
        pending = [
            t for sid, t in self.next.items() if t is not None and self.schedules[sid].enabled
        ]
        return min(pending, default=None)

    def fire(self, s: Schedule, trigger: str, due: float) -> None:
        from jobspool import schedules

        running = self.threads.get(s.id)
        if running is not None and running.is_alive():
            now = time.time()
            skipped = schedules.Result(s.id, trigger, "skipped", now, now, due,
                                       message="the previous run was still going")  # fmt: skip
            self.store.record(s, skipped)
            self.log.warning("schedule skipped", schedule=s.id, reason=skipped.message)
            return

        def started(proc: subprocess.Popen[bytes]) -> None:
            self.procs[s.id] = proc

        def run() -> None:
            try:
                result = schedules.execute(self.store, s, trigger, due, on_start=started)
            except Exception as exc:
                self.log.exception("schedule run crashed", schedule=s.id, error=str(exc))
                return
            level = self.log.info if result.outcome == "ok" else self.log.warning
            level("schedule ran", schedule=s.id, trigger=trigger, outcome=result.outcome,
                  message=result.message)  # fmt: skip

        thread = threading.Thread(target=run, name=f"schedule-{s.id}", daemon=True)
        self.threads[s.id] = thread
        thread.start()

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
                self.store.record_tick(sid, now)
        for sid in set(self.schedules) - set(fresh):
            self.next.pop(sid, None)
        self.schedules = fresh

    def _after_clock_went_back(self, s: Schedule, now: float) -> float | None:
        if s.timing == "at":
            return next_run(s, max(now, self.store.last_tick(s.id) or now))
        return next_run(s, now)

    def _after_downtime(self, s: Schedule, now: float) -> float | None:
        last = self.store.last_tick(s.id)
        if last is None:
            self.store.record_tick(s.id, now)
            return next_run(s, now)
        missed = next_run(s, last)
        if missed is not None and missed <= now and s.enabled and s.catchup == "once":
            self.trigger[s.id] = "catch-up"
            return now
        return next_run(s, now)

    def shutdown(self, timeout: float) -> None:
        """Let running runs finish within ``timeout``, then kill their process groups.

        A killed run is recorded as failed before the daemon exits; a Python
        handler or template cannot be killed and is left to finish or die
        with the process.
        """
        from jobspool.handlers import kill_group

        deadline = time.monotonic() + timeout
        for thread in self.threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        for sid, thread in self.threads.items():
            proc = self.procs.get(sid)
            if thread.is_alive() and proc is not None and proc.poll() is None:
                self.log.warning("stopping: killing a scheduled run", schedule=sid)
                kill_group(proc, grace=2.0)
                thread.join(5.0)  # it records its result
