"""Faults: full disks, read-only spools, unreadable drops, lost events, clocks.

Disks fill up, file systems go read-only, partners upload what the daemon may
not read, inotify drops events, and clocks are stepped. Each test makes one of
these happen for real: a 2 MB tmpfs mounted as the spool and filled to its
last page, that tmpfs remounted read-only, a daemon running as ``nobody``,
``fs.inotify.max_queued_events`` lowered to 64, and the wall clock of the
Scheduler (in-process) or of every jobspool process of a test (a
``sitecustomize`` that shifts ``time.time``) moved by a day. The real clock
is never touched. Every mount, kernel setting and daemon is undone at the
end of its test, whatever happened.

The promises: nothing is lost, nothing half-written becomes visible, the
commands say what is wrong in one line with the contract's exit code, and
the daemon survives and resumes once the fault is gone.

The promises tested here are in ``docs/spec.rst`` ("Jobs", "Commands and exit codes", "Schedules").
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobspool.scheduler import Scheduler
from tests.kit import (
    NOBODY,
    RecordingLog,
    Site,
    T,
    assert_fails,
    change,
    fill,
    free_pages,
    log_events,
    loop,
    order,
    remount,
    scheduler_for,
    snapshot,
    sysctl,
    tmpfs,
)

LEDGER = 'echo "$JOBSPOOL_JOB" >> "$T/ledger"'


def ledger(site: Site) -> list[str]:
    try:
        return (site.dir / "ledger").read_text().split()
    except FileNotFoundError:
        return []


def orders(site: Site, body: str = LEDGER) -> dict[str, Any]:
    """orders_in (a shell handler) and orders_out, both with the order schema."""
    return {
        "orders_in": {"schema": "schemas/order.xsd", "command": [site.script("handler", body)]},
        "orders_out": {"schema": "schemas/order.xsd"},
    }


@pytest.fixture
def small(tmp_path) -> Iterator[Site]:
    """A site whose spool is a 2 MB tmpfs, mounted for the test and unmounted after it."""
    (tmp_path / "site").mkdir()
    site = Site(tmp_path / "site")
    with tmpfs(site.root, "2m"):
        try:
            yield site
        finally:
            site.kill_all()
        site.check_logs()


def hidden_leftovers(site: Site) -> list[str]:
    """Staging files anywhere in the spool (tmp/ and beyond): half-written things."""
    return sorted(str(p.relative_to(site.root)) for p in site.root.rglob(".*"))


# --- a full disk: submit ---------------------------------------------------------------------

BROKEN = order("broken").replace(b"</order>", b"")
OVERSIZED = order("big").replace(b"<sku>", b"<!--" + b"x" * 12_000 + b"--><sku>")


@pytest.mark.parametrize(
    ("data", "free", "code"),
    [
        pytest.param(order("full"), 0, 0, id="valid-no-page-free"),
        pytest.param(order("full"), 1, 0, id="valid-room-for-its-log-only"),
        pytest.param(BROKEN, 0, 65, id="invalid-no-page-free"),
        pytest.param(
            BROKEN,
            1,
            65,
            id="invalid-room-for-its-log-only",
        ),
        pytest.param(
            OVERSIZED,
            2,
            65,
            id="oversized-room-for-its-log-only",
        ),
    ],
)
def test_submit_on_a_full_disk_exits_75_and_leaves_nothing_half_written(small, data, free, code):
    site = small
    site.configure({**orders(site), "orders_in": {**orders(site)["orders_in"], "max_size": "10KB"}})
    site.init()
    site.ok("submit", "orders_out", _file(site, "earlier.xml"))  # the lock file exists now
    filler = fill(site.root, leave_pages=free)
    assert free_pages(site.root) == free
    before = snapshot(site.root)
    job = site.outside / "full.xml"
    job.write_bytes(data)

    result = site.run("submit", "orders_in", str(job))

    line = assert_fails(result, 75)
    assert "No space left on device" in line
    assert "free some space" in line
    assert snapshot(site.root) == before  # no job, no log, no pending log, nothing in tmp/
    assert hidden_leftovers(site) == []

    # Once there is room again, the same submit works: nothing was left to block the name.
    filler.unlink()
    assert site.run("submit", "orders_in", str(job)).returncode == code
    assert site.where("full.xml") == (["queue/orders_in"] if code == 0 else ["joberrors"])


def _file(site: Site, name: str, data: bytes | None = None) -> str:
    path = site.outside / name
    path.write_bytes(order(name) if data is None else data)
    return str(path)


# --- a full disk: the daemon -----------------------------------------------------------------


def test_the_daemon_survives_a_full_disk_and_loses_no_drop(small):
    site = small
    site.configure(orders(site))
    site.init()
    daemon = site.start()
    valid = [f"in-{i:02d}.xml" for i in range(12)]
    broken = [f"bad-{i}.xml" for i in range(4)]
    outbound = [f"out-{i}.xml" for i in range(4)]
    drops = [("orders_in", n, order(n)) for n in valid]
    drops += [("orders_in", n, BROKEN) for n in broken]
    drops += [("orders_out", n, order(n)) for n in outbound]
    # The uploads are written while there is room, under names of uploads in
    # progress; the disk fills; then they are renamed into place (which needs no room).
    for iface, name, data in drops:
        (site.root / "incoming" / iface / f".{name}.upload").write_bytes(data)
    filler = fill(site.root)
    for iface, name, _ in drops:
        folder = site.root / "incoming" / iface
        os.rename(folder / f".{name}.upload", folder / name)

    site.wait_for(
        lambda: [line for line in daemon.lines() if line.get("level") == "error"],
        "the daemon to meet the full disk",
    )
    time.sleep(2.5)  # a rescan and several retries on the full disk
    assert daemon.running(), site.describe()
    places = site.places()
    for _, name, _ in drops:  # nothing lost, nothing in two places, nothing finished
        assert len(places.get(name, [])) == 1, (name, places.get(name))
    assert site.ls("bak", "orders_in") == []
    assert site.ls("joberrors") == []

    filler.unlink()  # room again

    site.wait_for(
        lambda: (
            site.ls("bak", "orders_in") == sorted(valid)
            and site.ls("joberrors") == sorted(broken)
            and site.ls("queue", "orders_out") == sorted(outbound)
        ),
        "every job done once there is room",
        timeout=30,
    )
    assert site.ls("incoming", "orders_in") == site.ls("incoming", "orders_out") == []
    assert sorted(site.places()) == sorted(n for _, n, _ in drops)
    assert set(ledger(site)) == set(valid)  # each ran at least once; none of the broken
    for name in valid:
        assert (site.root / "bak/orders_in" / name).read_bytes() == order(name)
    for name in broken:
        assert (site.root / "joberrors" / name).read_bytes() == BROKEN
    site.wait_for(lambda: hidden_leftovers(site) == [], "tmp/ empty")
    assert daemon.running()
    assert site.check_logs() == len(valid) + len(broken)


def test_a_job_that_met_a_full_disk_runs_once_and_its_log_tells_the_whole_story(small):
    site = small
    # The handler waits for $T/go, so that the disk fills while it runs.
    site.configure(orders(site, 'while [ ! -e "$T/go" ]; do sleep 0.02; done\n' + LEDGER))
    site.init()
    daemon = site.start()
    site.drop("orders_in", "story.xml")
    site.wait_for(lambda: site.where("story.xml") == ["queue/orders_in"], "story.xml queued")
    filler = fill(site.root)
    (site.dir / "go").touch()
    site.wait_for(
        lambda: ledger(site) and daemon.said("cannot commit finished jobs; they wait"),
        "the run, and its commit failing on the full disk",
    )
    time.sleep(1.5)  # retries of the commit, never of the handler
    assert ledger(site) == ["story.xml"]
    assert site.where("story.xml") == ["queue/orders_in"]
    filler.unlink()
    site.wait_in("story.xml", "bak/orders_in")
    assert len(ledger(site)) == 1  # the handler ran once: its outcome was kept
    log = site.log("story.xml", "orders_in")
    received = log_events(log, "received")
    assert [r.get("via") for r in received] == ["drop"]
    assert len(log_events(log, "checked")) == 1
    assert len(log_events(log, "ran")) == 1
    assert daemon.running()


# --- a read-only spool --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def read_only(tmp_path_factory) -> Iterator[Site]:
    """A spool on a tmpfs remounted read-only, with a job in each place and a paused interface."""
    base = tmp_path_factory.mktemp("ro")
    (base / "site").mkdir()
    site = Site(base / "site")
    with tmpfs(site.root, "2m"):
        site.configure(orders(site))
        site.init()
        site.ok("submit", "orders_out", _file(site, "queued.xml"))
        assert site.run("submit", "orders_in", _file(site, "broken.xml", BROKEN)).returncode == 65
        site.ok("submit", "orders_out", _file(site, "fetched.xml"))
        (site.outside / "outbox").mkdir()
        site.ok("fetch", "orders_out", "--to", str(site.outside / "outbox"), "fetched.xml")
        (site.outside / "outbox" / "fetched.xml").unlink()
        site.ok("pause", "orders_out")
        remount(site.root, "ro")
        try:
            yield site
        finally:
            site.kill_all()
            remount(site.root, "rw")


WRITES = {
    "submit": lambda s: ["submit", "orders_in", _file(s, "new.xml")],
    "submit-invalid": lambda s: ["submit", "orders_in", _file(s, "new-bad.xml", BROKEN)],
    "retry": lambda s: ["retry", "broken.xml"],
    "pause": lambda s: ["pause", "orders_in"],
    "resume": lambda s: ["resume", "orders_out"],
    "fetch": lambda s: ["fetch", "orders_out", "--to", str(s.outside / "outbox")],
}


@pytest.mark.parametrize("command", list(WRITES))
def test_a_write_command_on_a_read_only_spool_exits_77(read_only, command):
    site = read_only
    argv = WRITES[command](site)
    before = snapshot(site.root)
    line = assert_fails(site.run(*argv), 77)
    assert "Read-only file system" in line
    assert snapshot(site.root) == before
    assert os.listdir(site.outside / "outbox") == []


READS = {
    ("status", "queued.xml", "broken.xml", "fetched.xml"): (
        "queued.xml queue/orders_out\nbroken.xml joberrors\nfetched.xml bak/orders_out\n"
    ),
    ("queue", "orders_out"): "queued.xml\n",
    ("check", "orders_in", "@broken.xml"): None,
    ("log", "fetched.xml"): None,
    ("interfaces", "--json"): None,
    ("init",): None,
}


@pytest.mark.parametrize("argv", list(READS), ids=lambda a: a[0])
def test_a_read_command_on_a_read_only_spool_works(read_only, argv):
    site = read_only
    args = [str(site.outside / a[1:]) if a.startswith("@") else a for a in argv]
    result = site.run(*args)
    expected_code = 65 if argv[0] == "check" else 0
    assert result.returncode == expected_code, result.stderr
    if READS[argv] is not None:
        assert result.stdout == READS[argv]
    if argv[0] == "log":
        assert "fetched to" in result.stdout
    if argv[0] == "interfaces":
        assert '"paused": true' in result.stdout


def test_the_daemon_on_a_read_only_spool_exits_77_in_one_line(read_only):
    result = read_only.run("daemon", timeout=30)
    line = assert_fails(result, 77)
    assert "Read-only file system" in line


# --- a dropped file the daemon may not read -----------------------------------------------------


def test_an_unreadable_drop_is_taken_once_it_becomes_readable(nobody_site):
    # tests/test_daemon.py shows it is reported and left in place; here the
    # partner fixes its mode, and a later rescan takes it, all of it.
    s = nobody_site
    s.configure(orders(s))
    s.init()
    for path in [s.dir, *s.dir.rglob("*")]:
        os.lchown(path, NOBODY, NOBODY)
    incoming = s.root / "incoming/orders_in"
    hidden = incoming / ".late.xml.upload"
    hidden.write_bytes(order("late"))
    os.chown(hidden, 4242, 4242)  # another owner, not even in the daemon's group
    os.chmod(hidden, 0o000)
    os.rename(hidden, incoming / "late.xml")

    daemon = s.start(user=NOBODY)
    s.wait_for(
        lambda: daemon.said("cannot take dropped file; left in place", job="late.xml"), "the report"
    )
    assert s.where("late.xml") == ["incoming/orders_in"]
    os.chmod(incoming / "late.xml", 0o644)  # the partner fixes it
    s.wait_in("late.xml", "bak/orders_in", timeout=10)  # a rescan (2 s) takes it
    assert (s.root / "bak/orders_in/late.xml").read_bytes() == order("late")
    assert ledger(s) == ["late.xml"]
    assert len(daemon.said("cannot take dropped file; left in place", job="late.xml")) == 1
    assert daemon.stop() == 0


# --- inotify loses events -----------------------------------------------------------------------

NOOP = """
import os


def handle(job):
    with open(os.path.join(os.environ["T"], "ledger"), "a") as f:
        f.write(job.name + "\\n")
"""


def test_an_inotify_queue_overflow_loses_no_drop(site):
    site.module("ledger_handler", NOOP)
    site.configure(
        {"orders_in": {"schema": "schemas/order.xsd", "handler": "ledger_handler:handle"}}
    )
    site.init()
    # The queue size is read when an inotify instance is made: the daemon's
    # watcher gets 64 events; the setting is put back as soon as it runs.
    with sysctl("fs.inotify.max_queued_events", "64"):
        daemon = site.start()
    incoming = site.root / "incoming/orders_in"
    names = [f"burst-{i:04d}.xml" for i in range(3000)]
    for name in names:
        (incoming / f".{name}.upload").write_bytes(order(name))
    for name in names:  # all at once: far more events than the queue holds
        os.rename(incoming / f".{name}.upload", incoming / name)

    site.wait_for(
        lambda: len(site.ls("bak", "orders_in")) == len(names), "every drop in bak", timeout=120
    )
    assert "inotify queue overflow" in daemon.text(), "the queue did not overflow"
    assert site.ls("incoming", "orders_in") == []
    assert site.ls("queue", "orders_in") == []
    assert site.ls("joberrors") == []
    assert sorted(ledger(site)) == sorted(names)  # each exactly once
    assert daemon.running()


# --- the wall clock jumps: the Scheduler, in-process --------------------------------------------


def test_a_cron_schedule_and_a_clock_a_day_ahead_runs_once_then_keeps_its_times(site):
    sch, _ = scheduler_for(
        site, five={"cron": "*/5 * * * *", "timezone": "UTC", "command": ["true"]}
    )
    assert loop(sch, T + 1) == T + 300
    assert loop(sch, T + 86_400 + 10) == T + 86_400 + 300  # 288 ticks jumped over: one run
    assert [r.time("due") for r in site.runs("five")] == [T + 300]
    loop(sch, T + 86_400 + 300)
    assert len(site.runs("five")) == 2


def test_a_cron_schedule_and_a_clock_set_back_a_day_neither_fires_nor_waits_a_day(site):
    sch, log = scheduler_for(
        site, five={"cron": "*/5 * * * *", "timezone": "UTC", "command": ["true"]}
    )
    loop(sch, T + 1)
    assert loop(sch, T + 300) == T + 600
    back = T + 300 - 86_400 + 10
    assert loop(sch, back) == T + 600 - 86_400  # the next tick of the new time, not T + 600
    assert len(site.runs("five")) == 1
    assert any("clock went back" in event for _, event, _ in log.lines)
    loop(sch, T + 600 - 86_400)
    assert len(site.runs("five")) == 2


def test_a_clock_wobbling_back_less_than_a_second_gives_no_second_run(site):
    # NTP slews, but a small step back must not repeat the tick just run.
    sch, log = scheduler_for(site, tick={"every": "0:0:10", "command": ["true"]})
    loop(sch, T + 1)
    loop(sch, T + 10)
    assert loop(sch, T + 9.4) == T + 20
    assert loop(sch, T + 10) == T + 20
    assert len(site.runs("tick")) == 1
    assert not any("clock went back" in event for _, event, _ in log.lines)


def test_a_restart_after_the_clock_went_back_neither_makes_up_nor_waits(site):
    sch, _ = scheduler_for(site, tick={"every": "0:0:10", "catchup": "once", "command": ["true"]})
    loop(sch, T + 1)
    loop(sch, T + 10)  # ran; its tick is remembered; the daemon stops
    restarted = Scheduler(site.store(), RecordingLog())
    # The clock was an hour ahead and has been corrected while the daemon was down.
    assert loop(restarted, T - 3600 + 5) == T - 3600 + 10
    assert [r.trigger for r in site.runs("tick")] == ["time"]
    loop(restarted, T - 3600 + 10)
    assert len(site.runs("tick")) == 2


def test_a_disabled_schedule_stays_quiet_through_clock_jumps(site):
    sch, _ = scheduler_for(site, tick={"every": "0:0:10", "command": ["true"]})
    loop(sch, T + 1)
    change(sch, "tick", enabled=False)
    for now in (T + 86_400, T - 86_400, T + 10, T + 3 * 86_400):
        loop(sch, now)
    assert site.runs("tick") == []


def test_results_of_runs_after_the_clock_went_back_are_kept(site, monkeypatch):
    now = [T]
    monkeypatch.setattr(time, "time", lambda: now[0])  # what the runs record as their start
    site.configure(schedules={"tick": {"every": "0:0:10", "command": ["true"]}}, history=3)
    sch = Scheduler(site.store(), RecordingLog())
    for t in (T + 1, T + 10, T + 20, T + 30, T + 40):
        now[0] = t
        loop(sch, t)
    assert len(site.runs("tick")) == 3
    for t in (T - 86_400 + 1, T - 86_400 + 10):  # the clock was a day fast; now it is right
        now[0] = t
        loop(sch, t)
    # `jobspool schedule history` lists the newest first; the last run must be there.
    dues = [r.time("due") for r in site.runs("tick")]
    assert T - 86_400 + 10 in dues, [d - T for d in dues]


# --- the wall clock jumps: the real daemon ------------------------------------------------------

# Loaded by every jobspool process of a test through PYTHONPATH: time.time()
# and time.time_ns() run the number of seconds in $JOBSPOOL_TEST_CLOCK ahead
# (or behind). The kernel's clock, and file times, are untouched.
CLOCK_SHIM = """
import os
import time as _time

_path = os.environ.get("JOBSPOOL_TEST_CLOCK")
if _path:
    _real, _real_ns, _mono = _time.time, _time.time_ns, _time.monotonic
    _state = [0.0, -1.0]  # offset, when it was read (monotonic)

    def _offset():
        if _mono() - _state[1] > 0.02:
            try:
                with open(_path) as f:
                    _state[0] = float(f.read() or 0)
            except (OSError, ValueError):
                pass
            _state[1] = _mono()
        return _state[0]

    _time.time = lambda: _real() + _offset()
    _time.time_ns = lambda: _real_ns() + int(_offset() * 1e9)
"""


class ShiftedSite(Site):
    """A daemon site whose jobspool processes all read the same shifted wall clock."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.shim = directory / "clock-shim"
        self.shim.mkdir()
        (self.shim / "sitecustomize.py").write_text(CLOCK_SHIM)
        self.clock = directory / "clock-offset"
        self.shift(0)

    def shift(self, seconds: float) -> None:
        tmp = self.clock.with_suffix(".new")
        tmp.write_text(f"{seconds}\n")
        os.replace(tmp, self.clock)
        time.sleep(0.1)  # every process has read it

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.shim), env.get("PYTHONPATH")]))
        env["JOBSPOOL_TEST_CLOCK"] = str(self.clock)
        return env


def test_the_daemon_keeps_its_schedules_and_its_queue_order_through_clock_jumps(tmp_path):
    (tmp_path / "site").mkdir()
    site = ShiftedSite(tmp_path / "site")
    ticks = site.dir / "ticks"
    site.configure(
        orders(site),
        schedules={"tick": {"every": "0:0:1", "command": ["sh", "-c", f'echo tick >> "{ticks}"']}},
    )
    site.init()
    try:
        daemon = site.start()
        site.ok("pause", "orders_in")

        def count() -> int:
            return len(ticks.read_text().split()) if ticks.exists() else 0

        def accept(*names: str) -> None:
            submitted, dropped = names
            site.ok("submit", "orders_in", _file(site, submitted))
            site.drop("orders_in", dropped)
            site.wait_for(lambda: dropped in site.ls("queue", "orders_in"), f"{dropped} queued")

        site.wait_for(lambda: count() >= 2, "the schedule to tick")
        accept("a.xml", "b.xml")

        before = count()
        site.shift(86_400)  # a day ahead: 86,400 ticks jumped over
        time.sleep(2.5)
        assert 1 <= count() - before <= 5, count() - before
        accept("c.xml", "d.xml")

        site.shift(-86_400)  # and back, a day behind the real clock
        back = count()
        site.wait_for(
            lambda: count() >= back + 2, "the schedule to go on, not to wait two days", timeout=6
        )
        accept("e.xml", "f.xml")
        assert daemon.said("the clock went back; computing next runs anew")

        order_ = ["a.xml", "b.xml", "c.xml", "d.xml", "e.xml", "f.xml"]
        assert site.ok("queue", "orders_in").split() == order_  # acceptance order kept
        site.ok("resume", "orders_in")
        site.wait_for(lambda: site.ls("bak", "orders_in") == order_, "all handled")
        assert ledger(site) == order_
        assert daemon.running()
        history = site.ok("schedule", "history", "tick", "--json")
        assert '"ok"' in history
    finally:
        site.kill_all()
    site.check_logs()


def test_a_drop_written_in_place_with_a_future_mtime_is_taken_once_closed(site):
    site.configure(orders(site))
    site.init()
    daemon = site.start()
    path = site.root / "incoming/orders_in/from-the-future.xml"
    path.write_bytes(order("future"))  # written in place and closed
    ahead = time.time() + 3600
    os.utime(path, (ahead, ahead))  # as `sftp put -p` sets it after the upload
    site.drop("orders_in", "now.xml")
    site.wait_in("now.xml", "bak/orders_in")
    site.wait_in("from-the-future.xml", "bak/orders_in", timeout=5)  # settle 0.3 s, rescan 2 s
    assert daemon.running()
