"""The daemon's entries in a real journal: priorities, readable messages, fields to query.

A real ``systemd-journald`` (Debian's systemd) runs for each test in a mount
namespace of its own (``unshare -m``), with a tmpfs over ``/run`` and its
journal directory bound to a folder of the test; the daemon runs in that
namespace too (``nsenter``), with its stderr in a file that
``$JOURNAL_STREAM`` names, as systemd would set it. What the sysadmin's
queries find (``journalctl -D DIR JOBSPOOL_JOB=X -p warning``) is what is
asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit import DEADLINE, JOBSPOOL, Site, wait_for

JOURNALD = next(
    (p for p in ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald")
     if os.path.exists(p)),
    "/lib/systemd/systemd-journald",
)  # fmt: skip


class Journald:
    """A systemd-journald in its own mount namespace, storing into ``store``."""

    def __init__(self, directory: Path) -> None:
        self.store = directory / "journal"
        self.store.mkdir()
        script = (
            "set -e; mount -t tmpfs -o mode=755 tmpfs /run; "
            "mkdir -p /run/log/journal /run/systemd/journal; "
            f"mount --bind '{self.store}' /run/log/journal; exec '{JOURNALD}'"
        )
        self.log = directory / "journald.out"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        socket = Path(f"/proc/{self.proc.pid}/root/run/systemd/journal/socket")
        wait_for(lambda: socket.is_socket() or self.proc.poll() is not None, "journald's socket")
        assert self.proc.poll() is None, self.log.read_text()

    def query(self, *args: str) -> list[dict[str, Any]]:
        """``journalctl -D STORE ARGS -o json``: the entries, oldest first."""
        result = subprocess.run(
            ["journalctl", "-D", str(self.store), "--no-pager", "-o", "json", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode in (0, 1), result.stderr  # 1: no entries (systemd 252)
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[Journald]:
    j = Journald(tmp_path)
    try:
        yield j
    finally:
        j.stop()


class InJournal:
    """``jobspool daemon`` inside journald's namespace, stderr a "journal stream"."""

    def __init__(self, site: Site, journald: Journald, env: dict[str, str] | None = None) -> None:
        self.stderr = site.dir / "daemon.stderr"
        with open(self.stderr, "wb") as err:
            st = os.fstat(err.fileno())
            environment = {
                **site.env(),
                "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
                **(env or {}),
            }
            self.proc = subprocess.Popen(
                ["nsenter", f"--target={journald.proc.pid}", "--mount", "--",
                 str(JOBSPOOL), "-c", str(site.config), "daemon"],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=environment, cwd=site.dir,
            )  # fmt: skip

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(DEADLINE)


def configure(site: Site) -> None:
    site.script("handler", 'case "$1" in *bad*) exit 3;; esac')
    site.module(
        "pyhandler",
        "def run(job):\n    raise ValueError('no such customer\\nsee line 2 of the order')\n",
    )
    site.configure(
        {
            "orders_in": {"schema": "schemas/order.xsd", "command": [str(site.dir / "handler")]},
            "stock_in": {"handler": "pyhandler:run"},
        }
    )
    site.init()


def entries_of(journald: Journald, job: str, *args: str) -> list[dict[str, Any]]:
    return journald.query(f"JOBSPOOL_JOB={job}", *args)


def test_the_daemon_writes_native_entries_a_sysadmin_can_query(
    site: Site, journald: Journald
) -> None:
    configure(site)
    daemon = InJournal(site, journald)
    try:
        wait_for(lambda: journald.query("JOBSPOOL_EVENT=ready"), "ready in the journal")
        site.drop("orders_in", "order-1001.xml")
        site.drop("orders_in", "bad-1.xml")
        site.drop("orders_in", "broken.xml", b"<order>")
        site.drop("stock_in", "stock-1.xml", b"<stock/>")
        for name, place in (("order-1001.xml", "bak/orders_in"), ("bad-1.xml", "joberrors"),
                            ("broken.xml", "joberrors"), ("stock-1.xml", "joberrors")):  # fmt: skip
            site.wait_in(name, place)

        # journalctl JOBSPOOL_JOB=X -p warning finds the failure, at priority err.
        failed = wait_for(lambda: entries_of(journald, "bad-1.xml", "-p", "warning"),
                          "the failure in the journal")  # fmt: skip
        assert len(failed) == 1, failed
        assert failed[0]["PRIORITY"] == "3"
        assert failed[0]["MESSAGE"] == "bad-1.xml failed: joberrors (exit 3)"
        assert failed[0]["SYSLOG_IDENTIFIER"] == "jobspool"
        assert failed[0]["JOBSPOOL_INTERFACE"] == "orders_in"
        assert failed[0]["JOBSPOOL_EVENT"] == "failed"
        assert failed[0]["JOBSPOOL_REASON"] == "exit 3"
        assert failed[0]["_TRANSPORT"] == "journal"  # native, not the stderr stream

        # A good job's life reads in plain words, and nothing of it is a warning.
        done = wait_for(lambda: [e for e in entries_of(journald, "order-1001.xml")
                                 if e["JOBSPOOL_EVENT"] == "done"], "done")  # fmt: skip
        assert done[0]["MESSAGE"] == "order-1001.xml done: bak/orders_in"
        assert done[0]["PRIORITY"] == "6"
        events = [e["JOBSPOOL_EVENT"] for e in entries_of(journald, "order-1001.xml")]
        assert events == ["accepted", "done"]
        assert entries_of(journald, "order-1001.xml", "-p", "warning") == []

        rejected = entries_of(journald, "broken.xml", "-p", "warning")
        assert [(e["PRIORITY"], e["JOBSPOOL_EVENT"]) for e in rejected] == [("4", "rejected")]
        assert rejected[0]["MESSAGE"].startswith("broken.xml rejected: joberrors (")

        # A value with a newline arrives whole (the protocol's binary-safe form).
        stock = wait_for(lambda: entries_of(journald, "stock-1.xml", "-p", "err"), "stock")
        assert (
            stock[0]["JOBSPOOL_REASON"] == "ValueError: no such customer\nsee line 2 of the order"
        )

        warnings = journald.query("-t", "jobspool", "-p", "warning")
        assert {e["JOBSPOOL_JOB"] for e in warnings} == {"bad-1.xml", "broken.xml", "stock-1.xml"}
        assert daemon.stop() == 0
        assert wait_for(lambda: journald.query("JOBSPOOL_EVENT=stopped"), "stopped")
    finally:
        daemon.stop()
    assert daemon.stderr.read_text() == ""  # every entry went natively


def test_a_journal_that_goes_away_loses_no_line(site: Site, journald: Journald) -> None:
    """Without journald's socket, entries fall back to stderr with their priority prefix."""
    configure(site)
    daemon = InJournal(site, journald)
    try:
        wait_for(lambda: journald.query("JOBSPOOL_EVENT=ready"), "ready in the journal")
        journald.stop()
        Path(f"/proc/{daemon.proc.pid}/root/run/systemd/journal/socket").unlink()
        site.drop("orders_in", "bad-2.xml")
        site.wait_in("bad-2.xml", "joberrors")
        line = "<3>bad-2.xml failed: joberrors (exit 3)\n"
        wait_for(lambda: line in daemon.stderr.read_text(), "the failure on stderr with its "
                 "priority", show=daemon.stderr.read_text)  # fmt: skip
    finally:
        daemon.stop()


def test_off_the_journal_lines_are_json_with_utc_timestamps(site: Site) -> None:
    configure(site)
    d = site.start()  # stderr is a file, $JOURNAL_STREAM unset: JSON lines
    site.drop("orders_in", "order-7.xml")
    site.wait_in("order-7.xml", "bak/orders_in")
    done = site.wait_for(lambda: d.said("done", job="order-7.xml"), "done")
    assert done[0]["timestamp"].endswith("+00:00"), done[0]
    assert d.stop() == 0


def test_a_setting_says_journal_and_a_wrong_one_is_refused(site: Site, journald: Journald) -> None:
    configure(site)
    # $JOBSPOOL_LOG=journal, whatever $JOURNAL_STREAM says (a wrapper between systemd and us).
    daemon = InJournal(site, journald, env={"JOURNAL_STREAM": "", "JOBSPOOL_LOG": "journal"})
    try:
        wait_for(lambda: journald.query("JOBSPOOL_EVENT=ready"), "ready in the journal")
    finally:
        daemon.stop()
    env = {**site.env(), "JOBSPOOL_LOG": "syslog"}
    bad = subprocess.run([str(JOBSPOOL), "-c", str(site.config), "daemon", "--once"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert bad.returncode == 78, bad
    assert bad.stderr == (
        "jobspool: $JOBSPOOL_LOG: expected auto, journal, json, console, got 'syslog'\n"
    )


def test_console_lines_honour_no_color(site: Site) -> None:
    """On a terminal: readable lines, coloured unless $NO_COLOR is set."""
    configure(site)
    script = shutil.which("script")
    assert script, "util-linux's script(1) gives the daemon a terminal"
    for no_color, coloured in (("", True), ("1", False)):
        out = site.dir / f"tty-{no_color or 'colour'}.txt"
        env = {**site.env(), "NO_COLOR": no_color, "TERM": "xterm"}
        if not no_color:
            env.pop("NO_COLOR")
        cmd = f"'{JOBSPOOL}' -c '{site.config}' daemon --once"
        subprocess.run([script, "-qec", cmd, str(out)], env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=60, check=True)  # fmt: skip
        text = out.read_text(errors="replace")
        assert "ready" in text, text
        assert ("\x1b[" in text) is coloured, text
