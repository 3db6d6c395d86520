"""Shell completion through the real command, as bash asks for it (docs/cli.rst).

bash's completion function runs ``jobspool`` with ``_JOBSPOOL_COMPLETE=bash_complete``,
the words of the line in ``COMP_WORDS`` and the index of the word under the
cursor in ``COMP_CWORD``; click answers ``TYPE,VALUE`` lines. These tests do
exactly that, on a real spool.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobspool import joblog
from tests.kit import JOBSPOOL, VALID, assert_ok, run

CONFIG = """\
spool: spool
interfaces:
  orders_in: {command: [/bin/true]}
  orders_out: {}
  stock_in: {command: [/bin/true]}
schedules:
  purge-old: {cron: "0 3 * * *", template: purge, with: {older_than: 30d}}
  stuck: {every: "0:05:00", template: stuck-queue, with: {older_than: 1h}}
  nightly-report: {at: "23:00", command: [/bin/true]}
http:
  users: htpasswd
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A spool with jobs in every state, three schedules and two HTTP users."""
    config = tmp_path / "jobspool.yaml"
    config.write_text(CONFIG)
    assert_ok(run("-c", str(config), "init"))
    spool = tmp_path / "spool"
    for name, folder in [
        ("order-1.xml", "incoming/orders_in"),
        ("order-2.xml", "queue/orders_in"),
        ("order-3.xml", "bak/orders_in"),
        ("out-1.xml", "queue/orders_out"),
        ("out-2.xml", "queue/orders_out"),
        ("stock-9.xml", "joberrors"),
    ]:
        (spool / folder / name).write_bytes(VALID)
    # what is not a job: a log beside its job, a hidden upload, a partial one
    log = joblog.new("order-3.xml", "orders_in")
    joblog.received(log, "drop")
    (spool / "bak/orders_in/order-3.xml,log.xml").write_bytes(joblog.to_bytes(log))
    (spool / "incoming/orders_in/.order-4.xml").write_bytes(VALID)
    (spool / "incoming/orders_in/order-5.xml.filepart").write_bytes(VALID)
    (tmp_path / "htpasswd").write_text("alice:$2y$05$x\nbob:$2y$05$y\n")
    return config


def complete(config: Path, line: str, extra_env: dict[str, str] | None = None) -> list[str]:
    """What bash gets for ``line`` (the cursor at its end): the values click offers."""
    words = line.split()
    if line.endswith(" "):
        words.append("")
    env = {
        **os.environ,
        "_JOBSPOOL_COMPLETE": "bash_complete",
        "COMP_WORDS": " ".join(words),
        "COMP_CWORD": str(len(words) - 1),
        "JOBSPOOL_CONFIG": str(config),
        **(extra_env or {}),
    }
    proc = subprocess.run(
        [str(JOBSPOOL)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return [ln.split(",", 1)[1] for ln in proc.stdout.splitlines() if ln]


def test_status_completes_every_job_of_the_spool_and_nothing_else(site):
    assert complete(site, "jobspool status ") == [
        "order-1.xml", "order-2.xml", "order-3.xml", "out-1.xml", "out-2.xml", "stock-9.xml",
    ]  # fmt: skip
    assert complete(site, "jobspool status order-") == ["order-1.xml", "order-2.xml", "order-3.xml"]
    assert complete(site, "jobspool status order-1.xml o") == [
        "order-1.xml", "order-2.xml", "order-3.xml", "out-1.xml", "out-2.xml",
    ]  # fmt: skip


def test_each_command_completes_the_jobs_it_can_take(site):
    assert complete(site, "jobspool log ") == ["order-3.xml", "stock-9.xml"]
    assert complete(site, "jobspool retry ") == ["stock-9.xml"]
    assert complete(site, "jobspool fetch orders_out --to /tmp ") == ["out-1.xml", "out-2.xml"]
    assert complete(site, "jobspool fetch orders_out --to /tmp out-2") == ["out-2.xml"]


def test_interfaces_schedule_ids_and_users_complete(site):
    assert complete(site, "jobspool queue ") == ["orders_in", "orders_out", "stock_in"]
    assert complete(site, "jobspool pause ord") == ["orders_in", "orders_out"]
    assert complete(site, "jobspool schedule show ") == ["nightly-report", "purge-old", "stuck"]
    assert complete(site, "jobspool schedule run p") == ["purge-old"]
    assert complete(site, "jobspool user passwd ") == ["alice", "bob"]
    assert complete(site, "jobspool user remove b") == ["bob"]
    assert complete(site, "jobspool schedule chown stuck roo") == ["root"]


def test_the_config_option_on_the_line_is_the_one_completed_from(site, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("spool: spool2\ninterfaces:\n  people_in: {command: [/bin/true]}\n")
    assert complete(site, f"jobspool -c {other} queue ") == ["people_in"]


def test_without_a_configuration_nothing_is_offered_and_nothing_is_printed(tmp_path):
    assert complete(tmp_path / "missing.yaml", "jobspool status ") == []
    assert complete(tmp_path / "missing.yaml", "jobspool schedule show ") == []


def test_job_names_are_listed_without_lxml_and_without_a_stat_per_job(site):
    bak = site.parent / "spool" / "bak" / "orders_in"
    for i in range(300):
        (bak / f"many-{i:03}.xml").write_bytes(b"<x/>")
    # lxml: the completer runs in a process that reports what it imported
    probe = (
        "import atexit, sys; "
        "atexit.register(lambda: print('lxml' in sys.modules, file=sys.stderr)); "
        "from jobspool.cli import main; main()"
    )
    env = {
        **os.environ,
        "_JOBSPOOL_COMPLETE": "bash_complete",
        "COMP_WORDS": "jobspool status many-29",
        "COMP_CWORD": "2",
        "JOBSPOOL_CONFIG": str(site),
    }
    proc = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.splitlines() == [f"plain,many-29{i}.xml" for i in range(10)]
    assert proc.stderr.strip() == "False"
    # stat: strace shows every system call that names a file (stat, open, access...)
    trace = site.parent / "trace"
    subprocess.run(
        ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=%file", str(JOBSPOOL)],
        env={**env, "COMP_WORDS": "jobspool status "},
        capture_output=True,
        timeout=60,
        check=True,
    )
    calls = trace.read_text()
    assert re.search(r"open.*/bak/orders_in\"", calls), "the folder's listing was not seen"
    per_job = [ln for ln in calls.splitlines() if "/bak/orders_in/many-" in ln]
    assert per_job == []
