"""What a sysadmin sees of a spool: ``interfaces``, ``daemon-status``, read commands refused.

Drop folders count in ``interfaces`` (files waiting to be taken), the last line
says whether a daemon serves the spool, and ``daemon-status`` answers that
with an exit code for monitoring checks. A user outside the spool's group
gets exit 77 and a one-line hint from every read command, not "internal error".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit import JOBSPOOL, Site, assert_fails, order, reachable_by_others, read_table

NOBODY = 65534


def configure(site: Site) -> None:
    site.configure(
        {
            "orders_in": {"schema": "schemas/order.xsd", "command": ["/bin/true"]},
            "orders_out": {"schema": "schemas/order.xsd"},
        }
    )
    site.init()


def test_interfaces_counts_dropped_files_and_names_no_daemon(site: Site) -> None:
    configure(site)
    for n in range(3):
        site.drop("orders_in", f"waiting-{n}.xml")
    (site.root / "incoming/orders_in/.half.xml.upload").write_bytes(b"<ord")  # in progress
    out = site.ok("interfaces")
    rows = {row["INTERFACE"]: row for row in read_table(out)}
    assert rows["orders_in"]["INCOMING"] == "3"
    assert rows["orders_out"]["INCOMING"] == "0"
    assert out.rstrip("\n").splitlines()[-1] == (
        f"no daemon serves {site.root}: dropped files and queued jobs wait"
    )
    data = json.loads(site.ok("interfaces", "--json"))
    assert [(r["interface"], r["incoming"], r["daemon_pid"]) for r in data] == [
        ("orders_in", 3, None),
        ("orders_out", 0, None),
    ]


def test_daemon_status_follows_the_daemon(site: Site) -> None:
    configure(site)
    result = site.run("daemon-status")
    assert result.returncode == 75, result
    assert result.stdout == f"no daemon serves {site.root}: dropped files and queued jobs wait\n"

    daemon = site.start()
    result = site.run("daemon-status")
    assert result.returncode == 0, result
    assert result.stdout == f"daemon pid {daemon.pid} serves {site.root}\n"
    assert json.loads(site.ok("daemon-status", "--json")) == {
        "spool": str(site.root),
        "running": True,
        "pid": daemon.pid,
    }
    out = site.ok("interfaces")
    assert out.rstrip("\n").splitlines()[-1] == f"daemon pid {daemon.pid} serves {site.root}"

    # The lock, not the pid left in the file, says it: a killed daemon is not running.
    daemon.kill()
    assert (site.root / "state/daemon.lock").read_text().strip() == str(daemon.pid)
    result = site.run("daemon-status")
    assert result.returncode == 75, result


def test_monitoring_checks_never_keep_a_daemon_from_starting(site: Site) -> None:
    """A check that runs while the daemon starts takes the lock for an instant only."""
    configure(site)
    checker = subprocess.Popen(
        ["sh", "-c", f'while :; do "{JOBSPOOL}" -c "{site.config}" daemon-status >/dev/null; done'],
        env=site.env(),
    )
    try:
        for _ in range(3):
            daemon = site.start()
            assert daemon.stop() == 0
    finally:
        checker.kill()
        checker.wait()


@pytest.fixture
def closed_site() -> Iterator[Site]:
    """A spool whose root is root's alone (0750 root:root): nobody may not look inside."""
    base = tempfile.mkdtemp(prefix="jobspool-closed-", dir="/tmp")
    os.chmod(base, 0o755)
    s = Site(Path(base))
    try:
        configure(s)
        s.drop("orders_in", "order-1.xml", order(1))
        os.chmod(s.root, 0o750)
        with reachable_by_others(JOBSPOOL):
            yield s
    finally:
        s.kill_all()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["status", "order-1.xml"], id="status"),
        pytest.param(["status", "order-1.xml", "order-2.xml"], id="status-many"),
        pytest.param(["queue", "orders_in"], id="queue"),
        pytest.param(["log", "order-1.xml"], id="log"),
        pytest.param(["interfaces"], id="interfaces"),
        pytest.param(["daemon-status"], id="daemon-status"),
    ],
)
def test_read_commands_outside_the_group_exit_77_with_a_hint(
    closed_site: Site, args: list[str]
) -> None:
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            str(JOBSPOOL), "-c", str(closed_site.config), *args]  # fmt: skip
    result = subprocess.run(
        argv, capture_output=True, text=True, env=closed_site.env(), cwd="/", timeout=60
    )
    line = assert_fails(subprocess.CompletedProcess(argv, result.returncode, result.stdout,
                                                    result.stderr), 77)  # fmt: skip
    assert "Permission denied" in line
    assert "the read commands need the spool's group root (usermod -aG root USER" in line
