"""A lane's queue in memory (``worker.Pending``): the order the daemon runs jobs in.

The daemon tests show the order end to end; these drive the structure itself
through the paths a daemon reaches only with tens of thousands of jobs (a
heap folded into the run, a run shortened as it is used), with the limits
made small, against the rule ``docs/spec.rst`` ("Jobs") states: acceptance
order, by stamp, then by name.
"""

from __future__ import annotations

import random
from array import array
from typing import Any, cast

import pytest

from jobspool import worker
from jobspool.spool import Listing, ordered
from jobspool.worker import Pending


@pytest.fixture(autouse=True)
def _small_limits(monkeypatch):
    monkeypatch.setattr(worker, "FOLD_FROM", 8)
    monkeypatch.setattr(worker, "TRIM_FROM", 4)


def listing(jobs: list[tuple[int, str]]) -> Listing:
    return ordered(array("q", [s for s, _ in jobs]), [n for _, n in jobs])


def drain(pending: Pending) -> list[tuple[int, str]]:
    out = []
    while pending:
        out.append(pending.pop())
    return out


def test_a_scan_and_later_offers_come_out_in_stamp_then_name_order():
    pending = Pending()
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
    pending = Pending()
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
    lane = worker.Lane(cast(Any, None), cast(Any, None))  # its queue only: never started
    known = lane.known
    lane.pending.extend(listing([(1, "a.xml"), (2, "b.xml")]))
    lane.pending.offer(3, "c.xml")
    lane.pending.forget("a.xml")
    assert lane.known is known
    assert known == {"b.xml", "c.xml"}


def test_a_refill_adds_only_what_is_not_known():
    pending = Pending()
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
    pending = Pending()
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
