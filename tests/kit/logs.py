"""Reading job logs: every log a test looks at is first checked against ``joblog.xsd``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lxml import etree

from jobspool import joblog, names


def valid_log(log: Path | bytes) -> bytes:
    """The log (a file or its bytes) is valid against ``joblog.xsd``; return its bytes."""
    data = log.read_bytes() if isinstance(log, Path) else log
    problems = joblog.validate(data)
    where = log if isinstance(log, Path) else "the log"
    shown = data.decode(errors="replace")
    assert problems == [], f"{where} is not a valid job log: {problems}\n{shown}"
    return data


def log_root(log: Path | bytes) -> Any:
    """The root element of a valid log."""
    return etree.fromstring(valid_log(log))


def log_events(log: Path | bytes, kind: str | None = None) -> list[Any]:
    """The events of a valid log, oldest first; only those of ``kind`` if given."""
    found = [e for e in log_root(log) if isinstance(e.tag, str)]
    if kind is not None:
        found = [e for e in found if etree.QName(e).localname == kind]
    return found


def kinds(log: Path | bytes) -> list[str]:
    """The kinds of a log's events (received, checked, ran, moved, ...), oldest first."""
    return [etree.QName(e).localname for e in log_events(log)]


def child(event: Any, kind: str) -> Any:
    """The first child of ``event`` named ``kind`` (``error``, ``output``, ...), or None."""
    for e in event:
        if etree.QName(e).localname == kind:
            return e
    return None


def outputs(ran: Any) -> dict[str, Any]:
    """A ``ran`` event's captured output by stream (stdout, stderr)."""
    return {o.get("stream"): o for o in ran if etree.QName(o).localname == "output"}


def assert_every_log_valid(directory: Path) -> None:
    """Every ``NAME,log.xml`` under ``directory`` is valid against ``joblog.xsd``."""
    for log in directory.rglob("*" + names.LOG_SUFFIX):
        assert joblog.validate(log.read_bytes()) == [], log
