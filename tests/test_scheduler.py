"""When schedules run: ``next_run`` with fixed clocks, and the Scheduler with a fake one.

The timing rules pinned here are the ones ``docs/scheduling.rst`` promises:
``cron:`` on the schedule's local wall clock, where a time that happens twice
(autumn) fires at its first occurrence and a time that does not exist
(spring) fires when the gap ends; ``every:`` on a grid counted from the
epoch; ``at:`` once. The 2026 change days are Europe/Berlin 29 March and
25 October, America/New_York 8 March and 1 November.

The :class:`Scheduler` tests drive the daemon's loop in-process: the clock is
whatever ``loop(now)`` is given, the store is a real spool under
``tmp_path``, and the commands run are quick real ones.

The promises tested here are in ``docs/spec.rst`` ("Schedules").
"""

from __future__ import annotations

import itertools
import time
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from jobspool.scheduler import Scheduler
from jobspool.timing import next_run, preview
from tests.kit import (
    RecordingLog,
    Site,
    T,
    at,
    change,
    finish,
    local,
    loop,
    schedule,
    scheduler_for,
)

BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"


def runs_between(s: Any, start: float, end: float) -> list[float]:
    """Every run of ``s`` after ``start`` up to ``end``, by calling next_run again and again."""
    out: list[float] = []
    t = next_run(s, start)
    while t is not None and t <= end:
        out.append(t)
        t = next_run(s, t)
    return out


def noon(zone: str, day: str, shift: int) -> float:
    """Local noon ``shift`` days from ``day`` (YYYY-MM-DD) in ``zone``."""
    d = date.fromisoformat(day) + timedelta(days=shift)
    return at(zone, d.year, d.month, d.day, 12)


def on_day(runs: list[float], zone: str, day: str) -> list[str]:
    """The runs whose local date is ``day`` (YYYY-MM-DD), as local ISO times."""
    shown = [local(t, zone) for t in runs]
    return [t for t in shown if t.startswith(day)]


# --- cron across the DST changes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "day", "expected"),
    [
        # spring: 02:30 does not exist; it fires when the gap ends
        (BERLIN, "2026-03-29", "2026-03-29T03:00:00+02:00"),
        (NEW_YORK, "2026-03-08", "2026-03-08T03:00:00-04:00"),
        # autumn: in Berlin 02:30 happens twice; it fires at the first one
        (BERLIN, "2026-10-25", "2026-10-25T02:30:00+02:00"),
        # in New York the repeated hour is 01:00-02:00, so 02:30 is plain
        (NEW_YORK, "2026-11-01", "2026-11-01T02:30:00-05:00"),
    ],
)
def test_daily_0230_fires_exactly_once_on_each_change_day(zone, day, expected):
    s = schedule(cron="30 2 * * *", timezone=zone, command=["true"])
    runs = runs_between(s, noon(zone, day, -2), noon(zone, day, 2))

    assert on_day(runs, zone, day) == [expected]
    # and on the days before and after, at 02:30 as usual: one run a day
    assert [local(t, zone)[:10] for t in runs] == [
        str(date.fromisoformat(day) + timedelta(days=n)) for n in (-1, 0, 1, 2)
    ]
    assert [local(t, zone)[11:19] for t in runs] == [
        "02:30:00",
        expected[11:19],
        "02:30:00",
        "02:30:00",
    ]


def test_a_time_in_new_yorks_repeated_hour_fires_at_its_first_occurrence():
    s = schedule(cron="30 1 * * *", timezone=NEW_YORK, command=["true"])
    runs = runs_between(s, at(NEW_YORK, 2026, 10, 31, 12), at(NEW_YORK, 2026, 11, 2, 12))

    assert [local(t, NEW_YORK) for t in runs] == [
        "2026-11-01T01:30:00-04:00",  # the first 01:30; not again an hour later (-05:00)
        "2026-11-02T01:30:00-05:00",
    ]


@pytest.mark.parametrize(
    ("zone", "day", "around_the_change"),
    [
        (BERLIN, "2026-03-29", ["01:00:00+01:00", "03:00:00+02:00", "04:00:00+02:00"]),
        (BERLIN, "2026-10-25", ["01:00:00+02:00", "02:00:00+02:00", "03:00:00+01:00"]),
        (NEW_YORK, "2026-03-08", ["01:00:00-05:00", "03:00:00-04:00", "04:00:00-04:00"]),
        (NEW_YORK, "2026-11-01", ["00:00:00-04:00", "01:00:00-04:00", "02:00:00-05:00"]),
    ],
)
def test_hourly_runs_are_never_twice_at_the_same_instant(zone, day, around_the_change):
    s = schedule(cron="0 * * * *", timezone=zone, command=["true"])
    runs = runs_between(s, noon(zone, day, -1), noon(zone, day, 1))

    assert runs == sorted(set(runs)), "a run repeated, or out of order"
    assert all(0 < b - a <= 2 * 3600 for a, b in itertools.pairwise(runs))
    times = [t[11:] for t in on_day(runs, zone, day)]
    first = times.index(around_the_change[0])
    assert times[first : first + 3] == around_the_change
    # a wall-clock hour that does not exist or happens twice gives one run, not 0 or 2
    assert len(times) == (23 if day[5:7] == "03" else 24)


def test_cron_seconds_field_comes_last():
    s = schedule(cron="* * * * * */20", timezone=BERLIN, command=["true"])
    start = at(BERLIN, 2026, 6, 1, 12, 0, 5)
    assert [local(t, BERLIN) for t in preview(s, start, 4)] == [
        "2026-06-01T12:00:20+02:00",
        "2026-06-01T12:00:40+02:00",
        "2026-06-01T12:01:00+02:00",
        "2026-06-01T12:01:20+02:00",
    ]
    daily = schedule(cron="0 3 * * * 30", timezone=BERLIN, command=["true"])
    assert local(next_run(daily, start) or 0, BERLIN) == "2026-06-02T03:00:30+02:00"


def test_cron_L_is_the_last_day_of_the_month():
    s = schedule(cron="0 0 L * *", timezone=BERLIN, command=["true"])
    assert [local(t, BERLIN)[:10] for t in preview(s, at(BERLIN, 2026, 1, 15))] == [
        "2026-01-31",
        "2026-02-28",
        "2026-03-31",
        "2026-04-30",
        "2026-05-31",
    ]
    assert local(next_run(s, at(BERLIN, 2028, 2, 2)) or 0, BERLIN) == "2028-02-29T00:00:00+01:00"


def test_cron_without_a_timezone_uses_the_systems(monkeypatch):
    s = schedule(cron="30 2 * * *", command=["true"])
    start = at("UTC", 2026, 7, 1)
    monkeypatch.setenv("TZ", NEW_YORK)
    assert local(next_run(s, start) or 0, NEW_YORK) == "2026-07-01T02:30:00-04:00"
    monkeypatch.setenv("TZ", BERLIN)
    assert local(next_run(s, start) or 0, BERLIN) == "2026-07-01T02:30:00+02:00"


# --- every: a grid from the epoch --------------------------------------------------------------


def test_every_keeps_to_its_grid_at_and_between_grid_points():
    s = schedule(every="0:0:3", command=["true"])
    assert next_run(s, T) == T + 3  # at a grid point: the next one
    assert next_run(s, T + 0.001) == T + 3  # between: the next one
    assert next_run(s, T + 2.999) == T + 3
    assert next_run(s, T + 3) == T + 6


def test_every_does_not_drift_with_how_long_a_run_takes():
    s = schedule(every="0:01:00", command=["true"])
    # a run due at T that took 42.5 s: the next one is still due at T + 60
    assert next_run(s, T + 42.5) == T + 60
    # a run that outlasted its interval: the next grid point, never "60 s after the end"
    assert next_run(s, T + 75.0) == T + 120
    # whatever moment the daemon (re)starts at, the runs are the same grid
    assert preview(s, T + 17.3, 3) == [T + 60, T + 120, T + 180]
    assert preview(s, T - 0.2, 2) == [T, T + 60]


def test_every_24_hours_is_counted_from_the_epoch_not_local_midnight():
    s = schedule(every="24:00:00", timezone=BERLIN, command=["true"])
    start = at(BERLIN, 2026, 1, 10, 12)
    assert local(next_run(s, start) or 0, BERLIN) == "2026-01-11T01:00:00+01:00"  # 00:00 UTC


# --- at: once ----------------------------------------------------------------------------------


def test_at_runs_once_then_never():
    s = schedule(at="2026-12-24 18:00", timezone=BERLIN, command=["true"])
    when = at(BERLIN, 2026, 12, 24, 18)
    assert next_run(s, at(BERLIN, 2026, 1, 1)) == when
    assert next_run(s, when - 0.5) == when
    assert next_run(s, when) is None
    assert next_run(s, when + 86400) is None
    assert preview(s, at(BERLIN, 2026, 1, 1)) == [when]


def test_at_follows_the_same_dst_rules_and_honours_an_explicit_offset():
    in_gap = schedule(at="2026-03-29 02:30", timezone=BERLIN, command=["true"])
    twice = schedule(at="2026-10-25 02:30", timezone=BERLIN, command=["true"])
    offset = schedule(at="2026-12-24T18:00:00+00:00", timezone=BERLIN, command=["true"])
    start = at(BERLIN, 2026, 1, 1)
    assert local(next_run(in_gap, start) or 0, BERLIN) == "2026-03-29T03:00:00+02:00"
    assert local(next_run(twice, start) or 0, BERLIN) == "2026-10-25T02:30:00+02:00"
    assert next_run(offset, start) == datetime(2026, 12, 24, 18, tzinfo=ZoneInfo("UTC")).timestamp()


# --- the Scheduler, with a fake clock ----------------------------------------------------------


def test_fires_when_due_and_not_before(site):
    sch, _ = scheduler_for(site, tick={"every": "0:0:10", "command": ["true"]})

    assert loop(sch, T + 1) == T + 10  # first start: nothing due yet; says when
    assert loop(sch, T + 9.5) == T + 10
    assert site.runs("tick") == []
    assert loop(sch, T + 10) == T + 20

    [run] = site.runs("tick")
    assert (run.trigger, run.outcome, run.time("due")) == ("time", "ok", T + 10)


def test_a_clock_jumping_forward_an_hour_gives_one_run_not_3600(site):
    sch, _ = scheduler_for(site, tick={"every": "0:0:1", "command": ["true"]})
    loop(sch, T + 0.5)

    assert loop(sch, T + 3600.5) == T + 3601
    assert [r.trigger for r in site.runs("tick")] == ["time"]
    assert loop(sch, T + 3601) == T + 3602  # and then back on its grid
    assert len(site.runs("tick")) == 2


def test_a_clock_jumping_back_does_not_fire_early_and_recomputes(site):
    sch, log = scheduler_for(site, hourly={"every": "1:00:00", "command": ["true"]})
    loop(sch, T + 10)
    assert loop(sch, T + 3600) == T + 7200
    assert len(site.runs("hourly")) == 1

    # the clock is set back a day: nothing fires now, and the next run is the
    # next grid point of the new time, not T + 7200 a day away
    back = T + 3600 - 86400 + 10
    assert loop(sch, back) == T + 7200 - 86400
    assert len(site.runs("hourly")) == 1
    assert any("clock went back" in event for _, event, _ in log.lines)
    assert loop(sch, T + 7200 - 86400 - 1) == T + 7200 - 86400
    assert len(site.runs("hourly")) == 1
    loop(sch, T + 7200 - 86400)
    assert len(site.runs("hourly")) == 2


def test_a_run_still_going_at_the_next_tick_is_skipped_and_recorded(site):
    release = site.dir / "release"
    wait = f"while [ ! -e {release} ]; do sleep 0.02; done"
    sch, _ = scheduler_for(site, slow={"every": "0:0:1", "command": ["sh", "-c", wait]})
    sch.loop(T + 0.5)
    sch.loop(T + 1)  # starts a run that waits for the release file
    sch.loop(T + 2)  # that run is still going: this tick is skipped
    release.touch()
    finish(sch)

    runs = site.runs("slow")
    assert [(r.outcome, r.time("due")) for r in sorted(runs, key=lambda r: r.time("due"))] == [
        ("ok", T + 1),
        ("skipped", T + 2),
    ]
    skipped = next(r for r in runs if r.outcome == "skipped")
    assert skipped.message == "the previous run was still going"


def test_first_start_makes_nothing_up(site):
    sch, _ = scheduler_for(site, tick={"every": "0:0:10", "command": ["true"]})
    assert loop(sch, T + 5) == T + 10
    assert site.runs("tick") == []


@pytest.mark.parametrize(("catchup", "made_up"), [("once", 1), ("skip", 0)])
def test_runs_missed_while_down_are_made_up_once_or_skipped(site, catchup, made_up):
    sch, _ = scheduler_for(site, tick={"every": "0:0:10", "catchup": catchup, "command": ["true"]})
    loop(sch, T + 1)
    loop(sch, T + 10)  # ran; then the daemon stops

    restarted = Scheduler(site.store(), RecordingLog())
    assert loop(restarted, T + 75) == T + 80  # six ticks were missed
    assert loop(restarted, T + 76) == T + 80

    assert [r.trigger for r in site.runs("tick")] == ["time"] + ["catch-up"] * made_up


def test_a_disabled_schedule_does_not_fire_and_enabling_makes_nothing_up(site):
    sch, _ = scheduler_for(site, tick={"every": "0:0:1", "command": ["true"]})
    loop(sch, T + 0.5)
    change(sch, "tick", enabled=False)
    for now in (T + 1, T + 2, T + 3):
        loop(sch, now)
    assert site.runs("tick") == []

    change(sch, "tick", enabled=True)
    assert loop(sch, T + 3.5) == T + 4  # the ticks it was disabled for are not made up
    assert site.runs("tick") == []
    loop(sch, T + 4)
    assert [r.time("due") for r in site.runs("tick")] == [T + 4]


def test_changes_are_followed_without_a_new_scheduler(site):
    sch, _ = scheduler_for(site, tick={"every": "0:0:10", "command": ["true"]})
    loop(sch, T + 1)
    change(sch, "tick", name="Ten seconds", every="0:0:30")

    assert loop(sch, T + 10) == T + 30  # the new timing, at once
    assert site.runs("tick") == []
    loop(sch, T + 30)
    [run] = site.runs("tick")
    assert run.name == "Ten seconds"


def test_an_at_schedule_runs_once_even_if_the_clock_goes_back(site):
    sch, _ = scheduler_for(
        site, once={"at": "2027-01-15 08:00", "timezone": "UTC", "command": ["true"]}
    )
    loop(sch, T - 60)
    loop(sch, T)
    assert len(site.runs("once")) == 1
    loop(sch, T - 3600)  # the clock is set back an hour
    loop(sch, T)
    assert len(site.runs("once")) == 1


def test_a_restart_after_enabling_makes_up_nothing_that_was_missed_while_disabled(site):
    sch, _ = scheduler_for(site, hourly={"every": "1:00:00", "command": ["true"]})
    loop(sch, T + 10)
    loop(sch, T + 3600)  # ran
    change(sch, "hourly", enabled=False)
    loop(sch, T + 3660)
    loop(sch, T + 7200)  # not run: disabled
    change(sch, "hourly", enabled=True)
    loop(sch, T + 7260)  # enabled again; the next run is T + 10800

    # a restart a minute later: no tick fell in the minute it was down
    restarted = Scheduler(site.store(), RecordingLog())
    assert loop(restarted, T + 7320) == T + 10800
    assert [r.trigger for r in site.runs("hourly")] == ["time"]


# --- many runs at once: the run threads and the group commit ----------------------------------

DISK = {"template": "disk-space", "with": {"min_free": "1B"}}  # in-process, about a millisecond


def scheduler_with(
    site: Site, schedules: dict[str, Any], **daemon: Any
) -> tuple[Scheduler, RecordingLog]:
    site.configure(schedules=schedules, **daemon)
    log = RecordingLog()
    return Scheduler(site.store(), log), log


def blocking(site: Site, name: str) -> tuple[list[str], Path, Path]:
    """A command that says it started, then waits for its release file."""
    started, release = site.dir / f"{name}.started", site.dir / f"{name}.release"
    wait = f"touch {started}; while [ ! -e {release} ]; do sleep 0.02; done"
    return ["sh", "-c", wait], started, release


def test_many_schedules_due_in_the_same_second_each_get_a_result_for_their_tick(site):
    many = {f"tick-{i:03d}": {"every": "0:0:1", **DISK} for i in range(200)}
    sch, _ = scheduler_with(site, many)  # 200 runs a tick, 8 threads
    loop(sch, T + 0.5)
    loop(sch, T + 1)
    loop(sch, T + 2)

    store = site.store()
    for sid in many:
        runs = site.runs(sid)
        assert [(r.trigger, r.outcome, r.time("due")) for r in runs] == [
            ("time", "ok", T + 1),
            ("time", "ok", T + 2),
        ], sid
        assert store.last_tick(sid) == T + 2


def test_a_tick_that_finds_every_run_thread_busy_waits_in_line_and_starts_late(site):
    slow, started, release = blocking(site, "slow")
    sch, _ = scheduler_with(
        site,
        {"slow": {"every": "0:0:10", "command": slow}, "quick": {"every": "0:0:10", **DISK}},
        schedule_concurrency=1,
    )
    loop(sch, T + 1)
    sch.loop(T + 10)  # both due: slow takes the only thread, quick waits for it
    site.wait_for(started.exists, "the slow run to start")
    time.sleep(0.3)
    assert site.runs("quick") == []  # waiting, not run, not dropped
    release.touch()
    finish(sch)

    [slow_run], [quick] = site.runs("slow"), site.runs("quick")
    assert (quick.outcome, quick.trigger, quick.time("due")) == ("ok", "time", T + 10)
    # it began when the thread was free: its start shows how late it was
    assert quick.time("start") >= slow_run.time("end") >= slow_run.time("start") + 0.3


def test_a_tick_whose_previous_one_still_waits_for_a_thread_is_skipped_and_says_so(site):
    slow, started, release = blocking(site, "slow")
    sch, log = scheduler_with(
        site,
        {"slow": {"every": "0:0:10", "command": slow}, "quick": {"every": "0:0:1", **DISK}},
        schedule_concurrency=1,
    )
    loop(sch, T + 9.5)
    sch.loop(T + 10)  # slow takes the only thread; quick's T + 10 waits
    sch.loop(T + 11)  # quick's T + 10 is still waiting: T + 11 is skipped
    site.wait_for(started.exists, "the slow run to start")
    release.touch()
    finish(sch)

    runs = site.runs("quick")
    assert [(r.outcome, r.time("due")) for r in sorted(runs, key=lambda r: r.time("due"))] == [
        ("ok", T + 10),
        ("skipped", T + 11),
    ]
    skipped = next(r for r in runs if r.outcome == "skipped")
    assert skipped.message == "the previous run was still waiting for a free run thread"
    assert ("warning", "schedule skipped") in [(level, event) for level, event, _ in log.lines]


def test_a_run_is_reported_only_once_its_result_is_on_disk_and_synced(site, monkeypatch):
    from jobspool.spool import Spool

    synced: set[str] = set()  # result files that were in place when a sync ended
    reported: list[str] = []
    real_sync = Spool.sync

    def sync(self: Spool) -> None:
        real_sync(self)
        synced.update(p.name for p in (self.state / "schedules").glob("*/runs/*.xml"))

    class CheckingLog(RecordingLog):
        def info(self, event: str, **fields: Any) -> None:
            if event == "schedule ran":
                newest = site.runs(fields["schedule"])[-1]
                assert newest.path.name in synced, f"reported before its sync: {newest}"
                reported.append(fields["schedule"])
            super()._log("info")(event, **fields)

    monkeypatch.setattr(Spool, "sync", sync)
    many = {f"tick-{i:02d}": {"every": "0:0:1", **DISK} for i in range(50)}
    site.configure(schedules=many)
    sch = Scheduler(site.store(), CheckingLog())
    loop(sch, T + 0.5)
    loop(sch, T + 1)

    assert sorted(reported) == sorted(many)


def test_stopping_records_the_ticks_still_waiting_for_a_thread_as_skipped(site):
    slow, started, _ = blocking(site, "slow")
    sch, _ = scheduler_with(
        site,
        {"slow": {"every": "0:0:10", "command": slow}, "quick": {"every": "0:0:10", **DISK}},
        schedule_concurrency=1,
    )
    loop(sch, T + 1)
    sch.loop(T + 10)
    site.wait_for(started.exists, "the slow run to start")

    sch.shutdown(0.2)  # slow never ends by itself: killed; quick never got the thread

    [slow_run], [quick] = site.runs("slow"), site.runs("quick")
    assert slow_run.outcome == "failed", slow_run
    assert (quick.outcome, quick.time("due")) == ("skipped", T + 10)
    assert quick.message == "the daemon stopped before a run thread was free"


def test_poll_fires_on_time_and_follows_a_change_within_a_second(site):
    # What the daemon calls on each turn of its loop, which jobs make frequent.
    sch, _ = scheduler_for(site, tick={"every": "0:0:10", "command": ["true"]})
    assert sch.poll(T + 1) == T + 10
    change(sch, "tick", enabled=False)
    assert sch.poll(T + 2) is None  # followed within a second
    change(sch, "tick", enabled=True)
    assert sch.poll(T + 3) == T + 10
    assert sch.poll(T + 9.99) == T + 10

    assert sch.poll(T + 10) == T + 20
    finish(sch)
    assert [r.time("due") for r in site.runs("tick")] == [T + 10]
