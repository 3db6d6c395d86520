"""Crash safety: SIGKILL at random moments loses no job and leaves none in two places.

One scenario, run once for the module: 1,000 jobs are renamed into a drop
folder in five bursts while a daemon is started and killed with SIGKILL again
and again, at moments drawn from a seeded ``random.Random`` (so a failure
reproduces with the same seed), some of them aimed at a write in progress in
``tmp/``. The handler appends its ``$JOBSPOOL_JOB`` to a ledger (O_APPEND).
A last ``daemon --once`` finishes the work. The tests then look at the spool
as a sysadmin would.

The promises tested here are in ``docs/spec.rst`` ("Jobs").
"""

from __future__ import annotations

import collections
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.kit import (
    Daemon,
    Site,
    log_events,
    log_root,
    valid_log,
)

SEED = 20261122
JOBS = 1000
BURSTS = 5
CYCLES = 25  # daemon starts, each ended by SIGKILL
AIMED = {1, 6, 11, 16, 21}  # cycles whose kill waits for a write in progress in tmp/
HANDLER = 'echo "$JOBSPOOL_JOB" >> "$T/ledger"\nsleep 0.005'


@dataclass
class Crashes:
    site: Site
    names: list[str]  # in drop order
    kills: int = 0
    aimed_kills: int = 0  # kills that hit a write in progress (a file was in tmp/)
    busy_kills: int = 0  # kills while jobs were still waiting in incoming/ or queue/
    leftovers: list[str] = field(default_factory=list)  # tmp/ before the final start
    tmp_after: list[str] = field(default_factory=list)  # tmp/ after the final start
    ledger: collections.Counter[str] = field(default_factory=collections.Counter)

    def summary(self) -> str:
        twice = sum(1 for n in self.ledger.values() if n > 1)
        extra = sum(n - 1 for n in self.ledger.values() if n > 1)
        return (
            f"seed {SEED}: {self.kills} SIGKILLs ({self.busy_kills} with jobs still to do, "
            f"{self.aimed_kills} mid-write), "
            f"{len(self.leftovers)} staging files left in tmp/ before the final start, "
            f"{len(self.tmp_after)} after; {sum(self.ledger.values())} handler runs for "
            f"{len(self.names)} jobs: {twice} jobs handled more than once ({extra} extra runs)"
        )


def _kill(daemon: Daemon) -> None:
    assert daemon.running(), f"the daemon died by itself\n{daemon.site.describe()}"
    daemon.proc.kill()
    daemon.proc.wait()


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Iterator[Crashes]:
    site = Site(tmp_path_factory.mktemp("crash"))
    site.configure(
        {"orders_in": {"schema": "schemas/order.xsd", "command": [site.script("h", HANDLER)]}}
    )
    site.init()
    rng = random.Random(SEED)
    names = [f"crash-{i:04d}.xml" for i in range(JOBS)]
    rng.shuffle(names)
    bursts = [names[i * JOBS // BURSTS : (i + 1) * JOBS // BURSTS] for i in range(BURSTS)]
    burst_at = {c: i for i, c in enumerate(range(0, CYCLES, CYCLES // BURSTS))}
    run = Crashes(site, names)
    tmp = site.root / "tmp"
    aim = False  # an aimed kill that missed its write aims again at the next start
    try:
        for cycle in range(CYCLES):
            aim = aim or cycle in AIMED
            daemon = site.start(ready=False)
            if cycle in burst_at:
                time.sleep(rng.uniform(0.0, 0.4))  # while it starts up, or once it runs
                for name in bursts[burst_at[cycle]]:
                    site.drop("orders_in", name)
            before = set(os.listdir(tmp))
            if aim:
                # Kill the moment a new staging file shows up in tmp/ (a log being written).
                deadline = time.monotonic() + 5
                while set(os.listdir(tmp)) <= before and time.monotonic() < deadline:
                    pass
            else:
                time.sleep(rng.uniform(0.05, 0.8))
            _kill(daemon)
            run.kills += 1
            if site.ls("incoming", "orders_in") or site.ls("queue", "orders_in"):
                run.busy_kills += 1
            if aim and set(os.listdir(tmp)) - before:
                run.aimed_kills += 1
                aim = False
        run.leftovers = sorted(os.listdir(tmp))
        site.once(timeout=120)
        run.tmp_after = sorted(os.listdir(tmp))
        run.ledger = collections.Counter((site.dir / "ledger").read_text().split())
        print(f"\ncrash test: {run.summary()}")
        yield run
    finally:
        site.kill_all()


def test_the_faults_were_injected(crashed):
    assert crashed.kills >= 20
    assert crashed.busy_kills >= 20, crashed.summary()  # killed while it had work to do
    assert crashed.aimed_kills >= 1, crashed.summary()  # and at least once mid-write


def test_every_job_is_in_exactly_one_place_and_all_are_done(crashed):
    site = crashed.site
    places = site.places()
    lost = set(crashed.names) - set(places)
    assert not lost, f"{len(lost)} jobs lost, e.g. {sorted(lost)[:5]}; {crashed.summary()}"
    strays = set(places) - set(crashed.names)
    assert not strays, f"files that are no job of ours: {sorted(strays)[:5]}"
    twice = {n: p for n, p in places.items() if len(p) != 1}
    assert not twice, f"jobs in two places: {twice}"
    # The last daemon ran with --once, so nothing is left to do: everything is in bak.
    assert {p[0] for p in places.values()} == {"bak/orders_in"}, collections.Counter(
        p[0] for p in places.values()
    )
    assert site.ls("queue", "orders_in") == []
    assert site.ls("joberrors") == []
    assert os.listdir(site.root / "incoming/orders_in") == []


def test_every_job_in_bak_was_handled_at_least_once(crashed):
    handled = set(crashed.ledger)
    in_bak = set(crashed.site.ls("bak", "orders_in"))
    assert in_bak - handled == set()
    assert handled <= set(crashed.names)


def test_every_log_in_bak_validates_and_tells_the_whole_story(crashed):
    site = crashed.site
    bak = site.root / "bak/orders_in"
    logs = sorted(p.name.removesuffix(",log.xml") for p in bak.glob("*,log.xml"))
    assert logs == site.ls("bak", "orders_in")  # one log per job, no orphan logs
    for name in logs:
        log = bak / f"{name},log.xml"
        valid_log(log)
        assert log_root(log).get("job") == name
        runs = log_events(log, "ran")
        assert runs and runs[-1].get("outcome") == "done", name
        last = log_events(log)[-1]
        assert (last.get("from"), last.get("to")) == ("queue/orders_in", "bak/orders_in"), name
        assert (bak / name).read_bytes().startswith(b"<?xml")


def test_tmp_is_empty_after_the_final_start(crashed):
    assert crashed.tmp_after == [], crashed.summary()


def test_a_staging_file_left_by_a_crash_is_removed_at_the_next_start(tmp_path):
    site = Site(tmp_path)
    site.configure(
        {"orders_in": {"schema": "schemas/order.xsd", "command": [site.script("h", HANDLER)]}}
    )
    site.init()
    # What a daemon killed while writing a job's log leaves behind (spool.write's name).
    leftover = site.root / "tmp" / ".crash-0001.xml,log.xml.k2j4h6p_"
    leftover.write_bytes(b"<?xml version='1.0' encoding='UTF-8'?>\n<joblog job=")
    site.drop("orders_in", "after-crash.xml")
    try:
        site.once()
    finally:
        site.kill_all()
    assert site.where("after-crash.xml") == ["bak/orders_in"]
    assert os.listdir(site.root / "tmp") == []
