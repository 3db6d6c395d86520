"""The read commands and the command line itself: status, queue, log, interfaces.

Every command runs as a sysadmin would type it, through the installed script.

The promises tested here are in ``docs/spec.rst`` ("Commands and exit codes").
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from datetime import datetime

import pytest

import jobspool
from jobspool import joblog
from tests.kit import (
    INVALID,
    VALID,
    Site,
    assert_every_log_valid,
    assert_fails,
    assert_ok,
    kinds,
    make_site,
    read_table,
    run,
    valid_log,
)


def fill(spool: Site, env: dict[str, str] | None = None) -> Site:
    """Put a job into each of the four places of ``spool``."""
    (spool.root / "incoming" / "orders_in" / "dropped.xml").write_bytes(VALID)
    assert_ok(spool.run("submit", "orders_in", str(spool.file("waiting.xml")), env=env))
    rejected = spool.file("rejected.xml", INVALID)
    assert_fails(spool.run("submit", "orders_in", str(rejected), env=env), 65)
    # A processed job, as the daemon leaves it: in bak with its log beside it.
    log = joblog.new("done.xml", "orders_out")
    joblog.received(log, "submit")
    joblog.moved(log, "queue/orders_out", "bak/orders_out")
    (spool.root / "bak" / "orders_out" / "done.xml").write_bytes(VALID)
    (spool.root / "bak" / "orders_out" / "done.xml,log.xml").write_bytes(joblog.to_bytes(log))
    return spool


@pytest.fixture
def busy(spool):
    """A spool with a job in each of the four places, for a test that changes it."""
    return fill(spool)


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    """A spool with a job in each of the four places, shared by tests that only read it."""
    site = make_site(tmp_path_factory.mktemp("seen"))
    env = {"XDG_CACHE_HOME": str(site.dir / "xdg-cache")}  # the autouse fixture is not active yet
    assert_ok(site.run("init", env=env))
    fill(site, env)
    before = site.tree()
    yield site
    assert site.tree() == before, "a read command changed the spool"
    assert_every_log_valid(site.dir)


# --- status --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job", "answer"),
    [
        ("dropped.xml", "incoming/orders_in"),
        ("waiting.xml", "queue/orders_in"),
        ("done.xml", "bak/orders_out"),
        ("rejected.xml", "joberrors"),
    ],
)
def test_status_prints_exactly_one_status_string(seen, job, answer):
    assert assert_ok(seen.run("status", job)) == answer + "\n"


def test_status_of_several_jobs(seen):
    out = assert_ok(seen.run("status", "waiting.xml", "rejected.xml", "done.xml"))
    assert out == "waiting.xml queue/orders_in\nrejected.xml joberrors\ndone.xml bak/orders_out\n"


def test_status_of_an_unknown_job(seen):
    result = seen.run("status", "nobody.xml")
    line = assert_fails(result, 2)
    assert "nobody.xml" in line
    assert result.stdout == ""


def test_status_of_several_jobs_one_unknown(seen):
    result = seen.run("status", "waiting.xml", "nobody.xml", "rejected.xml")
    line = assert_fails(result, 2)
    assert "nobody.xml" in line
    assert result.stdout == "waiting.xml queue/orders_in\nrejected.xml joberrors\n"


def test_status_of_an_invalid_name(seen):
    for name in ["../queue", "-x", ".x", "a b", "x" * 201]:
        assert "invalid job name" in assert_fails(seen.run("status", "--", name), 2), name


def test_status_json(seen):
    result = seen.run("status", "--json", "waiting.xml", "done.xml")
    assert json.loads(assert_ok(result)) == [
        {"job": "waiting.xml", "status": "queue/orders_in", "name": "waiting.xml", "held": False},
        {"job": "done.xml", "status": "bak/orders_out", "name": "done.xml", "held": False},
    ]
    result = seen.run("status", "--json", "rejected.xml")
    assert json.loads(assert_ok(result)) == [
        {"job": "rejected.xml", "status": "joberrors", "name": "rejected.xml", "held": False}
    ]


# --- queue ---------------------------------------------------------------------


def test_queue_lists_jobs_in_acceptance_order(spool):
    for name in ["b.xml", "a.xml", "c.xml"]:
        assert_ok(spool.submit(name))
    assert_ok(spool.submit("elsewhere.xml", iface="orders_out"))
    assert assert_ok(spool.run("queue", "orders_in")) == "b.xml\na.xml\nc.xml\n"
    assert assert_ok(spool.run("queue", "orders_out")) == "elsewhere.xml\n"
    assert assert_ok(spool.run("queue", "stock_in")) == ""


def test_queue_json(spool):
    for name in ["b.xml", "a.xml"]:
        assert_ok(spool.submit(name))
    rows = json.loads(assert_ok(spool.run("queue", "--json", "orders_in")))
    assert [row["job"] for row in rows] == ["b.xml", "a.xml"]
    assert rows[0]["accepted"] <= rows[1]["accepted"]


def put(spool: Site, name: str, stamp_ns: int, iface: str = "orders_in") -> None:
    """Put a job into a queue folder as another program might, with a time of its own."""
    path = spool.root / "queue" / iface / name
    path.write_bytes(VALID)
    os.utime(path, ns=(stamp_ns, stamp_ns))


def accepted_ms(text: str) -> int:
    """An ``accepted`` time of ``queue --json`` as milliseconds since the epoch."""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", text), text
    return round(datetime.fromisoformat(text).timestamp() * 1000)


def test_queue_of_jobs_accepted_in_one_second_and_across_restarts(spool):
    second = (time.time_ns() // 10**9 - 60) * 10**9
    ties = {"t-b.xml": second, "t-a.xml": second, "t-c.xml": second + 1_000_000}
    for name, stamp in ties.items():  # copied in with their times: a and b share one
        put(spool, name, stamp)
    names = ["n5.xml", "n3.xml", "n9.xml", "last.xml"]
    for name in names:  # each submit is a process of its own, most in one second
        assert_ok(spool.submit(name))
    expected = ["t-a.xml", "t-b.xml", "t-c.xml", *names]
    assert spool.queue() == expected

    rows = json.loads(assert_ok(spool.run("queue", "--json", "orders_in")))
    assert [row["job"] for row in rows] == expected
    by_name = {row["job"]: accepted_ms(row["accepted"]) for row in rows}
    assert by_name["t-a.xml"] == by_name["t-b.xml"] == second // 10**6
    assert by_name["t-c.xml"] == second // 10**6 + 1
    for name in names:
        mtime = (spool.root / "queue/orders_in" / name).stat().st_mtime_ns
        assert by_name[name] == mtime // 10**6  # milliseconds cut, never rounded up


def test_queue_json_is_printed_like_every_other_json(spool):
    assert assert_ok(spool.run("queue", "--json", "orders_in")) == "[]\n"
    for name in ["b.xml", "a.xml"]:
        assert_ok(spool.submit(name))
    out = assert_ok(spool.run("queue", "--json", "orders_in"))
    assert out == json.dumps(json.loads(out), indent=2) + "\n"


def test_queue_of_25000_jobs_is_in_acceptance_order(spool):
    # Enough jobs that the listing shares its stat calls among processes.
    t = time.time_ns() - 86_400 * 10**9
    rng = random.Random(25_000)
    jobs = []
    for i in rng.sample(range(25_000), 25_000):
        stamp = t + (i // 2) * 1000  # in pairs: every second job shares its stamp
        put(spool, f"job-{i:05d}.xml", stamp)
        jobs.append((stamp, f"job-{i:05d}.xml"))
    (spool.root / "queue/orders_in" / "job-99999.xml").mkdir()  # not a job
    expected = [name for _, name in sorted(jobs)]
    assert spool.queue() == expected
    rows = json.loads(assert_ok(spool.run("queue", "--json", "orders_in")))
    assert [row["job"] for row in rows] == expected


def test_queue_of_an_unknown_interface(spool):
    line = assert_fails(spool.run("queue", "nope_in"), 2)
    assert "nope_in" in line


# --- log -----------------------------------------------------------------------


def test_log_of_a_job_in_joberrors(seen):
    result = seen.run("log", "rejected.xml")
    data = assert_ok(result).encode()
    assert data == (seen.root / "joberrors" / "rejected.xml,log.xml").read_bytes()
    assert kinds(data) == ["received", "checked", "moved"]


def test_log_of_a_job_in_bak(seen):
    data = assert_ok(seen.run("log", "done.xml")).encode()
    valid_log(data)
    assert data == (seen.root / "bak" / "orders_out" / "done.xml,log.xml").read_bytes()


@pytest.mark.parametrize("job", ["waiting.xml", "dropped.xml"])
def test_log_of_a_job_not_processed_yet_is_try_later(seen, job):
    result = seen.run("log", job)
    assert_fails(result, 75)
    assert result.stdout == ""


def test_log_of_an_unknown_job(seen):
    line = assert_fails(seen.run("log", "nobody.xml"), 2)
    assert "nobody.xml" in line


def test_log_json(seen):
    report = json.loads(assert_ok(seen.run("log", "--json", "rejected.xml")))
    assert report["job"] == "rejected.xml"
    valid_log(report["log"].encode())


# --- interfaces ----------------------------------------------------------------


def test_interfaces_table(busy):
    assert_ok(busy.submit("second.xml"))
    assert_ok(busy.run("pause", "stock_in"))
    out = assert_ok(busy.run("interfaces"))
    header = ["INTERFACE", "DIR", "INCOMING", "QUEUED", "OLDEST", "PAUSED", "ERRORS"]
    assert out.split()[:7] == header
    rows = read_table(out)
    assert [row["INTERFACE"] for row in rows] == ["orders_in", "orders_out", "stock_in"]
    orders_in, orders_out, stock_in = rows
    assert (orders_in["DIR"], orders_in["QUEUED"]) == ("in", "2")
    assert (orders_in["PAUSED"], orders_in["ERRORS"]) == ("no", "1")
    assert re.fullmatch(r"\d+[smhd]", orders_in["OLDEST"])
    assert (orders_out["DIR"], orders_out["QUEUED"], orders_out["OLDEST"]) == ("out", "0", "-")
    assert (orders_out["PAUSED"], orders_out["ERRORS"]) == ("no", "0")
    assert (stock_in["DIR"], stock_in["QUEUED"], stock_in["PAUSED"]) == ("in", "0", "yes")


def test_interfaces_json(seen):
    rows = json.loads(assert_ok(seen.run("interfaces", "--json")))
    by_name = {row["interface"]: row for row in rows}
    assert set(by_name) == {"orders_in", "orders_out", "stock_in"}
    assert by_name["orders_in"]["direction"] == "in"
    assert by_name["orders_in"]["queued"] == 1
    assert by_name["orders_in"]["errors"] == 1
    assert by_name["orders_in"]["paused"] is False
    assert by_name["orders_in"]["oldest_seconds"] >= 0
    assert by_name["orders_out"]["direction"] == "out"
    assert by_name["orders_out"]["queued"] == 0
    assert by_name["orders_out"]["oldest_seconds"] is None


# --- the command line itself ---------------------------------------------------


def test_version():
    out = assert_ok(run("--version"))
    assert jobspool.__version__ in out
    assert out.count("\n") == 1


def test_help_lists_the_commands():
    out = assert_ok(run("--help"))
    for command in [
        "init",
        "check",
        "submit",
        "status",
        "queue",
        "log",
        "retry",
        "pause",
        "resume",
        "interfaces",
    ]:
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), command


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--bogus"], id="unknown-option"),
        pytest.param(["status", "--bogus", "x.xml"], id="unknown-command-option"),
        pytest.param(["frobnicate"], id="unknown-command"),
        pytest.param(["submit", "orders_in"], id="missing-argument"),
        pytest.param(["status"], id="missing-job"),
        pytest.param(["queue", "orders_in", "extra"], id="extra-argument"),
    ],
)
def test_usage_errors_exit_2_with_one_line(configured, args):
    result = configured.run(*args)
    assert_fails(result, 2)
    assert result.stdout == ""


def test_no_command_at_all_is_a_usage_error():
    assert_fails(run(), 2)


def test_no_command_after_options_is_a_usage_error(configured):
    assert_fails(configured.run(), 2)


PROBE = """\
import atexit, os, sys
atexit.register(lambda: open(os.environ["PROBE_OUT"], "w").write("\\n".join(sys.modules)))
from jobspool.cli import main
main()
"""


@pytest.mark.parametrize(
    "args",
    [["status", "waiting.xml"], ["queue", "orders_in"], ["log", "rejected.xml"]],
    ids=["status", "queue", "log"],
)
def test_read_commands_do_not_load_the_xml_machinery(seen, tmp_path, args):
    """Read commands import nothing they do not need (``docs/spec.rst``, "Commands and
    exit codes"); tests/test_layout.py checks the same on the import graph."""
    out = tmp_path / "modules"
    command = [sys.executable, "-c", PROBE, "-c", str(seen.config), *args]
    env = {"PROBE_OUT": str(out)}
    for _ in range(2):  # the second run finds the configuration in its cache
        result = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, **env}, timeout=60
        )
        assert result.returncode == 0, result.stderr
    loaded = set(out.read_text().splitlines())
    assert "jobspool.cli" in loaded
    assert "lxml" not in loaded
    assert "jobspool.check" not in loaded
    assert "yaml" not in loaded
