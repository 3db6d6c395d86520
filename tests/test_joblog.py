"""The XML job log (``jobspool/schemas/joblog.xsd``): what jobspool writes is valid, always."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from jobspool import joblog
from jobspool.errors import Problem
from tests.kit import (
    kinds,
    log_events,
    valid_log,
)

SCHEMA = Path("/srv/schemas/order.xsd")


def test_a_log_of_a_rejected_job_is_valid():
    log = joblog.new("order-1.xml", "orders_in")
    joblog.received(log, "submit")
    joblog.checked(log, [Problem(4, 0, "Element 'qty': '-4' is not valid.")], SCHEMA)
    joblog.moved(log, "outside", "joberrors")
    data = valid_log(joblog.to_bytes(log))
    assert kinds(data) == ["received", "checked", "moved"]
    checked = log_events(data)[1]
    assert checked.get("outcome") == "rejected"
    assert checked.get("schema") == str(SCHEMA)
    (error,) = checked
    assert (error.get("line"), error.get("column")) == ("4", "0")
    assert error.text == "Element 'qty': '-4' is not valid."


def test_a_log_of_an_accepted_and_retried_job_is_valid():
    log = joblog.new("order-1.xml", "orders_in")
    joblog.received(log, "drop", original_name="order 1.xml", reason="invalid job name")
    joblog.checked(log, [], None)
    joblog.moved(log, "incoming/orders_in", "queue/orders_in")
    joblog.event(log, "retried")
    joblog.note(log, "handed over by hand")
    data = valid_log(joblog.to_bytes(log))
    assert kinds(data) == ["received", "checked", "moved", "retried", "note"]
    received, checked = log_events(data)[:2]
    assert received.get("original-name") == "order 1.xml"
    assert checked.get("outcome") == "accepted"
    assert checked.get("schema") is None


def test_a_log_read_back_can_grow_and_stays_valid():
    log = joblog.new("order-1.xml", "orders_in")
    joblog.received(log, "submit")
    again = joblog.from_bytes(joblog.to_bytes(log))
    joblog.event(again, "retried")
    joblog.checked(again, [], SCHEMA)
    assert kinds(valid_log(joblog.to_bytes(again))) == ["received", "retried", "checked"]


def test_the_validator_finds_problems():
    # validate() is what every other test relies on: it must be able to say no.
    log = joblog.new("order-1.xml", "orders_in")
    joblog.moved(log, "outside", "nowhere")
    assert joblog.validate(joblog.to_bytes(log)) != []
    log = joblog.new("order-1.xml", "orders_in")
    joblog.received(log, "carrier-pigeon")
    assert joblog.validate(joblog.to_bytes(log)) != []
    assert joblog.validate(b'<joblog xmlns="urn:jobspool:joblog:1" version="1"/>') != []


HOSTILE = "\x00\x01\x07\x1b[31mred\x7f\x85 \ud800 \udcff \ufffe\uffff\n\r\t€ 😀"


def test_hostile_text_still_gives_a_valid_log():
    log = joblog.new("order-1.xml", "orders_in")
    joblog.received(
        log, "drop", original_name="a\x00b\x1bc\ndcff\udcff", reason=HOSTILE, ref=HOSTILE
    )
    joblog.checked(log, [Problem(1, 1, HOSTILE)], SCHEMA)
    joblog.note(log, HOSTILE)
    data = valid_log(joblog.to_bytes(log))
    received = log_events(data)[0]
    # Control characters and the byte that was not UTF-8 are readable escapes.
    assert received.get("original-name") == "a\\x00b\\x1bc\\ndcff\\xff"
    assert "😀" in (log_events(data)[2].text or "")


def test_xml_text_keeps_what_xml_can_hold():
    assert joblog.xml_text("tab\there, line\nthere, € 😀") == "tab\there, line\nthere, € 😀"
    assert joblog.xml_text("nul\x00 esc\x1b lone\ud800 nonchar\ufffe") == (
        "nul\ufffd esc\ufffd lone\ufffd nonchar\ufffd"
    )


@pytest.mark.parametrize(
    "name", ["plain.xml", "new\nline", "nul\x00", "esc\x1b[2J", "bad-byte\udcff", "tab\tx"]
)
def test_escape_name_gives_one_printable_line(name):
    shown = joblog.escape_name(name)
    assert shown.isprintable()
    log = joblog.new("renamed.xml", "orders_in")
    joblog.received(log, "drop", original_name=name, reason="invalid job name")
    valid_log(joblog.to_bytes(log))


@pytest.mark.parametrize("name", ["lone\ud800", "\udfff"])
def test_escape_name_escapes_any_lone_surrogate(name):
    shown = joblog.escape_name(name)
    assert shown.isprintable()
    log = joblog.new("renamed.xml", "orders_in")
    joblog.received(log, "drop", original_name=name, reason="invalid job name")
    valid_log(joblog.to_bytes(log))


def test_every_event_has_a_time_with_its_offset():
    log = joblog.new("order-1.xml", None)
    joblog.received(log, "submit")
    data = valid_log(joblog.to_bytes(log))
    root = etree.fromstring(data)
    assert root.get("interface") is None
    stamp = log_events(data)[0].get("time") or ""
    assert stamp[-6] in "+-" and stamp[-3] == ":"


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "UTC", "Asia/Kolkata"])
def test_event_times_are_the_local_wall_clock_with_its_offset(zone, monkeypatch):
    import time
    from datetime import datetime, timedelta

    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        joblog._this_second = (-1, "", "")  # a zone change is a restart in real life
        before = datetime.now().astimezone()
        shown = datetime.fromisoformat(joblog.now())
        after = datetime.now().astimezone()
        assert shown.utcoffset() == before.utcoffset()
        assert before - timedelta(milliseconds=1) <= shown <= after
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
        joblog._this_second = (-1, "", "")
