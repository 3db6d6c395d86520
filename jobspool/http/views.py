"""What the operator console shows, read from the spool through the core.

Each function gathers one page's data as plain JSON values (text, numbers,
lists, mappings), for a template or for the page's JSON twin that the
console's script polls. Nothing here writes; the actions are in
:mod:`jobspool.http.console`. A user sees the interfaces granted to it
(``http.grants``), the jobs in ``joberrors`` of those interfaces, and every
schedule.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobspool import names
from jobspool.errors import BadRequest
from jobspool.listing import Listing
from jobspool.spool import BAK, INCOMING, JOBERRORS, QUEUE

if TYPE_CHECKING:
    from lxml import etree

    from jobspool.http.app import Site

SHOWN = 500  # rows a page shows at most (the counts are always whole)
OUTCOMES = ("ok", "failed", "skipped")
_J = "{urn:jobspool:joblog:1}"
_R = "{urn:jobspool:run:1}"


def when(ts: float | None) -> str | None:
    """A timestamp as local time, to the second, with its offset."""
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(sep=" ", timespec="seconds")


def short(iso: str | None) -> str | None:
    """An xs:dateTime from a log as it is shown: ``YYYY-MM-DD HH:MM:SS``."""
    return iso[:19].replace("T", " ") if iso else None


# --- interfaces and queues -------------------------------------------------------------


def overview(site: Site, user: str) -> dict[str, Any]:
    """Every granted interface: its counts, its head and why it does not move."""
    site.spool.require()
    errors = site.spool.errors_by_interface()
    return {"interfaces": [interface_row(site, name, errors) for name in site.granted(user)]}


def interface_row(
    site: Site, name: str, errors: Mapping[str, int], listing: Listing | None = None
) -> dict[str, Any]:
    """One interface's line: one listing of its queue, its markers, its counts."""
    if listing is None:
        listing = site.spool.listing(name)
    try:
        blocked: str | None = site.spool.blocked_marker(name).read_text().strip() or None
    except OSError:
        blocked = None
    return {
        "interface": name,
        "direction": site.cfg.interfaces[name].direction,
        "queued": len(listing.names),
        "incoming": count_files(site.spool.dir(INCOMING, name)),
        "errors": errors.get(name, 0),
        "paused": site.spool.is_paused(name),
        "blocked": blocked,
        "head": listing.names[0] if listing.names else None,
        "oldest": when(listing.stamps[0] / 1e9) if listing.names else None,
    }


def count_files(directory: Path) -> int:
    """Regular files with valid names in ``directory`` (what the daemon would take)."""
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return 0
    with entries:
        return sum(
            1 for e in entries if names.is_valid(e.name) and e.is_file(follow_symlinks=False)
        )


def queue(site: Site, user: str, interface: str) -> dict[str, Any]:
    """A granted interface's queue in processing order (the first :data:`SHOWN` jobs)."""
    iface = site.interface(user, interface)
    site.spool.require(iface.name)
    listing = site.spool.listing(iface.name)
    jobs = [
        {"name": n, "accepted": when(s / 1e9)}
        for s, n in zip(listing.stamps[:SHOWN], listing.names[:SHOWN], strict=True)
    ]
    state = interface_row(site, iface.name, site.spool.errors_by_interface(), listing)
    return {"interface": iface.name, "state": state, "jobs": jobs, "total": len(listing.names)}


# --- joberrors and jobs -------------------------------------------------------------------


def errors(site: Site, user: str) -> dict[str, Any]:
    """The jobs in joberrors of granted interfaces, newest first, each with its reason."""
    granted = set(site.granted(user))
    found = []
    for mtime, name in _files_by_age(site.spool.joberrors):
        log = site.spool.joberrors / names.log_name(name)
        iface = site.spool.interface_of_log(log)
        if iface is None or iface not in granted:
            continue
        found.append((mtime, name, iface, log))
    rows = []
    for mtime, name, iface, log in found[:SHOWN]:
        root = _read_log(log)
        rows.append(
            {
                "name": name,
                "interface": iface,
                "since": when(mtime / 1e9),
                "reason": first_reason(root) if root is not None else "(no log yet)",
            }
        )
    return {"jobs": rows, "total": len(found)}


def _files_by_age(directory: Path) -> list[tuple[int, str]]:
    """(mtime ns, name) of the jobs in ``directory``, newest first."""
    out = []
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return []
    with entries:
        for e in entries:
            if names.is_valid(e.name) and e.is_file(follow_symlinks=False):
                try:
                    out.append((e.stat(follow_symlinks=False).st_mtime_ns, e.name))
                except FileNotFoundError:
                    continue
    return sorted(out, reverse=True)


def _read_log(path: Path) -> etree._Element | None:
    from lxml import etree

    from jobspool.check import hardened_parser

    try:
        return etree.fromstring(path.read_bytes(), hardened_parser())
    except (OSError, etree.XMLSyntaxError):
        return None


def first_reason(root: etree._Element) -> str:
    """Why a job is in joberrors: the latest rejection's first error, or failed run's reason."""
    reason = "(the log gives no reason)"
    for ev in root:
        kind = _local(ev.tag)
        if kind == "checked" and ev.get("outcome") == "rejected":
            err = ev.find(f"{_J}error")
            if err is not None:
                reason = f"line {err.get('line')}, column {err.get('column')}: {err.text or ''}"
            else:
                reason = "rejected"
        elif kind == "ran" and ev.get("outcome") == "failed":
            reason = ev.get("reason") or "the handler failed"
            stderr = ev.find(f"{_J}output[@stream='stderr']")
            lines = (
                [x for x in (stderr.text or "").splitlines() if x.strip()]
                if stderr is not None
                else []
            )
            if lines:
                reason += f": {lines[-1].strip()}"
    return reason


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def job(site: Site, user: str, name: str) -> dict[str, Any]:
    """A granted job: where it is, and its log's events (a queued job: its history so far)."""
    found, iface = site.job(user, name)
    if found.place.state in (BAK, JOBERRORS):
        log_path = found.log_path
    else:
        log_path = site.spool.pending_log(name)
    root = _read_log(log_path)
    events = [event_of(ev) for ev in root] if root is not None else []
    xml = None
    if root is not None:
        from lxml import etree

        xml = etree.tostring(root, encoding="unicode", pretty_print=True)
    return {
        "name": name,
        "interface": iface.name,
        "status": str(found.place),
        "retry": found.place.state == JOBERRORS,
        "queued": found.place.state == QUEUE,
        "events": events,
        "reason": first_reason(root)
        if root is not None and found.place.state == JOBERRORS
        else None,
        "log": xml,
    }


def event_of(ev: etree._Element) -> dict[str, Any]:
    """One log event as a row: its time, kind, attributes, text and outputs."""
    attrs = {str(k): str(v) for k, v in ev.attrib.items() if k != "time"}
    errors = [
        f"line {e.get('line')}, column {e.get('column')}: {e.text or ''}"
        for e in ev.iter(f"{_J}error")
    ]
    outputs = [
        {"stream": o.get("stream", ""), "text": o.text or "", "truncated": o.get("truncated")}
        for o in ev.iter(f"{_J}output")
    ]
    tb = ev.find(f"{_J}traceback")
    return {
        "time": short(ev.get("time")),
        "kind": _local(ev.tag),
        "attrs": attrs,
        "text": ev.text.strip() if ev.text and ev.text.strip() else None,
        "errors": errors,
        "outputs": outputs,
        "traceback": tb.text if tb is not None else None,
    }


# --- schedules ------------------------------------------------------------------------------


def schedules(site: Site) -> dict[str, Any]:
    """Every schedule: timing, enabled, next run, and the last run's outcome."""
    from jobspool.schedules import Store
    from jobspool.timing import next_run

    store, now = Store(site.cfg), time.time()
    rows = []
    for sid, s in store.all().items():
        last = _results(store, sid, 1)
        rows.append(
            {
                "id": sid,
                "name": s.name,
                "enabled": s.enabled,
                "timing": f"{s.timing}: {s.when}",
                "owner": s.owner,
                "next": when(next_run(s, now)) if s.enabled else None,
                "last": last[0] if last else None,
            }
        )
    return {"schedules": rows}


def _results(store: Any, sid: str, limit: int | None = None) -> list[dict[str, Any]]:
    from jobspool.schedules import read_result

    out = []
    for path in store.results(sid)[:limit]:
        try:
            r = read_result(path)
        except (OSError, SyntaxError):
            continue  # pruned meanwhile, or damaged
        out.append(
            {
                "run": path.stem,
                "start": short(r.get("start")),
                "end": short(r.get("end")),
                "trigger": r.get("trigger"),
                "outcome": r.get("outcome"),
                "exit_status": r.get("exit-status"),
                "message": (r.get("message") or "").splitlines()[0] if r.get("message") else None,
            }
        )
    return out


def parse_day(text: str, what: str) -> str | None:
    """A ``YYYY-MM-DD`` filter (empty: none); anything else is a bad request."""
    if not text:
        return None
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise BadRequest(f"{what}: expected a date like 2026-11-30, got {text!r}") from None


def schedule(
    site: Site, sid: str, outcome: str = "", since: str = "", until: str = ""
) -> dict[str, Any]:
    """One schedule: its properties, next runs, and history filtered by outcome and date."""
    from jobspool.schedules import Store
    from jobspool.timing import preview

    if outcome and outcome not in OUTCOMES:
        raise BadRequest(f"outcome: expected one of {', '.join(OUTCOMES)}, got {outcome!r}")
    first, last = parse_day(since, "from"), parse_day(until, "to")
    store = Store(site.cfg)
    s = store.get(sid)
    history = _results(store, sid)
    shown = [
        r
        for r in history
        if (not outcome or r["outcome"] == outcome)
        and (first is None or (r["start"] or "")[:10] >= first)
        and (last is None or (r["start"] or "")[:10] <= last)
    ]
    target = " ".join(s.target) if s.action == "command" else str(s.target)
    return {
        "id": sid,
        "name": s.name,
        "enabled": s.enabled,
        "owner": s.owner,
        "timing": f"{s.timing}: {s.when}",
        "timezone": s.timezone,
        "timeout": s.timeout,
        "catchup": s.catchup,
        "runs": f"{s.action}: {target}",
        "with": {str(k): str(v) for k, v in s.settings.items()},
        "next": [when(t) for t in preview(s, time.time())] if s.enabled else [],
        "filter": {"outcome": outcome, "from": first or "", "to": last or ""},
        "history": shown,
        "total": len(history),
    }


def run(site: Site, sid: str, run_id: str) -> dict[str, Any]:
    """One recorded run of a schedule: its attributes, message, output and traceback."""
    from lxml import etree

    from jobspool.check import parse
    from jobspool.schedules import Store

    store = Store(site.cfg)
    store.get(sid)
    if not run_id.isdigit():
        raise BadRequest(f"unknown run {run_id!r} of {sid}")
    path = store.folder(sid) / "runs" / f"{run_id}.xml"
    try:
        root = parse(path.read_bytes()).getroot()
    except FileNotFoundError:
        raise BadRequest(f"unknown run {run_id!r} of {sid} (only the newest are kept)") from None
    except etree.XMLSyntaxError as exc:
        raise BadRequest(f"the result {run_id} of {sid} cannot be read: {exc}") from None
    attrs = {str(k): str(v) for k, v in root.attrib.items()}
    message = root.find(f"{_R}message")
    tb = root.find(f"{_R}traceback")
    return {
        "id": sid,
        "run": run_id,
        "attrs": attrs,
        "start": short(attrs.get("start")),
        "outcome": attrs.get("outcome"),
        "message": message.text if message is not None else None,
        "outputs": [
            {"stream": o.get("stream", ""), "text": o.text or "", "truncated": o.get("truncated")}
            for o in root.iter(f"{_R}output")
        ],
        "traceback": tb.text if tb is not None else None,
    }


def audit_entries(site: Site) -> dict[str, Any]:
    """The audit log, newest first (the last :data:`SHOWN` entries)."""
    from jobspool import audit

    entries = audit.entries(site.spool.root)
    return {"entries": list(reversed(entries[-SHOWN:])), "total": len(entries)}


def lines(text: str) -> Iterator[str]:
    """``KEY=VALUE`` lines of a form's text area, blank ones left out."""
    for line in text.splitlines():
        if line.strip():
            yield line.strip()
