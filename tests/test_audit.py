"""The audit log: one JSON line per action, appended under a lock, read back whole."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from jobspool import audit

WRITER = """\
import sys
from pathlib import Path
from jobspool import audit
for n in range(int(sys.argv[3])):
    audit.record(Path(sys.argv[1]), sys.argv[2], "retry", f"job-{n}.xml", {"n": n})
"""


def test_records_from_processes_and_threads_at_once_stay_whole_lines(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), who, "60"])
             for who in ("ops", "erin")]  # fmt: skip
    threads = [threading.Thread(target=lambda: [audit.record(tmp_path, "thread", "pause", "x")
                                                for _ in range(60)]) for _ in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(60) for p in procs] == [0, 0]
    lines = (tmp_path / "state" / "audit.log").read_text().splitlines()
    assert len(lines) == 240
    entries = [json.loads(line) for line in lines]
    assert entries == audit.entries(tmp_path)
    by_ops = [e for e in entries if e["who"] == "ops"]
    assert [e["detail"]["n"] for e in by_ops] == list(range(60))  # in order, none lost
    assert {e["action"] for e in entries} == {"retry", "pause"}
    assert oct((tmp_path / "state" / "audit.log").stat().st_mode & 0o777) == "0o640"


def test_a_torn_line_is_skipped_and_the_next_entry_starts_afresh(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    first = audit.record(tmp_path, "ops", "resume", "orders_in")
    with open(tmp_path / "state" / "audit.log", "ab") as f:
        f.write(b'{"time": "2026-12-01T10:00:00.000+01:00", "who": "op')  # a crash mid-write
    second = audit.record(tmp_path, "ops", "pause", "orders_in", {"outcome": "ok"})
    assert audit.entries(tmp_path) == [first, second]
    assert second["detail"] == {"outcome": "ok"} and second["time"][10] == "T"
    assert audit.entries(tmp_path / "nowhere") == []
