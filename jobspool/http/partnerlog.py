"""What a partner sees of the server: job logs and queue states without server paths.

A job log is written for the administrator: it names the schema file and
the handler by their paths on the server, and keeps the handler's stdout,
stderr and traceback. The ``joblog`` method answers a partner with a copy
in which every path is shown relative to the spool (``queue/orders_in/x``)
or, outside the spool, by its last part (``order.xsd``,
``import-order``); the handler's output and traceback are left out unless
the interface's ``http.interfaces.IFACE.joblog_output`` allows them. The
copy is still a valid job log (``schemas/joblog.xsd``).
"""

from __future__ import annotations

import re
from pathlib import Path

from jobspool import joblog

# An absolute path: a slash not preceded by a name character, a colon (URLs) or a slash.
_PATH = re.compile(r"(?<![\w.:/~-])/[^\s\"'<>,;()]*")
_OUTPUT = (f"{{{joblog.NS}}}output", f"{{{joblog.NS}}}traceback")


def scrub(text: str, spool_root: Path) -> str:
    """``text`` with every absolute path spool-relative, or cut to its last part."""
    root = f"{spool_root}/"

    def shown(match: re.Match[str]) -> str:
        path = match.group()
        if path.startswith(root):
            return path[len(root) :]
        return path.rstrip("/").rsplit("/", 1)[-1] or "/"

    return _PATH.sub(shown, text)


def handler_shown(handler: str) -> str:
    """A handler as a partner may see it: the program's name, no path, no arguments."""
    if handler.startswith("python:"):
        return handler
    first = handler.split(" ", 1)[0]
    return first.rstrip("/").rsplit("/", 1)[-1]


def partner_view(data: bytes, spool_root: Path, output: bool) -> bytes:
    """A job log as ``joblog`` shows it to a partner (see the module's docstring)."""
    from lxml import etree

    from jobspool.check import hardened_parser

    root = etree.fromstring(data, hardened_parser())
    for el in root.iter():
        if not isinstance(el.tag, str):
            continue
        if el.tag in _OUTPUT:
            continue
        for key, value in el.attrib.items():
            if key == "handler":
                el.set(key, handler_shown(value))
            elif key == "schema":
                el.set(key, value.rstrip("/").rsplit("/", 1)[-1])
            else:
                el.set(key, scrub(value, spool_root))
        if el.text:
            el.text = scrub(el.text, spool_root)
    if not output:
        for el in [e for e in root.iter(*_OUTPUT)]:
            parent = el.getparent()
            if parent is not None:
                parent.remove(el)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)


def queue_state(paused: bool, blocked: str | None, spool_root: Path) -> str:
    """One line on why a queue does (not) move: ``ok``, ``paused``, or ``blocked: WHY``.

    ``paused`` wins: a paused interface processes nothing, whatever its head.
    The reason of ``blocked`` is the daemon's (``state/blocked/IFACE``): the
    job at the head, since when, and the handler's answer.
    """
    if paused:
        return "paused"
    if blocked:
        line = " ".join(scrub(blocked, spool_root).split())
        return f"blocked: {line}"
    return "ok"
