"""Bugs found by trying the toolbox as a new user would, each through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from jobspool.handlers import Outcome
from jobspool.schedules import Result
from tests.kit import Site, log_events, order


def _schedules(site: Site) -> None:
    site.configure(
        schedules={
            "hello": {"name": "Say hello", "every": "1:00:00", "command": ["sh", "-c", "echo hi"]},
            "slow": {"every": "1:00:00", "command": ["sh", "-c", "sleep 1"]},
        }
    )
    site.init()


def _json(site: Site, *args: str) -> Any:
    return json.loads(site.ok(*args, "--json"))


def test_set_of_an_empty_name_goes_back_to_the_files_name(site):
    _schedules(site)
    site.ok("schedule", "set", "hello", "name=Other")
    assert _json(site, "schedule", "show", "hello")["name"] == "Other"
    site.ok("schedule", "set", "hello", "name=")
    assert _json(site, "schedule", "show", "hello")["name"] == "Say hello"
    stored = json.loads((site.root / "state/schedules/hello/settings.json").read_text())
    assert "name" not in stored


def test_set_prints_the_schedule_as_show_does_not_a_python_repr(site):
    _schedules(site)
    out = site.ok("schedule", "set", "hello", "timeout=10m")
    assert "{" not in out and "'" not in out, out
    assert "timeout: 600" in out


def test_show_of_a_disabled_schedule_lists_no_next_runs(site):
    _schedules(site)
    site.ok("schedule", "disable", "hello")
    assert _json(site, "schedule", "show", "hello")["next"] == []
    assert "next: - (disabled)" in site.ok("schedule", "show", "hello")


def test_history_is_ordered_by_start_newest_first(site):
    _schedules(site)
    # Two results placed out of start order: what the daemon's group commit can do.
    store = site.store()
    s = store.get("hello")
    now = time.time()
    store.record(s, Result("hello", "time", "ok", Outcome("done", now - 10, now - 9)))
    store.record(s, Result("hello", "time", "ok", Outcome("done", now - 100, now - 1)))
    starts = [r["start"] for r in _json(site, "schedule", "history", "hello")]
    assert starts == sorted(starts, reverse=True)


def test_duplicate_keys_in_the_configuration_are_refused_naming_line_and_key(site):
    site.config.write_text(
        "spool: spool\ninterfaces:\n  orders_in:\n    command: [/bin/true]\n"
        "  orders_in:\n    command: [/bin/false]\n"
    )
    line = site.fails(78, "init")
    assert str(site.config) in line and "line 5" in line and "orders_in" in line
    site.config.write_text(
        "spool: spool\ninterfaces:\n  orders_in:\n    command: [/bin/true]\n"
        "schedules:\n  tick:\n    every: '1:00:00'\n    command: [true]\n"
        "  tick:\n    every: '2:00:00'\n    command: [true]\n"
    )
    line = site.fails(78, "schedule", "list")
    assert "line 9" in line and "tick" in line


def test_fetch_goes_on_past_a_name_clash_and_names_it(site):
    site.configure({"orders_out": {}})
    site.init()
    for name in ("a.xml", "b.xml", "c.xml"):
        site.drop("orders_out", name, order(name))
        time.sleep(0.012)
    site.once()
    to = site.dir / "outbox"
    to.mkdir()
    (to / "b.xml").write_bytes(b"theirs")
    result = site.run("fetch", "orders_out", "--to", str(to))
    assert result.returncode == 2
    assert result.stdout.split() == ["a.xml", "c.xml"]
    assert "b.xml" in result.stderr
    assert site.ok("queue", "orders_out").split() == ["b.xml"]
    assert (to / "b.xml").read_bytes() == b"theirs"


def test_a_run_interrupted_by_sigterm_leaves_a_ran_in_the_jobs_log(site):
    script = site.script("slow.sh", 'touch "$T/began"\n[ -e "$T/fast" ] && exit 0\nsleep 60')
    site.configure({"orders_in": {"command": [script]}}, grace="1s")
    site.init()
    daemon = site.start()
    site.drop("orders_in", "cut.xml")
    site.wait_for(lambda: (site.dir / "began").exists(), "the handler to start")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert site.where("cut.xml") == ["queue/orders_in"]
    (site.dir / "fast").write_text("")
    site.once()
    ran = log_events(site.log("cut.xml", "orders_in"), "ran")
    assert len(ran) == 2, [r.attrib for r in ran]
    assert "interrupted" in (ran[0].get("reason") or "")
    assert ran[1].get("outcome") == "done"
    assert not os.path.exists(site.root / "state/pending/cut.xml,log.xml")
