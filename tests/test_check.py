"""The check every job passes: well-formed, no DOCTYPE, valid against its schema.

Partner XML is untrusted: no check may read a file or open a connection, and a
hostile document is rejected without exhausting the machine.

The promises tested here are in ``docs/spec.rst`` ("Jobs").
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from jobspool import check as checking
from jobspool.errors import ConfigError
from tests.kit import (
    BROKEN,
    INVALID,
    STOCK_INVALID,
    STOCK_VALID,
    VALID,
    assert_fails,
)


@pytest.fixture
def order_xsd(configured):
    return configured.dir / "schemas" / "order.xsd"


@pytest.fixture
def stock_rng(configured):
    return configured.dir / "schemas" / "stock.rng"


def test_a_valid_document_passes(order_xsd):
    result = checking.check(VALID, order_xsd)
    assert result.ok
    assert result.problems == []
    assert checking.parse(VALID).getroot().get("id") == "1"  # what a Python handler reads


def test_a_schema_violation_is_reported_with_its_line(order_xsd):
    result = checking.check(INVALID, order_xsd)
    assert not result.ok
    assert result.problems[0].line == 4
    assert "qty" in result.problems[0].message
    assert "-4" in result.problems[0].message


def test_a_syntax_error_is_reported_with_line_and_column(order_xsd):
    result = checking.check(BROKEN, order_xsd)
    assert not result.ok
    assert result.problems[0].line == 5
    assert result.problems[0].column > 0
    assert "orders" in result.problems[0].message


def test_without_a_schema_only_well_formedness_counts():
    assert checking.check(b"<anything><at>all</at></anything>", None).ok
    assert not checking.check(BROKEN, None).ok


def test_relax_ng(stock_rng):
    assert checking.check(STOCK_VALID, stock_rng).ok
    result = checking.check(STOCK_INVALID, stock_rng)
    assert not result.ok
    assert result.problems[0].line == 2
    assert "many" in result.problems[0].message


def test_a_schema_is_compiled_once_per_process(order_xsd, stock_rng):
    assert checking.compiled(order_xsd) is checking.compiled(order_xsd)
    assert checking.compiled(stock_rng) is checking.compiled(stock_rng)
    assert checking.compiled(order_xsd) is not checking.compiled(stock_rng)


def test_an_unusable_schema_is_a_configuration_error(tmp_path):
    broken = tmp_path / "broken.xsd"
    broken.write_text("<xs:schema xmlns:xs='http://www.w3.org/2001/XMLSchema'><xs:element/>")
    with pytest.raises(ConfigError, match=r"broken\.xsd"):
        checking.compiled(broken)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xef\xbb\xbf", id="bom-alone"),
        pytest.param(b"   \n", id="blank"),
        pytest.param(b"<order>\x00</order>", id="nul-inside"),
        pytest.param(b"<order/>\x00", id="nul-after"),
        pytest.param(b"<order>caf\xe9</order>", id="latin-1-not-utf-8"),
        pytest.param(b"<order>\xff\xfe</order>", id="invalid-utf-8"),
        pytest.param(b"<order>", id="unclosed"),
        pytest.param(b"<a/><b/>", id="two-roots"),
        pytest.param(b"<" + b"a" * 100 + b" x='1' x='2'/>", id="duplicate-attribute"),
    ],
)
def test_garbage_is_rejected_with_a_position(data):
    result = checking.check(data, None)
    assert not result.ok
    assert all(e.line >= 1 for e in result.problems)
    assert all(e.message for e in result.problems)


def test_deep_nesting_is_rejected():
    data = b"<a>" * 10_000 + b"</a>" * 10_000
    result = checking.check(data, None)
    assert not result.ok


def test_deep_nesting_the_schema_allows_is_still_rejected(tmp_path):
    # The check builds no tree, so libxml2's depth limit must hold without one.
    anything = tmp_path / "any.xsd"
    anything.write_text(
        '<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">'
        '<xs:element name="a"><xs:complexType><xs:sequence>'
        '<xs:any processContents="skip" minOccurs="0" maxOccurs="unbounded"/>'
        "</xs:sequence></xs:complexType></xs:element></xs:schema>"
    )
    assert checking.check(b"<a>" * 200 + b"</a>" * 200, anything).ok
    result = checking.check(b"<a>" * 10_000 + b"</a>" * 10_000, anything)
    assert not result.ok
    assert "depth" in result.problems[0].message


class _Counting(io.BytesIO):
    """A document that counts the bytes the check reads of it."""

    taken = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.taken += len(data)
        return data


def test_the_check_stops_reading_at_the_first_error(order_xsd):
    # A validator would log every later error too: millions, for a huge export.
    bad = b"<o>" + b"  <x>1</x>\n" * 2_000_000 + b"</o>"  # 24 MB, wrong from line 1
    doc = _Counting(bad)
    result = checking.check_stream(doc, order_xsd, len(bad))
    assert not result.ok
    assert len(result.problems) <= 20
    assert result.problems[0].line == 1
    assert doc.taken < 4 * checking.CHUNK


def test_a_schema_error_is_placed_on_the_first_line_of_its_element(order_xsd):
    # The validator notices a missing child or a bad value at the end tag;
    # the line given is where the element begins, as a tree check gives it.
    missing = b'<order id="1">\n  <sku>HAM-1</sku>\n</order>\n'
    assert checking.check(missing, order_xsd).problems[0].line == 1
    two_lines = b'<order id="1">\n  <sku>HAM-1</sku>\n  <qty>four\nor five</qty>\n</order>\n'
    assert checking.check(two_lines, order_xsd).problems[0].line == 3
    far = b'<order id="1">\n' + b"\n" * 70_000 + b"<sku>HAM-1</sku><qty>0</qty></order>"
    assert checking.check(far, order_xsd).problems[0].line == 70_002


def tree_check_line(doc: bytes, xsd) -> int:
    """The line a whole-tree XSD check gives the document's first schema error."""
    from lxml import etree

    schema = etree.XMLSchema(file=str(xsd))
    assert not schema.validate(etree.fromstring(doc))
    return schema.error_log[0].line


@pytest.mark.parametrize(
    "doc",
    [
        # A tag inside a comment, CDATA or processing instruction is text.
        b'<order id="1">\n  <sku>HAM-1</sku>\n  <qty>four\n<!-- <qty>4 -->\nfive</qty>\n</order>',
        b'<order id="1">\n  <sku>HAM-1</sku>\n  <qty>four\n<![CDATA[<qty>]]>\nfive</qty>\n</order>',
        b'<order id="1">\n  <sku>HAM-1</sku>\n  <qty>four\n<?note <qty> ?>\nfive</qty>\n</order>',
        # End markers are plain text outside them ("-->" and "?>" may be).
        b'<order id="1">\n  <sku>A --> B</sku>\n</order>\n',
        b'<order id="A-->B">\n  <sku>really?></sku>\n</order>\n',
        b'<order id="1">\n  <sku><![CDATA[A --> B]]></sku>\n<!-- why?> -->\n</order>\n',
        b'<order id="1">\n  <sku>HAM-1</sku>\n  <qty>four\n --> five</qty>\n</order>\n',
    ],
)
def test_a_schema_error_is_placed_where_a_tree_check_places_it(order_xsd, doc):
    line = checking.check(doc, order_xsd).problems[0].line
    assert line == tree_check_line(doc, order_xsd) > 0


def test_each_schema_error_is_placed_on_its_own_line(order_xsd):
    # The streaming validator gives none of them a line: each is placed, not
    # only the first, as a tree check places them.
    doc = INVALID.replace(b"</order>", b"  <extra/>\n\n  <more>x</more>\n</order>")
    problems = checking.check(doc, order_xsd).problems
    assert [(p.line, p.message.split("'")[1]) for p in problems] == [(4, "qty"), (5, "extra")]


def test_a_schema_error_on_a_document_of_one_line_is_placed_on_it(order_xsd):
    one_line = (
        b'<order id="1">' + b"<!-- padding -->" * 300_000 + b"<sku>x</sku><qty>-1</qty></order>"
    )
    assert len(one_line) > 4 * checking.CHUNK
    result = checking.check(one_line, order_xsd)
    assert (result.problems[0].line, "qty" in result.problems[0].message) == (1, True)


def test_a_doctype_is_rejected(order_xsd):
    data = b'<?xml version="1.0"?>\n<!DOCTYPE order>\n' + VALID.split(b"\n", 1)[1]
    result = checking.check(data, order_xsd)
    assert not result.ok
    assert result.problems[0].line == 2
    assert "DOCTYPE" in result.problems[0].message


def doctype_with(kind: str, target: str) -> bytes:
    """A small document whose DOCTYPE points at ``target`` in one of three ways."""
    if kind == "external-entity":
        dtd = f'<!DOCTYPE order [<!ENTITY e SYSTEM "{target}">]>'
        body = "<order>&e;</order>"
    elif kind == "external-subset":
        dtd = f'<!DOCTYPE order SYSTEM "{target}">'
        body = "<order/>"
    else:
        dtd = f'<!DOCTYPE order [<!ENTITY % p SYSTEM "{target}"> %p;]>'
        body = "<order/>"
    return f'<?xml version="1.0"?>\n{dtd}\n{body}\n'.encode()


KINDS = [
    pytest.param("external-entity", id="external-entity"),
    pytest.param("external-subset", id="external-subset"),
    pytest.param("parameter-entity", id="parameter-entity"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["uri", "path"])
def test_a_doctype_never_makes_the_check_open_a_file(tmp_path, kind, form):
    # The DOCTYPE names a FIFO. A helper process opens its writing end, which
    # returns only when someone opens the reading end, and then reports the
    # phase this test is in: a check that opened the FIFO shows up as
    # "during the check", with no timing involved.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    phase = tmp_path / "phase"
    phase.write_text("during the check")
    helper = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY)\n"
        "print(open(sys.argv[2]).read())\n"
        "os.close(fd)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", helper, str(fifo), str(phase)], stdout=subprocess.PIPE, text=True
    )
    target = fifo.as_uri() if form == "uri" else str(fifo)
    try:
        result = checking.check(doctype_with(kind, target), None)
        phase.write_text("after the check")
    finally:
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the helper finish
        try:
            out, _ = writer.communicate(timeout=60)
        finally:
            os.close(reader)
    assert out.strip() == "after the check"
    assert not result.ok
    assert "DOCTYPE" in result.problems[0].message


@pytest.mark.parametrize("kind", ["external-entity", "external-subset", "parameter-entity"])
def test_an_external_entity_never_leaks_the_file(spool, tmp_path, kind):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-4711\n")
    job = spool.file("xxe.xml", doctype_with(kind, secret.as_uri()))

    result = checking.check(job.read_bytes(), None)
    assert not result.ok
    assert not any("TOPSECRET" in e.message for e in result.problems)

    checked = spool.run("check", "orders_in", str(job))
    assert checked.returncode == 65
    assert "TOPSECRET" not in checked.stdout + checked.stderr

    submitted = spool.run("submit", "orders_in", str(job))
    assert_fails(submitted, 65)
    assert "TOPSECRET" not in submitted.stdout + submitted.stderr
    log = spool.run("log", "xxe.xml")
    assert log.returncode == 0
    assert "TOPSECRET" not in log.stdout
    for path in spool.root.rglob("*"):
        if path.is_file():
            assert b"TOPSECRET" not in path.read_bytes(), path


BILLION_LAUGHS = b"""\
<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<lolz>&lol9;</lolz>
"""


def test_billion_laughs_is_rejected(configured):
    # Through the command, so that a check that expanded the entities would
    # run into run()'s guard instead of hanging the test suite.
    job = configured.file("lolz.xml", BILLION_LAUGHS)
    result = configured.run("check", "orders_out", str(job))
    assert result.returncode == 65
    assert result.stdout == ""
    assert result.stderr.startswith(f"{job}:")
