"""The operator's toolbox through the real CLI and daemon: name reuse, try-later limits,
hold/release/delete, retry in bulk, errors, the audit trail (docs/cli.rst)."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from jobspool import config, content
from jobspool.spool import Spool
from tests.kit import DEADLINE, VALID, Site, child, log_events, log_root, order, plain

DERIVED = re.compile(r"orders\.\d{8}T\d{6}\.\d{3}\.xml")


def test_a_partner_sending_orders_xml_on_three_days_gets_all_three_processed(site):
    site.configure(plain())
    site.init()
    daemon = site.start()
    bodies = [order(f"day{day}") for day in (1, 2, 3)]
    for body in bodies:
        site.drop("orders_in", "orders.xml", body)
        site.wait_for(lambda: not site.ls("incoming", "orders_in"), "the drop to be taken")
        site.wait_for(lambda: not site.ls("queue", "orders_in"), "the job to be processed")
    done = site.ls("bak", "orders_in")
    assert len(done) == 3 and "orders.xml" in done, done
    derived = sorted(n for n in done if n != "orders.xml")
    assert all(DERIVED.fullmatch(n) for n in derived), derived
    assert site.ls("joberrors") == []
    # Each was checked and ran, and its content is the one sent that day.
    bak = site.dir_of("bak", "orders_in")
    contents = [(bak / n).read_bytes() for n in ["orders.xml", *derived]]
    assert contents == bodies
    for name in derived:
        root = log_root(site.log(name, "orders_in"))
        received = child(root, "received")
        assert received.get("original-name") == "orders.xml"
        assert child(root, "checked").get("outcome") == "accepted"
        assert child(root, "ran").get("outcome") == "done"
    # status of the original name answers for the newest job of that name, and says so.
    result = site.run("status", "orders.xml")
    assert result.returncode == 0, result
    assert result.stdout == "bak/orders_in\n"
    assert derived[-1] in result.stderr
    answer = json.loads(site.ok("status", "--json", "orders.xml"))
    assert answer == [{"job": "orders.xml", "status": "bak/orders_in", "name": derived[-1],
                       "held": False}]  # fmt: skip
    daemon.stop()


def _later(site: Site, **limits: Any) -> None:
    """An interface whose handler always says "try later" (exit 75), with limits."""
    script = site.script("later.sh", 'echo "$(basename "$1")" >> "$T/ran"\nexit 75')
    site.configure({"orders_in": {"command": [script], **limits}})
    site.init()


def test_max_tries_sends_a_job_that_keeps_saying_later_to_joberrors_and_frees_the_head(site):
    _later(site, max_tries=3)
    site.ok("pause", "orders_in")
    site.submit("stuck.xml")
    site.submit("next.xml")
    daemon = site.start()
    site.ok("resume", "orders_in")
    site.wait_in("stuck.xml", "joberrors")
    site.wait_in("next.xml", "joberrors")  # the one behind ran too (and gave up as well)
    ran = (site.dir / "ran").read_text().split()
    assert ran.count("stuck.xml") == 3, ran
    root = log_root(site.log("stuck.xml"))
    assert "max_tries 3" in " ".join(n.text or "" for n in root if n.tag.endswith("note"))
    errors = json.loads(site.ok("errors", "--json", "orders_in"))
    assert [e["job"] for e in errors] == ["stuck.xml", "next.xml"]
    assert "gave up after 3 tries" in errors[0]["reason"]
    daemon.stop()


def test_max_age_gives_up_on_a_job_older_than_it(site):
    _later(site, max_age="1s")
    site.submit("old.xml")
    daemon = site.start()
    site.wait_in("old.xml", "joberrors")
    assert "max_age" in site.ok("errors")
    daemon.stop()


def test_a_bad_max_tries_is_refused_at_the_start(site):
    site.configure({"orders_in": {"command": ["/bin/true"], "max_tries": 0}})
    out = site.fails(78, "init")
    assert "max_tries" in out


def test_retry_now_ends_a_back_off_at_once(site):
    script = site.script("later.sh", 'echo x >> "$T/ran"\n[ -e "$T/ok" ] && exit 0\nexit 75')
    site.configure({"orders_in": {"command": [script]}}, backoff_initial="60s", backoff_max="60s")
    site.init()
    site.submit("slow.xml")
    daemon = site.start()
    site.wait_for(lambda: (site.root / "state/blocked/orders_in").exists(), "the job to block")
    (site.dir / "ok").write_text("")
    started = time.monotonic()
    out = site.ok("retry", "--now", "slow.xml")
    assert "orders_in" in out
    site.wait_in("slow.xml", "bak/orders_in", timeout=DEADLINE)
    assert time.monotonic() - started < 30  # not the 60 s back-off
    # A job that does not block its interface: nothing to retry now.
    site.submit("fine.xml")
    site.wait_in("fine.xml", "bak/orders_in")
    assert "not queued" in site.fails(2, "retry", "--now", "fine.xml")
    entries = json.loads(site.ok("audit", "--json"))
    assert [e["action"] for e in entries if e["target"] == "slow.xml"] == ["retry-now"]
    daemon.stop()


def test_a_held_job_keeps_its_place_is_skipped_and_runs_once_released(site):
    site.configure(plain())
    site.init()
    site.ok("pause", "orders_in")
    for name in ("a.xml", "b.xml", "c.xml"):
        site.submit(name)
    assert "held in queue/orders_in" in site.ok("hold", "b.xml")
    assert "held already" in site.fails(2, "hold", "b.xml")
    daemon = site.start()
    site.ok("resume", "orders_in")
    site.wait_in("c.xml", "bak/orders_in")
    assert site.where("a.xml") == ["bak/orders_in"]
    assert site.status("b.xml") == "queue/orders_in"
    assert json.loads(site.ok("status", "--json", "b.xml"))[0]["held"] is True
    listing = json.loads(site.ok("queue", "--all", "--json"))
    assert [(r["job"], r["state"]) for r in listing] == [("b.xml", "held")]
    time.sleep(2)  # the lane looks at held jobs about once a second: still held
    assert site.where("b.xml") == ["queue/orders_in"]
    site.ok("release", "b.xml")
    site.wait_in("b.xml", "bak/orders_in")
    assert "not queued" in site.fails(2, "release", "b.xml")
    notes = [n.text for n in log_root(site.log("b.xml", "orders_in")) if n.tag.endswith("note")]
    assert [n.split(" by ")[0] for n in notes] == ["held", "released"]
    actions = [e["action"] for e in json.loads(site.ok("audit", "--json"))]
    assert actions == ["pause", "hold", "resume", "release"]
    daemon.stop()


def test_delete_moves_a_job_and_its_log_to_state_deleted_and_says_who(site):
    site.configure(plain())
    site.init()
    site.ok("pause", "orders_in")
    site.submit("gone.xml")
    out = site.ok("delete", "gone.xml")
    assert "deleted from queue/orders_in" in out
    deleted = site.root / "state" / "deleted"
    assert (deleted / "gone.xml").read_bytes() == VALID
    root = log_root(deleted / "gone.xml,log.xml")
    assert "deleted by" in [n for n in root if n.tag.endswith("note")][-1].text
    assert log_events(deleted / "gone.xml,log.xml", "moved")[-1].get("to") == "deleted"
    assert site.where("gone.xml") == []
    assert not (site.root / "state/pending/gone.xml,log.xml").exists()
    assert "unknown job" in site.fails(2, "delete", "gone.xml")
    assert "unknown job" in site.fails(2, "status", "gone.xml")
    assert [e["action"] for e in json.loads(site.ok("audit", "--json"))][-1] == "delete"


def test_retry_by_interface_and_all_with_a_dry_run(site):
    site.configure({**plain("orders_in", "stock_in")})
    (site.dir / "schemas").mkdir(exist_ok=True)
    site.init()
    for name, iface in (("o1.xml", "orders_in"), ("o2.xml", "orders_in"), ("s1.xml", "stock_in")):
        site.drop(iface, name, b"<not-xml")
    site.once()
    assert site.ls("joberrors") == ["o1.xml", "o2.xml", "s1.xml"]
    table = site.ok("errors", "orders_in")
    assert "o1.xml" in table and "s1.xml" not in table
    dry = site.ok("retry", "--interface", "orders_in", "--dry-run")
    assert dry.split("\n")[0].startswith("o1.xml would be retried")
    assert site.ls("joberrors") == ["o1.xml", "o2.xml", "s1.xml"]
    for name in ("o1.xml", "o2.xml"):
        (site.root / "joberrors" / name).write_bytes(VALID)
    out = site.ok("retry", "--interface", "orders_in")
    assert out.splitlines() == ["o1.xml queue/orders_in", "o2.xml queue/orders_in"]
    assert site.ls("joberrors") == ["s1.xml"]
    result = site.run("retry", "--all")
    assert result.returncode == 65 and "s1.xml rejected again" in result.stdout
    assert "one of" in site.fails(2, "retry")
    assert "one of" in site.fails(2, "retry", "o1.xml", "--all")


def test_queue_all_shows_every_interface_and_the_reason_a_head_blocks(site):
    script = site.script("later.sh", "exit 75")
    site.configure({"orders_in": {"command": [script]}, **plain("stock_in")})
    site.init()
    site.ok("pause", "stock_in")
    site.submit("blocker.xml")
    site.submit("s.xml", iface="stock_in")
    daemon = site.start()
    site.wait_for(lambda: (site.root / "state/blocked/orders_in").exists(), "the job to block")
    rows = json.loads(site.ok("queue", "--all", "--json"))
    states = {(r["interface"], r["job"]): (r["state"], r["reason"]) for r in rows}
    assert states[("orders_in", "blocker.xml")][0] == "blocking"
    assert "try later" in states[("orders_in", "blocker.xml")][1]
    assert states[("stock_in", "s.xml")][0] == "paused"
    text = site.ok("queue", "--all")
    assert "blocker.xml" in text and "s.xml" in text
    assert "not both" in site.fails(2, "queue", "orders_in", "--all")
    daemon.stop()


def test_every_manual_action_is_in_the_audit_log_with_who_and_when(site):
    site.configure(plain(), schedules={"tick": {"every": "1:00:00", "command": ["true"]}})
    site.init()
    site.drop("orders_in", "bad.xml", b"<broken")
    site.once()
    (site.root / "joberrors" / "bad.xml").write_bytes(VALID)
    sudo = {"SUDO_USER": "alice"}
    assert site.run("retry", "bad.xml", env=sudo).returncode == 0
    for args in (
        ("schedule", "run", "tick"),
        ("schedule", "disable", "tick"),
        ("schedule", "enable", "tick"),
        ("schedule", "rename", "tick", "Tick tock"),
        ("schedule", "chown", "tick", "nobody"),
        ("schedule", "set", "tick", "timeout=1m"),
    ):
        site.ok(*args)
    entries = json.loads(site.ok("audit", "--json"))
    assert [(e["action"], e["target"]) for e in entries] == [
        ("retry", "bad.xml"),
        ("schedule run", "tick"),
        ("schedule disable", "tick"),
        ("schedule enable", "tick"),
        ("schedule rename", "tick"),
        ("schedule chown", "tick"),
        ("schedule set", "tick"),
    ]
    assert entries[0]["who"] == "root (sudo by alice)"
    assert all(e["who"] == "root" for e in entries[1:])
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+[+-]\d\d:\d\d", e["time"]) for e in entries)
    text = site.ok("audit")
    assert text.splitlines()[0].split() == ["TIME", "WHO", "ACTION", "TARGET", "DETAIL"]
    # The job's own log says who retried it.
    site.once()
    (retried,) = log_events(site.log("bad.xml", "orders_in"), "retried")
    assert retried.get("by") == "root (sudo by alice)"


def test_the_same_content_under_another_name_is_rejected_naming_the_earlier_job(site):
    site.configure({"orders_in": {"command": ["/bin/true"], "same_content": "reject"},
                    **plain("stock_in")})  # fmt: skip
    site.init()
    daemon = site.start()
    site.drop("orders_in", "first.xml", order("same"))
    site.wait_in("first.xml", "bak/orders_in")
    site.drop("orders_in", "again.xml", order("same"))
    site.wait_in("again.xml", "joberrors")
    (checked,) = log_events(site.log("again.xml"), "checked")
    assert checked.get("outcome") == "rejected"
    assert "the same content as first.xml" in child(checked, "error").text
    # Other content, and the same content on an interface without the option, pass.
    site.drop("orders_in", "other.xml", order("other"))
    site.drop("stock_in", "copy.xml", order("same"))
    site.wait_in("other.xml", "bak/orders_in")
    site.wait_in("copy.xml", "bak/stock_in")
    # submit is judged alike (exit 65).
    assert site.submit("third.xml", order("same")).returncode == 65
    daemon.stop()


def test_flagged_same_content_is_processed_with_a_note_and_the_window_ends(site):
    site.configure(
        {"orders_in": {"command": ["/bin/true"], "same_content": "flag", "same_within": "2s"}}
    )
    site.init()
    daemon = site.start()
    site.drop("orders_in", "a.xml", order("x"))
    site.wait_in("a.xml", "bak/orders_in")
    site.drop("orders_in", "b.xml", order("x"))
    site.wait_in("b.xml", "bak/orders_in")
    notes = [n.text for n in log_events(site.log("b.xml", "orders_in"), "note")]
    assert any("the same content as a.xml" in n for n in notes), notes
    time.sleep(2.5)  # past the window (b.xml's acceptance renewed it)
    site.drop("orders_in", "c.xml", order("x"))
    site.wait_in("c.xml", "bak/orders_in")
    assert log_events(site.log("c.xml", "orders_in"), "note") == []
    daemon.stop()


def test_content_entries_past_their_window_are_removed_by_the_daemon(site):
    # No purge schedule needed: state/content holds only what the window keeps.
    site.configure(
        {"orders_in": {"command": ["/bin/true"], "same_content": "reject", "same_within": "1h"}},
        rescan="0.5s",
    )
    site.init()
    daemon = site.start()
    site.drop("orders_in", "old.xml", order("old"))
    site.drop("orders_in", "new.xml", order("new"))
    site.wait_in("old.xml", "bak/orders_in")
    site.wait_in("new.xml", "bak/orders_in")
    daemon.stop()
    entries = {e.read_text(): e for e in (site.root / "state/content/orders_in").iterdir()}
    assert sorted(entries) == ["new.xml\n", "old.xml\n"]
    two_hours_ago = time.time() - 7200
    os.utime(entries["old.xml\n"], (two_hours_ago, two_hours_ago))
    daemon = site.start()
    site.wait_for(lambda: not entries["old.xml\n"].exists(), "old.xml's entry removed")
    assert entries["new.xml\n"].exists()  # within its window: kept, and still in force
    site.drop("orders_in", "copy.xml", order("new"))
    site.wait_in("copy.xml", "joberrors")
    assert daemon.said("expired content entries removed", interface="orders_in", removed=1)
    daemon.stop()


def test_an_entry_renewed_while_expired_ones_are_removed_stays(spool, monkeypatch):
    # Found expired without the lock, renewed by a job before the removal:
    # looked at again under the lock, it stays.
    tree = Spool.of(config.load(spool.config))
    iface = config.Interface(name="orders_in", same_content="reject", same_within=60.0)
    folder = spool.root / "state/content/orders_in"
    folder.mkdir(parents=True)
    for hexdigest in ("aa", "bb"):
        (folder / hexdigest).write_text("old.xml\n")
        os.utime(folder / hexdigest, (time.time() - 120, time.time() - 120))
    real = content._remove_expired

    def renewed_first(spool_, paths, older):
        content.remember(tree, iface, "bb", "renewed.xml", time.time_ns())
        return real(spool_, paths, older)

    monkeypatch.setattr(content, "_remove_expired", renewed_first)
    assert content.forget_expired(tree, iface, time.time()) == 1
    assert [(e.name, e.read_text()) for e in folder.iterdir()] == [("bb", "renewed.xml\n")]


def test_a_bad_same_content_setting_is_refused(site):
    site.configure({"orders_in": {"command": ["/bin/true"], "same_content": "maybe"}})
    assert "reject or flag" in site.fails(78, "init")


def test_a_held_outbound_job_is_not_fetched_until_released(site):
    site.configure({"orders_out": {}})
    site.init()
    for name in ("a.xml", "b.xml"):
        site.drop("orders_out", name, order(name))
    site.once()
    site.ok("hold", "a.xml")
    to = site.dir / "outbox"
    to.mkdir()
    assert site.ok("fetch", "orders_out", "--to", str(to)).split() == ["b.xml"]
    assert "is held" in site.fails(2, "fetch", "orders_out", "--to", str(to), "a.xml")
    site.ok("release", "a.xml")
    assert site.ok("fetch", "orders_out", "--to", str(to)).split() == ["a.xml"]
    notes = [n.text for n in log_events(site.dir_of("bak", "orders_out") / "a.xml,log.xml", "note")]
    assert [n.split(" by ")[0] for n in notes][:2] == ["held", "released"]


def test_status_of_a_name_free_again_answers_for_the_newest_job(site):
    site.configure(plain())
    site.init()
    daemon = site.start()
    site.drop("orders_in", "orders.xml", order("one"))
    site.wait_in("orders.xml", "bak/orders_in")
    site.drop("orders_in", "orders.xml", order("two"))
    site.wait_for(lambda: len(site.ls("bak", "orders_in")) == 2, "the second one done")
    site.ok("delete", "orders.xml")  # the first goes: its name is free again
    site.drop("orders_in", "orders.xml", order("three"))
    site.wait_in("orders.xml", "bak/orders_in")
    result = site.run("status", "orders.xml")
    assert (result.returncode, result.stdout, result.stderr) == (0, "bak/orders_in\n", "")
    assert (site.dir_of("bak", "orders_in") / "orders.xml").read_bytes() == order("three")
    daemon.stop()


def test_a_job_deleted_while_it_runs_leaves_no_log_behind_in_bak(site):
    script = site.script("slow.sh", 'touch "$T/began"\nwhile [ ! -e "$T/go" ]; do sleep 0.1; done')
    site.configure({"orders_in": {"command": [script]}})
    site.init()
    daemon = site.start()
    site.submit("busy.xml")
    site.wait_for(lambda: (site.dir / "began").exists(), "the handler to start")
    site.ok("delete", "busy.xml")
    (site.dir / "go").write_text("")
    site.submit("after.xml")
    site.wait_in("after.xml", "bak/orders_in")
    assert sorted(os.listdir(site.dir_of("bak", "orders_in"))) == ["after.xml", "after.xml,log.xml"]
    assert (site.root / "state/deleted/busy.xml").exists()
    daemon.stop()


def test_user_changes_are_in_the_audit_log(site):
    site.configure(plain())
    text = site.config.read_text() + "http:\n  users: htpasswd\n"
    site.config.write_text(text)
    site.init()
    for args in (("add", "bob"), ("passwd", "bob")):
        result = site.run("user", *args, "--password-stdin", "--cost", "4", input="pw\n")
        assert result.returncode == 0, result
    site.ok("user", "remove", "bob")
    entries = json.loads(site.ok("audit", "--json"))
    assert [(e["action"], e["target"]) for e in entries] == [
        ("user add", "bob"),
        ("user passwd", "bob"),
        ("user remove", "bob"),
    ]
