"""The real jobspool under the crash-consistency checker (tests/crashcheck).

One workload (tests/crashcheck/workload.py: init, the daemon, about 150
drops of every kind, submits, retries, a fetch, schedule results, and a
real ``jobspool serve`` taking uploads and serving downloads over TLS) is
recorded under strace, three times: as it is, with ``syncfs`` and ``fsync``
failing now and then, and with renames failing now and then (strace's
``-e inject=...:error=EIO``; jobspool's own renames are ``rename`` and
``renameat2``, the partners' ``renameat``, which never fails here). Each
run must show no acknowledgement that was not durable, no finished job
without a durable log at any instant, and no crash state (built at
acknowledgements and at random points, recovered with ``daemon --once``)
that loses, duplicates or damages an acknowledged job.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.crashcheck import trace as tracing
from tests.crashcheck import workload
from tests.crashcheck.checks import Checker, Report
from tests.kit import JOBSPOOL, Site, free_port, log_events, make_certificates

DROPS, SUBMITS, RETRIES = 150, 15, 5
UPLOADS, DOWNLOADS = 16, 4  # through jobspool serve: a quarter of the uploads invalid
RUNS = {
    "no faults": (),
    "sync failures": ("syncfs:error=EIO:when=3+6", "fsync:error=EIO:when=25+19"),
    "rename failures": ("rename:error=EIO:when=30+17", "renameat2:error=EIO:when=20+23"),
}
# Every kind of acknowledgement the workload must produce, so that each is checked.
KINDS = {"accepted", "rejected", "done", "failed", "submitted", "retried", "fetched", "schedule"}
HTTP = {"uploaded": 12, "rejected": 4, "downloaded": DOWNLOADS}  # the server's answers


def durability(tmp_path: Path, inject: tuple[str, ...], seed: int) -> Report:
    """Record the workload under strace and check it; the checker's report."""
    site = tmp_path / "site"
    site.mkdir()
    make_certificates(site)
    port = free_port()
    config = workload.prepare(site, port)
    output = tmp_path / "trace"
    argv = [sys.executable, workload.__file__, str(site), str(JOBSPOOL), str(seed)]
    argv += [str(n) for n in (DROPS, SUBMITS, RETRIES, UPLOADS, DOWNLOADS, port)]
    run = tracing.record(argv, output, inject=inject, cwd=site)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "gave up" not in run.stderr, run.stderr[-3000:]  # every step of the day was played
    print(f"HTTP requests answered 5xx and sent again: {run.stderr.count('answered 5')}")
    manifest = json.loads((site / "manifest.json").read_text())
    checker = Checker(
        tracing.parse(output), site, config, site / "spool",
        expected={name: bytes.fromhex(data) for name, data in manifest.items()},
        clients=[Path(workload.__file__).name],
        jobspool=JOBSPOOL, seed=seed, points=8, random_points=3, subsets=1,
    )  # fmt: skip
    checker.check()
    checker.crash(tmp_path / "crash")
    print(checker.report.summary())
    return checker.report


@pytest.mark.parametrize("faults", list(RUNS))
def test_every_acknowledgement_is_durable_and_every_crash_recovers(
    tmp_path: Path, faults: str
) -> None:
    report = durability(tmp_path, RUNS[faults], seed=20261203)
    assert set(report.acks) >= KINDS | set(HTTP), report.summary()
    assert report.http == HTTP, report.summary()  # every answer of the server was checked
    if faults != "no faults":  # the faults did happen, and the daemon lived on
        assert report.injected, report.summary()
    assert report.surprises == [], report.summary()  # the model followed every call
    assert report.crash_states > 0
    assert report.recovered == report.crash_states, report.summary()
    assert report.findings == [], report.summary()


def test_accepted_is_said_only_after_a_sync_that_worked(tmp_path: Path) -> None:
    """The daemon's first syncs fail: its accepted drops wait, unreported, for one that works."""
    site = tmp_path / "site"
    site.mkdir()
    config = workload.prepare(site)
    output = tmp_path / "trace"
    argv = [sys.executable, workload.__file__, str(site), str(JOBSPOOL), "7", "12", "0", "0"]
    run = tracing.record(argv, output, inject=("syncfs:error=EIO:when=1..3",), cwd=site)
    assert run.returncode == 0, run.stderr[-3000:]
    checker = Checker(tracing.parse(output), site, config, site / "spool", jobspool=JOBSPOOL)
    report = checker.check()
    print(report.summary())
    assert report.failed_syncs >= 3
    assert report.acks["accepted"] > 0, report.summary()
    assert report.of("acknowledged before durable") == [], report.summary()


def test_retry_racing_the_daemon_never_removes_the_new_log(site: Site, tmp_path: Path) -> None:
    """The daemon fails a retried job again while ``retry`` is still syncing: both logs stay.

    Every fsync of the retry is slowed (strace), so the daemon has the time
    to run the job and fail it again before the retry goes on to remove the
    old log from joberrors: the log it removes must not be the new one.
    """
    site.configure({"orders_in": {"schema": "schemas/order.xsd",
                                  "command": [site.script("fail", "exit 1")]}})  # fmt: skip
    site.init()
    daemon = site.start()
    site.drop("orders_in", "again.xml")
    site.wait_for(lambda: daemon.said("failed", job="again.xml"), "the first failure")
    argv = [str(JOBSPOOL), "-c", str(site.config), "retry", "again.xml"]
    retried = tracing.record(
        argv, tmp_path / "trace", inject=("fsync:delay_exit=400000",), env=site.env(), cwd=site.dir
    )
    assert retried.returncode == 0, retried.stderr
    site.wait_for(lambda: len(daemon.said("failed", job="again.xml")) == 2, "the second failure")
    assert site.where("again.xml") == ["joberrors"]
    log = site.log("again.xml")
    assert log.is_file(), site.describe()
    kinds = [e.tag.rsplit("}", 1)[-1] for e in log_events(log)]
    assert kinds.count("ran") == 2 and "retried" in kinds, kinds
