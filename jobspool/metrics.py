"""Prometheus metrics as a textfile for node_exporter's textfile collector.

:class:`Metrics` holds what the daemon counts between two writes (thread-safe:
lanes count from their threads); :meth:`Metrics.render` turns it and the
spool's :func:`~jobspool.overview.overview` into the text format, which
``promtool check metrics`` accepts without a warning:

- every family has HELP and TYPE, and every label set the configuration
  knows (each interface, each schedule, each outcome) is there from the
  first write, at 0: an ``increase()`` alert then sees the first failure
  too, where a series born with its first event would hide it;
- ``jobspool_up`` is 1 while the daemon runs and 0 in the file its clean
  stop writes last; ``jobspool_metrics_write_time_seconds`` says when the
  file was written, so a stale file (a killed or hung daemon) is told from
  a stopped one.

Written atomically (a temporary file in the same directory, then rename),
so the collector never reads half a file. The text format is small enough
that writing it here beats a dependency.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from jobspool.overview import Overview

# Handler run times, in seconds: from a quick import to a long export.
BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
JOB_COUNTERS = {
    "done": ("jobspool_jobs_processed_total", "Jobs whose handler succeeded (moved to bak)."),
    "failed": ("jobspool_jobs_failed_total", "Jobs whose handler failed (moved to joberrors)."),
    "later": ("jobspool_jobs_retried_total", "Handler runs that said try later."),
    "rejected": ("jobspool_jobs_rejected_total", "Dropped files rejected into joberrors."),
}
OUTCOMES = ("ok", "failed", "skipped")  # a schedule run's, as recorded


class _Histogram:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * len(BUCKETS)  # not cumulative; +Inf is ``count``
        self.count = 0
        self.sum = 0.0


class Run(NamedTuple):
    """A schedule's last recorded run, as the metrics show it."""

    outcome: str
    start: float
    end: float


class Metrics:
    """The daemon's counters, handler histograms and schedule outcomes (thread-safe)."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.lock = threading.Lock()
        self.jobs: dict[tuple[str, str], int] = {}  # (interface, done|failed|later|rejected)
        self.handlers: dict[str, _Histogram] = {}
        self.runs: dict[tuple[str, str], int] = {}  # (schedule, outcome)
        self.last: dict[str, Run | None] = {}
        self.last_ok: dict[str, float | None] = {}

    def know(self, interfaces: Iterable[str], schedules: Iterable[str]) -> None:
        """Every series of these interfaces and schedules, at 0 until something happens."""
        with self.lock:
            for iface in interfaces:
                for what in JOB_COUNTERS:
                    self.jobs.setdefault((iface, what), 0)
                self.handlers.setdefault(iface, _Histogram())
            for sid in schedules:
                for outcome in OUTCOMES:
                    self.runs.setdefault((sid, outcome), 0)
                self.last.setdefault(sid, None)
                self.last_ok.setdefault(sid, None)

    def count(self, interface: str, what: str) -> None:
        """One job (or handler run) of ``interface``: done, failed, later or rejected."""
        with self.lock:
            key = (interface, what)
            self.jobs[key] = self.jobs.get(key, 0) + 1

    def handler(self, interface: str, seconds: float) -> None:
        """One handler run of ``interface`` that took ``seconds``."""
        with self.lock:
            h = self.handlers.get(interface)
            if h is None:
                h = self.handlers[interface] = _Histogram()
            i = bisect.bisect_left(BUCKETS, seconds)
            if i < len(BUCKETS):
                h.buckets[i] += 1
            h.count += 1
            h.sum += seconds

    def schedule(self, sid: str, run: Run, counted: bool = True) -> None:
        """A recorded run of ``sid``; ``counted=False`` seeds the last run from history."""
        with self.lock:
            if counted:
                key = (sid, run.outcome)
                self.runs[key] = self.runs.get(key, 0) + 1
            last = self.last.get(sid)
            if last is None or run.start >= last.start:
                self.last[sid] = run
            if run.outcome == "ok" and run.end > (self.last_ok.get(sid) or 0.0):
                self.last_ok[sid] = run.end

    def render(self, overview: Iterable[Overview], now: float, up: bool = True) -> str:
        """The metrics in Prometheus text format, as of ``now``."""
        rows = list(overview)
        out: list[str] = []
        for name, help_text, value in (
            ("jobspool_up", "1 while the daemon runs; 0 once it stopped cleanly.", int(up)),
            (
                "jobspool_daemon_start_time_seconds",
                "When the daemon started (Unix time).",
                self.started,
            ),
            (
                "jobspool_metrics_write_time_seconds",
                "When the daemon wrote this file (Unix "
                "time); an old one means a killed or hung daemon.",
                now,
            ),
        ):
            _family(out, name, "gauge", help_text, [("", value)])
        for name, help_text, of in _PER_INTERFACE:
            _family(
                out,
                name,
                "gauge",
                help_text,
                [(_labels(interface=o.interface), of(o)) for o in rows],
            )
        with self.lock:
            jobs = dict(self.jobs)
            hists = {i: (list(h.buckets), h.count, h.sum) for i, h in self.handlers.items()}
            runs = dict(self.runs)
            last = dict(self.last)
            last_ok = dict(self.last_ok)
        for what, (name, help_text) in JOB_COUNTERS.items():
            counts = [(_labels(interface=i), n) for (i, w), n in sorted(jobs.items()) if w == what]
            _family(out, name, "counter", help_text, counts)
        _histograms(out, hists)
        per_outcome = [(_labels(schedule=s, outcome=o), n) for (s, o), n in sorted(runs.items())]
        _family(
            out,
            "jobspool_schedule_runs_total",
            "counter",
            "Recorded runs of each schedule by outcome (ok, failed, skipped).",
            per_outcome,
        )
        outcome = [
            (_labels(schedule=s, outcome=o), int(r is not None and r.outcome == o))
            for s, r in sorted(last.items())
            for o in OUTCOMES
        ]
        _family(
            out,
            "jobspool_schedule_last_outcome",
            "gauge",
            "1 for the outcome of the schedule's last recorded run, 0 for the others.",
            outcome,
        )
        started = [(_labels(schedule=s), r.start if r else 0) for s, r in sorted(last.items())]
        _family(
            out,
            "jobspool_schedule_last_run_time_seconds",
            "gauge",
            "When the schedule's last recorded run started (0: none on record).",
            started,
        )
        took = [(_labels(schedule=s), r.end - r.start if r else 0) for s, r in sorted(last.items())]
        _family(
            out,
            "jobspool_schedule_last_duration_seconds",
            "gauge",
            "How long the schedule's last recorded run took.",
            took,
        )
        ok = [(_labels(schedule=s), t or 0) for s, t in sorted(last_ok.items())]
        _family(
            out,
            "jobspool_schedule_last_success_time_seconds",
            "gauge",
            "When the schedule's last successful run ended (0: none on record).",
            ok,
        )
        return "\n".join(out) + "\n"


_PER_INTERFACE: tuple[tuple[str, str, Callable[[Overview], float]], ...] = (
    (
        "jobspool_incoming_files",
        "Files in incoming/IFACE waiting to be taken.",
        lambda o: o.incoming,
    ),
    ("jobspool_queue_depth", "Jobs waiting in queue/IFACE.", lambda o: o.queued),
    (
        "jobspool_queue_oldest_seconds",
        "Age of the oldest queued job (0: none queued).",
        lambda o: o.oldest_seconds or 0,
    ),
    (
        "jobspool_interface_paused",
        "1 while the interface is paused (jobspool pause).",
        lambda o: int(o.paused),
    ),
    (
        "jobspool_interface_blocked",
        "1 while the job at the head of the queue waits to be tried again.",
        lambda o: int(o.blocked is not None),
    ),
    ("jobspool_joberrors_jobs", "Jobs of the interface in joberrors.", lambda o: o.errors),
)


def _histograms(out: list[str], hists: Mapping[str, tuple[list[int], int, float]]) -> None:
    name = "jobspool_handler_duration_seconds"
    out += [f"# HELP {name} How long handler runs took.", f"# TYPE {name} histogram"]
    for iface, (buckets, count, total) in sorted(hists.items()):
        cumulative = 0
        for bound, n in zip(BUCKETS, buckets, strict=True):
            cumulative += n
            out.append(f"{name}_bucket{_labels(interface=iface, le=f'{bound:g}')} {cumulative}")
        out.append(f"{name}_bucket{_labels(interface=iface, le='+Inf')} {count}")
        out.append(f"{name}_sum{_labels(interface=iface)} {_number(total)}")
        out.append(f"{name}_count{_labels(interface=iface)} {count}")


def _family(
    out: list[str], name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]
) -> None:
    out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    out += [f"{name}{labels} {_number(value)}" for labels, value in samples]


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value)) if value != int(value) else str(int(value))


def seed(metrics: Metrics, runs: Mapping[str, Iterable[Mapping[str, str]]]) -> None:
    """Fill the schedules' last run and last success from their recorded results.

    ``runs`` maps each schedule to its results' attributes, newest first (as
    :func:`jobspool.schedules.read_result` gives them); each is read only
    until a successful run is found.
    """
    from datetime import datetime

    for sid, results in runs.items():
        for attrs in results:
            try:
                run = Run(
                    attrs["outcome"],
                    datetime.fromisoformat(attrs["start"]).timestamp(),
                    datetime.fromisoformat(attrs["end"]).timestamp(),
                )
            except (KeyError, ValueError):
                continue
            metrics.schedule(sid, run, counted=False)
            if run.outcome == "ok":
                break


def write(path: Path, text: str) -> None:
    """Replace the textfile at ``path`` with ``text`` atomically, readable by node_exporter."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)  # node_exporter runs as another user; the daemon's umask is 0027
    os.replace(tmp, path)
