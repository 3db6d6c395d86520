"""Built-in maintenance a spool needs, run by schedules (``template:``).

Each template is a function of the spool and its settings (``with:``) that
returns a one-line message, or raises :class:`TemplateFailed` (the run is
recorded as failed, with the message). Settings are checked before a run,
as strictly as the configuration.

- ``purge``: delete jobs older than ``older_than`` from ``bak`` and/or
  ``joberrors``, each with its log;
- ``stuck-queue``: fail when an interface's oldest queued job is older than
  ``older_than``, naming the interfaces;
- ``disk-space``: fail when the spool's filesystem has less free space than
  ``min_free`` (a size like ``500MB`` or a percentage like ``10%``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from jobspool import names
from jobspool.config import parse_duration, parse_size
from jobspool.errors import BadRequest
from jobspool.overview import overview
from jobspool.spool import BAK, JOBERRORS, Spool


class TemplateFailed(Exception):
    """The maintenance check found a problem; the message says which."""


class Setting(NamedTuple):
    name: str
    meaning: str
    default: Any  # None: required


class Template(NamedTuple):
    name: str
    summary: str
    settings: tuple[Setting, ...]
    run: Callable[[Spool, Mapping[str, Any]], str]


def _states(value: object) -> list[str]:
    states = [value] if isinstance(value, str) else value
    if not isinstance(states, list) or not states or not set(states) <= {BAK, JOBERRORS}:
        raise ValueError("bak, joberrors, or a list of both")
    return list(states)


def _interfaces(value: object) -> list[str] | None:
    if value is None or value == "all":
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(
        isinstance(i, str) and names.is_valid(i) for i in items
    ):
        raise ValueError("all, or a list of interface names")
    return list(items)


def _min_free(value: object) -> tuple[str, float]:
    if isinstance(value, str) and value.strip().endswith("%"):
        pct = float(value.strip()[:-1])
        if not 0 < pct <= 100:
            raise ValueError("a percentage above 0 and up to 100, like 10%")
        return "percent", pct
    return "bytes", float(parse_size(value))


_CONVERT: dict[str, Callable[[object], Any]] = {
    "older_than": parse_duration,
    "states": _states,
    "interfaces": _interfaces,
    "min_free": _min_free,
}


def purge(spool: Spool, s: Mapping[str, Any]) -> str:
    cutoff = time.time() - s["older_than"]
    removed = 0
    for state in s["states"]:
        if state == BAK:
            folders = [spool.dir(BAK, i) for i in (s["interfaces"] or spool.interfaces)]
        else:
            folders = [spool.joberrors]
        for folder in folders:
            only = s["interfaces"] if state == JOBERRORS else None
            removed += _purge_folder(folder, cutoff, only)
    return f"purged {removed} job(s) older than {_days(s['older_than'])}"


def _purge_folder(folder: Path, cutoff: float, only: list[str] | None) -> int:
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not names.is_valid(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                continue
        except FileNotFoundError:
            continue
        log = folder / names.log_name(entry.name)
        if only is not None and Spool.interface_of_log(log) not in only:
            continue
        # The job goes first: a log without its job is harmless, never the reverse.
        os.unlink(entry.path)
        log.unlink(missing_ok=True)
        removed += 1
    return removed


def _days(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def stuck_queue(spool: Spool, s: Mapping[str, Any]) -> str:
    stuck = []
    for o in overview(spool):
        if s["interfaces"] and o.interface not in s["interfaces"]:
            continue
        if o.oldest_seconds is not None and o.oldest_seconds > s["older_than"]:
            why = " (paused)" if o.paused else (f" ({o.blocked})" if o.blocked else "")
            stuck.append(f"{o.interface}: oldest job {o.oldest_seconds:.0f}s old{why}")
    if stuck:
        raise TemplateFailed("stuck queue: " + "; ".join(stuck))
    return f"no queue older than {_days(s['older_than'])}"


def disk_space(spool: Spool, s: Mapping[str, Any]) -> str:
    st = os.statvfs(spool.root)
    free = st.f_bavail * st.f_frsize
    total = st.f_blocks * st.f_frsize
    pct = 100.0 * free / total if total else 0.0
    kind, limit = s["min_free"]
    have = f"{free} bytes free ({pct:.1f}%) on the spool's filesystem"
    if (kind == "percent" and pct < limit) or (kind == "bytes" and free < limit):
        raise TemplateFailed(f"low disk space: {have}, below {s['min_free'][1]:g}"
                             f"{'%' if kind == 'percent' else ' bytes'}")  # fmt: skip
    return have


TEMPLATES = {
    t.name: t
    for t in (
        Template("purge", "delete old jobs with their logs from bak and/or joberrors", (
            Setting("older_than", "age of the jobs to delete, like 30d", None),
            Setting("states", "bak, joberrors, or both", [BAK, JOBERRORS]),
            Setting("interfaces", "all, or a list of interfaces", "all"),
        ), purge),
        Template("stuck-queue", "fail when an interface's oldest queued job is too old", (
            Setting("older_than", "age that counts as stuck, like 1h", None),
            Setting("interfaces", "all, or a list of interfaces", "all"),
        ), stuck_queue),
        Template("disk-space", "fail when the spool's filesystem runs low", (
            Setting("min_free", "free space to keep, like 500MB or 10%", None),
        ), disk_space),
    )
}  # fmt: skip


def settings(template: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The template's settings with defaults filled in and every value checked."""
    t = TEMPLATES.get(template)
    if t is None:
        raise BadRequest(f"unknown template {template!r} (known: {', '.join(TEMPLATES)})")
    known = {s.name for s in t.settings}
    for key in given:
        if key not in known:
            raise BadRequest(f"template {template}: unknown setting {key!r} (known: "
                             f"{', '.join(sorted(known))})")  # fmt: skip
    out = {}
    for s in t.settings:
        value = given.get(s.name, s.default)
        if value is None:
            raise BadRequest(f"template {template}: setting {s.name!r} is required ({s.meaning})")
        try:
            out[s.name] = _CONVERT[s.name](value)
        except ValueError as exc:
            raise BadRequest(
                f"template {template}: {s.name}: expected {exc}, got {value!r}"
            ) from None
    return out
