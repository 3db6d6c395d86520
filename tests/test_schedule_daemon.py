"""The real daemon runs the schedules, with every-second timings.

Each test starts ``jobspool -c CONFIG daemon`` as a subprocess, changes
schedules with the real ``jobspool schedule`` commands while it runs, and
reads the XML results in ``state/schedules/ID/runs/`` (each checked against
``result.xsd``). Lateness bounds are functional ("ran within 1.5 s of its
tick"), generous for a loaded machine; nothing measures speed. Every daemon
is killed at the end of its test.

The promises tested here are in ``docs/spec.rst`` ("Schedules").
"""

from __future__ import annotations

import itertools
import time

from tests.kit import (
    pid_alive,
    wait_for,
)

EVERY_SECOND = {"every": "0:0:1"}
NOT_ON_ITS_OWN = {"at": "2099-01-01 00:00"}  # a schedule that only runs when told to


def test_an_every_second_schedule_runs_on_time_and_on_its_grid(site):
    # each run takes 0.3 s: a schedule that drifted would show it in its due times
    site.configure(
        schedules={"tick": {**EVERY_SECOND, "command": ["sh", "-c", "echo tick; sleep 0.3"]}}
    )
    site.start()

    runs = site.wait_runs("tick", 3)

    dues = [r.time("due") for r in runs]
    assert dues == sorted(set(dues))
    for r in runs:
        assert (r.trigger, r.outcome, r.output) == ("time", "ok", {"stdout": "tick\n"}), r
        assert r.time("due") == int(r.time("due")), r  # on the whole second
        assert r.time("due") <= r.time("start") < r.time("due") + 1.5, r


def test_a_failing_run_is_recorded_and_the_schedule_goes_on(site):
    fail = "echo 'no database' >&2; exit 3"
    site.configure(schedules={"broken": {**EVERY_SECOND, "command": ["sh", "-c", fail]}})
    daemon = site.start()

    runs = site.wait_runs("broken", 3)

    for r in runs:
        assert (r.outcome, r.attrs["exit-status"], r.message) == ("failed", "3", "exit 3"), r
        assert r.output == {"stderr": "no database\n"}
    assert daemon.running()


def test_a_run_that_outlasts_its_interval_never_overlaps_and_skipped_ticks_are_recorded(site):
    trace = site.dir / "trace"
    slow = f"echo start >> {trace}; sleep 2.2; echo end >> {trace}"
    site.configure(schedules={"slow": {**EVERY_SECOND, "command": ["sh", "-c", slow]}})
    site.start()

    site.wait_runs("slow", 2, lambda r: r.outcome == "ok")

    runs = site.runs("slow")
    done = [(r.time("start"), r.time("end")) for r in runs if r.outcome == "ok"]
    skipped = [r for r in runs if r.outcome == "skipped"]
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(done))
    lines = trace.read_text().split()
    assert lines[0] == "start" and all(a != b for a, b in itertools.pairwise(lines)), lines
    assert len(skipped) >= 2, runs
    for r in skipped:
        assert (r.trigger, r.message) == ("time", "the previous run was still going"), r
        # it was due while a run was going
        assert any(start <= r.time("due") <= end for start, end in done), r


def test_disable_and_enable_take_effect_live_and_survive_a_restart(site):
    site.configure(schedules={"tick": {**EVERY_SECOND, "command": ["true"]}})
    daemon = site.start()
    site.wait_runs("tick", 1)

    site.ok("schedule", "disable", "tick")
    time.sleep(2)  # the daemon follows within a second (a run already going may still end)
    count = len(site.runs("tick"))
    time.sleep(2.5)
    assert len(site.runs("tick")) == count, "a disabled schedule went on running"
    assert "disabled" in site.fails(2, "schedule", "run", "tick")

    assert daemon.stop() == 0
    daemon = site.start()
    time.sleep(2.5)
    assert len(site.runs("tick")) == count, "disabled, but it ran after the restart"

    site.ok("schedule", "enable", "tick")
    site.wait_runs("tick", count + 1)
    # the ticks it was disabled for are not made up
    assert site.runs("tick")[count].trigger == "time"

    assert daemon.stop() == 0
    restarted = time.time()
    site.start()
    site.wait_runs("tick", 2, lambda r: r.time("start") > restarted)


def test_rename_and_chown_take_effect_live_and_survive_a_restart(site):
    site.configure(schedules={"who": {**EVERY_SECOND, "command": ["id", "-un"]}})
    daemon = site.start()
    [before] = site.wait_runs("who", 1)[:1]
    assert (before.name, before.output) == ("who", {"stdout": "root\n"})

    site.ok("schedule", "rename", "who", "Who am I")
    site.ok("schedule", "chown", "who", "nobody")
    changed = time.time()

    later = site.wait_runs("who", 2, lambda r: r.time("start") > changed + 1.5)
    for r in later:
        assert (r.name, r.output) == ("Who am I", {"stdout": "nobody\n"}), r

    assert daemon.stop() == 0
    restarted = time.time()
    site.start()
    after = site.wait_runs("who", 2, lambda r: r.time("start") > restarted)
    for r in after:
        assert (r.name, r.output) == ("Who am I", {"stdout": "nobody\n"}), r


def test_set_changes_the_timing_of_the_running_daemon(site):
    site.configure(schedules={"tick": {**NOT_ON_ITS_OWN, "command": ["true"]}})
    site.start()
    time.sleep(1.5)
    assert site.runs("tick") == []

    site.ok("schedule", "set", "tick", 'every="0:0:1"')

    runs = site.wait_runs("tick", 2)
    assert all(r.trigger == "time" and r.time("due") == int(r.time("due")) for r in runs)


def test_run_by_hand_with_the_daemon_up_and_75_while_the_daemon_is_running_it(site):
    running, release = site.dir / "running", site.dir / "release"
    busy = f"touch {running}; while [ ! -e {release} ]; do sleep 0.02; done; rm {running}"
    site.configure(
        schedules={
            "busy": {**EVERY_SECOND, "command": ["sh", "-c", busy]},
            "report": {**NOT_ON_ITS_OWN, "command": ["echo", "by hand"]},
        }
    )
    site.start()

    assert site.ok("schedule", "run", "report") == "report: ok\n"
    [run] = site.runs("report")
    assert (run.trigger, run.output) == ("manual", {"stdout": "by hand\n"})

    try:
        site.wait_for(running.exists, "the daemon to run busy")
        assert "running now" in site.fails(75, "schedule", "run", "busy")
    finally:
        release.touch()  # the daemon's run ends
    site.wait_runs("busy", 1, lambda r: r.outcome == "ok")
    runs = site.runs("busy")
    assert {r.trigger for r in runs if r.outcome == "ok"} == {"time"}
    # the refused attempt is recorded, as skipped: it never ran alongside the daemon's
    assert [r.outcome for r in runs if r.trigger == "manual"] == ["skipped"]


def test_a_python_handler_beside_the_configuration_runs_in_the_daemon(site):
    (site.dir / "sched_daemon_hooks.py").write_text(
        "import pathlib\n"
        "def stamp(ctx):\n"
        "    pathlib.Path(ctx.spool, '..', 'stamped').write_text(ctx.schedule)\n"
    )
    site.configure(schedules={"stamp": {**EVERY_SECOND, "handler": "sched_daemon_hooks:stamp"}})
    site.start()
    [run] = site.wait_runs("stamp", 1)[:1]
    assert run.outcome == "ok", run
    assert (site.dir / "stamped").read_text() == "stamp"


def test_a_run_missed_while_down_is_made_up_once_at_restart_or_not_with_skip(site):
    site.configure(
        schedules={
            "made-up": {"every": "0:0:3", "command": ["true"]},
            "not-made-up": {"every": "0:0:3", "catchup": "skip", "command": ["true"]},
        }
    )
    daemon = site.start()
    site.wait_runs("made-up", 1)
    site.wait_runs("not-made-up", 1)
    assert daemon.stop() == 0
    stopped = time.time()

    time.sleep(7)  # two or three ticks missed
    launched = time.time()
    site.start()
    # back on the grid afterwards: wait for the first tick after the restart
    site.wait_runs("made-up", 1, lambda r: r.trigger == "time" and r.time("start") > launched)
    site.wait_runs("not-made-up", 1, lambda r: r.time("start") > launched)

    made_up = [r for r in site.runs("made-up") if r.time("start") > stopped]
    assert [r.trigger for r in made_up][:2] == ["catch-up", "time"], made_up
    assert [r.trigger for r in made_up].count("catch-up") == 1, made_up
    assert launched <= made_up[0].time("start") < launched + 5
    assert made_up[0].outcome == "ok"
    assert "catch-up" not in [r.trigger for r in site.runs("not-made-up")]


def test_stopping_the_daemon_ends_a_scheduled_run_after_the_grace(site):
    pid_file = site.dir / "long.pid"
    site.pids.append(pid_file)  # killed at the end of the test, whatever happens
    long = f"echo $$ > {pid_file}; exec sleep 60"
    site.configure(schedules={"long": {**EVERY_SECOND, "command": ["sh", "-c", long]}}, grace="1s")
    daemon = site.start()
    pid = site.wait_for(lambda: pid_file.exists() and int(pid_file.read_text() or 0), "a run")

    assert daemon.stop() == 0
    wait_for(lambda: not pid_alive(pid), "the run to be ended", timeout=5)
    assert [r.outcome for r in site.runs("long") if r.outcome != "skipped"] == ["failed"]


def test_many_schedules_every_second_leave_a_result_for_every_tick_and_log_each(site):
    ids = [f"tick-{i:02d}" for i in range(30)]
    disk = {"template": "disk-space", "with": {"min_free": "1B"}}
    site.configure(schedules={sid: {**EVERY_SECOND, **disk} for sid in ids}, schedule_concurrency=2)
    daemon = site.start()
    for sid in ids:
        site.wait_runs(sid, 3)
    assert daemon.stop() == 0

    ran = [line["schedule"] for line in daemon.lines() if line.get("event") == "schedule ran"]
    for sid in ids:
        runs = site.runs(sid)
        dues = [r.time("due") for r in runs]
        # every tick from the first to the last left a result: none vanished in a full pool
        assert dues == [dues[0] + n for n in range(len(dues))], runs
        assert all(r.outcome in ("ok", "skipped") for r in runs), runs
        # what the daemon reported is what is on disk, and the last tick it fired ran
        assert ran.count(sid) == sum(r.outcome == "ok" for r in runs), runs
        last = float((site.root / "state" / "schedules" / sid / "last").read_text())
        assert last == dues[-1], (last, runs)
