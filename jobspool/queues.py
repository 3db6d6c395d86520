"""Every queue at once (``jobspool queue --all``, Postfix's ``postqueue -p``).

Per interface, its jobs in processing order, each with its state: ``held``
(skipped until released), ``blocking`` (the head, waiting to try again:
the reason is the daemon's ``state/blocked/IFACE``), ``paused`` (the
interface is paused) or ``waiting``. Only the standard library and
:mod:`jobspool.spool`: it is a read command.
"""

from __future__ import annotations

from typing import NamedTuple

from jobspool import hold
from jobspool.spool import Spool


class Queued(NamedTuple):
    """One queued job as ``queue --all`` shows it."""

    interface: str
    job: str
    stamp: int
    state: str  # waiting | held | blocking | paused
    reason: str | None


def every_queue(spool: Spool, interfaces: list[str] | None = None) -> list[Queued]:
    """Every queued job of ``interfaces`` (default: all), by interface, in processing order."""
    spool.require()
    held = set(hold.held(spool))
    out = []
    for iface in interfaces or spool.interfaces:
        listing = spool.listing(iface)
        paused = spool.is_paused(iface)
        try:
            blocked: str | None = spool.blocked_marker(iface).read_text().strip() or None
        except OSError:
            blocked = None
        for stamp, name in zip(listing.stamps, listing.names, strict=True):
            if name in held:
                out.append(Queued(iface, name, stamp, "held", "held by hand"))
            elif paused:
                out.append(Queued(iface, name, stamp, "paused", f"{iface} is paused"))
            elif blocked is not None and blocked.startswith(f"{name} "):
                out.append(Queued(iface, name, stamp, "blocking", blocked))
            else:
                out.append(Queued(iface, name, stamp, "waiting", None))
    return out
