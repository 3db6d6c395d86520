"""Job and interface names: what may be a name, what is an upload in progress.

The promises tested here are in ``docs/spec.rst`` ("Jobs").
"""

from __future__ import annotations

import pytest

from jobspool import names
from jobspool.errors import BadRequest

VALID = [
    "a",
    "0",
    "_x",
    "order-1001.xml",
    "Order_1001.XML",
    "a..b",
    "ends-with-dash-",
    "ends.with.dot.",
    "x" * 200,
]

INVALID = [
    pytest.param("", id="empty"),
    pytest.param("../x", id="dot-dot-slash"),
    pytest.param("..", id="dot-dot"),
    pytest.param(".", id="dot"),
    pytest.param("-x", id="leading-dash"),
    pytest.param(".x", id="leading-dot"),
    pytest.param("a b", id="space"),
    pytest.param("a/b", id="slash"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\n", id="trailing-newline"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("café.xml", id="non-ascii"),
    pytest.param("\uff58", id="fullwidth"),
    pytest.param("a,log.xml", id="comma"),
    pytest.param("a:b", id="colon"),
    pytest.param("x" * 201, id="201-chars"),
]


@pytest.mark.parametrize("name", VALID)
def test_valid_names_are_accepted(name):
    assert names.is_valid(name)
    assert names.check_name(name) == name
    assert names.why_invalid(name) == ""


@pytest.mark.parametrize("name", INVALID)
def test_invalid_names_are_refused_with_a_reason(name):
    assert not names.is_valid(name)
    assert names.why_invalid(name) != ""
    with pytest.raises(BadRequest) as exc:
        names.check_name(name)
    assert exc.value.exit_code == 2
    message = str(exc.value)
    assert names.why_invalid(name) in message
    # A hostile name never breaks the one-line error.
    assert "\n" not in message
    assert "\x00" not in message


def test_the_length_limit_is_200_characters():
    assert names.is_valid("a" * 200)
    assert not names.is_valid("a" * 201)
    assert "201" in names.why_invalid("a" * 201)


def test_an_interface_name_is_refused_as_an_interface():
    with pytest.raises(BadRequest, match="invalid interface name"):
        names.check_name("../etc", what="interface")


@pytest.mark.parametrize(
    "filename",
    [
        "order.xml.part",
        "order.xml.filepart",
        "order.xml.tmp",
        "order.xml~",
        ".order.xml.Xy12Ab",  # rsync's temporary name
        ".order.xml",
    ],
)
def test_partial_uploads_are_recognised(filename):
    assert names.is_partial_upload(filename)


@pytest.mark.parametrize("filename", ["order.xml", "order.part.xml", "tmp", "part"])
def test_finished_files_are_not_partial_uploads(filename):
    assert not names.is_partial_upload(filename)


def test_the_log_sits_beside_its_job():
    assert names.log_name("order-1.xml") == "order-1.xml,log.xml"


@pytest.mark.parametrize("name", VALID)
def test_a_log_name_can_never_be_a_job_name(name):
    assert not names.is_valid(names.log_name(name))
