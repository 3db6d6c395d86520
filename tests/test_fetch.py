"""``jobspool fetch IFACE --to DIR [JOB...]``: an outbound interface's jobs handed over.

The promises tested here are in ``docs/spec.rst`` ("Commands and exit codes").
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.kit import (
    Site,
    log_events,
    order,
)

OUTBOUND = ["ship-c.xml", "ship-a.xml", "ship-b.xml"]  # the order they were dropped in


@pytest.fixture
def queued(site):
    """orders_out with three jobs the daemon accepted from its drop folder (in drop order)."""
    site.configure(
        {
            "orders_in": {"schema": "schemas/order.xsd", "command": ["/bin/true"]},
            "orders_out": {"schema": "schemas/order.xsd"},
        }
    )
    site.init()
    for name in OUTBOUND:
        site.drop("orders_out", name, order(name))
        time.sleep(0.012)  # distinct arrival times
    site.once()
    assert site.ls("queue", "orders_out") == sorted(OUTBOUND)
    assert site.ok("queue", "orders_out").split() == OUTBOUND
    return site


def outbox(s: Site) -> Path:
    path = s.dir / "outbox"
    path.mkdir(exist_ok=True)
    return path


def test_fetch_copies_every_queued_job_in_queue_order_then_moves_it_to_bak(queued):
    to = outbox(queued)
    result = queued.run("fetch", "orders_out", "--to", str(to))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == OUTBOUND
    assert sorted(os.listdir(to)) == sorted(OUTBOUND)  # nothing else: no staging files left
    for name in OUTBOUND:
        assert (to / name).read_bytes() == order(name)
        assert queued.where(name) == ["bak/orders_out"]
        assert queued.ok("status", name).strip() == "bak/orders_out"
        assert (queued.root / "bak/orders_out" / name).read_bytes() == order(name)
        log = queued.log(name, "orders_out")
        (moved_to_bak,) = [e for e in log_events(log, "moved") if e.get("to") == "bak/orders_out"]
        assert moved_to_bak.get("from") == "queue/orders_out"
        assert any(str(to) in (n.text or "") for n in log_events(log, "note"))
    assert queued.ls("queue", "orders_out") == []


def test_the_log_of_a_fetched_submitted_job_tells_its_whole_story(queued):
    queued.ok("submit", "orders_out", str(_outside(queued, "ship-d.xml")))
    to = outbox(queued)
    assert queued.ok("fetch", "orders_out", "--to", str(to), "ship-d.xml").split() == ["ship-d.xml"]
    log = queued.log("ship-d.xml", "orders_out")
    assert [e.get("via") for e in log_events(log, "received")] == ["submit"]
    assert [e.get("outcome") for e in log_events(log, "checked")] == ["accepted"]


def test_the_log_of_a_fetched_dropped_job_says_it_was_dropped_and_checked(queued):
    to = outbox(queued)
    queued.ok("fetch", "orders_out", "--to", str(to), "ship-a.xml")
    log = queued.log("ship-a.xml", "orders_out")
    assert [e.get("via") for e in log_events(log, "received")] == ["drop"]
    assert [e.get("outcome") for e in log_events(log, "checked")] == ["accepted"]


def test_fetching_again_finds_nothing_new(queued):
    to = outbox(queued)
    assert queued.ok("fetch", "orders_out", "--to", str(to)).split() == OUTBOUND
    assert queued.ok("fetch", "orders_out", "--to", str(to)) == ""
    assert sorted(os.listdir(to)) == sorted(OUTBOUND)


def test_fetch_of_a_named_job_fetches_only_that_one(queued):
    to = outbox(queued)
    assert queued.ok("fetch", "orders_out", "--to", str(to), "ship-a.xml").split() == ["ship-a.xml"]
    assert os.listdir(to) == ["ship-a.xml"]
    assert queued.where("ship-a.xml") == ["bak/orders_out"]
    assert queued.ok("queue", "orders_out").split() == ["ship-c.xml", "ship-b.xml"]


def test_fetch_never_overwrites_a_file_already_in_the_directory(queued):
    to = outbox(queued)
    (to / "ship-a.xml").write_bytes(b"the partner's own file")
    line = _one_line_error(queued.run("fetch", "orders_out", "--to", str(to)), 2)
    assert "ship-a.xml" in line
    assert (to / "ship-a.xml").read_bytes() == b"the partner's own file"
    # Every other job is fetched all the same; the one that clashes stays queued.
    assert queued.where("ship-c.xml") == ["bak/orders_out"]
    assert queued.where("ship-b.xml") == ["bak/orders_out"]
    assert queued.ok("queue", "orders_out").split() == ["ship-a.xml"]
    assert sorted(os.listdir(to)) == ["ship-a.xml", "ship-b.xml", "ship-c.xml"]


def _one_line_error(result, code: int):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("jobspool: ")
    return lines[0]


def test_fetch_from_an_inbound_interface_is_a_bad_request(queued):
    queued.ok("submit", "orders_in", str(_outside(queued, "in-1.xml")))
    to = outbox(queued)
    line = _one_line_error(queued.run("fetch", "orders_in", "--to", str(to)), 2)
    assert "orders_in" in line
    assert os.listdir(to) == []
    assert queued.where("in-1.xml") == ["queue/orders_in"]
    assert queued.ls("queue", "orders_out") == sorted(OUTBOUND)


def test_fetch_to_a_missing_directory_is_a_bad_request(queued):
    missing = queued.dir / "no-such-outbox"
    line = _one_line_error(queued.run("fetch", "orders_out", "--to", str(missing)), 2)
    assert str(missing) in line
    assert not missing.exists()
    assert queued.ok("queue", "orders_out").split() == OUTBOUND


def test_fetch_of_a_job_that_is_not_queued_is_a_bad_request(queued):
    to = outbox(queued)
    _one_line_error(queued.run("fetch", "orders_out", "--to", str(to), "nonesuch.xml"), 2)
    _one_line_error(
        queued.run("fetch", "orders_out", "--to", str(to), "ship-a.xml", "nonesuch.xml"), 2
    )
    assert os.listdir(to) == []  # all or nothing: ship-a.xml was not fetched either
    assert queued.ok("queue", "orders_out").split() == OUTBOUND


def test_fetch_of_an_unknown_interface_is_a_bad_request(queued):
    to = outbox(queued)
    _one_line_error(queued.run("fetch", "nosuch_out", "--to", str(to)), 2)


def _outside(s: Site, name: str):
    path = s.outside / name
    path.write_bytes(order(name))
    return path
