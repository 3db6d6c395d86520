"""Running a schedule, its results, and the ``jobspool schedule`` commands.

Runs are made with :func:`jobspool.schedules.execute` on a real spool, or
with the real ``jobspool schedule ...`` command as a subprocess; either way
the test reads the XML result under ``state/schedules/ID/runs/``, checked
against ``result.xsd`` first. No daemon runs here (see
``test_schedule_daemon.py``).

The promises tested here are in ``docs/spec.rst`` ("Schedules").
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from jobspool.handlers import Outcome
from jobspool.schedules import Context, Result, execute, read_result, validate
from tests.kit import (
    Site,
    pid_alive,
    wait_for,
)

QUICK = {"every": "1:00:00", "command": ["true"]}


def configured(site: Site, **daemon: Any) -> Site:
    """The site with a few schedules of every kind, and its spool."""
    site.configure(
        schedules={
            "hello": {"every": "1:00:00", "command": ["sh", "-c", "echo hello; id -un"]},
            "broken": {"cron": "0 4 * * *", "command": ["sh", "-c", "echo oops >&2; exit 3"]},
            "purge-old": {
                "cron": "30 2 * * *",
                "timezone": "Europe/Berlin",
                "template": "purge",
                "with": {"older_than": "30d"},
            },
        },
        **daemon,
    )
    site.ok("init")
    return site


def as_json(site: Site, *args: str) -> Any:
    return json.loads(site.ok(*args, "--json"))


# --- a run and its result --------------------------------------------------------------


def test_a_command_run_leaves_a_valid_result_with_its_output(site):
    configured(site)
    store = site.store()
    s = store.get("hello")
    result = execute(store, s, "manual")

    assert (result.outcome, result.run.exit_status) == ("ok", 0)
    [path] = list((site.root / "state/schedules/hello/runs").iterdir())
    assert path.name == f"{int(result.start * 1e9)}.xml"  # START in ns: names sort by time
    [run] = site.runs("hello")
    assert run.attrs["schedule"] == "hello"
    assert (run.trigger, run.outcome, run.attrs["exit-status"]) == ("manual", "ok", "0")
    assert "due" not in run.attrs  # a manual run was due at no tick
    assert run.output == {"stdout": "hello\n" + pwd.getpwuid(os.geteuid()).pw_name + "\n"}
    assert run.time("start") <= run.time("end")


def test_a_command_sees_its_schedule_and_spool_in_the_environment(site):
    site.configure(
        schedules={
            "env": {**QUICK, "command": ["sh", "-c", "echo $JOBSPOOL_SCHEDULE $JOBSPOOL_SPOOL"]}
        }
    )
    store = site.store()
    execute(store, store.get("env"), "manual")
    assert site.runs("env")[0].output["stdout"] == f"env {site.root}\n"


def test_a_failing_command_is_recorded_with_its_exit_status_and_stderr(site):
    configured(site)
    store = site.store()
    result = execute(store, store.get("broken"), "manual")

    assert result.outcome == "failed"
    [run] = site.runs("broken")
    assert (run.outcome, run.attrs["exit-status"], run.message) == ("failed", "3", "exit 3")
    assert run.output == {"stderr": "oops\n"}


def test_a_timeout_kills_the_whole_process_group(site):
    pid_file = site.dir / "grandchild.pid"
    site.pids.append(pid_file)
    script = f"sleep 60 & echo $! > {pid_file}; echo started; wait"
    site.configure(schedules={"stuck": {**QUICK, "timeout": "1s", "command": ["sh", "-c", script]}})
    store = site.store()
    execute(store, store.get("stuck"), "manual")

    [run] = site.runs("stuck")
    assert run.outcome == "failed"
    assert run.attrs["timed-out"] == "true"
    assert run.message == "timed out after 1s"
    assert run.output == {"stdout": "started\n"}  # what it said before is kept
    grandchild = int(pid_file.read_text())
    wait_for(lambda: not pid_alive(grandchild), "the background sleep to be killed too", 5)


def test_output_beyond_the_limit_is_cut_and_says_how_much(site):
    site.configure(
        schedules={
            "chatty": {**QUICK, "command": ["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"]}
        },
        output_limit="1KB",
    )
    store = site.store()
    execute(store, store.get("chatty"), "manual")
    [run] = site.runs("chatty")
    assert run.outcome == "ok"
    # the first and the last 500 bytes are kept, and how much was dropped between them
    assert run.output["stdout"] == "x" * 500 + "\n[... 99000 bytes dropped ...]\n" + "x" * 500
    assert run.truncated["stdout"] == 99000


def test_a_python_handler_is_called_with_a_context(site, monkeypatch):
    (site.dir / "sched_hooks_ctx.py").write_text(
        "import json, os\n"
        "def report(ctx):\n"
        "    with open(os.path.join(str(ctx.spool), '..', 'seen.json'), 'w') as f:\n"
        "        json.dump([type(ctx).__name__, ctx.schedule, str(ctx.spool),"
        " dict(ctx.settings)], f)\n"
    )
    monkeypatch.syspath_prepend(str(site.dir))
    site.configure(
        schedules={
            "hook": {"every": "1:00:00", "handler": "sched_hooks_ctx:report", "with": {"keep": 3}}
        }
    )
    store = site.store()
    assert execute(store, store.get("hook"), "manual").outcome == "ok"

    seen = json.loads((site.dir / "seen.json").read_text())
    assert seen == [Context.__name__, "hook", str(site.root), {"keep": 3}]
    assert site.runs("hook")[0].outcome == "ok"


def test_a_handler_that_raises_is_recorded_failed_with_its_traceback(site, monkeypatch):
    (site.dir / "sched_hooks_fail.py").write_text(
        "def boom(ctx):\n    raise RuntimeError('disk on fire')\n"
    )
    monkeypatch.syspath_prepend(str(site.dir))
    site.configure(schedules={"hook": {"every": "1:00:00", "handler": "sched_hooks_fail:boom"}})
    store = site.store()
    execute(store, store.get("hook"), "time", due=1_800_000_000.0)

    [run] = site.runs("hook")
    assert (run.outcome, run.message) == ("failed", "RuntimeError: disk on fire")
    assert run.traceback is not None and "raise RuntimeError('disk on fire')" in run.traceback
    assert run.attrs["due"] == "2027-01-15T08:00:00.000+00:00"


def test_history_keeps_the_newest_n_results(site):
    site.configure(schedules={"tick": QUICK}, history=3)
    store = site.store()
    starts = [execute(store, store.get("tick"), "manual").start for _ in range(5)]

    kept = [run.time("start") for run in site.runs("tick")]
    assert kept == pytest.approx(starts[2:], abs=0.001)


def test_a_staged_result_appears_only_when_placed_and_after_the_newest(site):
    # The daemon's group commit: staged (unsynced, in tmp/), synced, then placed.
    site.configure(schedules={"tick": QUICK}, history=2)
    store = site.store()
    s = store.get("tick")
    first = execute(store, s, "manual")  # recorded durably, as by hand
    hour_ago = first.start - 3600
    late = Result("tick", "time", "ok", Outcome("done", hour_ago, hour_ago), due=first.start)

    staged = store.stage(s, late)
    assert [r.time("start") for r in site.runs("tick")] == [pytest.approx(first.start, abs=0.001)]
    stems = store.result_stems("tick")
    path = store.place(staged, stems)

    # a start before the newest (the clock went back): named after it, so kept longest
    runs = site.runs("tick")
    assert [r.path for r in runs][-1] == path
    assert runs[-1].time("start") == pytest.approx(late.start, abs=0.001)
    assert not os.path.exists(staged.staging)
    assert stems == store.result_stems("tick")  # the list knows the new one

    newer = store.place(
        store.stage(s, late._replace(run=late.run._replace(started=first.start + 1))), stems
    )
    store.prune("tick", stems)
    assert [r.path for r in site.runs("tick")] == [path, newer]  # the newest 2 kept


def test_the_last_tick_is_overwritten_in_place_and_reads_back(site):
    site.configure(schedules={"tick": QUICK})
    store = site.store()
    assert store.last_tick("tick") is None
    store.record_tick("tick", 1_800_000_000.123456)
    assert store.last_tick("tick") == 1_800_000_000.123456
    store.record_tick("tick", 5.5)  # shorter: nothing of the longer one may remain
    assert store.last_tick("tick") == 5.5
    # a file as earlier versions wrote it is overwritten just as well
    (store.folder("tick") / "last").write_text("1800000000.0\n")
    store.record_tick("tick", 1_800_000_001.25)
    assert store.last_tick("tick") == 1_800_000_001.25


def test_validate_returns_the_problems_of_a_result():
    good = (
        b'<run xmlns="urn:jobspool:run:1" schedule="x" name="x" trigger="time" outcome="ok" '
        b'start="2026-01-01T00:00:00Z" end="2026-01-01T00:00:01Z"/>'
    )
    assert validate(good) == []
    problems = validate(good.replace(b'outcome="ok"', b'outcome="great"'))
    assert len(problems) == 1 and "outcome" in problems[0]
    assert validate(good.replace(b' trigger="time"', b"")) != []


def test_read_result_gives_the_attributes_and_the_message(site):
    configured(site)
    store = site.store()
    execute(store, store.get("broken"), "manual")
    info = read_result(store.results("broken")[0])
    assert {k: info[k] for k in ("schedule", "trigger", "outcome", "exit-status", "message")} == {
        "schedule": "broken",
        "trigger": "manual",
        "outcome": "failed",
        "exit-status": "3",
        "message": "exit 3",
    }


def test_a_run_while_one_is_going_is_skipped_not_overlapped(site):
    configured(site)
    store = site.store()
    with store.run_lock("hello") as mine:
        assert mine
        result = execute(store, store.get("hello"), "manual")
    assert (result.outcome, result.message) == ("skipped", "the previous run was still going")
    assert [r.outcome for r in site.runs("hello")] == ["skipped"]


# --- the commands ----------------------------------------------------------------------


def test_list_shows_every_schedule(site):
    configured(site)
    text = site.ok("schedule", "list")
    header = text.splitlines()[0]
    assert header.split() == ["ID", "NAME", "OWNER", "ENABLED", "TIMING", "NEXT", "LAST"]
    rows = {r["id"]: r for r in as_json(site, "schedule", "list")}
    assert list(rows) == ["hello", "broken", "purge-old"]
    assert rows["purge-old"]["timing"] == "cron: 30 2 * * *"
    assert rows["purge-old"]["enabled"] is True
    assert rows["hello"]["last"] is None
    assert as_json(site, "schedule", "show", "hello")["last_run"] is None


def test_list_and_show_report_the_newest_run(site):
    configured(site)
    assert site.run("schedule", "run", "broken").returncode == 1

    rows = {r["id"]: r for r in as_json(site, "schedule", "list")}
    assert (rows["broken"]["last"], rows["hello"]["last"]) == ("failed", None)
    assert site.ok("schedule", "list").splitlines()[2].split()[-1] == "failed"
    last = as_json(site, "schedule", "show", "broken")["last_run"]
    assert {k: last[k] for k in ("trigger", "outcome", "exit-status", "message")} == {
        "trigger": "manual",
        "outcome": "failed",
        "exit-status": "3",
        "message": "exit 3",
    }
    assert "last run: schedule=broken name=broken trigger=manual outcome=failed" in site.ok(
        "schedule", "show", "broken"
    )


def test_show_gives_every_property_and_previews_the_next_five_runs(site):
    configured(site)
    info = as_json(site, "schedule", "show", "purge-old")
    expected = {
        "id": "purge-old",
        "name": "purge-old",
        "owner": None,
        "enabled": True,
        "timing": "cron: 30 2 * * *",
        "timezone": "Europe/Berlin",
        "timeout": 300.0,
        "catchup": "once",
        "runs": "template: purge",
        "with": {"older_than": "30d"},
    }
    assert {k: info[k] for k in expected} == expected

    berlin = [datetime.fromisoformat(t).astimezone(ZoneInfo("Europe/Berlin")) for t in info["next"]]
    assert len(berlin) == 5
    assert {t.strftime("%H:%M:%S") for t in berlin} == {"02:30:00"}
    assert len({t.date() for t in berlin}) == 5
    assert info["last_run"] is None

    text = site.ok("schedule", "show", "purge-old")
    assert "timezone: Europe/Berlin" in text
    assert text.split("next:\n")[1].count("\n  ") >= 4


def test_run_by_hand_records_a_manual_run_and_exits_0(site):
    configured(site)
    result = site.run("schedule", "run", "hello")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hello: ok\n", "")
    [run] = site.runs("hello")
    assert (run.trigger, run.outcome) == ("manual", "ok")


def test_run_by_hand_of_a_failing_schedule_exits_1(site):
    configured(site)
    result = site.run("schedule", "run", "broken")
    assert (result.returncode, result.stdout) == (1, "broken: failed: exit 3\n")
    assert [r.outcome for r in site.runs("broken")] == ["failed"]


def test_a_disabled_schedule_is_not_run_by_hand(site):
    configured(site)
    site.ok("schedule", "disable", "hello")
    line = site.fails(2, "schedule", "run", "hello")
    assert "disabled" in line and "jobspool schedule enable hello" in line
    assert site.runs("hello") == []

    site.ok("schedule", "enable", "hello")
    site.ok("schedule", "run", "hello")
    assert len(site.runs("hello")) == 1


def test_run_by_hand_while_it_is_running_exits_75(site):
    started, release = site.dir / "started", site.dir / "release"
    wait = f"touch {started}; while [ ! -e {release} ]; do sleep 0.02; done"
    site.configure(schedules={"slow": {**QUICK, "command": ["sh", "-c", wait]}})
    site.ok("init")
    first = subprocess.Popen(
        site.command("schedule", "run", "slow"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=site.env(),
    )
    try:
        site.wait_for(started.exists, "the first run to start")
        line = site.fails(75, "schedule", "run", "slow")
        assert "running now" in line
    finally:
        release.touch()
        out, _ = first.communicate(timeout=30)
    assert (first.returncode, out) == (0, b"slow: ok\n")
    # the refused attempt is in the history too, as skipped
    assert sorted(r.outcome for r in site.runs("slow")) == ["ok", "skipped"]


def test_enable_and_disable_persist_without_touching_the_configuration(site):
    configured(site)
    before = site.config.read_bytes()
    assert site.ok("schedule", "disable", "hello") == "hello disabled\n"

    settings = site.root / "state/schedules/hello/settings.json"
    assert json.loads(settings.read_text()) == {"enabled": False}
    assert site.config.read_bytes() == before
    rows = {r["id"]: r for r in as_json(site, "schedule", "list")}
    assert (rows["hello"]["enabled"], rows["hello"]["next"]) == (False, "-")
    assert site.ok("schedule", "list").splitlines()[1].split()[3] == "no"

    assert site.ok("schedule", "enable", "hello") == "hello enabled\n"
    assert as_json(site, "schedule", "show", "hello")["enabled"] is True


def test_rename_changes_the_name_not_the_id(site):
    configured(site)
    assert site.ok("schedule", "rename", "hello", "Say hello") == "hello renamed 'Say hello'\n"
    info = as_json(site, "schedule", "show", "hello")
    assert (info["id"], info["name"]) == ("hello", "Say hello")
    site.ok("schedule", "run", "hello")
    assert site.runs("hello")[0].name == "Say hello"


def test_chown_to_an_existing_user_runs_the_command_as_that_user(site):
    assert os.geteuid() == 0, "these tests run as root, as the daemon does in production"
    configured(site)
    assert site.ok("schedule", "chown", "hello", "nobody") == "hello owned by nobody\n"
    assert as_json(site, "schedule", "show", "hello")["owner"] == "nobody"
    line = site.fails(2, "schedule", "chown", "hello", "no-such-user")
    assert "no such user 'no-such-user'" in line
    assert as_json(site, "schedule", "show", "hello")["owner"] == "nobody"

    site.ok("schedule", "run", "hello")
    assert site.runs("hello")[0].output["stdout"] == "hello\nnobody\n"


def test_history_lists_every_run_newest_first(site):
    configured(site)
    site.ok("schedule", "run", "hello")
    site.ok("schedule", "set", "hello", "command=[sh, -c, 'exit 4']")
    assert site.run("schedule", "run", "hello").returncode == 1

    runs = as_json(site, "schedule", "history", "hello")
    assert [(r["outcome"], r.get("exit-status")) for r in runs] == [("failed", "4"), ("ok", "0")]
    text = site.ok("schedule", "history", "hello").splitlines()
    assert text[0].split() == ["START", "TRIGGER", "OUTCOME", "EXIT", "MESSAGE"]
    assert text[1].split()[1:] == ["manual", "failed", "4", "exit", "4"]
    assert text[2].split()[1:] == ["manual", "ok", "0"]


def test_set_changes_properties_and_show_shows_them(site):
    configured(site)
    site.ok("schedule", "set", "hello", "cron=15 4 * * *", "timeout=10m", "timezone=Asia/Tokyo")
    info = as_json(site, "schedule", "show", "hello")
    assert (info["timing"], info["timeout"], info["timezone"]) == (
        "cron: 15 4 * * *",
        600.0,
        "Asia/Tokyo",
    )
    # one timing replaces the other; h:m:s quoted for YAML, as the docs say
    site.ok("schedule", "set", "hello", 'every="0:30:00"')
    assert as_json(site, "schedule", "show", "hello")["timing"] == "every: 0:30:00"

    site.ok("schedule", "set", "purge-old", "with.older_than=7d", "with.states=[bak]")
    assert as_json(site, "schedule", "show", "purge-old")["with"] == {
        "older_than": "7d",
        "states": ["bak"],
    }
    site.ok("schedule", "set", "purge-old", "template=disk-space", "with={min_free: 1GB}")
    info = as_json(site, "schedule", "show", "purge-old")
    assert (info["runs"], info["with"]) == ("template: disk-space", {"min_free": "1GB"})


@pytest.mark.parametrize(
    ("pair", "says"),
    [
        ("cron=61 * * * *", "schedules.broken.cron"),
        ("every=1:00", "schedules.broken.every"),
        ("timezone=Mars/Olympus_Mons", "unknown time zone"),
        ("owner=no-such-user", "no such user"),
        ("enabled=maybe", "schedules.broken.enabled"),
        ("catchup=twice", "once or skip"),
        ("timeout=0", "schedules.broken.timeout"),
        ("colour=blue", "unknown key"),
        ("nonsense", "expected KEY=VALUE"),
    ],
)
def test_set_is_checked_as_strictly_as_the_configuration(site, pair, says):
    configured(site)
    before = as_json(site, "schedule", "show", "broken")
    line = site.fails(2, "schedule", "set", "broken", pair)
    assert says in line
    after = as_json(site, "schedule", "show", "broken")
    assert {**after, "next": None} == {**before, "next": None}
    assert not (site.root / "state/schedules/broken/settings.json").exists()


def test_set_checks_a_templates_settings(site):
    configured(site)
    assert "older_than" in site.fails(2, "schedule", "set", "purge-old", "with.older_than=soon")
    assert "unknown setting" in site.fails(2, "schedule", "set", "purge-old", "with.colour=1")
    assert "unknown template" in site.fails(2, "schedule", "set", "purge-old", "template=nap")


def test_templates_lists_the_built_ins_and_their_settings(site):
    configured(site)
    text = site.ok("schedule", "templates")
    assert "purge: " in text and "stuck-queue: " in text and "disk-space: " in text
    assert "  with.min_free: " in text
    listed = {
        t["template"]: [s["name"] for s in t["settings"]]
        for t in as_json(site, "schedule", "templates")
    }
    assert listed == {
        "purge": ["older_than", "states", "interfaces"],
        "stuck-queue": ["older_than", "interfaces"],
        "disk-space": ["min_free"],
    }


@pytest.mark.parametrize(
    "args",
    [
        ("show", "nope"),
        ("run", "nope"),
        ("enable", "nope"),
        ("disable", "nope"),
        ("rename", "nope", "x"),
        ("chown", "nope", "nobody"),
        ("history", "nope"),
        ("set", "nope", "timeout=1"),
    ],
)
def test_an_unknown_schedule_exits_2(site, args):
    configured(site)
    assert "unknown schedule 'nope'" in site.fails(2, "schedule", *args)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"cron": "0 25 * * *", "command": ["true"]}, "schedules.bad.cron"),
        ({"every": "1:00:00", "cron": "0 3 * * *", "command": ["true"]}, "exactly one of cron:"),
        ({"every": 3600, "command": ["true"]}, "schedules.bad.every"),
        ({"every": "1:00:00"}, "exactly one of command:, handler: or template:"),
        ({"cron": "0 3 * * *", "timezone": "Nowhere/Town", "command": ["true"]}, "time zone"),
        ({**QUICK, "owner": "no-such-user"}, "schedules.bad.owner"),
        ({"every": "1:00:00", "template": "purge"}, "'older_than' is required"),
        ({**QUICK, "catchup": "always"}, "schedules.bad.catchup"),
    ],
)
def test_a_broken_schedule_in_the_configuration_exits_78_naming_the_key(site, entry, says):
    site.configure(schedules={"bad": entry})
    line = site.fails(78, "schedule", "list")
    assert str(site.config) in line and says in line


def test_an_unknown_time_zone_is_refused_whatever_the_timing(site):
    site.configure(schedules={"bad": {**QUICK, "timezone": "Nowhere/Town"}})
    line = site.fails(78, "schedule", "list")
    assert "schedules.bad" in line and "Nowhere/Town" in line


def test_run_by_hand_of_a_handler_beside_the_configuration(site):
    (site.dir / "sched_hooks_cli.py").write_text("def ping(ctx):\n    pass\n")
    site.configure(schedules={"hook": {"every": "1:00:00", "handler": "sched_hooks_cli:ping"}})
    site.ok("init")
    result = site.run("schedule", "run", "hook")
    assert (result.returncode, result.stdout) == (0, "hook: ok\n"), site.runs("hook")
