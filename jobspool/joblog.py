"""The XML job log: what happened to a job, and when (``schemas/joblog.xsd``).

A log is built in memory as events happen and written once, beside the job,
just before the job's final rename: a log in ``bak`` or ``joberrors`` is
always complete. A queued job has no log yet (``jobspool log`` says 75);
a retried job carries its history in ``state/pending/`` until it is done.

Text from outside (handler output, hostile file names) is made safe for XML
here: characters XML cannot hold become U+FFFD or backslash escapes.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from lxml import etree

from jobspool.errors import Problem

if TYPE_CHECKING:
    from jobspool.handlers import Outcome

NS = "urn:jobspool:joblog:1"
_Q = f"{{{NS}}}"
SCHEMA = Path(__file__).parent / "schemas" / "joblog.xsd"

Log = etree._Element


def now() -> str:
    """The current local time as xs:dateTime, with its UTC offset."""
    global _this_second
    ns = time.time_ns()
    second = ns // 1_000_000_000
    cached = _this_second  # one read: other threads may replace it
    if cached[0] != second:
        # Once a second: astimezone() looks the zone up; a job gets several events.
        day_time, offset = iso(second).split(".", 1)
        cached = _this_second = (second, day_time, offset[3:])
    return f"{cached[1]}.{ns // 1_000_000 % 1000:03d}{cached[2]}"


_this_second: tuple[int, str, str] = (-1, "", "")  # (second, "YYYY-MM-DDTHH:MM:SS", "+01:00")


def iso(timestamp: float) -> str:
    """A POSIX timestamp as local xs:dateTime, with its UTC offset."""
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="milliseconds")


def new(job: str, interface: str | None) -> Log:
    """An empty log for ``job``; the interface is recorded where it is known."""
    log = etree.Element(_Q + "joblog", nsmap={None: NS})
    log.set("job", job)
    if interface is not None:
        log.set("interface", interface)
    log.set("version", "1")
    return log


def event(log: Log, kind: str, at: str | None = None, **attrs: object) -> etree._Element:
    """Append one event; ``None`` attributes are left out, ``under_scores`` become dashes."""
    el = etree.SubElement(log, _Q + kind)
    el.set("time", at or now())
    for key, value in attrs.items():
        if value is not None:
            el.set(key.replace("_", "-"), xml_text(str(value)))
    return el


def received(
    log: Log,
    via: str,
    at: str | None = None,
    original_name: str | None = None,
    reason: str | None = None,
    ref: str | None = None,
) -> None:
    original = escape_name(original_name) if original_name is not None else None
    event(log, "received", at, via=via, original_name=original, reason=reason, ref=ref)


def checked(log: Log, errors: list[Problem], schema: Path | None, at: str | None = None) -> None:
    el = event(log, "checked", at, outcome="rejected" if errors else "accepted", schema=schema)
    for err in errors:
        e = etree.SubElement(
            el, _Q + "error", line=str(max(err.line, 0)), column=str(max(err.column, 0))
        )
        e.text = xml_text(err.message)


def ran(log: Log, outcome: Outcome, handler: str) -> None:
    """One handler run: times, outcome, exit status or signal, and its bounded output."""
    el = event(
        log,
        "ran",
        at=iso(outcome.started),
        end=iso(outcome.ended),
        handler=handler,
        outcome=outcome.result,
        exit_status=outcome.exit_status,
        signal=outcome.signal,
        timed_out="true" if outcome.timed_out else None,
        reason=outcome.reason,
    )
    run_details(el, outcome, _Q)


def run_details(el: etree._Element, outcome: Outcome, q: str) -> None:
    """A run's bounded output and traceback, as children of ``el`` in namespace ``q``.

    The one writer of them: a job log's ``<ran>`` and a schedule result's
    ``<run>`` hold the same elements, each in its own namespace.
    """
    streams = (
        ("stdout", outcome.stdout, outcome.stdout_dropped),
        ("stderr", outcome.stderr, outcome.stderr_dropped),
    )
    for stream, data, dropped in streams:
        if data:
            out = etree.SubElement(el, q + "output", stream=stream)
            if dropped:
                out.set("truncated", str(dropped))
            out.text = xml_text(data.decode("utf-8", "replace"))
    if outcome.traceback:
        etree.SubElement(el, q + "traceback").text = xml_text(outcome.traceback)


def moved(log: Log, source: str, dest: str, at: str | None = None) -> etree._Element:
    return event(log, "moved", at, **{"from": source, "to": dest})


def note(log: Log, text: str, at: str | None = None) -> None:
    event(log, "note", at).text = xml_text(text)


def to_bytes(log: Log) -> bytes:
    return etree.tostring(log, xml_declaration=True, encoding="UTF-8", pretty_print=True)


def from_bytes(data: bytes) -> Log:
    """Read a log back (to carry a retried job's history on)."""
    from jobspool.check import hardened_parser

    # Blank text goes so that events appended later are indented like the rest.
    return etree.fromstring(data, hardened_parser(remove_blank_text=True))


_schema: etree.XMLSchema | None = None


def validate(data: bytes) -> list[str]:
    """Problems of a log against ``joblog.xsd`` (empty when valid)."""
    global _schema
    if _schema is None:
        _schema = etree.XMLSchema(etree.parse(str(SCHEMA)))
    doc = etree.fromstring(data).getroottree()
    if _schema.validate(doc):
        return []
    return [f"line {e.line}: {e.message}" for e in _schema.error_log]


# XML 1.0 cannot hold most control characters, lone surrogates or U+FFFE/F.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    """``text`` with every character XML 1.0 cannot hold replaced by U+FFFD."""
    return _NOT_XML.sub("\ufffd", text)


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_name(name: str) -> str:
    """A file name as printable text, one way back to the name: nothing else looks alike.

    A backslash is doubled; ``\\n``, ``\\r``, ``\\t``, and ``\\xNN`` for
    other control characters below 0x80; bytes that were not UTF-8 (held by
    Python as U+DC80-U+DCFF, always 0x80 and up) as ``\\xNN``; every other
    unprintable character, lone surrogates included, as ``\\uNNNN``.
    """
    out = []
    for c in name:
        code = ord(c)
        if c == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif c.isprintable() and not 0xD800 <= code <= 0xDFFF:
            out.append(c)
        elif code < 0x80:
            out.append(_SHORT.get(c, f"\\x{code:02x}"))
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return "".join(out)
