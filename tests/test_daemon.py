"""``jobspool daemon`` as systemd runs it: a real process, a real spool, real signals.

Each test writes its configuration and handlers, starts the daemon, drops
files the way partners do (a hidden name, then a rename; or written in
place), and looks at the spool the way a sysadmin would: which directory
each job is in, the exit codes, the job logs (which always validate).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import signal
import stat
import time
from datetime import datetime
from typing import Any

import pytest

from jobspool.joblog import escape_name
from jobspool.names import is_valid
from tests.kit import NOBODY, Site, child, kinds, log_events, order, outputs, pid_alive

LEDGER = 'echo "$JOBSPOOL_JOB" >> "$T/ledger"'


def ledger(s: Site) -> list[str]:
    """The jobs the handler ran, in the order it ran them."""
    try:
        return (s.dir / "ledger").read_text().split()
    except FileNotFoundError:
        return []


def orders_in(s: Site, body: str = LEDGER, **settings) -> dict[str, object]:
    """The inbound interface most tests use: an XSD and a shell handler."""
    return {"schema": "schemas/order.xsd", "command": [s.script("handler", body)], **settings}


def started(s: Site, body: str = LEDGER, daemon: dict[str, Any] | None = None, **settings):
    """orders_in with this handler body (and interface settings), its spool, a running daemon."""
    s.configure({"orders_in": orders_in(s, body, **settings)}, **(daemon or {}))
    s.init()
    return s.start()


def ran(s: Site, name: str, iface: str | None = "orders_in") -> list[Any]:
    return log_events(s.log(name, iface), "ran")


# --- order -------------------------------------------------------------------------------


def test_500_jobs_dropped_at_once_are_all_handled_in_drop_order(site):
    daemon = started(site)
    names = [f"order-{i:03d}.xml" for i in range(500)]
    random.Random(500).shuffle(names)  # drop order is not name order
    for name in names:
        site.drop("orders_in", name)

    site.wait_for(lambda: len(site.ls("bak", "orders_in")) == 500, "500 jobs in bak", timeout=90)
    assert ledger(site) == names
    assert site.ls("incoming", "orders_in") == []
    assert site.ls("queue", "orders_in") == []
    assert site.ls("joberrors") == []
    for name in names:
        log = site.log(name, "orders_in")
        assert kinds(log) == ["received", "checked", "moved", "ran", "moved"]
        assert log_events(log, "received")[0].get("via") == "drop"
        assert (site.root / "bak/orders_in" / name).read_bytes() == order(name)
    assert daemon.stop() == 0


def test_a_flood_of_drops_is_taken_a_slice_at_a_time(site, monkeypatch):
    # Between slices the loop serves schedules, rescans and systemd's
    # watchdog; here a slice is one file (in-process, the loop driven by hand).
    from jobspool import daemon as daemon_module

    site.configure({"orders_in": orders_in(site)})
    site.init()
    monkeypatch.setattr(daemon_module, "TURN", 0.0)
    d = daemon_module.Daemon(str(site.config))
    d.start_watching()
    try:
        names = [f"flood-{i}.xml" for i in range(3)]
        for name in names:
            site.drop("orders_in", name)
        turns = 0
        while True:
            now = time.time()
            due = d.loop(now)
            turns += 1
            if not d.hints:
                break
            assert due == now, "a turn with drops left must ask for the next at once"
        assert turns >= len(names)  # at least one turn per renamed-in file
        deadline = time.monotonic() + 20
        while d.checking and time.monotonic() < deadline:  # checked by worker processes
            d.sleep(0.1)
            d.loop(time.time())
        assert sorted(site.ls("queue", "orders_in")) == names
        assert site.ls("incoming", "orders_in") == []
    finally:
        d.checks.close()
        assert d.watcher is not None
        d.watcher.stop()


def test_jobs_dropped_while_the_daemon_is_down_are_handled_in_drop_order(site):
    site.configure({"orders_in": orders_in(site)})
    site.init()
    names = [f"order-{i:02d}.xml" for i in range(40)]
    random.Random(40).shuffle(names)
    for name in names:
        site.drop("orders_in", name)
        time.sleep(0.012)  # distinct arrival times even with a coarse filesystem clock
    site.once()
    assert ledger(site) == names
    assert site.ls("bak", "orders_in") == sorted(names)


def test_a_pause_and_the_queue_order_survive_a_restart(site):
    daemon = started(site)
    site.ok("pause", "orders_in")
    names = ["zeta.xml", "alpha.xml", "mid.xml", "beta.xml"]
    for name in names:
        site.drop("orders_in", name)
    site.wait_for(lambda: site.ls("queue", "orders_in") == sorted(names), "all queued")
    assert site.ok("queue", "orders_in").split() == names
    assert daemon.stop() == 0

    again = site.start()
    time.sleep(2.5)  # still paused: the lane looks at the pause marker every second
    assert site.ls("queue", "orders_in") == sorted(names)
    assert ledger(site) == []
    site.ok("resume", "orders_in")
    site.wait_for(lambda: site.ls("bak", "orders_in") == sorted(names), "all handled")
    assert ledger(site) == names
    assert again.stop() == 0


def place(s: Site, name: str, minutes_ago: float) -> None:
    """Put a job into queue/orders_in as another program does: stamped, then renamed in."""
    queue = s.root / "queue/orders_in"
    hidden = queue / f".{name}.part"
    hidden.write_bytes(order(name))
    stamp = time.time_ns() - int(minutes_ago * 60e9)
    os.utime(hidden, ns=(stamp, stamp))
    os.rename(hidden, queue / name)


def test_a_queue_read_at_start_and_jobs_placed_later_run_in_stamp_order(site):
    site.configure({"orders_in": orders_in(site)})
    site.init()
    site.ok("pause", "orders_in")
    for name, minutes_ago in [("a.xml", 50), ("b.xml", 30), ("c.xml", 10), ("d.xml", 40)]:
        place(site, name, minutes_ago)
    daemon = site.start()  # these four the daemon reads from the folder
    for name, minutes_ago in [("e.xml", 20), ("f.xml", 55), ("g.xml", 35)]:
        place(site, name, minutes_ago)  # these it hears of one by one
    site.drop("orders_in", "h.xml")  # and this one it accepts itself, the newest
    site.wait_for(lambda: "h.xml" in site.ls("queue", "orders_in"), "h.xml accepted")
    time.sleep(2.5)  # a rescan (every 2 s here) finds whatever an event missed
    expected = ["f.xml", "a.xml", "d.xml", "g.xml", "b.xml", "e.xml", "c.xml", "h.xml"]
    assert site.ok("queue", "orders_in").split() == expected
    assert ledger(site) == []
    site.ok("resume", "orders_in")
    site.wait_for(lambda: len(site.ls("bak", "orders_in")) == 8, "all handled")
    assert ledger(site) == expected
    assert daemon.stop() == 0


def test_a_job_saying_try_later_stays_first_in_a_queue_read_at_start(site):
    site.configure({"orders_in": orders_in(site, LATER_COMMAND.format(n=3))})
    site.init()
    others = [f"next-{i}.xml" for i in (4, 1, 3, 2)]
    place(site, "first.xml", 10)
    for i, name in enumerate(others):
        place(site, name, 9 - i)
    daemon = site.start()
    site.wait_for(lambda: len(site.ls("bak", "orders_in")) == 5, "all handled")
    assert ledger(site) == ["first.xml"] * 4 + others
    assert daemon.stop() == 0


# --- uploads in progress -------------------------------------------------------------------


def test_an_upload_in_progress_is_never_taken_until_renamed(site):
    daemon = started(site, daemon={"rescan": "0.5s"})
    incoming = site.root / "incoming/orders_in"
    partial = {
        "order-1.xml.filepart": order(1),  # WinSCP
        ".order-2.xml.Qx81Zz": order(2),  # rsync
        "order-3.xml.part": order(3),
        "order-4.xml.tmp": order(4),
        "order-5.xml~": order(5),
    }
    for name, data in partial.items():
        (incoming / name).write_bytes(data)
    time.sleep(2.5)  # several rescans (every 0.5 s) and every event long handled
    assert daemon.running()
    assert sorted(os.listdir(incoming)) == sorted(partial)
    for name, data in partial.items():
        assert (incoming / name).read_bytes() == data
    assert site.ls("queue", "orders_in") == []
    assert site.ls("joberrors") == []
    assert ledger(site) == []

    os.rename(incoming / "order-1.xml.filepart", incoming / "order-1.xml")
    site.wait_in("order-1.xml", "bak/orders_in")
    assert (site.root / "bak/orders_in/order-1.xml").read_bytes() == order(1)
    assert ledger(site) == ["order-1.xml"]


def test_a_file_written_slowly_in_place_is_taken_only_when_whole(site):
    # OpenSSH's sftp put writes the final name in place, with pauses on a slow link.
    daemon = started(site)
    path = site.root / "incoming/orders_in/slow.xml"
    data = order("slow", sku="S" * 2000)
    with open(path, "wb") as upload:
        upload.write(data[: len(data) // 2])
        upload.flush()
        time.sleep(1.5)  # five times `settle`, with the file still open
        assert path.exists(), "half a file was taken\n" + site.describe()
        assert site.ls("joberrors") == [], site.describe()
        upload.write(data[len(data) // 2 :])
    site.wait_in("slow.xml", "bak/orders_in")
    assert (site.root / "bak/orders_in/slow.xml").read_bytes() == data
    (checked,) = log_events(site.log("slow.xml", "orders_in"), "checked")
    assert checked.get("outcome") == "accepted"
    assert checked.get("schema", "").endswith("order.xsd")
    assert ledger(site) == ["slow.xml"]
    assert daemon.running()


# --- try later -----------------------------------------------------------------------------

LATER_COMMAND = """
echo "$JOBSPOOL_JOB" >> "$T/ledger"
if [ "$JOBSPOOL_JOB" = first.xml ]; then
    n=$(cat "$T/count" 2>/dev/null || echo 0)
    n=$((n + 1))
    echo $n > "$T/count"
    if [ $n -le {n} ]; then echo "partner system down ($n)" >&2; exit 75; fi
fi
"""

LATER_PYTHON = """
import os
from pathlib import Path

import jobspool


def handle(job):
    t = Path(os.environ["T"])
    with open(t / "ledger", "a") as f:
        f.write(job.name + "\\n")
    if job.name == "first.xml":
        count = t / "count"
        n = int(count.read_text()) + 1 if count.exists() else 1
        count.write_text(str(n))
        if n <= {n}:
            raise jobspool.TryLater(f"partner system down ({{n}})")
"""


def interfaces(s: Site) -> dict[str, dict[str, Any]]:
    return {row["interface"]: row for row in json.loads(s.ok("interfaces", "--json"))}


@pytest.mark.parametrize("kind", ["command", "python"])
def test_try_later_keeps_the_job_at_the_head_and_retries_it_with_back_off(site, kind):
    n = 4
    if kind == "command":
        iface = orders_in(site, LATER_COMMAND.format(n=n))
    else:
        site.module("later_handlers", LATER_PYTHON.format(n=n))
        iface = {"schema": "schemas/order.xsd", "handler": "later_handlers:handle"}
    site.configure({"orders_in": iface}, backoff_initial="0.3s", backoff_max="1s")
    site.init()
    site.start()

    site.drop("orders_in", "first.xml")
    site.wait_for(lambda: "first.xml" in ledger(site), "the first try of first.xml")
    site.drop("orders_in", "second.xml")
    site.wait_for(lambda: "second.xml" in site.ls("queue", "orders_in"), "second.xml queued")

    # While first.xml blocks the head, the interface says so, and second.xml waits.
    blocked = site.wait_for(
        lambda: interfaces(site)["orders_in"]["blocked"], "interfaces to show the block"
    )
    assert "first.xml" in blocked
    assert site.ok("status", "first.xml").strip() == "queue/orders_in"
    assert site.ok("queue", "orders_in").split()[0] == "first.xml"

    site.wait_in("second.xml", "bak/orders_in")
    assert ledger(site) == ["first.xml"] * (n + 1) + ["second.xml"]
    assert site.where("first.xml") == ["bak/orders_in"]

    runs = ran(site, "first.xml")
    assert [r.get("outcome") for r in runs] == ["later"] * n + ["done"]
    for i, r in enumerate(runs[:n], start=1):
        if kind == "command":
            assert r.get("exit-status") == "75"
            assert f"partner system down ({i})" in outputs(r)["stderr"].text
        else:
            assert f"partner system down ({i})" in r.get("reason")
    # Back-off: waits of at least 0.3, 0.6, then 1 s (backoff_max) between the tries.
    gaps = [_seconds(b.get("time")) - _seconds(a.get("end")) for a, b in itertools.pairwise(runs)]
    for gap, wait in zip(gaps, [0.3, 0.6, 1.0, 1.0], strict=True):
        assert gap >= wait - 0.05, gaps
    assert kinds(site.log("first.xml", "orders_in"))[-1] == "moved"
    assert interfaces(site)["orders_in"]["blocked"] is None


def _blocked_across_a_restart(site: Site) -> int:
    """first.xml says "try later" until the daemon restarts, then succeeds; return its tries."""
    # The partner system is down while $T/down exists.
    body = LEDGER + '\nif [ -e "$T/down" ]; then echo "partner down" >&2; exit 75; fi'
    (site.dir / "down").touch()
    daemon = started(site, body)
    site.drop("orders_in", "first.xml")
    site.wait_for(lambda: ledger(site).count("first.xml") >= 2, "two tries of first.xml")
    assert "first.xml" in site.wait_for(
        lambda: interfaces(site)["orders_in"]["blocked"], "interfaces to show the block"
    )
    assert daemon.stop() == 0
    tries = ledger(site).count("first.xml")
    assert site.where("first.xml") == ["queue/orders_in"]
    (site.dir / "down").unlink()  # the partner is back
    site.start()
    site.wait_in("first.xml", "bak/orders_in")
    return tries


def test_a_job_blocked_across_a_restart_keeps_its_history(site):
    tries = _blocked_across_a_restart(site)
    assert ledger(site) == ["first.xml"] * (tries + 1)
    runs = ran(site, "first.xml")
    assert [r.get("outcome") for r in runs] == ["later"] * tries + ["done"]
    assert all("partner down" in outputs(r)["stderr"].text for r in runs[:-1])


def test_a_block_from_before_a_restart_clears_once_the_job_is_done(site):
    _blocked_across_a_restart(site)
    assert site.where("first.xml") == ["bak/orders_in"]
    assert interfaces(site)["orders_in"]["blocked"] is None


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def test_a_command_gets_the_job_path_as_its_last_argument_and_the_jobspool_environment(site):
    body = """
    for arg in "$@"; do echo "ARG=$arg"; done > "$T/seen"
    echo "JOB=$JOBSPOOL_JOB IFACE=$JOBSPOOL_INTERFACE SPOOL=$JOBSPOOL_SPOOL" >> "$T/seen"
    cat "$3" > "$T/content"
    """
    script = site.script("handler", body)
    iface = {"schema": "schemas/order.xsd", "command": [script, "--mode", "import all"]}
    site.configure({"orders_in": iface})
    site.init()
    site.start()
    site.drop("orders_in", "order-3.xml", order(3))
    site.wait_in("order-3.xml", "bak/orders_in")
    seen = (site.dir / "seen").read_text().splitlines()
    assert seen == [
        "ARG=--mode",
        "ARG=import all",
        f"ARG={site.root / 'queue/orders_in/order-3.xml'}",
        f"JOB=order-3.xml IFACE=orders_in SPOOL={site.root}",
    ]
    assert (site.dir / "content").read_bytes() == order(3)


# --- failures ------------------------------------------------------------------------------


def test_a_handler_exiting_3_sends_the_job_to_joberrors_with_its_stderr(site):
    # Output is untrusted text too: control characters and bytes that are not UTF-8.
    started(site, 'echo "order 17: unknown customer 4711" >&2\nprintf "\\001\\377]]><x/>"\nexit 3')
    site.drop("orders_in", "order-17.xml")
    site.wait_in("order-17.xml", "joberrors")
    assert site.ok("status", "order-17.xml").strip() == "joberrors"
    (r,) = ran(site, "order-17.xml", None)
    assert r.get("outcome") == "failed"
    assert r.get("exit-status") == "3"
    assert "order 17: unknown customer 4711" in outputs(r)["stderr"].text
    assert outputs(r)["stdout"].text.endswith("]]><x/>")
    assert kinds(site.log("order-17.xml"))[-1] == "moved"
    assert site.ok("log", "order-17.xml").encode() == site.log("order-17.xml").read_bytes()


def test_a_handler_over_its_timeout_is_killed_with_its_whole_process_group(site):
    body = 'sleep 300 &\necho $! > "$T/child.pid"\necho working\nsleep 30'
    started(site, body, timeout=1)
    site.drop("orders_in", "slow.xml")
    site.wait_in("slow.xml", "joberrors")  # well before the 30 s the handler wanted
    (r,) = ran(site, "slow.xml", None)
    assert r.get("outcome") == "failed"
    assert r.get("timed-out") == "true"
    assert "timed out" in r.get("reason")
    assert outputs(r)["stdout"].text == "working\n"
    grandchild = int((site.dir / "child.pid").read_text())
    site.wait_for(lambda: not pid_alive(grandchild), f"the handler's child {grandchild} to die")


PY_BOOKING = """
import os


def handle(job):
    sku = job.tree.getroot().findtext("sku")
    line = f"{job.name} {job.interface} {job.path} {sku}\\n"
    with open(os.path.join(os.environ["T"], "ledger"), "a") as f:
        f.write(line)
"""


def test_a_python_handler_gets_the_job_with_its_parsed_tree(site):
    site.module("booking", PY_BOOKING)
    site.configure({"orders_in": {"schema": "schemas/order.xsd", "handler": "booking:handle"}})
    site.init()
    site.start()
    site.drop("orders_in", "order-5.xml", order(5, sku="HAM-5"))
    site.wait_for(
        lambda: site.where("order-5.xml") in (["bak/orders_in"], ["joberrors"]), "its outcome"
    )
    assert site.where("order-5.xml") == ["bak/orders_in"], site.describe()
    queued = site.root / "queue/orders_in/order-5.xml"
    assert (site.dir / "ledger").read_text() == f"order-5.xml orders_in {queued} HAM-5\n"


def test_a_python_handler_raising_sends_the_job_to_joberrors_with_its_traceback(site):
    site.module(
        "failing_handlers",
        "def handle(job):\n    raise ValueError('no such customer in ' + job.name)\n",
    )
    site.configure(
        {"orders_in": {"schema": "schemas/order.xsd", "handler": "failing_handlers:handle"}}
    )
    site.init()
    site.start()
    site.drop("orders_in", "order-9.xml")
    site.wait_in("order-9.xml", "joberrors")
    (r,) = ran(site, "order-9.xml", None)
    assert r.get("outcome") == "failed"
    assert r.get("handler") == "python:failing_handlers:handle"
    trace = child(r, "traceback")
    assert trace is not None
    assert trace.text.startswith("Traceback (most recent call last):")
    assert "failing_handlers.py" in trace.text
    assert "ValueError: no such customer in order-9.xml" in trace.text


def test_a_python_handler_calling_sys_exit_fails_its_job_and_the_lane_goes_on(site):
    site.module(
        "exiting_handlers",
        "import sys\n\n\ndef handle(job):\n    if job.name == 'a.xml':\n        sys.exit(3)\n",
    )
    site.configure(
        {"orders_in": {"schema": "schemas/order.xsd", "handler": "exiting_handlers:handle"}}
    )
    site.init()
    site.start()
    site.drop("orders_in", "a.xml")
    site.drop("orders_in", "b.xml")
    site.wait_in("b.xml", "bak/orders_in", timeout=6)
    assert site.where("a.xml") == ["joberrors"]
    (r,) = ran(site, "a.xml", None)
    assert r.get("outcome") == "failed"


def test_a_megabyte_of_output_leaves_a_small_log(site):
    body = "head -c 1000000 /dev/zero | tr '\\0' x\necho\necho END-OF-OUTPUT"
    started(site, body)
    site.drop("orders_in", "chatty.xml")
    site.wait_in("chatty.xml", "bak/orders_in")
    log = site.log("chatty.xml", "orders_in")
    (r,) = ran(site, "chatty.xml")
    out = outputs(r)["stdout"]
    assert int(out.get("truncated")) > 0
    assert int(out.get("truncated")) >= 1000000 - 65536
    assert out.text.startswith("xxxx")
    assert out.text.endswith("END-OF-OUTPUT\n")
    assert log.stat().st_size < 100_000


# --- pause, resume ------------------------------------------------------------------------


def test_a_paused_interface_accepts_jobs_but_runs_them_only_after_resume(site):
    daemon = started(site)
    assert site.ok("pause", "orders_in").strip() == "orders_in paused"
    names = ["p-3.xml", "p-1.xml", "p-2.xml"]
    for name in names:
        site.drop("orders_in", name)
    site.wait_for(lambda: site.ls("queue", "orders_in") == sorted(names), "jobs accepted")
    time.sleep(2.5)  # the lane looks at the pause marker every second
    assert site.ls("queue", "orders_in") == sorted(names)
    assert site.ls("bak", "orders_in") == []
    assert ledger(site) == []
    row = interfaces(site)["orders_in"]
    assert (row["paused"], row["queued"]) == (True, 3)

    assert site.ok("resume", "orders_in").strip() == "orders_in resumed"
    site.wait_for(lambda: site.ls("bak", "orders_in") == sorted(names), "jobs handled")
    assert ledger(site) == names
    assert interfaces(site)["orders_in"]["paused"] is False
    assert daemon.running()


# --- signals -------------------------------------------------------------------------------


def test_sigterm_while_working_loses_nothing_and_a_restart_finishes(site):
    daemon = started(site, LEDGER + "\nsleep 0.05")
    names = [f"job-{i:03d}.xml" for i in range(100)]
    random.Random(100).shuffle(names)
    for name in names:
        site.drop("orders_in", name)
    site.wait_for(
        lambda: not site.ls("incoming", "orders_in") and len(site.ls("bak", "orders_in")) >= 10,
        "all taken, some handled",
    )
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert daemon.said("stopped")

    places = site.places()
    assert sorted(places) == sorted(names)  # none lost, nothing else
    for name, where in places.items():
        assert len(where) == 1, (name, where)
        assert where[0] in ("queue/orders_in", "bak/orders_in", "joberrors"), (name, where)
    assert site.ls("joberrors") == []
    handled = site.ls("bak", "orders_in")
    assert 10 <= len(handled) < 100, "SIGTERM came too late to test anything"
    assert set(handled) <= set(ledger(site))
    assert site.ls("queue", "orders_in") == sorted(set(names) - set(handled))

    site.once()
    assert site.ls("bak", "orders_in") == sorted(names)
    assert site.ls("queue", "orders_in") == []
    first_runs = list(dict.fromkeys(ledger(site)))
    assert first_runs == names  # the queue kept its order across the restart


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_lets_a_running_handler_finish_within_the_grace_period(site, sig):
    daemon = started(site, 'touch "$T/began"\nsleep 1\necho "$JOBSPOOL_JOB" >> "$T/ledger"')
    site.drop("orders_in", "busy.xml")
    site.wait_for(lambda: (site.dir / "began").exists(), "the handler to start")
    daemon.signal(sig)
    assert daemon.wait() == 0
    assert site.where("busy.xml") == ["bak/orders_in"]
    assert ledger(site) == ["busy.xml"]


def test_sigterm_after_the_grace_period_kills_the_handler_and_keeps_the_job_queued(site):
    body = 'echo $$ > "$T/handler.pid"\nsleep 60'
    site.configure({"orders_in": orders_in(site, body)}, grace="1s")
    site.init()
    daemon = site.start()
    site.drop("orders_in", "stuck.xml")
    site.wait_for(lambda: (site.dir / "handler.pid").exists(), "the handler to start")
    handler = int((site.dir / "handler.pid").read_text())
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert not pid_alive(handler)
    assert site.where("stuck.xml") == ["queue/orders_in"]
    # It runs again after the restart (handlers run at least once).
    site.script("handler", LEDGER)
    site.once()
    assert site.where("stuck.xml") == ["bak/orders_in"]
    assert ledger(site) == ["stuck.xml"]


def test_sighup_adds_an_interface(site):
    site.configure({"orders_in": orders_in(site)})
    site.init()
    daemon = site.start()
    assert not (site.root / "incoming/stock_in").exists()

    stock = {"command": [site.script("stock-handler", LEDGER)]}
    site.configure({"orders_in": orders_in(site), "stock_in": stock})
    daemon.signal(signal.SIGHUP)
    site.wait_for((site.root / "incoming/stock_in").is_dir, "incoming/stock_in")
    site.drop("stock_in", "stock-1.xml", b"<stock><item sku='A'>5</item></stock>\n")
    site.wait_in("stock-1.xml", "bak/stock_in")
    site.drop("orders_in", "order-1.xml")
    site.wait_in("order-1.xml", "bak/orders_in")
    assert ledger(site) == ["stock-1.xml", "order-1.xml"]
    assert daemon.said("reloaded")
    assert daemon.running()
    assert daemon.stop() == 0


def test_sighup_gives_the_next_job_the_new_handler(site):
    daemon = started(site)
    site.drop("orders_in", "before.xml")
    site.wait_in("before.xml", "bak/orders_in")
    v2 = site.script("handler-v2", 'echo "v2:$JOBSPOOL_JOB" >> "$T/ledger"')
    site.configure({"orders_in": {"schema": "schemas/order.xsd", "command": [v2]}})
    daemon.signal(signal.SIGHUP)
    site.wait_for(lambda: daemon.said("reloaded"), "the reload")
    site.drop("orders_in", "after.xml")
    site.wait_in("after.xml", "bak/orders_in")
    assert ledger(site) == ["before.xml", "v2:after.xml"]


def test_a_broken_configuration_at_start_exits_78_in_one_line(site):
    site.configure({"orders_in": orders_in(site)})
    site.init()
    site.config.write_text(site.config.read_text() + "colour: blue\n")
    result = site.run("daemon", timeout=30)
    assert result.returncode == 78, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("jobspool: ")
    assert str(site.config) in lines[0]
    assert "colour" in lines[0]


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param("interfaces:\n  orders_in: {colour: blue\n", id="not-yaml"),
        pytest.param("interfaces:\n  orders_in:\n    colour: blue\n", id="unknown-key"),
    ],
)
def test_sighup_with_a_broken_configuration_keeps_the_old_one(site, broken):
    daemon = started(site)
    site.config.write_text(broken)
    daemon.signal(signal.SIGHUP)
    errors = site.wait_for(
        lambda: [line for line in daemon.lines() if line.get("level") == "error"],
        "an error line about the reload",
    )
    assert str(site.config) in errors[0]["error"]
    assert daemon.running()
    site.drop("orders_in", "order-1.xml")
    site.wait_in("order-1.xml", "bak/orders_in")
    assert ledger(site) == ["order-1.xml"]
    assert daemon.stop() == 0


def test_sighup_with_a_schema_that_does_not_compile_keeps_the_old_configuration(site):
    daemon = started(site)
    (site.dir / "schemas/broken.xsd").write_text("this is not a schema\n")
    handler = site.script("handler", LEDGER)
    site.configure({"orders_in": {"schema": "schemas/broken.xsd", "command": [handler]}})
    daemon.signal(signal.SIGHUP)
    site.wait_for(
        lambda: (
            [line for line in daemon.lines() if line.get("level") == "error"]
            or daemon.said("reloaded")
        ),
        "the daemon to answer the reload",
    )
    assert not daemon.said("reloaded")
    site.drop("orders_in", "order-1.xml")
    site.wait_in("order-1.xml", "bak/orders_in", timeout=6)


def test_a_schema_that_does_not_compile_stops_the_daemon_at_start_with_78(site):
    (site.dir / "schemas/broken.xsd").write_text("this is not a schema\n")
    handler = site.script("handler", LEDGER)
    site.configure({"orders_in": {"schema": "schemas/broken.xsd", "command": [handler]}})
    site.init()
    assert site.run("daemon", "--check").returncode == 78  # what ExecReload= runs
    site.drop("orders_in", "order-1.xml")
    daemon = site.start("--once", ready=False)
    code = daemon.wait(6)
    assert code == 78
    lines = daemon.text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobspool: "), lines
    assert "broken.xsd" in lines[0]
    assert site.where("order-1.xml") == ["incoming/orders_in"]


def test_a_second_daemon_on_the_same_spool_exits_75_naming_the_first(site):
    first = started(site)
    second = site.run("daemon", timeout=30)
    assert second.returncode == 75, (second.stdout, second.stderr)
    lines = second.stderr.splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith("jobspool: ")
    assert str(first.pid) in lines[0]
    # The first one goes on undisturbed.
    site.drop("orders_in", "order-1.xml")
    site.wait_in("order-1.xml", "bak/orders_in")
    assert first.stop() == 0


# --- hostile drops ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("a b.xml", id="space"),
        pytest.param("bad\nname.xml", id="newline"),
        pytest.param("x" * 246 + ".xml", id="250-chars"),
        pytest.param("-rf.xml", id="leading-dash"),
        pytest.param(os.fsdecode(b"caf\xe9.xml"), id="latin1-bytes"),
        pytest.param("a,log.xml", id="like-a-log"),
    ],
)
def test_a_file_with_an_invalid_name_goes_to_joberrors_under_a_safe_name(site, bad):
    started(site)
    data = order("hostile")
    site.drop("orders_in", bad, data)
    site.wait_for(lambda: site.ls("joberrors"), "the file in joberrors")
    (name,) = site.ls("joberrors")
    assert is_valid(name)
    assert (site.root / "joberrors" / name).read_bytes() == data
    (received,) = log_events(site.log(name), "received")
    assert received.get("original-name") == escape_name(bad)
    assert "invalid job name" in received.get("reason")
    assert site.ok("status", name).strip() == "joberrors"
    assert os.listdir(site.root / "incoming/orders_in") == []
    assert ledger(site) == []


def test_a_file_whose_name_is_in_use_is_processed_under_a_derived_name_overwriting_nothing(site):
    started(site)
    site.drop("orders_in", "dup.xml", order("original"))
    site.wait_in("dup.xml", "bak/orders_in")
    bak = site.root / "bak/orders_in"
    job_before = (bak / "dup.xml").read_bytes()
    log_before = (bak / "dup.xml,log.xml").read_bytes()

    site.drop("orders_in", "dup.xml", order("impostor"))
    site.wait_for(lambda: len(site.ls("bak", "orders_in")) == 2, "the second dup.xml done")
    (name,) = [n for n in site.ls("bak", "orders_in") if n != "dup.xml"]
    assert re.fullmatch(r"dup\.\d{8}T\d{6}\.\d{3}\.xml", name)
    assert (bak / name).read_bytes() == order("impostor")
    (received,) = log_events(site.log(name, "orders_in"), "received")
    assert received.get("original-name") == "dup.xml"
    assert site.ls("joberrors") == []
    assert (bak / "dup.xml").read_bytes() == job_before
    assert (bak / "dup.xml,log.xml").read_bytes() == log_before
    assert ledger(site) == ["dup.xml", name]


def _secret(s: Site) -> tuple[str, bytes]:
    """A file outside the spool whose content must never show up anywhere."""
    marker = f"TOP-SECRET-{random.Random(7).getrandbits(64):x}"
    path = s.dir / "secret.xml"
    path.write_bytes(order(1, sku=marker))  # a valid order: following the link would take it
    return marker, path.read_bytes()


def _nowhere(s: Site, marker: str) -> None:
    for path in [*s.root.rglob("*,log.xml"), *(s.dir.glob("daemon-*.stderr"))]:
        assert marker.encode() not in path.read_bytes(), f"the secret leaked into {path}"


def test_a_symlink_drop_goes_to_joberrors_as_a_symlink_unread(site):
    marker, data = _secret(site)
    started(site)
    link = site.root / "incoming/orders_in/link.xml"
    os.symlink(site.dir / "secret.xml", link)
    site.wait_for(lambda: site.ls("joberrors"), "the link in joberrors")
    (name,) = site.ls("joberrors")
    moved = site.root / "joberrors" / name
    assert os.path.islink(moved)
    assert os.readlink(moved) == str(site.dir / "secret.xml")
    (received,) = log_events(site.log(name), "received")
    assert "not a regular file" in received.get("reason")
    assert (site.dir / "secret.xml").read_bytes() == data
    assert site.ls("bak", "orders_in") == []
    assert ledger(site) == []
    _nowhere(site, marker)


def test_a_document_with_a_doctype_is_rejected_without_reading_its_entities(site):
    marker, _ = _secret(site)
    started(site)
    xxe = (
        '<?xml version="1.0"?>\n'
        f'<!DOCTYPE order [<!ENTITY s SYSTEM "file://{site.dir / "secret.xml"}">]>\n'
        '<order id="1"><sku>&s;</sku><qty>1</qty></order>\n'
    ).encode()
    site.drop("orders_in", "xxe.xml", xxe)
    site.wait_in("xxe.xml", "joberrors")
    assert (site.root / "joberrors/xxe.xml").read_bytes() == xxe
    (checked,) = log_events(site.log("xxe.xml"), "checked")
    assert checked.get("outcome") == "rejected"
    assert "DOCTYPE" in child(checked, "error").text
    assert ledger(site) == []
    _nowhere(site, marker)


def test_an_unreadable_drop_is_reported_and_left_in_place(nobody_site):
    s = nobody_site
    s.configure({"orders_in": orders_in(s)})
    s.init()
    for path in [s.dir, *s.dir.rglob("*")]:
        os.lchown(path, NOBODY, NOBODY)
    # A partner's 0600 upload the daemon's user cannot read.
    incoming = s.root / "incoming/orders_in"
    hidden = incoming / ".private.xml.upload"
    hidden.write_bytes(order("private"))
    os.chmod(hidden, 0o600)
    os.rename(hidden, incoming / "private.xml")
    assert os.stat(incoming / "private.xml").st_uid == 0

    daemon = s.start(user=NOBODY)
    s.drop("orders_in", "fine.xml")  # a readable one, to show the daemon works meanwhile
    s.wait_in("fine.xml", "bak/orders_in")
    reported = s.wait_for(
        lambda: [
            line
            for line in daemon.lines()
            if line.get("level") == "error" and line.get("job") == "private.xml"
        ],
        "an error line about private.xml",
    )
    assert "private.xml" in reported[0]["error"]
    time.sleep(2.5)  # a rescan (every 2 s) later, it is still there, untouched
    assert daemon.running()
    assert sorted(os.listdir(incoming)) == ["private.xml"]
    st = os.stat(incoming / "private.xml")
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    assert (incoming / "private.xml").read_bytes() == order("private")
    assert s.ls("joberrors") == []
    assert ledger(s) == ["fine.xml"]
    assert s.check_logs() == 1
    assert daemon.stop() == 0


def test_a_job_that_fails_its_check_goes_to_joberrors_with_line_and_column(site):
    started(site)
    bad = b'<?xml version="1.0"?>\n<order id="2">\n  <sku>HAM-1</sku>\n  <qty>-4</qty>\n</order>\n'
    site.drop("orders_in", "order-2.xml", bad)
    site.wait_in("order-2.xml", "joberrors")
    assert (site.root / "joberrors/order-2.xml").read_bytes() == bad
    (checked,) = log_events(site.log("order-2.xml"), "checked")
    assert checked.get("outcome") == "rejected"
    error = child(checked, "error")
    assert (error.get("line"), "qty" in error.text) == ("4", True)
    assert kinds(site.log("order-2.xml")) == ["received", "checked", "moved"]
    assert ledger(site) == []  # the handler never saw it


def test_a_file_over_max_size_goes_to_joberrors(site):
    started(site, max_size="1KB")
    big = order("big", sku="B" * 2000)
    site.drop("orders_in", "big.xml", big)
    site.wait_in("big.xml", "joberrors")
    assert (site.root / "joberrors/big.xml").read_bytes() == big  # all of it, not a cut copy
    (checked,) = log_events(site.log("big.xml"), "checked")
    assert checked.get("outcome") == "rejected"
    assert "max_size" in child(checked, "error").text
    assert ledger(site) == []


def test_a_named_pipe_dropped_goes_to_joberrors_without_blocking_the_daemon(site):
    started(site)
    os.mkfifo(site.root / "incoming/orders_in/pipe.xml")
    site.wait_for(lambda: site.ls("joberrors"), "the pipe in joberrors")
    (name,) = site.ls("joberrors")
    assert stat.S_ISFIFO(os.lstat(site.root / "joberrors" / name).st_mode)
    (received,) = log_events(site.log(name), "received")
    assert "not a regular file" in received.get("reason")
    site.drop("orders_in", "after.xml")
    site.wait_in("after.xml", "bak/orders_in")


def test_a_job_another_program_puts_into_the_queue_is_handled(site):
    started(site)
    queue = site.root / "queue/orders_in"
    (queue / ".direct.xml.tmp").write_bytes(order("direct"))
    os.rename(queue / ".direct.xml.tmp", queue / "direct.xml")
    site.wait_in("direct.xml", "bak/orders_in")
    assert ledger(site) == ["direct.xml"]
    assert log_events(site.log("direct.xml", "orders_in"), "received")[0].get("via") == "queue"


def test_a_badly_named_file_put_into_the_queue_goes_to_joberrors(site):
    daemon = started(site)
    queue = site.root / "queue/orders_in"
    (queue / "bad name.xml").write_bytes(order("bad"))
    site.wait_for(lambda: site.ls("joberrors"), "the file in joberrors")
    (name,) = site.ls("joberrors")
    assert is_valid(name)
    (received,) = log_events(site.log(name), "received")
    assert received.get("original-name") == "bad name.xml"
    assert os.listdir(queue) == []
    assert ledger(site) == []
    assert daemon.running()


def test_a_drop_folder_removed_by_hand_comes_back_and_is_watched_again(site):
    daemon = started(site)
    shutil.rmtree(site.root / "incoming/orders_in")
    site.wait_for((site.root / "incoming/orders_in").is_dir, "incoming/orders_in again")
    site.drop("orders_in", "order-1.xml")
    site.wait_in("order-1.xml", "bak/orders_in")
    assert daemon.running()
