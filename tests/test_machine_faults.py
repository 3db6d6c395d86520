"""Faults of the machine, not of the job: full disks, I/O errors, read-only remounts,
handlers that leave children behind, no process slots.

Each test makes the fault real: a small ext4 file system in a file, loop-mounted as
the spool and filled to its last block or its last inode; an ``LD_PRELOAD`` shim
(compiled here with gcc) that fails the daemon's file system calls on the spool with
EIO; a read-only remount; a handler that backgrounds a child holding its stdout;
``RLIMIT_NPROC`` of 1 for a daemon running as nobody. Handlers append the job's name
to a ledger outside the spool, so every test counts the handler runs of each job.

The promises (``docs/spec.rst``, "Jobs" and "Handlers"): a machine fault never sends
a job to joberrors and never runs a handler again whose outcome is known; the job
waits, and goes on by itself once the fault clears; the daemon never dies of it; a
fault that lasts is one log line, and one when it ends.
"""

from __future__ import annotations

import collections
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobspool import joblog
from jobspool.handlers import DONE, Outcome
from tests.kit import (
    DEADLINE,
    NOBODY,
    Daemon,
    Site,
    eio_shim,
    fill,
    fill_inodes,
    free_inodes,
    free_pages,
    loop_ext4,
    order,
    remount_when_possible,
    set_faults,
)

LEDGER = 'echo "$JOBSPOOL_JOB" >> "$T/ledger"'
# The production back-off (1 s doubling to 300 s): a machine fault must not wait that long.
PRODUCTION_BACKOFF = {"backoff_initial": "1s", "backoff_max": "300s"}
COMMIT_FAULT = "cannot commit finished jobs; they wait"


def runs(site: Site) -> collections.Counter[str]:
    """Handler runs per job, from the ledger outside the spool."""
    try:
        return collections.Counter((site.dir / "ledger").read_text().split())
    except FileNotFoundError:
        return collections.Counter()


def report(what: str, site: Site, jobs: list[str]) -> collections.Counter[str]:
    """Print the handler runs per job (``pytest -s`` shows them) and return them."""
    counted = runs(site)
    per_job = collections.Counter(counted[j] for j in jobs)
    print(f"\n{what}: {len(jobs)} jobs, handler runs per job {dict(sorted(per_job.items()))}")
    return counted


def orders(site: Site, body: str = LEDGER) -> dict[str, Any]:
    return {"orders_in": {"schema": "schemas/order.xsd", "command": [site.script("handler", body)]}}


def upload(site: Site, names: list[str]) -> list[Path]:
    """Uploads written (hidden) now, to be renamed into place later: that needs no room."""
    hidden = []
    for name in names:
        path = site.root / "incoming/orders_in" / f".{name}.upload"
        path.write_bytes(order(name))
        hidden.append(path)
    return hidden


def finish_uploads(hidden: list[Path]) -> None:
    for path in hidden:
        os.rename(path, path.with_name(path.name[1:].removesuffix(".upload")))


def all_done(site: Site, jobs: list[str], timeout: float) -> float:
    """Until every job is in bak/orders_in; how many seconds that took."""
    start = time.monotonic()
    site.wait_for(
        lambda: site.ls("bak", "orders_in") == sorted(jobs),
        f"all {len(jobs)} jobs in bak",
        timeout=timeout,
    )
    return time.monotonic() - start


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Site]:
    """A site whose spool is a 32 MB ext4 with 2,048 inodes in a loop-mounted file."""
    (tmp_path / "site").mkdir()
    site = Site(tmp_path / "site")
    with loop_ext4(site.root, size_mb=32, inodes=2048):
        try:
            yield site
        finally:
            site.kill_all()
        site.check_logs()


# --- a full disk, by blocks and by inodes, then freed --------------------------------------


def fill_by(how: str, root: Path) -> Path:
    if how == "blocks":
        filler = fill(root)
        assert free_pages(root) == 0
    else:
        filler = fill_inodes(root)
        assert free_inodes(root) == 0
    return filler


def free(filler: Path) -> None:
    if filler.is_dir():
        shutil.rmtree(filler)
    else:
        filler.unlink()


@pytest.mark.parametrize("how", ["blocks", "inodes"])
def test_a_full_disk_then_freed_finishes_every_job_with_one_handler_run_each(ext4, how):
    site = ext4
    site.configure(orders(site), **PRODUCTION_BACKOFF)
    site.init()
    daemon = site.start()
    site.ok("pause", "orders_in")
    queued = [f"queued-{i:03d}.xml" for i in range(40)]
    for name in queued:
        site.drop("orders_in", name)
    site.wait_for(lambda: len(site.ls("queue", "orders_in")) == len(queued), "all queued")
    dropped = [f"dropped-{i:03d}.xml" for i in range(20)]
    hidden = upload(site, dropped)

    filler = fill_by(how, site.root)
    finish_uploads(hidden)  # drops that arrive on the full disk
    site.ok("resume", "orders_in")  # an unlink: it needs no room
    site.wait_for(lambda: daemon.said(COMMIT_FAULT), "a commit to meet the full disk")
    time.sleep(3)  # retries of the commit, on the full disk
    assert daemon.running(), site.describe()
    assert site.ls("joberrors") == []
    # A commit that frees an inode (a pending log) lets the next one through, so a few
    # jobs trickle on; but no handler ran twice.
    ran = runs(site)
    assert set(ran.values()) == {1}, ran

    free(filler)
    seconds = all_done(site, queued + dropped, timeout=30)
    counted = report(
        f"full disk ({how}), freed: all done in {seconds:.1f}s", site, queued + dropped
    )
    assert {counted[j] for j in queued + dropped} == {1}
    assert site.ls("joberrors") == [] and site.ls("incoming", "orders_in") == []
    assert daemon.running()
    # One fault, one line when it starts and one when it ends.
    assert len(daemon.said(COMMIT_FAULT)) == 1, daemon.said(COMMIT_FAULT)
    site.wait_for(lambda: daemon.said(f"over: {COMMIT_FAULT}"), "the line that says it is over")
    assert len(daemon.said(f"over: {COMMIT_FAULT}")) == 1
    assert len(daemon.said("cannot record blocked interface")) <= 1
    errors = [line["event"] for line in daemon.lines() if line.get("level") == "error"]
    print("error lines:", collections.Counter(errors))
    assert len(errors) <= 6, errors  # a line per kind of fault, not per job or attempt


def test_the_daemon_starts_on_a_full_disk_and_drains_once_space_returns(ext4):
    site = ext4
    site.configure(orders(site), **PRODUCTION_BACKOFF)
    site.init()
    first = site.start()
    site.ok("pause", "orders_in")
    queued = [f"waiting-{i:02d}.xml" for i in range(20)]
    for name in queued:
        site.drop("orders_in", name)
    site.wait_for(lambda: len(site.ls("queue", "orders_in")) == len(queued), "all queued")
    assert first.stop() == 0
    dropped = [f"late-{i:02d}.xml" for i in range(10)]
    hidden = upload(site, dropped)
    filler = fill(site.root)

    daemon = site.start()  # ready on the full disk
    finish_uploads(hidden)
    site.ok("resume", "orders_in")
    site.wait_for(lambda: daemon.said(COMMIT_FAULT), "a commit to meet the full disk")
    time.sleep(2)
    assert daemon.running()
    assert set(runs(site).values()) <= {1}
    assert site.ls("joberrors") == []

    filler.unlink()
    seconds = all_done(site, queued + dropped, timeout=30)
    counted = report(f"started on a full disk: all done in {seconds:.1f}s", site, queued + dropped)
    assert {counted[j] for j in queued + dropped} == {1}
    assert site.ls("joberrors") == []
    assert daemon.stop() == 0


# --- a read-only remount, and back ------------------------------------------------------------


def test_a_read_only_remount_mid_run_fails_no_job_and_runs_no_handler_twice(ext4):
    site = ext4
    gate = 'while [ ! -e "$T/go" ]; do sleep 0.02; done\n'  # the first job runs across the remount
    site.configure(orders(site, gate + LEDGER), **PRODUCTION_BACKOFF)
    site.init()
    daemon = site.start()
    jobs = [f"ro-{i:02d}.xml" for i in range(30)]
    for name in jobs:
        site.drop("orders_in", name)
    site.wait_for(lambda: len(site.ls("queue", "orders_in")) == len(jobs), "all queued")

    remount_when_possible(site.root, "ro")
    try:
        (site.dir / "go").touch()
        site.wait_for(lambda: daemon.said(COMMIT_FAULT), "a commit to meet the read-only spool")
        time.sleep(3)
        assert daemon.running(), site.describe()
        assert site.ls("bak", "orders_in") == site.ls("joberrors") == []
        ran = runs(site)
        assert set(ran.values()) == {1} and len(ran) <= 3, ran
    finally:
        remount_when_possible(site.root, "rw")

    seconds = all_done(site, jobs, timeout=30)
    counted = report(f"read-only remount, and back: all done in {seconds:.1f}s", site, jobs)
    assert {counted[j] for j in jobs} == {1}
    assert site.ls("joberrors") == []
    assert len(daemon.said(COMMIT_FAULT)) == 1
    assert daemon.stop() == 0


# --- I/O errors on the daemon's file system calls --------------------------------------------


class ShimSite(Site):
    """A site whose jobspool processes load the EIO shim (faults off until told)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.shim = eio_shim(directory)
        self.control = directory / "faults"

    def env(self) -> dict[str, str]:
        return {**super().env(), "LD_PRELOAD": str(self.shim), "FAULT_CONTROL": str(self.control)}

    def faults(self, probability: float, where: str | None = None) -> None:
        set_faults(self.control, probability, f"{self.root}/" if where is None else where)


@pytest.fixture
def shimmed(tmp_path: Path) -> Iterator[ShimSite]:
    site = ShimSite(tmp_path)
    try:
        yield site
    finally:
        site.kill_all()
    site.check_logs()


def test_random_io_errors_kill_no_daemon_lose_no_job_and_rerun_no_handler(shimmed):
    site = shimmed
    site.configure(orders(site), **PRODUCTION_BACKOFF)
    site.init()
    daemon = site.start()
    site.faults(0.03)  # 3 % of open, write, fsync, syncfs, rename, unlink, utime, close fail
    jobs = [f"eio-{i:03d}.xml" for i in range(300)]
    for i, name in enumerate(jobs):
        site.drop("orders_in", name)
        if i % 20 == 19:
            time.sleep(0.4)  # spread over some 6 s, rescans and group commits included
            assert daemon.running(), site.describe()
    time.sleep(2)
    assert daemon.running(), site.describe()
    site.faults(0)

    seconds = all_done(site, jobs, timeout=60)
    counted = report(f"random EIO (3 %): all done {seconds:.1f}s after", site, jobs)
    assert {counted[j] for j in jobs} == {1}  # one process, every outcome kept in memory
    assert site.ls("joberrors") == [] and site.ls("incoming", "orders_in") == []
    faults_seen = [line["event"] for line in daemon.lines() if line.get("level") == "error"]
    print("error lines:", collections.Counter(faults_seen))
    assert faults_seen, "no fault was injected"
    assert daemon.stop() == 0

    # A restart without faults: everything in exactly one place, nothing left over.
    site.once()
    places = site.places()
    assert all(places[j] == ["bak/orders_in"] for j in jobs)
    assert os.listdir(site.root / "tmp") == []
    assert os.listdir(site.root / "state/pending") == []
    assert site.check_logs() == len(jobs)


def test_io_errors_in_rescans_are_one_fault_episode_not_the_end_of_the_daemon(shimmed):
    site = shimmed
    site.configure(orders(site))
    site.init()
    daemon = site.start()
    site.ok("pause", "orders_in")
    site.drop("orders_in", "waits.xml")
    site.wait_for(lambda: site.ls("queue", "orders_in") == ["waits.xml"], "queued")
    site.faults(1, f"{site.root}/queue/")  # every listing of the queue fails: open, close
    site.wait_for(
        lambda: daemon.said("a rescan met a fault; the next one retries"),
        "a rescan to fail",
        timeout=10,
    )
    time.sleep(4.5)  # two more rescans fail
    assert daemon.running(), site.describe()
    site.faults(0)
    site.wait_for(
        lambda: daemon.said("over: a rescan met a fault; the next one retries"), "its end"
    )
    assert len(daemon.said("a rescan met a fault; the next one retries")) == 1
    site.ok("resume", "orders_in")
    site.wait_in("waits.xml", "bak/orders_in")
    assert runs(site) == {"waits.xml": 1}


def test_a_kept_outcome_is_committed_after_a_crash_without_running_the_handler(shimmed):
    site = shimmed
    site.configure(orders(site))
    site.init()
    daemon = site.start()
    site.faults(1, "/bak/")  # no log and no job can reach bak: every commit fails
    jobs = [f"kept-{i}.xml" for i in range(5)]
    for name in jobs:
        site.drop("orders_in", name)
    pending = site.root / "state/pending"

    def kept() -> list[str]:
        ran = list(runs(site))
        logs = [pending / f"{j},log.xml" for j in ran]
        try:
            return ran if ran and all(b"<ran " in log.read_bytes() for log in logs) else []
        except FileNotFoundError:  # ran, its commit not failed yet
            return []

    ran_before = site.wait_for(kept, "the outcome kept in the pending log")
    time.sleep(1)
    assert list(runs(site)) == ran_before  # no handler started while commits fail
    daemon.kill()  # a crash
    site.faults(0)

    again = site.start()
    all_done(site, jobs, timeout=DEADLINE)
    counted = report("commit failed, outcome kept, crash, restart", site, jobs)
    assert {counted[j] for j in jobs} == {1}
    assert again.said("outcome known from before a restart; committing it")
    log = (site.root / "bak/orders_in" / f"{ran_before[0]},log.xml").read_text()
    assert log.count("<ran ") == 1
    assert "not run again" in log
    assert again.stop() == 0


# --- handlers that leave children behind ------------------------------------------------------


def counts(pid: int) -> tuple[int, int]:
    """Open descriptors and threads of a process."""
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def processes_running(argv: list[str]) -> list[int]:
    """Pids of processes whose command line is exactly ``argv``."""
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/cmdline").read_bytes() == wanted:
                    found.append(int(entry))
            except OSError:
                continue
    return found


BACKGROUND = ["sleep", "61.25"]  # a duration no other test uses: its leftovers are ours


def test_a_handler_that_backgrounds_a_child_holding_its_stdout_leaks_nothing(site):
    site.configure(orders(site, f"{' '.join(BACKGROUND)} &\necho ok\n{LEDGER}"))
    site.init()
    daemon = site.start()
    jobs = [f"bg-{i:04d}.xml" for i in range(1000)]
    for name in jobs[:20]:
        site.drop("orders_in", name)
    site.wait_for(lambda: len(site.ls("bak", "orders_in")) == 20, "the first 20 done")
    baseline = counts(daemon.pid)
    peak = baseline
    for name in jobs[20:]:
        site.drop("orders_in", name)
    start = time.monotonic()
    while len(site.ls("bak", "orders_in")) < len(jobs):
        now = counts(daemon.pid)
        peak = (max(peak[0], now[0]), max(peak[1], now[1]))
        assert time.monotonic() - start < 120, site.describe()
        time.sleep(0.2)
    seconds = time.monotonic() - start
    end = counts(daemon.pid)
    counted = report(f"backgrounded child: {len(jobs)} jobs in {seconds:.1f}s", site, jobs)
    print(f"descriptors, threads: baseline {baseline}, peak {peak}, end {end}")
    assert {counted[j] for j in jobs} == {1}
    assert site.ls("joberrors") == []
    # Flat: a job's own pipes, pidfd and staging files come and go; nothing stays behind.
    assert peak[0] <= baseline[0] + 10 and end[0] <= baseline[0] + 1, (baseline, peak, end)
    assert peak[1] <= baseline[1] and end[1] <= baseline[1], (baseline, peak, end)
    assert processes_running(BACKGROUND) == []  # killed with their handler's group
    log = (site.root / "bak/orders_in" / f"{jobs[-1]},log.xml").read_text()
    assert ">ok\n<" in log or ">ok<" in log or "ok" in log
    assert daemon.stop() == 0


ESCAPED = ["sleep", "62.5"]


def test_a_child_that_left_the_group_holds_the_pipes_for_one_second_at_most(site):
    mark = '"$T/escaped.$JOBSPOOL_JOB"'
    escape = f"setsid sh -c 'echo $$ > {mark}; exec {' '.join(ESCAPED)}' &\n"
    wait = f"while [ ! -s {mark} ]; do sleep 0.01; done\n"  # out of the group: it holds stdout
    site.configure(orders(site, f"{escape}{wait}echo ok\n{LEDGER}"))
    site.init()
    daemon = site.start()
    try:
        site.drop("orders_in", "warm.xml")
        site.wait_in("warm.xml", "bak/orders_in")
        baseline = counts(daemon.pid)
        jobs = [f"escaped-{i}.xml" for i in range(3)]
        start = time.monotonic()
        for name in jobs:
            site.drop("orders_in", name)
        all_done(site, ["warm.xml", *jobs], timeout=DEADLINE)
        seconds = time.monotonic() - start
        assert seconds < 15, seconds  # a second's grace each (it was ten seconds each)
        assert counts(daemon.pid) <= (baseline[0] + 1, baseline[1])
        assert len(processes_running(ESCAPED)) == 4  # out of the group: not ours to kill
        assert "ok" in (site.root / "bak/orders_in" / "escaped-0.xml,log.xml").read_text()
        assert site.ls("joberrors") == []
    finally:
        for pid in processes_running(ESCAPED):
            os.kill(pid, signal.SIGKILL)
    assert daemon.stop() == 0


# --- no process slot: fork fails --------------------------------------------------------------


ROOM = 40  # process slots for the daemon (its threads, check workers) under its limit


def tasks_of(uid: int) -> int:
    """Tasks (processes and threads) whose real uid is ``uid``: what RLIMIT_NPROC counts."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
                uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
                n += int(uid_line.split()[1]) == uid
        except (OSError, StopIteration):
            continue
    return n


def test_fork_failures_make_jobs_wait_not_fail(nobody_site):
    s = nobody_site
    s.configure(orders(s), **PRODUCTION_BACKOFF)
    s.init()
    for path in [s.dir, *s.dir.rglob("*")]:
        os.lchown(path, NOBODY, NOBODY)
    # The daemon runs as nobody with a soft process limit, inherited from us (root is
    # exempt from it). Root cannot change another user's limits here (no
    # CAP_SYS_RESOURCE), so the slots are taken instead: sleepers run as nobody until
    # the user is at the limit.
    nproc = tasks_of(NOBODY) + ROOM  # counted per user, system-wide, threads included
    ours = resource.getrlimit(resource.RLIMIT_NPROC)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, ours[1]))
    try:
        daemon = Daemon(s, (), NOBODY)
    finally:
        resource.setrlimit(resource.RLIMIT_NPROC, ours)
    daemon.wait_ready()
    sleeper = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    taken = []
    try:
        while tasks_of(NOBODY) < nproc:
            taken.append(subprocess.Popen([*sleeper, "sleep", "300"]))
            if len(taken) % 8 == 0:
                time.sleep(0.2)  # setpriv has become nobody
        jobs = [f"nproc-{i:02d}.xml" for i in range(10)]
        for name in jobs:
            s.drop("orders_in", name)
        s.wait_for(lambda: daemon.said("cannot start the handler; the job waits"), "a fork to fail")
        time.sleep(3)
        assert daemon.running(), s.describe()
        assert s.ls("joberrors") == [] and s.ls("bak", "orders_in") == []
        assert sorted(s.ls("queue", "orders_in")) == jobs
        assert runs(s) == {}
        marker = (s.root / "state/blocked/orders_in").read_text()
        assert "nproc-00.xml blocks the queue since" in marker
        assert "Resource temporarily unavailable" in marker
        assert "nproc-00.xml blocks the queue" in s.ok("interfaces", "--json")
    finally:
        for proc in taken:  # the slots come back
            proc.kill()
            proc.wait()
    seconds = all_done(s, jobs, timeout=30)
    counted = report(f"fork failures (RLIMIT_NPROC): all done {seconds:.1f}s after", s, jobs)
    assert {counted[j] for j in jobs} == {1}
    s.wait_for(lambda: daemon.said("over: cannot start the handler; the job waits"), "its end")
    assert len(daemon.said("cannot start the handler; the job waits")) == 1
    assert not (s.root / "state/blocked/orders_in").exists()
    assert daemon.stop() == 0


# --- no descriptors left ----------------------------------------------------------------------


def test_no_descriptor_left_makes_jobs_wait_not_fail(site):
    site.configure(orders(site), **PRODUCTION_BACKOFF)
    site.init()
    daemon = site.start()
    site.ok("pause", "orders_in")
    jobs = [f"fd-{i:02d}.xml" for i in range(10)]
    for name in jobs:
        site.drop("orders_in", name)
    site.wait_for(lambda: len(site.ls("queue", "orders_in")) == len(jobs), "all queued")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = ["prlimit", "--pid", str(daemon.pid)]
    # The daemon runs as root, as we do: its soft limit is ours to set (up to its hard one).
    subprocess.run([*limit, f"--nofile={counts(daemon.pid)[0]}:{hard}"], check=True)
    try:
        site.ok("resume", "orders_in")
        site.wait_for(lambda: daemon.said("cannot start the handler; the job waits"), "EMFILE")
        time.sleep(3)
        assert daemon.running(), site.describe()
        assert site.ls("joberrors") == [] and runs(site) == {}
        assert "Too many open files" in daemon.text()
    finally:
        subprocess.run([*limit, f"--nofile={hard}:{hard}"], check=True)
    seconds = all_done(site, jobs, timeout=30)
    counted = report(f"no descriptor left (EMFILE): all done {seconds:.1f}s after", site, jobs)
    assert {counted[j] for j in jobs} == {1}
    first = (site.root / "bak/orders_in/fd-00.xml,log.xml").read_text()
    assert 'via="drop"' in first  # the history held in memory survived the failed starts
    assert len(daemon.said("cannot start the handler; the job waits")) == 1
    assert daemon.stop() == 0


# --- a handler program that does not exist ----------------------------------------------------


def test_a_missing_handler_program_is_a_configuration_error_and_the_job_stays_queued(site):
    missing = site.dir / "not-installed-yet"
    site.configure({"orders_in": {"schema": "schemas/order.xsd", "command": [str(missing)]}})
    site.init()
    daemon = site.start()
    site.drop("orders_in", "early.xml")
    site.wait_for(lambda: daemon.said("cannot start the handler; the job waits"), "the error")
    marker = site.root / "state/blocked/orders_in"
    site.wait_for(marker.exists, "the blocked marker")
    assert "configuration error" in marker.read_text()
    time.sleep(2)
    assert site.ls("joberrors") == [] and site.ls("queue", "orders_in") == ["early.xml"]
    missing.write_text("#!/bin/sh\n" + LEDGER + "\n")  # the program is installed
    missing.chmod(0o755)
    site.wait_in("early.xml", "bak/orders_in", timeout=DEADLINE)
    assert runs(site) == {"early.xml": 1}
    assert daemon.stop() == 0


# --- a kept outcome counts only for its own job -----------------------------------------------


@pytest.mark.parametrize("same_stamp", [True, False], ids=["kept-for-this-job", "stale"])
def test_a_pending_log_with_a_finished_run_is_committed_only_if_it_is_this_jobs(site, same_stamp):
    site.configure(orders(site))
    site.init()
    stamp = time.time_ns() - 10**9
    log = joblog.new("placed.xml", "orders_in")
    joblog.received(log, "queue", at=joblog.iso(stamp / 1e9))
    now = time.time()
    joblog.ran(log, Outcome(DONE, now, now, exit_status=0), "handler")
    pending = site.root / "state/pending/placed.xml,log.xml"
    pending.write_bytes(joblog.to_bytes(log))
    job = site.root / "queue/orders_in/placed.xml"
    job.write_bytes(order("placed"))
    os.utime(job, ns=(stamp, stamp))
    other = stamp if same_stamp else stamp - 10**12  # a job of the same name, long ago
    os.utime(pending, ns=(other, other))

    daemon = site.start()
    site.wait_in("placed.xml", "bak/orders_in")
    final = (site.root / "bak/orders_in/placed.xml,log.xml").read_text()
    if same_stamp:
        assert runs(site) == {}  # committed, not run again
        assert "not run again" in final
    else:
        assert runs(site) == {"placed.xml": 1}
        assert "not run again" not in final
    assert final.count("<ran ") == 1
    # Removed once the job's move into bak/ is durable too: a sync later, not at once.
    site.wait_for(lambda: not pending.exists(), "the pending log to be removed")
    assert daemon.stop() == 0
