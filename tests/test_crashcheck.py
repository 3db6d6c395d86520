"""The crash-consistency checker proven against planted bugs (tests/crashcheck/planted).

Each variant of the planted job life cycle runs under strace on a spool made
by ``jobspool init``; the checker replays the trace, checks every
acknowledgement, builds crash states and recovers each with the real
``jobspool daemon --once``. The correct life cycle must pass with no finding,
also when a sync fails once (it retries); each planted bug must be caught by
the checks that can see it. The same for ``jobspool serve`` with a bug
planted in its upload or its download (tests/crashcheck/planted/http): the
checker must see that its answers came before the job was durable. The
parser is tested on strace's split lines.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.crashcheck import trace as tracing
from tests.crashcheck import workload
from tests.crashcheck.checks import Checker, Report
from tests.crashcheck.planted import lifecycle
from tests.kit import JOBSPOOL, free_port, make_certificates
from tests.kit import run as run_jobspool

JOBS = 4
ACK = "acknowledged before durable"
NO_LOG = "job without durable log"
CRASH = "crash state"

# variant, strace injections, the checks that must catch it (none: it must pass)
CASES = [
    ("correct", (), set()),
    ("correct", ("fsync:error=EIO:when=1",), set()),  # the failed sync is retried
    ("skip-dir-fsync", (), {ACK}),
    ("skip-file-fsync", (), {ACK, NO_LOG, CRASH}),
    ("ack-before-sync", (), {ACK}),
    ("ignore-failed-sync", ("fsync:error=EIO:when=1",), {ACK, CRASH}),
]


def planted(tmp_path: Path, variant: str, inject: tuple[str, ...]) -> Report:
    """Run one variant under the checker; its report (crash states recovered too)."""
    site = tmp_path / "site"
    site.mkdir()
    config = site / "jobspool.yaml"
    config.write_text(
        "spool: spool\ndaemon: {settle: 0.1s}\n"
        "interfaces:\n  orders_in:\n    command: [/bin/true]\n"
    )
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "PATH": "/usr/bin:/bin"}
    init = run_jobspool("-c", str(config), "init", env=env, cwd=site)
    assert init.returncode == 0, init.stderr
    output = tmp_path / "trace"
    script = Path(lifecycle.__file__)
    run = tracing.record(
        [sys.executable, str(script), str(site / "spool"), variant, str(JOBS)],
        output,
        inject=inject,
        cwd=site,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected = {f"job-{i:03d}.xml": lifecycle.job_bytes(i) for i in range(JOBS)}
    checker = Checker(
        tracing.parse(output), site, config, site / "spool",
        expected=expected, ackers=[script.name], jobspool=JOBSPOOL,
        points=3, random_points=1, subsets=1,
    )  # fmt: skip
    checker.check()
    checker.crash(tmp_path / "crash")
    print(checker.report.summary())
    return checker.report


@pytest.mark.parametrize(("variant", "inject", "caught_by"), CASES)
def test_planted_life_cycle(
    tmp_path: Path, variant: str, inject: tuple[str, ...], caught_by: set[str]
) -> None:
    report = planted(tmp_path, variant, inject)
    assert report.acks == {"accepted": JOBS, "done": JOBS}, report.summary()
    assert report.surprises == [], report.summary()
    assert report.crash_states > 0
    assert report.recovered == report.crash_states, report.summary()
    if inject:
        assert report.failed_syncs == 1, report.summary()
    assert {f.check for f in report.findings} >= caught_by, report.summary()
    if not caught_by:
        assert report.findings == [], report.summary()


PLANTED_HTTP = Path(lifecycle.__file__).parent / "http"


def planted_http(tmp_path: Path, bug: str) -> Report:
    """The workload's HTTP part alone, ``bug`` planted in the server; the checker's report."""
    site = tmp_path / "site"
    site.mkdir()
    make_certificates(site)
    port = free_port()
    config = workload.prepare(site, port)
    env = {**os.environ, "PYTHONPATH": str(PLANTED_HTTP), "JOBSPOOL_PLANTED_HTTP": bug}
    argv = [sys.executable, workload.__file__, str(site), str(JOBSPOOL), "3"]
    argv += ["0", "0", "0", "4", "2", str(port)]  # no drops, submits, retries; 4 uploads
    run = tracing.record(argv, tmp_path / "trace", env=env, cwd=site)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((site / "manifest.json").read_text())
    checker = Checker(
        tracing.parse(tmp_path / "trace"), site, config, site / "spool",
        expected={name: bytes.fromhex(data) for name, data in manifest.items()},
        clients=[Path(workload.__file__).name], jobspool=JOBSPOOL,
        points=3, random_points=0, subsets=1,
    )  # fmt: skip
    checker.check()
    checker.crash(tmp_path / "crash")
    print(checker.report.summary())
    return checker.report


@pytest.mark.parametrize(
    ("bug", "caught"),
    [
        ("upload-skip-file-fsync", {"rejected"}),
        ("skip-dir-fsync", {"uploaded", "rejected", "downloaded"}),
    ],
)
def test_planted_http_bug_is_caught(tmp_path: Path, bug: str, caught: set[str]) -> None:
    report = planted_http(tmp_path, bug)
    assert report.http == {"uploaded": 3, "rejected": 1, "downloaded": 2}, report.summary()
    assert report.surprises == [], report.summary()
    late = {f.detail.split(" ", 1)[0] for f in report.of(ACK)}
    assert late == caught, report.summary()


SPLIT = """\
100 1.000001 openat(AT_FDCWD<\\x2f\\x77>, "\\x61", O_WRONLY|O_CREAT, 0640) = 3<\\x2f\\x77\\x2f\\x61>
100 1.000002 write(3<\\x2f\\x77\\x2f\\x61>, "\\x68\\x69", 2 <unfinished ...>
101 1.000003 syncfs(4<\\x2f\\x77>) = 0
100 1.000004 <... write resumed>) = 2
101 1.000005 syncfs(4<\\x2f\\x77>) = -1 EIO (Input/output error) (INJECTED)
100 1.000006 exit_group(0)     = ?
"""


def test_parser_joins_split_calls_and_keeps_both_positions(tmp_path: Path) -> None:
    path = tmp_path / "trace"
    path.write_text(SPLIT)
    t = tracing.parse(path)
    assert [c.name for c in t.calls] == ["openat", "syncfs", "write", "syncfs", "exit_group"]
    write = t.calls[2]
    assert (write.start, write.end, write.ret) == (1, 3, 2)
    assert write.args[0].fd == 3 and write.args[0].path == "/w/a"
    assert write.args[1].data == b"hi"
    assert t.calls[0].ret_path == "/w/a"
    failed = t.calls[3]
    assert not failed.ok and failed.error == "EIO" and failed.injected
    assert t.exits == {100: 0}
    assert t.unparsed == []


OVERTAKEN = """\
200 1.000001 renameat(3<\\x2f\\x77>, "\\x2e\\x75", 3<\\x2f\\x77>, "\\x61" <unfinished ...>
201 1.000002 openat(AT_FDCWD<\\x2f>, "\\x2f\\x77\\x2f\\x61", O_RDONLY) = 4<\\x2f\\x77\\x2f\\x61>
200 1.000003 <... renameat resumed>) = 0
201 1.000004 openat(AT_FDCWD<\\x2f>, "\\x2f\\x77\\x2f\\x62", O_RDONLY) = 5<\\x2f\\x77\\x2f\\x62>
"""


def test_a_rename_overtaken_by_an_open_of_its_new_name_is_replayed_before_it(
    tmp_path: Path,
) -> None:
    """A partner's rename still returning when the daemon opens the new name: it came first."""
    path = tmp_path / "trace"
    path.write_text(OVERTAKEN)
    t = tracing.parse(path)
    assert [(c.name, c.start, c.end) for c in t.calls] == [
        ("renameat", 0, 2),
        ("openat", 1, 1),
        ("openat", 3, 3),
    ]
