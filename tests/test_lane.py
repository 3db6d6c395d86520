"""A lane: its queue in memory (``lane.Backlog``) and its group commit of finished jobs.

The daemon tests show the order end to end; the first tests here drive the
backlog itself through the paths a daemon reaches only with tens of
thousands of jobs (a heap folded into the run, a run shortened as it is
used), with the limits made small, against the rule of docs/spec.rst
("Jobs"): acceptance order, by stamp, then by name.

The last ones build a real lane in this process, from a context of its own
and no daemon, on a real spool, and watch its batched commit: every job in
``bak/`` with its log, and nothing moved or reported while the spool cannot
be synced.
"""

from __future__ import annotations

import random
from array import array
from pathlib import Path
from typing import Any

import pytest

from jobspool import lane as lane_module
from jobspool import names
from jobspool.alerts import Alerts
from jobspool.config import DaemonSettings, Interface, Notify
from jobspool.durable import GroupCommit
from jobspool.lane import Backlog, HeldLogs, Lane, LaneContext
from jobspool.listing import Listing, ordered
from jobspool.metrics import Metrics
from jobspool.spool import Spool
from tests.kit import wait_for


@pytest.fixture(autouse=True)
def _small_limits(monkeypatch):
    monkeypatch.setattr(lane_module, "FOLD_FROM", 8)
    monkeypatch.setattr(lane_module, "SHORTEN_FROM", 4)


def listing(jobs: list[tuple[int, str]]) -> Listing:
    return ordered(array("q", [s for s, _ in jobs]), [n for _, n in jobs])


def drain(pending: Backlog) -> list[tuple[int, str]]:
    out = []
    while pending:
        out.append(pending.pop())
    return out


def test_a_scan_and_later_offers_come_out_in_stamp_then_name_order():
    pending = Backlog()
    scanned = [(30, "c.xml"), (10, "a.xml"), (20, "b.xml"), (20, "a2.xml")]
    assert pending.extend(listing(scanned)) == 4
    for job in [(15, "x.xml"), (5, "first.xml"), (20, "a1.xml"), (99, "last.xml")]:
        assert pending.offer(*job)
    assert not pending.offer(1, "b.xml")  # known: an event for a job already queued
    assert len(pending) == 8
    assert drain(pending) == [
        (5, "first.xml"),
        (10, "a.xml"),
        (15, "x.xml"),
        (20, "a1.xml"),
        (20, "a2.xml"),
        (20, "b.xml"),
        (30, "c.xml"),
        (99, "last.xml"),
    ]
    assert len(pending.known) == 8  # taken is not done: still known until forgotten


def test_a_job_put_back_is_taken_first_again():
    pending = Backlog()
    pending.extend(listing([(i, f"job-{i:02d}.xml") for i in range(20)]))
    head = pending.pop()
    assert head == (0, "job-00.xml")
    pending.put_back(*head)
    assert pending.pop() == head
    pending.put_back(*head)
    for i in range(20, 40):  # enough offers to fold the heap into the run
        pending.offer(i, f"job-{i:02d}.xml")
    assert [name for _, name in drain(pending)] == [f"job-{i:02d}.xml" for i in range(40)]


def test_a_lane_shows_the_names_it_knows():
    lane = Lane(Interface("orders_in", command=("true",)), context(Spool(Path("/none"), [])))
    known = lane.known  # its queue only: never started
    lane.backlog.extend(listing([(1, "a.xml"), (2, "b.xml")]))
    lane.backlog.offer(3, "c.xml")
    lane.backlog.forget("a.xml")
    assert lane.known is known
    assert known == {"b.xml", "c.xml"}


def test_a_refill_adds_only_what_is_not_known():
    pending = Backlog()
    pending.extend(listing([(1, "a.xml"), (2, "b.xml")]))
    pending.offer(3, "c.xml")
    assert pending.extend(listing([(1, "a.xml"), (3, "c.xml"), (4, "d.xml")])) == 1
    assert pending.extend(listing([(1, "a.xml")])) == 0
    taken = drain(pending)
    assert taken == [(1, "a.xml"), (2, "b.xml"), (3, "c.xml"), (4, "d.xml")]
    for _, name in taken:
        pending.forget(name)
    assert not pending.known
    assert pending.extend(listing([(1, "a.xml")])) == 1  # back in the folder: queued again


def test_any_mix_of_scans_offers_takes_and_put_backs_keeps_the_order():
    rng = random.Random(5)
    pending = Backlog()
    model: set[tuple[int, str]] = set()  # what is waiting
    taken: dict[str, int] = {}  # taken, not yet done
    n = 0
    for _ in range(3000):
        action = rng.random()
        if action < 0.3:
            n += 1
            job = (rng.randrange(500), f"j{n}.xml")
            assert pending.offer(*job)
            model.add(job)
        elif action < 0.35:  # a scan: some new, some known
            jobs = [(rng.randrange(500), f"j{n + k}.xml") for k in range(1, rng.randrange(30))]
            n += len(jobs)
            known = rng.sample(sorted(model), min(3, len(model)))
            assert pending.extend(listing(jobs + known)) == len(jobs)
            model.update(jobs)
        elif action < 0.75 and model:
            first = pending.pop()
            assert first == min(model)
            model.remove(first)
            taken[first[1]] = first[0]
        elif action < 0.85 and taken:
            name = rng.choice(sorted(taken))
            stamp = taken.pop(name)
            pending.put_back(stamp, name)  # try later
            model.add((stamp, name))
        elif taken:
            name = rng.choice(sorted(taken))
            del taken[name]
            pending.forget(name)
        assert len(pending) == len(model)
        assert len(pending.known) == len(model) + len(taken)
    assert drain(pending) == sorted(model)


# --- a real lane, built without a daemon ---------------------------------------------------


class Lines:
    """A logger that keeps what it is told, bound fields included: (level, event, fields)."""

    def __init__(self, lines: list[Any] | None = None, **bound: Any) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = [] if lines is None else lines
        self.bound = bound

    def bind(self, **fields: Any) -> Lines:
        return Lines(self.lines, **self.bound, **fields)

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.lines.append((level, event, {**self.bound, **kw}))

    def said(self, event: str) -> list[dict[str, Any]]:
        return [kw for _, e, kw in self.lines if e == event]


class FailingSync:
    """A spool sync that fails its first ``failures`` calls, as a disk in trouble does."""

    def __init__(self, spool: Spool, failures: int) -> None:
        self.spool, self.failures, self.calls = spool, failures, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(5, "Input/output error")
        self.spool.sync()


def context(spool: Spool, sync: Any = None, logger: Any = None) -> LaneContext:
    settings = DaemonSettings(backoff_initial=0.01, backoff_max=0.05)
    logger = logger or Lines()
    commit = GroupCommit(sync or spool.sync, logger, backoff_max=0.05)
    alerts = Alerts(Notify(), logger, str(spool.root))  # no routes: nobody is told
    held, metrics = HeldLogs(), Metrics(0.0)
    return LaneContext(spool, settings, Path.cwd(), logger, commit, held, metrics, alerts)


def queued_spool(root: Path, count: int) -> tuple[Spool, list[str]]:
    spool = Spool(root, ["orders_in"])
    spool.init()
    jobs = [f"order-{i:03d}.xml" for i in range(count)]
    for job in jobs:
        spool.write(spool.dir("queue", "orders_in") / job, [b"<order/>"], stamp_ns=spool.stamp())
    return spool, jobs


def run_lane(lane: Lane, until: Any) -> None:
    lane.refill()
    lane.start()
    try:
        wait_for(until, "the lane to finish its jobs")
    finally:
        lane.stop()
        lane.join(10)


def test_a_lane_built_from_its_context_commits_a_burst_in_batches(tmp_path):
    spool, jobs = queued_spool(tmp_path / "spool", 150)
    ctx = context(spool)
    lane = Lane(Interface("orders_in", command=("true",)), ctx)
    bak = spool.dir("bak", "orders_in")
    run_lane(lane, lambda: len(ctx.logger.said("done")) == len(jobs))

    assert sorted(p.name for p in bak.iterdir()) == sorted(
        [*jobs, *(names.log_name(j) for j in jobs)]
    )
    assert list(spool.dir("queue", "orders_in").iterdir()) == []
    assert [kw["to"] for kw in ctx.logger.said("done")] == ["bak/orders_in"] * len(jobs)
    assert ctx.metrics.jobs[("orders_in", "done")] == len(jobs)


def test_a_failed_sync_moves_no_job_past_its_log_and_reports_nothing(tmp_path):
    spool, jobs = queued_spool(tmp_path / "spool", 5)
    sync = FailingSync(spool, failures=3)
    ctx = context(spool, sync)
    lane = Lane(Interface("orders_in", command=("true",)), ctx)
    queue, bak = spool.dir("queue", "orders_in"), spool.dir("bak", "orders_in")
    seen: list[tuple[int, int, int]] = []  # (syncs so far, jobs in bak, jobs reported done)

    def finished() -> bool:
        jobs_in_bak = len([p for p in bak.iterdir() if not p.name.endswith(",log.xml")])
        seen.append((sync.calls, jobs_in_bak, len(ctx.logger.said("done"))))
        return len(ctx.logger.said("done")) == len(jobs)

    run_lane(lane, finished)

    # while every sync failed, nothing left the queue and nothing was said done
    assert all(in_bak == 0 and done == 0 for calls, in_bak, done in seen if calls <= 3)
    assert sorted(p.name for p in bak.iterdir() if not p.name.endswith(",log.xml")) == jobs
    assert list(queue.iterdir()) == []
    assert (
        len(ctx.logger.said("cannot sync the spool; nothing more is reported until a sync works"))
        == 1
    )
    assert len(ctx.logger.said("the spool syncs again")) == 1
