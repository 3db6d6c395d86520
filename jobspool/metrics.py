"""Prometheus metrics as a textfile for node_exporter's textfile collector.

Written atomically (a temporary file in the same directory, then rename), so
the collector never reads half a file. The text format is small enough that
writing it here beats a dependency.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from jobspool.overview import Overview

_COUNTERS = {
    "done": ("jobspool_jobs_processed_total", "Jobs whose handler succeeded."),
    "failed": ("jobspool_jobs_failed_total", "Jobs whose handler failed."),
    "later": ("jobspool_jobs_retried_total", "Handler runs that said try later."),
    "rejected": ("jobspool_jobs_rejected_total", "Dropped files rejected into joberrors."),
    "runs": ("jobspool_handler_runs_total", "Handler runs."),
    "handler_seconds": ("jobspool_handler_seconds_total", "Time spent in handlers."),
}


def render(overview: Iterable[Overview], counters: Mapping[tuple[str, str], float]) -> str:
    """The metrics in Prometheus text format."""
    lines = [
        "# HELP jobspool_queue_depth Jobs waiting in queue/IFACE.",
        "# TYPE jobspool_queue_depth gauge",
    ]
    rows = list(overview)
    lines += [f'jobspool_queue_depth{{interface="{o.interface}"}} {o.queued}' for o in rows]
    lines += [
        "# HELP jobspool_queue_oldest_seconds Age of the oldest queued job.",
        "# TYPE jobspool_queue_oldest_seconds gauge",
    ]
    lines += [
        f'jobspool_queue_oldest_seconds{{interface="{o.interface}"}} {o.oldest_seconds or 0}'
        for o in rows
    ]
    lines += ["# TYPE jobspool_interface_paused gauge"]
    lines += [
        f'jobspool_interface_paused{{interface="{o.interface}"}} {int(o.paused)}' for o in rows
    ]
    for key, (metric, help_text) in _COUNTERS.items():
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
        for (iface, what), value in sorted(counters.items()):
            if what == key:
                lines.append(f'{metric}{{interface="{iface}"}} {value:g}')
    return "\n".join(lines) + "\n"


def write(
    path: Path, overview: Iterable[Overview], counters: Mapping[tuple[str, str], float]
) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(render(overview, counters))
    os.chmod(tmp, 0o644)  # node_exporter runs as another user; the daemon's umask is 0027
    os.replace(tmp, path)
