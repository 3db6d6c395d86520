"""``jobspool schedule add/remove/result``: schedules from templates and commands, taken by a
running daemon, and one run's details (docs/cli.rst, "Scheduled handlers")."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.kit import Site, plain


def _json(site: Site, *args: str) -> Any:
    return json.loads(site.ok(*args, "--json"))


def _site(site: Site) -> Site:
    site.configure(plain(), schedules={"filed": {"every": "1:00:00", "command": ["true"]}})
    site.init()
    return site


def test_add_from_a_template_is_checked_persisted_and_shown(site):
    _site(site)
    out = site.ok(
        "schedule",
        "add",
        "purge-old",
        "--template",
        "purge",
        "--every",
        "1:00:00",
        "--with",
        "older_than=30d",
    )
    assert "runs: template: purge" in out
    info = _json(site, "schedule", "show", "purge-old")
    assert (info["timing"], info["with"]) == ("every: 1:00:00", {"older_than": "30d"})
    assert "purge-old" in json.loads((site.root / "state/schedules/added.json").read_text())
    ids = [s["id"] for s in _json(site, "schedule", "list")]
    assert ids == ["filed", "purge-old"]
    # As strict as the file: nothing stored for a bad one.
    hourly = ("--every", "1:00:00")
    purge = ("--template", "purge", *hourly)
    assert "older_than" in site.fails(2, "schedule", "add", "bad", *purge, "--with", "older_than=x")
    assert "every" in site.fails(2, "schedule", "add", "bad2", "--command", "true", "--every", "x")
    assert "exactly one of" in site.fails(2, "schedule", "add", "bad3", *hourly)
    true = ("--command", "true", *hourly)
    assert "defined in" in site.fails(2, "schedule", "add", "filed", *true)
    assert "exists already" in site.fails(2, "schedule", "add", "purge-old", *true)
    assert [s["id"] for s in _json(site, "schedule", "list")] == ["filed", "purge-old"]
    # remove: only what was added by command.
    assert "defined in" in site.fails(2, "schedule", "remove", "filed")
    site.ok("schedule", "remove", "purge-old")
    assert "unknown schedule" in site.fails(2, "schedule", "show", "purge-old")
    actions = [e["action"] for e in _json(site, "audit")]
    assert actions == ["schedule add", "schedule remove"]


def test_a_running_daemon_takes_an_added_schedule_and_result_shows_its_run(site):
    _site(site)
    daemon = site.start()
    command = "sh -c 'echo hello; echo oops >&2; exit 3'"
    site.ok("schedule", "add", "say", "--command", command, "--every", "0:00:01")
    runs = site.wait_runs("say", 1)
    assert runs
    out = site.ok("schedule", "result", "say")
    assert "trigger: time" in out and "outcome: failed" in out and "exit-status: 3" in out
    assert "--- stdout ---\nhello\n" in out and "--- stderr ---\noops\n" in out
    one = _json(site, "schedule", "result", "say", "1")
    assert (one["stdout"], one["stderr"], one["exit-status"]) == ("hello\n", "oops\n", "3")
    assert one == _json(site, "schedule", "result", "say", one["file"])
    assert "no run" in site.fails(2, "schedule", "result", "say", "nonesuch")
    site.ok("schedule", "remove", "say")
    count = len(site.runs("say"))
    time.sleep(3)
    assert len(site.runs("say")) <= count + 1  # one may have been running at the removal
    daemon.stop()
