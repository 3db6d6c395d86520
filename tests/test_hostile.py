"""Hostile partners: hostile XML and hostile names on every way into the spool.

**Hostile XML.** One table of documents (:data:`tests.kit.hostile.HOSTILE`) is
sent down all three ways a job comes in: ``jobspool check``, ``jobspool
submit`` and a drop folder watched by a real daemon. Every one is rejected
with a one-line reason (``check``: exit 65; ``submit``: exit 65, the job in
``joberrors`` with its log; a drop: ``joberrors`` with its log) within 2 s,
with its peak memory bounded (the command's own ``ru_maxrss``, the daemon's
``VmHWM`` from ``/proc``), without a byte of a local secret showing up in any
output or log, without a single connection to the loopback listener the
documents point at, and the daemon goes on taking valid jobs.

**Hostile names** arrive as dropped files and as command arguments (``status``,
``log``, ``retry``, ``submit --name``, ``fetch JOB``): nothing escapes the
spool (the spool's parent and ``/`` are compared before and after), nothing
is overwritten, nothing is lost.

What ``tests/test_check.py`` and ``tests/test_daemon.py`` already cover (the
parser's defences in-process, a few hostile drop names, symlinks, FIFOs) is
not repeated here.

The promises tested here are in ``docs/spec.rst`` ("Jobs", "Commands and exit codes").
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobspool import intake, joblog, names
from jobspool.joblog import escape_name
from tests.kit import (
    HOSTILE,
    MEMORY_BOUND_KB,
    Bait,
    Daemon,
    Hostile,
    Listener,
    Site,
    assert_fails,
    child,
    log_events,
    measured,
    order,
    reason_ok,
    snapshot,
    surroundings,
    vm_hwm,
    wait_for,
)

MAX_SIZE = 256_000
WITHIN = 2.0  # seconds a hostile document may take to be rejected: none may exhaust us
LEDGER = 'echo "$JOBSPOOL_JOB" >> "$T/ledger"'

CASES = [pytest.param(case, id=case.id) for case in HOSTILE]


class Hostiles:
    """One spool for the whole module: a daemon, a listener, a secret, and what was learnt."""

    def __init__(self, site: Site, listener: Listener, bait: Bait) -> None:
        self.site = site
        self.listener = listener
        self.bait = bait
        self.daemon: Daemon | None = None
        self.hwm_before = 0  # the daemon's VmHWM once it has taken a valid job
        self.check_rss = 0  # ru_maxrss of a `check` of a valid job
        self.submit_rss = 0

    def run(self, *args: str):
        return measured(self.site.command(*args), env=self.site.env(), cwd=self.site.dir)

    def file(self, name: str, data: bytes) -> Path:
        path = self.site.outside / name
        path.write_bytes(data)
        return path

    def ledger(self) -> list[str]:
        try:
            return (self.site.dir / "ledger").read_text().split()
        except FileNotFoundError:
            return []

    def nothing_leaked(self, *texts: str) -> None:
        """No output, no log, no daemon line, no file in the spool holds the secret."""
        marker = self.bait.marker
        for text in texts:
            assert marker not in text
        for path in self.site.root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert marker.encode() not in path.read_bytes(), f"the secret leaked into {path}"
        for d in self.site.daemons:
            assert marker not in d.text(), "the secret leaked into the daemon's log"

    def no_connection(self) -> None:
        time.sleep(0.05)  # a connection attempt in flight is accepted by now
        assert self.listener.connections == [], "a check opened a connection"


@pytest.fixture(scope="module")
def hostiles(tmp_path_factory) -> Iterator[Hostiles]:
    site = Site(tmp_path_factory.mktemp("hostile"))
    iface = {"schema": "schemas/order.xsd", "max_size": f"{MAX_SIZE}", "timeout": "30s"}
    site.configure(
        {
            "orders_in": {**iface, "command": [site.script("handler", LEDGER)]},
            "orders_out": iface,
        }
    )
    site.init()
    listener = Listener()
    h = Hostiles(site, listener, Bait.make(site.dir, listener.url))
    try:
        h.daemon = site.start()
        site.drop("orders_in", "warm-up.xml")
        site.wait_in("warm-up.xml", "bak/orders_in")
        h.hwm_before = vm_hwm(h.daemon.pid)
        valid = h.file("valid.xml", order("valid"))
        h.check_rss = h.run("check", "orders_in", str(valid)).maxrss_kb
        submitted = h.run("submit", "orders_out", str(valid))
        assert submitted.returncode == 0, submitted.stderr
        h.submit_rss = submitted.maxrss_kb
        yield h
        assert h.daemon.running(), site.describe()
        assert site.started == 1, "the daemon had to be restarted"
        h.nothing_leaked()
        h.no_connection()
    finally:
        site.kill_all()
        listener.close()
    site.check_logs()


def rejected_log(site: Site, name: str) -> Any:
    """The ``checked`` event of a job rejected into joberrors (its log validated)."""
    (checked,) = log_events(site.log(name), "checked")
    assert checked.get("outcome") == "rejected"
    return checked


# --- hostile XML: jobspool check -------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_check_rejects_hostile_xml(hostiles, case: Hostile):
    site = hostiles.site
    job = hostiles.file(f"{case.id}.xml", case.data(hostiles.bait, MAX_SIZE))
    before = snapshot(site.root)

    result = hostiles.run("check", "orders_in", str(job))

    assert result.returncode == 65, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines, "no reason given"
    assert "Traceback" not in result.stderr
    for line in lines:  # FILE:LINE:COLUMN: message, one error a line
        assert re.match(re.escape(str(job)) + r":\d+:\d+: \S", line), line
    assert reason_ok(case, lines[0]), lines[0]
    assert result.seconds < WITHIN, result.seconds
    assert result.maxrss_kb < hostiles.check_rss + MEMORY_BOUND_KB
    hostiles.nothing_leaked(result.stdout, result.stderr)
    hostiles.no_connection()
    assert snapshot(site.root) == before  # check changes nothing


# --- hostile XML: jobspool submit --------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_submit_rejects_hostile_xml_into_joberrors(hostiles, case: Hostile):
    site = hostiles.site
    name = f"submitted-{case.id}.xml"
    data = case.data(hostiles.bait, MAX_SIZE)
    job = hostiles.file(name, data)

    result = hostiles.run("submit", "orders_in", str(job))

    line = assert_fails(result.as_completed([]), 65)
    assert name in line
    assert reason_ok(case, line), line
    assert result.stdout == ""
    assert result.seconds < WITHIN, result.seconds
    assert result.maxrss_kb < hostiles.submit_rss + MEMORY_BOUND_KB
    # In joberrors, all of it, with its log; queued nowhere.
    assert site.where(name) == ["joberrors"]
    assert (site.root / "joberrors" / name).read_bytes() == data
    checked = rejected_log(site, name)
    assert reason_ok(case, child(checked, "error").text)
    assert not (site.root / "state/pending" / names.log_name(name)).exists()
    shown = site.run("log", name)
    assert shown.returncode == 0
    hostiles.nothing_leaked(result.stderr, shown.stdout)
    hostiles.no_connection()


# --- hostile XML: the drop folder ------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_drop_is_rejected_and_the_daemon_goes_on(hostiles, case: Hostile):
    site, daemon = hostiles.site, hostiles.daemon
    assert daemon is not None
    name = f"dropped-{case.id}.xml"
    data = case.data(hostiles.bait, MAX_SIZE)

    dropped = time.monotonic()
    site.drop("orders_in", name, data)
    wait_for(
        lambda: site.where(name) == ["joberrors"],
        f"{name} in joberrors",
        timeout=WITHIN,
        interval=0.01,
        show=site.describe,
    )
    took = time.monotonic() - dropped
    assert took < WITHIN

    assert (site.root / "joberrors" / name).read_bytes() == data
    checked = rejected_log(site, name)
    assert reason_ok(case, child(checked, "error").text)
    (said,) = site.wait_for(lambda: daemon.said("rejected", job=name), "the daemon's line")
    assert reason_ok(case, said["reason"]), said
    grown = vm_hwm(daemon.pid) - hostiles.hwm_before
    assert grown < MEMORY_BOUND_KB, f"the daemon's peak memory grew by {grown} kB"
    hostiles.nothing_leaked()
    hostiles.no_connection()

    # It goes on: the next valid drop is handled as usual.
    assert daemon.running()
    after = f"after-{case.id}.xml"
    site.drop("orders_in", after)
    site.wait_in(after, "bak/orders_in")
    assert name not in hostiles.ledger()
    assert after in hostiles.ledger()


def test_a_valid_utf16_order_is_an_order_on_every_path(hostiles):
    # Not hostile: XML may be UTF-16. With its BOM, or without one but
    # declared, it is checked like any other document and kept byte for byte.
    site = hostiles.site
    text = order("utf16").decode().replace("UTF-8", "UTF-16")
    for variant, data in [("bom", text.encode("utf-16")), ("declared", text.encode("utf-16-le"))]:
        job = hostiles.file(f"utf16-{variant}.xml", data)
        assert hostiles.run("check", "orders_in", str(job)).returncode == 0
        assert hostiles.run("submit", "orders_out", str(job)).returncode == 0
        assert (site.root / "queue/orders_out" / job.name).read_bytes() == data
        site.drop("orders_in", f"dropped-utf16-{variant}.xml", data)
        site.wait_in(f"dropped-utf16-{variant}.xml", "bak/orders_in")


# --- hostile names in the drop folder ------------------------------------------------------

DROP_NAMES = [
    pytest.param("\x1b]0;owned\x07\x1b[2J.xml", id="terminal-escapes"),
    pytest.param("order\r.xml", id="carriage-return"),
    pytest.param("a\tb.xml", id="tab"),
    pytest.param("del\x7f.xml", id="del"),
    pytest.param("zürich-bestellung.xml", id="non-ascii"),
    pytest.param("order\u202elmx.exe", id="right-to-left-override"),
    pytest.param("x" * 251 + ".xml", id="255-bytes"),
    pytest.param("é" * 127 + "x", id="255-bytes-multibyte"),
    pytest.param("-", id="dash-alone"),
    pytest.param("--help", id="an-option"),
]


def drop_as(site: Site, iface: str, name: str, data: bytes) -> None:
    """A careful upload under any name the kernel allows (a short hidden name, then rename)."""
    folder = site.root / "incoming" / iface
    hidden = folder / ".hostile-upload"
    hidden.write_bytes(data)
    os.rename(hidden, folder / name)


def outside_the_spool(site: Site) -> dict[str, object]:
    """:func:`surroundings`, without what a running daemon and its handler change."""
    around = surroundings(site.dir)
    assert isinstance(around["site"], dict)
    around["site"] = {
        k: v
        for k, v in around["site"].items()
        if not k.startswith(("spool", "daemon-", "ledger", "outside", "xdg-cache"))
    }
    return around


def jobs_and_logs(site: Site) -> dict[str, object]:
    """Every job and log in queue, bak and joberrors, by path: what must never be overwritten."""
    tree = snapshot(site.root)
    return {k: v for k, v in tree.items() if k.startswith(("queue/", "bak/", "joberrors/"))}


@pytest.mark.parametrize("bad", DROP_NAMES)
def test_a_hostile_drop_name_goes_to_joberrors_under_a_safe_name(hostiles, bad: str):
    site = hostiles.site
    assert not names.is_partial_upload(bad)
    assert len(os.fsencode(bad)) <= 255
    data = order("hostile-name")
    before = set(site.ls("joberrors"))
    kept = jobs_and_logs(site)
    around = outside_the_spool(site)

    drop_as(site, "orders_in", bad, data)
    site.wait_for(lambda: set(site.ls("joberrors")) - before, "the file in joberrors")

    (name,) = set(site.ls("joberrors")) - before
    assert names.is_valid(name)
    assert (site.root / "joberrors" / name).read_bytes() == data
    (received,) = log_events(site.log(name), "received")
    assert received.get("original-name") == escape_name(bad)
    assert "invalid job name" in received.get("reason")
    assert bad not in os.listdir(site.root / "incoming/orders_in")
    now = jobs_and_logs(site)
    assert {k: now.get(k) for k in kept} == kept  # nothing overwritten
    assert outside_the_spool(site) == around  # nothing escaped
    assert site.ok("status", name).strip() == "joberrors"
    daemon = hostiles.daemon
    assert daemon is not None
    # The daemon's own log stays one JSON object a line, with no raw control characters.
    text = daemon.stderr_path.read_bytes()
    assert not re.search(rb"[\x00-\x09\x0b-\x1f]", text), "a raw control character"
    site.wait_for(lambda: daemon.said("rejected", job=name), "the daemon's line")


def test_names_of_uploads_in_progress_are_left_alone(hostiles):
    # A leading dot is an upload in progress: never taken, never touched.
    site = hostiles.site
    incoming = site.root / "incoming/orders_in"
    dotted = {
        ".order.xml": order(1),
        "...": order(2),
        ".order.xml.123.0": order(3),
        "..xml": order(4),
    }
    for name, data in dotted.items():
        (incoming / name).write_bytes(data)
    before = site.places()
    time.sleep(2.5)  # more than a rescan (every 2 s)
    for name, data in dotted.items():
        assert (incoming / name).read_bytes() == data
        os.unlink(incoming / name)
    assert site.places() == before


@pytest.mark.parametrize("where", ["queue/orders_out", "joberrors", "bak/orders_in"])
def test_a_drop_whose_name_is_in_use_overwrites_nothing(hostiles, where: str):
    site = hostiles.site
    name = f"in-use-{where.replace('/', '-')}.xml"
    original = order("original")
    if where == "queue/orders_out":
        assert (
            hostiles.run("submit", "orders_out", str(hostiles.file(name, original))).returncode == 0
        )
    elif where == "joberrors":
        broken = original.replace(b"</order>", b"")
        assert (
            hostiles.run("submit", "orders_in", str(hostiles.file(name, broken))).returncode == 65
        )
        original = broken
    else:
        site.drop("orders_in", name, original)
        site.wait_in(name, "bak/orders_in")
    kept = jobs_and_logs(site)
    before = set(site.ls("joberrors"))

    site.drop("orders_in", name, order("impostor"))
    # Checked and processed under a derived name (docs/spec.rst, "Names in use").
    done = set(site.ls("bak", "orders_in"))

    def derived() -> set[str]:
        return set(site.ls("bak", "orders_in")) - done - {name}

    (safe,) = site.wait_for(derived, "the impostor done under a derived name")
    assert safe != name and names.is_valid(safe) and safe.startswith(name.removesuffix(".xml"))
    assert (site.root / "bak/orders_in" / safe).read_bytes() == order("impostor")
    (received,) = log_events(site.log(safe, "orders_in"), "received")
    assert received.get("original-name") == name
    assert set(site.ls("joberrors")) == before
    now = jobs_and_logs(site)
    assert {k: now.get(k) for k in kept} == kept
    assert site.where(name) == [where]
    assert (site.root / where / name).read_bytes() == original


def test_two_names_that_sanitise_alike_both_survive(hostiles):
    site = hostiles.site
    before = set(site.ls("joberrors"))
    bad = ["twin order.xml", "twin?order.xml", "twin*order.xml"]
    for i, name in enumerate(bad):
        site.drop("orders_in", name, order(f"twin-{i}"))
    site.wait_for(lambda: len(set(site.ls("joberrors")) - before) == 3, "all three in joberrors")
    new = set(site.ls("joberrors")) - before
    contents = {(site.root / "joberrors" / n).read_bytes() for n in new}
    assert contents == {order(f"twin-{i}") for i in range(3)}
    originals = {log_events(site.log(n), "received")[0].get("original-name") for n in new}
    assert originals == set(bad)


# --- hostile names as command arguments ----------------------------------------------------

ARG_NAMES = [
    pytest.param("..", id="dot-dot"),
    pytest.param(".", id="dot"),
    pytest.param("/", id="slash"),
    pytest.param("a/../../x", id="a-dot-dot-x"),
    pytest.param("../../../../escaped.xml", id="far-up"),
    pytest.param("/etc/passwd", id="absolute"),
    pytest.param("-x", id="leading-dash"),
    pytest.param(".names.lock", id="leading-dot"),
    pytest.param("a\nb.xml", id="newline"),
    pytest.param("a\x1b[2J\x07b.xml", id="control-characters"),
    pytest.param("bestellung-ü.xml", id="non-ascii"),
    pytest.param("x" * 255, id="255-bytes"),
    pytest.param("", id="empty"),
]

# name -> the arguments of each command (the name after "--", so that a leading
# dash reaches jobspool's own check instead of click's option parser)
COMMANDS: dict[str, Any] = {
    "status": lambda n, d: ["status", "--", n],
    "log": lambda n, d: ["log", "--", n],
    "retry": lambda n, d: ["retry", "--", n],
    "submit": lambda n, d: ["submit", "orders_out", str(d / "valid.xml"), f"--name={n}"],
    "fetch": lambda n, d: ["fetch", "orders_out", "--to", str(d / "fetched"), "--", n],
}


@pytest.fixture(scope="module")
def argsite(tmp_path_factory) -> Site:
    """A spool with a job in each place (no daemon), and a valid file to submit."""
    site = Site(tmp_path_factory.mktemp("args"))
    iface = {"schema": "schemas/order.xsd"}
    site.configure({"orders_in": {**iface, "command": ["/bin/true"]}, "orders_out": iface})
    site.init()
    (site.outside / "valid.xml").write_bytes(order("valid"))
    (site.outside / "fetched").mkdir()
    (site.outside / "broken.xml").write_bytes(b"<order>")
    site.ok("submit", "orders_out", str(site.outside / "valid.xml"), "--name", "queued.xml")
    assert site.run("submit", "orders_in", str(site.outside / "broken.xml")).returncode == 65
    site.ok("submit", "orders_out", str(site.outside / "valid.xml"), "--name", "fetched.xml")
    site.ok("fetch", "orders_out", "--to", str(site.outside / "fetched"), "fetched.xml")
    (site.outside / "fetched/fetched.xml").unlink()
    (site.dir / "cwd" / "deeper").mkdir(parents=True)
    return site


def run_in(site: Site, argv: list[str]):
    """Run with the working directory deep inside the site, where a relative escape lands."""
    cwd = site.dir / "cwd" / "deeper"
    return measured(site.command(*argv), env=site.env(), cwd=cwd)


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("bad", ARG_NAMES)
def test_a_hostile_job_name_argument_is_refused_and_changes_nothing(argsite, command, bad):
    argv = COMMANDS[command](bad, argsite.outside)
    before = surroundings(argsite.dir)

    result = run_in(argsite, argv)

    line = assert_fails(result.as_completed(argv), 2)
    assert "invalid job name" in line, line
    assert line.isprintable(), line
    assert surroundings(argsite.dir) == before


@pytest.mark.parametrize("command", ["pause", "resume", "queue", "check", "submit", "fetch"])
@pytest.mark.parametrize("bad", ["../../escaped", "/tmp", "orders_in/../orders_out", "-x"])
def test_a_hostile_interface_argument_is_refused_and_changes_nothing(argsite, command, bad):
    valid = str(argsite.outside / "valid.xml")
    argv = {
        "pause": ["pause", "--", bad],
        "resume": ["resume", "--", bad],
        "queue": ["queue", "--", bad],
        "check": ["check", "--", bad, valid],
        "submit": ["submit", "--name=new.xml", "--", bad, valid],
        "fetch": ["fetch", "--to", str(argsite.outside / "fetched"), "--", bad],
    }[command]
    before = surroundings(argsite.dir)
    result = run_in(argsite, argv)
    line = assert_fails(result.as_completed(argv), 2)
    assert "interface" in line, line
    assert line.isprintable(), line
    assert surroundings(argsite.dir) == before


@pytest.mark.parametrize(
    ("command", "name"),
    [
        pytest.param("submit", "queued.xml", id="submit-queued"),
        pytest.param("submit", "broken.xml", id="submit-in-joberrors"),
        pytest.param("submit", "fetched.xml", id="submit-in-bak"),
        pytest.param("retry", "queued.xml", id="retry-queued"),
        pytest.param("retry", "fetched.xml", id="retry-in-bak"),
        pytest.param("fetch", "fetched.xml", id="fetch-in-bak"),
        pytest.param("fetch", "broken.xml", id="fetch-in-joberrors"),
        pytest.param("status", "names.lock", id="status-a-lock-file"),
        pytest.param("log", "orders_in", id="log-an-interface-folder"),
    ],
)
def test_a_name_in_use_or_of_no_job_overwrites_nothing(argsite, command, name):
    argv = COMMANDS[command](name, argsite.outside)
    before = surroundings(argsite.dir)
    result = run_in(argsite, argv)
    line = assert_fails(result.as_completed(argv), 2)
    assert name in line
    assert surroundings(argsite.dir) == before


def test_fetch_into_an_outbox_with_planted_links_follows_none(argsite, tmp_path):
    # The outbox is the partner's: it may plant a link named like the next job,
    # or like the staging file fetch will write (a dot, the name, pid, counter).
    site = argsite
    site.ok("submit", "orders_out", str(site.outside / "valid.xml"), "--name", "bait.xml")
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    target = tmp_path / "precious"
    target.write_bytes(b"keep me\n")
    os.symlink(target, outbox / "bait.xml")
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    for pid in range(last + 1, last + 200):  # the pids the next fetch commands will get
        os.symlink(target, outbox / f".bait.xml.{pid}.0")
    try:
        result = site.run("fetch", "orders_out", "--to", str(outbox), "bait.xml")
        line = assert_fails(result, 2)
        assert "already exists" in line
        assert target.read_bytes() == b"keep me\n"
        assert site.where("bait.xml") == ["queue/orders_out"]
        assert os.readlink(outbox / "bait.xml") == str(target)
        os.unlink(outbox / "bait.xml")
        assert site.ok("fetch", "orders_out", "--to", str(outbox), "bait.xml") == "bait.xml\n"
        assert (outbox / "bait.xml").read_bytes() == order("valid")
        assert not (outbox / "bait.xml").is_symlink()
        assert target.read_bytes() == b"keep me\n"
        assert site.where("bait.xml") == ["bak/orders_out"]
    finally:
        for leftover in outbox.iterdir():
            leftover.unlink()


def test_log_never_prints_a_file_outside_the_spool(argsite, tmp_path):
    outside = tmp_path / "outside-the-spool.txt"
    outside.write_text("NOT-A-LOG-4711\n")
    joberrors = argsite.root / "joberrors"
    (joberrors / "planted.xml").write_bytes(order("planted"))
    os.symlink(outside, joberrors / "planted.xml,log.xml")
    try:
        result = argsite.run("log", "planted.xml")
        assert "NOT-A-LOG-4711" not in result.stdout
    finally:
        os.unlink(joberrors / "planted.xml,log.xml")
        os.unlink(joberrors / "planted.xml")


# --- what fuzzing found ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("one", "other"),
    [
        pytest.param("a\nb.xml", "a\\nb.xml", id="newline-or-backslash-n"),
        pytest.param("a\x01.xml", "a\\x01.xml", id="control-or-its-escape"),
        pytest.param(os.fsdecode(b"caf\xe9.xml"), "caf\\xe9.xml", id="latin1-or-its-escape"),
        pytest.param(os.fsdecode(b"\x85.xml"), "\x85.xml", id="undecodable-byte-or-c1-control"),
    ],
)
def test_escape_name_tells_different_names_apart(one, other):
    assert escape_name(one) != escape_name(other)


def test_safe_names_are_valid_for_any_file_name_the_kernel_allows():
    # The corners hypothesis fuzzing of intake.safe_name visits, pinned.
    for original in ["", ".", "..", "-", ".-.-", "\udcff", "é" * 127, "a/b", "\x00", "x" * 255]:
        for stamp in (0, 1, 2**63 - 1):
            assert names.is_valid(intake.safe_name(original, stamp)), (original, stamp)


def test_a_log_keeps_any_original_name_valid():
    for original in ["\udc80\udcff", "\ufffe\uffff", "\U0010ffff", "a\x00b", "]]>&<'\""]:
        log = joblog.new("x.xml", "orders_in")
        joblog.received(log, "drop", original_name=original, reason=f"invalid: {original}")
        assert joblog.validate(joblog.to_bytes(log)) == []
