"""Structured logging: native journal entries under systemd, JSON lines on a pipe, text on a tty.

Every line the daemon writes about a job is bound to ``job`` and
``interface``; one line per state change. Where the lines go is
``$JOBSPOOL_LOG``:

- ``auto`` (the default): ``journal`` when ``$JOURNAL_STREAM`` says stderr
  is the journal (as under systemd), else ``console`` on a terminal, else
  ``json``;
- ``journal``: journald's native protocol (:mod:`jobspool.journal`): the
  entry's PRIORITY from its level, a readable MESSAGE ("order-1.xml done:
  bak/orders_in"), ``SYSLOG_IDENTIFIER=jobspool`` and every field as
  ``JOBSPOOL_<FIELD>`` (JOBSPOOL_JOB, JOBSPOOL_INTERFACE, JOBSPOOL_EVENT,
  JOBSPOOL_SCHEDULE, ...). Should journald not take an entry, it goes to
  stderr with a ``<N>`` priority prefix, which a journal stream understands;
- ``json``: one JSON object per line on stderr, ``timestamp`` in UTC with its
  offset (``2026-12-01T03:00:00.123+00:00``);
- ``console``: readable lines with local times, coloured unless
  ``$NO_COLOR`` is set (https://no-color.org).
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

import structlog

from jobspool import journal
from jobspool.errors import ConfigError

MODES = ("auto", "journal", "json", "console")
# syslog priorities journald filters on (journalctl -p): err 3, warning 4, info 6, debug 7.
PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "info": 6, "debug": 7}

_base: Any = None  # the configured logger, bound once: get() is called for every job


def setup(json: bool | None = None, level: int = logging.INFO, mode: str | None = None) -> str:
    """Configure structlog; return the mode chosen (see the module's documentation).

    ``json`` (True or False) forces ``json`` or ``console``; ``mode`` one of
    :data:`MODES`; without either, ``$JOBSPOOL_LOG`` decides.
    """
    global _base
    _base = None
    if json is not None:
        mode = "json" if json else "console"
    mode = mode or os.environ.get("JOBSPOOL_LOG") or "auto"
    if mode not in MODES:
        raise ConfigError(f"$JOBSPOOL_LOG: expected {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        if journal.stderr_is_journal():
            mode = "journal"
        else:
            mode = "console" if sys.stderr.isatty() else "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    factory: Any = structlog.WriteLoggerFactory(sys.stderr)  # one write per line
    if mode == "journal":
        processors += [structlog.processors.format_exc_info, journal_entry]
        factory = _JournalFactory()
    elif mode == "json":
        processors += [
            _utc_timestamp,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
    else:
        colors = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
        processors += [
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S%z", utc=False),
            structlog.dev.ConsoleRenderer(colors=colors),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # watchdog and others log through the standard library: keep their
    # warnings, in one line each, on the same stream (as entries in the journal).
    where: dict[str, Any] = {"handlers": [_Forward()]} if mode == "journal" else {}
    where = where or {"stream": sys.stderr, "format": "%(name)s: %(message)s"}
    logging.basicConfig(level=logging.WARNING, force=True, **where)
    return mode


def get(**bound: Any) -> Any:
    """A logger with ``bound`` fields on every line."""
    global _base
    if _base is None:
        _base = structlog.get_logger("jobspool").bind()
    return _base.bind(**bound)


def message(event: str, fields: dict[str, Any]) -> str:
    """A line a person reads: "order-1.xml done: bak/orders_in", "... rejected: joberrors (why)"."""
    subject = fields.get("job") or fields.get("schedule")
    text = f"{subject} {event}" if subject else event
    if fields.get("to"):
        text += f": {fields['to']}"
    detail = fields.get("reason") or fields.get("error")
    if fields.get("outcome"):
        detail = f"{fields['outcome']}: {fields['message']}" if fields.get("message") else None
        detail = detail or str(fields["outcome"])
    elif not detail:
        detail = fields.get("message")
    return f"{text} ({detail})" if detail else text


def journal_entry(logger: Any, method: str, event_dict: dict[str, Any]) -> Any:
    """structlog's last processor in ``journal`` mode: the entry, and a fallback line."""
    level = str(event_dict.pop("level", method))
    event = str(event_dict.pop("event", ""))
    exception = event_dict.pop("exception", None)
    text = message(event, event_dict)
    if exception:
        text += "\n" + str(exception)
    priority = str(PRIORITY.get(level, 6))
    fields = [("MESSAGE", text), ("PRIORITY", priority), ("SYSLOG_IDENTIFIER", "jobspool"),
              ("JOBSPOOL_EVENT", event)]  # fmt: skip
    for key, value in event_dict.items():
        fields.append((journal.field_name(key, "JOBSPOOL_"), _text(value)))
    return (journal.encode(fields),), {"fallback": f"<{priority}>{text}"}


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    import json

    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:
        return str(value)


def _utc_timestamp(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict["timestamp"] = datetime.now(UTC).isoformat(timespec="milliseconds")
    return event_dict


class _JournalLogger:
    """Sends each rendered entry to journald; stderr (with its priority prefix) if it cannot."""

    def __init__(self, sender: journal.Journal) -> None:
        self.sender = sender

    def msg(self, entry: bytes, fallback: str) -> None:
        try:
            self.sender.send(entry)
        except OSError:
            # A journal stream reads "<N>" as the priority: the level survives.
            lines = fallback.splitlines() or [""]
            prefix = fallback[: fallback.index(">") + 1]
            sys.stderr.write("\n".join([lines[0], *(prefix + line for line in lines[1:])]) + "\n")
            sys.stderr.flush()

    debug = info = warning = warn = error = critical = exception = fatal = msg


class _JournalFactory:
    def __init__(self) -> None:
        self.sender = journal.Journal()

    def __call__(self, *args: Any) -> _JournalLogger:
        return _JournalLogger(self.sender)


class _Forward(logging.Handler):
    """Standard library records (watchdog's) as entries like every other."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            get(logger=record.name).log(record.levelno, record.getMessage())
        except Exception:
            self.handleError(record)
