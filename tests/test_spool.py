"""The spool tree: its directories, where a job is, queue order, safe writes.

The promises tested here are in ``docs/spec.rst`` ("The spool tree", "Jobs").
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Iterator

import pytest

from jobspool import durable, joblog
from jobspool import listing as listing_module
from jobspool.durable import rename_noreplace
from jobspool.errors import BadRequest, ConfigError, TryLater
from jobspool.spool import Spool
from tests.kit import (
    INVALID,
    VALID,
    valid_log,
)

IFACES = ("orders_in", "orders_out")


@pytest.fixture
def tree(tmp_path):
    spool = Spool(tmp_path / "spool", IFACES)
    spool.init()
    return spool


def accept(spool: Spool, name: str, iface: str = "orders_in") -> None:
    """Queue a job the way submit does: written durably, stamped with its acceptance."""
    spool.write(spool.dir("queue", iface) / name, [VALID], stamp_ns=spool.stamp())


def names_in(spool: Spool, iface: str = "orders_in") -> list[str]:
    return [name for _, name in spool.queued(iface)]


# --- the tree ------------------------------------------------------------------


def test_init_creates_the_tree(tmp_path):
    spool = Spool(tmp_path / "spool", IFACES)
    created = spool.init()
    for rel in [
        "incoming/orders_in",
        "incoming/orders_out",
        "queue/orders_in",
        "queue/orders_out",
        "bak/orders_in",
        "bak/orders_out",
        "joberrors",
        "tmp",
        "state",
    ]:
        assert (tmp_path / "spool" / rel).is_dir(), rel
        assert tmp_path / "spool" / rel in created


def test_init_is_safe_to_repeat(tree):
    accept(tree, "kept.xml")
    assert tree.init() == []
    assert names_in(tree) == ["kept.xml"]
    assert (tree.dir("queue", "orders_in") / "kept.xml").read_bytes() == VALID


def test_init_adds_a_new_interface(tree):
    grown = Spool(tree.root, (*IFACES, "stock_in"))
    created = grown.init()
    assert sorted(p.relative_to(tree.root).as_posix() for p in created) == [
        "bak/stock_in",
        "incoming/stock_in",
        "queue/stock_in",
    ]


def test_init_refuses_a_file_where_a_directory_belongs(tmp_path):
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "queue").write_text("not a directory")
    with pytest.raises(ConfigError, match="queue"):
        Spool(tmp_path / "spool", IFACES).init()


def test_a_spool_that_was_never_created_says_so(tmp_path):
    with pytest.raises(ConfigError, match="jobspool init"):
        Spool(tmp_path / "spool", IFACES).require()


# --- where is a job ------------------------------------------------------------


@pytest.mark.parametrize(
    ("directory", "answer"),
    [
        ("incoming/orders_in", "incoming/orders_in"),
        ("queue/orders_out", "queue/orders_out"),
        ("bak/orders_in", "bak/orders_in"),
        ("joberrors", "joberrors"),
    ],
)
def test_locate_answers_the_status_string(tree, directory, answer):
    path = tree.root / directory / "order-7.xml"
    path.write_bytes(VALID)
    found = tree.locate("order-7.xml")
    assert found is not None
    assert str(found.place) == answer
    assert found.path == path
    assert found.log_path == tree.root / directory / "order-7.xml,log.xml"


def test_an_unknown_job_is_not_found(tree):
    assert tree.locate("nobody.xml") is None
    with pytest.raises(BadRequest, match=r"nobody\.xml"):
        tree.find("nobody.xml")


def a_log(name: str) -> bytes:
    log = joblog.new(name, "orders_in")
    joblog.received(log, "submit")
    return joblog.to_bytes(log)


def test_a_log_or_a_directory_is_not_a_job(tree):
    (tree.joberrors / "dir.xml").mkdir()
    (tree.joberrors / "lone.xml,log.xml").write_bytes(a_log("lone.xml"))
    assert tree.locate("dir.xml") is None
    assert tree.locate("lone.xml") is None


@pytest.mark.parametrize("name", ["../queue", "-x", ".x", "a b", "a/b", "x" * 201])
def test_locate_refuses_an_invalid_name(tree, name):
    with pytest.raises(BadRequest, match="invalid job name"):
        tree.locate(name)


def test_read_log_of_a_queued_job_is_not_there_yet(tree):
    accept(tree, "waiting.xml")
    with pytest.raises(TryLater):
        tree.read_log("waiting.xml")


def test_read_log_of_a_job_in_joberrors(tree):
    data = a_log("bad.xml")
    (tree.joberrors / "bad.xml").write_bytes(INVALID)
    (tree.joberrors / "bad.xml,log.xml").write_bytes(data)
    assert tree.read_log("bad.xml") == data
    valid_log(data)


# --- queue order ---------------------------------------------------------------


def test_the_queue_is_in_acceptance_order_not_name_order(tree):
    for name in ["b.xml", "a.xml", "c.xml"]:
        accept(tree, name)
    assert names_in(tree) == ["b.xml", "a.xml", "c.xml"]


def test_queue_order_survives_a_restart(tree):
    for name in ["b.xml", "a.xml"]:
        accept(tree, name)
    restarted = Spool(tree.root, IFACES)
    assert names_in(restarted) == ["b.xml", "a.xml"]
    accept(restarted, "0-first-by-name.xml")
    assert names_in(Spool(tree.root, IFACES)) == ["b.xml", "a.xml", "0-first-by-name.xml"]


def test_stamps_strictly_increase(tree):
    stamps = [tree.stamp() for _ in range(1000)]
    assert stamps == sorted(set(stamps))


def test_a_bursts_stamps_come_after_earlier_ones_and_before_later_ones_in_any_process(
    tree, monkeypatch
):
    frozen = time.time_ns()  # a clock that does not move: only the mark orders the stamps
    monkeypatch.setattr(time, "time_ns", lambda: frozen)
    before = tree.stamp()
    burst = list(tree.stamps(64))
    # Another process (a submit, a restarted daemon) starts from the lock file's mark.
    after = Spool(tree.root, IFACES).stamp()
    assert [before, *burst, after] == sorted({before, *burst, after})


def test_queue_order_survives_a_restart_after_the_clock_stepped_back(tree, monkeypatch):
    accept(tree, "b.xml")
    accept(tree, "a.xml")
    # The process ends; the clock is stepped back a minute; the next process accepts c.
    stepped_back = time.time_ns() - 60 * 10**9
    monkeypatch.setattr(time, "time_ns", lambda: stepped_back)
    restarted = Spool(tree.root, IFACES)
    accept(restarted, "c.xml")
    assert names_in(restarted) == ["b.xml", "a.xml", "c.xml"]


def placed(spool: Spool, name: str, stamp_ns: int, iface: str = "orders_in") -> None:
    """Put a job into the queue the way another program might: with a time of its own."""
    spool.write(spool.dir("queue", iface) / name, [VALID], stamp_ns=stamp_ns, sync=False)


def test_jobs_accepted_in_the_same_second_and_across_restarts_keep_their_order(tree):
    names = [f"job-{i}.xml" for i in (5, 3, 9, 1, 7, 2)]  # neither name order nor its reverse
    for name in names[:3]:
        accept(tree, name)
    restarted = Spool(tree.root, IFACES)
    for name in names[3:]:
        accept(restarted, name)
    stamps = [s for s, _ in restarted.queued("orders_in")]
    assert len({s // 10**9 for s in stamps}) <= 2  # a burst: most share their second
    assert names_in(Spool(tree.root, IFACES)) == names


def test_jobs_with_the_same_stamp_are_in_name_order(tree):
    t = time.time_ns() - 10**9
    for name, stamp in [
        ("c.xml", t),
        ("b.xml", t + 5),
        ("z.xml", t),
        ("a.xml", t + 5),
        ("m.xml", t - 1),
        ("y.xml", t),
    ]:
        placed(tree, name, stamp)
    assert names_in(tree) == ["m.xml", "c.xml", "y.xml", "z.xml", "a.xml", "b.xml"]


def test_queue_order_holds_across_months_to_the_nanosecond(tree):
    now = time.time_ns()
    placed(tree, "recent-b.xml", now)  # a float of the stamp itself could not tell these apart
    placed(tree, "recent-a.xml", now + 1)
    placed(tree, "stuck.xml", now - 400 * 86_400 * 10**9)  # paused for over a year
    assert names_in(tree) == ["stuck.xml", "recent-b.xml", "recent-a.xml"]
    placed(tree, "recent-0.xml", now + 2)
    (tree.dir("queue", "orders_in") / "stuck.xml").unlink()
    assert names_in(tree) == ["recent-b.xml", "recent-a.xml", "recent-0.xml"]


def a_mixed_queue(spool: Spool, n: int = 300) -> list[str]:
    """``n`` jobs with shuffled, partly equal stamps, and things that are not jobs."""
    t = time.time_ns() - 3600 * 10**9
    rng = random.Random(n)
    jobs = []
    for i in rng.sample(range(n), n):
        stamp = t + (i // 3) * 1000  # three jobs a stamp
        placed(spool, f"job-{i:04d}.xml", stamp)
        jobs.append((stamp, f"job-{i:04d}.xml"))
    queue = spool.dir("queue", "orders_in")
    (queue / "subdir.xml").mkdir()
    (queue / "link.xml").symlink_to(queue / "job-0000.xml")
    (queue / ".hidden.xml").write_bytes(VALID)
    return [name for _, name in sorted(jobs)]


def test_a_listing_shared_among_processes_is_the_same_listing(tree, monkeypatch):
    expected = a_mixed_queue(tree)
    forks = []
    fork = os.fork

    def counted_fork() -> int:
        pid = fork()
        if pid:
            forks.append(pid)
        return pid

    monkeypatch.setattr(listing_module, "_FORK_FROM", 10)  # a queue this small would not fork
    monkeypatch.setattr(os, "fork", counted_fork)
    # As in the `queue` command: one thread. (Other tests in this process may
    # have left daemon threads behind, which would rightly stop the fork.)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    listing = tree.listing("orders_in", workers=3)
    assert len(forks) == 2
    assert listing.names == expected
    assert list(listing.stamps) == sorted(listing.stamps)
    assert tree.listing("orders_in") == listing  # one process
    assert tree.queued("orders_in") == list(zip(listing.stamps, listing.names, strict=True))


def test_a_listing_whose_helper_cannot_be_forked_is_complete(tree, monkeypatch):
    expected = a_mixed_queue(tree)

    def no_fork() -> int:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(listing_module, "_FORK_FROM", 10)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(os, "fork", no_fork)
    assert tree.listing("orders_in", workers=2).names == expected


def test_a_listing_whose_helper_fails_is_complete(tree, monkeypatch):
    expected = a_mixed_queue(tree)
    parent, listed = os.getpid(), listing_module._listed

    def failing_in_children(fd: int, found: list[str]) -> listing_module.Listing:
        if os.getpid() != parent:
            raise OSError(errno.EIO, "Input/output error")
        return listed(fd, found)

    monkeypatch.setattr(listing_module, "_FORK_FROM", 10)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(listing_module, "_listed", failing_in_children)
    assert tree.listing("orders_in", workers=3).names == expected


def test_a_listing_leaves_out_known_jobs(tree):
    expected = a_mixed_queue(tree, 30)
    known = set(expected[::2])
    assert tree.listing("orders_in", known=known).names == expected[1::2]


def test_queued_ignores_what_is_not_a_job(tree):
    accept(tree, "job.xml")
    queue = tree.dir("queue", "orders_in")
    (queue / "job.xml,log.xml").write_bytes(a_log("job.xml"))
    (queue / ".hidden").write_bytes(b"")
    (queue / "subdir").mkdir()
    assert names_in(tree) == ["job.xml"]


# --- writing and moving --------------------------------------------------------


def tmp_entries(spool: Spool) -> list[str]:
    return sorted(os.listdir(spool.tmp))


def test_write_creates_the_file(tree):
    dest = tree.dir("queue", "orders_in") / "new.xml"
    tree.write(dest, [VALID[:10], VALID[10:]], stamp_ns=1_700_000_000_123_456_789)
    assert dest.read_bytes() == VALID
    assert dest.stat().st_mtime_ns == 1_700_000_000_123_456_789
    assert tmp_entries(tree) == []


def test_write_never_replaces_without_being_asked(tree):
    dest = tree.joberrors / "taken.xml"
    dest.write_bytes(b"original")
    with pytest.raises(FileExistsError):
        tree.write(dest, [b"intruder"])
    assert dest.read_bytes() == b"original"
    assert tmp_entries(tree) == []


def test_write_replaces_when_asked(tree):
    dest = tree.pause_marker("orders_in")
    dest.write_bytes(b"old")
    tree.write(dest, [b"new"], replace=True)
    assert dest.read_bytes() == b"new"
    assert tmp_entries(tree) == []


def test_a_failed_write_leaves_nothing_behind(tree):
    dest = tree.dir("queue", "orders_in") / "half.xml"

    def chunks() -> Iterator[bytes]:
        yield b"<order>"
        raise RuntimeError("the source went away")

    with pytest.raises(RuntimeError):
        tree.write(dest, chunks())
    assert not dest.exists()
    assert tmp_entries(tree) == []


def test_move_renames_into_another_state(tree):
    src = tree.dir("queue", "orders_in") / "done.xml"
    src.write_bytes(VALID)
    dest = tree.move(src, tree.dir("bak", "orders_in"))
    assert dest == tree.dir("bak", "orders_in") / "done.xml"
    assert dest.read_bytes() == VALID
    assert not src.exists()
    assert str(tree.find("done.xml").place) == "bak/orders_in"


def test_move_refuses_to_overwrite(tree):
    src = tree.dir("queue", "orders_in") / "twice.xml"
    src.write_bytes(b"queued")
    other = tree.joberrors / "twice.xml"
    other.write_bytes(b"in joberrors")
    with pytest.raises(FileExistsError):
        tree.move(src, tree.joberrors)
    assert src.read_bytes() == b"queued"
    assert other.read_bytes() == b"in joberrors"


def test_rename_noreplace_keeps_both_files(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.write_bytes(b"source")
    dest.write_bytes(b"destination")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dest)
    assert src.read_bytes() == b"source"
    assert dest.read_bytes() == b"destination"


def test_rename_noreplace_renames(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.write_bytes(b"source")
    rename_noreplace(src, dest)
    assert not src.exists()
    assert dest.read_bytes() == b"source"


# --- pause ---------------------------------------------------------------------


def test_pause_persists_until_resume(tree):
    tree.pause("orders_in")
    assert Spool(tree.root, IFACES).is_paused("orders_in")
    assert not Spool(tree.root, IFACES).is_paused("orders_out")
    tree.pause("orders_in")  # pausing twice is fine
    Spool(tree.root, IFACES).resume("orders_in")
    assert not Spool(tree.root, IFACES).is_paused("orders_in")
    tree.resume("orders_in")  # and so is resuming twice


# --- one sync for threads that ask together ------------------------------------------------


def test_threads_that_ask_during_a_sync_share_the_next_one():
    group = durable.SyncGroup()
    started, release = threading.Event(), threading.Event()
    syncs: list[str] = []

    def first_sync() -> None:
        syncs.append("first")
        started.set()
        assert release.wait(10)

    def later_sync() -> None:
        syncs.append("second")

    leader = threading.Thread(target=group.sync, args=(first_sync,))
    leader.start()
    assert started.wait(10)
    # Their writes came after the running sync began: it does not cover them.
    returned: list[int] = []

    def wait_for_sync(i: int) -> None:
        group.sync(later_sync)
        returned.append(i)

    waiters = [threading.Thread(target=wait_for_sync, args=(i,)) for i in range(3)]
    for t in waiters:
        t.start()
    time.sleep(0.2)  # they are waiting, not returned
    assert returned == []
    release.set()
    for t in [leader, *waiters]:
        t.join(10)
    assert sorted(returned) == [0, 1, 2]
    assert syncs == ["first", "second"]  # three callers, one more sync


def test_a_failed_sync_fails_its_callers_and_the_next_call_syncs_again():
    group = durable.SyncGroup()

    def failing() -> None:
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError):
        group.sync(failing)
    calls: list[int] = []
    group.sync(lambda: calls.append(1))
    group.sync(lambda: calls.append(2))
    assert calls == [1, 2]  # one after the other: each caller its own sync
