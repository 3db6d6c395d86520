"""Handlers in-process: exit codes, environment, bounded output, timeouts, limits.

The promises tested here are in ``docs/spec.rst`` ("Handlers").
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
from lxml import etree

from jobspool import handlers
from jobspool.faults import HandlerNotStarted
from jobspool.handlers import DONE, FAILED, LATER, Job, Limits
from tests.kit import (
    order,
    pid_alive,
)


@pytest.fixture
def job(tmp_path: Path) -> Path:
    """A job file where a lane would have it: queue/orders_in/order-7.xml."""
    path = tmp_path / "spool" / "queue" / "orders_in" / "order-7.xml"
    path.parent.mkdir(parents=True)
    path.write_bytes(order(7))
    return path


def script(tmp_path: Path, body: str, name: str = "handler") -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body.strip("\n") + "\n")
    path.chmod(0o755)
    return str(path)


def run(tmp_path: Path, argv: list[str], job: Path, **kwargs) -> handlers.Outcome:
    """Run a command the way a lane does: the job's path last, the JOBSPOOL_* environment."""
    env = handlers.job_environment(job.name, "orders_in", tmp_path / "spool")
    kwargs.setdefault("timeout", 20)
    return handlers.run_command([*argv, str(job)], env, **kwargs)


# --- exit status -> outcome -----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "result", "exit_status", "sig", "reason"),
    [
        pytest.param("exit 0", DONE, 0, None, None, id="exit-0-done"),
        pytest.param("exit 75", LATER, 75, None, "75", id="exit-75-later"),
        pytest.param("exit 3", FAILED, 3, None, "exit 3", id="exit-3-failed"),
        pytest.param("exit 1", FAILED, 1, None, "exit 1", id="exit-1-failed"),
        pytest.param("kill -TERM $$", FAILED, None, 15, "SIGTERM", id="sigterm-failed"),
        pytest.param("kill -KILL $$", FAILED, None, 9, "SIGKILL", id="sigkill-failed"),
    ],
)
def test_the_exit_status_decides_the_outcome(tmp_path, job, body, result, exit_status, sig, reason):
    outcome = run(tmp_path, [script(tmp_path, body)], job)
    assert outcome.result == result
    assert outcome.exit_status == exit_status
    assert outcome.signal == sig
    assert outcome.timed_out is False
    if reason is None:
        assert outcome.reason is None
    else:
        assert reason in (outcome.reason or "")
    assert outcome.started <= outcome.ended


def test_a_program_that_cannot_be_run_is_a_configuration_error_not_an_outcome(tmp_path, job):
    # No outcome at all: the job is not failed for a path in the configuration.
    with pytest.raises(HandlerNotStarted) as raised:
        run(tmp_path, [str(tmp_path / "no-such-handler")], job)
    assert raised.value.machine is False
    assert "configuration error" in str(raised.value)
    assert "no-such-handler" in str(raised.value)


# --- what the command sees --------------------------------------------------------------


def test_the_command_gets_the_jobspool_environment_and_the_job_path_last(
    tmp_path, job, monkeypatch
):
    monkeypatch.setenv("SITE_SETTING", "kept")
    seen = tmp_path / "seen"
    handler = script(
        tmp_path,
        f"""
        printf 'JOB=%s\\n' "$JOBSPOOL_JOB" > {seen}
        printf 'IFACE=%s\\n' "$JOBSPOOL_INTERFACE" >> {seen}
        printf 'SPOOL=%s\\n' "$JOBSPOOL_SPOOL" >> {seen}
        printf 'SITE=%s\\n' "$SITE_SETTING" >> {seen}
        for arg in "$@"; do printf 'ARG=%s\\n' "$arg" >> {seen}; done
        """,
    )
    outcome = run(tmp_path, [handler, "--mode", "import all"], job)
    assert outcome.result == DONE, outcome
    lines = seen.read_text().splitlines()
    assert lines == [
        "JOB=order-7.xml",
        "IFACE=orders_in",
        f"SPOOL={tmp_path / 'spool'}",
        "SITE=kept",
        "ARG=--mode",
        "ARG=import all",
        f"ARG={job}",
    ]


def test_job_environment_adds_the_three_variables_to_the_inherited_environment(tmp_path):
    env = handlers.job_environment("a.xml", "orders_in", tmp_path)
    assert env["JOBSPOOL_JOB"] == "a.xml"
    assert env["JOBSPOOL_INTERFACE"] == "orders_in"
    assert env["JOBSPOOL_SPOOL"] == str(tmp_path)
    assert "PATH" in env


def test_the_command_reads_nothing_from_stdin(tmp_path, job):
    # A handler that reads stdin must not hang the lane: stdin is /dev/null.
    outcome = run(tmp_path, [script(tmp_path, "cat; echo read-done")], job, timeout=10)
    assert outcome.result == DONE
    assert outcome.stdout == b"read-done\n"


# --- bounded output ------------------------------------------------------------------------

_MARK = re.compile(rb"\n\[\.\.\. (\d+) bytes dropped \.\.\.\]\n")


def test_small_output_is_kept_whole(tmp_path, job):
    handler = script(tmp_path, "echo to stdout; echo to stderr >&2")
    outcome = run(tmp_path, [handler], job, output_limit=100)
    assert outcome.stdout == b"to stdout\n"
    assert outcome.stderr == b"to stderr\n"
    assert (outcome.stdout_dropped, outcome.stderr_dropped) == (0, 0)


def test_large_output_keeps_head_and_tail_and_counts_what_it_dropped(tmp_path, job):
    # 100 numbered lines of 10 bytes on stdout; 30 bytes on stderr.
    handler = script(
        tmp_path,
        """
        i=0
        while [ $i -lt 100 ]; do printf '%04d-----\\n' $i; i=$((i + 1)); done
        printf 'stderr stays whole, 30 bytes\\n' >&2
        """,
    )
    full = b"".join(b"%04d-----\n" % i for i in range(100))
    limit = 100
    outcome = run(tmp_path, [handler], job, output_limit=limit)
    assert outcome.result == DONE

    kept = _MARK.split(outcome.stdout)
    assert len(kept) == 3, outcome.stdout  # head, the dropped count, tail
    head, dropped, tail = kept
    assert int(dropped) == outcome.stdout_dropped
    assert head and tail
    assert full.startswith(head)
    assert full.endswith(tail)
    assert len(head) + len(tail) <= limit
    assert outcome.stdout_dropped == len(full) - len(head) - len(tail)
    assert outcome.stdout_dropped >= len(full) - limit

    assert outcome.stderr == b"stderr stays whole, 30 bytes\n"
    assert outcome.stderr_dropped == 0


def test_a_megabyte_of_output_is_bounded(tmp_path, job):
    handler = script(tmp_path, "head -c 1000000 /dev/zero | tr '\\0' x; echo; echo THE-END")
    outcome = run(tmp_path, [handler], job, output_limit=65536)
    assert outcome.result == DONE
    assert len(outcome.stdout) < 65536 + 200
    assert outcome.stdout.startswith(b"xxxx")
    assert outcome.stdout.endswith(b"THE-END\n")
    assert outcome.stdout_dropped == 1000000 + len(b"\nTHE-END\n") - 65536


# --- timeout -----------------------------------------------------------------------------


def test_a_timeout_kills_the_whole_process_group(tmp_path, job):
    pidfile = tmp_path / "child.pid"
    handler = script(
        tmp_path,
        f"""
        sleep 300 &
        echo $! > {pidfile}
        echo waiting
        sleep 30
        """,
    )
    begun = time.monotonic()
    outcome = run(tmp_path, [handler], job, timeout=1)
    # Far less than the 30 s the handler wanted: it was killed, not waited for.
    assert time.monotonic() - begun < 20
    assert outcome.result == FAILED
    assert outcome.timed_out is True
    assert "timed out" in (outcome.reason or "")
    assert outcome.stdout == b"waiting\n"
    child = int(pidfile.read_text())
    # The background child was in the handler's process group: it is gone too.
    deadline = time.monotonic() + 10
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child), f"the handler's child {child} survived the timeout"


# --- resource limits -----------------------------------------------------------------------

ALLOCATE_500MB = "x = bytearray(500 * 1024 * 1024); print(len(x))"


def test_a_memory_limit_makes_a_greedy_handler_fail(tmp_path, job):
    limits = Limits(memory=256 * 1024 * 1024)
    outcome = run(tmp_path, [sys.executable, "-c", ALLOCATE_500MB], job, limits=limits)
    assert outcome.result == FAILED
    assert b"MemoryError" in outcome.stderr


def test_the_same_handler_runs_within_the_limit_when_it_asks_for_less(tmp_path, job):
    # The limit, not the interpreter, is what made the previous one fail.
    limits = Limits(memory=256 * 1024 * 1024)
    small = "x = bytearray(10 * 1024 * 1024); print(len(x))"
    outcome = run(tmp_path, [sys.executable, "-c", small], job, limits=limits)
    assert outcome.result == DONE, outcome
    assert outcome.stdout == b"10485760\n"


def test_without_a_limit_the_greedy_handler_succeeds(tmp_path, job):
    outcome = run(tmp_path, [sys.executable, "-c", ALLOCATE_500MB], job)
    assert outcome.result == DONE, outcome


# --- Python handlers ------------------------------------------------------------------------

PY_HANDLERS = """\
import jobspool

SEEN = []


def ok(job):
    SEEN.append((job.name, job.interface, str(job.path)))


def tree(job):
    SEEN.append((job.tree.getroot().tag, job.tree.getroot().findtext("sku")))


def later(job):
    raise jobspool.TryLater("the ERP is down for maintenance")


def boom(job):
    raise ValueError("unknown sku " + job.name)
"""


@pytest.fixture
def pymod(tmp_path, monkeypatch, request):
    """A module of Python handlers importable under a name unique to the test."""
    name = "handlers_" + re.sub(r"\W", "_", request.node.name)
    (tmp_path / f"{name}.py").write_text(PY_HANDLERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_python_handler_that_returns_is_done_and_sees_the_job(job, pymod):
    outcome = handlers.run_python(f"{pymod}:ok", Job(job.name, "orders_in", job))
    assert outcome.result == DONE
    assert outcome.traceback is None
    seen = sys.modules[pymod].SEEN
    assert seen == [("order-7.xml", "orders_in", str(job))]


def test_a_python_handler_gets_the_parsed_tree_of_its_job(job, pymod):
    outcome = handlers.run_python(f"{pymod}:tree", Job(job.name, "orders_in", job))
    assert outcome.result == DONE, outcome.traceback
    seen = sys.modules[pymod].SEEN
    assert seen == [("order", "HAM-1")]


def test_a_python_handler_raising_trylater_is_later(job, pymod):
    outcome = handlers.run_python(f"{pymod}:later", Job(job.name, "orders_in", job))
    assert outcome.result == LATER
    assert outcome.reason == "the ERP is down for maintenance"


def test_a_python_handler_raising_is_failed_with_its_traceback(job, pymod):
    outcome = handlers.run_python(f"{pymod}:boom", Job(job.name, "orders_in", job))
    assert outcome.result == FAILED
    assert outcome.reason == "ValueError: unknown sku order-7.xml"
    assert outcome.traceback is not None
    assert outcome.traceback.startswith("Traceback (most recent call last):")
    assert f"{pymod}.py" in outcome.traceback
    assert "ValueError: unknown sku order-7.xml" in outcome.traceback


def test_a_python_handler_that_cannot_be_imported_is_failed(job):
    outcome = handlers.run_python("no_such_module_xyz:handle", Job(job.name, "orders_in", job))
    assert outcome.result == FAILED
    assert "no_such_module_xyz" in (outcome.traceback or "")


def test_a_job_tree_is_parsed_without_resolving_entities(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-1234")
    path = tmp_path / "xxe.xml"
    path.write_text(
        f'<?xml version="1.0"?>\n<!DOCTYPE order [<!ENTITY s SYSTEM "file://{secret}">]>\n'
        '<order id="1"><sku>&s;</sku><qty>1</qty></order>\n'
    )
    tree = Job("xxe.xml", "orders_in", path).tree
    assert b"TOP-SECRET" not in etree.tostring(tree)
