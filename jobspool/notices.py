"""What a notification is made of: an event, and a notice that gathers events for a route.

Plain records, shared by :mod:`jobspool.alerts` (which gathers and spaces
them) and :mod:`jobspool.senders` (which sends them): neither needs the other.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any, NamedTuple

ITEMIZED = 20  # events a notification lists one by one; the rest are counted

# How a notification's subject counts each kind of event.
PHRASES = {
    "job-rejected": "job(s) rejected",
    "job-failed": "job(s) failed",
    "schedule-failed": "scheduled run(s) failed",
    "queue-stuck": "stuck queue report(s)",
    "job-blocking": "job(s) blocking their interface",
    "disk-low": "low disk space report(s)",
    "fault-start": "machine fault(s) began",
    "fault-end": "machine fault(s) ended",
    "test": "test notification(s)",
}


class Event(NamedTuple):
    """Something a person should hear of; ``kind`` is one of :data:`config.EVENTS`."""

    kind: str
    job: str | None = None
    interface: str | None = None
    schedule: str | None = None
    reason: str | None = None
    at: float = 0.0  # when; emit() sets it

    def line(self) -> str:
        """One readable line: "orders_in: order-1.xml job-failed (exit 3)"."""
        what = " ".join(x for x in (self.job, self.kind) if x)
        where = self.interface or self.schedule
        text = f"{where}: {what}" if where else what
        return f"{text} ({self.reason})" if self.reason else text

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "time": iso(self.at), "job": self.job,
                "interface": self.interface, "schedule": self.schedule,
                "reason": self.reason}  # fmt: skip


class Notice(NamedTuple):
    """One notification: what a route gathered, the first events one by one."""

    host: str
    spool: str
    events: tuple[Event, ...]  # the first ITEMIZED
    counts: dict[str, int]  # every event, by kind (those only counted too)
    interfaces: dict[str, int]  # every event that names an interface, by interface
    unrecorded: int = 0  # events counted while the queue was full: no details

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def subject(self) -> str:
        """The mail subject: one event in full, or the counts."""
        if self.total == 1 and self.events:
            return f"jobspool on {self.host}: {self.events[0].line()}"
        parts = [f"{n} {PHRASES.get(k, k)}" for k, n in sorted(self.counts.items())]
        where = ", ".join(f"{i} {n}" for i, n in sorted(self.interfaces.items()))
        return f"jobspool on {self.host}: " + ", ".join(parts) + (f" ({where})" if where else "")

    def text(self) -> str:
        """The mail body: the counts, the first events, where to look for the rest."""
        lines = [self.subject(), "", f"Spool: {self.spool}", ""]
        lines += [f"{n:6}  {PHRASES.get(k, k)}" for k, n in sorted(self.counts.items())]
        lines += ["", "First events:" if self.total > len(self.events) else "Events:"]
        lines += [f"  {iso(e.at)}  {e.line()}" for e in self.events]
        rest = self.total - len(self.events)
        if rest > 0:
            lines.append(f"  ... and {rest} more")
        if self.unrecorded:
            lines.append(f"({self.unrecorded} of them arrived while the notifier was behind)")
        lines += ["", "The journal has every event: journalctl -t jobspool -p warning",
                  "Jobs that failed or were rejected: ls " + os.path.join(self.spool, "joberrors"),
                  ""]  # fmt: skip
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        """What a webhook and a command get; ``text`` suits Slack-like incoming webhooks."""
        return {"host": self.host, "spool": self.spool, "text": self.subject(),
                "total": self.total, "counts": self.counts, "interfaces": self.interfaces,
                "events": [e.as_json() for e in self.events],
                "unlisted": self.total - len(self.events)}  # fmt: skip


def iso(timestamp: float) -> str:
    """Local time with its UTC offset, as the job logs show it."""
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")
