"""The built-in templates do their work on a real spool.

Jobs get into ``bak`` and ``joberrors`` the way they do in production
(``jobspool submit``, then ``jobspool daemon --once``), and are then aged
with ``os.utime``. Each template runs through ``jobspool schedule run``, so
the exit status (0 ok, 1 failed) and the recorded result are what a
sysadmin would see.

The promises tested here are in ``docs/spec.rst`` ("Schedules").
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from tests.kit import BROKEN, VALID, Site, plain

DAY = 86400
IFACES = plain("orders_in", "stock_in")


def with_template(site: Site, sid: str, template: str, **settings: Any) -> None:
    site.configure(
        schedules={sid: {"every": "24:00:00", "template": template, "with": settings}},
        interfaces=IFACES,
    )
    site.ok("init")


def age(path: Path, days: float) -> None:
    """Make a file (a job and its log) look ``days`` old."""
    t = time.time() - days * DAY
    os.utime(path, (t, t))


def processed(site: Site, jobs: dict[str, str]) -> None:
    """Jobs into bak (``{name: iface}``) or, for names with ``bad``, into joberrors."""
    for name, iface in jobs.items():
        code = site.submit(name, BROKEN if "bad" in name else VALID, iface).returncode
        assert code == (65 if "bad" in name else 0), name
    site.ok("daemon", "--once")
    for name, iface in jobs.items():
        folder = site.root / ("joberrors" if "bad" in name else f"bak/{iface}")
        assert (folder / name).is_file() and (folder / f"{name},log.xml").is_file(), name


def aged(site: Site, names: list[str], days: float) -> None:
    for name in names:
        for found in [*site.root.glob(f"bak/*/{name}*"), *site.root.glob(f"joberrors/{name}*")]:
            age(found, days)


def ls(site: Site, folder: str) -> list[str]:
    return sorted(os.listdir(site.root / folder))


def run(site: Site, sid: str) -> tuple[int, str]:
    """``jobspool schedule run SID``: its exit status and its one line."""
    result = site.run("schedule", "run", sid)
    assert result.stderr == ""
    return result.returncode, result.stdout.rstrip("\n")


# --- purge -------------------------------------------------------------------------------------


def test_purge_deletes_old_jobs_with_their_logs_and_keeps_fresh_ones(site):
    with_template(site, "purge", "purge", older_than="30d")
    processed(
        site,
        {
            "old.xml": "orders_in",
            "new.xml": "orders_in",
            "old-bad.xml": "orders_in",
            "new-bad.xml": "orders_in",
        },
    )
    aged(site, ["old.xml", "old-bad.xml"], 31)
    aged(site, ["new.xml", "new-bad.xml"], 29)

    code, line = run(site, "purge")

    assert code == 0 and line.startswith("purge: ok: purged 2 job(s)"), line
    assert ls(site, "bak/orders_in") == ["new.xml", "new.xml,log.xml"]
    assert ls(site, "joberrors") == ["new-bad.xml", "new-bad.xml,log.xml"]
    [result] = site.runs("purge")
    assert result.outcome == "ok" and result.message == line.split(": ", 2)[2]


def test_purge_keeps_to_the_states_and_interfaces_it_is_given(site):
    with_template(
        site, "purge", "purge", older_than="7d", states=["joberrors"], interfaces=["stock_in"]
    )
    processed(
        site,
        {
            "o.xml": "orders_in",
            "o-bad.xml": "orders_in",
            "s.xml": "stock_in",
            "s-bad.xml": "stock_in",
        },
    )
    aged(site, ["o.xml", "o-bad.xml", "s.xml", "s-bad.xml"], 8)

    # joberrors only, and only what came from stock_in (its log says so)
    assert run(site, "purge")[0] == 0
    assert ls(site, "joberrors") == ["o-bad.xml", "o-bad.xml,log.xml"]
    assert ls(site, "bak/stock_in") == ["s.xml", "s.xml,log.xml"]

    site.ok("schedule", "set", "purge", "with.states=bak")
    assert run(site, "purge")[0] == 0
    assert ls(site, "bak/stock_in") == []
    assert ls(site, "bak/orders_in") == ["o.xml", "o.xml,log.xml"]

    site.ok("schedule", "set", "purge", "with.interfaces=all", "with.states=[bak, joberrors]")
    assert run(site, "purge") == (0, "purge: ok: purged 2 job(s) older than 7d")
    assert ls(site, "bak/orders_in") == [] and ls(site, "joberrors") == []


def test_purge_settings_are_checked(site):
    with_template(site, "purge", "purge", older_than="30d")
    assert "'older_than' is required" in site.fails(
        2, "schedule", "set", "purge", "with={states: [bak]}"
    )
    assert "states" in site.fails(2, "schedule", "set", "purge", "with.states=[queue]")
    assert "older_than" in site.fails(2, "schedule", "set", "purge", "with.older_than=old")


# --- stuck-queue -------------------------------------------------------------------------------


def queued(site: Site, iface: str, name: str, hours: float) -> None:
    assert site.submit(name, VALID, iface).returncode == 0  # no daemon runs: it stays queued
    age(site.root / "queue" / iface / name, hours / 24)


def test_stuck_queue_fails_naming_the_interface_whose_oldest_job_is_too_old(site):
    with_template(site, "stuck", "stuck-queue", older_than="1h")
    queued(site, "orders_in", "first.xml", hours=2)
    queued(site, "orders_in", "second.xml", hours=0)
    queued(site, "stock_in", "fresh.xml", hours=0.5)

    code, line = run(site, "stuck")

    assert code == 1
    assert re.fullmatch(r"stuck: failed: stuck queue: orders_in: oldest job 720\ds old", line)
    assert "stock_in" not in line
    [result] = site.runs("stuck")
    assert result.outcome == "failed" and "orders_in" in (result.message or "")


def test_stuck_queue_passes_when_no_queue_is_too_old_and_says_when_one_is_paused(site):
    with_template(site, "stuck", "stuck-queue", older_than="1h")
    queued(site, "orders_in", "waiting.xml", hours=0.5)
    assert run(site, "stuck") == (0, "stuck: ok: no queue older than 1h")

    age(site.root / "queue/orders_in/waiting.xml", 3 / 24)
    site.ok("pause", "orders_in")
    code, line = run(site, "stuck")
    assert code == 1 and "orders_in: oldest job" in line and "(paused)" in line


def test_stuck_queue_looks_only_at_the_interfaces_it_is_given(site):
    with_template(site, "stuck", "stuck-queue", older_than="1h", interfaces=["stock_in"])
    queued(site, "orders_in", "old.xml", hours=5)
    assert run(site, "stuck")[0] == 0

    queued(site, "stock_in", "old-stock.xml", hours=5)
    code, line = run(site, "stuck")
    assert code == 1 and "stock_in" in line and "orders_in" not in line


# --- disk-space --------------------------------------------------------------------------------


def test_disk_space_passes_when_enough_is_free(site):
    with_template(site, "disk", "disk-space", min_free="1B")
    code, line = run(site, "disk")
    assert code == 0 and "bytes free" in line and "on the spool's filesystem" in line, line


def test_disk_space_fails_when_less_is_free_than_asked(site):
    with_template(site, "disk", "disk-space", min_free="1000TB")  # more than any test disk
    code, line = run(site, "disk")
    assert code == 1 and line.startswith("disk: failed: low disk space: "), line
    assert site.runs("disk")[0].outcome == "failed"


def test_disk_space_with_min_free_100_percent_fails_the_run(site):
    site.configure(
        schedules={
            "disk": {"every": "24:00:00", "template": "disk-space", "with": {"min_free": "1B"}}
        }
    )
    site.ok("init")
    site.ok("schedule", "set", "disk", "with.min_free=100%")
    code, line = run(site, "disk")
    assert code == 1 and "low disk space" in line


def test_disk_space_settings_are_checked(site):
    with_template(site, "disk", "disk-space", min_free="10%")
    assert "min_free" in site.fails(2, "schedule", "set", "disk", "with.min_free=plenty")
    assert "min_free" in site.fails(2, "schedule", "set", "disk", "with.min_free=150%")
