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


def setup(json: bool | None = None, level: int = logging.INFO) -> None:
    """Configure structlog; ``json`` defaults to "stderr is not a terminal"."""
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
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # watchdog and others log through the standard library: keep their
    # warnings, in one line each, on the same stream.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")


def get(**bound: Any) -> Any:
    """A logger with ``bound`` fields on every line."""
    return structlog.get_logger("jobspool").bind(**bound)
