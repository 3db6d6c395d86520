"""Structured logging: JSON lines under systemd (or any pipe), readable on a tty.

Every line the daemon writes about a job is bound to ``job`` and
``interface``; one line per state change. Logs go to stderr, which journald
collects.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_base: Any = None  # the configured logger, bound once: get() is called for every job


def setup(json: bool | None = None, level: int = logging.INFO) -> None:
    """Configure structlog; ``json`` defaults to "stderr is not a terminal"."""
    global _base
    _base = None
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per line (print() makes two: the line, then "\n").
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # watchdog and others log through the standard library: keep their
    # warnings, in one line each, on the same stream.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")


def get(**bound: Any) -> Any:
    """A logger with ``bound`` fields on every line."""
    global _base
    if _base is None:
        _base = structlog.get_logger("jobspool").bind()
    return _base.bind(**bound)
