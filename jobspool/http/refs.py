"""Finding a partner's job by its own reference: ``jobstatus?RefName=REF``.

An upload keeps the client's ``RefName=`` in the job's log
(``<received via="upload" ref="REF">``) and who uploaded it (a note
``uploaded by USER``). Only uploads are candidates: they are named
``IFACE-YYYYmmdd-HHMMSS-XXXXXXXX.xml``, so the search reads the logs of
names of that shape only, of the caller's interfaces only: the queued jobs'
pending logs, ``bak/IFACE`` and ``joberrors``, newest first, until one was
uploaded by the caller with that reference. A job of someone else, or on an
interface not granted, is never found.

There is no index: the cost is a directory listing per place and the start
of each candidate's log, newest first, up to the match. Partners that need
it often should keep the job name the upload answered.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from jobspool import joblog, names
from jobspool.spool import BAK, Spool

_UPLOAD = re.compile(r"(?P<iface>.+)-(?P<stamp>\d{8}-\d{6})-[0-9a-f]{8}\.xml")
_HEAD = 16384  # the received event and the upload note come first
_RECEIVED = f"{{{joblog.NS}}}received"
_NOTE = f"{{{joblog.NS}}}note"


def find(spool: Spool, interfaces: Iterable[str], user: str, ref: str) -> str | None:
    """The newest job ``user`` uploaded with ``ref`` to one of ``interfaces``, or None.

    A log that moved on between the listing and its reading (a queued job
    done meanwhile) makes the search start over, a few times at most.
    """
    wanted = set(interfaces)
    for _ in range(3):
        found, moved = _search(spool, wanted, user, ref)
        if found is not None or not moved:
            return found
    return None


def _search(spool: Spool, wanted: set[str], user: str, ref: str) -> tuple[str | None, bool]:
    candidates: list[tuple[str, str, Path]] = []  # (stamp, name, log)
    folders = [spool.state / "pending", spool.joberrors]
    folders += [spool.dir(BAK, i) for i in wanted]
    for folder in folders:
        for name in _logs_in(folder):
            match = _UPLOAD.fullmatch(name)
            if match and match.group("iface") in wanted:
                candidates.append((match.group("stamp"), name, folder / names.log_name(name)))
    candidates.sort(reverse=True)
    moved = False
    for _, name, log in candidates:
        verdict = _uploaded(log, user, ref)
        if verdict is None:
            moved = True
        elif verdict:
            return name, False
    return None, moved


def _logs_in(folder: Path) -> Iterator[str]:
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.endswith(names.LOG_SUFFIX):
            yield entry[: -len(names.LOG_SUFFIX)]


def _uploaded(log: Path, user: str, ref: str) -> bool | None:
    """Whether ``log`` starts with an upload by ``user`` carrying ``ref`` (None: it is gone)."""
    from lxml import etree

    try:
        with open(log, "rb") as f:
            head = f.read(_HEAD)
    except FileNotFoundError:
        return None
    except OSError:
        return False
    parser = etree.XMLPullParser(
        events=("end",), resolve_entities=False, no_network=True, load_dtd=False
    )
    try:
        parser.feed(head)
        received = False
        for _, el in parser.read_events():
            if el.tag == _RECEIVED:
                if el.get("via") != "upload" or el.get("ref") != ref:
                    return False
                received = True
            elif el.tag == _NOTE and received:
                return el.text == f"uploaded by {user}"
            elif received:
                return False  # the note follows the received event at once
    except etree.XMLSyntaxError:
        return False
    return False
