"""Notifications: what the daemon tells people, gathered, spaced, and sent off its main loop.

The daemon, its lanes and its scheduler call :meth:`Alerts.emit` with an
:class:`Event` (a job rejected or failed, a schedule failed, a stuck queue, a
job blocking its interface, low disk, a machine fault starting or ending).
``emit`` takes a lock, appends to a bounded queue and returns: it never
waits for a mail server, and when the queue is full an event is only counted
(the next notification says how many). Nothing here can lose or hold up a
job: the job is where it is before its event is emitted.

One thread of its own sends. Each route (``notify.routes``) gathers the
events it wants: a notification goes out ``gather`` seconds after the first
event that found the route idle, and then no sooner than ``interval`` after
the previous one, so a burst of 500 rejections is one notification that
counts them (and lists the first :data:`ITEMIZED`), and a steady trickle is
one every ``interval``. Routes are served one after the other; a slow one
delays the others by at most its timeout (times its tries, for a webhook).
A route that fails is logged at error, and its notification is dropped: the
journal has every event anyway.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from jobspool.config import Notify, Route
from jobspool.notices import ITEMIZED, Event, Notice, iso

Sender = Callable[[Route, Notice], None]


class _Gathered:
    """What one route has gathered since its last notification."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.counts: Counter[str] = Counter()
        self.interfaces: Counter[str] = Counter()
        self.unrecorded = 0
        self.since: float | None = None  # monotonic time of the first event gathered
        self.last_sent = float("-inf")

    def add(self, event: Event, now: float) -> None:
        if self.since is None:
            self.since = now
        if len(self.events) < ITEMIZED:
            self.events.append(event)
        self.counts[event.kind] += 1
        if event.interface:
            self.interfaces[event.interface] += 1

    def due(self, settings: Notify) -> float | None:
        """When its notification goes out (monotonic), or None when it has nothing."""
        if self.since is None:
            return None
        return max(self.since + settings.gather, self.last_sent + settings.interval)

    def take(self, host: str, spool: str, now: float) -> Notice:
        """The notification of what was gathered; the route starts gathering anew."""
        notice = Notice(host, spool, tuple(self.events), dict(self.counts),
                        dict(self.interfaces), self.unrecorded)  # fmt: skip
        self.events, self.counts, self.interfaces = [], Counter(), Counter()
        self.unrecorded, self.since, self.last_sent = 0, None, now
        return notice


class Alerts:
    """The notifier of one daemon: :meth:`emit` from anywhere, one thread sends."""

    def __init__(self, settings: Notify, log: Any, spool: str, send: Sender | None = None) -> None:
        self.log = log
        self.spool = spool
        self.host = socket.gethostname()
        self.send = send or _deliver
        self.cond = threading.Condition()
        self.incoming: deque[Event] = deque()
        self.dropped: Counter[str] = Counter()
        self.gathered: dict[str, _Gathered] = {}
        self.wanted: dict[str, tuple[str, ...]] = {}
        self.settings = settings
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.fault_since: float | None = None  # the episode going on (wall clock)
        self.last_fault = 0.0  # monotonic
        self.faults = 0
        self.blocking_told: set[tuple[str, str, float]] = set()
        self.configure(settings)

    def configure(self, settings: Notify) -> None:
        """New routes (a reload): what routes that stay had gathered goes with them."""
        with self.cond:
            self.settings = settings
            self.gathered = {n: self.gathered.get(n) or _Gathered() for n in settings.routes}
            wanted: dict[str, list[str]] = {}
            for name, route in settings.routes.items():
                for kind in route.events:
                    wanted.setdefault(kind, []).append(name)
            self.wanted = {k: tuple(v) for k, v in wanted.items()}
            if settings.routes and self.thread is None:
                self.thread = threading.Thread(target=self._serve, name="alerts", daemon=True)
                self.thread.start()
            self.cond.notify_all()

    # --- what the daemon calls ------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Hand over an event; cheap, never blocks, never raises for a full queue."""
        if event.kind not in self.wanted:  # no route wants it (or none at all)
            return
        if not event.at:
            event = event._replace(at=time.time())
        with self.cond:
            if len(self.incoming) >= self.settings.queue:
                self.dropped[event.kind] += 1
                return
            self.incoming.append(event)
            if len(self.incoming) == 1:
                self.cond.notify()

    def fault(self, reason: str) -> None:
        """A machine fault (a failed sync, a write refused): the first one starts an episode.

        The episode ends, with an event of its own, after ``fault_quiet``
        seconds without another fault.
        """
        with self.cond:
            self.last_fault = time.monotonic()
            self.faults += 1
            if self.fault_since is not None:
                return
            self.fault_since = time.time()
        self.emit(Event("fault-start", reason=reason))
        with self.cond:
            self.cond.notify()  # its end needs a deadline on the thread

    def blocking(self, interface: str, job: str, since: float, reason: str) -> None:
        """A job keeps the head of ``interface`` since ``since``: an event once it is too long."""
        if time.time() - since < self.settings.blocking_after:
            return
        key = (interface, job, since)
        with self.cond:
            if key in self.blocking_told:
                return
            self.blocking_told.add(key)
        self.emit(Event("job-blocking", job=job, interface=interface,
                        reason=f"blocks the queue since {iso(since)}: {reason}"))  # fmt: skip

    def stop(self, timeout: float) -> None:
        """Send what is gathered now (without waiting out ``interval``), for up to ``timeout``."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            thread = self.thread
        if thread is not None:
            thread.join(timeout)

    # --- the thread -----------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self.cond:
                now = time.monotonic()
                self._gather(now)
                due = [
                    (name, g.take(self.host, self.spool, now))
                    for name, g in self.gathered.items()
                    if (when := g.due(self.settings)) is not None and (self.stopping or when <= now)
                ]
                routes = dict(self.settings.routes)
                if not due:
                    if self.stopping:
                        return
                    waits = [g.due(self.settings) for g in self.gathered.values()]
                    if self.fault_since is not None:
                        waits.append(self.last_fault + self.settings.fault_quiet)
                    deadline = min((w for w in waits if w is not None), default=None)
                    self.cond.wait(None if deadline is None else max(deadline - now, 0.01))
                    continue
            for name, notice in due:
                route = routes.get(name)
                if route is not None:
                    self._send(route, notice)

    def _gather(self, now: float) -> None:
        """Hand what came in to the routes that want it (under the lock)."""
        if self.fault_since is not None and now - self.last_fault >= self.settings.fault_quiet:
            end = Event("fault-end", reason=f"{self.faults} fault(s) since "
                        f"{iso(self.fault_since)}; none for {self.settings.fault_quiet:g}s",
                        at=time.time())  # fmt: skip
            self.fault_since, self.faults = None, 0
            if end.kind in self.wanted:
                self.incoming.append(end)
        while self.incoming:
            event = self.incoming.popleft()
            for name in self.wanted.get(event.kind, ()):
                self.gathered[name].add(event, now)
        for kind, n in self.dropped.items():
            for name in self.wanted.get(kind, ()):
                g = self.gathered[name]
                g.since = now if g.since is None else g.since
                g.counts[kind] += n
                g.unrecorded += n
        self.dropped.clear()

    def _send(self, route: Route, notice: Notice) -> None:
        try:
            self.send(route, notice)
        except Exception as exc:  # a mail server down must not end the thread
            self.log.error("cannot send a notification", route=route.name, events=notice.total,
                           error=str(exc) or type(exc).__name__)  # fmt: skip
        else:
            self.log.info("notification sent", route=route.name, events=notice.total)


def _deliver(route: Route, notice: Notice) -> None:
    from jobspool.senders import deliver

    deliver(route, notice)


def test_notice(spool: str) -> Notice:
    """What ``jobspool notify test`` sends through every route."""
    event = Event("test", reason="a test from 'jobspool notify test'", at=time.time())
    return Notice(socket.gethostname(), spool, (event,), {"test": 1}, {})
