"""Schedules in-process: wall-clock times, schedules read as the configuration would, and
the daemon's :class:`~jobspool.scheduler.Scheduler` driven by a clock of the test's own.

:func:`scheduler_for` builds a Scheduler on a real spool of a :class:`Site`;
:func:`loop` turns its loop once at a given time and waits until what it
fired is recorded (durably), so a test reads the results right after.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from jobspool import config
from jobspool.config import Schedule
from jobspool.scheduler import Scheduler
from tests.kit.process import DEADLINE
from tests.kit.site import Site

# A fixed clock: 2027-01-15 08:00:00 UTC, on the grid of every interval the tests use.
T = 1_800_000_000.0


def at(
    zone: str, year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> float:
    """A local wall-clock time in ``zone`` as a POSIX time (its first occurrence)."""
    return datetime(year, month, day, hour, minute, second, tzinfo=ZoneInfo(zone)).timestamp()


def local(ts: float, zone: str) -> str:
    """A POSIX time as ``2026-03-29T03:00:00+02:00`` in ``zone`` (what failures show)."""
    return datetime.fromtimestamp(ts, ZoneInfo(zone)).isoformat()


def schedule(sid: str = "job", **raw: Any) -> Schedule:
    """A schedule read from ``raw`` exactly as the configuration file's entry would be."""
    return config.read_schedule(Path("/etc/jobspool/jobspool.yaml"), sid, raw)


class RecordingLog:
    """Stands in for the daemon's structured logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _log(self, level: str) -> Callable[..., None]:
        def log(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return log

    def __getattr__(self, level: str) -> Callable[..., None]:
        if level in ("debug", "info", "warning", "error", "exception"):
            return self._log(level)
        raise AttributeError(level)


def finish(scheduler: Scheduler) -> None:
    """Wait until every run the scheduler started has been recorded (durably)."""
    assert scheduler.drain(DEADLINE), f"runs still going after {DEADLINE:g}s: {scheduler.busy}"


def scheduler_for(site: Site, **schedules: Any) -> tuple[Scheduler, RecordingLog]:
    """``site`` configured with these schedules, and a Scheduler on its spool."""
    site.configure(schedules=schedules)
    log = RecordingLog()
    return Scheduler(site.store(), log), log


def change(scheduler: Scheduler, sid: str, **changes: Any) -> None:
    """What ``jobspool schedule enable|disable|set`` does, as typed by hand.

    The scheduler notices a change by the settings file's mtime; two commands
    typed by hand are always further apart than the filesystem's timestamp
    granularity (a clock tick on older kernels), so these are too.
    """
    time.sleep(0.02)
    scheduler.store.change(sid, changes)


def loop(scheduler: Scheduler, now: float) -> float | None:
    """One turn of the loop at ``now``, then wait for what it fired to be recorded."""
    due = scheduler.loop(now)
    finish(scheduler)
    return due
