"""The commands that change the spool: init, check, submit, retry, pause, resume.

Every command runs as a sysadmin would type it, through the installed script.

The promises tested here are in ``docs/spec.rst`` ("Commands and exit codes").
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess

import pytest
from lxml import etree

from tests.kit import (
    BROKEN,
    INVALID,
    SPOOL_DIRS,
    STOCK_INVALID,
    STOCK_VALID,
    VALID,
    assert_fails,
    assert_ok,
    kinds,
    log_events,
    read_table,
    snapshot,
)

# --- init ----------------------------------------------------------------------


def test_init_creates_the_spool_tree(configured):
    out = assert_ok(configured.run("init"))
    assert str(configured.root) in out
    for rel in SPOOL_DIRS:
        assert (configured.root / rel).is_dir(), rel


def test_init_is_safe_to_repeat(spool):
    assert_ok(spool.submit("kept.xml"))
    before = spool.tree()
    assert_ok(spool.run("init"))
    assert spool.tree() == before
    assert spool.queue() == ["kept.xml"]


def test_init_where_the_spool_directory_has_no_parent_yet(configured):
    configured.config.write_text(
        configured.config.read_text().replace("spool: spool", "spool: srv/jobspool/spool")
    )
    result = configured.run("init")
    assert result.returncode in (0, 78), result.stderr
    if result.returncode == 0:
        assert (configured.dir / "srv" / "jobspool" / "spool" / "queue" / "orders_in").is_dir()
    else:
        assert "srv/jobspool" in assert_fails(result, 78)


def test_commands_on_a_spool_never_created_point_to_init(configured):
    line = assert_fails(configured.run("status", "x.xml"), 78)
    assert "jobspool init" in line


# --- check ---------------------------------------------------------------------


def test_check_a_valid_file(spool):
    job = spool.file("order-1.xml")
    before = spool.tree()
    assert assert_ok(spool.run("check", "orders_in", str(job))) == f"{job}: ok for orders_in\n"
    assert spool.tree() == before


def test_check_reports_a_schema_violation_with_its_line(spool):
    job = spool.file("order-2.xml", INVALID)
    before = spool.tree()
    result = spool.run("check", "orders_in", str(job))
    assert result.returncode == 65
    assert result.stdout == ""
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"{job}:4:")
    assert "qty" in first
    assert "Traceback" not in result.stderr
    # check changes nothing: the job is not in joberrors, nor anywhere.
    assert spool.tree() == before


def test_check_reports_a_syntax_error_as_file_line_column(spool):
    job = spool.file("order-3.xml", BROKEN)
    result = spool.run("check", "orders_in", str(job))
    assert result.returncode == 65
    file, line, column, message = result.stderr.splitlines()[0].split(":", 3)
    assert (file, line) == (str(job), "5")
    assert int(column) > 0
    assert message.startswith(" ")
    assert "orders" in message


def test_check_gives_each_schema_error_its_own_line(spool):
    doc = INVALID.replace(b"</order>", b"  <extra/>\n\n  <more>x</more>\n</order>")
    job = spool.file("order-4.xml", doc)
    result = spool.run("check", "orders_in", str(job))
    assert result.returncode == 65
    lines = [row.split(":", 3)[1:4:2] for row in result.stderr.splitlines()[:2]]
    assert [(line, message.split("'")[1]) for line, message in lines] == [
        ("4", "qty"),
        ("5", "extra"),
    ]


def test_check_needs_no_spool(configured):
    job = configured.file("order-1.xml")
    assert_ok(configured.run("check", "orders_in", str(job)))
    assert configured.run("check", "orders_in", str(configured.file("x", BROKEN))).returncode == 65
    assert not configured.root.exists()


def test_check_with_relax_ng(spool):
    assert_ok(spool.run("check", "stock_in", str(spool.file("stock-1.xml", STOCK_VALID))))
    job = spool.file("stock-2.xml", STOCK_INVALID)
    result = spool.run("check", "stock_in", str(job))
    assert result.returncode == 65
    assert result.stderr.startswith(f"{job}:2:")


def test_check_json(spool):
    job = spool.file("order-2.xml", INVALID)
    result = spool.run("check", "--json", "orders_in", str(job))
    assert result.returncode == 65
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["interface"] == "orders_in"
    assert report["errors"][0]["line"] == 4
    assert "qty" in report["errors"][0]["message"]


def test_check_a_file_over_max_size(spool):
    job = spool.file("big.xml", oversized())
    result = spool.run("check", "orders_in", str(job))
    assert result.returncode == 65
    assert "max_size" in result.stderr


def test_check_unknown_interface_or_file(spool):
    line = assert_fails(spool.run("check", "nope_in", str(spool.file("a.xml"))), 2)
    assert "nope_in" in line
    line = assert_fails(spool.run("check", "orders_in", str(spool.dir / "missing.xml")), 2)
    assert "missing.xml" in line


# --- submit --------------------------------------------------------------------


def oversized() -> bytes:
    """A valid order bigger than orders_in's max_size (1KB)."""
    return VALID.replace(b"<sku>", b"<!--" + b"x" * 2000 + b"-->\n  <sku>")


def test_submit_queues_the_job_and_prints_its_name(spool):
    job = spool.file("order-1.xml")
    result = spool.run("submit", "orders_in", str(job))
    assert assert_ok(result) == "order-1.xml\n"
    assert (spool.root / "queue" / "orders_in" / "order-1.xml").read_bytes() == VALID
    assert spool.status("order-1.xml") == "queue/orders_in"
    assert spool.queue() == ["order-1.xml"]
    assert list((spool.root / "tmp").iterdir()) == []
    # What happened before the queue waits in state/pending until the job is done.
    pending = spool.root / "state" / "pending" / "order-1.xml,log.xml"
    assert kinds(pending) == ["received", "checked", "moved"]


def test_submit_to_an_outbound_interface(spool):
    assert assert_ok(spool.submit("reply-1.xml", iface="orders_out")) == "reply-1.xml\n"
    assert spool.status("reply-1.xml") == "queue/orders_out"


def test_submit_with_another_name(spool):
    job = spool.file("local-file.xml")
    assert assert_ok(spool.run("submit", "orders_in", str(job), "--name", "po-77.xml")) == (
        "po-77.xml\n"
    )
    assert spool.status("po-77.xml") == "queue/orders_in"
    assert assert_fails(spool.run("status", "local-file.xml"), 2)


def test_submit_a_200_character_name(spool):
    name = "n" * 200
    assert assert_ok(spool.submit(name)) == name + "\n"
    assert spool.status(name) == "queue/orders_in"


def test_submit_from_stdin(spool):
    result = spool.run("submit", "orders_in", "-", "--name", "from-stdin.xml", input=VALID)
    assert assert_ok(result) == "from-stdin.xml\n"
    assert (spool.root / "queue" / "orders_in" / "from-stdin.xml").read_bytes() == VALID


def test_submit_from_stdin_needs_a_name(spool):
    before = spool.tree()
    line = assert_fails(spool.run("submit", "orders_in", "-", input=VALID), 2)
    assert "--name" in line
    assert spool.tree() == before


def test_submit_an_invalid_job_puts_it_into_joberrors(spool):
    job = spool.file("order-2.xml", INVALID)
    result = spool.run("submit", "orders_in", str(job))
    line = assert_fails(result, 65)
    assert result.stdout == ""
    assert "order-2.xml" in line
    assert "line 4" in line
    assert "qty" in line

    assert (spool.root / "joberrors" / "order-2.xml").read_bytes() == INVALID
    log = spool.root / "joberrors" / "order-2.xml,log.xml"
    assert kinds(log) == ["received", "checked", "moved"]
    received, checked, moved = log_events(log)
    assert received.get("via") == "submit"
    assert checked.get("outcome") == "rejected"
    assert checked.get("schema") == str(spool.dir / "schemas" / "order.xsd")
    error = checked[0]
    assert error.get("line") == "4"
    assert "qty" in (error.text or "")
    assert (moved.get("from"), moved.get("to")) == ("outside", "joberrors")

    assert spool.status("order-2.xml") == "joberrors"
    assert spool.queue() == []
    assert not (spool.root / "state" / "pending" / "order-2.xml,log.xml").exists()


def test_submit_a_broken_job_logs_line_and_column(spool):
    assert_fails(spool.submit("order-3.xml", BROKEN), 65)
    (error,) = log_events(spool.root / "joberrors" / "order-3.xml,log.xml")[1]
    assert error.get("line") == "5"
    assert int(error.get("column") or 0) > 0
    assert "orders" in (error.text or "")


def test_max_size_is_the_largest_size_accepted(spool):
    # orders_in's max_size is 1KB: 1000 bytes pass, 1001 do not.
    exactly = VALID.replace(b"<sku>", b"<!--" + b"x" * (1000 - len(VALID) - 7) + b"--><sku>")
    assert len(exactly) == 1000
    assert_ok(spool.submit("exactly.xml", exactly))
    one_more = exactly.replace(b"-->", b"x-->")
    assert "max_size" in assert_fails(spool.submit("one-more.xml", one_more), 65)


def test_submit_a_file_over_max_size(spool):
    data = oversized()
    line = assert_fails(spool.submit("big.xml", data), 65)
    assert "max_size" in line
    # Nothing of it is lost: the whole file is in joberrors.
    assert (spool.root / "joberrors" / "big.xml").read_bytes() == data
    (error,) = log_events(spool.root / "joberrors" / "big.xml,log.xml")[1]
    assert "max_size" in (error.text or "")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(VALID, VALID, id="queued"),
        pytest.param(INVALID, VALID, id="in-joberrors"),
        pytest.param(VALID, INVALID, id="queued-then-invalid"),
    ],
)
def test_a_name_in_use_changes_nothing(spool, first, second):
    spool.submit("dup.xml", first)
    before = spool.tree()
    for iface in ("orders_in", "orders_out"):  # names are unique across the whole spool
        line = assert_fails(spool.submit("dup.xml", second, iface=iface), 2)
        assert "dup.xml" in line
        assert "in use" in line
    assert spool.tree() == before


def test_concurrent_submits_of_one_name_queue_it_once(spool):
    job = spool.file("race.xml")
    command = spool.command("submit", "orders_in", str(job))
    racers = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    codes = sorted(p.wait(timeout=60) for p in racers)
    for p in racers:
        assert p.stdout is not None and p.stderr is not None
        p.stdout.close()
        p.stderr.close()
    assert codes == [0, 2, 2, 2, 2, 2]
    assert spool.queue() == ["race.xml"]


def test_a_name_in_use_in_incoming_or_bak(spool):
    assert_ok(spool.submit("other.xml"))
    (spool.root / "incoming" / "orders_in" / "dropped.xml").write_bytes(VALID)
    (spool.root / "bak" / "orders_in" / "done.xml").write_bytes(VALID)
    before = spool.tree()
    assert_fails(spool.submit("dropped.xml"), 2)
    assert_fails(spool.submit("done.xml"), 2)
    assert spool.tree() == before


def test_an_invalid_name_is_refused_and_changes_nothing(spool):
    job = spool.file("fine.xml")
    before = spool.tree()
    for name in ["../x", "-x", ".x", "a b", "a/b", "x" * 201, "é.xml", ""]:
        result = spool.run("submit", "orders_in", str(job), f"--name={name}")
        assert "invalid job name" in assert_fails(result, 2), name
    assert spool.tree() == before


def test_an_invalid_file_name_needs_another_name(spool):
    job = spool.file("my order.xml")
    line = assert_fails(spool.run("submit", "orders_in", str(job)), 2)
    assert "my order.xml" in line
    assert assert_ok(spool.run("submit", "orders_in", str(job), "--name", "my-order.xml"))


def test_submit_to_an_interface_added_after_init(spool):
    with spool.config.open("a") as f:
        f.write("  returns_in:\n    schema: schemas/order.xsd\n    command: [/bin/true]\n")
    before = spool.tree()
    line = assert_fails(spool.submit("return-1.xml", iface="returns_in"), 78)
    assert "jobspool init" in line
    assert spool.tree() == before


def test_submit_to_an_unknown_interface(spool):
    before = spool.tree()
    line = assert_fails(spool.submit("a.xml", iface="nope_in"), 2)
    assert "nope_in" in line
    assert spool.tree() == before


def test_submit_a_missing_file(spool):
    before = spool.tree()
    line = assert_fails(spool.run("submit", "orders_in", str(spool.dir / "missing.xml")), 2)
    assert "missing.xml" in line
    assert spool.tree() == before


def test_a_rejected_value_with_a_newline_still_gives_one_error_line(spool):
    data = INVALID.replace(b"<qty>-4</qty>", b"<qty>four\nor five</qty>")
    line = assert_fails(spool.submit("newline.xml", data), 65)
    assert "qty" in line


def test_check_lines_stay_file_line_column_whatever_the_document_holds(spool):
    data = INVALID.replace(b"<qty>-4</qty>", b"<qty>four\nor five</qty>")
    job = spool.file("newline.xml", data)
    result = spool.run("check", "orders_in", str(job))
    assert result.returncode == 65
    for line in result.stderr.splitlines():
        assert line.startswith(f"{job}:4:"), line


def test_a_paused_interface_still_accepts_jobs(spool):
    assert_ok(spool.run("pause", "orders_in"))
    assert_ok(spool.submit("while-paused.xml"))
    assert spool.queue() == ["while-paused.xml"]


# --- retry ---------------------------------------------------------------------


def test_retry_a_fixed_job_queues_it_at_the_end(spool):
    assert_ok(spool.submit("first.xml"))
    assert_fails(spool.submit("fix-me.xml", INVALID), 65)
    assert_ok(spool.submit("later.xml"))
    # The sysadmin repairs the job where it lies.
    (spool.root / "joberrors" / "fix-me.xml").write_bytes(VALID)

    assert assert_ok(spool.run("retry", "fix-me.xml")) == "queue/orders_in\n"
    assert spool.status("fix-me.xml") == "queue/orders_in"
    assert spool.queue() == ["first.xml", "later.xml", "fix-me.xml"]
    assert (spool.root / "queue" / "orders_in" / "fix-me.xml").read_bytes() == VALID
    assert sorted(os.listdir(spool.root / "joberrors")) == []

    # Its history goes on, in state/pending until the job is done.
    pending = spool.root / "state" / "pending" / "fix-me.xml,log.xml"
    assert kinds(pending) == ["received", "checked", "moved", "retried", "checked", "moved"]
    log = log_events(pending)
    assert [e.get("outcome") for e in log if etree.QName(e).localname == "checked"] == [
        "rejected",
        "accepted",
    ]
    assert (log[-1].get("from"), log[-1].get("to")) == ("joberrors", "queue/orders_in")


def test_retry_a_job_still_invalid(spool):
    assert_fails(spool.submit("still-bad.xml", INVALID), 65)
    line = assert_fails(spool.run("retry", "still-bad.xml"), 65)
    assert "still-bad.xml" in line
    assert "qty" in line

    assert spool.status("still-bad.xml") == "joberrors"
    assert (spool.root / "joberrors" / "still-bad.xml").read_bytes() == INVALID
    log = spool.root / "joberrors" / "still-bad.xml,log.xml"
    assert kinds(log) == ["received", "checked", "moved", "retried", "checked"]
    second = log_events(log)[-1]
    assert second.get("outcome") == "rejected"
    assert second[0].get("line") == "4"
    assert spool.queue() == []


def test_retry_a_queued_job_is_refused(spool):
    assert_ok(spool.submit("queued.xml"))
    before = spool.tree()
    line = assert_fails(spool.run("retry", "queued.xml"), 2)
    assert "queue/orders_in" in line
    assert spool.tree() == before


def test_retry_an_unknown_job(spool):
    line = assert_fails(spool.run("retry", "nobody.xml"), 2)
    assert "nobody.xml" in line


# --- pause and resume ----------------------------------------------------------


def paused(spool) -> dict[str, str]:
    rows = read_table(assert_ok(spool.run("interfaces")))
    return {row["INTERFACE"]: row["PAUSED"] for row in rows}


def test_pause_and_resume_persist(spool):
    assert assert_ok(spool.run("pause", "orders_in")) == "orders_in paused\n"
    assert paused(spool) == {"orders_in": "yes", "orders_out": "no", "stock_in": "no"}
    assert paused(spool) == {"orders_in": "yes", "orders_out": "no", "stock_in": "no"}
    assert_ok(spool.run("pause", "orders_in"))
    assert assert_ok(spool.run("resume", "orders_in")) == "orders_in resumed\n"
    assert paused(spool) == {"orders_in": "no", "orders_out": "no", "stock_in": "no"}
    assert_ok(spool.run("resume", "orders_in"))


@pytest.mark.parametrize("command", ["pause", "resume"])
def test_pause_or_resume_an_unknown_interface(spool, command):
    before = spool.tree()
    line = assert_fails(spool.run(command, "nope_in"), 2)
    assert "nope_in" in line
    assert spool.tree() == before


# --- permission denied ---------------------------------------------------------

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3


def _drop_root_overrides() -> None:
    """In the child, before exec: give up what lets root ignore file permissions."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def read_only_queue(spool):
    """queue/orders_in made read-only, and how to run jobspool so that this applies.

    chmod stops a normal user, but not root, and CI runs the tests as root.
    Then the command runs as root without the capabilities that override file
    permissions, taken from its bounding set just before exec. (Running it as
    nobody instead needs the interpreter to be reachable by nobody, which a
    Python installed under /root is not.) The test fails, never skips, if this
    does not stop the write.
    """
    queue = spool.root / "queue" / "orders_in"
    queue.chmod(0o555)
    try:
        yield {"preexec_fn": _drop_root_overrides} if os.geteuid() == 0 else {}
    finally:
        queue.chmod(0o755)


def submit_denied(spool, as_user) -> str:
    job = spool.file("denied.xml")
    return assert_fails(spool.run("submit", "orders_in", str(job), **as_user), 77)


def test_a_read_only_queue_is_permission_denied(spool, read_only_queue):
    line = submit_denied(spool, read_only_queue)
    assert "Permission denied" in line
    assert spool.queue() == []
    assert_fails(spool.run("status", "denied.xml"), 2)
    assert list((spool.root / "tmp").iterdir()) == []


def test_a_denied_submit_leaves_no_trace(spool, read_only_queue):
    assert_ok(spool.submit("earlier.xml", iface="orders_out"))
    before = snapshot(spool.root)
    submit_denied(spool, read_only_queue)
    assert snapshot(spool.root) == before


def test_permission_denied_names_the_directory_that_refused(spool, read_only_queue):
    line = submit_denied(spool, read_only_queue)
    assert "queue/orders_in" in line
    assert "/tmp/" not in line.replace(str(spool.dir), "")
