"""When a schedule runs: pure functions of the schedule and the time, pinned by tests.

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
"""

from __future__ import annotations

import functools
import os
from datetime import UTC, datetime, tzinfo

from jobspool.config import Schedule, parse_every


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
