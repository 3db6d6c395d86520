"""When a dropped file is whole, and which files a rescan looks at.

The promises tested here are in ``docs/spec.rst`` ("Jobs").
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from jobspool import watch
from jobspool.watch import GONE, candidates, readiness, writer_open
from tests.kit import (
    order,
    wait_for,
)

SETTLE = 0.3
HOUR_AGO = time.time() - 3600


def put(folder: Path, name: str, data: bytes = b"<order/>", mtime: float | None = None) -> Path:
    path = folder / name
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def renamed_in(folder: Path, name: str) -> Path:
    """The way WinSCP, rsync and careful scripts finish an upload."""
    hidden = put(folder, f".{name}.XyZ123")
    final = folder / name
    os.rename(hidden, final)
    return final


# --- readiness ---------------------------------------------------------------------------


def is_ready(result: object) -> bool:
    """Ready to take: readiness hands back the drop's lstat."""
    return isinstance(result, os.stat_result)


@pytest.mark.parametrize(
    "name",
    [
        ".order.xml",
        ".order.xml.Ab12Cd",
        "order.xml.part",
        "order.xml.filepart",
        "order.xml.tmp",
        "order.xml~",
    ],
)
@pytest.mark.parametrize("was_renamed_in", [True, False], ids=["renamed", "written"])
def test_uploads_in_progress_are_never_ready(tmp_path, name, was_renamed_in):
    # Even whole, old and closed: the name says an upload is still going on.
    path = put(tmp_path, name, order(1), mtime=HOUR_AGO)
    assert readiness(path, was_renamed_in, SETTLE, time.time()) == GONE


@pytest.mark.parametrize("was_renamed_in", [True, False], ids=["renamed", "written"])
def test_a_file_that_is_not_there_is_gone(tmp_path, was_renamed_in):
    assert readiness(tmp_path / "order.xml", was_renamed_in, SETTLE, time.time()) == GONE


def test_a_directory_is_not_a_job(tmp_path):
    (tmp_path / "sub.xml").mkdir()
    assert readiness(tmp_path / "sub.xml", False, SETTLE, time.time()) == GONE


def test_a_file_renamed_in_is_ready_at_once(tmp_path):
    path = renamed_in(tmp_path, "order.xml")
    # No settle time for a rename, however long settle is.
    assert is_ready(readiness(path, True, 3600.0, time.time()))


def test_a_symlink_is_ready_to_be_taken_to_joberrors(tmp_path):
    target = put(tmp_path, "elsewhere.xml", order(1))
    os.symlink(target, tmp_path / "link.xml")
    assert is_ready(readiness(tmp_path / "link.xml", False, SETTLE, time.time()))


def test_a_file_written_in_place_is_ready_only_after_settle(tmp_path):
    path = put(tmp_path, "order.xml", order(1))
    mtime = os.stat(path).st_mtime
    assert writer_open(path) is False
    due = readiness(path, False, SETTLE, mtime)
    assert isinstance(due, float)
    assert due == pytest.approx(mtime + SETTLE)
    assert readiness(path, False, SETTLE, mtime + SETTLE / 2) == pytest.approx(due)
    assert is_ready(readiness(path, False, SETTLE, mtime + SETTLE))


def test_a_file_held_open_by_its_writer_is_not_ready(tmp_path):
    path = tmp_path / "order.xml"
    with open(path, "ab") as writer:
        writer.write(order(1)[:20])
        writer.flush()
        # Even unchanged for an hour: a stalled upload is still an upload.
        os.utime(path, (HOUR_AGO, HOUR_AGO))
        assert writer_open(path) is True
        now = time.time()
        due = readiness(path, False, SETTLE, now)
        assert isinstance(due, float)
        assert due > now
        writer.write(order(1)[20:])
    # Closed: whole once it has not changed for `settle` seconds.
    assert writer_open(path) is False
    mtime = os.stat(path).st_mtime
    due = readiness(path, False, SETTLE, mtime)
    assert isinstance(due, float)
    assert is_ready(readiness(path, False, SETTLE, due))
    # And in real time too.
    wait_for(lambda: is_ready(readiness(path, False, SETTLE, time.time())), "settle", timeout=10)
    assert path.read_bytes() == order(1)


def test_a_writer_in_another_process_holds_the_file_back(tmp_path):
    # Like sftp-server writing a partner's upload in place.
    path = tmp_path / "order.xml"
    with open(path, "ab") as out:
        writer = subprocess.Popen(["sleep", "30"], stdout=out)
    try:
        os.utime(path, (HOUR_AGO, HOUR_AGO))
        assert writer_open(path) is True
        assert isinstance(readiness(path, False, SETTLE, time.time()), float)
    finally:
        writer.kill()
        writer.wait()
    assert writer_open(path) is False
    # Settled is counted from the inode's last change (utime is one): settle later, ready.
    assert is_ready(readiness(path, False, SETTLE, time.time() + SETTLE))


def test_a_reader_does_not_hold_the_file_back(tmp_path):
    path = put(tmp_path, "order.xml", order(1), mtime=HOUR_AGO)
    with open(path, "rb"):
        assert writer_open(path) is False
        assert is_ready(readiness(path, False, SETTLE, time.time() + SETTLE))


def test_a_file_whose_mtime_was_set_back_still_settles_by_its_last_change(tmp_path):
    # rsync -t or sftp put -p set an old mtime; the ctime says when it changed.
    path = put(tmp_path, "order.xml", order(1), mtime=HOUR_AGO)
    now = time.time()
    assert isinstance(readiness(path, False, SETTLE, now), float)
    assert is_ready(readiness(path, False, SETTLE, now + SETTLE))


# --- candidates --------------------------------------------------------------------------


def test_candidates_skip_uploads_in_progress_and_directories(tmp_path):
    names = "a.xml b.xml .c.xml .d.xml.Qw12Er e.xml.part f.xml.filepart g.xml.tmp h.xml~"
    for name in names.split():
        put(tmp_path, name)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub.xml").mkdir()
    os.symlink(tmp_path / "a.xml", tmp_path / "link.xml")
    assert sorted(candidates(tmp_path)) == ["a.xml", "b.xml", "link.xml"]


def test_candidates_come_oldest_first(tmp_path):
    # The order files arrived in, not the order of their names or of the directory.
    arrival = ["m.xml", "c.xml", "x.xml", "a.xml", "q.xml"]
    for i, name in enumerate(arrival):
        put(tmp_path, name, mtime=HOUR_AGO + i)
    assert candidates(tmp_path) == arrival


def test_candidates_of_a_missing_folder_are_none(tmp_path):
    assert candidates(tmp_path / "no-such-folder") == []


# --- the watcher's hints --------------------------------------------------------------------


def _collect(watcher: watch.Watcher, hints: list[watch.Hint]) -> set[tuple[str, bool]]:
    hints.extend(watcher.read())
    return {(Path(h.path).name, h.renamed_in) for h in hints}


def test_the_watcher_hints_at_renamed_in_and_written_files(tmp_path):
    watcher = watch.Watcher([tmp_path], False, lambda: None)
    watcher.start()
    try:
        assert watcher.healthy()
        renamed_in(tmp_path, "renamed.xml")
        put(tmp_path, "written.xml", order(2))
        # The daemon waits on the descriptor: it must become readable.
        readable, _, _ = select.select([watcher.fileno()], [], [], 10)
        assert readable, "no event on the inotify descriptor"
        hints: list[watch.Hint] = []
        wait_for(
            lambda: {("renamed.xml", True), ("written.xml", False)} <= _collect(watcher, hints),
            "hints for both files",
            timeout=10,
        )
        # A file written in place is never mistaken for one renamed in (whole at once).
        assert ("written.xml", True) not in _collect(watcher, hints)
    finally:
        watcher.stop()
    assert not watcher.healthy()


def test_a_burst_of_drops_is_read_at_once_and_in_order(tmp_path):
    watcher = watch.Watcher([tmp_path], False, lambda: None)
    watcher.start()
    try:
        names = [f"burst-{i:03d}.xml" for i in range(200)]
        for name in names:
            renamed_in(tmp_path, name)
        hints = watcher.read()  # all queued by now: one call, no waiting
        assert [Path(h.path).name for h in hints if h.renamed_in] == names
        assert {Path(h.path).parent for h in hints} == {tmp_path}
        assert watcher.read() == []
    finally:
        watcher.stop()


def test_a_watched_folder_removed_by_hand_makes_the_watcher_unhealthy(tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    watcher = watch.Watcher([folder], False, lambda: None)
    watcher.start()
    try:
        shutil.rmtree(folder)
        wait_for(lambda: not (watcher.read() or watcher.healthy()), "unhealthy", timeout=10)
        folder.mkdir()
        watcher.restart()  # what the daemon does, then it rescans
        assert watcher.healthy()
        renamed_in(folder, "after.xml")
        seen: list[watch.Hint] = []
        wait_for(
            lambda: ("after.xml", True) in _collect(watcher, seen),
            "a hint from the new watch",
            timeout=10,
        )
    finally:
        watcher.stop()


def test_the_polling_watcher_hints_at_new_files_too(tmp_path):
    # For NFS and CIFS. Polling cannot tell a rename from a write: both must settle.
    woken = threading.Event()
    watcher = watch.Watcher([tmp_path], True, woken.set)
    watcher.start()
    try:
        time.sleep(0.2)  # its first snapshot
        renamed_in(tmp_path, "renamed.xml")
        put(tmp_path, "written.xml", order(2))
        hints: list[watch.Hint] = []
        wait_for(
            lambda: {"renamed.xml", "written.xml"} <= {n for n, _ in _collect(watcher, hints)},
            "hints for both files",
            timeout=10,
        )
        assert woken.is_set()
        assert ("written.xml", True) not in _collect(watcher, hints)
    finally:
        watcher.stop()
